import Testing

@testable import StrataNBD

// The wire format on its own: encodings byte for byte, and every parser fed truncated, oversized
// and inconsistent input (which must throw, never trap).

private func decode<T>(_ bytes: [UInt8], _ body: (UnsafeRawBufferPointer) throws -> T) throws -> T {
  try bytes.withUnsafeBytes { try body($0) }
}

@Test func requestHeaderRoundTripsAndRejectsBadMagic() throws {
  let r = NBDRequest(flags: [.fua, .noHole], type: 6, cookie: 0x0102_0304_0506_0708, offset: 1 << 40, length: 4096)
  let bytes = r.encode()
  #expect(bytes.count == NBDRequest.size)
  #expect(Array(bytes[0..<8]) == [0x25, 0x60, 0x95, 0x13, 0x00, 0x03, 0x00, 0x06])
  #expect(try decode(bytes) { try NBDRequest.decode($0) } == r)
  #expect(r.command == .writeZeroes)
  #expect(NBDRequest(flags: [], type: 99, cookie: 0, offset: 0, length: 0).command == nil)
  var bad = bytes
  bad[0] = 0
  #expect(throws: NBDWireError.self) { try decode(bad) { try NBDRequest.decode($0) } }
  // Found by FuzzNBD: a short header threw a precondition instead of an error.
  for n in [0, 1, NBDRequest.size - 1] {
    #expect(throws: NBDWireError.self) { try decode(Array(bytes[..<n])) { try NBDRequest.decode($0) } }
  }
}

@Test func replyHeadersAreBigEndian() {
  var b = [UInt8](repeating: 0xAA, count: 20)
  b.withUnsafeMutableBytes { NBDReplyHeader.storeSimple(into: $0, error: 22, cookie: 5) }
  #expect(Array(b[0..<16]) == [0x67, 0x44, 0x66, 0x98, 0, 0, 0, 22, 0, 0, 0, 0, 0, 0, 0, 5])
  b.withUnsafeMutableBytes {
    NBDReplyHeader.storeChunk(into: $0, flags: NBDChunk.done, type: NBDChunk.error, cookie: 9, length: 6)
  }
  #expect(b == [0x66, 0x8e, 0x33, 0xef, 0, 1, 0x80, 1, 0, 0, 0, 0, 0, 0, 0, 9, 0, 0, 0, 6])
}

@Test func exportRequestParsing() throws {
  var w = NBDWriter()
  w.string("snapshot/a")
  w.u16(2)
  w.u16(NBDInfo.name)
  w.u16(NBDInfo.blockSize)
  let good = try decode(w.bytes) { try NBDExportRequest.decode($0) }
  #expect(good == NBDExportRequest(name: "snapshot/a", infos: [NBDInfo.name, NBDInfo.blockSize]))
  // Every truncation throws, and so do stray bytes.
  for n in 0..<w.bytes.count {
    #expect(throws: NBDWireError.self) { try decode(Array(w.bytes[0..<n])) { try NBDExportRequest.decode($0) } }
  }
  #expect(throws: NBDWireError.self) { try decode(w.bytes + [0]) { try NBDExportRequest.decode($0) } }
  // A name length beyond the limit, or beyond the payload.
  #expect(throws: NBDWireError.self) {
    try decode([0, 0, 0x10, 1] + [UInt8](repeating: 65, count: 4097) + [0, 0]) {
      try NBDExportRequest.decode($0)
    }
  }
  #expect(throws: NBDWireError.self) { try decode([0xFF, 0xFF, 0xFF, 0xFF, 0, 0]) { try NBDExportRequest.decode($0) } }
}

@Test func metaContextRequestParsing() throws {
  var w = NBDWriter()
  w.string("")
  w.u32(2)
  w.string("base:allocation")
  w.string("strata:changed:nightly")
  let r = try decode(w.bytes) { try NBDMetaContextRequest.decode($0) }
  #expect(r == NBDMetaContextRequest(exportName: "", queries: ["base:allocation", "strata:changed:nightly"]))
  for n in 0..<w.bytes.count {
    #expect(throws: NBDWireError.self) { try decode(Array(w.bytes[0..<n])) { try NBDMetaContextRequest.decode($0) } }
  }
  #expect(throws: NBDWireError.self) { try decode(w.bytes + [1]) { try NBDMetaContextRequest.decode($0) } }
  // A query count far beyond what the payload could hold is refused before anything is allocated.
  #expect(throws: NBDWireError.self) {
    try decode([0, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF]) {
      try NBDMetaContextRequest.decode($0)
    }
  }
}

@Test func exportNamesContextsAndAddresses() throws {
  #expect(NBDExportName("") == .head)
  #expect(NBDExportName("head") == .head)
  #expect(NBDExportName("snapshot/nightly-1") == .snapshot("nightly-1"))
  #expect(NBDExportName("snapshot/") == nil)
  #expect(NBDExportName("at/42") == .pointInTime(42))
  #expect(NBDExportName("at/x") == nil)
  #expect(
    NBDExportName("at/2026-11-26T09:30:00Z")
      == .pointAtTime(nanoseconds: 1_795_685_400_000_000_000, text: "2026-11-26T09:30:00Z"))
  #expect(NBDExportName("at/2026-11-26T09:30:00Z")?.name == "at/2026-11-26T09:30:00Z")
  #expect(NBDExportName("other") == nil)

  let snaps = ["a", "b"]
  #expect(NBDMetaContext.matching("base:allocation", snapshots: snaps, listing: false) == [.allocation])
  #expect(NBDMetaContext.matching("base:", snapshots: snaps, listing: false) == [])
  #expect(NBDMetaContext.matching("base:", snapshots: snaps, listing: true) == [.allocation])
  #expect(
    NBDMetaContext.matching("strata:", snapshots: snaps, listing: true) == [.changed(since: "a"), .changed(since: "b")])
  #expect(NBDMetaContext.matching("strata:changed:b", snapshots: snaps, listing: false) == [.changed(since: "b")])
  #expect(NBDMetaContext.matching("strata:changed:c", snapshots: snaps, listing: false) == [])
  #expect(NBDMetaContext.changed(since: "b").name == "strata:changed:b")

  #expect(try NBDAddress(parsing: "unix:/run/x.sock") == .unix(path: "/run/x.sock"))
  #expect(try NBDAddress(parsing: "tcp:127.0.0.1:10809") == .tcp(host: "127.0.0.1", port: 10809))
  #expect(try NBDAddress(parsing: "tcp:[::1]:10809") == .tcp(host: "::1", port: 10809))
  #expect(try NBDAddress(parsing: "tcp:[::1]:10809").description == "tcp:[::1]:10809")
  for bad in ["unix:", "tcp:host", "tcp:host:0", "tcp:host:70000", "/run/x.sock", ""] {
    #expect(throws: NBDWireError.self) { try NBDAddress(parsing: bad) }
  }
}
