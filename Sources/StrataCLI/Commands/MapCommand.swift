import ArgumentParser
import StrataCore

struct MapCommand: ParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "map",
    abstract: "Show which ranges of the disk hold data, zeros or nothing.",
    discussion: """
      Each extent is a run of blocks in one state: 'data' (stored in the image file at the \
      offset shown under 'Mapped to'), 'zero' (known to be zeros, nothing stored) or \
      'unallocated' (never written or discarded; reads as zeros). Opens the image read-only.
      """
  )

  @Argument(help: "Path of the image.")
  var image: String

  @Option(help: ArgumentHelp("Map this snapshot instead of the current disk.", valueName: "name"))
  var snapshot: String?

  @Option(
    help: ArgumentHelp(
      "Use the disk as it was at this point instead: a seq or an RFC 3339 time (see `strata timeline`).",
      valueName: "seq|time"),
    transform: PointInTime.parse)
  var at: PointInTime?

  @OptionGroup var format: OutputOptions

  func validate() throws {
    if snapshot != nil && at != nil {
      throw ValidationError("--snapshot and --at name two different points: pick one.")
    }
  }

  func run() throws {
    try runReportingErrors {
      let (entries, chain) = try ImageAccess.with(image, readOnly: true) { opened in
        (
          try ImageAccess.source(opened, snapshot: snapshot, at: at).extents(0, nil).map(MapEntry.init),
          opened.backingChain
        )
      }
      switch format.output {
      case .human: print(MapEntry.table(entries, files: [image] + chain))
      case .json: try Printer.printJSON(entries)
      }
    }
  }
}
