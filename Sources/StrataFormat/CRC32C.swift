import CStrataCRC32C

/// CRC-32C (Castagnoli), the checksum of every Strata structure.
///
/// Chaining follows zlib: `checksum(b, continuing: checksum(a))` equals the checksum of `a + b`.
public enum CRC32C {
  public static func checksum(_ bytes: UnsafeRawBufferPointer, continuing crc: UInt32 = 0) -> UInt32 {
    guard let base = bytes.baseAddress, bytes.count > 0 else { return crc }
    return strata_crc32c(crc, base, bytes.count)
  }

  public static func checksum(_ bytes: [UInt8], continuing crc: UInt32 = 0) -> UInt32 {
    bytes.withUnsafeBytes { checksum($0, continuing: crc) }
  }

  public static var isHardwareAccelerated: Bool { strata_crc32c_is_hardware() != 0 }
}

/// Eight lowercase hex digits, the way checksums appear in messages and `inspect` output.
public func hex32(_ v: UInt32) -> String {
  let s = String(v, radix: 16)
  return String(repeating: "0", count: 8 - s.count) + s
}
