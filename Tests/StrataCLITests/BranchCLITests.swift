import Foundation
import Testing

#if canImport(Glibc)
  import Glibc
#endif

/// Block-aligned ranges (4 KiB blocks) where two disks differ, merged.
private func blockDiff(_ x: Data, _ y: Data) -> [[Int]] {
  let bs = 4096
  var out: [[Int]] = []
  for block in 0..<(x.count / bs) where x[(block * bs)..<((block + 1) * bs)] != y[(block * bs)..<((block + 1) * bs)] {
    if let last = out.last, last[0] + last[1] == block * bs {
      out[out.count - 1][1] += bs
    } else {
      out.append([block * bs, bs])
    }
  }
  return out
}

extension CLITests {
  /// clone, read/write/map --branch, diff with branch/NAME, branch list, the pinned snapshot,
  /// branch delete.
  @Test func branchesFromASnapshot() throws {
    let box = try Sandbox()
    try box.ok(["create", "disk.strata", "--size", "1M"])
    let first = randomBytes(65536, seed: 40)
    try box.write("first", first)
    try box.write("second", randomBytes(8192, seed: 41))
    try box.write("patch", randomBytes(12_288, seed: 42))
    try box.write("other", randomBytes(4096, seed: 43))
    try box.ok(["write", "disk.strata", "--input", "first"])
    try box.ok(["snapshot", "create", "disk.strata", "base"])
    try box.ok(["write", "disk.strata", "--input", "second", "--offset", "4096"])

    let made = try #require(
      try box.json(["clone", "disk.strata", "--from", "base", "--name", "test", "--output", "json"]) as? [String: Any])
    #expect(made["snapshot"] as? String == "base" && made["path"] as? String == "disk.strata.branches/test.strata")
    let readAll = ["--length", "1M"]
    #expect(try box.ok(["read", "disk.strata", "--branch", "test", "--length", "65536"]).stdout == Data(first))
    try box.ok(["write", "disk.strata", "--branch", "test", "--offset", "100K", "--input", "patch"])
    try box.ok(["clone", "disk.strata", "--from", "base", "--name", "other"])
    try box.ok(["write", "disk.strata", "--branch", "other", "--input", "other"])
    // The head keeps changing after the branches were made.
    try box.ok(["write", "disk.strata", "--input", "other", "--offset", "500K"])

    let head = try box.ok(["read", "disk.strata"] + readAll).stdout
    let test = try box.ok(["read", "disk.strata", "--branch", "test"] + readAll).stdout
    let other = try box.ok(["read", "disk.strata", "--branch", "other"] + readAll).stdout
    let base = try box.ok(["read", "disk.strata", "--snapshot", "base"] + readAll).stdout
    var expected = Data(first) + Data(count: (1 << 20) - first.count)
    #expect(base == expected)
    expected.replaceSubrange((100 << 10)..<((100 << 10) + 12_288), with: try box.read("patch"))
    #expect(test == expected, "the branch: the snapshot plus its own write")
    #expect(other.prefix(4096) == Data(try box.read("other")) && other.dropFirst(4096) == base.dropFirst(4096))
    #expect(head.subdata(in: (100 << 10)..<((100 << 10) + 12_288)) == Data(count: 12_288), "the head did not change")

    func diff(_ a: String, _ b: String) throws -> [[Int]] {
      let json = try #require(try box.json(["diff", "disk.strata", a, b, "--output", "json"]) as? [[String: Any]])
      return json.map { [$0["offset"] as? Int ?? -1, $0["length"] as? Int ?? -1] }
    }
    #expect(try diff("branch/test", "head") == blockDiff(test, head))
    #expect(try diff("head", "branch/test") == blockDiff(test, head))
    #expect(try diff("base", "branch/test") == blockDiff(base, test))
    #expect(try diff("branch/test", "branch/other") == blockDiff(test, other))
    #expect(!blockDiff(test, head).isEmpty)
    try box.fails(["diff", "disk.strata", "branch/nope"], status: 1, mentioning: ["no branch named", "nope"])

    let map = try box.ok(["map", "disk.strata", "--branch", "test"]).output
    #expect(map.contains("disk.strata.branches/test.strata") && map.contains("../disk.strata"), "\(map)")

    let list = try #require(try box.json(["branch", "list", "disk.strata", "--output", "json"]) as? [[String: Any]])
    #expect(list.map { $0["name"] as? String } == ["other", "test"])
    #expect(list.allSatisfy { $0["snapshot"] as? String == "base" && $0["size"] as? Int == 1 << 20 })
    #expect(try box.ok(["branch", "list", "disk.strata"]).output.contains("snapshot 'base'"))

    // The base snapshot stays while a branch needs it.
    try box.fails(["snapshot", "delete", "disk.strata", "base"], status: 1, mentioning: ["branch", "test"])
    try box.ok(["snapshot", "create", "disk.strata", "later"])
    let pruned = try box.ok(["snapshot", "prune", "disk.strata", "--keep-last", "1", "--output", "json"])
    #expect((try JSONSerialization.jsonObject(with: pruned.stdout) as? [Any])?.isEmpty == true)
    #expect(pruned.stderr.contains("Kept snapshot 'base'"), "\(pruned.stderr)")
    try box.ok(["branch", "delete", "disk.strata", "test"])
    try box.fails(["snapshot", "delete", "disk.strata", "base"], status: 1, mentioning: ["other"])
    try box.ok(["branch", "delete", "disk.strata", "other"])
    try box.ok(["snapshot", "delete", "disk.strata", "base"])
    #expect(try box.ok(["branch", "list", "disk.strata"]).output.contains("No branches."))
    try box.ok(["check", "disk.strata"])
  }

  /// A branch made at a point of the timeline reads that point's bytes exactly; its pin goes
  /// with it.
  @Test func branchAtAPoint() throws {
    let box = try Sandbox()
    try box.ok(["create", "disk.strata", "--size", "1M"])
    try box.write("first", randomBytes(200_000, seed: 44))
    try box.write("second", randomBytes(100_000, seed: 45))
    try box.ok(["write", "disk.strata", "--input", "first"])
    let points = try #require(try box.json(["timeline", "disk.strata", "--output", "json"]) as? [[String: Any]])
    let point = try #require(points.last { $0["kind"] as? String == "flush" }?["seq"] as? Int)
    try box.ok(["write", "disk.strata", "--input", "second", "--offset", "50000"])
    let atPoint = try box.ok(["read", "disk.strata", "--at", String(point), "--length", "1M"]).stdout

    try box.ok(["clone", "disk.strata", "--at", String(point), "--name", "then"])
    #expect(try box.ok(["read", "disk.strata", "--branch", "then", "--length", "1M"]).stdout == atPoint)
    let list = try #require(try box.json(["branch", "list", "disk.strata", "--output", "json"]) as? [[String: Any]])
    #expect(list.count == 1 && list[0]["at_seq"] as? Int == point && list[0]["snapshot"] as? String == "branch:then")
    try box.fails(["snapshot", "delete", "disk.strata", "branch:then"], status: 1, mentioning: ["then"])
    try box.ok(["branch", "delete", "disk.strata", "then"])
    #expect(try box.ok(["snapshot", "list", "disk.strata"]).output.contains("No snapshots"))
    try box.fails(["read", "disk.strata", "--branch", "then", "--length", "1"], status: 1, mentioning: ["no branch"])
  }

  @Test func branchArgumentsAndErrors() throws {
    let box = try Sandbox()
    try box.ok(["create", "disk.strata", "--size", "1M"])
    try box.ok(["snapshot", "create", "disk.strata", "s"])
    try box.fails(["clone", "disk.strata", "--name", "b"], status: 64, mentioning: ["--from"])
    try box.fails(["clone", "disk.strata", "--from", "s", "--at", "1", "--name", "b"], status: 64)
    try box.fails(["clone", "disk.strata", "--from", "nope", "--name", "b"], status: 1, mentioning: ["no snapshot"])
    try box.fails(["clone", "disk.strata", "--from", "s", "--name", "a/b"], status: 1, mentioning: ["branch name"])
    try box.fails(["clone", "disk.strata", "--from", "s", "--name", ".b"], status: 1, mentioning: ["branch name"])
    try box.fails(["clone", "missing.strata", "--from", "s", "--name", "b"], status: 1, mentioning: ["missing.strata"])
    try box.ok(["clone", "disk.strata", "--from", "s", "--name", "b"])
    try box.fails(["clone", "disk.strata", "--from", "s", "--name", "b"], status: 1, mentioning: ["already exists"])
    try box.fails(["branch", "delete", "disk.strata", "nope"], status: 1, mentioning: ["no branch named"])
    try box.fails(["read", "disk.strata", "--branch", "nope", "--length", "1"], status: 1, mentioning: ["nope"])
    try box.fails(["branch", "list", "missing.strata"], status: 1, mentioning: ["missing.strata"])
  }

  #if canImport(Glibc)
    /// While another process holds the image's writer lock (as `strata serve` does), its
    /// branches can still be made from a snapshot, read, written, mapped and diffed with its
    /// snapshots: they read only immutable log data. A branch at a point needs the image for
    /// writing, a diff with the head needs the head.
    @Test func branchesWorkWhileTheImageIsInUse() throws {
      let box = try Sandbox()
      try box.ok(["create", "disk.strata", "--size", "1M"])
      let first = randomBytes(8192, seed: 46)
      try box.write("first", first)
      try box.ok(["write", "disk.strata", "--input", "first"])
      try box.ok(["snapshot", "create", "disk.strata", "s"])
      let points = try #require(try box.json(["timeline", "disk.strata", "--output", "json"]) as? [[String: Any]])
      let flush = try #require(points.last { $0["kind"] as? String == "flush" }?["seq"] as? Int)
      try box.ok(["clone", "disk.strata", "--at", String(flush), "--name", "p"])
      let fd = open(box.path("disk.strata"), O_RDONLY)
      try #require(fd >= 0)
      defer { close(fd) }
      try #require(flock(fd, LOCK_EX | LOCK_NB) == 0)
      try box.fails(["read", "disk.strata", "--length", "1"], status: 1, mentioning: ["in use"])
      try box.ok(["clone", "disk.strata", "--from", "s", "--name", "b"])
      #expect(try box.ok(["read", "disk.strata", "--branch", "b", "--length", "8192"]).stdout == Data(first))
      try box.ok(["write", "disk.strata", "--branch", "b", "--input", "first", "--offset", "64K"])
      try box.ok(["map", "disk.strata", "--branch", "b"])
      let diff = try #require(
        try box.json(["diff", "disk.strata", "s", "branch/b", "--output", "json"]) as? [[String: Any]])
      #expect(diff.count == 1 && diff[0]["offset"] as? Int == 65536 && diff[0]["length"] as? Int == 8192, "\(diff)")
      try box.fails(["diff", "disk.strata", "branch/b", "head"], status: 1, mentioning: ["in use"])
      try box.ok(["branch", "list", "disk.strata"])
      try box.fails(["clone", "disk.strata", "--at", String(flush), "--name", "c"], status: 1, mentioning: ["in use"])
      // Deleting a branch made at a point deletes its pin: that needs the image.
      try box.fails(["branch", "delete", "disk.strata", "p"], status: 1, mentioning: ["pin", "in use"])
      try box.ok(["read", "disk.strata", "--branch", "p", "--length", "1"])
      _ = flock(fd, LOCK_UN)
      try box.ok(["branch", "delete", "disk.strata", "p"])
      #expect(!(try box.ok(["snapshot", "list", "disk.strata"]).output.contains("branch:p")))
    }
  #endif
}
