import CStrataLinux
import Foundation
import Logging
import StrataCore

/// The cleaner of a served image: small passes in the background when enough of the log is
/// garbage. A pass takes the image lock one step at a time (one segment copied, or a batch
/// freed), so the guest's requests run between steps, and rests after each step as long as the
/// step took unless garbage is past 40% of the log; a pass that frees nothing (what is left
/// is pinned by snapshots or the protection window, or too full to be worth copying) backs off.
public final class BackgroundCleaner: BackgroundWorker, @unchecked Sendable {
  /// What the cleaner did since the server started (the control socket's `status`).
  public struct Totals: Sendable {
    public var passes = 0
    public var segmentsFreed = 0
    public var blocksCopied = 0
    public var bytesReclaimed: UInt64 = 0
  }

  let image: SharedImage
  let logger: Logger
  /// A pass starts when garbage is at least this share of the sealed log…
  let triggerRatio: Double
  /// …and at least this many bytes.
  let triggerBytes: UInt64
  /// Past this share of garbage the cleaner stops resting between steps.
  let urgentRatio = 0.4
  let options: CompactOptions
  private let lock = NSLock()
  private var totalsValue = Totals()

  public init(
    image: SharedImage, logger: Logger, triggerRatio: Double = 0.25, triggerBytes: UInt64 = 64 << 20,
    options: CompactOptions = .background
  ) {
    self.image = image
    self.logger = logger
    self.triggerRatio = triggerRatio
    self.triggerBytes = triggerBytes
    self.options = options
  }

  public var totals: Totals { lock.withLock { totalsValue } }

  static let minInterval: UInt64 = 250_000_000
  static let maxInterval: UInt64 = 30_000_000_000

  override func run(_ stopFd: Int32) {
    var fds = [pollfd(fd: stopFd, events: Int16(POLLIN), revents: 0)]
    var interval = Self.minInterval
    while true {
      let r = poll(&fds, 1, Int32(clamping: interval / 1_000_000))
      if r < 0 && errno == EINTR { continue }
      if r != 0 { return }  // stopped (or poll failed: stop rather than spin)
      do {
        // The pass keeps the image's protection window by itself.
        let pass = try CleaningPass.start(shared: image, options: options) { img in
          let space = img.logSpace
          return space.garbageBytes >= triggerBytes
            && Double(space.garbageBytes) >= triggerRatio * Double(space.sealedBytes)
        }
        guard let pass else {
          interval = Self.minInterval
          continue
        }
        // One segment per step, its blocks read outside the lock; the guest's requests run in
        // between. Throttled while there is room: after a step the cleaner rests as long as the
        // step took (half of the time and of the disk for the guest), unless garbage has grown
        // past `urgentRatio` of the log, when it must keep up with the guest's writes instead.
        while true {
          let started = monotonicNanoseconds()
          guard try pass.step(shared: image) else { break }
          let space = image.with { $0.logSpace }
          let urgent = Double(space.garbageBytes) >= urgentRatio * Double(space.sealedBytes)
          let rest = urgent ? 0 : Int32(clamping: (monotonicNanoseconds() - started) / 1_000_000)
          if poll(&fds, 1, rest) != 0 { return }
        }
        let report = pass.report
        lock.withLock {
          totalsValue.passes += 1
          totalsValue.segmentsFreed += report.segmentsFreed
          totalsValue.blocksCopied += report.blocksCopied
          totalsValue.bytesReclaimed += report.bytesReclaimed
        }
        if report.segmentsFreed > 0 {
          logger.debug(
            "cleaner freed \(report.segmentsFreed) segments, copied \(report.blocksCopied) blocks")
          interval = 0  // keep up with the guest: the next pass at once while garbage remains
        } else {
          interval = min(interval * 2, Self.maxInterval)
        }
      } catch {
        logger.error("cleaner pass failed: \(error)")
        interval = Self.maxInterval
      }
    }
  }
}
