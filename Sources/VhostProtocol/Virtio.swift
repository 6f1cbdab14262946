/// virtio constants and virtio-blk structures (virtio 1.2 spec, sections 2.7 and 5.2).

public enum VirtioFeature {
  public static let indirectDesc: UInt64 = 1 << 28
  public static let eventIdx: UInt64 = 1 << 29
  /// VHOST_USER_F_PROTOCOL_FEATURES: the vhost-user protocol feature negotiation itself.
  public static let protocolFeatures: UInt64 = 1 << 30
  public static let version1: UInt64 = 1 << 32
  public static let ringPacked: UInt64 = 1 << 34
}

public enum VirtioBlkFeature {
  public static let sizeMax: UInt64 = 1 << 1
  public static let segMax: UInt64 = 1 << 2
  public static let readOnly: UInt64 = 1 << 5
  public static let blkSize: UInt64 = 1 << 6
  public static let flush: UInt64 = 1 << 9
  public static let topology: UInt64 = 1 << 10
  public static let configWCE: UInt64 = 1 << 11
  public static let mq: UInt64 = 1 << 12
  public static let discard: UInt64 = 1 << 13
  public static let writeZeroes: UInt64 = 1 << 14
}

public enum VirtioBlkRequestType: UInt32, Sendable {
  case read = 0
  case write = 1
  case flush = 4
  case getID = 8
  case discard = 11
  case writeZeroes = 13
}

public enum VirtioBlkStatus: UInt8, Sendable {
  case ok = 0
  case ioError = 1
  case unsupported = 2
}

/// Virtqueue descriptor flags (split and packed rings).
public enum VirtqDescFlag {
  public static let next: UInt16 = 1
  public static let write: UInt16 = 2
  public static let indirect: UInt16 = 4
  /// Packed ring (virtio 1.2, 2.8): a descriptor is available when its AVAIL bit equals the
  /// driver's wrap counter and its USED bit does not; used when both equal the device's.
  public static let packedAvail: UInt16 = 1 << 7
  public static let packedUsed: UInt16 = 1 << 15
}

/// Packed-ring event suppression flags (virtio 1.2, 2.8.10).
public enum VirtqEventFlag {
  public static let enable: UInt16 = 0
  public static let disable: UInt16 = 1
  /// Notify when the ring passes the descriptor offset in `off_wrap` (with EVENT_IDX).
  public static let desc: UInt16 = 2
}

/// The virtio-blk configuration space (60 bytes, little-endian).
public struct VirtioBlkConfig: Equatable, Sendable {
  public static let size = 60
  public var capacitySectors: UInt64
  public var sizeMax: UInt32
  public var segMax: UInt32
  public var blkSize: UInt32
  public var physicalBlockExp: UInt8
  public var minIOSize: UInt16
  public var optIOSize: UInt32
  public var writeback: UInt8
  public var numQueues: UInt16
  public var maxDiscardSectors: UInt32
  public var maxDiscardSeg: UInt32
  public var discardSectorAlignment: UInt32
  public var maxWriteZeroesSectors: UInt32
  public var maxWriteZeroesSeg: UInt32
  public var writeZeroesMayUnmap: UInt8

  public init(
    capacitySectors: UInt64, sizeMax: UInt32, segMax: UInt32, blkSize: UInt32, physicalBlockExp: UInt8 = 0,
    minIOSize: UInt16 = 0, optIOSize: UInt32 = 0, writeback: UInt8 = 1, numQueues: UInt16, maxDiscardSectors: UInt32,
    maxDiscardSeg: UInt32, discardSectorAlignment: UInt32, maxWriteZeroesSectors: UInt32, maxWriteZeroesSeg: UInt32,
    writeZeroesMayUnmap: UInt8
  ) {
    self.capacitySectors = capacitySectors
    self.sizeMax = sizeMax
    self.segMax = segMax
    self.blkSize = blkSize
    self.physicalBlockExp = physicalBlockExp
    self.minIOSize = minIOSize
    self.optIOSize = optIOSize
    self.writeback = writeback
    self.numQueues = numQueues
    self.maxDiscardSectors = maxDiscardSectors
    self.maxDiscardSeg = maxDiscardSeg
    self.discardSectorAlignment = discardSectorAlignment
    self.maxWriteZeroesSectors = maxWriteZeroesSectors
    self.maxWriteZeroesSeg = maxWriteZeroesSeg
    self.writeZeroesMayUnmap = writeZeroesMayUnmap
  }

  public func encode() -> [UInt8] {
    var w = PayloadWriter()
    w.u64(capacitySectors)  // 0
    w.u32(sizeMax)  // 8
    w.u32(segMax)  // 12
    w.u16(0)  // 16 geometry.cylinders
    w.u8(0)  // 18 geometry.heads
    w.u8(0)  // 19 geometry.sectors
    w.u32(blkSize)  // 20
    w.u8(physicalBlockExp)  // 24
    w.u8(0)  // 25 alignment_offset
    w.u16(minIOSize)  // 26
    w.u32(optIOSize)  // 28
    w.u8(writeback)  // 32
    w.u8(0)  // 33
    w.u16(numQueues)  // 34
    w.u32(maxDiscardSectors)  // 36
    w.u32(maxDiscardSeg)  // 40
    w.u32(discardSectorAlignment)  // 44
    w.u32(maxWriteZeroesSectors)  // 48
    w.u32(maxWriteZeroesSeg)  // 52
    w.u8(writeZeroesMayUnmap)  // 56
    w.raw([0, 0, 0])  // 57
    precondition(w.bytes.count == Self.size)
    return w.bytes
  }

  public static func decode(_ p: [UInt8]) throws(VhostError) -> VirtioBlkConfig {
    guard p.count >= size else { throw .truncated("virtio-blk config", p.count) }
    return p.withUnsafeBytes { b in
      func at<T: FixedWidthInteger>(_ o: Int, _: T.Type) -> T {
        T(littleEndian: b.loadUnaligned(fromByteOffset: o, as: T.self))
      }
      return VirtioBlkConfig(
        capacitySectors: at(0, UInt64.self), sizeMax: at(8, UInt32.self), segMax: at(12, UInt32.self),
        blkSize: at(20, UInt32.self), physicalBlockExp: at(24, UInt8.self), minIOSize: at(26, UInt16.self),
        optIOSize: at(28, UInt32.self), writeback: at(32, UInt8.self), numQueues: at(34, UInt16.self),
        maxDiscardSectors: at(36, UInt32.self), maxDiscardSeg: at(40, UInt32.self),
        discardSectorAlignment: at(44, UInt32.self), maxWriteZeroesSectors: at(48, UInt32.self),
        maxWriteZeroesSeg: at(52, UInt32.self), writeZeroesMayUnmap: at(56, UInt8.self))
    }
  }
}

/// The 16-byte header that starts every virtio-blk request.
public struct VirtioBlkRequestHeader: Equatable, Sendable {
  public static let size = 16
  public var type: UInt32
  public var sector: UInt64
  public init(type: UInt32, sector: UInt64) {
    self.type = type
    self.sector = sector
  }
}

/// One segment of a DISCARD or WRITE_ZEROES request.
public struct VirtioBlkDiscardSegment: Equatable, Sendable {
  public static let size = 16
  public static let unmapFlag: UInt32 = 1
  public var sector: UInt64
  public var numSectors: UInt32
  public var flags: UInt32
  public init(sector: UInt64, numSectors: UInt32, flags: UInt32) {
    self.sector = sector
    self.numSectors = numSectors
    self.flags = flags
  }
}
