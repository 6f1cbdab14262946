import CStrataLinux
import Glibc
import VhostProtocol

/// The virtqueue format a client drives: split (virtio 1.2 section 2.7), which every back-end
/// speaks, or packed (section 2.8), negotiated (VIRTIO_F_RING_PACKED) only when asked for.
public enum RingKind: String, Sendable, CaseIterable, CustomStringConvertible {
  case split
  case packed

  public var description: String { rawValue }
}

/// Guest-physical placement of one virtqueue. A packed ring has no avail and used rings: as
/// SET_VRING_ADDR carries it (vhost-user.rst), `desc` is its descriptor ring, `avail` the driver
/// event suppression area and `used` the device's.
public struct VirtqueueLayout: Sendable, Equatable {
  public var kind: RingKind = .split
  public var size: Int
  public var desc: UInt64
  public var avail: UInt64
  public var used: UInt64

  public static func descBytes(_ n: Int) -> Int { 16 * n }
  /// flags, idx, ring[n], used_event.
  public static func availBytes(_ n: Int) -> Int { 6 + 2 * n }
  /// flags, idx, ring[n] of (id u32, len u32), avail_event.
  public static func usedBytes(_ n: Int) -> Int { 6 + 8 * n }
  /// A packed ring's event suppression structure: off_wrap, flags.
  public static let eventBytes = 4

  /// Bytes of the three areas of a `kind` ring of `n` descriptors.
  static func areaBytes(_ kind: RingKind, _ n: Int) -> (desc: Int, avail: Int, used: Int) {
    switch kind {
    case .split: (descBytes(n), availBytes(n), usedBytes(n))
    case .packed: (descBytes(n), eventBytes, eventBytes)
    }
  }
}

/// One descriptor of a request before it goes into a ring or an indirect table: the format
/// adds NEXT, the links and the ring's own flags.
struct ChainElement {
  var address: UInt64
  var length: UInt32
  /// WRITE and/or INDIRECT.
  var flags: UInt16
}

/// One used element: the id the chain was published under and the bytes the device wrote.
struct UsedElement {
  var id: UInt32
  var length: UInt32
}

/// What differs between the split and the packed format on the driver side. `Virtqueue` keeps
/// what they share: the requests in flight, their buffers, the eventfds.
protocol DriverRing: AnyObject {
  /// Ring descriptors that a new chain can take.
  var freeCount: Int { get }
  /// SET_VRING_BASE when the ring starts, or starts again after the back-end went away: where
  /// the device stands according to guest memory.
  var resumeBase: UInt32 { get }
  /// Writes `chain` as an indirect descriptor table in this format.
  func writeTable(_ chain: [ChainElement], at table: UnsafeMutableRawPointer)
  /// Places `chain` in the ring and makes it available; returns the id its used element will
  /// carry (split: the head descriptor, packed: the buffer id), nil when the ring is full.
  func publish(_ chain: [ChainElement]) -> UInt16?
  /// Whether the device asked to be notified of what was published since the last call.
  func deviceWantsNotification() -> Bool
  /// The used elements the device published since the last call, in order; the descriptors of
  /// chains published with `publish` are free again.
  func takeUsed() throws(VhostClientError) -> [UsedElement]
  /// Whether the device published used elements that `takeUsed` has not returned.
  func hasUsed() -> Bool
  /// Before sleeping: with EVENT_IDX, asks for an interrupt at the next used element.
  func armNotification()
}

/// The driver side of a virtqueue living in guest memory, split or packed.
final class Virtqueue {
  struct Pending {
    var id: UInt64
    /// 64-byte block: request header at 0, status byte at 16.
    var headerAddress: UInt64
    var dataAddress: UInt64?
    var dataCount: Int
    /// Offset of the device-writable data inside the data block, and its length.
    var writableOffset: Int
    var writableLength: Int
    var indirectAddress: UInt64?
    var indirectCount: Int
    var copyData: Bool
    var submitNs: UInt64
  }

  let index: Int
  let size: Int
  let layout: VirtqueueLayout
  let kickFd: Int32
  let callFd: Int32
  let ring: any DriverRing

  /// By used-element id (head or buffer id).
  private var pending: [Pending?]
  private(set) var inFlight = 0
  /// Completions reaped while waiting for something else, handed out by the next poll.
  var stash: [VhostCompletion] = []

  init(index: Int, layout: VirtqueueLayout, memory: GuestMemory, kickFd: Int32, callFd: Int32, eventIdx: Bool) {
    self.index = index
    self.size = layout.size
    self.layout = layout
    self.kickFd = kickFd
    self.callFd = callFd
    switch layout.kind {
    case .split: ring = SplitRing(index: index, layout: layout, memory: memory, eventIdx: eventIdx)
    case .packed: ring = PackedRing(index: index, layout: layout, memory: memory, eventIdx: eventIdx)
    }
    self.pending = Array(repeating: nil, count: layout.size)
  }

  /// The split ring behind this queue, for raw access; nil for a packed ring.
  var split: SplitRing? { ring as? SplitRing }

  /// Notifies the device if it asked to be notified, or always with `force`.
  func kick(force: Bool) throws(VhostClientError) {
    strata_fence_seq_cst()
    // Asked even when forced: it moves the "last notified" position along.
    let wanted = ring.deviceWantsNotification()
    guard wanted || force else { return }
    var one: UInt64 = 1
    while write(kickFd, &one, 8) < 0 {
      if errno == EINTR { continue }
      throw .system("write(kick eventfd)", errno: errno)
    }
  }

  func track(id: UInt16, _ p: Pending) {
    precondition(pending[Int(id)] == nil, "id \(id) published twice")
    pending[Int(id)] = p
    inFlight += 1
  }

  /// Reaps the used elements, matched to their requests (whose buffers are freed).
  func reap(memory: GuestMemory) throws(VhostClientError) -> [VhostCompletion] {
    let used = try ring.takeUsed()
    guard !used.isEmpty else { return [] }
    let now = monotonicNanoseconds()
    var out: [VhostCompletion] = []
    out.reserveCapacity(used.count)
    for u in used {
      guard u.id < UInt32(size), let p = pending[Int(u.id)] else {
        out.append(
          VhostCompletion(
            queue: index, requestID: nil, head: u.id, usedLength: u.length, status: nil, data: [], latencyNs: 0))
        continue
      }
      pending[Int(u.id)] = nil
      inFlight -= 1
      let status = memory.pointer(p.headerAddress + 16).load(as: UInt8.self)
      var data: [UInt8] = []
      if p.copyData, p.writableLength > 0, let d = p.dataAddress {
        data = memory.read(at: d + UInt64(p.writableOffset), count: p.writableLength)
      }
      memory.free(p.headerAddress, count: 64)
      if let d = p.dataAddress { memory.free(d, count: p.dataCount) }
      if let i = p.indirectAddress { memory.free(i, count: 16 * p.indirectCount) }
      out.append(
        VhostCompletion(
          queue: index, requestID: p.id, head: u.id, usedLength: u.length, status: status, data: data,
          latencyNs: now &- p.submitNs))
    }
    return out
  }

  /// Prepares to sleep. Returns false when used elements arrived meanwhile (do not sleep).
  func armNotification() -> Bool {
    ring.armNotification()
    strata_fence_seq_cst()
    return !ring.hasUsed()
  }

  /// Clears the call eventfd (non-blocking).
  func drainCall() {
    var v: UInt64 = 0
    _ = read(callFd, &v, 8)
  }

  func closeFds() {
    close(kickFd)
    close(callFd)
  }
}

// MARK: - Split

/// A split ring (virtio 1.2, 2.7): descriptor table, avail ring, used ring.
final class SplitRing: DriverRing {
  let index: Int
  let size: Int
  let desc: UnsafeMutableRawPointer
  let avail: UnsafeMutableRawPointer
  let used: UnsafeMutableRawPointer
  let eventIdx: Bool

  private(set) var freeDescriptors: [UInt16]
  private(set) var availIdx: UInt16 = 0
  private(set) var lastUsedIdx: UInt16 = 0
  /// avail idx when notification was last considered (EVENT_IDX's "old").
  private var notifyOldIdx: UInt16 = 0
  /// The descriptors of each chain published with `publish`, by head, until it is used.
  private var chains: [[UInt16]?]

  init(index: Int, layout: VirtqueueLayout, memory: GuestMemory, eventIdx: Bool) {
    self.index = index
    self.size = layout.size
    self.desc = memory.pointer(layout.desc)
    self.avail = memory.pointer(layout.avail)
    self.used = memory.pointer(layout.used)
    self.eventIdx = eventIdx
    self.freeDescriptors = (0..<UInt16(layout.size)).reversed()
    self.chains = Array(repeating: nil, count: layout.size)
  }

  private var availIdxPointer: UnsafeMutablePointer<UInt16> { (avail + 2).assumingMemoryBound(to: UInt16.self) }
  private var usedEventPointer: UnsafeMutablePointer<UInt16> {
    (avail + 4 + 2 * size).assumingMemoryBound(to: UInt16.self)
  }
  private var usedFlagsPointer: UnsafeMutablePointer<UInt16> { used.assumingMemoryBound(to: UInt16.self) }
  private var usedIdxPointer: UnsafeMutablePointer<UInt16> { (used + 2).assumingMemoryBound(to: UInt16.self) }
  private var availEventPointer: UnsafeMutablePointer<UInt16> {
    (used + 4 + 8 * size).assumingMemoryBound(to: UInt16.self)
  }

  var freeCount: Int { freeDescriptors.count }

  /// The used index in guest memory: what QEMU restores when GET_VRING_BASE is impossible.
  var resumeBase: UInt32 { UInt32(deviceUsedIdx) }

  static func writeDescriptor(
    _ d: UnsafeMutableRawPointer, address: UInt64, length: UInt32, flags: UInt16, next: UInt16
  ) {
    d.storeBytes(of: address.littleEndian, toByteOffset: 0, as: UInt64.self)
    d.storeBytes(of: length.littleEndian, toByteOffset: 8, as: UInt32.self)
    d.storeBytes(of: flags.littleEndian, toByteOffset: 12, as: UInt16.self)
    d.storeBytes(of: next.littleEndian, toByteOffset: 14, as: UInt16.self)
  }

  func writeDescriptor(_ i: UInt16, address: UInt64, length: UInt32, flags: UInt16, next: UInt16) {
    Self.writeDescriptor(desc + 16 * Int(i), address: address, length: length, flags: flags, next: next)
  }

  func writeTable(_ chain: [ChainElement], at table: UnsafeMutableRawPointer) {
    for (i, e) in chain.enumerated() {
      let last = i == chain.count - 1
      Self.writeDescriptor(
        table + 16 * i, address: e.address, length: e.length, flags: e.flags | (last ? 0 : VirtqDescFlag.next),
        next: last ? 0 : UInt16(i + 1))
    }
  }

  func publish(_ chain: [ChainElement]) -> UInt16? {
    guard let ds = takeDescriptors(chain.count) else { return nil }
    for (i, e) in chain.enumerated() {
      let last = i == chain.count - 1
      writeDescriptor(
        ds[i], address: e.address, length: e.length, flags: e.flags | (last ? 0 : VirtqDescFlag.next),
        next: last ? 0 : ds[i + 1])
    }
    chains[Int(ds[0])] = ds
    publish(head: ds[0])
    return ds[0]
  }

  /// Puts `head` in the next avail slot and publishes it with a release store of avail->idx.
  func publish(head: UInt16) {
    let slot = Int(availIdx) % size
    (avail + 4 + 2 * slot).storeBytes(of: head.littleEndian, as: UInt16.self)
    availIdx &+= 1
    strata_store_release_u16(availIdxPointer, availIdx.littleEndian)
  }

  /// Writes avail->idx directly (hostile tests: indices that jump or go back).
  func forceAvailIdx(_ value: UInt16) {
    availIdx = value
    strata_store_release_u16(availIdxPointer, value.littleEndian)
  }

  /// EVENT_IDX: avail_event; otherwise VRING_USED_F_NO_NOTIFY.
  func deviceWantsNotification() -> Bool {
    let new = availIdx
    let old = notifyOldIdx
    notifyOldIdx = new
    guard new != old else { return false }
    if eventIdx {
      let event = UInt16(littleEndian: strata_load_acquire_u16(availEventPointer))
      return new &- event &- 1 < new &- old
    }
    return UInt16(littleEndian: strata_load_acquire_u16(usedFlagsPointer)) & 1 == 0
  }

  func takeDescriptors(_ n: Int) -> [UInt16]? {
    guard n <= freeDescriptors.count else { return nil }
    let taken = Array(freeDescriptors.suffix(n).reversed())
    freeDescriptors.removeLast(n)
    return taken
  }

  func returnDescriptors(_ d: [UInt16]) { freeDescriptors.append(contentsOf: d.reversed()) }

  /// used->idx as the device last published it.
  var deviceUsedIdx: UInt16 { UInt16(littleEndian: strata_load_acquire_u16(usedIdxPointer)) }

  func hasUsed() -> Bool { deviceUsedIdx != lastUsedIdx }

  func takeUsed() throws(VhostClientError) -> [UsedElement] {
    let usedIdx = deviceUsedIdx
    let count = Int(usedIdx &- lastUsedIdx)
    guard count <= size else {
      throw .protocolViolation("queue \(index): used idx moved from \(lastUsedIdx) to \(usedIdx), more than \(size)")
    }
    var out: [UsedElement] = []
    out.reserveCapacity(count)
    for _ in 0..<count {
      let e = used + 4 + 8 * (Int(lastUsedIdx) % size)
      let id = UInt32(littleEndian: e.loadUnaligned(as: UInt32.self))
      let len = UInt32(littleEndian: e.loadUnaligned(fromByteOffset: 4, as: UInt32.self))
      lastUsedIdx &+= 1
      // Heads placed with the raw API are not in `chains`: their descriptors stay reserved.
      if id < UInt32(size), let ds = chains[Int(id)] {
        chains[Int(id)] = nil
        returnDescriptors(ds)
      }
      out.append(UsedElement(id: id, length: len))
    }
    return out
  }

  func armNotification() {
    if eventIdx { strata_store_release_u16(usedEventPointer, lastUsedIdx.littleEndian) }
  }
}

// MARK: - Packed

/// A packed ring (virtio 1.2, 2.8): one ring of descriptors that the driver makes available
/// and the device overwrites with used ones, told apart by wrap counters, and two event
/// suppression areas.
final class PackedRing: DriverRing {
  let index: Int
  let size: Int
  let ring: UnsafeMutableRawPointer
  /// Written by the driver: where (EVENT_IDX) or whether it wants interrupts.
  let driverEvent: UnsafeMutableRawPointer
  /// Written by the device: where or whether it wants notifications.
  let deviceEvent: UnsafeMutableRawPointer
  let eventIdx: Bool

  private(set) var nextAvail: UInt16 = 0
  private(set) var availWrap = true
  /// The next used descriptor to read, and the wrap counter it is written with.
  private(set) var nextUsed: UInt16 = 0
  private(set) var usedWrap = true
  private var freeSlots: Int
  private var freeIDs: [UInt16]
  /// Ring slots each buffer id in flight took (0: not in flight): the used descriptor after
  /// its own is that many slots further on.
  private var chainLength: [UInt16]
  /// Slots made available since the last notification decision.
  private var addedSinceNotify = 0

  init(index: Int, layout: VirtqueueLayout, memory: GuestMemory, eventIdx: Bool) {
    self.index = index
    self.size = layout.size
    self.ring = memory.pointer(layout.desc)
    self.driverEvent = memory.pointer(layout.avail)
    self.deviceEvent = memory.pointer(layout.used)
    self.eventIdx = eventIdx
    self.freeSlots = layout.size
    self.freeIDs = (0..<UInt16(layout.size)).reversed()
    self.chainLength = Array(repeating: 0, count: layout.size)
    // Flags 0 are neither available nor used in the first lap (both wrap counters start at 1).
    ring.initializeMemory(as: UInt8.self, repeating: 0, count: VirtqueueLayout.descBytes(size))
    // With EVENT_IDX, an interrupt only when the device passes the descriptor that
    // `armNotification` names (the first one until then); otherwise one per used batch.
    driverEvent.storeBytes(of: UInt16(0x8000).littleEndian, as: UInt16.self)
    strata_store_release_u16(
      (driverEvent + 2).assumingMemoryBound(to: UInt16.self),
      (eventIdx ? VirtqEventFlag.desc : VirtqEventFlag.enable).littleEndian)
  }

  private func flagsPointer(_ slot: Int) -> UnsafeMutablePointer<UInt16> {
    (ring + 16 * slot + 14).assumingMemoryBound(to: UInt16.self)
  }

  private func isUsed(_ flags: UInt16, wrap: Bool) -> Bool {
    (flags & VirtqDescFlag.packedAvail != 0) == wrap && (flags & VirtqDescFlag.packedUsed != 0) == wrap
  }

  var freeCount: Int { freeSlots }

  /// Both halves at the device's used position in guest memory (past the used descriptors not
  /// reaped yet): a back-end without an inflight region then makes available again what it
  /// had taken and not used. One with a region resumes from the region instead (vhost-user.rst).
  var resumeBase: UInt32 {
    var slot = Int(nextUsed)
    var wrap = usedWrap
    for _ in 0..<size {
      let flags = UInt16(littleEndian: strata_load_acquire_u16(flagsPointer(slot)))
      guard isUsed(flags, wrap: wrap) else { break }
      let id = UInt16(littleEndian: (ring + 16 * slot).load(fromByteOffset: 12, as: UInt16.self))
      guard Int(id) < size, chainLength[Int(id)] > 0 else { break }
      slot += Int(chainLength[Int(id)])
      if slot >= size {
        slot -= size
        wrap.toggle()
      }
    }
    let half = UInt32(slot) | (wrap ? 0x8000 : 0)
    return half | half << 16
  }

  /// Packed indirect tables have no links and no ids: the entries follow one another and only
  /// WRITE counts (virtio 1.2, 2.8.19).
  func writeTable(_ chain: [ChainElement], at table: UnsafeMutableRawPointer) {
    for (i, e) in chain.enumerated() {
      writeDescriptor(table + 16 * i, address: e.address, length: e.length, id: 0)
      (table + 16 * i).storeBytes(of: e.flags.littleEndian, toByteOffset: 14, as: UInt16.self)
    }
  }

  /// Everything but the flags, which decide when the device may read the rest.
  private func writeDescriptor(_ d: UnsafeMutableRawPointer, address: UInt64, length: UInt32, id: UInt16) {
    d.storeBytes(of: address.littleEndian, toByteOffset: 0, as: UInt64.self)
    d.storeBytes(of: length.littleEndian, toByteOffset: 8, as: UInt32.self)
    d.storeBytes(of: id.littleEndian, toByteOffset: 12, as: UInt16.self)
  }

  /// Fills consecutive slots from `nextAvail` (virtio 1.2, 2.8.21): AVAIL = the driver's wrap
  /// counter and USED = its inverse, taken per slot since the chain may wrap. The head's flags
  /// go last, with a release store, so the device sees the whole chain or none of it.
  func publish(_ chain: [ChainElement]) -> UInt16? {
    precondition(!chain.isEmpty)
    guard chain.count <= freeSlots, let id = freeIDs.popLast() else { return nil }
    let head = Int(nextAvail)
    var headFlags: UInt16 = 0
    for (i, e) in chain.enumerated() {
      let slot = Int(nextAvail)
      var flags = e.flags | (availWrap ? VirtqDescFlag.packedAvail : VirtqDescFlag.packedUsed)
      if i < chain.count - 1 { flags |= VirtqDescFlag.next }
      // Every descriptor carries the id; the device reads it from the last.
      writeDescriptor(ring + 16 * slot, address: e.address, length: e.length, id: id)
      if i == 0 {
        headFlags = flags
      } else {
        (ring + 16 * slot).storeBytes(of: flags.littleEndian, toByteOffset: 14, as: UInt16.self)
      }
      nextAvail += 1
      if Int(nextAvail) == size {
        nextAvail = 0
        availWrap.toggle()
      }
    }
    chainLength[Int(id)] = UInt16(chain.count)
    freeSlots -= chain.count
    addedSinceNotify += chain.count
    strata_store_release_u16(flagsPointer(head), headFlags.littleEndian)
    return id
  }

  /// The device's event suppression (virtio 1.2, 2.8.10): disabled, enabled, or (EVENT_IDX)
  /// wanted once the ring passes off_wrap, compared as Linux's virtqueue_kick_prepare_packed
  /// does.
  func deviceWantsNotification() -> Bool {
    let added = addedSinceNotify
    addedSinceNotify = 0
    guard added > 0 else { return false }
    let flags = UInt16(
      littleEndian: strata_load_acquire_u16((deviceEvent + 2).assumingMemoryBound(to: UInt16.self)))
    switch flags {
    case VirtqEventFlag.disable: return false
    case VirtqEventFlag.desc where eventIdx:
      let offWrap = UInt16(littleEndian: deviceEvent.load(as: UInt16.self))
      let new = nextAvail
      let old = new &- UInt16(added)
      var event = offWrap & 0x7FFF
      // An offset in the other lap than nextAvail's: make it lap-relative to nextAvail's.
      if (offWrap & 0x8000 != 0) != availWrap { event &-= UInt16(size) }
      return new &- event &- 1 < new &- old
    default: return true
    }
  }

  func hasUsed() -> Bool {
    isUsed(UInt16(littleEndian: strata_load_acquire_u16(flagsPointer(Int(nextUsed)))), wrap: usedWrap)
  }

  /// Reads used descriptors from `nextUsed` while their AVAIL and USED bits both equal the
  /// used wrap counter (virtio 1.2, 2.8.22), skipping the slots each buffer took.
  func takeUsed() throws(VhostClientError) -> [UsedElement] {
    var out: [UsedElement] = []
    // Each used descriptor ends a buffer in flight: at most `size` of them.
    while out.count < size {
      let slot = Int(nextUsed)
      // Acquire: the id and length are read after the flags that publish them.
      let flags = UInt16(littleEndian: strata_load_acquire_u16(flagsPointer(slot)))
      guard isUsed(flags, wrap: usedWrap) else { break }
      let d = ring + 16 * slot
      let id = UInt16(littleEndian: d.load(fromByteOffset: 12, as: UInt16.self))
      let len = UInt32(littleEndian: d.load(fromByteOffset: 8, as: UInt32.self))
      guard Int(id) < size, chainLength[Int(id)] > 0 else {
        throw .protocolViolation("queue \(index): used descriptor at slot \(slot) has buffer id \(id), not in flight")
      }
      var next = slot + Int(chainLength[Int(id)])
      if next >= size {
        next -= size
        usedWrap.toggle()
      }
      nextUsed = UInt16(next)
      freeSlots += Int(chainLength[Int(id)])
      chainLength[Int(id)] = 0
      freeIDs.append(id)
      out.append(UsedElement(id: UInt32(id), length: len))
    }
    return out
  }

  func armNotification() {
    guard eventIdx else { return }
    let offWrap = nextUsed | (usedWrap ? 0x8000 : 0)
    strata_store_release_u16(driverEvent.assumingMemoryBound(to: UInt16.self), offWrap.littleEndian)
  }
}
