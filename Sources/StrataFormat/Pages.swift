/// Metadata pages: map nodes, segment-usage pages and snapshot-catalog pages.
/// Each is exactly one 4 KiB page whose checksum is stored by whoever refers to it.
public enum PageKind: UInt8, Sendable, CaseIterable {
  case mapNode = 1
  case usage = 2
  /// A page of the flat catalog (images without the catalog-tree feature).
  case catalog = 3
  /// A node of the catalog tree keyed by seq (feature `catalogTree`).
  case catalogSeqNode = 4
  /// A node of the catalog's name index, keyed by name hash and seq (feature `catalogTree`).
  case catalogNameNode = 5
}

/// A reference to a page: its address and the checksum it must have. Keeping the checksum in the
/// reference (not only in the page) catches misdirected and lost writes.
public struct PageRef: Equatable, Hashable, Sendable {
  public var page: UInt64
  public var checksum: UInt32

  public init(page: UInt64, checksum: UInt32) {
    self.page = page
    self.checksum = checksum
  }

  public static let null = PageRef(page: 0, checksum: 0)
  public var isNull: Bool { page == 0 }

  public func encode(into w: inout ByteWriter) {
    w.u64(page)
    w.u32(checksum)
    w.u32(0)
  }

  public static func decode(_ r: inout ByteReader) throws -> PageRef {
    let page = try r.u64()
    let checksum = try r.u32()
    _ = try r.u32()
    guard page <= Layout.maxPageAddress else {
      throw FormatError(.invalidField, r.structure, "page address \(page) exceeds 48 bits")
    }
    return PageRef(page: page, checksum: checksum)
  }
}

/// An internal map entry (and the map root): a child node's page reference plus flags.
///
///     word0  page address of the child node (0 = no node)
///     word1  bits 0-31 checksum of the child node; bit 32 = the whole subtree reads as zero
///            (state zero, only with page 0); bits 33-63 reserved, zero
///
/// A null child without the zero flag means the whole subtree is unallocated.
public struct ChildRef: Equatable, Hashable, Sendable {
  public var page: UInt64
  public var checksum: UInt32
  public var zeroSubtree: Bool

  public init(page: UInt64, checksum: UInt32, zeroSubtree: Bool = false) {
    precondition(!(zeroSubtree && page != 0))
    self.page = page
    self.checksum = checksum
    self.zeroSubtree = zeroSubtree
  }

  public static let unallocated = ChildRef(page: 0, checksum: 0)
  public static let zero = ChildRef(page: 0, checksum: 0, zeroSubtree: true)
  public var isNull: Bool { page == 0 }

  public var words: (UInt64, UInt64) { (page, UInt64(checksum) | (zeroSubtree ? 1 << 32 : 0)) }

  public static func decode(word0: UInt64, word1: UInt64) throws -> ChildRef {
    guard word0 <= Layout.maxPageAddress else {
      throw FormatError(.invalidField, "map child", "page address \(word0) exceeds 48 bits")
    }
    let flags = word1 >> 32
    guard flags <= 1 else { throw FormatError(.invalidField, "map child", "reserved flags \(flags)") }
    if word0 == 0 {
      guard UInt32(truncatingIfNeeded: word1) == 0 else {
        throw FormatError(.invalidField, "map child", "null child with a checksum")
      }
    } else if flags != 0 {
      throw FormatError(.invalidField, "map child", "zero-subtree flag on a stored node")
    }
    return ChildRef(page: word0, checksum: UInt32(truncatingIfNeeded: word1), zeroSubtree: flags == 1)
  }

  public func encode(into w: inout ByteWriter) {
    w.u64(words.0)
    w.u64(words.1)
  }

  public static func decode(_ r: inout ByteReader) throws -> ChildRef {
    try decode(word0: try r.u64(), word1: try r.u64())
  }
}

/// Checksum of a metadata page, seeded with what the page is and where it belongs in its
/// structure, so a valid page of the wrong kind or position is still rejected.
public func pageChecksum(kind: PageKind, level: UInt8, key: UInt64, _ page: UnsafeRawBufferPointer) -> UInt32 {
  precondition(page.count == Layout.pageSize)
  var w = ByteWriter(capacity: 10)
  w.u8(kind.rawValue)
  w.u8(level)
  w.u64(key)
  let seedCRC = CRC32C.checksum(w.bytes)
  return CRC32C.checksum(page, continuing: seedCRC)
}

public enum BlockState: UInt8, Sendable {
  /// Never written or discarded: reads as zeros, falls through to a backing image later.
  case unallocated = 0
  /// Stored in the log at `page`.
  case data = 1
  /// Known to be all zeros; nothing stored.
  case zero = 2
}

/// A leaf entry of the block map: 16 bytes per virtual block.
///
///     word0 bits 0-47  page address of the stored block (0 unless state == data)
///     word0 bits 48-51 state (BlockState)
///     word0 bits 52-55 codec (0 = stored uncompressed; others reserved)
///     word0 bits 56-63 reserved, zero
///     word1 bits 0-31  CRC-32C of the stored bytes
///     word1 bits 32-63 stored length in bytes (0 = one full block)
public struct MapEntry: Equatable, Sendable {
  public var state: BlockState
  public var page: UInt64
  public var checksum: UInt32

  public init(state: BlockState, page: UInt64 = 0, checksum: UInt32 = 0) {
    self.state = state
    self.page = page
    self.checksum = checksum
  }

  public static let unallocated = MapEntry(state: .unallocated)
  public static let zero = MapEntry(state: .zero)
  public static func data(page: UInt64, checksum: UInt32) -> MapEntry {
    MapEntry(state: .data, page: page, checksum: checksum)
  }

  public var words: (UInt64, UInt64) {
    (page | UInt64(state.rawValue) << 48, UInt64(checksum))
  }

  public static func decode(word0: UInt64, word1: UInt64) throws -> MapEntry {
    let page = word0 & Layout.maxPageAddress
    guard let state = BlockState(rawValue: UInt8((word0 >> 48) & 0xF)) else {
      throw FormatError(.invalidField, "map entry", "unknown block state \((word0 >> 48) & 0xF)")
    }
    guard word0 >> 52 == 0 else {
      throw FormatError(.invalidField, "map entry", "codec or reserved bits set (\(word0 >> 52))")
    }
    guard word1 >> 32 == 0 else {
      throw FormatError(.invalidField, "map entry", "stored length \(word1 >> 32) without a codec")
    }
    switch state {
    case .data:
      guard page != 0 else { throw FormatError(.invalidField, "map entry", "data entry without a page") }
    case .unallocated, .zero:
      guard page == 0, word1 == 0 else {
        throw FormatError(.invalidField, "map entry", "\(state) entry carries a location")
      }
    }
    return MapEntry(state: state, page: page, checksum: UInt32(truncatingIfNeeded: word1))
  }
}

/// One segment's line in the usage table: what the cleaner needs to pick victims.
public struct SegmentUsage: Equatable, Sendable {
  /// Pages the head references in this segment: data blocks and map nodes. Record headers and
  /// the checkpoint's own usage and catalog pages are not counted (the checkpoint names those).
  public var livePages: UInt32
  /// The segment's fill when it was sealed; 0 while it is the open segment of the log.
  public var writtenPages: UInt32
  /// Sequence number of the segment's SEAL: its age for cost-benefit cleaning; 0 while open.
  public var lastSeq: UInt64

  public init(livePages: UInt32 = 0, writtenPages: UInt32 = 0, lastSeq: UInt64 = 0) {
    self.livePages = livePages
    self.writtenPages = writtenPages
    self.lastSeq = lastSeq
  }

  public static let encodedLength = 16
  public static let perPage = Layout.pageSize / encodedLength

  /// `lastSeq` of a segment the cleaner freed (SEGMENT_REUSE): no seq reaches 2^64 − 1, so the
  /// marker cannot be mistaken for a sealed segment.
  public static let freeMarker = UInt64.max
  public static let free = SegmentUsage(livePages: 0, writtenPages: 0, lastSeq: freeMarker)
  public var isFree: Bool { lastSeq == Self.freeMarker }
  /// Sealed and holding records (neither open nor free).
  public var isSealed: Bool { lastSeq != 0 && !isFree }

  public static func encodePage(_ entries: ArraySlice<SegmentUsage>) -> [UInt8] {
    precondition(entries.count <= perPage)
    var w = ByteWriter(capacity: Layout.pageSize)
    for e in entries {
      w.u32(e.livePages)
      w.u32(e.writtenPages)
      w.u64(e.lastSeq)
    }
    w.zeros(Layout.pageSize - w.count)
    return w.bytes
  }

  public static func decodePage(_ page: UnsafeRawBufferPointer, count: Int) throws -> [SegmentUsage] {
    precondition(count <= perPage)
    var r = ByteReader(page, structure: "usage page")
    var out: [SegmentUsage] = []
    out.reserveCapacity(count)
    for _ in 0..<count {
      out.append(SegmentUsage(livePages: try r.u32(), writtenPages: try r.u32(), lastSeq: try r.u64()))
    }
    return out
  }
}

/// A named snapshot in the catalog. Its identity is the sequence number of its SNAPSHOT
/// operation; its view is the checkpoint at `baseCheckpoint` plus the log replayed up to `seq`.
public struct SnapshotEntry: Equatable, Sendable {
  public var seq: UInt64
  public var timestampNanoseconds: UInt64
  public var baseCheckpoint: UInt64
  public var name: String

  public init(seq: UInt64, timestampNanoseconds: UInt64, baseCheckpoint: UInt64, name: String) {
    self.seq = seq
    self.timestampNanoseconds = timestampNanoseconds
    self.baseCheckpoint = baseCheckpoint
    self.name = name
  }

  public var encodedLength: Int { (26 + name.utf8.count + 7) & ~7 }

  /// Names are 1...255 bytes of UTF-8 without control characters or '/' (used in export paths).
  public static func validateName(_ name: String) throws {
    let n = name.utf8.count
    guard n >= 1, n <= Layout.maxSnapshotNameLength else {
      throw FormatError(.invalidField, "snapshot name", "must be 1 to \(Layout.maxSnapshotNameLength) bytes, got \(n)")
    }
    guard !name.unicodeScalars.contains(where: { $0.value < 0x20 || $0 == "/" || $0.value == 0x7F }) else {
      throw FormatError(.invalidField, "snapshot name", "must not contain '/' or control characters")
    }
  }

  /// Packs entries (ordered by seq) into catalog pages; an entry never spans two pages.
  public static func encodePages(_ entries: [SnapshotEntry]) -> [[UInt8]] {
    var pages: [[UInt8]] = []
    var w = ByteWriter(capacity: Layout.pageSize)
    var count: UInt32 = 0
    func finish() {
      w.zeros(Layout.pageSize - w.count)
      w.patchU32(count, at: 0)
      pages.append(w.bytes)
    }
    w.zeros(8)
    for e in entries {
      if w.count + e.encodedLength > Layout.pageSize {
        finish()
        w.reset()
        w.zeros(8)
        count = 0
      }
      e.encode(into: &w)
      count += 1
    }
    if count > 0 { finish() }
    return pages
  }

  public static func decodePage(_ page: UnsafeRawBufferPointer) throws -> [SnapshotEntry] {
    var r = ByteReader(page, structure: "catalog page")
    let count = Int(try r.u32())
    _ = try r.u32()
    guard count >= 1, count <= Layout.pageSize / 32 else {
      throw FormatError(.invalidField, "catalog page", "entry count \(count) is out of range")
    }
    var out: [SnapshotEntry] = []
    for _ in 0..<count {
      let e = try decode(&r)
      if let last = out.last, last.seq >= e.seq {
        throw FormatError(.invalidField, "catalog page", "entries out of order at seq \(e.seq)")
      }
      out.append(e)
    }
    return out
  }

  /// One entry as 8.5 lays it out (flat catalog pages and catalog-tree leaves alike).
  public func encode(into w: inout ByteWriter) {
    w.u64(seq)
    w.u64(timestampNanoseconds)
    w.u64(baseCheckpoint)
    w.u16(UInt16(name.utf8.count))
    w.raw(name.utf8)
    w.align(to: 8)
  }

  public static func decode(_ r: inout ByteReader) throws -> SnapshotEntry {
    let seq = try r.u64()
    let time = try r.u64()
    let base = try r.u64()
    let length = Int(try r.u16())
    guard let name = String(validating: try r.raw(length), as: UTF8.self) else {
      throw FormatError(.invalidField, r.structure, "snapshot name is not UTF-8")
    }
    try validateName(name)
    try r.skip((8 - (26 + length) % 8) % 8)
    return SnapshotEntry(seq: seq, timestampNanoseconds: time, baseCheckpoint: base, name: name)
  }
}
