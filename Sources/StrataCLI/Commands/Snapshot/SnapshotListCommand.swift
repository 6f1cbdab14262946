import ArgumentParser
import StrataCore

struct SnapshotListCommand: ParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "list",
    abstract: "List the snapshots of an image, oldest first.",
    discussion: "Shows each snapshot's name, sequence number and creation time. Opens the image read-only."
  )

  @Argument(help: "Path of the image.")
  var image: String

  @Option(help: ArgumentHelp("Show only the newest N snapshots.", valueName: "n"))
  var limit: Int?

  @OptionGroup var format: OutputOptions

  func validate() throws {
    if let limit, limit < 0 { throw ValidationError("--limit must be zero or more, not \(limit).") }
  }

  func run() throws {
    try runReportingErrors {
      var entries = try ImageAccess.with(image, readOnly: true) { $0.snapshots.map(SnapshotEntry.init) }
      if let limit { entries = Array(entries.suffix(limit)) }
      switch format.output {
      case .human: print(entries.isEmpty ? "No snapshots." : SnapshotEntry.table(entries))
      case .json: try Printer.printJSON(entries)
      }
    }
  }
}
