@_spi(Simulation) import StrataCore
import StrataSimulation

/// What an image was seen to hold: its head and its snapshots, each block checked against
/// what the model allows.
public struct Observed: Sendable {
  public var head: DiskModel
  public var snapshots: [String: DiskModel] = [:]
  /// Snapshot names in the image's order.
  public var order: [String] = []
}

/// Reads the image back and checks it against `model`:
///   - every block reads its content as of the last completed flush, or one of the contents it
///     had since (never anything else: no garbage, no older data, no data of another block);
///   - the size is one the disk had since the last flush;
///   - the snapshots that were flushed (and not deleted since) exist, every snapshot is one the
///     model knows, and its view reads exactly what the head held when it was taken.
/// `fullScan` reads every block; otherwise the tracked ones and every data extent.
public func observe(_ image: StrataImage, _ model: CrashModel, _ log: RunLog, fullScan: Bool, what: String) throws
  -> Observed
{
  let bs = DiskModel.bs
  let size = image.size
  try log.check(model.sizes.contains(size), "\(what): size \(size) is none of \(model.sizes.sorted())")
  let blockCount = (size + bs - 1) / bs
  let tracked = model.trackedBlocks
  var toCheck = fullScan ? Set(0..<blockCount) : tracked.filter { $0 < blockCount }
  if !fullScan {
    // Data the model does not know about must read as zeros (it cannot be data, but look).
    let extents = try log.run("\(what): extents") { try image.extents() }
    var extra = 0
    for e in extents where e.state == .data {
      for b in DiskModel.blocks(e.offset, e.length) where !tracked.contains(b) && extra < 4096 {
        toCheck.insert(b)
        extra += 1
      }
    }
  }
  // A full scan does not read the blocks the map says are holes (unallocated, zero): a hole
  // must be allowed to read as zeros, and a few of them are read to check that they do.
  // (Reading every hole made up most of a debug-build run.)
  var holes = Set<UInt64>()
  if fullScan {
    let extents = try log.run("\(what): extents") { try image.extents() }
    holes = holeBlocks(extents, size: size)
    for b in holes where !model.allowed(b).contains(where: { content in content.map(allZero) ?? true }) {
      holes.remove(b)  // read below, which reports it
    }
    holes.subtract(sample(holes, 4))
  }
  var seen = Observed(head: DiskModel(size: size))
  for b in toCheck.sorted() where !holes.contains(b) {
    let n = Int(min(bs, size - b * bs))
    let got = try log.run("\(what): read block \(b)") { try image.read(at: b * bs, count: n) }
    let allowed = model.allowed(b)
    if !allowed.contains(where: { blockMatches(got, $0) }) {
      throw log.fail(
        "\(what): block \(b) reads \(fingerprint(got)); allowed: flushed \(fingerprint(allowed[0]))"
          + (allowed.count > 1 ? ", then " + allowed.dropFirst().map(fingerprint).joined(separator: ", ") : ""))
    }
    if !allZero(got) { seen.head.set(b, got + [UInt8](repeating: 0, count: DiskModel.blockSize - n)) }
  }

  let names = try log.run("\(what): list snapshots") { try image.snapshots.map(\.name) }
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
    var blocks = fullScan ? Set(0..<viewBlocks) : tracked.union(frozen.storedBlocks).filter { $0 < viewBlocks }
    if fullScan {
      let extents = try log.run("\(what): view \(name) extents") { try view.extents() }
      let viewHoles = holeBlocks(extents, size: frozen.size)
      let skip = viewHoles.subtracting(sample(viewHoles, 2))
      blocks = blocks.filter { !skip.contains($0) || frozen.block($0) != nil }
    }
    for b in blocks.sorted() {
      let n = Int(min(bs, frozen.size - b * bs))
      let got = try log.run("\(what): view \(name) read block \(b)") { try view.read(at: b * bs, count: n) }
      try log.check(
        blockMatches(got, frozen.block(b)),
        "\(what): view \(name) block \(b) reads \(fingerprint(got)), expected \(fingerprint(frozen.block(b)))")
    }
    seen.snapshots[name] = frozen
    seen.order.append(name)
  }
  return seen
}

/// The blocks that `extents` (of a disk of `size` bytes) show wholly unallocated or zero.
func holeBlocks(_ extents: [Extent], size: UInt64) -> Set<UInt64> {
  let bs = DiskModel.bs
  var out = Set<UInt64>()
  for e in extents where e.state != .data {
    let first = (e.offset + bs - 1) / bs
    let end = e.offset + e.length
    let last = end >= size ? (size + bs - 1) / bs : end / bs
    if first < last { out.formUnion(first..<last) }
  }
  return out
}

/// Up to `count` of `blocks`, spread evenly (deterministic).
func sample(_ blocks: Set<UInt64>, _ count: Int) -> [UInt64] {
  let sorted = blocks.sorted()
  guard !sorted.isEmpty, count > 0 else { return [] }
  let step = max(1, sorted.count / count)
  return stride(from: step / 2, to: sorted.count, by: step).prefix(count).map { sorted[$0] }
}

/// Checks a freshly recovered image against the model (see `observe`), its accounting against
/// a recount, and that `check` finds no errors. Returns the model of what it holds, durable:
/// after a crash nothing is left unsynced.
public func verifyRecovered(_ image: StrataImage, _ model: CrashModel, _ log: RunLog, fullScan: Bool, what: String)
  throws -> CrashModel
{
  try log.check(image.recoveryProblems.isEmpty, "\(what): recovery reports problems: \(image.recoveryProblems)")
  let seen = try observe(image, model, log, fullScan: fullScan, what: what)
  var recovered = CrashModel(size: seen.head.size)
  recovered.adopt(seen)
  recovered.markDurable()
  try checkClean(image, log, what: what)
  return recovered
}

/// The accounting matches a recount and `check` finds no errors.
public func checkClean(_ image: StrataImage, _ log: RunLog, what: String) throws {
  try checkAccounting(image, log)
  let report = try log.run("\(what): check") { try image.check() }
  try log.check(report.errors.isEmpty, "\(what): check found errors: \(report.errors)")
}

/// Opens the image after a crash and checks it against the model; returns the image and the
/// model of what it now holds.
public func openAndVerify(
  _ storage: SimulatedStorage, _ options: ImageOptions, _ model: CrashModel, _ log: RunLog, fullScan: Bool,
  what: String
) throws -> (StrataImage, CrashModel) {
  try openAndVerify(storage, options, [model], log, fullScan: fullScan, what: what)
}

/// Opens the image after a crash and checks it against each of `models` in turn: it must match
/// one of them (the first failure is reported when it matches none).
public func openAndVerify(
  _ storage: SimulatedStorage, _ options: ImageOptions, _ models: [CrashModel], _ log: RunLog, fullScan: Bool,
  what: String
) throws -> (StrataImage, CrashModel) {
  let image = try log.run("open after \(what)") { try StrataImage.open(storage: storage, options: options) }
  do {
    var first: SimulationFailure?
    for (i, model) in models.enumerated() {
      do {
        let recovered = try verifyRecovered(image, model, log, fullScan: fullScan, what: what)
        if i > 0 { log.note("\(what): matches alternative \(i)") }
        return (image, recovered)
      } catch let f as SimulationFailure {
        if first == nil { first = f }
      }
    }
    if let first {
      if models.count == 1 { throw first }
      throw log.fail("\(what): the image matches none of \(models.count) allowed states; first: \(first.reason)")
    }
    throw log.fail("\(what): no model to check against")
  } catch {
    image.abandon()
    throw error
  }
}
