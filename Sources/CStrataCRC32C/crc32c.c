#include "strata_crc32c.h"

#include <string.h>

// Slice-by-8 tables, built once before main() runs (no lazy init, no race).
static uint32_t table[8][256];
static int use_hardware;

// The hardware path runs three independent CRC streams over three lanes (the crc32
// instruction has a latency of three cycles but a throughput of one), then joins them: for a
// raw (non-inverted) CRC, crc(c, A || B) = shift(crc(c, A)) ^ crc(0, B), where shift multiplies
// by x^(8 * |B|) modulo the polynomial, a linear map applied with four byte tables.
#define LANE 1360
static uint32_t lane_shift[4][256];

static uint32_t crc_software(uint32_t crc, const unsigned char *p, size_t n);

static inline uint32_t shift_lane(uint32_t c) {
  return lane_shift[0][c & 0xFF] ^ lane_shift[1][(c >> 8) & 0xFF] ^ lane_shift[2][(c >> 16) & 0xFF] ^
         lane_shift[3][c >> 24];
}

__attribute__((constructor)) static void strata_crc32c_init(void) {
  for (uint32_t i = 0; i < 256; i++) {
    uint32_t c = i;
    for (int k = 0; k < 8; k++) c = (c & 1) ? (c >> 1) ^ 0x82F63B78u : c >> 1;
    table[0][i] = c;
  }
  for (uint32_t i = 0; i < 256; i++) {
    for (int s = 1; s < 8; s++) table[s][i] = (table[s - 1][i] >> 8) ^ table[0][table[s - 1][i] & 0xFF];
  }
  static const unsigned char zeros[LANE];
  uint32_t basis[32];
  for (int i = 0; i < 32; i++) basis[i] = crc_software(1u << i, zeros, LANE);
  for (int k = 0; k < 4; k++) {
    for (uint32_t v = 0; v < 256; v++) {
      uint32_t r = 0;
      for (int bit = 0; bit < 8; bit++)
        if (v & (1u << bit)) r ^= basis[8 * k + bit];
      lane_shift[k][v] = r;
    }
  }
#if defined(__x86_64__)
  __builtin_cpu_init();
  use_hardware = __builtin_cpu_supports("sse4.2");
#endif
}

static uint32_t crc_software(uint32_t crc, const unsigned char *p, size_t n) {
  while (n >= 8) {
    uint64_t w;
    memcpy(&w, p, 8);
    w ^= crc;
    crc = table[7][w & 0xFF] ^ table[6][(w >> 8) & 0xFF] ^ table[5][(w >> 16) & 0xFF] ^
          table[4][(w >> 24) & 0xFF] ^ table[3][(w >> 32) & 0xFF] ^ table[2][(w >> 40) & 0xFF] ^
          table[1][(w >> 48) & 0xFF] ^ table[0][w >> 56];
    p += 8;
    n -= 8;
  }
  while (n--) crc = (crc >> 8) ^ table[0][(crc ^ *p++) & 0xFF];
  return crc;
}

#if defined(__x86_64__)
__attribute__((target("sse4.2"))) static uint32_t crc_hardware(uint32_t crc, const unsigned char *p, size_t n) {
  while (n >= 3 * LANE) {
    uint64_t a = crc, b = 0, c = 0;
    for (size_t i = 0; i < LANE; i += 8) {
      uint64_t wa, wb, wc;
      memcpy(&wa, p + i, 8);
      memcpy(&wb, p + LANE + i, 8);
      memcpy(&wc, p + 2 * LANE + i, 8);
      a = __builtin_ia32_crc32di(a, wa);
      b = __builtin_ia32_crc32di(b, wb);
      c = __builtin_ia32_crc32di(c, wc);
    }
    crc = shift_lane(shift_lane((uint32_t)a) ^ (uint32_t)b) ^ (uint32_t)c;
    p += 3 * LANE;
    n -= 3 * LANE;
  }
  uint64_t c = crc;
  while (n >= 8) {
    uint64_t w;
    memcpy(&w, p, 8);
    c = __builtin_ia32_crc32di(c, w);
    p += 8;
    n -= 8;
  }
  uint32_t c32 = (uint32_t)c;
  while (n--) c32 = __builtin_ia32_crc32qi(c32, *p++);
  return c32;
}
#endif

uint32_t strata_crc32c(uint32_t crc, const void *data, size_t length) {
  const unsigned char *p = data;
  crc = ~crc;
#if defined(__x86_64__)
  if (use_hardware) return ~crc_hardware(crc, p, length);
#endif
  return ~crc_software(crc, p, length);
}

int strata_crc32c_is_hardware(void) { return use_hardware; }
