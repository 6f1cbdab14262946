import StrataFormat

@_exported import enum StrataFormat.BlockState

/// A Strata disk image: a log-structured, copy-on-write virtual disk in one file.
///
/// Writes append to the log and are durable once `flush()` returns; snapshots are one log
/// operation each. An image is used from one thread at a time (it is not `Sendable`).
public final class StrataImage {
  let storage: ImageStorage
  let geometry: Geometry
  let options: ImageOptions
  let pages: PageReader
  var superblock: Superblock
  public let readOnly: Bool

  // The head state. Every change goes through `apply`, which replay uses too.
  var virtualSize: UInt64
  var map: BlockMap
  let usage: UsageTable
  var catalog: Catalog
  var lastCheckpointPage: UInt64
  var lastCheckpointSeq: UInt64
  /// The oldest checkpoint from which the log is whole (0: since creation); see `compact`.
  var logStart: UInt64
  /// Segments the cleaner freed, and reads that may still target them.
  let reclaim = Reclaim()
  /// The RESTOREs the log holds from some seq on, so the cleaner need not read the log for them.
  var restoreIndex: RestoreIndex
  /// The seq of each sealed segment's first record, read once (the cleaner asks every pass),
  /// with the segment's last seq then: a reused segment has a new one.
  var firstSeqs: [Int: (lastSeq: UInt64, firstSeq: UInt64)] = [:]

  /// Appends to the log; nil when read-only and while recovery replays the log.
  private(set) var writer: LogWriter?
  /// Where recovery found the log end; read-only opens report it (a writer moves on from it).
  var recoveredEnd = LogEnd(segment: 0, page: 0, nextSeq: 1, lastChecksum: 0)
  /// The last record recovery replayed is no flush point (a data record its writer stopped
  /// before a flush marked, or a SEAL whose next record was lost): the first flush makes a
  /// point (`markTailWithoutPoint`).
  var replayedTailUnmarked = false
  var changedSinceCheckpoint = false
  var pagesAtCheckpoint: UInt64 = 0
  var isClosed = false
  /// The parent image of an external clone (a backing file), read-only.
  var backing: Backing?
  let scratch: ImageScratch
  /// Shares syncs among the threads of a `SharedImage` (see `GroupCommit`).
  let groupCommit = GroupCommit()
  /// What recovery skipped that a crash explains (a torn superblock slot, a cut log tail).
  public internal(set) var recoveryNotes: [String] = []
  /// What recovery skipped that a crash does not explain: the newest checkpoint was unusable and
  /// an older one was used, so changes after it may be lost. `check` reports these as corruption.
  public internal(set) var recoveryProblems: [String] = []

  init(
    storage: ImageStorage, superblock: Superblock, options: ImageOptions, pages: PageReader, state: LoadedCheckpoint,
    readOnly: Bool
  ) {
    self.storage = storage
    self.geometry = pages.geometry
    self.options = options
    self.pages = pages
    self.superblock = superblock
    self.readOnly = readOnly
    self.virtualSize = state.virtualSize
    self.map = state.map
    self.usage = state.usage
    self.catalog = state.catalog
    self.lastCheckpointPage = state.page
    self.lastCheckpointSeq = state.seq
    self.logStart = state.logStart
    // A new image has no history; recovery says from where it replays (`recover`).
    self.restoreIndex = RestoreIndex(coveringFrom: state.page == 0 ? 0 : .max)
    self.scratch = ImageScratch(
      blockSize: pages.geometry.blockSize, maxBlocksPerWrite: LogWriter.maxBlocksPerWrite(pages.geometry))
    map.accounting = usage
  }

  /// Starts appending at the end of the log found by recovery (or at the start of a new image).
  func startWriter(at end: LogEnd) {
    precondition(writer == nil && !readOnly)
    let w = LogWriter(
      storage: storage, geometry: geometry, segment: end.segment, tailPage: end.page, nextSeq: end.nextSeq,
      lastChecksum: end.lastChecksum, clock: options.clock)
    w.sealHandler = { [unowned self] segment, written, seq in
      self.applySeal(segment: segment, writtenPages: written, seq: seq)
    }
    writer = w
    pages.writer = w
    pagesAtCheckpoint = 0
  }

  deinit {
    assert(isClosed, "StrataImage was never closed")
  }

  // MARK: Lifecycle

  /// Creates a new image file of `virtualSize` bytes (a multiple of 512) and opens it.
  public static func create(
    path: String, virtualSize: UInt64, options: ImageOptions = ImageOptions(), overwrite: Bool = false
  )
    throws -> StrataImage
  {
    try validateCreate(virtualSize: virtualSize, options: options)
    let storage = try FileStorage(path: path, mode: .create(overwrite: overwrite), engine: options.ioEngine)
    do {
      return try create(storage: storage, virtualSize: virtualSize, options: options)
    } catch {
      try? storage.close()
      throw error
    }
  }

  /// Opens an existing image file.
  public static func open(path: String, options: ImageOptions = ImageOptions()) throws -> StrataImage {
    let mode: FileStorage.Mode = options.readOnly ? (options.unlocked ? .readOnlyUnlocked : .readOnly) : .readWrite
    let storage = try FileStorage(path: path, mode: mode, engine: options.ioEngine)
    let image: StrataImage
    do {
      image = try open(storage: storage, options: options, allowBacking: true)
    } catch {
      try? storage.close()
      throw error
    }
    guard image.superblock.features.incompatible & FeatureSet.backingFile != 0 else { return image }
    do {
      let descriptor = try readBackingPage(from: storage)
      image.backing = try attachParent(descriptor, childPath: path, depth: options.backingDepth + 1, options: options)
    } catch {
      try? image.close()
      throw error
    }
    return image
  }

  /// Makes everything written so far durable, writes a checkpoint so the next open is quick,
  /// and releases the file. The image is closed afterwards even when this throws (the error
  /// says what may not have reached the disk); closing twice is a programming error.
  public func close() throws {
    precondition(!isClosed, "image closed twice")
    defer {
      isClosed = true
      try? storage.close()
      if let parent = backing?.image, !parent.isClosed { try? parent.close() }
    }
    if let writer {
      if changedSinceCheckpoint { try checkpoint() }
      // A close makes durable what the image shows, as a flush does: also a log tail recovery
      // replayed from the page cache when nothing was appended since (strata-sim seed 13037).
      // Unlike `flush` it writes no checkpoint for a replayed tail (`markTailWithoutPoint`): a
      // close after nothing but reads, or after a command refused a damaged image, leaves the
      // file as it was.
      try writer.flush()
      // Space allocated ahead of the log end holds nothing: give it back. The log may end in a
      // reused segment below the last one, which then bounds the file.
      let last = usage.segmentCount - 1
      let end =
        writer.segment == last
        ? max(Geometry.byteOffset(ofPage: writer.position), geometry.dataOffset)
        : Geometry.byteOffset(ofPage: geometry.firstPage(ofSegment: last + 1))
      if try storage.size() > end { try storage.setSize(end) }
    }
  }

  // MARK: Reads and writes

  public var size: UInt64 { virtualSize }
  /// Which I/O engine the image file uses and why ("" for other storage).
  public var engineDescription: String { (storage as? FileStorage)?.engineDescription ?? "" }
  public var blockSize: Int { geometry.blockSize }

  /// Reads `buffer.count` bytes at `offset`. Unwritten ranges read as zeros; a block whose data
  /// fails its checksum throws `.dataCorrupt` instead of returning wrong bytes.
  public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
    try checkOpen()
    try checkRange(offset, UInt64(buffer.count), size: virtualSize)
    try readMapped(map, into: buffer, at: offset)
  }

  public func read(at offset: UInt64, count: Int) throws -> [UInt8] {
    var out = [UInt8](repeating: 0, count: count)
    try out.withUnsafeMutableBytes { try read(into: $0, at: offset) }
    return out
  }

  /// Writes `data` at `offset`; any alignment. Partial blocks are read, merged and rewritten.
  /// Durable after the next `flush()`.
  public func write(_ data: UnsafeRawBufferPointer, at offset: UInt64) throws {
    try checkWritable()
    try checkRange(offset, UInt64(data.count), size: virtualSize)
    try writeBytes(data, at: offset)
    try checkpointIfDue()
  }

  public func write(_ data: [UInt8], at offset: UInt64) throws {
    try data.withUnsafeBytes { try write($0, at: offset) }
  }

  /// Hands everything appended so far to the file (no sync): it then survives this process
  /// being killed, though not a power loss, which is what `flush` is for. A server calls it
  /// before acknowledging writes.
  public func writeOutLog() throws {
    try completeLogWrites(through: try startLogWriteOut())
  }

  /// The first half of `writeOutLog`: starts the writes and returns the storage's write mark to
  /// wait for (`SharedImage.writeOutLog` waits outside the lock).
  func startLogWriteOut() throws -> UInt64 {
    try checkOpen()
    if let writer {
      writer.closeRecord()
      try writer.writeOut()
    }
    return storage.writeMark
  }

  /// A flush whose log ends in a record it cannot mark as a flush point would otherwise leave
  /// the state it made durable off the timeline: the first flush after a recovery whose
  /// replayed tail ends unmarked, before anything new was appended (that record is not in the
  /// writer's buffer, and rewriting its header in place could tear a record that is already
  /// durable), and a flush after a SEAL whose record failed to follow (strata-sim seed 29105:
  /// ENOSPC preallocating the new segment). A checkpoint is a point (and flushes): written
  /// instead. True when it did.
  func markTailWithoutPoint() throws -> Bool {
    guard let writer else { return false }
    if replayedTailUnmarked && writer.appendedPages > 0 { replayedTailUnmarked = false }
    guard replayedTailUnmarked || writer.endsWithSeal else { return false }
    try checkpoint()
    replayedTailUnmarked = false
    return true
  }

  /// Waits for the log writes up to `mark`; through the writer, which writes a failed one again.
  func completeLogWrites(through mark: UInt64) throws {
    if let writer { try writer.completeWrites(through: mark) } else { try storage.completeWrites(through: mark) }
  }

  /// Whether the log writes up to `mark` completed (see `completeLogWrites`).
  func logWritesComplete(through mark: UInt64) throws -> Bool {
    if let writer { try writer.writesComplete(through: mark) } else { try storage.writesComplete(through: mark) }
  }

  /// Returns once every write, discard and snapshot before it is durable.
  public func flush() throws {
    try checkOpen()
    if try markTailWithoutPoint() { return }
    try writer?.flush()
  }

  /// Makes whole blocks inside the range unallocated (they read as zeros). Partial blocks at the
  /// edges are left as they are: a discard is a hint, as in virtio-blk and NBD.
  public func discard(at offset: UInt64, length: UInt64) throws {
    try checkWritable()
    try checkRange(offset, length, size: virtualSize)
    let bs = UInt64(blockSize)
    let first = (offset + bs - 1) / bs
    let end = (offset + length) / bs
    // Over a backing file an unallocated block shows the parent: a discarded one must read zeros.
    if first < end {
      try logAndApply(
        backing == nil ? .discard(firstBlock: first, count: end - first) : .zero(firstBlock: first, count: end - first))
    }
    try checkpointIfDue()
  }

  /// Makes the range read as zeros without storing data.
  public func writeZeroes(at offset: UInt64, length: UInt64) throws {
    try checkWritable()
    try checkRange(offset, length, size: virtualSize)
    try zeroBytes(at: offset, length: length)
    try checkpointIfDue()
  }

  /// Changes the virtual size. Shrinking drops data past the new end and needs `allowShrink`.
  public func resize(to newSize: UInt64, allowShrink: Bool = false) throws {
    try checkWritable()
    try Self.validateSize(newSize)
    if newSize < virtualSize && !allowShrink {
      throw StrataError(
        .invalidArgument, "shrinking from \(virtualSize) to \(newSize) bytes discards data and must be confirmed")
    }
    guard newSize != virtualSize else { return }
    let tail = newSize % UInt64(blockSize)
    if newSize < virtualSize && tail != 0 {
      // The last block survives the shrink: clear what lies past the new end, or a later grow
      // would bring those bytes back.
      try zeroBytes(at: newSize, length: min(UInt64(blockSize) - tail, virtualSize - newSize))
    }
    let oldSize = virtualSize
    try logAndApply(.resize(virtualSize: newSize))
    if let parent = backing, newSize > oldSize, oldSize < parent.size {
      // Grown space reads as zeros, not as whatever the parent holds there (after a shrink).
      let bs = UInt64(blockSize)
      let first = (oldSize + bs - 1) / bs
      let end = (min(newSize, parent.size) + bs - 1) / bs
      if first < end { try logAndApply(.zero(firstBlock: first, count: end - first)) }
    }
    try checkpoint()
  }

  // MARK: Snapshots

  /// Creates a named snapshot of everything written so far. It costs one log operation and is
  /// durable with the next `flush()`.
  @discardableResult
  public func createSnapshot(name: String) throws -> SnapshotInfo {
    try checkWritable()
    do { try SnapshotEntry.validateName(name) } catch let e as FormatError {
      throw StrataError(.invalidArgument, "invalid snapshot name \"\(name)\": \(e.detail)")
    }
    guard try catalog.entry(named: name) == nil else {
      throw StrataError(.alreadyExists, "snapshot \"\(name)\" already exists")
    }
    let base = lastCheckpointPage
    let seq = try logAndApply(.snapshot(name: name, baseCheckpoint: base))
    let info = SnapshotInfo(name: name, seq: seq, timestampNanoseconds: writer?.openRecordTimestamp ?? 0)
    try checkpointIfDue()
    return info
  }

  /// How many snapshots exist (known without reading the catalog).
  public var snapshotCount: Int { catalog.count }

  /// Every snapshot, oldest first. With many snapshots, page with `snapshots(after:limit:)`.
  public var snapshots: [SnapshotInfo] {
    get throws { try snapshots(after: 0, limit: .max) }
  }

  /// Up to `limit` snapshots with a seq greater than `seq`, oldest first: a cursor for paging.
  public func snapshots(after seq: UInt64, limit: Int) throws -> [SnapshotInfo] {
    try checkOpen()
    return try catalog.entries(after: seq, limit: limit).map(SnapshotInfo.init)
  }

  /// The newest `limit` snapshots, oldest first.
  public func newestSnapshots(_ limit: Int) throws -> [SnapshotInfo] {
    try checkOpen()
    return try catalog.newest(limit).map(SnapshotInfo.init)
  }

  /// Catalog pages read from storage since the image was opened (the catalog is read on
  /// demand: opening reads its roots only).
  public var catalogPagesRead: Int { catalog.pagesRead }

  /// The snapshot with sequence number `seq`, if there is one.
  public func snapshot(seq: UInt64) throws -> SnapshotInfo? {
    try checkOpen()
    return try catalog.entry(seq: seq).map(SnapshotInfo.init)
  }

  public func snapshot(named name: String) throws -> SnapshotInfo {
    SnapshotInfo(try snapshotEntry(name))
  }

  public func deleteSnapshot(name: String) throws {
    try checkWritable()
    let entry = try snapshotEntry(name)
    if let branches = try branchPins()[entry.seq] {
      let files = branches.map { Self.branchPath(of: path ?? "", name: $0) }.joined(separator: ", ")
      throw StrataError(
        .invalidArgument,
        "snapshot \"\(name)\" is the base of branch \(branches.map { "\"\($0)\"" }.joined(separator: ", ")) "
          + "(\(files)): delete the branch first ('strata branch delete')")
    }
    try logAndApply(.snapshotDelete(seq: entry.seq))
    try checkpointIfDue()
  }

  /// Moves the head back to a snapshot. The snapshot stays; later snapshots stay too.
  public func restore(snapshot name: String) throws {
    try checkWritable()
    let entry = try snapshotEntry(name)
    writer?.closeRecord()  // the view is read back from the log
    try logAndApply(.restore(seq: entry.seq, baseCheckpoint: entry.baseCheckpoint))
    try checkpoint()
  }

  /// A read-only view of a snapshot, frozen while the head changes.
  public func snapshotView(name: String) throws -> SnapshotView {
    try checkOpen()
    let entry = try snapshotEntry(name)
    return SnapshotView(
      image: self, view: try view(at: entry.seq, base: entry.baseCheckpoint), info: SnapshotInfo(entry))
  }

  func snapshotEntry(_ name: String) throws -> SnapshotEntry {
    try checkOpen()
    guard let entry = try catalog.entry(named: name) else {
      throw StrataError(.notFound, "no snapshot named \"\(name)\"")
    }
    return entry
  }

  // MARK: Map and info

  /// The extents of the head (or of a view's map) in `offset..<offset+length`, merged.
  public func extents(from offset: UInt64 = 0, length: UInt64? = nil) throws -> [Extent] {
    try checkOpen()
    return try extents(of: map, size: virtualSize, from: offset, length: length)
  }

  public var info: ImageInfo {
    get throws {
      try checkOpen()
      return ImageInfo(
        formatVersion: Superblock.version, imageID: superblock.imageID.map { hex8($0) }.joined(),
        virtualSize: virtualSize, blockSize: blockSize, segmentSize: geometry.segmentSize,
        segmentCount: usage.segmentCount, dataBlocks: map.dataBlocks,
        livePages: usage.entries.reduce(0) { $0 + UInt64($1.livePages) }, fileSize: try storage.size(),
        diskUsage: try (storage as? FileStorage)?.allocatedSize(),
        snapshotCount: catalog.count, nextSeq: writer?.nextSeq ?? recoveredEnd.nextSeq,
        checkpointSeq: lastCheckpointSeq,
        superblockGeneration: superblock.generation, createdNanoseconds: superblock.createdNanoseconds,
        features: superblock.features, backingChain: backingChain, freeSegments: usage.freeSegments.count,
        garbageBytes: logSpace.garbageBytes, cdpWindow: superblock.cdpWindow)
    }
  }

  // MARK: Checks

  func checkOpen() throws {
    precondition(!isClosed, "image used after close")
  }

  func checkWritable() throws {
    try checkOpen()
    guard writer != nil else { throw StrataError(.readOnly, "the image is open read-only") }
  }

  func checkRange(_ offset: UInt64, _ length: UInt64, size: UInt64) throws {
    guard offset <= size, length <= size - offset else {
      throw StrataError(.outOfRange, "range \(offset)+\(length) lies outside the \(size)-byte disk")
    }
  }

  static func validateSize(_ size: UInt64) throws {
    guard size > 0, size % 512 == 0, size <= Layout.maxVirtualSize else {
      throw StrataError(
        .invalidArgument, "virtual size \(size) must be a positive multiple of 512 up to \(Layout.maxVirtualSize)")
    }
  }

  static func validateCreate(virtualSize: UInt64, options: ImageOptions) throws {
    try validateSize(virtualSize)
    if let window = options.cdpWindow { try validateCDPWindow(window) }
    if let id = options.imageID, id.count != 16 {
      throw StrataError(.invalidArgument, "an image ID has 16 bytes, not \(id.count)")
    }
    guard Layout.allowedBlockSizes.contains(options.blockSize) else {
      throw StrataError(.invalidArgument, "block size \(options.blockSize) must be one of \(Layout.allowedBlockSizes)")
    }
    guard Layout.isValidSegmentSize(options.segmentSize), options.segmentSize >= 16 * options.blockSize else {
      throw StrataError(
        .invalidArgument, "segment size \(options.segmentSize) must be a power of two from 1 MiB to 1 GiB")
    }
  }
}

extension SnapshotInfo {
  init(_ e: SnapshotEntry) {
    self.init(name: e.name, seq: e.seq, timestampNanoseconds: e.timestampNanoseconds)
  }
}

func hex8(_ b: UInt8) -> String {
  let s = String(b, radix: 16)
  return s.count == 1 ? "0" + s : s
}

/// A frozen, read-only view of the image at a snapshot.
public final class SnapshotView {
  let image: StrataImage
  let view: MapView
  public let info: SnapshotInfo

  init(image: StrataImage, view: MapView, info: SnapshotInfo) {
    self.image = image
    self.view = view
    self.info = info
  }

  public var size: UInt64 { view.virtualSize }

  public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
    try image.checkOpen()
    try image.checkRange(offset, UInt64(buffer.count), size: view.virtualSize)
    try image.readMapped(view.map, into: buffer, at: offset)
  }

  public func read(at offset: UInt64, count: Int) throws -> [UInt8] {
    var out = [UInt8](repeating: 0, count: count)
    try out.withUnsafeMutableBytes { try read(into: $0, at: offset) }
    return out
  }

  public func extents(from offset: UInt64 = 0, length: UInt64? = nil) throws -> [Extent] {
    try image.checkOpen()
    return try image.extents(of: view.map, size: view.virtualSize, from: offset, length: length)
  }
}
