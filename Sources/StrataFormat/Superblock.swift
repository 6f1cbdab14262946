/// The superblock: where to find the newest checkpoint, plus immutable image geometry.
///
/// Two copies live at byte 0 and byte 4096; each write goes to slot `generation % 2`, so a torn
/// superblock write always leaves the other slot intact.
public struct Superblock: Equatable, Sendable {
  /// 0x89 "STRATA" 0x0A: the high byte catches 7-bit transfers, the newline catches text mode.
  public static let magic: [UInt8] = [0x89, 0x53, 0x54, 0x52, 0x41, 0x54, 0x41, 0x0A]
  public static let version: UInt32 = 1
  public static let encodedLength = 128
  static let checksumOffset = 124

  public var features: FeatureSet
  public var generation: UInt64
  public var imageID: [UInt8]  // 16 bytes
  public var blockSize: UInt32
  public var segmentSize: UInt32
  public var dataOffset: UInt64
  /// Page address of the record holding the newest checkpoint this superblock vouches for.
  public var checkpointPage: UInt64
  public var checkpointSeq: UInt64
  /// Header checksum of that record: a misdirected or stale checkpoint is rejected.
  public var checkpointChecksum: UInt32
  public var createdNanoseconds: UInt64

  public init(
    features: FeatureSet = FeatureSet(), generation: UInt64, imageID: [UInt8], blockSize: UInt32,
    segmentSize: UInt32, dataOffset: UInt64, checkpointPage: UInt64, checkpointSeq: UInt64,
    checkpointChecksum: UInt32, createdNanoseconds: UInt64
  ) {
    precondition(imageID.count == 16)
    self.features = features
    self.generation = generation
    self.imageID = imageID
    self.blockSize = blockSize
    self.segmentSize = segmentSize
    self.dataOffset = dataOffset
    self.checkpointPage = checkpointPage
    self.checkpointSeq = checkpointSeq
    self.checkpointChecksum = checkpointChecksum
    self.createdNanoseconds = createdNanoseconds
  }

  public func encode() -> [UInt8] {
    var w = ByteWriter(capacity: Self.encodedLength)
    w.raw(Self.magic)
    w.u32(Self.version)
    w.u32(UInt32(Self.encodedLength))
    w.u64(features.incompatible)
    w.u64(features.compatible)
    w.u64(features.autoclear)
    w.u64(generation)
    w.raw(imageID)
    w.u32(blockSize)
    w.u32(segmentSize)
    w.u64(dataOffset)
    w.u64(checkpointPage)
    w.u64(checkpointSeq)
    w.u32(checkpointChecksum)
    w.u32(0)
    w.u64(createdNanoseconds)
    w.zeros(Self.checksumOffset - w.count)
    w.u32(0)
    assert(w.count == Self.encodedLength)
    let crc = CRC32C.checksum(w.bytes)
    w.patchU32(crc, at: Self.checksumOffset)
    return w.bytes
  }

  /// True when `bytes` starts with the Strata magic, whatever else is wrong with it.
  public static func hasMagic(_ bytes: UnsafeRawBufferPointer) -> Bool {
    bytes.count >= magic.count && zip(bytes.prefix(magic.count), magic).allSatisfy { $0 == $1 }
  }

  public static func decode(_ bytes: UnsafeRawBufferPointer) throws -> Superblock {
    let name = "superblock"
    guard bytes.count >= encodedLength else {
      throw FormatError(.truncated, name, "\(bytes.count) bytes, need \(encodedLength)")
    }
    guard hasMagic(bytes) else { throw FormatError(.badMagic, name, "no Strata magic") }
    var r = ByteReader(bytes, structure: name, offset: magic.count)
    let version = try r.u32()
    guard version == Self.version else {
      throw FormatError(.unsupportedVersion, name, "format version \(version), this build reads \(Self.version)")
    }
    let length = Int(try r.u32())
    guard length >= encodedLength, length <= Layout.pageSize, length <= bytes.count, length % 8 == 0 else {
      throw FormatError(.invalidField, name, "header length \(length) is out of range")
    }
    var crcInput = Array(bytes[0..<length])
    for i in 0..<4 { crcInput[checksumOffset + i] = 0 }
    let stored = bytes.littleEndian(at: checksumOffset, as: UInt32.self)
    let actual = CRC32C.checksum(crcInput)
    guard stored == actual else {
      throw FormatError(.badChecksum, name, "checksum \(hex32(stored)), computed \(hex32(actual))")
    }
    let features = FeatureSet(incompatible: try r.u64(), compatible: try r.u64(), autoclear: try r.u64())
    let generation = try r.u64()
    let imageID = try r.raw(16)
    let blockSize = try r.u32()
    let segmentSize = try r.u32()
    let dataOffset = try r.u64()
    let checkpointPage = try r.u64()
    let checkpointSeq = try r.u64()
    let checkpointChecksum = try r.u32()
    _ = try r.u32()
    let created = try r.u64()
    guard Layout.allowedBlockSizes.contains(Int(blockSize)) else {
      throw FormatError(.invalidField, name, "block size \(blockSize) is not 4 KiB times a power of two up to 64 KiB")
    }
    guard Layout.isValidSegmentSize(Int(segmentSize)), Int(segmentSize) % Int(blockSize) == 0 else {
      throw FormatError(.invalidField, name, "segment size \(segmentSize) is not a power of two in 1 MiB...1 GiB")
    }
    guard dataOffset >= 2 * UInt64(Layout.pageSize), dataOffset % UInt64(Layout.pageSize) == 0 else {
      throw FormatError(.invalidField, name, "data offset \(dataOffset) is not page aligned past the superblocks")
    }
    guard checkpointPage <= Layout.maxPageAddress, checkpointPage * UInt64(Layout.pageSize) >= dataOffset else {
      throw FormatError(.invalidField, name, "checkpoint page \(checkpointPage) lies outside the segment area")
    }
    return Superblock(
      features: features, generation: generation, imageID: imageID, blockSize: blockSize,
      segmentSize: segmentSize, dataOffset: dataOffset, checkpointPage: checkpointPage,
      checkpointSeq: checkpointSeq, checkpointChecksum: checkpointChecksum, createdNanoseconds: created)
  }
}
