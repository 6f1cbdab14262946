import ArgumentParser
import StrataCore
import VhostClient

struct VhostBenchCommand: ParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "vhost-bench",
    abstract: "Measure any vhost-user-blk server through the in-repo front-end.",
    discussion: """
      Connects to SOCKET like a VMM would (shared guest memory, split virtqueues, or packed \
      ones with --packed), sends COUNT requests of SIZE bytes with DEPTH in flight on each of \
      QUEUES queues, and prints IOPS and latency percentiles. Works against 'strata serve' and against qemu-storage-daemon \
      (--export type=vhost-user-blk), which is how bench/vhost.sh compares them.
      """
  )

  @Option(help: ArgumentHelp("The server's Unix socket.", valueName: "path"))
  var socket: String

  @Option(name: .shortAndLong, help: "Number of requests.")
  var count = 50000

  @Option(name: .shortAndLong, help: "Requests in flight per queue.")
  var depth = 32

  @Option(help: "Virtqueues to use (at most what the server offers).")
  var queues = 1

  @Option(name: .shortAndLong, help: ArgumentHelp("Bytes per request (a multiple of 512).", valueName: "size"))
  var size = "4K"

  @Flag(name: .shortAndLong, help: "Write instead of read.")
  var write = false

  @Option(help: "Offsets: 'rand' or 'seq'.")
  var pattern = BenchPattern.rand

  @Option(help: ArgumentHelp("Restrict offsets to the first SPAN bytes of the disk.", valueName: "span"))
  var span = "0"

  @Flag(help: "Use packed virtqueues (the server must offer them: strata serve --packed-ring).")
  var packed = false

  @OptionGroup var format: OutputOptions

  func validate() throws {
    guard count > 0, depth > 0, queues > 0 else {
      throw ValidationError("--count, --depth and --queues must be positive")
    }
  }

  func run() throws {
    try runReportingErrors {
      let bytes = Int(try ByteCount.parse(size))
      var options = VhostUserClient.Options()
      options.queues = queues
      options.ring = packed ? .packed : .split
      options.memorySize = max(64 << 20, 4 * queues * depth * bytes)
      let result: (iops: Double, p50us: Double, p99us: Double)
      do {
        let client = try VhostUserClient.connect(path: socket, options: options)
        defer { client.shutdown() }
        result = try runBenchmark(
          client: client, queues: queues, depth: depth, requests: count, blockSize: bytes, write: write,
          random: pattern == .rand, span: try ByteCount.parse(span))
      } catch {
        throw StrataError(.io, "vhost-user benchmark against \(socket) failed: \(error)")
      }
      let report = VhostBenchReport(
        socket: socket, operation: write ? "write" : "read", pattern: pattern.rawValue, requestBytes: bytes,
        queues: queues, depth: depth, requests: count, iops: result.iops, latencyP50Microseconds: result.p50us,
        latencyP99Microseconds: result.p99us)
      switch format.output {
      case .human:
        print(
          "\(report.requests) \(report.operation) requests of \(bytes) bytes, \(queues) queue(s) x \(depth) in flight "
            + "(\(report.pattern)): IOPS \(Int(report.iops))  p50 \(Int(report.latencyP50Microseconds)) us  "
            + "p99 \(Int(report.latencyP99Microseconds)) us")
      case .json: try Printer.printJSON(report)
      }
    }
  }
}

struct VhostBenchReport: Encodable {
  var socket: String
  var operation: String
  var pattern: String
  var requestBytes: Int
  var queues: Int
  var depth: Int
  var requests: Int
  var iops: Double
  var latencyP50Microseconds: Double
  var latencyP99Microseconds: Double

  enum CodingKeys: String, CodingKey {
    case socket, operation, pattern, queues, depth, requests, iops
    case requestBytes = "request_bytes"
    case latencyP50Microseconds = "latency_p50_us"
    case latencyP99Microseconds = "latency_p99_us"
  }
}
