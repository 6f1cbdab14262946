import CStrataLinux
import VhostProtocol

/// A packed virtqueue (virtio 1.2, 2.8): one descriptor ring that the driver fills and the
/// device writes used descriptors back into, with wrap counters instead of indices, and two
/// event-suppression areas. Owned by one worker thread.
///
/// vhost-user places the ring at the descriptor address, the driver's event suppression area
/// at the "avail" address and the device's at the "used" address. The ring base exchanged with
/// SET/GET_VRING_BASE is, as QEMU encodes it, the next available index in bits 0-14 with its
/// wrap counter in bit 15, and the next used index and wrap counter in bits 16-31.
@_spi(Fuzzing) public final class PackedQueue {
  let size: Int
  let ring: UnsafeMutableRawPointer
  let driverEvent: UnsafeMutableRawPointer
  let deviceEvent: UnsafeMutableRawPointer
  let eventIdx: Bool
  let indirect: Bool
  let maxSegments: Int
  private(set) var nextAvail: UInt16
  private(set) var availWrap: Bool
  private var nextUsed: UInt16
  private var usedWrap: Bool
  /// Used position at the last notification (EVENT_IDX).
  private var signalledUsed: UInt16
  private var pushedSinceSignal = false
  /// Descriptors each buffer id took in the ring: the used descriptor skips as many.
  private var chainLength: [UInt16]
  /// INFLIGHT_SHMFD: every popped buffer is recorded there until its used descriptor is out.
  let inflight: PackedInflightRing?

  static func ringBytes(_ size: Int) -> Int { 16 * size }
  static let eventBytes = 4

  public init(
    size: Int, ring: UnsafeMutableRawPointer, driverEvent: UnsafeMutableRawPointer,
    deviceEvent: UnsafeMutableRawPointer, base: UInt32, eventIdx: Bool, indirect: Bool, maxSegments: Int,
    inflight: PackedInflightRing? = nil
  ) {
    precondition(size > 0 && size <= 32768)
    precondition(inflight.map { $0.ringSize == size } ?? true)
    self.size = size
    self.ring = ring
    self.driverEvent = driverEvent
    self.deviceEvent = deviceEvent
    self.eventIdx = eventIdx
    self.indirect = indirect
    self.maxSegments = maxSegments
    nextAvail = UInt16(base & 0x7FFF) % UInt16(size)
    availWrap = base & 0x8000 != 0
    nextUsed = UInt16((base >> 16) & 0x7FFF) % UInt16(size)
    usedWrap = base & 0x8000_0000 != 0
    signalledUsed = nextUsed
    chainLength = Array(repeating: 0, count: size)
    self.inflight = inflight
    if let inflight {
      precondition(inflight.usedPosition == (nextUsed, usedWrap), "the ring and its inflight region disagree")
      // Buffers to resubmit are in flight: their used descriptors skip their slots too.
      for r in inflight.resubmit { chainLength[Int(r.id)] = UInt16(r.descriptors.count) }
    }
    // With EVENT_IDX the driver notifies only for a buffer at the position the device will look
    // at next (`publishAvailEvent`), as avail_event does for split rings; without it, for every one.
    if eventIdx {
      publishAvailEvent()
    } else {
      deviceEvent.storeBytes(of: UInt16(0), as: UInt16.self)
      strata_store_release_u16(
        (deviceEvent + 2).assumingMemoryBound(to: UInt16.self), VirtqEventFlag.enable.littleEndian)
    }
  }

  /// Device event suppression in descriptor mode: "notify me when you make the buffer at my
  /// next available position available" (off_wrap: that position, its wrap counter in bit 15).
  private func publishAvailEvent() {
    deviceEvent.storeBytes(of: (nextAvail | (availWrap ? 0x8000 : 0)).littleEndian, as: UInt16.self)
    strata_store_release_u16((deviceEvent + 2).assumingMemoryBound(to: UInt16.self), VirtqEventFlag.desc.littleEndian)
  }

  /// SET/GET_VRING_BASE encoding of where the ring stands.
  var base: UInt32 {
    UInt32(nextAvail) | (availWrap ? 0x8000 : 0) | UInt32(nextUsed) << 16 | (usedWrap ? 0x8000_0000 : 0)
  }

  private func flags(at index: Int) -> UInt16 {
    UInt16(littleEndian: strata_load_acquire_u16((ring + 16 * index + 14).assumingMemoryBound(to: UInt16.self)))
  }

  /// The next available buffer: its id and its segments (translated and bounds-checked). A
  /// chain that cannot be walked breaks the ring (its id, in its last descriptor, cannot be
  /// trusted), unlike a split ring where the head names the request.
  public func next(into segments: inout [GuestSegment], memory: GuestMemory) throws(ChainError) -> UInt16? {
    var headFlags = flags(at: Int(nextAvail))
    if !Self.isAvailable(headFlags, lap: availWrap) {
      guard eventIdx else { return nil }
      // Publish the event position, then look again after a full fence: a buffer made
      // available between the first look and that store may have gone without a kick (the
      // driver read the old position), and would otherwise wait until the next one.
      publishAvailEvent()
      strata_fence_seq_cst()
      headFlags = flags(at: Int(nextAvail))
      guard Self.isAvailable(headFlags, lap: availWrap) else { return nil }
    }
    segments.removeAll(keepingCapacity: true)
    let start = Int(nextAvail)
    var index = start
    var wrap = availWrap
    var count = 0
    var id: UInt16 = 0
    while true {
      count += 1
      guard count <= size else { throw .loop }
      let d = ring + 16 * index
      let addr = UInt64(littleEndian: d.loadUnaligned(as: UInt64.self))
      let len = UInt32(littleEndian: d.loadUnaligned(fromByteOffset: 8, as: UInt32.self))
      id = UInt16(littleEndian: d.loadUnaligned(fromByteOffset: 12, as: UInt16.self))
      let f = count == 1 ? headFlags : flags(at: index)
      // Every descriptor of the chain must be available in this lap (the driver publishes the
      // head last, so the others are visible once the head is).
      guard Self.isAvailable(f, lap: wrap) else {
        throw .badIndirect("descriptor \(index) of a chain is not available")
      }
      index += 1
      if index == size {
        index = 0
        wrap.toggle()
      }
      if try !add(addr, len, f, to: &segments, memory) { break }
    }
    guard Int(id) < size else { throw .headOutOfRange(id) }
    try inflight?.popped(id: id, ring: ring, start: start, count: count)
    chainLength[Int(id)] = UInt16(count)
    nextAvail = UInt16(index)
    availWrap = wrap
    // Tell the driver up to where the device has looked, so it notifies only for news.
    if eventIdx { publishAvailEvent() }
    return id
  }

  /// Whether descriptor flags mark a buffer available in the lap whose wrap counter is `lap`.
  private static func isAvailable(_ flags: UInt16, lap: Bool) -> Bool {
    (flags & VirtqDescFlag.packedAvail != 0) == lap && (flags & VirtqDescFlag.packedUsed != 0) != lap
  }

  /// Walks a buffer saved in the inflight region (resubmitted after a restart) into `segments`,
  /// with the checks of `next`: the region is front-end memory.
  func walk(_ descriptors: [PackedInflightRing.Descriptor], memory: GuestMemory, into segments: inout [GuestSegment])
    throws(ChainError)
  {
    segments.removeAll(keepingCapacity: true)
    for (k, d) in descriptors.enumerated() {
      let more = try add(d.addr, d.len, d.flags, to: &segments, memory)
      // A buffer ends with its first descriptor without NEXT (or its indirect one).
      guard more == (k < descriptors.count - 1) else {
        throw .badIndirect("saved buffer's NEXT flags do not match its length")
      }
    }
  }

  /// Adds one ring descriptor (or the indirect table it points to) to `segments`; returns
  /// whether the chain goes on.
  private func add(
    _ addr: UInt64, _ len: UInt32, _ f: UInt16, to segments: inout [GuestSegment], _ memory: GuestMemory
  ) throws(ChainError) -> Bool {
    if f & VirtqDescFlag.indirect != 0 {
      guard indirect, f & VirtqDescFlag.next == 0 else { throw .badIndirect("indirect descriptor not allowed here") }
      guard len > 0, len % 16 == 0, Int(len / 16) <= maxSegments else {
        throw .badIndirect("indirect table of \(len) bytes")
      }
      guard let table = memory.guest(addr, length: Int(len)) else { throw .addressOutsideGuestMemory(addr, len) }
      for i in 0..<Int(len / 16) {
        let e = table + 16 * i
        let ea = UInt64(littleEndian: e.loadUnaligned(as: UInt64.self))
        let el = UInt32(littleEndian: e.loadUnaligned(fromByteOffset: 8, as: UInt32.self))
        let ef = UInt16(littleEndian: e.loadUnaligned(fromByteOffset: 14, as: UInt16.self))
        guard ef & VirtqDescFlag.indirect == 0 else { throw .badIndirect("nested indirect table") }
        try append(ea, el, writable: ef & VirtqDescFlag.write != 0, to: &segments, memory)
      }
      return false
    }
    try append(addr, len, writable: f & VirtqDescFlag.write != 0, to: &segments, memory)
    return f & VirtqDescFlag.next != 0
  }

  private func append(
    _ addr: UInt64, _ len: UInt32, writable: Bool, to segments: inout [GuestSegment], _ memory: GuestMemory
  ) throws(ChainError) {
    guard segments.count < maxSegments else { throw .tooManySegments }
    guard let p = memory.guest(addr, length: Int(len)) else { throw .addressOutsideGuestMemory(addr, len) }
    segments.append(GuestSegment(pointer: p, length: Int(len), writable: writable))
  }

  /// Writes the used descriptor for buffer `id` at the next used position and skips the
  /// descriptors its chain took; the flags go last, with release ordering. With an inflight
  /// region, the buffer is returned there around the flags' store (see PackedInflightRing).
  public func pushUsed(head id: UInt16, written: UInt32) {
    inflight?.willPublish(id)
    let d = ring + 16 * Int(nextUsed)
    d.storeBytes(of: id.littleEndian, toByteOffset: 12, as: UInt16.self)
    d.storeBytes(of: written.littleEndian, toByteOffset: 8, as: UInt32.self)
    var f: UInt16 = written > 0 ? VirtqDescFlag.write : 0
    if usedWrap { f |= VirtqDescFlag.packedAvail | VirtqDescFlag.packedUsed }
    strata_store_release_u16((d + 14).assumingMemoryBound(to: UInt16.self), f.littleEndian)
    let skip = Int(max(chainLength[Int(id)], 1))
    var n = Int(nextUsed) + skip
    if n >= size {
      n -= size
      usedWrap.toggle()
    }
    nextUsed = UInt16(n)
    pushedSinceSignal = true
    if let inflight {
      inflight.published(id)
      assert(inflight.usedPosition == (nextUsed, usedWrap), "the ring and its inflight region disagree")
    }
  }

  /// Whether the driver wants an interrupt for what was pushed since the last notification.
  public func shouldNotify() -> Bool {
    strata_fence_seq_cst()
    guard pushedSinceSignal else { return false }
    let flags = UInt16(littleEndian: strata_load_acquire_u16((driverEvent + 2).assumingMemoryBound(to: UInt16.self)))
    // Positions made lap-relative, so that a wrap between the two compares correctly (DPDK's
    // vhost_vring_call_packed).
    let new = Int(nextUsed)
    var old = Int(signalledUsed)
    signalledUsed = nextUsed
    pushedSinceSignal = false
    switch flags {
    case VirtqEventFlag.disable: return false
    case VirtqEventFlag.desc where eventIdx:
      let offWrap = UInt16(littleEndian: driverEvent.load(as: UInt16.self))
      var off = Int(offWrap & 0x7FFF)
      if new <= old { old -= size }
      if (offWrap & 0x8000 != 0) != usedWrap { off -= size }
      // vring_need_event(off, new, old)
      return UInt16(truncatingIfNeeded: new - off - 1) < UInt16(truncatingIfNeeded: new - old)
    default: return true
    }
  }
}
