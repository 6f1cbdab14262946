import StrataFormat
import StrataSimulation
import Testing

@testable import StrataCore

#if canImport(Glibc)
  import Glibc
#endif

// Crash tests on SimulatedStorage. A seeded workload runs with flushes; at random points the
// power fails (between operations, or in the middle of one: during a write-out, a checkpoint, a
// superblock update) and the storage keeps what the crash mode allows of the unsynced writes.
// The image must then open, and:
//   - every block reads its content as of the last completed flush, or one of the contents it
//     had since (never anything else: no garbage, no older data, no data of another block);
//   - the size and the snapshots are ones that existed since the last flush, and every
//     snapshot view reads exactly what the head held when it was taken;
//   - the accounting matches a recount, and `check` finds no errors;
//   - it keeps working: the next round writes, flushes and crashes again.

// MARK: - The crash model

/// What the image may hold after a crash: the state at the last completed flush plus, per
/// block, every content the block had since.
struct CrashModel {
  /// What the image shows now.
  var head: DiskModel
  /// The head when the last flush returned.
  var flushed: DiskModel
  /// Per block changed since the last flush: every content it had since, the flushed one first.
  var candidates: [UInt64: [[UInt8]?]] = [:]
  /// Sizes the disk had since the last flush.
  var sizes: Set<UInt64>
  /// Snapshots of the head now, with their frozen contents.
  var snapshots: [String: DiskModel] = [:]
  var order: [String] = []
  /// Snapshots that existed at the last flush and were not deleted since: they must survive.
  var mustExist: Set<String> = []
  /// Snapshots created or deleted since the last flush: they may or may not survive.
  var mayExist: [String: DiskModel] = [:]

  init(size: UInt64) {
    head = DiskModel(size: size)
    flushed = head
    sizes = [size]
  }

  func allowed(_ b: UInt64) -> [[UInt8]?] { candidates[b] ?? [flushed.block(b)] }

  /// Applies a change to the head and remembers the new contents of the blocks it changed
  /// (within `blocks`, or anywhere when nil).
  mutating func change(blocks: Range<UInt64>? = nil, _ body: (inout DiskModel) -> Void) {
    let old = head
    body(&head)
    sizes.insert(head.size)
    let keys: Set<UInt64>
    if let blocks {
      keys = Set(old.keys(in: blocks)).union(head.keys(in: blocks))
    } else {
      keys = Set(old.storedBlocks).union(head.storedBlocks)
    }
    for b in keys where !sameContent(old.block(b), head.block(b)) { addCandidate(b, head.block(b)) }
  }

  mutating func addCandidate(_ b: UInt64, _ content: [UInt8]?) {
    var list = candidates[b] ?? [flushed.block(b)]
    if !list.contains(where: { sameContent($0, content) }) { list.append(content) }
    candidates[b] = list
  }

  /// A flush returned: everything so far survives any crash.
  mutating func markDurable() {
    flushed = head
    candidates = [:]
    sizes = [head.size]
    mustExist = Set(snapshots.keys)
    mayExist = [:]
  }

  mutating func createSnapshot(_ name: String) {
    snapshots[name] = head
    order.append(name)
    mayExist[name] = head
  }

  mutating func deleteSnapshot(_ name: String) {
    guard let frozen = snapshots.removeValue(forKey: name) else { return }
    order.removeAll { $0 == name }
    mustExist.remove(name)
    mayExist[name] = frozen
  }

  /// Every block that holds, held or may hold data.
  var trackedBlocks: Set<UInt64> {
    Set(flushed.storedBlocks).union(candidates.keys).union(head.storedBlocks)
  }
}

func sameContent(_ a: [UInt8]?, _ b: [UInt8]?) -> Bool {
  switch (a, b) {
  case (nil, nil): true
  case (nil, let x?), (let x?, nil): allZero(x)
  case (let x?, let y?): sameBytes(x, y)
  }
}

/// Whether `got` (the first `got.count` bytes of a block) is `content` (nil: zeros).
func blockMatches(_ got: [UInt8], _ content: [UInt8]?) -> Bool {
  guard let content else { return allZero(got) }
  return sameBytes(got[...], content[..<got.count])
}

func fingerprint(_ bytes: [UInt8]?) -> String {
  guard let bytes, !allZero(bytes) else { return "zeros" }
  let head = bytes.prefix(8).map { String($0, radix: 16) }.joined(separator: " ")
  return "[\(head) …] crc \(String(CRC32C.checksum(bytes), radix: 16))"
}

/// The error `body` throws, or nil.
func failure(of body: () throws -> Void) -> Error? {
  do {
    try body()
    return nil
  } catch {
    return error
  }
}

// MARK: - Recovery check

/// Opens the image after a crash and checks it against the model; returns the image and the
/// model of what it now holds (durable, since the crash left nothing unsynced).
func openAndVerify(
  _ storage: SimulatedStorage, _ options: ImageOptions, _ model: CrashModel, _ log: RunLog, fullScan: Bool,
  what: String
) throws -> (StrataImage, CrashModel) {
  let image = try log.run("open after \(what)") { try StrataImage.open(storage: storage, options: options) }
  do {
    let recovered = try verifyRecovered(image, model, log, fullScan: fullScan, what: what)
    return (image, recovered)
  } catch {
    image.abandon()
    throw error
  }
}

func verifyRecovered(_ image: StrataImage, _ model: CrashModel, _ log: RunLog, fullScan: Bool, what: String) throws
  -> CrashModel
{
  let bs = DiskModel.bs
  try log.check(image.recoveryProblems.isEmpty, "\(what): recovery reports problems: \(image.recoveryProblems)")
  let size = image.size
  try log.check(model.sizes.contains(size), "\(what): size \(size) is none of \(model.sizes.sorted())")
  let blockCount = (size + bs - 1) / bs
  let tracked = model.trackedBlocks
  var toCheck = fullScan ? Set(0..<blockCount) : tracked.filter { $0 < blockCount }
  // Data the model does not know about must read as zeros (it cannot be data, but look).
  let extents = try log.run("\(what): extents") { try image.extents() }
  var extra = 0
  for e in extents where e.state == .data {
    for b in (e.offset / bs)..<((e.offset + e.length + bs - 1) / bs) where !tracked.contains(b) {
      toCheck.insert(b)
      extra += 1
      if extra > 4096 { break }
    }
  }
  var recovered = CrashModel(size: size)
  for b in toCheck.sorted() {
    let n = Int(min(bs, size - b * bs))
    let got = try log.run("\(what): read block \(b)") { try image.read(at: b * bs, count: n) }
    let allowed = model.allowed(b)
    if !allowed.contains(where: { blockMatches(got, $0) }) {
      throw log.fail(
        "\(what): block \(b) reads \(fingerprint(got)); allowed: flushed \(fingerprint(allowed[0]))"
          + (allowed.count > 1 ? ", then " + allowed.dropFirst().map(fingerprint).joined(separator: ", ") : ""))
    }
    if !allZero(got) { recovered.head.set(b, got + [UInt8](repeating: 0, count: DiskModel.blockSize - n)) }
  }

  // Snapshots: the durable ones survive; every survivor is frozen at its creation.
  let names = try image.snapshots.map(\.name)
  for name in model.mustExist {
    try log.check(names.contains(name), "\(what): snapshot \(name) was flushed but is gone (have \(names))")
  }
  for name in names {
    guard let frozen = model.snapshots[name] ?? model.mayExist[name] else {
      throw log.fail("\(what): snapshot \(name) should not exist (have \(names))")
    }
    let view = try log.run("\(what): snapshotView \(name)") { try image.snapshotView(name: name) }
    try log.check(view.size == frozen.size, "\(what): view \(name) has size \(view.size), expected \(frozen.size)")
    let viewBlocks = (frozen.size + bs - 1) / bs
    let blocks = fullScan ? Set(0..<viewBlocks) : tracked.union(frozen.storedBlocks).filter { $0 < viewBlocks }
    for b in blocks.sorted() {
      let n = Int(min(bs, frozen.size - b * bs))
      let got = try log.run("\(what): view \(name) read block \(b)") { try view.read(at: b * bs, count: n) }
      try log.check(
        blockMatches(got, frozen.block(b)),
        "\(what): view \(name) block \(b) reads \(fingerprint(got)), expected \(fingerprint(frozen.block(b)))")
    }
    recovered.snapshots[name] = frozen
    recovered.order.append(name)
  }
  recovered.markDurable()

  try checkAccounting(image, log)
  let report = try log.run("\(what): check") { try image.check() }
  try log.check(report.errors.isEmpty, "\(what): check found errors: \(report.errors)")
  return recovered
}

// MARK: - The crash workload

struct CrashConfig {
  var virtualSize: UInt64
  var operations: Int
  var segmentSize = Layout.minSegmentSize
  /// Read every block after each crash (small disks) or only the tracked ones.
  var fullScan: Bool
  var crashChance = 0.02
  var powerFailChance = 0.02
  var modes: [SimulatedStorage.CrashMode] = SimulatedStorage.CrashMode.all
  /// Offsets spread over the whole disk instead of a few hot zones.
  var spread = false
  var maxSnapshots = 4
}

/// One seeded run: random operations with flushes, crashes at random points, checks after each.
@discardableResult
func runCrash(seed: UInt64, _ config: CrashConfig) throws -> (crashes: Int, midOperation: Int) {
  let log = RunLog("crash", seed: seed)
  var rng = SeededRandom(seed: seed)
  var work = Workload(rng: rng.split())
  let clock = SimulatedClock()
  var options = stressOptions(clock: clock)
  options.segmentSize = config.segmentSize
  // With larger segments, checkpoint less often too, so that the log writes out (asynchronously)
  // between checkpoints.
  if config.segmentSize > Layout.minSegmentSize { options.checkpointIntervalPages = 1024 }
  let storage = SimulatedStorage(seed: rng.next())
  var image = try log.run("create") {
    try StrataImage.create(storage: storage, virtualSize: config.virtualSize, options: options)
  }
  defer { image.abandon() }
  var model = CrashModel(size: config.virtualSize)
  var crashes = 0
  var midOperation = 0
  var nextSnapshot = 0
  let bs = DiskModel.bs

  func blocks(_ offset: UInt64, _ count: UInt64) -> Range<UInt64> { (offset / bs)..<((offset + count + bs - 1) / bs) }

  func range(length: Int) -> (UInt64, Int) {
    if config.spread && rng.chance(0.7) {
      let count = min(length, Int(min(model.head.size, 1 << 20)))
      return (rng.uint64(in: 0...(model.head.size - UInt64(count))), count)
    }
    return work.range(size: model.head.size, length: length)
  }

  /// Power loss: crash the storage, reopen, verify, continue from what survived.
  func crash(_ reason: String) throws {
    let mode = config.modes[crashes % config.modes.count]
    crashes += 1
    let unsynced = storage.unsyncedWrites
    let survived = storage.crash(mode: mode)
    log.note("crash (\(reason)) mode \(mode): \(survived) of \(unsynced) unsynced writes survived")
    image.abandon()
    let (reopened, recovered) = try openAndVerify(
      storage, options, model, log, fullScan: config.fullScan, what: "crash \(crashes) (\(mode))")
    image = reopened
    model = recovered
    if reason.hasPrefix("power failed") { midOperation += 1 }
  }

  /// Runs a mutating call; a power loss in it leads to a crash instead of a failure.
  func attempt(_ what: String, _ body: () throws -> Void) throws -> Bool {
    do {
      try body()
      return true
    } catch let e as RunAborted {
      throw e
    } catch  where storage.isPoweredOff {
      try crash("power failed during \(what)")
      return false
    } catch {
      throw log.fail("\(what) threw \(error)")
    }
  }

  for i in 0..<config.operations {
    log.index = i
    // Writes, discards and zeroing end with a checkpoint when one is due.
    var checkpointDue = false
    switch rng.int(in: 0..<1000) {
    case 0..<400:  // write
      let (offset, count) = range(length: work.length())
      let data = work.data(count: count, at: offset)
      log.note("write \(offset)+\(count)")
      model.change(blocks: blocks(offset, UInt64(count))) { $0.write(data, at: offset) }
      checkpointDue = try attempt("write \(offset)+\(count)") { try image.write(data, at: offset) }
    case 400..<500:  // read (compared with the head)
      let (offset, count) = range(length: work.length())
      log.note("read \(offset)+\(count)")
      do {
        let got = try image.read(at: offset, count: count)
        let want = model.head.read(offset, count)
        try log.check(sameBytes(got, want), "read \(offset)+\(count): \(firstDifference(got, want))")
      } catch let e as RunAborted {
        throw e
      } catch  where storage.isPoweredOff {
        try crash("power failed during a read")
      } catch {
        throw log.fail("read \(offset)+\(count) threw \(error)")
      }
    case 500..<550:  // discard
      let (offset, count) = range(length: work.length(max: 1 << 20))
      log.note("discard \(offset)+\(count)")
      model.change(blocks: blocks(offset, UInt64(count))) { $0.discard(at: offset, length: UInt64(count)) }
      checkpointDue = try attempt("discard") { try image.discard(at: offset, length: UInt64(count)) }
    case 550..<600:  // writeZeroes
      let (offset, count) = range(length: work.length(max: 1 << 20))
      log.note("writeZeroes \(offset)+\(count)")
      model.change(blocks: blocks(offset, UInt64(count))) { $0.zero(at: offset, length: UInt64(count)) }
      checkpointDue = try attempt("writeZeroes") { try image.writeZeroes(at: offset, length: UInt64(count)) }
    case 600..<750:  // flush
      log.note("flush")
      if try attempt("flush", { try image.flush() }) { model.markDurable() }
    case 750..<790:  // snapshot
      if model.snapshots.count >= config.maxSnapshots, let victim = rng.element(of: model.order) {
        log.note("delete snapshot \(victim) (full)")
        model.deleteSnapshot(victim)
        guard try attempt("deleteSnapshot", { try image.deleteSnapshot(name: victim) }) else { continue }
      }
      nextSnapshot += 1
      let name = "s\(nextSnapshot)"
      log.note("create snapshot \(name)")
      model.createSnapshot(name)
      _ = try attempt("createSnapshot") { try image.createSnapshot(name: name) }
    case 790..<810:  // delete a snapshot
      guard let victim = rng.element(of: model.order) else { continue }
      log.note("delete snapshot \(victim)")
      model.deleteSnapshot(victim)
      _ = try attempt("deleteSnapshot") { try image.deleteSnapshot(name: victim) }
    case 810..<830:  // read a snapshot view
      guard let name = rng.element(of: model.order), let frozen = model.snapshots[name] else { continue }
      let (offset, count) = work.range(size: frozen.size, length: work.length())
      log.note("view \(name) read \(offset)+\(count)")
      do {
        let view = try image.snapshotView(name: name)
        let got = try view.read(at: offset, count: count)
        let want = frozen.read(offset, count)
        try log.check(sameBytes(got, want), "view \(name) read \(offset)+\(count): \(firstDifference(got, want))")
      } catch let e as RunAborted {
        throw e
      } catch  where storage.isPoweredOff {
        try crash("power failed during a view read")
      } catch {
        throw log.fail("view \(name) read \(offset)+\(count) threw \(error)")
      }
    case 830..<840:  // restore (then flush: the head after it is durable)
      guard let name = rng.element(of: model.order), let frozen = model.snapshots[name] else { continue }
      log.note("restore \(name)")
      model.change { $0 = frozen }
      if try attempt(
        "restore",
        {
          try image.restore(snapshot: name)
          try image.flush()
        })
      {
        model.markDurable()
      }
    case 840..<850:  // grow or shrink (then flush)
      let step = UInt64(rng.int(in: 1...2048)) * 512
      let newSize = rng.chance(0.7) || step >= model.head.size ? model.head.size + step : model.head.size - step
      log.note("resize to \(newSize)")
      model.change { $0.resize(to: newSize) }
      if try attempt(
        "resize",
        {
          try image.resize(to: newSize, allowShrink: true)
          try image.flush()
        })
      {
        model.markDurable()
      }
    case 850..<870:  // close and reopen cleanly (a close makes everything durable)
      log.note("close and reopen")
      if try attempt("close", { try image.close() }) {
        if storage.isPoweredOff {
          // Nothing was left to write, but the power is off: it comes back after a crash.
          try crash("power off at close")
          continue
        }
        model.markDurable()
        storage.reopen()
        image = try log.run("reopen") { try StrataImage.open(storage: storage, options: options) }
        try checkAccounting(image, log)
      } else {
        continue
      }
    default:
      break
    }
    try log.check(storage.violations.isEmpty, "storage contract broken: \(storage.violations)")
    // Bounded metadata memory, whatever the disk size.
    try log.check(
      image.pages.cache.count <= options.mapCacheNodes,
      "node cache holds \(image.pages.cache.count) nodes, capacity \(options.mapCacheNodes)")
    // Recovery replays up to two checkpoint intervals (when the newest checkpoint was lost)
    // without checkpointing; the next change checkpoints.
    let dirtyLimit = checkpointDue ? options.maxDirtyNodes : 4 * options.maxDirtyNodes
    try log.check(
      image.map.dirtyCount <= dirtyLimit,
      "\(image.map.dirtyCount) dirty map nodes, limit \(dirtyLimit) (checkpoint due at \(options.maxDirtyNodes))")
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
  if storage.isPoweredOff { try crash("power was off at the end") }
  log.note("final flush and crash")
  try log.run("final flush") { try image.flush() }
  model.markDurable()
  try crash("final")
  try log.run("close") { try image.close() }
  return (crashes, midOperation)
}

@Suite("Crash consistency on simulated storage")
struct CrashTests {
  /// Small disks with an unaligned end; every crash mode in turn; every block checked. Even
  /// seeds use 4 MiB segments (write-outs in flight in the middle of a segment).
  @Test(arguments: testSeeds([11, 12, 13, 14, 15, 16]))
  func randomCrashes(seed: UInt64) throws {
    var config = CrashConfig(virtualSize: (6 << 20) + 3584, operations: 500, fullScan: true)
    if seed % 2 == 0 { config.segmentSize = 4 << 20 }
    let result = try runCrash(seed: seed, config)
    #expect(result.crashes >= 5, "only \(result.crashes) crashes in seed \(seed)")
    #expect(result.midOperation >= 1, "no power failure inside an operation in seed \(seed)")
  }

  /// Each crash mode alone, so that a failure names the mode.
  @Test(arguments: SimulatedStorage.CrashMode.all)
  func crashMode(mode: SimulatedStorage.CrashMode) throws {
    var config = CrashConfig(virtualSize: 4 << 20, operations: 300, fullScan: true)
    config.modes = [mode]
    config.crashChance = 0.03
    config.powerFailChance = 0.03
    try runCrash(seed: 100 + UInt64(SimulatedStorage.CrashMode.all.firstIndex(of: mode)!), config)
  }

  /// 16 TiB virtual, writes far apart: the map is four levels deep, the node cache stays at its
  /// capacity, and only the tracked blocks (plus every data extent) are checked after a crash.
  @Test(arguments: testSeeds([21, 22]))
  func largeVirtualDisk(seed: UInt64) throws {
    var config = CrashConfig(virtualSize: 16 << 40, operations: 500, fullScan: false)
    config.spread = true
    try runCrash(seed: seed, config)
  }
}

// MARK: - Metadata memory does not grow with the virtual size

@Suite("Bounded metadata memory")
struct BoundedMemoryTests {
  @Test(arguments: [16 << 40, 1 << 50, Layout.maxVirtualSize] as [UInt64])
  func farApartBlocks(virtualSize: UInt64) throws {
    let log = RunLog("far-apart \(virtualSize)", seed: virtualSize)
    var rng = SeededRandom(seed: virtualSize)
    let options = stressOptions(clock: SimulatedClock())
    let storage = SimulatedStorage(seed: 1)
    var image = try StrataImage.create(storage: storage, virtualSize: virtualSize, options: options)
    defer { image.abandon() }
    var model = DiskModel(size: virtualSize)
    let bs = DiskModel.bs
    let blocks = virtualSize / bs
    // The first and last bytes, then blocks scattered over the whole range.
    var offsets: [UInt64] = [0, virtualSize - 1, virtualSize - bs, virtualSize / 2 + 100]
    for _ in 0..<300 { offsets.append(rng.uint64(in: 0..<blocks) * bs + UInt64(rng.int(in: 0..<2) * 17)) }
    for (i, offset) in offsets.enumerated() {
      log.index = i
      let count = Int(min(UInt64(rng.int(in: 1...9000)), virtualSize - offset))
      let data = rng.bytes(count)
      log.note("write \(offset)+\(count)")
      try log.run("write") { try image.write(data, at: offset) }
      model.write(data, at: offset)
      try log.check(image.pages.cache.count <= options.mapCacheNodes, "node cache grew to \(image.pages.cache.count)")
      try log.check(image.map.dirtyCount <= options.maxDirtyNodes, "\(image.map.dirtyCount) dirty nodes")
    }
    try image.flush()
    let read = { (o: UInt64, n: Int) in try image.read(at: o, count: n) }
    try compareAll(read, model, "head", log, rng: &rng)
    try log.check(image.pages.cache.count <= options.mapCacheNodes, "node cache grew to \(image.pages.cache.count)")
    // The file holds the data written plus its metadata, nothing proportional to the disk.
    let fileSize = try storage.size()
    try log.check(fileSize < 64 << 20, "file grew to \(fileSize) bytes for \(offsets.count) small writes")
    try image.close()
    storage.reopen()
    image = try StrataImage.open(storage: storage, options: options)
    try compareAll(read, model, "head after reopen", log, rng: &rng)
    try checkAccounting(image, log)
    try log.check(image.pages.cache.count <= options.mapCacheNodes, "node cache grew to \(image.pages.cache.count)")
    // Discarding the whole disk drops subtrees (a few nodes, not one entry per block) and
    // releases every block.
    try image.discard(at: 0, length: virtualSize)
    try log.check(image.map.dataBlocks == 0, "\(image.map.dataBlocks) data blocks after a full discard")
    try log.check(try image.extents().allSatisfy { $0.state != .data }, "data extents after a full discard")
    try checkAccounting(image, log)
    try image.close()
  }
}

// MARK: - I/O errors

/// Writes `runs` random ranges (up to 200 KiB, crossing block edges) within the first 4 MiB,
/// to the image and to the model.
private func fill(_ image: StrataImage, _ model: inout CrashModel, _ rng: inout SeededRandom, runs: Int) throws {
  for _ in 0..<runs {
    let offset = rng.uint64(in: 0..<(4 << 20))
    let count = rng.int(in: 1...(200 << 10))
    let data = rng.bytes(count)
    let bs = DiskModel.bs
    model.change(blocks: (offset / bs)..<((offset + UInt64(count) + bs - 1) / bs)) { $0.write(data, at: offset) }
    try image.write(data, at: offset)
  }
}

@Suite("I/O errors")
struct IOErrorTests {
  struct Case: Sendable, CustomTestStringConvertible {
    var op: SimulatedStorage.Operation
    var errno: Int32
    var partial: SimulatedStorage.PartialWrite
    var testDescription: String { "\(op) \(errno == ENOSPC ? "ENOSPC" : "EIO") \(partial)" }
  }

  static let cases: [Case] = [
    Case(op: .write, errno: EIO, partial: .none),
    Case(op: .write, errno: ENOSPC, partial: .none),
    Case(op: .write, errno: EIO, partial: .prefix(granularity: 512)),
    Case(op: .write, errno: ENOSPC, partial: .prefix(granularity: 1)),
    Case(op: .sync, errno: EIO, partial: .none),
    Case(op: .sync, errno: ENOSPC, partial: .none),
  ]

  /// A failing flush throws a clear StrataError; what was flushed before survives a crash.
  @Test(arguments: cases)
  func flushFailsThenCrash(c: Case) throws {
    for (round, mode) in SimulatedStorage.CrashMode.all.enumerated() {
      let log = RunLog("flush-fails \(c.testDescription) \(mode)", seed: UInt64(round))
      var rng = SeededRandom(seed: UInt64(round) + 1)
      let options = stressOptions(clock: SimulatedClock())
      let storage = SimulatedStorage(seed: UInt64(round))
      let image = try StrataImage.create(storage: storage, virtualSize: 8 << 20, options: options)
      defer { image.abandon() }
      var model = CrashModel(size: 8 << 20)
      try fill(image, &model, &rng, runs: 6)
      try image.flush()
      model.markDurable()
      try fill(image, &model, &rng, runs: 3)
      storage.failNext(c.op, errno: c.errno, partial: c.partial)
      log.note("flush with an injected \(c.op) failure")
      do {
        try image.flush()
        throw log.fail("flush succeeded despite the injected \(c.op) failure")
      } catch let e as StrataError {
        try log.check(e.code == (c.errno == ENOSPC ? .noSpace : .io), "flush threw code \(e.code): \(e)")
        try log.check(e.errno == c.errno, "flush threw errno \(String(describing: e.errno)): \(e)")
        try log.check(
          e.message.contains(c.op.description) && e.message.contains(String(cString: strerror(c.errno))),
          "the message does not say what failed: \(e.message)")
      }
      // The head still reads what was written (pages whose write-out failed come from the log
      // buffer, not from storage where they never landed).
      for b in model.head.storedBlocks.prefix(200) {
        try compareRead(
          { try image.read(at: $0, count: $1) }, model.head, b * 4096, 4096, "head after the failed flush", log)
      }
      storage.clearFaults()
      storage.crash(mode: mode)
      image.abandon()
      let (reopened, _) = try openAndVerify(
        storage, options, model, log, fullScan: true, what: "crash after failed flush")
      try reopened.close()
    }
  }

  /// After the fault clears, a retried flush makes everything durable, also when the failed
  /// sync made the kernel forget the dirty pages (Linux "fsyncgate": the retry's sync succeeds
  /// without writing them).
  @Test(arguments: cases)
  func flushRetrySucceeds(c: Case) throws {
    for dropOnFailedSync in [false, true] where c.op == .sync || !dropOnFailedSync {
      for (round, mode) in SimulatedStorage.CrashMode.all.enumerated() {
        let log = RunLog("flush-retry \(c.testDescription) drop=\(dropOnFailedSync) \(mode)", seed: UInt64(round))
        var rng = SeededRandom(seed: UInt64(round) + 7)
        let options = stressOptions(clock: SimulatedClock())
        let storage = SimulatedStorage(seed: UInt64(round))
        storage.failedSyncDropsUnsynced = dropOnFailedSync
        let image = try StrataImage.create(storage: storage, virtualSize: 8 << 20, options: options)
        defer { image.abandon() }
        var model = CrashModel(size: 8 << 20)
        try fill(image, &model, &rng, runs: 4)
        try image.flush()
        model.markDurable()
        try fill(image, &model, &rng, runs: 3)
        storage.failNext(c.op, errno: c.errno, partial: c.partial)
        log.note("flush with an injected \(c.op) failure")
        #expect(throws: StrataError.self) { try image.flush() }
        log.note("retried flush")
        try log.run("retried flush") { try image.flush() }
        model.markDurable()
        storage.crash(mode: mode)
        image.abandon()
        let (reopened, _) = try openAndVerify(
          storage, options, model, log, fullScan: true, what: "crash after the retried flush")
        try reopened.close()
      }
    }
  }

  /// A write whose write-out fails (the call may throw): after the fault clears and a flush
  /// succeeds, what survives a crash is exactly what the head read before it.
  /// With 1 MiB segments the failing write-out is a seal's; with 4 MiB ones it is the
  /// write-out of a full megabyte in the middle of the call.
  ///
  /// (A WRITE is applied to the head before its write-out can fail, so the head and the log
  /// agree: a failed write may have happened, as on any block device.)
  @Test(arguments: [EIO, ENOSPC] as [Int32], [(1, 0), (1, 1), (1, 3), (4, 0), (4, 1)])
  func writeOutFailure(errno e: Int32, where at: (segmentMiB: Int, skip: Int)) throws {
    try writeOutFailureCase(errno: e, segmentMiB: at.segmentMiB, skip: at.skip)
  }

  private func writeOutFailureCase(errno e: Int32, segmentMiB: Int, skip: Int) throws {
    // The failure is reported by the submitting call, or (as io_uring does) at completion.
    for deferred in [false, true] {
      for mode in SimulatedStorage.CrashMode.all {
        let log = RunLog(
          "write-out fails \(e) segment \(segmentMiB) MiB skip \(skip) deferred \(deferred) \(mode)", seed: 0)
        var rng = SeededRandom(seed: 5)
        var options = stressOptions(clock: SimulatedClock())
        options.segmentSize = segmentMiB << 20
        options.checkpointIntervalPages = 4096
        let storage = SimulatedStorage(seed: 9)
        storage.deferWriteErrors = deferred
        let image = try StrataImage.create(storage: storage, virtualSize: 8 << 20, options: options)
        defer { image.abandon() }
        var model = CrashModel(size: 8 << 20)
        try fill(image, &model, &rng, runs: 4)
        try image.flush()
        model.markDurable()
        // 2 MiB, then a block: more than the writer keeps unwritten, so these calls write out
        // (a megabyte at a time, or a whole segment when it seals).
        let data = rng.bytes(2 << 20)
        let block = rng.bytes(4096)
        model.change(blocks: 256..<768) { $0.write(data, at: 1 << 20) }
        model.change(blocks: 1536..<1537) { $0.write(block, at: 6 << 20) }
        storage.failNext(.write, errno: e, skip: skip)
        log.note("write 2 MiB and a block with an injected failure of write \(skip + 1)")
        for (bytes, offset) in [(data, UInt64(1 << 20)), (block, UInt64(6 << 20))] {
          if let error = failure(of: { try image.write(bytes, at: offset) }) {
            // The injected error, or the refusal of an image that must be reopened after it.
            let reported = error as? StrataError
            try log.check(
              reported?.errno == e || (reported?.code == .io && reported?.message.contains("reopened") == true),
              "write threw \(error)")
          }
        }
        storage.clearFaults()
        // A flush (retried once after a reported failure) makes what the head reads durable.
        log.note("flush after the fault cleared")
        if failure(of: { try image.flush() }) != nil, failure(of: { try image.flush() }) != nil {
          // The image refuses to go on (it must be reopened): the flushed state must survive.
          log.note("flush refused after the failure: crash and check the old state")
          storage.crash(mode: mode)
          image.abandon()
          let (reopened, _) = try openAndVerify(
            storage, options, model, log, fullScan: true, what: "crash after refusal")
          try reopened.close()
          continue
        }
        var seen = DiskModel(size: model.head.size)
        for b in 0..<UInt64(2048) {
          let got = try log.run("read block \(b)") { try image.read(at: b * 4096, count: 4096) }
          let allowed = model.allowed(b)
          try log.check(
            allowed.contains { blockMatches(got, $0) }, "block \(b) reads \(fingerprint(got)) before the crash")
          seen.set(b, got)
        }
        var expected = CrashModel(size: model.head.size)
        expected.change { $0 = seen }
        expected.markDurable()
        storage.crash(mode: mode)
        image.abandon()
        let (reopened, _) = try openAndVerify(
          storage, options, expected, log, fullScan: true, what: "crash after the flush")
        try reopened.close()
      }
    }
  }

  /// Minimal case of the write-out bug above: the head never shows the failed write, a later
  /// flush succeeds, and after a crash the block holds the failed write's data.
  @Test func failedWriteOutReappearsAfterCrash() throws {
    var options = stressOptions(clock: SimulatedClock())
    options.segmentSize = 4 << 20
    options.checkpointIntervalPages = 4096
    let storage = SimulatedStorage(seed: 1)
    let image = try StrataImage.create(storage: storage, virtualSize: 8 << 20, options: options)
    defer { image.abandon() }
    try image.flush()
    // A megabyte is pending after the first call, so one of the two calls writes it out; that
    // write-out fails, and says so at once.
    storage.deferWriteErrors = false
    storage.failNext(.write)
    let first = failure(of: { try image.write([UInt8](repeating: 0x77, count: 2 << 20), at: 1 << 20) })
    let second = failure(of: { try image.write([UInt8](repeating: 0x88, count: 4096), at: 4 << 20) })
    #expect(first != nil || second != nil, "the injected write-out failure was not reported")
    storage.clearFaults()
    try image.flush()
    let before = try [1 << 20, 4 << 20].map { try image.read(at: $0, count: 4096) }
    // Power loss after the flush (a clean close would checkpoint the head and hide the WRITE).
    storage.crash(mode: .dropUnsynced)
    image.abandon()
    let reopened = try StrataImage.open(storage: storage, options: options)
    defer { reopened.abandon() }
    let after = try [1 << 20, 4 << 20].map { try reopened.read(at: $0, count: 4096) }
    for i in 0..<2 {
      #expect(
        sameBytes(before[i], after[i]),
        "the head read \(fingerprint(before[i])) after the flush; the reopened image reads \(fingerprint(after[i]))")
    }
  }

  /// ENOSPC from the preallocation ahead of a write-out (fallocate on a full file system): the
  /// flush says so; once space is back, a retried flush makes everything durable.
  @Test func preallocationFailure() throws {
    let options = stressOptions(clock: SimulatedClock())
    let storage = SimulatedStorage(seed: 1)
    var image = try StrataImage.create(storage: storage, virtualSize: 8 << 20, options: options)
    defer { image.abandon() }
    var model = CrashModel(size: 8 << 20)
    var rng = SeededRandom(seed: 2)
    try fill(image, &model, &rng, runs: 3)
    // Close (the file is trimmed to the log end) and reopen: the next write-out preallocates.
    try image.close()
    model.markDurable()
    storage.reopen()
    image = try StrataImage.open(storage: storage, options: options)
    try fill(image, &model, &rng, runs: 2)
    storage.failNext(.preallocate, errno: ENOSPC)
    #expect {
      try image.flush()
    } throws: { error in
      let e = error as? StrataError
      return e?.code == .noSpace && e?.errno == ENOSPC && e?.message.contains("fallocate") == true
    }
    #expect(storage.counters.failures == 1, "the flush did not preallocate")
    try image.flush()
    model.markDurable()
    storage.crash(mode: .dropUnsynced)
    image.abandon()
    let log = RunLog("preallocation failure", seed: 1)
    let (reopened, _) = try openAndVerify(storage, options, model, log, fullScan: true, what: "crash after the retry")
    try reopened.close()
  }

  /// Faults on the checkpoint path (the superblock write, or the sync after it), reached by a
  /// resize or by close: the call reports them, and the flushed state survives a crash.
  @Test(arguments: [SimulatedStorage.Operation.write, .sync], ["resize", "close"])
  func checkpointFailure(op: SimulatedStorage.Operation, via: String) throws {
    for mode in SimulatedStorage.CrashMode.all {
      let log = RunLog("checkpoint fails \(op) via \(via) \(mode)", seed: 0)
      var rng = SeededRandom(seed: 3)
      let options = stressOptions(clock: SimulatedClock())
      let storage = SimulatedStorage(seed: 4)
      let image = try StrataImage.create(storage: storage, virtualSize: 8 << 20, options: options)
      defer { image.abandon() }
      var model = CrashModel(size: 8 << 20)
      try fill(image, &model, &rng, runs: 4)
      try image.flush()
      model.markDurable()
      try fill(image, &model, &rng, runs: 2)
      // The superblock write (bytes 0..<8192), or the second sync (after the superblock).
      if op == .write {
        storage.failNext(.write, range: 0..<8192)
      } else {
        storage.failNext(.sync, skip: 1)
      }
      log.note("\(via) (checkpoints) with an injected \(op) failure")
      let error: Error?
      if via == "close" {
        error = failure(of: { try image.close() })
      } else {
        model.change { $0.resize(to: 9 << 20) }
        error = failure(of: { try image.resize(to: 9 << 20) })
      }
      guard let e = error as? StrataError else {
        throw log.fail("\(via) did not report the injected \(op) failure: \(String(describing: error))")
      }
      try log.check(e.code == .io && e.errno == EIO, "\(via) threw \(e)")
      storage.clearFaults()
      // After a failed resize the image keeps working (or refuses clearly): a flush then makes
      // the head durable. After a failed close the image is closed.
      if via != "close", failure(of: { try image.flush() }) == nil {
        log.note("flush after the failure succeeded")
        model.markDurable()
      }
      storage.crash(mode: mode)
      image.abandon()
      let (reopened, _) = try openAndVerify(
        storage, options, model, log, fullScan: true, what: "crash after checkpoint failure")
      try reopened.close()
    }
  }

  /// Random EIO/ENOSPC on writes and syncs during a workload. Each failed call may or may not
  /// have taken effect; the head is read back to learn which. A later successful flush must make
  /// exactly what the head reads durable; an image that refuses to continue is reopened.
  @Test(arguments: testSeeds([31, 32, 33]))
  func randomFaults(seed: UInt64) throws {
    let log = RunLog("random faults", seed: seed)
    var rng = SeededRandom(seed: seed)
    var work = Workload(rng: rng.split())
    var options = stressOptions(clock: SimulatedClock())
    // With 4 MiB segments, write-outs happen in the middle of a segment too (not only at seals).
    if seed % 2 == 0 { options.segmentSize = 4 << 20 }
    let storage = SimulatedStorage(seed: rng.next())
    storage.failedSyncDropsUnsynced = rng.bool()
    var image = try StrataImage.create(storage: storage, virtualSize: 4 << 20, options: options)
    defer { image.abandon() }
    var model = CrashModel(size: 4 << 20)
    let bs = DiskModel.bs
    var faults = 0
    var reopens = 0

    func crashAndReopen(_ why: String) throws {
      storage.clearFaults()
      let mode = SimulatedStorage.CrashMode.all[reopens % SimulatedStorage.CrashMode.all.count]
      reopens += 1
      log.note("crash (\(why)) mode \(mode)")
      storage.crash(mode: mode)
      image.abandon()
      let (reopened, recovered) = try openAndVerify(
        storage, options, model, log, fullScan: true, what: "reopen \(reopens)")
      image = reopened
      model = recovered
    }

    for i in 0..<500 {
      log.index = i
      if rng.chance(0.05) {
        let op = rng.element(of: [SimulatedStorage.Operation.write, .write, .sync, .sync, .read])!
        let e = rng.bool() ? EIO : ENOSPC
        storage.failNext(
          op, errno: e, skip: rng.int(in: 0...3), partial: rng.bool() ? .prefix(granularity: 512) : .none)
        log.note("arm \(op) failure")
      }
      let (offset, count) = work.range(size: model.head.size, length: work.length())
      let r = (offset / bs)..<((offset + UInt64(count) + bs - 1) / bs)
      do {
        switch rng.int(in: 0..<10) {
        case 0..<6:
          let data = work.data(count: count, at: offset)
          log.note("write \(offset)+\(count)")
          model.change(blocks: r) { $0.write(data, at: offset) }
          try image.write(data, at: offset)
        case 6:
          log.note("writeZeroes \(offset)+\(count)")
          model.change(blocks: r) { $0.zero(at: offset, length: UInt64(count)) }
          try image.writeZeroes(at: offset, length: UInt64(count))
        default:
          log.note("flush")
          try image.flush()
          model.markDurable()
        }
      } catch let e as StrataError where e.errno != nil || e.code == .io || e.code == .noSpace {
        faults += 1
        log.note("failed: \(e)")
        // Learn what the head holds now: each changed block is old or new.
        var readable = true
        for b in r where b * bs < model.head.size {
          let n = Int(min(bs, model.head.size - b * bs))
          guard let got = try? image.read(at: b * bs, count: n) else {
            readable = false
            break
          }
          try log.check(
            model.allowed(b).contains { blockMatches(got, $0) } || blockMatches(got, model.head.block(b)),
            "after a failed call block \(b) reads \(fingerprint(got))")
          model.head.set(b, got + [UInt8](repeating: 0, count: DiskModel.blockSize - n))
        }
        storage.clearFaults()
        if !readable {
          try crashAndReopen("the head is unreadable after: \(e)")
        } else if let refusal = failure(of: { try image.flush() }) {
          // Refusing to go on until reopened is allowed; the flushed state must then survive.
          try crashAndReopen("flush after the fault cleared failed: \(refusal)")
        } else {
          log.note("flush after the fault cleared")
          model.markDurable()
        }
      }
      if rng.chance(0.03) { try crashAndReopen("random") }
    }
    storage.clearFaults()
    try log.run("final flush") { try image.flush() }
    model.markDurable()
    try crashAndReopen("final")
    try image.close()
    #expect(faults > 5, "only \(faults) injected faults hit")
  }
}

// MARK: - Exhaustive tearing of one flush

@Suite("A flush torn at every sector")
struct TornFlushTests {
  /// The last unsynced write: its index in `unsyncedOperations`, offset and length.
  private func lastWrite(_ storage: SimulatedStorage) -> (index: Int, offset: UInt64, count: Int)? {
    for (i, op) in storage.unsyncedOperations.enumerated().reversed() {
      if case .write(let offset, let count) = op { return (i, offset, count) }
    }
    return nil
  }

  /// Closes (the file is trimmed to the log end), makes that durable, and reopens: the next
  /// write-out preallocates again, and a crash may lose that preallocation.
  private func trimmed(_ image: StrataImage, _ storage: SimulatedStorage, _ options: ImageOptions) throws -> StrataImage
  {
    try image.close()
    storage.reopen()
    try storage.sync()
    return try StrataImage.open(storage: storage, options: options)
  }

  /// Minimal case: one unsynced block whose last 3 KiB are zeros; the flush's write-out (record
  /// header page, data page) reaches the disk except for those zeros, and the preallocation
  /// that extended the file is lost, so the file ends 1 KiB into the data page. Recovery must
  /// either cut the record or serve the block; reading it must not fail with "image file is
  /// truncated".
  @Test func tornInTheZeroTailOfTheLastBlock() throws {
    let options = stressOptions(clock: SimulatedClock())
    let storage = SimulatedStorage(seed: 1)
    let created = try StrataImage.create(storage: storage, virtualSize: 1 << 20, options: options)
    let old = [UInt8](repeating: 0xAB, count: 4096)
    try created.write(old, at: 5 * 4096)
    let image = try trimmed(created, storage, options)
    defer { image.abandon() }
    let new = [UInt8](repeating: 0xCD, count: 1024) + [UInt8](repeating: 0, count: 3072)
    try image.write(new, at: 5 * 4096)
    storage.powerFail(after: 1)  // the write-out completes, the sync fails
    #expect(throws: StrataError.self) { try image.flush() }
    guard let w = lastWrite(storage) else {
      Issue.record("expected an unsynced write, got \(storage.unsyncedOperations)")
      return
    }
    storage.crash(keepingOperations: [w.index: w.count - 3072])
    let reopened = try StrataImage.open(storage: storage, options: options)
    defer { reopened.abandon() }
    let got = try reopened.read(at: 5 * 4096, count: 4096)
    #expect(got == old || got == new, "block 5 reads \(fingerprint(got))")
    let count = try reopened.recount()
    #expect(count.livePages == reopened.usage.entries.map(\.livePages))
  }

  /// The same with 64 KiB blocks and a cut at a page boundary (as a file system that updates
  /// the size page by page can leave it): the block's data page landed, its 15 zero pages did
  /// not, and the file ends after the data page.
  @Test func tornAtAPageBoundaryInsideALargeBlock() throws {
    var options = stressOptions(clock: SimulatedClock())
    options.blockSize = 65536
    let storage = SimulatedStorage(seed: 1)
    let created = try StrataImage.create(storage: storage, virtualSize: 4 << 20, options: options)
    let old = [UInt8](repeating: 0xAB, count: 65536)
    try created.write(old, at: 0)
    let image = try trimmed(created, storage, options)
    defer { image.abandon() }
    let new = [UInt8](repeating: 0xCD, count: 4096) + [UInt8](repeating: 0, count: 61440)
    try image.write(new, at: 0)
    storage.powerFail(after: 1)
    #expect(throws: StrataError.self) { try image.flush() }
    guard let w = lastWrite(storage) else {
      Issue.record("expected an unsynced write, got \(storage.unsyncedOperations)")
      return
    }
    storage.crash(keepingOperations: [w.index: w.count - 61440])
    let reopened = try StrataImage.open(storage: storage, options: options)
    defer { reopened.abandon() }
    let got = try reopened.read(at: 0, count: 65536)
    #expect(got == old || got == new, "block 0 reads \(fingerprint(got))")
  }

  /// Minimal case: a checkpoint's write-out is cut right after the header page of its PAGES
  /// record (the map node and usage pages it announces are missing). The superblock still names
  /// the previous checkpoint, so the image must open with the flushed data; it must not fail
  /// with "image file is truncated" for every superblock.
  @Test func tornAfterThePagesRecordHeader() throws {
    let options = stressOptions(clock: SimulatedClock())
    let storage = SimulatedStorage(seed: 1)
    let image = try StrataImage.create(storage: storage, virtualSize: 1 << 20, options: options)
    defer { image.abandon() }
    let data = [UInt8](repeating: 0x5A, count: 8192)
    try image.write(data, at: 0)
    try image.flush()
    // resize logs RESIZE (one record page), then checkpoints: PAGES header, nodes, usage,
    // CHECKPOINT, all in one write-out; the sync after it fails.
    storage.powerFail(after: 1)
    #expect(throws: StrataError.self) { try image.resize(to: 2 << 20) }
    guard let w = lastWrite(storage) else {
      Issue.record("expected an unsynced write, got \(storage.unsyncedOperations)")
      return
    }
    storage.crash(keepingOperations: [w.index: 2 * 4096])
    let reopened = try StrataImage.open(storage: storage, options: options)
    defer { reopened.abandon() }
    #expect(try reopened.read(at: 0, count: 8192) == data)
    #expect(reopened.size == 1 << 20 || reopened.size == 2 << 20)
  }

  /// Unsynced data writes followed by a checkpoint whose write-out is pending when the power
  /// fails: the crash keeps every prefix of each unsynced write, one sector at a time, with the
  /// operations before it (or only the writes before it: preallocations lost). Each cut must
  /// open and read flushed-or-newer contents, and a record cut anywhere (even in the zero tail
  /// of a block) must not be half-applied.
  @Test func everySectorOfACheckpointWriteOut() throws {
    let options = stressOptions(clock: SimulatedClock())
    let storage = SimulatedStorage(seed: 1)
    var image = try StrataImage.create(storage: storage, virtualSize: 4 << 20, options: options)
    defer { image.abandon() }
    var model = CrashModel(size: 4 << 20)
    var rng = SeededRandom(seed: 2)
    func write(_ data: [UInt8], at offset: UInt64) throws {
      model.change(blocks: (offset / 4096)..<((offset + UInt64(data.count) + 4095) / 4096)) {
        $0.write(data, at: offset)
      }
      try image.write(data, at: offset)
    }
    for b in 0..<8 as Range<UInt64> { try write(rng.bytes(4096), at: b * 4096) }
    image = try trimmed(image, storage, options)
    model.markDurable()
    // Unsynced: an overwrite, a partial overwrite, and a new block whose last 3 KiB are zeros.
    try write(rng.bytes(4096), at: 2 * 4096)
    try write(rng.bytes(100), at: 3 * 4096 + 7)
    try write(rng.bytes(1024) + [UInt8](repeating: 0, count: 3072), at: 20 * 4096)
    // The resize checkpoints: its write-out completes, the sync after it fails (power loss).
    storage.powerFail(after: 1)
    model.change(blocks: 0..<0) { $0.resize(to: 5 << 20) }
    #expect(throws: StrataError.self) { try image.resize(to: 5 << 20) }
    let ops = storage.unsyncedOperations
    #expect(ops.contains { if case .write = $0 { true } else { false } }, "no unsynced write: \(ops)")
    var failures: [String] = []
    for (index, op) in ops.enumerated() {
      guard case .write(let offset, let count) = op else { continue }
      for keepGrowth in [true, false] {
        var before: [Int: Int] = [:]
        for (i, earlier) in ops[..<index].enumerated() {
          if case .write = earlier { before[i] = Int.max } else if keepGrowth { before[i] = Int.max }
        }
        for keep in stride(from: 0, through: count, by: 512) {
          let copy = storage.clone(seed: 1)
          copy.crash(keepingOperations: before.merging([index: keep]) { $1 })
          let log = RunLog("torn write-out", seed: 1)
          log.recordsIssues = false
          do {
            let (reopened, _) = try openAndVerify(copy, options, model, log, fullScan: true, what: "cut")
            try reopened.close()
          } catch let e as RunAborted {
            let end = offset + UInt64(keep)
            let reason = e.description.split(separator: "\n")[0]
            failures.append(
              "cut after byte \(keep) of the \(count)-byte write at \(offset) (page \(end / 4096) + \(end % 4096)), "
                + "\(keepGrowth ? "preallocation kept" : "preallocation lost"): \(reason)")
          }
        }
      }
    }
    #expect(failures.isEmpty, Comment(rawValue: "\(failures.count) cuts failed:\n" + failures.joined(separator: "\n")))
  }
}

// MARK: - The simulated storage itself

@Suite("SimulatedStorage")
struct SimulatedStorageTests {
  func write(_ s: SimulatedStorage, _ byte: UInt8, _ count: Int, at offset: UInt64) throws {
    try [UInt8](repeating: byte, count: count).withUnsafeBytes { try s.write($0, at: offset) }
  }

  func read(_ s: SimulatedStorage, _ offset: UInt64, _ count: Int) throws -> [UInt8] {
    var out = [UInt8](repeating: 0xEE, count: count)
    let n = try out.withUnsafeMutableBytes { try s.read(into: $0, at: offset) }
    return Array(out[..<n])
  }

  @Test func readsSeeUnsyncedWritesAndSyncMakesThemDurable() throws {
    let s = SimulatedStorage(seed: 1)
    try write(s, 1, 100, at: 10)
    #expect(try read(s, 0, 200) == [UInt8](repeating: 0, count: 10) + [UInt8](repeating: 1, count: 100))
    #expect(s.durable.isEmpty && s.unsyncedWrites == 1)
    try s.sync()
    #expect(s.durable.count == 110 && s.unsyncedWrites == 0)
    try write(s, 2, 10, at: 0)
    s.crash(mode: .dropUnsynced)
    #expect(try read(s, 0, 20) == [UInt8](repeating: 0, count: 10) + [UInt8](repeating: 1, count: 10))
    try write(s, 3, 10, at: 0)
    s.crash(mode: .keepUnsynced)
    #expect(try read(s, 0, 10) == [UInt8](repeating: 3, count: 10))
    #expect(s.counters.crashes == 2 && s.counters.syncs == 1)
  }

  @Test func tornPrefixKeepsWholeWritesThenPartOfOne() throws {
    for seed in 0..<50 as Range<UInt64> {
      let s = SimulatedStorage(seed: seed)
      for i in 0..<4 { try write(s, UInt8(i + 1), 2048, at: UInt64(i) * 2048) }
      s.crash(mode: .tornPrefix(granularity: 512))
      let image = try read(s, 0, 8192)
      // A prefix of the four writes, the last possibly cut at a sector boundary.
      #expect(image.count % 512 == 0)
      for (i, byte) in image.enumerated() { #expect(byte == UInt8(i / 2048 + 1)) }
      #expect(image.count < 8192)
    }
  }

  @Test func randomSectorsKeepWholeAlignedSectors() throws {
    let s = SimulatedStorage(seed: 3)
    try write(s, 0, 8192, at: 0)
    try s.sync()
    try write(s, 9, 4000, at: 100)  // sectors [100, 512), [512, 1024), … [3584, 4100)
    s.crash(mode: .randomSectors(sectorSize: 512))
    let image = try read(s, 0, 8192)
    #expect(image[..<100].allSatisfy { $0 == 0 } && image[4100...].allSatisfy { $0 == 0 })
    for start in stride(from: 512, to: 3584, by: 512) {
      let sector = image[start..<(start + 512)]
      #expect(sector.allSatisfy { $0 == 9 } || sector.allSatisfy { $0 == 0 }, "sector at \(start) is mixed")
    }
  }

  @Test func crashesAreDeterministicPerSeed() throws {
    func run(_ seed: UInt64) throws -> [UInt8] {
      let s = SimulatedStorage(seed: seed)
      for i in 0..<64 { try write(s, UInt8(i), 700, at: UInt64(i * 300)) }
      s.crash(mode: .randomSubset)
      return s.durable
    }
    #expect(try run(7) == run(7))
    #expect(try run(7) != run(8))
  }

  @Test func injectedFaults() throws {
    let s = SimulatedStorage(seed: 4)
    s.failNext(.write, errno: ENOSPC, count: 2, skip: 1)
    try write(s, 1, 10, at: 0)
    for _ in 0..<2 {
      #expect {
        try write(s, 2, 10, at: 0)
      } throws: { error in
        let e = error as? StrataError
        return e?.code == .noSpace && e?.errno == ENOSPC && e?.message.contains("pwrite") == true
      }
    }
    try write(s, 3, 10, at: 0)
    #expect(s.counters.failures == 2 && s.counters.writes == 2)
    // A failed write can land partly.
    s.failNext(.write, partial: .prefix(granularity: 1))
    #expect(throws: StrataError.self) { try write(s, 4, 4096, at: 0) }
    let after = try read(s, 0, 10)
    #expect(after.allSatisfy { $0 == 3 || $0 == 4 })
    // Probabilistic read faults, then cleared.
    s.failRandomly(.read, probability: 0.5)
    var failed = 0
    for _ in 0..<100 where (try? read(s, 0, 1)) == nil { failed += 1 }
    #expect(failed > 20 && failed < 80)
    s.clearFaults()
    _ = try read(s, 0, 1)
  }

  @Test func powerFailureAndFsyncgate() throws {
    let s = SimulatedStorage(seed: 5)
    s.powerFail(after: 2)
    try write(s, 1, 10, at: 0)
    try s.sync()
    #expect(s.isPoweredOff)
    #expect(throws: StrataError.self) { try write(s, 2, 10, at: 0) }
    #expect(throws: StrataError.self) { _ = try read(s, 0, 1) }
    s.crash(mode: .keepUnsynced)
    #expect(try read(s, 0, 10) == [UInt8](repeating: 1, count: 10))
    // A failed sync that forgets the dirty pages: the next sync succeeds without them.
    s.failedSyncDropsUnsynced = true
    try write(s, 7, 10, at: 0)
    s.failNext(.sync)
    #expect(throws: StrataError.self) { try s.sync() }
    #expect(try read(s, 0, 1) == [7])  // still in the cache
    try s.sync()
    s.crash(mode: .keepUnsynced)
    #expect(try read(s, 0, 1) == [1])  // but never written
  }
}

// MARK: - Asynchronous write-out

@Suite("Asynchronous write-out")
struct AsyncWriteOutTests {
  /// Minimal case: a 2 MiB write makes the log write out a megabyte asynchronously
  /// (`submitWrite`), and nothing completes it before the next read of those blocks. The read
  /// goes to storage, where the write has not landed (an io_uring read can overtake an in-flight
  /// O_DIRECT write), instead of to the writer's buffer: it must still return the data.
  @Test func readOfBlocksWhoseWriteOutIsInFlight() throws {
    var options = stressOptions(clock: SimulatedClock())
    options.segmentSize = 4 << 20
    options.checkpointIntervalPages = 4096
    let storage = SimulatedStorage(seed: 1)
    let image = try StrataImage.create(storage: storage, virtualSize: 8 << 20, options: options)
    defer { image.abandon() }
    var rng = SeededRandom(seed: 2)
    let data = rng.bytes(2 << 20)
    try image.write(data, at: 0)
    try image.write(rng.bytes(4096), at: 4 << 20)  // a megabyte is pending: one of them writes it out
    #expect(storage.writesInFlight > 0, "the write-out completed already; the test needs it in flight")
    let got = try image.read(at: 0, count: 8192)
    #expect(sameBytes(got, Array(data[..<8192])), "read \(fingerprint(got)) instead of the data just written")
    try image.flush()
    #expect(storage.violations.isEmpty, "\(storage.violations)")
    try image.close()
  }
}

extension SimulatedStorageTests {
  @Test func writesInFlight() throws {
    let s = SimulatedStorage(seed: 6)
    try write(s, 1, 4096, at: 0)
    var buffer = [UInt8](repeating: 2, count: 8192)
    try buffer.withUnsafeBytes { try s.submitWrite($0, at: 0) }
    #expect(s.writesInFlight == 1)
    #expect(try read(s, 0, 8192) == [UInt8](repeating: 1, count: 4096))  // not landed: old bytes, old size
    s.readsSeeWritesInFlight = true
    #expect(try read(s, 0, 8192) == [UInt8](repeating: 2, count: 8192))
    s.readsSeeWritesInFlight = false
    try s.sync()  // covers completed writes only
    #expect(s.durable == [UInt8](repeating: 1, count: 4096))
    buffer[5] = 9  // changed before completion: a broken contract
    try s.completeWrites()
    #expect(s.violations.count == 1)
    #expect(try read(s, 0, 8) == [2, 2, 2, 2, 2, 2, 2, 2])  // what was submitted
    // A failure of a submitted write surfaces at completion.
    s.failNext(.write, errno: EIO)
    try buffer.withUnsafeBytes { try s.submitWrite($0, at: 8192) }
    #expect(throws: StrataError.self) { try s.completeWrites() }
    #expect(try read(s, 8192, 10).isEmpty)
    // A crash may keep or lose writes in flight.
    try buffer.withUnsafeBytes { try s.submitWrite($0, at: 8192) }
    s.crash(mode: .keepUnsynced)
    #expect(try read(s, 8192, 1) == [2])
  }
}
