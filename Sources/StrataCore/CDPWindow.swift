import StrataFormat

@_exported import enum StrataFormat.CDPWindow

/// Continuous data protection: the window of the timeline that the segment cleaner must keep
/// restorable. The window lives in the superblock (format-spec 4.1, autoclear bit CDP_WINDOW);
/// `cdpRetainedSeq` says where it begins, and every point from there on stays readable with
/// `view(atSeq:)` and listed by `timeline`. Snapshots are kept whatever the window says.
extension StrataImage {
  /// The image's window, nil when it has none (then the cleaner keeps only what snapshots and
  /// recovery need).
  public var cdpWindow: CDPWindow? { superblock.cdpWindow }

  /// Sets (or, with nil, removes) the window. Durable when this returns: the superblock is
  /// rewritten and synced, naming the same checkpoint as before.
  public func setCDPWindow(_ window: CDPWindow?) throws {
    try checkWritable()
    if let window { try Self.validateCDPWindow(window) }
    guard window != superblock.cdpWindow else { return }
    var sb = superblock
    sb.generation += 1
    sb.cdpWindow = window
    sb.features.autoclear &= FeatureSet.knownAutoclear & ~FeatureSet.cdpWindow
    if window != nil { sb.features.autoclear |= FeatureSet.cdpWindow }
    try writeSuperblock(sb)
    try storage.sync()
    superblock = sb
  }

  /// Where the window begins now, by the image's clock (`ImageOptions.clock`).
  public func cdpRetainedSeq() throws -> UInt64? {
    try cdpRetainedSeq(nowNanoseconds: options.clock())
  }

  /// The seq of the oldest timeline point (flush point, checkpoint or snapshot) the window
  /// protects at time `nowNanoseconds`: every point with a seq at or after it must stay
  /// restorable. Nil when the image has no window. When the window protects no point, the next
  /// seq of the log (nothing before the head needs keeping).
  ///
  /// - A duration window protects the disk at every instant of the last `duration`: each point
  ///   whose time is after `now - duration`, and the newest point at or before that instant (the
  ///   disk as it was when the window begins). Times are the records' timestamps, as `timeline`
  ///   shows them.
  /// - A size window protects each point with at most `bytes` of log after it: the pages of every
  ///   record holding an operation at or after the point's seq (headers and payloads, SEALs
  ///   included; the unused end of a sealed segment not), counted to the end of the log.
  ///
  /// Reads record headers only, from the checkpoint before the window's start on: the
  /// checkpoints' links lead there without reading the log before it. Points the cleaner already
  /// reclaimed (before the log start) are gone: the oldest one left is the oldest candidate.
  /// `compact` keeps every point from here on.
  public func cdpRetainedSeq(nowNanoseconds: UInt64) throws -> UInt64? {
    try checkOpen()
    guard let window = superblock.cdpWindow else { return nil }
    writer?.closeRecord()  // its operations are points too: read them back from the log
    switch window {
    case .duration(let ns):
      return try retainedSeq(since: nowNanoseconds >= ns ? nowNanoseconds - ns : 0)
    case .size(let bytes):
      return try retainedSeq(logPages: bytes / UInt64(Layout.pageSize))
    }
  }

  static func validateCDPWindow(_ window: CDPWindow) throws {
    guard window.isValid else {
      throw StrataError(.invalidArgument, "a CDP window must be longer than zero (no window: nil)")
    }
  }

  private var headSeq: UInt64 { writer?.nextSeq ?? recoveredEnd.nextSeq }

  /// The newest point at or before `cutoff`, else the oldest point after it, else the head.
  private func retainedSeq(since cutoff: UInt64) throws -> UInt64 {
    // Back along the checkpoints to the newest one at or before the cutoff (or the oldest one
    // still in the log): the points the window needs all come after it.
    var link = try newestCheckpointLink()
    while link.timestamp > cutoff, link.page != logStart,
      let previous = try checkpointLink(at: link.previous, before: link.seq)
    {
      link = previous
    }
    var boundary: UInt64?
    var current = try pages.record(at: link.page)
    while let stored = current {
      for (point, _) in try timelinePoints(in: stored) {
        guard point.timestampNanoseconds <= cutoff else { return boundary ?? point.seq }
        boundary = point.seq
      }
      current = try pages.next(after: stored)
    }
    return boundary ?? headSeq
  }

  /// The oldest point with at most `budget` log pages after it, else the head.
  private func retainedSeq(logPages budget: UInt64) throws -> UInt64 {
    // Interval by interval between checkpoints, newest first, until the log after an interval's
    // start exceeds the budget: no older point can be inside the window then.
    var link: CheckpointLink? = try newestCheckpointLink()
    var later: CheckpointLink?  // the start of the interval already counted
    var tail: UInt64 = 0  // log pages from `later` to the end of the log
    var oldest: UInt64?
    while let start = link {
      var points: [(seq: UInt64, pagesBefore: UInt64)] = []
      var walked: UInt64 = 0
      var current = try pages.record(at: start.page)
      while let stored = current {
        if let later, stored.page == later.page, stored.header.seq == later.seq { break }
        for (point, afterRecord) in try timelinePoints(in: stored) {
          points.append((point.seq, afterRecord ? walked + UInt64(stored.header.totalPages) : walked))
        }
        walked += UInt64(stored.header.totalPages)
        current = try pages.next(after: stored)
      }
      if let later, current == nil {
        throw StrataError(
          .corrupt, "the log from the checkpoint at page \(start.page) does not reach the one at page \(later.page)")
      }
      if let first = points.first(where: { walked - $0.pagesBefore + tail <= budget }) { oldest = first.seq }
      tail += walked
      guard tail <= budget else { break }
      later = start
      link = start.page == logStart ? nil : try checkpointLink(at: start.previous, before: start.seq)
    }
    return oldest ?? headSeq
  }

  /// A checkpoint record, as the window's walk back follows them.
  private struct CheckpointLink {
    var page: UInt64
    var seq: UInt64
    var timestamp: UInt64
    var previous: UInt64
  }

  private func newestCheckpointLink() throws -> CheckpointLink {
    guard let link = try checkpointLink(at: lastCheckpointPage, before: .max) else {
      throw StrataError(.corrupt, "the checkpoint at page \(lastCheckpointPage) cannot be read")
    }
    return link
  }

  /// The checkpoint at `page` if the log still holds it: a CHECKPOINT record older than the one
  /// that links to it (a reused segment holds newer records there). The walks stop at the log
  /// start anyway: the cleaner may have reclaimed what came before.
  private func checkpointLink(at page: UInt64, before seq: UInt64) throws -> CheckpointLink? {
    guard page != 0, let stored = try pages.record(at: page), stored.header.seq < seq,
      case .checkpoint(let body) = stored.record.ops.last
    else { return nil }
    return CheckpointLink(
      page: page, seq: stored.header.seq, timestamp: stored.header.timestampNanoseconds,
      previous: body.previousCheckpoint)
  }

  /// The points a record holds, in seq order, as `timeline` lists them; `afterRecord` is false
  /// for a snapshot (its view needs operations of this record from its seq on).
  func timelinePoints(in stored: StoredRecord) throws -> [(point: TimelinePoint, afterRecord: Bool)] {
    var points: [(point: TimelinePoint, afterRecord: Bool)] = []
    var seq = stored.header.seq
    for op in stored.record.ops {
      switch op {
      case .checkpoint:
        points.append(
          (
            TimelinePoint(seq: seq + 1, timestampNanoseconds: stored.header.timestampNanoseconds, kind: .checkpoint),
            true
          ))
      case .snapshot:
        if let entry = try catalog.entry(seq: seq) {
          points.append(
            (
              TimelinePoint(
                seq: seq, timestampNanoseconds: entry.timestampNanoseconds, kind: .snapshot, name: entry.name), false
            ))
        }
      default: break
      }
      seq += 1
    }
    if stored.header.flags.contains(.flushPoint) {
      points.append(
        (
          TimelinePoint(
            seq: stored.header.nextSeq, timestampNanoseconds: stored.header.timestampNanoseconds, kind: .flush),
          true
        ))
    }
    return points
  }
}
