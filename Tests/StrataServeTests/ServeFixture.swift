// Test fixture for `strata serve`: a fresh image in a private directory, the server running as
// a child process, and VhostUserClient front-ends connecting to it.
//
// The tests need the `strata` binary. `swift build --build-tests` builds it together with the
// tests; they find it in this order (as StrataCLITests do):
//   1. the STRATA_BIN environment variable,
//   2. next to the test bundle (the build directory, whatever --scratch-path was used),
//   3. <package root>/.build/debug/strata.

import Foundation
import Glibc
import StrataTestSupport
import Testing
import VhostClient
import VhostProtocol

// MARK: - The binary

/// Where the `strata` executable is, or nil when it has not been built.
let strataBinary: String? = strataExecutable?.path
let binaryMissing = strataExecutableMissing
typealias ServeTestError = TestFailure

struct StrataRun {
  var status: Int32
  var stdout: [UInt8]
  var stderr: String
  var succeeded: Bool { exitedNormally(status) && exitCode(status) == 0 }
}

/// Runs `strata` to completion (killed after 30 s).
func runStrata(_ arguments: [String], in directory: String) throws -> StrataRun {
  guard let binary = strataBinary else { throw ServeTestError(binaryMissing) }
  return try runProgram(binary, arguments, in: directory, seconds: 30)
}

/// Runs a program to completion (killed after `seconds`), capturing its output in `directory`.
func runProgram(_ path: String, _ arguments: [String], in directory: String, seconds: Double) throws -> StrataRun {
  let tag = UUID().uuidString
  let out = "\(directory)/.out-\(tag)"
  let err = "\(directory)/.err-\(tag)"
  defer {
    unlink(out)
    unlink(err)
  }
  let pid = try spawnProcess(path, arguments, stdoutPath: out, stderrPath: err)
  guard let status = waitStatus(pid, seconds: seconds) else {
    kill(pid, SIGKILL)
    _ = waitStatus(pid, seconds: 5)
    throw ServeTestError("\(path) \(arguments.joined(separator: " ")) did not finish in \(seconds) s")
  }
  return StrataRun(
    status: status, stdout: [UInt8]((try? Data(contentsOf: URL(fileURLWithPath: out))) ?? Data()),
    stderr: (try? String(contentsOfFile: err, encoding: .utf8)) ?? "")
}

// MARK: - The server

/// One `strata serve` child on a fresh image in a private directory.
final class ServeProcess {
  let directory: String
  let image: String
  let socketPath: String
  /// The NBD socket (`--nbd unix:PATH`), used when the server was started with `nbd: true`.
  let nbdPath: String
  let logPath: String
  let size: UInt64
  let arguments: [String]
  /// `serve IMAGE` and the listening options, before `arguments`.
  private let serveArguments: [String]
  private(set) var pid: pid_t = 0
  private(set) var status: Int32?

  /// Creates the image (`strata create`), lets `prepare` touch it (with the image path), then
  /// starts `strata serve IMAGE --socket PATH arguments...` (without `--socket` unless `vhost`;
  /// with `--nbd unix:NBDPATH` when `nbd`).
  init(
    size: UInt64 = 64 << 20, arguments: [String] = [], vhost: Bool = true, nbd: Bool = false,
    prepare: ((ServeProcess) throws -> Void)? = nil
  ) throws {
    guard let binary = strataBinary else { throw ServeTestError(binaryMissing) }
    var template = Array("/tmp/strata-serve-XXXXXX".utf8CString)
    guard let d = mkdtemp(&template) else { throw ServeTestError("mkdtemp failed") }
    directory = String(cString: d)
    image = directory + "/disk.strata"
    socketPath = directory + "/vhost.sock"
    nbdPath = directory + "/nbd.sock"
    logPath = directory + "/serve.log"
    self.size = size
    self.arguments = arguments
    serveArguments =
      ["serve", image] + (vhost ? ["--socket", socketPath] : []) + (nbd ? ["--nbd", "unix:" + nbdPath] : [])
    let created = try runStrata(["create", image, "--size", String(size)], in: directory)
    guard created.succeeded else {
      removeDirectory()
      throw ServeTestError("strata create failed (\(describeStatus(created.status))): \(created.stderr)")
    }
    do {
      try prepare?(self)
      pid = try spawnProcess(binary, serveArguments + arguments, stderrPath: logPath)
    } catch {
      removeDirectory()
      throw error
    }
  }

  deinit {
    killIfRunning()
    removeDirectory()
  }

  var log: String { (try? String(contentsOfFile: logPath, encoding: .utf8)) ?? "" }

  /// Whether the server still runs (waitpid WNOHANG; reaps it when it exited).
  func isAlive() -> Bool {
    guard status == nil, pid > 0 else { return false }
    var s: Int32 = 0
    if waitpid(pid, &s, WNOHANG) == pid { status = s }
    return status == nil
  }

  /// Runs `strata` in this server's directory.
  func strata(_ arguments: [String]) throws -> StrataRun { try runStrata(arguments, in: directory) }

  /// Connects, retrying while the server starts listening; negotiates and starts the queues
  /// unless `start` is false.
  func client(_ options: VhostUserClient.Options = .init(), start: Bool = true) throws -> VhostUserClient {
    try connectWhenListening(
      path: socketPath, options: options, start: start, timeout: 15, every: 10_000, isAlive: isAlive,
      failed: { ServeTestError("client: \($0); server \(self.isAlive() ? "alive" : "dead"); log:\n\(self.log)") },
      notListening: { ServeTestError("strata serve is not listening on \(self.socketPath); log:\n\(self.log)") })
  }

  /// Options for a client using `queues` queues of the `ring` format.
  static func options(
    queues: Int = 1, queueSize: Int = 256, eventIdx: Bool = true, indirect: Bool = false, ring: RingKind = .split
  ) -> VhostUserClient.Options {
    var o = VhostUserClient.Options()
    o.queues = queues
    o.queueSize = queueSize
    o.eventIdx = eventIdx
    o.indirect = indirect
    o.ring = ring
    return o
  }

  /// SIGTERM; expects a clean exit (status 0) within 10 s and the socket file removed.
  func stop(sourceLocation: SourceLocation = #_sourceLocation) {
    guard isAlive() else {
      Issue.record(
        "strata serve had already exited (\(status.map(describeStatus) ?? "?")); log:\n\(log)",
        sourceLocation: sourceLocation)
      return
    }
    kill(pid, SIGTERM)
    guard let s = waitStatus(pid, seconds: 10) else {
      Issue.record("strata serve did not exit within 10 s of SIGTERM; log:\n\(log)", sourceLocation: sourceLocation)
      killIfRunning()
      return
    }
    status = s
    #expect(
      exitedNormally(s) && exitCode(s) == 0, "strata serve ended with \(describeStatus(s)) after SIGTERM; log:\n\(log)",
      sourceLocation: sourceLocation)
    #expect(access(socketPath, F_OK) != 0, "the socket file was left behind", sourceLocation: sourceLocation)
    #expect(access(nbdPath, F_OK) != 0, "the NBD socket file was left behind", sourceLocation: sourceLocation)
  }

  /// Incarnations started by `restart` (the logs of earlier ones are kept as serve.log.N).
  private(set) var restarts = 0

  /// SIGKILL, as a crash: no flush, the socket file left behind. Reaps the process.
  func crash() {
    guard isAlive() else { return }
    kill(pid, SIGKILL)
    status = waitStatus(pid, seconds: 10)
  }

  /// The logs of every incarnation so far, oldest first.
  var allLogs: String {
    let earlier = (0..<restarts).map { (try? String(contentsOfFile: "\(logPath).\($0)", encoding: .utf8)) ?? "" }
    return (earlier + [log]).joined()
  }

  /// Starts `strata serve` again with the same image, socket and arguments (after `crash` or
  /// `stop`). Retries while the previous incarnation's image lock lingers (the kernel may
  /// release an io_uring's files a little after the process is reaped).
  func restart() throws {
    guard let binary = strataBinary else { throw ServeTestError(binaryMissing) }
    guard !isAlive() else { throw ServeTestError("restart of a running strata serve") }
    let deadline = Date().addingTimeInterval(15)
    while true {
      rename(logPath, "\(logPath).\(restarts)")
      restarts += 1
      status = nil
      pid = try spawnProcess(binary, serveArguments + arguments, stderrPath: logPath)
      // Up once the socket accepts a connection (probed with a bare connect; the server sees
      // a front-end that disconnects at once).
      while isAlive() {
        if socketAccepts(serveArguments.contains("--socket") ? socketPath : nbdPath) { return }
        usleep(5_000)
      }
      guard log.contains("in use"), Date() < deadline else {
        throw ServeTestError("strata serve did not restart (\(status.map(describeStatus) ?? "?")); log:\n\(log)")
      }
      usleep(20_000)
    }
  }

  /// Whether something accepts connections on the socket path (the vhost-user one by default).
  func socketAccepts(_ path: String? = nil) -> Bool {
    var address = sockaddr_un()
    address.sun_family = sa_family_t(AF_UNIX)
    let bytes = Array((path ?? socketPath).utf8)
    withUnsafeMutableBytes(of: &address.sun_path) { raw in
      for (i, b) in bytes.enumerated() { raw[i] = b }
    }
    let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
    defer { close(fd) }
    return withUnsafePointer(to: &address) {
      $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
        connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) == 0
      }
    }
  }

  /// Reconnects `client` (VhostUserClient.reconnect) once the server listens again.
  func reconnect(_ client: VhostUserClient) throws {
    try retryWhileNotListening(
      timeout: 15, every: 5_000, isAlive: isAlive, systemCall: VhostUserClient.failedSystemCall,
      failed: {
        ServeTestError("reconnect: \($0); server \(self.isAlive() ? "alive" : "dead"); log:\n\(self.logTail)")
      },
      notListening: { ServeTestError("strata serve is not listening on \(self.socketPath); log:\n\(self.logTail)") }
    ) { () throws(VhostClientError) in
      try client.reconnect(path: socketPath)
    }
  }

  /// SIGKILL by PID (when a test failed midway) and reap.
  func killIfRunning() {
    guard isAlive() else { return }
    kill(pid, SIGKILL)
    status = waitStatus(pid, seconds: 10)
  }

  func removeDirectory() { try? FileManager.default.removeItem(atPath: directory) }

  /// The last lines of the server's log, for failure messages.
  var logTail: String {
    log.split(separator: "\n", omittingEmptySubsequences: false).suffix(40).joined(separator: "\n")
  }

  /// Open descriptors of the server process.
  func openFdCount() -> Int {
    (try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/fd").count) ?? -1
  }
}

extension VhostUserClient: SocketClient {
  public static func failedSystemCall(_ error: VhostClientError) -> (call: String, errno: Int32)? {
    if case .system(let call, let e) = error { (call, e) } else { nil }
  }
}

/// Runs `body` against a fresh server; stops it with SIGTERM afterwards (expecting exit 0 and the
/// socket removed) unless `body` already did; kills it by PID when `body` throws.
func withServer<T>(
  size: UInt64 = 64 << 20, arguments: [String] = [], vhost: Bool = true, nbd: Bool = false,
  prepare: ((ServeProcess) throws -> Void)? = nil, sourceLocation: SourceLocation = #_sourceLocation,
  _ body: (ServeProcess) throws -> T
) throws -> T {
  let s = try ServeProcess(size: size, arguments: arguments, vhost: vhost, nbd: nbd, prepare: prepare)
  defer {
    s.killIfRunning()
    s.removeDirectory()
  }
  let result: T
  do {
    result = try body(s)
  } catch {
    throw ServeTestError("\(error)\nstrata serve \(s.isAlive() ? "is running" : "has exited"); log:\n\(s.logTail)")
  }
  if s.status == nil { s.stop(sourceLocation: sourceLocation) }
  return result
}

extension RingKind {
  /// The `strata serve` arguments that offer this ring format (packed rings are opt-in there).
  var serveArguments: [String] { self == .packed ? ["--packed-ring"] : [] }
}

// MARK: - Data and requests

/// A deterministic pattern distinct per seed.
func pattern(_ count: Int, seed: UInt64) -> [UInt8] {
  var x = seed &* 0x9E37_79B9_7F4A_7C15 | 1
  return (0..<count).map { _ in
    x ^= x << 13
    x ^= x >> 7
    x ^= x << 17
    return UInt8(truncatingIfNeeded: x)
  }
}

let statusOK = VirtioBlkStatus.ok.rawValue
let statusIOErr = VirtioBlkStatus.ioError.rawValue
let statusUnsupp = VirtioBlkStatus.unsupported.rawValue

/// The 16-byte virtio-blk request header.
func requestHeader(_ type: VirtioBlkRequestType, sector: UInt64) -> [UInt8] {
  var w = PayloadWriter()
  w.u32(type.rawValue)
  w.u32(0)
  w.u64(sector)
  return w.bytes
}

/// One descriptor of a hand-made chain; `next` is an index into the chain (so loops can be built).
struct RawDescriptor {
  var address: UInt64
  var length: UInt32
  var flags: UInt16 = 0
  var next: Int? = nil
  init(_ address: UInt64, _ length: UInt32, writable: Bool = false, next: Int? = nil, flags: UInt16 = 0) {
    self.address = address
    self.length = length
    self.flags = flags | (writable ? VirtqDescFlag.write : 0) | (next != nil ? VirtqDescFlag.next : 0)
    self.next = next
  }
}

/// The wire form of an indirect descriptor table.
func indirectTable(_ entries: [RawDescriptor]) -> [UInt8] {
  var w = PayloadWriter()
  for e in entries {
    w.u64(e.address)
    w.u32(e.length)
    w.u16(e.flags)
    w.u16(UInt16(truncatingIfNeeded: e.next ?? 0))
  }
  return w.bytes
}

extension VhostUserClient {
  /// Places `chain` in reserved descriptors of `queue` and publishes its head. Returns the
  /// descriptors (give them back with `releaseDescriptors` once the back-end is done).
  func publishChain(queue: Int, _ chain: [RawDescriptor]) throws -> [UInt16] {
    let ds = try reserveDescriptors(queue: queue, count: chain.count)
    for (i, d) in chain.enumerated() {
      try placeDescriptor(
        queue: queue, index: ds[i], address: d.address, length: d.length, flags: d.flags,
        next: d.next.map { ds[$0] } ?? 0)
    }
    try publish(queue: queue, head: ds[0])
    return ds
  }

  /// Publishes `chain`, waits for its used entry and returns it (descriptors given back).
  func runChain(queue: Int = 0, _ chain: [RawDescriptor]) throws -> VhostCompletion {
    let ds = try publishChain(queue: queue, chain)
    let done = try waitRaw(queue: queue, timeoutMs: 5_000)
    guard done.count == 1, let c = done.first else {
      throw ServeTestError("expected one used entry, got \(done)")
    }
    guard c.head == UInt32(ds[0]) else { throw ServeTestError("used entry for head \(c.head), published \(ds[0])") }
    try releaseDescriptors(queue: queue, ds)
    return c
  }

  /// The used ring's idx as the back-end last published it.
  func usedIndex(queue: Int) throws -> UInt16 {
    let l = try layout(queue: queue)
    guard let m = memory else { throw ServeTestError("not started") }
    let b = m.read(at: l.used + 2, count: 2)
    return UInt16(b[0]) | UInt16(b[1]) << 8
  }
}

// MARK: - Short descriptions in failed expectations

/// Buffers of up to a megabyte appear in expectations: describe them by length, head and hash.
extension Array: @retroactive CustomTestStringConvertible where Element == UInt8 {
  public var testDescription: String {
    var h: UInt64 = 0xcbf2_9ce4_8422_2325
    for b in self { h = (h ^ UInt64(b)) &* 0x100_0000_01b3 }
    let head = prefix(8).map { String($0, radix: 16) }.joined(separator: " ")
    return "\(count) bytes [\(head)\(count > 8 ? " ..." : "")] fnv \(String(h, radix: 16))"
  }
}

extension VhostCompletion: CustomTestStringConvertible {
  public var testDescription: String {
    "completion(queue \(queue), head \(head), len \(usedLength), status \(status.map { String($0) } ?? "nil"), "
      + "\(data.testDescription))"
  }
}
