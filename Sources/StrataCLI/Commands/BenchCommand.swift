import ArgumentParser
import StrataCore
import StrataIO

extension IOEngineKind: ExpressibleByArgument {}
extension BenchPattern: ExpressibleByArgument {}

/// `strata bench IMAGE` (read/write I/O, the default) and `strata bench snapshots IMAGE`.
struct BenchCommand: ParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "bench",
    abstract: "Measure I/O performance of an image (like 'qemu-img bench'), or snapshot creation.",
    subcommands: [BenchIOCommand.self, BenchSnapshotsCommand.self],
    defaultSubcommand: BenchIOCommand.self
  )
}

struct BenchIOCommand: ParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "io",
    abstract: "Measure read or write performance of an image, like 'qemu-img bench' (the default).",
    discussion: """
      Sends COUNT requests of SIZE bytes with DEPTH of them in flight through the image's \
      high-queue-depth interface, and prints requests, elapsed time, IOPS, throughput and \
      latency percentiles. Writes (-w) store random data and end with a flush, which is \
      counted. Reads of never-written ranges return zeros without touching the disk: fill the \
      image first (e.g. 'strata bench -w --pattern seq') to measure the disk.
      """
  )

  @Argument(help: "Path of the image.")
  var image: String

  @Option(name: .shortAndLong, help: "Number of requests.")
  var count = 75000

  @Option(name: .shortAndLong, help: "Requests in flight.")
  var depth = 64

  @Option(name: .shortAndLong, help: ArgumentHelp("Bytes per request (suffixes allowed).", valueName: "size"))
  var size = "4K"

  @Flag(name: .shortAndLong, help: "Write instead of read.")
  var write = false

  @Option(help: "Offsets: 'rand' (uniform, aligned to the request size) or 'seq'.")
  var pattern = BenchPattern.seq

  @Option(name: .shortAndLong, help: ArgumentHelp("Byte offset where the tested range starts.", valueName: "offset"))
  var offset = "0"

  @Option(
    name: [.customShort("i"), .customLong("aio")],
    help: "I/O engine: io_uring, native or threads (default: the best available, as qemu-img bench -i).")
  var engine: IOEngineKind?

  @OptionGroup var format: OutputOptions

  func validate() throws {
    guard count > 0 else { throw ValidationError("--count must be positive") }
    guard depth > 0 && depth <= 1024 else { throw ValidationError("--depth must be 1...1024") }
  }

  func run() throws {
    try runReportingErrors {
      let bytes = try ByteCount.parse(size)
      guard bytes > 0, bytes <= UInt64(ImageQueue.maxRequestBytes) else {
        throw StrataError(.invalidArgument, "--size must be 1 byte to \(ImageQueue.maxRequestBytes) bytes")
      }
      let settings = BenchSettings(
        count: count, depth: depth, size: Int(bytes), write: write, pattern: pattern, engine: engine,
        offset: try ByteCount.parse(offset))
      let result = try ImageAccess.with(image, readOnly: !write) { try Bench.run($0, settings) }
      switch format.output {
      case .human: print(result.humanText)
      case .json: try Printer.printJSON(result)
      }
    }
  }
}
