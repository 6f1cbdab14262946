import ArgumentParser
import StrataCore

struct SnapshotRestoreCommand: ParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "restore",
    abstract: "Return the disk to a snapshot.",
    discussion: """
      The disk's contents and size become the snapshot's; changes made since then are lost \
      unless another snapshot holds them. The snapshot itself, and any later ones, are kept.
      """
  )

  @Argument(help: "Path of the image.")
  var image: String

  @Argument(help: ArgumentHelp("Name of the snapshot to return to.", valueName: "name"))
  var name: String

  func run() throws {
    try runReportingErrors {
      try ImageAccess.with(image, readOnly: false) { opened in
        try opened.restore(snapshot: name)
        try opened.flush()
      }
      print("Restored snapshot '\(name)'.")
    }
  }
}
