/// The backing-file page (format-spec/README.md, "Backing file"): page 2 of an image whose
/// superblock sets the BACKING_FILE feature bit. It names the parent image that blocks never
/// written in this one are read from, and the parent's image id, so that a replaced parent is
/// refused instead of silently read. Written once, at creation.
///
/// Version 1 reads through to the parent's current disk (its head). Version 2 also names a
/// fixed point of the parent, a snapshot (`BackingPoint`), and reads through to that snapshot's
/// view instead: what a branch is.
public struct BackingDescriptor: Equatable, Sendable {
  public static let magic = Array("STRBACK\u{0}".utf8)
  /// The version written for a page without a point (and the only one older readers know).
  public static let version: UInt16 = 1
  /// The version written for a page with a point.
  public static let pointVersion: UInt16 = 2
  /// Byte offset of the page in the image file.
  public static let offset = UInt64(2 * Layout.pageSize)
  /// Where the path starts: after the fixed fields of version 1, after the point in version 2.
  static let pathOffset = 40
  static let pointPathOffset = 328
  public static let maxPathLength = Layout.pageSize - 4 - pathOffset
  public static let maxPointPathLength = Layout.pageSize - 4 - pointPathOffset

  /// The parent's path: absolute, or relative to the directory of this image.
  public var path: String
  public var parentImageID: [UInt8]
  /// The parent's virtual size when this image was created (informational).
  public var parentSize: UInt64
  /// The parent's snapshot whose view blocks never written here are read from (nil: the
  /// parent's head, version 1).
  public var point: BackingPoint?

  public init(path: String, parentImageID: [UInt8], parentSize: UInt64, point: BackingPoint? = nil) {
    precondition(parentImageID.count == 16)
    self.path = path
    self.parentImageID = parentImageID
    self.parentSize = parentSize
    self.point = point
  }

  /// One page: magic, version, path length, flags, parent id, parent size, [point,] path, zeros,
  /// and the CRC-32C of everything before it in the last four bytes.
  public func encode() throws -> [UInt8] {
    let bytes = Array(path.utf8)
    let limit = point == nil ? Self.maxPathLength : Self.maxPointPathLength
    guard !bytes.isEmpty, bytes.count <= limit, !bytes.contains(0) else {
      throw FormatError(.invalidField, "backing file page", "the path must be 1...\(limit) bytes, no NUL")
    }
    var w = ByteWriter(capacity: Layout.pageSize)
    w.raw(Self.magic)
    w.u16(point == nil ? Self.version : Self.pointVersion)
    w.u16(UInt16(bytes.count))
    w.u32(point.map { $0.ownedByBranch ? BackingPoint.ownedFlag : 0 } ?? 0)
    w.raw(parentImageID)
    w.u64(parentSize)
    if let point {
      let name = Array(point.name.utf8)
      guard !name.isEmpty, name.count <= Layout.maxSnapshotNameLength, point.seq >= 1 else {
        throw FormatError(.invalidField, "backing file page", "the point needs a seq ≥ 1 and a 1...255-byte name")
      }
      w.u64(point.seq)
      w.u64(point.baseCheckpoint)
      w.u64(point.originSeq)
      w.u16(UInt16(name.count))
      w.zeros(6)
      w.raw(name)
      w.zeros(Self.pointPathOffset - w.count)
    }
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
    guard v == version || v == pointVersion else {
      throw FormatError(.unsupportedVersion, structure, "version \(v)")
    }
    let length = Int(try r.u16())
    let limit = v == version ? maxPathLength : maxPointPathLength
    guard length >= 1, length <= limit else {
      throw FormatError(.invalidField, structure, "path length \(length)")
    }
    let flags = try r.u32()
    guard flags & ~(v == version ? 0 : BackingPoint.ownedFlag) == 0 else {
      throw FormatError(.invalidField, structure, "unknown flags 0x\(String(flags, radix: 16))")
    }
    let id = try r.raw(16)
    let size = try r.u64()
    var point: BackingPoint?
    if v == pointVersion {
      let seq = try r.u64()
      let base = try r.u64()
      let origin = try r.u64()
      let nameLength = Int(try r.u16())
      try r.skip(6)
      guard seq >= 1, nameLength >= 1, nameLength <= Layout.maxSnapshotNameLength else {
        throw FormatError(.invalidField, structure, "point seq \(seq), name length \(nameLength)")
      }
      let nameBytes = try r.raw(nameLength)
      guard let name = String(validating: nameBytes, as: UTF8.self), (try? SnapshotEntry.validateName(name)) != nil
      else {
        throw FormatError(.invalidField, structure, "the point's snapshot name is not a valid snapshot name")
      }
      try r.skip(pointPathOffset - 72 - nameLength)
      point = BackingPoint(
        name: name, seq: seq, baseCheckpoint: base, originSeq: origin,
        ownedByBranch: flags & BackingPoint.ownedFlag != 0)
    }
    let bytes = try r.raw(length)
    guard !bytes.contains(0), let path = String(validating: bytes, as: UTF8.self) else {
      throw FormatError(.invalidField, structure, "the path is not UTF-8 text")
    }
    return BackingDescriptor(path: path, parentImageID: id, parentSize: size, point: point)
  }
}

/// The fixed point of the parent a branch reads through to: one of the parent's snapshots,
/// named and identified by its seq and base checkpoint (the operands of its view, section 10.4).
public struct BackingPoint: Equatable, Sendable {
  /// Flag bit 0 of a version-2 page: the snapshot was created for this branch (a pin) and goes
  /// with it.
  static let ownedFlag: UInt32 = 1

  public var name: String
  public var seq: UInt64
  public var baseCheckpoint: UInt64
  /// The point the branch was asked for when it is not the snapshot itself (`--at SEQ`): the
  /// branch holds copies of the blocks that differ between it and the snapshot. 0 otherwise.
  /// Informational.
  public var originSeq: UInt64
  /// The snapshot is a pin made for this branch (deleted with the branch), not the user's own.
  public var ownedByBranch: Bool

  public init(name: String, seq: UInt64, baseCheckpoint: UInt64, originSeq: UInt64 = 0, ownedByBranch: Bool = false) {
    self.name = name
    self.seq = seq
    self.baseCheckpoint = baseCheckpoint
    self.originSeq = originSeq
    self.ownedByBranch = ownedByBranch
  }
}
