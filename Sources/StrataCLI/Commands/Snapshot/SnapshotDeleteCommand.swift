import ArgumentParser
import StrataControl
import StrataCore

struct SnapshotDeleteCommand: ParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "delete",
    abstract: "Delete a snapshot.",
    discussion: """
      The current disk and the other snapshots are not affected. A snapshot a branch is based on \
      (see `strata clone`) cannot be deleted until the branch is ('strata branch delete'). For an \
      image that `strata serve` is serving, pass its control socket.
      """
  )

  @Argument(help: "Path of the image.")
  var image: String

  @Argument(help: ArgumentHelp("Name of the snapshot to delete.", valueName: "name"))
  var name: String

  @OptionGroup var control: ControlOption

  func run() throws {
    try runReportingErrors {
      if let socket = control.control {
        _ = try ControlClient.request(["command": "delete_snapshot", "name": name], path: socket)
      } else {
        try ImageAccess.with(image, readOnly: false) { opened in
          try opened.deleteSnapshot(name: name)
          try opened.flush()
        }
      }
      print("Deleted snapshot '\(name)'.")
    }
  }
}
