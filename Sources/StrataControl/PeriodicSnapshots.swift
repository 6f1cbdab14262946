import CStrataLinux
import Foundation
import Logging
import StrataCore

/// `strata serve --snapshot-every DURATION`: continuous protection by a snapshot per period,
/// named `auto-<RFC 3339 time>`, each holding every write acknowledged before it and durable
/// before the next period starts; optionally only the newest `keepLast` auto snapshots stay.
public final class PeriodicSnapshots: BackgroundWorker, @unchecked Sendable {
  public static let prefix = "auto-"

  let image: SharedImage
  let intervalNanoseconds: UInt64
  let keepLast: Int
  let logger: Logger

  public init(image: SharedImage, intervalNanoseconds: UInt64, keepLast: Int, logger: Logger) {
    precondition(intervalNanoseconds >= 1_000_000 && keepLast >= 0)
    self.image = image
    self.intervalNanoseconds = intervalNanoseconds
    self.keepLast = keepLast
    self.logger = logger
  }

  override func run(_ stopFd: Int32) {
    let formatter = ISO8601DateFormatter()
    formatter.formatOptions = [.withInternetDateTime, .withFractionalSeconds]
    var fds = [pollfd(fd: stopFd, events: Int16(POLLIN), revents: 0)]
    var deadline = monotonicNanoseconds() + intervalNanoseconds
    while true {
      let now = monotonicNanoseconds()
      if now < deadline {
        let r = poll(&fds, 1, Int32(clamping: (deadline - now + 999_999) / 1_000_000))
        if r < 0 && errno == EINTR { continue }
        if r != 0 { return }  // stopped (or poll failed: stop rather than spin)
        continue
      }
      deadline += intervalNanoseconds
      if deadline <= now { deadline = now + intervalNanoseconds }  // fell behind: no burst
      let name = Self.prefix + formatter.string(from: Date())
      do {
        // The sync happens outside the image lock (group commit): the guest's I/O goes on.
        let pruned = try image.durably { img -> Int in
          _ = try img.createSnapshot(name: name)
          guard keepLast > 0 else { return 0 }
          return try img.pruneSnapshots(RetentionPolicy(last: keepLast), prefix: Self.prefix).count
        }
        logger.debug("snapshot \(name)\(pruned > 0 ? ", \(pruned) older auto snapshot(s) pruned" : "")")
      } catch {
        logger.error("periodic snapshot \(name) failed: \(error)")
      }
    }
  }
}
