// End-to-end tests of the `strata` executable: each test runs the built binary in a fresh
// temporary directory and checks its output, exit status and the files it leaves.
//
// These tests need the binary. `swift build --build-tests` builds it together with the tests
// (and `swift test` builds every product first); the tests then find it in this order:
//   1. the STRATA_BIN environment variable,
//   2. next to the test bundle (the build directory, whatever --scratch-path was used),
//   3. <package root>/.build/debug/strata.
// When none exists the suite is skipped with a message saying so.

import Foundation
import StrataTestSupport
import Testing

#if canImport(Glibc)
  import Glibc
#endif

// MARK: - Running the binary

/// Where the `strata` executable is, or nil when it has not been built.
let strataBinary: URL? = strataExecutable

struct MissingBinary: Error, CustomStringConvertible {
  var description: String { strataExecutableMissing }
}

struct RunResult {
  var status: Int32
  /// True when the process died of a signal (a crash) instead of exiting.
  var signaled: Bool
  var stdout: Data
  var stderr: String
  var output: String { String(decoding: stdout, as: UTF8.self) }
}

/// A temporary directory for one test, removed when the test ends.
final class Sandbox {
  let url: URL

  init() throws {
    url = FileManager.default.temporaryDirectory.appendingPathComponent("strata-cli-\(UUID().uuidString)")
    try FileManager.default.createDirectory(at: url, withIntermediateDirectories: true)
  }

  deinit { try? FileManager.default.removeItem(at: url) }

  func path(_ name: String) -> String { url.appendingPathComponent(name).path }

  func write(_ name: String, _ bytes: [UInt8]) throws {
    try Data(bytes).write(to: url.appendingPathComponent(name))
  }

  func read(_ name: String) throws -> [UInt8] {
    [UInt8](try Data(contentsOf: url.appendingPathComponent(name)))
  }

  func fileSize(_ name: String) throws -> UInt64 {
    let attributes = try FileManager.default.attributesOfItem(atPath: path(name))
    return (attributes[.size] as? NSNumber)?.uint64Value ?? 0
  }

  /// Runs `strata` with `arguments` in this directory; `stdin` bytes are fed to standard input.
  /// Output goes through files, so large outputs cannot deadlock a pipe.
  @discardableResult
  func strata(_ arguments: [String], stdin: [UInt8]? = nil) throws -> RunResult {
    let id = UUID().uuidString
    let outURL = url.appendingPathComponent(".out-\(id)")
    let errURL = url.appendingPathComponent(".err-\(id)")
    let inURL = url.appendingPathComponent(".in-\(id)")
    defer {
      for u in [outURL, errURL, inURL] { try? FileManager.default.removeItem(at: u) }
    }
    try Data().write(to: outURL)
    try Data().write(to: errURL)
    try Data(stdin ?? []).write(to: inURL)
    let out = try FileHandle(forWritingTo: outURL)
    let err = try FileHandle(forWritingTo: errURL)
    let input = try FileHandle(forReadingFrom: inURL)
    defer {
      try? out.close()
      try? err.close()
      try? input.close()
    }
    let process = Process()
    guard let binary = strataBinary else { throw MissingBinary() }
    process.executableURL = binary
    process.arguments = arguments
    process.currentDirectoryURL = url
    process.standardOutput = out
    process.standardError = err
    process.standardInput = input
    try process.run()
    process.waitUntilExit()
    return RunResult(
      status: process.terminationStatus, signaled: process.terminationReason == .uncaughtSignal,
      stdout: try Data(contentsOf: outURL), stderr: String(decoding: try Data(contentsOf: errURL), as: UTF8.self))
  }

  /// Runs `strata` and expects success.
  @discardableResult
  func ok(_ arguments: [String], stdin: [UInt8]? = nil, sourceLocation: SourceLocation = #_sourceLocation) throws
    -> RunResult
  {
    let r = try strata(arguments, stdin: stdin)
    #expect(
      r.status == 0 && !r.signaled, "strata \(arguments.joined(separator: " ")): \(r.stderr)",
      sourceLocation: sourceLocation)
    return r
  }

  /// Runs `strata` and expects a clean failure: a non-zero exit (not a crash) and a message.
  @discardableResult
  func fails(
    _ arguments: [String], status: Int32? = nil, mentioning words: [String] = [], stdin: [UInt8]? = nil,
    sourceLocation: SourceLocation = #_sourceLocation
  ) throws -> RunResult {
    let r = try strata(arguments, stdin: stdin)
    let command = "strata \(arguments.joined(separator: " "))"
    #expect(!r.signaled, "\(command) crashed: \(r.stderr)", sourceLocation: sourceLocation)
    #expect(r.status != 0, "\(command) succeeded but should fail", sourceLocation: sourceLocation)
    if let status { #expect(r.status == status, "\(command): \(r.stderr)", sourceLocation: sourceLocation) }
    #expect(!r.stderr.isEmpty, "\(command) failed without a message", sourceLocation: sourceLocation)
    for word in words {
      #expect(
        r.stderr.lowercased().contains(word.lowercased()), "\(command): \(r.stderr)", sourceLocation: sourceLocation)
    }
    return r
  }

  func json(_ arguments: [String]) throws -> Any {
    try JSONSerialization.jsonObject(with: try ok(arguments).stdout)
  }

  /// Creates a 1 MiB `disk.strata`, writes `count` random bytes (`seeds.first`) at offset 0, takes
  /// the snapshot `snapshot`, then overwrites them with `count` others (`seeds.second`); returns
  /// both contents (also in the files "first" and "second").
  func diskWithSnapshot(
    _ snapshot: String, between count: Int, seeds: (first: UInt64, second: UInt64),
    sourceLocation: SourceLocation = #_sourceLocation
  ) throws -> (first: [UInt8], second: [UInt8]) {
    try ok(["create", "disk.strata", "--size", "1M"], sourceLocation: sourceLocation)
    let first = randomBytes(count, seed: seeds.first)
    let second = randomBytes(count, seed: seeds.second)
    try write("first", first)
    try write("second", second)
    try ok(["write", "disk.strata", "--input", "first"], sourceLocation: sourceLocation)
    try ok(["snapshot", "create", "disk.strata", snapshot], sourceLocation: sourceLocation)
    try ok(["write", "disk.strata", "--input", "second"], sourceLocation: sourceLocation)
    return (first, second)
  }

  /// Inverts `count` bytes of a file at `offset`.
  func flip(_ name: String, at offset: UInt64, count: Int = 16) throws {
    let handle = try FileHandle(forUpdating: url.appendingPathComponent(name))
    defer { try? handle.close() }
    try handle.seek(toOffset: offset)
    let bytes = try handle.read(upToCount: count) ?? Data()
    try handle.seek(toOffset: offset)
    try handle.write(contentsOf: Data(bytes.map { ~$0 }))
  }
}

/// Deterministic pseudo-random bytes (SplitMix64), so failures reproduce.
func randomBytes(_ count: Int, seed: UInt64) -> [UInt8] {
  var state = seed
  var out = [UInt8]()
  out.reserveCapacity(count)
  while out.count < count {
    state &+= 0x9E37_79B9_7F4A_7C15
    var z = state
    z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
    z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
    z ^= z >> 31
    withUnsafeBytes(of: z) { out.append(contentsOf: $0.prefix(count - out.count)) }
  }
  return out
}

// MARK: - Tests

@Suite(
  "strata command line",
  .enabled(
    if: strataBinary != nil,
    "the strata executable was not found: build it with 'swift build --build-tests' or set STRATA_BIN"))
struct CLITests {
  @Test func createAndInfo() throws {
    let box = try Sandbox()
    let created = try box.ok(["create", "disk.strata", "--size", "64M", "--block-size", "8K"])
    #expect(created.output.contains("Formatting 'disk.strata', fmt=strata size=67108864 block_size=8192"))

    let info = try #require(try box.json(["info", "disk.strata", "--output", "json"]) as? [String: Any])
    #expect(info["format"] as? String == "strata")
    #expect(info["format_version"] as? Int == 1)
    #expect(info["virtual_size"] as? Int == 64 << 20)
    #expect(info["block_size"] as? Int == 8192)
    #expect(info["segment_size"] as? Int == 8 << 20)
    #expect(info["allocated_bytes"] as? Int == 0)
    #expect(info["snapshots"] as? Int == 0)
    #expect((info["file_size"] as? Int ?? 0) > 0)
    #expect(info["disk_usage"] is Int)
    #expect((info["image_id"] as? String)?.count == 32)
    #expect((info["recovery_notes"] as? [Any])?.isEmpty == true)
    let created3339 = try #require(info["created"] as? String)
    let formatter = ISO8601DateFormatter()
    formatter.formatOptions = [.withInternetDateTime, .withFractionalSeconds]
    let date = try #require(formatter.date(from: created3339), "not RFC 3339: \(created3339)")
    #expect(abs(date.timeIntervalSinceNow) < 600)

    let human = try box.ok(["info", "disk.strata"]).output
    #expect(human.contains("virtual size: 64 MiB (67108864 bytes)"))
    #expect(human.contains("block size: 8192"))

    // An existing image is not replaced without --force.
    try box.fails(["create", "disk.strata", "--size", "1M"], status: 1, mentioning: ["already exists"])
    try box.ok(["create", "disk.strata", "--size", "1M", "--force"])
    let replaced = try #require(try box.json(["info", "disk.strata", "--output", "json"]) as? [String: Any])
    #expect(replaced["virtual_size"] as? Int == 1 << 20)
  }

  @Test func writeFromFileAndStdinThenReadBack() throws {
    let box = try Sandbox()
    try box.ok(["create", "disk.strata", "--size", "4M"])
    let data = randomBytes(100_000, seed: 1)
    try box.write("input.bin", data)
    let wrote = try box.ok(["write", "disk.strata", "--offset", "1M", "--input", "input.bin"])
    #expect(wrote.output.contains("wrote 100000 bytes"))
    #expect(try box.ok(["read", "disk.strata", "--offset", "1M", "--length", "100000"]).stdout == Data(data))

    // Standard input, at an offset that is not block aligned.
    try box.ok(["write", "disk.strata", "--offset", "4097", "--input", "-"], stdin: Array("hello, strata".utf8))
    let around = try box.ok(["read", "disk.strata", "--offset", "4090", "--length", "24"]).stdout
    #expect(
      [UInt8](around) == [UInt8](repeating: 0, count: 7) + Array("hello, strata".utf8) + [UInt8](repeating: 0, count: 4)
    )

    // --output writes a file instead of standard output.
    try box.ok(["read", "disk.strata", "--offset", "0x100000", "--length", "100000", "--output", "out.bin"])
    #expect(try box.read("out.bin") == data)
  }

  @Test func unalignedReadsMatchAModel() throws {
    let box = try Sandbox()
    let size = 256 * 1024
    try box.ok(["create", "disk.strata", "--size", "256K"])
    var model = [UInt8](repeating: 0, count: size)
    let writes: [(offset: Int, length: Int)] = [(0, 4096), (5000, 3), (4095, 2), (12_288, 40_000), (200_001, 55_999)]
    for (i, w) in writes.enumerated() {
      let bytes = randomBytes(w.length, seed: UInt64(10 + i))
      try box.write("w\(i)", bytes)
      try box.ok(["write", "disk.strata", "--offset", String(w.offset), "--input", "w\(i)"])
      model.replaceSubrange(w.offset..<(w.offset + w.length), with: bytes)
    }
    #expect(try box.ok(["read", "disk.strata", "--length", String(size)]).stdout == Data(model))
    let reads: [(Int, Int)] = [
      (0, 1), (1, 4095), (4095, 2), (4999, 5), (8191, 8194), (12_287, 40_002), (255_999, 1), (3, 0),
    ]
    for (offset, length) in reads {
      let got = try box.ok(["read", "disk.strata", "--offset", String(offset), "--length", String(length)]).stdout
      #expect(got == Data(model[offset..<(offset + length)]), "read \(offset)+\(length)")
    }
  }

  @Test func snapshots() throws {
    let box = try Sandbox()
    let (first, second) = try box.diskWithSnapshot("before", between: 10_000, seeds: (2, 3))
    let made = try #require(
      try box.json(["snapshot", "create", "disk.strata", "after", "--output", "json"]) as? [String: Any])
    #expect(made["name"] as? String == "after")

    let list = try #require(try box.json(["snapshot", "list", "disk.strata", "--output", "json"]) as? [[String: Any]])
    #expect(list.map { $0["name"] as? String } == ["before", "after"])
    let seqs = list.compactMap { $0["seq"] as? Int }
    #expect(seqs.count == 2 && seqs[0] < seqs[1])
    #expect(list.allSatisfy { ($0["time"] as? String)?.hasSuffix("Z") == true })
    let newest = try #require(
      try box.json(["snapshot", "list", "disk.strata", "--limit", "1", "--output", "json"]) as? [[String: Any]])
    #expect(newest.map { $0["name"] as? String } == ["after"])
    #expect(try box.ok(["snapshot", "list", "disk.strata"]).output.contains("before"))

    let read = ["read", "disk.strata", "--length", "10000"]
    #expect(try box.ok(read + ["--snapshot", "before"]).stdout == Data(first))
    #expect(try box.ok(read).stdout == Data(second))

    try box.fails(["snapshot", "create", "disk.strata", "before"], status: 1, mentioning: ["already exists"])
    try box.ok(["snapshot", "restore", "disk.strata", "before"])
    #expect(try box.ok(read).stdout == Data(first))
    #expect(try box.ok(read + ["--snapshot", "after"]).stdout == Data(second))

    try box.ok(["snapshot", "delete", "disk.strata", "before"])
    let remaining = try #require(
      try box.json(["snapshot", "list", "disk.strata", "--output", "json"]) as? [[String: Any]])
    #expect(remaining.map { $0["name"] as? String } == ["after"])
    try box.fails(read + ["--snapshot", "before"], status: 1, mentioning: ["no snapshot named"])
    try box.fails(["snapshot", "delete", "disk.strata", "before"], status: 1, mentioning: ["before"])
  }

  @Test func timelineAtAndRestore() throws {
    let box = try Sandbox()
    let (first, second) = try box.diskWithSnapshot("one", between: 8192, seeds: (4, 5))
    let points = try #require(try box.json(["timeline", "disk.strata", "--output", "json"]) as? [[String: Any]])
    #expect(points.contains { $0["kind"] as? String == "snapshot" && $0["name"] as? String == "one" })
    #expect(points.allSatisfy { ($0["time"] as? String)?.hasSuffix("Z") == true && $0["seq"] is Int })
    let snapshotSeq = try #require(points.first { $0["kind"] as? String == "snapshot" }?["seq"] as? Int)
    let flushes = points.filter { $0["kind"] as? String == "flush" }.compactMap { $0["seq"] as? Int }
    let afterFirst = try #require(flushes.last { $0 <= snapshotSeq })
    let read = ["read", "disk.strata", "--length", "8192"]
    #expect(try box.ok(read + ["--at", String(afterFirst)]).stdout == Data(first))
    #expect(try box.ok(read + ["--at", String(try #require(flushes.last))]).stdout == Data(second))
    #expect(try box.ok(["map", "disk.strata", "--at", String(afterFirst), "--output", "json"]).output.contains("data"))
    let limited = try #require(try box.json(["timeline", "disk.strata", "--limit", "2", "--output", "json"]) as? [Any])
    #expect(limited.count == 2)

    try box.fails(read + ["--at", "soon"], status: 64, mentioning: ["RFC 3339"])
    try box.fails(read + ["--at", "1", "--snapshot", "one"], status: 64, mentioning: ["pick one"])
    try box.fails(read + ["--at", "2000-01-01T00:00:00Z"], status: 1, mentioning: ["no restorable point"])
    try box.fails(["restore", "disk.strata"], status: 64, mentioning: ["exactly one"])

    // diff: the second write changed the first 8 KiB, from metadata alone.
    let diff = try #require(try box.json(["diff", "disk.strata", "one", "--output", "json"]) as? [[String: Any]])
    #expect(diff.count == 1 && diff[0]["offset"] as? Int == 0 && diff[0]["length"] as? Int == 8192, "\(diff)")
    #expect(
      (try box.json(["diff", "disk.strata", "snapshot/one", "at/\(afterFirst)", "--output", "json"]) as? [Any])?.isEmpty
        == true)
    try box.fails(["diff", "disk.strata", "head"], status: 1, mentioning: ["FROM"])
    try box.fails(["diff", "disk.strata", "nope"], status: 1, mentioning: ["no snapshot named"])

    try box.ok(["restore", "disk.strata", "--at", String(afterFirst)])
    #expect(try box.ok(read).stdout == Data(first))
    #expect(try box.ok(read + ["--at", String(try #require(flushes.last))]).stdout == Data(second), "still reachable")
    try box.ok(["check", "disk.strata"])
  }

  @Test func compactReclaimsAndKeepsSnapshots() throws {
    let box = try Sandbox()
    try box.ok(["create", "disk.strata", "--size", "4M", "--segment-size", "1M"])
    let first = randomBytes(4 << 20, seed: 8)
    try box.write("first", first)
    try box.ok(["write", "disk.strata", "--input", "first"])
    try box.ok(["snapshot", "create", "disk.strata", "one"])
    var last = first
    for round in 0..<4 {
      last = randomBytes(4 << 20, seed: 20 + UInt64(round))
      try box.write("next", last)
      try box.ok(["write", "disk.strata", "--input", "next"])
    }
    let report = try #require(try box.json(["compact", "disk.strata", "--output", "json"]) as? [String: Any])
    #expect((report["segments_freed"] as? Int ?? 0) > 0, "\(report)")
    #expect((report["disk_usage_after"] as? Int ?? .max) < (report["disk_usage_before"] as? Int ?? 0), "\(report)")
    let human = try box.ok(["compact", "disk.strata"]).output
    #expect(human.contains("timeline is whole from seq"), "\(human)")
    #expect(try box.ok(["read", "disk.strata", "--length", "4M"]).stdout == Data(last))
    #expect(try box.ok(["read", "disk.strata", "--length", "4M", "--snapshot", "one"]).stdout == Data(first))
    try box.ok(["check", "disk.strata"])
    try box.fails(["compact", "disk.strata", "--max-live", "150"], status: 64, mentioning: ["between 0 and 100"])
    try box.fails(["compact", "missing.strata"], status: 1, mentioning: ["missing.strata"])
  }

  @Test func mapShowsDataZeroAndUnallocated() throws {
    let box = try Sandbox()
    try box.ok(["create", "disk.strata", "--size", "1M"])
    try box.write("data", randomBytes(8192, seed: 4))
    try box.write("zeros", [UInt8](repeating: 0, count: 16_384))
    try box.ok(["write", "disk.strata", "--offset", "0", "--input", "data"])
    try box.ok(["write", "disk.strata", "--offset", "64K", "--input", "zeros"])

    let map = try #require(try box.json(["map", "disk.strata", "--output", "json"]) as? [[String: Any]])
    func extent(at offset: Int) -> [String: Any]? { map.first { $0["offset"] as? Int == offset } }
    let data = try #require(extent(at: 0))
    #expect(data["state"] as? String == "data")
    #expect(data["length"] as? Int == 8192)
    #expect((data["file_offset"] as? Int ?? 0) > 0)
    let gap = try #require(extent(at: 8192))
    #expect(gap["state"] as? String == "unallocated")
    #expect(gap["file_offset"] == nil)
    let zero = try #require(extent(at: 65_536))
    #expect(zero["state"] as? String == "zero")
    #expect(zero["length"] as? Int == 16_384)
    #expect(zero["file_offset"] == nil)
    #expect(map.last?["state"] as? String == "unallocated")
    let covered = map.reduce(0) { $0 + ($1["length"] as? Int ?? 0) }
    #expect(covered == 1 << 20)

    let table = try box.ok(["map", "disk.strata"]).output
    #expect(table.contains("Offset") && table.contains("data") && table.contains("zero"))

    // A snapshot keeps its own map.
    try box.ok(["snapshot", "create", "disk.strata", "s"])
    try box.ok(["write", "disk.strata", "--offset", "512K", "--input", "data"])
    let old = try #require(
      try box.json(["map", "disk.strata", "--snapshot", "s", "--output", "json"]) as? [[String: Any]])
    #expect(old.filter { $0["state"] as? String == "data" }.count == 1)
  }

  @Test func convertRoundTrip() throws {
    let box = try Sandbox()
    // A 32 MiB raw disk, mostly zeros, with data in three places (one crossing a MiB boundary).
    let size = 32 << 20
    var raw = [UInt8](repeating: 0, count: size)
    for (offset, length, seed) in [(0, 512, 5), (3 << 20 - 1000, 70_000, 6), (size - 4096, 4096, 7)] {
      raw.replaceSubrange(offset..<(offset + length), with: randomBytes(length, seed: UInt64(seed)))
    }
    try box.write("disk.img", raw)

    try box.ok(["convert", "disk.img", "disk.strata"])
    let info = try #require(try box.json(["info", "disk.strata", "--output", "json"]) as? [String: Any])
    #expect(info["virtual_size"] as? Int == size)
    #expect(try box.fileSize("disk.strata") < UInt64(size / 8), "the Strata image should store only the data")

    try box.ok(["convert", "disk.strata", "back.img"])
    #expect(try box.fileSize("back.img") == UInt64(size))
    #expect(try box.read("back.img") == raw)

    // Strata to Strata with explicit formats, then back to raw.
    try box.ok(["convert", "-f", "strata", "-O", "strata", "disk.strata", "copy.bin", "--block-size", "16K"])
    try box.ok(["convert", "-f", "strata", "copy.bin", "again.img"])
    #expect(try box.read("again.img") == raw)

    // The destination is not replaced without --force; with it, it is.
    try box.fails(["convert", "disk.strata", "back.img"], status: 1, mentioning: ["already exists"])
    try box.ok(["convert", "disk.strata", "back.img", "--force"])
    try box.fails(["convert", "disk.img", "disk.img"], mentioning: ["same file"])

    // A raw size that is not a multiple of 512 is rounded up.
    let odd = randomBytes(1000, seed: 8)
    try box.write("odd.img", odd)
    try box.ok(["convert", "odd.img", "odd.strata"])
    let oddInfo = try #require(try box.json(["info", "odd.strata", "--output", "json"]) as? [String: Any])
    #expect(oddInfo["virtual_size"] as? Int == 1024)
    #expect(
      try box.ok(["read", "odd.strata", "--length", "1024"]).stdout == Data(odd + [UInt8](repeating: 0, count: 24)))
  }

  @Test func convertSnapshot() throws {
    let box = try Sandbox()
    try box.ok(["create", "disk.strata", "--size", "1M"])
    let old = randomBytes(5000, seed: 9)
    try box.write("old", old)
    try box.write("new", randomBytes(5000, seed: 10))
    try box.ok(["write", "disk.strata", "--input", "old"])
    try box.ok(["snapshot", "create", "disk.strata", "s"])
    try box.ok(["write", "disk.strata", "--input", "new"])
    try box.ok(["convert", "--snapshot", "s", "disk.strata", "s.img"])
    let bytes = try box.read("s.img")
    #expect(bytes.count == 1 << 20)
    #expect(Array(bytes.prefix(5000)) == old)
    #expect(bytes.dropFirst(5000).allSatisfy { $0 == 0 })
    try box.fails(["convert", "--snapshot", "nope", "disk.strata", "n.img"], status: 1, mentioning: ["nope"])
    #expect(!FileManager.default.fileExists(atPath: box.path("n.img")), "a failed convert leaves no destination")
    try box.fails(["convert", "--snapshot", "s", "s.img", "x.strata"], mentioning: ["snapshot"])
  }

  @Test func resize() throws {
    let box = try Sandbox()
    try box.ok(["create", "disk.strata", "--size", "1M"])
    func size() throws -> Int? {
      (try box.json(["info", "disk.strata", "--output", "json"]) as? [String: Any])?["virtual_size"] as? Int
    }
    try box.ok(["resize", "disk.strata", "+1M"])
    #expect(try size() == 2 << 20)
    try box.ok(["resize", "disk.strata", "4M"])
    #expect(try size() == 4 << 20)
    try box.fails(["resize", "disk.strata", "1M"], status: 1, mentioning: ["--shrink"])
    #expect(try size() == 4 << 20)
    try box.ok(["resize", "--shrink", "disk.strata", "--", "-1M"])
    #expect(try size() == 3 << 20)
    try box.ok(["resize", "disk.strata", "2M", "--shrink"])
    #expect(try size() == 2 << 20)
    try box.fails(["resize", "disk.strata", "1000"], mentioning: ["512"])
    try box.fails(["resize", "--shrink", "disk.strata", "--", "-2M"], mentioning: ["shrink"])
  }

  @Test(arguments: [
    [], ["create"], ["info"], ["map"], ["read"], ["write"], ["snapshot"], ["snapshot", "create"],
    ["snapshot", "list"], ["snapshot", "delete"], ["snapshot", "restore"], ["convert"], ["resize"], ["clone"],
    ["branch"], ["branch", "list"], ["branch", "delete"],
  ])
  func help(_ command: [String]) throws {
    let box = try Sandbox()
    let r = try box.ok(command + ["--help"])
    #expect(r.output.contains("USAGE:"))
    #expect(r.output.contains("OVERVIEW:"))
  }

  @Test func badArguments() throws {
    let box = try Sandbox()
    try box.fails(["create", "disk.strata"], mentioning: ["--size"])
    try box.fails(["create", "disk.strata", "--size", "12Q"], mentioning: ["12Q", "suffix"])
    try box.fails(["create", "disk.strata", "--size", "1000"], mentioning: ["512"])
    try box.fails(["create", "disk.strata", "--size", "0"], mentioning: ["zero"])
    try box.fails(["create", "disk.strata", "--size", "99999999999E"], mentioning: ["too large"])
    try box.fails(
      ["create", "disk.strata", "--size", "1M", "--block-size", "5000"], status: 1, mentioning: ["block size"])
    #expect(!FileManager.default.fileExists(atPath: box.path("disk.strata")))
    try box.ok(["create", "disk.strata", "--size", "1M"])
    try box.fails(["read", "disk.strata", "--offset=-1", "--length", "1"], mentioning: ["negative"])
    try box.fails(["read", "disk.strata", "--offset", "-1", "--length", "1"])
    try box.fails(["read", "disk.strata", "--offset", "1M", "--length", "1"], status: 1, mentioning: ["outside"])
    try box.fails(["read", "disk.strata", "--offset", "1000K", "--length", "100K"], status: 1, mentioning: ["outside"])
    try box.fails(["read", "disk.strata"], mentioning: ["--length"])
    try box.fails(["info", "disk.strata", "--output", "xml"], mentioning: ["xml"])
    try box.fails(["frobnicate"])
    try box.fails(["info", "missing.strata"], status: 1, mentioning: ["missing.strata"])
    try box.write("big", randomBytes(5000, seed: 11))
    try box.fails(["write", "disk.strata", "--offset", "1M", "--input", "big"], status: 1, mentioning: ["fit"])
    try box.fails(
      ["write", "disk.strata", "--offset", "1020K", "--input", "-"], status: 1, stdin: randomBytes(5000, seed: 12))
    try box.fails(["write", "disk.strata", "--input", "no-such-input"], status: 1, mentioning: ["no-such-input"])
    try box.fails(["snapshot", "list", "disk.strata", "--limit", "-3"])
  }

  @Test func foreignFileIsNotAnImage() throws {
    let box = try Sandbox()
    try box.write("notes.txt", Array("just some text, not a disk image\n".utf8))
    try box.write("empty", [])
    try box.write("noise", randomBytes(3 << 20, seed: 13))
    for file in ["notes.txt", "empty", "noise"] {
      for command in [["info", file], ["read", file, "--length", "1"], ["map", file], ["snapshot", "list", file]] {
        try box.fails(command, status: 63, mentioning: ["not a Strata image"])
      }
    }
    try box.fails(["convert", "-f", "strata", "notes.txt", "out.img"], status: 63, mentioning: ["not a Strata image"])
  }

  @Test func truncatedImageFailsCleanly() throws {
    let box = try Sandbox()
    try box.ok(["create", "disk.strata", "--size", "8M"])
    try box.write("data", randomBytes(3 << 20, seed: 14))
    try box.ok(["write", "disk.strata", "--input", "data"])
    let size = try box.fileSize("disk.strata")
    try FileHandle(forUpdating: URL(fileURLWithPath: box.path("disk.strata"))).truncate(atOffset: size / 2)
    // The newest checkpoint is gone: info reports the damage, the other commands refuse the
    // image rather than serve an older state as if it were current.
    let info = try #require(try box.json(["info", "disk.strata", "--output", "json"]) as? [String: Any])
    #expect((info["recovery_problems"] as? [String])?.isEmpty == false)
    try box.fails(["read", "disk.strata", "--length", "3M"], status: 1, mentioning: ["damaged"])
    try box.fails(["map", "disk.strata"], status: 1, mentioning: ["damaged"])
    try box.fails(["write", "disk.strata", "--input", "data"], status: 1, mentioning: ["damaged"])
    try box.fails(["convert", "disk.strata", "out.img"], status: 1, mentioning: ["damaged"])
    // Cut to less than a page: still no crash.
    try FileHandle(forUpdating: URL(fileURLWithPath: box.path("disk.strata"))).truncate(atOffset: 100)
    try box.fails(["info", "disk.strata"], status: 1)
  }

  @Test func flippedDataBytesFailTheChecksum() throws {
    let box = try Sandbox()
    try box.ok(["create", "disk.strata", "--size", "1M"])
    try box.write("data", randomBytes(16_384, seed: 15))
    try box.ok(["write", "disk.strata", "--offset", "8K", "--input", "data"])
    let map = try #require(try box.json(["map", "disk.strata", "--output", "json"]) as? [[String: Any]])
    let data = try #require(map.first { $0["state"] as? String == "data" })
    let fileOffset = try #require(data["file_offset"] as? Int)
    try box.flip("disk.strata", at: UInt64(fileOffset + 4096 + 100))

    try box.fails(["read", "disk.strata", "--offset", "8K", "--length", "16K"], status: 1, mentioning: ["checksum"])
    // Blocks that are intact still read, and the image still opens.
    try box.ok(["read", "disk.strata", "--offset", "8K", "--length", "4K"])
    try box.ok(["info", "disk.strata"])
    try box.fails(["convert", "disk.strata", "out.img"], status: 1, mentioning: ["checksum"])
    #expect(!FileManager.default.fileExists(atPath: box.path("out.img")))
  }

  #if canImport(Glibc)
    @Test func imageInUseByAnotherProcess() throws {
      let box = try Sandbox()
      try box.ok(["create", "disk.strata", "--size", "1M"])
      // Hold the writer's lock, as another strata process would.
      let fd = open(box.path("disk.strata"), O_RDONLY)
      try #require(fd >= 0)
      defer { close(fd) }
      try #require(flock(fd, LOCK_EX | LOCK_NB) == 0)
      try box.write("data", [1, 2, 3])
      try box.fails(["info", "disk.strata"], status: 1, mentioning: ["in use"])
      try box.fails(["write", "disk.strata", "--input", "data"], status: 1, mentioning: ["in use"])
      try box.fails(["create", "disk.strata", "--size", "1M", "--force"], status: 1, mentioning: ["in use"])
      _ = flock(fd, LOCK_UN)
      try box.ok(["write", "disk.strata", "--input", "data"])
    }
  #endif

  @Test func flippedSuperblocksFail() throws {
    let box = try Sandbox()
    try box.ok(["create", "disk.strata", "--size", "1M"])
    try box.write("data", randomBytes(4096, seed: 16))
    try box.ok(["write", "disk.strata", "--input", "data"])
    // Past the 8-byte magic, so the file still looks like a (damaged) Strata image.
    try box.flip("disk.strata", at: 64)
    try box.ok(["info", "disk.strata"])  // one good superblock is enough
    try box.flip("disk.strata", at: 4096 + 64)
    try box.fails(["info", "disk.strata"], status: 1, mentioning: ["superblock"])
    try box.fails(["read", "disk.strata", "--length", "4096"], status: 1, mentioning: ["superblock"])
  }
}
