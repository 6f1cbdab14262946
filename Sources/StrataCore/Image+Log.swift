import StrataFormat

/// Where the log ends: the writer continues here.
struct LogEnd {
  var segment: Int
  var page: Int
  var nextSeq: UInt64
  var lastChecksum: UInt32
}

/// The state a checkpoint record describes, loaded and verified.
struct LoadedCheckpoint {
  var virtualSize: UInt64
  var map: BlockMap
  var usage: UsageTable
  var catalog: Catalog
  var page: UInt64
  var seq: UInt64
  var logStart: UInt64 = 0

  static func load(_ stored: StoredRecord, pages: PageReader) throws -> LoadedCheckpoint {
    guard case .checkpoint(let body) = stored.record.ops.last else {
      throw StrataError(.corrupt, "record \(stored.header.seq) at page \(stored.page) is not a checkpoint")
    }
    let g = pages.geometry
    guard Int(body.blockSize) == g.blockSize else {
      throw StrataError(
        .corrupt, "checkpoint at page \(stored.page) has block size \(body.blockSize), the image \(g.blockSize)")
    }
    // The open segment may not have reached the file yet: one more than the file covers.
    let fileSize = try pages.storage.size()
    let segmentBytes = UInt64(g.segmentSize)
    let fileSegments = (fileSize > g.dataOffset ? (fileSize - g.dataOffset + segmentBytes - 1) / segmentBytes : 0) + 1
    guard body.segmentCount <= min(UInt64(g.maxSegments), fileSegments) else {
      throw StrataError(.corrupt, "checkpoint at page \(stored.page) claims \(body.segmentCount) segments")
    }
    let segments = Int(body.segmentCount)
    var entries: [SegmentUsage] = []
    entries.reserveCapacity(segments)
    for (i, ref) in body.usagePages.enumerated() {
      let bytes = try pages.readVerified(ref, kind: .usage, level: 0, key: UInt64(i))
      let count = min(SegmentUsage.perPage, segments - i * SegmentUsage.perPage)
      do {
        entries += try bytes.withUnsafeBytes { try SegmentUsage.decodePage($0, count: count) }
      } catch let e as FormatError {
        throw StrataError.corrupt("usage page \(i)", e)
      }
    }
    let catalog = try Catalog(pages: pages, checkpoint: body)
    if !body.root.isNull { try pages.checkAddress(body.root.page, what: "map root") }
    let map = BlockMap(
      source: pages, depth: Int(body.mapDepth), root: body.root, dataBlocks: body.dataBlocks,
      pagesPerBlock: g.pagesPerBlock)
    return LoadedCheckpoint(
      virtualSize: body.virtualSize, map: map,
      usage: UsageTable(geometry: g, entries: entries, pageRefs: body.usagePages), catalog: catalog,
      page: stored.page, seq: stored.header.seq, logStart: body.logStart)
  }
}

/// A read-only map at some point of the log (a snapshot).
struct MapView {
  var map: BlockMap
  var virtualSize: UInt64
}

extension StrataImage {
  // MARK: Creation and recovery

  /// Creates an image on any storage (tests use a fault-injecting one).
  public static func create(storage: ImageStorage, virtualSize: UInt64, options: ImageOptions = ImageOptions()) throws
    -> StrataImage
  {
    try validateCreate(virtualSize: virtualSize, options: options)
    var rng = SystemRandomNumberGenerator()
    let imageID = options.imageID ?? (0..<16).map { _ in UInt8.random(in: 0...255, using: &rng) }
    let dataOffset = Layout.defaultDataOffset
    let geometry = Geometry(blockSize: options.blockSize, segmentSize: options.segmentSize, dataOffset: dataOffset)
    try storage.setSize(dataOffset)
    if let backing = options.backing { try writeBackingPage(backing, to: storage) }
    let superblock = Superblock(
      features: FeatureSet(incompatible: options.backing == nil ? 0 : FeatureSet.backingFile),
      generation: 0, imageID: imageID, blockSize: UInt32(options.blockSize), segmentSize: UInt32(options.segmentSize),
      dataOffset: dataOffset, checkpointPage: geometry.firstDataPage, checkpointSeq: 0, checkpointChecksum: 0,
      createdNanoseconds: options.clock(), cdpWindow: options.cdpWindow)
    let pages = PageReader(
      storage: storage, geometry: geometry, cacheNodes: options.mapCacheNodes,
      catalogCacheNodes: options.catalogCacheNodes)
    let blocks = (virtualSize + UInt64(options.blockSize) - 1) / UInt64(options.blockSize)
    let usage = UsageTable(geometry: geometry, entries: [], pageRefs: [])
    _ = usage.appendSegment()
    let empty = LoadedCheckpoint(
      virtualSize: virtualSize,
      map: BlockMap(
        source: pages, depth: Layout.mapDepth(forBlocks: blocks), root: .unallocated, dataBlocks: 0,
        pagesPerBlock: geometry.pagesPerBlock),
      usage: usage, catalog: Catalog(pages: pages), page: 0, seq: 0)
    let image = StrataImage(
      storage: storage, superblock: superblock, options: options, pages: pages, state: empty, readOnly: false)
    image.startWriter(at: LogEnd(segment: 0, page: 0, nextSeq: 1, lastChecksum: CRC32C.checksum(imageID)))
    do {
      // The genesis checkpoint lands in slot 1 (generation 1); slot 0 gets the same with generation 0.
      try image.checkpoint()
      var older = image.superblock
      older.generation = 0
      try image.writeSuperblock(older)
      try storage.sync()
    } catch {
      image.isClosed = true
      throw error
    }
    return image
  }

  /// Opens an image on any storage, recovering it: newest valid checkpoint plus log replay. An
  /// image with a backing file needs its path to find the parent: `open(path:)` opens those.
  public static func open(storage: ImageStorage, options: ImageOptions = ImageOptions()) throws -> StrataImage {
    try open(storage: storage, options: options, allowBacking: false)
  }

  static func open(storage: ImageStorage, options: ImageOptions, allowBacking: Bool) throws -> StrataImage {
    var head = [UInt8](repeating: 0, count: 2 * Layout.pageSize)
    let got = try head.withUnsafeMutableBytes { try storage.read(into: $0, at: 0) }
    var candidates: [Superblock] = []
    var notes: [String] = []
    var sawMagic = false
    for (slot, offset) in Layout.superblockOffsets.enumerated() {
      let bytes = head[min(got, Int(offset))..<min(got, Int(offset) + Layout.pageSize)]
      let decoded = Array(bytes).withUnsafeBytes { raw -> Result<Superblock, FormatError> in
        if Superblock.hasMagic(raw) { sawMagic = true }
        return Result { try Superblock.decode(raw) }.mapError {
          $0 as? FormatError ?? FormatError(.invalidField, "superblock", "\($0)")
        }
      }
      switch decoded {
      case .success(let sb): candidates.append(sb)
      case .failure(let e): notes.append("superblock slot \(slot) is unusable: \(e.detail)")
      }
    }
    guard sawMagic else {
      throw StrataError(
        .notStrataImage,
        got == 0
          ? "the file is empty, not a Strata image" : "not a Strata image (no Strata magic at the start of the file)")
    }
    guard !candidates.isEmpty else {
      throw StrataError(.corrupt, "both superblocks are damaged: " + notes.joined(separator: "; "))
    }
    candidates.sort { $0.generation > $1.generation }
    var problems: [String] = []
    for sb in candidates {
      let unknown = sb.features.unknownIncompatible
      guard unknown == 0 else {
        throw StrataError(
          .unsupported,
          "the image uses incompatible features this build does not know (bits 0x\(String(unknown, radix: 16)))")
      }
      guard allowBacking || sb.features.incompatible & FeatureSet.backingFile == 0 else {
        throw StrataError(.unsupported, "the image reads through a backing file: open it by its path")
      }
      do {
        let image = try recover(storage: storage, superblock: sb, options: options)
        image.recoveryNotes = notes + image.recoveryNotes
        image.recoveryProblems = problems
        return image
      } catch let e as StrataError where e.code == .corrupt {
        problems.append("the checkpoint of superblock generation \(sb.generation) is unusable: \(e.message)")
      }
    }
    throw StrataError(.corrupt, (notes + problems).joined(separator: "; "))
  }

  private static func recover(storage: ImageStorage, superblock sb: Superblock, options: ImageOptions) throws
    -> StrataImage
  {
    let geometry = Geometry(blockSize: Int(sb.blockSize), segmentSize: Int(sb.segmentSize), dataOffset: sb.dataOffset)
    let pages = PageReader(
      storage: storage, geometry: geometry, cacheNodes: options.mapCacheNodes,
      catalogCacheNodes: options.catalogCacheNodes)
    guard let stored = try pages.record(at: sb.checkpointPage) else {
      throw StrataError(.corrupt, "the checkpoint record at page \(sb.checkpointPage) is damaged or missing")
    }
    guard stored.header.checksum == sb.checkpointChecksum, stored.header.seq == sb.checkpointSeq else {
      throw StrataError(.corrupt, "the record at page \(sb.checkpointPage) is not the checkpoint the superblock names")
    }
    let state = try LoadedCheckpoint.load(stored, pages: pages)
    let image = StrataImage(
      storage: storage, superblock: sb, options: options, pages: pages, state: state, readOnly: options.readOnly)
    image.restoreIndex = RestoreIndex(coveringFrom: stored.header.nextSeq)
    do {
      let end = try image.replay(after: stored)
      image.recoveredEnd = end
      // Free segments in a durable checkpoint may take the log (section 15, the cleaner).
      image.reclaim.reusable = image.usage.freeSegments
      if !options.readOnly {
        image.startWriter(at: end)
        try image.checkpointIfDue()  // a long replayed tail: bound the dirty map right away
      }
    } catch {
      image.isClosed = true
      throw error
    }
    return image
  }

  /// Applies every valid record after the checkpoint `start`; the first record that fails a
  /// check ends the log (a torn or unflushed tail).
  private func replay(after start: StoredRecord) throws -> LogEnd {
    var current = start
    while let next = try pages.next(after: current) {
      guard try pages.payloadIsIntact(next) else {
        recoveryNotes.append("log cut at seq \(next.header.seq) (page \(next.page)): its data is torn")
        break
      }
      var payload = next.payloadPage
      for (i, op) in next.record.ops.enumerated() {
        try apply(op, seq: next.header.seq + UInt64(i), payloadPage: payload, record: next)
        payload += UInt64(op.payloadPages(blockSize: geometry.blockSize))
      }
      current = next
    }
    // A checkpoint is a point of its own. A SEAL is not, and is the last record only when the
    // record after it was lost (the writer appends one with every seal).
    let checkpoint = current.record.ops.contains {
      if case .checkpoint = $0 { return true }
      return false
    }
    replayedTailUnmarked = current.page != start.page && !checkpoint && !current.header.flags.contains(.flushPoint)
    let endPage: UInt64 =
      if case .seal(let next) = current.record.ops.last { geometry.firstPage(ofSegment: Int(next)) } else {
        current.endPage
      }
    if recoveryNotes.isEmpty, try pages.hasRecordMagic(at: endPage) {
      recoveryNotes.append(
        "log ends at seq \(current.header.nextSeq); the record at page \(endPage) is torn, stale or unflushed")
    }
    if case .seal(let next) = current.record.ops.last {
      return LogEnd(segment: Int(next), page: 0, nextSeq: current.header.nextSeq, lastChecksum: current.header.checksum)
    }
    let local = geometry.pageInSegment(current.page) + current.header.totalPages
    return LogEnd(
      segment: geometry.segment(ofPage: current.page), page: local, nextSeq: current.header.nextSeq,
      lastChecksum: current.header.checksum)
  }

  // MARK: Applying operations

  /// Appends `op` to the log and applies it to the head; returns its sequence number.
  @discardableResult
  func logAndApply(_ op: LogOp) throws -> UInt64 {
    guard let writer else { throw StrataError(.readOnly, "the image is open read-only") }
    let seq = try writer.appendOp(op)
    try applyLogged(seq) {
      try apply(op, seq: seq, payloadPage: 0, timestamp: writer.openRecordTimestamp ?? options.clock())
    }
    changedSinceCheckpoint = true
    return seq
  }

  /// Applies to the head an operation the log already holds. Applying can fail half-way (a map
  /// node or a snapshot's log cannot be read): then head and log disagree, so the writer
  /// refuses further work until the image is reopened and recovery replays the log.
  func applyLogged(_ seq: UInt64, _ body: () throws -> Void) throws {
    do {
      try body()
    } catch {
      writer?.refuse("applying the operation at seq \(seq) failed (\(error))")
      throw error
    }
  }

  private func apply(_ op: LogOp, seq: UInt64, payloadPage: UInt64, record: StoredRecord) throws {
    switch op {
    case .checkpoint:
      let state = try LoadedCheckpoint.load(record, pages: pages)
      virtualSize = state.virtualSize
      map = state.map
      map.accounting = usage
      usage.adopt(state.usage)
      catalog = state.catalog
      lastCheckpointPage = state.page
      lastCheckpointSeq = state.seq
      logStart = state.logStart
    case .seal(let next):
      let local = geometry.pageInSegment(record.page) + record.header.totalPages
      let reuses = next < UInt64(usage.segmentCount) && usage.entries[Int(next)].isFree
      guard next == UInt64(usage.segmentCount) || reuses else {
        throw StrataError(
          .corrupt,
          "seal at seq \(seq) continues in segment \(next), which is neither free nor the next new one (\(usage.segmentCount))"
        )
      }
      _ = applySeal(segment: geometry.segment(ofPage: record.page), writtenPages: local, seq: seq, next: Int(next))
    default:
      try apply(op, seq: seq, payloadPage: payloadPage, timestamp: record.header.timestampNanoseconds)
    }
  }

  /// The head's side of every operation that changes state; live writes and replay share it.
  func apply(_ op: LogOp, seq: UInt64, payloadPage: UInt64, timestamp: UInt64) throws {
    switch op {
    case .snapshot(let name, let base):
      let entry = SnapshotEntry(seq: seq, timestampNanoseconds: timestamp, baseCheckpoint: base, name: name)
      guard try catalog.add(entry) else {
        throw StrataError(.corrupt, "snapshot \"\(name)\" at seq \(seq) duplicates an existing one")
      }
    case .snapshotDelete(let target):
      guard try catalog.remove(seq: target) != nil else {
        throw StrataError(.corrupt, "seq \(seq) deletes snapshot \(target), which does not exist")
      }
    case .restore(let target, let base):
      restoreIndex.add(RestoreIndex.Entry(seq: seq, target: target, base: base))
      let restored = try view(at: target, base: base)
      map = restored.map
      virtualSize = restored.virtualSize
      map.accounting = usage
      let count = try recount()
      usage.setLivePages(count.livePages)
      map.dataBlocks = count.dataBlocks
    case .pages, .checkpoint, .seal:
      break
    case .write, .zero, .discard, .resize:
      try applyMapOp(op, map: map, size: &virtualSize, payloadPage: payloadPage, seq: seq)
    }
  }

  /// The map side of an operation, for the head and for snapshot views alike.
  func applyMapOp(_ op: LogOp, map: BlockMap, size: inout UInt64, payloadPage: UInt64, seq: UInt64) throws {
    let blocks = (size + UInt64(geometry.blockSize) - 1) / UInt64(geometry.blockSize)
    func checkBlocks(_ first: UInt64, _ count: UInt64) throws {
      guard first < blocks, count <= blocks - first else {
        throw StrataError(
          .corrupt, "operation at seq \(seq) touches blocks \(first)+\(count) past the \(blocks)-block disk")
      }
    }
    switch op {
    case .write(let first, let checksums):
      try checksums.withUnsafeBufferPointer {
        try applyWrite(firstBlock: first, checksums: $0, payloadPage: payloadPage, map: map, seq: seq, size: size)
      }
    case .zero(let first, let count):
      try checkBlocks(first, count)
      try map.setRange(first, first + count, to: .zero, diskBlocks: blocks)
    case .discard(let first, let count):
      try checkBlocks(first, count)
      try map.setRange(first, first + count, to: .unallocated, diskBlocks: blocks)
    case .resize(let newSize):
      let newBlocks = (newSize + UInt64(geometry.blockSize) - 1) / UInt64(geometry.blockSize)
      if newBlocks > blocks {
        try map.grow(toBlocks: newBlocks)
      } else {
        // Clear up to the end of the map, not of the old disk: a node that straddles the old end
        // and lies wholly past the new one goes, rather than staying as an empty node past the
        // end until a checkpoint (recovery replays a shrink without checkpointing after it).
        try map.setRange(newBlocks, max(blocks, UInt64(1) << UInt64(8 * map.depth)), to: .unallocated)
      }
      size = newSize
    default:
      preconditionFailure("\(op.type) does not change the map")
    }
  }

  /// The map side of a WRITE: the blocks now live in the payload starting at `payloadPage`.
  func applyWrite(
    firstBlock: UInt64, checksums: UnsafeBufferPointer<UInt32>, payloadPage: UInt64, map: BlockMap, seq: UInt64,
    size: UInt64? = nil
  ) throws {
    let blocks = ((size ?? virtualSize) + UInt64(geometry.blockSize) - 1) / UInt64(geometry.blockSize)
    guard firstBlock < blocks, UInt64(checksums.count) <= blocks - firstBlock else {
      throw StrataError(
        .corrupt, "write at seq \(seq) touches blocks \(firstBlock)+\(checksums.count) past the \(blocks)-block disk")
    }
    for (i, c) in checksums.enumerated() {
      try map.setEntry(
        firstBlock + UInt64(i), .data(page: payloadPage + UInt64(i * geometry.pagesPerBlock), checksum: c))
    }
  }

  /// Seals `segment` and opens the next one: `next` when replaying a SEAL, else a free segment
  /// the cleaner released (lowest first) or a new one at the end.
  func applySeal(segment: Int, writtenPages: Int, seq: UInt64, next: Int? = nil) -> Int {
    usage.seal(segment: segment, writtenPages: writtenPages, seq: seq)
    let chosen = next ?? reclaim.takeReusable()
    guard let chosen, chosen < usage.segmentCount else { return usage.appendSegment() }
    reclaim.reusable.removeAll { $0 == chosen }
    usage.reopen(chosen)
    return chosen
  }

  // MARK: Views

  /// The map as it was just before operation `seq`: the checkpoint at `base` plus the log
  /// replayed up to `seq`.
  func view(at seq: UInt64, base: UInt64) throws -> MapView {
    try ViewReplay(image: self, base: base, before: seq).advance(to: seq)
  }

  // MARK: Checkpoints

  func checkpointIfDue() throws {
    guard let writer else { return }
    if map.dirtyCount >= options.maxDirtyNodes || catalog.dirtyNodes >= options.maxDirtyCatalogNodes
      || writer.appendedPages - pagesAtCheckpoint >= UInt64(options.checkpointIntervalPages)
    {
      try checkpoint()
    }
  }

  /// Writes dirty map nodes, the catalog and usage pages and a CHECKPOINT record, syncs, then
  /// points the superblock at it (format-spec, "Checkpoints").
  func checkpoint() throws {
    guard let writer else { throw StrataError(.readOnly, "the image is open read-only") }
    writer.closeRecord()
    try map.writeDirty { node, level, index, checksum in
      try writer.appendMetaPage(
        UnsafeRawBufferPointer(node.bytes),
        descriptor: PageDescriptor(kind: .mapNode, level: UInt8(level), checksum: checksum, key: index))
    }
    if catalog.needsTreeFormat { try enableIncompatibleFeature(FeatureSet.catalogTree) }
    _ = try catalog.write { kind, bytes in
      let checksum = bytes.withUnsafeBytes { pageChecksum(kind: kind, level: 0, key: 0, $0) }
      let page = try bytes.withUnsafeBytes {
        try writer.appendMetaPage($0, descriptor: PageDescriptor(kind: kind, level: 0, checksum: checksum, key: 0))
      }
      return PageRef(page: page, checksum: checksum)
    }
    // Usage pages last: writing them changes no usage, but a seal does, so make room first.
    while true {
      let dirty = usage.dirtyPages.sorted()
      let checkpointPages = LogWriter.checkpointPages(checkpointBody()) + 1
      let headers = (dirty.count + 249) / 250
      if writer.pagesLeft < dirty.count + headers + checkpointPages && writer.tailPage > 0 {
        try writer.seal()
        continue
      }
      if dirty.isEmpty { break }
      let room = max(1, (writer.pagesLeft - checkpointPages) * 250 / 251)
      for index in dirty.prefix(room) {
        let bytes = usage.encodePage(index)
        let checksum = bytes.withUnsafeBytes { pageChecksum(kind: .usage, level: 0, key: UInt64(index), $0) }
        let page = try bytes.withUnsafeBytes {
          try writer.appendMetaPage(
            $0, descriptor: PageDescriptor(kind: .usage, level: 0, checksum: checksum, key: UInt64(index)))
        }
        usage.stored(page: index, at: PageRef(page: page, checksum: checksum))
      }
    }
    let (page, header) = writer.appendCheckpoint(checkpointBody())
    try writer.flush()
    var sb = superblock
    sb.generation += 1
    sb.checkpointPage = page
    sb.checkpointSeq = header.seq
    sb.checkpointChecksum = header.checksum
    sb.features.autoclear &= FeatureSet.knownAutoclear
    try writeSuperblock(sb)
    try storage.sync()
    superblock = sb
    lastCheckpointPage = page
    lastCheckpointSeq = header.seq
    pagesAtCheckpoint = writer.appendedPages
    changedSinceCheckpoint = false
  }

  private func checkpointBody() -> CheckpointBody {
    precondition(!catalog.isDirty, "the catalog is written before the checkpoint that names it")
    return CheckpointBody(
      virtualSize: virtualSize, blockSize: UInt32(geometry.blockSize), mapDepth: UInt8(map.depth), root: map.root,
      dataBlocks: map.dataBlocks, previousCheckpoint: lastCheckpointPage, segmentCount: UInt64(usage.segmentCount),
      snapshotCount: UInt64(catalog.count), usagePages: usage.pageRefs, catalogPages: catalog.stored.refs,
      catalogFormat: catalog.stored.format, logStart: logStart)
  }

  /// Sets an incompatible feature bit in a superblock that still names the last durable
  /// checkpoint, before the first structure that needs it reaches the log: a reader that does
  /// not know the feature then refuses the image instead of misreading it (CATALOG_TREE before
  /// the first tree page, SEGMENT_REUSE before the first checkpoint that frees a segment).
  func enableIncompatibleFeature(_ bit: UInt64) throws {
    guard superblock.features.incompatible & bit == 0 else { return }
    var sb = superblock
    sb.generation += 1
    sb.features.incompatible |= bit
    sb.features.autoclear &= FeatureSet.knownAutoclear
    try writeSuperblock(sb)
    try storage.sync()
    superblock = sb
  }

  func writeSuperblock(_ sb: Superblock) throws {
    var slot = sb.encode()
    slot += [UInt8](repeating: 0, count: Layout.pageSize - slot.count)
    try slot.withUnsafeBytes { try storage.write($0, at: Layout.superblockOffsets[Int(sb.generation % 2)]) }
  }

  // MARK: Live accounting

  /// Recounts, from the map, the live pages of every segment and the data blocks.
  func recount() throws -> (livePages: [UInt32], dataBlocks: UInt64) {
    var live = [UInt32](repeating: 0, count: usage.segmentCount)
    var data: UInt64 = 0
    func count(_ page: UInt64, _ n: Int) throws {
      try pages.checkAddress(page, what: "map reference")
      let s = geometry.segment(ofPage: page)
      guard s < live.count else {
        throw StrataError(.corrupt, "page \(page) lies in segment \(s), past the last segment")
      }
      live[s] += UInt32(n)
    }
    let blocks = (virtualSize + UInt64(geometry.blockSize) - 1) / UInt64(geometry.blockSize)
    let capacity = UInt64(1) << UInt64(8 * map.depth)
    try map.forEachNode { _, _, ref, _, _ in
      if !ref.isNull { try count(ref.page, 1) }
    }
    try map.forEachRun(0, min(capacity, max(blocks, 1))) { _, _, entry in
      if entry.state == .data {
        try count(entry.page, geometry.pagesPerBlock)
        data += 1
      }
    }
    return (live, data)
  }
}

/// The map at successive points of the log, replayed forward from one checkpoint: the views of
/// several snapshots that share a base cost one replay (`check` walks them all this way).
/// The map a view returns is the cursor's own and changes with the next `advance`.
final class ViewReplay {
  private let image: StrataImage
  let base: UInt64
  private var map: BlockMap
  private var size: UInt64
  /// The last record applied whole, and the one being applied (from operation `nextOp`).
  private var current: StoredRecord
  private var record: StoredRecord?
  private var nextOp = 0
  private var payload: UInt64 = 0
  /// Views are available at seqs ≥ this.
  private(set) var position: UInt64

  /// Starts at the checkpoint at `base`, which must come before operation `seq`.
  init(image: StrataImage, base: UInt64, before seq: UInt64) throws {
    image.writer?.closeRecord()  // the log is read back
    guard let start = try image.pages.record(at: base), case .checkpoint(let body) = start.record.ops.last,
      start.header.seq < seq
    else {
      throw StrataError(.corrupt, "the checkpoint at page \(base) that snapshot seq \(seq) starts from is damaged")
    }
    self.image = image
    self.base = base
    size = body.virtualSize
    map = BlockMap(
      source: image.pages, depth: Int(body.mapDepth), root: body.root, dataBlocks: body.dataBlocks,
      pagesPerBlock: image.geometry.pagesPerBlock)
    current = start
    position = start.header.nextSeq
  }

  /// The view just before operation `seq` (≥ `position`).
  func advance(to seq: UInt64) throws -> MapView {
    precondition(seq >= position, "views are replayed forward only")
    let g = image.geometry
    while true {
      if record == nil {
        guard let next = try image.pages.next(after: current) else {
          // A point at the very end of the log (the last flush point) holds everything.
          if current.header.nextSeq == seq {
            position = seq
            return MapView(map: map, virtualSize: size)
          }
          throw StrataError(.corrupt, "the log ends at seq \(current.header.nextSeq), before snapshot seq \(seq)")
        }
        record = next
        nextOp = 0
        payload = next.payloadPage
      }
      guard let r = record else { preconditionFailure() }
      while nextOp < r.record.ops.count {
        let op = r.record.ops[nextOp]
        let opSeq = r.header.seq + UInt64(nextOp)
        if opSeq >= seq {
          position = seq
          return MapView(map: map, virtualSize: size)
        }
        switch op {
        case .write, .zero, .discard, .resize:
          try image.applyMapOp(op, map: map, size: &size, payloadPage: payload, seq: opSeq)
        case .restore(let target, let targetBase):
          let restored = try image.view(at: target, base: targetBase)
          map = restored.map
          size = restored.virtualSize
        default:
          break
        }
        payload += UInt64(op.payloadPages(blockSize: g.blockSize))
        nextOp += 1
      }
      current = r
      record = nil
    }
  }
}
