// A scripted vhost-user back-end on a thread: records every message the client sends (order,
// flags, fd count) and answers with canned replies, to pin down the client's negotiation order
// and its handling of refusals and hang-ups, including paths qemu-storage-daemon 7.2 lacks
// (INFLIGHT_SHMFD).

import CStrataLinux
import Foundation
import Glibc
import Synchronization
import Testing
import VhostProtocol

@testable import VhostClient

struct Seen: Sendable, Equatable {
  var request: UInt32
  var flags: UInt32
  var size: UInt32
  var fds: Int
}

final class FakeBackend: Sendable {
  let directory: String
  let socketPath: String
  let listenFd: Int32
  /// Request code to refuse (REPLY_ACK value 1).
  let refuse: UInt32?
  /// Close the connection after this many messages.
  let hangUpAfter: Int?
  let seen = Mutex<[Seen]>([])
  let finished = Mutex<Bool>(false)

  static let features =
    VirtioFeature.version1 | VirtioFeature.protocolFeatures | VirtioFeature.eventIdx | VirtioBlkFeature.flush
    | VirtioBlkFeature.mq | VirtioBlkFeature.blkSize
  static let protocolFeatures =
    VhostProtocolFeature.mq.bit | VhostProtocolFeature.replyAck.bit | VhostProtocolFeature.config.bit
    | VhostProtocolFeature.inflightShmfd.bit | VhostProtocolFeature.configureMemSlots.bit
    | VhostProtocolFeature.status.bit

  init(refuse: VhostRequest? = nil, hangUpAfter: Int? = nil) throws {
    var template = Array("/tmp/strata-vhost-fake-XXXXXX".utf8CString)
    guard let d = mkdtemp(&template) else { throw FixtureError("mkdtemp failed") }
    directory = String(cString: d)
    socketPath = directory + "/fake.sock"
    self.refuse = refuse?.rawValue
    self.hangUpAfter = hangUpAfter
    let s = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
    var addr = sockaddr_un()
    addr.sun_family = sa_family_t(AF_UNIX)
    let bytes = Array(socketPath.utf8)
    withUnsafeMutableBytes(of: &addr.sun_path) { raw in
      raw.copyBytes(from: bytes)
      raw[bytes.count] = 0
    }
    let r = withUnsafePointer(to: &addr) {
      $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(s, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
    }
    guard s >= 0, r == 0, listen(s, 1) == 0 else { throw FixtureError("fake back-end cannot listen") }
    listenFd = s
    let thread = Thread { [self] in self.serve() }
    thread.start()
  }

  private let stopped = Mutex<Bool>(false)

  /// Idempotent: a second close of the listening descriptor could close another test's socket
  /// that reused its number (the tests run in parallel).
  func stop() {
    guard
      stopped.withLock({ s in
        defer { s = true }; return !s
      })
    else { return }
    shutdown(listenFd, Int32(SHUT_RDWR))
    let deadline = Date().addingTimeInterval(5)
    while !finished.withLock({ $0 }) && Date() < deadline { usleep(2_000) }
    close(listenFd)
    unlink(socketPath)
    rmdir(directory)
  }

  private func readExact(_ fd: Int32, _ n: Int, fds: inout [Int32]) -> [UInt8]? {
    var out = [UInt8](repeating: 0, count: n)
    var got = 0
    while got < n {
      var received = [Int32](repeating: -1, count: 16)
      var nfds: Int32 = 0
      let r = out.withUnsafeMutableBytes { b in
        received.withUnsafeMutableBufferPointer {
          strata_recv_with_fds(fd, b.baseAddress! + got, n - got, $0.baseAddress, 16, &nfds)
        }
      }
      fds += received.prefix(Int(nfds))
      if r <= 0 { return nil }
      got += r
    }
    return out
  }

  private func reply(_ fd: Int32, _ request: UInt32, _ payload: [UInt8], fds: [Int32] = []) {
    let bytes =
      VhostHeader(request: request, flags: VhostHeader.version | VhostHeader.replyFlag, size: UInt32(payload.count))
      .encode() + payload
    _ = bytes.withUnsafeBytes { b in
      fds.withUnsafeBufferPointer { strata_send_with_fds(fd, b.baseAddress, b.count, $0.baseAddress, Int32($0.count)) }
    }
  }

  private func serve() {
    defer { finished.withLock { $0 = true } }
    let c = accept(listenFd, nil, nil)
    guard c >= 0 else { return }
    defer { close(c) }
    var count = 0
    while true {
      if let h = hangUpAfter, count >= h { return }
      var fds: [Int32] = []
      guard let header = readExact(c, 12, fds: &fds) else { return }
      let h = header.withUnsafeBytes { b in
        VhostHeader(
          request: b.loadUnaligned(fromByteOffset: 0, as: UInt32.self),
          flags: b.loadUnaligned(fromByteOffset: 4, as: UInt32.self),
          size: b.loadUnaligned(fromByteOffset: 8, as: UInt32.self))
      }
      guard let payload = h.size == 0 ? [] : readExact(c, Int(h.size), fds: &fds) else { return }
      for f in fds { close(f) }
      count += 1
      seen.withLock { $0.append(Seen(request: h.request, flags: h.flags, size: h.size, fds: fds.count)) }
      switch VhostRequest(rawValue: h.request) {
      case .getFeatures: reply(c, h.request, encodeU64(Self.features))
      case .getProtocolFeatures: reply(c, h.request, encodeU64(Self.protocolFeatures))
      case .getQueueNum: reply(c, h.request, encodeU64(2))
      case .getMaxMemSlots: reply(c, h.request, encodeU64(8))
      case .getConfig:
        let config = VirtioBlkConfig(
          capacitySectors: 2048, sizeMax: 0, segMax: 126, blkSize: 4096, numQueues: 2, maxDiscardSectors: 0,
          maxDiscardSeg: 0, discardSectorAlignment: 0, maxWriteZeroesSectors: 0, maxWriteZeroesSeg: 0,
          writeZeroesMayUnmap: 0)
        reply(c, h.request, ConfigSpace(offset: 0, size: 60, flags: 0, payload: config.encode()).encode())
      case .getInflightFd:
        let m = strata_memfd("fake-inflight")
        ftruncate(m, 4096)
        reply(
          c, h.request, InflightDescription(mmapSize: 4096, mmapOffset: 0, numQueues: 2, queueSize: 256).encode(),
          fds: [m])
        close(m)
      default:
        if h.needsReply { reply(c, h.request, encodeU64(h.request == refuse ? 1 : 0)) }
      }
      _ = payload
    }
  }
}

struct FakeBackendTests {
  @Test func negotiationOrderFlagsAndFds() throws {
    let fake = try FakeBackend()
    defer { fake.stop() }
    var o = VhostUserClient.Options()
    o.queues = 2
    o.inflight = true
    o.memSlots = true
    o.memorySize = 4 << 20
    let c = try VhostUserClient.connect(path: fake.socketPath, options: o)
    #expect(c.queueCount == 2)
    #expect(c.config?.blkSize == 4096)
    #expect(c.capacityBytes == 2048 * 512)
    #expect(c.inflightDescription?.mmapSize == 4096)
    #expect(c.maxMemSlots == 8)
    // STATUS is offered but not wanted.
    #expect(!c.hasProtocol(.status))
    c.shutdown()
    fake.stop()

    typealias R = VhostRequest
    let perQueue: [R] = [.setVringNum, .setVringBase, .setVringAddr, .setVringKick, .setVringCall]
    let expected: [R] =
      [
        .getFeatures, .getProtocolFeatures, .setProtocolFeatures, .getQueueNum, .getMaxMemSlots, .setOwner, .getConfig,
        .setFeatures, .getInflightFd, .setInflightFd, .addMemReg,
      ] + perQueue + perQueue + [.setVringEnable, .setVringEnable]
    let seen = fake.seen.withLock { $0 }
    #expect(seen.map(\.request) == expected.map(\.rawValue))
    for (i, m) in seen.enumerated() {
      let r = R(rawValue: m.request)!
      #expect(m.flags & VhostHeader.versionMask == VhostHeader.version)
      // NEED_REPLY on every request without a reply of its own once REPLY_ACK is on.
      let wantsAck = i > 2 && !VhostUserClient.requestsWithReply.contains(m.request)
      #expect((m.flags & VhostHeader.needReplyFlag != 0) == wantsAck, "\(r)")
      let fds = [R.setInflightFd, .addMemReg, .setVringKick, .setVringCall].contains(r) ? 1 : 0
      #expect(m.fds == fds, "\(r)")
    }
    #expect(seen.first { $0.request == R.getConfig.rawValue }?.size == 72)
    #expect(seen.first { $0.request == R.setVringAddr.rawValue }?.size == 40)
    #expect(seen.first { $0.request == R.addMemReg.rawValue }?.size == 40)
  }

  /// The fake back-end offers no packed rings: a client that wants them stops right after
  /// GET_FEATURES with an error that says why, having set nothing up.
  @Test func packedRingNotOfferedIsAClearError() throws {
    let fake = try FakeBackend()
    defer { fake.stop() }
    var o = VhostUserClient.Options()
    o.memorySize = 4 << 20
    o.ring = .packed
    let error = #expect(throws: VhostClientError.self) {
      try VhostUserClient.connect(path: fake.socketPath, options: o).shutdown()
    }
    if case .unsupported(let why)? = error {
      #expect(why.contains("VIRTIO_F_RING_PACKED") && why.contains("bit 34"), "\(why)")
    } else {
      Issue.record("expected .unsupported, got \(String(describing: error))")
    }
    fake.stop()
    #expect(fake.seen.withLock { $0.map(\.request) } == [VhostRequest.getFeatures.rawValue])
  }

  @Test func refusalIsReported() throws {
    let fake = try FakeBackend(refuse: .setMemTable)
    defer { fake.stop() }
    var o = VhostUserClient.Options()
    o.memorySize = 4 << 20
    #expect(throws: VhostClientError.nack(request: VhostRequest.setMemTable.rawValue, value: 1)) {
      _ = try VhostUserClient.connect(path: fake.socketPath, options: o)
    }
  }

  @Test func hangUpDuringNegotiationAndDuringIO() throws {
    do {
      let fake = try FakeBackend(hangUpAfter: 2)
      defer { fake.stop() }
      #expect(throws: VhostClientError.disconnected) {
        _ = try VhostUserClient.connect(path: fake.socketPath)
      }
    }
    // 8 + 5 + 1 messages = a full one-queue start; then the back-end goes away with a request pending.
    let fake = try FakeBackend(hangUpAfter: 8 + 5 + 1)
    defer { fake.stop() }
    var o = VhostUserClient.Options()
    o.memorySize = 4 << 20
    o.ioTimeoutMs = 3_000
    let c = try VhostUserClient.connect(path: fake.socketPath, options: o)
    defer { c.shutdown() }
    try c.submit(queue: 0, .flush)
    #expect(throws: VhostClientError.disconnected) { _ = try c.wait(queue: 0) }
    #expect(!c.isConnected)
  }
}
