// `strata serve --nbd` against a hand-driven client on a raw socket: the handshake's options,
// every command's errors, pipelining, structured replies, and hostile input (bad magic,
// oversize lengths, disconnects mid-request), after which other clients are still served.

import Foundation
import Glibc
import StrataCore
import StrataNBD
import StrataTestSupport
import Testing

/// A minimal NBD client: bytes in, bytes out, no cleverness.
final class RawNBDClient {
  let fd: Int32

  init(path: String) throws {
    fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
    var address = sockaddr_un()
    address.sun_family = sa_family_t(AF_UNIX)
    withUnsafeMutableBytes(of: &address.sun_path) { raw in
      for (i, b) in path.utf8.enumerated() { raw[i] = b }
    }
    let r = withUnsafePointer(to: &address) {
      $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
        connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size))
      }
    }
    guard r == 0 else {
      close(fd)
      throw ServeTestError("connect \(path): errno \(errno)")
    }
    // A server that stops answering fails the test instead of hanging it.
    var timeout = timeval(tv_sec: 20, tv_usec: 0)
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
  }

  deinit { close(fd) }

  func send(_ bytes: [UInt8]) throws {
    let n = bytes.withUnsafeBytes { Glibc.send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
    guard n == bytes.count else { throw ServeTestError("send: \(n), errno \(errno)") }
  }

  func receive(_ count: Int) throws -> [UInt8] {
    var out = [UInt8](repeating: 0, count: count)
    var done = 0
    while done < count {
      let n = out.withUnsafeMutableBytes { recv(fd, $0.baseAddress! + done, count - done, 0) }
      guard n > 0 else { throw ServeTestError("connection closed after \(done) of \(count) bytes (errno \(errno))") }
      done += n
    }
    return out
  }

  /// True when the server closed the connection (EOF or reset), skipping whatever it sent first.
  func closedByServer() -> Bool {
    var buffer = [UInt8](repeating: 0, count: 4096)
    while true {
      let n = buffer.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
      if n == 0 || n < 0 && errno == ECONNRESET { return true }
      if n < 0 { return false }  // timeout: still open
    }
  }

  func u32(_ b: [UInt8], _ at: Int) -> UInt32 { b[at..<(at + 4)].reduce(0) { $0 << 8 | UInt32($1) } }
  func u64(_ b: [UInt8], _ at: Int) -> UInt64 { b[at..<(at + 8)].reduce(0) { $0 << 8 | UInt64($1) } }
  func u16(_ b: [UInt8], _ at: Int) -> UInt16 { UInt16(b[at]) << 8 | UInt16(b[at + 1]) }

  /// Reads the greeting and sends the client flags.
  func greet(flags: UInt32 = 3) throws {
    let g = try receive(18)
    guard u64(g, 0) == NBDMagic.server, u64(g, 8) == NBDMagic.option else { throw ServeTestError("bad greeting") }
    var w = NBDWriter()
    w.u32(flags)
    try send(w.bytes)
  }

  func sendOption(_ option: UInt32, _ payload: [UInt8], declaredLength: UInt32? = nil, magic: UInt64 = NBDMagic.option)
    throws
  {
    var w = NBDWriter()
    w.u64(magic)
    w.u32(option)
    w.u32(declaredLength ?? UInt32(payload.count))
    w.raw(payload)
    try send(w.bytes)
  }

  /// Option replies up to and including the final one (ACK or an error).
  func optionReplies(_ option: UInt32) throws -> [(type: UInt32, data: [UInt8])] {
    var out: [(UInt32, [UInt8])] = []
    while true {
      let h = try receive(20)
      guard u64(h, 0) == NBDMagic.optionReply, u32(h, 8) == option else { throw ServeTestError("bad option reply") }
      let type = u32(h, 12)
      out.append((type, try receive(Int(u32(h, 16)))))
      if type == NBDReply.ack || type & 1 << 31 != 0 { return out }
    }
  }

  func option(_ option: UInt32, _ payload: [UInt8]) throws -> [(type: UInt32, data: [UInt8])] {
    try sendOption(option, payload)
    return try optionReplies(option)
  }

  static func exportPayload(_ name: String) -> [UInt8] {
    var w = NBDWriter()
    w.string(name)
    w.u16(0)
    return w.bytes
  }

  static func contextPayload(_ name: String, _ queries: [String]) -> [UInt8] {
    var w = NBDWriter()
    w.string(name)
    w.u32(UInt32(queries.count))
    for q in queries { w.string(q) }
    return w.bytes
  }

  /// Handshake up to transmission; returns the export's size and flags.
  func open(_ export: String, structured: Bool = false, contexts: [String] = []) throws -> (UInt64, UInt16) {
    try greet()
    if structured { _ = try option(NBDOption.structuredReply, []) }
    if !contexts.isEmpty {
      _ = try option(NBDOption.setMetaContext, Self.contextPayload(export, contexts))
    }
    let replies = try option(NBDOption.go, Self.exportPayload(export))
    guard let info = replies.first(where: { $0.type == NBDReply.info && u16($0.data, 0) == NBDInfo.export }),
      replies.last?.type == NBDReply.ack
    else { throw ServeTestError("GO \(export) failed: \(replies.map(\.type))") }
    return (u64(info.data, 2), u16(info.data, 10))
  }

  func request(
    _ type: UInt16, offset: UInt64, length: UInt32, cookie: UInt64 = 1, flags: UInt16 = 0, payload: [UInt8] = []
  ) -> [UInt8] {
    NBDRequest(flags: NBDCommandFlags(rawValue: flags), type: type, cookie: cookie, offset: offset, length: length)
      .encode() + payload
  }

  /// A simple reply: its error and cookie, and `dataLength` bytes of data when it succeeded.
  func simpleReply(dataLength: Int = 0) throws -> (error: UInt32, cookie: UInt64, data: [UInt8]) {
    let h = try receive(16)
    guard u32(h, 0) == NBDMagic.simpleReply else { throw ServeTestError("not a simple reply") }
    let error = u32(h, 4)
    return (error, u64(h, 8), error == 0 ? try receive(dataLength) : [])
  }

  /// One structured chunk: flags, type, cookie, payload.
  func chunk() throws -> (flags: UInt16, type: UInt16, cookie: UInt64, payload: [UInt8]) {
    let h = try receive(20)
    guard u32(h, 0) == NBDMagic.structuredReply else { throw ServeTestError("not a structured reply") }
    return (u16(h, 4), u16(h, 6), u64(h, 8), try receive(Int(u32(h, 16))))
  }
}

@Suite(.enabled(if: strataBinary != nil, Comment(rawValue: binaryMissing)))
struct NBDProtocolTests {
  @Test func handshakeOptionsAndHostileNegotiation() throws {
    try withServer(size: 8 << 20, vhost: false, nbd: true) { s in
      try s.waitForNBD()
      let c = try RawNBDClient(path: s.nbdPath)
      try c.greet()
      #expect(try c.option(99, [1, 2, 3]).map(\.type) == [NBDReply.errUnsupported])
      #expect(try c.option(NBDOption.extendedHeaders, []).map(\.type) == [NBDReply.errUnsupported])
      #expect(try c.option(NBDOption.list, [0]).map(\.type) == [NBDReply.errInvalid])
      let list = try c.option(NBDOption.list, [])
      #expect(list.map(\.type) == [NBDReply.server, NBDReply.ack])
      // A name length running past the payload, and stray bytes after the info requests.
      #expect(try c.option(NBDOption.go, [0, 0, 0, 100, 65]).map(\.type) == [NBDReply.errInvalid])
      #expect(try c.option(NBDOption.info, RawNBDClient.exportPayload("") + [7]).map(\.type) == [NBDReply.errInvalid])
      #expect(try c.option(NBDOption.go, RawNBDClient.exportPayload("nope")).map(\.type) == [NBDReply.errUnknown])
      let pit = try c.option(NBDOption.go, RawNBDClient.exportPayload("at/999999"))
      #expect(pit.map(\.type) == [NBDReply.errUnknown])
      let message = String(decoding: pit.first?.data ?? [], as: UTF8.self)
      #expect(message.contains("not in the log"), "\(message)")
      // Metadata contexts need structured replies; then unknown ones are just not selected.
      let early = RawNBDClient.contextPayload("", ["base:allocation"])
      #expect(try c.option(NBDOption.setMetaContext, early).map(\.type) == [NBDReply.errInvalid])
      #expect(try c.option(NBDOption.structuredReply, []).map(\.type) == [NBDReply.ack])
      #expect(try c.option(NBDOption.structuredReply, []).map(\.type) == [NBDReply.errInvalid])
      let set = try c.option(
        NBDOption.setMetaContext, RawNBDClient.contextPayload("", ["qemu:dirty-bitmap:x", "base:allocation"]))
      #expect(set.map(\.type) == [NBDReply.metaContext, NBDReply.ack])
      let truncated = Array(RawNBDClient.contextPayload("", ["base:allocation"]).dropLast())
      #expect(try c.option(NBDOption.listMetaContext, truncated).map(\.type) == [NBDReply.errInvalid])
      // An option too large to read closes the connection.
      try c.sendOption(NBDOption.list, [], declaredLength: 1 << 20)
      #expect(c.closedByServer())

      let badMagic = try RawNBDClient(path: s.nbdPath)
      try badMagic.greet()
      try badMagic.sendOption(NBDOption.list, [], magic: 0x1234)
      #expect(badMagic.closedByServer())
      let badFlags = try RawNBDClient(path: s.nbdPath)
      try badFlags.greet(flags: 0x80)
      #expect(badFlags.closedByServer())
      let oldStyle = try RawNBDClient(path: s.nbdPath)
      try oldStyle.greet()
      try oldStyle.sendOption(NBDOption.exportName, Array("nope".utf8))
      #expect(oldStyle.closedByServer())
      let aborting = try RawNBDClient(path: s.nbdPath)
      try aborting.greet()
      #expect(try aborting.option(NBDOption.abort, []).map(\.type) == [NBDReply.ack])

      // The old way in: NBD_OPT_EXPORT_NAME answers with the size and flags (and 124 zero bytes
      // unless the client set NO_ZEROES), then transmission starts.
      for flags: UInt32 in [1, 3] {
        let old = try RawNBDClient(path: s.nbdPath)
        try old.greet(flags: flags)
        try old.sendOption(NBDOption.exportName, Array("snapshot/s".utf8))
        #expect(old.closedByServer(), "no such snapshot: the connection closes")
        let named = try RawNBDClient(path: s.nbdPath)
        try named.greet(flags: flags)
        try named.sendOption(NBDOption.exportName, Array("head".utf8))
        let reply = try named.receive(flags == 3 ? 10 : 134)
        #expect(named.u64(reply, 0) == 8 << 20)
        #expect(NBDTransmissionFlags(rawValue: named.u16(reply, 8)).contains(.canMultiConn))
        #expect(reply[10...].allSatisfy { $0 == 0 })
        try named.send(named.request(NBDCommand.read.rawValue, offset: 4096, length: 16, cookie: 3))
        let r = try named.simpleReply(dataLength: 16)
        #expect(r.error == 0 && r.cookie == 3)
      }

      // Still serving.
      let good = try RawNBDClient(path: s.nbdPath)
      let (size, flags) = try good.open("head")
      #expect(size == 8 << 20)
      let expected = NBDTransmissionFlags([
        .hasFlags, .sendFlush, .sendFUA, .sendTrim, .sendWriteZeroes, .sendDF, .canMultiConn, .sendCache,
        .sendFastZero,
      ])
      #expect(flags == expected.rawValue)
      try good.send(good.request(NBDCommand.read.rawValue, offset: 0, length: 512))
      #expect(try good.simpleReply(dataLength: 512).data == [UInt8](repeating: 0, count: 512))
    }
  }

  @Test func commandErrorsPipeliningAndHostileRequests() throws {
    try withServer(size: 8 << 20, vhost: false, nbd: true) { s in
      try s.waitForNBD()
      let c = try RawNBDClient(path: s.nbdPath)
      _ = try c.open("")
      let read = NBDCommand.read.rawValue
      let write = NBDCommand.write.rawValue
      let size: UInt64 = 8 << 20
      // Every error here leaves the connection usable.
      let cases: [([UInt8], UInt32)] = [
        (c.request(read, offset: size - 512, length: 1024), NBDErrno.invalid),
        (c.request(read, offset: .max - 10, length: 512), NBDErrno.invalid),
        (c.request(read, offset: 0, length: 0), NBDErrno.invalid),
        (c.request(read, offset: 0, length: 33 << 20), NBDErrno.invalid),
        (c.request(write, offset: size - 100, length: 512, payload: pattern(512, seed: 1)), NBDErrno.noSpace),
        (c.request(NBDCommand.trim.rawValue, offset: size, length: 4096), NBDErrno.noSpace),
        (c.request(NBDCommand.writeZeroes.rawValue, offset: size - 1, length: 2), NBDErrno.noSpace),
        (c.request(42, offset: 0, length: 512), NBDErrno.invalid),
        (c.request(read, offset: 0, length: 512, flags: 0x8000), NBDErrno.invalid),
        (c.request(read, offset: 0, length: 512, flags: NBDCommandFlags.fua.rawValue), NBDErrno.invalid),
        (c.request(NBDCommand.blockStatus.rawValue, offset: 0, length: 512), NBDErrno.invalid),
        (c.request(NBDCommand.cache.rawValue, offset: size, length: 1), NBDErrno.invalid),
      ]
      for (i, (bytes, error)) in cases.enumerated() {
        try c.send(bytes)
        let r = try c.simpleReply()
        #expect(r.error == error, "case \(i)")
      }

      // Pipelined: 64 writes (some with FUA) and 64 reads of them in one burst, then the replies.
      var burst: [UInt8] = []
      for i in 0..<64 {
        burst += c.request(
          write, offset: UInt64(i) * 8192 + 100, length: 5000, cookie: UInt64(i),
          flags: i % 8 == 0 ? NBDCommandFlags.fua.rawValue : 0, payload: pattern(5000, seed: UInt64(i)))
      }
      for i in 0..<64 {
        burst += c.request(read, offset: UInt64(i) * 8192 + 100, length: 5000, cookie: UInt64(100 + i))
      }
      try c.send(burst)
      for i in 0..<64 {
        let r = try c.simpleReply()
        #expect(r.error == 0 && r.cookie == UInt64(i))
      }
      for i in 0..<64 {
        let r = try c.simpleReply(dataLength: 5000)
        #expect(r.cookie == UInt64(100 + i))
        #expect(r.data == pattern(5000, seed: UInt64(i)))
      }
      try c.send(c.request(NBDCommand.flush.rawValue, offset: 0, length: 0))
      #expect(try c.simpleReply().error == 0)
      try c.send(c.request(NBDCommand.writeZeroes.rawValue, offset: 100, length: 1000, flags: 0x12))
      #expect(try c.simpleReply().error == 0)
      try c.send(c.request(read, offset: 0, length: 1200))
      var want = [UInt8](repeating: 0, count: 1100) + pattern(5000, seed: 0)[1000..<1100]
      #expect(try c.simpleReply(dataLength: 1200).data == want)

      try c.send(c.request(NBDCommand.disconnect.rawValue, offset: 0, length: 0))
      #expect(c.closedByServer())

      // Structured replies carry data, errors and block status.

      let st = try RawNBDClient(path: s.nbdPath)
      _ = try st.open("head", structured: true, contexts: ["base:allocation"])
      try st.send(
        st.request(read, offset: 8192 + 100, length: 5000, cookie: 7, flags: NBDCommandFlags.dontFragment.rawValue))
      let data = try st.chunk()
      #expect(data.flags == NBDChunk.done && data.type == NBDChunk.offsetData && data.cookie == 7)
      #expect(st.u64(data.payload, 0) == 8192 + 100)
      #expect(Array(data.payload[8...]) == pattern(5000, seed: 1))
      try st.send(st.request(read, offset: size, length: 1, cookie: 8))
      let error = try st.chunk()
      #expect(
        error.type == NBDChunk.error && error.flags == NBDChunk.done && st.u32(error.payload, 0) == NBDErrno.invalid)
      try st.send(st.request(NBDCommand.blockStatus.rawValue, offset: 0, length: 65536, cookie: 9))
      let status = try st.chunk()
      #expect(status.type == NBDChunk.blockStatus && status.flags == NBDChunk.done)
      // Context 1, one extent: the first 512 KiB are data (the pipelined writes), clipped to the request.
      #expect(status.payload.count == 12 && st.u32(status.payload, 0) == 1)
      #expect(st.u32(status.payload, 4) == 65536 && st.u32(status.payload, 8) == 0)
      try st.send(st.request(NBDCommand.blockStatus.rawValue, offset: 4 << 20, length: 4096, cookie: 10, flags: 8))
      let one = try st.chunk()
      #expect(one.payload.count == 12 && st.u32(one.payload, 4) == 4096 && st.u32(one.payload, 8) == 3)

      // A bad magic mid-stream and a disconnect inside a write's payload end only that client.
      let bad = try RawNBDClient(path: s.nbdPath)
      _ = try bad.open("")
      try bad.send([UInt8](repeating: 0xEE, count: 28))
      #expect(bad.closedByServer())
      let torn = try RawNBDClient(path: s.nbdPath)
      _ = try torn.open("")
      try torn.send(torn.request(write, offset: 0, length: 1 << 20) + pattern(100, seed: 5))
      shutdown(torn.fd, Int32(SHUT_WR))
      #expect(torn.closedByServer())
      let huge = try RawNBDClient(path: s.nbdPath)
      _ = try huge.open("")
      try huge.send(huge.request(write, offset: 0, length: 64 << 20))
      #expect(huge.closedByServer())

      let after = try RawNBDClient(path: s.nbdPath)
      _ = try after.open("")
      try after.send(after.request(read, offset: 0, length: 1200))
      #expect(try after.simpleReply(dataLength: 1200).data == want, "the torn write changed nothing")
      want = pattern(5000, seed: 63)
      try after.send(after.request(read, offset: 63 * 8192 + 100, length: 5000))
      #expect(try after.simpleReply(dataLength: 5000).data == want)
      #expect(s.isAlive())
    }
  }

  /// A block that fails its checksum fails its read with EIO; the other reads of the same burst
  /// (batched through the image queue) still get their bytes, in both reply styles.
  @Test func aCorruptBlockFailsOnlyItsRead() throws {
    let prepare: (ServeProcess) throws -> Void = { s in
      let img = try StrataImage.open(path: s.image)
      for i in 0..<3 { try img.write(pattern(4096, seed: UInt64(10 + i)), at: UInt64(i) * 40960) }
      let victim = try img.extents(from: 40960, length: 4096).first?.fileOffset
      try img.close()
      guard let victim else { throw ServeTestError("no data extent") }
      let fd = open(s.image, O_WRONLY)
      defer { close(fd) }
      var junk: UInt8 = 0x5A
      guard pwrite(fd, &junk, 1, off_t(victim + 100)) == 1 else { throw ServeTestError("pwrite") }
    }
    try withServer(size: 8 << 20, vhost: false, nbd: true, prepare: prepare) { s in
      try s.waitForNBD()
      for structured in [false, true] {
        let c = try RawNBDClient(path: s.nbdPath)
        _ = try c.open("", structured: structured)
        try c.send(
          (0..<3).flatMap { i in
            c.request(NBDCommand.read.rawValue, offset: UInt64(i) * 40960, length: 4096, cookie: UInt64(i))
          })
        for i in 0..<3 {
          if structured {
            let r = try c.chunk()
            #expect(r.cookie == UInt64(i))
            if i == 1 {
              #expect(r.type == NBDChunk.error && c.u32(r.payload, 0) == NBDErrno.io)
            } else {
              #expect(r.type == NBDChunk.offsetData && Array(r.payload[8...]) == pattern(4096, seed: UInt64(10 + i)))
            }
          } else {
            let r = try c.simpleReply(dataLength: 4096)
            #expect(r.cookie == UInt64(i) && r.error == (i == 1 ? NBDErrno.io : 0))
            if i != 1 { #expect(r.data == pattern(4096, seed: UInt64(10 + i))) }
          }
        }
      }
    }
  }

  @Test func snapshotExportsAreReadOnlyAndFrozen() throws {
    let prepare: (ServeProcess) throws -> Void = { s in
      let r = try s.strata(["snapshot", "create", s.image, "empty"])
      guard r.succeeded else { throw ServeTestError("snapshot create: \(r.stderr)") }
    }
    try withServer(size: 8 << 20, vhost: false, nbd: true, prepare: prepare) { s in
      try s.waitForNBD()
      let head = try RawNBDClient(path: s.nbdPath)
      _ = try head.open("head")
      try head.send(
        head.request(NBDCommand.write.rawValue, offset: 4096, length: 4096, payload: pattern(4096, seed: 3)))
      #expect(try head.simpleReply().error == 0)
      let snap = try RawNBDClient(path: s.nbdPath)
      let (_, flags) = try snap.open("snapshot/empty")
      #expect(NBDTransmissionFlags(rawValue: flags).contains(.readOnly))
      #expect(!NBDTransmissionFlags(rawValue: flags).contains(.sendTrim))
      let refused: [[UInt8]] = [
        snap.request(NBDCommand.write.rawValue, offset: 0, length: 512, payload: pattern(512, seed: 4)),
        snap.request(NBDCommand.trim.rawValue, offset: 0, length: 4096),
        snap.request(NBDCommand.writeZeroes.rawValue, offset: 0, length: 4096),
      ]
      for r in refused {
        try snap.send(r)
        #expect(try snap.simpleReply().error == NBDErrno.perm)
      }
      try snap.send(snap.request(NBDCommand.read.rawValue, offset: 4096, length: 4096))
      #expect(try snap.simpleReply(dataLength: 4096).data == [UInt8](repeating: 0, count: 4096))
      try snap.send(snap.request(NBDCommand.flush.rawValue, offset: 0, length: 0))
      #expect(try snap.simpleReply().error == 0)
    }
  }
}

/// A write is acknowledged only once the log holding it reached the file: every acknowledged
/// write of a pipelined burst survives a SIGKILL of the server right after the replies.
@Test(.enabled(if: strataBinary != nil, Comment(rawValue: binaryMissing)))
func acknowledgedWritesSurviveAKill() throws {
  try withServer(size: 8 << 20, vhost: false, nbd: true) { s in
    try s.waitForNBD()
    let c = try RawNBDClient(path: s.nbdPath)
    _ = try c.open("")
    let burst = (0..<32).flatMap { i in
      c.request(
        NBDCommand.write.rawValue, offset: UInt64(i) * 12288 + 1000, length: 9000, cookie: UInt64(i),
        payload: pattern(9000, seed: UInt64(40 + i)))
    }
    try c.send(burst)
    for _ in 0..<32 { #expect(try c.simpleReply().error == 0) }
    try c.send(c.request(NBDCommand.read.rawValue, offset: 1000, length: 9000))
    #expect(try c.simpleReply(dataLength: 9000).data == pattern(9000, seed: 40), "before the kill")
    s.crash()
    try s.restart()
    try s.waitForNBD()
    let after = try RawNBDClient(path: s.nbdPath)
    _ = try after.open("")
    for i in 0..<32 {
      try after.send(after.request(NBDCommand.read.rawValue, offset: UInt64(i) * 12288 + 1000, length: 9000))
      let r = try after.simpleReply(dataLength: 9000)
      #expect(r.error == 0 && r.data == pattern(9000, seed: UInt64(40 + i)), "write \(i)")
    }
  }
}

@Test(.enabled(if: strataBinary != nil, Comment(rawValue: binaryMissing)))
func readOnlyServerRefusesChangesToTheHead() throws {
  try withServer(size: 8 << 20, arguments: ["--read-only"], vhost: false, nbd: true) { s in
    try s.waitForNBD()
    let c = try RawNBDClient(path: s.nbdPath)
    let (_, flags) = try c.open("head")
    #expect(NBDTransmissionFlags(rawValue: flags).contains(.readOnly))
    try c.send(c.request(NBDCommand.write.rawValue, offset: 0, length: 512, payload: pattern(512, seed: 1)))
    #expect(try c.simpleReply().error == NBDErrno.perm)
    try c.send(c.request(NBDCommand.read.rawValue, offset: 0, length: 512))
    #expect(try c.simpleReply(dataLength: 512).data == [UInt8](repeating: 0, count: 512))
  }
}

@Test(.enabled(if: strataBinary != nil, Comment(rawValue: binaryMissing)))
func serveValidatesItsAddresses() throws {
  var template = Array("/tmp/strata-nbd-args-XXXXXX".utf8CString)
  guard let d = mkdtemp(&template) else { throw ServeTestError("mkdtemp failed") }
  let dir = String(cString: d)
  defer { try? FileManager.default.removeItem(atPath: dir) }
  let image = dir + "/d.strata"
  #expect(try runStrata(["create", image, "--size", "1M"], in: dir).succeeded)
  for (args, message) in [
    ([String](), "nothing to serve on"), (["--nbd", "tcp:localhost"], "HOST:PORT"),
    (["--nbd", "unix:\(dir)/s", "--socket", "\(dir)/s"], "cannot share"),
  ] {
    let r = try runStrata(["serve", image] + args, in: dir)
    #expect(exitCode(r.status) == 64, "\(args)")
    #expect(r.stderr.contains(message), "\(r.stderr)")
  }
}

/// Random pipelined bursts of byte-granular writes, reads, trims and zeroes against an in-memory
/// model of the disk, with a kill -9 and restart halfway: every read equals the model.
@Test(.enabled(if: strataBinary != nil, Comment(rawValue: binaryMissing)), arguments: [0x5EED, 2, 3] as [UInt64])
func randomPipelinedRequestsMatchAModel(seed: UInt64) throws {
  let size = 4 << 20
  let blockSize = 4096
  var model = [UInt8](repeating: 0, count: size)
  var state = seed
  func next(_ bound: Int) -> Int {
    state = state &* 6_364_136_223_846_793_005 &+ 1_442_695_040_888_963_407
    return Int((state >> 33) % UInt64(bound))
  }
  try withServer(size: UInt64(size), vhost: false, nbd: true) { s in
    try s.waitForNBD()
    var c = try RawNBDClient(path: s.nbdPath)
    _ = try c.open("")
    for round in 0..<24 {
      if round == 12 {
        s.crash()
        try s.restart()
        try s.waitForNBD()
        c = try RawNBDClient(path: s.nbdPath)
        _ = try c.open("")
      }
      var burst: [UInt8] = []
      var expected: [(cookie: UInt64, data: [UInt8]?)] = []
      for i in 0..<16 {
        let length = 1 + next(next(4) == 0 ? 200_000 : 9000)
        let offset = next(size - length + 1)
        let cookie = UInt64(round * 100 + i)
        switch next(6) {
        case 0, 1:
          let data = pattern(length, seed: cookie)
          model.replaceSubrange(offset..<(offset + length), with: data)
          burst += c.request(
            NBDCommand.write.rawValue, offset: UInt64(offset), length: UInt32(length), cookie: cookie, payload: data)
          expected.append((cookie, nil))
        case 2:
          // A discard frees whole blocks only (they read as zeros); the partial edges stay.
          let first = (offset + blockSize - 1) / blockSize * blockSize
          let end = (offset + length) / blockSize * blockSize
          if first < end { model.replaceSubrange(first..<end, with: repeatElement(0, count: end - first)) }
          burst += c.request(NBDCommand.trim.rawValue, offset: UInt64(offset), length: UInt32(length), cookie: cookie)
          expected.append((cookie, nil))
        case 3:
          model.replaceSubrange(offset..<(offset + length), with: repeatElement(0, count: length))
          burst += c.request(
            NBDCommand.writeZeroes.rawValue, offset: UInt64(offset), length: UInt32(length), cookie: cookie)
          expected.append((cookie, nil))
        default:
          burst += c.request(NBDCommand.read.rawValue, offset: UInt64(offset), length: UInt32(length), cookie: cookie)
          expected.append((cookie, Array(model[offset..<(offset + length)])))
        }
      }
      try c.send(burst)
      for e in expected {
        let r = try c.simpleReply(dataLength: e.data?.count ?? 0)
        #expect(r.error == 0 && r.cookie == e.cookie, "seed \(seed) round \(round) cookie \(e.cookie)")
        if let want = e.data { #expect(r.data == want, "seed \(seed) round \(round) cookie \(e.cookie)") }
      }
    }
    // Everything, in 1 MiB reads.
    for offset in stride(from: 0, to: size, by: 1 << 20) {
      try c.send(c.request(NBDCommand.read.rawValue, offset: UInt64(offset), length: 1 << 20))
      #expect(try c.simpleReply(dataLength: 1 << 20).data == Array(model[offset..<(offset + (1 << 20))]))
    }
  }
}

/// One process serving vhost-user and NBD: a guest write through the virtqueue reads back over
/// NBD and the other way round; SIGTERM stops both and removes both sockets.
@Test(.enabled(if: strataBinary != nil, Comment(rawValue: binaryMissing)))
func vhostAndNBDServeTheSameImage() throws {
  try withServer(size: 8 << 20, vhost: true, nbd: true) { s in
    let guest = try s.client()
    try s.waitForNBD()
    let nbd = try RawNBDClient(path: s.nbdPath)
    _ = try nbd.open("")
    let fromGuest = pattern(8192, seed: 61)
    #expect(try guest.perform(.write(sector: 16, data: fromGuest)).isOK)
    try nbd.send(nbd.request(NBDCommand.read.rawValue, offset: 16 * 512, length: 8192))
    #expect(try nbd.simpleReply(dataLength: 8192).data == fromGuest)
    let fromNBD = pattern(4096, seed: 62)
    try nbd.send(nbd.request(NBDCommand.write.rawValue, offset: 1 << 20, length: 4096, payload: fromNBD))
    #expect(try nbd.simpleReply().error == 0)
    #expect(try guest.perform(.read(sector: 2048, length: 4096)).data == fromNBD)
    s.stop()
    guest.shutdown()
  }
}
