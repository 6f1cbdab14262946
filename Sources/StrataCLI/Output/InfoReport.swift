import StrataCore

/// What `strata info` prints.
struct InfoReport: Encodable {
  var filename: String
  var format = "strata"
  var formatVersion: UInt32
  var virtualSize: UInt64
  var blockSize: Int
  var segmentSize: Int
  var segments: Int
  var freeSegments: Int
  var reclaimableBytes: UInt64
  var allocatedBytes: UInt64
  var liveBytes: UInt64
  var fileSize: UInt64
  var diskUsage: UInt64
  var snapshots: Int
  var nextSeq: UInt64
  var checkpointSeq: UInt64
  var superblockGeneration: UInt64
  var imageID: String
  var created: String
  var incompatibleFeatures: UInt64
  var compatibleFeatures: UInt64
  var recoveryNotes: [String]
  var recoveryProblems: [String]
  /// As qemu-img names them: the parent, and the whole chain parent first.
  var backingFilename: String?
  var backingChain: [String]
  /// The CDP window as `--cdp-window` takes it, its value, and the first seq it keeps now.
  var cdpWindow: String?
  var cdpWindowNanoseconds: UInt64?
  var cdpWindowBytes: UInt64?
  var cdpRetainedSeq: UInt64?
  var cdpDescription: String?

  enum CodingKeys: String, CodingKey {
    case filename, format, segments, snapshots, created
    case formatVersion = "format_version"
    case virtualSize = "virtual_size"
    case blockSize = "block_size"
    case segmentSize = "segment_size"
    case freeSegments = "free_segments"
    case reclaimableBytes = "reclaimable_bytes"
    case allocatedBytes = "allocated_bytes"
    case liveBytes = "live_bytes"
    case fileSize = "file_size"
    case diskUsage = "disk_usage"
    case nextSeq = "next_seq"
    case checkpointSeq = "checkpoint_seq"
    case superblockGeneration = "superblock_generation"
    case imageID = "image_id"
    case incompatibleFeatures = "incompatible_features"
    case compatibleFeatures = "compatible_features"
    case recoveryNotes = "recovery_notes"
    case recoveryProblems = "recovery_problems"
    case backingFilename = "backing-filename"
    case backingChain = "backing_chain"
    case cdpWindow = "cdp_window"
    case cdpWindowNanoseconds = "cdp_window_ns"
    case cdpWindowBytes = "cdp_window_bytes"
    case cdpRetainedSeq = "cdp_retained_seq"
  }

  init(
    path: String, info: ImageInfo, recoveryNotes: [String], recoveryProblems: [String], cdpRetainedSeq: UInt64? = nil
  ) {
    filename = path
    formatVersion = info.formatVersion
    virtualSize = info.virtualSize
    blockSize = info.blockSize
    segmentSize = info.segmentSize
    segments = info.segmentCount
    freeSegments = info.freeSegments
    reclaimableBytes = info.garbageBytes
    allocatedBytes = info.allocatedBytes
    liveBytes = info.liveBytes
    fileSize = info.fileSize
    diskUsage = info.diskUsage ?? info.fileSize
    snapshots = info.snapshotCount
    nextSeq = info.nextSeq
    checkpointSeq = info.checkpointSeq
    superblockGeneration = info.superblockGeneration
    imageID = info.imageID
    created = rfc3339(nanoseconds: info.createdNanoseconds)
    incompatibleFeatures = info.features.incompatible
    compatibleFeatures = info.features.compatible
    self.recoveryNotes = recoveryNotes
    self.recoveryProblems = recoveryProblems
    backingFilename = info.backingChain.first
    backingChain = info.backingChain
    if let window = info.cdpWindow {
      cdpWindow = CDPWindowArgument.format(window)
      switch window {
      case .duration(let ns): cdpWindowNanoseconds = ns
      case .size(let bytes): cdpWindowBytes = bytes
      }
      self.cdpRetainedSeq = cdpRetainedSeq
      cdpDescription = CDPWindowArgument.describe(window)
    }
  }

  /// qemu-img info style: `label: value`, sizes both human and in bytes.
  var humanText: String {
    func size(_ bytes: UInt64) -> String { "\(ByteCount.format(bytes)) (\(bytes) bytes)" }
    var lines = [
      "image: \(filename)",
      "file format: strata (version \(formatVersion))",
      "virtual size: \(size(virtualSize))",
      "disk size: \(ByteCount.format(diskUsage))",
      "file size: \(size(fileSize))",
      "block size: \(blockSize)",
      "segment size: \(size(UInt64(segmentSize)))",
      "segments: \(segments) (\(freeSegments) free)",
      "reclaimable: \(size(reclaimableBytes)) (strata compact; snapshots may keep part of it)",
      "allocated: \(size(allocatedBytes))",
      "live log data: \(size(liveBytes))",
      "snapshots: \(snapshots)",
      "next seq: \(nextSeq)",
      "checkpoint seq: \(checkpointSeq)",
      "superblock generation: \(superblockGeneration)",
      "image id: \(imageID)",
      "created: \(created)",
    ]
    if let backingFilename {
      lines.append("backing file: \(backingFilename)")
      if backingChain.count > 1 { lines.append("backing chain: \(backingChain.count) images") }
    }
    if let cdpWindow, let cdpDescription {
      lines.append("cdp window: \(cdpWindow) (\(cdpDescription))")
      if let cdpRetainedSeq { lines.append("cdp window keeps: seq \(cdpRetainedSeq) on") }
    }
    if incompatibleFeatures != 0 || compatibleFeatures != 0 {
      lines.append("features: incompatible \(hex(incompatibleFeatures)), compatible \(hex(compatibleFeatures))")
    }
    if !recoveryNotes.isEmpty {
      lines.append("recovery notes:")
      lines += recoveryNotes.map { "    \($0)" }
    }
    if !recoveryProblems.isEmpty {
      lines.append("recovery problems (the image is damaged):")
      lines += recoveryProblems.map { "    \($0)" }
    }
    return lines.joined(separator: "\n")
  }
}
