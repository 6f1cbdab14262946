// `strata serve --control`: snapshots, live resize with the config-change message, status, and
// bad requests, driven through the `strata` command's --control options and a raw socket.

import Foundation
import Glibc
import StrataControl
import StrataCore
import Testing
import VhostClient
import VhostProtocol

@Suite struct StrataServeControlTests {
  /// Reads one back-end request from the BACKEND_REQ channel, waiting up to 10 s.
  private func backendRequest(_ fd: Int32) throws -> VhostHeader {
    var fds = [pollfd(fd: fd, events: Int16(POLLIN), revents: 0)]
    guard poll(&fds, 1, 10_000) == 1 else { throw ServeTestError("no message on the BACKEND_REQ channel") }
    var bytes = [UInt8](repeating: 0, count: VhostHeader.size)
    guard read(fd, &bytes, bytes.count) == bytes.count else { throw ServeTestError("short BACKEND_REQ message") }
    return try bytes.withUnsafeBytes { (b) throws(VhostError) in try VhostHeader.decode(b) }
  }

  /// Sends raw request lines on one connection and returns one reply per line.
  private func rawExchange(_ path: String, _ lines: [String]) throws -> [[String: Any]] {
    let fd = try UnixSocket.connect(path: path)
    defer { close(fd) }
    var replies: [[String: Any]] = []
    var pending: [UInt8] = []
    for line in lines {
      let bytes = Array((line + "\n").utf8)
      guard write(fd, bytes, bytes.count) == bytes.count else { throw ServeTestError("write to the control socket") }
      while !pending.contains(UInt8(ascii: "\n")) {
        var chunk = [UInt8](repeating: 0, count: 4096)
        let n = read(fd, &chunk, chunk.count)
        guard n > 0 else { throw ServeTestError("the control socket closed") }
        pending += chunk[..<n]
      }
      let end = pending.firstIndex(of: UInt8(ascii: "\n"))!
      let object = try JSONSerialization.jsonObject(with: Data(pending[..<end])) as? [String: Any]
      replies.append(try #require(object))
      pending.removeSubrange(...end)
    }
    return replies
  }

  @Test func snapshotResizeStatusAndBadRequests() throws {
    let control = "/tmp/strata-control-\(UUID().uuidString.prefix(8)).sock"
    defer { unlink(control) }
    try withServer(size: 32 << 20, arguments: ["--control", control]) { s in
      var options = ServeProcess.options(queues: 1)
      options.protocolFeatures |= VhostProtocolFeature.backendReq.bit
      let c = try s.client(options, start: false)
      defer { c.shutdown() }
      try c.negotiate()
      var pair: [Int32] = [-1, -1]
      #expect(socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0, &pair) == 0)
      defer { close(pair[0]) }
      _ = try c.send(.setBackendReqFd, fds: [pair[1]])
      close(pair[1])
      try c.start()

      let before = pattern(8192, seed: 1)
      #expect(try c.perform(.write(sector: 0, data: before)).isOK)
      // The snapshot holds every write acknowledged before it, without a flush from the guest.
      let snap = try s.strata(["snapshot", "create", s.image, "before", "--control", control, "--output", "json"])
      #expect(snap.succeeded, "snapshot create: \(snap.stderr)")
      let after = pattern(8192, seed: 2)
      #expect(try c.perform(.write(sector: 0, data: after)).isOK)

      let grown = try s.strata(["resize", s.image, "+16M", "--control", control])
      #expect(grown.succeeded, "resize: \(grown.stderr)")
      let message = try backendRequest(pair[0])
      #expect(message.request == VhostBackendRequest.configChangeMsg.rawValue)
      #expect(try c.getConfig()?.capacitySectors == (48 << 20) / 512)
      let tail = try c.perform(.read(sector: (44 << 20) / 512, length: 4096))
      #expect(tail.isOK && tail.data == [UInt8](repeating: 0, count: 4096), "the new space reads as zeros")

      let shrink = try s.strata(["resize", s.image, "--control", control, "--", "-1M"])
      #expect(!shrink.succeeded && shrink.stderr.contains("only grow"), "shrink: \(shrink.stderr)")

      let status = try ControlClient.request(["command": "status"], path: control)
      #expect((status["image"] as? [String: Any])?["size"] as? Int == 48 << 20)
      #expect((status["image"] as? [String: Any])?["snapshots"] as? Int == 1)
      let vhost = try #require(status["vhost"] as? [String: Any])
      #expect(vhost["connected"] as? Bool == true)
      let queues = try #require(vhost["queues"] as? [[String: Any]])
      #expect(queues.count == 1 && queues[0]["completed"] as? Int == 3, "\(queues)")

      let replies = try rawExchange(
        control, ["not json", "{\"command\":\"explode\"}", "{\"command\":\"snapshot\"}", "{\"command\":\"flush\"}"])
      #expect(replies.map { $0["ok"] as? Bool } == [false, false, false, true])
      #expect((replies[1]["error"] as? String ?? "").contains("unknown command"))
      #expect(throws: StrataError.self) {
        try ControlClient.request(["command": "snapshot", "name": "before"], path: control)
      }
      #expect(try c.perform(.read(sector: 0, length: 8192)).data == after, "the guest's disk is intact")
      s.stop()
      let kept = try s.strata(["read", s.image, "--offset", "0", "--length", "8192", "--snapshot", "before"])
      #expect(kept.succeeded && kept.stdout == before, "snapshot contents: \(kept.stderr)")
      let info = try s.strata(["info", s.image, "--output", "json"])
      #expect(String(decoding: info.stdout, as: UTF8.self).contains("\(48 << 20)"), "size after restart")
    }
    // The socket goes away with the server; the snapshot and the new size stay in the image.
    #expect(access(control, F_OK) != 0)
  }

  /// Snapshot deletion, pruning and the CDP window of a served image, through the `strata`
  /// command's --control options (the server does the work, the guest keeps its disk), and the
  /// bad requests of each.
  @Test func deletePruneAndSetWhileServing() throws {
    let control = "/tmp/strata-control-\(UUID().uuidString.prefix(8)).sock"
    defer { unlink(control) }
    try withServer(size: 16 << 20, arguments: ["--control", control]) { s in
      let c = try s.client(ServeProcess.options(queues: 1))
      defer { c.shutdown() }
      let data = pattern(4096, seed: 7)
      #expect(try c.perform(.write(sector: 8, data: data)).isOK)
      for name in ["a1", "a2", "a3", "b1"] {
        let r = try s.strata(["snapshot", "create", s.image, name, "--control", control])
        #expect(r.succeeded, "snapshot create \(name): \(r.stderr)")
      }
      let deleted = try s.strata(["snapshot", "delete", s.image, "a1", "--control", control])
      #expect(deleted.succeeded, "snapshot delete: \(deleted.stderr)")
      let pruned = try s.strata([
        "snapshot", "prune", s.image, "--prefix", "a", "--keep-last", "1", "--control", control, "--output", "json",
      ])
      #expect(pruned.succeeded, "prune: \(pruned.stderr)")
      let names = (try JSONSerialization.jsonObject(with: Data(pruned.stdout)) as? [[String: Any]])?.map {
        $0["name"] as? String
      }
      #expect(names == ["a2"], "pruned: \(String(decoding: pruned.stdout, as: UTF8.self))")
      let set = try s.strata(["set", s.image, "--cdp-window", "2h", "--control", control])
      #expect(set.succeeded && String(decoding: set.stdout, as: UTF8.self).contains("2h"), "set: \(set.stderr)")
      let again = try s.strata(["set", s.image, "--cdp-window", "none", "--control", control])
      #expect(String(decoding: again.stdout, as: UTF8.self).contains("was 2h"), "set: \(again.stdout)")
      #expect(try s.strata(["set", s.image, "--cdp-window", "512M", "--control", control]).succeeded)

      let replies = try rawExchange(
        control,
        [
          "{\"command\":\"delete_snapshot\",\"name\":\"nope\"}", "{\"command\":\"delete_snapshot\"}",
          "{\"command\":\"prune\",\"prefix\":\"a\"}", "{\"command\":\"prune\",\"keep_last\":-1}",
          "{\"command\":\"set\"}", "{\"command\":\"set\",\"cdp_window_ns\":5,\"cdp_window_bytes\":5}",
        ])
      #expect(replies.allSatisfy { $0["ok"] as? Bool == false }, "\(replies)")
      #expect((replies[0]["error"] as? String ?? "").contains("nope"), "\(replies[0])")
      #expect((replies[2]["error"] as? String ?? "").contains("keep_"), "\(replies[2])")
      #expect(try c.perform(.read(sector: 8, length: 4096)).data == data, "the guest's disk is intact")
      s.stop()
      let list = try s.strata(["snapshot", "list", s.image, "--output", "json"])
      let left = (try JSONSerialization.jsonObject(with: Data(list.stdout)) as? [[String: Any]])?.compactMap {
        $0["name"] as? String
      }
      #expect(left.map(Set.init) == ["a3", "b1"], "snapshots left: \(String(describing: left))")
      let info = try #require(
        try JSONSerialization.jsonObject(with: Data(s.strata(["info", s.image, "--output", "json"]).stdout))
          as? [String: Any])
      #expect((info["cdp_window_bytes"] as? NSNumber)?.uint64Value == 512 << 20, "\(info)")
    }
  }

  /// While the guest overwrites its disk, the background cleaner frees segments (reported in
  /// `status`), the guest reads back what it wrote, and `compact --control` runs a whole pass.
  @Test func backgroundCleanerReclaimsWhileServing() throws {
    let control = "/tmp/strata-control-\(UUID().uuidString.prefix(8)).sock"
    defer { unlink(control) }
    let size = 16 << 20
    try withServer(size: UInt64(size), arguments: ["--control", control]) { s in
      let c = try s.client(ServeProcess.options(queues: 1))
      defer { c.shutdown() }
      let chunk = 64 << 10
      var expected = [[UInt8]](repeating: [], count: size / chunk)
      var freed = 0
      var round: UInt64 = 0
      let deadline = Date().addingTimeInterval(60)
      while freed == 0 && Date() < deadline {
        round += 1
        for i in 0..<expected.count {
          let data = pattern(chunk, seed: round << 16 | UInt64(i))
          #expect(try c.perform(.write(sector: UInt64(i * chunk / 512), data: data)).isOK)
          expected[i] = data
        }
        let status = try ControlClient.request(["command": "status"], path: control)
        freed = (status["cleaner"] as? [String: Any])?["segments_freed"] as? Int ?? 0
      }
      #expect(freed > 0, "the background cleaner freed nothing after \(round) overwrites of the disk")
      for (i, data) in expected.enumerated() {
        let r = try c.perform(.read(sector: UInt64(i * chunk / 512), length: chunk))
        #expect(r.isOK && r.data == data, "chunk \(i)")
      }
      let pass = try s.strata(["compact", s.image, "--control", control, "--output", "json"])
      #expect(pass.succeeded, "compact --control: \(pass.stderr)")
      #expect(String(decoding: pass.stdout, as: UTF8.self).contains("segments_freed"))
      for (i, data) in expected.enumerated() {
        #expect(try c.perform(.read(sector: UInt64(i * chunk / 512), length: chunk)).data == data, "chunk \(i)")
      }
      s.stop()
      let check = try s.strata(["check", s.image])
      #expect(check.succeeded, "check after serving: \(check.stderr)")
    }
  }

  /// `--snapshot-every` takes auto- snapshots while the guest writes and keeps the newest two;
  /// after the server stops, `snapshot prune` and `timeline` see them.
  @Test func periodicSnapshotsWithRetention() throws {
    let control = "/tmp/strata-control-\(UUID().uuidString.prefix(8)).sock"
    defer { unlink(control) }
    try withServer(
      size: 16 << 20, arguments: ["--control", control, "--snapshot-every", "100ms", "--snapshot-keep", "2"]
    ) { s in
      let c = try s.client(ServeProcess.options(queues: 1))
      defer { c.shutdown() }
      // Keep writing until at least four snapshots were taken (the status counts what remains:
      // two; the timeline will show the auto snapshots taken).
      let deadline = Date().addingTimeInterval(30)
      var round: UInt64 = 0
      var taken = 0
      while taken < 4 && Date() < deadline {
        round += 1
        #expect(try c.perform(.write(sector: 8 * (round % 64), data: pattern(4096, seed: round))).isOK)
        let status = try ControlClient.request(["command": "status"], path: control)
        let snapshots = (status["image"] as? [String: Any])?["snapshots"] as? Int ?? 0
        #expect(snapshots <= 2, "retention keeps two")
        if snapshots == 2 { taken += 1 }
        usleep(50_000)
      }
      #expect(taken >= 4, "no periodic snapshots within 30 s")
      c.shutdown()
      s.stop()
      let list = try s.strata(["snapshot", "list", s.image, "--output", "json"])
      let names = (try JSONSerialization.jsonObject(with: Data(list.stdout)) as? [[String: Any]] ?? []).compactMap {
        $0["name"] as? String
      }
      #expect(names.count == 2 && names.allSatisfy { $0.hasPrefix("auto-") }, "\(names)")
      let pruned = try s.strata(["snapshot", "prune", s.image, "--keep-last", "1", "--prefix", "auto-"])
      #expect(pruned.succeeded && String(decoding: pruned.stdout, as: UTF8.self).contains("Deleted 1 snapshot"))
      let refused = try s.strata(["snapshot", "prune", s.image])
      #expect(!refused.succeeded && refused.stderr.contains("--keep"))
    }
  }
}
