import CStrataLinux
import VhostProtocol

/// One packed virtqueue's inflight region (QueueRegionPacked, laid out in `InflightArea`) and
/// the back-end's bookkeeping for it, following vhost-user.rst ("Inflight I/O tracking", packed
/// virtqueue):
///
/// - a popped buffer's ring descriptors (addr, len, flags, id) are saved in entries taken from
///   the region's free list; the first (the head, at old_free_head) also gets the number of
///   descriptors, the last entry, a pop counter and the in-flight mark, and old_free_head moves
///   past the buffer, which commits it;
/// - before a used descriptor's flags are written its entries go back on the free list and
///   used_idx (and used_wrap_counter) advance past it; after, the mark is cleared and the batch
///   committed by copying free_head, used_wrap_counter and used_idx into their old_ fields;
/// - a new back-end (`recover`) commits a batch cut short if its used descriptor (at
///   old_used_idx) was written, rolls it back otherwise, clears the marks of the free list and
///   resubmits the marked heads in counter order from the descriptors saved in the region: the
///   ring slots they came from may have been overwritten by used descriptors since.
///
/// Every used buffer is its own batch (QueueWorker publishes them one at a time anyway).
///
/// The region is front-end memory: it is read, with every index, count and link checked, only
/// by `recover`. While the ring runs the back-end writes it from private copies of the links,
/// so a front-end that scribbles on it can derail the next recovery (which refuses what does
/// not add up), never this process.
@_spi(Fuzzing) public final class PackedInflightRing: InflightResumption, @unchecked Sendable {
  /// A ring descriptor as saved in the region.
  public struct Descriptor: Equatable, Sendable {
    public var addr: UInt64
    public var len: UInt32
    public var flags: UInt16
    public var id: UInt16
  }

  /// A buffer the previous back-end popped and never returned.
  public struct Resubmission: Equatable, Sendable {
    /// Its head entry in the region.
    public var entry: UInt16
    /// Its buffer id (the last descriptor's, as for a buffer popped from the ring).
    public var id: UInt16
    public var descriptors: [Descriptor]
  }

  struct Recovery {
    /// The ring base to resume from (`PackedQueue.base` encoding), or nil when the region was
    /// (re)initialized: then the SET_VRING_BASE value stands.
    var base: UInt32?
    var resubmitted = 0
    /// The previous back-end died between writing a used descriptor and committing it.
    var committedLastBatch = false
    /// The previous back-end died inside a batch whose used descriptor it had not written.
    var rolledBack = false
    /// Why the region was refused and reinitialized (nothing resubmitted), if it was.
    var refused: String?
  }

  private struct Refused: Error {
    var reason: String
    init(_ reason: String) { self.reason = reason }
  }

  let area: InflightArea
  let queue: Int
  private let region: UnsafeMutableRawPointer
  /// Entries in `desc[]`: the area's queue size (never read back from shared memory).
  let descNum: Int
  /// Ends the free list: one past the last entry (free_head is this when every entry is used).
  private let end: UInt16
  /// The ring the region describes (set by `recover` and `attach`).
  private(set) var ringSize = 0

  // What this back-end last wrote into the region.
  private var next: [UInt16]
  private var last: [UInt16]
  private var num: [UInt16]
  private var freeHead: UInt16 = 0
  /// Entries on the free list.
  private var freeCount: Int
  private var usedIdx: UInt16 = 0
  private var usedWrap = true
  /// The next counter value to stamp on a popped head.
  private(set) var counter: UInt64 = 0
  /// The head entry of each buffer id in flight (`end` for an id not in flight).
  private var entryOfID: [UInt16]

  /// Buffers in flight when the previous back-end stopped, oldest pop first.
  var resubmit: [Resubmission] = []
  /// Set when the ring resumed an initialized region (see `InflightRing.resumed`).
  var resumed = false
  var resubmissionsLeft: Int { resubmit.count }

  init(area: InflightArea, queue: Int) {
    precondition(area.packed && area.queueSize < Int(UInt16.max))
    self.area = area
    self.queue = queue
    region = area.regionStart(queue)
    descNum = area.queueSize
    end = UInt16(descNum)
    next = (0..<descNum).map { UInt16($0 + 1) }
    last = Array(repeating: 0, count: descNum)
    num = Array(repeating: 0, count: descNum)
    freeCount = descNum
    entryOfID = Array(repeating: UInt16(descNum), count: descNum)
  }

  // MARK: Fields

  private static let versionOffset = 8
  private static let freeHeadOffset = 12
  private static let oldFreeHeadOffset = 14
  private static let usedIdxOffset = 16
  private static let oldUsedIdxOffset = 18
  private static let usedWrapOffset = 20
  private static let oldUsedWrapOffset = 21

  private func field(_ offset: Int) -> UnsafeMutablePointer<UInt16> {
    (region + offset).assumingMemoryBound(to: UInt16.self)
  }
  private func load(_ offset: Int) -> UInt16 { UInt16(littleEndian: strata_load_acquire_u16(field(offset))) }
  private func store(_ offset: Int, _ v: UInt16) { strata_store_release_u16(field(offset), v.littleEndian) }
  /// The wrap counters are single bytes; plain stores, ordered by the release stores after them.
  private func storeWrap(_ offset: Int, _ wrap: Bool) {
    region.storeBytes(of: wrap ? 1 : 0, toByteOffset: offset, as: UInt8.self)
  }

  private func entry(_ i: Int) -> UnsafeMutableRawPointer {
    region + InflightArea.packedHeaderSize + InflightArea.packedDescStateSize * i
  }
  /// `inflight` and its padding byte as one u16, so that the mark can be stored with release
  /// ordering (the padding stays 0).
  private func markPointer(_ i: Int) -> UnsafeMutablePointer<UInt16> { entry(i).assumingMemoryBound(to: UInt16.self) }
  private func entryU16(_ i: Int, _ offset: Int) -> UInt16 {
    UInt16(littleEndian: entry(i).load(fromByteOffset: offset, as: UInt16.self))
  }
  private func setEntryU16(_ i: Int, _ offset: Int, _ v: UInt16) {
    entry(i).storeBytes(of: v.littleEndian, toByteOffset: offset, as: UInt16.self)
  }

  var version: UInt16 { load(Self.versionOffset) }
  func isInflight(_ i: Int) -> Bool { entry(i).load(as: UInt8.self) != 0 }
  /// Where the next used descriptor goes, as this back-end recorded it.
  var usedPosition: (index: UInt16, wrap: Bool) { (usedIdx, usedWrap) }
  /// Ring descriptors popped and not yet returned.
  var descriptorsInFlight: Int { descNum - freeCount }

  // MARK: Start

  /// Called when the ring starts after SET_VRING_KICK (or a new area). A region never
  /// initialized is initialized for the ring position `base` (SET_VRING_BASE); otherwise the
  /// region is recovered as the spec says ("When reconnecting") and the ring resumes after the
  /// buffers in flight: its used position is the region's, its available position is as many
  /// descriptors further on as are in flight (the slots between the two are the device's), and
  /// SET_VRING_BASE is ignored (after a back-end crash QEMU has only a stale value for a packed
  /// ring). A region that does not add up is reinitialized: nothing is resubmitted.
  func recover(ringSize: Int, ring: UnsafeRawPointer, base: UInt32) -> Recovery {
    precondition(ringSize >= 1 && ringSize <= descNum)
    resubmit = []
    resumed = false
    let version = self.version
    guard version != 0 else {
      initialize(ringSize: ringSize, base: base)
      return Recovery(base: nil)
    }
    resumed = true
    do throws(Refused) {
      return try resume(version: version, ringSize: ringSize, ring: ring)
    } catch {
      initialize(ringSize: ringSize, base: base)
      return Recovery(base: nil, refused: error.reason)
    }
  }

  /// Called when the ring starts again without a recovery (SET_MEM_TABLE and the like, or
  /// SET_VRING_ENABLE): returns the base to start from. Normally `base` itself; if the ring's
  /// size or position changed meanwhile, a region with nothing in flight is reinitialized for
  /// it, one with buffers still to resubmit keeps its own position (`reinitialized` says
  /// whether those were dropped because the ring's size changed).
  func attach(ringSize: Int, base: UInt32) -> (base: UInt32, reinitialized: Bool) {
    precondition(ringSize >= 1 && ringSize <= descNum)
    let used = UInt16((base >> 16) & 0x7FFF) % UInt16(ringSize)
    let wrap = base & 0x8000_0000 != 0
    if ringSize == self.ringSize && used == usedIdx && wrap == usedWrap { return (base, false) }
    if ringSize == self.ringSize && freeCount < descNum { return (currentBase, false) }
    let dropped = freeCount < descNum
    resubmit = []
    initialize(ringSize: ringSize, base: base)
    return (base, dropped)
  }

  /// The base of a ring whose every popped buffer is in this region.
  private var currentBase: UInt32 {
    var avail = Int(usedIdx) + descriptorsInFlight
    var availWrap = usedWrap
    if avail >= ringSize {
      avail -= ringSize
      availWrap.toggle()
    }
    return UInt32(avail) | (availWrap ? 0x8000 : 0) | UInt32(usedIdx) << 16 | (usedWrap ? 0x8000_0000 : 0)
  }

  /// A fresh region for a ring at `base` with nothing in flight: every entry on the free list,
  /// in order (as DPDK lays it out), old_ fields equal to the current ones.
  private func initialize(ringSize: Int, base: UInt32) {
    self.ringSize = ringSize
    for i in 0..<descNum {
      entry(i).initializeMemory(as: UInt8.self, repeating: 0, count: InflightArea.packedDescStateSize)
      setEntryU16(i, 2, UInt16(i + 1))
      next[i] = UInt16(i + 1)
      last[i] = 0
      num[i] = 0
      entryOfID[i] = end
    }
    freeHead = 0
    freeCount = descNum
    usedIdx = UInt16((base >> 16) & 0x7FFF) % UInt16(ringSize)
    usedWrap = base & 0x8000_0000 != 0
    counter = 0
    region.storeBytes(of: UInt64(0), as: UInt64.self)
    (region + 22).initializeMemory(as: UInt8.self, repeating: 0, count: InflightArea.packedHeaderSize - 22)
    store(Self.freeHeadOffset, 0)
    store(Self.oldFreeHeadOffset, 0)
    storeWrap(Self.usedWrapOffset, usedWrap)
    storeWrap(Self.oldUsedWrapOffset, usedWrap)
    store(Self.usedIdxOffset, usedIdx)
    store(Self.oldUsedIdxOffset, usedIdx)
    // Last, with release: the rest of the region is in memory before it says it is initialized.
    store(Self.versionOffset, InflightArea.currentVersion)
  }

  /// Recovers an initialized region; throws (having written nothing) when it does not add up.
  private func resume(version: UInt16, ringSize: Int, ring: UnsafeRawPointer) throws(Refused) -> Recovery {
    guard version == InflightArea.currentVersion else { throw Refused("unknown version \(version)") }
    var free = load(Self.freeHeadOffset)
    let oldFree = load(Self.oldFreeHeadOffset)
    var used = load(Self.usedIdxOffset)
    let oldUsed = load(Self.oldUsedIdxOffset)
    var wrap = region.load(fromByteOffset: Self.usedWrapOffset, as: UInt8.self)
    let oldWrap = region.load(fromByteOffset: Self.oldUsedWrapOffset, as: UInt8.self)
    guard free <= end, oldFree <= end else {
      throw Refused("free list heads \(free) and \(oldFree) for \(descNum) entries")
    }
    guard Int(used) < ringSize, Int(oldUsed) < ringSize else {
      throw Refused("used indices \(used) and \(oldUsed) in a ring of \(ringSize)")
    }
    guard wrap <= 1, oldWrap <= 1 else { throw Refused("wrap counters \(wrap) and \(oldWrap)") }
    var recovery = Recovery(base: nil)
    // The spec compares used_idx alone; the wrap counters too catch a batch of exactly one lap
    // (a chain as long as the ring), which leaves used_idx where it was.
    if used != oldUsed || wrap != oldWrap {
      // The used descriptor at old_used_idx still has the flags the driver made it available
      // with in lap old_used_wrap_counter (AVAIL = wrap, USED = !wrap) unless the previous
      // back-end wrote it: then its batch is committed, otherwise rolled back.
      let flags = UInt16(
        littleEndian: strata_load_acquire_u16((ring + 16 * Int(oldUsed) + 14).assumingMemoryBound(to: UInt16.self)))
      let bits = VirtqDescFlag.packedAvail | VirtqDescFlag.packedUsed
      if flags & bits != (oldWrap != 0 ? VirtqDescFlag.packedAvail : VirtqDescFlag.packedUsed) {
        recovery.committedLastBatch = true
      } else {
        free = oldFree
        used = oldUsed
        wrap = oldWrap
        recovery.rolledBack = true
      }
    }

    // One read of every entry: the checks and the bookkeeping use these copies.
    var links = [UInt16](repeating: 0, count: descNum)
    var lasts = [UInt16](repeating: 0, count: descNum)
    var marked: [Int] = []
    for i in 0..<descNum {
      links[i] = entryU16(i, 2)
      lasts[i] = entryU16(i, 4)
      if isInflight(i) { marked.append(i) }
    }
    // 0: not seen, 1: on the free list, 2: part of a buffer in flight.
    var state = [UInt8](repeating: 0, count: descNum)
    var freeList: [Int] = []
    var e = free
    while e != end {
      guard e < end else { throw Refused("free list links to entry \(e) of \(descNum)") }
      guard state[Int(e)] == 0 else { throw Refused("free list loops back to entry \(e)") }
      state[Int(e)] = 1
      freeList.append(Int(e))
      e = links[Int(e)]
    }

    var found: [(resubmission: Resubmission, counter: UInt64)] = []
    var idInFlight = [Bool](repeating: false, count: ringSize)
    var inFlight = 0
    for head in marked where state[head] != 1 {
      guard state[head] == 0 else { throw Refused("entry \(head) is marked in flight inside another buffer") }
      let count = Int(entryU16(head, 6))
      guard count >= 1, count <= ringSize else { throw Refused("entry \(head) holds \(count) descriptors") }
      var descriptors: [Descriptor] = []
      descriptors.reserveCapacity(count)
      var e = head
      for k in 0..<count {
        if k > 0 {
          let link = links[e]
          guard link < end, state[Int(link)] == 0 else {
            throw Refused("buffer at entry \(head) links to entry \(link), past the end, free or in another buffer")
          }
          e = Int(link)
        }
        state[e] = 2
        let d = entry(e)
        descriptors.append(
          Descriptor(
            addr: UInt64(littleEndian: d.load(fromByteOffset: 24, as: UInt64.self)),
            len: UInt32(littleEndian: d.load(fromByteOffset: 20, as: UInt32.self)),
            flags: entryU16(e, 18), id: entryU16(e, 16)))
      }
      guard lasts[head] == UInt16(e) else {
        throw Refused("buffer at entry \(head) ends at entry \(e), its last field says \(lasts[head])")
      }
      let id = descriptors[count - 1].id
      guard Int(id) < ringSize, !idInFlight[Int(id)] else {
        throw Refused("buffer id \(id) at entry \(head): past the ring of \(ringSize) or in flight twice")
      }
      idInFlight[Int(id)] = true
      inFlight += count
      guard inFlight <= ringSize else { throw Refused("more descriptors in flight than the ring of \(ringSize) has") }
      let counter = UInt64(littleEndian: entry(head).load(fromByteOffset: 8, as: UInt64.self))
      found.append((Resubmission(entry: UInt16(head), id: id, descriptors: descriptors), counter))
    }
    guard freeList.count + inFlight == descNum else {
      throw Refused("\(descNum - freeList.count - inFlight) entries are neither free nor in flight")
    }

    // It adds up: the region gets the committed (or rolled-back) state and the free list loses
    // the marks of pops cut short.
    self.ringSize = ringSize
    store(Self.freeHeadOffset, free)
    store(Self.oldFreeHeadOffset, free)
    storeWrap(Self.usedWrapOffset, wrap != 0)
    storeWrap(Self.oldUsedWrapOffset, wrap != 0)
    store(Self.usedIdxOffset, used)
    store(Self.oldUsedIdxOffset, used)
    for i in freeList where isInflight(i) { strata_store_release_u16(markPointer(i), 0) }
    found.sort { $0.counter < $1.counter }
    next = links
    for i in 0..<descNum { entryOfID[i] = end }
    for (r, _) in found {
      last[Int(r.entry)] = lasts[Int(r.entry)]
      num[Int(r.entry)] = UInt16(r.descriptors.count)
      entryOfID[Int(r.id)] = r.entry
    }
    freeHead = free
    freeCount = freeList.count
    usedIdx = used
    usedWrap = wrap != 0
    counter = found.last.map { $0.counter &+ 1 } ?? 0
    resubmit = found.map(\.resubmission)
    recovery.base = currentBase
    recovery.resubmitted = found.count
    return recovery
  }

  // MARK: Running

  /// "When receiving available buffers": buffer `id` was popped from the `count` ring slots
  /// from `start`. Throws, recording nothing, when it cannot be in flight: its id already is,
  /// or the region has no room (a driver that made slots available it did not own).
  func popped(id: UInt16, ring: UnsafeRawPointer, start: Int, count: Int) throws(ChainError) {
    precondition(count >= 1 && count <= ringSize && Int(id) < ringSize && start < ringSize)
    guard entryOfID[Int(id)] == end else { throw .bufferInFlight(id) }
    guard count <= freeCount else { throw .inflightFull }
    let head = Int(freeHead)
    setEntryU16(head, 6, 0)
    entry(head).storeBytes(of: counter.littleEndian, toByteOffset: 8, as: UInt64.self)
    counter &+= 1
    // Release: the counter is in memory before the mark.
    strata_store_release_u16(markPointer(head), UInt16(1).littleEndian)
    var e = head
    var slot = start
    for k in 0..<count {
      if k == count - 1 {
        setEntryU16(head, 4, UInt16(e))
        last[head] = UInt16(e)
      }
      setEntryU16(head, 6, UInt16(k + 1))
      let r = ring + 16 * slot
      let d = entry(e)
      d.storeBytes(of: r.loadUnaligned(as: UInt64.self), toByteOffset: 24, as: UInt64.self)
      d.storeBytes(of: r.loadUnaligned(fromByteOffset: 8, as: UInt32.self), toByteOffset: 20, as: UInt32.self)
      d.storeBytes(of: r.loadUnaligned(fromByteOffset: 12, as: UInt16.self), toByteOffset: 16, as: UInt16.self)
      d.storeBytes(of: r.loadUnaligned(fromByteOffset: 14, as: UInt16.self), toByteOffset: 18, as: UInt16.self)
      // freeCount >= count: the list has an entry for every descriptor of the buffer.
      e = Int(next[e])
      store(Self.freeHeadOffset, UInt16(e))
      slot += 1
      if slot == ringSize { slot = 0 }
    }
    num[head] = UInt16(count)
    freeCount -= count
    entryOfID[Int(id)] = UInt16(head)
    freeHead = UInt16(e)
    // The buffer is recorded: a back-end dying from here on resubmits it.
    store(Self.oldFreeHeadOffset, freeHead)
  }

  /// "When supplying used buffers", before the used descriptor's flags are written: the
  /// buffer's entries go back on the free list and the used position moves past it.
  func willPublish(_ id: UInt16) {
    let head = entryOfID[Int(id)]
    precondition(head != end, "buffer \(id) published but not in flight")
    let tail = Int(last[Int(head)])
    setEntryU16(tail, 2, freeHead)
    next[tail] = freeHead
    freeHead = head
    store(Self.freeHeadOffset, head)
    var u = Int(usedIdx) + Int(num[Int(head)])
    if u >= ringSize {
      u -= ringSize
      usedWrap.toggle()
      storeWrap(Self.usedWrapOffset, usedWrap)
    }
    usedIdx = UInt16(u)
    store(Self.usedIdxOffset, usedIdx)
  }

  /// After the used descriptor's flags were written: the mark goes and the batch is committed.
  /// old_used_idx goes last, after old_free_head and the wrap counter, so that a back-end dying
  /// in between leaves a state `recover` commits (the used descriptor is out).
  func published(_ id: UInt16) {
    let head = entryOfID[Int(id)]
    precondition(head != end, "buffer \(id) published but not in flight")
    strata_store_release_u16(markPointer(Int(head)), 0)
    entryOfID[Int(id)] = end
    freeCount += Int(num[Int(head)])
    store(Self.oldFreeHeadOffset, freeHead)
    storeWrap(Self.oldUsedWrapOffset, usedWrap)
    store(Self.oldUsedIdxOffset, usedIdx)
  }
}
