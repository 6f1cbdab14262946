import ArgumentParser
import StrataControl
import StrataCore

struct SnapshotPruneCommand: ParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "prune",
    abstract: "Delete the snapshots a retention policy does not keep.",
    discussion: """
      Keeps the newest --keep-last snapshots, and the newest snapshot of each of the latest \
      --keep-hourly hours, --keep-daily days and --keep-weekly weeks (UTC, weeks from Monday) \
      that have snapshots; a snapshot any rule keeps stays. --prefix limits pruning to names \
      that start with it (e.g. the auto- snapshots of `serve --snapshot-every`). Deleting a \
      snapshot frees nothing the disk, another snapshot or the timeline still needs. A snapshot \
      a branch is based on (see `strata clone`) is kept, with a note naming the branch. For an \
      image that `strata serve` is serving, pass its control socket.

      Example:
        strata snapshot prune vm.strata --prefix auto- --keep-last 24 --keep-daily 7 --keep-weekly 4
      """
  )

  @Argument(help: "Path of the image.")
  var image: String

  @Option(help: ArgumentHelp("Keep the newest N snapshots.", valueName: "n"))
  var keepLast = 0
  @Option(help: ArgumentHelp("Keep the newest snapshot of each of the latest N hours.", valueName: "n"))
  var keepHourly = 0
  @Option(help: ArgumentHelp("Keep the newest snapshot of each of the latest N days.", valueName: "n"))
  var keepDaily = 0
  @Option(help: ArgumentHelp("Keep the newest snapshot of each of the latest N weeks.", valueName: "n"))
  var keepWeekly = 0

  @Option(help: ArgumentHelp("Only consider snapshots whose name starts with this.", valueName: "prefix"))
  var prefix = ""

  @Flag(help: "Show what would be deleted; delete nothing.")
  var dryRun = false

  @OptionGroup var control: ControlOption

  @OptionGroup var format: OutputOptions

  private var policy: RetentionPolicy {
    RetentionPolicy(last: keepLast, hourly: keepHourly, daily: keepDaily, weekly: keepWeekly)
  }

  func validate() throws {
    guard [keepLast, keepHourly, keepDaily, keepWeekly].allSatisfy({ $0 >= 0 }) else {
      throw ValidationError("--keep-* counts cannot be negative.")
    }
    guard !policy.keepsNothing else {
      throw ValidationError(
        "Give at least one --keep-* rule (a policy that keeps nothing would delete every snapshot).")
    }
  }

  func run() throws {
    try runReportingErrors {
      let deleted =
        try control.control.map(pruneServed)
        ?? ImageAccess.with(image, readOnly: dryRun) { opened in
          // Snapshots branches are based on stay whatever the policy says.
          let pins = try opened.branchPins()
          if !pins.isEmpty {
            let candidates = try opened.snapshots.filter { $0.name.hasPrefix(prefix) }
            for s in policy.apply(to: candidates).delete {
              guard let branches = pins[s.seq] else { continue }
              Printer.note(
                "Kept snapshot '\(s.name)': branch \(branches.map { "'\($0)'" }.joined(separator: ", ")) is based on it "
                  + "('strata branch delete' first to let it go).")
            }
          }
          let deleted = try opened.pruneSnapshots(policy, prefix: prefix, dryRun: dryRun)
          if !dryRun { try opened.flush() }
          return deleted.map(SnapshotEntry.init)
        }
      switch format.output {
      case .human:
        let verb = dryRun ? "Would delete" : "Deleted"
        print("\(verb) \(deleted.count) snapshot(s)\(deleted.isEmpty ? "." : ":")")
        if !deleted.isEmpty { print(SnapshotEntry.table(deleted)) }
      case .json: try Printer.printJSON(deleted)
      }
    }
  }

  /// The same through the control socket of the server serving the image.
  private func pruneServed(_ socket: String) throws -> [SnapshotEntry] {
    let reply = try ControlClient.request(
      [
        "command": "prune", "keep_last": keepLast, "keep_hourly": keepHourly, "keep_daily": keepDaily,
        "keep_weekly": keepWeekly, "prefix": prefix, "dry_run": dryRun,
      ], path: socket)
    return (reply["deleted"] as? [Any] ?? []).map { SnapshotEntry(controlReply: $0) }
  }
}
