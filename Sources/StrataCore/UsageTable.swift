import StrataFormat

/// Per-segment accounting (format-spec, "Usage table"): live pages the head references and the
/// fill of sealed segments. The cleaner will pick victims from it; `check` recounts it.
final class UsageTable: LiveAccounting {
  private(set) var entries: [SegmentUsage]
  /// Where each usage page was last stored (page address and checksum).
  private(set) var pageRefs: [PageRef]
  private(set) var dirtyPages: Set<Int> = []
  let geometry: Geometry

  init(geometry: Geometry, entries: [SegmentUsage], pageRefs: [PageRef]) {
    precondition(pageRefs.count == Self.pageCount(entries.count))
    self.geometry = geometry
    self.entries = entries
    self.pageRefs = pageRefs
  }

  static func pageCount(_ segments: Int) -> Int { (segments + SegmentUsage.perPage - 1) / SegmentUsage.perPage }

  var segmentCount: Int { entries.count }

  private func touch(_ segment: Int) { dirtyPages.insert(segment / SegmentUsage.perPage) }

  /// Usage page `index` is written again at the next checkpoint (the cleaner moves it).
  func touchPage(_ index: Int) { dirtyPages.insert(index) }

  func acquire(page: UInt64, count: Int) {
    let s = geometry.segment(ofPage: page)
    precondition(s < entries.count, "page \(page) lies in unallocated segment \(s)")
    entries[s].livePages += UInt32(count)
    touch(s)
  }

  func release(page: UInt64, count: Int) {
    let s = geometry.segment(ofPage: page)
    precondition(s < entries.count && entries[s].livePages >= UInt32(count), "live pages underflow in segment \(s)")
    entries[s].livePages -= UInt32(count)
    touch(s)
  }

  /// A new segment joins the log at the end of the segment area.
  func appendSegment() -> Int {
    entries.append(SegmentUsage())
    if pageRefs.count < Self.pageCount(entries.count) { pageRefs.append(.null) }
    touch(entries.count - 1)
    return entries.count - 1
  }

  /// A segment the cleaner freed continues the log (SEGMENT_REUSE): open again, empty.
  func reopen(_ segment: Int) {
    precondition(entries[segment].isFree, "segment \(segment) is not free")
    entries[segment] = SegmentUsage()
    touch(segment)
  }

  /// The cleaner emptied `segment`: nothing references it any more.
  func markFree(_ segment: Int) {
    precondition(entries[segment].isSealed && entries[segment].livePages == 0, "segment \(segment) is not reclaimable")
    entries[segment] = .free
    touch(segment)
  }

  /// Segments marked free, lowest first.
  var freeSegments: [Int] { entries.indices.filter { entries[$0].isFree } }

  func seal(segment: Int, writtenPages: Int, seq: UInt64) {
    entries[segment].writtenPages = UInt32(writtenPages)
    entries[segment].lastSeq = seq
    touch(segment)
  }

  /// Takes over the contents of a usage table loaded from a checkpoint (replay adopts it).
  func adopt(_ other: UsageTable) {
    entries = other.entries
    pageRefs = other.pageRefs
    dirtyPages = []
  }

  /// Replaces the live counts with a recount (after a restore, or by `check --repair`).
  func setLivePages(_ live: [UInt32]) {
    precondition(live.count == entries.count)
    for s in 0..<entries.count where entries[s].livePages != live[s] {
      entries[s].livePages = live[s]
      touch(s)
    }
  }

  func encodePage(_ index: Int) -> [UInt8] {
    let lo = index * SegmentUsage.perPage
    let hi = min(entries.count, lo + SegmentUsage.perPage)
    return SegmentUsage.encodePage(entries[lo..<hi])
  }

  func stored(page index: Int, at ref: PageRef) {
    pageRefs[index] = ref
    dirtyPages.remove(index)
  }
}

/// Image geometry shared by every component: turns segments and pages into byte offsets.
struct Geometry: Sendable {
  let blockSize: Int
  let segmentSize: Int
  let dataOffset: UInt64

  var pagesPerBlock: Int { blockSize / Layout.pageSize }
  var pagesPerSegment: Int { segmentSize / Layout.pageSize }
  var firstDataPage: UInt64 { dataOffset / UInt64(Layout.pageSize) }
  /// Segments whose pages stay within 48-bit page addresses.
  var maxSegments: Int { Int((Layout.maxPageAddress - firstDataPage) / UInt64(pagesPerSegment)) }

  func segment(ofPage page: UInt64) -> Int {
    precondition(page >= firstDataPage)
    return Int((page - firstDataPage) / UInt64(pagesPerSegment))
  }

  func firstPage(ofSegment s: Int) -> UInt64 { firstDataPage + UInt64(s) * UInt64(pagesPerSegment) }

  func pageInSegment(_ page: UInt64) -> Int { Int((page - firstDataPage) % UInt64(pagesPerSegment)) }

  static func byteOffset(ofPage page: UInt64) -> UInt64 { page * UInt64(Layout.pageSize) }
}
