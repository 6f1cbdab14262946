// Test fixture: a real qemu-storage-daemon exporting a raw file as vhost-user-blk.

import Foundation
import Glibc
import StrataTestSupport
import VhostClient

/// Path of qemu-storage-daemon, installing Debian's qemu-system-common once when it is missing
/// and this process runs as root; nil when it cannot be had (the tests then skip).
let qemuStorageDaemon: String? = {
  let candidates = ["/usr/bin/qemu-storage-daemon", "/usr/local/bin/qemu-storage-daemon"]
  func found() -> String? { candidates.first { access($0, X_OK) == 0 } }
  if let p = found() { return p }
  guard getuid() == 0, access("/usr/bin/apt-get", X_OK) == 0 else { return nil }
  func run(_ args: [String]) -> Bool {
    guard
      let pid = try? spawnProcess(
        "/usr/bin/apt-get", args, stderrPath: "/dev/null", environment: ["DEBIAN_FRONTEND=noninteractive"])
    else { return false }
    return waitExit(pid) == 0
  }
  if !run(["install", "-y", "-q", "qemu-system-common"]) {
    _ = run(["update", "-q"])
    _ = run(["install", "-y", "-q", "qemu-system-common"])
  }
  return found()
}()

let qsdMissing =
  "qemu-storage-daemon is not installed and could not be installed (apt-get install qemu-system-common, as root)"

typealias FixtureError = TestFailure

/// One qemu-storage-daemon serving a fresh raw file of `size` bytes on a private socket.
final class StorageDaemon {
  let directory: String
  let image: String
  let socketPath: String
  let size: Int
  let pid: pid_t
  private var exited: Int32?

  init(size: Int = 32 << 20, queues: Int = 2, discard: Bool = true) throws {
    guard let binary = qemuStorageDaemon else { throw FixtureError(qsdMissing) }
    var template = Array("/tmp/strata-vhost-client-XXXXXX".utf8CString)
    guard let d = mkdtemp(&template) else { throw FixtureError("mkdtemp failed") }
    directory = String(cString: d)
    image = directory + "/disk.raw"
    socketPath = directory + "/vhost.sock"
    self.size = size
    let fd = open(image, O_CREAT | O_RDWR | O_TRUNC | O_CLOEXEC, 0o644)
    guard fd >= 0, ftruncate(fd, off_t(size)) == 0 else { throw FixtureError("cannot create \(image)") }
    close(fd)

    let log = directory + "/qsd.log"
    pid = try spawnProcess(
      binary,
      [
        "--blockdev", "driver=file,node-name=f,filename=\(image)" + (discard ? ",discard=unmap" : ""),
        "--export",
        "type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path=\(socketPath),writable=on,num-queues=\(queues)",
      ], stderrPath: log)
  }

  /// Whether the daemon still runs (reaps it if it exited).
  func isRunning() -> Bool {
    guard exited == nil else { return false }
    var status: Int32 = 0
    if waitpid(pid, &status, WNOHANG) == pid { exited = status }
    return exited == nil
  }

  var log: String { (try? String(contentsOfFile: directory + "/qsd.log", encoding: .utf8)) ?? "" }

  /// Connects (retrying while the daemon starts listening) and, unless `negotiate` is false,
  /// negotiates and starts the queues.
  func client(_ options: VhostUserClient.Options = .init(), negotiate: Bool = true) throws -> VhostUserClient {
    try connectWhenListening(
      path: socketPath, options: options, start: negotiate, timeout: 10, every: 20_000, isAlive: isRunning,
      notListening: { FixtureError("qemu-storage-daemon is not listening on \(self.socketPath): \(self.log)") })
  }

  /// Kills the daemon by PID (SIGTERM, then SIGKILL after 3 s), reaps it and removes the directory.
  func stop() {
    if isRunning() {
      kill(pid, SIGTERM)
      let deadline = Date().addingTimeInterval(3)
      var status: Int32 = 0
      while waitpid(pid, &status, WNOHANG) == 0 {
        if Date() > deadline {
          kill(pid, SIGKILL)
          waitpid(pid, &status, 0)
          break
        }
        usleep(5_000)
      }
      exited = status
    }
    for name in ["disk.raw", "vhost.sock", "qsd.log"] { unlink(directory + "/" + name) }
    rmdir(directory)
  }

  deinit { stop() }

  /// The image file's bytes (what the daemon wrote), for cross-checking.
  func fileBytes(at offset: Int, count: Int) -> [UInt8] {
    let fd = open(image, O_RDONLY | O_CLOEXEC)
    defer { close(fd) }
    var out = [UInt8](repeating: 0, count: count)
    let n = out.withUnsafeMutableBytes { pread(fd, $0.baseAddress, count, off_t(offset)) }
    return n == count ? out : []
  }
}

extension VhostUserClient: SocketClient {
  public static func failedSystemCall(_ error: VhostClientError) -> (call: String, errno: Int32)? {
    if case .system(let call, let e) = error { (call, e) } else { nil }
  }
}

/// Runs `body` against a fresh daemon and always stops it.
func withDaemon<T>(size: Int = 32 << 20, queues: Int = 2, _ body: (StorageDaemon) throws -> T) throws -> T {
  let d = try StorageDaemon(size: size, queues: queues)
  defer { d.stop() }
  return try body(d)
}

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

/// Waits for a child and returns its exit status (-1 if it did not exit normally).
func waitExit(_ pid: pid_t) -> Int32 {
  var status: Int32 = 0
  while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
  return status & 0x7f == 0 ? (status >> 8) & 0xff : -1
}
