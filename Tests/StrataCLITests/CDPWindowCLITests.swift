import Foundation
import StrataCore
import Testing

@testable import StrataCLI

/// `--cdp-window` values: one parser for `create` and `set`.
@Suite struct CDPWindowArgumentTests {
  static let second: UInt64 = 1_000_000_000

  @Test func durations() throws {
    let cases: [(String, UInt64)] = [
      ("90s", 90 * Self.second), ("30m", 1800 * Self.second), ("1h", 3600 * Self.second),
      ("12H", 12 * 3600 * Self.second), ("7d", 7 * 86_400 * Self.second), ("2w", 14 * 86_400 * Self.second),
      ("1.5h", 5400 * Self.second), ("0.5s", Self.second / 2), (" 1h ", 3600 * Self.second),
      ("0.000000001s", 1), ("30000w", 30_000 * 604_800 * Self.second),
    ]
    for (text, ns) in cases {
      #expect(try CDPWindowArgument.parse(text) == .window(.duration(nanoseconds: ns)), "\(text)")
    }
  }

  @Test func sizes() throws {
    let cases: [(String, UInt64)] = [
      ("512M", 512 << 20), ("10G", 10 << 30), ("1T", 1 << 40), ("64K", 64 << 10), ("64k", 64 << 10),
      ("1.5G", 3 << 29), ("2GiB", 2 << 30), ("3mib", 3 << 20), ("4096B", 4096), ("1E", 1 << 60),
    ]
    for (text, bytes) in cases {
      #expect(try CDPWindowArgument.parse(text) == .window(.size(bytes: bytes)), "\(text)")
    }
  }

  @Test func minutesAreLowerCaseAndMebibytesUpperCase() throws {
    #expect(try CDPWindowArgument.parse("30m") == .window(.duration(nanoseconds: 1800 * Self.second)))
    #expect(try CDPWindowArgument.parse("30M") == .window(.size(bytes: 30 << 20)))
  }

  @Test func none() throws {
    #expect(try CDPWindowArgument.parse("none") == CDPWindowArgument.none)
    #expect(try CDPWindowArgument.parse("NONE").window == nil)
  }

  @Test(arguments: [
    ("30", "needs a unit"), ("0s", "longer than zero"), ("0G", "longer than zero"), ("0.0h", "longer than zero"),
    ("10x", "unknown unit"), ("1.5.2h", "not a number"), ("1.h", "not a number"), ("", "not a CDP window"),
    ("h", "not a CDP window"), ("-1h", "negative"), ("0x10", "unknown unit"), ("99999999999999999w", "too long"),
    ("20000000000000000000s", "too long"), ("16E", "too large"), ("1.0000000000000000001h", "too many decimals"),
    ("1ms", "unknown unit"), ("1.5B", "whole"),
  ])
  func rejected(text: String, reason: String) {
    do {
      let parsed = try CDPWindowArgument.parse(text)
      Issue.record("'\(text)' parsed as \(parsed)")
    } catch {
      #expect("\(error)".contains(reason), "'\(text)': \(error)")
    }
  }

  @Test func formatRoundTrips() throws {
    let windows: [CDPWindow] = [
      .duration(nanoseconds: 3600 * Self.second), .duration(nanoseconds: 90 * 60 * Self.second),
      .duration(nanoseconds: 14 * 86_400 * Self.second), .duration(nanoseconds: 1_500_000_000),
      .duration(nanoseconds: 1), .duration(nanoseconds: .max), .size(bytes: 10 << 30), .size(bytes: 1000),
      .size(bytes: 3 << 29), .size(bytes: .max),
    ]
    for window in windows {
      let text = CDPWindowArgument.format(window)
      #expect(try CDPWindowArgument.parse(text) == .window(window), "\(text)")
    }
    #expect(CDPWindowArgument.format(.duration(nanoseconds: 3600 * Self.second)) == "1h")
    #expect(CDPWindowArgument.format(.duration(nanoseconds: 90 * 60 * Self.second)) == "90m")
    #expect(CDPWindowArgument.format(.duration(nanoseconds: 1_500_000_000)) == "1.5s")
    #expect(CDPWindowArgument.format(.size(bytes: 10 << 30)) == "10G")
    #expect(CDPWindowArgument.format(.size(bytes: 1000)) == "1000B")
  }
}

@Suite(
  "strata --cdp-window",
  .enabled(
    if: strataBinary != nil,
    "the strata executable was not found: build it with 'swift build --build-tests' or set STRATA_BIN"))
struct CDPWindowCLITests {
  func info(_ sandbox: Sandbox, _ image: String) throws -> [String: Any] {
    try #require(try sandbox.json(["info", image, "--output", "json"]) as? [String: Any])
  }

  @Test func createSetAndInfo() throws {
    let s = try Sandbox()
    let created = try s.ok(["create", "vm.strata", "--size", "16M", "--cdp-window", "1h"])
    #expect(created.output.contains("cdp_window=1h"))
    var json = try info(s, "vm.strata")
    #expect(json["cdp_window"] as? String == "1h")
    #expect(json["cdp_window_ns"] as? UInt64 == 3_600_000_000_000)
    #expect(json["cdp_window_bytes"] == nil)
    // A fresh image: everything is inside the window, from the genesis checkpoint on.
    #expect(json["cdp_retained_seq"] as? Int == 3)
    #expect(try s.ok(["info", "vm.strata"]).output.contains("cdp window: 1h"))

    try s.ok(["write", "vm.strata", "--offset", "0", "--input", "-"], stdin: randomBytes(8192, seed: 1))
    let set = try s.ok(["set", "vm.strata", "--cdp-window", "10G"])
    #expect(set.output.contains("10G") && set.output.contains("was 1h"))
    json = try info(s, "vm.strata")
    #expect(json["cdp_window"] as? String == "10G")
    #expect(json["cdp_window_bytes"] as? UInt64 == 10 << 30)
    #expect(json["cdp_window_ns"] == nil)
    let timeline = try #require(try s.json(["timeline", "vm.strata", "--output", "json"]) as? [[String: Any]])
    #expect(json["cdp_retained_seq"] as? UInt64 == timeline.first?["seq"] as? UInt64, "10G keeps it all")
    #expect(try s.ok(["info", "vm.strata"]).output.contains("10 GiB of log"))
    // The data is untouched, and the window survives a write (which checkpoints at close).
    try s.ok(["write", "vm.strata", "--offset", "1M", "--input", "-"], stdin: randomBytes(4096, seed: 2))
    #expect(try info(s, "vm.strata")["cdp_window"] as? String == "10G")

    try s.ok(["set", "vm.strata", "--cdp-window", "30m"])
    #expect(try info(s, "vm.strata")["cdp_window"] as? String == "30m")
    try s.ok(["set", "vm.strata", "--cdp-window", "none"])
    json = try info(s, "vm.strata")
    #expect(json["cdp_window"] == nil && json["cdp_retained_seq"] == nil)
    #expect(!(try s.ok(["info", "vm.strata"]).output.contains("cdp window")))
    try s.ok(["check", "vm.strata"])
  }

  @Test func badValuesFailClearly() throws {
    let s = try Sandbox()
    try s.fails(
      ["create", "a.strata", "--size", "16M", "--cdp-window", "30"], status: 64, mentioning: ["needs a unit"])
    #expect(!FileManager.default.fileExists(atPath: s.path("a.strata")), "nothing created")
    try s.fails(
      ["create", "a.strata", "--size", "16M", "--cdp-window", "1y"], status: 64, mentioning: ["unknown unit"])
    try s.ok(["create", "a.strata", "--size", "16M"])
    try s.fails(["set", "a.strata", "--cdp-window", "0s"], status: 64, mentioning: ["longer than zero"])
    try s.fails(["set", "a.strata", "--cdp-window=-1h"], status: 64, mentioning: ["negative"])
    try s.fails(["set", "a.strata"], status: 64, mentioning: ["--cdp-window"])
    try s.fails(["set", "missing.strata", "--cdp-window", "1h"], status: 1, mentioning: ["missing.strata"])
    try s.write("raw.img", [UInt8](repeating: 0, count: 65536))
    try s.fails(["set", "raw.img", "--cdp-window", "1h"], status: 63)
    #expect(try info(s, "a.strata")["cdp_window"] == nil, "a refused value changes nothing")
    let help = try s.ok(["set", "--help"]).output
    #expect(help.contains("--cdp-window") && help.contains("cleaner") && help.contains("30M is 30 MiB"))
    let timelineHelp = try s.ok(["timeline", "--help"]).output
    #expect(timelineHelp.contains("CDP window"))
  }

  @Test func timelineSinceSeqAndTime() throws {
    let s = try Sandbox()
    try s.ok(["create", "vm.strata", "--size", "16M", "--cdp-window", "7d"])
    for i in 0..<4 {
      try s.ok(
        ["write", "vm.strata", "--offset", "\(i * 4096)", "--input", "-"], stdin: randomBytes(4096, seed: UInt64(i)))
    }
    let all = try #require(try s.json(["timeline", "vm.strata", "--output", "json"]) as? [[String: Any]])
    #expect(all.count >= 5)
    let middle = all[all.count / 2]
    let seq = try #require(middle["seq"] as? UInt64)
    let since = try #require(
      try s.json(["timeline", "vm.strata", "--since", "\(seq)", "--output", "json"]) as? [[String: Any]])
    #expect(since.first?["seq"] as? UInt64 == seq)
    #expect(since.allSatisfy { ($0["seq"] as? UInt64 ?? 0) >= seq })
    let time = try #require(middle["time"] as? String)
    let byTime = try #require(
      try s.json(["timeline", "vm.strata", "--since", time, "--output", "json"]) as? [[String: Any]])
    #expect((byTime.first?["seq"] as? UInt64 ?? .max) <= seq)
    #expect(byTime.contains { $0["seq"] as? UInt64 == seq })
    try s.fails(["timeline", "vm.strata", "--since", "yesterday"], status: 64, mentioning: ["RFC 3339"])
  }
}
