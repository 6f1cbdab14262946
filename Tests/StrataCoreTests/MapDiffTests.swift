import StrataFormat
import StrataSimulation
import Testing

@testable import StrataCore

// changedRanges (a walk over two block maps that skips equal subtrees) against brute force:
// every block's map entry in the snapshot and in the head, compared one by one.

/// Blocks whose map entries differ between `snapshot` and the head (or `view`).
private func bruteForceChanged(_ image: StrataImage, _ snapshot: SnapshotView, _ view: SnapshotView?) throws -> [UInt64]
{
  let target = view?.view.map ?? image.map
  let size = max(view?.size ?? image.size, snapshot.size)
  let blocks = (size + UInt64(image.blockSize) - 1) / UInt64(image.blockSize)
  // Past a map's reach (a disk grown since) everything is unallocated.
  func entry(_ map: BlockMap, _ block: UInt64) throws -> MapEntry {
    map.depth < Layout.maxMapDepth && block >> UInt64(8 * map.depth) != 0 ? .unallocated : try map.entry(block)
  }
  return try (0..<blocks).filter { try entry(target, $0) != entry(snapshot.view.map, $0) }
}

private func blocks(of ranges: [Range<UInt64>], blockSize: Int) -> [UInt64] {
  ranges.flatMap { r in
    precondition(r.lowerBound % UInt64(blockSize) == 0)
    return Array((r.lowerBound / UInt64(blockSize))..<((r.upperBound + UInt64(blockSize) - 1) / UInt64(blockSize)))
  }
}

/// A random mix of writes, zeroes and discards, some block-aligned, some not.
private func randomChanges(_ image: StrataImage, _ rng: inout SeededRandom, count: Int) throws {
  let bs = UInt64(image.blockSize)
  for _ in 0..<count {
    let blocks = image.size / bs
    let first = rng.uint64(in: 0..<blocks)
    let n = min(rng.uint64(in: 1...(rng.chance(0.1) ? 600 : 8)), blocks - first)
    switch rng.int(in: 0..<10) {
    case 0..<6:
      try image.write([UInt8](repeating: UInt8(rng.int(in: 1...255)), count: Int(n * bs)), at: first * bs)
    case 6..<8: try image.writeZeroes(at: first * bs, length: n * bs)
    case 8: try image.discard(at: first * bs, length: n * bs)
    default:
      // Partial blocks: a read-modify-write.
      try image.write([UInt8](repeating: 3, count: 100), at: first * bs + 17)
    }
    if rng.chance(0.05) { try image.checkpoint() }
  }
}

@Test(arguments: testSeeds([1, 2, 3, 4]))
func changedRangesMatchBruteForce(seed: UInt64) throws {
  var rng = SeededRandom(seed: seed)
  let clock = SimulatedClock()
  let path = temporaryDirectory() + "/diff.strata"
  let image = try StrataImage.create(path: path, virtualSize: 16 << 20, options: stressOptions(clock: clock))
  defer { try? image.close() }
  try randomChanges(image, &rng, count: 200)
  try image.createSnapshot(name: "a")
  let a = try image.snapshotView(name: "a")
  #expect(try image.changedRanges(since: a, from: 0, length: image.size).isEmpty)
  try randomChanges(image, &rng, count: 150)
  try image.createSnapshot(name: "b")
  try randomChanges(image, &rng, count: 100)
  // The third phase grows the disk past one more map level (16 MiB: 2 levels, 300 MiB: 3).
  if seed % 2 == 0 { try image.resize(to: 300 << 20) }
  try randomChanges(image, &rng, count: 100)
  let b = try image.snapshotView(name: "b")
  for (old, view) in [(a, nil), (b, nil), (a, Optional(b))] {
    let got = try image.changedRanges(since: old, in: view, from: 0, length: .max)
    let want = try bruteForceChanged(image, old, view)
    #expect(blocks(of: got, blockSize: image.blockSize) == want, "seed \(seed) since \(old.info.name)")
    #expect(!want.isEmpty)
    // Merged: no two ranges touch.
    #expect(zip(got, got.dropFirst()).allSatisfy { $0.upperBound < $1.lowerBound })
    // A window with unaligned ends is clipped to it.
    let lo: UInt64 = 5 * 4096 + 123
    let hi: UInt64 = 3 << 20 + 77
    let window = try image.changedRanges(since: old, in: view, from: lo, length: hi - lo)
    let clipped = got.compactMap { r -> Range<UInt64>? in
      r.overlaps(lo..<hi) ? r.clamped(to: lo..<hi) : nil
    }
    #expect(window == clipped)
  }
  // Content check: every block whose bytes differ from the snapshot is reported changed.
  let changed = Set(blocks(of: try image.changedRanges(since: a, from: 0, length: .max), blockSize: image.blockSize))
  let bs = image.blockSize
  for block in stride(from: 0, to: Int(a.size) / bs, by: 7) {
    let before = try a.read(at: UInt64(block * bs), count: bs)
    let now = try image.read(at: UInt64(block * bs), count: bs)
    if before != now { #expect(changed.contains(UInt64(block)), "block \(block) differs but is not reported") }
  }
}
