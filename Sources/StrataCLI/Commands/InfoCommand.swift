import ArgumentParser
import StrataCore

struct InfoCommand: ParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "info",
    abstract: "Show the size, layout and space use of an image.",
    discussion: """
      Opens the image read-only. 'allocated' is the data the disk holds (data blocks times the \
      block size); 'live log data' is what the log still needs, including metadata; 'disk size' \
      is the space the file takes on the file system. Recovery notes say what opening the image \
      had to skip after a crash; recovery problems are damage a crash does not explain (the \
      other commands refuse such an image). 'cdp window' is what `strata set --cdp-window` \
      set, and the first seq it keeps restorable now.
      """
  )

  @Argument(help: "Path of the image.")
  var image: String

  @OptionGroup var format: OutputOptions

  func run() throws {
    try runReportingErrors {
      let report = try ImageAccess.with(image, readOnly: true, allowDamaged: true) { opened in
        InfoReport(
          path: image, info: try opened.info,
          recoveryNotes: opened.recoveryNotes, recoveryProblems: opened.recoveryProblems,
          // Where the window begins now; a damaged log just leaves it out.
          cdpRetainedSeq: try? opened.cdpRetainedSeq())
      }
      switch format.output {
      case .human: print(report.humanText)
      case .json: try Printer.printJSON(report)
      }
    }
  }
}
