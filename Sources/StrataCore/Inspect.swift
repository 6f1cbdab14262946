import StrataFormat

/// The debugging view of an image: superblocks, checkpoints, segments, log records, snapshots.
public struct InspectReport: Codable, Sendable {
  public struct SuperblockSlot: Codable, Sendable {
    public var slot: Int
    public var offset: UInt64
    public var valid: Bool
    public var inUse: Bool
    public var error: String?
    public var generation: UInt64?
    public var checkpointPage: UInt64?
    public var checkpointSeq: UInt64?
    public var checkpointChecksum: String?
  }

  public struct Checkpoint: Codable, Sendable {
    public var page: UInt64
    public var fileOffset: UInt64
    public var seq: UInt64
    public var virtualSize: UInt64
    public var mapDepth: Int
    public var rootPage: UInt64
    public var dataBlocks: UInt64
    public var segments: UInt64
    public var snapshots: UInt64
    public var previousCheckpointPage: UInt64
  }

  public struct Segment: Codable, Sendable {
    public var index: Int
    public var state: String
    public var fileOffset: UInt64
    public var liveBytes: UInt64
    public var filledBytes: UInt64
    public var lastSeq: UInt64
  }

  public struct Operation: Codable, Sendable {
    public var seq: UInt64
    public var type: String
    public var firstBlock: UInt64?
    public var blocks: UInt64?
    public var name: String?
    public var targetSeq: UInt64?
    public var pages: Int?
    public var nextSegment: UInt64?
    public var virtualSize: UInt64?
  }

  public struct Record: Codable, Sendable {
    public var seq: UInt64
    public var page: UInt64
    public var fileOffset: UInt64
    public var pages: Int
    public var flushPoint: Bool
    public var timestampNanoseconds: UInt64
    public var checksum: String
    public var operations: [Operation]
  }

  /// The snapshot catalog as the head holds it: its storage and the shape of its trees.
  public struct Catalog: Codable, Sendable {
    /// "flat" (version-1 pages, or empty) or "tree".
    public var format: String
    public var snapshots: Int
    public var seqTreeNodes: Int
    public var seqTreeLevels: Int
    public var nameIndexNodes: Int
    public var nameIndexLevels: Int
  }

  public struct Snapshot: Codable, Sendable {
    public var name: String
    public var seq: UInt64
    public var timestampNanoseconds: UInt64
    public var baseCheckpointPage: UInt64
  }

  public var superblocks: [SuperblockSlot]
  /// The current checkpoint first, then its predecessors (up to the record limit).
  public var checkpoints: [Checkpoint]
  public var segments: [Segment]
  public var records: [Record]
  /// Records walked from the start of the log; `records` holds the last ones.
  public var totalRecords: Int
  public var logEndSeq: UInt64
  public var catalog: Catalog
  /// The newest snapshots (up to the record limit), oldest first.
  public var snapshots: [Snapshot]
  public var recoveryNotes: [String]
}

extension StrataImage {
  /// Walks the whole log from its first record (or its start, after cleaning); keeps the last
  /// `recordLimit` records.
  public func inspect(recordLimit: Int = 100) throws -> InspectReport {
    try checkOpen()
    writer?.closeRecord()
    let slots = try superblockSlots()
    var checkpoints: [InspectReport.Checkpoint] = []
    // A damaged link ends the list: inspect shows what can be read.
    do {
      try walkCheckpoints { c in
        checkpoints.append(
          InspectReport.Checkpoint(
            page: c.page, fileOffset: Geometry.byteOffset(ofPage: c.page), seq: c.seq,
            virtualSize: c.body.virtualSize, mapDepth: Int(c.body.mapDepth), rootPage: c.body.root.page,
            dataBlocks: c.body.dataBlocks, segments: c.body.segmentCount, snapshots: c.body.snapshotCount,
            previousCheckpointPage: c.body.previousCheckpoint))
        return checkpoints.count < max(recordLimit, 1)
      }
    } catch let e as StrataError where e.code == .corrupt {}
    let openSegment = writer?.segment ?? recoveredEnd.segment
    let openFill = writer?.tailPage ?? recoveredEnd.page
    let segments = usage.entries.enumerated().map { i, e in
      let open = i == openSegment
      return InspectReport.Segment(
        index: i, state: open ? "open" : (e.isFree ? "free" : "sealed"),
        fileOffset: Geometry.byteOffset(ofPage: geometry.firstPage(ofSegment: i)),
        liveBytes: UInt64(e.livePages) * UInt64(Layout.pageSize),
        filledBytes: UInt64(open ? openFill : Int(e.writtenPages)) * UInt64(Layout.pageSize),
        lastSeq: e.lastSeq)
    }
    var records: [InspectReport.Record] = []
    var total = 0
    // From the first record, or from the log start once the cleaner reclaimed what came before.
    var current = try pages.record(at: logStart != 0 ? logStart : geometry.firstPage(ofSegment: 0))
    if logStart == 0, let first = current,
      first.header.seq != 1 || first.header.previousChecksum != CRC32C.checksum(superblock.imageID)
    {
      current = nil
    }
    while let stored = current {
      total += 1
      records.append(describe(stored))
      if records.count > recordLimit { records.removeFirst(records.count - recordLimit) }
      current = try pages.next(after: stored)
    }
    return InspectReport(
      superblocks: slots, checkpoints: checkpoints, segments: segments, records: records, totalRecords: total,
      logEndSeq: writer?.nextSeq ?? recoveredEnd.nextSeq, catalog: try catalogSummary(),
      snapshots: try catalog.newest(recordLimit).map {
        InspectReport.Snapshot(
          name: $0.name, seq: $0.seq, timestampNanoseconds: $0.timestampNanoseconds,
          baseCheckpointPage: $0.baseCheckpoint)
      }, recoveryNotes: recoveryNotes + recoveryProblems)
  }

  /// Walks both catalog trees (reading every node) to report their shape.
  private func catalogSummary() throws -> InspectReport.Catalog {
    func shape<Item>(_ tree: CatalogTree<Item>) throws -> (nodes: Int, levels: Int) {
      var nodes = 0
      var levels = 0
      try tree.forEachNode { node, _ in
        nodes += 1
        levels = max(levels, node.level + 1)
      }
      return (nodes, levels)
    }
    let seq = try shape(catalog.bySeq)
    let name = try shape(catalog.byName)
    return InspectReport.Catalog(
      format: catalog.needsTreeFormat ? "tree" : "flat", snapshots: catalog.count, seqTreeNodes: seq.nodes,
      seqTreeLevels: seq.levels, nameIndexNodes: name.nodes, nameIndexLevels: name.levels)
  }

  func superblockSlots() throws -> [InspectReport.SuperblockSlot] {
    try Layout.superblockOffsets.enumerated().map { slot, offset in
      var bytes = [UInt8](repeating: 0, count: Layout.pageSize)
      _ = try bytes.withUnsafeMutableBytes { try storage.read(into: $0, at: offset) }
      do {
        let sb = try bytes.withUnsafeBytes { try Superblock.decode($0) }
        return InspectReport.SuperblockSlot(
          slot: slot, offset: offset, valid: true, inUse: sb.generation == superblock.generation, error: nil,
          generation: sb.generation, checkpointPage: sb.checkpointPage, checkpointSeq: sb.checkpointSeq,
          checkpointChecksum: hex32(sb.checkpointChecksum))
      } catch {
        return InspectReport.SuperblockSlot(
          slot: slot, offset: offset, valid: false, inUse: false, error: "\(error)", generation: nil,
          checkpointPage: nil,
          checkpointSeq: nil, checkpointChecksum: nil)
      }
    }
  }

  private func describe(_ stored: StoredRecord) -> InspectReport.Record {
    let ops = stored.record.ops.enumerated().map { i, op -> InspectReport.Operation in
      var o = InspectReport.Operation(seq: stored.header.seq + UInt64(i), type: "\(op.type)")
      switch op {
      case .write(let first, let checksums):
        o.firstBlock = first
        o.blocks = UInt64(checksums.count)
      case .zero(let first, let count), .discard(let first, let count):
        o.firstBlock = first
        o.blocks = count
      case .snapshot(let name, _): o.name = name
      case .snapshotDelete(let seq), .restore(let seq, _): o.targetSeq = seq
      case .resize(let size): o.virtualSize = size
      case .pages(let d): o.pages = d.count
      case .checkpoint(let body): o.virtualSize = body.virtualSize
      case .seal(let next): o.nextSegment = next
      }
      return o
    }
    return InspectReport.Record(
      seq: stored.header.seq, page: stored.page, fileOffset: Geometry.byteOffset(ofPage: stored.page),
      pages: stored.header.totalPages, flushPoint: stored.header.flags.contains(.flushPoint),
      timestampNanoseconds: stored.header.timestampNanoseconds, checksum: hex32(stored.header.checksum),
      operations: ops)
  }
}

extension InspectReport.Operation {
  init(seq: UInt64, type: String) {
    self.init(
      seq: seq, type: type, firstBlock: nil, blocks: nil, name: nil, targetSeq: nil, pages: nil, nextSegment: nil,
      virtualSize: nil)
  }
}
