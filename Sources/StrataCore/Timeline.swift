import StrataFormat

/// A point the disk can be read or restored at: a named snapshot, a checkpoint, or a flush
/// point (the end of a record a flush made durable).
public struct TimelinePoint: Equatable, Sendable {
  public enum Kind: String, Sendable {
    case snapshot, checkpoint, flush
  }

  /// The view at this point holds every operation before `seq`.
  public var seq: UInt64
  public var timestampNanoseconds: UInt64
  public var kind: Kind
  /// The snapshot's name (snapshots only).
  public var name: String?
}

/// Point-in-time access. The log keeps every operation and every checkpoint links to the one
/// before it, so any point can be rebuilt: the last checkpoint before it plus the log replayed
/// up to it (what a snapshot view does). Retention is the cleaner's business: until it reclaims
/// a segment, every point since the image was created stays reachable.
extension StrataImage {
  /// Restorable points, oldest first, from `since` (a seq) on, at most `limit` of them.
  /// Reads the log from the last checkpoint before `since`.
  public func timeline(since: UInt64 = 0, limit: Int = .max) throws -> [TimelinePoint] {
    try checkOpen()
    writer?.closeRecord()
    var points: [TimelinePoint] = []
    var current = try pages.record(at: try checkpoint(before: since + 1, orOldest: true).page)
    while let stored = current, points.count < limit {
      var seq = stored.header.seq
      for op in stored.record.ops where points.count < limit {
        switch op {
        case .checkpoint where seq >= since:
          // The state the checkpoint holds is the one before the next operation.
          points.append(
            TimelinePoint(seq: seq + 1, timestampNanoseconds: stored.header.timestampNanoseconds, kind: .checkpoint))
        case .snapshot where seq >= since:
          if let entry = try catalog.entry(seq: seq) {
            points.append(
              TimelinePoint(
                seq: seq, timestampNanoseconds: entry.timestampNanoseconds, kind: .snapshot, name: entry.name))
          }
        default: break
        }
        seq += 1
      }
      if stored.header.flags.contains(.flushPoint), stored.header.nextSeq >= since, points.count < limit {
        points.append(
          TimelinePoint(
            seq: stored.header.nextSeq, timestampNanoseconds: stored.header.timestampNanoseconds, kind: .flush))
      }
      current = try pages.next(after: stored)
    }
    return points
  }

  /// The latest point at or before `time` (nanoseconds since the Unix epoch), if any.
  public func point(atOrBefore time: UInt64) throws -> TimelinePoint? {
    try timeline().last { $0.timestampNanoseconds <= time }
  }

  /// A read-only view of the disk just before operation `seq` (a `TimelinePoint.seq`).
  public func view(atSeq seq: UInt64) throws -> SnapshotView {
    try checkOpen()
    try checkSeq(seq)
    let base = try checkpoint(before: seq)
    return SnapshotView(
      image: self, view: try view(at: seq, base: base.page),
      info: SnapshotInfo(name: "at/\(seq)", seq: seq, timestampNanoseconds: base.timestamp))
  }

  /// Moves the head back to the disk as it was just before operation `seq`; what came after
  /// stays in the log (and reachable with `view(atSeq:)`) until the cleaner reclaims it.
  public func restore(toSeq seq: UInt64) throws {
    guard writer != nil else { throw StrataError(.readOnly, "the image is open read-only") }
    try checkSeq(seq)
    let base = try checkpoint(before: seq)
    writer?.closeRecord()  // the view is read back from the log
    try logAndApply(.restore(seq: seq, baseCheckpoint: base.page))
    try checkpoint()
  }

  private func checkSeq(_ seq: UInt64) throws {
    let next = writer?.nextSeq ?? recoveredEnd.nextSeq
    guard seq >= 1, seq <= next else {
      throw StrataError(.outOfRange, "seq \(seq) is not in the log (it holds operations 1 to \(next - 1))")
    }
  }

  /// The newest checkpoint whose record comes before operation `seq` (or, with `orOldest`, the
  /// oldest one when none does), found by following the checkpoints' links back from the last.
  func checkpoint(before seq: UInt64, orOldest: Bool = false) throws -> (page: UInt64, timestamp: UInt64) {
    var page = lastCheckpointPage
    var oldest: (page: UInt64, timestamp: UInt64)?
    while page != 0 {
      guard let stored = try pages.record(at: page), case .checkpoint(let body) = stored.record.ops.last else {
        throw StrataError(.corrupt, "the checkpoint at page \(page) cannot be read: the log before it is out of reach")
      }
      if stored.header.seq < seq { return (page, stored.header.timestampNanoseconds) }
      oldest = (page, stored.header.timestampNanoseconds)
      page = body.previousCheckpoint
    }
    if orOldest, let oldest { return oldest }
    throw StrataError(.notFound, "no checkpoint precedes seq \(seq): that point is not retained")
  }
}
