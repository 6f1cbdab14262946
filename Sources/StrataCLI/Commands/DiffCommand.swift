import ArgumentParser
import StrataCore

struct DiffCommand: ParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "diff",
    abstract: "List the ranges that differ between two points of the disk, from metadata alone.",
    discussion: """
      A point is `head` (the current disk), a snapshot name, a seq or an RFC 3339 time from \
      `strata timeline`, or spelled out as `snapshot/NAME` or `at/SEQ|TIME` (the NBD export \
      names), or `branch/NAME`: the current disk of a branch of the image (see `strata clone`). \
      TO defaults to the head. No data is read: blocks rewritten with the same bytes count as \
      changed. This is what an incremental backup from FROM to TO must copy. Between a branch \
      and another point, the ranges are those the branch wrote itself plus those that differ \
      between the snapshot it is based on and that point. With --branch, the points are those \
      of that branch (its head, its snapshots, its timeline, its own branches). Unless FROM or \
      TO is the head, this works while the image is served (only immutable log data is read).

      Examples:
        strata diff vm.strata nightly
        strata diff vm.strata nightly 2026-11-26T09:30:00Z --output json
        strata diff vm.strata branch/test head
      """
  )

  @Argument(help: "Path of the image.")
  var image: String

  @Argument(help: ArgumentHelp("The older point.", valueName: "from"))
  var from: String

  @Argument(help: ArgumentHelp("The newer point (default: head).", valueName: "to"))
  var to = "head"

  @OptionGroup var branch: BranchOption

  @OptionGroup var format: OutputOptions

  func run() throws {
    try runReportingErrors {
      let path = try branch.path(of: image)
      // Without the head, only immutable log data is read: an image in use (served) will do.
      let opened: StrataImage
      do { opened = try ImageAccess.open(path, readOnly: true) } catch let e as FileError
        where e.underlying.code == .locked && from != "head" && to != "head"
      {
        opened = try about(path) { try StrataImage.openForViews(path: path) }
      }
      let ranges = try ImageAccess.withOpened(opened, path: path) { opened -> [DiffRange] in
        var branches: [StrataImage] = []
        defer {
          for b in branches { try? b.close() }
        }
        func point(_ text: String) throws -> DiffPoint {
          guard text.hasPrefix("branch/") else { return opened.diffPoint(try Self.view(text, in: opened)) }
          let file = try ImageAccess.branchPath(of: path, name: String(text.dropFirst(7)))
          let b = try ImageAccess.open(file, readOnly: true)
          branches.append(b)
          return try about(file) { try opened.diffPoint(branch: b) }
        }
        if from == "head" && to == "head" {
          throw StrataError(
            .invalidArgument, "FROM and TO are both the head: give a snapshot, a point in time or a branch")
        }
        return try opened.changedRanges(from: try point(from), to: try point(to)).map(DiffRange.init)
      }
      switch format.output {
      case .human:
        let total = ranges.reduce(0) { $0 + $1.length }
        print(Printer.table(header: ["Offset", "Length"], rows: ranges.map { [hex($0.offset), hex($0.length)] }))
        print("\(ranges.count) range(s), \(ByteCount.format(total)) (\(total) bytes) differ.")
      case .json: try Printer.printJSON(ranges)
      }
    }
  }

  /// The view a point names (nil: the head).
  static func view(_ point: String, in image: StrataImage) throws -> SnapshotView? {
    if point == "head" { return nil }
    if point.hasPrefix("snapshot/") { return try image.snapshotView(name: String(point.dropFirst(9))) }
    if point.hasPrefix("at/") {
      return try image.view(atSeq: try PointInTime.parse(String(point.dropFirst(3))).seq(in: image))
    }
    if let seq = UInt64(point) { return try image.view(atSeq: seq) }
    if let time = try? PointInTime.parse(point) { return try image.view(atSeq: try time.seq(in: image)) }
    return try image.snapshotView(name: point)
  }
}

/// One differing range as `strata diff` prints it.
struct DiffRange: Encodable {
  var offset: UInt64
  var length: UInt64

  init(_ range: Range<UInt64>) {
    offset = range.lowerBound
    length = range.upperBound - range.lowerBound
  }
}
