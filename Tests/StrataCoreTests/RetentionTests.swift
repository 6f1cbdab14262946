import Testing

@testable import StrataCore

private let minute: UInt64 = 60_000_000_000
private let hour = 60 * minute
private let day = 24 * hour

/// Snapshots every 20 minutes for 30 days, starting on a Monday 00:00 UTC.
private func series() -> [SnapshotInfo] {
  let monday: UInt64 = 1_795_996_800 * 1_000_000_000  // 2026-11-30 00:00 UTC, a Monday
  return (0..<(30 * 72)).map { i in
    SnapshotInfo(name: "auto-\(i)", seq: UInt64(i + 1), timestampNanoseconds: monday + UInt64(i) * 20 * minute)
  }
}

@Test func retentionKeepsLastHourlyDailyWeekly() {
  let all = series()
  let newest = all.last!
  let (keep, delete) = RetentionPolicy(last: 5, hourly: 6, daily: 3, weekly: 2).apply(to: all)
  #expect(keep.count + delete.count == all.count)
  #expect(Set(keep.map(\.seq)).isDisjoint(with: delete.map(\.seq)))
  // The newest five, then one per hour for six hours (the newest two hours overlap them), one
  // per day for three days, one per week for two weeks.
  #expect(keep.prefix(5).map(\.seq) == (0..<5).map { newest.seq - UInt64($0) })
  let hours = Set(
    keep.filter { newest.timestampNanoseconds - $0.timestampNanoseconds < 6 * hour }.map {
      $0.timestampNanoseconds / hour
    })
  #expect(hours.count == 6)
  for d in 0..<3 {
    // The newest snapshot of each of the last three days is kept: the last one of that day.
    let lastOfDay = all.last { $0.timestampNanoseconds / day == newest.timestampNanoseconds / day - UInt64(d) }!
    #expect(keep.contains(lastOfDay), "day \(d)")
  }
  // Last 5 (hours 23 and 22 of day 29); hourly adds 21:40 to 18:40 (4); daily adds days 28 and
  // 27 (2); weekly adds nothing: the previous week ends with day 27 (a Sunday), already kept.
  #expect(keep.count == 5 + 4 + 2, "kept \(keep.count)")
  // Weekly: the newest of the latest two weeks (Monday-based): the newest overall, and the
  // Sunday 23:40 that ends the week before.
  let previousWeekEnd = all.last {
    ($0.timestampNanoseconds / day + 3) / 7 < (newest.timestampNanoseconds / day + 3) / 7
  }!
  #expect(keep.contains(previousWeekEnd))
}

@Test func retentionWithFewSnapshotsKeepsThemAll() {
  let few = Array(series().prefix(3))
  #expect(RetentionPolicy(last: 10).apply(to: few).delete.isEmpty)
  #expect(RetentionPolicy(daily: 7).apply(to: few).keep.count == 1, "three snapshots of one day")
  #expect(RetentionPolicy(last: 1).apply(to: few).keep.map(\.name) == ["auto-2"])
}

@Test func pruneDeletesOnlyMatchingNames() throws {
  let path = temporaryDirectory() + "/p.strata"
  let img = try StrataImage.create(path: path, virtualSize: 1 << 20, overwrite: true)
  for i in 0..<6 { try img.createSnapshot(name: "auto-\(i)") }
  try img.createSnapshot(name: "keep-me")
  let dry = try img.pruneSnapshots(RetentionPolicy(last: 2), prefix: "auto-", dryRun: true)
  #expect(dry.map(\.name) == ["auto-3", "auto-2", "auto-1", "auto-0"])
  #expect(img.snapshotCount == 7, "a dry run deletes nothing")
  try img.pruneSnapshots(RetentionPolicy(last: 2), prefix: "auto-")
  #expect(try img.snapshots.map(\.name) == ["auto-4", "auto-5", "keep-me"])
  try img.close()
}
