import StrataFormat

/// What `check` found (and, with repair, did). Exit codes follow `qemu-img check`.
public struct CheckReport: Codable, Sendable {
  public enum Result: String, Codable, Sendable {
    case clean
    case leaks
    case corrupt
  }

  /// Damage: metadata or data that cannot be read, or accounting that undercounts live data.
  public var errors: [String] = []
  /// Space counted as live that nothing references: harmless, reclaimable by repair.
  public var leaks: [String] = []
  /// Findings a crash explains (a torn spare superblock, a cut log tail).
  public var warnings: [String] = []
  public var repairs: [String] = []
  /// Byte ranges of the head that are lost (unreadable), for the repair report.
  public var lostRanges: [String] = []
  public var leakedBytes: UInt64 = 0
  public var checkedMapNodes = 0
  public var checkedDataBlocks = 0
  public var checkedSnapshots = 0
  public var checkedCatalogNodes = 0
  /// Records of the log walked from its start (the oldest restorable point) to its end.
  public var checkedLogRecords = 0

  public init() {}

  public var result: Result { !errors.isEmpty ? .corrupt : (!leaks.isEmpty ? .leaks : .clean) }
}

extension StrataImage {
  /// Verifies every checksum and invariant: superblocks, the map of the head and of every
  /// snapshot, every data block, the usage accounting. With `repair` (image open read-write)
  /// fixes what can be fixed without guessing and reports exactly what was lost.
  public func check(repair: Bool = false, progress: ((Double) -> Void)? = nil) throws -> CheckReport {
    try checkOpen()
    if repair { try checkWritable() }
    writer?.closeRecord()
    let state = CheckState()

    var spareSuperblockDamaged = false
    for slot in try superblockSlots() where !slot.valid {
      state.report.warnings.append(
        "superblock slot \(slot.slot) is damaged (\(slot.error ?? "?")); the other slot is in use")
      spareSuperblockDamaged = true
    }
    state.report.warnings += recoveryNotes.filter { !$0.hasPrefix("superblock slot") }
    state.report.errors += recoveryProblems

    // The head: every node, every data block, and a recount of the live pages.
    var live = [UInt32](repeating: 0, count: usage.segmentCount)
    var dataBlocks: UInt64 = 0
    var lostHead: [(UInt64, UInt64)] = []
    let total = max(map.dataBlocks, 1)
    try walkTree(map, size: virtualSize, label: "head", state: state, lost: &lostHead) { page, count in
      let s = geometry.segment(ofPage: page)
      if s < live.count {
        live[s] += UInt32(count)
      } else {
        state.report.errors.append("page \(page) is referenced but lies past the last segment \(live.count - 1)")
      }
    } data: { block, entry in
      dataBlocks += 1
      try verifyBlock(block, entry, label: "head", state: state)
      if dataBlocks % 4096 == 0 { progress?(min(0.99, Double(dataBlocks) / Double(total) * 0.9)) }
    }
    for (s, entry) in usage.entries.enumerated() where entry.livePages != live[s] {
      let delta = Int64(entry.livePages) - Int64(live[s])
      if delta > 0 {
        state.report.leaks.append("segment \(s): \(delta) pages counted live but not referenced")
        state.report.leakedBytes += UInt64(delta) * UInt64(Layout.pageSize)
      } else if lostHead.isEmpty {
        state.report.errors.append(
          "segment \(s): usage table counts \(entry.livePages) live pages, the map references \(live[s])")
      }
    }
    if dataBlocks != map.dataBlocks && lostHead.isEmpty {
      state.report.errors.append("the checkpoint counts \(map.dataBlocks) data blocks, the map holds \(dataBlocks)")
    }

    // Snapshots: the catalog trees, then every view (older checkpoints plus the log). Views are
    // replayed forward, one replay per base checkpoint, and a stored node already verified
    // (shared with the head or an earlier view) is not walked again: millions of snapshots
    // cost the log and the distinct nodes, not views times map size.
    checkCatalog(state)
    var replay: ViewReplay?
    try catalog.forEach { entry in
      state.report.checkedSnapshots += 1
      let label = "snapshot \"\(entry.name)\""
      do {
        if let r = replay, r.base != entry.baseCheckpoint || r.position > entry.seq { replay = nil }
        let cursor = try replay ?? ViewReplay(image: self, base: entry.baseCheckpoint, before: entry.seq)
        replay = cursor
        let view = try cursor.advance(to: entry.seq)
        var lost: [(UInt64, UInt64)] = []
        try walkTree(view.map, size: view.virtualSize, label: label, state: state, lost: &lost) { _, _ in
        } data: { block, e in
          try verifyBlock(block, e, label: label, state: state)
        }
      } catch let e as StrataError where e.code == .corrupt {
        replay = nil
        state.report.errors.append("\(label) cannot be read: \(e.message)")
      }
    }
    checkLog(state, retainedFromSeq: try? cdpRetainedSeq())
    progress?(1)

    state.report.lostRanges = lostHead.map { "bytes \($0.0 * UInt64(blockSize))..<\($0.1 * UInt64(blockSize))" }
    if repair { try self.repair(&state.report, lostHead: lostHead, spareSuperblockDamaged: spareSuperblockDamaged) }
    return state.report
  }

  /// Points in time: the log from its start to its end must be one unbroken chain, or the
  /// points after a break cannot be restored. Record payloads (the data a point reads) are
  /// verified from `retainedFromSeq` on, the points that retention promises to keep.
  private func checkLog(_ state: CheckState, retainedFromSeq: UInt64? = nil) {
    let end = writer?.nextSeq ?? recoveredEnd.nextSeq
    do {
      guard var current = try pages.record(at: try checkpoint(before: 1, orOldest: true).page) else {
        state.report.errors.append(
          "the oldest checkpoint of the log cannot be read: no point before the last one can be restored")
        return
      }
      while true {
        state.report.checkedLogRecords += 1
        if let from = retainedFromSeq, current.header.nextSeq > from, !(try pages.payloadIsIntact(current)) {
          state.report.errors.append(
            "the log record at seq \(current.header.seq) (page \(current.page)) holds damaged data: retained points after it cannot be read"
          )
        }
        guard let next = try pages.next(after: current) else { break }
        current = next
      }
      if current.header.nextSeq < end {
        state.report.errors.append(
          "the log breaks after seq \(current.header.nextSeq - 1) (page \(current.page)): points from there to seq \(end - 1) cannot be restored"
        )
      }
    } catch {
      state.report.errors.append("the log cannot be walked: \(error)")
    }
  }

  private func repair(_ report: inout CheckReport, lostHead: [(UInt64, UInt64)], spareSuperblockDamaged: Bool) throws {
    for (lo, hi) in lostHead {
      try logAndApply(.discard(firstBlock: lo, count: hi - lo))
      report.repairs.append(
        "dropped the unreadable map of bytes \(lo * UInt64(blockSize))..<\(hi * UInt64(blockSize)): their data is lost and reads as zeros"
      )
    }
    let count = try recount()
    if count.livePages != usage.entries.map(\.livePages) || count.dataBlocks != map.dataBlocks {
      usage.setLivePages(count.livePages)
      map.dataBlocks = count.dataBlocks
      report.repairs.append(
        "rebuilt the usage table from the map (\(report.leakedBytes) leaked bytes reclaimed for the cleaner)")
    }
    changedSinceCheckpoint = true
    try checkpoint()
    if spareSuperblockDamaged || !recoveryProblems.isEmpty {
      try checkpoint()  // the next generation lands in the other slot: both are fresh
      report.repairs.append("rewrote both superblocks")
      // What recovery had to skip is now behind a checkpoint that describes the repaired state.
      recoveryProblems = []
      recoveryNotes = []
    }
    if report.errors.contains(where: { $0.contains("failed its checksum") && $0.hasPrefix("head: block") }) {
      report.repairs.append(
        "damaged data blocks were left in place: reading them keeps failing rather than returning wrong bytes")
    }
  }

  /// Walks both catalog trees (every node is verified as it loads: checksum, level, order, the
  /// key its parent holds for it) and checks that the name index lists exactly the entries of
  /// the seq tree under their names, with no name twice.
  private func checkCatalog(_ state: CheckState) {
    func items<Item>(_ tree: CatalogTree<Item>, _ what: String) -> [Item]? {
      var out: [Item] = []
      do {
        try tree.forEachNode { node, _ in
          state.report.checkedCatalogNodes += 1
          out += node.items
        }
      } catch {
        state.report.errors.append("\(what) cannot be read: \(error)")
        return nil
      }
      return out
    }
    guard let entries = items(catalog.bySeq, "the catalog"), let names = items(catalog.byName, "the name index") else {
      return
    }
    if entries.count != catalog.count {
      state.report.errors.append("the checkpoint counts \(catalog.count) snapshots, the catalog holds \(entries.count)")
    }
    // The index's keys are strictly increasing (checked as nodes load), so equality with the
    // seq tree's names also proves the names unique.
    let expected = entries.map(NameIndexEntry.init).sorted { $0.key < $1.key }
    if expected != names {
      state.report.errors.append(
        "the name index (\(names.count) entries) does not match the catalog (\(entries.count) snapshots)")
    }
  }

  /// Walks a map, verifying each node; unreadable subtrees are reported and recorded in `lost`.
  private func walkTree(
    _ map: BlockMap, size: UInt64, label: String, state: CheckState, lost: inout [(UInt64, UInt64)],
    pages count: (UInt64, Int) -> Void, data: (UInt64, MapEntry) throws -> Void
  ) throws {
    let blocks = (size + UInt64(geometry.blockSize) - 1) / UInt64(geometry.blockSize)
    func visit(level: Int, index: UInt64, ref: ChildRef) throws {
      let firstBlock = index << UInt64(8 * (level + 1))
      guard firstBlock < blocks || ref.isNull else {
        state.report.errors.append("\(label): map node (level \(level), index \(index)) lies past the end of the disk")
        return
      }
      let node: MapNode
      if let d = map.dirty[NodeKey(level: level, index: index)] {
        node = d
        if !ref.isNull { count(ref.page, 1) }
      } else if ref.isNull {
        return
      } else {
        // A stored node is immutable: once verified, its subtree needs no second look from a view.
        guard state.verifiedNodes.insert(ref.page).inserted || label == "head" else { return }
        count(ref.page, 1)
        do {
          node = try pages.load(ref, level: level, index: index)
        } catch let e as StrataError where e.code == .corrupt {
          let end = min(blocks, (index + 1) << UInt64(8 * (level + 1)))
          state.report.errors.append("\(label): \(e.message); blocks \(firstBlock)..<\(end) cannot be read")
          if label == "head" { lost.append((firstBlock, end)) }
          return
        }
      }
      state.report.checkedMapNodes += 1
      for i in 0..<Layout.mapFanout {
        let child = index << 8 | UInt64(i)
        if level == 0 {
          let entry = node.entry(i)
          if child >= blocks {
            if entry.state != .unallocated {
              state.report.errors.append("\(label): block \(child) past the end of the disk is mapped")
            }
          } else if entry.state == .data {
            count(entry.page, geometry.pagesPerBlock)
            try data(child, entry)
          }
        } else {
          try visit(level: level - 1, index: child, ref: node.child(i))
        }
      }
    }
    try visit(level: map.depth - 1, index: 0, ref: map.root)
  }

  private func verifyBlock(
    _ block: UInt64, _ entry: MapEntry, label: String, state: CheckState
  ) throws {
    guard state.verified.insert(entry.page).inserted else { return }
    state.report.checkedDataBlocks += 1
    do {
      let bytes = try readBlock(entry)
      let actual = CRC32C.checksum(bytes)
      if actual != entry.checksum {
        state.report.errors.append(
          "\(label): block \(block) at page \(entry.page) failed its checksum (stored \(hex32(entry.checksum)), read \(hex32(actual)))"
        )
      }
    } catch let e as StrataError where e.code == .corrupt {
      state.report.errors.append("\(label): block \(block): \(e.message)")
    }
  }

  private func readBlock(_ entry: MapEntry) throws -> [UInt8] {
    try pages.checkAddress(entry.page, what: "data block")
    var bytes = [UInt8](repeating: 0, count: geometry.blockSize)
    try bytes.withUnsafeMutableBytes { try pages.readPages(entry.page, geometry.pagesPerBlock, into: $0) }
    return bytes
  }
}

/// Mutable state of one check run, shared by the walking closures.
private final class CheckState {
  var report = CheckReport()
  /// Data pages already verified: snapshots share most blocks with the head.
  var verified = Set<UInt64>()
  /// Stored map nodes already walked (with their subtrees): snapshots share most of the map.
  var verifiedNodes = Set<UInt64>()
}
