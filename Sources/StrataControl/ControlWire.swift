import Foundation
import StrataCore

/// How the control socket spells snapshots and CDP windows in its JSON: one encoding and its
/// decoding, shared by the server and the `strata` command's --control options.
public enum ControlWire {
  /// {"name": ..., "seq": ..., "timestamp_ns": ...}
  public static func snapshot(_ info: SnapshotInfo) -> [String: Any] {
    ["name": info.name, "seq": info.seq, "timestamp_ns": info.timestampNanoseconds]
  }

  /// A snapshot as `snapshot(_:)` spells it (a missing field reads empty or 0).
  public static func snapshotFields(_ object: Any?) -> (name: String, seq: UInt64, timestampNanoseconds: UInt64) {
    let o = object as? [String: Any] ?? [:]
    return (
      o["name"] as? String ?? "", (o["seq"] as? NSNumber)?.uint64Value ?? 0,
      (o["timestamp_ns"] as? NSNumber)?.uint64Value ?? 0
    )
  }

  /// {"cdp_window_ns": N} for a duration, {"cdp_window_bytes": N} for a log size, or
  /// {"cdp_window": "none"}.
  public static func cdpWindow(_ window: CDPWindow?) -> [String: Any] {
    switch window {
    case .duration(let ns): ["cdp_window_ns": ns]
    case .size(let bytes): ["cdp_window_bytes": bytes]
    case nil: ["cdp_window": "none"]
    }
  }

  /// The window `object` names as `cdpWindow(_:)` spells it; exactly one of the three forms,
  /// with a positive number.
  public static func cdpWindow(from object: [String: Any]) throws -> CDPWindow? {
    let ns = (object["cdp_window_ns"] as? NSNumber)?.uint64Value
    let bytes = (object["cdp_window_bytes"] as? NSNumber)?.uint64Value
    let none = object["cdp_window"] as? String == "none"
    switch (ns, bytes, none) {
    case (let ns?, nil, false) where ns > 0: return .duration(nanoseconds: ns)
    case (nil, let bytes?, false) where bytes > 0: return .size(bytes: bytes)
    case (nil, nil, true): return nil
    default:
      throw StrataError(
        .invalidArgument,
        "a CDP window is exactly one of \"cdp_window_ns\" or \"cdp_window_bytes\" (a positive number), or \"cdp_window\": \"none\""
      )
    }
  }
}
