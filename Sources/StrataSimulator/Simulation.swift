@_spi(Simulation) import StrataCore
import StrataFormat
import StrataSimulation

#if canImport(Glibc)
  import Glibc
#endif

/// What a simulated run does: how big, how long, and which faults it meets.
public struct SimulationConfig: Sendable {
  public var virtualSize: UInt64 = (6 << 20) + 3584
  public var operations = 1000
  /// Log segment size; nil: 1 MiB for odd seeds (seals all the time), 4 MiB for even ones
  /// (the log also writes out asynchronously in the middle of a segment).
  public var segmentSize: Int?
  /// Read every block after each crash (small disks) or only the tracked ones and data extents.
  public var fullScan = true
  /// Per operation: chance of a power loss right after it.
  public var crashChance = 0.02
  /// Per operation: chance that the power fails after a few more writes and syncs (inside a
  /// later operation: a write-out, a checkpoint, a superblock update).
  public var powerFailChance = 0.02
  /// What a power loss keeps of the unsynced writes; crashes cycle through these.
  public var crashModes: [SimulatedStorage.CrashMode] = SimulatedStorage.CrashMode.all
  /// Per operation: chance that an I/O error is armed on one of `faultOperations`.
  public var faultChance = 0.01
  public var faultOperations: [SimulatedStorage.Operation] = [.read, .write, .sync, .preallocate]
  public var faultErrnos: [Int32] = [EIO, ENOSPC]
  /// Offsets spread over the whole disk instead of a few hot zones (for huge disks).
  public var spread = false
  public var maxSnapshots = 4

  public init() {}
}

/// What a run did. `digest` fingerprints the final file: the same seed gives the same digest.
public struct SimulationStats: Sendable, Equatable {
  public var operations = 0
  /// Power losses, each followed by recovery and a full check against the model.
  public var crashPoints = 0
  /// Of which the power failed inside an operation (not between two).
  public var midOperationCrashes = 0
  /// Storage operations failed by an injected EIO or ENOSPC.
  public var faultsInjected = 0
  /// Image calls that reported an injected fault.
  public var failedCalls = 0
  /// Times the image refused to go on after a fault until it was reopened.
  public var refusals = 0
  /// Clean closes and reopens.
  public var reopens = 0
  public var flushes = 0
  public var snapshotsCreated = 0
  public var restores = 0
  /// Of which to a flush point (`restore(toSeq:)`).
  public var pointRestores = 0
  /// Flushes that went through group commit (`SharedImage.durably`), of `flushes`.
  public var groupCommits = 0
  /// Writes handed to the file outside the image lock (`SharedImage.writeOutLog`).
  public var writeOuts = 0
  /// External clones made (each a child on real files with its own workload), and the crashes
  /// they went through.
  public var clones = 0
  public var cloneCrashes = 0
  /// Cleaner passes completed (`compact`), and the segments they freed.
  public var compactions = 0
  public var segmentsFreed = 0
  public var digest: UInt32 = 0

  public init() {}

  public static func += (a: inout SimulationStats, b: SimulationStats) {
    a.operations += b.operations
    a.crashPoints += b.crashPoints
    a.midOperationCrashes += b.midOperationCrashes
    a.faultsInjected += b.faultsInjected
    a.failedCalls += b.failedCalls
    a.refusals += b.refusals
    a.reopens += b.reopens
    a.flushes += b.flushes
    a.snapshotsCreated += b.snapshotsCreated
    a.restores += b.restores
    a.pointRestores += b.pointRestores
    a.groupCommits += b.groupCommits
    a.writeOuts += b.writeOuts
    a.clones += b.clones
    a.cloneCrashes += b.cloneCrashes
    a.compactions += b.compactions
    a.segmentsFreed += b.segmentsFreed
    a.digest = CRC32C.checksum([a.digest, b.digest].flatMap { withUnsafeBytes(of: $0) { Array($0) } })
  }
}

/// One seeded run of the random workload over fault-injecting storage: writes, reads,
/// discards, write-zeroes, flushes (also through group commit), snapshots (create, delete, view
/// reads, restore), reads at and restores to past flush points, resizes, reopens, external
/// clones and cleaner passes (`OpKind`); power losses between and inside operations; EIO and ENOSPC on reads,
/// writes, syncs and preallocation. Every invariant is checked as the run goes; the first violation
/// throws a `SimulationFailure` naming the seed and the operation.
///
/// After a power loss the image must open and hold what every flushed write put there (an
/// unflushed change: old or new content per block, never anything else), its snapshots must
/// match the model, its accounting must match a recount and `check` must be clean.
/// A call that meets an I/O error must fail with a clear error (io or noSpace, the errno, the
/// system call that failed); the image then holds, per block, old or new content; once the
/// fault clears a flush must succeed (or the image refuses until reopened, and then opens with
/// everything flushed before), and `check` must be clean.
public final class Simulation {
  public let seed: UInt64
  public let config: SimulationConfig
  public let log: RunLog
  /// What the run did so far (all of it once `run` returned).
  public var stats: SimulationStats {
    var s = counts
    s.faultsInjected = storage.counters.faultsHit
    return s
  }
  var counts = SimulationStats()

  var rng: SeededRandom
  var work: Workload
  let options: ImageOptions
  let storage: SimulatedStorage
  var image: StrataImage?
  var model: CrashModel
  var nextSnapshot = 0
  /// An injected fault was reported since the image was opened: a refusal is allowed.
  var faultSinceOpen = false
  /// Injected faults hit up to the last successful flush, open or crash: a failure is an
  /// injected one if a fault hit since (a write's failure surfaces when it completes, in a
  /// later call, but never after a flush that returned).
  var faultsSettled = 0
  /// The last operation ended with a checkpoint when one was due.
  var checkpointDue = false
  /// What a crash during the current call may leave instead of `model` (see `crash`).
  var crashAlternatives: [CrashModel] = []
  /// Fingerprints of the clones' files (part of the run's digest).
  var cloneDigest: UInt32 = 0
  /// Recent flush points (`strata timeline`): the seq a view at that point takes and the disk
  /// it must show. Durable once recorded, so crashes never take them away.
  var flushPoints: [(seq: UInt64, disk: DiskModel)] = []

  public init(seed: UInt64, config: SimulationConfig) {
    self.seed = seed
    self.config = config
    log = RunLog("strata-sim", seed: seed)
    rng = SeededRandom(seed: seed)
    work = Workload(rng: rng.split())
    var options = stressOptions(clock: SimulatedClock())
    options.segmentSize = config.segmentSize ?? (seed % 2 == 0 ? 4 << 20 : Layout.minSegmentSize)
    // With larger segments, checkpoint less often too, so that the log writes out
    // (asynchronously) between checkpoints.
    if options.segmentSize > Layout.minSegmentSize { options.checkpointIntervalPages = 1024 }
    self.options = options
    storage = SimulatedStorage(seed: rng.next())
    storage.failedSyncDropsUnsynced = rng.bool()
    model = CrashModel(size: config.virtualSize)
  }

  deinit { image?.abandon() }

  /// Runs every operation, then a final flush and crash; throws the first violation.
  @discardableResult
  public func run() throws -> SimulationStats {
    image = try log.run("create") {
      try StrataImage.create(storage: storage, virtualSize: config.virtualSize, options: options)
    }
    for i in 0..<config.operations {
      log.index = i
      counts.operations += 1
      if rng.chance(config.faultChance) { armFault() }
      try step()
      try checkBounds()
      // Crash points: now, or after a few more writes and syncs (inside a later operation).
      if !storage.isPoweredOff && rng.chance(config.crashChance) {
        try crash("between operations")
      } else if rng.chance(config.powerFailChance) {
        let after = rng.chance(0.7) ? rng.int(in: 0...3) : rng.int(in: 4...40)
        log.note("power fails after \(after) more writes/syncs")
        storage.powerFail(after: after)
      }
    }
    log.index = config.operations
    storage.cancelPowerFail()
    storage.clearFaults()
    if storage.isPoweredOff { try crash("power was off at the end") }
    log.note("final flush and crash")
    // A write whose injected failure has not surfaced yet fails this flush (found by seed 21294):
    // that is reported and recovered from like any other fault.
    if try attempt("final flush", { try self.current.flush() }) == .done { markFlushed() }
    try crash("final")
    try log.run("close") { try current.close() }
    image = nil
    counts.digest = CRC32C.checksum(storage.durable + withUnsafeBytes(of: cloneDigest.littleEndian) { Array($0) })
    return stats
  }

  /// A flush (or close) returned: everything so far is durable, and every fault hit before it
  /// has been reported.
  func markFlushed() {
    model.markDurable()
    faultsSettled = storage.counters.faultsHit
  }

  var current: StrataImage {
    guard let image else { preconditionFailure("no image open") }
    return image
  }

  // MARK: Operations

  func step() throws {
    checkpointDue = false
    // Calls go through `current`: a crash or a reopen inside an operation replaces the image.
    switch OpKind.pick(rng.int(in: 0..<OpKind.totalWeight)) {
    case .write:
      let (offset, count) = range(length: work.length())
      let data = work.data(count: count, at: offset)
      try mutate("write \(offset)+\(count)", blocks: DiskModel.blocks(offset, UInt64(count))) {
        $0.write(data, at: offset)
      } call: {
        try self.current.write(data, at: offset)
      }
    case .read:  // compared with the head
      let (offset, count) = range(length: work.length())
      try read("read \(offset)+\(count)", model.head, offset, count) {
        try self.current.read(at: offset, count: count)
      }
    case .discard:
      let (offset, count) = range(length: work.length(max: 1 << 20))
      try mutate("discard \(offset)+\(count)", blocks: DiskModel.blocks(offset, UInt64(count))) {
        $0.discard(at: offset, length: UInt64(count))
      } call: {
        try self.current.discard(at: offset, length: UInt64(count))
      }
    case .writeZeroes:
      let (offset, count) = range(length: work.length(max: 1 << 20))
      try mutate("writeZeroes \(offset)+\(count)", blocks: DiskModel.blocks(offset, UInt64(count))) {
        $0.zero(at: offset, length: UInt64(count))
      } call: {
        try self.current.writeZeroes(at: offset, length: UInt64(count))
      }
    case .flush:
      log.note("flush")
      if try attempt("flush", { try self.current.flush() }) == .done {
        markFlushed()
        counts.flushes += 1
        recordFlushPoint()
      }
    case .groupCommit:
      try groupCommit()
    case .writeOut:
      try writeOut()
    case .snapshot:  // deleting one first when there are enough
      if model.snapshots.count >= config.maxSnapshots, let victim = rng.element(of: model.order) {
        try deleteSnapshot(victim)
      }
      let name = newSnapshotName()
      log.note("create snapshot \(name)")
      model.createSnapshot(name)
      if try attempt("createSnapshot \(name)", { try self.current.createSnapshot(name: name) }) == .done {
        counts.snapshotsCreated += 1
      }
    case .deleteSnapshot:
      guard let victim = rng.element(of: model.order) else { return }
      try deleteSnapshot(victim)
    case .snapshotRead:
      guard let name = rng.element(of: model.order), let frozen = model.snapshots[name] else { return }
      let (offset, count) = work.range(size: frozen.size, length: work.length())
      try read("view \(name) read \(offset)+\(count)", frozen, offset, count) {
        try self.current.snapshotView(name: name).read(at: offset, count: count)
      }
    case .restoreSnapshot:
      guard let name = rng.element(of: model.order), let frozen = model.snapshots[name] else { return }
      try restore("restore \(name)", to: frozen) { try self.current.restore(snapshot: name) }
    case .restorePoint:
      try restoreToFlushPoint()
    case .resize:
      // A resize ends with a checkpoint, which flushes the log: durable once it returns.
      let step = UInt64(rng.int(in: 1...2048)) * 512
      let size = model.head.size
      let newSize = rng.chance(0.7) || step >= size ? size + step : size - step
      if try mutate(
        "resize \(size) -> \(newSize)", blocks: nil, model: { $0.resize(to: newSize) },
        call: { try self.current.resize(to: newSize, allowShrink: true) }) == .done
      {
        markFlushed()
        recordFlushPoint()
      }
    case .reopen:  // close and reopen cleanly (a close makes everything durable)
      log.note("close and reopen")
      let outcome = try attempt("close", { try self.current.close() }) { _ in
        try self.reopen(after: "a failed close", closed: true)
      }
      guard outcome == .done else { return }
      if storage.isPoweredOff {
        // Nothing was left to write, but the power is off: it comes back after a crash.
        try crash("power off at close")
        return
      }
      markFlushed()
      counts.reopens += 1
      storage.reopen()
      image = try open("reopen")
      faultSinceOpen = false
      try withoutFaults { try checkAccounting(current, log) }
    case .pointRead:  // the disk as it was at a past flush point (point-in-time view)
      guard let point = rng.element(of: flushPoints) else { return }
      let (offset, count) = work.range(size: point.disk.size, length: work.length())
      try read("view at seq \(point.seq) read \(offset)+\(count)", point.disk, offset, count) {
        try self.current.view(atSeq: point.seq).read(at: offset, count: count)
      }
    case .clone:
      try cloneSession()
    case .compact:
      try compactPass()
    case .recount:  // the accounting, now and then
      guard !storage.isPoweredOff else {
        // The power failed at the end of the last operation: the recount would meet it.
        try crash("power failed after the last operation")
        return
      }
      log.note("recount")
      try withoutFaults { try checkAccounting(current, log) }
    }
  }

  func newSnapshotName() -> String {
    nextSnapshot += 1
    return "s\(nextSnapshot)"
  }

  /// A flush (or an operation that ends with one) returned: the disk now is what a view at the
  /// next seq must show, after any crash (bounded: the last `keptFlushPoints`).
  func recordFlushPoint() {
    guard let seq = try? current.info.nextSeq else { return }
    log.note("flush point \(seq)")
    flushPoints.append((seq, model.head))
    if flushPoints.count > Self.keptFlushPoints { flushPoints.removeFirst() }
  }

  /// Model states kept for flush points (each a copy-on-write `DiskModel`).
  static let keptFlushPoints = 8

  func range(length: Int) -> (UInt64, Int) {
    if config.spread && rng.chance(0.7) {
      let count = min(length, Int(min(model.head.size, 1 << 20)))
      return (rng.uint64(in: 0...(model.head.size - UInt64(count))), count)
    }
    return work.range(size: model.head.size, length: length)
  }

  func deleteSnapshot(_ name: String) throws {
    log.note("delete snapshot \(name)")
    model.deleteSnapshot(name)
    _ = try attempt("deleteSnapshot \(name)") { try self.current.deleteSnapshot(name: name) }
  }

  /// A change: applied to the model first (the image may have applied it even if the call
  /// fails), then to the image.
  @discardableResult
  func mutate(
    _ what: String, blocks: Range<UInt64>?, model change: (inout DiskModel) -> Void, call: () throws -> Void
  ) throws -> Outcome {
    log.note(what)
    model.change(blocks: blocks, change)
    let outcome = try attempt(what, call)
    // Every change ends with a checkpoint when one is due.
    checkpointDue = outcome == .done
    return outcome
  }

  /// A read of the head or a view, compared with `want`; after an injected fault, the read is
  /// retried once the fault cleared and must then succeed.
  func read(_ what: String, _ want: DiskModel, _ offset: UInt64, _ count: Int, _ body: () throws -> [UInt8])
    throws
  {
    log.note(what)
    var got: [UInt8] = []
    var outcome = try attempt(what) { got = try body() }
    if outcome == .failed {
      outcome = try attempt("\(what) after the fault cleared") { got = try body() }
      try log.check(outcome != .failed, "\(what) still fails after the fault cleared")
    }
    if outcome == .done {
      let expected = want.read(offset, count)
      try log.check(sameBytes(got, expected), "\(what): \(firstDifference(got, expected))")
    }
  }

  // MARK: Faults, crashes and reopens

  enum Outcome: Equatable {
    case done
    /// The power failed during the call: the storage crashed and the image was recovered.
    case crashed
    /// The call reported an injected I/O error; the model now holds what the image showed
    /// afterwards, and the fault is cleared.
    case failed
  }

  /// Runs a call against the image. A power loss in it leads to a crash; an injected I/O error
  /// is checked for clarity and followed by recovery from it; anything else is a failure.
  func attempt(
    _ what: String, _ body: () throws -> Void, afterFault: ((_ refused: Bool) throws -> Void)? = nil
  ) throws -> Outcome {
    let readFaults = storage.counters.readFaultsHit
    do {
      try body()
      // A read fails in the call that made it: one that succeeded swallowed the error (as
      // dropping a map subtree once did, seed 31073).
      try log.check(
        storage.counters.readFaultsHit == readFaults, "\(what) succeeded although a read in it failed (injected)")
      return .done
    } catch let e as SimulationFailure {
      throw e
    } catch  where storage.isPoweredOff {
      try crash("power failed during \(what)")
      return .crashed
    } catch let e as StrataError where storage.counters.faultsHit > faultsSettled || isRefusal(e) {
      log.note("\(what) failed: \(e)")
      counts.failedCalls += 1
      try checkReported(e, what)
      faultSinceOpen = true
      crashAlternatives = []  // the model now follows what the image shows
      if let afterFault {
        try afterFault(isRefusal(e))
      } else {
        try recoverFromFault(after: what, refused: isRefusal(e))
      }
      return .failed
    } catch {
      throw log.fail("\(what) threw \(error)")
    }
  }

  /// The image refuses further work until it is reopened (after a failure it cannot retry).
  func isRefusal(_ e: StrataError) -> Bool {
    e.code == .io && e.message.contains("must be reopened")
  }

  /// An I/O error must say what failed: the code matches the errno, and the message names the
  /// system call (or, for a refusal, that the image must be reopened).
  func checkReported(_ e: StrataError, _ what: String) throws {
    if isRefusal(e) {
      try log.check(faultSinceOpen || e.errno == nil, "\(what): refused without an earlier fault: \(e)")
      return
    }
    guard let errno = e.errno, config.faultErrnos.contains(errno) else {
      throw log.fail("\(what) failed without the injected errno: \(e)")
    }
    try log.check(e.code == (errno == ENOSPC ? .noSpace : .io), "\(what): errno \(errno) reported as \(e.code): \(e)")
    let calls = SimulatedStorage.Operation.allCases.map(\.description)
    try log.check(calls.contains { e.message.contains($0) }, "\(what): the error does not name the call: \(e)")
  }

  /// After an injected fault: the fault clears, the image shows old or new content per block;
  /// a flush must then succeed and `check` be clean, unless the image refuses until reopened.
  func recoverFromFault(after what: String, refused: Bool) throws {
    storage.clearFaults()
    storage.cancelPowerFail()
    let image = current
    let seen = try observe(image, model, log, fullScan: config.fullScan, what: "after \(what) failed")
    model.adopt(seen)
    // A flush must now succeed, once the failures of earlier writes that surface in it (a few
    // at most) are reported.
    var tries = 0
    while !refused {
      tries += 1
      do {
        try image.flush()
        markFlushed()
        counts.flushes += 1
        try checkClean(image, log, what: "after \(what) failed and a flush")
        return
      } catch let e as StrataError where isRefusal(e) {
        log.note("flush after the fault refused: \(e)")
        break
      } catch let e as StrataError where storage.counters.faultsHit > faultsSettled && tries < 4 {
        log.note("flush after \(what) failed: \(e)")
        counts.failedCalls += 1
        try checkReported(e, "flush after \(what)")
      } catch let e as SimulationFailure {
        throw e
      } catch {
        throw log.fail("flush after \(what) failed and the fault cleared threw \(error)")
      }
    }
    counts.refusals += 1
    try reopen(after: "a refusal", closed: false)
  }

  /// Closes (if not closed yet) and opens the image again without a power loss: unsynced
  /// writes stay in the file's cache, so the image holds the flushed state or newer.
  ///
  /// Not when a failed sync may have dropped dirty pages while keeping them in the cache
  /// (`failedSyncDropsUnsynced`, Linux buffered I/O): a new session would build on a log tail
  /// that never reaches the disk. No open can tell (PostgreSQL's "fsyncgate"); Strata avoids
  /// the page cache with O_DIRECT, and the simulator restarts from what is durable instead.
  func reopen(after why: String, closed: Bool) throws {
    storage.clearFaults()
    if storage.failedSyncDropsUnsynced {
      try crash("restart after \(why)")
      return
    }
    log.note("reopen after \(why)")
    if !closed {
      // A refusing image cannot checkpoint; close still releases the storage.
      if let e = failure(of: { try current.close() }) as? StrataError, !isRefusal(e) {
        throw log.fail("close after \(why) threw \(e)")
      }
    }
    storage.reopen()
    counts.reopens += 1
    let image = try open("open after \(why)")
    self.image = image
    faultSinceOpen = false
    try log.check(image.recoveryProblems.isEmpty, "reopen after \(why): recovery problems \(image.recoveryProblems)")
    model.adopt(try observe(image, model, log, fullScan: config.fullScan, what: "reopen after \(why)"))
    try checkClean(image, log, what: "reopen after \(why)")
  }

  /// Opens the image again; an open that meets an armed fault must fail clearly, and succeed
  /// once the fault cleared.
  func open(_ what: String) throws -> StrataImage {
    do {
      return try StrataImage.open(storage: storage, options: options)
    } catch let e as StrataError where storage.counters.faultsHit > faultsSettled {
      log.note("\(what) failed: \(e)")
      counts.failedCalls += 1
      try checkReported(e, what)
      storage.clearFaults()
      return try log.run("\(what) after the fault cleared") { try StrataImage.open(storage: storage, options: options) }
    } catch {
      throw log.fail("\(what) threw \(error)")
    }
  }

  /// Power loss: crash the storage, reopen, verify, continue from what survived.
  ///
  /// The recovered image must match `model`, or one of `crashAlternatives` (set around a call
  /// that is atomic across crashes, such as a restore: either it is in the durable log and the
  /// head is exactly its result, or it is not and the head is what it was before). Then a few
  /// retained flush points must still read as they did (`view(atSeq:)`).
  func crash(_ reason: String) throws {
    let mode = config.crashModes[counts.crashPoints % config.crashModes.count]
    counts.crashPoints += 1
    if reason.hasPrefix("power failed") { counts.midOperationCrashes += 1 }
    let unsynced = storage.unsyncedWrites
    let survived = storage.crash(mode: mode)
    faultsSettled = storage.counters.faultsHit  // failed writes still in flight are gone
    log.note("crash (\(reason)) mode \(mode): \(survived) of \(unsynced) unsynced writes survived")
    current.abandon()  // closed already, or lost with the power
    let models = crashAlternatives.isEmpty ? [model] : crashAlternatives
    crashAlternatives = []
    let what = "crash \(counts.crashPoints) (\(mode))"
    let (reopened, recovered) = try openAndVerify(storage, options, models, log, fullScan: config.fullScan, what: what)
    image = reopened
    model = recovered
    faultSinceOpen = false
    try checkFlushPoints(what)
  }

  /// Runs a check of the simulator's own past armed faults (they stay armed for the workload).
  func withoutFaults(_ body: () throws -> Void) throws {
    let armed = storage.faults
    storage.faults = []
    defer { storage.faults = armed }
    try body()
  }

  func armFault() {
    guard let op = rng.element(of: config.faultOperations), let e = rng.element(of: config.faultErrnos) else { return }
    let skip = rng.int(in: 0...3)
    let partial: SimulatedStorage.PartialWrite = rng.bool() ? .prefix(granularity: rng.bool() ? 1 : 512) : .none
    log.note("arm \(op) \(e == ENOSPC ? "ENOSPC" : "EIO") after \(skip) more")
    storage.failNext(op, errno: e, skip: skip, partial: partial)
  }

  /// Invariants that hold after every operation.
  func checkBounds() throws {
    let image = current
    try log.check(storage.violations.isEmpty, "storage contract broken: \(storage.violations)")
    // Bounded metadata memory, whatever the disk size.
    try log.check(
      image.cachedMapNodes <= options.mapCacheNodes,
      "node cache holds \(image.cachedMapNodes) nodes, capacity \(options.mapCacheNodes)")
    // Recovery replays up to two checkpoint intervals (when the newest checkpoint was lost)
    // without checkpointing; the next change checkpoints.
    let dirtyLimit = checkpointDue ? options.maxDirtyNodes : 4 * options.maxDirtyNodes
    try log.check(
      image.dirtyMapNodes <= dirtyLimit,
      "\(image.dirtyMapNodes) dirty map nodes, limit \(dirtyLimit) (checkpoint due at \(options.maxDirtyNodes))")
  }
}

/// The error `body` throws, or nil.
public func failure(of body: () throws -> Void) -> Error? {
  do {
    try body()
    return nil
  } catch {
    return error
  }
}
