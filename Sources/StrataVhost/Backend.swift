#if canImport(Glibc)
  import Glibc
#endif
import CStrataLinux
import Logging
import StrataCore
import VhostProtocol

/// The vhost-user-blk back-end's protocol state machine: one front-end connection's
/// negotiation, memory table and rings. Messages are decoded (syntax, in VhostProtocol) and
/// then checked against the state here (meaning); a bad message is logged and refused, never
/// fatal.
final class VhostBlkBackend {
  struct Reply {
    var payload: [UInt8]
    var fds: [Int32] = []
  }

  private struct Ring {
    var size = 0
    var address: VringAddress?
    var base: UInt16 = 0
    var kickFd: Int32 = -1
    var callFd: Int32 = -1
    var errFd: Int32 = -1
    var enabled = false
    var worker: QueueWorker?
  }

  static let queueSizeLimit = 1024
  static let segMax = 254

  let image: SharedImage
  let readOnly: Bool
  let serial: [UInt8]
  let numQueues: Int
  let logger: Logger
  let offeredFeatures: UInt64
  let offeredProtocolFeatures: UInt64 =
    VhostProtocolFeature.mq.bit | VhostProtocolFeature.replyAck.bit | VhostProtocolFeature.config.bit
    | VhostProtocolFeature.backendReq.bit | VhostProtocolFeature.resetDevice.bit
    | VhostProtocolFeature.configureMemSlots.bit

  private(set) var features: UInt64 = 0
  private(set) var protocolFeatures: UInt64 = 0
  private var memory: GuestMemory?
  private var rings: [Ring]
  private var backendReqFd: Int32 = -1

  init(image: SharedImage, readOnly: Bool, serial: String, numQueues: Int, logger: Logger) {
    self.image = image
    self.readOnly = readOnly
    self.serial = Array(serial.utf8.prefix(20))
    self.numQueues = numQueues
    self.logger = logger
    var f =
      VirtioFeature.version1 | VirtioFeature.protocolFeatures | VirtioFeature.eventIdx | VirtioFeature.indirectDesc
      | VirtioBlkFeature.segMax | VirtioBlkFeature.blkSize | VirtioBlkFeature.flush | VirtioBlkFeature.mq
      | VirtioBlkFeature.sizeMax
    f |= readOnly ? VirtioBlkFeature.readOnly : VirtioBlkFeature.discard | VirtioBlkFeature.writeZeroes
    offeredFeatures = f
    rings = Array(repeating: Ring(), count: numQueues)
  }

  deinit { reset() }

  var completedRequests: [UInt64] { rings.map { $0.worker?.completed ?? 0 } }

  /// Stops every queue and forgets the connection's state (a disconnect or RESET_DEVICE).
  func reset() {
    for i in rings.indices { stopRing(i) }
    for r in rings {
      for fd in [r.kickFd, r.callFd, r.errFd] where fd >= 0 { close(fd) }
    }
    rings = Array(repeating: Ring(), count: numQueues)
    if backendReqFd >= 0 { close(backendReqFd) }
    backendReqFd = -1
    memory = nil
    features = 0
    protocolFeatures = 0
  }

  private var replyAck: Bool { protocolFeatures & VhostProtocolFeature.replyAck.bit != 0 }

  /// Handles one message. Returns the reply to send (GET requests, or the REPLY_ACK status),
  /// or nil. Takes ownership of `fds`: every descriptor is kept or closed.
  func handle(_ header: VhostHeader, _ payload: UnsafeRawBufferPointer, fds: [Int32]) -> Reply? {
    var consumed = false
    defer { if !consumed { for fd in fds { close(fd) } } }
    guard let request = VhostRequest(rawValue: header.request) else {
      logger.warning("unknown vhost-user request \(header.request); refused")
      return header.needsReply ? Reply(payload: encodeU64(1)) : nil
    }
    do {
      let reply = try dispatch(request, payload, fds, &consumed)
      if let reply { return reply }
      return header.needsReply && replyAck ? Reply(payload: encodeU64(0)) : nil
    } catch {
      logger.warning("vhost-user \(request) refused: \(error)")
      if let r = Self.failureReply(request) { return r }
      return header.needsReply ? Reply(payload: encodeU64(1)) : nil
    }
  }

  /// Requests that always answer get an answer even when refused, so the front-end never hangs.
  private static func failureReply(_ r: VhostRequest) -> Reply? {
    switch r {
    case .getFeatures, .getProtocolFeatures, .getQueueNum, .getMaxMemSlots, .getStatus: Reply(payload: encodeU64(0))
    case .getVringBase: Reply(payload: VringState(index: 0, num: 0).encode())
    // An empty payload is how a back-end says GET_CONFIG (or GET_INFLIGHT_FD) failed.
    case .getConfig, .getInflightFd: Reply(payload: [])
    default: nil
    }
  }

  private func dispatch(_ request: VhostRequest, _ p: UnsafeRawBufferPointer, _ fds: [Int32], _ consumed: inout Bool) throws
    -> Reply?
  {
    func expectFds(_ n: Int) throws(VhostError) {
      guard fds.count == n else { throw .fdCount("\(request)", expected: n, got: fds.count) }
    }
    switch request {
    case .getFeatures:
      return Reply(payload: encodeU64(offeredFeatures))
    case .setFeatures:
      let f = try decodeU64(p, "features")
      guard f & ~offeredFeatures == 0 else { throw VhostError.invalid("features 0x\(String(f, radix: 16)) were not offered") }
      features = f
    case .getProtocolFeatures:
      return Reply(payload: encodeU64(offeredProtocolFeatures))
    case .setProtocolFeatures:
      let f = try decodeU64(p, "protocol features")
      guard f & ~offeredProtocolFeatures == 0 else {
        throw VhostError.invalid("protocol features 0x\(String(f, radix: 16)) were not offered")
      }
      protocolFeatures = f
    case .setOwner:
      break
    case .resetOwner, .resetDevice:
      // The device state goes; the connection's protocol features stay (REPLY_ACK included:
      // this very message may be waiting for its ack).
      let negotiated = protocolFeatures
      reset()
      protocolFeatures = negotiated
    case .getQueueNum:
      return Reply(payload: encodeU64(UInt64(numQueues)))
    case .getMaxMemSlots:
      return Reply(payload: encodeU64(UInt64(GuestMemory.maxRegions)))
    case .setMemTable:
      let table = try MemoryTable.decode(p)
      try expectFds(table.regions.count)
      let running = stopAll()
      // Refused or not, the rings run again (on the old table when the new one was refused).
      defer { restart(running) }
      let m = GuestMemory()
      for (region, fd) in zip(table.regions, fds) { try m.add(region, fd: fd) }
      memory = m
    case .addMemReg:
      let region = try SingleMemoryRegion.decode(p).region
      try expectFds(1)
      let running = stopAll()
      let m = memory ?? GuestMemory()
      defer { restart(running) }
      try m.add(region, fd: fds[0])
      memory = m
    case .remMemReg:
      let region = try SingleMemoryRegion.decode(p).region
      let running = stopAll()
      defer { restart(running) }
      try memory?.remove(region)
    case .setVringNum:
      let s = try VringState.decode(p)
      let i = try ringIndex(s.index)
      guard s.num >= 1, s.num <= UInt32(Self.queueSizeLimit), s.num & (s.num - 1) == 0 else {
        throw VhostError.invalid("queue size \(s.num) is not a power of two up to \(Self.queueSizeLimit)")
      }
      guard rings[i].worker == nil else { throw VhostError.invalid("queue \(i) is running") }
      rings[i].size = Int(s.num)
    case .setVringAddr:
      let a = try VringAddress.decode(p)
      let i = try ringIndex(a.index)
      guard rings[i].worker == nil else { throw VhostError.invalid("queue \(i) is running") }
      rings[i].address = a
    case .setVringBase:
      let s = try VringState.decode(p)
      let i = try ringIndex(s.index)
      guard s.num <= 0xFFFF, rings[i].worker == nil else { throw VhostError.invalid("bad base for queue \(i)") }
      rings[i].base = UInt16(s.num)
    case .getVringBase:
      let s = try VringState.decode(p)
      let i = try ringIndex(s.index)
      let base = stopRing(i) ?? rings[i].base
      rings[i].base = base
      rings[i].enabled = false
      if rings[i].kickFd >= 0 { close(rings[i].kickFd) }
      rings[i].kickFd = -1
      return Reply(payload: VringState(index: s.index, num: UInt32(base)).encode())
    case .setVringKick, .setVringCall, .setVringErr:
      let v = try decodeU64(p, "\(request)")
      let i = try ringIndex(UInt32(v & VringFdPayload.indexMask))
      guard v & ~(VringFdPayload.indexMask | VringFdPayload.noFdFlag) == 0 else { throw VhostError.invalid("reserved bits set") }
      let noFd = v & VringFdPayload.noFdFlag != 0
      try expectFds(noFd ? 0 : 1)
      let fd = noFd ? Int32(-1) : fds[0]
      consumed = true
      let wasRunning = stopRing(i) != nil
      switch request {
      case .setVringKick:
        if rings[i].kickFd >= 0 { close(rings[i].kickFd) }
        rings[i].kickFd = fd
        // Without protocol features a ring starts with its kick fd (vhost-user.rst, "Starting and stopping rings").
        if features & VirtioFeature.protocolFeatures == 0 { rings[i].enabled = true }
      case .setVringCall:
        if rings[i].callFd >= 0 { close(rings[i].callFd) }
        rings[i].callFd = fd
      default:
        if rings[i].errFd >= 0 { close(rings[i].errFd) }
        rings[i].errFd = fd
      }
      if wasRunning || request == .setVringKick { try startRing(i) }
    case .setVringEnable:
      let s = try VringState.decode(p)
      let i = try ringIndex(s.index)
      guard s.num <= 1 else { throw VhostError.invalid("SET_VRING_ENABLE with \(s.num)") }
      rings[i].enabled = s.num == 1
      if rings[i].enabled { try startRing(i) } else { _ = stopRing(i) }
    case .getConfig:
      let c = try ConfigSpace.decode(p)
      let config = configSpace()
      let window = (0..<Int(c.size)).map { Int(c.offset) + $0 < config.count ? config[Int(c.offset) + $0] : 0 }
      return Reply(payload: ConfigSpace(offset: c.offset, size: c.size, flags: c.flags, payload: window).encode())
    case .setConfig:
      let c = try ConfigSpace.decode(p)
      // Only the writeback byte is writable, and Strata is always a write-back cache.
      guard c.offset == 32, c.size == 1 else { throw VhostError.invalid("config bytes \(c.offset)+\(c.size) are read-only") }
    case .setBackendReqFd:
      try expectFds(1)
      consumed = true
      if backendReqFd >= 0 { close(backendReqFd) }
      backendReqFd = fds[0]
    case .setLogBase, .setLogFd, .sendRarp, .netSetMtu, .iotlbMsg, .setVringEndian, .getInflightFd, .setInflightFd,
      .vringKick, .setStatus, .getStatus:
      throw VhostError.invalid("\(request) is not supported by this back-end")
    }
    return nil
  }

  private func ringIndex(_ i: UInt32) throws(VhostError) -> Int {
    guard Int(i) < numQueues else { throw .invalid("queue index \(i) >= \(numQueues) queues") }
    return Int(i)
  }

  /// The virtio-blk configuration space for the image as it is now.
  func configSpace() -> [UInt8] {
    let (size, blockSize) = image.with { ($0.size, $0.blockSize) }
    return VirtioBlkConfig(
      capacitySectors: size / 512, sizeMax: 1 << 20, segMax: UInt32(Self.segMax), blkSize: UInt32(blockSize),
      numQueues: UInt16(numQueues), maxDiscardSectors: BlockHandler.maxDiscardSectors,
      maxDiscardSeg: UInt32(BlockHandler.maxDiscardSegments), discardSectorAlignment: UInt32(blockSize / 512),
      maxWriteZeroesSectors: BlockHandler.maxDiscardSectors, maxWriteZeroesSeg: UInt32(BlockHandler.maxDiscardSegments),
      writeZeroesMayUnmap: 1
    ).encode()
  }

  // MARK: Rings

  private func startRing(_ i: Int) throws {
    var r = rings[i]
    guard r.worker == nil, r.enabled, r.kickFd >= 0, r.size > 0, let a = r.address, let memory else { return }
    guard let desc = memory.user(a.descUser, length: SplitQueue.descBytes(r.size)),
      let avail = memory.user(a.availUser, length: SplitQueue.availBytes(r.size)),
      let used = memory.user(a.usedUser, length: SplitQueue.usedBytes(r.size))
    else { throw VhostError.invalid("queue \(i): ring addresses lie outside guest memory") }
    let queue = SplitQueue(
      size: r.size, desc: desc, avail: avail, used: used, base: r.base, eventIdx: features & VirtioFeature.eventIdx != 0,
      indirect: features & VirtioFeature.indirectDesc != 0, maxSegments: Self.segMax + 2)
    let handler = BlockHandler(image: image, readOnly: readOnly, serial: serial)
    let worker = QueueWorker(
      index: i, queue: queue, memory: memory, handler: handler, kickFd: r.kickFd, callFd: r.callFd, logger: logger)
    r.worker = worker
    rings[i] = r
    worker.start()
    logger.debug("queue \(i) started: \(r.size) entries, base \(r.base)")
  }

  /// Stops a running ring and returns its next available index (the base to resume from).
  @discardableResult
  private func stopRing(_ i: Int) -> UInt16? {
    guard let worker = rings[i].worker else { return nil }
    worker.stop()
    rings[i].worker = nil
    rings[i].base = worker.queue.lastAvail
    return worker.queue.lastAvail
  }

  private func stopAll() -> [Int] {
    rings.indices.filter { stopRing($0) != nil }
  }

  private func restart(_ indices: [Int]) {
    for i in indices {
      do { try startRing(i) } catch { logger.error("queue \(i) could not restart: \(error)") }
    }
  }
}
