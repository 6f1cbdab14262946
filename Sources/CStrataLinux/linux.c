#define _GNU_SOURCE
#include "strata_linux.h"

#include <fcntl.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <sys/stat.h>

int strata_o_direct(void) { return O_DIRECT; }

int strata_punch_hole(int fd, off_t offset, off_t length) {
  return fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length);
}

int strata_direct_alignment(int fd) {
  struct stat st;
  if (fstat(fd, &st) == 0 && S_ISBLK(st.st_mode)) {
    int size = 0;
    if (ioctl(fd, BLKSSZGET, &size) == 0 && size > 0) return size;
  }
  return 512;
}
