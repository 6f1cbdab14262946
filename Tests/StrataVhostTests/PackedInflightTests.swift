// INFLIGHT_SHMFD for packed rings, from the driver's side: the test plays the guest driver on a
// packed ring in a memfd and keeps the inflight area the way a front-end does, "crashes" the
// back-end by dropping its queue objects (the memory stays), and checks what a new back-end
// built on the same memory resubmits.

import CStrataLinux
import Glibc
import StrataSimulation
import Testing
import VhostProtocol

@_spi(Fuzzing) @testable import StrataVhost

/// A packed ring with an inflight area, and the back-end objects a crash throws away.
private struct Setup {
  let guest: Guest
  var driver: Driver
  let size: Int
  /// The front-end's area; every back-end maps it anew, as after SET_INFLIGHT_FD.
  let frontEndArea: InflightArea
  var area: InflightArea
  var inflight: PackedInflightRing
  var queue: PackedQueue
  var segments: [GuestSegment] = []

  /// A fresh region (as GET_INFLIGHT_FD makes it) for a ring of `size` starting at `base`.
  init(size: Int, descNum: Int? = nil, base: UInt32 = 0x8000_8000) throws {
    guest = try Guest()
    driver = Driver(guest: guest, size: size)
    self.size = size
    frontEndArea = try InflightArea.allocate(numQueues: 1, queueSize: descNum ?? size, packed: true)
    area = try Self.map(frontEndArea)
    inflight = PackedInflightRing(area: area, queue: 0)
    let recovery = inflight.recover(ringSize: size, ring: guest.base + Guest.ring, base: base)
    #expect(recovery.base == nil && recovery.refused == nil, "a fresh region is initialized")
    queue = Self.queue(guest, size, base, inflight)
  }

  static func map(_ a: InflightArea) throws -> InflightArea {
    try InflightArea.map(fd: a.fd, a.wireDescription, maxQueues: 1, maxQueueSize: 1024, packed: true)
  }

  static func queue(_ guest: Guest, _ size: Int, _ base: UInt32, _ inflight: PackedInflightRing) -> PackedQueue {
    PackedQueue(
      size: size, ring: guest.base + Guest.ring, driverEvent: guest.base, deviceEvent: guest.base + 0x10, base: base,
      eventIdx: false, indirect: true, maxSegments: 16, inflight: inflight)
  }

  var region: UnsafeMutableRawPointer { frontEndArea.regionStart(0) }

  /// Makes buffer `id` of `length` descriptors available (the last one writable).
  mutating func add(_ id: UInt16, length: Int) {
    driver.add(
      id: id,
      (0..<length).map { j in
        (
          address: UInt64(Guest.buffers + 4096 * Int(id) + 512 * j), length: UInt32(100 * Int(id) + j + 1),
          writable: j == length - 1
        )
      })
  }

  /// What `add` put in buffer `id`'s segments: their lengths.
  static func lengths(_ id: UInt16, _ length: Int) -> [Int] { (0..<length).map { 100 * Int(id) + $0 + 1 } }

  mutating func pop() throws -> [UInt16] {
    var ids: [UInt16] = []
    while let id = try queue.next(into: &segments, memory: guest.memory) { ids.append(id) }
    return ids
  }

  mutating func usedIDs() -> [UInt16] {
    var ids: [UInt16] = []
    while let (id, _) = driver.used() { ids.append(id) }
    return ids
  }

  /// The back-end dies: its queue and inflight objects go, the memory stays. A new back-end maps
  /// the front-end's area and recovers, told the stale ring base `staleBase`.
  mutating func restart(staleBase: UInt32 = 0x8000_8000) throws -> PackedInflightRing.Recovery {
    area = try Self.map(frontEndArea)
    inflight = PackedInflightRing(area: area, queue: 0)
    let recovery = inflight.recover(ringSize: size, ring: guest.base + Guest.ring, base: staleBase)
    queue = Self.queue(guest, size, recovery.base ?? staleBase, inflight)
    return recovery
  }

  /// Runs the resubmissions as QueueWorker does; returns their ids and segment lengths.
  mutating func resubmit() throws -> [(UInt16, [Int])] {
    var out: [(UInt16, [Int])] = []
    while !inflight.resubmit.isEmpty {
      let r = inflight.resubmit.removeFirst()
      try queue.walk(r.descriptors, memory: guest.memory, into: &segments)
      out.append((r.id, segments.map(\.length)))
    }
    return out
  }

  /// The driver's position in the PackedQueue.base encoding (available and used alike).
  var driverBase: UInt32 {
    let avail = UInt32(driver.next) | (driver.wrap ? 0x8000 : 0)
    return avail | (UInt32(driver.usedNext) | (driver.usedWrap ? 0x8000 : 0)) << 16
  }

  func u16(_ offset: Int) -> UInt16 { region.load(fromByteOffset: offset, as: UInt16.self) }
  func setU16(_ offset: Int, _ v: UInt16) { region.storeBytes(of: v, toByteOffset: offset, as: UInt16.self) }
  static func entry(_ i: Int) -> Int { 32 + 32 * i }
  /// The region's entries marked in flight.
  var marked: [Int] {
    (0..<frontEndArea.queueSize).filter { region.load(fromByteOffset: Self.entry($0), as: UInt8.self) != 0 }
  }
}

@Suite struct PackedInflightTests {
  /// The spec's size for a packed region: 32-byte header and entries, rounded up to 64 bytes,
  /// which is DPDK's `32 * n + 29` rounded up; an area too small for packed regions is refused.
  @Test func regionSizes() throws {
    #expect(InflightArea.regionSize(queueSize: 1, packed: true) == 64)
    #expect(InflightArea.regionSize(queueSize: 2, packed: true) == 128)
    #expect(InflightArea.regionSize(queueSize: 256, packed: true) == 8256)
    for n in 1...1024 {
      #expect(InflightArea.regionSize(queueSize: n, packed: true) == (32 * n + 29 + 63) / 64 * 64)
    }
    #expect(InflightArea.regionSize(queueSize: 256) == 4160, "split size unchanged")
    let split = try InflightArea.allocate(numQueues: 2, queueSize: 256)
    #expect(throws: VhostError.self) {
      try InflightArea.map(fd: split.fd, split.wireDescription, maxQueues: 2, maxQueueSize: 1024, packed: true)
    }
    let packed = try InflightArea.allocate(numQueues: 2, queueSize: 256, packed: true)
    #expect(packed.mappingLength == 2 * 8256)
    let mapped = try InflightArea.map(
      fd: packed.fd, packed.wireDescription, maxQueues: 2, maxQueueSize: 1024, packed: true)
    #expect(mapped.regionStart(1) - mapped.regionStart(0) == 8256)
    #expect(mapped.regionStart(1).load(fromByteOffset: 10, as: UInt16.self) == 256, "desc_num set on map")
  }

  /// Buffers popped over a wrap, some completed out of order: after a crash exactly the popped
  /// but unpublished ones come back, oldest pop first, with their descriptors, the ring resumes
  /// at the driver's position whatever the stale SET_VRING_BASE says, and it goes on working.
  @Test func resubmitsWhatWasInFlightInOrder() throws {
    var s = try Setup(size: 8)
    // A first lap: three buffers of two descriptors, all completed.
    for id: UInt16 in 0..<3 { s.add(id, length: 2) }
    #expect(try s.pop() == [0, 1, 2])
    for id: UInt16 in [2, 0, 1] { s.queue.pushUsed(head: id, written: 1) }
    #expect(s.usedIDs() == [2, 0, 1])
    #expect(s.marked.isEmpty, "published buffers are not marked in flight")
    // Over the wrap: four more (six descriptors); 5 and 3 complete, 6 and 4 do not.
    for (id, length) in [(UInt16(6), 2), (4, 2), (5, 1), (3, 1)] { s.add(id, length: length) }
    #expect(try s.pop() == [6, 4, 5, 3])
    #expect(s.marked.count == 4)
    s.queue.pushUsed(head: 5, written: 1)
    s.queue.pushUsed(head: 3, written: 1)
    #expect(s.usedIDs() == [5, 3])
    #expect(s.marked.count == 2)

    let recovery = try s.restart()
    #expect(recovery.refused == nil)
    #expect(!recovery.committedLastBatch && !recovery.rolledBack)
    #expect(recovery.resubmitted == 2)
    #expect(recovery.base == s.driverBase, "resumes at the driver's position, not the stale base")
    // The driver's used position is 0 in lap 2, its next free slot 4: the in-flight 6 and 4.
    #expect(recovery.base == 0x0000_0004)
    #expect(s.inflight.resubmit.map(\.id) == [6, 4], "oldest pop first")
    let saved = s.inflight.resubmit.map { $0.descriptors.map(\.len) }
    #expect(saved == [[601, 602], [401, 402]])
    let resubmitted = try s.resubmit()
    #expect(resubmitted.map(\.0) == [6, 4])
    #expect(resubmitted.map(\.1) == [Setup.lengths(6, 2), Setup.lengths(4, 2)])
    #expect(s.inflight.resumed)
    // They complete on the new back-end; nothing the old one published comes back.
    s.queue.pushUsed(head: 4, written: 1)
    s.queue.pushUsed(head: 6, written: 1)
    #expect(s.usedIDs() == [4, 6])
    #expect(s.marked.isEmpty)
    // New buffers after them.
    s.add(7, length: 3)
    s.add(0, length: 1)
    #expect(try s.pop() == [7, 0])
    s.queue.pushUsed(head: 0, written: 1)
    #expect(s.usedIDs() == [0])

    // A second crash: only 7 is in flight; a third with nothing in flight resubmits nothing.
    let second = try s.restart()
    #expect(s.inflight.resubmit.map(\.id) == [7])
    #expect(second.base == s.driverBase)
    _ = try s.resubmit()
    s.queue.pushUsed(head: 7, written: 1)
    #expect(s.usedIDs() == [7])
    let third = try s.restart()
    #expect(third.resubmitted == 0 && third.refused == nil)
    #expect(third.base == s.driverBase)
    s.add(1, length: 1)
    #expect(try s.pop() == [1])
  }

  /// Random traffic (buffers of one to three descriptors, completed out of order, over many
  /// laps of rings of odd sizes) with back-end crashes at random moments, some inside a publish
  /// before its used descriptor is out: every new back-end resubmits exactly the buffers popped
  /// and not published, in pop order, with their descriptors, and resumes at the driver's
  /// position.
  @Test(arguments: 1...12 as ClosedRange<UInt64>)
  func randomTrafficAndCrashes(seed: UInt64) throws {
    var rng = SeededRandom(seed: seed)
    let size = [3, 5, 8, 13][Int(seed % 4)]
    var s = try Setup(size: size, descNum: size + Int(seed % 3))
    var lengths: [UInt16: Int] = [:]
    // Popped and not published, in pop order.
    var inFlight: [UInt16] = []
    var crashes = 0
    for step in 0..<300 {
      // The driver adds buffers while its ring has room.
      var busy = inFlight.reduce(0) { $0 + lengths[$1, default: 0] }
      var added: [UInt16] = []
      for _ in 0..<Int(rng.next() % 4) {
        let length = Int(rng.next() % 3) + 1
        let free = (0..<UInt16(size)).filter { !inFlight.contains($0) && !added.contains($0) }
        guard busy + length <= size, !free.isEmpty else { break }
        let id = free[Int(rng.next() % UInt64(free.count))]
        s.add(id, length: length)
        lengths[id] = length
        busy += length
        added.append(id)
      }
      #expect(try s.pop() == added, "seed \(seed) step \(step)")
      inFlight += added
      var completed: [UInt16] = []
      for _ in 0..<Int(rng.next() % 3) where !inFlight.isEmpty {
        let id = inFlight.remove(at: Int(rng.next() % UInt64(inFlight.count)))
        s.queue.pushUsed(head: id, written: 1)
        completed.append(id)
      }
      #expect(s.usedIDs() == completed, "seed \(seed) step \(step)")
      let dice = rng.next() % 6
      guard dice < 2 else { continue }
      let insidePublish = dice == 1 && !inFlight.isEmpty
      if insidePublish { s.inflight.willPublish(inFlight[Int(rng.next() % UInt64(inFlight.count))]) }
      crashes += 1
      let recovery = try s.restart()
      #expect(recovery.refused == nil, "seed \(seed) step \(step)")
      #expect(recovery.rolledBack == insidePublish, "seed \(seed) step \(step)")
      #expect(s.inflight.resubmit.map(\.id) == inFlight, "seed \(seed) step \(step)")
      #expect(recovery.base == s.driverBase, "seed \(seed) step \(step)")
      let again = try s.resubmit()
      #expect(
        again.map(\.1) == inFlight.map { Setup.lengths($0, lengths[$0, default: 0]) }, "seed \(seed) step \(step)")
    }
    #expect(crashes > 50)
  }

  /// A back-end dying inside a publish: before the used descriptor's flags were written the
  /// buffer is rolled back (and resubmitted); after, the batch is committed (and it is not).
  @Test func crashInsideAPublish() throws {
    var s = try Setup(size: 4)
    s.add(0, length: 1)
    s.add(1, length: 2)
    #expect(try s.pop() == [0, 1])
    // Died after moving used_idx and free_head for buffer 0, before its flags.
    s.inflight.willPublish(0)
    var recovery = try s.restart()
    #expect(recovery.rolledBack && !recovery.committedLastBatch)
    #expect(s.inflight.resubmit.map(\.id) == [0, 1])
    #expect(recovery.base == s.driverBase, "used position rolled back to the driver's")
    #expect(try s.resubmit().map(\.0) == [0, 1])

    // Died after writing buffer 1's used descriptor, before clearing its mark and committing.
    let region = s.region
    let head = try #require(
      s.marked.first(where: { region.load(fromByteOffset: Setup.entry($0) + 16, as: UInt16.self) == 1 }))
    let oldFields = (s.u16(14), s.u16(18), s.region.load(fromByteOffset: 21, as: UInt8.self))
    s.queue.pushUsed(head: 1, written: 1)
    #expect(s.usedIDs() == [1])
    s.setU16(14, oldFields.0)
    s.setU16(18, oldFields.1)
    s.region.storeBytes(of: oldFields.2, toByteOffset: 21, as: UInt8.self)
    s.region.storeBytes(of: UInt8(1), toByteOffset: Setup.entry(head), as: UInt8.self)
    recovery = try s.restart()
    #expect(recovery.committedLastBatch && !recovery.rolledBack)
    #expect(s.inflight.resubmit.map(\.id) == [0], "the published buffer 1 is not resubmitted")
    #expect(recovery.base == s.driverBase, "resumes after buffer 0, used position past buffer 1")
    _ = try s.resubmit()
    s.queue.pushUsed(head: 0, written: 1)
    #expect(s.usedIDs() == [0])
    #expect(s.marked.isEmpty)
  }

  /// A region that does not add up is refused: nothing resubmitted, the SET_VRING_BASE value
  /// stands, the region is reinitialized and the ring works.
  @Test func garbageRegionsAreRefused() throws {
    // Each case corrupts a region holding buffers 2 (two descriptors) and 3 (one) in flight.
    let cases: [(String, (inout Setup) -> Void)] = [
      ("unknown version", { $0.setU16(8, 7) }),
      ("free_head past the entries", { $0.setU16(12, 100) }),
      (
        "used_idx past the ring",
        {
          $0.setU16(16, 9); $0.setU16(18, 9)
        }
      ),
      ("wrap counter 2", { $0.region.storeBytes(of: UInt8(2), toByteOffset: 20, as: UInt8.self) }),
      (
        "id past the ring",
        { s in
          for e in s.marked { s.region.storeBytes(of: UInt16(200), toByteOffset: Setup.entry(e) + 16, as: UInt16.self) }
        }
      ),
      (
        "num 0",
        { s in
          for e in s.marked { s.region.storeBytes(of: UInt16(0), toByteOffset: Setup.entry(e) + 6, as: UInt16.self) }
        }
      ),
      (
        "num past the ring",
        { s in
          for e in s.marked { s.region.storeBytes(of: UInt16(9), toByteOffset: Setup.entry(e) + 6, as: UInt16.self) }
        }
      ),
      (
        "free list loop",
        { s in
          let free = Int(s.u16(12))
          s.region.storeBytes(of: UInt16(free), toByteOffset: Setup.entry(free) + 2, as: UInt16.self)
        }
      ),
      (
        "chain links back to its head",
        { s in
          for e in s.marked where s.region.load(fromByteOffset: Setup.entry(e) + 6, as: UInt16.self) == 2 {
            s.region.storeBytes(of: UInt16(e), toByteOffset: Setup.entry(e) + 2, as: UInt16.self)
          }
        }
      ),
      (
        "same id twice",
        { s in
          for e in s.marked { s.region.storeBytes(of: UInt16(3), toByteOffset: Setup.entry(e) + 16, as: UInt16.self) }
          // The two-descriptor buffer's id is in its last entry.
          for e in s.marked where s.region.load(fromByteOffset: Setup.entry(e) + 6, as: UInt16.self) == 2 {
            let tail = Int(s.region.load(fromByteOffset: Setup.entry(e) + 4, as: UInt16.self))
            s.region.storeBytes(of: UInt16(3), toByteOffset: Setup.entry(tail) + 16, as: UInt16.self)
          }
        }
      ),
      (
        "an entry leaked",
        { s in
          // The free list is 3 -> 4 -> ... -> 7: starting it at 4 loses entry 3.
          s.setU16(12, 4)
          s.setU16(14, 4)
        }
      ),
    ]
    for (what, corrupt) in cases {
      var s = try Setup(size: 8)
      s.add(2, length: 2)
      s.add(3, length: 1)
      #expect(try s.pop() == [2, 3])
      corrupt(&s)
      let stale: UInt32 = 0x8000_8000
      let recovery = try s.restart(staleBase: stale)
      #expect(recovery.refused != nil, "\(what): not refused")
      #expect(recovery.base == nil && s.inflight.resubmit.isEmpty, "\(what)")
      #expect(s.u16(8) == 1 && s.marked.isEmpty, "\(what): region not reinitialized")
      // Still usable: the stale base is the driver's first slot; the driver starts over there.
      s.driver = Driver(guest: s.guest, size: 8)
      s.guest.descriptor(0).initializeMemory(as: UInt8.self, repeating: 0, count: 16 * 8)
      s.add(5, length: 1)
      #expect(try s.pop() == [5], "\(what)")
      s.queue.pushUsed(head: 5, written: 1)
      #expect(s.usedIDs() == [5], "\(what)")
    }

    // Random bytes (a fixed generator), with a version that passes.
    var rng = SeededRandom(seed: 42)
    for round in 0..<50 {
      var s = try Setup(size: 8, descNum: 16)
      let bytes = InflightArea.regionSize(queueSize: 16, packed: true)
      for i in 0..<bytes {
        s.region.storeBytes(of: UInt8(truncatingIfNeeded: rng.next()), toByteOffset: i, as: UInt8.self)
      }
      s.setU16(8, 1)
      if round % 2 == 0 {
        // Plausible header fields, so that the entries are what gets checked.
        for offset in [12, 14] { s.setU16(offset, UInt16(rng.next() % 17)) }
        for offset in [16, 18] { s.setU16(offset, UInt16(rng.next() % 8)) }
        s.setU16(20, 0x0101)
      }
      let recovery = try s.restart()
      #expect(recovery.refused != nil, "random region \(round) accepted: \(s.inflight.resubmit)")
      #expect(s.inflight.resubmit.isEmpty)
    }
  }

  /// A buffer id popped again while still in flight, or more descriptors in flight than the
  /// region has entries, break the ring instead of corrupting the region.
  @Test func driverReusingAnIDInFlight() throws {
    var s = try Setup(size: 8)
    s.add(1, length: 1)
    s.add(1, length: 1)
    #expect(try s.queue.next(into: &s.segments, memory: s.guest.memory) == 1)
    #expect(throws: ChainError.bufferInFlight(1)) { try s.queue.next(into: &s.segments, memory: s.guest.memory) }
    #expect(s.marked.count == 1)
    let recovery = try s.restart()
    #expect(s.inflight.resubmit.map(\.id) == [1] && recovery.refused == nil)
  }
}
