import StrataFormat

/// Who is told when a stored page becomes referenced by, or stops being referenced by, the head.
/// The usage table implements it; snapshot views pass nil because they own nothing.
protocol LiveAccounting: AnyObject {
  func acquire(page: UInt64, count: Int)
  func release(page: UInt64, count: Int)
}

/// Loads clean nodes by reference: reads, verifies the checksum, validates, caches.
protocol NodeSource: AnyObject {
  func load(_ ref: ChildRef, level: Int, index: UInt64) throws -> MapNode
  /// `load` for child `index & 0xFF` of `parent`, which may read its siblings along with it.
  func load(_ ref: ChildRef, level: Int, index: UInt64, parent: MapNode) throws -> MapNode
  func remember(_ node: MapNode, at page: UInt64)
}

struct NodeKey: Hashable {
  var level: Int
  var index: UInt64
}

/// The copy-on-write radix tree from virtual block to `MapEntry` (format-spec, "Block map").
///
/// Clean nodes come from the `NodeSource` (bounded cache over the log). Changed nodes live in
/// `dirty`, keyed by level and index, until a checkpoint writes them bottom-up. Invariant: the
/// parent of a dirty node is dirty. A lookup checks `dirty` before following a reference, so a
/// dirty parent's stale reference to its dirty child is never followed.
final class BlockMap {
  enum Resolved {
    case node(MapNode)
    /// No node: the whole subtree is unallocated, or zero when `zeroSubtree` is set.
    case empty(ChildRef)
  }

  let source: NodeSource
  let pagesPerBlock: Int
  weak var accounting: (any LiveAccounting)?
  private(set) var depth: Int
  private(set) var root: ChildRef
  private(set) var dirty: [NodeKey: MapNode] = [:]
  /// Blocks in state data; maintained only while `accounting` is set (the head).
  var dataBlocks: UInt64

  init(source: NodeSource, depth: Int, root: ChildRef, dataBlocks: UInt64, pagesPerBlock: Int) {
    precondition(depth >= 1 && depth <= Layout.maxMapDepth)
    self.source = source
    self.depth = depth
    self.root = root
    self.dataBlocks = dataBlocks
    self.pagesPerBlock = pagesPerBlock
  }

  /// An independent copy: shares clean nodes, copies dirty ones.
  func copy() -> BlockMap {
    let m = BlockMap(source: source, depth: depth, root: root, dataBlocks: dataBlocks, pagesPerBlock: pagesPerBlock)
    m.dirty = dirty.mapValues { MapNode(copying: $0) }
    return m
  }

  var dirtyCount: Int { dirty.count }

  // MARK: Lookup

  func resolve(level: Int, index: UInt64) throws -> Resolved {
    if let node = dirty[NodeKey(level: level, index: index)] { return .node(node) }
    if level == depth - 1 {
      precondition(index == 0, "root index must be 0")
      return root.isNull ? .empty(root) : .node(try source.load(root, level: level, index: index))
    }
    switch try resolve(level: level + 1, index: index >> 8) {
    case .empty(let parentRef): return .empty(parentRef)
    case .node(let parent):
      let ref = parent.child(Int(index & 0xFF))
      if ref.isNull { return .empty(ref) }
      return .node(try source.load(ref, level: level, index: index, parent: parent))
    }
  }

  func entry(_ block: UInt64) throws -> MapEntry {
    switch try resolve(level: 0, index: block >> 8) {
    case .node(let leaf): leaf.entry(Int(block & 0xFF))
    case .empty(let ref): ref.zeroSubtree ? .zero : .unallocated
    }
  }

  // MARK: Changes

  /// The dirty copy of a node, created from its clean version (or from its empty state).
  /// Its ancestors become dirty too, so every traversal from the root reaches every dirty node.
  private func mutableNode(level: Int, index: UInt64) throws -> MapNode {
    let key = NodeKey(level: level, index: index)
    if let node = dirty[key] { return node }
    if level < depth - 1 { _ = try mutableNode(level: level + 1, index: index >> 8) }
    let node: MapNode
    switch try resolve(level: level, index: index) {
    case .node(let clean): node = MapNode(copying: clean)
    case .empty(let ref): node = ref.zeroSubtree ? .filledWithZero(level: level) : MapNode()
    }
    dirty[key] = node
    return node
  }

  /// Makes node (level, index) dirty when the head stores it at `page`, so that the next
  /// checkpoint writes it elsewhere (the cleaner empties a segment this way). False when the
  /// head's node lives elsewhere, is dirty already, or does not exist.
  func relocateNode(level: Int, index: UInt64, from page: UInt64) throws -> Bool {
    guard level < depth, dirty[NodeKey(level: level, index: index)] == nil else { return false }
    let ref: ChildRef
    if level == depth - 1 {
      guard index == 0 else { return false }
      ref = root
    } else {
      guard case .node(let parent) = try resolve(level: level + 1, index: index >> 8) else { return false }
      ref = parent.child(Int(index & 0xFF))
    }
    guard !ref.isNull, ref.page == page else { return false }
    _ = try mutableNode(level: level, index: index)
    return true
  }

  /// Sets one block's entry and keeps the live accounting; returns the entry it replaced.
  @discardableResult
  func setEntry(_ block: UInt64, _ new: MapEntry) throws -> MapEntry {
    let leaf = try mutableNode(level: 0, index: block >> 8)
    let i = Int(block & 0xFF)
    let old = leaf.entry(i)
    leaf.setEntry(i, new)
    account(old: old, new: new)
    return old
  }

  private func account(old: MapEntry, new: MapEntry) {
    guard let accounting else { return }
    if old.state == .data {
      accounting.release(page: old.page, count: pagesPerBlock)
      dataBlocks -= 1
    }
    if new.state == .data {
      accounting.acquire(page: new.page, count: pagesPerBlock)
      dataBlocks += 1
    }
  }

  /// Sets blocks `lo..<hi` to `state` (zero or unallocated), dropping whole subtrees where the
  /// range covers them, so discarding a terabyte costs a few nodes, not a billion entries.
  /// `diskBlocks`, when given, is the disk's size in blocks: a range reaching it covers every
  /// valid block of a subtree, so a subtree (even an unreadable root) is replaced whole.
  func setRange(_ lo: UInt64, _ hi: UInt64, to state: BlockState, diskBlocks: UInt64? = nil) throws {
    precondition(state != .data && lo <= hi)
    guard lo < hi else { return }
    if lo == 0, let diskBlocks, hi >= diskBlocks {
      // The whole disk: drop the tree without reading the root (which may be what is damaged).
      try dropSubtree(level: depth - 1, index: 0, ref: root)
      root = state == .zero ? .zero : .unallocated
      return
    }
    try setRange(level: depth - 1, index: 0, lo, hi, state)
  }

  private func setRange(level: Int, index: UInt64, _ lo: UInt64, _ hi: UInt64, _ state: BlockState) throws {
    let node = try mutableNode(level: level, index: index)
    if level == 0 {
      let target: MapEntry = state == .zero ? .zero : .unallocated
      for b in lo..<hi {
        let i = Int(b & 0xFF)
        let old = node.entry(i)
        if old != target {
          node.setEntry(i, target)
          account(old: old, new: target)
        }
      }
      return
    }
    let shift = UInt64(8 * level)
    var b = lo
    while b < hi {
      let childIndex = b >> shift
      let childStart = childIndex << shift
      let childEnd = childStart + (1 << shift)
      let end = min(hi, childEnd)
      if b == childStart && end == childEnd {
        let slot = Int(childIndex & 0xFF)
        try dropSubtree(level: level - 1, index: childIndex, ref: node.child(slot))
        node.setChild(slot, state == .zero ? .zero : .unallocated)
      } else {
        try setRange(level: level - 1, index: childIndex, b, end, state)
      }
      b = end
    }
  }

  /// Forgets a subtree: releases every page it references (when accounting) and its dirty nodes.
  private func dropSubtree(level: Int, index: UInt64, ref: ChildRef) throws {
    if accounting != nil { try releasePages(level: level, index: index, ref: ref) }
    dirty = dirty.filter { key, _ in
      !(key.level <= level && key.index >> UInt64(8 * (level - key.level)) == index)
    }
  }

  private func releasePages(level: Int, index: UInt64, ref: ChildRef) throws {
    guard let accounting else { return }
    if !ref.isNull { accounting.release(page: ref.page, count: 1) }
    let node: MapNode
    if let d = dirty[NodeKey(level: level, index: index)] {
      node = d
    } else if ref.isNull {
      return
    } else {
      do {
        node = try source.load(ref, level: level, index: index)
      } catch let e as StrataError where e.code == .io || e.code == .noSpace {
        // A read that failed (EIO, ENOSPC) says nothing about the node: skipping it would leave
        // its pages counted for good (found by strata-sim, seed 31073). The operation fails.
        throw e
      } catch {
        // Damaged: a damaged subtree being discarded (by `check --repair` or a guest) must not
        // fail the discard; its pages stay counted, a leak that `check` reports.
        return
      }
    }
    for i in 0..<Layout.mapFanout {
      if level == 0 {
        account(old: node.entry(i), new: .unallocated)
      } else {
        try releasePages(level: level - 1, index: index << 8 | UInt64(i), ref: node.child(i))
      }
    }
  }

  /// Adds levels on top so that `blocks` blocks are addressable; the old root becomes child 0.
  func grow(toBlocks blocks: UInt64) throws {
    grow(toDepth: Layout.mapDepth(forBlocks: blocks))
  }

  func grow(toDepth needed: Int) {
    precondition(needed <= Layout.maxMapDepth)
    while depth < needed {
      let newRoot = MapNode()
      newRoot.setChild(0, root)
      dirty[NodeKey(level: depth, index: 0)] = newRoot
      root = .unallocated
      depth += 1
    }
  }

  /// Writes every dirty node bottom-up through `write`, which stores a node and returns its
  /// page; parents are updated with the new references, the root last. Afterwards nothing is
  /// dirty and the written nodes are clean, cached nodes.
  func writeDirty(_ write: (MapNode, _ level: Int, _ index: UInt64, _ checksum: UInt32) throws -> UInt64) throws {
    for level in 0..<depth {
      let keys = dirty.keys.filter { $0.level == level }.sorted { $0.index < $1.index }
      for key in keys {
        guard let node = dirty[key] else { continue }
        let new: ChildRef
        if let uniform = Self.uniformEmptyRef(node, level: level) {
          new = uniform
        } else {
          let checksum = node.checksum(level: level, key: key.index)
          let page = try write(node, level, key.index, checksum)
          new = ChildRef(page: page, checksum: checksum)
          source.remember(node, at: page)
        }
        let old: ChildRef
        if level == depth - 1 {
          old = root
          root = new
        } else {
          let parent = try mutableNode(level: level + 1, index: key.index >> 8)
          old = parent.child(Int(key.index & 0xFF))
          parent.setChild(Int(key.index & 0xFF), new)
        }
        if !old.isNull { accounting?.release(page: old.page, count: 1) }
        if !new.isNull { accounting?.acquire(page: new.page, count: 1) }
      }
    }
    dirty.removeAll()
  }

  /// A node whose entries are all unallocated (or all zero) needs no page: its parent says so.
  private static func uniformEmptyRef(_ node: MapNode, level: Int) -> ChildRef? {
    let first = (node.word0(0), node.word1(0))
    let ref: ChildRef
    if first == MapEntry.unallocated.words && level == 0 || first == ChildRef.unallocated.words && level > 0 {
      ref = .unallocated
    } else if level == 0 && first == MapEntry.zero.words || level > 0 && first == ChildRef.zero.words {
      ref = .zero
    } else {
      return nil
    }
    for i in 1..<Layout.mapFanout where node.word0(i) != first.0 || node.word1(i) != first.1 {
      return nil
    }
    return ref
  }

  // MARK: Traversal

  /// Visits, in block order, runs of blocks `lo..<hi` with one entry each: a data block is a run of
  /// one, an empty subtree one run. Callers merge neighbours as they like.
  func forEachRun(_ lo: UInt64, _ hi: UInt64, _ visit: (UInt64, UInt64, MapEntry) throws -> Void) throws {
    if lo < hi { try forEachRun(level: depth - 1, index: 0, ref: root, lo, hi, visit) }
  }

  private func forEachRun(
    level: Int, index: UInt64, ref: ChildRef, _ lo: UInt64, _ hi: UInt64,
    _ visit: (UInt64, UInt64, MapEntry) throws -> Void
  ) throws {
    let node: MapNode
    if let d = dirty[NodeKey(level: level, index: index)] {
      node = d
    } else if ref.isNull {
      try visit(lo, hi - lo, ref.zeroSubtree ? .zero : .unallocated)
      return
    } else {
      node = try source.load(ref, level: level, index: index)
    }
    if level == 0 {
      for b in lo..<hi { try visit(b, 1, node.entry(Int(b & 0xFF))) }
      return
    }
    let shift = UInt64(8 * level)
    var b = lo
    while b < hi {
      let childIndex = b >> shift
      let end = min(hi, (childIndex + 1) << shift)
      try forEachRun(level: level - 1, index: childIndex, ref: node.child(Int(childIndex & 0xFF)), b, end, visit)
      b = end
    }
  }

  /// Visits every stored node reachable from the head (dirty nodes are visited but have no page).
  func forEachNode(
    _ visit: (_ level: Int, _ index: UInt64, _ ref: ChildRef, _ node: MapNode, _ isDirty: Bool) throws -> Void
  )
    throws
  {
    try forEachNode(level: depth - 1, index: 0, ref: root, visit)
  }

  private func forEachNode(
    level: Int, index: UInt64, ref: ChildRef, _ visit: (Int, UInt64, ChildRef, MapNode, Bool) throws -> Void
  ) throws {
    let node: MapNode
    let isDirty: Bool
    if let d = dirty[NodeKey(level: level, index: index)] {
      node = d
      isDirty = true
    } else if ref.isNull {
      return
    } else {
      node = try source.load(ref, level: level, index: index)
      isDirty = false
    }
    try visit(level, index, ref, node, isDirty)
    if level > 0 {
      for i in 0..<Layout.mapFanout {
        try forEachNode(level: level - 1, index: index << 8 | UInt64(i), ref: node.child(i), visit)
      }
    }
  }
}
