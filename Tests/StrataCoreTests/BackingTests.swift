import Glibc
import StrataFormat
import StrataSimulation
import Testing

@testable import StrataCore

private func bytes(_ count: Int, seed: UInt8) -> [UInt8] {
  (0..<count).map { UInt8(truncatingIfNeeded: $0 &* 31) ^ seed | 1 }
}

/// A child reads what it never wrote from its parent and everything else from itself; discard,
/// write-zeroes and a shrink-then-grow read zeros, not the parent; snapshots, the queue API, a
/// reopen and `check` all see the same disk; the parent never changes.
@Test func backingChildReadsThroughItsParent() throws {
  let dir = temporaryDirectory()
  let parent = try StrataImage.create(path: dir + "/golden.strata", virtualSize: 1 << 20, overwrite: true)
  let golden = bytes(1 << 20, seed: 0x5A)
  try parent.write(golden, at: 0)
  try parent.close()

  let child = try StrataImage.create(path: dir + "/child.strata", backing: "golden.strata")
  #expect(child.size == 1 << 20)
  #expect(child.backingChain == ["golden.strata"])
  var expected = golden
  func expectDisk(_ image: StrataImage, _ what: String) throws {
    #expect(try image.read(at: 0, count: 1 << 20) == expected, "\(what)")
  }
  try expectDisk(child, "fresh child")
  let mine = bytes(10_000, seed: 0x33)
  try child.write(mine, at: 5000)
  expected.replaceSubrange(5000..<15000, with: mine)
  try child.createSnapshot(name: "s")
  let snapshotDisk = expected
  try child.discard(at: 64 << 10, length: 64 << 10)
  expected.replaceSubrange((64 << 10)..<(128 << 10), with: repeatElement(0, count: 64 << 10))
  try child.writeZeroes(at: 200 << 10, length: 8192)
  expected.replaceSubrange((200 << 10)..<((200 << 10) + 8192), with: repeatElement(0, count: 8192))
  try child.resize(to: 512 << 10, allowShrink: true)
  try child.resize(to: 1 << 20)
  expected.replaceSubrange((512 << 10)..<(1 << 20), with: repeatElement(0, count: 512 << 10))
  try expectDisk(child, "after writes, discard, zeroes, shrink and grow")
  #expect(try child.snapshotView(name: "s").read(at: 0, count: 1 << 20) == snapshotDisk, "the snapshot")
  // The data extents the map reports cover the parent's blocks too (convert copies those).
  let extents = try child.extents()
  #expect(extents.contains { $0.layer == 1 && $0.state == .data })
  #expect(extents.reduce(0) { $0 + $1.length } == 1 << 20)

  // Reads through a queue, into odd pieces, match.
  let queue = try ImageQueue(image: child, depth: 4)
  var out = [UInt8](repeating: 0xEE, count: 300_000)
  try out.withUnsafeMutableBytes { buffer in
    try queue.submitRead(segments: 3, at: 1000, tag: 7) { i in
      UnsafeMutableRawBufferPointer(rebasing: buffer[(i * 100_000)..<((i + 1) * 100_000)])
    }
  }
  var completions = [QueueCompletion](repeating: QueueCompletion(tag: 0, error: nil), count: 1)
  let n = try completions.withUnsafeMutableBufferPointer { try queue.reap($0, minimum: 1) }
  #expect(n == 1 && completions[0].error == nil)
  #expect(out == Array(expected[1000..<301_000]), "queue reads")
  queue.close()
  try child.close()

  let reopened = try StrataImage.open(path: dir + "/child.strata")
  try expectDisk(reopened, "after a reopen")
  #expect(try reopened.check().result == .clean)
  try reopened.close()
  let parentAgain = try StrataImage.open(
    path: dir + "/golden.strata",
    options: {
      var o = ImageOptions(); o.readOnly = true; return o
    }())
  #expect(try parentAgain.read(at: 0, count: 1 << 20) == golden, "the parent is unchanged")
  try parentAgain.close()
}

/// Twenty layers, each writing its own block: the top one reads every layer's block.
@Test func backingChainOfTwentyLayers() throws {
  let dir = temporaryDirectory()
  let base = try StrataImage.create(path: dir + "/l0.strata", virtualSize: 256 << 10, overwrite: true)
  try base.write(bytes(4096, seed: 0), at: 0)
  try base.close()
  for layer in 1..<20 {
    let image = try StrataImage.create(path: dir + "/l\(layer).strata", backing: "l\(layer - 1).strata")
    try image.write(bytes(4096, seed: UInt8(layer)), at: UInt64(layer * 4096))
    try image.close()
  }
  let top = try StrataImage.open(path: dir + "/l19.strata")
  #expect(top.backingChain.count == 19)
  for layer in 0..<20 {
    #expect(try top.read(at: UInt64(layer * 4096), count: 4096) == bytes(4096, seed: UInt8(layer)), "layer \(layer)")
  }
  #expect(try top.read(at: 20 * 4096, count: 4096) == [UInt8](repeating: 0, count: 4096))
  try top.close()
}

@Test func backingRefusesAWrongOrMissingParent() throws {
  let dir = temporaryDirectory()
  try StrataImage.create(path: dir + "/p.strata", virtualSize: 1 << 20, overwrite: true).close()
  try StrataImage.create(path: dir + "/c.strata", backing: dir + "/p.strata").close()
  // Another image in the parent's place: refused, not read.
  try StrataImage.create(path: dir + "/p.strata", virtualSize: 1 << 20, overwrite: true).close()
  #expect(throws: StrataError.self) { try StrataImage.open(path: dir + "/c.strata") }
  // No parent at all.
  try StrataImage.create(path: dir + "/q.strata", virtualSize: 1 << 20, overwrite: true).close()
  try StrataImage.create(path: dir + "/d.strata", backing: "q.strata").close()
  unlink(dir + "/q.strata")
  do {
    _ = try StrataImage.open(path: dir + "/d.strata")
    Issue.record("opened without its parent")
  } catch let e as StrataError {
    #expect(e.code == .notFound && e.message.contains("q.strata"))
  }
  // Storage-level opens cannot find a parent: refused rather than read as zeros.
  let storage = try FileStorage(path: dir + "/c.strata", mode: .readOnly)
  #expect(throws: StrataError.self) { try StrataImage.open(storage: storage) }
  try storage.close()
}

@Test func backingDescriptorRoundTripAndDamage() throws {
  let d = BackingDescriptor(path: "../golden images/base.strata", parentImageID: Array(0..<16), parentSize: 1 << 30)
  var page = try d.encode()
  #expect(page.count == 4096)
  #expect(try page.withUnsafeBytes { try BackingDescriptor.decode($0) } == d)
  page[100] ^= 1
  #expect(throws: FormatError.self) { try page.withUnsafeBytes { try BackingDescriptor.decode($0) } }
  #expect(throws: FormatError.self) {
    try BackingDescriptor(path: "", parentImageID: Array(0..<16), parentSize: 0).encode()
  }
}
