@_spi(Simulation) import StrataCore
import StrataFormat
import StrataSimulation

/// A violated invariant: names the run, the seed, the operation and the recent history, which
/// is all it takes to replay it.
public struct SimulationFailure: Error, CustomStringConvertible, Sendable {
  public var seed: UInt64
  public var operation: Int
  /// What failed, without the history.
  public var reason: String
  /// The whole report: position, reason and the last operations.
  public var description: String
}

/// Where a run is, for failure messages: the seed, the operation index and the recent history.
public final class RunLog {
  public let name: String
  public let seed: UInt64
  public var index = 0
  /// Called with every note (the simulator's `--verbose`).
  public var echo: ((String) -> Void)?
  private var recent: [String] = []

  public init(_ name: String, seed: UInt64) {
    self.name = name
    self.seed = seed
  }

  public func note(_ what: String) {
    let line = "#\(index) \(what)"
    echo?(line)
    recent.append(line)
    if recent.count > 40 { recent.removeFirst(recent.count - 40) }
  }

  public var position: String { "\(name) seed \(seed) op \(index)" }

  /// The failure to throw: it names the seed and op and lists the last operations.
  public func fail(_ message: String) -> SimulationFailure {
    SimulationFailure(
      seed: seed, operation: index, reason: message,
      description: "\(position): \(message)\nlast operations:\n  " + recent.joined(separator: "\n  "))
  }

  public func check(_ condition: Bool, _ message: @autoclosure () -> String) throws {
    if !condition { throw fail(message()) }
  }

  /// Runs `body`; an unexpected error becomes a failure naming the seed and op.
  public func run<T>(_ what: String, _ body: () throws -> T) throws -> T {
    do {
      return try body()
    } catch let e as SimulationFailure {
      throw e
    } catch {
      throw fail("\(what) threw \(error)")
    }
  }
}

/// Small limits so that segments seal, checkpoints happen and the node cache evicts constantly;
/// a fixed image ID and a simulated clock so that a seed reproduces the image byte for byte.
public func stressOptions(clock: SimulatedClock) -> ImageOptions {
  var o = ImageOptions()
  o.segmentSize = Layout.minSegmentSize
  o.mapCacheNodes = 16
  o.maxDirtyNodes = 16
  o.checkpointIntervalPages = 64
  o.clock = clock.function
  o.imageID = Array(0..<16)
  return o
}

/// The live-page and data-block accounting of the head equals a recount from the map.
public func checkAccounting(_ image: StrataImage, _ log: RunLog) throws {
  if let mismatch = try log.run("recount", { try image.accountingMismatch() }) { throw log.fail(mismatch) }
}

/// Reads `count` bytes at `offset` through `read` and compares them with the model.
public func compareRead(
  _ read: (UInt64, Int) throws -> [UInt8], _ model: DiskModel, _ offset: UInt64, _ count: Int, _ what: String,
  _ log: RunLog
) throws {
  let got = try log.run("\(what) read \(offset)+\(count)") { try read(offset, count) }
  let want = model.read(offset, count)
  if !sameBytes(got, want) { throw log.fail("\(what) read \(offset)+\(count): \(firstDifference(got, want))") }
}

/// Every stored block of the model, and a few random ranges, read back the same.
public func compareAll(
  _ read: (UInt64, Int) throws -> [UInt8], _ model: DiskModel, _ what: String, _ log: RunLog,
  rng: inout SeededRandom
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
