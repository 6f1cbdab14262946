import ArgumentParser
import Foundation
import StrataControl
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

      An image that `strata serve` is serving is resized through its control socket, and the \
      guest sees the new capacity at once (only growing is allowed then):
        strata resize vm.strata +10G --control /run/vm1.control
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

  @OptionGroup var control: ControlOption

  func run() throws {
    try runReportingErrors {
      if let socket = control.control {
        let status = try ControlClient.request(["command": "status"], path: socket)
        let old = ((status["image"] as? [String: Any])?["size"] as? NSNumber)?.uint64Value ?? 0
        let new = try size.apply(to: old)
        try ByteCount.checkDiskSize(new)
        _ = try ControlClient.request(["command": "resize", "size": new], path: socket)
        print(old == new ? "Image size unchanged (\(new) bytes)." : "Served image resized from \(old) to \(new) bytes.")
        return
      }
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
