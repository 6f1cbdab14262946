/// Log records (format-spec/README.md, "Log records").
///
/// A record starts on a page boundary with a header area (the 64-byte header followed by its
/// operations, padded to whole pages) and continues with `payloadPages` pages that the
/// operations consume in order (data blocks, metadata pages).
public struct RecordHeader: Equatable, Sendable {
  public static let magic: UInt32 = 0x4C52_5453  // "STRL" little-endian
  public static let version: UInt16 = 1
  public static let encodedLength = 64
  static let checksumOffset = 40

  public struct Flags: OptionSet, Sendable {
    public let rawValue: UInt16
    public init(rawValue: UInt16) { self.rawValue = rawValue }
    /// The record ends at a completed flush: a continuous-data-protection restore point.
    public static let flushPoint = Flags(rawValue: 1)
  }

  public var flags: Flags
  /// Bytes of header plus operations (before page padding).
  public var headerLength: UInt32
  public var payloadPages: UInt32
  /// Sequence number of the first operation; operation i has `seq + i`.
  public var seq: UInt64
  public var opCount: UInt32
  /// Header checksum of the record before this one: the log is a hash chain, so a stale record
  /// left behind by an earlier, longer log can never be mistaken for the continuation.
  public var previousChecksum: UInt32
  public var timestampNanoseconds: UInt64
  public var checksum: UInt32

  public var headerPages: Int { (Int(headerLength) + Layout.pageSize - 1) / Layout.pageSize }
  public var totalPages: Int { headerPages + Int(payloadPages) }
  public var nextSeq: UInt64 { seq + UInt64(opCount) }

  /// Decodes and range-checks the fixed header from the first page of a record. The checksum is
  /// verified by `LogRecord.decode` once the whole header area is available.
  public static func decode(_ bytes: UnsafeRawBufferPointer) throws -> RecordHeader {
    let name = "record header"
    var r = ByteReader(bytes, structure: name)
    guard try r.u32() == magic else { throw FormatError(.badMagic, name, "no record magic") }
    let version = try r.u16()
    guard version == Self.version else {
      throw FormatError(.unsupportedVersion, name, "record version \(version)")
    }
    let flags = Flags(rawValue: try r.u16())
    let headerLength = try r.u32()
    guard headerLength >= encodedLength + 8, headerLength <= Layout.maxRecordHeaderLength, headerLength % 8 == 0 else {
      throw FormatError(.invalidField, name, "header length \(headerLength) is out of range")
    }
    let payloadPages = try r.u32()
    let seq = try r.u64()
    let opCount = try r.u32()
    guard opCount >= 1, Int(opCount) <= (Int(headerLength) - encodedLength) / 8 else {
      throw FormatError(.invalidField, name, "operation count \(opCount) does not fit \(headerLength) bytes")
    }
    guard seq >= 1, seq < UInt64.max / 2 else { throw FormatError(.invalidField, name, "sequence \(seq)") }
    let previous = try r.u32()
    let timestamp = try r.u64()
    let checksum = try r.u32()
    return RecordHeader(
      flags: flags, headerLength: headerLength, payloadPages: payloadPages, seq: seq, opCount: opCount,
      previousChecksum: previous, timestampNanoseconds: timestamp, checksum: checksum)
  }
}

public enum OpType: UInt16, Sendable, CaseIterable {
  case write = 1
  case zero = 2
  case discard = 3
  case snapshot = 4
  case snapshotDelete = 5
  case restore = 6
  case resize = 7
  case pages = 8
  case checkpoint = 9
  case seal = 10
}

/// One metadata page carried by a PAGES operation.
public struct PageDescriptor: Equatable, Sendable {
  public var kind: PageKind
  public var level: UInt8
  public var checksum: UInt32
  public var key: UInt64

  public init(kind: PageKind, level: UInt8, checksum: UInt32, key: UInt64) {
    self.kind = kind
    self.level = level
    self.checksum = checksum
    self.key = key
  }
}

/// The state a checkpoint freezes: everything recovery needs before replaying the log tail.
public struct CheckpointBody: Equatable, Sendable {
  public var virtualSize: UInt64
  public var blockSize: UInt32
  public var mapDepth: UInt8
  public var root: ChildRef
  /// Virtual blocks whose state is data (what `info` calls allocated).
  public var dataBlocks: UInt64
  /// Page address of the previous checkpoint record (0 for the first).
  public var previousCheckpoint: UInt64
  public var segmentCount: UInt64
  public var snapshotCount: UInt64
  public var usagePages: [PageRef]
  /// Flat catalog pages (`catalogFormat` 0), or the roots of the seq tree and the name index
  /// (`catalogFormat` 1).
  public var catalogPages: [PageRef]
  public var catalogFormat: CatalogFormat
  /// Page address of the oldest checkpoint record from which the log is still whole: every
  /// record from it to this one is retained, what came before may have been reclaimed by the
  /// cleaner (segment reuse). 0: nothing was ever reclaimed, the log is whole from its start.
  public var logStart: UInt64 = 0

  public init(
    virtualSize: UInt64, blockSize: UInt32, mapDepth: UInt8, root: ChildRef, dataBlocks: UInt64,
    previousCheckpoint: UInt64,
    segmentCount: UInt64, snapshotCount: UInt64, usagePages: [PageRef], catalogPages: [PageRef],
    catalogFormat: CatalogFormat = .flat, logStart: UInt64 = 0
  ) {
    self.catalogFormat = catalogFormat
    self.logStart = logStart
    self.virtualSize = virtualSize
    self.blockSize = blockSize
    self.mapDepth = mapDepth
    self.root = root
    self.dataBlocks = dataBlocks
    self.previousCheckpoint = previousCheckpoint
    self.segmentCount = segmentCount
    self.snapshotCount = snapshotCount
    self.usagePages = usagePages
    self.catalogPages = catalogPages
  }

  /// The log-start extension (16 bytes after the page lists) is written only when set, so that
  /// images that never reclaimed anything keep the version-1 layout byte for byte.
  var encodedLength: Int { 72 + 16 * (usagePages.count + catalogPages.count) + (logStart != 0 ? 16 : 0) }
}

/// An operation of a log record. Sequence numbers are implicit (record seq + index).
public enum LogOp: Equatable, Sendable {
  /// `checksums.count` blocks starting at `firstBlock`, stored as payload in order.
  case write(firstBlock: UInt64, checksums: [UInt32])
  case zero(firstBlock: UInt64, count: UInt64)
  case discard(firstBlock: UInt64, count: UInt64)
  /// A named snapshot of everything before this operation.
  case snapshot(name: String, baseCheckpoint: UInt64)
  case snapshotDelete(seq: UInt64)
  /// The head becomes the state at `seq` (a snapshot's sequence number), whose view starts
  /// from the checkpoint record at `baseCheckpoint`.
  case restore(seq: UInt64, baseCheckpoint: UInt64)
  case resize(virtualSize: UInt64)
  /// Metadata pages stored as payload, referenced later by a checkpoint.
  case pages([PageDescriptor])
  case checkpoint(CheckpointBody)
  /// The segment ends here; the log continues at the start of `nextSegment`.
  case seal(nextSegment: UInt64)

  public var type: OpType {
    switch self {
    case .write: .write
    case .zero: .zero
    case .discard: .discard
    case .snapshot: .snapshot
    case .snapshotDelete: .snapshotDelete
    case .restore: .restore
    case .resize: .resize
    case .pages: .pages
    case .checkpoint: .checkpoint
    case .seal: .seal
    }
  }

  /// Payload pages this operation consumes.
  public func payloadPages(blockSize: Int) -> Int {
    switch self {
    case .write(_, let checksums): checksums.count * (blockSize / Layout.pageSize)
    case .pages(let descriptors): descriptors.count
    default: 0
    }
  }

  /// Encoded size in bytes, including the 8-byte operation header.
  public var encodedLength: Int {
    switch self {
    case .write(_, let checksums): Self.writeLength(blocks: checksums.count)
    case .zero, .discard: 24
    case .snapshot(let name, _): (8 + 8 + 2 + name.utf8.count + 7) & ~7
    case .snapshotDelete, .resize, .seal: 16
    case .restore: 24
    case .pages(let d): 16 + 16 * d.count
    case .checkpoint(let body): 8 + body.encodedLength
    }
  }

  /// Encoded size of a WRITE of `blocks` blocks.
  public static func writeLength(blocks: Int) -> Int { (24 + 4 * blocks + 7) & ~7 }

  /// Encodes a WRITE straight from borrowed checksums: the write path's allocation-free form
  /// of `LogOp.write(...).encode(into:)`.
  public static func encodeWrite(firstBlock: UInt64, checksums: UnsafeBufferPointer<UInt32>, into w: inout ByteWriter) {
    w.u16(OpType.write.rawValue)
    w.u16(0)
    w.u32(UInt32(writeLength(blocks: checksums.count)))
    w.u64(firstBlock)
    w.u32(UInt32(checksums.count))
    w.u32(0)  // codec: 0 = uncompressed
    w.u32s(checksums)
    w.align(to: 8)
  }

  public func encode(into w: inout ByteWriter) {
    if case .write(let first, let checksums) = self {
      checksums.withUnsafeBufferPointer { Self.encodeWrite(firstBlock: first, checksums: $0, into: &w) }
      return
    }
    let start = w.count
    w.u16(type.rawValue)
    w.u16(0)
    w.u32(UInt32(encodedLength))
    switch self {
    case .write:
      preconditionFailure("encoded above")
    case .zero(let first, let count), .discard(let first, let count):
      w.u64(first)
      w.u64(count)
    case .snapshot(let name, let base):
      w.u64(base)
      w.u16(UInt16(name.utf8.count))
      w.raw(name.utf8)
    case .snapshotDelete(let seq):
      w.u64(seq)
    case .restore(let seq, let base):
      w.u64(seq)
      w.u64(base)
    case .resize(let size):
      w.u64(size)
    case .seal(let next):
      w.u64(next)
    case .pages(let descriptors):
      w.u32(UInt32(descriptors.count))
      w.u32(0)
      for d in descriptors {
        w.u8(d.kind.rawValue)
        w.u8(d.level)
        w.u16(0)
        w.u32(d.checksum)
        w.u64(d.key)
      }
    case .checkpoint(let b):
      w.u64(b.virtualSize)
      w.u32(b.blockSize)
      w.u8(b.mapDepth)
      w.u8(b.catalogFormat.rawValue)
      w.u16(0)
      b.root.encode(into: &w)
      w.u64(b.dataBlocks)
      w.u64(b.previousCheckpoint)
      w.u64(b.segmentCount)
      w.u64(b.snapshotCount)
      w.u32(UInt32(b.usagePages.count))
      w.u32(UInt32(b.catalogPages.count))
      for ref in b.usagePages { ref.encode(into: &w) }
      for ref in b.catalogPages { ref.encode(into: &w) }
      if b.logStart != 0 {
        w.u64(b.logStart)
        w.u64(0)
      }
    }
    w.align(to: 8)
    assert(w.count - start == encodedLength)
  }

  /// Decodes one operation; `r` is positioned at its 8-byte header.
  static func decode(_ r: inout ByteReader) throws -> LogOp {
    let name = "log operation"
    let start = r.offset
    let rawType = try r.u16()
    _ = try r.u16()
    let length = Int(try r.u32())
    guard length >= 8, length % 8 == 0, length <= r.remaining + 8 else {
      throw FormatError(.invalidField, name, "length \(length) at offset \(start) is out of range")
    }
    guard let type = OpType(rawValue: rawType) else {
      throw FormatError(.invalidField, name, "unknown operation type \(rawType) at offset \(start)")
    }
    var body = ByteReader(
      UnsafeRawBufferPointer(rebasing: r.bytes[(start + 8)..<(start + length)]), structure: "\(type) operation")
    try r.skip(length - 8)
    let op: LogOp
    switch type {
    case .write:
      let first = try body.u64()
      let count = Int(try body.u32())
      let codec = try body.u32()
      guard count >= 1, codec == 0 else {
        throw FormatError(.invalidField, name, "write of \(count) blocks with codec \(codec)")
      }
      var checksums: [UInt32] = []
      checksums.reserveCapacity(min(count, body.remaining / 4))
      for _ in 0..<count { checksums.append(try body.u32()) }
      try checkRange(first, UInt64(count), name)
      op = .write(firstBlock: first, checksums: checksums)
    case .zero, .discard:
      let first = try body.u64()
      let count = try body.u64()
      guard count >= 1 else { throw FormatError(.invalidField, name, "\(type) of zero blocks") }
      try checkRange(first, count, name)
      op = type == .zero ? .zero(firstBlock: first, count: count) : .discard(firstBlock: first, count: count)
    case .snapshot:
      let base = try body.u64()
      let length = Int(try body.u16())
      guard let snapshotName = String(validating: try body.raw(length), as: UTF8.self) else {
        throw FormatError(.invalidField, name, "snapshot name is not UTF-8")
      }
      try SnapshotEntry.validateName(snapshotName)
      op = .snapshot(name: snapshotName, baseCheckpoint: base)
    case .snapshotDelete:
      op = .snapshotDelete(seq: try body.u64())
    case .restore:
      op = .restore(seq: try body.u64(), baseCheckpoint: try body.u64())
    case .resize:
      let size = try body.u64()
      guard size <= Layout.maxVirtualSize else { throw FormatError(.invalidField, name, "virtual size \(size)") }
      op = .resize(virtualSize: size)
    case .seal:
      op = .seal(nextSegment: try body.u64())
    case .pages:
      let count = Int(try body.u32())
      _ = try body.u32()
      guard count >= 1, count * 16 <= body.remaining else {
        throw FormatError(.invalidField, name, "page count \(count) does not fit the operation")
      }
      var descriptors: [PageDescriptor] = []
      for _ in 0..<count {
        let rawKind = try body.u8()
        guard let kind = PageKind(rawValue: rawKind) else {
          throw FormatError(.invalidField, name, "unknown page kind \(rawKind)")
        }
        let level = try body.u8()
        _ = try body.u16()
        descriptors.append(PageDescriptor(kind: kind, level: level, checksum: try body.u32(), key: try body.u64()))
      }
      op = .pages(descriptors)
    case .checkpoint:
      let size = try body.u64()
      let blockSize = try body.u32()
      let depth = try body.u8()
      let rawFormat = try body.u8()
      _ = try body.u16()
      let root = try ChildRef.decode(&body)
      let dataBlocks = try body.u64()
      let previous = try body.u64()
      let segmentCount = try body.u64()
      let snapshotCount = try body.u64()
      let usageCount = Int(try body.u32())
      let catalogCount = Int(try body.u32())
      guard size <= Layout.maxVirtualSize, Layout.allowedBlockSizes.contains(Int(blockSize)) else {
        throw FormatError(.invalidField, name, "checkpoint geometry: size \(size), block size \(blockSize)")
      }
      let blocks = (size + UInt64(blockSize) - 1) / UInt64(blockSize)
      guard depth >= 1, depth <= Layout.maxMapDepth, Int(depth) >= Layout.mapDepth(forBlocks: blocks) else {
        throw FormatError(.invalidField, name, "map depth \(depth) cannot address \(blocks) blocks")
      }
      guard segmentCount >= 1, UInt64(usageCount) == (segmentCount - 1) / UInt64(SegmentUsage.perPage) + 1,
        (usageCount + catalogCount) * 16 <= body.remaining
      else {
        throw FormatError(.invalidField, name, "\(usageCount) usage pages for \(segmentCount) segments")
      }
      var usage: [PageRef] = []
      for _ in 0..<usageCount { usage.append(try PageRef.decode(&body)) }
      var catalog: [PageRef] = []
      for _ in 0..<catalogCount { catalog.append(try PageRef.decode(&body)) }
      guard let format = CatalogFormat(rawValue: rawFormat) else {
        throw FormatError(.invalidField, name, "unknown catalog format \(rawFormat)")
      }
      // A tree catalog is never empty (an empty catalog is written flat) and has two roots.
      guard format == .flat || (catalogCount == 2 && snapshotCount > 0) else {
        throw FormatError(.invalidField, name, "a catalog tree needs 2 roots and a snapshot, got \(catalogCount)")
      }
      var checkpoint = CheckpointBody(
        virtualSize: size, blockSize: blockSize, mapDepth: depth, root: root, dataBlocks: dataBlocks,
        previousCheckpoint: previous,
        segmentCount: segmentCount, snapshotCount: snapshotCount, usagePages: usage, catalogPages: catalog,
        catalogFormat: format)
      if body.remaining >= 16 {
        checkpoint.logStart = try body.u64()
        guard checkpoint.logStart <= Layout.maxPageAddress else {
          throw FormatError(.invalidField, name, "log start \(checkpoint.logStart) is not a page address")
        }
      }
      op = .checkpoint(checkpoint)
    }
    return op
  }

  private static func checkRange(_ first: UInt64, _ count: UInt64, _ name: String) throws {
    let maxBlocks = Layout.maxVirtualSize / UInt64(Layout.pageSize)
    guard first < maxBlocks, count <= maxBlocks - first else {
      throw FormatError(.invalidField, name, "block range \(first)+\(count) is out of range")
    }
  }
}

/// A whole record: header plus decoded operations.
public struct LogRecord: Equatable, Sendable {
  public var header: RecordHeader
  public var ops: [LogOp]

  /// Builds the header area of a record: header, operations, zero padding to whole pages.
  public static func encodeHeaderArea(
    ops: [LogOp], seq: UInt64, previousChecksum: UInt32, timestampNanoseconds: UInt64,
    flags: RecordHeader.Flags, blockSize: Int
  ) -> (bytes: [UInt8], header: RecordHeader) {
    precondition(!ops.isEmpty)
    var w = ByteWriter(capacity: Layout.pageSize)
    w.zeros(RecordHeader.encodedLength)
    for op in ops { op.encode(into: &w) }
    let payload = ops.reduce(0) { $0 + $1.payloadPages(blockSize: blockSize) }
    let header = finishHeaderArea(
      &w, opCount: ops.count, payloadPages: payload, seq: seq, previousChecksum: previousChecksum,
      timestampNanoseconds: timestampNanoseconds, flags: flags)
    return (w.bytes, header)
  }

  /// Sets `flags` in the header of a finished header area (its first `header_length` bytes)
  /// and returns the record's new checksum.
  public static func addFlags(_ flags: RecordHeader.Flags, toHeaderArea area: UnsafeMutableRawBufferPointer) -> UInt32 {
    precondition(area.count > RecordHeader.encodedLength && area.count <= Layout.maxRecordHeaderLength)
    let old = UInt16(littleEndian: area.loadUnaligned(fromByteOffset: 6, as: UInt16.self))
    area.storeBytes(of: (old | flags.rawValue).littleEndian, toByteOffset: 6, as: UInt16.self)
    area.storeBytes(of: UInt32(0), toByteOffset: RecordHeader.checksumOffset, as: UInt32.self)
    let checksum = CRC32C.checksum(UnsafeRawBufferPointer(area))
    area.storeBytes(of: checksum.littleEndian, toByteOffset: RecordHeader.checksumOffset, as: UInt32.self)
    return checksum
  }

  /// Completes a header area whose operations were encoded after a 64-byte placeholder: fills
  /// in the header, computes the checksum and pads with zeros to whole pages, in place.
  public static func finishHeaderArea(
    _ w: inout ByteWriter, opCount: Int, payloadPages: Int, seq: UInt64, previousChecksum: UInt32,
    timestampNanoseconds: UInt64, flags: RecordHeader.Flags
  ) -> RecordHeader {
    let headerLength = w.count
    precondition(
      opCount >= 1 && headerLength > RecordHeader.encodedLength && headerLength <= Layout.maxRecordHeaderLength)
    w.patch(RecordHeader.magic, at: 0)
    w.patch(RecordHeader.version, at: 4)
    w.patch(flags.rawValue, at: 6)
    w.patch(UInt32(headerLength), at: 8)
    w.patch(UInt32(payloadPages), at: 12)
    w.patch(seq, at: 16)
    w.patch(UInt32(opCount), at: 24)
    w.patch(previousChecksum, at: 28)
    w.patch(timestampNanoseconds, at: 32)
    w.patch(UInt32(0), at: RecordHeader.checksumOffset)
    for offset in stride(from: RecordHeader.checksumOffset + 4, to: RecordHeader.encodedLength, by: 4) {
      w.patch(UInt32(0), at: offset)
    }
    let checksum = CRC32C.checksum(w.bytes)
    w.patch(checksum, at: RecordHeader.checksumOffset)
    w.align(to: Layout.pageSize)
    return RecordHeader(
      flags: flags, headerLength: UInt32(headerLength), payloadPages: UInt32(payloadPages), seq: seq,
      opCount: UInt32(opCount), previousChecksum: previousChecksum, timestampNanoseconds: timestampNanoseconds,
      checksum: checksum)
  }

  /// Verifies the checksum of a complete header area and decodes its operations.
  /// `area` holds at least `header.headerLength` bytes starting at the record's first byte.
  public static func decode(headerArea area: UnsafeRawBufferPointer, blockSize: Int) throws -> LogRecord {
    let header = try RecordHeader.decode(area)
    let length = Int(header.headerLength)
    guard area.count >= length else {
      throw FormatError(.truncated, "record", "header area of \(length) bytes, have \(area.count)")
    }
    var crc = CRC32C.checksum(UnsafeRawBufferPointer(rebasing: area[0..<RecordHeader.checksumOffset]))
    crc = CRC32C.checksum([0, 0, 0, 0], continuing: crc)
    crc = CRC32C.checksum(
      UnsafeRawBufferPointer(rebasing: area[(RecordHeader.checksumOffset + 4)..<length]), continuing: crc)
    guard crc == header.checksum else {
      throw FormatError(
        .badChecksum, "record \(header.seq)", "header checksum \(hex32(header.checksum)), computed \(hex32(crc))")
    }
    var r = ByteReader(UnsafeRawBufferPointer(rebasing: area[0..<length]), structure: "record \(header.seq)")
    try r.seek(to: RecordHeader.encodedLength)
    var ops: [LogOp] = []
    ops.reserveCapacity(Int(header.opCount))
    var payload = 0
    for i in 0..<Int(header.opCount) {
      let op = try LogOp.decode(&r)
      if case .checkpoint = op, i != header.opCount - 1 {
        throw FormatError(.invalidField, "record \(header.seq)", "checkpoint is not the last operation")
      }
      if case .seal = op, i != header.opCount - 1 {
        throw FormatError(.invalidField, "record \(header.seq)", "seal is not the last operation")
      }
      payload += op.payloadPages(blockSize: blockSize)
      ops.append(op)
    }
    guard r.remaining == 0 else {
      throw FormatError(.invalidField, "record \(header.seq)", "\(r.remaining) bytes after the last operation")
    }
    guard payload == Int(header.payloadPages) else {
      throw FormatError(
        .invalidField, "record \(header.seq)",
        "operations consume \(payload) payload pages, header says \(header.payloadPages)")
    }
    return LogRecord(header: header, ops: ops)
  }
}
