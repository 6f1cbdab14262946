import StrataFormat

/// The named snapshots: a tree of entries keyed by seq and a name index keyed by the name's
/// bytes (format-spec 8.6), both copy-on-write trees of pages in the log read through bounded
/// caches. Opening reads the two roots; a lookup reads one path; a checkpoint writes the
/// changed nodes only. Images written before the tree existed store flat catalog pages (8.5):
/// those are loaded into the trees and written as trees at the next checkpoint.
final class Catalog {
  let bySeq: CatalogTree<SnapshotEntry>
  let byName: CatalogTree<NameIndexEntry>
  private(set) var count: Int
  /// Changes not written yet (or flat pages to convert).
  private(set) var isDirty: Bool
  /// What the last checkpoint stored: the two roots, or nothing for an empty catalog.
  private(set) var stored: (format: CatalogFormat, refs: [PageRef]) = (.flat, [])

  init(pages: PageReader) {
    bySeq = CatalogTree(pages: pages, root: nil)
    byName = CatalogTree(pages: pages, root: nil)
    count = 0
    isDirty = false
  }

  /// The catalog a checkpoint describes. Tree roots are read and verified now, everything else
  /// on demand; flat pages are read whole (they only exist in small, older catalogs).
  init(pages: PageReader, checkpoint body: CheckpointBody) throws {
    switch body.catalogFormat {
    case .tree:
      bySeq = CatalogTree(pages: pages, root: body.catalogPages[0])
      byName = CatalogTree(pages: pages, root: body.catalogPages[1])
      count = Int(clamping: body.snapshotCount)
      isDirty = false
      stored = (.tree, body.catalogPages)
      try bySeq.verifyRoot()
      try byName.verifyRoot()
    case .flat:
      bySeq = CatalogTree(pages: pages, root: nil)
      byName = CatalogTree(pages: pages, root: nil)
      count = 0
      isDirty = false
      var last: UInt64 = 0
      for (i, ref) in body.catalogPages.enumerated() {
        let bytes = try pages.readVerified(ref, kind: .catalog, level: 0, key: UInt64(i))
        let list: [SnapshotEntry]
        do { list = try bytes.withUnsafeBytes { try SnapshotEntry.decodePage($0) } } catch let e as FormatError {
          throw StrataError.corrupt("catalog page \(i)", e)
        }
        for e in list {
          guard e.seq > last, try add(e) else {
            throw StrataError(
              .corrupt, "catalog page \(i): snapshot \"\(e.name)\" (seq \(e.seq)) is duplicated or out of order")
          }
          last = e.seq
        }
      }
      guard UInt64(count) == body.snapshotCount else {
        throw StrataError(
          .corrupt, "the checkpoint counts \(body.snapshotCount) snapshots, its catalog holds \(count)")
      }
    }
  }

  var dirtyNodes: Int { bySeq.dirtyNodes + byName.dirtyNodes }
  var pagesRead: Int { bySeq.pagesRead + byName.pagesRead }
  var cachedNodes: Int { bySeq.cache.count + byName.cache.count }

  // MARK: Lookup

  /// Names are equal when their bytes are (format-spec), not when Swift's `String` would call
  /// them canonically equivalent.
  func entry(named name: String) throws -> SnapshotEntry? {
    guard let indexed = try byName.find(SnapshotName(name)) else { return nil }
    guard let e = try entry(seq: indexed.seq), SnapshotName(e.name) == indexed.name else {
      throw StrataError(.corrupt, "the catalog's name index lists \(indexed.name) as seq \(indexed.seq), which is not")
    }
    return e
  }

  func entry(seq: UInt64) throws -> SnapshotEntry? { try bySeq.find(seq) }

  /// Up to `limit` entries with a seq greater than `seq`, oldest first.
  func entries(after seq: UInt64, limit: Int) throws -> [SnapshotEntry] {
    var out: [SnapshotEntry] = []
    guard limit > 0, seq < UInt64.max else { return out }
    try bySeq.scan(from: seq + 1) { e in
      out.append(e)
      return out.count < limit
    }
    return out
  }

  /// The newest `limit` entries, oldest first.
  func newest(_ limit: Int) throws -> [SnapshotEntry] {
    var out: [SnapshotEntry] = []
    guard limit > 0 else { return out }
    try bySeq.scanBackward { e in
      out.append(e)
      return out.count < limit
    }
    return out.reversed()
  }

  func forEach(_ body: (SnapshotEntry) throws -> Void) throws {
    try bySeq.scan(from: 0) { e in
      try body(e)
      return true
    }
  }

  // MARK: Changes

  /// False when the name is taken; a seq that is taken means the index and the tree disagree.
  func add(_ e: SnapshotEntry) throws -> Bool {
    guard try byName.insert(NameIndexEntry(e)) else { return false }
    guard try bySeq.insert(e) else {
      throw StrataError(.corrupt, "the catalog's name index lacks the existing snapshot seq \(e.seq)")
    }
    count += 1
    isDirty = true
    bases?[e.baseCheckpoint, default: .empty].include(e.seq)
    return true
  }

  func remove(seq: UInt64) throws -> SnapshotEntry? {
    guard let e = try bySeq.remove(seq) else { return nil }
    guard try byName.remove(NameIndexEntry(e).key) != nil else {
      throw StrataError(.corrupt, "the catalog's name index lacks snapshot \"\(e.name)\" (seq \(seq))")
    }
    count -= 1
    isDirty = true
    if let range = bases?[e.baseCheckpoint] {
      if range.count == 1 {
        bases?[e.baseCheckpoint] = nil
      } else if seq == range.first || seq == range.last {
        // The snapshots of one base are consecutive by seq: rescan just them.
        var fresh = BaseRange.empty
        try bySeq.scan(from: range.first) { other in
          guard other.seq <= range.last else { return false }
          if other.baseCheckpoint == e.baseCheckpoint { fresh.include(other.seq) }
          return true
        }
        bases?[e.baseCheckpoint] = fresh
      } else {
        bases?[e.baseCheckpoint]?.count -= 1
      }
    }
    return e
  }

  // MARK: Base checkpoints

  /// The snapshots that replay from one base checkpoint: how many, and the first and last seq.
  struct BaseRange: Equatable {
    var count: Int
    var first: UInt64
    var last: UInt64

    static let empty = BaseRange(count: 0, first: .max, last: 0)

    mutating func include(_ seq: UInt64) {
      count += 1
      first = min(first, seq)
      last = max(last, seq)
    }
  }

  /// Kept up to date once built: the cleaner asks for it every pass, and building it reads the
  /// whole catalog.
  private var bases: [UInt64: BaseRange]?

  /// The base checkpoints the snapshots replay from (page → range), built on first use.
  func baseRanges() throws -> [UInt64: BaseRange] {
    if let bases { return bases }
    var built: [UInt64: BaseRange] = [:]
    try forEach { built[$0.baseCheckpoint, default: .empty].include($0.seq) }
    bases = built
    return built
  }

  /// Copies the stored nodes whose pages `moves` selects, to be written elsewhere at the next
  /// checkpoint (the cleaner). Returns how many nodes it copied.
  func relocate(where moves: (UInt64) -> Bool) throws -> Int {
    let copied = try bySeq.relocate(where: moves) + byName.relocate(where: moves)
    if copied > 0 { isDirty = true }
    return copied
  }

  /// Writes the changed nodes of both trees through `write` (kind, page bytes → reference) and
  /// returns what the checkpoint stores. An empty catalog is stored flat (no pages), so images
  /// without snapshots stay readable by version-1 readers.
  func write(_ write: (PageKind, [UInt8]) throws -> PageRef) throws -> (format: CatalogFormat, refs: [PageRef]) {
    guard isDirty else { return stored }
    let seqRoot = try bySeq.writeDirty { try write(.catalogSeqNode, $0) }
    let nameRoot = try byName.writeDirty { try write(.catalogNameNode, $0) }
    if let seqRoot, let nameRoot {
      stored = (.tree, [seqRoot, nameRoot])
    } else {
      precondition(seqRoot == nil && nameRoot == nil && count == 0, "catalog trees disagree")
      stored = (.flat, [])
    }
    isDirty = false
    return stored
  }

  /// True when writing would store trees (the image then needs the catalog-tree feature bit).
  var needsTreeFormat: Bool { isDirty ? count > 0 : stored.format == .tree }
}
