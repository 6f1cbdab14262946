/* The C ABI from C: create, write, snapshot, overwrite, read both back, errors with their
 * errno and message, flush, reopen, and concurrent writers on one handle.
 * Built and run by Tests/cabi/run.sh. Exit status 0 when every check held. */
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "strata.h"

static int failures = 0;
#define CHECK(cond, ...)                                      \
  do {                                                        \
    if (!(cond)) {                                            \
      fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__);     \
      fprintf(stderr, __VA_ARGS__);                           \
      fprintf(stderr, " (last error: %s)\n", strata_last_error()); \
      failures++;                                             \
    }                                                         \
  } while (0)

static void fill(unsigned char *p, size_t n, unsigned seed) {
  for (size_t i = 0; i < n; i++) p[i] = (unsigned char)(seed * 131 + i * 7 + (i >> 9));
}

struct writer { strata_image *image; int index; int rc; };

static void *write_blocks(void *arg) {
  struct writer *w = arg;
  unsigned char block[4096];
  for (int i = 0; i < 64 && w->rc == 0; i++) {
    fill(block, sizeof block, 1000 + w->index * 64 + i);
    w->rc = strata_write(w->image, block, sizeof block, (uint64_t)(1024 + w->index * 64 + i) * 4096);
  }
  if (w->rc == 0) w->rc = strata_flush(w->image);
  return NULL;
}

int main(int argc, char **argv) {
  if (argc != 2) { fprintf(stderr, "usage: %s DIR\n", argv[0]); return 2; }
  char path[4096];
  snprintf(path, sizeof path, "%s/c.strata", argv[1]);
  unlink(path);

  strata_image *image = NULL;
  CHECK(strata_create(path, 64 << 20, &image) == 0, "create");
  strata_image *other = NULL;
  CHECK(strata_create(path, 64 << 20, &other) == -EEXIST && other == NULL, "create over an existing file");
  CHECK(strata_size(image) == 64 << 20, "size %llu", (unsigned long long)strata_size(image));
  CHECK(strata_block_size(image) == 4096, "block size %u", strata_block_size(image));

  static unsigned char v1[1 << 20], v2[1 << 20], got[1 << 20];
  fill(v1, sizeof v1, 1);
  fill(v2, sizeof v2, 2);
  CHECK(strata_write(image, v1, sizeof v1, 1 << 20) == 0, "write v1");
  uint64_t seq = 0;
  CHECK(strata_snapshot_create(image, "before", &seq) == 0 && seq > 0, "snapshot (seq %llu)", (unsigned long long)seq);
  CHECK(strata_snapshot_create(image, "before", NULL) == -EEXIST, "a duplicate snapshot name is refused");
  CHECK(strata_write(image, v2, sizeof v2, 1 << 20) == 0, "write v2");
  CHECK(strata_read(image, got, sizeof got, 1 << 20) == 0 && memcmp(got, v2, sizeof got) == 0, "head reads v2");
  CHECK(strata_snapshot_read(image, "before", got, sizeof got, 1 << 20) == 0 && memcmp(got, v1, sizeof got) == 0,
        "snapshot reads v1");
  CHECK(strata_snapshot_read(image, "nope", got, 4096, 0) == -ENOENT, "missing snapshot");

  /* Errors: a range past the end, a NULL buffer; the message says what went wrong. */
  CHECK(strata_read(image, got, 4096, 64 << 20) == -EINVAL, "read past the end");
  CHECK(strlen(strata_last_error()) > 0, "an error message");
  CHECK(strata_write(image, NULL, 4096, 0) == -EINVAL, "NULL buffer");
  CHECK(strata_resize(image, 32 << 20, 0) == -EINVAL, "shrink without allow_shrink");

  CHECK(strata_write_zeroes(image, 1 << 20, 8192) == 0, "write zeroes");
  CHECK(strata_discard(image, (1 << 20) + 8192, 8192) == 0, "discard");
  CHECK(strata_read(image, got, 16384, 1 << 20) == 0, "read zeroed range");
  int zero = 1;
  for (int i = 0; i < 16384; i++) zero &= got[i] == 0;
  CHECK(zero, "zeroed and discarded blocks read as zeros");
  CHECK(strata_resize(image, 128 << 20, 0) == 0 && strata_size(image) == 128 << 20, "grow");

  /* Four threads write their own blocks through the same handle. */
  pthread_t threads[4];
  struct writer writers[4];
  for (int t = 0; t < 4; t++) {
    writers[t] = (struct writer){image, t, 0};
    pthread_create(&threads[t], NULL, write_blocks, &writers[t]);
  }
  for (int t = 0; t < 4; t++) {
    pthread_join(threads[t], NULL);
    CHECK(writers[t].rc == 0, "writer %d: %d", t, writers[t].rc);
  }
  CHECK(strata_snapshot_delete(image, "before") == 0, "delete snapshot");
  unsigned freed = 12345;
  CHECK(strata_compact(image, 0, &freed) == 0 && freed != 12345, "compact");
  CHECK(strata_compact(NULL, 0, NULL) == -EINVAL, "compact without a handle");
  CHECK(strata_close(image) == 0, "close");

  /* A second process-level open while closed works; read-only refuses writes. */
  CHECK(strata_open(path, STRATA_OPEN_READ_ONLY, &image) == 0, "open read-only");
  CHECK(strata_write(image, v1, 4096, 0) == -EROFS, "write to a read-only image");
  CHECK(strata_read(image, got, sizeof got, 1 << 20) == 0, "read after reopen");
  CHECK(memcmp(got + 16384, v2 + 16384, sizeof got - 16384) == 0, "v2 survived the reopen");
  unsigned char block[4096];
  for (int t = 0; t < 4; t++) {
    for (int i = 0; i < 64; i++) {
      fill(block, sizeof block, 1000 + t * 64 + i);
      CHECK(strata_read(image, got, 4096, (uint64_t)(1024 + t * 64 + i) * 4096) == 0 && memcmp(got, block, 4096) == 0,
            "thread %d block %d", t, i);
    }
  }
  CHECK(strata_snapshot_read(image, "before", got, 4096, 0) == -ENOENT, "the deleted snapshot is gone");
  CHECK(strata_close(image) == 0, "close read-only");

  /* Not an image. */
  snprintf(path, sizeof path, "%s/not-an-image", argv[1]);
  FILE *f = fopen(path, "w");
  for (int i = 0; i < 100000; i++) fputc('x', f);
  fclose(f);
  CHECK(strata_open(path, 0, &image) == -ENOTSUP, "a foreign file is refused");

  if (failures) { fprintf(stderr, "%d check(s) failed\n", failures); return 1; }
  printf("C ABI: all checks passed\n");
  return 0;
}
