@_spi(Simulation) import StrataCore
import StrataSimulation

/// Restores and point-in-time reads.
///
/// The durability rule, from the code: `restore(snapshot:)` and `restore(toSeq:)` append one
/// RESTORE operation and then write a checkpoint, which flushes the log (the RESTORE, and
/// everything before it, is durable once that flush returns) before it points the superblock at
/// the checkpoint. So:
///   - once the call returns, the restored head is durable, like after a flush;
///   - a crash inside it leaves either exactly the restored head (the RESTORE reached the
///     durable log, and with it every operation before it: snapshots created since the last
///     flush exist, deleted ones are gone) or the state before the call (any crash outcome
///     allowed then), never a mix of the two.
extension Simulation {
  /// A restore of the head to `target` through `call`; checks the rule above.
  @discardableResult
  func restore(_ what: String, to target: DiskModel, call: () throws -> Void) throws -> Bool {
    log.note(what)
    let before = model
    var exact = model
    exact.change { $0 = target }
    exact.markDurable()
    // An injected fault may leave either state too: the model allows both per block then.
    model.change { $0 = target }
    crashAlternatives = [exact, before]
    let outcome = try attempt(what, call)
    crashAlternatives = []
    checkpointDue = outcome == .done
    guard outcome == .done else { return false }
    markFlushed()
    counts.restores += 1
    recordFlushPoint()
    // The rule says nothing unsynced is left: a power loss right now must keep the restore.
    if rng.chance(0.2) && !storage.isPoweredOff { try crash("right after \(what)") }
    return true
  }

  /// Restores the head to a flush point that `timeline()` lists and whose disk the model kept.
  func restoreToFlushPoint() throws {
    guard let oldest = flushPoints.first?.seq else { return }
    var listed: [TimelinePoint] = []
    guard try attempt("timeline since \(oldest)", { listed = try self.current.timeline(since: oldest) }) == .done
    else { return }
    let flushSeqs = Set(listed.filter { $0.kind != .snapshot }.map(\.seq))
    let candidates = flushPoints.filter { flushSeqs.contains($0.seq) }
    // Every flush marks a point: after a view closed the open record (the flag is set on it),
    // right after a crash's recovery and after a SEAL whose record failed to follow (a
    // checkpoint, `markTailWithoutPoint`).
    try log.check(
      candidates.count == flushPoints.count,
      "timeline lists \(candidates.count) of the \(flushPoints.count) kept flush points (not \(flushPoints.map(\.seq).filter { !flushSeqs.contains($0) }))"
    )
    guard let point = rng.element(of: candidates) else { return }
    if try restore("restore to seq \(point.seq)", to: point.disk, call: { try self.current.restore(toSeq: point.seq) })
    {
      counts.pointRestores += 1
    }
  }

  /// After a recovery: a few retained flush points, read back whole through `view(atSeq:)`,
  /// show the disk as it was then. (Every snapshot was read back whole by `observe`.)
  func checkFlushPoints(_ what: String) throws {
    guard !flushPoints.isEmpty else { return }
    let image = current
    for _ in 0..<min(2, flushPoints.count) {
      guard let point = rng.element(of: flushPoints) else { return }
      let view = try log.run("\(what): view at seq \(point.seq)") { try image.view(atSeq: point.seq) }
      try log.check(
        view.size == point.disk.size,
        "\(what): view at seq \(point.seq) has size \(view.size), expected \(point.disk.size)")
      try compareAll(
        { try view.read(at: $0, count: $1) }, point.disk, "\(what): view at seq \(point.seq)", log, rng: &rng)
    }
  }
}

extension Simulation {
  /// A cleaner pass. Nothing the model holds changes: the head, every snapshot and every kept
  /// flush point must read the same after it, also after a crash or an I/O error inside it.
  /// Half the passes keep the kept flush points (a window from the oldest); the others may drop
  /// them (every point before the new log start goes), so the model forgets them first.
  /// Small passes (a few segments, a free reserve or none) as often as whole ones.
  func compactPass() throws {
    var options = CompactOptions(
      maxSegments: rng.chance(0.5) ? .max : rng.int(in: 1...3), maxLiveRatio: rng.chance(0.5) ? 0.9 : 1,
      keepAllocated: rng.int(in: 0...2))
    options.checkpointFirst = rng.chance(0.7)
    if rng.chance(0.5), let oldest = flushPoints.first?.seq {
      options.retainFromSeq = oldest
    } else {
      flushPoints.removeAll()
    }
    log.note(
      "compact (window from \(options.retainFromSeq.map(String.init) ?? "none"), at most \(options.maxSegments) segments)"
    )
    var report = CompactReport()
    if try attempt("compact", { report = try self.current.compact(options) }) == .done {
      counts.compactions += 1
      counts.segmentsFreed += report.segmentsFreed
    }
  }
}
