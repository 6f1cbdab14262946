import CStrataLinux
import StrataFormat

/// How much one cleaning pass may do.
public struct CompactOptions: Sendable {
  /// Most segments freed by one pass (an incremental cleaner takes a few at a time).
  public var maxSegments: Int
  /// Segments fuller than this (live pages / written pages) are not worth copying.
  public var maxLiveRatio: Double
  /// Every point at or after this seq must stay restorable (the continuous-protection
  /// window); nil keeps only the named snapshots.
  public var retainFromSeq: UInt64?
  /// Free segments kept allocated for the log to reuse; the rest are punched out of the file.
  public var keepAllocated: Int

  public init(maxSegments: Int = .max, maxLiveRatio: Double = 0.9, retainFromSeq: UInt64? = nil, keepAllocated: Int = 0)
  {
    precondition(maxSegments >= 0 && maxLiveRatio >= 0 && keepAllocated >= 0)
    self.maxSegments = maxSegments
    self.maxLiveRatio = maxLiveRatio
    self.retainFromSeq = retainFromSeq
    self.keepAllocated = keepAllocated
  }
}

/// What a cleaning pass did.
public struct CompactReport: Codable, Sendable, Equatable {
  public var segmentsFreed = 0
  /// Sealed segments a retained point (snapshot, window, restore) still needs.
  public var segmentsPinned = 0
  /// Blocks of the head copied forward out of the freed segments.
  public var blocksCopied = 0
  /// Map nodes, catalog nodes and usage pages rewritten elsewhere.
  public var metadataPagesMoved = 0
  /// Log bytes the freed segments held.
  public var bytesReclaimed: UInt64 = 0
  /// Bytes of the file given back to the file system (punched).
  public var bytesPunched: UInt64 = 0
  /// Points before this seq may no longer be restored (the log from it on is whole).
  public var logStartSeq: UInt64 = 0

  public init() {}
}

/// Segments the cleaner freed, on their way back to the log.
///
/// A queue plans a read under the image lock and runs it outside (`ImageQueue`), so a read
/// planned just before the cleaner moved a block may still be in flight when that block's
/// segment is freed. Freed segments therefore wait, as in RCU: each freeing ends an epoch,
/// queues publish the oldest epoch they have reads in flight from, and a segment takes log
/// records again only once no read from its epoch or before is in flight.
final class Reclaim {
  /// Free in a durable checkpoint and past every read that could target them: the log's next
  /// segments, lowest first.
  var reusable: [Int] = []
  /// Freed at `epoch`, waiting for older reads.
  private var quarantined: [(epoch: UInt64, segment: Int)] = []
  private(set) var epoch: UInt64 = 1
  private var readers: [Weak] = []

  private struct Weak {
    weak var reader: ReadEpochs?
  }

  func register(_ reader: ReadEpochs) {
    readers.removeAll { $0.reader == nil }
    readers.append(Weak(reader: reader))
  }

  /// Segments just freed (durably): they join the log once older reads are done.
  func release(_ segments: [Int]) {
    quarantined += segments.map { (epoch, $0) }
    epoch += 1
  }

  /// The lowest segment the log may take now, if any.
  func takeReusable() -> Int? {
    if !quarantined.isEmpty {
      let oldest = readers.compactMap { $0.reader?.oldestInFlight }.min() ?? .max
      reusable += quarantined.filter { $0.epoch < oldest }.map(\.segment)
      quarantined.removeAll { $0.epoch < oldest }
      reusable.sort()
    }
    return reusable.first
  }

  var count: Int { reusable.count + quarantined.count }
}

/// The epochs of one queue's reads in flight. The queue's thread changes the counts; the
/// oldest epoch is published with release ordering for the cleaner, which reads it under the
/// image lock.
final class ReadEpochs: @unchecked Sendable {
  private let published = UnsafeMutablePointer<UInt64>.allocate(capacity: 1)
  private var current: UInt64 = 0
  private var currentReads = 0
  private var olderReads = 0
  private var oldestOlder = UInt64.max

  init() { published.initialize(to: .max) }
  deinit { published.deallocate() }

  var oldestInFlight: UInt64 { strata_load_acquire_u64(published) }

  /// A read planned (under the image lock) at `epoch`; returns the epoch to hand to `end`.
  func begin(_ epoch: UInt64) -> UInt64 {
    if epoch != current {
      if currentReads > 0 {
        olderReads += currentReads
        oldestOlder = min(oldestOlder, current)
      }
      current = epoch
      currentReads = 0
    }
    currentReads += 1
    publish()
    return epoch
  }

  func end(_ epoch: UInt64) {
    if epoch == current && currentReads > 0 {
      currentReads -= 1
    } else {
      precondition(olderReads > 0, "a read ended that never began")
      olderReads -= 1
      if olderReads == 0 { oldestOlder = .max }
    }
    publish()
  }

  /// The queue closed: nothing of it is in flight any more.
  func reset() {
    currentReads = 0
    olderReads = 0
    oldestOlder = .max
    publish()
  }

  private func publish() {
    let oldest = olderReads > 0 ? oldestOlder : (currentReads > 0 ? current : .max)
    strata_store_release_u64(published, oldest)
  }
}

extension StrataImage {
  /// A checkpoint of the chain, newest first, back to the log start.
  struct ChainCheckpoint {
    var page: UInt64
    var seq: UInt64
    var body: CheckpointBody
  }

  /// The checkpoints from the last back to the log start, newest first.
  func checkpointChain() throws -> [ChainCheckpoint] {
    var out: [ChainCheckpoint] = []
    var page = lastCheckpointPage
    while page != 0 {
      guard let stored = try pages.record(at: page), case .checkpoint(let body) = stored.record.ops.last,
        out.last.map({ stored.header.seq < $0.seq }) ?? true
      else {
        throw StrataError(.corrupt, "the checkpoint at page \(page) cannot be read: the log before it is out of reach")
      }
      out.append(ChainCheckpoint(page: page, seq: stored.header.seq, body: body))
      if page == logStart { break }
      page = body.previousCheckpoint
    }
    return out
  }

  /// Space of the log: bytes its sealed segments hold and how much of that the head no longer
  /// references (some of it snapshots or the window may still need), and free segments.
  public var logSpace: (sealedBytes: UInt64, garbageBytes: UInt64, freeSegments: Int) {
    var sealed: UInt64 = 0
    var garbage: UInt64 = 0
    for e in usage.entries where e.isSealed {
      sealed += UInt64(e.writtenPages)
      garbage += UInt64(e.writtenPages - min(e.writtenPages, e.livePages))
    }
    let page = UInt64(Layout.pageSize)
    return (sealed * page, garbage * page, usage.freeSegments.count)
  }

  /// Reclaims log segments (format-spec 15): picks victims by cost-benefit among the sealed
  /// segments no retained point needs, copies the head's live blocks and metadata out of them,
  /// and frees them for the log to reuse. Crash-safe at every step: a segment is marked free
  /// only in a checkpoint written after the one that stopped referencing it, and the log takes
  /// it only once that checkpoint is durable.
  public func compact(_ options: CompactOptions = CompactOptions(), progress: ((Double) -> Void)? = nil) throws
    -> CompactReport
  {
    try checkWritable()
    guard let writer else { throw StrataError(.readOnly, "the image is open read-only") }
    var report = CompactReport()
    // A clean head and a fresh checkpoint C0: victims hold only records before it.
    try checkpoint()
    let chain = try checkpointChain()
    guard let c0 = chain.first else { preconditionFailure("an open image has a checkpoint") }
    var known = Dictionary(chain.map { ($0.page, $0) }, uniquingKeysWith: { a, _ in a })
    func checkpointRecord(at page: UInt64) throws -> ChainCheckpoint {
      if let c = known[page] { return c }
      guard let stored = try pages.record(at: page), case .checkpoint(let body) = stored.record.ops.last else {
        throw StrataError(.corrupt, "a retained point starts from page \(page), which holds no checkpoint")
      }
      let c = ChainCheckpoint(page: page, seq: stored.header.seq, body: body)
      known[page] = c
      return c
    }

    // What retained points need: the records they replay (seq ranges) and the checkpoints
    // they start from. A snapshot replays from its base to itself; the window and recovery
    // need the whole tail; a RESTORE inside any of these needs its own base and range too.
    var bases = Set<UInt64>()
    var ranges: [Range<UInt64>] = []
    try catalog.forEach { e in
      bases.insert(e.baseCheckpoint)
      ranges.append(try checkpointRecord(at: e.baseCheckpoint).seq..<e.seq)
    }
    var tail = c0
    if let from = options.retainFromSeq {
      for c in chain {
        bases.insert(c.page)
        tail = c
        if c.seq < from { break }
      }
    }
    ranges.append(tail.seq..<UInt64.max)
    var scanned: [Range<UInt64>] = []
    while true {
      let todo = merged(ranges).flatMap { subtract(scanned, from: $0) }
      guard !todo.isEmpty else { break }
      for range in todo {
        for base in try restoreBases(in: range, known: &known) where bases.insert(base.page).inserted {
          ranges.append(base.range)
        }
      }
      scanned = merged(scanned + todo)
    }
    let retained = merged(ranges)

    // Pages the retained points' trees reference (shared subtrees walked once).
    let pinned = try pinnedPages(bases: try bases.map { try checkpointRecord(at: $0).body })
    let protected = Set([writer.segment, writer.previousSegment].compactMap { $0 })
    var candidates: [(segment: Int, score: Double)] = []
    for (s, e) in usage.entries.enumerated() where e.isSealed && e.lastSeq < c0.seq && !protected.contains(s) {
      guard let first = try pages.record(at: geometry.firstPage(ofSegment: s))?.header.seq else {
        throw StrataError(.corrupt, "sealed segment \(s) does not start with a record")
      }
      if pinned[s, default: 0] > 0 || retained.contains(where: { $0.overlaps(first..<(e.lastSeq + 1)) }) {
        report.segmentsPinned += 1
        continue
      }
      let u = e.writtenPages == 0 ? 1 : Double(e.livePages) / Double(e.writtenPages)
      guard u <= options.maxLiveRatio else { continue }
      // LFS cost-benefit: space gained times age, over the cost of reading and copying.
      candidates.append((s, (1 - u) * Double(c0.seq - e.lastSeq) / (1 + u)))
    }
    let victims = candidates.sorted { $0.score > $1.score }.prefix(options.maxSegments).map(\.segment).sorted()
    report.logStartSeq = logStart == 0 ? 1 : try checkpointRecord(at: logStart).seq
    guard !victims.isEmpty else { return report }

    // Batch by batch, so that the copies of a batch go into the segments earlier batches freed.
    var freedInPass: [Int] = []
    var done = 0
    for batch in stride(from: 0, to: victims.count, by: Self.compactBatch).map({
      Array(victims[$0..<min($0 + Self.compactBatch, victims.count)])
    }) {
      // Copy forward what the head still needs from the victims.
      let victimSet = Set(batch)
      var catalogPages = false
      for s in batch {
        let moved = try evacuate(segment: s)
        report.blocksCopied += moved.blocks
        report.metadataPagesMoved += moved.metadata
        catalogPages = catalogPages || moved.catalogPages
        done += 1
        progress?(Double(done) / Double(victims.count) * 0.95)
      }
      if catalogPages {
        report.metadataPagesMoved += try catalog.relocate { victimSet.contains(geometry.segment(ofPage: $0)) }
      }
      try checkpoint()  // C1: nothing of the head lies in a victim any more
      let c1 = (page: lastCheckpointPage, seq: lastCheckpointSeq)
      let freed = batch.filter { s in
        usage.entries[s].livePages == 0
          && !usage.pageRefs.contains { !$0.isNull && geometry.segment(ofPage: $0.page) == s }
      }
      guard !freed.isEmpty else { continue }

      // C2 marks them free; the log takes them once C2 is durable (and older reads are done).
      try enableSegmentReuse()
      for s in freed {
        report.bytesReclaimed += UInt64(usage.entries[s].writtenPages) * UInt64(Layout.pageSize)
        usage.markFree(s)
      }
      // The log stays whole from the window's first checkpoint, or from C1 without a window:
      // every victim ends before either, and no tree after them references a victim's page.
      logStart = options.retainFromSeq != nil ? tail.page : c1.page
      try checkpoint()
      reclaim.release(freed)
      freedInPass += freed
      report.segmentsFreed += freed.count
      report.logStartSeq = options.retainFromSeq != nil ? tail.seq : c1.seq
    }

    // Give back the space of free segments beyond the reserve the log will soon take.
    let freedSet = Set(freedInPass)
    for s in usage.freeSegments.dropFirst(options.keepAllocated) where freedSet.contains(s) {
      try storage.punchHole(
        at: Geometry.byteOffset(ofPage: geometry.firstPage(ofSegment: s)), length: UInt64(geometry.segmentSize))
      report.bytesPunched += UInt64(geometry.segmentSize)
    }
    progress?(1)
    return report
  }

  /// Segments evacuated between two checkpoints of a pass.
  static let compactBatch = 16

  /// Pages referenced by the map trees of `bases`, counted per segment.
  private func pinnedPages(bases: [CheckpointBody]) throws -> [Int: Int] {
    var pinned: [Int: Int] = [:]
    var visited = Set<UInt64>()
    func pin(_ page: UInt64, _ n: Int) {
      pinned[geometry.segment(ofPage: page), default: 0] += n
    }
    func walk(_ ref: ChildRef, level: Int, index: UInt64) throws {
      guard !ref.isNull, visited.insert(ref.page).inserted else { return }
      pin(ref.page, 1)
      let node = try pages.load(ref, level: level, index: index)
      for i in 0..<Layout.mapFanout {
        if level == 0 {
          let e = node.entry(i)
          if e.state == .data { pin(e.page, geometry.pagesPerBlock) }
        } else {
          try walk(node.child(i), level: level - 1, index: index << 8 | UInt64(i))
        }
      }
    }
    for body in bases { try walk(body.root, level: Int(body.mapDepth) - 1, index: 0) }
    return pinned
  }

  /// The RESTOREs among the operations in `range`: their base checkpoints and the records
  /// their views replay.
  private func restoreBases(in range: Range<UInt64>, known: inout [UInt64: ChainCheckpoint]) throws
    -> [(page: UInt64, range: Range<UInt64>)]
  {
    writer?.closeRecord()
    // Ranges start at checkpoints; what is left of one after scanning part of it may not.
    guard let start = known.values.filter({ $0.seq <= range.lowerBound }).max(by: { $0.seq < $1.seq }) else {
      throw StrataError(.corrupt, "no checkpoint precedes seq \(range.lowerBound)")
    }
    var out: [(page: UInt64, range: Range<UInt64>)] = []
    var current = try pages.record(at: start.page)
    while let stored = current, stored.header.seq < range.upperBound {
      for (i, op) in stored.record.ops.enumerated() where range.contains(stored.header.seq + UInt64(i)) {
        guard case .restore(let target, let base) = op else { continue }
        guard let based = try pages.record(at: base), case .checkpoint(let body) = based.record.ops.last else {
          throw StrataError(.corrupt, "a RESTORE starts from page \(base), which holds no checkpoint")
        }
        known[base] = ChainCheckpoint(page: base, seq: based.header.seq, body: body)
        out.append((base, based.header.seq..<target))
      }
      current = try pages.next(after: stored)
    }
    return out
  }

  /// Copies the head's live blocks out of `segment` (as ordinary WRITEs) and marks the head's
  /// metadata pages in it for rewriting at the next checkpoint.
  private func evacuate(segment s: Int) throws -> (blocks: Int, metadata: Int, catalogPages: Bool) {
    let ppb = geometry.pagesPerBlock
    let bs = geometry.blockSize
    var blocks = 0
    var metadata = 0
    var catalogPages = false
    var page = geometry.firstPage(ofSegment: s)
    let end = page + UInt64(geometry.pagesPerSegment)
    var buffer = [UInt8]()
    // Blocks past the disk (written before a shrink) are not the head's.
    let diskBlocks = (virtualSize + UInt64(bs) - 1) / UInt64(bs)
    while page < end, let stored = try pages.record(at: page) {
      var payload = stored.payloadPage
      for op in stored.record.ops {
        switch op {
        case .write(let first, let checksums):
          var i = 0
          while i < checksums.count {
            // A run of blocks the head still maps to this very payload.
            var j = i
            while j < checksums.count && first + UInt64(j) < diskBlocks {
              let e = try map.entry(first + UInt64(j))
              guard e.state == .data, e.page == payload + UInt64(j * ppb), e.checksum == checksums[j] else { break }
              j += 1
            }
            if j > i {
              let count = j - i
              if buffer.count < count * bs { buffer = [UInt8](repeating: 0, count: count * bs) }
              try buffer.withUnsafeMutableBytes { raw in
                let run = UnsafeMutableRawBufferPointer(rebasing: raw[..<(count * bs)])
                try pages.readPages(payload + UInt64(i * ppb), count * ppb, into: run)
                for k in 0..<count
                where CRC32C.checksum(UnsafeRawBufferPointer(rebasing: run[(k * bs)..<((k + 1) * bs)]))
                  != checksums[i + k]
                {
                  throw StrataError(
                    .dataCorrupt,
                    "block \(first + UInt64(i + k)) in segment \(s) failed its checksum: the cleaner leaves the segment as it is (run check)"
                  )
                }
                try writeBlocks(first + UInt64(i), UnsafeRawBufferPointer(run), count: count)
              }
              blocks += count
            }
            i = max(j, i + 1)
          }
        case .pages(let descriptors):
          for (k, d) in descriptors.enumerated() {
            let p = payload + UInt64(k)
            switch d.kind {
            case .mapNode:
              if try map.relocateNode(level: Int(d.level), index: d.key, from: p) { metadata += 1 }
            case .usage:
              if d.key < UInt64(usage.pageRefs.count), usage.pageRefs[Int(d.key)].page == p {
                usage.touchPage(Int(d.key))
                metadata += 1
              }
            case .catalogSeqNode, .catalogNameNode, .catalog:
              catalogPages = true
            }
          }
        default:
          break
        }
        payload += UInt64(op.payloadPages(blockSize: bs))
      }
      if case .seal = stored.record.ops.last { break }
      page = stored.endPage
    }
    try checkpointIfDue()
    return (blocks, metadata, catalogPages)
  }

  /// Sets the segment-reuse bit in a superblock that still names the last durable checkpoint,
  /// before the first checkpoint that marks a segment free (as for the catalog tree).
  private func enableSegmentReuse() throws {
    guard superblock.features.incompatible & FeatureSet.segmentReuse == 0 else { return }
    var sb = superblock
    sb.generation += 1
    sb.features.incompatible |= FeatureSet.segmentReuse
    sb.features.autoclear &= FeatureSet.knownAutoclear
    try writeSuperblock(sb)
    try storage.sync()
    superblock = sb
  }
}

/// Ranges sorted and merged where they overlap or touch.
private func merged(_ ranges: [Range<UInt64>]) -> [Range<UInt64>] {
  var out: [Range<UInt64>] = []
  for r in ranges.sorted(by: { $0.lowerBound < $1.lowerBound }) where !r.isEmpty {
    if let last = out.last, r.lowerBound <= last.upperBound {
      out[out.count - 1] = last.lowerBound..<max(last.upperBound, r.upperBound)
    } else {
      out.append(r)
    }
  }
  return out
}

/// The parts of `range` that no range of `covered` (merged) covers.
private func subtract(_ covered: [Range<UInt64>], from range: Range<UInt64>) -> [Range<UInt64>] {
  var out: [Range<UInt64>] = []
  var low = range.lowerBound
  for c in covered where c.upperBound > low && c.lowerBound < range.upperBound {
    if c.lowerBound > low { out.append(low..<c.lowerBound) }
    low = max(low, c.upperBound)
  }
  if low < range.upperBound { out.append(low..<range.upperBound) }
  return out
}
