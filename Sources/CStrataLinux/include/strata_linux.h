#ifndef STRATA_LINUX_H
#define STRATA_LINUX_H

#include <sys/types.h>

// Linux constants and calls that need _GNU_SOURCE, which Swift's Glibc module does not define.

/// The O_DIRECT open flag.
int strata_o_direct(void);

/// fallocate(PUNCH_HOLE | KEEP_SIZE): frees the blocks of a byte range; 0 or -1 with errno.
int strata_punch_hole(int fd, off_t offset, off_t length);

/// fallocate(mode 0): allocates a byte range, extending the file; 0 or -1 with errno.
int strata_fallocate(int fd, off_t offset, off_t length);

/// Logical block size of the device under `fd` for O_DIRECT alignment, or 512 when unknown.
int strata_direct_alignment(int fd);

#include <stddef.h>

/// recvmsg() of up to `length` bytes plus up to `max_fds` SCM_RIGHTS descriptors (received
/// close-on-exec). Returns the byte count (0 at EOF) or -1 with errno; `*nfds` gets the number
/// of descriptors, and a truncated control message (MSG_CTRUNC) is reported as -1/EMSGSIZE
/// after closing whatever arrived.
long strata_recv_with_fds(int sock, void *buffer, size_t length, int *fds, int max_fds, int *nfds);

/// sendmsg() of `length` bytes with `nfds` SCM_RIGHTS descriptors (MSG_NOSIGNAL).
long strata_send_with_fds(int sock, const void *buffer, size_t length, const int *fds, int nfds);

/// eventfd(initval, EFD_CLOEXEC | extra_flags).
int strata_eventfd(unsigned int initval, int extra_flags);
int strata_efd_nonblock(void);

/// memfd_create(name, MFD_CLOEXEC | MFD_ALLOW_SEALING).
int strata_memfd(const char *name);

/// Seals a memfd's size (no shrinking, no growing, no more seals): whoever else maps it can no
/// longer truncate it under a mapping and make its users fault with SIGBUS. 0 or -1 with errno.
int strata_seal_size(int fd);

/// Whether `fd` can no longer shrink (F_SEAL_SHRINK).
int strata_size_sealed(int fd);

#include <stdint.h>

/// Shared-memory ring indices (virtqueues): a store with release ordering and a load with
/// acquire ordering, which plain Swift loads and stores do not give.
void strata_store_release_u16(volatile uint16_t *p, uint16_t v);
uint16_t strata_load_acquire_u16(const volatile uint16_t *p);
void strata_store_release_u32(volatile uint32_t *p, uint32_t v);
uint32_t strata_load_acquire_u32(const volatile uint32_t *p);
/// Counters one thread writes and others read (queue statistics).
void strata_store_release_u64(volatile uint64_t *p, uint64_t v);
uint64_t strata_load_acquire_u64(const volatile uint64_t *p);
/// A full memory barrier (EVENT_IDX: publish the used index, then read avail_event).
void strata_fence_seq_cst(void);

/// Blocks SIGINT, SIGTERM and SIGHUP in the calling thread (threads created later inherit the
/// mask) and returns a signalfd that becomes readable when one arrives; -1 with errno.
int strata_termination_signalfd(void);

/// Reads one pending signal from a signalfd; returns its number or -1.
int strata_read_signal(int fd);

#endif
