/*
 * libStrataC: the C ABI of the Strata disk image library, for VMMs and tools written in C,
 * C++ or Rust. Link with -lStrataC (the shared library `swift build --product StrataC` makes).
 *
 * Every function returns 0 on success or a negated errno value:
 *   -EINVAL  a bad argument (a range past the end of the disk, a size not a multiple of 512)
 *   -ENOENT  no such file or snapshot        -EEXIST  the file or snapshot name exists
 *   -EROFS   the image was opened read-only  -EBUSY   another process holds the image
 *   -EIO     an I/O error                    -ENOSPC  the file system is full
 *   -EBADMSG data failed its checksum (it is not returned)
 *   -EUCLEAN the image's metadata is damaged (run `strata check --repair`)
 *   -ENOTSUP not a Strata image, or a format feature this build does not know
 * strata_last_error() then describes the failure in words (per thread, valid until the
 * thread's next call).
 *
 * A strata_image may be used from several threads at once (calls are serialized inside).
 * Writes are durable once strata_flush returns.
 */
#ifndef STRATA_H
#define STRATA_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct strata_image strata_image;

/* strata_open flags */
#define STRATA_OPEN_READ_ONLY 1u

/* Creates an image of `size` bytes (a multiple of 512) at `path`; fails with -EEXIST if the
 * file exists. */
int strata_create(const char *path, uint64_t size, strata_image **out);
/* Opens an image; recovers it after a crash (the log is replayed). */
int strata_open(const char *path, unsigned flags, strata_image **out);
/* Flushes (unless read-only) and closes; `image` is freed even when an error is returned. */
int strata_close(strata_image *image);

uint64_t strata_size(strata_image *image);
uint32_t strata_block_size(strata_image *image);

int strata_read(strata_image *image, void *buffer, size_t length, uint64_t offset);
int strata_write(strata_image *image, const void *buffer, size_t length, uint64_t offset);
/* Makes every write before it durable (one sync serves all writers: group commit). */
int strata_flush(strata_image *image);
/* Both read back as zeros afterwards; neither stores data. */
int strata_discard(strata_image *image, uint64_t offset, uint64_t length);
int strata_write_zeroes(strata_image *image, uint64_t offset, uint64_t length);
/* Grows the disk; shrinking is refused with -EINVAL unless `allow_shrink` is non-zero. */
int strata_resize(strata_image *image, uint64_t new_size, int allow_shrink);

/* Takes a durable snapshot (one log record); its sequence number goes to `seq` if not NULL. */
int strata_snapshot_create(strata_image *image, const char *name, uint64_t *seq);
int strata_snapshot_delete(strata_image *image, const char *name);
/* Reads from a snapshot instead of the current disk. */
int strata_snapshot_read(strata_image *image, const char *name, void *buffer, size_t length, uint64_t offset);

/* Reclaims the space of overwritten data (the cleaner, as `strata compact`), freeing at most
   `max_segments` log segments (0: all it can); snapshots stay readable. The count of segments
   freed goes to `freed` if not NULL. Other calls on the handle wait while it runs. */
int strata_compact(strata_image *image, unsigned max_segments, unsigned *freed);

const char *strata_last_error(void);

#ifdef __cplusplus
}
#endif
#endif
