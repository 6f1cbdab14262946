import ArgumentParser
import StrataSimulation
import StrataSimulator

#if canImport(Glibc)
  import Glibc
#endif

/// `strata-sim`: runs the seeded crash and fault workload (see `Simulation`) for one seed or many.
/// This file only parses arguments and prints; the work is in StrataSimulator.
@main
struct StrataSim: ParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "strata-sim",
    abstract: "Deterministic crash and I/O-error simulation of Strata images.",
    discussion: """
      Runs a seeded random workload (writes, reads, discards, write-zeroes, flushes, group commits, \
      snapshots, point-in-time reads, restores to snapshots and flush points, resizes, reopens, \
      external clones) over fault-injecting storage, with power losses at random points \
      and EIO/ENOSPC on reads, writes, syncs and preallocation, checking every flushed write against \
      a model and `check` after every recovery. The same seed replays the same run. Exits 0 when \
      every invariant held, 1 with the seed, the operation and what failed otherwise.
      """)

  @Option(help: "Run this one seed.") var seed: UInt64?
  @Option(help: "Run this many seeds, from --first-seed on.") var seeds: Int?
  @Option(help: "The first seed of --seeds.") var firstSeed: UInt64 = 1
  @Option(help: "Operations per seed.") var ops = 1000
  @Option(help: "Virtual disk size in bytes (a multiple of 512).") var size: UInt64 = (6 << 20) + 3584
  @Option(help: "Log segment size in MiB (default: 1 for odd seeds, 4 for even ones).") var segmentMib: Int?
  @Option(help: "Per operation: chance of a power loss right after it.") var crashChance = 0.02
  @Option(help: "Per operation: chance that the power fails inside one of the next operations.")
  var powerFailChance = 0.02
  @Option(help: "Per operation: chance of arming an injected I/O error.") var faultChance = 0.01
  @Option(help: "Calls that injected errors hit: read, write, sync, fallocate (comma-separated, or none).")
  var faults = "read,write,sync,fallocate"
  @Option(help: "Errors to inject: EIO, ENOSPC (comma-separated).") var errnos = "EIO,ENOSPC"
  @Option(
    help:
      "What power losses keep of unsynced writes, cycled: drop, keep, subset, torn-byte, torn-sector, sectors (comma-separated, or all)."
  )
  var crashModes = "all"
  @Flag(help: "After a crash read only the blocks the model tracks and the data extents, not every block.")
  var sparseCheck = false
  @Flag(help: "Spread offsets over the whole disk instead of a few hot zones (for huge disks).") var spread = false
  @Flag(help: "With --seeds, run every seed even after a failure.") var keepGoing = false
  @Flag(help: "Print every operation.") var verbose = false

  func validate() throws {
    guard (seed == nil) != (seeds == nil) else { throw ValidationError("give either --seed S or --seeds N") }
    if let seeds, seeds < 1 { throw ValidationError("--seeds must be at least 1") }
    guard ops >= 0 else { throw ValidationError("--ops must not be negative") }
    guard size > 0, size % 512 == 0 else { throw ValidationError("--size must be a positive multiple of 512") }
    for p in [crashChance, powerFailChance, faultChance] where !(0...1).contains(p) {
      throw ValidationError("chances lie between 0 and 1")
    }
    _ = try config()
  }

  func config() throws -> SimulationConfig {
    var c = SimulationConfig()
    c.virtualSize = size
    c.operations = ops
    c.segmentSize = segmentMib.map { $0 << 20 }
    c.fullScan = !sparseCheck
    c.spread = spread
    c.crashChance = crashChance
    c.powerFailChance = powerFailChance
    c.faultChance = faultChance
    let calls: [String: SimulatedStorage.Operation] = [
      "read": .read, "write": .write, "sync": .sync, "fallocate": .preallocate,
    ]
    c.faultOperations = try list(faults, "--faults", calls)
    if c.faultOperations.isEmpty { c.faultChance = 0 }
    c.faultErrnos = try list(errnos, "--errnos", ["EIO": EIO, "ENOSPC": ENOSPC])
    let modes: [String: SimulatedStorage.CrashMode] = [
      "drop": .dropUnsynced, "keep": .keepUnsynced, "subset": .randomSubset,
      "torn-byte": .tornPrefix(granularity: 1), "torn-sector": .tornPrefix(granularity: 512),
      "sectors": .randomSectors(sectorSize: 512),
    ]
    c.crashModes = crashModes == "all" ? SimulatedStorage.CrashMode.all : try list(crashModes, "--crash-modes", modes)
    guard !c.crashModes.isEmpty, !c.faultErrnos.isEmpty else {
      throw ValidationError("--crash-modes and --errnos need at least one value")
    }
    return c
  }

  private func list<T>(_ raw: String, _ option: String, _ names: [String: T]) throws -> [T] {
    if raw == "none" { return [] }
    return try raw.split(separator: ",").map {
      guard let v = names[String($0)] else {
        throw ValidationError("\(option): unknown value \($0) (known: \(names.keys.sorted().joined(separator: ", ")))")
      }
      return v
    }
  }

  func run() throws {
    let config = try config()
    let list = seed.map { [$0] } ?? (0..<UInt64(seeds ?? 1)).map { firstSeed + $0 }
    var total = SimulationStats()
    var failed: [UInt64] = []
    let clock = ContinuousClock()
    let start = clock.now
    for s in list {
      let simulation = Simulation(seed: s, config: config)
      if verbose { simulation.log.echo = { print($0) } }
      do {
        let stats = try simulation.run()
        total += stats
        print("seed \(s): ok: \(summary(stats))")
        fflush(nil)  // progress of long batches that write to a file
      } catch let f as SimulationFailure {
        total += simulation.stats
        failed.append(s)
        print("seed \(s): FAILED at operation \(f.operation): \(f.description)")
        print("replay: \(replay(s))")
        if !keepGoing { break }
      }
    }
    let elapsed = clock.now - start
    let seconds = Double(elapsed.components.seconds) + Double(elapsed.components.attoseconds) * 1e-18
    if seeds != nil {
      let outcome = failed.isEmpty ? "ok" : "FAILED seeds \(failed.map(String.init).joined(separator: ","))"
      print(
        "strata-sim: \(list.count) seeds from \(list[0]): \(outcome): \(summary(total)), "
          + "\((seconds * 10).rounded() / 10) s")
    }
    if !failed.isEmpty { throw ExitCode(1) }
  }

  private func summary(_ s: SimulationStats) -> String {
    "\(s.operations) ops, \(s.crashPoints) crash points (\(s.midOperationCrashes) inside an operation), "
      + "\(s.faultsInjected) faults injected (\(s.failedCalls) failed calls, \(s.refusals) refusals), "
      + "\(s.flushes) flushes (\(s.groupCommits) group commits), \(s.writeOuts) write-outs, "
      + "\(s.snapshotsCreated) snapshots, "
      + "\(s.restores) restores (\(s.pointRestores) to flush points), \(s.reopens) reopens, \(s.clones) clones (\(s.cloneCrashes) crashes), "
      + "\(s.compactions) compactions (\(s.segmentsFreed) segments freed), "
      + "digest \(String(s.digest, radix: 16))"
  }

  /// The command line that replays one seed: these arguments with --seed instead of --seeds.
  private func replay(_ s: UInt64) -> String {
    var args: [String] = []
    var rest = CommandLine.arguments.dropFirst()[...]
    while let a = rest.popFirst() {
      if ["--seed", "--seeds", "--first-seed"].contains(a) {
        _ = rest.popFirst()
      } else if a != "--keep-going" && !a.hasPrefix("--seed=") && !a.hasPrefix("--seeds=")
        && !a.hasPrefix("--first-seed=")
      {
        args.append(a)
      }
    }
    return (["strata-sim", "--seed", String(s)] + args).joined(separator: " ")
  }
}
