import CStrataLinux
import VhostProtocol

/// One guest buffer of a descriptor chain, already translated and bounds-checked.
/// (SPI for the descriptor-chain fuzzer, like the queue and the guest memory.)
@_spi(Fuzzing) public struct GuestSegment {
  public var pointer: UnsafeMutableRawPointer
  public var length: Int
  public var writable: Bool
}

/// Why a descriptor chain was refused. The request gets IOERR when it can still be answered,
/// otherwise the queue stops.
@_spi(Fuzzing) public enum ChainError: Error, Equatable {
  case headOutOfRange(UInt16)
  case nextOutOfRange(UInt16)
  case loop
  case tooManySegments
  case addressOutsideGuestMemory(UInt64, UInt32)
  case badIndirect(String)
  case availIndexJump(from: UInt16, to: UInt16)
  /// A packed ring's buffer id popped while that id is still in flight (INFLIGHT_SHMFD).
  case bufferInFlight(UInt16)
  /// More descriptors in flight than the inflight region has entries (INFLIGHT_SHMFD).
  case inflightFull
}

/// A split virtqueue (virtio 1.2, 2.7): descriptor table, available ring, used ring, all in
/// guest memory. Owned by one worker thread; the indices the guest shares are read with
/// acquire and published with release ordering.
@_spi(Fuzzing) public final class SplitQueue {
  let size: Int
  let desc: UnsafeMutableRawPointer
  let avail: UnsafeMutableRawPointer
  let used: UnsafeMutableRawPointer
  let eventIdx: Bool
  let indirect: Bool
  private(set) var lastAvail: UInt16
  private(set) var usedIdx: UInt16
  /// Used index at the last notification (EVENT_IDX batching).
  private var signalledUsed: UInt16
  /// Bounds a chain: direct descriptors, plus one indirect table of at most this many entries.
  let maxSegments: Int
  /// INFLIGHT_SHMFD: every popped head is marked there until its used entry is published.
  let inflight: InflightRing?

  public init(
    size: Int, desc: UnsafeMutableRawPointer, avail: UnsafeMutableRawPointer, used: UnsafeMutableRawPointer,
    base: UInt16,
    eventIdx: Bool, indirect: Bool, maxSegments: Int, inflight: InflightRing? = nil
  ) {
    precondition(size > 0 && size <= 32768 && size & (size - 1) == 0)
    precondition(inflight.map { size <= $0.descNum } ?? true)
    self.inflight = inflight
    self.size = size
    self.desc = desc
    self.avail = avail
    self.used = used
    self.lastAvail = base
    self.usedIdx = strata_load_acquire_u16(used.advanced(by: 2).assumingMemoryBound(to: UInt16.self))
    self.signalledUsed = usedIdx
    self.eventIdx = eventIdx
    self.indirect = indirect
    self.maxSegments = maxSegments
  }

  /// Bytes each ring needs for `size` entries (to validate SET_VRING_ADDR).
  static func descBytes(_ size: Int) -> Int { 16 * size }
  static func availBytes(_ size: Int) -> Int { 6 + 2 * size }
  static func usedBytes(_ size: Int) -> Int { 6 + 8 * size }

  /// The next chain head the guest made available, if any.
  public func popAvailable() throws(ChainError) -> UInt16? {
    let availIdxPointer = avail.advanced(by: 2).assumingMemoryBound(to: UInt16.self)
    var availIdx = strata_load_acquire_u16(availIdxPointer)
    if availIdx == lastAvail {
      guard eventIdx else { return nil }
      // Publish avail_event, then look again after a full fence: a chain published between the
      // first look and that store may have been published without a kick (the driver read the
      // old avail_event), and would otherwise wait until the next one.
      strata_store_release_u16(used.advanced(by: 4 + 8 * size).assumingMemoryBound(to: UInt16.self), lastAvail)
      strata_fence_seq_cst()
      availIdx = strata_load_acquire_u16(availIdxPointer)
      guard availIdx != lastAvail else { return nil }
    }
    // The driver cannot have more than `size` chains outstanding (virtio 1.2, 2.7.6).
    guard Int(availIdx &- lastAvail) <= size else { throw .availIndexJump(from: lastAvail, to: availIdx) }
    let slot = Int(lastAvail) & (size - 1)
    let head = UInt16(littleEndian: avail.loadUnaligned(fromByteOffset: 4 + 2 * slot, as: UInt16.self))
    lastAvail &+= 1
    if eventIdx {
      // avail_event: tell the guest up to where we have looked, so it kicks only for news.
      strata_store_release_u16(used.advanced(by: 4 + 8 * size).assumingMemoryBound(to: UInt16.self), lastAvail)
    }
    guard Int(head) < size else { throw .headOutOfRange(head) }
    inflight?.popped(head)
    return head
  }

  /// Pending chains (a guest may publish an index far ahead; it cannot exceed the ring size).
  var hasAvailable: Bool {
    strata_load_acquire_u16(avail.advanced(by: 2).assumingMemoryBound(to: UInt16.self)) != lastAvail
  }

  /// Walks the chain at `head` into `segments`, translating every address through `memory`.
  /// Loops, out-of-range indices, addresses outside guest memory and oversized chains throw.
  public func walk(head: UInt16, memory: GuestMemory, into segments: inout [GuestSegment]) throws(ChainError) {
    segments.removeAll(keepingCapacity: true)
    var table = desc
    var tableSize = size
    var index = head
    var steps = 0
    var inIndirect = false
    while true {
      steps += 1
      guard steps <= tableSize else { throw .loop }
      let d = table + 16 * Int(index)
      let addr = UInt64(littleEndian: d.loadUnaligned(as: UInt64.self))
      let len = UInt32(littleEndian: d.loadUnaligned(fromByteOffset: 8, as: UInt32.self))
      let flags = UInt16(littleEndian: d.loadUnaligned(fromByteOffset: 12, as: UInt16.self))
      let next = UInt16(littleEndian: d.loadUnaligned(fromByteOffset: 14, as: UInt16.self))
      if flags & VirtqDescFlag.indirect != 0 {
        guard indirect, !inIndirect else { throw .badIndirect("indirect descriptor not allowed here") }
        guard flags & VirtqDescFlag.next == 0 else { throw .badIndirect("indirect descriptor with NEXT") }
        guard len > 0, len % 16 == 0, Int(len / 16) <= maxSegments else {
          throw .badIndirect("indirect table of \(len) bytes")
        }
        guard let t = memory.guest(addr, length: Int(len)) else { throw .addressOutsideGuestMemory(addr, len) }
        table = t
        tableSize = Int(len / 16)
        index = 0
        steps = 0
        inIndirect = true
        continue
      }
      guard segments.count < maxSegments else { throw .tooManySegments }
      guard let p = memory.guest(addr, length: Int(len)) else { throw .addressOutsideGuestMemory(addr, len) }
      segments.append(GuestSegment(pointer: p, length: Int(len), writable: flags & VirtqDescFlag.write != 0))
      guard flags & VirtqDescFlag.next != 0 else { return }
      guard Int(next) < tableSize else { throw .nextOutOfRange(next) }
      index = next
    }
  }

  /// Returns a finished chain to the guest; `written` is the number of bytes written into it.
  /// With an inflight region, as libvhost-user's vu_queue_push: the head is recorded as
  /// last_batch_head before used->idx moves and its in-flight mark is cleared after, so a
  /// back-end that dies in between is repaired by the next one (`InflightRing.recover`).
  func pushUsed(head: UInt16, written: UInt32) {
    let slot = Int(usedIdx) & (size - 1)
    let e = used + 4 + 8 * slot
    e.storeBytes(of: UInt32(head).littleEndian, as: UInt32.self)
    e.storeBytes(of: written.littleEndian, toByteOffset: 4, as: UInt32.self)
    inflight?.willPublish(head)
    usedIdx &+= 1
    strata_store_release_u16(used.advanced(by: 2).assumingMemoryBound(to: UInt16.self), usedIdx)
    inflight?.published(head, usedIdx: usedIdx)
  }

  /// Whether the guest wants an interrupt for what was pushed since the last notification.
  func shouldNotify() -> Bool {
    strata_fence_seq_cst()
    defer { signalledUsed = usedIdx }
    if eventIdx {
      let event = UInt16(littleEndian: avail.loadUnaligned(fromByteOffset: 4 + 2 * size, as: UInt16.self))
      // vring_need_event(event, new, old)
      return usedIdx &- event &- 1 < usedIdx &- signalledUsed
    }
    let flags = UInt16(littleEndian: avail.loadUnaligned(as: UInt16.self))
    return flags & 1 == 0 && usedIdx != signalledUsed  // VRING_AVAIL_F_NO_INTERRUPT
  }
}
