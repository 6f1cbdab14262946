import VhostProtocol

/// A virtio-blk request as the driver builds it (virtio 1.2 section 5.2.6).
public enum BlockRequest: Sendable, Equatable {
  /// VIRTIO_BLK_T_IN: `length` bytes from `sector` (512-byte units) into a device-writable buffer.
  case read(sector: UInt64, length: Int)
  /// VIRTIO_BLK_T_OUT: `data` to `sector` from a device-readable buffer.
  case write(sector: UInt64, data: [UInt8])
  /// VIRTIO_BLK_T_FLUSH: header and status only.
  case flush
  /// VIRTIO_BLK_T_GET_ID: a 20-byte device-writable buffer for the serial.
  case getID
  /// VIRTIO_BLK_T_DISCARD with its segments (flags as given).
  case discard([VirtioBlkDiscardSegment])
  /// VIRTIO_BLK_T_WRITE_ZEROES; `unmap` sets VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP on every segment.
  case writeZeroes([VirtioBlkDiscardSegment], unmap: Bool)
  /// Any type with any device-readable payload and any device-writable length (tests of
  /// unsupported types, odd lengths, ...). `writableLength` excludes the status byte.
  case custom(type: UInt32, sector: UInt64, readable: [UInt8], writableLength: Int)

  public var type: UInt32 {
    switch self {
    case .read: VirtioBlkRequestType.read.rawValue
    case .write: VirtioBlkRequestType.write.rawValue
    case .flush: VirtioBlkRequestType.flush.rawValue
    case .getID: VirtioBlkRequestType.getID.rawValue
    case .discard: VirtioBlkRequestType.discard.rawValue
    case .writeZeroes: VirtioBlkRequestType.writeZeroes.rawValue
    case .custom(let t, _, _, _): t
    }
  }

  var sector: UInt64 {
    switch self {
    case .read(let s, _), .write(let s, _), .custom(_, let s, _, _): s
    default: 0
    }
  }

  /// The device-readable payload after the header.
  var readablePayload: [UInt8] {
    switch self {
    case .write(_, let d): d
    case .discard(let segs): encodeSegments(segs, forceUnmap: false)
    case .writeZeroes(let segs, let unmap): encodeSegments(segs, forceUnmap: unmap)
    case .custom(_, _, let r, _): r
    default: []
    }
  }

  /// Length of the device-writable buffer before the status byte.
  var writableLength: Int {
    switch self {
    case .read(_, let n): n
    case .getID: 20
    case .custom(_, _, _, let n): n
    default: 0
    }
  }
}

/// The 16-byte little-endian wire form of discard / write-zeroes segments.
public func encodeSegments(_ segments: [VirtioBlkDiscardSegment], forceUnmap: Bool) -> [UInt8] {
  var w = PayloadWriter()
  for s in segments {
    w.u64(s.sector)
    w.u32(s.numSectors)
    w.u32(forceUnmap ? s.flags | VirtioBlkDiscardSegment.unmapFlag : s.flags)
  }
  return w.bytes
}

/// One used-ring entry, matched to the request that produced it when it belongs to one.
public struct VhostCompletion: Sendable, Equatable {
  public var queue: Int
  /// The id `submit` returned; nil for a head placed with the raw API (or one the back-end
  /// returned that no request owns).
  public var requestID: UInt64?
  /// The used element's id: the chain head (split ring) or the buffer id (packed ring).
  public var head: UInt32
  /// The used element's len: bytes the device says it wrote into device-writable buffers.
  public var usedLength: UInt32
  /// The status byte (0xFF if the device never wrote it); nil for raw completions.
  public var status: UInt8?
  /// Read / GET_ID / custom device-writable data (empty when not requested or not copied).
  public var data: [UInt8]
  /// Nanoseconds from publication in the avail ring to being seen in the used ring.
  public var latencyNs: UInt64

  public var isOK: Bool { status == VirtioBlkStatus.ok.rawValue }
}
