// The NBD wire format (the NBD project's doc/proto.md): constants, big-endian coding, the
// request header, reply headers and option payloads. Syntax only: no sockets and no image, so
// unit tests and fuzzers reach every parser. Every integer on the wire is big-endian.

public enum NBDMagic {
  /// "NBDMAGIC", the first word the server sends.
  public static let server: UInt64 = 0x4e42_444d_4147_4943
  /// "IHAVEOPT": newstyle negotiation, and the prefix of every option the client sends.
  public static let option: UInt64 = 0x4948_4156_454f_5054
  public static let optionReply: UInt64 = 0x0003_e889_0455_65a9
  public static let request: UInt32 = 0x2560_9513
  public static let simpleReply: UInt32 = 0x6744_6698
  public static let structuredReply: UInt32 = 0x668e_33ef
}

/// Handshake flags (server) and client flags.
public enum NBDHandshakeFlag {
  public static let fixedNewstyle: UInt16 = 1 << 0
  public static let noZeroes: UInt16 = 1 << 1
}

public enum NBDOption {
  public static let exportName: UInt32 = 1
  public static let abort: UInt32 = 2
  public static let list: UInt32 = 3
  public static let startTLS: UInt32 = 5
  public static let info: UInt32 = 6
  public static let go: UInt32 = 7
  public static let structuredReply: UInt32 = 8
  public static let listMetaContext: UInt32 = 9
  public static let setMetaContext: UInt32 = 10
  public static let extendedHeaders: UInt32 = 11
}

public enum NBDReply {
  public static let ack: UInt32 = 1
  public static let server: UInt32 = 2
  public static let info: UInt32 = 3
  public static let metaContext: UInt32 = 4
  public static let errUnsupported: UInt32 = 1 << 31 | 1
  public static let errPolicy: UInt32 = 1 << 31 | 2
  public static let errInvalid: UInt32 = 1 << 31 | 3
  public static let errPlatform: UInt32 = 1 << 31 | 4
  public static let errTLSRequired: UInt32 = 1 << 31 | 5
  public static let errUnknown: UInt32 = 1 << 31 | 6
  public static let errShutdown: UInt32 = 1 << 31 | 7
  public static let errBlockSizeRequired: UInt32 = 1 << 31 | 8
  public static let errTooBig: UInt32 = 1 << 31 | 9
}

public enum NBDInfo {
  public static let export: UInt16 = 0
  public static let name: UInt16 = 1
  public static let description: UInt16 = 2
  public static let blockSize: UInt16 = 3
}

/// Transmission flags, sent with the export size.
public struct NBDTransmissionFlags: OptionSet, Sendable {
  public let rawValue: UInt16
  public init(rawValue: UInt16) { self.rawValue = rawValue }
  public static let hasFlags = Self(rawValue: 1 << 0)
  public static let readOnly = Self(rawValue: 1 << 1)
  public static let sendFlush = Self(rawValue: 1 << 2)
  public static let sendFUA = Self(rawValue: 1 << 3)
  public static let rotational = Self(rawValue: 1 << 4)
  public static let sendTrim = Self(rawValue: 1 << 5)
  public static let sendWriteZeroes = Self(rawValue: 1 << 6)
  public static let sendDF = Self(rawValue: 1 << 7)
  public static let canMultiConn = Self(rawValue: 1 << 8)
  public static let sendResize = Self(rawValue: 1 << 9)
  public static let sendCache = Self(rawValue: 1 << 10)
  public static let sendFastZero = Self(rawValue: 1 << 11)
}

public enum NBDCommand: UInt16, Sendable {
  case read = 0
  case write = 1
  case disconnect = 2
  case flush = 3
  case trim = 4
  case cache = 5
  case writeZeroes = 6
  case blockStatus = 7
}

public struct NBDCommandFlags: OptionSet, Sendable {
  public let rawValue: UInt16
  public init(rawValue: UInt16) { self.rawValue = rawValue }
  public static let fua = Self(rawValue: 1 << 0)
  public static let noHole = Self(rawValue: 1 << 1)
  public static let dontFragment = Self(rawValue: 1 << 2)
  public static let requestOne = Self(rawValue: 1 << 3)
  public static let fastZero = Self(rawValue: 1 << 4)
  /// Every flag this server understands (PAYLOAD_LEN needs extended headers, not offered).
  public static let known: Self = [.fua, .noHole, .dontFragment, .requestOne, .fastZero]
}

/// Error values of replies (the protocol fixes them; they equal Linux errnos).
public enum NBDErrno {
  public static let perm: UInt32 = 1
  public static let io: UInt32 = 5
  public static let noMemory: UInt32 = 12
  public static let invalid: UInt32 = 22
  public static let noSpace: UInt32 = 28
  public static let overflow: UInt32 = 75
  public static let notSupported: UInt32 = 95
  public static let shutdown: UInt32 = 108
}

public enum NBDChunk {
  public static let done: UInt16 = 1
  public static let none: UInt16 = 0
  public static let offsetData: UInt16 = 1
  public static let offsetHole: UInt16 = 2
  public static let blockStatus: UInt16 = 5
  public static let error: UInt16 = 1 << 15 | 1
}

/// Flags of the `base:allocation` context.
public enum NBDAllocation {
  public static let hole: UInt32 = 1 << 0
  public static let zero: UInt32 = 1 << 1
}

/// Implementation limits (not protocol limits).
public enum NBDLimits {
  /// The largest READ or WRITE payload (as qemu: 32 MiB).
  public static let maxPayload = 32 << 20
  /// The longest option payload accepted; a longer one closes the connection.
  public static let maxOptionLength = 64 << 10
  /// Export names and metadata context names (the protocol's limit).
  public static let maxStringLength = 4096
  /// Queries in one LIST/SET_META_CONTEXT option.
  public static let maxQueries = 128
}

public struct NBDWireError: Error, Equatable, CustomStringConvertible, Sendable {
  public var description: String
  public init(_ d: String) { description = d }
}

// MARK: - Coding

/// Appends big-endian values.
public struct NBDWriter {
  public private(set) var bytes: [UInt8] = []
  public init() {}
  public mutating func u16(_ v: UInt16) { append(v) }
  public mutating func u32(_ v: UInt32) { append(v) }
  public mutating func u64(_ v: UInt64) { append(v) }
  public mutating func raw<S: Sequence>(_ b: S) where S.Element == UInt8 { bytes.append(contentsOf: b) }
  /// A u32 length followed by the string's UTF-8 bytes.
  public mutating func string(_ s: String) {
    u32(UInt32(s.utf8.count))
    raw(s.utf8)
  }
  private mutating func append<T: FixedWidthInteger>(_ v: T) {
    withUnsafeBytes(of: v.bigEndian) { bytes.append(contentsOf: $0) }
  }
}

/// Reads big-endian values; running past the end throws.
public struct NBDReader {
  let bytes: UnsafeRawBufferPointer
  public private(set) var position = 0
  public init(_ bytes: UnsafeRawBufferPointer) { self.bytes = bytes }
  public var remaining: Int { bytes.count - position }
  public mutating func u16() throws -> UInt16 { try read() }
  public mutating func u32() throws -> UInt32 { try read() }
  public mutating func u64() throws -> UInt64 { try read() }
  /// `count` bytes as UTF-8 text; at most `NBDLimits.maxStringLength`.
  public mutating func string(count: Int, what: String) throws -> String {
    guard count <= NBDLimits.maxStringLength else {
      throw NBDWireError("\(what) of \(count) bytes exceeds \(NBDLimits.maxStringLength)")
    }
    guard count <= remaining else { throw NBDWireError("\(what) of \(count) bytes runs past the option") }
    let s = String(decoding: UnsafeRawBufferPointer(rebasing: bytes[position..<(position + count)]), as: UTF8.self)
    position += count
    return s
  }
  /// A u32 length and that many bytes of text.
  public mutating func string(what: String) throws -> String {
    let n = try u32()
    guard n <= UInt32(NBDLimits.maxStringLength) else {
      throw NBDWireError("\(what) of \(n) bytes exceeds \(NBDLimits.maxStringLength)")
    }
    return try string(count: Int(n), what: what)
  }
  public func expectEnd(_ what: String) throws {
    guard remaining == 0 else { throw NBDWireError("\(remaining) stray bytes after \(what)") }
  }
  private mutating func read<T: FixedWidthInteger>() throws -> T {
    let size = MemoryLayout<T>.size
    guard size <= remaining else { throw NBDWireError("truncated: \(size) bytes wanted, \(remaining) left") }
    let v = T(bigEndian: bytes.loadUnaligned(fromByteOffset: position, as: T.self))
    position += size
    return v
  }
}

extension UnsafeMutableRawBufferPointer {
  @inline(__always) func storeBigEndian<T: FixedWidthInteger>(_ v: T, at offset: Int) {
    storeBytes(of: v.bigEndian, toByteOffset: offset, as: T.self)
  }
}

// MARK: - Transmission

/// A request header (28 bytes, the compact form; extended headers are not offered).
public struct NBDRequest: Equatable, Sendable {
  public static let size = 28
  public var flags: NBDCommandFlags
  /// The raw type; `command` is nil for types this server does not know.
  public var type: UInt16
  public var cookie: UInt64
  public var offset: UInt64
  public var length: UInt32

  public init(flags: NBDCommandFlags, type: UInt16, cookie: UInt64, offset: UInt64, length: UInt32) {
    self.flags = flags
    self.type = type
    self.cookie = cookie
    self.offset = offset
    self.length = length
  }

  public var command: NBDCommand? { NBDCommand(rawValue: type) }

  /// Decodes a header; a wrong magic throws (the stream is out of step: the connection ends).
  public static func decode(_ b: UnsafeRawBufferPointer) throws -> NBDRequest {
    guard b.count >= size else { throw NBDWireError("request header of \(b.count) bytes, expected \(size)") }
    var r = NBDReader(UnsafeRawBufferPointer(rebasing: b[0..<size]))
    let magic = try r.u32()
    guard magic == NBDMagic.request else {
      throw NBDWireError("bad request magic 0x\(String(magic, radix: 16))")
    }
    return NBDRequest(
      flags: NBDCommandFlags(rawValue: try r.u16()), type: try r.u16(), cookie: try r.u64(), offset: try r.u64(),
      length: try r.u32())
  }

  public func encode() -> [UInt8] {
    var w = NBDWriter()
    w.u32(NBDMagic.request)
    w.u16(flags.rawValue)
    w.u16(type)
    w.u64(cookie)
    w.u64(offset)
    w.u32(length)
    return w.bytes
  }
}

public enum NBDReplyHeader {
  public static let simpleSize = 16
  public static let chunkSize = 20

  /// magic, error, cookie.
  public static func storeSimple(into b: UnsafeMutableRawBufferPointer, error: UInt32, cookie: UInt64) {
    precondition(b.count >= simpleSize)
    b.storeBigEndian(NBDMagic.simpleReply, at: 0)
    b.storeBigEndian(error, at: 4)
    b.storeBigEndian(cookie, at: 8)
  }

  /// magic, flags, type, cookie, payload length.
  public static func storeChunk(
    into b: UnsafeMutableRawBufferPointer, flags: UInt16, type: UInt16, cookie: UInt64, length: UInt32
  ) {
    precondition(b.count >= chunkSize)
    b.storeBigEndian(NBDMagic.structuredReply, at: 0)
    b.storeBigEndian(flags, at: 4)
    b.storeBigEndian(type, at: 6)
    b.storeBigEndian(cookie, at: 8)
    b.storeBigEndian(length, at: 16)
  }
}

// MARK: - Options

/// The payload of NBD_OPT_INFO and NBD_OPT_GO.
public struct NBDExportRequest: Equatable, Sendable {
  public var name: String
  public var infos: [UInt16]

  public static func decode(_ payload: UnsafeRawBufferPointer) throws -> NBDExportRequest {
    var r = NBDReader(payload)
    let name = try r.string(what: "export name")
    let count = try r.u16()
    guard Int(count) * 2 == r.remaining else {
      throw NBDWireError("\(count) information requests do not match the \(r.remaining) bytes left")
    }
    return NBDExportRequest(name: name, infos: try (0..<count).map { _ in try r.u16() })
  }
}

/// The payload of NBD_OPT_LIST_META_CONTEXT and NBD_OPT_SET_META_CONTEXT.
public struct NBDMetaContextRequest: Equatable, Sendable {
  public var exportName: String
  public var queries: [String]

  public static func decode(_ payload: UnsafeRawBufferPointer) throws -> NBDMetaContextRequest {
    var r = NBDReader(payload)
    let name = try r.string(what: "export name")
    let count = try r.u32()
    guard count <= UInt32(NBDLimits.maxQueries) else {
      throw NBDWireError("\(count) queries exceed \(NBDLimits.maxQueries)")
    }
    let queries = try (0..<count).map { _ in try r.string(what: "metadata context query") }
    try r.expectEnd("the queries")
    return NBDMetaContextRequest(exportName: name, queries: queries)
  }
}
