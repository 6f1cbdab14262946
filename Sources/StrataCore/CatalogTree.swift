import StrataFormat

/// A node of a catalog tree in memory. Clean nodes (loaded, cached, or just written) are shared
/// and never mutated; a change copies the node and its path from the root (copy-on-write).
final class CatalogNode<Item: CatalogItem> {
  enum Link {
    case stored(PageRef)
    case dirty(CatalogNode)
  }

  let level: Int
  /// Leaf items (level 0), ordered by key.
  var items: [Item]
  /// Internal nodes: the smallest key of each child's subtree, and the child.
  var keys: [Item.Key]
  var links: [Link]
  /// Encoded size, header included; at most a page.
  var bytes: Int

  init(items: [Item]) {
    level = 0
    self.items = items
    keys = []
    links = []
    bytes = CatalogNodePage.headerLength + items.reduce(0) { $0 + $1.encodedLength }
  }

  init(level: Int, keys: [Item.Key], links: [Link]) {
    precondition(level > 0 && keys.count == links.count)
    self.level = level
    items = []
    self.keys = keys
    self.links = links
    bytes = CatalogNodePage.headerLength + keys.reduce(0) { $0 + Self.childLength($1) }
  }

  static func childLength(_ key: Item.Key) -> Int { CatalogNodePage.childLength(key, of: Item.self) }

  /// Replaces child `i`'s key (its subtree's first key changed), keeping `bytes` right.
  func setKey(_ i: Int, _ key: Item.Key) {
    bytes += Self.childLength(key) - Self.childLength(keys[i])
    keys[i] = key
  }

  func insertChild(_ link: Link, key: Item.Key, at i: Int) {
    keys.insert(key, at: i)
    links.insert(link, at: i)
    bytes += Self.childLength(key)
  }

  func removeChild(at i: Int) {
    bytes -= Self.childLength(keys.remove(at: i))
    links.remove(at: i)
  }

  func copy() -> CatalogNode {
    level == 0 ? CatalogNode(items: items) : CatalogNode(level: level, keys: keys, links: links)
  }

  var count: Int { level == 0 ? items.count : keys.count }
  var firstKey: Item.Key { level == 0 ? items[0].key : keys[0] }
}

/// A copy-on-write B+tree of catalog items whose nodes are pages in the log (format-spec 8.6).
///
/// Only the nodes a change touches are copied and kept in memory (dirty) until a checkpoint
/// writes them bottom-up; clean nodes are read on demand, verified against the reference in
/// their parent, and kept in a bounded cache. A checkpoint therefore costs what changed, and
/// memory is the cache plus the dirty nodes, however many entries the tree holds.
final class CatalogTree<Item: CatalogItem> {
  typealias Node = CatalogNode<Item>

  private let pages: PageReader
  let cache: NodeCache<Node>
  private(set) var root: Node.Link?
  /// Nodes copied since the last write: what the next checkpoint writes (an upper bound).
  private(set) var dirtyNodes = 0
  /// Node pages read from storage (tests check that opening does not read the whole tree).
  private(set) var pagesRead = 0

  init(pages: PageReader, root: PageRef?) {
    self.pages = pages
    cache = NodeCache(capacity: pages.catalogCacheNodes)
    self.root = root.map { .stored($0) }
  }

  private var what: String { Item.pageKind == .catalogSeqNode ? "catalog seq tree" : "catalog name index" }

  // MARK: Loading

  /// A node, read and verified if it is not cached. `level` is what the parent implies (nil for
  /// the root) and `firstKey` the key the parent stores for it.
  func node(_ link: Node.Link, level: Int?, firstKey: Item.Key?) throws -> Node {
    switch link {
    case .dirty(let n): return n
    case .stored(let ref):
      if let n = cache.get(ref.page) { return n }
      let bytes = try pages.readVerified(ref, kind: Item.pageKind, level: 0, key: 0)
      pagesRead += 1
      let n: Node
      do {
        n = try bytes.withUnsafeBytes { raw -> Node in
          let stored = CatalogNodePage.level(raw)
          let expected = level ?? stored
          guard expected <= CatalogNodePage.maxLevel else {
            throw FormatError(.invalidField, what, "level \(expected) is deeper than \(CatalogNodePage.maxLevel)")
          }
          if expected == 0 { return Node(items: try CatalogNodePage.decodeLeaf(raw, as: Item.self)) }
          let children = try CatalogNodePage.decodeInternal(raw, as: Item.self, level: expected)
          return Node(level: expected, keys: children.map(\.key), links: children.map { .stored($0.ref) })
        }
      } catch let e as FormatError {
        throw StrataError.corrupt("\(what) node at page \(ref.page)", e)
      }
      if let firstKey, n.firstKey != firstKey {
        throw StrataError(
          .corrupt, "\(what) node at page \(ref.page) starts at key \(n.firstKey), its parent says \(firstKey)")
      }
      cache.insert(ref.page, n)
      return n
    }
  }

  /// Reads the root, so that a checkpoint whose root is damaged is found unusable at once.
  func verifyRoot() throws {
    if let root { _ = try node(root, level: nil, firstKey: nil) }
  }

  private func rootNode() throws -> Node? {
    guard let root else { return nil }
    return try node(root, level: nil, firstKey: nil)
  }

  /// Index of the child whose subtree holds `key`: the last child whose key is ≤ `key` (the
  /// first child when `key` is smaller than every key).
  private static func childIndex(_ keys: [Item.Key], _ key: Item.Key) -> Int {
    var lo = 0
    var hi = keys.count
    while lo < hi {
      let mid = (lo + hi) / 2
      if keys[mid] <= key { lo = mid + 1 } else { hi = mid }
    }
    return max(lo - 1, 0)
  }

  private static func lowerBound(_ items: [Item], _ key: Item.Key) -> Int {
    var lo = 0
    var hi = items.count
    while lo < hi {
      let mid = (lo + hi) / 2
      if items[mid].key < key { lo = mid + 1 } else { hi = mid }
    }
    return lo
  }

  private func child(_ n: Node, _ i: Int) throws -> Node {
    try node(n.links[i], level: n.level - 1, firstKey: n.keys[i])
  }

  // MARK: Lookup

  func find(_ key: Item.Key) throws -> Item? {
    guard var n = try rootNode() else { return nil }
    while n.level > 0 { n = try child(n, Self.childIndex(n.keys, key)) }
    let i = Self.lowerBound(n.items, key)
    return i < n.items.count && n.items[i].key == key ? n.items[i] : nil
  }

  /// Visits items with keys ≥ `key` in order until `visit` returns false.
  func scan(from key: Item.Key, _ visit: (Item) throws -> Bool) throws {
    guard let n = try rootNode() else { return }
    _ = try scan(n, from: key, visit)
  }

  private func scan(_ n: Node, from key: Item.Key, _ visit: (Item) throws -> Bool) throws -> Bool {
    if n.level == 0 {
      for item in n.items[Self.lowerBound(n.items, key)...] where !(try visit(item)) { return false }
      return true
    }
    for i in Self.childIndex(n.keys, key)..<n.keys.count where !(try scan(try child(n, i), from: key, visit)) {
      return false
    }
    return true
  }

  /// Visits items from the largest key down until `visit` returns false.
  func scanBackward(_ visit: (Item) throws -> Bool) throws {
    guard let n = try rootNode() else { return }
    _ = try scanBackward(n, visit)
  }

  private func scanBackward(_ n: Node, _ visit: (Item) throws -> Bool) throws -> Bool {
    if n.level == 0 {
      for item in n.items.reversed() where !(try visit(item)) { return false }
      return true
    }
    for i in n.keys.indices.reversed() where !(try scanBackward(try child(n, i), visit)) { return false }
    return true
  }

  // MARK: Changes

  private func mutableRoot() throws -> Node? {
    guard let root else { return nil }
    if case .dirty(let n) = root { return n }
    let n = try node(root, level: nil, firstKey: nil).copy()
    dirtyNodes += 1
    self.root = .dirty(n)
    return n
  }

  private func mutableChild(_ parent: Node, _ i: Int) throws -> Node {
    if case .dirty(let n) = parent.links[i] { return n }
    let n = try child(parent, i).copy()
    dirtyNodes += 1
    parent.links[i] = .dirty(n)
    return n
  }

  private enum Inserted {
    case exists
    case fits
    /// The node overflowed; this new right sibling follows it.
    case split(Node)
  }

  /// Inserts `item`; false when its key is already present (the tree is unchanged, though the
  /// path to it may have been copied: one descent instead of a lookup and an insertion).
  func insert(_ item: Item) throws -> Bool {
    guard let top = try mutableRoot() else {
      root = .dirty(Node(items: [item]))
      dirtyNodes += 1
      return true
    }
    switch try insert(item, into: top, rightEdge: true) {
    case .exists: return false
    case .fits: return true
    case .split(let right):
      try grow(top, split: right)
      return true
    }
  }

  /// A root that split gets a parent: the tree grows one level.
  private func grow(_ top: Node, split right: Node?) throws {
    guard let right else { return }
    root = .dirty(
      Node(level: top.level + 1, keys: [top.firstKey, right.firstKey], links: [.dirty(top), .dirty(right)]))
    dirtyNodes += 1
  }

  /// Inserts into the subtree of `n`, splitting `n` when it overflows.
  private func insert(_ item: Item, into n: Node, rightEdge: Bool) throws -> Inserted {
    if n.level == 0 {
      let i = Self.lowerBound(n.items, item.key)
      if i < n.items.count && n.items[i].key == item.key { return .exists }
      n.items.insert(item, at: i)
      n.bytes += item.encodedLength
      return n.bytes > Layout.pageSize ? .split(split(n, appended: rightEdge && i == n.items.count - 1)) : .fits
    }
    let i = Self.childIndex(n.keys, item.key)
    let c = try mutableChild(n, i)
    let result = try insert(item, into: c, rightEdge: rightEdge && i == n.keys.count - 1)
    n.setKey(i, c.firstKey)
    guard case .split(let right) = result else { return result }
    n.insertChild(.dirty(right), key: right.firstKey, at: i + 1)
    let appended = rightEdge && i + 1 == n.keys.count - 1
    return n.bytes > Layout.pageSize ? .split(split(n, appended: appended)) : .fits
  }

  /// Moves the upper part of an overflowing node to a new right sibling. Appending at the right
  /// edge (snapshots arrive in seq order, and often in name order) moves only the last entry,
  /// so the left node stays full; otherwise the node is split in half by bytes.
  private func split(_ n: Node, appended: Bool) -> Node {
    dirtyNodes += 1
    let sizes = n.level == 0 ? n.items.map(\.encodedLength) : n.keys.map(Node.childLength)
    var at = sizes.count - 1
    if !appended || n.bytes - sizes[at] > Layout.pageSize {
      var size = CatalogNodePage.headerLength
      at = 0
      while size < n.bytes / 2 {
        size += sizes[at]
        at += 1
      }
      at = min(max(at, 1), sizes.count - 1)
    }
    let right: Node
    if n.level == 0 {
      right = Node(items: Array(n.items[at...]))
      n.items.removeSubrange(at...)
    } else {
      right = Node(level: n.level, keys: Array(n.keys[at...]), links: Array(n.links[at...]))
      n.keys.removeSubrange(at...)
      n.links.removeSubrange(at...)
    }
    n.bytes -= right.bytes - CatalogNodePage.headerLength
    precondition(n.bytes <= Layout.pageSize && right.bytes <= Layout.pageSize, "a split half overflows")
    return right
  }

  /// Removes the item with `key`; nil (and nothing changes) when there is none.
  func remove(_ key: Item.Key) throws -> Item? {
    guard let item = try find(key), let top = try mutableRoot() else { return nil }
    // A longer first key moving up can overflow a parent, so removal can split too.
    try grow(top, split: try remove(key, from: top))
    if top.count == 0 {
      root = nil
    } else {
      // A root left with one child hands the root role down.
      while let r = root {
        let n = try node(r, level: nil, firstKey: nil)
        guard n.level > 0, n.count == 1 else { break }
        root = n.links[0]
      }
    }
    return item
  }

  /// Removes `key` (known to be present) from the subtree of `n`; returns the new right sibling
  /// when `n` overflowed and split.
  private func remove(_ key: Item.Key, from n: Node) throws -> Node? {
    if n.level == 0 {
      let i = Self.lowerBound(n.items, key)
      precondition(i < n.items.count && n.items[i].key == key, "removing an absent key")
      n.bytes -= n.items.remove(at: i).encodedLength
      return nil
    }
    let i = Self.childIndex(n.keys, key)
    let c = try mutableChild(n, i)
    let right = try remove(key, from: c)
    if c.count == 0 {
      n.removeChild(at: i)
    } else {
      n.setKey(i, c.firstKey)
      if let right { n.insertChild(.dirty(right), key: right.firstKey, at: i + 1) }
      if c.bytes < Layout.pageSize / 4 { try mergeWithNeighbour(n, i) }
    }
    return n.bytes > Layout.pageSize ? split(n, appended: false) : nil
  }

  /// Merges an underfull child with a neighbour when both fit one page, so that deleting most
  /// snapshots does not leave a tree of nearly empty pages.
  private func mergeWithNeighbour(_ n: Node, _ i: Int) throws {
    guard n.keys.count > 1 else { return }
    let left = i > 0 ? i - 1 : i
    let size = try child(n, left).bytes + child(n, left + 1).bytes - CatalogNodePage.headerLength
    guard size <= Layout.pageSize else { return }
    let a = try mutableChild(n, left)
    let b = try child(n, left + 1)
    if a.level == 0 {
      a.items += b.items
    } else {
      a.keys += b.keys
      a.links += b.links
    }
    a.bytes = size
    n.removeChild(at: left + 1)
  }

  /// Copies every stored node whose page `moves` says must move (and the path to it), so that
  /// the next checkpoint writes them elsewhere: the cleaner empties a segment this way. Reads
  /// the whole tree. Returns how many nodes it copied.
  func relocate(where moves: (UInt64) -> Bool) throws -> Int {
    guard let root else { return 0 }
    var copied = 0
    if let moved = try relocate(root, level: nil, firstKey: nil, moves, &copied) { self.root = moved }
    return copied
  }

  /// A dirty replacement for `link` when it or a node under it moved, else nil (a dirty node
  /// is changed in place: its parent is dirty too and already points at it).
  private func relocate(
    _ link: Node.Link, level: Int?, firstKey: Item.Key?, _ moves: (UInt64) -> Bool, _ copied: inout Int
  ) throws -> Node.Link? {
    let n = try node(link, level: level, firstKey: firstKey)
    var target: Node?
    if case .dirty = link { target = n }
    func copy() -> Node {
      let c = n.copy()
      dirtyNodes += 1
      copied += 1
      return c
    }
    if case .stored(let ref) = link, moves(ref.page) { target = copy() }
    if n.level > 0 {
      for i in n.keys.indices {
        guard let moved = try relocate(n.links[i], level: n.level - 1, firstKey: n.keys[i], moves, &copied) else {
          continue
        }
        if target == nil { target = copy() }
        target?.links[i] = moved
      }
    }
    if case .dirty = link { return nil }
    return target.map { .dirty($0) }
  }

  // MARK: Checkpoint

  /// Writes every dirty node bottom-up through `write` (which stores a page and returns its
  /// reference) and returns the root's reference, nil for an empty tree. Written nodes become
  /// clean, cached nodes.
  func writeDirty(_ write: ([UInt8]) throws -> PageRef) throws -> PageRef? {
    guard let root else { return nil }
    let ref = try self.write(root, write)
    self.root = .stored(ref)
    dirtyNodes = 0
    return ref
  }

  private func write(_ link: Node.Link, _ write: ([UInt8]) throws -> PageRef) throws -> PageRef {
    guard case .dirty(let n) = link else {
      guard case .stored(let ref) = link else { preconditionFailure() }
      return ref
    }
    let bytes: [UInt8]
    if n.level == 0 {
      bytes = CatalogNodePage.encodeLeaf(n.items)
    } else {
      var children: [CatalogChild<Item.Key>] = []
      children.reserveCapacity(n.keys.count)
      for i in n.keys.indices {
        let ref = try self.write(n.links[i], write)
        n.links[i] = .stored(ref)
        children.append(CatalogChild(ref: ref, key: n.keys[i]))
      }
      bytes = CatalogNodePage.encodeInternal(level: n.level, children, of: Item.self)
    }
    let ref = try write(bytes)
    cache.insert(ref.page, n)
    return ref
  }

  // MARK: Walking

  /// Visits every node, parents before children; `ref` is nil for a dirty node.
  func forEachNode(_ visit: (_ node: Node, _ ref: PageRef?) throws -> Void) throws {
    guard let root else { return }
    try forEachNode(root, level: nil, firstKey: nil, visit)
  }

  private func forEachNode(
    _ link: Node.Link, level: Int?, firstKey: Item.Key?, _ visit: (Node, PageRef?) throws -> Void
  ) throws {
    let n = try node(link, level: level, firstKey: firstKey)
    if case .stored(let ref) = link { try visit(n, ref) } else { try visit(n, nil) }
    guard n.level > 0 else { return }
    for i in n.keys.indices { try forEachNode(n.links[i], level: n.level - 1, firstKey: n.keys[i], visit) }
  }
}
