import ArgumentParser
import StrataCore

struct SnapshotListCommand: ParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "list",
    abstract: "List the snapshots of an image, oldest first.",
    discussion: """
      Shows each snapshot's name, sequence number and creation time. Opens the image read-only. \
      Reads only the catalog pages it shows, so paging through millions of snapshots is cheap: \
      '--after 0 --limit N' lists the first N, then '--after LAST_SEQ --limit N' the next N.
      """
  )

  @Argument(help: "Path of the image.")
  var image: String

  @Option(help: ArgumentHelp("Show at most N snapshots (without --after: the newest N).", valueName: "n"))
  var limit: Int?

  @Option(
    help: ArgumentHelp(
      "Show the snapshots created after this one: a snapshot name, or else a sequence number (0: from the start).",
      valueName: "seq|name"))
  var after: String?

  @OptionGroup var format: OutputOptions

  func validate() throws {
    if let limit, limit < 0 { throw ValidationError("--limit must be zero or more, not \(limit).") }
  }

  func run() throws {
    try runReportingErrors {
      let entries = try ImageAccess.with(image, readOnly: true) { img -> [SnapshotEntry] in
        let list: [SnapshotInfo]
        if let after {
          list = try img.snapshots(after: try cursor(after, in: img), limit: limit ?? .max)
        } else if let limit {
          list = try img.newestSnapshots(limit)
        } else {
          list = try img.snapshots
        }
        return list.map(SnapshotEntry.init)
      }
      switch format.output {
      case .human: print(entries.isEmpty ? "No snapshots." : SnapshotEntry.table(entries))
      case .json: try Printer.printJSON(entries)
      }
    }
  }

  /// A name wins over a number, so a snapshot named "42" can be a cursor too.
  private func cursor(_ value: String, in image: StrataImage) throws -> UInt64 {
    do { return try image.snapshot(named: value).seq } catch let e as StrataError where e.code == .notFound {}
    guard let seq = UInt64(value) else {
      throw StrataError(.notFound, "no snapshot named \"\(value)\" (and it is not a sequence number)")
    }
    return seq
  }
}
