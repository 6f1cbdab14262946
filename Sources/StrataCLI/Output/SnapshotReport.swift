import StrataControl
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
    self.init(name: info.name, seq: info.seq, timestampNanoseconds: info.timestampNanoseconds)
  }

  /// A snapshot as a control socket reply spells it (`ControlWire.snapshot`).
  init(controlReply object: Any?) {
    let s = ControlWire.snapshotFields(object)
    self.init(name: s.name, seq: s.seq, timestampNanoseconds: s.timestampNanoseconds)
  }

  init(name: String, seq: UInt64, timestampNanoseconds: UInt64) {
    self.name = name
    self.seq = seq
    time = rfc3339(nanoseconds: timestampNanoseconds)
    self.timestampNanoseconds = timestampNanoseconds
  }

  static func table(_ entries: [SnapshotEntry]) -> String {
    Printer.table(header: ["NAME", "SEQ", "TIME"], rows: entries.map { [$0.name, String($0.seq), $0.time] })
  }
}
