import StrataFormat
import StrataIO

#if canImport(Glibc)
  import Glibc
#endif

/// How an image is created or opened.
public struct ImageOptions: Sendable {
  /// Bytes per virtual block: 4 KiB (default) times a power of two up to 64 KiB. Creation only.
  public var blockSize: Int = Layout.defaultBlockSize
  /// Bytes per log segment: a power of two in 1 MiB...1 GiB (default 8 MiB). Creation only.
  public var segmentSize: Int = Layout.defaultSegmentSize
  /// Clean map nodes kept in memory (4 KiB each); bounds metadata RAM whatever the disk size.
  public var mapCacheNodes: Int = 16384
  /// Dirty map nodes that trigger a checkpoint.
  public var maxDirtyNodes: Int = 4096
  /// Clean nodes of each snapshot-catalog tree kept in memory (a few KiB each): bounds the
  /// catalog's memory however many snapshots exist. The name index is what snapshot creation
  /// reads at random, so it should hold its working set (about 1 node per 180 snapshots).
  public var catalogCacheNodes: Int = 8192
  /// Changed catalog nodes that trigger a checkpoint.
  public var maxDirtyCatalogNodes: Int = 8192
  /// Log pages appended since the last checkpoint that trigger one (bounds recovery time).
  public var checkpointIntervalPages: Int = 65536
  public var readOnly: Bool = false
  /// I/O engine for the image file (nil: the best available, or `STRATA_AIO`).
  public var ioEngine: IOEngineKind?
  /// Nanoseconds since the Unix epoch; tests substitute a deterministic clock.
  public var clock: @Sendable () -> UInt64 = wallClockNanoseconds
  /// The 16-byte identity of a new image (nil: random). The simulator fixes it so that a seed
  /// reproduces the image byte for byte. Creation only.
  public var imageID: [UInt8]?
  /// The continuous-data-protection window of a new image (`setCDPWindow` changes it later).
  /// Creation only.
  public var cdpWindow: CDPWindow?
  /// Creation: the parent this image reads unwritten blocks from (`create(path:backing:)`).
  var backing: BackingDescriptor?
  /// How deep in a backing chain the image being opened lies (0: the one the caller opened).
  var backingDepth = 0
  /// Read-only without the file lock: a branch's parent, of which only immutable log data (a
  /// snapshot's view) is read, even while another process writes it.
  var unlocked = false

  public init() {}
}

/// Nanoseconds of CLOCK_MONOTONIC: for intervals and deadlines (never steps back).
public func monotonicNanoseconds() -> UInt64 {
  var ts = timespec()
  clock_gettime(CLOCK_MONOTONIC, &ts)
  return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
}

public func wallClockNanoseconds() -> UInt64 {
  var ts = timespec()
  clock_gettime(CLOCK_REALTIME, &ts)
  return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
}

/// A named snapshot as the API reports it.
public struct SnapshotInfo: Equatable, Sendable {
  public var name: String
  /// Sequence number of the snapshot: the view holds every operation before it.
  public var seq: UInt64
  public var timestampNanoseconds: UInt64
}

/// A run of virtual blocks with one state, as `map` reports it.
public struct Extent: Equatable, Sendable {
  public var offset: UInt64
  public var length: UInt64
  public var state: BlockState
  /// Byte offset in the image file of the first block (data only); the run is contiguous there.
  public var fileOffset: UInt64?
  /// Which image of a backing chain holds the run: 0 this one, 1 its parent, and so on.
  public var layer: Int = 0
}

/// What `info` reports.
public struct ImageInfo: Sendable {
  public var formatVersion: UInt32
  public var imageID: String
  public var virtualSize: UInt64
  public var blockSize: Int
  public var segmentSize: Int
  public var segmentCount: Int
  public var dataBlocks: UInt64
  public var allocatedBytes: UInt64 { dataBlocks * UInt64(blockSize) }
  /// 4 KiB pages the head references (data and map nodes).
  public var livePages: UInt64
  public var liveBytes: UInt64 { livePages * UInt64(Layout.pageSize) }
  public var fileSize: UInt64
  /// Bytes the file occupies on disk (what `du` shows), when the storage is a file.
  public var diskUsage: UInt64?
  public var snapshotCount: Int
  public var nextSeq: UInt64
  public var checkpointSeq: UInt64
  public var superblockGeneration: UInt64
  public var createdNanoseconds: UInt64
  public var features: FeatureSet
  /// The backing files of an external clone, parent first, as each image stores it.
  public var backingChain: [String] = []
  /// Segments the cleaner freed (reused by the log next).
  public var freeSegments: Int = 0
  /// Bytes of sealed segments the head no longer references: what `compact` may reclaim
  /// (snapshots and the protection window may still need part of it).
  public var garbageBytes: UInt64 = 0
  /// The continuous-data-protection window, nil when there is none.
  public var cdpWindow: CDPWindow?
}
