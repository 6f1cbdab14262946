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

  @OptionGroup var point: PointOptions

  @OptionGroup var branch: BranchOption

  @OptionGroup var format: OutputOptions

  func run() throws {
    try runReportingErrors {
      let path = try branch.path(of: image)
      let (entries, chain) = try ImageAccess.with(path, readOnly: true) { opened in
        (
          try ImageAccess.source(opened, snapshot: point.snapshot, at: point.at).extents(0, nil).map(MapEntry.init),
          opened.backingChain
        )
      }
      switch format.output {
      case .human: print(MapEntry.table(entries, files: [path] + chain))
      case .json: try Printer.printJSON(entries)
      }
    }
  }
}
