import CStrataLinux
import StrataFormat

/// How much one cleaning pass may do.
public struct CompactOptions: Sendable {
  /// Most segments freed by one pass (an incremental cleaner takes a few at a time).
  public var maxSegments: Int
  /// Segments fuller than this (live pages / written pages) are not worth copying.
  public var maxLiveRatio: Double
  /// Every point at or after this seq must stay restorable (the continuous-protection
  /// window); nil keeps only the named snapshots. A pass adds the image's CDP window
  /// (`cdpRetainedSeq`), whichever keeps more.
  public var retainFromSeq: UInt64?
  /// Free segments kept allocated for the log to reuse; the rest are punched out of the file.
  public var keepAllocated: Int
  /// Write a checkpoint before choosing victims, so that every sealed segment qualifies;
  /// without it only segments sealed before the last checkpoint do, and a checkpoint is
  /// written only when several segments were sealed since (a background pass saves the sync).
  public var checkpointFirst = true

  public init(maxSegments: Int = .max, maxLiveRatio: Double = 0.9, retainFromSeq: UInt64? = nil, keepAllocated: Int = 0)
  {
    precondition(maxSegments >= 0 && maxLiveRatio >= 0 && keepAllocated >= 0)
    self.maxSegments = maxSegments
    self.maxLiveRatio = maxLiveRatio
    self.retainFromSeq = retainFromSeq
    self.keepAllocated = keepAllocated
  }
}

extension CompactOptions {
  /// Small passes for a served image: a few segments, only those worth copying, a reserve of
  /// free segments kept allocated, no checkpoint of its own before choosing.
  public static var background: CompactOptions {
    var o = CompactOptions(maxSegments: 8, maxLiveRatio: 0.75, keepAllocated: 8)
    o.checkpointFirst = false
    return o
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
    var timestamp: UInt64
    var body: CheckpointBody

    /// The checkpoint record at `page`, or nil when the record there is not one.
    static func read(at page: UInt64, from pages: PageReader) throws -> ChainCheckpoint? {
      guard let stored = try pages.record(at: page), case .checkpoint(let body) = stored.record.ops.last else {
        return nil
      }
      return ChainCheckpoint(
        page: page, seq: stored.header.seq, timestamp: stored.header.timestampNanoseconds, body: body)
    }
  }

  /// The seq of the first record of sealed segment `s`.
  func firstSeq(ofSealed s: Int) throws -> UInt64 {
    let last = usage.entries[s].lastSeq
    precondition(usage.entries[s].isSealed)
    if let cached = firstSeqs[s], cached.lastSeq == last { return cached.firstSeq }
    guard let first = try pages.record(at: geometry.firstPage(ofSegment: s))?.header.seq else {
      throw StrataError(.corrupt, "sealed segment \(s) does not start with a record")
    }
    firstSeqs[s] = (last, first)
    return first
  }

  /// Visits the checkpoints from the last back to the log start, newest first, until `visit`
  /// returns false. A link that does not lead to a checkpoint older than the one holding it
  /// (damage, or a segment the cleaner reused) is corruption: the log before it is out of reach.
  func walkCheckpoints(_ visit: (ChainCheckpoint) throws -> Bool) throws {
    var page = lastCheckpointPage
    var newer = UInt64.max
    while page != 0 {
      guard let c = try ChainCheckpoint.read(at: page, from: pages), c.seq < newer else {
        throw StrataError(.corrupt, "the checkpoint at page \(page) cannot be read: the log before it is out of reach")
      }
      guard try visit(c) else { return }
      newer = c.seq
      // The cleaner may have reclaimed the log before its start.
      page = page == logStart ? 0 : c.body.previousCheckpoint
    }
  }

  /// The checkpoints from the last back to the log start, newest first.
  func checkpointChain() throws -> [ChainCheckpoint] {
    var out: [ChainCheckpoint] = []
    try walkCheckpoints {
      out.append($0)
      return true
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
  /// it only once that checkpoint is durable. A served image runs the same pass in steps
  /// (`CleaningPass`), releasing its lock between them.
  public func compact(_ options: CompactOptions = CompactOptions(), progress: ((Double) -> Void)? = nil) throws
    -> CompactReport
  {
    let pass = try CleaningPass(self, options: options)
    while try pass.step(self) { progress?(pass.progress) }
    progress?(1)
    return pass.report
  }

  /// Segments evacuated between two checkpoints of a pass.
  static let compactBatch = 16

  /// Finds what the head still needs in `segment`: marks its metadata pages there for rewriting
  /// at the next checkpoint and lists its live data blocks, to be read (`readEvacuation`, which
  /// may run outside the image lock) and written again (`finishEvacuation`).
  func planEvacuation(segment s: Int, records: [StoredRecord]? = nil) throws -> Evacuation {
    let ppb = geometry.pagesPerBlock
    let bs = geometry.blockSize
    let plan = Evacuation(segment: s)
    for stored in try records ?? pages.records(inSegment: s) {
      var payload = stored.payloadPage
      for op in stored.record.ops {
        switch op {
        case .write(let first, let checksums):
          var i = 0
          while i < checksums.count {
            let j = i + (try liveRun(from: first + UInt64(i), at: payload + UInt64(i * ppb), checksums[i...]))
            if j > i {
              plan.runs.append(
                Evacuation.Run(
                  first: first + UInt64(i), page: payload + UInt64(i * ppb), checksums: Array(checksums[i..<j]),
                  offset: plan.blocks * bs))
              plan.blocks += j - i
            }
            i = max(j, i + 1)
          }
        case .pages(let descriptors):
          for (k, d) in descriptors.enumerated() {
            let p = payload + UInt64(k)
            switch d.kind {
            case .mapNode:
              if try map.relocateNode(level: Int(d.level), index: d.key, from: p) { plan.metadata += 1 }
            case .usage:
              if d.key < UInt64(usage.pageRefs.count), usage.pageRefs[Int(d.key)].page == p {
                usage.touchPage(Int(d.key))
                plan.metadata += 1
              }
            case .catalogSeqNode, .catalogNameNode, .catalog:
              plan.catalogPages = true
            }
          }
        default:
          break
        }
        payload += UInt64(op.payloadPages(blockSize: bs))
      }
    }
    return plan
  }

  /// Reads the blocks `plan` lists with `read` (page-aligned buffer, byte offset) and verifies
  /// them: a damaged block stops the cleaner rather than being copied forward.
  static func readEvacuation(
    _ plan: Evacuation, geometry g: Geometry, read: (UnsafeMutableRawBufferPointer, UInt64) throws -> Void
  ) throws {
    let bs = g.blockSize
    for run in plan.runs {
      let bytes = UnsafeMutableRawBufferPointer(
        rebasing: plan.data[run.offset..<(run.offset + run.checksums.count * bs)])
      try read(bytes, Geometry.byteOffset(ofPage: run.page))
      for (k, c) in run.checksums.enumerated()
      where CRC32C.checksum(UnsafeRawBufferPointer(rebasing: bytes[(k * bs)..<((k + 1) * bs)])) != c {
        throw StrataError(
          .dataCorrupt,
          "block \(run.first + UInt64(k)) in segment \(plan.segment) failed its checksum: the cleaner leaves the segment as it is (run check)"
        )
      }
    }
  }

  /// How many blocks from `first` on the head still maps, one after another, to the pages from
  /// `page` on with these checksums: a run the cleaner copies as one. Blocks past the disk
  /// (written before a shrink) are not the head's.
  private func liveRun(from first: UInt64, at page: UInt64, _ checksums: ArraySlice<UInt32>) throws -> Int {
    let diskBlocks = (virtualSize + UInt64(geometry.blockSize) - 1) / UInt64(geometry.blockSize)
    var n = 0
    for c in checksums {
      guard first + UInt64(n) < diskBlocks else { break }
      let e = try map.entry(first + UInt64(n))
      guard e.state == .data, e.page == page + UInt64(n * geometry.pagesPerBlock), e.checksum == c else { break }
      n += 1
    }
    return n
  }

  /// Reads the blocks of `plan` through the page reader (under the image lock).
  func readEvacuation(_ plan: Evacuation) throws {
    try Self.readEvacuation(plan, geometry: geometry) { buffer, offset in
      try pages.readPages(offset / UInt64(Layout.pageSize), buffer.count / Layout.pageSize, into: buffer)
    }
  }

  /// Writes again the blocks of `plan` that the head still maps where the plan found them (a
  /// guest may have overwritten some since); returns how many it wrote.
  func finishEvacuation(_ plan: Evacuation) throws -> Int {
    let ppb = geometry.pagesPerBlock
    let bs = geometry.blockSize
    var copied = 0
    for run in plan.runs {
      var i = 0
      while i < run.checksums.count {
        let j = i + (try liveRun(from: run.first + UInt64(i), at: run.page + UInt64(i * ppb), run.checksums[i...]))
        if j > i {
          let bytes = UnsafeRawBufferPointer(rebasing: plan.data[(run.offset + i * bs)..<(run.offset + j * bs)])
          try writeBlocks(run.first + UInt64(i), bytes, count: j - i)
          copied += j - i
        }
        i = max(j, i + 1)
      }
    }
    try checkpointIfDue()
    return copied
  }

}

/// One cleaning pass in steps, each run under the image lock: `init` decides what may be freed,
/// each `step` evacuates one victim segment or frees a batch of evacuated ones. Between steps
/// the image may be used (a served guest keeps writing, snapshots are taken): before a batch
/// is freed, what changed since is checked again (new snapshots' base trees, checkpoints of the
/// protection window, RESTOREs), and a victim something now needs is kept.
public final class CleaningPass {
  public let options: CompactOptions
  public private(set) var report = CompactReport()
  /// Victims in the order they are evacuated; `position` is the next one.
  private var victims: [Int]
  private var position = 0
  /// Evacuated, waiting for the checkpoint that frees them.
  private var batch: [Int] = []
  private var batchHoldsCatalogPages = false
  private var freedInPass: [Int] = []
  private var finished = false
  /// What retained points need, as analysed so far.
  private let pins: Pins
  /// The window's first checkpoint (or C0 without a window): the log start after the pass.
  private let tail: StrataImage.ChainCheckpoint
  /// Changes up to this seq have been taken into account.
  private var validatedThrough: UInt64

  public var progress: Double { victims.isEmpty ? 1 : Double(position) / Double(victims.count) }

  /// Decides the victims, which hold only records before the last checkpoint (C0; written now
  /// with `checkpointFirst`).
  public convenience init(_ image: StrataImage, options: CompactOptions = CompactOptions()) throws {
    let analysis = try Self.analyze(image, options)
    try analysis.pins.walk(bases: analysis.bases)
    try self.init(image, analysis)
  }

  /// A pass on an image other threads use (a served one), started when `due` says so: what
  /// retained points need is found under the image lock, their map trees are walked outside
  /// it (a walk reads every entry of every retained tree: about 0.1 s per 4 GiB of written
  /// disk, which stalled the guest's requests), and the victims are chosen under it again.
  public static func start(
    shared: SharedImage, options: CompactOptions = CompactOptions(), if due: (StrataImage) -> Bool
  ) throws -> CleaningPass? {
    let walkEpochs = ReadEpochs()
    let started = try shared.with { image -> (Analysis, AnyThreadIO?, Geometry, UInt64)? in
      guard due(image) else { return nil }
      let analysis = try analyze(image, options)
      image.reclaim.register(walkEpochs)
      return (analysis, image.storage.anyThreadIO, image.geometry, walkEpochs.begin(image.reclaim.epoch))
    }
    guard let (analysis, io, geometry, epoch) = started else { return nil }
    defer { walkEpochs.end(epoch) }
    if let read = io?.read {
      // Checkpoint trees never change; a segment freed meanwhile (a snapshot deleted, another
      // pass) is not reused while this walk's epoch is open.
      try analysis.pins.walk(bases: analysis.bases, geometry: geometry, read: read)
      return try shared.with { try CleaningPass($0, analysis) }
    }
    return try shared.with { image in
      try analysis.pins.walk(bases: analysis.bases)
      return try CleaningPass(image, analysis)
    }
  }

  /// What retained points need: found under the image lock, their trees walked next.
  private struct Analysis {
    var options: CompactOptions
    var pins: Pins
    var bases: [UInt64]
    var retained: [Range<UInt64>]
    var tail: StrataImage.ChainCheckpoint
    var c0: StrataImage.ChainCheckpoint
  }

  private static func analyze(_ image: StrataImage, _ options: CompactOptions) throws -> Analysis {
    try image.checkWritable()
    var options = options
    // The image's CDP window (format-spec 5.3) keeps the points it protects, whatever is asked.
    if let window = try image.cdpRetainedSeq() {
      options.retainFromSeq = min(options.retainFromSeq ?? window, window)
    }
    // Segments sealed after the last checkpoint cannot be victims: checkpoint when enough are.
    let sealedSince = image.usage.entries.lazy.filter { $0.isSealed && $0.lastSeq > image.lastCheckpointSeq }.count
    if options.checkpointFirst || sealedSince >= min(options.maxSegments, 4) { try image.checkpoint() }
    let chain = try image.checkpointChain()
    guard let c0 = chain.first else { preconditionFailure("an open image has a checkpoint") }
    let pins = Pins(image: image, chain: chain)

    // What retained points need: the records they replay (seq ranges) and the checkpoints
    // they start from. A snapshot replays from its base to itself; the window and recovery
    // need the whole tail; a RESTORE inside any of these needs its own base and range too.
    var bases: [UInt64] = []
    var ranges: [Range<UInt64>] = []
    for (base, snapshots) in try image.catalog.baseRanges() {
      bases.append(base)
      ranges.append(try pins.checkpoint(at: base).seq..<snapshots.last)
    }
    var tail = c0
    if let from = options.retainFromSeq {
      for c in chain {
        bases.append(c.page)
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
        for restore in try pins.restores(in: range) where !bases.contains(restore.base) {
          bases.append(restore.base)
          ranges.append(restore.range)
        }
      }
      scanned = merged(scanned + todo)
    }
    // Read now: a walk outside the lock must not touch the image.
    for base in bases { _ = try pins.checkpoint(at: base) }
    return Analysis(options: options, pins: pins, bases: bases, retained: merged(ranges), tail: tail, c0: c0)
  }

  /// Chooses the victims once the retained trees are walked.
  private init(_ image: StrataImage, _ analysis: Analysis) throws {
    try image.checkWritable()
    guard let writer = image.writer else { throw StrataError(.readOnly, "the image is open read-only") }
    options = analysis.options
    pins = analysis.pins
    tail = analysis.tail
    let (c0, retained) = (analysis.c0, analysis.retained)
    let protected = Set([writer.segment, writer.previousSegment].compactMap { $0 })
    let lowestRetained = retained.first?.lowerBound ?? .max
    var candidates: [(segment: Int, score: Double)] = []
    for (s, e) in image.usage.entries.enumerated() where e.isSealed && e.lastSeq < c0.seq && !protected.contains(s) {
      let u = e.writtenPages == 0 ? 1 : Double(e.livePages) / Double(e.writtenPages)
      var needed = pins.pinned[s, default: 0] > 0
      if !needed && e.lastSeq >= lowestRetained {
        let first = try image.firstSeq(ofSealed: s)
        needed = retained.contains { $0.overlaps(first..<(e.lastSeq + 1)) }
      }
      if needed {
        report.segmentsPinned += 1
        continue
      }
      guard u <= options.maxLiveRatio else { continue }
      // LFS cost-benefit: space gained times age, over the cost of reading and copying.
      candidates.append((s, (1 - u) * Double(c0.seq - e.lastSeq) / (1 + u)))
    }
    victims = candidates.sorted { $0.score > $1.score }.prefix(options.maxSegments).map(\.segment).sorted()
    validatedThrough = c0.seq + 1
    report.logStartSeq = image.logStart == 0 ? 1 : try pins.checkpoint(at: image.logStart).seq
  }

  /// Does the next piece of work; false once the pass is over.
  public func step(_ image: StrataImage) throws -> Bool {
    try image.checkWritable()
    if let plan = try planNext(image) {
      try image.readEvacuation(plan)
      report.blocksCopied += try image.finishEvacuation(plan)
      return true
    }
    if !batch.isEmpty {
      try free(image)
      return true
    }
    guard !finished else { return false }
    finished = true
    // Give back the space of free segments beyond the reserve the log will soon take.
    let freed = Set(freedInPass)
    for s in image.usage.freeSegments.dropFirst(options.keepAllocated) where freed.contains(s) {
      try image.storage.punchHole(
        at: Geometry.byteOffset(ofPage: image.geometry.firstPage(ofSegment: s)),
        length: UInt64(image.geometry.segmentSize))
      report.bytesPunched += UInt64(image.geometry.segmentSize)
    }
    return false
  }

  /// The same step on a served image: the lock is taken for planning and for writing, and the
  /// evacuated blocks are read outside it (the guest's requests run meanwhile).
  public func step(shared: SharedImage) throws -> Bool {
    // The victim's record headers are read before the lock is taken (one read per record: a
    // segment of small records held it for milliseconds, a p99 of 5-6 ms for the guest's
    // writes while the cleaner ran). The victim is sealed and stays until this pass
    // frees it; if the read fails, the plan reads them under the lock as before.
    let (io, geometry) = shared.with { ($0.storage.anyThreadIO, $0.geometry) }
    var records: [StoredRecord]?
    if let read = io?.read, let victim = nextVictim {
      records = try? StoredRecord.records(inSegment: victim, geometry: geometry) { first, count, out in
        try read(out, Geometry.byteOffset(ofPage: first))
      }
    }
    let planned = try shared.with { image -> Evacuation? in try planNext(image, records: records) }
    guard let plan = planned else { return try shared.with { try step($0) } }
    if let read = io?.read {
      // The victim cannot be freed or reused before this pass frees it: no lock needed.
      try StrataImage.readEvacuation(plan, geometry: geometry, read: read)
      report.blocksCopied += try shared.with { try $0.finishEvacuation(plan) }
    } else {
      try shared.with { image in
        try image.readEvacuation(plan)
        report.blocksCopied += try image.finishEvacuation(plan)
      }
    }
    return true
  }

  /// The victim the next step evacuates, if one is due before the batch is freed.
  private var nextVictim: Int? {
    position < victims.count && batch.count < StrataImage.compactBatch ? victims[position] : nil
  }

  /// Plans the evacuation of the next victim, if one is due (under the image lock), from its
  /// `records` when they were read already.
  private func planNext(_ image: StrataImage, records: [StoredRecord]? = nil) throws -> Evacuation? {
    try image.checkWritable()
    guard let victim = nextVictim else { return nil }
    let plan = try image.planEvacuation(segment: victim, records: records)
    plan.allocate(blockSize: image.geometry.blockSize)
    report.metadataPagesMoved += plan.metadata
    batchHoldsCatalogPages = batchHoldsCatalogPages || plan.catalogPages
    batch.append(victims[position])
    position += 1
    return plan
  }

  /// Frees the evacuated batch: C1 (which refers to nothing in it), checks what changed since
  /// the victims were chosen, then C2 marks the batch free.
  private func free(_ image: StrataImage) throws {
    let batch = self.batch
    self.batch = []
    if batchHoldsCatalogPages {
      let victims = Set(batch)
      report.metadataPagesMoved += try image.catalog.relocate {
        victims.contains(image.geometry.segment(ofPage: $0))
      }
      batchHoldsCatalogPages = false
    }
    try image.checkpoint()  // C1
    let c1 = try pins.checkpoint(at: image.lastCheckpointPage)

    // Since the last validation: snapshots start from newer checkpoints, whose trees may still
    // reference a victim evacuated after them; so do the window's new checkpoints. A RESTORE
    // could bring back anything: the pass stops.
    guard try pins.restores(in: validatedThrough..<UInt64.max).isEmpty else {
      victims.removeAll()
      position = 0
      return
    }
    var bases = try image.catalog.entries(after: validatedThrough - 1, limit: .max).map(\.baseCheckpoint)
    if options.retainFromSeq != nil {
      var page = try pins.checkpoint(at: c1.page).body.previousCheckpoint
      while page != 0, page != image.logStart, case let c = try pins.checkpoint(at: page), c.seq >= validatedThrough {
        bases.append(page)
        page = c.body.previousCheckpoint
      }
    }
    try pins.walk(bases: bases)
    validatedThrough = c1.seq + 1

    let freed = batch.filter { s in
      image.usage.entries[s].livePages == 0 && pins.pinned[s, default: 0] == 0
        && !image.usage.pageRefs.contains { !$0.isNull && image.geometry.segment(ofPage: $0.page) == s }
    }
    report.segmentsPinned += batch.count - freed.count
    guard !freed.isEmpty else { return }
    try image.enableIncompatibleFeature(FeatureSet.segmentReuse)
    for s in freed {
      report.bytesReclaimed += UInt64(image.usage.entries[s].writtenPages) * UInt64(Layout.pageSize)
      image.usage.markFree(s)
    }
    // The log stays whole from the window's first checkpoint, or from C1 without a window:
    // every victim ends before either, and no tree after them references a victim's page.
    image.logStart = options.retainFromSeq != nil ? tail.page : c1.page
    try image.checkpoint()  // C2; the log takes the segments once it is durable
    image.reclaim.release(freed)
    freedInPass += freed
    report.segmentsFreed += freed.count
    report.logStartSeq = options.retainFromSeq != nil ? tail.seq : c1.seq
  }
}

/// Pages that retained trees reference, per segment, accumulated over a pass (subtrees shared
/// by several trees are walked once), and the checkpoint records read on the way.
private final class Pins {
  let image: StrataImage
  private(set) var pinned: [Int: Int] = [:]
  private var visited = Set<UInt64>()
  private var walked = Set<UInt64>()
  private var known: [UInt64: StrataImage.ChainCheckpoint]

  init(image: StrataImage, chain: [StrataImage.ChainCheckpoint]) {
    self.image = image
    known = Dictionary(chain.map { ($0.page, $0) }, uniquingKeysWith: { a, _ in a })
  }

  func checkpoint(at page: UInt64) throws -> StrataImage.ChainCheckpoint {
    if let c = known[page] { return c }
    guard let c = try StrataImage.ChainCheckpoint.read(at: page, from: image.pages) else {
      throw StrataError(.corrupt, "a retained point starts from page \(page), which holds no checkpoint")
    }
    known[page] = c
    return c
  }

  /// Adds what the map trees of the checkpoints at `bases` reference (under the image lock).
  func walk(bases: [UInt64]) throws {
    for base in bases { _ = try checkpoint(at: base) }
    try walk(bases: bases, geometry: image.geometry) { try image.pages.load($0, level: $1, index: $2) }
  }

  /// The same from any thread: nodes are read with `read` and checked as the image checks them;
  /// the checkpoints at `bases` must have been read already (`checkpoint(at:)`).
  func walk(
    bases: [UInt64], geometry: Geometry, read: (UnsafeMutableRawBufferPointer, UInt64) throws -> Void
  ) throws {
    try walk(bases: bases, geometry: geometry) { ref, level, index in
      guard ref.page >= geometry.firstDataPage, ref.page <= Layout.maxPageAddress else {
        throw StrataError(.corrupt, "map node (level \(level), index \(index)) points to page \(ref.page)")
      }
      let node = MapNode()
      try read(node.bytes, Geometry.byteOffset(ofPage: ref.page))
      try PageReader.verify(node, ref, level: level, index: index)
      return node
    }
  }

  private func walk(
    bases: [UInt64], geometry g: Geometry, load: (ChildRef, Int, UInt64) throws -> MapNode
  ) throws {
    func pin(_ page: UInt64, _ n: Int) { pinned[g.segment(ofPage: page), default: 0] += n }
    func walk(_ ref: ChildRef, level: Int, index: UInt64) throws {
      guard !ref.isNull, visited.insert(ref.page).inserted else { return }
      pin(ref.page, 1)
      let node = try load(ref, level, index)
      for i in 0..<Layout.mapFanout {
        if level == 0 {
          let e = node.entry(i)
          if e.state == .data { pin(e.page, g.pagesPerBlock) }
        } else {
          try walk(node.child(i), level: level - 1, index: index << 8 | UInt64(i))
        }
      }
    }
    for page in bases where walked.insert(page).inserted {
      guard let body = known[page]?.body else { preconditionFailure("walk of an unread checkpoint") }
      try walk(body.root, level: Int(body.mapDepth) - 1, index: 0)
    }
  }

  /// The RESTOREs among the operations in `range`: their base checkpoints and the records
  /// their views replay. Only the parts of the log the image's `restoreIndex` does not cover
  /// are read, once: what the scan finds is added to the index.
  func restores(in range: Range<UInt64>) throws -> [(base: UInt64, range: Range<UInt64>)] {
    for part in image.restoreIndex.uncovered(range) {
      // Scans start at checkpoints; a part left between covered ranges may not.
      let starts = known.values.filter { $0.seq <= part.lowerBound }
      guard let start = starts.max(by: { $0.seq < $1.seq }) else {
        throw StrataError(.corrupt, "no checkpoint precedes seq \(part.lowerBound)")
      }
      var found: [RestoreIndex.Entry] = []
      var end = start.seq
      var current = try image.pages.record(at: start.page)
      while let stored = current, stored.header.seq < part.upperBound {
        for (i, op) in stored.record.ops.enumerated() {
          guard case .restore(let target, let base) = op else { continue }
          found.append(RestoreIndex.Entry(seq: stored.header.seq + UInt64(i), target: target, base: base))
        }
        end = stored.header.nextSeq
        current = try image.pages.next(after: stored)
      }
      image.restoreIndex.cover(start.seq..<end, found: found)
    }
    return try image.restoreIndex.entries.filter { range.contains($0.seq) }.map {
      ($0.base, try checkpoint(at: $0.base).seq..<$0.target)
    }
  }
}

/// The head's data still in a victim segment, on its way to the log's end.
final class Evacuation {
  struct Run {
    var first: UInt64
    var page: UInt64
    var checksums: [UInt32]
    /// Where the run's bytes go in `data`.
    var offset: Int
  }

  let segment: Int
  var runs: [Run] = []
  var blocks = 0
  var metadata = 0
  var catalogPages = false
  /// The runs' bytes (page aligned, for O_DIRECT reads), allocated by `allocate`.
  private(set) var data = UnsafeMutableRawBufferPointer(start: nil, count: 0)

  init(segment: Int) { self.segment = segment }

  func allocate(blockSize: Int) {
    precondition(data.baseAddress == nil)
    data = .allocate(byteCount: max(blocks * blockSize, Layout.pageSize), alignment: Layout.pageSize)
  }

  deinit { data.deallocate() }
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

/// The RESTORE operations of the log in the seq ranges it covers. Recovery starts it with the
/// log from the checkpoint it replays from on and adds the RESTOREs it replays; new ones are
/// added as they are logged; the cleaner adds older parts of the log as it reads them. A
/// RESTORE describes history, so an entry stays true after the cleaner frees its segment.
struct RestoreIndex {
  struct Entry: Equatable {
    var seq: UInt64
    var target: UInt64
    var base: UInt64
  }

  /// Sorted, disjoint; every RESTORE with a seq inside them is in `entries`.
  private(set) var covered: [Range<UInt64>]
  /// Sorted by seq.
  private(set) var entries: [Entry] = []

  /// Covers the log from `seq` on (nothing for `.max`).
  init(coveringFrom seq: UInt64) { covered = seq == .max ? [] : [seq..<UInt64.max] }

  func covers(_ seq: UInt64) -> Bool { covered.contains { $0.contains(seq) } }

  /// A RESTORE recovery replays or the image logs: in the covered tail, after every other.
  mutating func add(_ entry: Entry) {
    precondition(covered.last?.upperBound == .max && covered.last!.contains(entry.seq), "a RESTORE outside the tail")
    precondition(entry.seq > entries.last?.seq ?? 0, "RESTOREs are added in log order")
    entries.append(entry)
  }

  func uncovered(_ range: Range<UInt64>) -> [Range<UInt64>] { subtract(covered, from: range) }

  /// Adds what a scan of `range` found.
  mutating func cover(_ range: Range<UInt64>, found: [Entry]) {
    let new = found.filter { range.contains($0.seq) && !covers($0.seq) }
    covered = merged(covered + [range])
    if !new.isEmpty { entries = (entries + new).sorted { $0.seq < $1.seq } }
  }
}
