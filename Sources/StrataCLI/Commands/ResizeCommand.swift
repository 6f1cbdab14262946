import ArgumentParser
import StrataCore

struct ResizeCommand: ParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "resize",
    abstract: "Change the virtual size of the disk.",
    discussion: """
      SIZE is the new size ('40G'), or a change to the current one ('+10G', '-512M'). The result \
      must be a multiple of 512. Growing adds space that reads as zeros. Shrinking drops the \
      data past the new end (snapshots keep theirs) and is refused unless --shrink is given; \
      shrink the file system and partitions inside the disk first.

      Put '--' before a negative change so that it is not taken for an option:
        strata resize --shrink vm.strata -- -1G
      """
  )

  @Argument(help: "Path of the image.")
  var image: String

  @Argument(
    help: ArgumentHelp("New size, or +SIZE / -SIZE relative to the current size.", valueName: "size"),
    transform: SizeChange.parse)
  var size: SizeChange

  @Flag(help: "Allow the disk to become smaller, discarding the data past the new end.")
  var shrink = false

  func run() throws {
    try runReportingErrors {
      let (old, new) = try ImageAccess.with(image, readOnly: false) { opened in
        let old = opened.size
        let new = try size.apply(to: old)
        try ByteCount.checkDiskSize(new)
        if new < old && !shrink {
          throw StrataError(
            .invalidArgument,
            "shrinking from \(old) to \(new) bytes discards the data past the new end; pass --shrink to confirm")
        }
        try opened.resize(to: new, allowShrink: shrink)
        try opened.flush()
        return (old, new)
      }
      print(old == new ? "Image size unchanged (\(new) bytes)." : "Image resized from \(old) to \(new) bytes.")
    }
  }
}
