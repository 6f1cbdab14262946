import StrataCore
import VhostProtocol

/// Executes virtio-blk requests (virtio 1.2, 5.2.6) against the image. The request's header,
/// data and status byte may be framed across descriptors in any way: readable bytes first
/// (header, then write data or discard segments), writable bytes last (read data, status).
struct BlockHandler: @unchecked Sendable {
  static let sectorSize: UInt64 = 512
  static let maxDiscardSegments = 32
  static let maxDiscardSectors: UInt32 = 1 << 22  // 2 GiB per segment

  let image: SharedImage
  let readOnly: Bool
  /// GET_ID reply: at most 20 bytes, zero-padded.
  let serial: [UInt8]

  /// Handles one chain; returns the bytes written into it (for the used ring), or nil when the
  /// chain has no place for a status byte (then nothing is written at all).
  func handle(_ segments: [GuestSegment]) -> UInt32? {
    guard let last = segments.last, last.writable, last.length >= 1 else { return nil }
    // Readable segments must all come before writable ones.
    var firstWritable = segments.count
    for (i, s) in segments.enumerated() where s.writable {
      firstWritable = i
      break
    }
    guard !segments[firstWritable...].contains(where: { !$0.writable }) else {
      return finish(last, .ioError, dataWritten: 0)
    }
    let readable = segments[..<firstWritable]
    var header = [UInt8](repeating: 0, count: VirtioBlkRequestHeader.size)
    guard gather(readable, from: 0, into: &header) else { return finish(last, .ioError, dataWritten: 0) }
    let type = header.withUnsafeBytes { UInt32(littleEndian: $0.loadUnaligned(as: UInt32.self)) }
    let sector = header.withUnsafeBytes { UInt64(littleEndian: $0.loadUnaligned(fromByteOffset: 8, as: UInt64.self)) }
    // Writable data: everything writable except the final status byte.
    var writableData: [GuestSegment] = segments[firstWritable...].map { $0 }
    writableData[writableData.count - 1].length -= 1
    let status: VirtioBlkStatus
    var written = 0
    switch VirtioBlkRequestType(rawValue: type) {
    case .read:
      let total = writableData.reduce(0) { $0 + $1.length }
      // Read data goes into device-writable buffers only: device-readable bytes after the
      // header are a buffer the device may not fill, so the read cannot succeed.
      if readable.reduce(0, { $0 + $1.length }) != VirtioBlkRequestHeader.size {
        status = .ioError
      } else {
        status = transfer(sector, total, writableData, isRead: true)
        if status == .ok { written = total }
      }
    case .write:
      let data = slices(readable, skipping: VirtioBlkRequestHeader.size)
      // Likewise write data comes from device-readable buffers only.
      if readOnly || writableData.contains(where: { $0.length > 0 }) {
        status = .ioError
      } else {
        status = transfer(sector, data.reduce(0) { $0 + $1.length }, data, isRead: false)
      }
    case .flush:
      status = run { try $0.flush() }
    case .getID:
      var n = 0
      for s in writableData where n < 20 {
        let k = min(s.length, 20 - n)
        for i in 0..<k {
          s.pointer.storeBytes(of: n + i < serial.count ? serial[n + i] : 0, toByteOffset: i, as: UInt8.self)
        }
        n += k
      }
      written = n
      status = .ok
    case .discard, .writeZeroes:
      status = readOnly ? .ioError : discard(readable, zeroes: type == VirtioBlkRequestType.writeZeroes.rawValue)
    case nil:
      status = .unsupported
    }
    return finish(last, status, dataWritten: written)
  }

  private func finish(_ last: GuestSegment, _ status: VirtioBlkStatus, dataWritten: Int) -> UInt32 {
    last.pointer.storeBytes(of: status.rawValue, toByteOffset: last.length - 1, as: UInt8.self)
    return UInt32(dataWritten + 1)
  }

  private func run(_ body: (StrataImage) throws -> Void) -> VirtioBlkStatus {
    do {
      try image.with(body)
      return .ok
    } catch {
      return .ioError
    }
  }

  /// Reads or writes `total` bytes at `sector` between the image and the segments.
  private func transfer(_ sector: UInt64, _ total: Int, _ segments: [GuestSegment], isRead: Bool) -> VirtioBlkStatus {
    guard UInt64(total) % Self.sectorSize == 0, sector <= UInt64.max / Self.sectorSize else { return .ioError }
    let offset = sector * Self.sectorSize
    return run { image in
      guard offset <= image.size, UInt64(total) <= image.size - offset else {
        throw StrataError(.outOfRange, "request past the end of the disk")
      }
      var position = offset
      for s in segments where s.length > 0 {
        if isRead {
          try image.read(into: UnsafeMutableRawBufferPointer(start: s.pointer, count: s.length), at: position)
        } else {
          try image.write(UnsafeRawBufferPointer(start: s.pointer, count: s.length), at: position)
        }
        position += UInt64(s.length)
      }
    }
  }

  private func discard(_ readable: ArraySlice<GuestSegment>, zeroes: Bool) -> VirtioBlkStatus {
    let data = slices(readable, skipping: VirtioBlkRequestHeader.size)
    let total = data.reduce(0) { $0 + $1.length }
    guard total > 0, total % VirtioBlkDiscardSegment.size == 0,
      total / VirtioBlkDiscardSegment.size <= Self.maxDiscardSegments
    else { return .ioError }
    var bytes = [UInt8](repeating: 0, count: total)
    guard gather(readable, from: VirtioBlkRequestHeader.size, into: &bytes) else { return .ioError }
    var ranges: [(UInt64, UInt64, Bool)] = []
    for i in 0..<(total / VirtioBlkDiscardSegment.size) {
      let (sector, count, flags) = bytes.withUnsafeBytes { b in
        (
          UInt64(littleEndian: b.loadUnaligned(fromByteOffset: i * 16, as: UInt64.self)),
          UInt32(littleEndian: b.loadUnaligned(fromByteOffset: i * 16 + 8, as: UInt32.self)),
          UInt32(littleEndian: b.loadUnaligned(fromByteOffset: i * 16 + 12, as: UInt32.self))
        )
      }
      // Unknown flags, or unmap on a discard, make the request invalid (virtio 5.2.6.2).
      guard count <= Self.maxDiscardSectors, sector <= UInt64.max / Self.sectorSize - UInt64(count),
        flags & ~VirtioBlkDiscardSegment.unmapFlag == 0, zeroes || flags == 0
      else { return .unsupported }
      ranges.append((sector * Self.sectorSize, UInt64(count) * Self.sectorSize, flags != 0))
    }
    return run { image in
      for (offset, length, _) in ranges {
        guard offset <= image.size, length <= image.size - offset else {
          throw StrataError(.outOfRange, "range past the end of the disk")
        }
      }
      for (offset, length, _) in ranges {
        // UNMAP or not, zeroes are stored as a ZERO operation: nothing is written either way.
        if zeroes {
          try image.writeZeroes(at: offset, length: length)
        } else {
          try image.discard(at: offset, length: length)
        }
      }
    }
  }

  /// Copies `out.count` readable bytes starting at byte `from` of the readable stream.
  private func gather(_ readable: ArraySlice<GuestSegment>, from: Int, into out: inout [UInt8]) -> Bool {
    var skip = from
    var filled = 0
    for s in readable {
      if skip >= s.length {
        skip -= s.length
        continue
      }
      let k = min(s.length - skip, out.count - filled)
      out.withUnsafeMutableBytes {
        $0.baseAddress!.advanced(by: filled).copyMemory(from: s.pointer + skip, byteCount: k)
      }
      filled += k
      skip = 0
      if filled == out.count { return true }
    }
    return filled == out.count
  }

  /// The readable stream after its first `skipping` bytes, as segments.
  private func slices(_ readable: ArraySlice<GuestSegment>, skipping: Int) -> [GuestSegment] {
    var skip = skipping
    var out: [GuestSegment] = []
    for s in readable {
      if skip >= s.length {
        skip -= s.length
        continue
      }
      out.append(GuestSegment(pointer: s.pointer + skip, length: s.length - skip, writable: false))
      skip = 0
    }
    return out
  }
}
