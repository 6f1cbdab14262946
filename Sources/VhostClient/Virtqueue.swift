import CStrataLinux
import Glibc
import VhostProtocol

/// Guest-physical placement of one split virtqueue (virtio 1.2 section 2.7).
public struct VirtqueueLayout: Sendable, Equatable {
  public var size: Int
  public var desc: UInt64
  public var avail: UInt64
  public var used: UInt64

  public static func descBytes(_ n: Int) -> Int { 16 * n }
  /// flags, idx, ring[n], used_event.
  public static func availBytes(_ n: Int) -> Int { 6 + 2 * n }
  /// flags, idx, ring[n] of (id u32, len u32), avail_event.
  public static func usedBytes(_ n: Int) -> Int { 6 + 8 * n }
}

/// The driver side of a split virtqueue living in guest memory.
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
    var descriptors: [UInt16]
    var copyData: Bool
    var submitNs: UInt64
  }

  let index: Int
  let size: Int
  let layout: VirtqueueLayout
  let desc: UnsafeMutableRawPointer
  let avail: UnsafeMutableRawPointer
  let used: UnsafeMutableRawPointer
  let kickFd: Int32
  let callFd: Int32
  let eventIdx: Bool

  private(set) var freeDescriptors: [UInt16]
  private(set) var availIdx: UInt16 = 0
  private(set) var lastUsedIdx: UInt16 = 0
  /// avail idx when notification was last considered (EVENT_IDX's "old").
  private var notifyOldIdx: UInt16 = 0
  private var pending: [Pending?]
  private(set) var inFlight = 0
  /// Completions reaped while waiting for something else, handed out by the next poll.
  var stash: [VhostCompletion] = []

  init(index: Int, layout: VirtqueueLayout, memory: GuestMemory, kickFd: Int32, callFd: Int32, eventIdx: Bool) {
    self.index = index
    self.size = layout.size
    self.layout = layout
    self.desc = memory.pointer(layout.desc)
    self.avail = memory.pointer(layout.avail)
    self.used = memory.pointer(layout.used)
    self.kickFd = kickFd
    self.callFd = callFd
    self.eventIdx = eventIdx
    self.freeDescriptors = (0..<UInt16(layout.size)).reversed()
    self.pending = Array(repeating: nil, count: layout.size)
  }

  // MARK: Ring fields

  private var availIdxPointer: UnsafeMutablePointer<UInt16> { (avail + 2).assumingMemoryBound(to: UInt16.self) }
  private var usedEventPointer: UnsafeMutablePointer<UInt16> {
    (avail + 4 + 2 * size).assumingMemoryBound(to: UInt16.self)
  }
  private var usedFlagsPointer: UnsafeMutablePointer<UInt16> { used.assumingMemoryBound(to: UInt16.self) }
  private var usedIdxPointer: UnsafeMutablePointer<UInt16> { (used + 2).assumingMemoryBound(to: UInt16.self) }
  private var availEventPointer: UnsafeMutablePointer<UInt16> {
    (used + 4 + 8 * size).assumingMemoryBound(to: UInt16.self)
  }

  func writeDescriptor(_ i: UInt16, address: UInt64, length: UInt32, flags: UInt16, next: UInt16) {
    let d = desc + 16 * Int(i)
    d.storeBytes(of: address.littleEndian, toByteOffset: 0, as: UInt64.self)
    d.storeBytes(of: length.littleEndian, toByteOffset: 8, as: UInt32.self)
    d.storeBytes(of: flags.littleEndian, toByteOffset: 12, as: UInt16.self)
    d.storeBytes(of: next.littleEndian, toByteOffset: 14, as: UInt16.self)
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

  /// Notifies the device if it asked to be notified (EVENT_IDX avail_event, or no
  /// VRING_USED_F_NO_NOTIFY), or always with `force`.
  func kick(force: Bool) throws(VhostClientError) {
    strata_fence_seq_cst()
    let new = availIdx
    let old = notifyOldIdx
    notifyOldIdx = new
    var need = force
    if !need && new != old {
      if eventIdx {
        let event = UInt16(littleEndian: strata_load_acquire_u16(availEventPointer))
        need = new &- event &- 1 < new &- old
      } else {
        need = UInt16(littleEndian: strata_load_acquire_u16(usedFlagsPointer)) & 1 == 0
      }
    }
    guard need else { return }
    var one: UInt64 = 1
    while write(kickFd, &one, 8) < 0 {
      if errno == EINTR { continue }
      throw .system("write(kick eventfd)", errno: errno)
    }
  }

  // MARK: Descriptor bookkeeping

  func takeDescriptors(_ n: Int) -> [UInt16]? {
    guard n <= freeDescriptors.count else { return nil }
    let taken = Array(freeDescriptors.suffix(n).reversed())
    freeDescriptors.removeLast(n)
    return taken
  }

  func returnDescriptors(_ d: [UInt16]) { freeDescriptors.append(contentsOf: d.reversed()) }

  func track(head: UInt16, _ p: Pending) {
    pending[Int(head)] = p
    inFlight += 1
  }

  // MARK: Completions

  /// used->idx as the device last published it.
  var deviceUsedIdx: UInt16 { UInt16(littleEndian: strata_load_acquire_u16(usedIdxPointer)) }

  /// Whether used->idx moved past what has been reaped.
  func hasUsed() -> Bool { UInt16(littleEndian: strata_load_acquire_u16(usedIdxPointer)) != lastUsedIdx }

  /// Reaps the used ring.
  func reap(memory: GuestMemory) throws(VhostClientError) -> [VhostCompletion] {
    let usedIdx = UInt16(littleEndian: strata_load_acquire_u16(usedIdxPointer))
    let count = Int(usedIdx &- lastUsedIdx)
    guard count <= size else {
      throw .protocolViolation("queue \(index): used idx moved from \(lastUsedIdx) to \(usedIdx), more than \(size)")
    }
    guard count > 0 else { return [] }
    let now = monotonicNanoseconds()
    var out: [VhostCompletion] = []
    out.reserveCapacity(count)
    for _ in 0..<count {
      let slot = Int(lastUsedIdx) % size
      let e = used + 4 + 8 * slot
      let id = UInt32(littleEndian: e.loadUnaligned(as: UInt32.self))
      let len = UInt32(littleEndian: e.loadUnaligned(fromByteOffset: 4, as: UInt32.self))
      lastUsedIdx &+= 1
      if id < UInt32(size), let p = pending[Int(id)] {
        pending[Int(id)] = nil
        inFlight -= 1
        let status = memory.pointer(p.headerAddress + 16).load(as: UInt8.self)
        var data: [UInt8] = []
        if p.copyData, p.writableLength > 0, let d = p.dataAddress {
          data = memory.read(at: d + UInt64(p.writableOffset), count: p.writableLength)
        }
        memory.free(p.headerAddress, count: 64)
        if let d = p.dataAddress { memory.free(d, count: p.dataCount) }
        if let i = p.indirectAddress { memory.free(i, count: 16 * p.indirectCount) }
        returnDescriptors(p.descriptors)
        out.append(
          VhostCompletion(
            queue: index, requestID: p.id, head: id, usedLength: len, status: status, data: data,
            latencyNs: now &- p.submitNs))
      } else {
        out.append(
          VhostCompletion(queue: index, requestID: nil, head: id, usedLength: len, status: nil, data: [], latencyNs: 0))
      }
    }
    return out
  }

  /// Prepares to sleep: with EVENT_IDX asks for a notification at the next used entry. Returns
  /// false when entries arrived meanwhile (do not sleep).
  func armNotification() -> Bool {
    if eventIdx {
      strata_store_release_u16(usedEventPointer, lastUsedIdx.littleEndian)
      strata_fence_seq_cst()
    }
    return !hasUsed()
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
