import StrataCore

#if canImport(Glibc)
  import Glibc
#endif

/// What `strata bench snapshots` measures: `count` snapshots created by `clients` threads
/// through one shared image, each made durable before the next (create, then flush with group
/// commit), after `prefill` snapshots were created without syncs.
struct SnapshotBenchSettings {
  var count: Int
  var clients: Int
  var prefill: Int
  /// Do not wait for each snapshot to be durable (one flush at the end): the in-memory cost.
  var noWait: Bool
}

struct SnapshotBenchResult: Encodable {
  var count: Int
  var clients: Int
  var waitedForSync: Bool
  var prefilled: Int
  var prefillSeconds: Double
  /// Snapshots in the image when the measured run began.
  var existingSnapshots: Int
  /// Reopening the image just before the run (it then holds `existingSnapshots`).
  var openSeconds: Double
  var catalogPagesReadAtOpen: Int
  var infoSeconds: Double
  /// Listing the newest 100 snapshots.
  var listSeconds: Double
  var elapsedSeconds: Double
  var perSecond: Double
  /// Per snapshot, from the call until it is durable.
  var latencyP50Microseconds: Double
  var latencyP99Microseconds: Double
  var latencyMaxMicroseconds: Double
  /// Per snapshot, from the call until it is in the log (lock wait included, sync excluded).
  var appendP50Microseconds: Double
  var appendP99Microseconds: Double
  var appendMaxMicroseconds: Double
  var appendMeanMicroseconds: Double

  enum CodingKeys: String, CodingKey {
    case count, clients, prefilled
    case waitedForSync = "waited_for_sync"
    case prefillSeconds = "prefill_seconds"
    case existingSnapshots = "existing_snapshots"
    case openSeconds = "open_seconds"
    case catalogPagesReadAtOpen = "catalog_pages_read_at_open"
    case infoSeconds = "info_seconds"
    case listSeconds = "list_seconds"
    case elapsedSeconds = "elapsed_seconds"
    case perSecond = "per_second"
    case latencyP50Microseconds = "latency_p50_us"
    case latencyP99Microseconds = "latency_p99_us"
    case latencyMaxMicroseconds = "latency_max_us"
    case appendP50Microseconds = "no_sync_p50_us"
    case appendP99Microseconds = "no_sync_p99_us"
    case appendMaxMicroseconds = "no_sync_max_us"
    case appendMeanMicroseconds = "no_sync_mean_us"
  }

  var humanText: String {
    func f(_ v: Double, _ digits: Int = 1) -> String { rounded(v, digits: digits) }
    return """
      Prefilled \(prefilled) snapshots in \(f(prefillSeconds, 2)) s; reopened with \(existingSnapshots) in \(f(openSeconds * 1e3, 2)) ms (\(catalogPagesReadAtOpen) catalog pages read), info \(f(infoSeconds * 1e3, 2)) ms, newest 100 listed in \(f(listSeconds * 1e3, 2)) ms.
      Created \(count) \(waitedForSync ? "durable " : "")snapshots with \(clients) clients in \(f(elapsedSeconds, 3)) s: \(f(perSecond, 0)) snapshots/s.
      Latency until durable: p50 \(f(latencyP50Microseconds)) us  p99 \(f(latencyP99Microseconds)) us  max \(f(latencyMaxMicroseconds)) us
      Latency without the sync: p50 \(f(appendP50Microseconds)) us  p99 \(f(appendP99Microseconds)) us  max \(f(appendMaxMicroseconds)) us  mean \(f(appendMeanMicroseconds, 2)) us
      """
  }
}

enum SnapshotBench {
  static func run(path: String, _ s: SnapshotBenchSettings) throws -> SnapshotBenchResult {
    precondition(s.count > 0 && s.clients > 0 && s.prefill >= 0)
    // Prefill without syncs (one flush at the end), then close: the close checkpoints, so the
    // reopen below reads a catalog tree, not a log tail.
    var prefillSeconds = 0.0
    try ImageAccess.with(path, readOnly: false) { image in
      let tag = try image.info.nextSeq
      let begin = monotonicNanoseconds()
      for i in 0..<s.prefill { try image.createSnapshot(name: "prefill-\(tag)-\(i)") }
      try image.flush()
      prefillSeconds = Double(monotonicNanoseconds() - begin) / 1e9
    }
    let openBegin = monotonicNanoseconds()
    let image = try ImageAccess.open(path, readOnly: false)
    let openSeconds = Double(monotonicNanoseconds() - openBegin) / 1e9
    return try ImageAccess.withOpened(image, path: path) { image in
      let pagesAtOpen = image.catalogPagesRead
      let infoBegin = monotonicNanoseconds()
      let info = try image.info
      let listBegin = monotonicNanoseconds()
      _ = try image.newestSnapshots(100)
      let listEnd = monotonicNanoseconds()
      let measured = try measure(SharedImage(image), s, tag: info.nextSeq)
      return SnapshotBenchResult(
        count: s.count, clients: s.clients, waitedForSync: !s.noWait, prefilled: s.prefill,
        prefillSeconds: prefillSeconds,
        existingSnapshots: info.snapshotCount, openSeconds: openSeconds, catalogPagesReadAtOpen: pagesAtOpen,
        infoSeconds: Double(listBegin - infoBegin) / 1e9, listSeconds: Double(listEnd - listBegin) / 1e9,
        elapsedSeconds: measured.elapsed, perSecond: Double(s.count) / measured.elapsed,
        latencyP50Microseconds: percentile(measured.durable, 50),
        latencyP99Microseconds: percentile(measured.durable, 99),
        latencyMaxMicroseconds: percentile(measured.durable, 100),
        appendP50Microseconds: percentile(measured.append, 50), appendP99Microseconds: percentile(measured.append, 99),
        appendMaxMicroseconds: percentile(measured.append, 100),
        appendMeanMicroseconds: Double(measured.append.reduce(0, +)) / Double(s.count) / 1e3)
    }
  }

  /// Latencies in nanoseconds, sorted.
  private static func measure(_ shared: SharedImage, _ s: SnapshotBenchSettings, tag: UInt64) throws
    -> (elapsed: Double, durable: [UInt64], append: [UInt64])
  {
    let durable = LatencyBuffer(count: s.count)
    let append = LatencyBuffer(count: s.count)
    let failure = FirstError()
    let begin = monotonicNanoseconds()
    runThreads(s.clients) { client in
      // Client c creates snapshots c, c + clients, c + 2 × clients, …
      for i in stride(from: client, to: s.count, by: s.clients) where !failure.isSet {
        let start = monotonicNanoseconds()
        var appended: UInt64 = 0
        do {
          let create = { (image: StrataImage) in
            _ = try image.createSnapshot(name: "bench-\(tag)-\(i)")
            appended = monotonicNanoseconds()
          }
          if s.noWait { try shared.with(create) } else { try shared.durably(create) }
        } catch {
          failure.set(error)
          return
        }
        durable.values[i] = monotonicNanoseconds() - start
        append.values[i] = appended - start
      }
    }
    if failure.error == nil, s.noWait { try shared.waitDurable(through: shared.appendedSeq) }
    let elapsed = Double(monotonicNanoseconds() - begin) / 1e9
    if let error = failure.error { throw error }
    return (elapsed, durable.sorted(), append.sorted())
  }

  private static func percentile(_ sorted: [UInt64], _ p: Int) -> Double {
    Double(sorted[min(sorted.count - 1, sorted.count * p / 100)]) / 1e3
  }
}

/// One slot per measured snapshot; each index is written by exactly one thread.
private final class LatencyBuffer: @unchecked Sendable {
  let values: UnsafeMutableBufferPointer<UInt64>
  init(count: Int) { values = .allocate(capacity: count) }
  deinit { values.deallocate() }
  func sorted() -> [UInt64] { Array(values).sorted() }
}

/// The first error any client thread met.
private final class FirstError: @unchecked Sendable {
  private let lock = SharedLock()
  private var stored: Error?
  var error: Error? { lock.with { stored } }
  var isSet: Bool { error != nil }
  func set(_ e: Error) { lock.with { if stored == nil { stored = e } } }
}

private final class SharedLock: @unchecked Sendable {
  private let mutex: UnsafeMutablePointer<pthread_mutex_t> = .allocate(capacity: 1)
  init() { pthread_mutex_init(mutex, nil) }
  deinit {
    pthread_mutex_destroy(mutex)
    mutex.deallocate()
  }
  func with<T>(_ body: () -> T) -> T {
    pthread_mutex_lock(mutex)
    defer { pthread_mutex_unlock(mutex) }
    return body()
  }
}
