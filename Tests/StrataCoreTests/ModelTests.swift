import StrataFormat
import StrataSimulation
import Testing

@testable import StrataCore

#if canImport(Glibc)
  import Glibc
#endif

// Model-based random testing: a seeded workload runs against the image and against a plain
// in-memory model of the disk; every read is compared. Small segments, a small node cache and
// frequent checkpoints make the interesting machinery (seals, checkpoints, evictions, map growth)
// run all the time. A failure names the seed and the operation index and prints the last
// operations, which is all it takes to replay it.

/// Seeds for a randomized test: `defaults`, or the ones in the environment variable
/// STRATA_SEEDS ("7", "1,5,9" or "100-199") to replay a failure or soak many seeds.
func testSeeds(_ defaults: [UInt64]) -> [UInt64] {
  guard let raw = getenv("STRATA_SEEDS") else { return defaults }
  var seeds: [UInt64] = []
  for part in String(cString: raw).split(separator: ",") {
    let bounds = part.split(separator: "-").compactMap { UInt64(String($0.filter { !$0.isWhitespace })) }
    if bounds.count == 2, bounds[0] <= bounds[1] {
      seeds += Array(bounds[0]...bounds[1])
    } else if bounds.count == 1 {
      seeds.append(bounds[0])
    }
  }
  return seeds.isEmpty ? defaults : seeds
}

// MARK: - The model

/// A sparse model of a virtual disk in 4 KiB blocks: only blocks that are not all zeros are
/// stored, so a 16 TiB disk costs nothing.
struct DiskModel {
  static let blockSize = 4096
  static let bs = UInt64(blockSize)

  var size: UInt64
  /// Blocks that hold something other than zeros; each is `blockSize` bytes.
  private(set) var blocks: [UInt64: [UInt8]] = [:]

  init(size: UInt64) { self.size = size }

  var blockCount: UInt64 { (size + Self.bs - 1) / Self.bs }

  /// The content of block `b` (nil: all zeros).
  func block(_ b: UInt64) -> [UInt8]? { blocks[b] }

  func read(_ offset: UInt64, _ count: Int) -> [UInt8] {
    var out = [UInt8](repeating: 0, count: count)
    out.withUnsafeMutableBytes { dst in
      var done = 0
      while done < count {
        let position = offset + UInt64(done)
        let b = position / Self.bs
        let inBlock = Int(position % Self.bs)
        let n = min(Self.blockSize - inBlock, count - done)
        if let stored = blocks[b] {
          stored.withUnsafeBytes { src in
            UnsafeMutableRawBufferPointer(rebasing: dst[done..<(done + n)])
              .copyMemory(from: UnsafeRawBufferPointer(rebasing: src[inBlock..<(inBlock + n)]))
          }
        }
        done += n
      }
    }
    return out
  }

  mutating func write(_ data: [UInt8], at offset: UInt64) {
    data.withUnsafeBytes { src in
      var done = 0
      while done < data.count {
        let position = offset + UInt64(done)
        let b = position / Self.bs
        let inBlock = Int(position % Self.bs)
        let n = min(Self.blockSize - inBlock, data.count - done)
        var stored = blocks[b] ?? [UInt8](repeating: 0, count: Self.blockSize)
        stored.withUnsafeMutableBytes { dst in
          UnsafeMutableRawBufferPointer(rebasing: dst[inBlock..<(inBlock + n)])
            .copyMemory(from: UnsafeRawBufferPointer(rebasing: src[done..<(done + n)]))
        }
        set(b, stored)
        done += n
      }
    }
  }

  /// Block `b` holds `content` (nil or all zeros: nothing stored).
  mutating func set(_ b: UInt64, _ content: [UInt8]?) {
    if let content, !allZero(content) { blocks[b] = content } else { blocks[b] = nil }
  }

  /// `writeZeroes`: exactly the range reads as zeros.
  mutating func zero(at offset: UInt64, length: UInt64) {
    let end = offset + length
    for b in keys(in: (offset / Self.bs)..<((end + Self.bs - 1) / Self.bs)) {
      let lo = max(offset, b * Self.bs)
      let hi = min(end, (b + 1) * Self.bs)
      if lo == b * Self.bs && hi == (b + 1) * Self.bs {
        blocks[b] = nil
      } else if var stored = blocks[b] {
        for i in Int(lo - b * Self.bs)..<Int(hi - b * Self.bs) { stored[i] = 0 }
        set(b, stored)
      }
    }
  }

  /// `discard`: whole blocks inside the range read as zeros, partial edge blocks are unchanged.
  mutating func discard(at offset: UInt64, length: UInt64) {
    let first = (offset + Self.bs - 1) / Self.bs
    let end = (offset + length) / Self.bs
    guard first < end else { return }
    for b in keys(in: first..<end) { blocks[b] = nil }
  }

  /// Growing adds zeros; shrinking drops the blocks past the new end and clears the bytes
  /// past it in the last block (so that a later grow reads zeros there).
  mutating func resize(to newSize: UInt64) {
    if newSize < size {
      let keep = (newSize + Self.bs - 1) / Self.bs
      for b in keys(in: keep..<UInt64.max) { blocks[b] = nil }
      if newSize % Self.bs != 0 { zero(at: newSize, length: keep * Self.bs - newSize) }
    }
    size = newSize
  }

  /// The stored (non-zero) blocks in `range`, ascending.
  func keys(in range: Range<UInt64>) -> [UInt64] {
    if range.upperBound - range.lowerBound < UInt64(4 * blocks.count + 64) {
      return range.filter { blocks[$0] != nil }
    }
    return blocks.keys.filter { range.contains($0) }.sorted()
  }

  var storedBlocks: [UInt64] { blocks.keys.sorted() }
}

func allZero(_ bytes: [UInt8]) -> Bool {
  bytes.withUnsafeBytes { isAllZero($0) }
}

/// Byte equality via memcmp (element-wise comparison is slow in debug builds).
func sameBytes(_ a: [UInt8], _ b: [UInt8]) -> Bool {
  a.count == b.count
    && a.withUnsafeBytes { x in
      b.withUnsafeBytes { y in a.isEmpty || memcmp(x.baseAddress!, y.baseAddress!, a.count) == 0 }
    }
}

func sameBytes(_ a: ArraySlice<UInt8>, _ b: ArraySlice<UInt8>) -> Bool {
  a.count == b.count
    && a.withUnsafeBytes { x in
      b.withUnsafeBytes { y in a.isEmpty || memcmp(x.baseAddress!, y.baseAddress!, a.count) == 0 }
    }
}

func firstDifference(_ a: [UInt8], _ b: [UInt8]) -> String {
  let i = (0..<min(a.count, b.count)).first { a[$0] != b[$0] } ?? min(a.count, b.count)
  let show = { (x: [UInt8]) in i < x.count ? String(x[i], radix: 16) : "end" }
  return "first difference at byte \(i) (read \(show(a)), expected \(show(b))), lengths \(a.count)/\(b.count)"
}

// MARK: - Run scaffolding

/// Thrown to end a run at its first failure (the failure itself is recorded as an issue).
struct RunAborted: Error, CustomStringConvertible {
  var description: String
}

/// Where a run is, for failure messages: the seed, the operation index and the recent history.
final class RunLog {
  let name: String
  let seed: UInt64
  var index = 0
  /// Off when the caller collects failures itself (the issue is still thrown).
  var recordsIssues = true
  private var recent: [String] = []

  init(_ name: String, seed: UInt64) {
    self.name = name
    self.seed = seed
  }

  func note(_ what: String) {
    recent.append("#\(index) \(what)")
    if recent.count > 40 { recent.removeFirst(recent.count - 40) }
  }

  var position: String { "\(name) seed \(seed) op \(index)" }

  /// Records an issue naming the seed and op, and ends the run.
  func fail(_ message: String, sourceLocation: SourceLocation = #_sourceLocation) -> RunAborted {
    let text = "\(position): \(message)\nlast operations:\n  " + recent.joined(separator: "\n  ")
    if recordsIssues { Issue.record(Comment(rawValue: text), sourceLocation: sourceLocation) }
    return RunAborted(description: text)
  }

  func check(_ condition: Bool, _ message: @autoclosure () -> String, sourceLocation: SourceLocation = #_sourceLocation)
    throws
  {
    if !condition { throw fail(message(), sourceLocation: sourceLocation) }
  }

  /// Runs `body`; an unexpected error becomes a failure naming the seed and op.
  func run<T>(_ what: String, sourceLocation: SourceLocation = #_sourceLocation, _ body: () throws -> T) throws -> T {
    do {
      return try body()
    } catch let e as RunAborted {
      throw e
    } catch {
      throw fail("\(what) threw \(error)", sourceLocation: sourceLocation)
    }
  }
}

/// Small limits so that segments seal, checkpoints happen and the node cache evicts constantly.
func stressOptions(clock: SimulatedClock) -> ImageOptions {
  var o = ImageOptions()
  o.segmentSize = Layout.minSegmentSize
  o.mapCacheNodes = 16
  o.maxDirtyNodes = 16
  o.checkpointIntervalPages = 64
  o.clock = clock.function
  return o
}

extension StrataImage {
  /// Forgets an image without closing it (after a simulated crash): its storage is gone.
  func abandon() {
    if !isClosed { isClosed = true }
  }
}

/// The live-page and data-block accounting of the head equals a recount from the map.
func checkAccounting(_ image: StrataImage, _ log: RunLog, sourceLocation: SourceLocation = #_sourceLocation) throws {
  let count = try log.run("recount", sourceLocation: sourceLocation) { try image.recount() }
  let stored = image.usage.entries.map(\.livePages)
  try log.check(
    count.livePages == stored, "usage table says live pages \(stored), recount says \(count.livePages)",
    sourceLocation: sourceLocation)
  try log.check(
    count.dataBlocks == image.map.dataBlocks,
    "map says \(image.map.dataBlocks) data blocks, recount says \(count.dataBlocks)", sourceLocation: sourceLocation)
}

/// Reads `count` bytes at `offset` from the image and compares them with the model.
func compareRead(
  _ read: (UInt64, Int) throws -> [UInt8], _ model: DiskModel, _ offset: UInt64, _ count: Int, _ what: String,
  _ log: RunLog, sourceLocation: SourceLocation = #_sourceLocation
) throws {
  let got = try log.run("\(what) read \(offset)+\(count)", sourceLocation: sourceLocation) { try read(offset, count) }
  let want = model.read(offset, count)
  if !sameBytes(got, want) {
    throw log.fail("\(what) read \(offset)+\(count): \(firstDifference(got, want))", sourceLocation: sourceLocation)
  }
}

/// Every stored block of the model, and a few random ranges, read back the same from the image.
func compareAll(
  _ read: (UInt64, Int) throws -> [UInt8], _ model: DiskModel, _ what: String, _ log: RunLog, rng: inout SeededRandom
) throws {
  let bs = DiskModel.bs
  for b in model.storedBlocks where b * bs < model.size {
    try compareRead(read, model, b * bs, Int(min(bs, model.size - b * bs)), what, log)
  }
  for _ in 0..<8 {
    let count = rng.int(in: 1...65536)
    guard UInt64(count) <= model.size else { continue }
    try compareRead(read, model, rng.uint64(in: 0...(model.size - UInt64(count))), count, what, log)
  }
}

// MARK: - The workload generator

/// Picks offsets and lengths: mostly inside a few hot zones (so that operations overlap), some
/// anywhere, some at the end of the disk.
struct Workload {
  var rng: SeededRandom
  var zones: [UInt64] = []
  let zoneSize: UInt64 = 3 << 20

  init(rng: SeededRandom) { self.rng = rng }

  mutating func length(max: Int = 300 << 10) -> Int {
    switch rng.int(in: 0..<10) {
    case 0..<4: rng.int(in: 1...4096)
    case 4..<6: rng.int(in: 1...8) * 4096  // block aligned sizes
    case 6..<8: rng.int(in: 4097...65536)
    default: rng.int(in: 1...max)
    }
  }

  /// A range of `length` bytes (clipped to the disk) somewhere useful on a disk of `size` bytes.
  mutating func range(size: UInt64, length: Int) -> (UInt64, Int) {
    let length = UInt64(min(UInt64(length), size))
    let span = size - length
    let offset: UInt64
    switch rng.int(in: 0..<20) {
    case 0..<14:
      if zones.isEmpty || rng.chance(0.02) { zones.append(rng.uint64(in: 0...size)) }
      if zones.count > 4 { zones.removeFirst() }
      let z = min(rng.element(of: zones)!, span)
      let within = rng.uint64(in: 0...min(zoneSize, span - z))
      // Half the time block aligned, so whole-block paths run too.
      offset = rng.bool() ? within / 4096 * 4096 + z / 4096 * 4096 : z + within
    case 14..<17:
      offset = rng.uint64(in: 0...span)
    default:
      offset = span - rng.uint64(in: 0...min(span, 3 * 4096))  // at or near the end
    }
    return (min(offset, span), Int(length))
  }

  /// Data to write at `offset`: random bytes, zeros, a fill byte, or a mix of zero and random
  /// blocks (so that writes split into data and zero runs).
  mutating func data(count: Int, at offset: UInt64) -> [UInt8] {
    switch rng.int(in: 0..<10) {
    case 0..<6:
      return rng.bytes(count)
    case 6:
      return [UInt8](repeating: 0, count: count)
    case 7:
      return [UInt8](repeating: UInt8(rng.int(in: 1...255)), count: count)
    default:
      var out = rng.bytes(count)
      var i = 0
      while i < count {
        let end = min(count, Int((offset + UInt64(i)) / 4096 * 4096 + 4096 - offset))
        if rng.bool() { for j in i..<end { out[j] = 0 } }
        i = end
      }
      return out
    }
  }
}

// MARK: - The model test

struct ModelConfig {
  var virtualSize: UInt64
  var operations: Int
  var maxSnapshots = 5
  /// 1 MiB: seals all the time. Larger: the log also writes out (asynchronously) in the middle
  /// of a segment, so reads meet pages still in flight.
  var segmentSize = Layout.minSegmentSize
}

/// One seeded run of the random workload against `DiskModel`.
func runModel(seed: UInt64, _ config: ModelConfig) throws {
  let log = RunLog("model", seed: seed)
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

  var head = DiskModel(size: config.virtualSize)
  var snapshots: [String: DiskModel] = [:]
  var snapshotOrder: [String] = []
  var views: [String: SnapshotView] = [:]
  var nextSnapshot = 0
  let read = { (o: UInt64, n: Int) in try image.read(at: o, count: n) }

  for i in 0..<config.operations {
    log.index = i
    let roll = rng.int(in: 0..<1000)
    switch roll {
    case 0..<330:  // write
      let (offset, count) = work.range(size: head.size, length: work.length())
      let data = work.data(count: count, at: offset)
      log.note("write \(offset)+\(count)")
      try log.run("write \(offset)+\(count)") { try image.write(data, at: offset) }
      head.write(data, at: offset)
      // Read back right away: partial blocks were merged with the old contents.
      if rng.chance(0.3) { try compareRead(read, head, offset, count, "head", log) }
    case 330..<345:  // a write across the end of the disk is refused and changes nothing
      let count = work.length(max: 16384) + 1
      let offset = head.size - UInt64(rng.int(in: 0..<min(count, Int(min(head.size, 1 << 20)))))
      log.note("write past the end \(offset)+\(count)")
      do {
        try image.write(rng.bytes(count), at: offset)
        throw log.fail("write \(offset)+\(count) past the \(head.size)-byte end succeeded")
      } catch let e as StrataError {
        try log.check(e.code == .outOfRange, "write past the end threw \(e.code): \(e)")
      }
      let tail = min(head.size, 8192)
      try compareRead(read, head, head.size - tail, Int(tail), "head", log)
    case 345..<600:  // read
      let (offset, count) = work.range(size: head.size, length: work.length())
      log.note("read \(offset)+\(count)")
      try compareRead(read, head, offset, count, "head", log)
    case 600..<650:  // discard
      let (offset, count) = work.range(size: head.size, length: work.length(max: 1 << 20))
      log.note("discard \(offset)+\(count)")
      try log.run("discard") { try image.discard(at: offset, length: UInt64(count)) }
      head.discard(at: offset, length: UInt64(count))
      if rng.chance(0.5) {
        let lo = offset >= 4096 ? offset - 4096 : 0
        try compareRead(read, head, lo, Int(min(UInt64(count) + 8192, head.size - lo)), "head", log)
      }
    case 650..<700:  // writeZeroes
      let (offset, count) = work.range(size: head.size, length: work.length(max: 1 << 20))
      log.note("writeZeroes \(offset)+\(count)")
      try log.run("writeZeroes") { try image.writeZeroes(at: offset, length: UInt64(count)) }
      head.zero(at: offset, length: UInt64(count))
      if rng.chance(0.5) {
        let lo = offset >= 4096 ? offset - 4096 : 0
        try compareRead(read, head, lo, Int(min(UInt64(count) + 8192, head.size - lo)), "head", log)
      }
    case 700..<740:  // flush
      log.note("flush")
      try log.run("flush") { try image.flush() }
    case 740..<775:  // snapshot
      if snapshots.count >= config.maxSnapshots, let victim = rng.element(of: snapshotOrder) {
        log.note("delete snapshot \(victim) (full)")
        try log.run("deleteSnapshot \(victim)") { try image.deleteSnapshot(name: victim) }
        snapshots[victim] = nil
        views[victim] = nil
        snapshotOrder.removeAll { $0 == victim }
      }
      nextSnapshot += 1
      let name = "snap-\(nextSnapshot)"
      log.note("create snapshot \(name)")
      let info = try log.run("createSnapshot \(name)") { try image.createSnapshot(name: name) }
      try log.check(info.name == name, "createSnapshot returned \(info)")
      snapshots[name] = head
      snapshotOrder.append(name)
      // Creating an existing name is refused.
      do {
        try image.createSnapshot(name: name)
        throw log.fail("a second snapshot named \(name) was created")
      } catch let e as StrataError {
        try log.check(e.code == .alreadyExists, "duplicate snapshot threw \(e.code)")
      }
    case 775..<790:  // delete a snapshot
      guard let victim = rng.element(of: snapshotOrder) else { continue }
      log.note("delete snapshot \(victim)")
      try log.run("deleteSnapshot \(victim)") { try image.deleteSnapshot(name: victim) }
      snapshots[victim] = nil
      views[victim] = nil
      snapshotOrder.removeAll { $0 == victim }
      do {
        _ = try image.snapshotView(name: victim)
        throw log.fail("deleted snapshot \(victim) still has a view")
      } catch let e as StrataError {
        try log.check(e.code == .notFound, "view of a deleted snapshot threw \(e.code)")
      }
    case 790..<870:  // read a snapshot view (kept open while the head changes)
      guard let name = rng.element(of: snapshotOrder), let frozen = snapshots[name] else { continue }
      let view: SnapshotView
      if let v = views[name], rng.chance(0.8) {
        view = v
      } else {
        log.note("open view \(name)")
        view = try log.run("snapshotView \(name)") { try image.snapshotView(name: name) }
        views[name] = view
      }
      try log.check(view.size == frozen.size, "view \(name) has size \(view.size), expected \(frozen.size)")
      let (offset, count) = work.range(size: frozen.size, length: work.length())
      log.note("view \(name) read \(offset)+\(count)")
      try compareRead({ try view.read(at: $0, count: $1) }, frozen, offset, count, "view \(name)", log)
      if let b = rng.element(of: frozen.storedBlocks), b * 4096 < frozen.size {
        try compareRead(
          { try view.read(at: $0, count: $1) }, frozen, b * 4096, Int(min(4096, frozen.size - b * 4096)),
          "view \(name)", log)
      }
    case 870..<890:  // restore
      guard let name = rng.element(of: snapshotOrder), let frozen = snapshots[name] else { continue }
      log.note("restore \(name)")
      try log.run("restore \(name)") { try image.restore(snapshot: name) }
      head = frozen
      try log.check(image.size == head.size, "restored size \(image.size), expected \(head.size)")
      try compareAll(read, head, "head after restore", log, rng: &rng)
    case 890..<902:  // grow
      let grow: UInt64 = rng.chance(0.1) ? UInt64(rng.int(in: 1...64)) << 20 : UInt64(rng.int(in: 1...4096)) * 512
      let newSize = head.size + grow
      log.note("resize \(head.size) -> \(newSize)")
      try log.run("resize") { try image.resize(to: newSize) }
      head.resize(to: newSize)
      try log.check(image.size == newSize, "size \(image.size) after resize to \(newSize)")
      let tail = min(grow + 8192, newSize)
      try compareRead(read, head, newSize - tail, Int(min(tail, 1 << 20)), "head after grow", log)
    case 902..<905:  // shrink (refused without allowShrink), to an unaligned size now and then
      let cut = min(head.size - 512, UInt64(rng.int(in: 1...4096)) * 512)
      let newSize = head.size - cut
      log.note("resize \(head.size) -> \(newSize)")
      do {
        try image.resize(to: newSize)
        throw log.fail("shrinking without allowShrink succeeded")
      } catch let e as StrataError {
        try log.check(e.code == .invalidArgument, "unconfirmed shrink threw \(e.code)")
      }
      try log.run("shrink") { try image.resize(to: newSize, allowShrink: true) }
      head.resize(to: newSize)
      try log.check(image.size == newSize, "size \(image.size) after resize to \(newSize)")
      try compareRead(read, head, newSize - min(newSize, 8192), Int(min(newSize, 8192)), "head after shrink", log)
    case 905..<925:  // close and reopen
      log.note("close and reopen")
      try log.run("close") { try image.close() }
      storage.reopen()
      image = try log.run("open") { try StrataImage.open(storage: storage, options: options) }
      views.removeAll()
      try checkAccounting(image, log)
      try log.check(image.size == head.size, "reopened size \(image.size), expected \(head.size)")
      try log.check(
        Set(try image.snapshots.map(\.name)) == Set(snapshotOrder),
        "reopened snapshots, expected \(snapshotOrder)")
      try compareAll(read, head, "head after reopen", log, rng: &rng)
    case 925..<940:  // extents agree with the model
      let (offset, count) = work.range(size: head.size, length: work.length(max: 4 << 20))
      log.note("extents \(offset)+\(count)")
      let extents = try log.run("extents") { try image.extents(from: offset, length: UInt64(count)) }
      var position = offset
      for e in extents {
        try log.check(e.offset == position && e.length > 0, "extents not contiguous at \(position): \(extents)")
        position += e.length
        if e.state != .data {
          // Ranges that are not data read as zeros.
          for b in head.keys(in: (e.offset / 4096)..<((e.offset + e.length + 4095) / 4096)) {
            let lo = max(e.offset, b * 4096)
            let hi = min(e.offset + e.length, (b + 1) * 4096)
            try log.check(
              allZero(head.read(lo, Int(hi - lo))), "extent \(e) is \(e.state) but the model holds data at \(lo)")
          }
        }
      }
      try log.check(
        position == offset + UInt64(count), "extents end at \(position), expected \(offset + UInt64(count))")
    default:  // accounting, now and then
      log.note("recount")
      try log.check(storage.violations.isEmpty, "storage contract broken: \(storage.violations)")
      try checkAccounting(image, log)
      try log.check(
        image.pages.cache.count <= options.mapCacheNodes,
        "node cache holds \(image.pages.cache.count) > \(options.mapCacheNodes)")
    }
  }

  log.index = config.operations
  log.note("final checks")
  try log.check(storage.violations.isEmpty, "storage contract broken: \(storage.violations)")
  try checkAccounting(image, log)
  try compareAll(read, head, "head at the end", log, rng: &rng)
  for (name, frozen) in snapshots {
    let view = try log.run("snapshotView \(name)") { try image.snapshotView(name: name) }
    try compareAll({ try view.read(at: $0, count: $1) }, frozen, "view \(name) at the end", log, rng: &rng)
  }
  try log.run("close") { try image.close() }
  storage.reopen()
  image = try log.run("final open") { try StrataImage.open(storage: storage, options: options) }
  try checkAccounting(image, log)
  try compareAll(read, head, "head after the final reopen", log, rng: &rng)
  let report = try log.run("check") { try image.check() }
  try log.check(report.errors.isEmpty, "check found errors: \(report.errors)")
  try log.run("close") { try image.close() }
}

@Suite("Model-based random workload")
struct ModelTests {
  /// Several seeds, small disks with an unaligned end (the last block is partial).
  /// Odd seeds use 1 MiB segments, even ones 4 MiB (write-outs in the middle of a segment).
  @Test(arguments: testSeeds([1, 2, 3, 4]))
  func randomWorkload(seed: UInt64) throws {
    var config = ModelConfig(virtualSize: (8 << 20) + 1536, operations: 3000)
    if seed % 2 == 0 { config.segmentSize = 4 << 20 }
    try runModel(seed: seed, config)
  }

  /// A disk large enough for a three-level map, with writes spread wide.
  @Test(arguments: testSeeds([77]))
  func randomWorkloadDeepMap(seed: UInt64) throws {
    try runModel(seed: seed, ModelConfig(virtualSize: (1 << 30) + 512, operations: 2000))
  }
}
