import StrataFormat

extension BlockMap {
  /// Visits, in block order, the runs of blocks in `lo..<hi` whose entries differ between this
  /// map and `other`, from metadata alone. Both maps must read nodes from the same log. Clean
  /// subtrees with equal references are equal (a reference names a node's page and checksum, and
  /// clean nodes are never changed in place), so only the paths that changed are read. A dirty
  /// node's descendants may be dirty, so a dirty node on either side is always descended into.
  /// Neighbouring runs may be reported separately; callers merge them.
  func forEachDifference(
    from other: BlockMap, _ lo: UInt64, _ hi: UInt64, _ visit: (_ first: UInt64, _ count: UInt64) throws -> Void
  ) throws {
    guard lo < hi else { return }
    // After a resize the maps can differ in depth; the shallower one is lifted to the same
    // depth (a copy: its old root becomes child 0 of new dirty roots).
    let a = depth < other.depth ? lifted(toDepth: other.depth) : self
    let b = other.depth < depth ? other.lifted(toDepth: depth) : other
    precondition(a.depth == Layout.maxMapDepth || hi <= 1 << UInt64(8 * a.depth), "range past the map")
    try a.difference(b, level: a.depth - 1, index: 0, refA: a.root, refB: b.root, lo, hi, visit)
  }

  private func lifted(toDepth target: Int) -> BlockMap {
    let m = copy()
    m.grow(toDepth: target)
    return m
  }

  private func difference(
    _ other: BlockMap, level: Int, index: UInt64, refA: ChildRef, refB: ChildRef, _ lo: UInt64, _ hi: UInt64,
    _ visit: (UInt64, UInt64) throws -> Void
  ) throws {
    let key = NodeKey(level: level, index: index)
    let dirtyA = dirty[key]
    let dirtyB = other.dirty[key]
    if dirtyA == nil && dirtyB == nil && refA == refB { return }
    let nodeA = try dirtyA ?? (refA.isNull ? nil : source.load(refA, level: level, index: index))
    let nodeB = try dirtyB ?? (refB.isNull ? nil : other.source.load(refB, level: level, index: index))
    if nodeA == nil && nodeB == nil {
      // Both empty but not alike: one unallocated, the other zero.
      try visit(lo, hi - lo)
      return
    }
    if level == 0 {
      let emptyA: MapEntry = refA.zeroSubtree ? .zero : .unallocated
      let emptyB: MapEntry = refB.zeroSubtree ? .zero : .unallocated
      var runStart: UInt64? = nil
      for block in lo..<hi {
        let i = Int(block & 0xFF)
        let differs = (nodeA?.entry(i) ?? emptyA) != (nodeB?.entry(i) ?? emptyB)
        if differs && runStart == nil { runStart = block }
        if !differs, let start = runStart {
          try visit(start, block - start)
          runStart = nil
        }
      }
      if let start = runStart { try visit(start, hi - start) }
      return
    }
    // An empty side's children are empty in the same way (unallocated or zero).
    let emptyA: ChildRef = refA.zeroSubtree ? .zero : .unallocated
    let emptyB: ChildRef = refB.zeroSubtree ? .zero : .unallocated
    let shift = UInt64(8 * level)
    var block = lo
    while block < hi {
      let childIndex = block >> shift
      let end = min(hi, (childIndex + 1) << shift)
      let slot = Int(childIndex & 0xFF)
      try difference(
        other, level: level - 1, index: childIndex, refA: nodeA?.child(slot) ?? emptyA,
        refB: nodeB?.child(slot) ?? emptyB, block, end, visit)
      block = end
    }
  }
}

extension StrataImage {
  /// The byte ranges within `offset..<offset+length` whose contents may differ between a
  /// snapshot and `view` (the head when nil), found from the block maps without reading data:
  /// what an incremental backup since `snapshot` must copy. Blocks rewritten with equal bytes
  /// count as changed; ranges are merged and block-aligned, clipped to the range asked for.
  public func changedRanges(
    since snapshot: SnapshotView, in view: SnapshotView? = nil, from offset: UInt64, length: UInt64
  ) throws -> [Range<UInt64>] {
    try checkOpen()
    precondition(snapshot.image === self && (view?.image ?? self) === self, "views of another image")
    let target = view?.view.map ?? map
    // Past both sizes nothing is compared; the maps may not reach that far.
    let limit = max(view?.size ?? size, snapshot.size)
    let end = min(limit, offset.addingReportingOverflow(length).overflow ? UInt64.max : offset + length)
    guard offset < end else { return [] }
    let bs = UInt64(blockSize)
    var out: [Range<UInt64>] = []
    try target.forEachDifference(from: snapshot.view.map, offset / bs, end / bs + (end % bs == 0 ? 0 : 1)) {
      first, count in
      let start = max(first * bs, offset)
      let stop = min((first + count) * bs, end)
      if let last = out.last, last.upperBound == start {
        out[out.count - 1] = last.lowerBound..<stop
      } else {
        out.append(start..<stop)
      }
    }
    return out
  }
}
