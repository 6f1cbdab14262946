/// Little-endian encoder appending to a reusable byte array.
///
/// Every multi-byte integer in the Strata format is little-endian (format-spec/README.md).
public struct ByteWriter {
  public private(set) var bytes: [UInt8]

  public init(capacity: Int = 0) {
    bytes = []
    bytes.reserveCapacity(capacity)
  }

  public var count: Int { bytes.count }

  public mutating func reset() { bytes.removeAll(keepingCapacity: true) }

  public mutating func u8(_ v: UInt8) { bytes.append(v) }

  public mutating func u16(_ v: UInt16) { integer(v) }

  public mutating func u32(_ v: UInt32) { integer(v) }

  public mutating func u64(_ v: UInt64) { integer(v) }

  public mutating func raw(_ b: some Sequence<UInt8>) { bytes.append(contentsOf: b) }

  public mutating func zeros(_ n: Int) { bytes.append(contentsOf: repeatElement(0, count: n)) }

  /// Pads with zeros up to the next multiple of `alignment`.
  public mutating func align(to alignment: Int) {
    let r = bytes.count % alignment
    if r != 0 { zeros(alignment - r) }
  }

  /// Overwrites a little-endian UInt32 at `offset`, e.g. a checksum computed after encoding.
  public mutating func patchU32(_ v: UInt32, at offset: Int) { patch(v, at: offset) }

  /// Overwrites a little-endian integer at `offset` (a header filled in after its body).
  public mutating func patch<T: FixedWidthInteger>(_ v: T, at offset: Int) {
    let size = MemoryLayout<T>.size
    precondition(offset >= 0 && offset + size <= bytes.count)
    bytes.withUnsafeMutableBytes { $0.storeBytes(of: v.littleEndian, toByteOffset: offset, as: T.self) }
  }

  /// Appends little-endian UInt32s from borrowed memory (checksum lists) without an array.
  public mutating func u32s(_ values: UnsafeBufferPointer<UInt32>) {
    for v in values { u32(v) }
  }

  private mutating func integer<T: FixedWidthInteger>(_ v: T) {
    var le = v.littleEndian
    withUnsafeBytes(of: &le) { bytes.append(contentsOf: $0) }
  }
}

/// Bounds-checked little-endian decoder over borrowed bytes. Every read past the end throws
/// `FormatError.truncated` naming `structure`, so hostile input can never read out of bounds.
public struct ByteReader {
  public let bytes: UnsafeRawBufferPointer
  public private(set) var offset: Int
  public let structure: String

  public init(_ bytes: UnsafeRawBufferPointer, structure: String, offset: Int = 0) {
    self.bytes = bytes
    self.offset = offset
    self.structure = structure
  }

  public var remaining: Int { bytes.count - offset }

  public mutating func u8() throws -> UInt8 { try integer() }

  public mutating func u16() throws -> UInt16 { try integer() }

  public mutating func u32() throws -> UInt32 { try integer() }

  public mutating func u64() throws -> UInt64 { try integer() }

  public mutating func raw(_ n: Int) throws -> [UInt8] {
    try need(n)
    defer { offset += n }
    return Array(bytes[offset..<offset + n])
  }

  public mutating func skip(_ n: Int) throws {
    try need(n)
    offset += n
  }

  public mutating func seek(to newOffset: Int) throws {
    guard newOffset >= 0, newOffset <= bytes.count else {
      throw FormatError(.truncated, structure, "offset \(newOffset) is outside \(bytes.count) bytes")
    }
    offset = newOffset
  }

  private mutating func need(_ n: Int) throws {
    guard n >= 0, n <= remaining else {
      throw FormatError(.truncated, structure, "needs \(n) bytes at offset \(offset), only \(remaining) left")
    }
  }

  private mutating func integer<T: FixedWidthInteger>() throws -> T {
    let size = MemoryLayout<T>.size
    try need(size)
    let v = bytes.loadUnaligned(fromByteOffset: offset, as: T.self)
    offset += size
    return T(littleEndian: v)
  }
}

extension UnsafeRawBufferPointer {
  /// Reads a little-endian integer at `offset`; the caller has checked the bounds.
  @inlinable
  public func littleEndian<T: FixedWidthInteger>(at offset: Int, as: T.Type) -> T {
    T(littleEndian: loadUnaligned(fromByteOffset: offset, as: T.self))
  }
}

extension UnsafeMutableRawBufferPointer {
  @inlinable
  public func storeLittleEndian<T: FixedWidthInteger>(_ value: T, at offset: Int) {
    storeBytes(of: value.littleEndian, toByteOffset: offset, as: T.self)
  }
}
