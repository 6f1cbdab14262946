/// Which snapshots to keep, in the manner of backup tools (restic's `forget`, borg's `prune`):
/// the newest `last`, and the newest of each of the latest `hourly` hours, `daily` days and
/// `weekly` weeks (UTC; weeks start on Monday) that have snapshots. A snapshot any rule keeps
/// stays; the others go.
public struct RetentionPolicy: Equatable, Sendable {
  public var last = 0
  public var hourly = 0
  public var daily = 0
  public var weekly = 0

  public init(last: Int = 0, hourly: Int = 0, daily: Int = 0, weekly: Int = 0) {
    precondition(last >= 0 && hourly >= 0 && daily >= 0 && weekly >= 0)
    self.last = last
    self.hourly = hourly
    self.daily = daily
    self.weekly = weekly
  }

  public var keepsNothing: Bool { last == 0 && hourly == 0 && daily == 0 && weekly == 0 }

  /// Splits `snapshots` into those to keep and those to delete (both newest first).
  public func apply(to snapshots: [SnapshotInfo]) -> (keep: [SnapshotInfo], delete: [SnapshotInfo]) {
    let newestFirst = snapshots.sorted { ($0.timestampNanoseconds, $0.seq) > ($1.timestampNanoseconds, $1.seq) }
    let hour: UInt64 = 3600 * 1_000_000_000
    let day = 24 * hour
    // A snapshot is kept by a rule when it is the newest of its bucket and the rule has not
    // kept its count of buckets yet; `last` puts every snapshot in a bucket of its own. The
    // Unix epoch fell on a Thursday, hence the shift that makes weeks start on Monday.
    let rules: [(count: Int, bucket: ((UInt64, UInt64)) -> UInt64)] = [
      (last, { $0.1 }), (hourly, { $0.0 / hour }), (daily, { $0.0 / day }), (weekly, { ($0.0 / day + 3) / 7 }),
    ]
    var kept = Set<UInt64>()
    for rule in rules where rule.count > 0 {
      var buckets = 0
      var previous: UInt64?
      for s in newestFirst where buckets < rule.count {
        let key = rule.bucket((s.timestampNanoseconds, s.seq))
        if key != previous {
          kept.insert(s.seq)
          buckets += 1
          previous = key
        }
      }
    }
    let keep = newestFirst.filter { kept.contains($0.seq) }
    let delete = newestFirst.filter { !kept.contains($0.seq) }
    return (keep, delete)
  }
}

extension StrataImage {
  /// Deletes the snapshots `policy` does not keep among those whose name starts with `prefix`
  /// (all when empty); returns what it deleted, newest first. With `dryRun` it deletes nothing.
  /// A snapshot a branch is based on (`branchPins`) is skipped: it stays while the branch does.
  /// Data a deleted snapshot held stays while anything else (the head, another snapshot, a point
  /// of the timeline) still needs it: only the cleaner reclaims space.
  @discardableResult
  public func pruneSnapshots(_ policy: RetentionPolicy, prefix: String = "", dryRun: Bool = false) throws
    -> [SnapshotInfo]
  {
    precondition(!policy.keepsNothing, "a policy that keeps nothing deletes every snapshot: refuse it at the edge")
    let candidates = try snapshots.filter { $0.name.hasPrefix(prefix) }
    let pins = try branchPins()
    let doomed = policy.apply(to: candidates).delete.filter { pins[$0.seq] == nil }
    if !dryRun {
      for s in doomed { try deleteSnapshot(name: s.name) }
    }
    return doomed
  }
}
