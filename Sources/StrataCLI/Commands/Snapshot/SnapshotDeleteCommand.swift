import ArgumentParser
import StrataCore

struct SnapshotDeleteCommand: ParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "delete",
    abstract: "Delete a snapshot.",
    discussion: """
      The current disk and the other snapshots are not affected. A snapshot a branch is based on \
      (see `strata clone`) cannot be deleted until the branch is ('strata branch delete').
      """
  )

  @Argument(help: "Path of the image.")
  var image: String

  @Argument(help: ArgumentHelp("Name of the snapshot to delete.", valueName: "name"))
  var name: String

  func run() throws {
    try runReportingErrors {
      try ImageAccess.with(image, readOnly: false) { opened in
        try opened.deleteSnapshot(name: name)
        try opened.flush()
      }
      print("Deleted snapshot '\(name)'.")
    }
  }
}
