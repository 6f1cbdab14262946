import StrataFormat

/// Reads pages of the image: from storage, or from the log writer when they are appended but
/// not yet written out. Also the `NodeSource` of every block map (head and snapshot views).
final class PageReader: NodeSource {
  let storage: ImageStorage
  let geometry: Geometry
  let cache: NodeCache<MapNode>
  /// Capacity of each catalog tree's node cache.
  let catalogCacheNodes: Int
  weak var writer: LogWriter?

  init(storage: ImageStorage, geometry: Geometry, cacheNodes: Int, catalogCacheNodes: Int) {
    self.storage = storage
    self.geometry = geometry
    self.cache = NodeCache(capacity: cacheNodes)
    self.catalogCacheNodes = catalogCacheNodes
  }

  /// Reads `count` pages starting at `page` into `out`. Pages past the end of the file are an
  /// error unless `zeroPastEnd` (the log walk treats them as "no record here").
  func readPages(_ page: UInt64, _ count: Int, into out: UnsafeMutableRawBufferPointer, zeroPastEnd: Bool = false)
    throws
  {
    precondition(out.count == count * Layout.pageSize)
    var done = 0
    while done < count {
      let p = page + UInt64(done)
      let slice = UnsafeMutableRawBufferPointer(rebasing: out[(done * Layout.pageSize)...])
      if let writer,
        writer.copyPending(page: p, into: UnsafeMutableRawBufferPointer(rebasing: slice[..<Layout.pageSize]))
      {
        done += 1
        continue
      }
      // Everything up to the writer's pending region (or the end) comes from storage in one call.
      var run = 1
      while done + run < count, !(writer?.isPending(page: p + UInt64(run)) ?? false) { run += 1 }
      let want = UnsafeMutableRawBufferPointer(rebasing: slice[..<(run * Layout.pageSize)])
      let got = try storage.read(into: want, at: Geometry.byteOffset(ofPage: p))
      if got < want.count {
        guard zeroPastEnd else {
          throw StrataError(
            .corrupt, "image file is truncated: page \(p + UInt64(got / Layout.pageSize)) lies past its end")
        }
        UnsafeMutableRawBufferPointer(rebasing: want[got...]).initializeMemory(as: UInt8.self, repeating: 0)
      }
      done += run
    }
  }

  func readPage(_ page: UInt64, zeroPastEnd: Bool = false) throws -> [UInt8] {
    var bytes = [UInt8](repeating: 0, count: Layout.pageSize)
    try bytes.withUnsafeMutableBytes { try readPages(page, 1, into: $0, zeroPastEnd: zeroPastEnd) }
    return bytes
  }

  /// Reads a metadata page and checks it against the checksum its referrer stored.
  func readVerified(_ ref: PageRef, kind: PageKind, level: UInt8, key: UInt64) throws -> [UInt8] {
    try checkAddress(ref.page, what: "\(kind) page")
    let bytes = try readPage(ref.page)
    let actual = bytes.withUnsafeBytes { pageChecksum(kind: kind, level: level, key: key, $0) }
    guard actual == ref.checksum else {
      throw StrataError(
        .corrupt,
        "\(kind) page \(key) at page \(ref.page) failed its checksum (stored \(hex32(ref.checksum)), computed \(hex32(actual)))"
      )
    }
    return bytes
  }

  func checkAddress(_ page: UInt64, what: String) throws {
    guard page >= geometry.firstDataPage, page <= Layout.maxPageAddress else {
      throw StrataError(.corrupt, "\(what) points to page \(page), outside the segment area")
    }
  }

  func load(_ ref: ChildRef, level: Int, index: UInt64) throws -> MapNode {
    if let node = cache.get(ref.page) { return node }
    let node = MapNode()
    try checkAddress(ref.page, what: "map node (level \(level), index \(index))")
    try readPages(ref.page, 1, into: node.bytes)
    try Self.verify(node, ref, level: level, index: index)
    cache.insert(ref.page, node)
    return node
  }

  /// Most map nodes one read brings in (128 KiB).
  static let readaheadNodes = 32

  /// Loads the node and, in the same read, the siblings stored on the pages right before and
  /// after it (a checkpoint writes each level's nodes in index order), while the cache has room
  /// for them. Without it a cold map costs one small synchronous read per leaf: 4K random reads
  /// of a freshly opened 1 GiB image ran at 0.8x their warm rate. Once the cache is full, a miss
  /// reads only its own node, so random access to a disk larger than the cache does not thrash.
  func load(_ ref: ChildRef, level: Int, index: UInt64, parent: MapNode) throws -> MapNode {
    if let node = cache.get(ref.page) { return node }
    let budget = min(Self.readaheadNodes, cache.free)
    let slot = Int(index & 0xFF)
    func isNeighbour(_ s: Int) -> Bool {
      let r = parent.child(s)
      return !r.isNull && Int64(bitPattern: r.page &- ref.page) == Int64(s - slot) && !cache.contains(r.page)
    }
    var first = slot
    var last = slot
    while last - first + 1 < budget / 2, first > 0, isNeighbour(first - 1) { first -= 1 }
    while last - first + 1 < budget, last < Layout.mapFanout - 1, isNeighbour(last + 1) { last += 1 }
    guard first < last else { return try load(ref, level: level, index: index) }
    try checkAddress(ref.page, what: "map node (level \(level), index \(index))")
    let firstPage = ref.page - UInt64(slot - first)
    try checkAddress(firstPage, what: "map node (level \(level), index \(index - UInt64(slot - first)))")
    let count = last - first + 1
    let run = UnsafeMutableRawBufferPointer.allocate(byteCount: count * Layout.pageSize, alignment: Layout.pageSize)
    defer { run.deallocate() }
    // A sibling past the end of a truncated file must not fail the node asked for (an I/O
    // error does: it is not swallowed).
    do { try readPages(firstPage, count, into: run) } catch let e as StrataError where e.code == .corrupt {
      return try load(ref, level: level, index: index)
    }
    var wanted: MapNode?
    for s in first...last {
      let node = MapNode()
      let at = (s - first) * Layout.pageSize
      node.bytes.copyMemory(from: UnsafeRawBufferPointer(rebasing: run[at..<(at + Layout.pageSize)]))
      let siblingIndex = index - UInt64(slot) + UInt64(s)
      if s == slot {
        try Self.verify(node, ref, level: level, index: index)
        wanted = node
      } else if (try? Self.verify(node, parent.child(s), level: level, index: siblingIndex)) == nil {
        continue  // reported if and when it is needed
      }
      cache.insert(parent.child(s).page, node)
    }
    guard let wanted else { preconditionFailure("the run holds the wanted node") }
    return wanted
  }

  /// Checks a node read from storage against the checksum its parent stored, and its contents.
  static func verify(_ node: MapNode, _ ref: ChildRef, level: Int, index: UInt64) throws {
    let actual = node.checksum(level: level, key: index)
    guard actual == ref.checksum else {
      throw StrataError(
        .corrupt,
        "map node (level \(level), index \(index)) at page \(ref.page) failed its checksum "
          + "(stored \(hex32(ref.checksum)), computed \(hex32(actual)))")
    }
    do {
      try node.validate(level: level)
    } catch let e as FormatError {
      throw StrataError.corrupt("map node (level \(level), index \(index)) at page \(ref.page)", e)
    }
  }

  func remember(_ node: MapNode, at page: UInt64) { cache.insert(page, node) }
}

/// A record read back from the log, with where it lies.
struct StoredRecord {
  var page: UInt64
  var record: LogRecord
  var header: RecordHeader { record.header }
  /// First payload page (data blocks and metadata pages follow the header area).
  var payloadPage: UInt64 { page + UInt64(header.headerPages) }
  var endPage: UInt64 { page + UInt64(header.totalPages) }

  /// Decodes and checks the record at `page`, its header pages read with `read` (first page,
  /// count, page-aligned destination; zeros past the end of the file). Nil when there is no
  /// valid record there (the end of the log); throws only for I/O errors.
  static func decode(
    at page: UInt64, geometry: Geometry,
    read: (_ first: UInt64, _ count: Int, _ into: UnsafeMutableRawBufferPointer) throws -> Void
  ) throws -> StoredRecord? {
    guard page >= geometry.firstDataPage else { return nil }
    let local = geometry.pageInSegment(page)
    let first = UnsafeMutableRawBufferPointer.allocate(byteCount: Layout.pageSize, alignment: Layout.pageSize)
    defer { first.deallocate() }
    try read(page, 1, first)
    guard let header = try? RecordHeader.decode(UnsafeRawBufferPointer(first)) else { return nil }
    guard local + header.totalPages <= geometry.pagesPerSegment else { return nil }
    let area = UnsafeMutableRawBufferPointer.allocate(
      byteCount: header.headerPages * Layout.pageSize, alignment: Layout.pageSize)
    defer { area.deallocate() }
    area.copyMemory(from: UnsafeRawBufferPointer(first))
    if header.headerPages > 1 {
      try read(page + 1, header.headerPages - 1, UnsafeMutableRawBufferPointer(rebasing: area[Layout.pageSize...]))
    }
    guard let record = try? LogRecord.decode(headerArea: UnsafeRawBufferPointer(area), blockSize: geometry.blockSize)
    else { return nil }
    // Every record but a segment's last (its SEAL) leaves a page for that SEAL.
    if case .seal = record.ops.last {} else if local + header.totalPages >= geometry.pagesPerSegment { return nil }
    return StoredRecord(page: page, record: record)
  }

  /// The records of sealed segment `s`, from its first page to its SEAL (or the first page
  /// that holds no valid record), read with `read` as in `decode`.
  static func records(
    inSegment s: Int, geometry: Geometry,
    read: (_ first: UInt64, _ count: Int, _ into: UnsafeMutableRawBufferPointer) throws -> Void
  ) throws -> [StoredRecord] {
    var records: [StoredRecord] = []
    var page = geometry.firstPage(ofSegment: s)
    let end = page + UInt64(geometry.pagesPerSegment)
    while page < end, let stored = try decode(at: page, geometry: geometry, read: read) {
      records.append(stored)
      if case .seal = stored.record.ops.last { break }
      page = stored.endPage
    }
    return records
  }
}

extension PageReader {
  /// Reads and checks the record at `page`. Returns nil when there is no valid record there
  /// (the end of the log); throws only for I/O errors.
  func record(at page: UInt64) throws -> StoredRecord? {
    try StoredRecord.decode(at: page, geometry: geometry, read: readRecordPages)
  }

  /// The records of sealed segment `s` (see `StoredRecord.records`).
  func records(inSegment s: Int) throws -> [StoredRecord] {
    try StoredRecord.records(inSegment: s, geometry: geometry, read: readRecordPages)
  }

  /// Record pages as `StoredRecord.decode` reads them: zeros past the end of the file.
  private func readRecordPages(_ first: UInt64, _ count: Int, into out: UnsafeMutableRawBufferPointer) throws {
    try readPages(first, count, into: out, zeroPastEnd: true)
  }

  /// True when the page starts with a record magic (whether or not the record is valid).
  func hasRecordMagic(at page: UInt64) throws -> Bool {
    let first = try readPage(page, zeroPastEnd: true)
    return first.withUnsafeBytes { $0.littleEndian(at: 0, as: UInt32.self) } == RecordHeader.magic
  }

  /// True when every payload page of the record (WRITE data, PAGES metadata) matches its
  /// checksum: recovery uses it to cut a record whose header reached the disk but whose payload
  /// did not.
  func payloadIsIntact(_ stored: StoredRecord) throws -> Bool {
    // A payload that runs past the end of the file was cut by a crash, even where the missing
    // bytes happen to be zeros that the checksum would accept.
    let end = Geometry.byteOffset(ofPage: stored.endPage)
    if end > (try storage.size()), !(writer?.isPending(page: stored.endPage - 1) ?? false) { return false }
    var page = stored.payloadPage
    let blockBytes = geometry.blockSize
    var block = [UInt8](repeating: 0, count: blockBytes)
    for op in stored.record.ops {
      if case .write(_, let checksums) = op {
        for c in checksums {
          try block.withUnsafeMutableBytes { try readPages(page, geometry.pagesPerBlock, into: $0, zeroPastEnd: true) }
          if CRC32C.checksum(block) != c { return false }
          page += UInt64(geometry.pagesPerBlock)
        }
      } else if case .pages(let descriptors) = op {
        // A checkpoint will refer to these pages: a torn one must end the log here.
        for d in descriptors {
          let bytes = try readPage(page, zeroPastEnd: true)
          let actual = bytes.withUnsafeBytes { pageChecksum(kind: d.kind, level: d.level, key: d.key, $0) }
          if actual != d.checksum { return false }
          page += 1
        }
      }
    }
    return true
  }

  /// The record that follows `current` in the log (across a SEAL), if it continues the chain.
  func next(after current: StoredRecord) throws -> StoredRecord? {
    var page = current.endPage
    if case .seal(let next) = current.record.ops.last {
      guard next < UInt64(geometry.maxSegments) else { return nil }
      page = geometry.firstPage(ofSegment: Int(next))
    }
    guard let candidate = try record(at: page) else { return nil }
    guard candidate.header.seq == current.header.nextSeq,
      candidate.header.previousChecksum == current.header.checksum
    else { return nil }
    return candidate
  }
}
