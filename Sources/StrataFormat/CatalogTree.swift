/// How a checkpoint stores the snapshot catalog (CHECKPOINT byte 21).
public enum CatalogFormat: UInt8, Sendable {
  /// Flat catalog pages, every entry listed (format-spec 8.5).
  case flat = 0
  /// Two copy-on-write trees: entries by seq and a name index (format-spec 8.6).
  case tree = 1
}

/// What a catalog tree's leaves hold, and the key they are ordered by.
public protocol CatalogItem: Sendable {
  associatedtype Key: Comparable & Sendable & CustomStringConvertible
  static var pageKind: PageKind { get }
  var key: Key { get }
  var encodedLength: Int { get }
  func encode(into w: inout ByteWriter)
  static func decode(_ r: inout ByteReader) throws -> Self
  /// Bytes a key takes in an internal node (after the child reference), a multiple of 8.
  static func keyLength(_ key: Key) -> Int
  static func encodeKey(_ key: Key, into w: inout ByteWriter)
  static func decodeKey(_ r: inout ByteReader) throws -> Key
}

extension SnapshotEntry: CatalogItem {
  public static var pageKind: PageKind { .catalogSeqNode }
  public var key: UInt64 { seq }
  public static func keyLength(_ key: UInt64) -> Int { 8 }
  public static func encodeKey(_ key: UInt64, into w: inout ByteWriter) { w.u64(key) }
  public static func decodeKey(_ r: inout ByteReader) throws -> UInt64 { try r.u64() }
}

/// A snapshot name as the catalog orders and compares it: by its UTF-8 bytes (format-spec
/// 7.3), never by Swift's `String` equality, which is Unicode canonical equivalence.
public struct SnapshotName: Comparable, Hashable, Sendable, CustomStringConvertible {
  public var bytes: [UInt8]

  public init(_ name: String) { bytes = Array(name.utf8) }
  public init(bytes: [UInt8]) { self.bytes = bytes }

  public static func < (a: SnapshotName, b: SnapshotName) -> Bool { a.bytes.lexicographicallyPrecedes(b.bytes) }
  public var description: String { "\"\(String(decoding: bytes, as: UTF8.self))\"" }

  /// Length, bytes, zero padding to 8 (the name index's leaf entries and internal keys).
  var paddedLength: Int { (2 + bytes.count + 7) & ~7 }

  func encode(into w: inout ByteWriter) {
    w.u16(UInt16(bytes.count))
    w.raw(bytes)
    w.align(to: 8)
  }

  static func decode(_ r: inout ByteReader) throws -> SnapshotName {
    let length = Int(try r.u16())
    let bytes = try r.raw(length)
    guard let name = String(validating: bytes, as: UTF8.self) else {
      throw FormatError(.invalidField, r.structure, "snapshot name is not UTF-8")
    }
    try SnapshotEntry.validateName(name)
    try r.skip((8 - (2 + length) % 8) % 8)
    return SnapshotName(bytes: bytes)
  }
}

/// An entry of the name index: a snapshot's seq under its name. New names that sort after the
/// existing ones (timestamps, counters) land at the right edge, which stays cached.
public struct NameIndexEntry: CatalogItem, Equatable {
  public var name: SnapshotName
  public var seq: UInt64

  public init(name: SnapshotName, seq: UInt64) {
    self.name = name
    self.seq = seq
  }

  public init(_ e: SnapshotEntry) { self.init(name: SnapshotName(e.name), seq: e.seq) }

  public static var pageKind: PageKind { .catalogNameNode }
  public var key: SnapshotName { name }
  public var encodedLength: Int { 8 + name.paddedLength }

  public func encode(into w: inout ByteWriter) {
    w.u64(seq)
    name.encode(into: &w)
  }

  public static func decode(_ r: inout ByteReader) throws -> NameIndexEntry {
    let seq = try r.u64()
    return NameIndexEntry(name: try SnapshotName.decode(&r), seq: seq)
  }

  public static func keyLength(_ key: SnapshotName) -> Int { key.paddedLength }
  public static func encodeKey(_ key: SnapshotName, into w: inout ByteWriter) { key.encode(into: &w) }
  public static func decodeKey(_ r: inout ByteReader) throws -> SnapshotName { try SnapshotName.decode(&r) }
}

/// A child of an internal catalog node: where it is stored and the smallest key in its subtree.
public struct CatalogChild<Key: Comparable & Sendable>: Sendable {
  public var ref: PageRef
  public var key: Key

  public init(ref: PageRef, key: Key) {
    self.ref = ref
    self.key = key
  }
}

/// One node page of a catalog tree (format-spec 8.6): an 8-byte header, then leaf items or
/// children, back to back; the rest of the page is zero.
///
///     0  u8   level (0 = leaf)        2  u16  count (>= 1)
///     1  u8   reserved (checked 0)    4  u32  reserved (checked 0)
public enum CatalogNodePage {
  public static let headerLength = 8
  /// Deepest tree a reader accepts: even 14-way nodes (the longest names) pass 2^45 entries.
  public static let maxLevel = 12

  public static func encodeLeaf<Item: CatalogItem>(_ items: [Item]) -> [UInt8] {
    precondition(!items.isEmpty)
    var w = header(level: 0, count: items.count)
    for item in items { item.encode(into: &w) }
    return finish(&w)
  }

  /// Encoded size of an internal child: its reference, then its key.
  public static func childLength<Item: CatalogItem>(_ key: Item.Key, of: Item.Type) -> Int {
    16 + Item.keyLength(key)
  }

  public static func encodeInternal<Item: CatalogItem>(level: Int, _ children: [CatalogChild<Item.Key>], of: Item.Type)
    -> [UInt8]
  {
    precondition(level >= 1 && level <= maxLevel && !children.isEmpty)
    var w = header(level: level, count: children.count)
    for c in children {
      c.ref.encode(into: &w)
      Item.encodeKey(c.key, into: &w)
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
  /// and not null.
  public static func decodeInternal<Item: CatalogItem>(_ page: UnsafeRawBufferPointer, as: Item.Type, level: Int)
    throws -> [CatalogChild<Item.Key>]
  {
    var r = ByteReader(page, structure: "\(Item.pageKind) node")
    let count = try decodeHeader(&r, level: level)
    var children: [CatalogChild<Item.Key>] = []
    children.reserveCapacity(count)
    for _ in 0..<count {
      let ref = try PageRef.decode(&r)
      let key = try Item.decodeKey(&r)
      guard !ref.isNull else { throw FormatError(.invalidField, r.structure, "null child reference") }
      if let last = children.last, last.key >= key {
        throw FormatError(.invalidField, r.structure, "keys out of order at \(key)")
      }
      children.append(CatalogChild(ref: ref, key: key))
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
