import ArgumentParser
import StrataControl
import StrataCore

struct SnapshotCreateCommand: ParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "create",
    abstract: "Take a snapshot of the disk as it is now.",
    discussion: """
      The command returns once the snapshot is durable. For an image that `strata serve` is \
      serving, pass its control socket: the snapshot then holds every write the guest was told \
      had completed.
      """
  )

  @Argument(help: "Path of the image.")
  var image: String

  @Argument(help: ArgumentHelp("Name of the new snapshot (unique within the image).", valueName: "name"))
  var name: String

  @OptionGroup var control: ControlOption

  @OptionGroup var format: OutputOptions

  func run() throws {
    try runReportingErrors {
      let created: SnapshotEntry
      if let socket = control.control {
        let reply = try ControlClient.request(["command": "snapshot", "name": name], path: socket)
        created = SnapshotEntry(controlReply: reply["snapshot"])
      } else {
        created = try ImageAccess.with(image, readOnly: false) { opened in
          let info = try opened.createSnapshot(name: name)
          try opened.flush()
          return SnapshotEntry(info)
        }
      }
      switch format.output {
      case .human: print("Created snapshot '\(created.name)' (seq \(created.seq)).")
      case .json: try Printer.printJSON(created)
      }
    }
  }
}
