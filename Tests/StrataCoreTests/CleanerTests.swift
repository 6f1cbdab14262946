import StrataFormat
import StrataSimulation
import StrataSimulator
import Testing

@_spi(Simulation) @testable import StrataCore

#if canImport(Glibc)
  import Glibc
#endif

// The cleaner (`compact`): space comes back, nothing retained is lost, crashes at any step are
// harmless.

private let blockSize = 4096

/// A disk of `blocks` 4 KiB blocks and the bytes it should hold, written block by block.
private struct Disk {
  var blocks: [[UInt8]]
  var rng: SeededRandom

  init(blocks: Int, seed: UInt64) {
    self.blocks = Array(repeating: [UInt8](repeating: 0, count: blockSize), count: blocks)
    rng = SeededRandom(seed: seed)
  }

  /// Overwrites `count` random blocks with fresh random bytes.
  mutating func overwrite(_ image: StrataImage, count: Int) throws {
    for _ in 0..<count {
      let b = Int(rng.next() % UInt64(blocks.count))
      let fill = UInt8(truncatingIfNeeded: rng.next() | 1)
      var bytes = [UInt8](repeating: fill, count: blockSize)
      bytes[0] = UInt8(truncatingIfNeeded: b)
      bytes[1] = UInt8(truncatingIfNeeded: rng.next())
      blocks[b] = bytes
      try image.write(bytes, at: UInt64(b * blockSize))
    }
  }

  func verify(_ read: (UInt64, Int) throws -> [UInt8], _ what: String) throws {
    for (b, expected) in blocks.enumerated() {
      let got = try read(UInt64(b * blockSize), blockSize)
      #expect(got == expected, "\(what): block \(b)")
      if got != expected { return }
    }
  }
}

/// Opens the image at `path` again and expects `disk` and a clean check.
private func verifyReopened(_ path: String, _ disk: Disk, _ what: String) throws {
  let reopened = try StrataImage.open(path: path)
  defer { try? reopened.close() }
  try disk.verify({ try reopened.read(at: $0, count: $1) }, what)
  let check = try reopened.check()
  #expect(check.result == .clean, "\(what): \(check.errors) \(check.leaks)")
}

/// A new image of `blocks` 4 KiB blocks with 1 MiB segments, in a directory of its own.
private func makeImage(_ name: String, blocks: Int) throws -> (path: String, image: StrataImage) {
  let path = temporaryDirectory() + "/" + name
  return (path, try StrataImage.create(path: path, virtualSize: UInt64(blocks * blockSize), options: smallSegments()))
}

/// A 256-block image with a flush point (and the disk then), after which every block is
/// overwritten eight times, flushed every two.
private func flushPointThenOverwrites(_ name: String, seed: UInt64) throws -> (
  path: String, image: StrataImage, disk: Disk, point: TimelinePoint, atPoint: Disk
) {
  let (path, image) = try makeImage(name, blocks: 256)
  var disk = Disk(blocks: 256, seed: seed)
  try disk.overwrite(image, count: 512)
  try image.flush()
  let point = try #require(try image.timeline().last { $0.kind == .flush })
  let atPoint = disk
  for _ in 0..<4 {
    try disk.overwrite(image, count: 512)
    try image.flush()
  }
  return (path, image, disk, point, atPoint)
}

private func smallSegments() -> ImageOptions {
  var o = ImageOptions()
  o.segmentSize = Layout.minSegmentSize
  o.checkpointIntervalPages = 512
  return o
}

@Suite("Cleaner")
struct CleanerTests {
  /// Steady random overwrite with no snapshots: with a pass after each round the log stays
  /// within a small multiple of the live data, freed segments are reused, and the space
  /// beyond goes back to the file system.
  @Test func overwriteStaysBounded() throws {
    let path = temporaryDirectory() + "/c.strata"
    let blocks = 1024  // 4 MiB live
    let image = try StrataImage.create(path: path, virtualSize: UInt64(blocks * blockSize), options: smallSegments())
    var disk = Disk(blocks: blocks, seed: 1)
    try disk.overwrite(image, count: blocks)
    var punched: UInt64 = 0
    var freed = 0
    for _ in 0..<12 {
      try disk.overwrite(image, count: blocks)
      try image.flush()
      let report = try image.compact()
      punched += report.bytesPunched
      freed += report.segmentsFreed
      #expect(report.blocksCopied < blocks, "copied \(report.blocksCopied)")
    }
    let info = try image.info
    let live = UInt64(blocks * blockSize)
    let used = UInt64(info.segmentCount - image.usage.freeSegments.count) * UInt64(Layout.minSegmentSize)
    #expect(used <= 3 * live, "\(used) bytes of segments in use for \(live) live bytes")
    // Without cleaning, 13 rounds of 4 MiB would take 13 times the live data.
    #expect(info.segmentCount * Layout.minSegmentSize < 8 * Int(live), "\(info.segmentCount) segments")
    #expect(freed > 0 && punched > 0)
    #expect(image.superblock.features.incompatible & FeatureSet.segmentReuse != 0)
    try disk.verify({ try image.read(at: $0, count: $1) }, "head")
    #expect(try image.check().result == .clean)
    try image.close()

    let reopened = try StrataImage.open(path: path)
    try disk.verify({ try reopened.read(at: $0, count: $1) }, "reopened")
    #expect(try reopened.check().result == .clean)
    // The reused segments keep working across reopen: write, clean, reopen again.
    try disk.overwrite(reopened, count: blocks)
    _ = try reopened.compact()
    try reopened.close()
    let again = try StrataImage.open(path: path)
    try disk.verify({ try again.read(at: $0, count: $1) }, "reopened twice")
    let inspect = try again.inspect(recordLimit: 10)
    #expect(inspect.segments.contains { $0.state == "free" } || again.usage.freeSegments.isEmpty)
    #expect(try again.check().result == .clean)
    try again.close()
  }

  /// A snapshot keeps what it needs: its blocks stay readable through any number of passes,
  /// and deleting it lets the next pass free them.
  @Test func snapshotsPinTheirData() throws {
    let blocks = 512
    let (path, image) = try makeImage("s.strata", blocks: blocks)
    var disk = Disk(blocks: blocks, seed: 2)
    try disk.overwrite(image, count: 2 * blocks)
    let old = disk
    try image.createSnapshot(name: "before")
    for _ in 0..<6 {
      try disk.overwrite(image, count: blocks)
      try image.flush()
      let report = try image.compact()
      #expect(report.segmentsPinned > 0 || report.segmentsFreed > 0)
      let view = try image.snapshotView(name: "before")
      try old.verify({ try view.read(at: $0, count: $1) }, "snapshot")
      // Listed although the log around it was reclaimed.
      #expect(try image.timeline().contains { $0.name == "before" })
    }
    try disk.verify({ try image.read(at: $0, count: $1) }, "head")
    #expect(try image.check().result == .clean)
    let segmentsWithSnapshot = image.usage.segmentCount - image.usage.freeSegments.count
    try image.deleteSnapshot(name: "before")
    let report = try image.compact()
    #expect(report.segmentsFreed > 0)
    #expect(
      image.usage.segmentCount - image.usage.freeSegments.count < segmentsWithSnapshot,
      "deleting the snapshot freed nothing")
    try disk.verify({ try image.read(at: $0, count: $1) }, "head after delete")
    try image.close()
    try verifyReopened(path, disk, "reopened")
  }

  /// Points at or after `retainFromSeq` stay restorable; without it the next pass may drop
  /// them, and then asking for one fails clearly instead of returning other data.
  @Test func retainedWindowAndLogStart() throws {
    let (_, image, disk, point, atPoint) = try flushPointThenOverwrites("w.strata", seed: 3)
    var report = try image.compact(CompactOptions(retainFromSeq: point.seq))
    #expect(report.logStartSeq <= point.seq)
    try atPoint.verify({ try image.view(atSeq: point.seq).read(at: $0, count: $1) }, "retained point")
    #expect(try image.timeline().contains { $0.seq == point.seq })
    report = try image.compact()
    #expect(report.segmentsFreed > 0)
    #expect(report.logStartSeq > point.seq)
    #expect(try image.timeline().allSatisfy { $0.seq >= report.logStartSeq })
    #expect(throws: StrataError.self) { _ = try image.view(atSeq: point.seq).read(at: 0, count: blockSize) }
    try disk.verify({ try image.read(at: $0, count: $1) }, "head")
    #expect(try image.check().result == .clean)
    try image.close()
  }

  /// A RESTORE inside the window brings back data the head had dropped: a pass keeps it for the
  /// points after the RESTORE, whether the RESTORE was logged in this session (the image's
  /// index has it) or before the image was reopened (the pass reads that part of the log once
  /// and extends the index).
  @Test(arguments: [false, true])
  func restoresInTheWindowKeepWhatTheyBroughtBack(reopen: Bool) throws {
    let blocks = 256
    var (path, image, _, point, atPoint) = try flushPointThenOverwrites("r.strata", seed: 5)
    let beforeRestore = try #require(try image.timeline().last { $0.kind == .flush })
    try image.restore(toSeq: point.seq)
    var head = atPoint
    try head.overwrite(image, count: 1)
    try image.flush()
    let afterRestore = try #require(try image.timeline().last { $0.kind == .flush })
    let atAfterRestore = head
    let restoreSeq = try #require(image.restoreIndex.entries.last?.seq)
    #expect(restoreSeq >= beforeRestore.seq && restoreSeq < afterRestore.seq)
    try head.overwrite(image, count: blocks)
    try image.flush()
    if reopen {
      try image.close()
      image = try StrataImage.open(path: path, options: smallSegments())
      #expect(!image.restoreIndex.covers(restoreSeq))
    }
    let report = try image.compact(CompactOptions(retainFromSeq: beforeRestore.seq))
    #expect(report.segmentsFreed > 0)
    #expect(image.restoreIndex.covers(restoreSeq))
    #expect(image.restoreIndex.entries.map(\.seq) == [restoreSeq])
    try atAfterRestore.verify({ try image.view(atSeq: afterRestore.seq).read(at: $0, count: $1) }, "after the restore")
    try head.verify({ try image.read(at: $0, count: $1) }, "head")
    #expect(try image.check().result == .clean)
    try image.close()
    path = ""
  }

  /// A pass in steps while the disk keeps changing in between (as `strata serve` runs it):
  /// snapshots taken mid-pass and, with a window, every flush point made mid-pass stay exactly
  /// readable, although their trees reference segments the pass was emptying.
  @Test(arguments: [(false, false), (true, false), (false, true), (true, true)])
  func stepsInterleavedWithWritesAndSnapshots(window: Bool, shared: Bool) throws {
    let blocks = 512
    let (path, image) = try makeImage("i.strata", blocks: blocks)
    var disk = Disk(blocks: blocks, seed: window ? 8 : 7)
    // Enough rounds that the oldest segments hold nothing live: a snapshot or a window point
    // taken mid-pass pins what the head held then (victims not yet evacuated), not those.
    for _ in 0..<8 { try disk.overwrite(image, count: blocks) }
    try image.flush()
    let start = try #require(try image.timeline().last).seq
    // Shared: the background cleaner's way, walking the retained trees and reading the copied
    // blocks outside the lock.
    let sharedImage = SharedImage(image)
    let options = CompactOptions(retainFromSeq: window ? start : nil)
    let pass =
      shared
      ? try #require(try CleaningPass.start(shared: sharedImage, options: options) { _ in true })
      : try CleaningPass(image, options: options)
    var snapshots: [(String, Disk)] = []
    var points: [(UInt64, Disk)] = []
    var steps = 0
    while try shared ? pass.step(shared: sharedImage) : pass.step(image) {
      steps += 1
      try disk.overwrite(image, count: 24)
      try image.flush()
      if let p = try image.timeline().last(where: { $0.kind == .flush }) { points.append((p.seq, disk)) }
      if steps % 3 == 0 {
        try image.createSnapshot(name: "mid-\(steps)")
        snapshots.append(("mid-\(steps)", disk))
      }
    }
    #expect(pass.report.segmentsFreed > 0, "\(pass.report)")
    #expect(steps > 3)
    try disk.verify({ try image.read(at: $0, count: $1) }, "head")
    for (name, expected) in snapshots {
      let view = try image.snapshotView(name: name)
      try expected.verify({ try view.read(at: $0, count: $1) }, name)
    }
    if window {
      for (seq, expected) in points {
        let view = try image.view(atSeq: seq)
        try expected.verify({ try view.read(at: $0, count: $1) }, "point \(seq)")
      }
    }
    let check = try image.check()
    #expect(check.result == .clean, "\(check.errors)")
    // Another pass after the snapshots are gone frees what they held.
    for (name, _) in snapshots { try image.deleteSnapshot(name: name) }
    #expect(try image.compact().segmentsFreed > 0)
    try disk.verify({ try image.read(at: $0, count: $1) }, "head after the second pass")
    try image.close()
    try verifyReopened(path, disk, "reopened")
  }

  /// A freed segment waits for the reads planned before it was freed (a queue's reads run
  /// outside the image lock), and only for those.
  @Test func freedSegmentsWaitForOlderReads() {
    let reclaim = Reclaim()
    let queue = ReadEpochs()
    let other = ReadEpochs()
    reclaim.register(queue)
    reclaim.register(other)
    let early = queue.begin(reclaim.epoch)  // planned before the segment is freed
    reclaim.release([7])
    #expect(reclaim.takeReusable() == nil, "a read from before the release is in flight")
    let late = other.begin(reclaim.epoch)  // planned after: cannot target segment 7
    #expect(reclaim.takeReusable() == nil)
    queue.end(early)
    #expect(reclaim.takeReusable() == 7, "only the later read is in flight")
    reclaim.reusable.removeAll { $0 == 7 }
    // Reads spanning several epochs: the oldest one in flight counts.
    let a = queue.begin(reclaim.epoch)
    reclaim.release([3])
    let b = queue.begin(reclaim.epoch)
    reclaim.release([4])
    queue.end(b)
    #expect(reclaim.takeReusable() == nil, "the read planned before both releases is in flight")
    queue.end(a)
    other.end(late)
    #expect(reclaim.takeReusable() == 3)
    #expect(reclaim.reusable == [3, 4])
    queue.reset()
  }

  /// The cleaner's per-base summary of the catalog, built once and then kept up to date by
  /// every snapshot created and deleted, matches a fresh count at every step.
  @Test func snapshotBaseIndexFollowsTheCatalog() throws {
    let path = temporaryDirectory() + "/x.strata"
    let image = try StrataImage.create(path: path, virtualSize: 1 << 20, options: smallSegments())
    defer { try? image.close() }
    func fresh() throws -> [UInt64: Catalog.BaseRange] {
      var out: [UInt64: Catalog.BaseRange] = [:]
      try image.catalog.forEach { out[$0.baseCheckpoint, default: .empty].include($0.seq) }
      return out
    }
    var rng = SeededRandom(seed: 9)
    var names: [String] = []
    for i in 0..<40 {
      if i % 7 == 0 { try image.checkpoint() }
      try image.createSnapshot(name: "s\(i)")
      names.append("s\(i)")
      if i == 10 { #expect(try image.catalog.baseRanges() == (try fresh())) }
    }
    for round in 0..<30 {
      if rng.next() % 3 == 0 {
        try image.createSnapshot(name: "n\(round)")
        names.append("n\(round)")
      } else if !names.isEmpty {
        try image.deleteSnapshot(name: names.remove(at: Int(rng.next() % UInt64(names.count))))
      }
      #expect(try image.catalog.baseRanges() == (try fresh()))
    }
  }

  /// `check` walks the log from its start: a damaged record before the last checkpoint (which
  /// recovery never reads) breaks the points after it, and check says so.
  @Test func checkFindsABreakInTheLog() throws {
    let blocks = 1024
    let (path, image) = try makeImage("b.strata", blocks: blocks)
    var disk = Disk(blocks: blocks, seed: 6)
    try disk.overwrite(image, count: 2 * blocks)
    try image.flush()
    let before = try image.check()
    #expect(before.result == .clean && before.checkedLogRecords > 10, "\(before.checkedLogRecords) records")
    let records = try image.inspect(recordLimit: 100_000).records
    let checkpointSeq = try image.info.checkpointSeq
    let victim = try #require(records.filter { $0.seq < checkpointSeq }.dropFirst(records.count / 4).first)
    try image.close()

    let fd = open(path, O_RDWR)
    #expect(fd >= 0)
    var byte: UInt8 = 0
    #expect(pread(fd, &byte, 1, off_t(victim.fileOffset + 20)) == 1)
    byte ^= 0xFF
    #expect(pwrite(fd, &byte, 1, off_t(victim.fileOffset + 20)) == 1)
    close(fd)
    var readOnly = ImageOptions()
    readOnly.readOnly = true
    let reopened = try StrataImage.open(path: path, options: readOnly)
    try disk.verify({ try reopened.read(at: $0, count: $1) }, "head")
    let report = try reopened.check()
    #expect(report.errors.contains { $0.contains("the log breaks") }, "\(report.errors)")
    try reopened.close()
  }

  /// A power failure at any write or sync of a pass: the image opens with every flushed block,
  /// every snapshot intact and `check` clean, and a later pass finishes the job.
  @Test func crashAtEveryStepOfAPass() throws {
    let options = stressOptions(clock: SimulatedClock())
    let base = SimulatedStorage(seed: 5)
    let blocks = 256
    let image = try StrataImage.create(storage: base, virtualSize: UInt64(blocks * blockSize), options: options)
    var disk = Disk(blocks: blocks, seed: 5)
    try disk.overwrite(image, count: blocks)
    try image.createSnapshot(name: "s")
    let atSnapshot = disk
    for _ in 0..<4 { try disk.overwrite(image, count: blocks) }
    try image.flush()
    image.abandon()
    _ = base.crash(mode: .dropUnsynced)

    var step = 0
    var completed = false
    while !completed {
      for mode in [SimulatedStorage.CrashMode.dropUnsynced, .randomSubset, .tornPrefix(granularity: 512)] {
        let storage = base.clone(seed: UInt64(step))
        let img = try StrataImage.open(storage: storage, options: options)
        storage.powerFail(after: step)
        do {
          _ = try img.compact()
          completed = true
        } catch {}
        img.abandon()
        _ = storage.crash(mode: mode)
        let reopened = try StrataImage.open(storage: storage, options: options)
        try disk.verify({ try reopened.read(at: $0, count: $1) }, "head after a crash at step \(step) (\(mode))")
        let view = try reopened.snapshotView(name: "s")
        try atSnapshot.verify({ try view.read(at: $0, count: $1) }, "snapshot after a crash at step \(step)")
        let check = try reopened.check()
        #expect(check.result == .clean, "step \(step) \(mode): \(check.errors) \(check.leaks)")
        // The pass can be run again to the end.
        let report = try reopened.compact()
        #expect(report.segmentsPinned >= 0)
        try disk.verify({ try reopened.read(at: $0, count: $1) }, "head after the next pass (step \(step))")
        reopened.abandon()
      }
      step += 1
    }
    #expect(step > 5, "the pass wrote only \(step) times")
  }
}
