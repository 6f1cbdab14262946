/// Feature bits of the superblock (format-spec/README.md, "Feature bits").
///
/// - incompatible: a reader that does not know a set bit must refuse to open the image.
/// - compatible: unknown bits are ignored and preserved.
/// - autoclear: unknown bits are cleared by any writer that opens the image.
public struct FeatureSet: Equatable, Sendable {
  public var incompatible: UInt64
  public var compatible: UInt64
  public var autoclear: UInt64

  public init(incompatible: UInt64 = 0, compatible: UInt64 = 0, autoclear: UInt64 = 0) {
    self.incompatible = incompatible
    self.compatible = compatible
    self.autoclear = autoclear
  }

  /// The catalog may be stored as two copy-on-write trees (CHECKPOINT `catalog_format` 1, page
  /// kinds 4 and 5) instead of flat catalog pages.
  public static let catalogTree: UInt64 = 1 << 2
  /// Blocks this image never wrote are read from a parent image (page 2 names it).
  public static let backingFile: UInt64 = 1 << 3
  /// The cleaner reuses segments: a SEAL may continue the log in a segment the usage table marks
  /// free, and checkpoints name where the retained log starts.
  public static let segmentReuse: UInt64 = 1 << 4

  /// Incompatible bits this implementation understands. Bits 0 and 1 are reserved for
  /// compressed payloads and content-hash dedup.
  public static let knownIncompatible: UInt64 = catalogTree | backingFile | segmentReuse
  public static let knownCompatible: UInt64 = 0
  /// Autoclear bit 0, CDP_WINDOW: the superblock extension (bytes 128..<144) holds the
  /// continuous-data-protection window. A writer that does not know it drops the extension and
  /// clears the bit, so a reader never takes stale extension bytes for a window.
  public static let cdpWindow: UInt64 = 1 << 0
  public static let knownAutoclear: UInt64 = cdpWindow

  public var unknownIncompatible: UInt64 { incompatible & ~Self.knownIncompatible }
}
