import VhostProtocol

/// Drives `requests` I/Os of `blockSize` bytes through `queues` queues of `client`, keeping
/// `depth` requests in flight per queue (capped at `client.maxDepth`), from this one thread (it polls all queues' call
/// eventfds together). Offsets are block-aligned within the first `span` bytes of the device
/// (0 = the whole capacity): sequential per queue (each queue starts in its own slice) or
/// uniformly random (xorshift, fixed seed). Reads are not copied out of guest memory; writes
/// carry a fixed non-zero pattern.
///
/// Returns IOPS over the whole run and the 50th / 99th percentile latency in microseconds
/// (publication in the avail ring to discovery in the used ring). Throws if any request fails.
public func runBenchmark(
  client: VhostUserClient, queues: Int, depth: Int, requests: Int, blockSize: Int, write: Bool, random: Bool,
  span: UInt64
) throws(VhostClientError) -> (iops: Double, p50us: Double, p99us: Double) {
  let queueCount = min(max(1, queues), client.queueCount)
  guard depth >= 1, requests >= 1 else { throw .invalidArgument("depth and requests must be at least 1") }
  guard blockSize >= 512, blockSize % 512 == 0 else {
    throw .invalidArgument("block size \(blockSize) is not a multiple of 512")
  }
  let capacity = client.capacityBytes ?? 0
  let limit = span == 0 ? capacity : (capacity == 0 ? span : min(span, capacity))
  let blocks = limit / UInt64(blockSize)
  guard blocks >= 1 else { throw .invalidArgument("span of \(limit) bytes holds no \(blockSize)-byte block") }
  // A read or write chain takes 3 descriptors (1 with indirect tables): depth is capped to fit.
  let perQueueDepth = min(depth, client.maxDepth)

  let pattern = [UInt8]((0..<blockSize).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ 7) })
  var rng: UInt64 = 0x9E37_79B9_7F4A_7C15
  var cursor = (0..<queueCount).map { UInt64($0) * (blocks / UInt64(queueCount)) }
  let sectorsPerBlock = UInt64(blockSize / 512)

  func nextRequest(_ q: Int) -> BlockRequest {
    let block: UInt64
    if random {
      rng ^= rng << 13
      rng ^= rng >> 7
      rng ^= rng << 17
      block = rng % blocks
    } else {
      block = cursor[q] % blocks
      cursor[q] += 1
    }
    let sector = block * sectorsPerBlock
    return write ? .write(sector: sector, data: pattern) : .read(sector: sector, length: blockSize)
  }

  var latencies: [UInt64] = []
  latencies.reserveCapacity(requests)
  var submitted = 0
  var failures = 0
  var firstFailure: UInt8 = 0
  let start = monotonicNanoseconds()

  // Fill every queue, one kick per queue.
  for q in 0..<queueCount {
    var n = 0
    while n < perQueueDepth && submitted < requests {
      try client.submit(queue: q, nextRequest(q), kick: false, copyData: false)
      submitted += 1
      n += 1
    }
    try client.kick(queue: q)
  }
  var completed = 0
  while completed < requests {
    let done = try client.waitAny(queues: Array(0..<queueCount))
    if done.isEmpty { throw .protocolViolation("benchmark: nothing in flight before all requests completed") }
    var refill = [Int](repeating: 0, count: queueCount)
    for c in done {
      completed += 1
      latencies.append(c.latencyNs)
      if c.status != VirtioBlkStatus.ok.rawValue {
        if failures == 0 { firstFailure = c.status ?? 0xFF }
        failures += 1
      }
      refill[c.queue] += 1
    }
    for q in 0..<queueCount where refill[q] > 0 {
      var n = 0
      while n < refill[q] && submitted < requests {
        try client.submit(queue: q, nextRequest(q), kick: false, copyData: false)
        submitted += 1
        n += 1
      }
      if n > 0 { try client.kick(queue: q) }
    }
  }
  let elapsed = monotonicNanoseconds() - start
  if failures > 0 { throw .requestFailed(status: firstFailure) }
  latencies.sort()
  func percentile(_ p: Double) -> Double {
    let i = min(latencies.count - 1, Int((Double(latencies.count) * p).rounded(.up)) - 1)
    return Double(latencies[max(0, i)]) / 1000
  }
  let iops = Double(requests) / (Double(max(elapsed, 1)) / 1e9)
  return (iops, percentile(0.50), percentile(0.99))
}
