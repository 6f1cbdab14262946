import ArgumentParser
import StrataCore

struct ReadCommand: ParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "read",
    abstract: "Copy bytes from the disk to standard output or a file.",
    discussion: """
      Writes the raw bytes, with no formatting; any offset and length work. Blocks that were \
      never written read as zeros. A block whose stored checksum does not match is not returned: \
      the command fails instead. Opens the image read-only.

      Example:
        strata read vm.strata --offset 1M --length 4K | hexdump -C
      """
  )

  @Argument(help: "Path of the image.")
  var image: String

  @Option(
    name: .shortAndLong, help: ArgumentHelp("Where to start reading, in bytes.", valueName: "offset"),
    transform: ByteCount.parse)
  var offset: UInt64 = 0

  @Option(
    name: .shortAndLong, help: ArgumentHelp("How many bytes to read.", valueName: "length"),
    transform: ByteCount.parse)
  var length: UInt64

  @OptionGroup var point: PointOptions

  @OptionGroup var branch: BranchOption

  @Option(
    name: .long,
    help: ArgumentHelp("Write the bytes to this file (replacing it) instead of standard output.", valueName: "file"))
  var output: String?

  func run() throws {
    try runReportingErrors {
      try ImageAccess.with(try branch.path(of: image), readOnly: true) { opened in
        let source = try ImageAccess.source(opened, snapshot: point.snapshot, at: point.at)
        try source.checkRange(offset: offset, length: length)
        let out = try about(output ?? "-") { try RawFile.create(output ?? "-", overwrite: true) }
        try Streams.copy(from: source, offset: offset, length: length, to: out)
        try out.close()
      }
    }
  }
}
