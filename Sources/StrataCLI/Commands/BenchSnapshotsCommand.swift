import ArgumentParser
import StrataCore

struct BenchSnapshotsCommand: ParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "snapshots",
    abstract: "Measure how fast durable snapshots are created, and what many existing ones cost.",
    discussion: """
      In-process: CLIENTS threads share the image and each creates snapshots one after another, \
      every one made durable (group commit: one sync serves every snapshot waiting for it) \
      before the client's next. First, --prefill N snapshots are created without syncs and the \
      image is reopened (timed, with 'info' and a 100-entry listing), so the cost with many \
      existing snapshots can be compared with the cost with few. Reports snapshots per second \
      and latency percentiles with and without the sync. The snapshots stay in the image.
      """
  )

  @Argument(help: "Path of the image.")
  var image: String

  @Option(name: .shortAndLong, help: "Snapshots to create and time.")
  var count = 10000

  @Option(help: "Threads creating snapshots at the same time.")
  var clients = 1

  @Option(help: ArgumentHelp("Snapshots to create first, without syncs and untimed.", valueName: "n"))
  var prefill = 0

  @Flag(help: "Do not wait for each snapshot to be durable (one flush at the end): measures the in-memory cost.")
  var noWait = false

  @OptionGroup var format: OutputOptions

  func validate() throws {
    guard count > 0 else { throw ValidationError("--count must be positive") }
    guard clients > 0 && clients <= 1024 else { throw ValidationError("--clients must be 1...1024") }
    guard prefill >= 0 else { throw ValidationError("--prefill must be zero or more") }
  }

  func run() throws {
    try runReportingErrors {
      let result = try SnapshotBench.run(
        path: image, SnapshotBenchSettings(count: count, clients: clients, prefill: prefill, noWait: noWait))
      switch format.output {
      case .human: print(result.humanText)
      case .json: try Printer.printJSON(result)
      }
    }
  }
}
