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

int strata_fallocate(int fd, off_t offset, off_t length) { return fallocate(fd, 0, offset, length); }

int strata_direct_alignment(int fd) {
  struct stat st;
  if (fstat(fd, &st) == 0 && S_ISBLK(st.st_mode)) {
    int size = 0;
    if (ioctl(fd, BLKSSZGET, &size) == 0 && size > 0) return size;
  }
  return 512;
}

#include <errno.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#define STRATA_MAX_FDS 16

long strata_recv_with_fds(int sock, void *buffer, size_t length, int *fds, int max_fds, int *nfds) {
  char control[CMSG_SPACE(sizeof(int) * STRATA_MAX_FDS)];
  struct iovec iov = {.iov_base = buffer, .iov_len = length};
  struct msghdr msg = {0};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  msg.msg_control = control;
  msg.msg_controllen = sizeof(control);
  *nfds = 0;
  ssize_t n;
  do {
    n = recvmsg(sock, &msg, MSG_CMSG_CLOEXEC);
  } while (n < 0 && errno == EINTR);
  if (n < 0) return -1;
  int count = 0;
  for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c != NULL; c = CMSG_NXTHDR(&msg, c)) {
    if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
    int k = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
    int *in = (int *)CMSG_DATA(c);
    for (int i = 0; i < k; i++) {
      if (count < max_fds) {
        fds[count++] = in[i];
      } else {
        close(in[i]);  // more descriptors than any message may carry: never leak them
        msg.msg_flags |= MSG_CTRUNC;
      }
    }
  }
  if (msg.msg_flags & MSG_CTRUNC) {
    for (int i = 0; i < count; i++) close(fds[i]);
    errno = EMSGSIZE;
    return -1;
  }
  *nfds = count;
  return (long)n;
}

long strata_send_with_fds(int sock, const void *buffer, size_t length, const int *fds, int nfds) {
  char control[CMSG_SPACE(sizeof(int) * STRATA_MAX_FDS)];
  struct iovec iov = {.iov_base = (void *)buffer, .iov_len = length};
  struct msghdr msg = {0};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  if (nfds > 0) {
    if (nfds > STRATA_MAX_FDS) {
      errno = EINVAL;
      return -1;
    }
    memset(control, 0, sizeof(control));
    msg.msg_control = control;
    msg.msg_controllen = CMSG_SPACE(sizeof(int) * nfds);
    struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int) * nfds);
    memcpy(CMSG_DATA(c), fds, sizeof(int) * nfds);
  }
  ssize_t n;
  do {
    n = sendmsg(sock, &msg, MSG_NOSIGNAL);
  } while (n < 0 && errno == EINTR);
  return (long)n;
}

int strata_eventfd(unsigned int initval, int extra_flags) { return eventfd(initval, EFD_CLOEXEC | extra_flags); }

int strata_efd_nonblock(void) { return EFD_NONBLOCK; }

int strata_memfd(const char *name) { return memfd_create(name, MFD_CLOEXEC | MFD_ALLOW_SEALING); }

int strata_seal_size(int fd) { return fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL); }

int strata_size_sealed(int fd) {
  int seals = fcntl(fd, F_GET_SEALS);
  return seals >= 0 && (seals & F_SEAL_SHRINK) != 0;
}

void strata_store_release_u16(volatile uint16_t *p, uint16_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
uint16_t strata_load_acquire_u16(const volatile uint16_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
void strata_store_release_u32(volatile uint32_t *p, uint32_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
uint32_t strata_load_acquire_u32(const volatile uint32_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
void strata_store_release_u64(volatile uint64_t *p, uint64_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
uint64_t strata_load_acquire_u64(const volatile uint64_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
void strata_fence_seq_cst(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

#include <pthread.h>
#include <signal.h>
#include <sys/signalfd.h>

int strata_termination_signalfd(void) {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGHUP);
  if (pthread_sigmask(SIG_BLOCK, &set, NULL) != 0) return -1;
  return signalfd(-1, &set, SFD_CLOEXEC);
}

int strata_read_signal(int fd) {
  struct signalfd_siginfo info;
  ssize_t n = read(fd, &info, sizeof(info));
  return n == (ssize_t)sizeof(info) ? (int)info.ssi_signo : -1;
}
