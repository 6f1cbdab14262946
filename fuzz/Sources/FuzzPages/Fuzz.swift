import StrataFormat

/// Metadata pages (usage, catalog) and map entries from one 4 KiB input.
@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>, _ size: Int) -> Int32 {
  var page = [UInt8](repeating: 0, count: Layout.pageSize)
  for i in 0..<min(size, page.count) { page[i] = data[i] }
  page.withUnsafeBytes { p in
    if let entries = try? SnapshotEntry.decodePage(p) {
      let encoded = SnapshotEntry.encodePages(entries)
      precondition(encoded.count == 1, "one catalog page re-encoded into \(encoded.count)")
    }
    _ = try? SegmentUsage.decodePage(p, count: SegmentUsage.perPage)
    for i in 0..<Layout.mapFanout {
      let w0 = p.loadUnaligned(fromByteOffset: i * 16, as: UInt64.self)
      let w1 = p.loadUnaligned(fromByteOffset: i * 16 + 8, as: UInt64.self)
      if let e = try? MapEntry.decode(word0: w0, word1: w1) { precondition(e.words == (w0, w1)) }
      if let c = try? ChildRef.decode(word0: w0, word1: w1) { precondition(c.words == (w0, w1)) }
    }
  }
  return 0
}
