import Glibc
import StrataFormat
import Testing

@testable import StrataCore

private func pattern(_ count: Int, seed: UInt8) -> [UInt8] {
  (0..<count).map { UInt8(truncatingIfNeeded: $0 &* 131 &+ Int(seed) &* 7) ^ seed | 1 }
}

private let mib = 1 << 20

/// A parent with 1 MiB of data and a snapshot "s" of it; the head is then overwritten.
private func parentWithSnapshot(_ dir: String) throws -> (path: String, atSnapshot: [UInt8]) {
  let path = dir + "/vm.strata"
  let image = try StrataImage.create(path: path, virtualSize: UInt64(mib), overwrite: true)
  let original = pattern(mib, seed: 1)
  try image.write(original, at: 0)
  try image.createSnapshot(name: "s")
  try image.write(pattern(mib / 2, seed: 2), at: 0)
  try image.close()
  return (path, original)
}

/// A branch reads its snapshot's data, not the head's, and keeps doing so while the parent's
/// head is overwritten by a writer that holds the parent's lock (the parent is open for
/// writing at the same time: a branch does not lock it); the branch's writes stay in the branch.
@Test func branchReadsItsSnapshotWhileTheParentChanges() throws {
  let dir = temporaryDirectory()
  let (path, original) = try parentWithSnapshot(dir)
  let branch = try StrataImage.createBranch(of: path, name: "b1", snapshot: "s")
  #expect(branch.size == UInt64(mib))
  #expect(branch.branchPoint?.name == "s")
  #expect(branch.backingChain == ["../vm.strata"])
  #expect(try branch.read(at: 0, count: mib) == original)

  // The parent is opened for writing while the branch is open, and changes under it.
  let parent = try StrataImage.open(path: path)
  try parent.write(pattern(mib, seed: 3), at: 0)
  try parent.flush()
  #expect(try branch.read(at: 0, count: mib) == original, "the branch does not see the parent's new head")
  let mine = pattern(10_000, seed: 4)
  try branch.write(mine, at: 3000)
  var expected = original
  expected.replaceSubrange(3000..<13_000, with: mine)
  #expect(try branch.read(at: 0, count: mib) == expected)
  try branch.close()
  #expect(try parent.read(at: 0, count: mib) == pattern(mib, seed: 3), "the branch's writes stay in the branch")
  // Opened anew while the parent is still open for writing (and keeps changing).
  let again = try StrataImage.open(path: StrataImage.branchPath(of: path, name: "b1"))
  try parent.write(pattern(mib, seed: 5), at: 0)
  try parent.flush()
  #expect(try again.read(at: 0, count: mib) == expected)
  // The map shows the branch's blocks (layer 0) and the snapshot's (layer 1).
  let extents = try again.extents()
  #expect(extents.contains { $0.layer == 0 && $0.state == .data })
  #expect(extents.contains { $0.layer == 1 && $0.state == .data })
  #expect(extents.reduce(0) { $0 + $1.length } == UInt64(mib))
  try again.close()
  try parent.close()
}

@Test func twoBranchesOfOneSnapshotAreIndependent() throws {
  let dir = temporaryDirectory()
  let (path, original) = try parentWithSnapshot(dir)
  let a = try StrataImage.createBranch(of: path, name: "a", snapshot: "s")
  let b = try StrataImage.createBranch(of: path, name: "b", snapshot: "s")
  try a.write(pattern(8192, seed: 9), at: 0)
  try b.write(pattern(8192, seed: 10), at: 4096)
  var ea = original
  ea.replaceSubrange(0..<8192, with: pattern(8192, seed: 9))
  var eb = original
  eb.replaceSubrange(4096..<12_288, with: pattern(8192, seed: 10))
  #expect(try a.read(at: 0, count: mib) == ea)
  #expect(try b.read(at: 0, count: mib) == eb)
  try a.close()
  try b.close()
  let listed = try StrataImage.branches(of: path)
  #expect(listed.map(\.name) == ["a", "b"])
  #expect(listed.allSatisfy { $0.snapshot == "s" && $0.size == UInt64(mib) && $0.problem == nil && !$0.ownsSnapshot })
}

/// A branch made at a point that is no snapshot reads exactly the disk at that point, through a
/// pin snapshot plus copies of the blocks changed since; the pin cannot be deleted while the
/// branch exists and goes with it.
@Test func branchAtAPointReadsThatPointExactly() throws {
  let dir = temporaryDirectory()
  let path = dir + "/vm.strata"
  let image = try StrataImage.create(path: path, virtualSize: UInt64(mib), overwrite: true)
  try image.write(pattern(mib, seed: 1), at: 0)
  try image.flush()
  try image.write(pattern(100_000, seed: 2), at: 50_000)
  try image.discard(at: 400_000, length: 100_000)
  try image.flush()
  let point = try #require(try image.timeline().last { $0.kind == .flush }).seq
  let atPoint = try image.view(atSeq: point).read(at: 0, count: mib)
  try image.write(pattern(300_000, seed: 3), at: 20_000)
  try image.writeZeroes(at: 600_000, length: 50_000)
  try image.resize(to: UInt64(2 * mib))
  try image.write(pattern(1000, seed: 4), at: UInt64(mib) + 10)
  try image.close()

  let branch = try StrataImage.createBranch(of: path, name: "then", atSeq: point)
  #expect(branch.size == UInt64(mib))
  #expect(branch.branchPoint?.name == "branch:then" && branch.branchPoint?.originSeq == point)
  #expect(try branch.read(at: 0, count: mib) == atPoint)
  try branch.close()
  let reopened = try StrataImage.open(path: StrataImage.branchPath(of: path, name: "then"))
  #expect(try reopened.read(at: 0, count: mib) == atPoint)
  try reopened.close()

  let parent = try StrataImage.open(path: path)
  #expect(try parent.snapshots.map(\.name) == ["branch:then"])
  #expect(throws: StrataError.self) { try parent.deleteSnapshot(name: "branch:then") }
  try parent.close()
  try StrataImage.deleteBranch(of: path, name: "then")
  let after = try StrataImage.open(path: path)
  #expect(try after.snapshots.isEmpty, "the pin went with the branch")
  try after.close()
  #expect(access(StrataImage.branchDirectory(of: path), F_OK) != 0, "the empty branch directory is gone")
}

@Test func snapshotsBranchesAreBasedOnCannotBeDeletedOrPruned() throws {
  let dir = temporaryDirectory()
  let (path, _) = try parentWithSnapshot(dir)
  try StrataImage.createBranch(of: path, name: "keep", snapshot: "s").close()
  let image = try StrataImage.open(path: path)
  try image.createSnapshot(name: "t")
  #expect(try image.branchPins().values.flatMap { $0 } == ["keep"])
  do {
    try image.deleteSnapshot(name: "s")
    Issue.record("deleting the base of a branch succeeded")
  } catch let e as StrataError {
    #expect(e.message.contains("branch \"keep\"") && e.message.contains("vm.strata.branches/keep"))
  }
  // Keep only the newest: "t" stays by the policy, "s" by the branch.
  let deleted = try image.pruneSnapshots(RetentionPolicy(last: 1))
  #expect(deleted.isEmpty)
  #expect(try image.snapshots.map(\.name) == ["s", "t"])
  try image.close()

  try StrataImage.deleteBranch(of: path, name: "keep")
  let again = try StrataImage.open(path: path)
  #expect(try again.snapshots.map(\.name) == ["s", "t"], "a snapshot the user made stays after its branch")
  try again.deleteSnapshot(name: "s")
  try again.close()
}

/// The metadata diff between a branch and the parent's head, or a snapshot, or another branch,
/// is exactly the set of blocks whose bytes differ (every write here changes its blocks).
@Test func diffBetweenBranchesAndPointsMatchesABlockComparison() throws {
  let dir = temporaryDirectory()
  let (path, _) = try parentWithSnapshot(dir)
  let a = try StrataImage.createBranch(of: path, name: "a", snapshot: "s")
  try a.write(pattern(5000, seed: 21), at: 700_000)
  try a.write(pattern(4096, seed: 22), at: 0)
  let b = try StrataImage.createBranch(of: path, name: "b", snapshot: "s")
  try b.write(pattern(20_000, seed: 23), at: 900_000)
  let parent = try StrataImage.open(path: path)
  try parent.write(pattern(70_000, seed: 24), at: 100_000)

  let bs = 4096
  func blockDiff(_ x: [UInt8], _ y: [UInt8]) -> [Range<UInt64>] {
    var out: [Range<UInt64>] = []
    for block in 0..<(mib / bs) where x[(block * bs)..<((block + 1) * bs)] != y[(block * bs)..<((block + 1) * bs)] {
      let r = UInt64(block * bs)..<UInt64((block + 1) * bs)
      if let last = out.last, last.upperBound == r.lowerBound {
        out[out.count - 1] = last.lowerBound..<r.upperBound
      } else {
        out.append(r)
      }
    }
    return out
  }
  let head = try parent.read(at: 0, count: mib)
  let snapshot = try parent.snapshotView(name: "s")
  let aBytes = try a.read(at: 0, count: mib)
  let bBytes = try b.read(at: 0, count: mib)
  let pa = try parent.diffPoint(branch: a)
  let pb = try parent.diffPoint(branch: b)
  #expect(try parent.changedRanges(from: pa, to: parent.diffPoint(nil)) == blockDiff(aBytes, head))
  #expect(try parent.changedRanges(from: parent.diffPoint(nil), to: pa) == blockDiff(aBytes, head))
  #expect(
    try parent.changedRanges(from: parent.diffPoint(snapshot), to: pa)
      == blockDiff(try snapshot.read(at: 0, count: mib), aBytes))
  #expect(try parent.changedRanges(from: pa, to: pb) == blockDiff(aBytes, bBytes))
  #expect(!blockDiff(aBytes, head).isEmpty && !blockDiff(aBytes, bBytes).isEmpty)
  try a.close()
  try b.close()
  try parent.close()
}

@Test func badBranchNamesAndMissingSnapshotsFailClearly() throws {
  let dir = temporaryDirectory()
  let (path, _) = try parentWithSnapshot(dir)
  for bad in ["", "a/b", ".hidden", "tab\tname", String(repeating: "x", count: 249)] {
    #expect(throws: StrataError.self, "\(bad)") { try StrataImage.createBranch(of: path, name: bad, snapshot: "s") }
  }
  do {
    _ = try StrataImage.createBranch(of: path, name: "b", snapshot: "nope")
    Issue.record("a branch of a missing snapshot was created")
  } catch let e as StrataError {
    #expect(e.code == .notFound && e.message.contains("nope"))
  }
  #expect(access(StrataImage.branchDirectory(of: path), F_OK) != 0, "no branch file or directory is left behind")
  try StrataImage.createBranch(of: path, name: "b", snapshot: "s").close()
  do {
    _ = try StrataImage.createBranch(of: path, name: "b", snapshot: "s")
    Issue.record("a second branch of the same name was created")
  } catch let e as StrataError {
    #expect(e.code == .alreadyExists)
  }
  do {
    try StrataImage.deleteBranch(of: path, name: "missing")
    Issue.record("deleting a missing branch succeeded")
  } catch let e as StrataError {
    #expect(e.code == .notFound && e.message.contains("missing"))
  }
  do {
    _ = try StrataImage.createBranch(of: dir + "/absent.strata", name: "x", snapshot: "s")
    Issue.record("a branch of a missing image was created")
  } catch let e as StrataError {
    #expect(e.code == .notFound)
  }
}

/// A branch is an image: it has snapshots and branches of its own, which read through both
/// layers; it cannot be deleted while a branch of it exists.
@Test func branchOfABranch() throws {
  let dir = temporaryDirectory()
  let (path, original) = try parentWithSnapshot(dir)
  let b = try StrataImage.createBranch(of: path, name: "b", snapshot: "s")
  let mine = pattern(4096, seed: 30)
  try b.write(mine, at: 8192)
  try b.createSnapshot(name: "bs")
  try b.write(pattern(4096, seed: 31), at: 8192)
  try b.close()
  let bPath = StrataImage.branchPath(of: path, name: "b")
  let sub = try StrataImage.createBranch(of: bPath, name: "sub", snapshot: "bs")
  var expected = original
  expected.replaceSubrange(8192..<12_288, with: mine)
  #expect(try sub.read(at: 0, count: mib) == expected)
  #expect(sub.backingChain == ["../b.strata", "../vm.strata"])
  try sub.close()
  do {
    try StrataImage.deleteBranch(of: path, name: "b")
    Issue.record("a branch with a branch of its own was deleted")
  } catch let e as StrataError {
    #expect(e.message.contains("sub"))
  }
  try StrataImage.deleteBranch(of: bPath, name: "sub")
  try StrataImage.deleteBranch(of: path, name: "b")
  #expect(try StrataImage.branches(of: path).isEmpty)
}

/// The cleaner keeps what a branch reads: its snapshot is a retained point, so compacting the
/// parent (open for writing at the same time) frees and reuses other segments while the branch,
/// open throughout and opened anew, still reads the snapshot.
@Test func aBranchSurvivesCompactionOfItsParent() throws {
  let dir = temporaryDirectory()
  let path = dir + "/vm.strata"
  var options = ImageOptions()
  options.segmentSize = Layout.minSegmentSize
  options.checkpointIntervalPages = 512
  let size = 2 * mib
  let parent = try StrataImage.create(path: path, virtualSize: UInt64(size), options: options, overwrite: true)
  let original = pattern(size, seed: 50)
  try parent.write(original, at: 0)
  try parent.createSnapshot(name: "s")
  try parent.flush()
  let branch = try StrataImage.createBranch(of: path, name: "b", snapshot: "s")
  var freed = 0
  for round in 0..<4 {
    try parent.write(pattern(size, seed: UInt8(51 + round)), at: 0)
    try parent.flush()
    freed += try parent.compact().segmentsFreed
    #expect(try branch.read(at: 0, count: size) == original, "round \(round)")
  }
  #expect(freed > 0, "the cleaner freed segments the snapshot does not need")
  try branch.close()
  try parent.write(pattern(size, seed: 60), at: 0)
  try parent.flush()
  do {
    let again = try StrataImage.open(path: StrataImage.branchPath(of: path, name: "b"))
    #expect(try again.read(at: 0, count: size) == original)
    try again.close()
  } catch {
    Issue.record("opening the branch again while the parent is compacted: \(error)")
  }
  try parent.close()
}

/// A branch whose snapshot was deleted behind its back (by a tool that does not know the
/// convention: here, with the branch moved away meanwhile) refuses to open, naming the snapshot,
/// instead of reading another disk.
@Test func aBranchWhoseSnapshotIsGoneRefusesToOpen() throws {
  let dir = temporaryDirectory()
  let (path, _) = try parentWithSnapshot(dir)
  try StrataImage.createBranch(of: path, name: "b", snapshot: "s").close()
  let file = StrataImage.branchPath(of: path, name: "b")
  let aside = dir + "/aside.strata"
  #expect(rename(file, aside) == 0)
  let image = try StrataImage.open(path: path)
  try image.deleteSnapshot(name: "s")
  try image.createSnapshot(name: "s")  // same name, another point
  try image.close()
  #expect(rename(aside, file) == 0)
  do {
    let branch = try StrataImage.open(path: file)
    try branch.close()
    Issue.record("a branch opened over a deleted snapshot")
  } catch let e as StrataError {
    #expect(e.code == .notFound && e.message.contains("\"s\"") && e.message.contains("no longer there"), "\(e)")
  }
}
