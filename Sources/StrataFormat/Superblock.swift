/// The superblock: where to find the newest checkpoint, plus immutable image geometry.
///
/// Two copies live at byte 0 and byte 4096; each write goes to slot `generation % 2`, so a torn
/// superblock write always leaves the other slot intact.
public struct Superblock: Equatable, Sendable {
  /// 0x89 "STRATA" 0x0A: the high byte catches 7-bit transfers, the newline catches text mode.
  public static let magic: [UInt8] = [0x89, 0x53, 0x54, 0x52, 0x41, 0x54, 0x41, 0x0A]
  public static let version: UInt32 = 1
  /// Bytes of a superblock without extension (`header_length` 128).
  public static let encodedLength = 128
  /// Bytes of a superblock with the CDP window extension (bytes 128..<144).
  public static let cdpWindowEncodedLength = 144
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
  /// The continuous-data-protection window (format-spec 4.1): stored in the extension after
  /// byte 128 with autoclear bit CDP_WINDOW, which `encode` sets exactly when this is non-nil.
  public var cdpWindow: CDPWindow?

  public init(
    features: FeatureSet = FeatureSet(), generation: UInt64, imageID: [UInt8], blockSize: UInt32,
    segmentSize: UInt32, dataOffset: UInt64, checkpointPage: UInt64, checkpointSeq: UInt64,
    checkpointChecksum: UInt32, createdNanoseconds: UInt64, cdpWindow: CDPWindow? = nil
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
    self.cdpWindow = cdpWindow
  }

  /// `header_length` of the encoded superblock: 128, or 144 with a CDP window.
  public var headerLength: Int { cdpWindow == nil ? Self.encodedLength : Self.cdpWindowEncodedLength }

  /// The `headerLength` bytes of the superblock. The CDP_WINDOW autoclear bit is written set
  /// exactly when there is a window, whatever `features` says.
  public func encode() -> [UInt8] {
    let length = headerLength
    var w = ByteWriter(capacity: length)
    w.raw(Self.magic)
    w.u32(Self.version)
    w.u32(UInt32(length))
    w.u64(features.incompatible)
    w.u64(features.compatible)
    var autoclear = features.autoclear & ~FeatureSet.cdpWindow
    if cdpWindow != nil { autoclear |= FeatureSet.cdpWindow }
    w.u64(autoclear)
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
    if let window = cdpWindow {
      w.u64(window.fields.nanoseconds)
      w.u64(window.fields.bytes)
    }
    assert(w.count == length)
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
    // The extension is read only under its autoclear bit: a writer that did not know the bit
    // cleared it, and whatever it left after byte 128 is stale.
    var window: CDPWindow?
    if features.autoclear & FeatureSet.cdpWindow != 0 {
      guard length >= cdpWindowEncodedLength else {
        throw FormatError(
          .invalidField, name, "the CDP window bit is set but header length \(length) has no room for the window")
      }
      let ns = bytes.littleEndian(at: encodedLength, as: UInt64.self)
      let size = bytes.littleEndian(at: encodedLength + 8, as: UInt64.self)
      guard let w = CDPWindow(nanoseconds: ns, bytes: size) else {
        throw FormatError(
          .invalidField, name, "CDP window of \(ns) ns and \(size) bytes: exactly one of them must be non-zero")
      }
      window = w
    }
    return Superblock(
      features: features, generation: generation, imageID: imageID, blockSize: blockSize,
      segmentSize: segmentSize, dataOffset: dataOffset, checkpointPage: checkpointPage,
      checkpointSeq: checkpointSeq, checkpointChecksum: checkpointChecksum, createdNanoseconds: created,
      cdpWindow: window)
  }
}
