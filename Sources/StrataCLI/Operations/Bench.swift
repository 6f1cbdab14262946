import StrataCore
import StrataIO

#if canImport(Glibc)
  import Glibc
#endif

/// `v` rounded to `digits` decimals, as the benchmark reports print numbers ("12.34").
func rounded(_ v: Double, digits: Int) -> String {
  let scale = Double((0..<digits).reduce(1) { r, _ in r * 10 })
  return String(Double((v * scale).rounded()) / scale)
}

/// What `strata bench` measures, modelled on `qemu-img bench`: `count` requests of `size`
/// bytes with `depth` in flight, random or sequential, reads or writes.
struct BenchSettings {
  var count: Int
  var depth: Int
  var size: Int
  var write: Bool
  var pattern: BenchPattern
  var engine: IOEngineKind?
  var offset: UInt64
}

enum BenchPattern: String, CaseIterable {
  case rand
  case seq
}

struct BenchResult: Encodable {
  var engine: String
  var pattern: String
  var operation: String
  var requestBytes: Int
  var depth: Int
  var requests: Int
  var elapsedSeconds: Double
  var iops: Double
  var mbPerSecond: Double
  var latencyP50Microseconds: Double
  var latencyP99Microseconds: Double

  enum CodingKeys: String, CodingKey {
    case engine, pattern, operation, depth, requests, iops
    case requestBytes = "request_bytes"
    case elapsedSeconds = "elapsed_seconds"
    case mbPerSecond = "mb_per_second"
    case latencyP50Microseconds = "latency_p50_us"
    case latencyP99Microseconds = "latency_p99_us"
  }

  var humanText: String {
    func f(_ v: Double, _ digits: Int = 2) -> String { rounded(v, digits: digits) }
    return """
      Sending \(requests) \(operation) requests, \(requestBytes) bytes each, \(depth) in parallel (\(pattern), engine \(engine))
      Run completed in \(f(elapsedSeconds, 3)) seconds.
      IOPS: \(f(iops, 0))  throughput: \(f(mbPerSecond)) MB/s  latency p50: \(f(latencyP50Microseconds)) us  p99: \(f(latencyP99Microseconds)) us
      """
  }
}

enum Bench {
  static func run(_ image: StrataImage, _ s: BenchSettings) throws -> BenchResult {
    precondition(s.count > 0 && s.depth > 0 && s.size > 0)
    let pool = UnsafeMutableRawBufferPointer.allocate(byteCount: s.depth * s.size, alignment: 4096)
    defer { pool.deallocate() }
    var rng = SplitMix64(seed: 0x5354_5241_5441)
    // Random, non-zero contents: all-zero blocks would be elided and flatter the numbers.
    for i in stride(from: 0, to: pool.count - 7, by: 8) {
      pool.storeBytes(of: rng.next() | 1, toByteOffset: i, as: UInt64.self)
    }
    let queue = try ImageQueue(
      image: image, depth: s.depth, engine: s.engine, registered: [pool], ownerThreadOnly: true)
    defer { queue.close() }
    let span = image.size > s.offset ? (image.size - s.offset) / UInt64(s.size) : 0
    guard span > 0 else { throw StrataError(.invalidArgument, "the image is smaller than one request") }
    var latencies = [UInt64](repeating: 0, count: s.count)
    var started = [UInt64](repeating: 0, count: s.depth)
    var freeSlots = Array(0..<s.depth)
    var completions = [QueueCompletion](repeating: QueueCompletion(tag: 0, error: nil), count: s.depth)
    var submitted = 0
    var completed = 0
    let begin = monotonicNanoseconds()
    while completed < s.count {
      while submitted < s.count, let slot = freeSlots.popLast() {
        let index = s.pattern == .seq ? UInt64(submitted) % span : rng.next() % span
        let offset = s.offset + index * UInt64(s.size)
        let buffer = UnsafeMutableRawBufferPointer(rebasing: pool[(slot * s.size)..<((slot + 1) * s.size)])
        started[slot] = monotonicNanoseconds()
        if s.write {
          try queue.submitWrite(UnsafeRawBufferPointer(buffer), at: offset, tag: UInt64(slot))
        } else {
          try queue.submitRead(into: buffer, at: offset, tag: UInt64(slot))
        }
        submitted += 1
      }
      let n = try completions.withUnsafeMutableBufferPointer { try queue.reap($0, minimum: 1) }
      let now = monotonicNanoseconds()
      for c in completions[..<n] {
        if let error = c.error { throw error }
        let slot = Int(c.tag)
        latencies[completed] = now - started[slot]
        completed += 1
        freeSlots.append(slot)
      }
    }
    if s.write { try image.flush() }
    let elapsed = Double(monotonicNanoseconds() - begin) / 1e9
    latencies.sort()
    return BenchResult(
      engine: queue.engineDescription, pattern: s.pattern.rawValue, operation: s.write ? "write" : "read",
      requestBytes: s.size, depth: s.depth, requests: s.count, elapsedSeconds: elapsed,
      iops: Double(s.count) / elapsed, mbPerSecond: Double(s.count) * Double(s.size) / elapsed / 1e6,
      latencyP50Microseconds: Double(latencies[s.count / 2]) / 1e3,
      latencyP99Microseconds: Double(latencies[min(s.count - 1, s.count * 99 / 100)]) / 1e3)
  }
}

/// A small, fast, seeded generator: benchmark offsets repeat run to run.
struct SplitMix64 {
  private var state: UInt64
  init(seed: UInt64) { state = seed }
  mutating func next() -> UInt64 {
    state &+= 0x9E37_79B9_7F4A_7C15
    var z = state
    z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
    z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
    return z ^ (z >> 31)
  }
}
