import CStrataLinux
import Logging
import StrataCore
import VhostProtocol

#if canImport(Glibc)
  import Glibc
#endif

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
    /// SET/GET_VRING_BASE: the next available index (packed rings: bits 0-14 and the avail wrap
    /// counter in bit 15, the used index and its wrap counter in bits 16-31, as QEMU sends).
    var base: UInt32 = 0
    var kickFd: Int32 = -1
    var callFd: Int32 = -1
    var errFd: Int32 = -1
    var enabled = false
    var worker: QueueWorker?
    /// This queue's region of the inflight area (SET_INFLIGHT_FD), when it has one: split or
    /// packed, as the rings were negotiated when the area came.
    var inflight: InflightRing?
    var packedInflight: PackedInflightRing?
    /// The region is examined (and in-flight chains collected for resubmission) when the ring
    /// next starts: after SET_VRING_KICK or a new area, not on the internal restarts of
    /// SET_MEM_TABLE and the like (a stopped worker leaves nothing in flight).
    var inflightCheckPending = true
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
    | VhostProtocolFeature.configureMemSlots.bit | VhostProtocolFeature.inflightShmfd.bit

  private(set) var features: UInt64 = 0
  private(set) var protocolFeatures: UInt64 = 0
  private var memory: GuestMemory?
  private var rings: [Ring]
  private var backendReqFd: Int32 = -1
  /// The area of the last GET_INFLIGHT_FD (kept until SET_INFLIGHT_FD: its fd goes in the reply).
  private var offeredInflight: InflightArea?
  /// The area of SET_INFLIGHT_FD, which the rings record their in-flight chains in.
  private var inflightArea: InflightArea?

  init(image: SharedImage, readOnly: Bool, serial: String, numQueues: Int, packedRing: Bool = false, logger: Logger) {
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
    if packedRing { f |= VirtioFeature.ringPacked }
    offeredFeatures = f
    rings = Array(repeating: Ring(), count: numQueues)
  }

  deinit { reset() }

  var queueStats: [VhostBlkServer.QueueStats] {
    rings.indices.map { i in
      let w = rings[i].worker
      return .init(
        index: i, completed: w?.completed ?? 0, inFlight: w?.readsInFlight ?? 0, broken: w?.isBroken ?? false)
    }
  }

  /// Sends CONFIG_CHANGE_MSG on the BACKEND_REQ channel (no reply asked: the front-end answers
  /// by sending GET_CONFIG on the main channel, which this thread must stay free to serve).
  func notifyConfigChange() -> Bool {
    guard backendReqFd >= 0, protocolFeatures & VhostProtocolFeature.config.bit != 0 else { return false }
    let message = VhostHeader(
      request: VhostBackendRequest.configChangeMsg.rawValue, flags: VhostHeader.version, size: 0
    )
    .encode()
    let sent = message.withUnsafeBytes { strata_send_with_fds(backendReqFd, $0.baseAddress, $0.count, nil, 0) }
    guard sent == message.count else {
      logger.warning("config-change notification failed: \(String(cString: strerror(errno)))")
      return false
    }
    logger.info("front-end notified of a configuration change")
    return true
  }

  /// Stops every queue and forgets the connection's state (a disconnect or RESET_DEVICE).
  func reset() {
    for i in rings.indices { stopRing(i) }
    for r in rings {
      for fd in [r.kickFd, r.callFd, r.errFd] where fd >= 0 { close(fd) }
    }
    rings = Array(repeating: Ring(), count: numQueues)
    if backendReqFd >= 0 { close(backendReqFd) }
    backendReqFd = -1
    offeredInflight = nil
    inflightArea = nil
    memory = nil
    features = 0
    protocolFeatures = 0
  }

  private var packed: Bool { features & VirtioFeature.ringPacked != 0 }
  private var replyAck: Bool { protocolFeatures & VhostProtocolFeature.replyAck.bit != 0 }
  private var tracksInflight: Bool { protocolFeatures & VhostProtocolFeature.inflightShmfd.bit != 0 }

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
    // An empty payload is how a back-end says GET_CONFIG failed; GET_INFLIGHT_FD says it with
    // mmap_size 0 (QEMU then goes on without an inflight area, as with libvhost-user).
    case .getConfig: Reply(payload: [])
    case .getInflightFd:
      Reply(payload: InflightDescription(mmapSize: 0, mmapOffset: 0, numQueues: 0, queueSize: 0).encode())
    default: nil
    }
  }

  private func dispatch(_ request: VhostRequest, _ p: UnsafeRawBufferPointer, _ fds: [Int32], _ consumed: inout Bool)
    throws
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
      guard f & ~offeredFeatures == 0 else {
        throw VhostError.invalid("features 0x\(String(f, radix: 16)) were not offered")
      }
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
      // Split rings need a power of two (their indices wrap at 2^16); packed rings any size.
      guard s.num >= 1, s.num <= UInt32(Self.queueSizeLimit), s.num & (s.num - 1) == 0 || packed else {
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
      guard s.num <= 0xFFFF || packed, rings[i].worker == nil else {
        throw VhostError.invalid("bad base for queue \(i)")
      }
      rings[i].base = s.num
    case .getVringBase:
      let s = try VringState.decode(p)
      let i = try ringIndex(s.index)
      let base = stopRing(i) ?? rings[i].base
      rings[i].base = base
      rings[i].enabled = false
      if rings[i].kickFd >= 0 { close(rings[i].kickFd) }
      rings[i].kickFd = -1
      return Reply(payload: VringState(index: s.index, num: base).encode())
    case .setVringKick, .setVringCall, .setVringErr:
      let v = try decodeU64(p, "\(request)")
      let i = try ringIndex(UInt32(v & VringFdPayload.indexMask))
      guard v & ~(VringFdPayload.indexMask | VringFdPayload.noFdFlag) == 0 else {
        throw VhostError.invalid("reserved bits set")
      }
      let noFd = v & VringFdPayload.noFdFlag != 0
      try expectFds(noFd ? 0 : 1)
      let fd = noFd ? Int32(-1) : fds[0]
      consumed = true
      let wasRunning = stopRing(i) != nil
      switch request {
      case .setVringKick:
        if rings[i].kickFd >= 0 { close(rings[i].kickFd) }
        rings[i].kickFd = fd
        // As libvhost-user (vu_set_vring_kick_exec -> vu_check_queue_inflights).
        rings[i].inflightCheckPending = true
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
      guard c.offset == 32, c.size == 1 else {
        throw VhostError.invalid("config bytes \(c.offset)+\(c.size) are read-only")
      }
    case .setBackendReqFd:
      try expectFds(1)
      consumed = true
      if backendReqFd >= 0 { close(backendReqFd) }
      backendReqFd = fds[0]
    case .getInflightFd:
      guard tracksInflight else { throw VhostError.invalid("INFLIGHT_SHMFD was not negotiated") }
      let d = try InflightDescription.decode(p)
      guard d.numQueues >= 1, Int(d.numQueues) <= numQueues else {
        throw VhostError.invalid("inflight area for \(d.numQueues) queues; this back-end has \(numQueues)")
      }
      guard d.queueSize >= 1, Int(d.queueSize) <= Self.queueSizeLimit else {
        throw VhostError.invalid("inflight area for queues of \(d.queueSize) entries; at most \(Self.queueSizeLimit)")
      }
      // QEMU sends SET_FEATURES first (vhost_dev_prepare_inflight), so the ring layout is known.
      let area = try InflightArea.allocate(numQueues: Int(d.numQueues), queueSize: Int(d.queueSize), packed: packed)
      offeredInflight = area
      logger.debug(
        "inflight area: \(area.mappingLength) bytes for \(d.numQueues) x \(d.queueSize) \(packed ? "packed" : "split") entries"
      )
      return Reply(payload: area.wireDescription.encode(), fds: [area.fd])
    case .setInflightFd:
      guard tracksInflight else { throw VhostError.invalid("INFLIGHT_SHMFD was not negotiated") }
      let d = try InflightDescription.decode(p)
      try expectFds(1)
      // Mapped, the area needs no descriptor: fds[0] is closed on return.
      // A front-end that asked for the area before SET_FEATURES (QEMU before 5.2) got one sized
      // for split rings: taken as such, and packed rings then run without tracking rather than
      // the device failing to start.
      let packedLayout =
        packed
        && d.mmapSize
          >= UInt64(InflightArea.mmapSize(numQueues: Int(d.numQueues), queueSize: Int(d.queueSize), packed: true))
      if packed && !packedLayout {
        logger.warning("the inflight area is too small for packed rings: they run without inflight tracking")
      }
      let area = try InflightArea.map(
        fd: fds[0], d, maxQueues: numQueues, maxQueueSize: Self.queueSizeLimit, packed: packedLayout)
      if strata_size_sealed(fds[0]) == 0 {
        logger.notice("the inflight area is not size-sealed: a front-end that truncated it would crash this back-end")
      }
      logger.debug(
        "inflight area set: \(d.mmapSize) bytes at offset \(d.mmapOffset) for \(d.numQueues) x \(d.queueSize) entries")
      let running = stopAll()
      defer { restart(running) }
      inflightArea = area
      offeredInflight = nil
      for i in rings.indices {
        let covered = i < area.numQueues
        rings[i].inflight = covered && !area.packed ? InflightRing(area: area, queue: i) : nil
        rings[i].packedInflight = covered && area.packed ? PackedInflightRing(area: area, queue: i) : nil
        rings[i].inflightCheckPending = true
      }
    case .setLogBase, .setLogFd, .sendRarp, .netSetMtu, .iotlbMsg, .setVringEndian, .vringKick, .setStatus,
      .getStatus:
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
    if packed {
      guard let ring = memory.user(a.descUser, length: PackedQueue.ringBytes(r.size)),
        let driverEvent = memory.user(a.availUser, length: PackedQueue.eventBytes),
        let deviceEvent = memory.user(a.usedUser, length: PackedQueue.eventBytes)
      else { throw VhostError.invalid("queue \(i): ring addresses lie outside guest memory") }
      let inflight = tracksInflight ? try packedInflight(i, &r, ring: ring) : nil
      let queue = PackedQueue(
        size: r.size, ring: ring, driverEvent: driverEvent, deviceEvent: deviceEvent, base: r.base,
        eventIdx: features & VirtioFeature.eventIdx != 0, indirect: features & VirtioFeature.indirectDesc != 0,
        maxSegments: Self.segMax + 2, inflight: inflight)
      start(i, &r, .packed(queue), memory)
      return
    }
    guard let desc = memory.user(a.descUser, length: SplitQueue.descBytes(r.size)),
      let avail = memory.user(a.availUser, length: SplitQueue.availBytes(r.size)),
      let used = memory.user(a.usedUser, length: SplitQueue.usedBytes(r.size))
    else { throw VhostError.invalid("queue \(i): ring addresses lie outside guest memory") }
    let inflight = tracksInflight ? try splitInflight(i, &r, used: used) : nil
    let queue = SplitQueue(
      size: r.size, desc: desc, avail: avail, used: used, base: UInt16(truncatingIfNeeded: r.base),
      eventIdx: features & VirtioFeature.eventIdx != 0,
      indirect: features & VirtioFeature.indirectDesc != 0, maxSegments: Self.segMax + 2, inflight: inflight)
    start(i, &r, .split(queue), memory)
  }

  /// Queue `i`'s packed inflight region, recovered when the ring starts after SET_VRING_KICK
  /// or a new area (its position then replaces SET_VRING_BASE's), attached otherwise.
  private func packedInflight(_ i: Int, _ r: inout Ring, ring: UnsafeMutableRawPointer) throws -> PackedInflightRing? {
    guard let region = r.packedInflight else {
      logger.warning("queue \(i) starts without inflight tracking: no packed inflight area covers it")
      return nil
    }
    guard r.size <= region.descNum else {
      throw VhostError.invalid("queue \(i): \(r.size) entries, but its inflight region has \(region.descNum)")
    }
    guard r.inflightCheckPending else {
      let (base, reinitialized) = region.attach(ringSize: r.size, base: r.base)
      if reinitialized {
        logger.warning("queue \(i): its size changed with requests still to resubmit; they are dropped")
      } else if base != r.base {
        logger.info(
          "queue \(i) keeps its inflight region's position 0x\(String(base, radix: 16)), not 0x\(String(r.base, radix: 16))"
        )
      }
      r.base = base
      return region
    }
    let recovery = region.recover(ringSize: r.size, ring: ring, base: r.base)
    if let refused = recovery.refused {
      logger.error("queue \(i): its inflight region makes no sense (\(refused)); reset, nothing resubmitted")
    }
    if let base = recovery.base {
      var notes = ""
      if recovery.committedLastBatch { notes += ", last used buffer committed" }
      if recovery.rolledBack { notes += ", last used buffer rolled back" }
      let what =
        "\(recovery.resubmitted) request(s) to resubmit, base 0x\(String(base, radix: 16)) (SET_VRING_BASE said 0x\(String(r.base, radix: 16)))"
      let level: Logger.Level = base != r.base || !notes.isEmpty ? .info : .debug
      logger.log(level: level, "queue \(i) resumes from its inflight region: \(what)\(notes)")
      r.base = base
    }
    r.inflightCheckPending = false
    return region
  }

  /// Queue `i`'s split inflight region, recovered (with the used index in guest memory) when the
  /// ring starts after SET_VRING_KICK or a new area.
  private func splitInflight(_ i: Int, _ r: inout Ring, used: UnsafeMutableRawPointer) throws -> InflightRing? {
    guard let ring = r.inflight else {
      logger.warning("queue \(i) starts without inflight tracking: no split inflight area covers it")
      return nil
    }
    guard r.size <= ring.descNum else {
      throw VhostError.invalid("queue \(i): \(r.size) entries, but its inflight region has \(ring.descNum)")
    }
    guard r.inflightCheckPending else { return ring }
    let usedIdx = UInt16(littleEndian: strata_load_acquire_u16((used + 2).assumingMemoryBound(to: UInt16.self)))
    let recovery = ring.recover(ringSize: r.size, usedIdx: usedIdx)
    if let base = recovery.base {
      var notes = ""
      if recovery.repairedLastBatch { notes += ", last used entry repaired" }
      if recovery.discarded > 0 { notes += ", \(recovery.discarded) bogus mark(s) cleared" }
      let what = "\(recovery.resubmitted) request(s) to resubmit, next avail \(base) (SET_VRING_BASE said \(r.base))"
      let level: Logger.Level = UInt32(base) != r.base || !notes.isEmpty ? .info : .debug
      logger.log(level: level, "queue \(i) resumes from its inflight region: used index \(usedIdx), \(what)\(notes)")
      r.base = UInt32(base)
    }
    r.inflightCheckPending = false
    return ring
  }

  private func start(_ i: Int, _ r: inout Ring, _ queue: DeviceQueue, _ memory: GuestMemory) {
    let handler = BlockHandler(image: image, readOnly: readOnly, serial: serial, maxSegments: queue.maxSegments)
    let worker = QueueWorker(
      index: i, queue: queue, memory: memory, handler: handler, kickFd: r.kickFd, callFd: r.callFd, logger: logger)
    r.worker = worker
    rings[i] = r
    worker.start()
    logger.debug("queue \(i) started: \(r.size) entries, base \(r.base)\(packed ? ", packed" : "")")
  }

  /// Stops a running ring and returns its next available index (the base to resume from).
  @discardableResult
  private func stopRing(_ i: Int) -> UInt32? {
    guard let worker = rings[i].worker else { return nil }
    worker.stop()
    rings[i].worker = nil
    rings[i].base = worker.queue.base
    return worker.queue.base
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
