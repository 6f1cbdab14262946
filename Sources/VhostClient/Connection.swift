import CStrataLinux
import Glibc
import VhostProtocol

/// One vhost-user message as it travelled: the raw header fields (not validated), the payload and
/// the file descriptors that came with it (the receiver owns and must close those).
public struct VhostMessage: Sendable, Equatable {
  public var request: UInt32
  public var flags: UInt32
  /// The header's size field; `payload.count` equals it for every message this client reads.
  public var size: UInt32
  public var payload: [UInt8]
  public var fds: [Int32]

  public init(request: UInt32, flags: UInt32, size: UInt32, payload: [UInt8], fds: [Int32] = []) {
    self.request = request
    self.flags = flags
    self.size = size
    self.payload = payload
    self.fds = fds
  }

  public var isReply: Bool { flags & VhostHeader.replyFlag != 0 }

  /// The payload as a u64 (replies to GET_FEATURES, REPLY_ACK, ...), nil when it is not 8 bytes.
  public var u64: UInt64? {
    guard payload.count == 8 else { return nil }
    return payload.withUnsafeBytes { UInt64(littleEndian: $0.loadUnaligned(as: UInt64.self)) }
  }

  /// Closes the descriptors that came with the message.
  public mutating func closeFds() {
    for fd in fds { close(fd) }
    fds = []
  }
}

/// Largest payload the client accepts from a back-end (far above anything legitimate).
let maxIncomingPayload = 1 << 16

/// POLLRDHUP (needs _GNU_SOURCE in C, so not visible through Glibc).
let pollRDHUP: Int16 = 0x2000

func monotonicNanoseconds() -> UInt64 {
  var ts = timespec()
  clock_gettime(CLOCK_MONOTONIC, &ts)
  return UInt64(ts.tv_sec) &* 1_000_000_000 &+ UInt64(ts.tv_nsec)
}

/// A connected AF_UNIX SOCK_STREAM socket speaking vhost-user framing.
final class VhostSocket {
  private(set) var fd: Int32

  init(path: String) throws(VhostClientError) {
    let s = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
    guard s >= 0 else { throw .system("socket", errno: errno) }
    var addr = sockaddr_un()
    addr.sun_family = sa_family_t(AF_UNIX)
    let bytes = Array(path.utf8)
    let capacity = MemoryLayout.size(ofValue: addr.sun_path)
    guard bytes.count < capacity else {
      close(s)
      throw .invalidArgument("socket path longer than \(capacity - 1) bytes: \(path)")
    }
    withUnsafeMutableBytes(of: &addr.sun_path) { raw in
      raw.copyBytes(from: bytes)
      raw[bytes.count] = 0
    }
    let r = withUnsafePointer(to: &addr) {
      $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(s, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
    }
    guard r == 0 else {
      let e = errno
      close(s)
      throw .system("connect(\(path))", errno: e)
    }
    fd = s
  }

  deinit { shutdownAndClose() }

  func shutdownAndClose() {
    if fd >= 0 {
      close(fd)
      fd = -1
    }
  }

  /// Sends all of `bytes`; the descriptors travel with the first chunk.
  func send(_ bytes: [UInt8], fds: [Int32]) throws(VhostClientError) {
    guard fd >= 0 else { throw .disconnected }
    var offset = 0
    var first = true
    while offset < bytes.count || first {
      let n: Int = bytes.withUnsafeBytes { b in
        let base = b.baseAddress.map { $0 + offset }
        if first && !fds.isEmpty {
          return fds.withUnsafeBufferPointer { f in
            Int(strata_send_with_fds(fd, base, b.count - offset, f.baseAddress, Int32(f.count)))
          }
        }
        return Int(strata_send_with_fds(fd, base, b.count - offset, nil, 0))
      }
      if n < 0 {
        let e = errno
        if e == EPIPE || e == ECONNRESET { throw .disconnected }
        throw .system("sendmsg", errno: e)
      }
      first = false
      offset += n
      if bytes.isEmpty { break }
    }
  }

  /// Waits until the socket is readable; false on timeout.
  private func waitReadable(deadline: UInt64) throws(VhostClientError) -> Bool {
    while true {
      let now = monotonicNanoseconds()
      if now >= deadline { return false }
      let ms = Int32(min(UInt64(Int32.max), (deadline - now + 999_999) / 1_000_000))
      var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
      let r = poll(&p, 1, ms)
      if r < 0 {
        if errno == EINTR { continue }
        throw .system("poll", errno: errno)
      }
      if r > 0 { return true }
    }
  }

  /// Reads exactly `count` bytes, collecting any descriptors that arrive.
  private func readExact(_ count: Int, fds: inout [Int32], deadline: UInt64, what: String) throws(VhostClientError)
    -> [UInt8]
  {
    var out = [UInt8](repeating: 0, count: count)
    var got = 0
    while got < count {
      guard try waitReadable(deadline: deadline) else {
        throw .timeout(what)
      }
      var received = [Int32](repeating: -1, count: 16)
      var nfds: Int32 = 0
      let n = out.withUnsafeMutableBytes { b in
        received.withUnsafeMutableBufferPointer { r in
          strata_recv_with_fds(fd, b.baseAddress! + got, count - got, r.baseAddress, 16, &nfds)
        }
      }
      if n < 0 {
        let e = errno
        if e == ECONNRESET { throw .disconnected }
        throw .system("recvmsg", errno: e)
      }
      fds += received.prefix(Int(nfds))
      if n == 0 { throw .disconnected }
      got += n
    }
    return out
  }

  /// Reads one message: a 12-byte header, then `size` payload bytes.
  func receive(timeoutMs: Int) throws(VhostClientError) -> VhostMessage {
    guard fd >= 0 else { throw .disconnected }
    let deadline = monotonicNanoseconds() + UInt64(max(0, timeoutMs)) * 1_000_000
    var fds: [Int32] = []
    do throws(VhostClientError) {
      let header = try readExact(VhostHeader.size, fds: &fds, deadline: deadline, what: "a vhost-user reply header")
      let (request, flags, size) = header.withUnsafeBytes { b in
        (
          UInt32(littleEndian: b.loadUnaligned(fromByteOffset: 0, as: UInt32.self)),
          UInt32(littleEndian: b.loadUnaligned(fromByteOffset: 4, as: UInt32.self)),
          UInt32(littleEndian: b.loadUnaligned(fromByteOffset: 8, as: UInt32.self))
        )
      }
      guard Int(size) <= maxIncomingPayload else {
        throw VhostClientError.protocolViolation("reply to request \(request) announces \(size) payload bytes")
      }
      let payload =
        size == 0 ? [] : try readExact(Int(size), fds: &fds, deadline: deadline, what: "a vhost-user reply payload")
      return VhostMessage(request: request, flags: flags, size: size, payload: payload, fds: fds)
    } catch {
      for f in fds { close(f) }
      throw error
    }
  }

  /// True while the peer has not closed its end (no EOF, no hang-up pending).
  func peerOpen() -> Bool {
    guard fd >= 0 else { return false }
    var p = pollfd(fd: fd, events: Int16(POLLIN) | pollRDHUP, revents: 0)
    let r = poll(&p, 1, 0)
    if r <= 0 { return true }
    if p.revents & (Int16(POLLHUP) | Int16(POLLERR) | pollRDHUP) != 0 { return false }
    if p.revents & Int16(POLLIN) != 0 {
      var byte: UInt8 = 0
      let n = recv(fd, &byte, 1, Int32(MSG_PEEK) | Int32(MSG_DONTWAIT))
      return n != 0
    }
    return true
  }
}
