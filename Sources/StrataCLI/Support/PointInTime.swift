import ArgumentParser
import StrataCore

/// `--at SEQ|TIME`: a point of the image's timeline, by sequence number (`strata timeline`
/// lists them) or by RFC 3339 time (the latest restorable point at or before it).
enum PointInTime: Equatable {
  case seq(UInt64)
  case time(nanoseconds: UInt64)

  static func parse(_ text: String) throws -> PointInTime {
    if let seq = UInt64(text) { return .seq(seq) }
    if let ns = RFC3339.nanoseconds(text) { return .time(nanoseconds: ns) }
    throw StrataError(
      .invalidArgument,
      "'\(text)' is neither a sequence number nor an RFC 3339 time (e.g. 2026-11-26T09:30:00Z); see `strata timeline`")
  }

  /// The sequence number this point names in `image`.
  func seq(in image: StrataImage) throws -> UInt64 {
    switch self {
    case .seq(let seq): return seq
    case .time(let ns):
      guard let point = try image.point(atOrBefore: ns) else {
        throw StrataError(.notFound, "no restorable point at or before \(rfc3339(nanoseconds: ns))")
      }
      return point.seq
    }
  }
}

/// `--snapshot NAME` / `--at SEQ|TIME`: read a snapshot or a point in time instead of the
/// current disk (read, map, convert).
struct PointOptions: ParsableArguments {
  @Option(help: ArgumentHelp("Use this snapshot instead of the current disk.", valueName: "name"))
  var snapshot: String?

  @Option(
    help: ArgumentHelp(
      "Use the disk as it was at this point instead: a seq or an RFC 3339 time (see `strata timeline`).",
      valueName: "seq|time"),
    transform: PointInTime.parse)
  var at: PointInTime?

  var isSet: Bool { snapshot != nil || at != nil }

  func validate() throws {
    if snapshot != nil && at != nil {
      throw ValidationError("--snapshot and --at name two different points: pick one.")
    }
  }

  init() {}
}
