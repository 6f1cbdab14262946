import ArgumentParser
import StrataCore

struct CreateCommand: ParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "create",
    abstract: "Create a new, empty Strata image.",
    discussion: """
      The new disk reads as zeros everywhere and the file starts small: space is used only as \
      data is written.

      With --backing the new image is an external clone: blocks it never wrote are read from \
      the parent image, which is opened read-only and must not change afterwards (the clone \
      records its image id and refuses a different one). A relative parent path is taken from \
      the new image's directory, so the pair can move together.

      --cdp-window keeps every point of the timeline inside the window restorable (continuous \
      data protection): a duration ('30m', '12h', '7d') or a size of log ('512M', '10G'); \
      'strata set' changes it later, and its help says more.

      Examples:
        strata create vm.strata --size 20G
        strata create vm.strata --size 20G --cdp-window 24h
        strata create vm1.strata --backing golden.strata
      """
  )

  @Argument(help: "Path of the image file to create.")
  var image: String

  @Option(
    name: .shortAndLong,
    help: ArgumentHelp("Virtual disk size, a multiple of 512 (e.g. 20G, 512M).", valueName: "size"),
    transform: ByteCount.parseDiskSize)
  var size: UInt64?

  @Option(
    name: .customLong("backing"),
    help: ArgumentHelp(
      "Parent image to read unwritten blocks from (the size defaults to its size).", valueName: "image"))
  var backing: String?

  @Option(
    help: ArgumentHelp("Bytes per virtual block: 4K (default), 8K, 16K, 32K or 64K.", valueName: "size"),
    transform: ByteCount.parse)
  var blockSize: UInt64?

  @Option(
    help: ArgumentHelp("Bytes per log segment: a power of two from 1M to 1G (default 8M).", valueName: "size"),
    transform: ByteCount.parse)
  var segmentSize: UInt64?

  @Option(
    name: .customLong("cdp-window"),
    help: ArgumentHelp(
      "Keep every point of this last duration (30m, 12h, 7d) or log size (512M, 10G) restorable (default: none).",
      valueName: "duration|size"),
    transform: CDPWindowArgument.parse)
  var cdpWindow: CDPWindowArgument?

  @Flag(help: "Replace the file if it already exists.")
  var force = false

  func validate() throws {
    if size == nil && backing == nil { throw ValidationError("Give the disk size with --size (or a --backing image).") }
  }

  func run() throws {
    try runReportingErrors {
      var options = ImageOptions()
      if let blockSize { options.blockSize = Int(clamping: blockSize) }
      if let segmentSize { options.segmentSize = Int(clamping: segmentSize) }
      options.cdpWindow = cdpWindow?.window
      let created: StrataImage
      if let backing {
        created = try about(image) {
          try StrataImage.create(
            path: image, backing: backing, virtualSize: self.size, options: options, overwrite: force)
        }
      } else {
        created = try ImageAccess.create(image, size: self.size ?? 0, options: options, overwrite: force)
      }
      let size = created.size
      try ImageAccess.withOpened(created, path: image) { try $0.flush() }
      print(
        "Formatting '\(image)', fmt=strata size=\(size) block_size=\(options.blockSize) "
          + "segment_size=\(options.segmentSize)\(backing.map { " backing_file=\($0)" } ?? "")"
          + (options.cdpWindow.map { " cdp_window=\(CDPWindowArgument.format($0))" } ?? ""))
    }
  }
}
