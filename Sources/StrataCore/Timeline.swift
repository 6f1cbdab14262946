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
/// up to it (what a snapshot view does). Retention is the cleaner's business: every point
/// from the log start on stays reachable, and `compact` moves the log start forward only past
/// points that no snapshot and no continuous-protection window retains.
extension StrataImage {
  /// Restorable points, oldest first, from `since` (a seq) on, at most `limit` of them.
  /// Reads the log from the last checkpoint before `since`; snapshots older than the log start
  /// (the cleaner reclaimed the log around them) come from the catalog.
  public func timeline(since: UInt64 = 0, limit: Int = .max) throws -> [TimelinePoint] {
    try checkOpen()
    writer?.closeRecord()
    // Strictly before `since`: a checkpoint record at seq `since - 1` holds the point at
    // `since` (a walk from the next checkpoint would miss it).
    let start = try checkpoint(before: since, orOldest: true).page
    guard let first = try pages.record(at: start) else {
      throw StrataError(.corrupt, "the checkpoint at page \(start) cannot be read")
    }
    var points = try catalog.entries(after: since == 0 ? 0 : since - 1, limit: limit).prefix {
      $0.seq < first.header.seq
    }.map {
      TimelinePoint(seq: $0.seq, timestampNanoseconds: $0.timestampNanoseconds, kind: .snapshot, name: $0.name)
    }
    var current: StoredRecord? = first
    while let stored = current, points.count < limit {
      for (point, _) in try timelinePoints(in: stored) where point.seq >= since && points.count < limit {
        points.append(point)
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
    var found: ChainCheckpoint?
    try walkCheckpoints { c in
      found = c
      return c.seq >= seq
    }
    if let found, found.seq < seq || orOldest { return (found.page, found.timestamp) }
    throw StrataError(.notFound, "no checkpoint precedes seq \(seq): that point is not retained")
  }
}

/// RFC 3339 times, as `--at`, `timeline --since` and NBD's `at/TIME` exports take them.
public enum RFC3339 {
  /// Nanoseconds since the Unix epoch of `YYYY-MM-DDTHH:MM:SS[.fraction](Z|±HH:MM)`, or nil when
  /// the text is not such a time (or lies before 1970).
  public static func nanoseconds(_ text: String) -> UInt64? {
    let b = Array(text.utf8)
    var i = 0
    func number(_ digits: Int) -> Int? {
      guard i + digits <= b.count else { return nil }
      var v = 0
      for k in i..<(i + digits) {
        guard b[k] >= 0x30 && b[k] <= 0x39 else { return nil }
        v = v * 10 + Int(b[k] - 0x30)
      }
      i += digits
      return v
    }
    func expect(_ c: UInt8...) -> Bool {
      guard i < b.count, c.contains(b[i]) else { return false }
      i += 1
      return true
    }
    guard let year = number(4), expect(0x2D), let month = number(2), expect(0x2D), let day = number(2),
      expect(0x54, 0x74, 0x20), let hour = number(2), expect(0x3A), let minute = number(2), expect(0x3A),
      let second = number(2)
    else { return nil }
    var fraction: UInt64 = 0
    if i < b.count && b[i] == 0x2E {
      i += 1
      var digits = 0
      while i < b.count, b[i] >= 0x30 && b[i] <= 0x39 {
        if digits < 9 { fraction = fraction * 10 + UInt64(b[i] - 0x30) }
        digits += 1
        i += 1
      }
      guard digits > 0 else { return nil }
      if digits < 9 {
        for _ in digits..<9 { fraction *= 10 }
      }
    }
    var offset = 0
    if expect(0x5A, 0x7A) {
      offset = 0
    } else if i < b.count, b[i] == 0x2B || b[i] == 0x2D {
      let sign = b[i] == 0x2D ? -1 : 1
      i += 1
      guard let oh = number(2), expect(0x3A), let om = number(2), oh < 24, om < 60 else { return nil }
      offset = sign * (oh * 3600 + om * 60)
    } else {
      return nil
    }
    let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0)
    let monthDays = [31, leap ? 29 : 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31]
    guard i == b.count, (1...12).contains(month), day >= 1, day <= monthDays[month - 1], hour < 24, minute < 60,
      second <= 60
    else { return nil }
    // Days from the civil date (H. Hinnant's algorithm), then seconds.
    let y = month <= 2 ? year - 1 : year
    let era = y / 400
    let yoe = y - era * 400
    let doy = (153 * ((month + 9) % 12) + 2) / 5 + day - 1
    let days = era * 146_097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719_468
    let seconds = days * 86_400 + hour * 3600 + minute * 60 + second - offset
    guard seconds >= 0 else { return nil }
    return UInt64(seconds) * 1_000_000_000 + fraction
  }
}
