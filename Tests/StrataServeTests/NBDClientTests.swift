// `strata serve --nbd` against NBD clients from Debian packages (libnbd-bin: nbdinfo, nbdcopy;
// qemu-utils: qemu-img; fio's nbd engine), each started as a process by the test.

import Foundation
import Glibc
import StrataCore
import StrataTestSupport
import Testing

/// The full path of a program on PATH, or nil.
func findProgram(_ name: String) -> String? {
  let path = ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin:/bin"
  return path.split(separator: ":").map { "\($0)/\(name)" }.first { access($0, X_OK) == 0 }
}

let nbdinfo = findProgram("nbdinfo")
let nbdcopy = findProgram("nbdcopy")
let qemuImg = findProgram("qemu-img")
let fio = findProgram("fio")
let nbdClientsPresent = strataBinary != nil && nbdinfo != nil && nbdcopy != nil && qemuImg != nil && fio != nil
let nbdClientsMissing =
  "needs the strata binary and nbdinfo, nbdcopy (libnbd-bin), qemu-img (qemu-utils) and fio: scripts/setup.sh installs them"

/// The layout every test here starts from, written through the library before the server runs:
///   1 MiB + 4 MiB  data A          (snapshot s1 and head)
///   8 MiB + 1 MiB  written zeroes  (snapshot s1 and head)
///   2 MiB + 64 KiB data B          (head only: written after s1)
///  32 MiB + 128 KiB data C         (head only)
struct NBDLayout {
  static let size: UInt64 = 64 << 20
  static let a = pattern(4 << 20, seed: 1)
  static let b = pattern(64 << 10, seed: 2)
  static let c = pattern(128 << 10, seed: 3)

  static func prepare(_ s: ServeProcess) throws {
    let img = try StrataImage.open(path: s.image)
    try img.write(a, at: 1 << 20)
    try img.writeZeroes(at: 8 << 20, length: 1 << 20)
    try img.createSnapshot(name: "s1")
    try img.write(b, at: 2 << 20)
    try img.write(c, at: 32 << 20)
    try img.close()
  }

  static var snapshot: [UInt8] {
    var d = [UInt8](repeating: 0, count: Int(size))
    d.replaceSubrange((1 << 20)..<(5 << 20), with: a)
    return d
  }

  static var head: [UInt8] {
    var d = snapshot
    d.replaceSubrange((2 << 20)..<((2 << 20) + (64 << 10)), with: b)
    d.replaceSubrange((32 << 20)..<((32 << 20) + (128 << 10)), with: c)
    return d
  }
}

extension ServeProcess {
  func nbdURI(_ export: String) -> String { "nbd+unix:///\(export)?socket=\(nbdPath)" }

  /// Waits until the NBD socket accepts connections.
  func waitForNBD() throws {
    let deadline = Date().addingTimeInterval(15)
    while !socketAccepts(nbdPath) {
      guard isAlive(), Date() < deadline else { throw ServeTestError("no NBD socket; log:\n\(logTail)") }
      usleep(10_000)
    }
  }

  /// Runs a client program (killed after 120 s).
  func client(_ program: String?, _ arguments: [String]) throws -> StrataRun {
    guard let program else { throw ServeTestError(nbdClientsMissing) }
    return try runProgram(program, arguments, in: directory, seconds: 120)
  }

  func read(_ path: String) throws -> [UInt8] { [UInt8](try Data(contentsOf: URL(fileURLWithPath: path))) }
}

/// The first three columns of `nbdinfo --map`: offset, length, flags.
func parseMap(_ out: [UInt8]) -> [[UInt64]] {
  String(decoding: out, as: UTF8.self).split(separator: "\n").map { line in
    line.split(separator: " ", omittingEmptySubsequences: true).prefix(3).compactMap { UInt64($0) }
  }
}

@Suite(.enabled(if: nbdClientsPresent, Comment(rawValue: nbdClientsMissing)))
struct NBDClientTests {
  @Test func qemuImgConvertAndCompareHeadAndSnapshot() throws {
    try withServer(vhost: false, nbd: true, prepare: NBDLayout.prepare) { s in
      try s.waitForNBD()
      let headFile = s.directory + "/head.raw"
      let snapFile = s.directory + "/s1.raw"
      for (export, file) in [("", headFile), ("snapshot/s1", snapFile)] {
        let r = try s.client(qemuImg, ["convert", "-f", "raw", "-O", "raw", s.nbdURI(export), file])
        #expect(r.succeeded, "qemu-img convert \(export): \(r.stderr)")
      }
      #expect(try s.read(headFile) == NBDLayout.head)
      #expect(try s.read(snapFile) == NBDLayout.snapshot)
      let same = try s.client(qemuImg, ["compare", "-f", "raw", "-F", "raw", s.nbdURI("head"), headFile])
      #expect(same.succeeded, "qemu-img compare head: \(same.stderr)")
      let differ = try s.client(qemuImg, ["compare", "-f", "raw", "-F", "raw", s.nbdURI("snapshot/s1"), headFile])
      #expect(exitCode(differ.status) == 1, "the snapshot must differ from the head")
      #expect(String(decoding: differ.stdout, as: UTF8.self).contains("mismatch at offset \(2 << 20)"))
      // Writes through qemu-img land in the head only.
      let patch = s.directory + "/patch.raw"
      try Data(pattern(1 << 20, seed: 9)).write(to: URL(fileURLWithPath: patch))
      let c = try s.client(qemuImg, ["convert", "-n", "-f", "raw", "-O", "raw", patch, s.nbdURI("head")])
      #expect(c.succeeded, "qemu-img convert -n into the head: \(c.stderr)")
      let back = try s.client(qemuImg, ["convert", "-f", "raw", "-O", "raw", s.nbdURI("head"), headFile])
      #expect(back.succeeded)
      var expected = NBDLayout.head
      expected.replaceSubrange(0..<(1 << 20), with: pattern(1 << 20, seed: 9))
      #expect(try s.read(headFile) == expected)
      let snap = try s.client(qemuImg, ["convert", "-f", "raw", "-O", "raw", s.nbdURI("snapshot/s1"), snapFile])
      #expect(snap.succeeded)
      #expect(try s.read(snapFile) == NBDLayout.snapshot)
    }
  }

  @Test func nbdinfoListsExportsAndMapsAllocationAndChanges() throws {
    try withServer(vhost: false, nbd: true, prepare: NBDLayout.prepare) { s in
      try s.waitForNBD()
      let list = try s.client(nbdinfo, ["--list", "nbd+unix://?socket=\(s.nbdPath)"])
      let text = String(decoding: list.stdout, as: UTF8.self)
      #expect(list.succeeded, "\(list.stderr)")
      #expect(text.contains("export=\"head\""))
      #expect(text.contains("export=\"snapshot/s1\""))
      #expect(text.contains("strata:changed:s1"))
      #expect(text.contains("can_multi_conn: true"))

      let m: UInt64 = 1 << 20
      let map = try s.client(nbdinfo, ["--map", s.nbdURI("head")])
      #expect(map.succeeded, "\(map.stderr)")
      #expect(
        parseMap(map.stdout) == [
          [0, m, 3], [m, 4 * m, 0], [5 * m, 3 * m, 3], [8 * m, m, 2], [9 * m, 23 * m, 3], [32 * m, 128 << 10, 0],
          [32 * m + (128 << 10), 32 * m - (128 << 10), 3],
        ])
      let changed = try s.client(nbdinfo, ["--map=strata:changed:s1", s.nbdURI("head")])
      #expect(changed.succeeded, "\(changed.stderr)")
      #expect(
        parseMap(changed.stdout) == [
          [0, 2 * m, 0], [2 * m, 64 << 10, 1], [2 * m + (64 << 10), 30 * m - (64 << 10), 0], [32 * m, 128 << 10, 1],
          [32 * m + (128 << 10), 32 * m - (128 << 10), 0],
        ])
      // The snapshot export compared with itself: nothing changed.
      let none = try s.client(nbdinfo, ["--map=strata:changed:s1", s.nbdURI("snapshot/s1")])
      #expect(parseMap(none.stdout) == [[0, 64 * m, 0]])

      let pit = try s.client(nbdinfo, [s.nbdURI("at/999999")])
      #expect(!pit.succeeded)
      // (nbdinfo 1.14 does not print the server's message; the raw protocol test reads it.)
      #expect(pit.stderr.contains("No such file or directory for export: at/999999"), "\(pit.stderr)")
      let unknown = try s.client(nbdinfo, [s.nbdURI("snapshot/nope")])
      #expect(!unknown.succeeded)
      #expect(unknown.stderr.contains("No such file or directory"), "\(unknown.stderr)")
    }
  }

  /// `at/SEQ` exports a point in time: at the snapshot's seq it is the snapshot, one operation
  /// later it holds the first write after it (B), and it stays so while the head changes.
  @Test func pointInTimeExports() throws {
    var snapshotSeq: UInt64 = 0
    let prepare: (ServeProcess) throws -> Void = { s in
      try NBDLayout.prepare(s)
      let img = try StrataImage.open(
        path: s.image,
        options: {
          var o = ImageOptions(); o.readOnly = true; return o
        }())
      snapshotSeq = try img.snapshot(named: "s1").seq
      try img.close()
    }
    try withServer(vhost: false, nbd: true, prepare: prepare) { s in
      try s.waitForNBD()
      #expect(snapshotSeq > 0)
      var afterB = NBDLayout.snapshot
      afterB.replaceSubrange((2 << 20)..<((2 << 20) + (64 << 10)), with: NBDLayout.b)
      for (seq, want) in [(snapshotSeq, NBDLayout.snapshot), (snapshotSeq + 2, afterB)] {
        let file = s.directory + "/at\(seq).raw"
        let r = try s.client(qemuImg, ["convert", "-f", "raw", "-O", "raw", s.nbdURI("at/\(seq)"), file])
        #expect(r.succeeded, "\(r.stderr)")
        #expect(try s.read(file) == want, "at/\(seq)")
      }
      let info = try s.client(nbdinfo, [s.nbdURI("at/\(snapshotSeq)")])
      #expect(String(decoding: info.stdout, as: UTF8.self).contains("is_read_only: true"))
      // Changes since a point of the timeline: at the snapshot's seq, the same as since the snapshot.
      let sincePoint = try s.client(nbdinfo, ["--map=strata:changed:at/\(snapshotSeq)", s.nbdURI("head")])
      let sinceSnapshot = try s.client(nbdinfo, ["--map=strata:changed:s1", s.nbdURI("head")])
      #expect(sincePoint.succeeded, "\(sincePoint.stderr)")
      #expect(sincePoint.stdout == sinceSnapshot.stdout && !sincePoint.stdout.isEmpty)
      // at/TIME: the latest point at or before the time; far ahead, that is the last flush (the
      // head as the image was closed); before the image existed, there is none.
      let latest = s.directory + "/latest.raw"
      let head = s.directory + "/head.raw"
      for (name, file) in [("at/2100-01-01T00:00:00Z", latest), ("head", head)] {
        let r = try s.client(qemuImg, ["convert", "-f", "raw", "-O", "raw", s.nbdURI(name), file])
        #expect(r.succeeded, "\(name): \(r.stderr)")
      }
      #expect(try s.read(latest) == s.read(head), "at/TIME far ahead is the last flush point")
      #expect(!(try s.client(nbdinfo, [s.nbdURI("at/2000-01-01T00:00:00Z")])).succeeded)
    }
  }

  /// A backup of a snapshot while the head keeps changing is the snapshot, byte for byte.
  @Test func nbdcopyOfASnapshotWhileFioWritesTheHead() throws {
    try withServer(vhost: false, nbd: true, prepare: NBDLayout.prepare) { s in
      try s.waitForNBD()
      guard let fio else { throw ServeTestError(nbdClientsMissing) }
      let writer = try spawnProcess(
        fio,
        [
          "--name=w", "--ioengine=nbd", "--uri=\(s.nbdURI("head"))", "--rw=randwrite", "--bs=4k", "--iodepth=16",
          "--size=16M", "--io_size=64M", "--randrepeat=1",
        ], stdoutPath: s.directory + "/fio.out", stderrPath: s.directory + "/fio.err")
      let copy = s.directory + "/backup.raw"
      let r = try s.client(nbdcopy, [s.nbdURI("snapshot/s1"), copy])
      guard let status = waitStatus(writer, seconds: 120) else {
        kill(writer, SIGKILL)
        throw ServeTestError("fio did not finish")
      }
      #expect(r.succeeded, "nbdcopy: \(r.stderr)")
      #expect(exitedNormally(status) && exitCode(status) == 0, "fio: \(describeStatus(status))")
      #expect(try s.read(copy) == NBDLayout.snapshot)
      // The head did change meanwhile.
      let head = s.directory + "/head.raw"
      #expect(try s.client(nbdcopy, [s.nbdURI("head"), head]).succeeded)
      #expect(try s.read(head) != NBDLayout.head)
    }
  }

  /// fio writes with checksums on two connections at once, verifies, and after a restart of
  /// the server verifies again: the writes reached the image.
  @Test func fioRandomWritesVerifyAcrossConnectionsAndRestart() throws {
    try withServer(vhost: false, nbd: true) { s in
      try s.waitForNBD()
      let job = [
        "--name=v", "--ioengine=nbd", "--uri=\(s.nbdURI(""))", "--bs=4k", "--iodepth=32", "--size=8M",
        "--numjobs=2", "--offset_increment=16M", "--verify=crc32c", "--randrepeat=1", "--group_reporting",
        "--verify_state_save=0",
      ]
      let write = try s.client(fio, job + ["--rw=randwrite", "--do_verify=1"])
      #expect(write.succeeded, "fio write+verify: \(write.stderr)\n\(String(decoding: write.stdout, as: UTF8.self))")
      s.stop()
      try s.restart()
      try s.waitForNBD()
      let verify = try s.client(fio, job + ["--rw=randread", "--verify_only"])
      let out = String(decoding: verify.stdout, as: UTF8.self)
      #expect(verify.succeeded, "fio verify after restart: \(verify.stderr)\n\(out)")
      #expect(out.contains("err= 0"))
      #expect(!out.contains("verify: bad"))
    }
  }
}

/// A TCP port nothing listens on right now (bound to port 0 and released).
func freeTCPPort() throws -> UInt16 {
  let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
  defer { close(fd) }
  var address = sockaddr_in()
  address.sin_family = sa_family_t(AF_INET)
  address.sin_addr.s_addr = inet_addr("127.0.0.1")
  var length = socklen_t(MemoryLayout<sockaddr_in>.size)
  let r = withUnsafeMutablePointer(to: &address) {
    $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
      bind(fd, $0, length) == 0 && getsockname(fd, $0, &length) == 0
    }
  }
  guard r else { throw ServeTestError("no free port: errno \(errno)") }
  return UInt16(bigEndian: address.sin_port)
}

@Test(.enabled(if: nbdClientsPresent, Comment(rawValue: nbdClientsMissing)))
func nbdOverTCP() throws {
  let port = try freeTCPPort()
  try withServer(arguments: ["--nbd", "tcp:127.0.0.1:\(port)"], vhost: false, prepare: NBDLayout.prepare) { s in
    // No socket file to wait for: retry the client while the server starts.
    let uri = "nbd://127.0.0.1:\(port)/snapshot/s1"
    let copy = s.directory + "/s1.raw"
    var r = try s.client(qemuImg, ["convert", "-f", "raw", "-O", "raw", uri, copy])
    while !r.succeeded && s.isAlive() && r.stderr.contains("Connection refused") {
      usleep(20_000)
      r = try s.client(qemuImg, ["convert", "-f", "raw", "-O", "raw", uri, copy])
    }
    #expect(r.succeeded, "\(r.stderr)")
    #expect(try s.read(copy) == NBDLayout.snapshot)
  }
}

/// A snapshot taken through the control socket while the server runs is exported at once, frozen,
/// and the changed-blocks context sees what was written after it.
@Test(.enabled(if: nbdClientsPresent, Comment(rawValue: nbdClientsMissing)))
func snapshotThroughTheControlSocketIsExportedLive() throws {
  let control = "/tmp/strata-nbd-control-\(UUID().uuidString.prefix(8)).sock"
  defer { unlink(control) }
  try withServer(size: 16 << 20, arguments: ["--control", control], vhost: false, nbd: true) { s in
    try s.waitForNBD()
    let first = s.directory + "/first.raw"
    let second = s.directory + "/second.raw"
    try Data(pattern(1 << 20, seed: 21)).write(to: URL(fileURLWithPath: first))
    try Data(pattern(256 << 10, seed: 22)).write(to: URL(fileURLWithPath: second))
    #expect(try s.client(qemuImg, ["convert", "-n", "-f", "raw", "-O", "raw", first, s.nbdURI("head")]).succeeded)
    let snap = try s.strata(["snapshot", "create", s.image, "live", "--control", control])
    #expect(snap.succeeded, "\(snap.stderr)")
    // Overwrites the first 256 KiB of the head after the snapshot.
    #expect(try s.client(qemuImg, ["convert", "-n", "-f", "raw", "-O", "raw", second, s.nbdURI("head")]).succeeded)

    let copy = s.directory + "/live.raw"
    let r = try s.client(nbdcopy, [s.nbdURI("snapshot/live"), copy])
    #expect(r.succeeded, "\(r.stderr)")
    #expect(try s.read(copy) == pattern(1 << 20, seed: 21) + [UInt8](repeating: 0, count: 15 << 20))
    let changed = try s.client(nbdinfo, ["--map=strata:changed:live", s.nbdURI("head")])
    let k: UInt64 = 1024
    #expect(parseMap(changed.stdout) == [[0, 256 * k, 1], [256 * k, 16 * k * k - 256 * k, 0]])
  }
}
