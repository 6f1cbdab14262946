/// How much of the timeline an image keeps restorable (continuous data protection): every
/// point of the last `duration`, or of the last `size` bytes of log. Stored in the superblock
/// extension (format-spec 4.1, autoclear bit CDP_WINDOW); the segment cleaner keeps what it
/// protects.
public enum CDPWindow: Equatable, Hashable, Sendable {
  /// Points newer than `nanoseconds` before now, and the newest one before that (the disk as it
  /// was when the window begins).
  case duration(nanoseconds: UInt64)
  /// Points with at most `bytes` of log written after them.
  case size(bytes: UInt64)

  /// The superblock fields `cdp_window_ns` and `cdp_window_bytes` (one of them is 0).
  public var fields: (nanoseconds: UInt64, bytes: UInt64) {
    switch self {
    case .duration(let ns): (ns, 0)
    case .size(let bytes): (0, bytes)
    }
  }

  /// The window the two superblock fields describe: exactly one of them must be non-zero.
  public init?(nanoseconds: UInt64, bytes: UInt64) {
    switch (nanoseconds, bytes) {
    case (0, 0): return nil
    case (let ns, 0): self = .duration(nanoseconds: ns)
    case (0, let b): self = .size(bytes: b)
    default: return nil
    }
  }

  /// False for an empty window (0 ns or 0 bytes), which the format cannot store.
  public var isValid: Bool {
    switch self {
    case .duration(let ns): ns > 0
    case .size(let bytes): bytes > 0
    }
  }
}
