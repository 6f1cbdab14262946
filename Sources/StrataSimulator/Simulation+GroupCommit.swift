@_spi(Simulation) import StrataCore
import StrataSimulation

/// Group commit (`SharedImage.durably`, GroupCommit.swift), driven from the simulator's one
/// thread: the storage offers `anyThreadIO`, so the group-commit leader takes a sync ticket
/// under the image lock (`beginSync`: the open record closed as a flush point, earlier
/// write-outs completed, the pages not yet written copied), writes the copy and syncs outside
/// the lock, then records the sync under the lock again (`endSync`). Faults and power losses hit
/// that write and that sync like any other; while they run (outside the lock) the simulator
/// reads the head through the shared image, as another thread may.
///
/// What one thread cannot do: append while the sync runs outside the lock. An append may seal
/// the segment or write a checkpoint, and both wait under the lock for the outside sync to end
/// (`OutsideIO.waitIdle`), which on one thread never happens. Interleaving appends
/// deterministically needs a scheduler that runs the image's threads one at a time and knows
/// when one blocks; the threaded tests (Tests/StrataCoreTests) cover that path without a model.
extension Simulation {
  func groupCommit() throws {
    let shared = SharedImage(current)
    var windowFailure: SimulationFailure?
    offerAnyThreadIO(shared, during: "the group sync") { windowFailure = $0 }
    defer { withdrawAnyThreadIO() }
    let outcome: Outcome
    if rng.chance(0.7) {
      let (offset, count) = range(length: work.length())
      let data = work.data(count: count, at: offset)
      outcome = try mutate("durably write \(offset)+\(count)", blocks: DiskModel.blocks(offset, UInt64(count))) {
        $0.write(data, at: offset)
      } call: {
        try shared.durably { try $0.write(data, at: offset) }
      }
    } else {
      if model.snapshots.count >= config.maxSnapshots, let victim = rng.element(of: model.order) {
        try deleteSnapshot(victim)
        // A power loss in the delete reopened the image: `shared` holds the closed one
        // (strata-sim seed 11070 then used it).
        guard shared.with({ $0 }) === current else { return }
      }
      let name = newSnapshotName()
      log.note("durably create snapshot \(name)")
      model.createSnapshot(name)
      outcome = try attempt("durably createSnapshot \(name)") {
        _ = try shared.durably { try $0.createSnapshot(name: name) }
      }
      if outcome == .done { counts.snapshotsCreated += 1 }
    }
    if let windowFailure { throw windowFailure }
    guard outcome == .done else { return }
    // One thread: nothing was appended after the ticket, so the group sync covered everything.
    markFlushed()
    counts.flushes += 1
    counts.groupCommits += 1
    recordFlushPoint()
  }

  /// A write as `strata serve` acknowledges it: appended, then written out through
  /// `SharedImage.writeOutLog`, which writes the pages outside the image lock. Not durable (a
  /// power loss may take it); a failed write-out is written again by the next flush.
  func writeOut() throws {
    let shared = SharedImage(current)
    var windowFailure: SimulationFailure?
    offerAnyThreadIO(shared, during: "the write-out") { windowFailure = $0 }
    defer { withdrawAnyThreadIO() }
    let (offset, count) = range(length: work.length())
    let data = work.data(count: count, at: offset)
    let outcome = try mutate("write \(offset)+\(count), written out", blocks: DiskModel.blocks(offset, UInt64(count))) {
      $0.write(data, at: offset)
    } call: {
      try shared.with { try $0.write(data, at: offset) }
      try shared.writeOutLog()
    }
    if let windowFailure { throw windowFailure }
    if outcome == .done { counts.writeOuts += 1 }
  }

  /// Lets the storage offer `anyThreadIO` for one call; half the time, before each of its
  /// writes and syncs, the head is read through `shared` as another thread may meanwhile (the
  /// first failure goes to `report`).
  private func offerAnyThreadIO(
    _ shared: SharedImage, during: String, report: @escaping (SimulationFailure) -> Void
  ) {
    var failed = false
    storage.offersAnyThreadIO = true
    storage.beforeAnyThreadIO = { [unowned self] op in
      guard !failed, !self.storage.isPoweredOff, self.rng.chance(0.5) else { return }
      if let failure = self.readOutsideTheLock(shared, during: during, before: op) {
        failed = true
        report(failure)
      }
    }
  }

  private func withdrawAnyThreadIO() {
    storage.offersAnyThreadIO = false
    storage.beforeAnyThreadIO = nil
  }

  /// A read of the head while a write or sync runs outside the image lock, compared with the
  /// model (injected faults held back: a failure here could not be reported through the
  /// call). Returns the failure, if any.
  private func readOutsideTheLock(_ shared: SharedImage, during: String, before op: SimulatedStorage.Operation)
    -> SimulationFailure?
  {
    let (offset, count) = range(length: work.length())
    let what = "read \(offset)+\(count) during \(during) (before its \(op))"
    log.note(what)
    let armed = storage.faults
    storage.faults = []
    defer { storage.faults = armed }
    do {
      let got = try shared.with { try $0.read(at: offset, count: count) }
      let want = model.head.read(offset, count)
      return sameBytes(got, want) ? nil : log.fail("\(what): \(firstDifference(got, want))")
    } catch {
      return log.fail("\(what) threw \(error)")
    }
  }
}
