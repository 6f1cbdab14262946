import ArgumentParser
import StrataCore

struct TimelineCommand: ParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "timeline",
    abstract: "List the points the disk can be read or restored at.",
    discussion: """
      Every flush that made writes durable is a point, and so is every named snapshot and \
      checkpoint. `read`, `map` and `convert` take --at SEQ|TIME to use the disk as it was at a \
      point, and `restore --at` moves the disk back to one. Opens the image read-only.

      Points stay until the segment cleaner reclaims the log they live in. It keeps every \
      snapshot and every point inside the image's CDP window (`strata set IMAGE --cdp-window`, \
      shown by `strata info`); points older than the window may be reclaimed.

      Example:
        strata timeline vm.strata --since 2026-11-26T09:00:00Z
        strata timeline vm.strata --since 18000 --output json
        strata read vm.strata --at 18312 --offset 1M --length 4K | hexdump -C
      """
  )

  @Argument(help: "Path of the image.")
  var image: String

  @Option(
    help: ArgumentHelp("List only points from this one on (a seq or an RFC 3339 time).", valueName: "seq|time"),
    transform: PointInTime.parse)
  var since: PointInTime?

  @Option(help: ArgumentHelp("List at most this many points.", valueName: "n"))
  var limit: Int?

  @OptionGroup var format: OutputOptions

  func validate() throws {
    if let limit, limit < 1 { throw ValidationError("--limit must be at least 1") }
  }

  func run() throws {
    try runReportingErrors {
      let points = try ImageAccess.with(image, readOnly: true) { opened in
        var from: UInt64 = 0
        switch since {
        case .seq(let seq): from = seq
        // From the last point at or before the time: its state is the disk at that time.
        case .time(let ns): from = try opened.point(atOrBefore: ns)?.seq ?? 0
        case nil: break
        }
        return try opened.timeline(since: from, limit: limit ?? .max).map(TimelineEntry.init)
      }
      switch format.output {
      case .human:
        print(
          Printer.table(
            header: ["SEQ", "TIME", "KIND", "NAME"],
            rows: points.map { [String($0.seq), $0.time, $0.kind, $0.name ?? ""] }))
      case .json: try Printer.printJSON(points)
      }
    }
  }
}

/// One point as `strata timeline` prints it.
struct TimelineEntry: Encodable {
  var seq: UInt64
  /// RFC 3339, UTC.
  var time: String
  var kind: String
  var name: String?

  init(_ point: TimelinePoint) {
    seq = point.seq
    time = rfc3339(nanoseconds: point.timestampNanoseconds)
    kind = point.kind.rawValue
    name = point.name
  }
}

struct RestoreCommand: ParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "restore",
    abstract: "Move the disk back to a snapshot or to any point of its timeline.",
    discussion: """
      The disk's contents and size become those of the point; what came after stays in the \
      log, reachable with --at and listed by `strata timeline`, until the cleaner reclaims it. \
      A restore is itself a point, so it can be undone by restoring the point before it.

      Examples:
        strata restore vm.strata --snapshot before-upgrade
        strata restore vm.strata --at 2026-11-26T09:29:00Z
      """
  )

  @Argument(help: "Path of the image.")
  var image: String

  @Option(help: ArgumentHelp("The snapshot to return to.", valueName: "name"))
  var snapshot: String?

  @Option(
    help: ArgumentHelp("The point to return to: a seq or an RFC 3339 time.", valueName: "seq|time"),
    transform: PointInTime.parse)
  var at: PointInTime?

  func validate() throws {
    guard (snapshot == nil) != (at == nil) else { throw ValidationError("Give exactly one of --snapshot and --at.") }
  }

  func run() throws {
    try runReportingErrors {
      let what = try ImageAccess.with(image, readOnly: false) { opened -> String in
        let what: String
        if let snapshot {
          try opened.restore(snapshot: snapshot)
          what = "snapshot '\(snapshot)'"
        } else {
          let seq = try at.map { try $0.seq(in: opened) } ?? 0
          try opened.restore(toSeq: seq)
          what = "seq \(seq)"
        }
        try opened.flush()
        return what
      }
      print("Restored the disk to \(what).")
    }
  }
}
