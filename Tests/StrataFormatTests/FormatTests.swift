import StrataFormat
import StrataSimulation
import Testing

// MARK: - Helpers

/// Bitwise reference CRC-32C, independent of the table and SSE4.2 paths under test.
func referenceCRC32C(_ bytes: [UInt8], continuing crc: UInt32 = 0) -> UInt32 {
  var c = ~crc
  for b in bytes {
    c ^= UInt32(b)
    for _ in 0..<8 { c = (c & 1) != 0 ? (c >> 1) ^ 0x82F6_3B78 : c >> 1 }
  }
  return ~c
}

func le<T: FixedWidthInteger>(_ v: T) -> [UInt8] {
  withUnsafeBytes(of: v.littleEndian) { Array($0) }
}

func read32(_ b: [UInt8], _ at: Int) -> UInt32 {
  (0..<4).reduce(UInt32(0)) { $0 | UInt32(b[at + $1]) << (8 * UInt32($1)) }
}

func read64(_ b: [UInt8], _ at: Int) -> UInt64 {
  (0..<8).reduce(UInt64(0)) { $0 | UInt64(b[at + $1]) << (8 * UInt64($1)) }
}

func patch<T: FixedWidthInteger>(_ b: inout [UInt8], _ at: Int, _ v: T) {
  b.replaceSubrange(at..<(at + MemoryLayout<T>.size), with: le(v))
}

/// Runs `body` and requires it to throw a FormatError of `kind`.
func expectFormatError(
  _ kind: FormatError.Kind, _ what: @autoclosure () -> String = "",
  sourceLocation: SourceLocation = #_sourceLocation, _ body: () throws -> Void
) {
  do {
    try body()
    Issue.record("expected a \(kind) FormatError, decoding succeeded. \(what())", sourceLocation: sourceLocation)
  } catch let e as FormatError {
    #expect(e.kind == kind, "\(what()) got \(e.kind): \(e)", sourceLocation: sourceLocation)
  } catch {
    Issue.record("expected FormatError, got \(error). \(what())", sourceLocation: sourceLocation)
  }
}

/// Runs `body`; success and FormatError are fine, any other error is an issue.
func expectOnlyFormatErrors(_ what: @autoclosure () -> String, _ body: () throws -> Void) -> Bool {
  do {
    try body()
    return true
  } catch is FormatError {
    return false
  } catch {
    Issue.record("non-FormatError \(error) for \(what())")
    return false
  }
}

func decodeSuperblock(_ b: [UInt8]) throws -> Superblock {
  try b.withUnsafeBytes { try Superblock.decode($0) }
}

func decodeRecord(_ b: [UInt8], blockSize: Int = 4096) throws -> LogRecord {
  try b.withUnsafeBytes { try LogRecord.decode(headerArea: $0, blockSize: blockSize) }
}

func opBytes(_ op: LogOp) -> [UInt8] {
  var w = ByteWriter()
  op.encode(into: &w)
  return w.bytes
}

/// Recomputes the superblock checksum over its header_length bytes (field zeroed).
func fixSuperblockChecksum(_ b: inout [UInt8]) {
  let length = min(Int(read32(b, 12)), b.count)
  patch(&b, 124, UInt32(0))
  patch(&b, 124, CRC32C.checksum(Array(b[0..<max(length, 128)])))
}

/// Recomputes a record header checksum over its header_length bytes (field zeroed).
func fixRecordChecksum(_ b: inout [UInt8]) {
  let length = min(Int(read32(b, 8)), b.count)
  patch(&b, 40, UInt32(0))
  patch(&b, 40, CRC32C.checksum(Array(b[0..<max(length, 48)])))
}

/// A header area built by hand: the 64-byte header, `body` (already-encoded operations),
/// checksum fixed up, zero padding to whole pages.
func rawRecord(
  body: [UInt8], opCount: UInt32, payloadPages: UInt32 = 0, seq: UInt64 = 1, headerLength: UInt32? = nil,
  magic: UInt32 = RecordHeader.magic, version: UInt16 = 1, flags: UInt16 = 0
) -> [UInt8] {
  var w = ByteWriter()
  w.u32(magic)
  w.u16(version)
  w.u16(flags)
  w.u32(headerLength ?? UInt32(64 + body.count))
  w.u32(payloadPages)
  w.u64(seq)
  w.u32(opCount)
  w.u32(0x1234_5678)  // previous checksum
  w.u64(42)  // timestamp
  w.u32(0)  // checksum
  w.zeros(20)
  w.raw(body)
  var b = w.bytes
  fixRecordChecksum(&b)
  b.append(contentsOf: repeatElement(0, count: (4096 - b.count % 4096) % 4096))
  return b
}

/// One operation built by hand. `body` is zero-padded to 8 bytes unless `length` is given.
func rawOp(_ type: UInt16, _ body: [UInt8], length: UInt32? = nil) -> [UInt8] {
  var b = body
  if length == nil { b.append(contentsOf: repeatElement(0, count: (8 - b.count % 8) % 8)) }
  return le(type) + le(UInt16(0)) + le(length ?? UInt32(8 + b.count)) + b
}

func sampleSuperblock(generation: UInt64 = 0x0102_0304_0506_0708) -> Superblock {
  Superblock(
    features: FeatureSet(incompatible: 0, compatible: 0x8000_0000_0000_0001, autoclear: 0x40),
    generation: generation, imageID: Array(0x10...0x1F), blockSize: 16384, segmentSize: 8 << 20,
    dataOffset: 1 << 20, checkpointPage: 300, checkpointSeq: 77, checkpointChecksum: 0xDEAD_BEEF,
    createdNanoseconds: 1_767_225_600_000_000_000)
}

func sampleCheckpoint(segments: UInt64 = 700, catalogPages: Int = 2) -> CheckpointBody {
  let usageCount = Int((segments + 255) / 256)
  return CheckpointBody(
    virtualSize: 1 << 40, blockSize: 4096, mapDepth: 4, root: ChildRef(page: 0xABCDEF, checksum: 0x0102_0304),
    dataBlocks: 123_456, previousCheckpoint: 4242, segmentCount: segments, snapshotCount: 20,
    usagePages: (0..<usageCount).map { PageRef(page: 1000 + UInt64($0), checksum: 0xA000 + UInt32($0)) },
    catalogPages: (0..<catalogPages).map { PageRef(page: 5000 + UInt64($0), checksum: 0xC000 + UInt32($0)) })
}

/// One of every operation type, with non-trivial field values.
let everyOp: [LogOp] = [
  .write(firstBlock: 12345, checksums: [0x1111_1111, 0x2222_2222, 0xFFFF_FFFF]),
  .zero(firstBlock: 7, count: 1 << 20),
  .discard(firstBlock: 0, count: 1),
  .snapshot(name: "nightly-2026-01-01 ü日本語📸", baseCheckpoint: 256),
  .snapshotDelete(seq: 99),
  .restore(seq: 123_456_789, baseCheckpoint: 0x1234_5678),
  .resize(virtualSize: Layout.maxVirtualSize),
  .pages([
    PageDescriptor(kind: .mapNode, level: 0, checksum: 1, key: 0),
    PageDescriptor(kind: .mapNode, level: 3, checksum: 0xFFFF_FFFF, key: UInt64.max),
    PageDescriptor(kind: .usage, level: 0, checksum: 7, key: 2),
    PageDescriptor(kind: .catalog, level: 0, checksum: 8, key: 1),
  ]),
  .checkpoint(sampleCheckpoint()),
  .seal(nextSegment: 17),
]

func encodeRecord(
  _ ops: [LogOp], seq: UInt64 = 1, flags: RecordHeader.Flags = [], blockSize: Int = 4096
) -> (bytes: [UInt8], header: RecordHeader) {
  LogRecord.encodeHeaderArea(
    ops: ops, seq: seq, previousChecksum: 0xCAFE_F00D, timestampNanoseconds: 1_767_225_600_000_000_000,
    flags: flags, blockSize: blockSize)
}

// MARK: - CRC-32C

@Suite struct CRC32CTests {
  @Test func knownVectors() {
    #expect(CRC32C.checksum([UInt8]()) == 0)
    #expect(CRC32C.checksum(Array("123456789".utf8)) == 0xE306_9283)
    // RFC 3720 (iSCSI) appendix B.4 vectors.
    #expect(CRC32C.checksum([UInt8](repeating: 0, count: 32)) == 0x8A91_36AA)
    #expect(CRC32C.checksum([UInt8](repeating: 0xFF, count: 32)) == 0x62A8_AB43)
    #expect(CRC32C.checksum(Array(0...31)) == 0x46DD_794E)
    #expect(CRC32C.checksum(Array((0...31).reversed())) == 0x113F_DB5C)
    #expect(referenceCRC32C(Array("123456789".utf8)) == 0xE306_9283)
  }

  @Test func emptyInputKeepsTheRunningValue() {
    #expect(CRC32C.checksum([UInt8](), continuing: 0x1234_5678) == 0x1234_5678)
    let empty = UnsafeRawBufferPointer(start: nil, count: 0)
    #expect(CRC32C.checksum(empty, continuing: 0xE306_9283) == 0xE306_9283)
  }

  @Test func chainingEqualsWhole() {
    var rng = SeededRandom(seed: 1)
    let data = rng.bytes(1000)
    let whole = CRC32C.checksum(data)
    for split in 0...data.count {
      let a = CRC32C.checksum(Array(data[..<split]))
      #expect(CRC32C.checksum(Array(data[split...]), continuing: a) == whole, "split at \(split)")
    }
    // Three-way chaining too.
    let a = CRC32C.checksum(Array(data[..<100]))
    let b = CRC32C.checksum(Array(data[100..<555]), continuing: a)
    #expect(CRC32C.checksum(Array(data[555...]), continuing: b) == whole)
  }

  @Test func matchesBitwiseReferenceAtEveryLengthAndAlignment() {
    var rng = SeededRandom(seed: 2)
    let data = rng.bytes(300)
    for start in 0..<8 {
      for length in 0...(data.count - start) where length < 80 || length % 37 == 0 {
        let slice = Array(data[start..<(start + length)])
        let expected = referenceCRC32C(slice)
        let actual = data.withUnsafeBytes {
          CRC32C.checksum(UnsafeRawBufferPointer(rebasing: $0[start..<(start + length)]))
        }
        #expect(actual == expected, "start \(start) length \(length)")
        #expect(CRC32C.checksum(slice, continuing: 0x5555_AAAA) == referenceCRC32C(slice, continuing: 0x5555_AAAA))
      }
    }
  }

  @Test func hex32IsEightLowercaseDigits() {
    #expect(hex32(0) == "00000000")
    #expect(hex32(0xE306_9283) == "e3069283")
    #expect(hex32(0xF) == "0000000f")
  }
}

// MARK: - Superblock

@Suite struct SuperblockTests {
  @Test func roundTrip() throws {
    let sb = sampleSuperblock()
    let bytes = sb.encode()
    #expect(bytes.count == Superblock.encodedLength)
    #expect(bytes.count == 128)
    #expect(try decodeSuperblock(bytes) == sb)
    // A whole 4096-byte slot decodes the same; bytes past header_length are not looked at.
    var slot = bytes + [UInt8](repeating: 0xA5, count: 4096 - 128)
    #expect(try decodeSuperblock(slot) == sb)
    slot[200] ^= 0xFF
    #expect(try decodeSuperblock(slot) == sb)
  }

  @Test func roundTripExtremes() throws {
    var sb = sampleSuperblock(generation: .max)
    sb.features = FeatureSet(incompatible: .max, compatible: .max, autoclear: .max)
    sb.blockSize = 65536
    sb.segmentSize = 1 << 30
    sb.dataOffset = 8192
    sb.checkpointPage = Layout.maxPageAddress
    sb.checkpointSeq = .max
    sb.checkpointChecksum = .max
    sb.createdNanoseconds = .max
    sb.cdpWindow = .duration(nanoseconds: .max)  // autoclear bit 0 is the window's
    #expect(try decodeSuperblock(sb.encode()) == sb)
    // Decoding does not judge feature bits; callers check unknownIncompatible.
    #expect(sb.features.unknownIncompatible == .max & ~FeatureSet.knownIncompatible)
    #expect(FeatureSet.catalogTree == 1 << 2 && FeatureSet.backingFile == 1 << 3)
    #expect(FeatureSet(incompatible: 0).unknownIncompatible == 0)
    for blockSize in Layout.allowedBlockSizes {
      sb.blockSize = UInt32(blockSize)
      #expect(try decodeSuperblock(sb.encode()).blockSize == UInt32(blockSize))
    }
  }

  @Test func fieldOffsetsMatchTheSpecification() {
    let sb = sampleSuperblock()
    let b = sb.encode()
    #expect(Array(b[0..<8]) == [0x89, 0x53, 0x54, 0x52, 0x41, 0x54, 0x41, 0x0A])
    #expect(read32(b, 8) == 1)
    #expect(read32(b, 12) == 128)
    #expect(read64(b, 16) == sb.features.incompatible)
    #expect(read64(b, 24) == sb.features.compatible)
    #expect(read64(b, 32) == sb.features.autoclear)
    #expect(read64(b, 40) == sb.generation)
    #expect(Array(b[48..<64]) == sb.imageID)
    #expect(read32(b, 64) == sb.blockSize)
    #expect(read32(b, 68) == sb.segmentSize)
    #expect(read64(b, 72) == sb.dataOffset)
    #expect(read64(b, 80) == sb.checkpointPage)
    #expect(read64(b, 88) == sb.checkpointSeq)
    #expect(read32(b, 96) == sb.checkpointChecksum)
    #expect(read32(b, 100) == 0)
    #expect(read64(b, 104) == sb.createdNanoseconds)
    #expect(b[112..<124].allSatisfy { $0 == 0 })
    var zeroed = b
    patch(&zeroed, 124, UInt32(0))
    #expect(read32(b, 124) == CRC32C.checksum(zeroed))
    #expect(read32(b, 124) == referenceCRC32C(zeroed))
  }

  @Test func hasMagic() {
    let b = sampleSuperblock().encode()
    #expect(b.withUnsafeBytes { Superblock.hasMagic($0) })
    #expect(Array(b[0..<8]).withUnsafeBytes { Superblock.hasMagic($0) })
    #expect(!Array(b[0..<7]).withUnsafeBytes { Superblock.hasMagic($0) })
    var bad = b
    bad[7] = 0x0D
    #expect(!bad.withUnsafeBytes { Superblock.hasMagic($0) })
  }

  @Test func badMagicIsRejected() {
    let good = sampleSuperblock().encode()
    for i in 0..<8 {
      var b = good
      b[i] ^= 0x20
      fixSuperblockChecksum(&b)
      expectFormatError(.badMagic, "magic byte \(i)") { _ = try decodeSuperblock(b) }
    }
    expectFormatError(.badMagic) { _ = try decodeSuperblock([UInt8](repeating: 0, count: 128)) }
  }

  @Test(arguments: [UInt32(0), 2, 0x0100_0000, .max])
  func wrongVersionIsRejected(version: UInt32) {
    var b = sampleSuperblock().encode()
    patch(&b, 8, version)
    fixSuperblockChecksum(&b)
    expectFormatError(.unsupportedVersion, "version \(version)") { _ = try decodeSuperblock(b) }
  }

  @Test func everyBitFlipIsRejected() {
    let good = sampleSuperblock().encode()
    for i in 0..<128 {
      for bit in 0..<8 {
        var b = good
        b[i] ^= 1 << bit
        let expected: FormatError.Kind =
          switch i {
          case 0..<8: .badMagic
          case 8..<12: .unsupportedVersion
          case 12..<16: .invalidField  // header length no longer 128 with a 128-byte input
          default: .badChecksum
          }
        expectFormatError(expected, "byte \(i) bit \(bit)") { _ = try decodeSuperblock(b) }
      }
      // And a whole-byte corruption, inside a full slot so header_length changes still fit.
      var slot = good + [UInt8](repeating: 0, count: 4096 - 128)
      slot[i] ^= 0xFF
      expectFormatError(
        i < 12 ? (i < 8 ? .badMagic : .unsupportedVersion) : (i < 16 ? .invalidField : .badChecksum), "byte \(i)"
      ) {
        _ = try decodeSuperblock(slot)
      }
    }
  }

  @Test func headerLengthRange() throws {
    let good = sampleSuperblock().encode()
    let slot = good + [UInt8](repeating: 0, count: 8192 - 128)
    for length: UInt32 in [0, 8, 64, 120, 127, 129, 132, 4097, 4104, 8192, .max] {
      var b = slot
      patch(&b, 12, length)
      fixSuperblockChecksum(&b)
      expectFormatError(.invalidField, "header length \(length)") { _ = try decodeSuperblock(b) }
    }
    // A longer header than the input holds.
    var short = good
    patch(&short, 12, UInt32(136))
    fixSuperblockChecksum(&short)
    expectFormatError(.invalidField) { _ = try decodeSuperblock(short) }

    // A longer header (a future version adding fields) is accepted, and its checksum covers
    // every header_length byte.
    for length: UInt32 in [136, 512, 4096] {
      var b = slot
      patch(&b, 12, length)
      b[Int(length) - 1] = 0x77
      fixSuperblockChecksum(&b)
      let sb = try decodeSuperblock(b)
      #expect(sb == sampleSuperblock())
      b[Int(length) - 1] ^= 1
      expectFormatError(.badChecksum, "length \(length)") { _ = try decodeSuperblock(b) }
      b[Int(length) - 1] ^= 1
      b[Int(length)] ^= 1  // past the header: not covered
      #expect(try decodeSuperblock(b) == sb)
    }
  }

  @Test(arguments: [UInt32(0), 512, 1024, 2048, 4095, 4097, 12288, 24576, 131072, .max])
  func invalidBlockSize(blockSize: UInt32) {
    var b = sampleSuperblock().encode()
    patch(&b, 64, blockSize)
    fixSuperblockChecksum(&b)
    expectFormatError(.invalidField, "block size \(blockSize)") { _ = try decodeSuperblock(b) }
  }

  static let badSegmentSizes: [UInt32] = [
    0, 4096, 1 << 19, (1 << 20) - 4096, 3 << 20, (1 << 20) + 65536, 1 << 31, .max,
  ]

  @Test(arguments: badSegmentSizes)
  func invalidSegmentSize(segmentSize: UInt32) {
    var b = sampleSuperblock().encode()
    patch(&b, 68, segmentSize)
    fixSuperblockChecksum(&b)
    expectFormatError(.invalidField, "segment size \(segmentSize)") { _ = try decodeSuperblock(b) }
  }

  @Test func validSegmentSizes() throws {
    for shift in 20...30 {
      var sb = sampleSuperblock()
      sb.segmentSize = 1 << shift
      #expect(try decodeSuperblock(sb.encode()).segmentSize == 1 << shift)
    }
  }

  @Test func dataOffsetAndCheckpointPage() throws {
    for offset: UInt64 in [0, 4096, 8191, 8193, 12289, (1 << 20) + 1] {
      var b = sampleSuperblock().encode()
      patch(&b, 72, offset)
      fixSuperblockChecksum(&b)
      expectFormatError(.invalidField, "data offset \(offset)") { _ = try decodeSuperblock(b) }
    }
    var sb = sampleSuperblock()
    sb.dataOffset = 8192
    sb.checkpointPage = 2
    #expect(try decodeSuperblock(sb.encode()) == sb)

    // The checkpoint must lie in the segment area and fit 48 bits. Page addresses whose byte
    // offset overflows 64 bits must be rejected, not trap.
    for page: UInt64 in [0, 1, 255, Layout.maxPageAddress + 1, 1 << 52, 1 << 60, .max] {
      var b = sampleSuperblock().encode()  // data offset 1 MiB = page 256
      patch(&b, 80, page)
      fixSuperblockChecksum(&b)
      expectFormatError(.invalidField, "checkpoint page \(page)") { _ = try decodeSuperblock(b) }
    }
    var edge = sampleSuperblock()
    edge.checkpointPage = 256
    #expect(try decodeSuperblock(edge.encode()) == edge)
  }

  @Test func truncatedInputIsRejected() {
    let good = sampleSuperblock().encode()
    for n in 0..<128 {
      expectFormatError(.truncated, "\(n) bytes") { _ = try decodeSuperblock(Array(good[0..<n])) }
    }
  }
}

// MARK: - Records

@Suite struct RecordTests {
  @Test func roundTripEveryOperationAlone() throws {
    for op in everyOp {
      let (bytes, header) = encodeRecord([op], seq: 1000)
      #expect(bytes.count % 4096 == 0)
      #expect(Int(header.headerLength) == 64 + op.encodedLength)
      #expect(header.headerLength % 8 == 0)
      #expect(opBytes(op).count == op.encodedLength)
      #expect(bytes[Int(header.headerLength)...].allSatisfy { $0 == 0 }, "padding is zero")
      let record = try decodeRecord(bytes)
      #expect(record.header == header)
      #expect(record.ops == [op])
      #expect(Int(record.header.payloadPages) == op.payloadPages(blockSize: 4096))
      #expect(record.header.nextSeq == 1001)
    }
  }

  /// SEGMENT_REUSE: the log start rides 16 bytes after the page lists, only when set; a
  /// checkpoint without it keeps the version-1 bytes; a log start past 48 bits is invalid.
  @Test func checkpointLogStart() throws {
    var body = CheckpointBody(
      virtualSize: 1 << 30, blockSize: 4096, mapDepth: 3, root: ChildRef(page: 300, checksum: 0x11), dataBlocks: 5,
      previousCheckpoint: 256, segmentCount: 1, snapshotCount: 0, usagePages: [PageRef(page: 301, checksum: 0x22)],
      catalogPages: [])
    let plain = opBytes(.checkpoint(body))
    body.logStart = 4242
    let extended = opBytes(.checkpoint(body))
    #expect(extended.count == plain.count + 16)
    #expect(Array(extended[plain.count...]) == le(UInt64(4242)) + le(UInt64(0)))
    #expect(read32(extended, 4) == UInt32(plain.count + 16), "the operation length covers it")
    let (bytes, _) = encodeRecord([.checkpoint(body)], seq: 7)
    #expect(try decodeRecord(bytes).ops == [.checkpoint(body)])
    body.logStart = 0
    #expect(try decodeRecord(encodeRecord([.checkpoint(body)], seq: 7).0).ops == [.checkpoint(body)])
    var bad = bytes
    patch(&bad, 64 + plain.count, UInt64(1) << 48)
    fixRecordChecksum(&bad)
    #expect(throws: FormatError.self) { try decodeRecord(bad) }
  }

  @Test func freeSegmentMarker() throws {
    #expect(SegmentUsage.free.isFree && !SegmentUsage.free.isSealed)
    #expect(!SegmentUsage().isFree && !SegmentUsage().isSealed, "the open segment")
    #expect(SegmentUsage(livePages: 1, writtenPages: 9, lastSeq: 77).isSealed)
    let page = SegmentUsage.encodePage([SegmentUsage.free][...])
    #expect(Array(page[0..<16]) == le(UInt32(0)) + le(UInt32(0)) + le(UInt64.max))
    #expect(try page.withUnsafeBytes { try SegmentUsage.decodePage($0, count: 1) } == [.free])
    #expect(FeatureSet.knownIncompatible & FeatureSet.segmentReuse != 0)
  }

  @Test func roundTripEveryOperationTogether() throws {
    // CHECKPOINT last; SEAL gets a record of its own.
    let ops = everyOp.filter { $0.type != .seal }
    #expect(ops.last?.type == .checkpoint)
    for blockSize in Layout.allowedBlockSizes {
      let (bytes, header) = encodeRecord(ops, seq: 5, flags: .flushPoint, blockSize: blockSize)
      let record = try decodeRecord(bytes, blockSize: blockSize)
      #expect(record.ops == ops)
      #expect(record.header == header)
      #expect(record.header.flags == .flushPoint)
      #expect(record.header.opCount == UInt32(ops.count))
      #expect(Int(record.header.payloadPages) == 3 * blockSize / 4096 + 4)
      #expect(record.header.totalPages == 1 + Int(record.header.payloadPages))
      #expect(record.header.previousChecksum == 0xCAFE_F00D)
      #expect(record.header.timestampNanoseconds == 1_767_225_600_000_000_000)
    }
    let seal = encodeRecord([.zero(firstBlock: 1, count: 2), .seal(nextSegment: 1)])
    #expect(try decodeRecord(seal.bytes).ops.last == .seal(nextSegment: 1))
  }

  @Test func headerFieldOffsetsMatchTheSpecification() {
    let (b, h) = encodeRecord(
      [.write(firstBlock: 9, checksums: [1, 2]), .seal(nextSegment: 3)], seq: 77, flags: .flushPoint)
    #expect(read32(b, 0) == 0x4C52_5453)
    #expect(Array(b[0..<4]) == Array("STRL".utf8))
    #expect(b[4] == 1 && b[5] == 0)
    #expect(b[6] == 1 && b[7] == 0)
    #expect(read32(b, 8) == h.headerLength)
    #expect(h.headerLength == 64 + 32 + 16)
    #expect(read32(b, 12) == 2)
    #expect(read64(b, 16) == 77)
    #expect(read32(b, 24) == 2)
    #expect(read32(b, 28) == 0xCAFE_F00D)
    #expect(read64(b, 32) == 1_767_225_600_000_000_000)
    #expect(read32(b, 40) == h.checksum)
    #expect(b[44..<64].allSatisfy { $0 == 0 })
    var zeroed = Array(b[0..<Int(h.headerLength)])
    patch(&zeroed, 40, UInt32(0))
    #expect(h.checksum == referenceCRC32C(zeroed))
    // WRITE: type 1, reserved, length 32, first block, count, codec, checksums, padding.
    #expect(Array(b[64..<72]) == le(UInt16(1)) + le(UInt16(0)) + le(UInt32(32)))
    #expect(read64(b, 72) == 9)
    #expect(read32(b, 80) == 2)
    #expect(read32(b, 84) == 0)
    #expect(read32(b, 88) == 1 && read32(b, 92) == 2)
    // SEAL: type 10, length 16, next segment.
    #expect(Array(b[96..<104]) == le(UInt16(10)) + le(UInt16(0)) + le(UInt32(16)))
    #expect(read64(b, 104) == 3)
  }

  @Test func operationLayouts() {
    #expect(
      opBytes(.zero(firstBlock: 5, count: 6)) == le(UInt16(2)) + le(UInt16(0)) + le(UInt32(24)) + le(UInt64(5))
        + le(UInt64(6)))
    #expect(
      opBytes(.discard(firstBlock: 5, count: 6)) == le(UInt16(3)) + le(UInt16(0)) + le(UInt32(24)) + le(UInt64(5))
        + le(UInt64(6)))
    #expect(
      opBytes(.snapshot(name: "abc", baseCheckpoint: 256))
        == le(UInt16(4)) + le(UInt16(0)) + le(UInt32(24)) + le(UInt64(256)) + le(UInt16(3)) + Array("abc".utf8) + [
          0, 0, 0,
        ])
    #expect(opBytes(.snapshotDelete(seq: 8)) == le(UInt16(5)) + le(UInt16(0)) + le(UInt32(16)) + le(UInt64(8)))
    #expect(
      opBytes(.restore(seq: 8, baseCheckpoint: 256)) == le(UInt16(6)) + le(UInt16(0)) + le(UInt32(24)) + le(UInt64(8))
        + le(UInt64(256)))
    #expect(opBytes(.resize(virtualSize: 8)) == le(UInt16(7)) + le(UInt16(0)) + le(UInt32(16)) + le(UInt64(8)))
    #expect(
      opBytes(.pages([PageDescriptor(kind: .usage, level: 3, checksum: 0xAABB_CCDD, key: 9)]))
        == le(UInt16(8)) + le(UInt16(0)) + le(UInt32(32)) + le(UInt32(1)) + le(UInt32(0))
        + [2, 3, 0, 0] + le(UInt32(0xAABB_CCDD)) + le(UInt64(9)))
    let body = CheckpointBody(
      virtualSize: 1 << 30, blockSize: 4096, mapDepth: 3, root: ChildRef(page: 300, checksum: 0x11), dataBlocks: 5,
      previousCheckpoint: 256, segmentCount: 1, snapshotCount: 2, usagePages: [PageRef(page: 301, checksum: 0x22)],
      catalogPages: [PageRef(page: 302, checksum: 0x33)])
    var expected: [UInt8] = le(UInt16(9)) + le(UInt16(0)) + le(UInt32(112))
    expected += le(UInt64(1 << 30)) + le(UInt32(4096)) + [3, 0, 0, 0]
    expected += le(UInt64(300)) + le(UInt32(0x11)) + le(UInt32(0))  // root ChildRef
    expected += le(UInt64(5)) + le(UInt64(256)) + le(UInt64(1)) + le(UInt64(2))
    expected += le(UInt32(1)) + le(UInt32(1))
    expected += le(UInt64(301)) + le(UInt32(0x22)) + le(UInt32(0))
    expected += le(UInt64(302)) + le(UInt32(0x33)) + le(UInt32(0))
    #expect(opBytes(.checkpoint(body)) == expected)
    var zeroRoot = body
    zeroRoot.root = .zero
    let zeroRootBytes = opBytes(.checkpoint(zeroRoot))
    #expect(Array(zeroRootBytes[24..<40]) == le(UInt64(0)) + le(UInt64(1) << 32))
    #expect(opBytes(.seal(nextSegment: 8)) == le(UInt16(10)) + le(UInt16(0)) + le(UInt32(16)) + le(UInt64(8)))
    #expect(OpType.allCases.map(\.rawValue) == Array(1...10))
    #expect(PageKind.allCases.map(\.rawValue) == [1, 2, 3, 4, 5])
  }

  @Test func largeWriteSpansSeveralHeaderPages() throws {
    var rng = SeededRandom(seed: 3)
    let checksums = (0..<3000).map { _ in UInt32(truncatingIfNeeded: rng.next()) }
    let op = LogOp.write(firstBlock: 1 << 40, checksums: checksums)
    let (bytes, header) = encodeRecord([op])
    #expect(header.headerLength == 64 + 24 + 12000)
    #expect(header.headerPages == 3)
    #expect(bytes.count == 3 * 4096)
    #expect(header.payloadPages == 3000)
    #expect(try decodeRecord(bytes).ops == [op])
    // Payload pages scale with the block size.
    let big = encodeRecord([op], blockSize: 65536)
    #expect(big.header.payloadPages == 48000)
    #expect(try decodeRecord(big.bytes, blockSize: 65536).ops == [op])
    // The header area is all that is needed: a short area fails, whatever the block size.
    expectFormatError(.truncated) { _ = try decodeRecord(Array(bytes[0..<8192])) }
  }

  @Test func snapshotNames() throws {
    let names = [
      "a", "before upgrade", "snäpshot-ü", "日本語のスナップショット", "📸🎉", "tab-less name with spaces",
      String(repeating: "é", count: 127) + "x",  // 255 bytes
      String(repeating: "z", count: 255),
    ]
    for name in names {
      let op = LogOp.snapshot(name: name, baseCheckpoint: 256)
      let record = try decodeRecord(encodeRecord([op]).bytes)
      #expect(record.ops == [op])
      if case .snapshot(let decoded, _) = record.ops[0] { #expect(Array(decoded.utf8) == Array(name.utf8)) }
    }
    for bad in ["", "a/b", "/", "line\nbreak", "nul\u{0}", "del\u{7F}", "tab\t", String(repeating: "z", count: 256)] {
      expectFormatError(.invalidField, "name \(bad.debugDescription)") { try SnapshotEntry.validateName(bad) }
      let op = rawOp(4, le(UInt64(256)) + le(UInt16(bad.utf8.count)) + Array(bad.utf8))
      expectFormatError(.invalidField, "name \(bad.debugDescription)") {
        _ = try decodeRecord(rawRecord(body: op, opCount: 1))
      }
    }
    // Not UTF-8.
    for raw: [UInt8] in [[0xFF], [0xC3], [0x61, 0x80], [0xED, 0xA0, 0x80], [0xC0, 0xAF]] {
      let op = rawOp(4, le(UInt64(256)) + le(UInt16(raw.count)) + raw)
      expectFormatError(.invalidField, "\(raw)") { _ = try decodeRecord(rawRecord(body: op, opCount: 1)) }
    }
    // Name longer than the operation.
    let long = rawOp(4, le(UInt64(256)) + le(UInt16(200)) + Array("abc".utf8))
    expectFormatError(.truncated) { _ = try decodeRecord(rawRecord(body: long, opCount: 1)) }
  }

  @Test func checkpointWithUsageAndCatalogRefs() throws {
    for (segments, catalogs) in [(UInt64(1), 0), (256, 0), (257, 1), (700, 2), (5000, 30)] {
      let body = sampleCheckpoint(segments: segments, catalogPages: catalogs)
      #expect(body.usagePages.count == Int((segments + 255) / 256))
      let ops: [LogOp] = [.pages([PageDescriptor(kind: .usage, level: 0, checksum: 5, key: 0)]), .checkpoint(body)]
      let record = try decodeRecord(encodeRecord(ops).bytes)
      #expect(record.ops == ops)
    }
  }

  @Test func everyBitFlipInTheHeaderAreaIsRejected() throws {
    let ops: [LogOp] = [
      .write(firstBlock: 3, checksums: [9, 8, 7]), .snapshot(name: "snäp", baseCheckpoint: 256),
      .pages([PageDescriptor(kind: .mapNode, level: 1, checksum: 4, key: 0)]),
      .checkpoint(sampleCheckpoint(segments: 300, catalogPages: 1)),
    ]
    let (good, header) = encodeRecord(ops, seq: 10)
    #expect((try? decodeRecord(good)) != nil)
    var rejected = 0
    for i in 0..<Int(header.headerLength) {
      for bit in 0..<8 {
        var b = good
        b[i] ^= 1 << bit
        do {
          _ = try decodeRecord(b)
          Issue.record("flip of byte \(i) bit \(bit) was accepted")
        } catch is FormatError {
          rejected += 1
        } catch {
          Issue.record("unexpected \(error)")
        }
      }
    }
    #expect(rejected == 8 * Int(header.headerLength))
    // The zero padding after header_length is not covered by the checksum.
    var padded = good
    padded[Int(header.headerLength)] = 0xFF
    #expect(try decodeRecord(padded).ops == ops)
  }

  @Test func truncatedAreasAreRejected() {
    let (good, header) = encodeRecord(everyOp.filter { $0.type != .seal })
    for n in 0..<Int(header.headerLength) {
      expectFormatError(.truncated, "\(n) bytes") { _ = try decodeRecord(Array(good[0..<n])) }
    }
  }

  @Test func handBuiltRecordIsAccepted() throws {
    // Guards the helpers: without a defect, a hand-built record decodes.
    let body = rawOp(2, le(UInt64(1)) + le(UInt64(2)))
    let record = try decodeRecord(rawRecord(body: body, opCount: 1, seq: 3))
    #expect(record.ops == [.zero(firstBlock: 1, count: 2)])
    #expect(record.header.seq == 3)
  }

  @Test func recordHeaderChecks() {
    let zero = rawOp(2, le(UInt64(1)) + le(UInt64(2)))
    expectFormatError(.badMagic) { _ = try decodeRecord(rawRecord(body: zero, opCount: 1, magic: 0x4C52_5454)) }
    for v: UInt16 in [0, 2, .max] {
      expectFormatError(.unsupportedVersion) { _ = try decodeRecord(rawRecord(body: zero, opCount: 1, version: v)) }
    }
    // Header length: below 72, not a multiple of 8, above 1 MiB.
    for length: UInt32 in [0, 64, 71, 84, 92, 1 << 20 + 8, .max] {
      expectFormatError(.invalidField, "header length \(length)") {
        _ = try decodeRecord(
          rawRecord(body: zero, opCount: 1, headerLength: length) + [UInt8](repeating: 0, count: 4096))
      }
    }
    // Header length larger than the area given.
    expectFormatError(.truncated) {
      _ = try decodeRecord(Array(rawRecord(body: zero, opCount: 1, headerLength: 4096 + 8)[0..<4096]))
    }
    // Header length beyond the operations: trailing bytes.
    expectFormatError(.invalidField) {
      _ = try decodeRecord(rawRecord(body: zero + [UInt8](repeating: 0, count: 8), opCount: 1))
    }
    // Operation count 0, and more operations than could fit.
    expectFormatError(.invalidField) { _ = try decodeRecord(rawRecord(body: zero, opCount: 0)) }
    expectFormatError(.invalidField) { _ = try decodeRecord(rawRecord(body: zero, opCount: 4)) }
    expectFormatError(.invalidField) { _ = try decodeRecord(rawRecord(body: zero, opCount: .max)) }
    // More operations than present: the next "operation" is zeros (length 0).
    expectFormatError(.invalidField) {
      _ = try decodeRecord(rawRecord(body: zero + [UInt8](repeating: 0, count: 24), opCount: 2))
    }
    // Sequence numbers: 0 and the top half are invalid.
    expectFormatError(.invalidField) { _ = try decodeRecord(rawRecord(body: zero, opCount: 1, seq: 0)) }
    expectFormatError(.invalidField) { _ = try decodeRecord(rawRecord(body: zero, opCount: 1, seq: UInt64.max / 2)) }
    expectFormatError(.invalidField) { _ = try decodeRecord(rawRecord(body: zero, opCount: 1, seq: .max)) }
    #expect((try? decodeRecord(rawRecord(body: zero, opCount: 1, seq: UInt64.max / 2 - 1))) != nil)
    // Bad checksum.
    var b = rawRecord(body: zero, opCount: 1)
    b[41] ^= 0x10
    expectFormatError(.badChecksum) { _ = try decodeRecord(b) }
    // Unknown flag bits are ignored.
    #expect((try? decodeRecord(rawRecord(body: zero, opCount: 1, flags: 0xFFFE)))?.header.flags.rawValue == 0xFFFE)
  }

  @Test(arguments: [UInt16(0), 11, 12, 0x100, .max])
  func unknownOperationType(type: UInt16) {
    let op = rawOp(type, le(UInt64(1)) + le(UInt64(2)))
    expectFormatError(.invalidField, "type \(type)") { _ = try decodeRecord(rawRecord(body: op, opCount: 1)) }
  }

  @Test func badOperationLengths() {
    let body = le(UInt64(1)) + le(UInt64(2))
    // Not a multiple of 8, smaller than the operation header, larger than the header area.
    for length: UInt32 in [0, 4, 7, 20, 25, 32, 40, 1 << 20, .max] {
      let op = rawOp(2, body, length: length)
      expectFormatError(.invalidField, "length \(length)") { _ = try decodeRecord(rawRecord(body: op, opCount: 1)) }
    }
    // A length too short for the operation's fields.
    expectFormatError(.truncated) {
      _ = try decodeRecord(
        rawRecord(
          body: rawOp(2, Array(body[0..<8]), length: 16) + [UInt8](repeating: 0, count: 8), opCount: 1,
          headerLength: 64 + 16))
    }
    expectFormatError(.truncated) { _ = try decodeRecord(rawRecord(body: rawOp(10, [], length: 8), opCount: 1)) }
    // A write whose count needs more checksums than the operation holds.
    let write = rawOp(1, le(UInt64(0)) + le(UInt32(3)) + le(UInt32(0)) + le(UInt32(1)) + le(UInt32(2)))
    expectFormatError(.truncated) { _ = try decodeRecord(rawRecord(body: write, opCount: 1, payloadPages: 3)) }
  }

  @Test func longerOperationsAreAcceptedAndTheirTailIgnored() throws {
    // Documented behaviour: an operation may be longer than the fields this version defines.
    let op = rawOp(2, le(UInt64(1)) + le(UInt64(2)) + le(UInt64(0xFFFF)))
    #expect(try decodeRecord(rawRecord(body: op, opCount: 1)).ops == [.zero(firstBlock: 1, count: 2)])
  }

  @Test func payloadCountMismatch() throws {
    let write = opBytes(.write(firstBlock: 0, checksums: [1, 2]))
    #expect(try decodeRecord(rawRecord(body: write, opCount: 1, payloadPages: 2)).ops.count == 1)
    for pages: UInt32 in [0, 1, 3, 4, .max] {
      expectFormatError(.invalidField, "payload \(pages)") {
        _ = try decodeRecord(rawRecord(body: write, opCount: 1, payloadPages: pages))
      }
    }
    // The same record read with 8 KiB blocks consumes 4 pages.
    expectFormatError(.invalidField) {
      _ = try decodeRecord(rawRecord(body: write, opCount: 1, payloadPages: 2), blockSize: 8192)
    }
    #expect(try decodeRecord(rawRecord(body: write, opCount: 1, payloadPages: 4), blockSize: 8192).ops.count == 1)
    let pages = opBytes(.pages([PageDescriptor(kind: .mapNode, level: 0, checksum: 0, key: 0)]))
    expectFormatError(.invalidField) {
      _ = try decodeRecord(rawRecord(body: pages + write, opCount: 2, payloadPages: 2))
    }
    #expect(try decodeRecord(rawRecord(body: pages + write, opCount: 2, payloadPages: 3)).ops.count == 2)
  }

  @Test func checkpointAndSealMustBeLast() throws {
    let checkpoint = opBytes(.checkpoint(sampleCheckpoint(segments: 1, catalogPages: 0)))
    let seal = opBytes(.seal(nextSegment: 1))
    let zero = opBytes(.zero(firstBlock: 0, count: 1))
    expectFormatError(.invalidField) { _ = try decodeRecord(rawRecord(body: checkpoint + zero, opCount: 2)) }
    expectFormatError(.invalidField) { _ = try decodeRecord(rawRecord(body: seal + zero, opCount: 2)) }
    expectFormatError(.invalidField) { _ = try decodeRecord(rawRecord(body: checkpoint + seal, opCount: 2)) }
    expectFormatError(.invalidField) { _ = try decodeRecord(rawRecord(body: seal + checkpoint, opCount: 2)) }
    expectFormatError(.invalidField) { _ = try decodeRecord(rawRecord(body: checkpoint + checkpoint, opCount: 2)) }
    #expect(try decodeRecord(rawRecord(body: zero + checkpoint, opCount: 2)).ops.count == 2)
    #expect(try decodeRecord(rawRecord(body: zero + seal, opCount: 2)).ops.count == 2)
  }

  @Test func writeZeroDiscardFieldChecks() throws {
    func write(_ first: UInt64, count: UInt32, codec: UInt32, checksums: Int) -> [UInt8] {
      rawOp(1, le(first) + le(count) + le(codec) + (0..<checksums).flatMap { le(UInt32($0)) })
    }
    expectFormatError(.invalidField) {
      _ = try decodeRecord(rawRecord(body: write(0, count: 0, codec: 0, checksums: 0), opCount: 1))
    }
    for codec: UInt32 in [1, 2, .max] {
      expectFormatError(.invalidField) {
        _ = try decodeRecord(
          rawRecord(body: write(0, count: 1, codec: codec, checksums: 1), opCount: 1, payloadPages: 1))
      }
    }
    let maxBlocks = Layout.maxVirtualSize / 4096
    expectFormatError(.invalidField) {
      _ = try decodeRecord(
        rawRecord(body: write(maxBlocks, count: 1, codec: 0, checksums: 1), opCount: 1, payloadPages: 1))
    }
    expectFormatError(.invalidField) {
      _ = try decodeRecord(
        rawRecord(body: write(maxBlocks - 1, count: 2, codec: 0, checksums: 2), opCount: 1, payloadPages: 2))
    }
    expectFormatError(.invalidField) {
      _ = try decodeRecord(rawRecord(body: write(.max, count: 1, codec: 0, checksums: 1), opCount: 1, payloadPages: 1))
    }
    #expect(
      try decodeRecord(
        rawRecord(body: write(maxBlocks - 1, count: 1, codec: 0, checksums: 1), opCount: 1, payloadPages: 1)
      ).ops.count == 1)

    for type: UInt16 in [2, 3] {
      let ranges: [(UInt64, UInt64)] = [(0, 0), (maxBlocks, 1), (0, maxBlocks + 1), (.max, .max), (1, .max), (.max, 1)]
      for (first, count) in ranges {
        expectFormatError(.invalidField, "type \(type) \(first)+\(count)") {
          _ = try decodeRecord(rawRecord(body: rawOp(type, le(first) + le(count)), opCount: 1))
        }
      }
      #expect(try decodeRecord(rawRecord(body: rawOp(type, le(UInt64(0)) + le(maxBlocks)), opCount: 1)).ops.count == 1)
    }
  }

  @Test func resizeAndPagesFieldChecks() throws {
    expectFormatError(.invalidField) {
      _ = try decodeRecord(rawRecord(body: rawOp(7, le(Layout.maxVirtualSize + 1)), opCount: 1))
    }
    expectFormatError(.invalidField) { _ = try decodeRecord(rawRecord(body: rawOp(7, le(UInt64.max)), opCount: 1)) }
    #expect(try decodeRecord(rawRecord(body: rawOp(7, le(UInt64(0))), opCount: 1)).ops == [.resize(virtualSize: 0)])

    func pages(count: UInt32, kinds: [UInt8]) -> [UInt8] {
      rawOp(8, le(count) + le(UInt32(0)) + kinds.flatMap { [$0, 0, 0, 0] + le(UInt32(1)) + le(UInt64(2)) })
    }
    expectFormatError(.invalidField) { _ = try decodeRecord(rawRecord(body: pages(count: 0, kinds: []), opCount: 1)) }
    expectFormatError(.invalidField) {
      _ = try decodeRecord(rawRecord(body: pages(count: 2, kinds: [1]), opCount: 1, payloadPages: 2))
    }
    expectFormatError(.invalidField) {
      _ = try decodeRecord(rawRecord(body: pages(count: .max, kinds: [1]), opCount: 1, payloadPages: 1))
    }
    for kind: UInt8 in [0, 6, 0xFF] {
      expectFormatError(.invalidField, "kind \(kind)") {
        _ = try decodeRecord(rawRecord(body: pages(count: 1, kinds: [kind]), opCount: 1, payloadPages: 1))
      }
    }
    #expect(
      try decodeRecord(rawRecord(body: pages(count: 2, kinds: [1, 3]), opCount: 1, payloadPages: 2)).ops.count == 1)
  }

  /// A valid single-checkpoint record's operation bytes, to patch one field at a time.
  /// Offsets are from the start of the operation (its 8-byte header included).
  func checkpointOp(segments: UInt64 = 3, catalogs: Int = 1) -> [UInt8] {
    var body = sampleCheckpoint(segments: segments, catalogPages: catalogs)
    body.virtualSize = 1 << 30
    body.mapDepth = 3
    return opBytes(.checkpoint(body))
  }

  @Test func checkpointFieldChecks() throws {
    let good = checkpointOp()
    #expect(try decodeRecord(rawRecord(body: good, opCount: 1)).ops.count == 1)
    func rejects<T: FixedWidthInteger>(
      _ offset: Int, _ value: T, _ kind: FormatError.Kind = .invalidField,
      sourceLocation: SourceLocation = #_sourceLocation
    ) {
      var op = good
      patch(&op, offset, value)
      expectFormatError(kind, "offset \(offset) = \(value)", sourceLocation: sourceLocation) {
        _ = try decodeRecord(rawRecord(body: op, opCount: 1))
      }
    }
    func accepts<T: FixedWidthInteger>(_ offset: Int, _ value: T, sourceLocation: SourceLocation = #_sourceLocation) {
      var op = good
      patch(&op, offset, value)
      #expect(
        (try? decodeRecord(rawRecord(body: op, opCount: 1))) != nil, "offset \(offset) = \(value)",
        sourceLocation: sourceLocation)
    }
    // Virtual size.
    rejects(8, Layout.maxVirtualSize + 1)
    rejects(8, UInt64.max)
    accepts(8, UInt64(0))
    rejects(8, UInt64(1 << 30) * 256)  // needs depth 4, has 3
    // Block size.
    for bs: UInt32 in [0, 512, 4095, 12288, 131072, .max] { rejects(16, bs) }
    accepts(16, UInt32(65536))
    // Map depth: 0, above 7, too shallow for the size.
    rejects(20, UInt8(0))
    rejects(20, UInt8(8))
    rejects(20, UInt8(0xFF))
    rejects(20, UInt8(2))
    accepts(20, UInt8(7))  // deeper than needed is allowed (after a shrink)
    // Catalog format: 0 flat, 1 tree (exactly two roots and at least one snapshot), others unknown.
    rejects(21, UInt8(2))
    rejects(21, UInt8(0xFF))
    rejects(21, UInt8(1))  // one catalog reference
    var tree = checkpointOp(catalogs: 2)
    patch(&tree, 21, UInt8(1))
    guard case .checkpoint(let tb) = try decodeRecord(rawRecord(body: tree, opCount: 1)).ops[0] else {
      Issue.record("not a checkpoint")
      return
    }
    #expect(tb.catalogFormat == .tree && tb.catalogPages.count == 2)
    patch(&tree, 64, UInt64(0))  // a tree with no snapshots
    expectFormatError(.invalidField) { _ = try decodeRecord(rawRecord(body: tree, opCount: 1)) }
    // Root: page beyond 48 bits, reserved flag bits, zero flag on a stored node, null root with a
    // checksum. A null root, and a null root with the zero-subtree flag, are fine.
    rejects(24, Layout.maxPageAddress + 1)
    rejects(32, UInt64(2) << 32 | 0x0102_0304)
    rejects(32, UInt64.max)
    rejects(32, UInt64(1) << 32 | 0x0102_0304)
    var nullRootWithChecksum = good
    patch(&nullRootWithChecksum, 24, UInt64(0))
    expectFormatError(.invalidField) { _ = try decodeRecord(rawRecord(body: nullRootWithChecksum, opCount: 1)) }
    var zeroRoot = good
    patch(&zeroRoot, 24, UInt64(0))
    patch(&zeroRoot, 32, UInt64(1) << 32)
    let zeroDecoded = try decodeRecord(rawRecord(body: zeroRoot, opCount: 1))
    guard case .checkpoint(let zb) = zeroDecoded.ops[0] else { Issue.record("not a checkpoint"); return }
    #expect(zb.root == .zero && zb.root.zeroSubtree)
    patch(&zeroRoot, 32, UInt64(0))
    let unallocatedDecoded = try decodeRecord(rawRecord(body: zeroRoot, opCount: 1))
    guard case .checkpoint(let ub) = unallocatedDecoded.ops[0] else { Issue.record("not a checkpoint"); return }
    #expect(ub.root == .unallocated)
    // Data block count and previous checkpoint take any value.
    accepts(40, UInt64.max)
    accepts(48, UInt64.max)
    // Segment count: 0, and counts that do not match the usage refs (3 segments, 1 ref).
    rejects(56, UInt64(0))
    rejects(56, UInt64(257))
    rejects(56, UInt64.max)  // must not overflow
    rejects(56, UInt64(Int64.max))
    rejects(56, UInt64(Int64.max) - 100)
    accepts(56, UInt64(256))
    // Usage / catalog counts that disagree with the segment count or do not fit.
    rejects(72, UInt32(0))
    rejects(72, UInt32(2))
    rejects(72, UInt32.max)
    rejects(76, UInt32(2))
    rejects(76, UInt32.max)
    // A usage ref or catalog ref beyond 48 bits.
    rejects(80, UInt64.max)
    rejects(96, Layout.maxPageAddress + 1)
    // Body shorter than the fixed fields.
    let short = rawOp(9, Array(good[8..<48]))
    expectFormatError(.truncated) { _ = try decodeRecord(rawRecord(body: short, opCount: 1)) }
  }
}

// MARK: - Pages

@Suite struct PageTests {
  @Test func mapEntryRoundTrip() throws {
    let entries: [MapEntry] = [
      .unallocated, .zero, .data(page: 1, checksum: 0), .data(page: 256, checksum: 0xE306_9283),
      .data(page: Layout.maxPageAddress, checksum: .max),
    ]
    for e in entries {
      let (w0, w1) = e.words
      #expect(try MapEntry.decode(word0: w0, word1: w1) == e)
    }
    #expect(MapEntry.unallocated.words == (0, 0))
    #expect(MapEntry.zero.words == (2 << 48, 0))
    #expect(MapEntry.data(page: 0x1234, checksum: 0xABCD).words == (1 << 48 | 0x1234, 0xABCD))
  }

  @Test func mapEntryInvalidStates() {
    for state: UInt64 in 3...15 {
      expectFormatError(.invalidField, "state \(state)") { _ = try MapEntry.decode(word0: state << 48 | 5, word1: 0) }
    }
    for bit: UInt64 in 52...63 {
      for state: UInt64 in 0...2 {
        let page: UInt64 = state == 1 ? 9 : 0
        expectFormatError(.invalidField, "bit \(bit) state \(state)") {
          _ = try MapEntry.decode(word0: 1 << bit | state << 48 | page, word1: 0)
        }
      }
    }
    for bit: UInt64 in 32...63 {
      expectFormatError(.invalidField, "word1 bit \(bit)") {
        _ = try MapEntry.decode(word0: 1 << 48 | 9, word1: 1 << bit)
      }
    }
    // Data without a page; unallocated/zero with a page or a checksum.
    expectFormatError(.invalidField) { _ = try MapEntry.decode(word0: 1 << 48, word1: 5) }
    expectFormatError(.invalidField) { _ = try MapEntry.decode(word0: 0 << 48 | 1, word1: 0) }
    expectFormatError(.invalidField) { _ = try MapEntry.decode(word0: 2 << 48 | 1, word1: 0) }
    expectFormatError(.invalidField) { _ = try MapEntry.decode(word0: 0, word1: 1) }
    expectFormatError(.invalidField) { _ = try MapEntry.decode(word0: 2 << 48, word1: 1) }
  }

  @Test func childRefCoding() throws {
    let refs: [ChildRef] = [
      .unallocated, .zero, ChildRef(page: 1, checksum: 0), ChildRef(page: Layout.maxPageAddress, checksum: .max),
    ]
    for ref in refs {
      #expect(try ChildRef.decode(word0: ref.words.0, word1: ref.words.1) == ref)
      var w = ByteWriter()
      ref.encode(into: &w)
      #expect(w.bytes == le(ref.words.0) + le(ref.words.1))
      let decoded = try w.bytes.withUnsafeBytes { buf -> ChildRef in
        var r = ByteReader(buf, structure: "child")
        return try ChildRef.decode(&r)
      }
      #expect(decoded == ref)
    }
    #expect(ChildRef.unallocated.words == (0, 0))
    #expect(ChildRef.zero.words == (0, 1 << 32))
    #expect(ChildRef(page: 77, checksum: 0xAABB_CCDD).words == (77, 0xAABB_CCDD))
    #expect(ChildRef.zero.isNull && ChildRef.unallocated.isNull)
    // Page beyond 48 bits; reserved flag bits 33-63; zero flag on a stored node; null with a checksum.
    expectFormatError(.invalidField) { _ = try ChildRef.decode(word0: Layout.maxPageAddress + 1, word1: 0) }
    for bit: UInt64 in 33...63 {
      expectFormatError(.invalidField, "bit \(bit)") { _ = try ChildRef.decode(word0: 5, word1: 1 << bit) }
      expectFormatError(.invalidField, "bit \(bit)") { _ = try ChildRef.decode(word0: 0, word1: 1 << bit) }
    }
    expectFormatError(.invalidField) { _ = try ChildRef.decode(word0: 5, word1: 1 << 32) }
    expectFormatError(.invalidField) { _ = try ChildRef.decode(word0: 0, word1: 1) }
    expectFormatError(.invalidField) { _ = try ChildRef.decode(word0: 0, word1: 1 << 32 | 1) }
    expectFormatError(.truncated) {
      try [UInt8](repeating: 0, count: 15).withUnsafeBytes {
        var r = ByteReader($0, structure: "child")
        _ = try ChildRef.decode(&r)
      }
    }
  }

  @Test func pageRefCoding() throws {
    var w = ByteWriter()
    PageRef(page: Layout.maxPageAddress, checksum: 0x0102_0304).encode(into: &w)
    #expect(w.bytes == le(Layout.maxPageAddress) + le(UInt32(0x0102_0304)) + le(UInt32(0)))
    let decoded = try w.bytes.withUnsafeBytes { buf -> PageRef in
      var r = ByteReader(buf, structure: "ref")
      return try PageRef.decode(&r)
    }
    #expect(decoded == PageRef(page: Layout.maxPageAddress, checksum: 0x0102_0304))
    let bad = le(Layout.maxPageAddress + 1) + le(UInt32(0)) + le(UInt32(0))
    expectFormatError(.invalidField) {
      try bad.withUnsafeBytes {
        var r = ByteReader($0, structure: "ref")
        _ = try PageRef.decode(&r)
      }
    }
    #expect(PageRef.null.isNull)
    #expect(!PageRef(page: 1, checksum: 0).isNull)
  }

  @Test func usagePagesRoundTrip() throws {
    var rng = SeededRandom(seed: 4)
    let all = (0..<700).map { _ in
      let written = UInt32(truncatingIfNeeded: rng.next() % 2049)
      return SegmentUsage(
        livePages: UInt32(rng.next() % UInt64(written + 1)), writtenPages: written, lastSeq: rng.next())
    }
    var decoded: [SegmentUsage] = []
    for start in stride(from: 0, to: all.count, by: SegmentUsage.perPage) {
      let slice = all[start..<min(start + SegmentUsage.perPage, all.count)]
      let page = SegmentUsage.encodePage(slice)
      #expect(page.count == 4096)
      #expect(page[(16 * slice.count)...].allSatisfy { $0 == 0 })
      decoded += try page.withUnsafeBytes { try SegmentUsage.decodePage($0, count: slice.count) }
    }
    #expect(decoded == all)
    #expect(SegmentUsage.perPage == 256)
    let page = SegmentUsage.encodePage(all[0..<1])
    #expect(Array(page[0..<16]) == le(all[0].livePages) + le(all[0].writtenPages) + le(all[0].lastSeq))
    #expect(try page.withUnsafeBytes { try SegmentUsage.decodePage($0, count: 0) } == [])
  }

  @Test func usagePageRejections() throws {
    // Live pages may exceed the fill: an open segment records a fill of 0.
    let open = SegmentUsage(livePages: 5, writtenPages: 0, lastSeq: 0)
    #expect(
      try SegmentUsage.encodePage([open][...]).withUnsafeBytes { try SegmentUsage.decodePage($0, count: 1) } == [open])
    let valid = SegmentUsage.encodePage([SegmentUsage(livePages: 5, writtenPages: 5, lastSeq: 1)][...])
    expectFormatError(.truncated) {
      _ = try Array(valid[0..<20]).withUnsafeBytes { try SegmentUsage.decodePage($0, count: 2) }
    }
  }

  func catalogEntries(_ n: Int, seed: UInt64) -> [SnapshotEntry] {
    var rng = SeededRandom(seed: seed)
    let alphabet = Array("abcxyz-_. éü日本📸")
    var seq: UInt64 = 10
    return (0..<n).map { i in
      seq += 1 + rng.next() % 1000
      var name = ""
      let target = i % 3 == 0 ? 255 : Int(1 + rng.next() % 255)
      while name.utf8.count < target {
        let c = alphabet[Int(rng.next() % UInt64(alphabet.count))]
        if name.utf8.count + String(c).utf8.count > target { break }
        name.append(c)
      }
      if name.isEmpty { name = "n" }
      return SnapshotEntry(
        seq: seq, timestampNanoseconds: rng.next(), baseCheckpoint: 256 + rng.next() % 100_000, name: name)
    }
  }

  @Test func catalogPagesRoundTrip() throws {
    #expect(SnapshotEntry.encodePages([]).isEmpty)
    for (n, seed) in [(1, UInt64(5)), (14, 6), (15, 7), (300, 8)] {
      let entries = catalogEntries(n, seed: seed)
      let pages = SnapshotEntry.encodePages(entries)
      var decoded: [SnapshotEntry] = []
      for page in pages {
        #expect(page.count == 4096)
        let onPage = try page.withUnsafeBytes { try SnapshotEntry.decodePage($0) }
        #expect(!onPage.isEmpty)
        #expect(Int(read32(page, 0)) == onPage.count)
        #expect(read32(page, 4) == 0)
        decoded += onPage
      }
      #expect(decoded == entries)
      if n == 300 { #expect(pages.count > 10) }
    }
    // Fixed-size names pack exactly: 255-byte names take 288 bytes, 14 per page.
    let big = (0..<29).map {
      SnapshotEntry(
        seq: UInt64($0 + 1), timestampNanoseconds: 0, baseCheckpoint: 256, name: String(repeating: "q", count: 255))
    }
    #expect(SnapshotEntry.encodePages(big).count == 3)
    // One-byte names take 32 bytes, 127 per page.
    let small = (0..<128).map {
      SnapshotEntry(seq: UInt64($0 + 1), timestampNanoseconds: 0, baseCheckpoint: 256, name: "s")
    }
    let smallPages = SnapshotEntry.encodePages(small)
    #expect(smallPages.count == 2)
    #expect(read32(smallPages[0], 0) == 127)
  }

  @Test func catalogEntryLayout() {
    let e = SnapshotEntry(seq: 0x11, timestampNanoseconds: 0x22, baseCheckpoint: 0x33, name: "abc")
    let page = SnapshotEntry.encodePages([e])[0]
    #expect(
      Array(page[0..<40]) == le(UInt32(1)) + le(UInt32(0)) + le(UInt64(0x11)) + le(UInt64(0x22)) + le(UInt64(0x33))
        + le(UInt16(3)) + Array("abc".utf8) + [0, 0, 0])
    #expect(page[40...].allSatisfy { $0 == 0 })
  }

  @Test func catalogPageRejections() {
    let entries = catalogEntries(5, seed: 9)
    let good = SnapshotEntry.encodePages(entries)[0]
    func rejects(_ kind: FormatError.Kind, _ page: [UInt8], sourceLocation: SourceLocation = #_sourceLocation) {
      expectFormatError(kind, sourceLocation: sourceLocation) {
        _ = try page.withUnsafeBytes { try SnapshotEntry.decodePage($0) }
      }
    }
    var b = good
    patch(&b, 0, UInt32(0))
    rejects(.invalidField, b)
    patch(&b, 0, UInt32(129))
    rejects(.invalidField, b)
    patch(&b, 0, UInt32.max)
    rejects(.invalidField, b)
    // More entries claimed than present: the zero padding decodes as an empty name.
    patch(&b, 0, UInt32(6))
    rejects(.invalidField, b)
    // Out of order / duplicate seq.
    let two = SnapshotEntry.encodePages([
      SnapshotEntry(seq: 5, timestampNanoseconds: 0, baseCheckpoint: 256, name: "a"),
      SnapshotEntry(seq: 6, timestampNanoseconds: 0, baseCheckpoint: 256, name: "b"),
    ])[0]
    b = two
    patch(&b, 40, UInt64(5))
    rejects(.invalidField, b)
    patch(&b, 40, UInt64(4))
    rejects(.invalidField, b)
    // Bad names: '/', control character, invalid UTF-8, zero length.
    for (offset, byte) in [(34, UInt8(0x2F)), (34, 0x0A), (34, 0xFF), (32, 0)] {
      b = two
      b[offset] = byte
      rejects(.invalidField, b)
    }
    // Truncated page.
    rejects(.truncated, Array(two[0..<4]))
    rejects(.truncated, Array(two[0..<40]))
    rejects(.truncated, Array(two[0..<60]))
  }

  @Test func pageChecksumIsSeededByKindLevelAndKey() {
    var rng = SeededRandom(seed: 10)
    let page = rng.bytes(4096)
    let base = page.withUnsafeBytes { pageChecksum(kind: .mapNode, level: 1, key: 7, $0) }
    let seed = CRC32C.checksum([1, 1] + le(UInt64(7)))
    #expect(base == CRC32C.checksum(page, continuing: seed))
    #expect(base == CRC32C.checksum([1, 1] + le(UInt64(7)) + page))
    #expect(base != CRC32C.checksum(page))
    var seen: Set<UInt32> = [base]
    for (kind, level, key) in [
      (PageKind.usage, UInt8(1), UInt64(7)), (.catalog, 1, 7), (.mapNode, 0, 7), (.mapNode, 2, 7),
      (.mapNode, 1, 6), (.mapNode, 1, 8), (.mapNode, 1, 7 | 1 << 63), (.mapNode, 1, 7 << 8),
    ] {
      let c = page.withUnsafeBytes { pageChecksum(kind: kind, level: level, key: key, $0) }
      #expect(!seen.contains(c), "\(kind) \(level) \(key)")
      seen.insert(c)
    }
    // And the content still matters.
    var other = page
    other[4095] ^= 1
    #expect(other.withUnsafeBytes { pageChecksum(kind: .mapNode, level: 1, key: 7, $0) } != base)
  }
}

// MARK: - Layout

@Suite struct LayoutTests {
  @Test func mapDepth() {
    #expect(Layout.mapDepth(forBlocks: 0) == 1)
    #expect(Layout.mapDepth(forBlocks: 1) == 1)
    #expect(Layout.mapDepth(forBlocks: 256) == 1)
    #expect(Layout.mapDepth(forBlocks: 257) == 2)
    #expect(Layout.mapDepth(forBlocks: 65536) == 2)
    #expect(Layout.mapDepth(forBlocks: 65537) == 3)
    #expect(Layout.mapDepth(forBlocks: 1 << 24) == 3)
    #expect(Layout.mapDepth(forBlocks: 1 << 32) == 4)  // 16 TiB of 4 KiB blocks
    #expect(Layout.mapDepth(forBlocks: (1 << 32) + 1) == 5)
    #expect(Layout.mapDepth(forBlocks: Layout.maxVirtualSize / 4096) == 6)
    #expect(Layout.mapDepth(forBlocks: 1 << 56) == 7)
    #expect(Layout.mapDepth(forBlocks: UInt64.max) == 8)
  }

  @Test func segmentSizes() {
    for shift in 20...30 { #expect(Layout.isValidSegmentSize(1 << shift)) }
    for size in [0, 1, 4096, 1 << 19, 3 << 20, (1 << 20) + 4096, 1 << 31, Int.max] {
      #expect(!Layout.isValidSegmentSize(size), "\(size)")
    }
  }

  @Test func constants() {
    #expect(Layout.pageSize == 4096)
    #expect(Layout.superblockOffsets == [0, 4096])
    #expect(Layout.defaultDataOffset == 1 << 20)
    #expect(Layout.defaultSegmentSize == 8 << 20)
    #expect(Layout.allowedBlockSizes == (0...4).map { 4096 << $0 })
    #expect(Layout.mapFanout * Layout.mapEntrySize == Layout.pageSize)
    #expect(Layout.maxVirtualSize == 1 << 56)
    #expect(Layout.maxPageAddress == (1 << 48) - 1)
    #expect(Layout.maxRecordHeaderLength == 1 << 20)
  }
}

// MARK: - Byte coding

@Suite struct ByteCodingTests {
  @Test func readerNeverReadsPastTheEnd() throws {
    let bytes: [UInt8] = [1, 2, 3, 4, 5, 6, 7, 8, 9]
    try bytes.withUnsafeBytes { buf in
      var r = ByteReader(buf, structure: "t")
      #expect(try r.u64() == 0x0807_0605_0403_0201)
      #expect(r.remaining == 1)
      expectFormatError(.truncated) { _ = try r.u16() }
      #expect(r.offset == 8)
      expectFormatError(.truncated) { _ = try r.raw(2) }
      expectFormatError(.truncated) { _ = try r.raw(-1) }
      expectFormatError(.truncated) { try r.skip(Int.max) }
      expectFormatError(.truncated) { try r.seek(to: 10) }
      expectFormatError(.truncated) { try r.seek(to: -1) }
      try r.seek(to: 9)
      #expect(r.remaining == 0)
      expectFormatError(.truncated) { _ = try r.u8() }
    }
  }

  @Test func writerIsLittleEndian() {
    var w = ByteWriter()
    w.u16(0x0102)
    w.u32(0x0304_0506)
    w.u64(0x0708_090A_0B0C_0D0E)
    #expect(w.bytes == [0x02, 0x01, 0x06, 0x05, 0x04, 0x03, 0x0E, 0x0D, 0x0C, 0x0B, 0x0A, 0x09, 0x08, 0x07])
    w.align(to: 8)
    #expect(w.count == 16)
    w.patchU32(0xAABB_CCDD, at: 0)
    #expect(Array(w.bytes[0..<4]) == [0xDD, 0xCC, 0xBB, 0xAA])
  }
}

// MARK: - Hostile input

@Suite struct FuzzTests {
  static let iterations = 20_000

  /// Pure random buffers of random length: both decoders must throw FormatError or succeed.
  @Test func randomBuffersOnlyThrowFormatErrors() {
    var rng = SeededRandom(seed: 0x5742_4154_4100_0001)
    for i in 0..<Self.iterations {
      let length = Int(rng.next() % 3) == 0 ? Int(rng.next() % 129) : Int(rng.next() % 9000)
      var b = rng.bytes(length)
      // Give a third of them the right magic so decoding gets further.
      if i % 3 == 0 && b.count >= 8 { b.replaceSubrange(0..<8, with: Superblock.magic) }
      if i % 3 == 1 && b.count >= 4 { b.replaceSubrange(0..<4, with: le(RecordHeader.magic)) }
      _ = expectOnlyFormatErrors("superblock #\(i)") { _ = try decodeSuperblock(b) }
      for blockSize in [4096, 65536] {
        _ = expectOnlyFormatErrors("record #\(i)") { _ = try decodeRecord(b, blockSize: blockSize) }
      }
      _ = expectOnlyFormatErrors("catalog #\(i)") { _ = try b.withUnsafeBytes { try SnapshotEntry.decodePage($0) } }
      _ = expectOnlyFormatErrors("usage #\(i)") {
        _ = try b.withUnsafeBytes { try SegmentUsage.decodePage($0, count: Int(rng.next() % 257)) }
      }
      if b.count >= 16 {
        _ = expectOnlyFormatErrors("map entry #\(i)") {
          _ = try MapEntry.decode(word0: read64(b, 0), word1: read64(b, 8))
        }
      }
    }
  }

  /// Superblocks with magic, version, length and checksum right and random (often boundary)
  /// field values: every validation path is reached.
  @Test func checksummedRandomSuperblocks() {
    var rng = SeededRandom(seed: 0x5342)
    var accepted = 0
    func pick64() -> UInt64 {
      switch rng.next() % 6 {
      case 0: 0
      case 1: .max
      case 2: rng.next()
      case 3: rng.next() >> (rng.next() % 64)
      case 4: (rng.next() % 4096) * 4096
      default: 256 + rng.next() % 100_000
      }
    }
    func pick32(_ valid: [Int]) -> UInt32 {
      rng.next() % 3 == 0 ? UInt32(truncatingIfNeeded: pick64()) : UInt32(valid[Int(rng.next() % UInt64(valid.count))])
    }
    for i in 0..<Self.iterations {
      var b = sampleSuperblock().encode() + rng.bytes(Int(rng.next() % 2) * 3968)
      patch(&b, 40, rng.next())
      patch(&b, 64, pick32(Layout.allowedBlockSizes))
      patch(&b, 68, pick32((20...30).map { 1 << $0 }))
      patch(&b, 72, rng.next() % 2 == 0 ? UInt64(1 << 20) : pick64())
      patch(&b, 80, pick64())
      patch(&b, 88, pick64())
      if rng.next() % 4 == 0 { patch(&b, 12, UInt32(truncatingIfNeeded: 128 + 8 * (rng.next() % 600))) }
      if rng.next() % 8 == 0 { b[Int(rng.next() % 16)] ^= UInt8(truncatingIfNeeded: rng.next() | 1) }
      fixSuperblockChecksum(&b)
      if expectOnlyFormatErrors("superblock #\(i)", { _ = try decodeSuperblock(b) }) { accepted += 1 }
    }
    #expect(accepted > 0)
    #expect(accepted < Self.iterations)
  }

  /// Valid records mutated in a few places (whole fields or bytes) with the checksum fixed up,
  /// so the operation decoders see hostile values.
  @Test func checksummedMutatedRecords() {
    var rng = SeededRandom(seed: 0x5245_4344)
    var templates: [[UInt8]] = everyOp.map { encodeRecord([$0], seq: 9).bytes }
    templates.append(encodeRecord(everyOp.filter { $0.type != .seal }).bytes)
    templates.append(encodeRecord([.checkpoint(sampleCheckpoint(segments: 2, catalogPages: 0))]).bytes)
    templates.append(
      encodeRecord([.write(firstBlock: 0, checksums: [1, 2, 3, 4, 5]), .snapshot(name: "x", baseCheckpoint: 256)]).bytes
    )
    var accepted = 0
    var rejected = 0
    for i in 0..<Self.iterations {
      var b = templates[Int(rng.next() % UInt64(templates.count))]
      let length = Int(read32(b, 8))
      for _ in 0..<(1 + rng.next() % 4) {
        // Mutate past the magic and version most of the time, anywhere sometimes.
        let lowest = rng.next() % 10 == 0 ? 0 : 8
        let at = lowest + Int(rng.next() % UInt64(length - lowest))
        switch rng.next() % 4 {
        case 0: b[at] ^= UInt8(truncatingIfNeeded: rng.next() | 1)
        case 1:
          let aligned = at & ~7
          if aligned + 8 <= b.count {
            patch(&b, aligned, [0, .max, rng.next(), UInt64(Int64.max), 1 << 48, 1 << 44][Int(rng.next() % 6)])
          }
        case 2:
          let aligned = at & ~3
          if aligned + 4 <= b.count {
            patch(
              &b, aligned, [0, UInt32.max, UInt32(truncatingIfNeeded: rng.next()), 1, 8, 4096][Int(rng.next() % 6)])
          }
        default: b[at] = UInt8(truncatingIfNeeded: rng.next())
        }
      }
      if rng.next() % 16 == 0 { b = Array(b[0..<Int(rng.next() % UInt64(b.count + 1))]) }
      if b.count >= 48 { fixRecordChecksum(&b) }
      let ok = expectOnlyFormatErrors("record #\(i)") {
        _ = try decodeRecord(b, blockSize: [4096, 8192, 65536][i % 3])
      }
      if ok { accepted += 1 } else { rejected += 1 }
    }
    #expect(accepted > 0)
    #expect(rejected > 0)
  }
}

// MARK: - The worked example of format-spec/README.md, section 14

@Suite struct SpecExampleTests {
  static let imageID: [UInt8] = [
    0x5f, 0x0e, 0x2b, 0x3c, 0x8a, 0x11, 0x4d, 0x6e, 0x9b, 0x27, 0xc4, 0xd1, 0xe0, 0x73, 0xa5, 0xb8,
  ]
  static let clock: UInt64 = 1_767_225_600_000_000_000

  @Test func genesisMatchesTheSpecification() throws {
    #expect(Self.clock == 0x1886_7251_edfa_0000)
    #expect(CRC32C.checksum(Self.imageID) == 0x787d_5b88)
    #expect(Layout.mapDepth(forBlocks: (1 << 30) / 4096) == 3)

    let usage = SegmentUsage.encodePage([SegmentUsage()][...])
    #expect(usage == [UInt8](repeating: 0, count: 4096))
    let usageChecksum = usage.withUnsafeBytes { pageChecksum(kind: .usage, level: 0, key: 0, $0) }
    #expect(usageChecksum == 0x3feb_b63c)

    let first = LogRecord.encodeHeaderArea(
      ops: [.pages([PageDescriptor(kind: .usage, level: 0, checksum: usageChecksum, key: 0)])], seq: 1,
      previousChecksum: CRC32C.checksum(Self.imageID), timestampNanoseconds: Self.clock, flags: [], blockSize: 4096)
    #expect(first.header.headerLength == 96)
    #expect(first.header.payloadPages == 1)
    #expect(first.header.checksum == 0x43e9_9847)

    let body = CheckpointBody(
      virtualSize: 1 << 30, blockSize: 4096, mapDepth: 3, root: .unallocated, dataBlocks: 0, previousCheckpoint: 0,
      segmentCount: 1, snapshotCount: 0, usagePages: [PageRef(page: 257, checksum: usageChecksum)], catalogPages: [])
    let second = LogRecord.encodeHeaderArea(
      ops: [.checkpoint(body)], seq: 2, previousChecksum: first.header.checksum, timestampNanoseconds: Self.clock,
      flags: [], blockSize: 4096)
    #expect(second.header.headerLength == 160)
    #expect(second.header.checksum == 0xcbc3_be83)
    #expect(Array(second.bytes[0x90..<0xA0]) == [0x01, 0x01, 0, 0, 0, 0, 0, 0, 0x3c, 0xb6, 0xeb, 0x3f, 0, 0, 0, 0])

    var sb = Superblock(
      generation: 0, imageID: Self.imageID, blockSize: 4096, segmentSize: 8 << 20, dataOffset: 1 << 20,
      checkpointPage: 258, checkpointSeq: 2, checkpointChecksum: second.header.checksum, createdNanoseconds: Self.clock)
    let slot0 = sb.encode()
    sb.generation = 1
    let slot1 = sb.encode()
    #expect(read32(slot0, 124) == 0xb7c8_86ae)
    #expect(read32(slot1, 124) == 0xb0dd_48fd)
    #expect(
      Array(slot0[0x40..<0x70]) == [
        0x00, 0x10, 0x00, 0x00, 0x00, 0x00, 0x80, 0x00, 0x00, 0x00, 0x10, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x02, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x02, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x83, 0xbe, 0xc3, 0xcb, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0xfa, 0xed, 0x51, 0x72, 0x86, 0x18,
      ])
    // Both records decode and chain.
    let a = try decodeRecord(first.bytes)
    let b = try decodeRecord(second.bytes)
    #expect(b.header.seq == a.header.nextSeq)
    #expect(b.header.previousChecksum == a.header.checksum)
    #expect(try decodeSuperblock(slot1).generation == 1)
  }
}

/// The accelerated CRC-32C (three interleaved lanes) against a bit-at-a-time reference, over
/// lengths around the lane boundaries and with chaining.
@Test func crc32cMatchesBitwiseReference() {
  func reference(_ bytes: [UInt8], _ start: UInt32 = 0) -> UInt32 {
    var crc = ~start
    for b in bytes {
      crc ^= UInt32(b)
      for _ in 0..<8 { crc = crc & 1 != 0 ? (crc >> 1) ^ 0x82F6_3B78 : crc >> 1 }
    }
    return ~crc
  }
  var state: UInt64 = 42
  func next() -> UInt8 {
    state = state &* 6_364_136_223_846_793_005 &+ 1_442_695_040_888_963_407
    return UInt8(truncatingIfNeeded: state >> 33)
  }
  for length in [0, 1, 7, 8, 4079, 4080, 4081, 4096, 8160, 8161, 12_345, 65_536] {
    let bytes = (0..<length).map { _ in next() }
    #expect(CRC32C.checksum(bytes) == reference(bytes), "length \(length)")
    let split = length / 3
    let chained = CRC32C.checksum(Array(bytes[split...]), continuing: CRC32C.checksum(Array(bytes[..<split])))
    #expect(chained == reference(bytes), "chained, length \(length)")
  }
}
