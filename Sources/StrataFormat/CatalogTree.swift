/// How a checkpoint stores the snapshot catalog (CHECKPOINT byte 21).
public enum CatalogFormat: UInt8, Sendable {
  /// Flat catalog pages, every entry listed (format-spec 8.5).
  case flat = 0
  /// Two copy-on-write trees: entries by seq and a name index (format-spec 8.6).
  case tree = 1
}

/// The key of a catalog tree: a pair of words compared in order. The seq tree uses (seq, 0),
/// the name index (name hash, seq).
public struct CatalogKey: Comparable, Hashable, Sendable, CustomStringConvertible {
  public var hi: UInt64
  public var lo: UInt64

  public init(_ hi: UInt64, _ lo: UInt64) {
    self.hi = hi
    self.lo = lo
  }

  public static func < (a: CatalogKey, b: CatalogKey) -> Bool { a.hi != b.hi ? a.hi < b.hi : a.lo < b.lo }
  public var description: String { "(\(hi), \(lo))" }
}

/// What a catalog tree's leaves hold.
public protocol CatalogItem: Sendable {
  static var pageKind: PageKind { get }
  var key: CatalogKey { get }
  var encodedLength: Int { get }
  func encode(into w: inout ByteWriter)
  static func decode(_ r: inout ByteReader) throws -> Self
}

extension SnapshotEntry: CatalogItem {
  public static var pageKind: PageKind { .catalogSeqNode }
  public var key: CatalogKey { CatalogKey(seq, 0) }
}

/// An entry of the name index: a snapshot's seq under the hash of its name. Names that share a
/// hash are told apart by reading their entries in the seq tree.
public struct NameIndexEntry: CatalogItem, Equatable {
  public var hash: UInt64
  public var seq: UInt64

  public init(hash: UInt64, seq: UInt64) {
    self.hash = hash
    self.seq = seq
  }

  public init(_ e: SnapshotEntry) { self.init(hash: nameHash(e.name), seq: e.seq) }

  public static var pageKind: PageKind { .catalogNameNode }
  public var key: CatalogKey { CatalogKey(hash, seq) }
  public var encodedLength: Int { 16 }

  public func encode(into w: inout ByteWriter) {
    w.u64(hash)
    w.u64(seq)
  }

  public static func decode(_ r: inout ByteReader) throws -> NameIndexEntry {
    NameIndexEntry(hash: try r.u64(), seq: try r.u64())
  }
}

/// FNV-1a (64-bit) of a snapshot name's UTF-8 bytes: the name index's key.
public func nameHash(_ name: String) -> UInt64 {
  var h: UInt64 = 0xcbf2_9ce4_8422_2325
  for b in name.utf8 { h = (h ^ UInt64(b)) &* 0x0000_0100_0000_01b3 }
  return h
}

/// A child of an internal catalog node: the smallest key in its subtree and where it is stored.
public struct CatalogChild: Equatable, Sendable {
  public var key: CatalogKey
  public var ref: PageRef

  public init(key: CatalogKey, ref: PageRef) {
    self.key = key
    self.ref = ref
  }

  public static let encodedLength = 32
}

/// One node page of a catalog tree (format-spec 8.6): an 8-byte header, then leaf items or
/// children, back to back; the rest of the page is zero.
///
///     0  u8   level (0 = leaf)        2  u16  count (>= 1)
///     1  u8   reserved (checked 0)    4  u32  reserved (checked 0)
public enum CatalogNodePage {
  public static let headerLength = 8
  /// Deepest tree a reader accepts: 127-way nodes reach past 2^64 entries well before this.
  public static let maxLevel = 12

  public static func encodeLeaf<Item: CatalogItem>(_ items: [Item]) -> [UInt8] {
    precondition(!items.isEmpty)
    var w = header(level: 0, count: items.count)
    for item in items { item.encode(into: &w) }
    return finish(&w)
  }

  public static func encodeInternal(level: Int, _ children: [CatalogChild]) -> [UInt8] {
    precondition(level >= 1 && level <= maxLevel && !children.isEmpty)
    var w = header(level: level, count: children.count)
    for c in children {
      w.u64(c.key.hi)
      w.u64(c.key.lo)
      c.ref.encode(into: &w)
    }
    return finish(&w)
  }

  private static func header(level: Int, count: Int) -> ByteWriter {
    var w = ByteWriter(capacity: Layout.pageSize)
    w.u8(UInt8(level))
    w.u8(0)
    w.u16(UInt16(count))
    w.u32(0)
    return w
  }

  private static func finish(_ w: inout ByteWriter) -> [UInt8] {
    precondition(w.count <= Layout.pageSize, "catalog node overflows its page")
    w.zeros(Layout.pageSize - w.count)
    return w.bytes
  }

  /// The level of a node page (checked against what its parent expects before decoding).
  public static func level(_ page: UnsafeRawBufferPointer) -> Int { Int(page[0]) }

  /// Decodes a leaf of `Item`s: at least one, keys strictly increasing.
  public static func decodeLeaf<Item: CatalogItem>(_ page: UnsafeRawBufferPointer, as: Item.Type) throws -> [Item] {
    var r = ByteReader(page, structure: "\(Item.pageKind) leaf")
    let count = try decodeHeader(&r, level: 0)
    var items: [Item] = []
    items.reserveCapacity(count)
    for _ in 0..<count {
      let item = try Item.decode(&r)
      if let last = items.last, last.key >= item.key {
        throw FormatError(.invalidField, r.structure, "keys out of order at \(item.key)")
      }
      items.append(item)
    }
    return items
  }

  /// Decodes an internal node: at least one child, keys strictly increasing, references valid
  /// and not null; in the seq tree every key's low word is zero.
  public static func decodeInternal(_ page: UnsafeRawBufferPointer, kind: PageKind, level: Int) throws
    -> [CatalogChild]
  {
    var r = ByteReader(page, structure: "\(kind) node")
    let count = try decodeHeader(&r, level: level)
    guard count * CatalogChild.encodedLength <= r.remaining else {
      throw FormatError(.invalidField, r.structure, "\(count) children do not fit a page")
    }
    var children: [CatalogChild] = []
    children.reserveCapacity(count)
    for _ in 0..<count {
      let key = CatalogKey(try r.u64(), try r.u64())
      let ref = try PageRef.decode(&r)
      guard !ref.isNull else { throw FormatError(.invalidField, r.structure, "null child reference") }
      if kind == .catalogSeqNode, key.lo != 0 {
        throw FormatError(.invalidField, r.structure, "seq key \(key) has a non-zero low word")
      }
      if let last = children.last, last.key >= key {
        throw FormatError(.invalidField, r.structure, "keys out of order at \(key)")
      }
      children.append(CatalogChild(key: key, ref: ref))
    }
    return children
  }

  private static func decodeHeader(_ r: inout ByteReader, level: Int) throws -> Int {
    let stored = Int(try r.u8())
    let reserved = try r.u8()
    let count = Int(try r.u16())
    let reserved2 = try r.u32()
    guard stored == level else {
      throw FormatError(.invalidField, r.structure, "level \(stored) where level \(level) belongs")
    }
    guard reserved == 0, reserved2 == 0 else { throw FormatError(.invalidField, r.structure, "reserved bits set") }
    guard count >= 1 else { throw FormatError(.invalidField, r.structure, "empty node") }
    return count
  }
}
