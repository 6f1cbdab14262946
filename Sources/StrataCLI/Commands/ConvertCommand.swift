import ArgumentParser
import StrataCore

struct ConvertCommand: ParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "convert",
    abstract: "Copy a disk into a new image, between raw and Strata formats.",
    discussion: """
      Formats come from -f and -O, or else from the file names: '.strata' files are Strata \
      images, anything else is raw. Zeros are not copied: they stay unallocated in a Strata \
      destination and become holes in a raw one, which is written as a sparse file. A raw \
      source whose size is not a multiple of 512 is padded with zeros. On failure the \
      destination is removed. A progress line is shown when standard error is a terminal.

      Examples:
        strata convert disk.img disk.strata
        strata convert --snapshot before-upgrade vm.strata rollback.img
      """
  )

  @Argument(help: ArgumentHelp("The disk to copy.", valueName: "source"))
  var source: String

  @Argument(help: ArgumentHelp("The image file to create.", valueName: "destination"))
  var destination: String

  @Option(
    name: .customShort("f"),
    help: ArgumentHelp("Format of the source (default: strata for *.strata, else raw).", valueName: "format"))
  var sourceFormat: ImageFormat?

  @Option(
    name: .customShort("O"),
    help: ArgumentHelp("Format of the destination (default: strata for *.strata, else raw).", valueName: "format"))
  var destinationFormat: ImageFormat?

  @OptionGroup var point: PointOptions

  @Option(
    help: ArgumentHelp("Block size of a Strata destination (default 4K).", valueName: "size"),
    transform: ByteCount.parse)
  var blockSize: UInt64?

  @Option(
    help: ArgumentHelp("Segment size of a Strata destination (default 8M).", valueName: "size"),
    transform: ByteCount.parse)
  var segmentSize: UInt64?

  @Flag(help: "Replace the destination if it already exists.")
  var force = false

  @Flag(inversion: .prefixedNo, help: "Show a progress line on standard error (only when it is a terminal).")
  var progress = true

  private var resolvedSourceFormat: ImageFormat { sourceFormat ?? .guess(fromPath: source) }
  private var resolvedDestinationFormat: ImageFormat { destinationFormat ?? .guess(fromPath: destination) }

  func validate() throws {
    if source == "-" || destination == "-" {
      throw ValidationError("convert needs files; '-' (standard input or output) is not supported.")
    }
    if point.isSet && resolvedSourceFormat != .strata {
      throw ValidationError(
        "--snapshot and --at need a Strata source; '\(source)' is read as raw (use -f strata if it is one).")
    }
    if (blockSize != nil || segmentSize != nil) && resolvedDestinationFormat != .strata {
      throw ValidationError("--block-size and --segment-size apply only to a Strata destination.")
    }
  }

  func run() throws {
    try runReportingErrors {
      try Converter.convert(
        ConversionRequest(
          source: source, sourceFormat: resolvedSourceFormat, snapshot: point.snapshot, at: point.at,
          destination: destination,
          destinationFormat: resolvedDestinationFormat, overwrite: force,
          blockSize: blockSize.map { Int(clamping: $0) },
          segmentSize: segmentSize.map { Int(clamping: $0) }, showProgress: progress && standardErrorIsTerminal))
    }
  }
}
