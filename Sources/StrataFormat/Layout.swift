/// Fixed sizes and limits of the Strata format (format-spec/README.md, "Layout").
public enum Layout {
  /// The unit of physical addressing, record alignment and metadata pages.
  public static let pageSize = 4096
  /// Byte offsets of the two superblock slots.
  public static let superblockOffsets: [UInt64] = [0, 4096]
  /// Default start of segment 0: the first MiB holds the superblocks and stays reserved.
  public static let defaultDataOffset: UInt64 = 1 << 20
  public static let defaultSegmentSize = 8 << 20
  public static let minSegmentSize = 1 << 20
  public static let maxSegmentSize = 1 << 30
  public static let defaultBlockSize = 4096
  /// Block sizes are 4 KiB times a power of two, up to 64 KiB.
  public static let allowedBlockSizes = [4096, 8192, 16384, 32768, 65536]
  /// Map nodes hold 256 entries of 16 bytes: exactly one page.
  public static let mapFanout = 256
  public static let mapFanoutShift = 8
  public static let mapEntrySize = 16
  /// Deepest map: 256^7 blocks covers any virtual size below `maxVirtualSize`.
  public static let maxMapDepth = 7
  /// 2^56 bytes (64 PiB); keeps every block number and byte offset far from overflow.
  public static let maxVirtualSize: UInt64 = 1 << 56
  /// Physical page addresses are 48 bits wide in map entries.
  public static let maxPageAddress: UInt64 = (1 << 48) - 1
  /// A record's header area (header plus operations) is at most this many bytes.
  public static let maxRecordHeaderLength = 1 << 20
  public static let maxSnapshotNameLength = 255

  /// Number of map levels needed for `blocks` virtual blocks (at least 1: a root that is a leaf).
  public static func mapDepth(forBlocks blocks: UInt64) -> Int {
    var depth = 1
    var covered = UInt64(mapFanout)
    while covered < blocks {
      depth += 1
      covered = covered.multipliedReportingOverflow(by: UInt64(mapFanout)).overflow ? .max : covered * UInt64(mapFanout)
    }
    return depth
  }

  public static func isValidSegmentSize(_ size: Int) -> Bool {
    size >= minSegmentSize && size <= maxSegmentSize && size & (size - 1) == 0
  }
}
