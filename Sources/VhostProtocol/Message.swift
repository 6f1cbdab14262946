/// vhost-user messages (QEMU docs/interop/vhost-user.rst): syntax only. Meaning — which
/// message is allowed when, with which negotiated features — lives in the server.
///
/// Every message is a 12-byte header (request, flags, payload size; little-endian, as the
/// protocol is host-endian and Strata runs on little-endian hosts) followed by `size` bytes of
/// payload; file descriptors travel alongside as SCM_RIGHTS ancillary data.

public enum VhostRequest: UInt32, Sendable, CaseIterable {
  case getFeatures = 1
  case setFeatures = 2
  case setOwner = 3
  case resetOwner = 4
  case setMemTable = 5
  case setLogBase = 6
  case setLogFd = 7
  case setVringNum = 8
  case setVringAddr = 9
  case setVringBase = 10
  case getVringBase = 11
  case setVringKick = 12
  case setVringCall = 13
  case setVringErr = 14
  case getProtocolFeatures = 15
  case setProtocolFeatures = 16
  case getQueueNum = 17
  case setVringEnable = 18
  case sendRarp = 19
  case netSetMtu = 20
  case setBackendReqFd = 21
  case iotlbMsg = 22
  case setVringEndian = 23
  case getConfig = 24
  case setConfig = 25
  case getInflightFd = 31
  case setInflightFd = 32
  case resetDevice = 34
  case vringKick = 35
  case getMaxMemSlots = 36
  case addMemReg = 37
  case remMemReg = 38
  case setStatus = 39
  case getStatus = 40
}

/// Back-end to front-end requests on the BACKEND_REQ channel.
public enum VhostBackendRequest: UInt32, Sendable {
  case configChangeMsg = 2
}

public enum VhostProtocolFeature: Int, Sendable, CaseIterable {
  case mq = 0
  case logShmfd = 1
  case rarp = 2
  case replyAck = 3
  case mtu = 4
  case backendReq = 5
  case crossEndian = 6
  case cryptoSession = 7
  case pagefault = 8
  case config = 9
  case backendSendFd = 10
  case hostNotifier = 11
  case inflightShmfd = 12
  case resetDevice = 13
  case inbandNotifications = 14
  case configureMemSlots = 15
  case status = 16

  public var bit: UInt64 { 1 << UInt64(rawValue) }
}

public struct VhostHeader: Equatable, Sendable {
  public static let size = 12
  /// Largest payload Strata accepts: a memory table of 8 regions is 328 bytes, GET_CONFIG 268.
  public static let maxPayload = 4096
  public static let versionMask: UInt32 = 0x3
  public static let version: UInt32 = 0x1
  public static let replyFlag: UInt32 = 1 << 2
  public static let needReplyFlag: UInt32 = 1 << 3

  public var request: UInt32
  public var flags: UInt32
  public var size: UInt32

  public init(request: UInt32, flags: UInt32, size: UInt32) {
    self.request = request
    self.flags = flags
    self.size = size
  }

  public var needsReply: Bool { flags & Self.needReplyFlag != 0 }
  public var isReply: Bool { flags & Self.replyFlag != 0 }

  public static func decode(_ bytes: UnsafeRawBufferPointer) throws(VhostError) -> VhostHeader {
    guard bytes.count >= size else { throw .truncated("header", bytes.count) }
    let h = VhostHeader(
      request: bytes.loadUnaligned(fromByteOffset: 0, as: UInt32.self).littleEndian,
      flags: bytes.loadUnaligned(fromByteOffset: 4, as: UInt32.self).littleEndian,
      size: bytes.loadUnaligned(fromByteOffset: 8, as: UInt32.self).littleEndian)
    guard h.flags & versionMask == version else { throw .badVersion(h.flags & versionMask) }
    guard h.size <= maxPayload else { throw .oversized(h.size) }
    return h
  }

  public func encode() -> [UInt8] {
    var out = [UInt8]()
    out.reserveCapacity(Self.size)
    for v in [request, flags, size] { withUnsafeBytes(of: v.littleEndian) { out.append(contentsOf: $0) } }
    return out
  }
}

/// Why a message was rejected. The server logs it and replies with failure or drops the
/// connection; it never crashes on it.
public enum VhostError: Error, Equatable, CustomStringConvertible, Sendable {
  case truncated(String, Int)
  case badVersion(UInt32)
  case oversized(UInt32)
  case badPayloadSize(String, expected: Int, got: Int)
  case invalid(String)
  case fdCount(String, expected: Int, got: Int)

  public var description: String {
    switch self {
    case .truncated(let what, let n): "\(what) truncated at \(n) bytes"
    case .badVersion(let v): "unsupported vhost-user version \(v)"
    case .oversized(let n): "payload of \(n) bytes exceeds the \(VhostHeader.maxPayload)-byte limit"
    case .badPayloadSize(let what, let e, let g): "\(what) payload must be \(e) bytes, got \(g)"
    case .invalid(let why): why
    case .fdCount(let what, let e, let g): "\(what) must carry \(e) file descriptor(s), got \(g)"
    }
  }
}

/// Little-endian payload reading with bounds checks.
public struct PayloadReader {
  let bytes: UnsafeRawBufferPointer
  var offset = 0
  let what: String

  public init(_ bytes: UnsafeRawBufferPointer, what: String) {
    self.bytes = bytes
    self.what = what
  }

  public mutating func u64() throws(VhostError) -> UInt64 { try integer() }
  public mutating func u32() throws(VhostError) -> UInt32 { try integer() }
  public mutating func u16() throws(VhostError) -> UInt16 { try integer() }
  public mutating func u8() throws(VhostError) -> UInt8 { try integer() }

  private mutating func integer<T: FixedWidthInteger>() throws(VhostError) -> T {
    let n = MemoryLayout<T>.size
    guard offset + n <= bytes.count else { throw .truncated(what, bytes.count) }
    defer { offset += n }
    return T(littleEndian: bytes.loadUnaligned(fromByteOffset: offset, as: T.self))
  }
}

/// Little-endian payload building.
public struct PayloadWriter {
  public private(set) var bytes: [UInt8] = []
  public init() {}
  public mutating func u64(_ v: UInt64) { put(v) }
  public mutating func u32(_ v: UInt32) { put(v) }
  public mutating func u16(_ v: UInt16) { put(v) }
  public mutating func u8(_ v: UInt8) { bytes.append(v) }
  public mutating func raw(_ b: [UInt8]) { bytes += b }
  private mutating func put<T: FixedWidthInteger>(_ v: T) { withUnsafeBytes(of: v.littleEndian) { bytes += $0 } }
}

// MARK: Payloads

/// SET_VRING_NUM / SET_VRING_BASE / GET_VRING_BASE / SET_VRING_ENABLE.
public struct VringState: Equatable, Sendable {
  public var index: UInt32
  public var num: UInt32
  public init(index: UInt32, num: UInt32) {
    self.index = index
    self.num = num
  }
  public static func decode(_ p: UnsafeRawBufferPointer) throws(VhostError) -> VringState {
    guard p.count == 8 else { throw .badPayloadSize("vring state", expected: 8, got: p.count) }
    var r = PayloadReader(p, what: "vring state")
    return VringState(index: try r.u32(), num: try r.u32())
  }
  public func encode() -> [UInt8] {
    var w = PayloadWriter()
    w.u32(index)
    w.u32(num)
    return w.bytes
  }
}

/// SET_VRING_ADDR: ring addresses in the front-end's virtual address space.
public struct VringAddress: Equatable, Sendable {
  public var index: UInt32
  public var flags: UInt32
  public var descUser: UInt64
  public var usedUser: UInt64
  public var availUser: UInt64
  public var logGuest: UInt64
  public init(index: UInt32, flags: UInt32, descUser: UInt64, usedUser: UInt64, availUser: UInt64, logGuest: UInt64) {
    self.index = index
    self.flags = flags
    self.descUser = descUser
    self.usedUser = usedUser
    self.availUser = availUser
    self.logGuest = logGuest
  }
  public static func decode(_ p: UnsafeRawBufferPointer) throws(VhostError) -> VringAddress {
    guard p.count == 40 else { throw .badPayloadSize("vring address", expected: 40, got: p.count) }
    var r = PayloadReader(p, what: "vring address")
    return VringAddress(
      index: try r.u32(), flags: try r.u32(), descUser: try r.u64(), usedUser: try r.u64(), availUser: try r.u64(),
      logGuest: try r.u64())
  }
  public func encode() -> [UInt8] {
    var w = PayloadWriter()
    w.u32(index)
    w.u32(flags)
    w.u64(descUser)
    w.u64(usedUser)
    w.u64(availUser)
    w.u64(logGuest)
    return w.bytes
  }
}

public struct MemoryRegion: Equatable, Sendable {
  public var guestAddress: UInt64
  public var size: UInt64
  public var userAddress: UInt64
  public var mmapOffset: UInt64
  public init(guestAddress: UInt64, size: UInt64, userAddress: UInt64, mmapOffset: UInt64) {
    self.guestAddress = guestAddress
    self.size = size
    self.userAddress = userAddress
    self.mmapOffset = mmapOffset
  }

  /// Regions must be non-empty and must not wrap any address space.
  func validate() throws(VhostError) {
    guard size > 0, guestAddress <= UInt64.max - size, userAddress <= UInt64.max - size,
      mmapOffset <= UInt64.max - size
    else { throw .invalid("memory region \(self) is empty or wraps around") }
  }

  static func decode(_ r: inout PayloadReader) throws(VhostError) -> MemoryRegion {
    let region = MemoryRegion(
      guestAddress: try r.u64(), size: try r.u64(), userAddress: try r.u64(), mmapOffset: try r.u64())
    try region.validate()
    return region
  }

  func encode(_ w: inout PayloadWriter) {
    w.u64(guestAddress)
    w.u64(size)
    w.u64(userAddress)
    w.u64(mmapOffset)
  }
}

/// SET_MEM_TABLE: up to 8 regions, one fd each.
public struct MemoryTable: Equatable, Sendable {
  public static let maxRegions = 8
  public var regions: [MemoryRegion]
  public init(regions: [MemoryRegion]) { self.regions = regions }

  public static func decode(_ p: UnsafeRawBufferPointer) throws(VhostError) -> MemoryTable {
    var r = PayloadReader(p, what: "memory table")
    let count = Int(try r.u32())
    _ = try r.u32()
    guard count >= 1, count <= maxRegions else { throw .invalid("memory table with \(count) regions") }
    guard p.count == 8 + 32 * count else {
      throw .badPayloadSize("memory table of \(count) regions", expected: 8 + 32 * count, got: p.count)
    }
    var regions: [MemoryRegion] = []
    for _ in 0..<count { regions.append(try MemoryRegion.decode(&r)) }
    return MemoryTable(regions: regions)
  }

  public func encode() -> [UInt8] {
    var w = PayloadWriter()
    w.u32(UInt32(regions.count))
    w.u32(0)
    for region in regions { region.encode(&w) }
    return w.bytes
  }
}

/// ADD_MEM_REG / REM_MEM_REG: one region after 8 bytes of padding.
public struct SingleMemoryRegion: Equatable, Sendable {
  public var region: MemoryRegion
  public init(region: MemoryRegion) { self.region = region }
  public static func decode(_ p: UnsafeRawBufferPointer) throws(VhostError) -> SingleMemoryRegion {
    guard p.count == 40 else { throw .badPayloadSize("memory region", expected: 40, got: p.count) }
    var r = PayloadReader(p, what: "memory region")
    _ = try r.u64()
    return SingleMemoryRegion(region: try MemoryRegion.decode(&r))
  }
  public func encode() -> [UInt8] {
    var w = PayloadWriter()
    w.u64(0)
    region.encode(&w)
    return w.bytes
  }
}

/// GET_CONFIG / SET_CONFIG: a window of the device configuration space.
public struct ConfigSpace: Equatable, Sendable {
  public static let maxSize = 256
  public var offset: UInt32
  public var size: UInt32
  public var flags: UInt32
  public var payload: [UInt8]
  public init(offset: UInt32, size: UInt32, flags: UInt32, payload: [UInt8]) {
    self.offset = offset
    self.size = size
    self.flags = flags
    self.payload = payload
  }
  public static func decode(_ p: UnsafeRawBufferPointer) throws(VhostError) -> ConfigSpace {
    var r = PayloadReader(p, what: "config space")
    let offset = try r.u32()
    let size = try r.u32()
    let flags = try r.u32()
    guard size <= UInt32(maxSize), offset <= UInt32(maxSize) - size else {
      throw .invalid("config window \(offset)+\(size) exceeds \(maxSize) bytes")
    }
    guard p.count == 12 + Int(size) else {
      throw .badPayloadSize("config space", expected: 12 + Int(size), got: p.count)
    }
    return ConfigSpace(offset: offset, size: size, flags: flags, payload: Array(p[12..<(12 + Int(size))]))
  }
  public func encode() -> [UInt8] {
    var w = PayloadWriter()
    w.u32(offset)
    w.u32(size)
    w.u32(flags)
    w.raw(payload)
    return w.bytes
  }
}

/// GET_INFLIGHT_FD / SET_INFLIGHT_FD.
public struct InflightDescription: Equatable, Sendable {
  public var mmapSize: UInt64
  public var mmapOffset: UInt64
  public var numQueues: UInt16
  public var queueSize: UInt16
  public init(mmapSize: UInt64, mmapOffset: UInt64, numQueues: UInt16, queueSize: UInt16) {
    self.mmapSize = mmapSize
    self.mmapOffset = mmapOffset
    self.numQueues = numQueues
    self.queueSize = queueSize
  }
  public static func decode(_ p: UnsafeRawBufferPointer) throws(VhostError) -> InflightDescription {
    guard p.count == 24 else { throw .badPayloadSize("inflight description", expected: 24, got: p.count) }
    var r = PayloadReader(p, what: "inflight description")
    return InflightDescription(
      mmapSize: try r.u64(), mmapOffset: try r.u64(), numQueues: try r.u16(), queueSize: try r.u16())
  }
  public func encode() -> [UInt8] {
    var w = PayloadWriter()
    w.u64(mmapSize)
    w.u64(mmapOffset)
    w.u16(numQueues)
    w.u16(queueSize)
    w.u32(0)
    return w.bytes
  }
}

/// A u64 payload (features, SET_VRING_KICK/CALL/ERR index with the no-fd flag).
public func decodeU64(_ p: UnsafeRawBufferPointer, _ what: String) throws(VhostError) -> UInt64 {
  guard p.count == 8 else { throw .badPayloadSize(what, expected: 8, got: p.count) }
  var r = PayloadReader(p, what: what)
  return try r.u64()
}

public func encodeU64(_ v: UInt64) -> [UInt8] {
  var w = PayloadWriter()
  w.u64(v)
  return w.bytes
}

/// SET_VRING_KICK/CALL/ERR payload: the queue index in bits 0-7, bit 8 = no file descriptor.
public enum VringFdPayload {
  public static let indexMask: UInt64 = 0xFF
  public static let noFdFlag: UInt64 = 0x100
}
