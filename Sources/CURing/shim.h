// liburing, imported into Swift. <features.h> must come first: without it the module build
// fails on a module-merge error around fd_set (../shared/SWIFT-NOTES.md).
#include <features.h>
#include <liburing.h>
