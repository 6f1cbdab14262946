import ArgumentParser

/// The `strata` command: create, inspect and change Strata disk images.
public struct StrataCommand: ParsableCommand {
  public static let configuration = CommandConfiguration(
    commandName: "strata",
    abstract: "Create, inspect and change Strata virtual disk images.",
    discussion: """
      A Strata image is a virtual disk in one file. Writes are appended to a log (copy on write), \
      so a snapshot is a single log entry and all-zero blocks take no space.

      Sizes, offsets and lengths accept binary suffixes: K, M, G, T, P and E (powers of 1024; \
      KiB, MiB... mean the same), e.g. '10G', '64K', '1.5M'. Plain numbers are bytes; offsets \
      may also be hexadecimal ('0x10000'). Disk sizes must be multiples of 512.

      Exit status: 0 on success, 1 when the operation fails, 63 when a file is not a Strata \
      image, 64 for a usage error (a missing or invalid argument). 'check' also exits 2 when \
      it finds corruption and 3 when it finds only leaked space.
      """,
    subcommands: [
      CreateCommand.self,
      InfoCommand.self,
      SetCommand.self,
      MapCommand.self,
      ReadCommand.self,
      WriteCommand.self,
      SnapshotCommand.self,
      TimelineCommand.self,
      RestoreCommand.self,
      DiffCommand.self,
      CloneCommand.self,
      BranchCommand.self,
      ConvertCommand.self,
      ResizeCommand.self,
      InspectCommand.self,
      CompactCommand.self,
      CheckCommand.self,
      BenchCommand.self,
      ServeCommand.self,
      VhostBenchCommand.self,
    ]
  )

  public init() {}
}
