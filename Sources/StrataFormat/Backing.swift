/// The backing-file page (format-spec/README.md, "Backing file"): page 2 of an image whose
/// superblock sets the BACKING_FILE feature bit. It names the parent image that blocks never
/// written in this one are read from, and the parent's image id, so that a replaced parent is
/// refused instead of silently read. Written once, at creation.
public struct BackingDescriptor: Equatable, Sendable {
  public static let magic = Array("STRBACK\u{0}".utf8)
  public static let version: UInt16 = 1
  /// Byte offset of the page in the image file.
  public static let offset = UInt64(2 * Layout.pageSize)
  public static let maxPathLength = Layout.pageSize - 44

  /// The parent's path: absolute, or relative to the directory of this image.
  public var path: String
  public var parentImageID: [UInt8]
  /// The parent's virtual size when this image was created (informational).
  public var parentSize: UInt64

  public init(path: String, parentImageID: [UInt8], parentSize: UInt64) {
    precondition(parentImageID.count == 16)
    self.path = path
    self.parentImageID = parentImageID
    self.parentSize = parentSize
  }

  /// One page: magic, version, path length, reserved, parent id, parent size, path, zeros, and
  /// the CRC-32C of everything before it in the last four bytes.
  public func encode() throws -> [UInt8] {
    let bytes = Array(path.utf8)
    guard !bytes.isEmpty, bytes.count <= Self.maxPathLength, !bytes.contains(0) else {
      throw FormatError(.invalidField, "backing file page", "the path must be 1...\(Self.maxPathLength) bytes, no NUL")
    }
    var w = ByteWriter(capacity: Layout.pageSize)
    w.raw(Self.magic)
    w.u16(Self.version)
    w.u16(UInt16(bytes.count))
    w.u32(0)
    w.raw(parentImageID)
    w.u64(parentSize)
    w.raw(bytes)
    w.zeros(Layout.pageSize - 4 - w.count)
    let crc = w.bytes.withUnsafeBytes { CRC32C.checksum($0) }
    w.u32(crc)
    return w.bytes
  }

  public static func decode(_ page: UnsafeRawBufferPointer) throws -> BackingDescriptor {
    let structure = "backing file page"
    guard page.count >= Layout.pageSize else { throw FormatError(.truncated, structure, "\(page.count) bytes") }
    var r = ByteReader(UnsafeRawBufferPointer(rebasing: page[..<Layout.pageSize]), structure: structure)
    guard try r.raw(8) == magic else { throw FormatError(.badMagic, structure, "no backing file magic") }
    let stored = page.loadUnaligned(fromByteOffset: Layout.pageSize - 4, as: UInt32.self).littleEndian
    let actual = CRC32C.checksum(UnsafeRawBufferPointer(rebasing: page[..<(Layout.pageSize - 4)]))
    guard stored == actual else {
      throw FormatError(.badChecksum, structure, "stored \(stored), computed \(actual)")
    }
    let v = try r.u16()
    guard v == version else { throw FormatError(.unsupportedVersion, structure, "version \(v)") }
    let length = Int(try r.u16())
    guard length >= 1, length <= maxPathLength else {
      throw FormatError(.invalidField, structure, "path length \(length)")
    }
    try r.skip(4)
    let id = try r.raw(16)
    let size = try r.u64()
    let bytes = try r.raw(length)
    guard !bytes.contains(0), let path = String(validating: bytes, as: UTF8.self) else {
      throw FormatError(.invalidField, structure, "the path is not UTF-8 text")
    }
    return BackingDescriptor(path: path, parentImageID: id, parentSize: size)
  }
}
