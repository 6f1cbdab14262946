import ArgumentParser

struct SnapshotCommand: ParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "snapshot",
    abstract: "Create, list, delete and restore named snapshots.",
    discussion: """
      A snapshot freezes the whole disk as it is at that moment; later writes do not change it. \
      Creating one is a single log entry, so it is instant whatever the disk size. Read a \
      snapshot with 'strata read --snapshot NAME' or copy it out with 'strata convert --snapshot NAME'.
      """,
    subcommands: [
      SnapshotCreateCommand.self,
      SnapshotListCommand.self,
      SnapshotDeleteCommand.self,
      SnapshotRestoreCommand.self,
      SnapshotPruneCommand.self,
    ]
  )
}
