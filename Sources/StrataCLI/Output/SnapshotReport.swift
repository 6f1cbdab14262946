import StrataCore

/// One snapshot as `strata snapshot list` and `create` print it.
struct SnapshotEntry: Encodable {
  var name: String
  var seq: UInt64
  /// RFC 3339, UTC.
  var time: String
  var timestampNanoseconds: UInt64

  enum CodingKeys: String, CodingKey {
    case name, seq, time
    case timestampNanoseconds = "timestamp_ns"
  }

  init(_ info: SnapshotInfo) {
    name = info.name
    seq = info.seq
    time = rfc3339(nanoseconds: info.timestampNanoseconds)
    timestampNanoseconds = info.timestampNanoseconds
  }

  static func table(_ entries: [SnapshotEntry]) -> String {
    Printer.table(header: ["NAME", "SEQ", "TIME"], rows: entries.map { [$0.name, String($0.seq), $0.time] })
  }
}
