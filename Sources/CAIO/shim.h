// Linux native AIO (libaio), imported into Swift.
#include <features.h>
#include <libaio.h>
