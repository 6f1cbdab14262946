#ifndef STRATA_CRC32C_H
#define STRATA_CRC32C_H

#include <stddef.h>
#include <stdint.h>

/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78) in the zlib calling
/// convention: pass 0 to start, pass the previous result to continue, so that
/// crc(crc(0, a), b) == crc(0, a || b). crc(0, "123456789") == 0xE3069283.
uint32_t strata_crc32c(uint32_t crc, const void *data, size_t length);

/// 1 when the hardware (SSE4.2) path is in use, 0 for the table fallback.
int strata_crc32c_is_hardware(void);

#endif
