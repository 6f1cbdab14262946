// The packed virtqueue from the driver's side: this test plays the guest driver on a ring in a
// memfd-backed guest memory, as Linux's virtio_ring.c does, and checks what the device side
// (PackedQueue) reads and writes back.

import CStrataLinux
import Glibc
import Testing
import VhostProtocol

@_spi(Fuzzing) @testable import StrataVhost

/// One guest memory region of 1 MiB at guest address 0 (front-end address 0x1000_0000). Shared
/// with PackedInflightTests, like `Driver`.
final class Guest {
  let memory = GuestMemory()
  let base: UnsafeMutableRawPointer
  /// The memfd, kept open for a SET_MEM_TABLE.
  let fd: Int32
  static let size = 1 << 20
  static let ring = 0x1000  // descriptor ring; event areas at 0x0 (driver) and 0x10 (device)
  static let indirectTables = 0x40000
  static let buffers = 0x80000

  init() throws {
    fd = strata_memfd("packed-test")
    #expect(ftruncate(fd, off_t(Self.size)) == 0)
    try memory.add(
      MemoryRegion(guestAddress: 0, size: UInt64(Self.size), userAddress: 0x1000_0000, mmapOffset: 0), fd: fd)
    base = memory.guest(0, length: Self.size)!
  }

  deinit { close(fd) }

  func queue(size: Int, base: UInt32 = 0x8000_8000, eventIdx: Bool = false) -> PackedQueue {
    PackedQueue(
      size: size, ring: self.base + Self.ring, driverEvent: self.base, deviceEvent: self.base + 0x10, base: base,
      eventIdx: eventIdx, indirect: true, maxSegments: 16)
  }

  func descriptor(_ i: Int) -> UnsafeMutableRawPointer { base + Self.ring + 16 * i }
}

/// The driver's side of the ring: next free slot, wrap counter, next used slot.
struct Driver {
  let guest: Guest
  let size: Int
  var next = 0
  var wrap = true
  var usedNext = 0
  var usedWrap = true
  var lengths: [UInt16: Int] = [:]

  /// Makes a chain of buffers available under `id`; the head's flags are written last.
  mutating func add(id: UInt16, _ buffers: [(address: UInt64, length: UInt32, writable: Bool)]) {
    let head = next
    var headFlags: UInt16 = 0
    for (k, b) in buffers.enumerated() {
      let d = guest.descriptor(next)
      d.storeBytes(of: b.address.littleEndian, as: UInt64.self)
      d.storeBytes(of: b.length.littleEndian, toByteOffset: 8, as: UInt32.self)
      d.storeBytes(of: id.littleEndian, toByteOffset: 12, as: UInt16.self)
      var f: UInt16 = (b.writable ? VirtqDescFlag.write : 0) | (k < buffers.count - 1 ? VirtqDescFlag.next : 0)
      f |= wrap ? VirtqDescFlag.packedAvail : VirtqDescFlag.packedUsed
      if k == 0 { headFlags = f } else { d.storeBytes(of: f.littleEndian, toByteOffset: 14, as: UInt16.self) }
      next += 1
      if next == size {
        next = 0
        wrap.toggle()
      }
    }
    lengths[id] = buffers.count
    strata_store_release_u16(
      (guest.descriptor(head) + 14).assumingMemoryBound(to: UInt16.self), headFlags.littleEndian)
  }

  /// The next used element, if the device wrote one.
  mutating func used() -> (id: UInt16, length: UInt32)? {
    let d = guest.descriptor(usedNext)
    let f = UInt16(littleEndian: strata_load_acquire_u16((d + 14).assumingMemoryBound(to: UInt16.self)))
    guard (f & VirtqDescFlag.packedAvail != 0) == usedWrap, (f & VirtqDescFlag.packedUsed != 0) == usedWrap else {
      return nil
    }
    let id = UInt16(littleEndian: d.load(fromByteOffset: 12, as: UInt16.self))
    let length = UInt32(littleEndian: d.load(fromByteOffset: 8, as: UInt32.self))
    usedNext += lengths[id] ?? 1
    if usedNext >= size {
      usedNext -= size
      usedWrap.toggle()
    }
    return (id, length)
  }

  func suppress(_ flags: UInt16, offWrap: UInt16 = 0) {
    guest.base.storeBytes(of: offWrap.littleEndian, as: UInt16.self)
    guest.base.storeBytes(of: flags.littleEndian, toByteOffset: 2, as: UInt16.self)
  }
}

@Suite struct PackedQueueTests {
  /// Chains of one to three descriptors, completed out of order, over many laps of a ring whose
  /// size is not a power of two: the device sees every buffer once with the right segments, and
  /// the driver reads back every used element with its id and length.
  @Test func chainsOverManyLapsOutOfOrder() throws {
    let guest = try Guest()
    let size = 7
    let queue = guest.queue(size: size)
    var driver = Driver(guest: guest, size: size)
    var segments: [GuestSegment] = []
    var nextID: UInt16 = 0
    var completedIDs: [UInt16] = []
    for round in 0..<50 {
      // Two chains per round, sizes cycling 1-3, ids cycling below the ring size.
      var expected: [UInt16: [Int]] = [:]
      for k in 0..<2 {
        let n = (round + k) % 3 + 1
        let id = nextID % UInt16(size)
        nextID += 1
        let buffers = (0..<n).map { j in
          (address: UInt64(Guest.buffers + 4096 * Int(id) + 512 * j), length: UInt32(512 + j), writable: j == n - 1)
        }
        driver.add(id: id, buffers)
        expected[id] = buffers.map { Int($0.length) }
      }
      var popped: [UInt16] = []
      while let id = try queue.next(into: &segments, memory: guest.memory) {
        #expect(segments.map(\.length) == expected[id], "round \(round) id \(id)")
        #expect(segments.last?.writable == true && segments.dropLast().allSatisfy { !$0.writable })
        popped.append(id)
      }
      #expect(Set(popped) == Set(expected.keys), "round \(round)")
      // Complete in reverse order of arrival.
      for id in popped.reversed() { queue.pushUsed(head: id, written: UInt32(id) + 1) }
      while let (id, length) = driver.used() {
        #expect(length == UInt32(id) + 1)
        completedIDs.append(id)
      }
    }
    #expect(completedIDs.count == 100, "used elements read back: \(completedIDs.count)")
    // The ring resumes where it stopped: index and wrap counter in the vhost-user base.
    let position = UInt32(driver.next) | (driver.wrap ? 0x8000 : 0)
    #expect(queue.base == position | position << 16)
  }

  @Test func indirectTableAndBadChains() throws {
    let guest = try Guest()
    let queue = guest.queue(size: 8)
    var driver = Driver(guest: guest, size: 8)
    var segments: [GuestSegment] = []
    // An indirect table of three entries: header, data, status.
    let table = guest.base + Guest.indirectTables
    for (i, (length, flags)) in [(16, UInt16(0)), (4096, VirtqDescFlag.write), (1, VirtqDescFlag.write)].enumerated() {
      let e = table + 16 * i
      e.storeBytes(of: UInt64(Guest.buffers + 8192 * i).littleEndian, as: UInt64.self)
      e.storeBytes(of: UInt32(length).littleEndian, toByteOffset: 8, as: UInt32.self)
      e.storeBytes(of: flags.littleEndian, toByteOffset: 14, as: UInt16.self)
    }
    driver.add(id: 5, [(UInt64(Guest.indirectTables), 48, false)])
    guest.descriptor(0).storeBytes(
      of: (VirtqDescFlag.indirect | VirtqDescFlag.packedAvail).littleEndian, toByteOffset: 14, as: UInt16.self)
    #expect(try queue.next(into: &segments, memory: guest.memory) == 5)
    #expect(segments.map(\.length) == [16, 4096, 1])
    #expect(segments.map(\.writable) == [false, true, true])
    queue.pushUsed(head: 5, written: 4097)
    #expect(driver.used()! == (5, 4097))
    // Nothing more is available.
    #expect(try queue.next(into: &segments, memory: guest.memory) == nil)

    // An address outside guest memory, and an id past the ring, break the ring.
    driver.add(id: 1, [(UInt64(Guest.size), 512, true)])
    #expect(throws: ChainError.self) { try queue.next(into: &segments, memory: guest.memory) }
    let other = try Guest()
    let q2 = other.queue(size: 8)
    var d2 = Driver(guest: other, size: 8)
    d2.add(id: 9, [(UInt64(Guest.buffers), 512, true)])
    #expect(throws: ChainError.self) { try q2.next(into: &segments, memory: other.memory) }
  }

  /// Kick suppression (device event area): without EVENT_IDX the driver kicks for every buffer;
  /// with it, only for the buffer at the position the device looks at next (off_wrap), which
  /// the device moves as it takes buffers, also across a wrap of the ring.
  @Test(arguments: [false, true])
  func kickSuppression(eventIdx: Bool) throws {
    let guest = try Guest()
    let queue = guest.queue(size: 8, eventIdx: eventIdx)
    var driver = Driver(guest: guest, size: 8)
    var segments: [GuestSegment] = []
    func deviceEvent() -> (offWrap: UInt16, flags: UInt16) {
      (
        UInt16(littleEndian: guest.base.load(fromByteOffset: 0x10, as: UInt16.self)),
        UInt16(littleEndian: guest.base.load(fromByteOffset: 0x12, as: UInt16.self))
      )
    }
    guard eventIdx else {
      #expect(deviceEvent().flags == VirtqEventFlag.enable)
      return
    }
    #expect(deviceEvent().flags == VirtqEventFlag.desc)
    #expect(deviceEvent().offWrap == 0x8000, "position 0, wrap counter 1")
    for round in 1...11 {
      driver.add(id: UInt16(round % 8), [(UInt64(Guest.buffers), 512, true)])
      #expect(try queue.next(into: &segments, memory: guest.memory) == UInt16(round % 8))
      #expect(try queue.next(into: &segments, memory: guest.memory) == nil, "drained")
      queue.pushUsed(head: UInt16(round % 8), written: 1)
      _ = driver.used()
      let expected = UInt16(round % 8) | (round < 8 ? 0x8000 : 0)
      #expect(deviceEvent().offWrap == expected, "round \(round): the next position and its wrap counter")
    }
  }

  @Test func notificationSuppression() throws {
    let guest = try Guest()
    let queue = guest.queue(size: 8, eventIdx: true)
    var driver = Driver(guest: guest, size: 8)
    var segments: [GuestSegment] = []
    func roundTrip(_ id: UInt16) throws {
      driver.add(id: id, [(UInt64(Guest.buffers), 512, true)])
      #expect(try queue.next(into: &segments, memory: guest.memory) == id)
      queue.pushUsed(head: id, written: 1)
      _ = driver.used()
    }
    #expect(!queue.shouldNotify(), "nothing pushed yet")
    driver.suppress(VirtqEventFlag.enable)
    try roundTrip(0)
    #expect(queue.shouldNotify())
    #expect(!queue.shouldNotify(), "nothing new since")
    driver.suppress(VirtqEventFlag.disable)
    try roundTrip(1)
    #expect(!queue.shouldNotify())
    // EVENT_IDX: notify once the used position passes descriptor 4 of the current lap.
    driver.suppress(VirtqEventFlag.desc, offWrap: 4 | 0x8000)
    try roundTrip(2)
    try roundTrip(3)
    #expect(!queue.shouldNotify(), "used position 4 has not passed the event offset")
    try roundTrip(4)
    #expect(queue.shouldNotify(), "used position 5 passed offset 4")
  }
}
