import StrataFormat

/// The named snapshots, ordered by sequence number, with a name index.
///
/// Format version 1 keeps the whole catalog in memory and rewrites its pages at a checkpoint
/// when it changed; millions of snapshots want a paged tree (a later, feature-flagged format).
struct Catalog {
  private(set) var entries: [SnapshotEntry] = []
  /// Keyed by the name's UTF-8 bytes: names are equal when their bytes are (format-spec), not
  /// when Swift's `String` would call them canonically equivalent.
  private var byName: [[UInt8]: UInt64] = [:]

  init(entries: [SnapshotEntry] = []) {
    for e in entries { add(e) }
  }

  var count: Int { entries.count }

  func entry(named name: String) -> SnapshotEntry? {
    guard let seq = byName[Array(name.utf8)] else { return nil }
    return entry(seq: seq)
  }

  func entry(seq: UInt64) -> SnapshotEntry? {
    let i = lowerBound(seq)
    return i < entries.count && entries[i].seq == seq ? entries[i] : nil
  }

  /// False when the name is taken or the seq is not newer than every entry.
  @discardableResult
  mutating func add(_ e: SnapshotEntry) -> Bool {
    guard byName[Array(e.name.utf8)] == nil, entries.last.map({ $0.seq < e.seq }) ?? true else { return false }
    entries.append(e)
    byName[Array(e.name.utf8)] = e.seq
    return true
  }

  @discardableResult
  mutating func remove(seq: UInt64) -> SnapshotEntry? {
    let i = lowerBound(seq)
    guard i < entries.count, entries[i].seq == seq else { return nil }
    let e = entries.remove(at: i)
    byName[Array(e.name.utf8)] = nil
    return e
  }

  private func lowerBound(_ seq: UInt64) -> Int {
    var lo = 0
    var hi = entries.count
    while lo < hi {
      let mid = (lo + hi) / 2
      if entries[mid].seq < seq { lo = mid + 1 } else { hi = mid }
    }
    return lo
  }
}
