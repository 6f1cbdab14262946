import StrataFormat
import StrataSimulation
import Testing

@testable import StrataCore

#if canImport(Glibc)
  import Glibc
#endif

// The paged snapshot catalog: a seq tree and a name index read on demand through bounded
// caches, checked against a plain model; opening does not load it; group commit shares syncs
// across threads and loses nothing it acknowledged.

/// Tiny caches and dirty limits, so trees grow several levels, nodes are evicted and reread,
/// and checkpoints write partial trees all the time.
func catalogStressOptions(clock: SimulatedClock) -> ImageOptions {
  var o = stressOptions(clock: clock)
  o.catalogCacheNodes = 16
  o.maxDirtyCatalogNodes = 24
  return o
}

/// A random valid snapshot name; long names make few entries per leaf (deeper trees sooner).
func randomSnapshotName(_ rng: inout SeededRandom, _ i: Int) -> String {
  let pad = String(repeating: "x", count: rng.int(in: 0...(rng.chance(0.3) ? 230 : 20)))
  return "s\(i)-\(pad)"
}

@Suite("Snapshot catalog") struct CatalogTests {
  @Test(arguments: testSeeds([1, 2, 3, 4]))
  func catalogMatchesModel(seed: UInt64) throws {
    let log = RunLog("catalog model", seed: seed)
    var rng = SeededRandom(seed: seed)
    let options = catalogStressOptions(clock: SimulatedClock())
    let storage = SimulatedStorage(seed: seed)
    var image = try StrataImage.create(storage: storage, virtualSize: 1 << 20, options: options)
    defer { image.abandon() }
    var model: [(seq: UInt64, name: String)] = []  // ordered by seq
    var created = 0
    for step in 0..<3000 {
      switch rng.int(in: 0..<100) {
      case 0..<55:
        let name = randomSnapshotName(&rng, created)
        created += 1
        let info = try log.run("create \(name)") { try image.createSnapshot(name: name) }
        try log.check(model.last.map { $0.seq < info.seq } ?? true, "seq \(info.seq) is not the newest")
        model.append((info.seq, name))
      case 55..<75:
        guard let victim = rng.element(of: model) else { continue }
        log.note("delete \(victim.name)")
        try image.deleteSnapshot(name: victim.name)
        model.removeAll { $0.seq == victim.seq }
      case 75..<85:
        let probe = rng.chance(0.5) ? rng.element(of: model)?.name ?? "none" : "missing-\(step)"
        let expected = model.first { $0.name == probe }
        do {
          let got = try image.snapshot(named: probe)
          try log.check(
            expected?.seq == got.seq, "lookup \(probe) found seq \(got.seq), expected \(String(describing: expected))")
        } catch let e as StrataError where e.code == .notFound {
          try log.check(expected == nil, "lookup \(probe) found nothing, expected seq \(expected?.seq ?? 0)")
        }
        if let e = rng.element(of: model) {
          try log.check(try image.snapshot(seq: e.seq)?.name == e.name, "lookup of seq \(e.seq)")
        }
        try log.check(try image.snapshot(seq: 0) == nil, "seq 0 names no snapshot")
      case 85..<93:
        let cursor = rng.element(of: model)?.seq ?? 0
        let limit = rng.int(in: 0...40)
        let got = try image.snapshots(after: cursor, limit: limit).map(\.seq)
        let want = model.filter { $0.seq > cursor }.prefix(limit).map(\.seq)
        try log.check(got == Array(want), "list after \(cursor) limit \(limit): \(got) != \(want)")
        let newest = try image.newestSnapshots(limit).map(\.seq)
        try log.check(newest == Array(model.suffix(limit).map(\.seq)), "newest \(limit)")
      case 93..<97:
        log.note("flush")
        try image.flush()
      default:
        log.note("close and reopen")
        try image.close()
        storage.reopen()
        image = try StrataImage.open(storage: storage, options: options)
      }
    }
    try log.check(try image.snapshots.map(\.seq) == model.map(\.seq), "the full listing differs from the model")
    try log.check(try image.info.snapshotCount == model.count, "info counts the wrong number of snapshots")
    let report = try image.check()
    try log.check(report.result == .clean, "check: \(report.errors) \(report.leaks)")
    try log.check(report.checkedCatalogNodes > 0, "check walked no catalog node")
    try image.close()
  }

  /// With 100,000 snapshots, opening reads the two roots and nothing else; a lookup and a short
  /// listing read a path or two; the caches stay within their capacity.
  @Test func manySnapshotsOpenWithoutLoadingTheCatalog() throws {
    var options = ImageOptions()
    options.clock = SimulatedClock().function
    options.catalogCacheNodes = 64
    let storage = SimulatedStorage(seed: 7)
    let count = 100_000
    do {
      let image = try StrataImage.create(storage: storage, virtualSize: 1 << 20, options: options)
      for i in 0..<count { try image.createSnapshot(name: "snap-\(i)") }
      try image.close()
    }
    storage.reopen()
    let image = try StrataImage.open(storage: storage, options: options)
    defer { try? image.close() }
    #expect(image.catalogPagesRead == 2)
    #expect(try image.info.snapshotCount == count)
    var levels = 0
    try image.catalog.bySeq.forEachNode { node, _ in levels = max(levels, node.level + 1) }
    #expect(levels >= 3, "100,000 entries should need a tree of 3 levels or more")
    let before = image.catalogPagesRead
    #expect(try image.snapshot(named: "snap-54321").seq > 0)
    #expect(try image.newestSnapshots(10).map(\.name) == (count - 10..<count).map { "snap-\($0)" })
    #expect(try image.snapshots(after: 0, limit: 5).map(\.name) == (0..<5).map { "snap-\($0)" })
    #expect(image.catalogPagesRead - before <= 6 * levels, "a lookup and two listings read a few paths only")
    #expect(image.catalog.cachedNodes <= 2 * options.catalogCacheNodes)
    // Creating one more snapshot and checkpointing rewrites a path per tree, not the trees.
    let seq = try image.createSnapshot(name: "one-more").seq
    #expect(image.catalog.dirtyNodes <= 2 * levels + 2)
    try image.flush()
    #expect(try image.snapshot(seq: seq)?.name == "one-more")
  }

  /// `check` finds a name index that disagrees with the seq tree, and a lookup through a
  /// stale index entry reports corruption instead of returning another snapshot.
  @Test func checkFindsAMismatchedNameIndex() throws {
    let storage = SimulatedStorage(seed: 3)
    let image = try StrataImage.create(storage: storage, virtualSize: 1 << 20)
    defer { image.abandon() }
    let a = try image.createSnapshot(name: "a")
    _ = try image.createSnapshot(name: "b")
    #expect(try image.catalog.byName.remove(SnapshotName("b")) != nil)
    #expect(try image.catalog.byName.insert(NameIndexEntry(name: SnapshotName("c"), seq: a.seq)))
    #expect(try image.snapshot(named: "a").seq == a.seq)
    #expect(throws: StrataError.self) { try image.snapshot(named: "b") }
    #expect(throws: StrataError.self) { try image.snapshot(named: "c") }
    #expect(try image.check().errors.contains { $0.contains("name index") })
  }

  /// The catalog-tree bit is set only once a tree is written: images without snapshots stay
  /// readable by version-1 readers.
  @Test func featureBitIsSetWithTheFirstTree() throws {
    let storage = SimulatedStorage(seed: 5)
    let image = try StrataImage.create(storage: storage, virtualSize: 1 << 20)
    #expect(image.superblock.features.incompatible == 0, "an image without snapshots needs no feature")
    for i in 0..<300 { try image.createSnapshot(name: "s-\(i)") }
    try image.checkpoint()
    #expect(image.superblock.features.incompatible == FeatureSet.catalogTree)
    try image.close()
    storage.reopen()
    let reopened = try StrataImage.open(storage: storage)
    defer { try? reopened.close() }
    #expect(try reopened.snapshots.count == 300)
    #expect(try reopened.check().result == .clean)
  }

  /// A flat catalog (images written before the tree) loads into the trees, marked dirty so that
  /// the next checkpoint stores it as a tree.
  @Test func flatCatalogsLoadIntoTheTrees() throws {
    let storage = SimulatedStorage(seed: 6)
    let image = try StrataImage.create(storage: storage, virtualSize: 1 << 20)
    defer { image.abandon() }
    let entries = (0..<300).map {
      SnapshotEntry(seq: UInt64(10 + 2 * $0), timestampNanoseconds: 1, baseCheckpoint: 258, name: "old-\($0)")
    }
    let first = try storage.size() / UInt64(Layout.pageSize) + 16
    var refs: [PageRef] = []
    for (i, page) in SnapshotEntry.encodePages(entries).enumerated() {
      let at = first + UInt64(i)
      try page.withUnsafeBytes { try storage.write($0, at: at * UInt64(Layout.pageSize)) }
      let checksum = page.withUnsafeBytes { pageChecksum(kind: .catalog, level: 0, key: UInt64(i), $0) }
      refs.append(PageRef(page: at, checksum: checksum))
    }
    #expect(refs.count > 1)
    let body = CheckpointBody(
      virtualSize: 1 << 20, blockSize: 4096, mapDepth: 1, root: .unallocated, dataBlocks: 0, previousCheckpoint: 0,
      segmentCount: 1, snapshotCount: 300, usagePages: [], catalogPages: refs)
    let catalog = try Catalog(pages: image.pages, checkpoint: body)
    #expect(catalog.count == 300 && catalog.isDirty && catalog.needsTreeFormat)
    #expect(try catalog.entry(named: "old-123")?.seq == 256)
    #expect(try catalog.entries(after: 0, limit: .max) == entries)
    var wrongCount = body
    wrongCount.snapshotCount = 299
    #expect(throws: StrataError.self) { _ = try Catalog(pages: image.pages, checkpoint: wrongCount) }
  }
}

@Suite("Snapshot catalog crashes") struct CatalogCrashTests {
  /// Many snapshots with long names (trees of several levels, checkpoints writing parts of
  /// them all the time), deletions, flushes at random; then a crash in every mode. Snapshots
  /// present at the last flush survive, deleted ones stay deleted, and `check` is clean.
  @Test(arguments: testSeeds([1, 2, 3]))
  func flushedCatalogSurvivesCrashes(seed: UInt64) throws {
    for (round, mode) in SimulatedStorage.CrashMode.all.enumerated() {
      var rng = SeededRandom(seed: seed &* 100 &+ UInt64(round))
      let options = catalogStressOptions(clock: SimulatedClock())
      let storage = SimulatedStorage(seed: rng.next())
      let image = try StrataImage.create(storage: storage, virtualSize: 1 << 20, options: options)
      defer { image.abandon() }
      var live: [String] = []
      var flushed = Set<String>()
      var touched = Set<String>()  // created or deleted since the last flush
      var created = 0
      for _ in 0..<rng.int(in: 200...900) {
        if rng.chance(0.25), let victim = rng.element(of: live) {
          try image.deleteSnapshot(name: victim)
          live.removeAll { $0 == victim }
          touched.insert(victim)
        } else {
          let name = randomSnapshotName(&rng, created)
          created += 1
          try image.createSnapshot(name: name)
          live.append(name)
          touched.insert(name)
        }
        if rng.chance(0.05) {
          try image.flush()
          flushed = Set(live)
          touched = []
        }
      }
      storage.crash(mode: mode)
      image.abandon()
      let reopened = try StrataImage.open(storage: storage, options: options)
      defer { try? reopened.close() }
      let names = Set(try reopened.snapshots.map(\.name))
      // What changed after the last flush may or may not have survived; nothing else may differ.
      #expect(names.symmetricDifference(flushed).isSubset(of: touched), "seed \(seed), \(mode)")
      for name in names.prefix(20) { #expect(try reopened.snapshot(named: name).name == name) }
      #expect(try reopened.check().result == .clean, "seed \(seed), \(mode)")
    }
  }
}

@Suite("Group commit") struct GroupCommitTests {
  /// Threads create snapshots and wait until each is durable; power fails after a random
  /// number of storage operations. Every snapshot whose wait returned exists after the crash.
  @Test(arguments: testSeeds([1, 2, 3, 4, 5, 6]))
  func durableSnapshotsSurviveACrash(seed: UInt64) throws {
    var rng = SeededRandom(seed: seed)
    let options = catalogStressOptions(clock: SimulatedClock())
    let storage = SimulatedStorage(seed: seed)
    let image = try StrataImage.create(storage: storage, virtualSize: 1 << 20, options: options)
    defer { image.abandon() }
    let shared = SharedImage(image)
    storage.powerFail(after: rng.int(in: 20...400))
    let acknowledged = Acknowledged()
    runThreads(8) { client in
      for i in 0..<60 {
        let name = "c\(client)-\(i)"
        do {
          try shared.durably { _ = try $0.createSnapshot(name: name) }
        } catch {
          return
        }
        acknowledged.add(name)
      }
    }
    let mode = SimulatedStorage.CrashMode.all[Int(seed) % SimulatedStorage.CrashMode.all.count]
    storage.crash(mode: mode)
    image.abandon()
    let reopened = try StrataImage.open(storage: storage, options: options)
    defer { try? reopened.close() }
    let names = Set(try reopened.snapshots.map(\.name))
    let lost = acknowledged.names.subtracting(names)
    #expect(lost.isEmpty, "acknowledged snapshots lost after \(mode): \(lost.sorted().prefix(10))")
    #expect(try reopened.check().result == .clean)
  }

  /// On a real file the leader syncs outside the image lock while other threads append.
  @Test func threadsShareSyncsOnAFile() throws {
    let dir = temporaryDirectory()
    let path = dir + "/group.strata"
    defer {
      unlink(path)
      rmdir(dir)
    }
    let image = try StrataImage.create(path: path, virtualSize: 1 << 20)
    let shared = SharedImage(image)
    runThreads(8) { client in
      for i in 0..<50 { _ = try? shared.durably { try $0.createSnapshot(name: "t\(client)-\(i)") } }
    }
    #expect(image.writer?.durableSeq ?? 0 >= shared.appendedSeq)
    try image.close()
    let reopened = try StrataImage.open(path: path)
    defer { try? reopened.close() }
    #expect(try reopened.snapshots.count == 400)
  }
}

/// Names whose durable wait returned, from any thread.
final class Acknowledged: @unchecked Sendable {
  private let mutex = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)
  private var stored = Set<String>()
  init() { pthread_mutex_init(mutex, nil) }
  deinit {
    pthread_mutex_destroy(mutex)
    mutex.deallocate()
  }
  func add(_ name: String) {
    pthread_mutex_lock(mutex)
    stored.insert(name)
    pthread_mutex_unlock(mutex)
  }
  var names: Set<String> {
    pthread_mutex_lock(mutex)
    defer { pthread_mutex_unlock(mutex) }
    return stored
  }
}
