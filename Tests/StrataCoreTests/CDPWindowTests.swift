import StrataFormat
import StrataSimulation
import Testing

@_spi(Simulation) @testable import StrataCore

#if canImport(Glibc)
  import Glibc
#endif

/// A clock the test sets: every reading returns `now`.
private final class ManualClock: @unchecked Sendable {
  var now: UInt64 = 1_800_000_000_000_000_000
  func advance(seconds: UInt64) { now += seconds * 1_000_000_000 }
}

private func cdpOptions(_ clock: ManualClock, window: CDPWindow? = nil) -> ImageOptions {
  var o = ImageOptions()
  o.clock = { clock.now }
  o.cdpWindow = window
  // Checkpoints only where the tests take them.
  o.maxDirtyNodes = 1 << 20
  o.checkpointIntervalPages = 1 << 30
  return o
}

/// The superblock in use, read from the file (the slot with the higher generation).
private func superblockOnDisk(_ path: String) throws -> Superblock {
  let fd = Glibc.open(path, O_RDONLY)
  try #require(fd >= 0)
  defer { Glibc.close(fd) }
  var bytes = [UInt8](repeating: 0, count: 8192)
  let got = bytes.withUnsafeMutableBytes { pread(fd, $0.baseAddress, 8192, 0) }
  try #require(got == 8192)
  let slots = try [0, 4096].map { offset in
    try Array(bytes[offset..<(offset + 4096)]).withUnsafeBytes { try Superblock.decode($0) }
  }
  return try #require(slots.max { $0.generation < $1.generation })
}

private func headerLengthOnDisk(_ path: String, slot: Int) throws -> UInt32 {
  let fd = Glibc.open(path, O_RDONLY)
  try #require(fd >= 0)
  defer { Glibc.close(fd) }
  var value: UInt32 = 0
  _ = withUnsafeMutableBytes(of: &value) { pread(fd, $0.baseAddress, 4, off_t(slot * 4096 + 12)) }
  return UInt32(littleEndian: value)
}

@Test func cdpWindowIsPersistedAndSurvivesCheckpoints() throws {
  let path = temporaryDirectory() + "/w.strata"
  let clock = ManualClock()
  let hour = CDPWindow.duration(nanoseconds: 3_600_000_000_000)
  var img = try StrataImage.create(
    path: path, virtualSize: 1 << 20, options: cdpOptions(clock, window: hour), overwrite: true)
  #expect(img.cdpWindow == hour)
  #expect(try img.info.cdpWindow == hour)
  // Both slots carry the extension from creation on.
  #expect(try headerLengthOnDisk(path, slot: 0) == 144 && headerLengthOnDisk(path, slot: 1) == 144)
  #expect(try superblockOnDisk(path).cdpWindow == hour)
  try img.write([UInt8](repeating: 7, count: 4096), at: 0)
  try img.close()

  img = try StrataImage.open(path: path, options: cdpOptions(clock))
  #expect(img.cdpWindow == hour)
  // Durable as soon as it returns: the superblock on disk says so before any checkpoint.
  let size = CDPWindow.size(bytes: 10 << 30)
  try img.setCDPWindow(size)
  #expect(img.cdpWindow == size)
  #expect(try superblockOnDisk(path).cdpWindow == size)
  #expect(img.superblock.features.autoclear == FeatureSet.cdpWindow)
  // Checkpoints rewrite the superblock and keep the window.
  for i in 0..<3 {
    try img.write([UInt8](repeating: UInt8(i), count: 4096), at: UInt64(i) * 4096)
    try img.checkpoint()
    #expect(try superblockOnDisk(path).cdpWindow == size)
  }
  #expect(throws: StrataError.self) { try img.setCDPWindow(.duration(nanoseconds: 0)) }
  #expect(throws: StrataError.self) { try img.setCDPWindow(.size(bytes: 0)) }
  #expect(img.cdpWindow == size, "a refused window changes nothing")
  try img.close()

  img = try StrataImage.open(
    path: path,
    options: {
      var o = cdpOptions(clock); o.readOnly = true; return o
    }())
  #expect(img.cdpWindow == size)
  #expect(throws: StrataError.self) { try img.setCDPWindow(nil) }
  try img.close()

  // Removed: the superblock goes back to the 128 bytes of an image that never had a window.
  img = try StrataImage.open(path: path, options: cdpOptions(clock))
  try img.setCDPWindow(nil)
  #expect(img.cdpWindow == nil)
  #expect(try img.cdpRetainedSeq(nowNanoseconds: clock.now) == nil)
  try img.checkpoint()  // both slots rewritten since the removal
  try img.close()
  #expect(try headerLengthOnDisk(path, slot: 0) == 128 && headerLengthOnDisk(path, slot: 1) == 128)
  img = try StrataImage.open(path: path, options: cdpOptions(clock))
  #expect(img.cdpWindow == nil)
  #expect(img.superblock.features.autoclear == 0)
  try img.close()

  var bad = cdpOptions(clock)
  bad.cdpWindow = .duration(nanoseconds: 0)
  #expect(throws: StrataError.self) {
    try StrataImage.create(path: temporaryDirectory() + "/bad.strata", virtualSize: 1 << 20, options: bad)
  }
}

@Test func imagesWithoutAWindowKeepTheVersion1Superblock() throws {
  let path = temporaryDirectory() + "/plain.strata"
  let clock = ManualClock()
  let img = try StrataImage.create(path: path, virtualSize: 1 << 20, options: cdpOptions(clock), overwrite: true)
  #expect(img.cdpWindow == nil)
  #expect(try img.cdpRetainedSeq(nowNanoseconds: clock.now) == nil)
  try img.close()
  #expect(try headerLengthOnDisk(path, slot: 0) == 128 && headerLengthOnDisk(path, slot: 1) == 128)
}

/// The definition of a duration window, straight from the whole timeline.
private func expectedDurationSeq(_ points: [TimelinePoint], cutoff: UInt64, head: UInt64) -> UInt64 {
  points.last { $0.timestampNanoseconds <= cutoff }?.seq ?? points.first?.seq ?? head
}

@Test func cdpRetainedSeqForADurationWindow() throws {
  let path = temporaryDirectory() + "/d.strata"
  let clock = ManualClock()
  let start = clock.now
  var img = try StrataImage.create(
    path: path, virtualSize: 1 << 20, options: cdpOptions(clock, window: .duration(nanoseconds: 1)), overwrite: true)
  defer { if !img.isClosed { try? img.close() } }
  // A flush every 10 s, a checkpoint every 7 flushes, a snapshot now and then, a reopen.
  for step in 0..<60 {
    clock.advance(seconds: 10)
    try img.write([UInt8](repeating: UInt8(step), count: 4096), at: UInt64(step % 16) * 4096)
    if step % 11 == 5 { try img.createSnapshot(name: "s\(step)") }
    try img.flush()
    if step % 7 == 6 { try img.checkpoint() }
    if step == 30 {
      try img.close()
      img = try StrataImage.open(path: path, options: cdpOptions(clock))
    }
  }
  let end = clock.now
  clock.advance(seconds: 5)
  try img.write([UInt8](repeating: 0xEE, count: 4096), at: 0)  // unflushed: no point
  let points = try img.timeline()
  let head = try img.info.nextSeq
  #expect(points.count > 70)
  #expect(points.contains { $0.kind == .snapshot } && points.contains { $0.kind == .checkpoint })
  // `since` a point lists it first, whatever its kind.
  for point in points {
    #expect(try img.timeline(since: point.seq, limit: 1).first?.seq == point.seq, "\(point.kind) \(point.seq)")
  }

  // Every window length from nothing to longer than the image's life, at several instants.
  for now in [end, end + 5_000_000_000, end + 3_600_000_000_000] {
    for seconds in stride(from: 1 as UInt64, through: 700, by: 3) {
      try img.setCDPWindow(.duration(nanoseconds: seconds * 1_000_000_000))
      let cutoff = now >= seconds * 1_000_000_000 ? now - seconds * 1_000_000_000 : 0
      let got = try img.cdpRetainedSeq(nowNanoseconds: now)
      #expect(got == expectedDurationSeq(points, cutoff: cutoff, head: head), "window \(seconds) s at \(now - start)")
    }
  }
  // By hand: a 25 s window at the time of the 40th flush keeps the flush of 30 s earlier (the
  // disk as it was 25 s ago) and everything after it.
  try img.setCDPWindow(.duration(nanoseconds: 25_000_000_000))
  let flush40 = try #require(points.first { $0.kind == .flush && $0.timestampNanoseconds == start + 400_000_000_000 })
  let flush37 = try #require(points.first { $0.kind == .flush && $0.timestampNanoseconds == start + 370_000_000_000 })
  let kept = try #require(try img.cdpRetainedSeq(nowNanoseconds: flush40.timestampNanoseconds))
  #expect(kept <= flush37.seq)
  #expect(!points.contains { $0.seq >= kept && $0.timestampNanoseconds < flush37.timestampNanoseconds })
  // A window longer than the image's life keeps everything; the image's clock is the default.
  try img.setCDPWindow(.duration(nanoseconds: .max))
  #expect(try img.cdpRetainedSeq() == points.first?.seq)
  #expect(try img.cdpRetainedSeq(nowNanoseconds: 0) == points.first?.seq)
  try img.close()
}

@Test func cdpRetainedSeqForASizeWindow() throws {
  let path = temporaryDirectory() + "/s.strata"
  let clock = ManualClock()
  let img = try StrataImage.create(
    path: path, virtualSize: 4 << 20, options: cdpOptions(clock, window: .size(bytes: 1)), overwrite: true)
  defer { if !img.isClosed { try? img.close() } }
  // Each point and where the log ended when it was made; one segment, so the log is contiguous
  // and the log after a point is the distance to the end.
  var marks: [(seq: UInt64, position: UInt64)] = []
  func mark() throws {
    let writer = try #require(img.writer)
    marks.append((writer.nextSeq, writer.position))
  }
  try mark()  // the genesis checkpoint
  for step in 0..<80 {
    clock.advance(seconds: 1)
    let blocks = 1 + step % 3
    try img.write([UInt8](repeating: UInt8(step), count: blocks * 4096), at: UInt64(step % 100) * 4096)
    try img.flush()
    try mark()
    if step % 9 == 8 {
      try img.checkpoint()
      try mark()
    }
  }
  let end = try #require(img.writer).position
  #expect(img.usage.segmentCount == 1, "the test needs a contiguous log")
  let points = try img.timeline()
  #expect(Set(points.map(\.seq)) == Set(marks.map(\.seq)), "every point is marked")
  let head = try img.info.nextSeq
  for budget in 0...(end - marks[0].position + 2) {
    for extra: UInt64 in [0, 4095] where budget + extra > 0 {
      try img.setCDPWindow(.size(bytes: budget * 4096 + extra))
      let expected = marks.filter { end - $0.position <= budget }.map(\.seq).min() ?? head
      #expect(try img.cdpRetainedSeq(nowNanoseconds: clock.now) == expected, "budget \(budget) pages + \(extra)")
    }
  }
  try img.close()
}

/// Power fails while the window changes: the image opens with the old window or the new one,
/// never without a usable superblock; once `setCDPWindow` returned, the new one survives.
@Test(arguments: [1, 2, 3, 4, 5, 6, 7, 8] as [UInt64])
func cdpWindowChangeSurvivesPowerLoss(seed: UInt64) throws {
  let storage = SimulatedStorage(seed: seed)
  var options = ImageOptions()
  options.clock = SimulatedClock().function
  let old = CDPWindow.duration(nanoseconds: 3_600_000_000_000)
  let new = CDPWindow.size(bytes: 1 << 30)
  options.cdpWindow = old
  var image = try StrataImage.create(storage: storage, virtualSize: 1 << 20, options: options)
  try image.write([UInt8](repeating: 1, count: 4096), at: 0)
  try image.flush()
  // The superblock write lands (whole or torn), the sync does not.
  storage.powerFail(after: 1, counting: [.write])
  #expect(throws: StrataError.self) { try image.setCDPWindow(new) }
  #expect(image.cdpWindow == old, "a failed change is not taken")
  storage.crash(mode: seed % 2 == 0 ? .tornPrefix(granularity: 1) : .randomSectors(sectorSize: 512))
  image.abandon()
  image = try StrataImage.open(storage: storage, options: options)
  #expect(image.cdpWindow == old || image.cdpWindow == new, "\(String(describing: image.cdpWindow))")
  #expect(try image.read(at: 0, count: 4096) == [UInt8](repeating: 1, count: 4096))

  try image.setCDPWindow(new)
  storage.crash(mode: .dropUnsynced)
  image.abandon()
  image = try StrataImage.open(storage: storage, options: options)
  #expect(image.cdpWindow == new)
  try image.close()
}

/// The cleaner keeps every point the window protects and reclaims what lies before it; with
/// the window removed, the next pass reclaims those points too.
@Test func compactKeepsThePointsOfTheWindow() throws {
  let path = temporaryDirectory() + "/c.strata"
  let clock = ManualClock()
  var options = ImageOptions()
  options.clock = { clock.now }
  options.segmentSize = Layout.minSegmentSize
  options.checkpointIntervalPages = 512
  options.cdpWindow = .duration(nanoseconds: 35_000_000_000)
  let blocks = 256
  let image = try StrataImage.create(path: path, virtualSize: UInt64(blocks * 4096), options: options)
  defer { if !image.isClosed { try? image.close() } }
  var disk = [UInt8](repeating: 0, count: blocks * 4096)
  var states: [(seq: UInt64, time: UInt64, disk: [UInt8])] = []
  var random = SeededRandom(seed: 9)
  for round in 0..<12 {
    clock.advance(seconds: 10)
    for _ in 0..<(2 * blocks) {
      let b = Int.random(in: 0..<blocks, using: &random)
      let bytes = [UInt8](repeating: UInt8(truncatingIfNeeded: round &* 31 &+ b | 1), count: 4096)
      disk.replaceSubrange((b * 4096)..<((b + 1) * 4096), with: bytes)
      try image.write(bytes, at: UInt64(b * 4096))
    }
    try image.flush()
    states.append((try image.info.nextSeq, clock.now, disk))
  }
  let retained = try #require(try image.cdpRetainedSeq())
  // 35 s back from the last flush: the flush of 40 s ago is the disk when the window begins.
  let boundary = try #require(states.last { $0.time <= clock.now - 35_000_000_000 })
  #expect(retained == boundary.seq)
  var report = try image.compact()
  #expect(report.segmentsFreed > 0, "the log before the window is reclaimed")
  #expect(report.logStartSeq <= retained)
  for state in states where state.seq >= retained {
    #expect(try image.view(atSeq: state.seq).read(at: 0, count: blocks * 4096) == state.disk, "point \(state.seq)")
  }
  #expect(try image.timeline().contains { $0.seq == retained })
  #expect(try image.check().result == .clean)

  try image.setCDPWindow(nil)
  report = try image.compact()
  #expect(report.logStartSeq > retained)
  #expect(throws: StrataError.self) { _ = try image.view(atSeq: boundary.seq).read(at: 0, count: 4096) }
  #expect(try image.read(at: 0, count: blocks * 4096) == disk)
  try image.close()
}
