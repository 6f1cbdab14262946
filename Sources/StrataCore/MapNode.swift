import StrataFormat

/// One 4 KiB node of the block map: 256 entries of two little-endian words.
/// Leaves (level 0) hold `MapEntry`s, internal nodes hold `ChildRef`s.
///
/// Nodes that are shared (clean, cached, or part of a snapshot view) are never mutated; a write
/// copies the node first (copy-on-write), so views stay frozen.
final class MapNode {
  let bytes: UnsafeMutableRawBufferPointer

  init() {
    bytes = .allocate(byteCount: Layout.pageSize, alignment: Layout.pageSize)
    bytes.initializeMemory(as: UInt8.self, repeating: 0)
  }

  init(copying other: MapNode) {
    bytes = .allocate(byteCount: Layout.pageSize, alignment: Layout.pageSize)
    bytes.copyMemory(from: UnsafeRawBufferPointer(other.bytes))
  }

  /// A node whose every entry is the zero state (materialized from a zero subtree).
  static func filledWithZero(level: Int) -> MapNode {
    let node = MapNode()
    for i in 0..<Layout.mapFanout {
      if level == 0 { node.setEntry(i, .zero) } else { node.setChild(i, .zero) }
    }
    return node
  }

  deinit { bytes.deallocate() }

  @inline(__always) func word0(_ i: Int) -> UInt64 {
    UnsafeRawBufferPointer(bytes).littleEndian(at: i * 16, as: UInt64.self)
  }

  @inline(__always) func word1(_ i: Int) -> UInt64 {
    UnsafeRawBufferPointer(bytes).littleEndian(at: i * 16 + 8, as: UInt64.self)
  }

  @inline(__always) private func setWords(_ i: Int, _ w: (UInt64, UInt64)) {
    bytes.storeLittleEndian(w.0, at: i * 16)
    bytes.storeLittleEndian(w.1, at: i * 16 + 8)
  }

  /// The entry at `i`; valid because `validate` ran when the node was loaded.
  func entry(_ i: Int) -> MapEntry {
    let w0 = word0(i)
    return MapEntry(
      state: BlockState(rawValue: UInt8((w0 >> 48) & 0xF)) ?? .unallocated, page: w0 & Layout.maxPageAddress,
      checksum: UInt32(truncatingIfNeeded: word1(i)))
  }

  func setEntry(_ i: Int, _ e: MapEntry) { setWords(i, e.words) }

  func child(_ i: Int) -> ChildRef {
    let w1 = word1(i)
    return ChildRef(page: word0(i), checksum: UInt32(truncatingIfNeeded: w1), zeroSubtree: w1 >> 32 == 1)
  }

  func setChild(_ i: Int, _ c: ChildRef) { setWords(i, c.words) }

  /// Checks every entry of a node read from disk, so lookups never meet an invalid entry.
  func validate(level: Int) throws {
    for i in 0..<Layout.mapFanout {
      if level == 0 {
        _ = try MapEntry.decode(word0: word0(i), word1: word1(i))
      } else {
        _ = try ChildRef.decode(word0: word0(i), word1: word1(i))
      }
    }
  }

  func checksum(level: Int, key: UInt64) -> UInt32 {
    pageChecksum(kind: .mapNode, level: UInt8(level), key: key, UnsafeRawBufferPointer(bytes))
  }
}

/// A bounded cache of clean nodes (map nodes, catalog tree nodes) keyed by page address,
/// evicting with the CLOCK algorithm. Its capacity, not the disk size or the number of
/// snapshots, bounds the memory of the structure it serves.
final class NodeCache<Node: AnyObject> {
  private struct Slot {
    var page: UInt64
    var node: Node
    var referenced: Bool
  }

  let capacity: Int
  private var slots: [Slot] = []
  private var index: [UInt64: Int] = [:]
  private var hand = 0

  init(capacity: Int) {
    precondition(capacity >= 16)
    self.capacity = capacity
  }

  var count: Int { slots.count }

  /// Room left before inserting evicts.
  var free: Int { capacity - slots.count }

  /// Whether `page` is cached, without marking it used.
  func contains(_ page: UInt64) -> Bool { index[page] != nil }

  func get(_ page: UInt64) -> Node? {
    guard let i = index[page] else { return nil }
    slots[i].referenced = true
    return slots[i].node
  }

  func insert(_ page: UInt64, _ node: Node) {
    if let i = index[page] {
      slots[i].node = node
      return
    }
    if slots.count < capacity {
      index[page] = slots.count
      slots.append(Slot(page: page, node: node, referenced: true))
      return
    }
    while slots[hand].referenced {
      slots[hand].referenced = false
      hand = (hand + 1) % slots.count
    }
    index[slots[hand].page] = nil
    slots[hand] = Slot(page: page, node: node, referenced: true)
    index[page] = hand
    hand = (hand + 1) % slots.count
  }
}
