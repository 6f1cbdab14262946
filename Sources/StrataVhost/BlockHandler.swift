import StrataCore
import VhostProtocol

/// What became of a request.
enum BlockOutcome: Equatable {
  /// Finished: the bytes written into the chain (data plus the status byte).
  case done(UInt32)
  /// A read handed to the image queue under the chain's head as tag; its completion finishes it.
  case reading(status: UnsafeMutableRawPointer, dataBytes: Int)
  /// The chain has no place for a status byte: nothing was written into it.
  case noStatus
}

/// Executes virtio-blk requests (virtio 1.2, 5.2.6) against the image. The request's header,
/// data and status byte may be framed across descriptors in any way: readable bytes first
/// (header, then write data or discard segments), writable bytes last (read data, status).
/// One per queue worker: it keeps scratch buffers so a request allocates nothing.
final class BlockHandler: @unchecked Sendable {
  static let sectorSize: UInt64 = 512
  static let maxDiscardSegments = 32
  static let maxDiscardSectors: UInt32 = 1 << 22  // 2 GiB per segment

  let image: SharedImage
  let readOnly: Bool
  /// GET_ID reply: at most 20 bytes, zero-padded.
  let serial: [UInt8]
  /// Set when a request appended to the log since the last `takeAppended()`.
  private var appended = false
  /// Scratch: the data part of the current request, and its read targets (adjacent guest
  /// buffers merged, so a read becomes as few engine requests as the guest allows).
  private var data: [GuestSegment] = []
  private var targets: [UnsafeMutableRawBufferPointer] = []
  private var scratch = [UInt8](repeating: 0, count: maxDiscardSegments * VirtioBlkDiscardSegment.size)

  init(image: SharedImage, readOnly: Bool, serial: [UInt8], maxSegments: Int) {
    self.image = image
    self.readOnly = readOnly
    self.serial = serial
    data.reserveCapacity(maxSegments)
    targets.reserveCapacity(maxSegments)
  }

  /// Whether requests appended to the log since the last call (the worker then writes it out).
  func takeAppended() -> Bool {
    defer { appended = false }
    return appended
  }

  /// Handles one chain. Reads go to `queue` (when there is one) tagged with `head`.
  func handle(_ segments: [GuestSegment], head: UInt16, queue: ImageQueue?) -> BlockOutcome {
    guard let last = segments.last, last.writable, last.length >= 1 else { return .noStatus }
    // Readable segments must all come before writable ones.
    let firstWritable = segments.firstIndex(where: { $0.writable }) ?? segments.count
    guard !segments[firstWritable...].contains(where: { !$0.writable }) else {
      return finish(last, .ioError, dataWritten: 0)
    }
    let readable = segments[..<firstWritable]
    guard gather(readable, from: 0, count: VirtioBlkRequestHeader.size) else {
      return finish(last, .ioError, dataWritten: 0)
    }
    let (type, sector) = scratch.withUnsafeBytes {
      (
        UInt32(littleEndian: $0.loadUnaligned(as: UInt32.self)),
        UInt64(littleEndian: $0.loadUnaligned(fromByteOffset: 8, as: UInt64.self))
      )
    }
    // Writable data: everything writable except the final status byte.
    data.removeAll(keepingCapacity: true)
    data.append(contentsOf: segments[firstWritable...])
    data[data.count - 1].length -= 1
    let status: VirtioBlkStatus
    var written = 0
    switch VirtioBlkRequestType(rawValue: type) {
    case .read:
      let total = data.reduce(0) { $0 + $1.length }
      // Read data goes into device-writable buffers only: device-readable bytes after the
      // header are a buffer the device may not fill, so the read cannot succeed.
      guard readable.reduce(0, { $0 + $1.length }) == VirtioBlkRequestHeader.size,
        let offset = byteOffset(sector, total)
      else { return finish(last, .ioError, dataWritten: 0) }
      if let queue { return submitRead(offset, total, head: head, queue: queue, last: last) }
      status = transfer(offset, total, isRead: true)
      if status == .ok { written = total }
    case .write:
      // Likewise write data comes from device-readable buffers only.
      guard !readOnly, !data.contains(where: { $0.length > 0 }) else { return finish(last, .ioError, dataWritten: 0) }
      slices(readable, skipping: VirtioBlkRequestHeader.size)
      let total = data.reduce(0) { $0 + $1.length }
      guard let offset = byteOffset(sector, total) else { return finish(last, .ioError, dataWritten: 0) }
      status = transfer(offset, total, isRead: false)
    case .flush:
      // Group commit: the sync runs outside the image lock, shared with other queues' flushes.
      do {
        try image.durably { _ in }
        status = .ok
      } catch {
        status = .ioError
      }
    case .getID:
      var n = 0
      for s in data where n < 20 {
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

  /// Stores a finished read's status byte; returns the used length.
  static func complete(status: UnsafeMutableRawPointer, dataBytes: Int, ok: Bool) -> UInt32 {
    status.storeBytes(of: (ok ? VirtioBlkStatus.ok : .ioError).rawValue, as: UInt8.self)
    return UInt32((ok ? dataBytes : 0) + 1)
  }

  private func finish(_ last: GuestSegment, _ status: VirtioBlkStatus, dataWritten: Int) -> BlockOutcome {
    last.pointer.storeBytes(of: status.rawValue, toByteOffset: last.length - 1, as: UInt8.self)
    return .done(UInt32(dataWritten + 1))
  }

  private func run(_ body: (StrataImage) throws -> Void) -> VirtioBlkStatus {
    do {
      try image.with(body)
      return .ok
    } catch {
      return .ioError
    }
  }

  /// The byte offset of `sector`, if the request is whole sectors and its offset representable
  /// (the image checks the range against the disk size).
  private func byteOffset(_ sector: UInt64, _ total: Int) -> UInt64? {
    guard UInt64(total) % Self.sectorSize == 0, sector <= UInt64.max / Self.sectorSize else { return nil }
    return sector * Self.sectorSize
  }

  private func submitRead(
    _ offset: UInt64, _ total: Int, head: UInt16, queue: ImageQueue, last: GuestSegment
  ) -> BlockOutcome {
    targets.removeAll(keepingCapacity: true)
    for s in data where s.length > 0 {
      if let previous = targets.last, previous.baseAddress! + previous.count == s.pointer {
        targets[targets.count - 1] = UnsafeMutableRawBufferPointer(
          start: previous.baseAddress, count: previous.count + s.length)
      } else {
        targets.append(UnsafeMutableRawBufferPointer(start: s.pointer, count: s.length))
      }
    }
    do {
      try queue.submitRead(segments: targets.count, at: offset, tag: UInt64(head)) { targets[$0] }
    } catch {
      return finish(last, .ioError, dataWritten: 0)
    }
    return .reading(status: last.pointer + (last.length - 1), dataBytes: total)
  }

  /// Reads or writes `total` bytes at `offset` between the image and `data`, synchronously.
  private func transfer(_ offset: UInt64, _ total: Int, isRead: Bool) -> VirtioBlkStatus {
    if !isRead { appended = true }
    return run { image in
      guard offset <= image.size, UInt64(total) <= image.size - offset else {
        throw StrataError(.outOfRange, "request past the end of the disk")
      }
      var position = offset
      for s in data where s.length > 0 {
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
    let total = readable.reduce(0) { $0 + $1.length } - VirtioBlkRequestHeader.size
    guard total > 0, total % VirtioBlkDiscardSegment.size == 0,
      total / VirtioBlkDiscardSegment.size <= Self.maxDiscardSegments,
      gather(readable, from: VirtioBlkRequestHeader.size, count: total)
    else { return .ioError }
    var ranges: [(offset: UInt64, length: UInt64)] = []
    for i in 0..<(total / VirtioBlkDiscardSegment.size) {
      let (sector, sectors, flags) = scratch.withUnsafeBytes { b in
        (
          UInt64(littleEndian: b.loadUnaligned(fromByteOffset: i * 16, as: UInt64.self)),
          UInt32(littleEndian: b.loadUnaligned(fromByteOffset: i * 16 + 8, as: UInt32.self)),
          UInt32(littleEndian: b.loadUnaligned(fromByteOffset: i * 16 + 12, as: UInt32.self))
        )
      }
      // Unknown flags, or unmap on a discard, make the request invalid (virtio 5.2.6.2).
      guard sectors <= Self.maxDiscardSectors, sector <= UInt64.max / Self.sectorSize - UInt64(sectors),
        flags & ~VirtioBlkDiscardSegment.unmapFlag == 0, zeroes || flags == 0
      else { return .unsupported }
      ranges.append((sector * Self.sectorSize, UInt64(sectors) * Self.sectorSize))
    }
    appended = true
    return run { image in
      for (offset, length) in ranges {
        guard offset <= image.size, length <= image.size - offset else {
          throw StrataError(.outOfRange, "range past the end of the disk")
        }
      }
      for (offset, length) in ranges {
        // UNMAP or not, zeroes are stored as a ZERO operation: nothing is written either way.
        if zeroes {
          try image.writeZeroes(at: offset, length: length)
        } else {
          try image.discard(at: offset, length: length)
        }
      }
    }
  }

  /// Copies `count` readable bytes starting at byte `from` of the readable stream into `scratch`.
  private func gather(_ readable: ArraySlice<GuestSegment>, from: Int, count: Int) -> Bool {
    precondition(count <= scratch.count)
    var skip = from
    var filled = 0
    for s in readable {
      if skip >= s.length {
        skip -= s.length
        continue
      }
      let k = min(s.length - skip, count - filled)
      scratch.withUnsafeMutableBytes {
        $0.baseAddress!.advanced(by: filled).copyMemory(from: s.pointer + skip, byteCount: k)
      }
      filled += k
      skip = 0
      if filled == count { return true }
    }
    return filled == count
  }

  /// Replaces `data` with the readable stream after its first `skipping` bytes.
  private func slices(_ readable: ArraySlice<GuestSegment>, skipping: Int) {
    var skip = skipping
    data.removeAll(keepingCapacity: true)
    for s in readable {
      if skip >= s.length {
        skip -= s.length
        continue
      }
      data.append(GuestSegment(pointer: s.pointer + skip, length: s.length - skip, writable: false))
      skip = 0
    }
  }
}
