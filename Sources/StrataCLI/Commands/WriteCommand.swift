import ArgumentParser
import StrataCore

struct WriteCommand: ParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "write",
    abstract: "Copy bytes from a file or standard input onto the disk.",
    discussion: """
      Any offset works; the whole input must fit before the end of the disk. All-zero blocks \
      are recorded as zeros and take no space. The command returns once the data is durable.

      Example:
        printf 'hello' | strata write vm.strata --offset 4K --input -
      """
  )

  @Argument(help: "Path of the image.")
  var image: String

  @Option(
    name: .shortAndLong, help: ArgumentHelp("Where on the disk to start writing, in bytes.", valueName: "offset"),
    transform: ByteCount.parse)
  var offset: UInt64 = 0

  @Option(
    name: .shortAndLong,
    help: ArgumentHelp("File with the bytes to write; '-' reads standard input.", valueName: "file"))
  var input: String

  @OptionGroup var branch: BranchOption

  func run() throws {
    try runReportingErrors {
      let path = try branch.path(of: image)
      let source = try about(input) { try RawFile.openForReading(input) }
      let written = try ImageAccess.with(path, readOnly: false) { opened in
        try Streams.copy(from: source, to: opened, at: offset)
      }
      try source.close()
      print("wrote \(written) bytes at offset \(offset)")
    }
  }
}
