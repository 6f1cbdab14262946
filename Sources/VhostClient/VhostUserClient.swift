import CStrataLinux
import Glibc
import VhostProtocol

/// A vhost-user front-end for virtio-blk back-ends: what QEMU does, in-process, as a test and
/// benchmark driver against any vhost-user-blk server.
///
/// Lifecycle: `connect(path:options:)` = `init(path:options:)` (socket only) + `negotiate()`
/// (GET_FEATURES, GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES, GET_QUEUE_NUM,
/// GET_MAX_MEM_SLOTS, SET_OWNER, GET_CONFIG) + `start()` (SET_FEATURES, GET/SET_INFLIGHT_FD,
/// SET_MEM_TABLE or ADD_MEM_REG, per queue SET_VRING_NUM/BASE/ADDR/KICK/CALL, then
/// SET_VRING_ENABLE 1 on every queue). The steps are public so tests can stop anywhere and send
/// whatever they like. Split virtqueues unless `Options.ring` asks for packed ones.
///
/// Not thread-safe: one thread drives a client (it may poll all queues at once, see `waitAny`).
public final class VhostUserClient {
  public struct Options: Sendable {
    /// Bytes of guest memory (one memfd region at guest physical address 0).
    public var memorySize: Int = 64 << 20
    /// Descriptors per virtqueue (a power of two, at most 32768).
    public var queueSize: Int = 256
    /// Queues wanted; `start` sets up min(this, what the back-end offers).
    public var queues: Int = 1
    /// The virtqueue format. `.packed` negotiates VIRTIO_F_RING_PACKED, and `negotiate` fails
    /// with `.unsupported` when the back-end does not offer it.
    public var ring: RingKind = .split
    /// Protocol features the client is willing to use (intersected with the back-end's).
    public var protocolFeatures: UInt64 =
      VhostProtocolFeature.mq.bit | VhostProtocolFeature.replyAck.bit | VhostProtocolFeature.config.bit
    /// Device features wanted besides VERSION_1 and PROTOCOL_FEATURES (intersected with the
    /// back-end's). EVENT_IDX, INDIRECT_DESC and RING_PACKED are added by `eventIdx` /
    /// `indirect` / `ring`.
    public var deviceFeatures: UInt64 =
      VirtioBlkFeature.flush | VirtioBlkFeature.blkSize | VirtioBlkFeature.segMax | VirtioBlkFeature.sizeMax
      | VirtioBlkFeature.mq | VirtioBlkFeature.discard | VirtioBlkFeature.writeZeroes | VirtioBlkFeature.readOnly
      | VirtioBlkFeature.topology
    /// Negotiate VIRTIO_RING_F_EVENT_IDX when offered.
    public var eventIdx: Bool = true
    /// Negotiate VIRTIO_RING_F_INDIRECT_DESC when offered and put every request in an indirect table.
    public var indirect: Bool = false
    /// Negotiate INFLIGHT_SHMFD when offered and do GET_INFLIGHT_FD / SET_INFLIGHT_FD.
    public var inflight: Bool = false
    /// Negotiate CONFIGURE_MEM_SLOTS when offered: GET_MAX_MEM_SLOTS, and ADD_MEM_REG instead of SET_MEM_TABLE.
    public var memSlots: Bool = false
    /// Use REPLY_ACK (NEED_REPLY on every request without a reply) when offered.
    public var replyAck: Bool = true
    /// How long to wait for a reply on the socket.
    public var replyTimeoutMs: Int = 5_000
    /// How long `wait` / `perform` wait for a completion.
    public var ioTimeoutMs: Int = 10_000

    public init() {}
  }

  public let options: Options
  private var socket: VhostSocket

  /// GET_FEATURES.
  public private(set) var backendFeatures: UInt64 = 0
  /// GET_PROTOCOL_FEATURES (0 when the back-end does not offer VHOST_USER_F_PROTOCOL_FEATURES).
  public private(set) var backendProtocolFeatures: UInt64 = 0
  /// What SET_PROTOCOL_FEATURES sent.
  public private(set) var protocolFeatures: UInt64 = 0
  /// What SET_FEATURES sent (known after `negotiate`).
  public private(set) var features: UInt64 = 0
  /// GET_QUEUE_NUM, when MQ was negotiated.
  public private(set) var backendQueueCount: Int?
  /// GET_MAX_MEM_SLOTS, when CONFIGURE_MEM_SLOTS was negotiated.
  public private(set) var maxMemSlots: Int?
  /// The virtio-blk configuration from GET_CONFIG (nil without the CONFIG protocol feature).
  public private(set) var config: VirtioBlkConfig?
  /// True once SET_PROTOCOL_FEATURES enabled REPLY_ACK.
  public private(set) var replyAckEnabled = false
  /// Guest memory, after `start`.
  public private(set) var memory: GuestMemory?
  /// The inflight area (GET_INFLIGHT_FD) as the back-end described it.
  public private(set) var inflightDescription: InflightDescription?
  private var inflightFd: Int32 = -1
  private var inflightMapping: UnsafeMutableRawPointer?
  /// The inflight area as mapped here (tests inspect and forge its contents).
  public var inflightArea: UnsafeMutableRawBufferPointer? {
    guard let m = inflightMapping, let d = inflightDescription else { return nil }
    return UnsafeMutableRawBufferPointer(start: m, count: Int(d.mmapSize))
  }

  private var queues: [Virtqueue] = []
  private var nextRequestID: UInt64 = 1

  /// Waits that slept until their deadline and then found used elements: the back-end
  /// published them without the interrupt the driver asked for. The wait still returns them,
  /// so a lost interrupt would otherwise show only as slowness; tests expect 0.
  public private(set) var unsignalledWakeups = 0

  /// Queues set up by `start`.
  public var queueCount: Int { queues.count }
  /// Whether every bit of `f` was acknowledged with SET_FEATURES.
  public func hasFeature(_ f: UInt64) -> Bool { features & f == f }
  /// Whether requests go in indirect tables (one ring descriptor each instead of up to three).
  public var usesIndirect: Bool { options.indirect && features & VirtioFeature.indirectDesc != 0 }
  /// The virtqueue format negotiated (known after `negotiate`).
  public var ringKind: RingKind { features & VirtioFeature.ringPacked != 0 ? .packed : .split }
  /// Most requests one queue can hold at once (read/write chains take 3 descriptors).
  public var maxDepth: Int { usesIndirect ? options.queueSize : options.queueSize / 3 }
  /// Capacity in bytes from the configuration (nil without GET_CONFIG).
  public var capacityBytes: UInt64? { config.map { $0.capacitySectors &* 512 } }
  /// Whether the back-end still holds its end of the socket open.
  public var isConnected: Bool { socket.peerOpen() }

  /// Connects only; nothing is sent.
  public init(path: String, options: Options = Options()) throws(VhostClientError) {
    self.options = options
    self.socket = try VhostSocket(path: path)
  }

  /// Connects, negotiates and starts the queues, as QEMU does when a guest boots.
  public static func connect(path: String, options: Options = Options()) throws(VhostClientError) -> VhostUserClient {
    let c = try VhostUserClient(path: path, options: options)
    try c.negotiate()
    try c.start()
    return c
  }

  deinit { shutdown() }

  /// Closes the socket, the eventfds and the inflight area, and unmaps guest memory.
  public func shutdown() {
    socket.shutdownAndClose()
    for q in queues { q.closeFds() }
    queues = []
    memory = nil
    if let m = inflightMapping, let d = inflightDescription {
      munmap(m, Int(d.mmapSize))
      inflightMapping = nil
    }
    if inflightFd >= 0 {
      close(inflightFd)
      inflightFd = -1
    }
  }

  // MARK: Messages

  /// Requests that the back-end answers with a message of its own; NEED_REPLY is never set on them.
  public static let requestsWithReply: Set<UInt32> = [
    VhostRequest.getFeatures, .getProtocolFeatures, .getQueueNum, .getVringBase, .getConfig, .getInflightFd,
    .getMaxMemSlots, .getStatus, .setLogBase,
  ].reduce(into: []) { $0.insert($1.rawValue) }

  /// Sends one request and handles its reply: returns the reply for requests that have one;
  /// for the others, when REPLY_ACK is enabled, sets NEED_REPLY and checks the ack is 0.
  @discardableResult
  public func send(_ request: VhostRequest, payload: [UInt8] = [], fds: [Int32] = []) throws(VhostClientError)
    -> VhostMessage?
  {
    let expectsReply = Self.requestsWithReply.contains(request.rawValue)
    let ack = !expectsReply && replyAckEnabled
    var flags = VhostHeader.version
    if ack { flags |= VhostHeader.needReplyFlag }
    try sendMessage(request: request.rawValue, flags: flags, payload: payload, fds: fds)
    guard expectsReply || ack else { return nil }
    var reply = try receiveMessage()
    guard reply.request == request.rawValue, reply.isReply, reply.flags & VhostHeader.versionMask == VhostHeader.version
    else {
      reply.closeFds()
      throw .protocolViolation(
        "reply to \(request) has request \(reply.request), flags 0x\(String(reply.flags, radix: 16))")
    }
    if ack {
      reply.closeFds()
      guard let v = reply.u64 else {
        throw .protocolViolation("REPLY_ACK to \(request) has \(reply.payload.count) payload bytes, not 8")
      }
      guard v == 0 else { throw .nack(request: request.rawValue, value: v) }
      return nil
    }
    return reply
  }

  /// Sends a request that has a u64 reply and returns it.
  public func getU64(_ request: VhostRequest) throws(VhostClientError) -> UInt64 {
    guard var reply = try send(request) else { throw .protocolViolation("no reply to \(request)") }
    reply.closeFds()
    guard let v = reply.u64 else {
      throw .protocolViolation("reply to \(request) has \(reply.payload.count) payload bytes, not 8")
    }
    return v
  }

  /// Sends one framed message with any header values: `size` defaults to the payload's length
  /// but may lie. Does not read anything back.
  public func sendMessage(
    request: UInt32, flags: UInt32 = VhostHeader.version, size: UInt32? = nil, payload: [UInt8] = [],
    fds: [Int32] = []
  ) throws(VhostClientError) {
    var bytes = VhostHeader(request: request, flags: flags, size: size ?? UInt32(payload.count)).encode()
    bytes += payload
    try socket.send(bytes, fds: fds)
  }

  /// Sends arbitrary bytes (a header or not) with arbitrary descriptors.
  public func sendRaw(_ bytes: [UInt8], fds: [Int32] = []) throws(VhostClientError) {
    try socket.send(bytes, fds: fds)
  }

  /// Reads one message from the back-end (the caller owns its fds).
  public func receiveMessage(timeoutMs: Int? = nil) throws(VhostClientError) -> VhostMessage {
    try socket.receive(timeoutMs: timeoutMs ?? options.replyTimeoutMs)
  }

  // MARK: Negotiation

  /// GET_FEATURES, GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES, GET_QUEUE_NUM,
  /// GET_MAX_MEM_SLOTS, SET_OWNER, GET_CONFIG; computes `features` (sent by `start`).
  public func negotiate() throws(VhostClientError) {
    backendFeatures = try getU64(.getFeatures)
    guard backendFeatures & VirtioFeature.version1 != 0 else {
      throw .unsupported(
        "back-end does not offer VIRTIO_F_VERSION_1 (features 0x\(String(backendFeatures, radix: 16)))")
    }
    guard options.ring == .split || backendFeatures & VirtioFeature.ringPacked != 0 else {
      throw .unsupported(
        "packed virtqueues asked for, but the back-end does not offer VIRTIO_F_RING_PACKED (bit 34; "
          + "features 0x\(String(backendFeatures, radix: 16)))")
    }
    if backendFeatures & VirtioFeature.protocolFeatures != 0 {
      backendProtocolFeatures = try getU64(.getProtocolFeatures)
      var wanted = options.protocolFeatures
      if !options.replyAck { wanted &= ~VhostProtocolFeature.replyAck.bit }
      if options.inflight { wanted |= VhostProtocolFeature.inflightShmfd.bit }
      if options.memSlots { wanted |= VhostProtocolFeature.configureMemSlots.bit }
      protocolFeatures = backendProtocolFeatures & wanted
      try send(.setProtocolFeatures, payload: encodeU64(protocolFeatures))
      replyAckEnabled = protocolFeatures & VhostProtocolFeature.replyAck.bit != 0
      if hasProtocol(.mq) { backendQueueCount = Int(try getU64(.getQueueNum)) }
      if hasProtocol(.configureMemSlots) { maxMemSlots = Int(try getU64(.getMaxMemSlots)) }
    }
    try send(.setOwner)
    if hasProtocol(.config) {
      config = try getConfig()
    }
    var wanted = VirtioFeature.version1 | VirtioFeature.protocolFeatures | options.deviceFeatures
    if options.eventIdx { wanted |= VirtioFeature.eventIdx }
    if options.indirect { wanted |= VirtioFeature.indirectDesc }
    // The ring format follows `ring` alone, whatever `deviceFeatures` says.
    wanted &= ~VirtioFeature.ringPacked
    if options.ring == .packed { wanted |= VirtioFeature.ringPacked }
    features = backendFeatures & wanted
  }

  public func hasProtocol(_ f: VhostProtocolFeature) -> Bool { protocolFeatures & f.bit != 0 }

  /// GET_CONFIG of the 60-byte virtio-blk configuration; nil when the back-end answers with an
  /// empty payload (its way of failing).
  public func getConfig() throws(VhostClientError) -> VirtioBlkConfig? {
    let request = ConfigSpace(
      offset: 0, size: UInt32(VirtioBlkConfig.size), flags: 0,
      payload: [UInt8](repeating: 0, count: VirtioBlkConfig.size))
    guard var reply = try send(.getConfig, payload: request.encode()) else { return nil }
    reply.closeFds()
    if reply.payload.isEmpty { return nil }
    let space: ConfigSpace
    do {
      space = try reply.payload.withUnsafeBytes { (b) throws(VhostError) in try ConfigSpace.decode(b) }
    } catch {
      throw .protocolViolation("GET_CONFIG reply: \(error)")
    }
    guard space.size == UInt32(VirtioBlkConfig.size) else {
      throw .protocolViolation("GET_CONFIG reply has \(space.size) bytes of config, asked for \(VirtioBlkConfig.size)")
    }
    do { return try VirtioBlkConfig.decode(space.payload) } catch { throw .protocolViolation("\(error)") }
  }

  // MARK: Start

  /// SET_FEATURES, inflight area, guest memory, the virtqueues, then SET_VRING_ENABLE.
  public func start() throws(VhostClientError) {
    guard queues.isEmpty else { throw .invalidArgument("start called twice") }
    let n = options.queueSize
    guard n > 0, n <= 32768, n & (n - 1) == 0 else { throw .invalidArgument("queue size \(n) is not a power of two") }
    var count = max(1, options.queues)
    if hasProtocol(.mq) { count = min(count, max(1, backendQueueCount ?? 1)) } else { count = 1 }
    if features & VirtioBlkFeature.mq != 0 {
      if let c = config, c.numQueues > 0 { count = min(count, Int(c.numQueues)) }
    } else {
      count = 1
    }

    // Features first, as QEMU's vhost_dev_prepare_inflight does: the back-end sizes the
    // inflight area for the ring format they name.
    try send(.setFeatures, payload: encodeU64(features))
    if hasProtocol(.inflightShmfd) { try setUpInflight(queues: count) }

    let memory = try GuestMemory(size: options.memorySize)
    self.memory = memory
    try sendMemory(memory)

    let eventIdx = features & VirtioFeature.eventIdx != 0
    let kind = ringKind
    let bytes = VirtqueueLayout.areaBytes(kind, n)
    for q in 0..<count {
      guard let d = memory.allocate(bytes.desc, alignment: 4096),
        let a = memory.allocate(bytes.avail, alignment: 4096),
        let u = memory.allocate(bytes.used, alignment: 4096)
      else { throw .outOfGuestMemory(requested: bytes.desc) }
      let layout = VirtqueueLayout(kind: kind, size: n, desc: d, avail: a, used: u)
      let kick = strata_eventfd(0, 0)
      guard kick >= 0 else { throw .system("eventfd", errno: errno) }
      let call = strata_eventfd(0, strata_efd_nonblock())
      guard call >= 0 else {
        close(kick)
        throw .system("eventfd", errno: errno)
      }
      let vq = Virtqueue(index: q, layout: layout, memory: memory, kickFd: kick, callFd: call, eventIdx: eventIdx)
      queues.append(vq)
      try sendRing(vq, memory: memory)
    }
    try enableRings()
  }

  private func sendMemory(_ memory: GuestMemory) throws(VhostClientError) {
    let region = MemoryRegion(
      guestAddress: 0, size: UInt64(memory.size), userAddress: memory.userAddress, mmapOffset: 0)
    if hasProtocol(.configureMemSlots) {
      try send(.addMemReg, payload: SingleMemoryRegion(region: region).encode(), fds: [memory.fd])
    } else {
      try send(.setMemTable, payload: MemoryTable(regions: [region]).encode(), fds: [memory.fd])
    }
  }

  /// SET_VRING_NUM, SET_VRING_BASE, SET_VRING_ADDR, SET_VRING_KICK, SET_VRING_CALL of one queue.
  /// The base is where guest memory says the device stands (0, or both wrap counters set, for a
  /// new ring).
  private func sendRing(_ vq: Virtqueue, memory: GuestMemory) throws(VhostClientError) {
    let idx = UInt32(vq.index)
    let l = vq.layout
    try send(.setVringNum, payload: VringState(index: idx, num: UInt32(l.size)).encode())
    try send(.setVringBase, payload: VringState(index: idx, num: vq.ring.resumeBase).encode())
    try send(
      .setVringAddr,
      payload: VringAddress(
        index: idx, flags: 0, descUser: memory.userAddress(of: l.desc), usedUser: memory.userAddress(of: l.used),
        availUser: memory.userAddress(of: l.avail), logGuest: 0
      ).encode())
    try send(.setVringKick, payload: encodeU64(UInt64(vq.index)), fds: [vq.kickFd])
    try send(.setVringCall, payload: encodeU64(UInt64(vq.index)), fds: [vq.callFd])
  }

  private func enableRings() throws(VhostClientError) {
    if features & VirtioFeature.protocolFeatures != 0 {
      for q in queues.indices {
        try send(.setVringEnable, payload: VringState(index: UInt32(q), num: 1).encode())
      }
    }
  }

  /// Connects again after the back-end went away, as QEMU does with `reconnect=`: a new socket,
  /// `negotiate`, SET_FEATURES, then SET_INFLIGHT_FD with the area kept from `start`
  /// (GET_INFLIGHT_FD only if there is none yet), the same guest memory, and every queue again
  /// with its eventfds and SET_VRING_BASE = the used position in guest memory (what QEMU
  /// restores for a split ring when GET_VRING_BASE is impossible). Requests in flight stay
  /// tracked: a back-end with INFLIGHT_SHMFD resubmits those the previous one had not
  /// completed, and the rest are still available in the ring. Throws `.unsupported` if the new
  /// back-end negotiates other features.
  public func reconnect(path: String) throws(VhostClientError) {
    guard let memory, !queues.isEmpty else { throw .invalidArgument("reconnect before start") }
    let previous = (features: features, protocolFeatures: protocolFeatures)
    socket.shutdownAndClose()
    socket = try VhostSocket(path: path)
    replyAckEnabled = false
    try negotiate()
    guard features == previous.features, protocolFeatures == previous.protocolFeatures else {
      throw .unsupported(
        "the back-end negotiated features 0x\(String(features, radix: 16)) / protocol 0x\(String(protocolFeatures, radix: 16)), "
          + "was 0x\(String(previous.features, radix: 16)) / 0x\(String(previous.protocolFeatures, radix: 16))")
    }
    try send(.setFeatures, payload: encodeU64(features))
    if hasProtocol(.inflightShmfd) {
      if inflightFd >= 0, let d = inflightDescription {
        let set = InflightDescription(
          mmapSize: d.mmapSize, mmapOffset: d.mmapOffset, numQueues: UInt16(queues.count),
          queueSize: UInt16(options.queueSize))
        try send(.setInflightFd, payload: set.encode(), fds: [inflightFd])
      } else {
        try setUpInflight(queues: queues.count)
      }
    }
    try sendMemory(memory)
    for vq in queues { try sendRing(vq, memory: memory) }
    try enableRings()
  }

  private func setUpInflight(queues count: Int) throws(VhostClientError) {
    let ask = InflightDescription(
      mmapSize: 0, mmapOffset: 0, numQueues: UInt16(count), queueSize: UInt16(options.queueSize))
    guard var reply = try send(.getInflightFd, payload: ask.encode()) else {
      throw .protocolViolation("no reply to GET_INFLIGHT_FD")
    }
    let d: InflightDescription
    do {
      d = try reply.payload.withUnsafeBytes { (b) throws(VhostError) in try InflightDescription.decode(b) }
    } catch {
      reply.closeFds()
      throw .protocolViolation("GET_INFLIGHT_FD reply: \(error)")
    }
    guard reply.fds.count == 1, d.mmapSize > 0 else {
      reply.closeFds()
      throw .protocolViolation("GET_INFLIGHT_FD reply with \(reply.fds.count) fds and mmap_size \(d.mmapSize)")
    }
    let fd = reply.fds[0]
    inflightFd = fd
    guard let p = mmap(nil, Int(d.mmapSize), PROT_READ | PROT_WRITE, MAP_SHARED, fd, off_t(d.mmapOffset)),
      p != UnsafeMutableRawPointer(bitPattern: -1)
    else { throw .system("mmap(inflight)", errno: errno) }
    inflightMapping = p
    inflightDescription = d
    let set = InflightDescription(
      mmapSize: d.mmapSize, mmapOffset: d.mmapOffset, numQueues: UInt16(count), queueSize: UInt16(options.queueSize))
    try send(.setInflightFd, payload: set.encode(), fds: [fd])
  }

  /// GET_VRING_BASE: stops the queue in the back-end and returns its next avail index.
  public func getVringBase(queue: Int) throws(VhostClientError) -> UInt32 {
    guard var reply = try send(.getVringBase, payload: VringState(index: UInt32(queue), num: 0).encode()) else {
      throw .protocolViolation("no reply to GET_VRING_BASE")
    }
    reply.closeFds()
    do {
      return try reply.payload.withUnsafeBytes { (b) throws(VhostError) in try VringState.decode(b) }.num
    } catch {
      throw .protocolViolation("GET_VRING_BASE reply: \(error)")
    }
  }

  // MARK: Requests

  private func queue(_ q: Int) throws(VhostClientError) -> Virtqueue {
    guard q >= 0, q < queues.count else { throw .invalidArgument("queue \(q) of \(queues.count)") }
    return queues[q]
  }

  private func guestMemory() throws(VhostClientError) -> GuestMemory {
    guard let m = memory else { throw .invalidArgument("not started") }
    return m
  }

  /// Builds the request's descriptor chain in guest memory, publishes it in the avail ring and
  /// (with `kick`) notifies the back-end if it wants to be. Returns the request id that its
  /// completion will carry. With `copyData` false, read data stays in guest memory (benchmarks).
  @discardableResult
  public func submit(queue q: Int, _ request: BlockRequest, kick: Bool = true, copyData: Bool = true)
    throws(VhostClientError) -> UInt64
  {
    let vq = try queue(q)
    let memory = try guestMemory()
    let readable = request.readablePayload
    let writable = request.writableLength
    guard writable >= 0 else { throw .invalidArgument("negative writable length") }

    guard let header = memory.allocate(64) else { throw .outOfGuestMemory(requested: 64) }
    let hp = memory.pointer(header)
    hp.storeBytes(of: request.type.littleEndian, toByteOffset: 0, as: UInt32.self)
    hp.storeBytes(of: UInt32(0), toByteOffset: 4, as: UInt32.self)
    hp.storeBytes(of: request.sector.littleEndian, toByteOffset: 8, as: UInt64.self)
    hp.storeBytes(of: UInt8(0xFF), toByteOffset: 16, as: UInt8.self)

    // One data block: the device-readable bytes, then (page-aligned) the device-writable ones.
    let writableOffset = readable.isEmpty ? 0 : (readable.count + 4095) / 4096 * 4096
    let dataCount = writable > 0 ? writableOffset + writable : readable.count
    var dataAddress: UInt64?
    if dataCount > 0 {
      guard let d = memory.allocate(dataCount, alignment: 4096) else {
        memory.free(header, count: 64)
        throw .outOfGuestMemory(requested: dataCount)
      }
      dataAddress = d
      if !readable.isEmpty { memory.write(readable, at: d) }
    }

    var chain = [ChainElement(address: header, length: 16, flags: 0)]
    if let d = dataAddress {
      if !readable.isEmpty { chain.append(ChainElement(address: d, length: UInt32(readable.count), flags: 0)) }
      if writable > 0 {
        chain.append(
          ChainElement(address: d + UInt64(writableOffset), length: UInt32(writable), flags: VirtqDescFlag.write))
      }
    }
    chain.append(ChainElement(address: header + 16, length: 1, flags: VirtqDescFlag.write))

    func release() {
      memory.free(header, count: 64)
      if let d = dataAddress { memory.free(d, count: dataCount) }
    }
    var elements = chain
    var indirectAddress: UInt64?
    if usesIndirect {
      guard let table = memory.allocate(16 * chain.count, alignment: 16) else {
        release()
        throw .outOfGuestMemory(requested: 16 * chain.count)
      }
      vq.ring.writeTable(chain, at: memory.pointer(table))
      indirectAddress = table
      elements = [ChainElement(address: table, length: UInt32(16 * chain.count), flags: VirtqDescFlag.indirect)]
    }
    let submitNs = monotonicNanoseconds()
    guard let head = vq.ring.publish(elements) else {
      if let t = indirectAddress { memory.free(t, count: 16 * chain.count) }
      release()
      throw .queueFull(queue: q)
    }
    let id = nextRequestID
    nextRequestID += 1
    // Tracked after publishing: completions are only reaped by this thread, later.
    vq.track(
      id: head,
      .init(
        id: id, headerAddress: header, dataAddress: dataAddress, dataCount: dataCount, writableOffset: writableOffset,
        writableLength: writable, indirectAddress: indirectAddress, indirectCount: chain.count, copyData: copyData,
        submitNs: submitNs))
    if kick { try vq.kick(force: false) }
    return id
  }

  /// Notifies the back-end of everything published since the last notification, if it asked
  /// for notifications (EVENT_IDX / NO_NOTIFY), or unconditionally with `force`.
  public func kick(queue q: Int, force: Bool = false) throws(VhostClientError) {
    try queue(q).kick(force: force)
  }

  /// Requests published and not completed.
  public func inFlight(queue q: Int) -> Int { q < queues.count ? queues[q].inFlight : 0 }

  /// Free descriptors in a queue's table (split) or ring (packed).
  public func freeDescriptorCount(queue q: Int) -> Int { q < queues.count ? queues[q].ring.freeCount : 0 }

  /// Completions available now, without blocking.
  public func poll(queue q: Int) throws(VhostClientError) -> [VhostCompletion] {
    let vq = try queue(q)
    let memory = try guestMemory()
    var out = vq.stash
    vq.stash = []
    out += try vq.reap(memory: memory)
    return out
  }

  /// Completions of one queue, blocking on its call eventfd until there is at least one (or
  /// returning [] at once when nothing is in flight and nothing is stashed).
  public func wait(queue q: Int, timeoutMs: Int? = nil) throws(VhostClientError) -> [VhostCompletion] {
    try waitAny(queues: [q], timeoutMs: timeoutMs)
  }

  /// Completions from any of `queues` (all by default), blocking in poll() on their call
  /// eventfds until at least one is ready. Raw heads placed with `publish` count as in flight
  /// only while something else is: use `waitRaw` for those.
  public func waitAny(queues which: [Int]? = nil, timeoutMs: Int? = nil) throws(VhostClientError)
    -> [VhostCompletion]
  {
    let list = try (which ?? Array(0..<queues.count)).map { (i) throws(VhostClientError) in try queue(i) }
    let deadline = monotonicNanoseconds() + UInt64(timeoutMs ?? options.ioTimeoutMs) * 1_000_000
    return try waitLoop(list, deadline: deadline, stopWhenIdle: true)
  }

  /// Waits for used entries on one queue even if no managed request is in flight (raw heads).
  public func waitRaw(queue q: Int, timeoutMs: Int? = nil) throws(VhostClientError) -> [VhostCompletion] {
    let deadline = monotonicNanoseconds() + UInt64(timeoutMs ?? options.ioTimeoutMs) * 1_000_000
    return try waitLoop([try queue(q)], deadline: deadline, stopWhenIdle: false)
  }

  private func waitLoop(_ list: [Virtqueue], deadline: UInt64, stopWhenIdle: Bool) throws(VhostClientError)
    -> [VhostCompletion]
  {
    let memory = try guestMemory()
    var sleptToDeadline = false
    while true {
      var out: [VhostCompletion] = []
      for vq in list {
        out += vq.stash
        vq.stash = []
        out += try vq.reap(memory: memory)
      }
      if !out.isEmpty {
        if sleptToDeadline { unsignalledWakeups += 1 }
        return out
      }
      if stopWhenIdle && list.allSatisfy({ $0.inFlight == 0 }) { return [] }
      // Arm notifications, then re-check before sleeping so no completion is missed.
      var ready = false
      for vq in list where !vq.armNotification() { ready = true }
      if ready { continue }
      let now = monotonicNanoseconds()
      guard now < deadline else {
        throw .timeout("completions on queue(s) \(list.map(\.index)) (\(list.map(\.inFlight)) in flight)")
      }
      var fds = list.map { pollfd(fd: $0.callFd, events: Int16(POLLIN), revents: 0) }
      fds.append(pollfd(fd: socket.fd, events: pollRDHUP, revents: 0))
      let ms = Int32(min(UInt64(Int32.max), (deadline - now + 999_999) / 1_000_000))
      let r = Glibc.poll(&fds, nfds_t(fds.count), ms)
      if r < 0 {
        if errno == EINTR { continue }
        throw .system("poll", errno: errno)
      }
      sleptToDeadline = r == 0
      for (i, vq) in list.enumerated() where fds[i].revents & Int16(POLLIN) != 0 { vq.drainCall() }
      if fds[list.count].revents & (Int16(POLLHUP) | Int16(POLLERR) | pollRDHUP) != 0 {
        // Take what the back-end completed before it went away, then report the disconnect.
        var last: [VhostCompletion] = []
        for vq in list { last += try vq.reap(memory: memory) }
        if !last.isEmpty { return last }
        throw .disconnected
      }
    }
  }

  /// Submits one request and waits for its completion (other completions are kept for `poll`).
  public func perform(queue q: Int = 0, _ request: BlockRequest, timeoutMs: Int? = nil) throws(VhostClientError)
    -> VhostCompletion
  {
    let vq = try queue(q)
    let id = try submit(queue: q, request)
    let deadline = monotonicNanoseconds() + UInt64(timeoutMs ?? options.ioTimeoutMs) * 1_000_000
    while true {
      let now = monotonicNanoseconds()
      guard now < deadline else { throw .timeout("request \(id) on queue \(q)") }
      let got = try wait(queue: q, timeoutMs: Int((deadline - now) / 1_000_000) + 1)
      var mine: VhostCompletion?
      for c in got {
        if c.requestID == id { mine = c } else { vq.stash.append(c) }
      }
      if let m = mine { return m }
      if got.isEmpty && vq.inFlight == 0 { throw .protocolViolation("request \(id) vanished") }
    }
  }

  // MARK: Raw ring access (robustness tests)

  /// The guest-physical placement of a queue's rings.
  public func layout(queue q: Int) throws(VhostClientError) -> VirtqueueLayout { try queue(q).layout }

  /// The split ring of queue `q`: the raw calls below place descriptors by table index and
  /// heads in the avail ring, which a packed ring does not have.
  private func splitRing(_ q: Int) throws(VhostClientError) -> (Virtqueue, SplitRing) {
    let vq = try queue(q)
    guard let ring = vq.split else { throw .invalidArgument("queue \(q) is packed: raw ring access is split-only") }
    return (vq, ring)
  }

  /// Takes descriptors out of the managed free list so raw placement cannot collide with
  /// managed requests.
  public func reserveDescriptors(queue q: Int, count: Int) throws(VhostClientError) -> [UInt16] {
    guard let d = try splitRing(q).1.takeDescriptors(count) else { throw .queueFull(queue: q) }
    return d
  }

  /// Gives reserved descriptors back (only once the back-end is done with them).
  public func releaseDescriptors(queue q: Int, _ d: [UInt16]) throws(VhostClientError) {
    try splitRing(q).1.returnDescriptors(d)
  }

  /// Writes any values into descriptor `index` of a queue's table (index must be < queue size).
  public func placeDescriptor(queue q: Int, index: UInt16, address: UInt64, length: UInt32, flags: UInt16, next: UInt16)
    throws(VhostClientError)
  {
    let (vq, ring) = try splitRing(q)
    guard Int(index) < vq.size else { throw .invalidArgument("descriptor \(index) of \(vq.size)") }
    ring.writeDescriptor(index, address: address, length: length, flags: flags, next: next)
  }

  /// Publishes any head value (even out of range) in the avail ring, then kicks unconditionally.
  public func publish(queue q: Int, head: UInt16, kick: Bool = true) throws(VhostClientError) {
    let (vq, ring) = try splitRing(q)
    ring.publish(head: head)
    if kick { try vq.kick(force: true) }
  }

  /// Sets avail->idx to any value (e.g. far ahead of the ring) and kicks.
  public func setAvailIndex(queue q: Int, _ value: UInt16, kick: Bool = true) throws(VhostClientError) {
    let (vq, ring) = try splitRing(q)
    ring.forceAvailIdx(value)
    if kick { try vq.kick(force: true) }
  }

  /// The avail index the client last published and the used index it last reaped.
  public func ringIndices(queue q: Int) throws(VhostClientError) -> (avail: UInt16, lastUsed: UInt16) {
    let ring = try splitRing(q).1
    return (ring.availIdx, ring.lastUsedIdx)
  }
}
