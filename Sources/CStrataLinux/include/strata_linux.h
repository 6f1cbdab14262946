#ifndef STRATA_LINUX_H
#define STRATA_LINUX_H

#include <sys/types.h>

// Linux constants and calls that need _GNU_SOURCE, which Swift's Glibc module does not define.

/// The O_DIRECT open flag.
int strata_o_direct(void);

/// fallocate(PUNCH_HOLE | KEEP_SIZE): frees the blocks of a byte range; 0 or -1 with errno.
int strata_punch_hole(int fd, off_t offset, off_t length);

/// Logical block size of the device under `fd` for O_DIRECT alignment, or 512 when unknown.
int strata_direct_alignment(int fd);

#endif
