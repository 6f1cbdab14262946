import StrataSimulation
import Testing

@testable import StrataCore

/// A deterministic clock: one millisecond per reading.
private final class TickingClock: @unchecked Sendable {
  var now: UInt64 = 1_800_000_000_000_000_000
  func read() -> UInt64 {
    now += 1_000_000
    return now
  }
}

private func options(_ clock: TickingClock) -> ImageOptions {
  var o = ImageOptions()
  o.clock = { clock.read() }
  o.maxDirtyNodes = 8  // checkpoints now and then, so views start from several of them
  return o
}

/// Random writes, zeroes and discards with a flush now and then, across reopens: the disk at
/// every flush point of the timeline reads back exactly as it was when that flush returned.
@Test(arguments: [1, 2, 3] as [UInt64])
func timelineEveryFlushPointReadsBackAsItWas(seed: UInt64) throws {
  let path = temporaryDirectory() + "/t.strata"
  let clock = TickingClock()
  let blocks = 48
  var img = try StrataImage.create(
    path: path, virtualSize: UInt64(blocks * 4096), options: options(clock), overwrite: true)
  var disk = [UInt8](repeating: 0, count: blocks * 4096)
  var expected: [[UInt8]] = []  // the disk at each flush, in order
  var random = SeededRandom(seed: seed)
  for step in 0..<300 {
    let first = Int.random(in: 0..<blocks, using: &random)
    let count = Int.random(in: 1...min(4, blocks - first), using: &random)
    let range = (first * 4096)..<((first + count) * 4096)
    switch Int.random(in: 0..<10, using: &random) {
    case 0:
      try img.writeZeroes(at: UInt64(range.lowerBound), length: UInt64(range.count))
      disk.replaceSubrange(range, with: repeatElement(0, count: range.count))
    case 1:
      try img.discard(at: UInt64(range.lowerBound), length: UInt64(range.count))
      disk.replaceSubrange(range, with: repeatElement(0, count: range.count))
    default:
      let data = (0..<range.count).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ step &* 13 &+ 1) }
      try img.write(data, at: UInt64(range.lowerBound))
      disk.replaceSubrange(range, with: data)
    }
    if step % 7 == 6 {
      try img.flush()
      expected.append(disk)
    }
    if step % 100 == 99 {
      try img.close()
      img = try StrataImage.open(path: path, options: options(clock))
    }
  }
  let flushes = try img.timeline().filter { $0.kind == .flush }
  // Reopening flushes too; those points hold what the last explicit flush held.
  #expect(flushes.count >= expected.count)
  var matched = 0
  var previous: TimelinePoint?
  for point in flushes {
    if let p = previous {
      #expect(point.seq >= p.seq && point.timestampNanoseconds >= p.timestampNanoseconds, "timeline out of order")
    }
    previous = point
    let bytes = try img.view(atSeq: point.seq).read(at: 0, count: blocks * 4096)
    if matched < expected.count && bytes == expected[matched] {
      matched += 1
    }
  }
  #expect(matched == expected.count, "\(matched) of \(expected.count) flush points matched, in order")
  try img.close()
}

@Test func timelineRestoreKeepsWhatCameAfter() throws {
  let path = temporaryDirectory() + "/r.strata"
  let clock = TickingClock()
  let img = try StrataImage.create(path: path, virtualSize: 1 << 20, options: options(clock), overwrite: true)
  let v1 = [UInt8](repeating: 1, count: 4096)
  let v2 = [UInt8](repeating: 2, count: 4096)
  try img.write(v1, at: 0)
  try img.flush()
  let afterV1 = clock.now
  try img.createSnapshot(name: "one")
  try img.write(v2, at: 0)
  try img.flush()
  let points = try img.timeline()
  #expect(points.contains { $0.kind == .snapshot && $0.name == "one" })
  #expect(points.contains { $0.kind == .checkpoint })
  let first = try #require(points.first { $0.kind == .flush && $0.timestampNanoseconds <= afterV1 && $0.seq > 1 })
  #expect(try img.point(atOrBefore: afterV1)?.seq ?? 0 >= first.seq)
  let last = try #require(points.last { $0.kind == .flush })
  for point in points {
    #expect(throws: Never.self, "\(point.kind) at \(point.seq)") { _ = try img.view(atSeq: point.seq) }
  }
  // The disk at a snapshot's point is the snapshot.
  let snap = try #require(points.first { $0.kind == .snapshot })
  #expect(try img.view(atSeq: snap.seq).read(at: 0, count: 4096) == v1)
  #expect(try img.view(atSeq: first.seq).read(at: 0, count: 4096) == v1)

  try img.restore(toSeq: first.seq)
  #expect(try img.read(at: 0, count: 4096) == v1, "the head is back at the first flush")
  #expect(try img.view(atSeq: last.seq).read(at: 0, count: 4096) == v2, "what came after is still there")
  try img.flush()
  try img.close()
  let reopened = try StrataImage.open(path: path)
  #expect(try reopened.read(at: 0, count: 4096) == v1)
  #expect(throws: StrataError.self) { try reopened.view(atSeq: 1 << 40) }
  try reopened.close()
}

@Test func rfc3339Times() {
  #expect(RFC3339.nanoseconds("1970-01-01T00:00:00Z") == 0)
  #expect(RFC3339.nanoseconds("2026-11-26T09:30:00Z") == 1_795_685_400_000_000_000)
  #expect(RFC3339.nanoseconds("2026-11-26t09:30:00.123456789z") == 1_795_685_400_123_456_789)
  #expect(RFC3339.nanoseconds("2026-11-26T09:30:00.5Z") == 1_795_685_400_500_000_000)
  #expect(RFC3339.nanoseconds("2026-11-26T09:30:00.1234567891234Z") == 1_795_685_400_123_456_789)
  #expect(RFC3339.nanoseconds("2024-02-29T23:59:59+01:00") == 1_709_247_599_000_000_000)
  #expect(RFC3339.nanoseconds("2000-03-01T00:00:00-05:30") == 951_888_600_000_000_000)
  for bad in [
    "", "2026-11-26", "2026-11-26T09:30:00", "2026-13-01T00:00:00Z", "2023-02-29T00:00:00Z", "2026-11-26T24:00:00Z",
    "2026-11-26T09:30:00.Z", "2026-11-26T09:30:00Zjunk", "1969-12-31T23:59:59Z", "yesterday", "12345",
  ] {
    #expect(RFC3339.nanoseconds(bad) == nil, "\(bad)")
  }
}

/// strata-sim seed 2, op 341: `timeline(since:)` started its walk at the newest checkpoint
/// record before `since + 1`; when that record immediately follows another checkpoint record,
/// the point at `since` (the end of the earlier one) was left out.
@Test func timelineSinceAPointRightBeforeACheckpoint() throws {
  let image = try StrataImage.create(
    path: temporaryDirectory() + "/c.strata", virtualSize: 1 << 20, options: options(TickingClock()), overwrite: true)
  defer { try? image.close() }
  try image.write([UInt8](repeating: 0xA5, count: 4096), at: 0)
  try image.checkpoint()
  let first = try image.info.nextSeq  // the point right after the first checkpoint
  try image.checkpoint()
  let listed = try image.timeline(since: first).map(\.seq)
  #expect(listed.first == first, "timeline since \(first): \(listed)")
  #expect(try image.timeline().map(\.seq).contains(first))
}
