import StrataFormat

#if canImport(Glibc)
  import Glibc
#endif

/// Appends records to the open segment through an in-memory copy of it.
///
/// Records are built in `buffer` (one segment, page aligned) and written out in page-aligned
/// runs: when a megabyte is pending, on flush, and when the segment is sealed. Every record
/// starts on a page boundary, so a page that was synced is never rewritten: a torn write can
/// only damage records that were never acknowledged as durable.
///
/// Two segment buffers alternate: when a segment is sealed its writes may still be in flight
/// while the next segment fills the other buffer, so the disk never idles at a segment
/// boundary; a buffer is reused only once the writes from it have landed.
final class LogWriter {
  private enum OpenKind { case data, pages }

  private struct OpenRecord {
    var kind: OpenKind
    var headerPage: Int
    var firstSeq: UInt64
    var timestamp: UInt64
    var opCount = 0
    var pageCount = 0
  }

  /// Called when a segment is sealed: gets (segment, fill in pages, seal seq), returns the next
  /// segment. The image applies exactly what replaying the SEAL will apply.
  typealias SealHandler = (_ segment: Int, _ writtenPages: Int, _ seq: UInt64) -> Int

  static let writeOutThreshold = 256  // pages: write out once a MiB is pending
  /// Data and PAGES records reserve one header page.
  private static let batchHeaderCapacity = Layout.pageSize
  private static let maxPagesPerRecord = (Layout.pageSize - RecordHeader.encodedLength - 16) / 16

  let storage: ImageStorage
  let geometry: Geometry
  let clock: @Sendable () -> UInt64
  var sealHandler: SealHandler = { _, _, _ in preconditionFailure("seal handler not set") }

  private let buffers: [UnsafeMutableRawBufferPointer]
  private var current = 0
  private var buffer: UnsafeMutableRawBufferPointer { buffers[current] }
  /// The segment sealed last, still in the other buffer (pages `from..<to`, of which those from
  /// `unsynced` on may not be durable yet), and the write mark that covers its writes: until the
  /// buffer is reused its pages are read from memory, and rewritten after a failed write or sync.
  private var previous: (segment: Int, from: Int, to: Int, unsynced: Int, mark: UInt64)?
  /// A write or sync failed while the previous segment had unsynced pages: they are written
  /// again before anything else.
  private var rewritePrevious = false
  private(set) var segment: Int
  private(set) var tailPage: Int
  private(set) var writtenPages: Int
  private(set) var nextSeq: UInt64
  private(set) var lastChecksum: UInt32
  private var open: OpenRecord?
  /// The last record, when a reader closed it without `flush_point` and nothing followed it
  /// yet: the next flush marks it (`markFlushPoint`).
  private var unmarked: (headerPage: Int, headerLength: Int)?
  /// The open record's header area (placeholder header, then operations), reused for every
  /// record so that appending allocates nothing.
  private var area = ByteWriter(capacity: Layout.pageSize)
  /// The open PAGES record's descriptors, reused likewise.
  private var descriptors: [PageDescriptor] = []
  /// True from the start: the log recovery read may still be only in the page cache (the last
  /// process stopped without syncing), and the first flush must make it durable even when
  /// nothing new was written.
  private(set) var needsSync = true
  /// Pages of the open segment known durable; a failed sync rewrites from here.
  private var syncedPages: Int
  /// First page of the open segment that the buffer holds: pages before it were written by an
  /// earlier session (the buffer starts empty there); 0 once the log moves to a new segment.
  private(set) var bufferedFrom: Int
  private var failure: String?
  /// The segment a SEAL continues in while the seal's write-out or sync has not succeeded.
  private var unfinishedSeal: Int?
  /// The last record is a SEAL: the append that needed the room failed after it (a seal is
  /// otherwise followed by its record at once). A SEAL is no flush point and cannot be marked
  /// as one, so a flush then needs a record that is (`StrataImage.markTailWithoutPoint`).
  private(set) var endsWithSeal = false
  /// Pages appended since the writer started: checkpoints are due by log volume.
  private(set) var appendedPages: UInt64 = 0
  /// Every operation up to this seq is known durable (0: nothing synced by this writer yet).
  private(set) var durableSeq: UInt64 = 0
  /// Largest block count of one WRITE operation, so that it fits an empty record and segment.
  let maxBlocksPerWrite: Int

  init(
    storage: ImageStorage, geometry: Geometry, segment: Int, tailPage: Int, nextSeq: UInt64, lastChecksum: UInt32,
    clock: @escaping @Sendable () -> UInt64
  ) {
    self.storage = storage
    self.geometry = geometry
    self.segment = segment
    self.tailPage = tailPage
    self.writtenPages = tailPage
    self.syncedPages = tailPage
    self.bufferedFrom = tailPage
    self.nextSeq = nextSeq
    self.lastChecksum = lastChecksum
    self.clock = clock
    buffers = (0..<2).map { _ in
      let b = UnsafeMutableRawBufferPointer.allocate(byteCount: geometry.segmentSize, alignment: Layout.pageSize)
      b.initializeMemory(as: UInt8.self, repeating: 0)
      return b
    }
    maxBlocksPerWrite = Self.maxBlocksPerWrite(geometry)
  }

  static func maxBlocksPerWrite(_ geometry: Geometry) -> Int {
    let byHeader = (batchHeaderCapacity - RecordHeader.encodedLength - 24) / 4
    let bySegment = (geometry.pagesPerSegment - 2) / geometry.pagesPerBlock
    return min(1024, byHeader, bySegment)
  }

  deinit { buffers.forEach { $0.deallocate() } }

  var pendingPages: Int { tailPage - writtenPages }
  /// The segment sealed last: its buffer may still be written again after a failed sync, so
  /// the cleaner leaves it alone.
  var previousSegment: Int? { previous?.segment }
  var pagesLeft: Int { geometry.pagesPerSegment - tailPage - 1 }  // one page stays for the SEAL
  /// Blocks a WRITE appended now can hold without sealing the segment (counting a new record
  /// header): a large write is split there rather than leaving the rest of the segment empty.
  var blocksLeftInSegment: Int { max(0, (pagesLeft - 1) / geometry.pagesPerBlock) }
  var position: UInt64 { geometry.firstPage(ofSegment: segment) + UInt64(tailPage) }

  // MARK: Appending

  /// Appends a WRITE of `checksums.count` blocks from `data`; returns its seq and first data page.
  /// The caller applies it, then calls `writeOutIfDue`.
  func appendWrite(firstBlock: UInt64, data: UnsafeRawBufferPointer, checksums: UnsafeBufferPointer<UInt32>) throws
    -> (UInt64, UInt64)
  {
    precondition(!checksums.isEmpty && checksums.count <= maxBlocksPerWrite)
    precondition(data.count == checksums.count * geometry.blockSize)
    let pages = checksums.count * geometry.pagesPerBlock
    let seq = try beginOp(length: LogOp.writeLength(blocks: checksums.count), kind: .data, payloadPages: pages)
    LogOp.encodeWrite(firstBlock: firstBlock, checksums: checksums, into: &area)
    let page = position
    UnsafeMutableRawBufferPointer(rebasing: buffer[(tailPage * Layout.pageSize)...]).copyMemory(from: data)
    tailPage += pages
    appendedPages += UInt64(pages)
    return (seq, page)
  }

  /// Appends an operation without payload (zero, discard, snapshot, resize, …); returns its seq.
  @discardableResult
  func appendOp(_ op: LogOp) throws -> UInt64 {
    precondition(op.payloadPages(blockSize: geometry.blockSize) == 0)
    switch op {
    case .checkpoint, .seal, .pages: preconditionFailure("\(op.type) is written by the log writer itself")
    default: break
    }
    let seq = try beginOp(length: op.encodedLength, kind: .data, payloadPages: 0)
    op.encode(into: &area)
    return seq
  }

  /// Appends one metadata page (in a PAGES record) and returns its page address.
  func appendMetaPage(_ bytes: UnsafeRawBufferPointer, descriptor: PageDescriptor) throws -> UInt64 {
    precondition(bytes.count == Layout.pageSize)
    try checkUsable()
    if let o = open, o.kind != .pages || o.pageCount == Self.maxPagesPerRecord || pagesLeft < 1 {
      closeRecord()
    }
    if open == nil {
      if pagesLeft < 2 { try seal() }
      open = OpenRecord(kind: .pages, headerPage: tailPage, firstSeq: nextSeq, timestamp: clock(), opCount: 1)
      unmarked = nil
      endsWithSeal = false
      descriptors.removeAll(keepingCapacity: true)
      nextSeq += 1
      tailPage += 1
      appendedPages += 1
    }
    descriptors.append(descriptor)
    open!.pageCount += 1
    let page = position
    UnsafeMutableRawBufferPointer(rebasing: buffer[(tailPage * Layout.pageSize)...]).copyMemory(from: bytes)
    tailPage += 1
    appendedPages += 1
    return page
  }

  /// Appends a CHECKPOINT record; the caller made room with `makeRoom` so that no seal can
  /// happen in between (a seal would change the state the checkpoint describes).
  func appendCheckpoint(_ body: CheckpointBody) -> (page: UInt64, header: RecordHeader) {
    closeRecord()
    let result = appendStandalone([.checkpoint(body)])
    return result
  }

  /// Pages a CHECKPOINT record with `body` occupies.
  static func checkpointPages(_ body: CheckpointBody) -> Int {
    (RecordHeader.encodedLength + LogOp.checkpoint(body).encodedLength + Layout.pageSize - 1) / Layout.pageSize
  }

  /// Seals the segment now unless `pages` pages (plus a record header) still fit in it.
  func makeRoom(pages: Int) throws {
    try checkUsable()
    closeRecord()
    if pagesLeft < pages + 1 && tailPage > 0 { try seal() }
    precondition(pagesLeft >= pages + 1 || tailPage == 0, "\(pages) pages never fit one segment")
  }

  /// Makes room in an open data record for an operation of `length` bytes (the caller then
  /// encodes it into `area`) and returns its sequence number.
  private func beginOp(length: Int, kind: OpenKind, payloadPages: Int) throws -> UInt64 {
    try checkUsable()
    if let o = open, o.kind != kind || area.count + length > Self.batchHeaderCapacity || pagesLeft < payloadPages {
      closeRecord()
    }
    if open == nil {
      if pagesLeft < 1 + payloadPages { try seal() }
      precondition(pagesLeft >= 1 + payloadPages)
      endsWithSeal = false
      open = OpenRecord(kind: kind, headerPage: tailPage, firstSeq: nextSeq, timestamp: clock())
      unmarked = nil
      area.reset()
      area.zeros(RecordHeader.encodedLength)
      tailPage += 1
      appendedPages += 1
    }
    open!.opCount += 1
    let seq = nextSeq
    nextSeq += 1
    return seq
  }

  /// Timestamp of the record the next operation joins (snapshots take their time from it).
  var openRecordTimestamp: UInt64? { open?.timestamp }

  /// Finishes the open record: encodes its header area into the page reserved for it.
  func closeRecord(flags: RecordHeader.Flags = []) {
    guard let o = open else { return }
    open = nil
    if o.kind == .pages {
      area.reset()
      area.zeros(RecordHeader.encodedLength)
      LogOp.pages(descriptors).encode(into: &area)
    }
    let payload = tailPage - o.headerPage - 1
    let header = LogRecord.finishHeaderArea(
      &area, opCount: o.opCount, payloadPages: payload, seq: o.firstSeq, previousChecksum: lastChecksum,
      timestampNanoseconds: o.timestamp, flags: flags)
    precondition(area.count == Layout.pageSize, "batch header overflowed its page")
    area.bytes.withUnsafeBytes {
      UnsafeMutableRawBufferPointer(rebasing: buffer[(o.headerPage * Layout.pageSize)...]).copyMemory(from: $0)
    }
    lastChecksum = header.checksum
    unmarked = flags.contains(.flushPoint) ? nil : (o.headerPage, Int(header.headerLength))
  }

  /// Makes the end of the log a flush point: closes the open record with `flush_point`, or,
  /// when a reader closed it already (views read the log back), sets the flag on that record
  /// while it is still the last and not yet synced. Without this a flush after a view left
  /// its state off the timeline (strata-sim seed 2).
  private func markFlushPoint() throws {
    if open != nil { return closeRecord(flags: .flushPoint) }
    guard let u = unmarked, u.headerPage >= syncedPages else { return }
    unmarked = nil
    if u.headerPage < writtenPages {
      // Handed to the file already: rewrite from its header once those writes are done (the
      // same pages `rewindAfterFailedWrite` would rewrite; none of them is synced yet).
      try storage.completeWrites()
      writtenPages = u.headerPage
    }
    lastChecksum = LogRecord.addFlags(
      .flushPoint,
      toHeaderArea: UnsafeMutableRawBufferPointer(
        rebasing: buffer[(u.headerPage * Layout.pageSize)..<(u.headerPage * Layout.pageSize + u.headerLength)]))
  }

  @discardableResult
  private func appendStandalone(_ ops: [LogOp]) -> (page: UInt64, header: RecordHeader) {
    precondition(open == nil)
    unmarked = nil
    endsWithSeal = false
    let (bytes, header) = LogRecord.encodeHeaderArea(
      ops: ops, seq: nextSeq, previousChecksum: lastChecksum, timestampNanoseconds: clock(), flags: [],
      blockSize: geometry.blockSize)
    let pages = bytes.count / Layout.pageSize
    precondition(tailPage + pages <= geometry.pagesPerSegment, "record does not fit the segment")
    let page = position
    bytes.withUnsafeBytes {
      UnsafeMutableRawBufferPointer(rebasing: buffer[(tailPage * Layout.pageSize)...]).copyMemory(from: $0)
    }
    tailPage += pages
    appendedPages += UInt64(pages)
    nextSeq += UInt64(ops.count)
    lastChecksum = header.checksum
    return (page, header)
  }

  /// Ends the segment with a SEAL record and continues the log in the next one.
  func seal() throws {
    // Reads of this segment go to storage once its buffer is reused: a group-commit leader
    // must have written it by then (or, if it failed, it is written again below).
    if outside.waitIdle() { rewindAfterFailedWrite() }
    try checkUsable()
    // A seal that failed earlier and was just finished made the room.
    guard tailPage > 0 else { return }
    closeRecord()
    precondition(tailPage < geometry.pagesPerSegment)
    let next = sealHandler(segment, tailPage + 1, nextSeq)
    appendStandalone([.seal(nextSegment: UInt64(next))])
    endsWithSeal = true
    unfinishedSeal = next
    try finishSeal()
  }

  /// Writes out the sealed segment and moves the log on to the next one, in the other buffer.
  /// That buffer still holds the segment sealed before: its writes must have landed and, unless
  /// a flush covered them, be synced before it is reused, so that the pages since the last good
  /// sync are always still in a buffer for a retry (one sync per segment, a segment late, so the
  /// disk does not wait for it). If this fails, the next call retries (`checkUsable`).
  private func finishSeal() throws {
    guard let next = unfinishedSeal else { return }
    do {
      try writeOut()
      if let p = previous {
        try storage.completeWrites(through: p.mark)
        if p.unsynced < p.to { try storage.sync() }
      }
    } catch {
      rewindAfterFailedWrite()
      throw error
    }
    unfinishedSeal = nil
    allocatedTo = 0  // the next segment may lie anywhere in the file (a reused one, lower)
    previous = (segment, bufferedFrom, tailPage, syncedPages, storage.writeMark)
    rewritePrevious = false
    current ^= 1
    segment = next
    tailPage = 0
    writtenPages = 0
    syncedPages = 0
    bufferedFrom = 0
  }

  /// Bytes allocated ahead of the log's writes at a time (see `preallocate`).
  static let preallocationStep: UInt64 = 4 << 20
  /// End of the file range known to be allocated for the log.
  private var allocatedTo: UInt64 = 0

  /// Allocates file space ahead of a write that would end at `end`, a few MiB at a time and
  /// never past the open segment, so that appends do not extend the file one write at a time.
  private func preallocate(through end: UInt64) throws {
    guard end > allocatedTo else { return }
    let segmentEnd = Geometry.byteOffset(
      ofPage: geometry.firstPage(ofSegment: segment) + UInt64(geometry.pagesPerSegment))
    let start = max(allocatedTo, Geometry.byteOffset(ofPage: geometry.firstPage(ofSegment: segment)))
    let target = min(segmentEnd, max(end, start + Self.preallocationStep))
    try storage.preallocate(at: start, length: target - start)
    allocatedTo = target
  }

  // MARK: Writing out

  /// Writes out once a megabyte is pending. Called after the caller applied what it appended,
  /// so that a failing write-out never leaves the log ahead of the in-memory state.
  func writeOutIfDue() throws {
    if pendingPages >= Self.writeOutThreshold {
      closeRecord()
      try writeOut()
    }
  }

  /// Writes every closed record that is still only in memory (no sync).
  func writeOut() throws {
    precondition(open == nil, "an open record cannot be written out")
    try writePreviousAgain()
    // Asynchronous: the buffer below `tailPage` never changes until the segment is sealed,
    // and sealing waits for these writes before the buffer is reused.
    do {
      guard let run = try unwrittenRun() else { return }
      try storage.submitWrite(run.bytes, at: run.offset)
    } catch {
      rewindAfterFailedWrite()
      throw error
    }
    markUnwrittenTaken()
  }

  /// The pages appended but not yet handed to the file, in the buffer, and where they go in
  /// the file, its space allocated; nil when there are none. The caller writes them (or a
  /// copy), then `markUnwrittenTaken`.
  private func unwrittenRun() throws -> (bytes: UnsafeRawBufferPointer, offset: UInt64)? {
    guard pendingPages > 0 else { return nil }
    let offset = Geometry.byteOffset(ofPage: geometry.firstPage(ofSegment: segment) + UInt64(writtenPages))
    let bytes = UnsafeRawBufferPointer(
      rebasing: buffer[(writtenPages * Layout.pageSize)..<(tailPage * Layout.pageSize)])
    try preallocate(through: offset + UInt64(bytes.count))
    return (bytes, offset)
  }

  /// The pages `unwrittenRun` returned are on their way to the file; a sync must cover them.
  private func markUnwrittenTaken() {
    writtenPages = tailPage
    needsSync = true
  }

  /// What a thread writes out of the log buffer outside the image lock (see `beginWriteOut`).
  struct WriteOut {
    /// The pages this write-out took, and where they go; nil when there were none.
    var pages: (bytes: UnsafeRawBufferPointer, offset: UInt64, number: UInt64)?
    /// Write-outs to wait for: every one begun so far, which hold the records appended before.
    var through: UInt64
    /// Writes of the log through the storage (threshold write-outs, seals) to wait for.
    var storageMark: UInt64
  }

  /// The first half of a write-out whose write runs on the calling thread outside the image
  /// lock, so that threads sharing the image do not take turns on the lock while the disk
  /// works: closes the open record and marks the pages not yet written as written. The caller
  /// writes `pages` (straight from the buffer: the pages below `tailPage` never change, and a
  /// seal waits for the write before the buffer can be reused), calls `outside.endWriteOut`,
  /// then waits for `through` and `storageMark`. A failed write is written again by the next
  /// flush, as a failed group sync is.
  func beginWriteOut() throws -> WriteOut {
    try checkUsable()
    closeRecord()
    do {
      try writePreviousAgain()
    } catch {
      rewindAfterFailedWrite()
      throw error
    }
    var pages: (bytes: UnsafeRawBufferPointer, offset: UInt64, number: UInt64)?
    if let run = try unwrittenRun() {
      markUnwrittenTaken()
      pages = (run.bytes, run.offset, outside.beginWriteOut())
    }
    return WriteOut(pages: pages, through: outside.lastWriteOut, storageMark: storage.writeMark)
  }

  /// Waits for the log writes submitted up to `mark` (`storage.writeMark` after a write-out).
  /// A failed one is written again by the next write-out or flush: the error must pass
  /// through here, or a later flush would count pages that never reached the file (strata-sim
  /// seed 21022: a seal's write-out failed, the error surfaced in a server's wait for its
  /// acknowledgement, and the next flush synced without the sealed segment's last pages).
  func completeWrites(through mark: UInt64) throws {
    do {
      try storage.completeWrites(through: mark)
    } catch {
      rewindAfterFailedWrite()
      throw error
    }
  }

  /// `completeWrites(through:)` without waiting: whether they are complete.
  func writesComplete(through mark: UInt64) throws -> Bool {
    do {
      return try storage.writesComplete(through: mark)
    } catch {
      rewindAfterFailedWrite()
      throw error
    }
  }

  /// After a failed write or sync: the unsynced pages of the segment sealed last, again.
  private func writePreviousAgain() throws {
    guard rewritePrevious, let p = previous else { return }
    let bytes = UnsafeRawBufferPointer(
      rebasing: buffers[current ^ 1][(p.unsynced * Layout.pageSize)..<(p.to * Layout.pageSize)])
    try storage.submitWrite(
      bytes, at: Geometry.byteOffset(ofPage: geometry.firstPage(ofSegment: p.segment) + UInt64(p.unsynced)))
    previous?.mark = storage.writeMark
    rewritePrevious = false
    needsSync = true
  }

  /// Makes everything appended so far durable: the group commit point.
  ///
  /// After a failed sync the kernel may have dropped the dirty pages while marking them clean
  /// (the "fsyncgate" lesson), so a retry must write them again: the pages since the last good
  /// sync are rewritten from the buffers. A seal syncs the segment sealed before it before its
  /// buffer is reused, so they are always still buffered.
  func flush() throws {
    // A sync must not count pages a group-commit leader is still writing, or lost.
    if outside.waitIdle() { rewindAfterFailedWrite() }
    try checkUsable()
    do {
      try markFlushPoint()
      try writeOut()
      try storage.completeWrites()
      if needsSync { try storage.sync() }
    } catch {
      rewindAfterFailedWrite()
      throw error
    }
    needsSync = false
    syncedPages = writtenPages
    if let p = previous { previous?.unsynced = p.to }
    durableSeq = nextSeq - 1
  }

  /// What a group-commit leader writes and syncs outside the image lock (see `beginSync`).
  struct SyncTicket {
    var segment: Int
    var pages: Int
    var seq: UInt64
    /// A page-aligned copy of the pages to write (the leader writes, then deallocates it), and
    /// where it goes.
    var copy: UnsafeMutableRawBufferPointer?
    var offset: UInt64
  }

  /// Group-commit syncs and write-outs in progress outside the image lock; `flush` waits for them.
  let outside = OutsideIO()

  /// The first half of a flush whose write and fdatasync run on another thread, outside the
  /// image lock: closes the open record, completes earlier write-outs, and copies the pages
  /// not yet written into the ticket, marking them written. The leader then writes the copy,
  /// syncs, calls `outside.leave`, and `endSync` under the lock again. Appends, write-outs and
  /// seals may happen meanwhile: they lie past the ticket (a copy, so the buffer may even be
  /// reused by a seal).
  func beginSync() throws -> SyncTicket {
    // The sync must cover the write-outs still running, and `markFlushPoint` may rewrite a
    // page one of them is writing.
    if outside.waitIdle() { rewindAfterFailedWrite() }
    try checkUsable()
    do {
      try markFlushPoint()
      try writePreviousAgain()
      try storage.completeWrites()
    } catch {
      rewindAfterFailedWrite()
      throw error
    }
    var copy: UnsafeMutableRawBufferPointer?
    let run = try unwrittenRun()
    if let run {
      let c = UnsafeMutableRawBufferPointer.allocate(byteCount: run.bytes.count, alignment: Layout.pageSize)
      c.copyMemory(from: run.bytes)
      copy = c
      markUnwrittenTaken()
    }
    outside.enter()
    return SyncTicket(segment: segment, pages: writtenPages, seq: nextSeq - 1, copy: copy, offset: run?.offset ?? 0)
  }

  /// Records a sync started with `beginSync`: on success everything up to the ticket is
  /// durable; on failure the unsynced pages are rewritten by the next flush, as in `flush`.
  func endSync(_ ticket: SyncTicket, failed: Bool) {
    guard !failed else {
      rewindAfterFailedWrite()
      return
    }
    durableSeq = max(durableSeq, ticket.seq)
    if segment == ticket.segment {
      syncedPages = max(syncedPages, ticket.pages)
      // Sealed before the ticket: `beginSync` completed its writes, the sync covered them.
      if let p = previous { previous?.unsynced = p.to }
      if writtenPages == ticket.pages { needsSync = false }
    } else if let p = previous, p.segment == ticket.segment {
      // A seal after the ticket moved the log on: the sealed segment is durable up to the ticket.
      previous?.unsynced = max(p.unsynced, ticket.pages)
    }
  }

  /// A write or sync failed: what was written since the last good sync may not be on disk, so
  /// write it again from the buffers next time.
  private func rewindAfterFailedWrite() {
    writtenPages = syncedPages
    if let p = previous, p.unsynced < p.to { rewritePrevious = true }
  }

  /// Refuses further work until the image is reopened: the image's state no longer matches the
  /// log (the first reason is kept).
  func refuse(_ reason: String) {
    if failure == nil { failure = reason }
  }

  /// Throws once the writer cannot guarantee durability any more (see `flush`); finishes a
  /// seal that failed before.
  func checkUsable() throws {
    if let failure {
      throw StrataError(.io, "the image must be reopened: \(failure); unflushed writes since the last flush are lost")
    }
    try finishSeal()
  }

  /// Copies `page` if a buffer holds it (appended in this segment or the one sealed before it
  /// since the writer started: written-out pages too, whose asynchronous writes may still be in
  /// flight); false if it must be read from storage.
  func copyPending(page: UInt64, into out: UnsafeMutableRawBufferPointer) -> Bool {
    guard let source = bufferHolding(page) else { return false }
    let local = geometry.pageInSegment(page)
    out.copyMemory(
      from: UnsafeRawBufferPointer(rebasing: source[(local * Layout.pageSize)..<((local + 1) * Layout.pageSize)]))
    return true
  }

  /// True when a buffer holds `page` (see `copyPending`).
  func isPending(page: UInt64) -> Bool { bufferHolding(page) != nil }

  private func bufferHolding(_ page: UInt64) -> UnsafeMutableRawBufferPointer? {
    guard page >= geometry.firstDataPage else { return nil }
    let s = geometry.segment(ofPage: page)
    let local = geometry.pageInSegment(page)
    if s == segment { return local >= bufferedFrom && local < tailPage ? buffer : nil }
    if let p = previous, s == p.segment, local >= p.from, local < p.to { return buffers[current ^ 1] }
    return nil
  }
}

/// Counts the log writes and syncs running outside the image lock (group-commit syncs, and
/// write-outs by threads that share the image) and remembers whether one failed, so that a flush
/// under the lock neither overtakes them nor trusts their pages. Write-outs are numbered in the
/// order they begin (under the image lock), so a thread can wait for those covering its records.
final class OutsideIO: @unchecked Sendable {
  private let mutex: UnsafeMutablePointer<pthread_mutex_t> = .allocate(capacity: 1)
  private let changed: UnsafeMutablePointer<pthread_cond_t> = .allocate(capacity: 1)
  private var running = 0
  private var failed = false
  /// Write-outs begun so far; every one up to `endedThrough` has ended.
  private var begunWriteOuts: UInt64 = 0
  private var endedThrough: UInt64 = 0
  /// Write-outs that ended out of order, above `endedThrough` (at most one per thread).
  private var endedAhead: [UInt64] = []

  init() {
    pthread_mutex_init(mutex, nil)
    pthread_cond_init(changed, nil)
    endedAhead.reserveCapacity(16)
  }

  deinit {
    pthread_cond_destroy(changed)
    pthread_mutex_destroy(mutex)
    changed.deallocate()
    mutex.deallocate()
  }

  private func locked<T>(_ body: () -> T) -> T {
    pthread_mutex_lock(mutex)
    defer { pthread_mutex_unlock(mutex) }
    return body()
  }

  /// A group-commit sync starts.
  func enter() {
    locked { running += 1 }
  }

  /// A group-commit sync ended.
  func leave(failed: Bool) {
    locked {
      running -= 1
      self.failed = self.failed || failed
      pthread_cond_broadcast(changed)
    }
  }

  /// A write-out starts (under the image lock); returns its number.
  func beginWriteOut() -> UInt64 {
    locked {
      running += 1
      begunWriteOuts += 1
      return begunWriteOuts
    }
  }

  /// The number of the last write-out begun: waiting through it covers every record written
  /// out so far.
  var lastWriteOut: UInt64 { locked { begunWriteOuts } }

  func endWriteOut(_ number: UInt64, failed: Bool) {
    locked {
      precondition(number > endedThrough && number <= begunWriteOuts, "write-out \(number) ended twice")
      running -= 1
      self.failed = self.failed || failed
      endedAhead.append(number)
      while let i = endedAhead.firstIndex(of: endedThrough + 1) {
        endedAhead.remove(at: i)
        endedThrough += 1
      }
      pthread_cond_broadcast(changed)
    }
  }

  /// Waits until every write-out up to `number` ended (not the image lock: those running
  /// never need it).
  func waitWriteOuts(through number: UInt64) {
    pthread_mutex_lock(mutex)
    defer { pthread_mutex_unlock(mutex) }
    while endedThrough < number { pthread_cond_wait(changed, mutex) }
  }

  /// Waits until none runs; true (once) if one failed since the last call.
  func waitIdle() -> Bool {
    pthread_mutex_lock(mutex)
    defer { pthread_mutex_unlock(mutex) }
    while running > 0 { pthread_cond_wait(changed, mutex) }
    defer { failed = false }
    return failed
  }
}
