// The driver side of a packed virtqueue against a device written from the spec (virtio 1.2,
// 2.8) in the test: availability by the driver's wrap counter, used descriptors by the
// device's, out-of-order completion, event suppression and the ring base. A small ring wraps
// every few requests, so both wrap counter values are exercised many times.

import StrataSimulation
import Testing
import VhostProtocol

@testable import VhostClient

/// A device reading the ring as virtio 1.2 section 2.8.23 says and writing used descriptors.
struct SpecDevice {
  let ring: UnsafeMutableRawPointer
  let size: Int
  var nextAvail = 0
  var availWrap = true
  var nextUsed = 0
  var usedWrap = true
  /// Slots each buffer id in flight took.
  var chainLength: [UInt16: Int] = [:]

  struct Descriptor: Equatable {
    var address: UInt64
    var length: UInt32
    var writable: Bool
  }

  private func flags(_ slot: Int) -> UInt16 {
    UInt16(littleEndian: ring.load(fromByteOffset: 16 * slot + 14, as: UInt16.self))
  }

  private func available(_ f: UInt16, wrap: Bool) -> Bool {
    (f & VirtqDescFlag.packedAvail != 0) == wrap && (f & VirtqDescFlag.packedUsed != 0) != wrap
  }

  /// The next available buffer (its id, from its last descriptor, and its descriptors), or nil.
  /// Records an issue when a chain's later descriptors are not available in their lap.
  mutating func pop() -> (id: UInt16, descriptors: [Descriptor])? {
    guard available(flags(nextAvail), wrap: availWrap) else { return nil }
    var out: [Descriptor] = []
    var id: UInt16 = 0
    while true {
      let f = flags(nextAvail)
      if !available(f, wrap: availWrap) {
        Issue.record("slot \(nextAvail) of a chain is not available in lap \(availWrap)")
      }
      let d = ring + 16 * nextAvail
      out.append(
        Descriptor(
          address: UInt64(littleEndian: d.load(as: UInt64.self)),
          length: UInt32(littleEndian: d.load(fromByteOffset: 8, as: UInt32.self)),
          writable: f & VirtqDescFlag.write != 0))
      id = UInt16(littleEndian: d.load(fromByteOffset: 12, as: UInt16.self))
      nextAvail += 1
      if nextAvail == size {
        nextAvail = 0
        availWrap.toggle()
      }
      if f & VirtqDescFlag.next == 0 || out.count > size { break }
    }
    chainLength[id] = out.count
    return (id, out)
  }

  /// Writes the used descriptor of buffer `id` (flags last) and skips the slots it took.
  mutating func push(_ id: UInt16, written: UInt32) {
    let d = ring + 16 * nextUsed
    d.storeBytes(of: id.littleEndian, toByteOffset: 12, as: UInt16.self)
    d.storeBytes(of: written.littleEndian, toByteOffset: 8, as: UInt32.self)
    let f = usedWrap ? VirtqDescFlag.packedAvail | VirtqDescFlag.packedUsed : 0
    d.storeBytes(of: f.littleEndian, toByteOffset: 14, as: UInt16.self)
    nextUsed += chainLength.removeValue(forKey: id) ?? 1
    if nextUsed >= size {
      nextUsed -= size
      usedWrap.toggle()
    }
  }

  /// The device event suppression area: off_wrap, then flags.
  static func setEvent(_ area: UnsafeMutableRawPointer, flags: UInt16, offset: Int = 0, wrap: Bool = true) {
    area.storeBytes(of: (UInt16(offset) | (wrap ? 0x8000 : 0)).littleEndian, as: UInt16.self)
    area.storeBytes(of: flags.littleEndian, toByteOffset: 2, as: UInt16.self)
  }
}

struct PackedRingTests {
  /// A packed ring of `size` slots in fresh guest memory, with the device that serves it.
  static func ring(size: Int, eventIdx: Bool) throws -> (GuestMemory, PackedRing, SpecDevice) {
    let memory = try GuestMemory(size: 1 << 20)
    let desc = try #require(memory.allocate(16 * size, alignment: 4096))
    let driverEvent = try #require(memory.allocate(4))
    let deviceEvent = try #require(memory.allocate(4))
    let layout = VirtqueueLayout(kind: .packed, size: size, desc: desc, avail: driverEvent, used: deviceEvent)
    let ring = PackedRing(index: 0, layout: layout, memory: memory, eventIdx: eventIdx)
    return (memory, ring, SpecDevice(ring: memory.pointer(desc), size: size))
  }

  static func chain(_ n: Int, tag: UInt64) -> [ChainElement] {
    (0..<n).map {
      ChainElement(
        address: tag << 16 | UInt64($0) << 8, length: UInt32(16 + $0), flags: $0 == n - 1 ? VirtqDescFlag.write : 0)
    }
  }

  /// Chains of 1 to 3 descriptors in a ring of 7 (no power of two needed here), completed in a
  /// shuffled order: every chain reaches the device as published, every used descriptor comes
  /// back with its id and length, in the device's order, and the slots are all free at the end.
  @Test func chainsWrapAndCompleteOutOfOrder() throws {
    let size = 7
    let (memory, ring, device0) = try Self.ring(size: size, eventIdx: true)
    var device = device0
    var rng: UInt64 = 0x5EED
    func next(_ n: Int) -> Int {
      rng = rng &* 6_364_136_223_846_793_005 &+ 1_442_695_040_888_963_407
      return Int((rng >> 33) % UInt64(n))
    }
    var laps = 0
    var lastWrap = device.availWrap
    for round in 0..<60 {
      var published: [UInt16: [ChainElement]] = [:]
      while true {
        let elements = Self.chain(1 + next(3), tag: UInt64(round * 16 + published.count))
        guard let id = ring.publish(elements) else {
          #expect(ring.freeCount < elements.count, "round \(round): refused with \(ring.freeCount) free slots")
          break
        }
        #expect(published[id] == nil, "round \(round): id \(id) handed out twice")
        published[id] = elements
      }
      #expect(!ring.hasUsed())
      var popped: [UInt16] = []
      while let buffer = device.pop() {
        let expected = try #require(
          published[buffer.id], "round \(round): the device popped id \(buffer.id), never published")
        let written = expected.map {
          SpecDevice.Descriptor(
            address: $0.address, length: $0.length, writable: $0.flags & VirtqDescFlag.write != 0)
        }
        #expect(buffer.descriptors == written, "round \(round): id \(buffer.id)")
        popped.append(buffer.id)
      }
      #expect(Set(popped) == Set(published.keys), "round \(round): popped \(popped) of \(published.keys.sorted())")
      if device.availWrap != lastWrap {
        laps += 1
        lastWrap = device.availWrap
      }
      var shuffler = SeededRandom(seed: rng)
      popped.shuffle(using: &shuffler)
      var reaped: [UsedElement] = []
      for (k, id) in popped.enumerated() {
        device.push(id, written: UInt32(100 + id))
        // Sometimes reap midway: the driver must stop at the first descriptor not used yet.
        if k % 3 == 1 { reaped += try ring.takeUsed() }
      }
      #expect(ring.hasUsed() || reaped.count == popped.count)
      reaped += try ring.takeUsed()
      #expect(reaped.map(\.id) == popped.map(UInt32.init), "round \(round)")
      #expect(reaped.map(\.length) == popped.map { 100 + UInt32($0) }, "round \(round)")
      #expect(ring.freeCount == size, "round \(round): \(ring.freeCount) free slots after every completion")
      #expect(ring.nextUsed == UInt16(device.nextUsed) && ring.usedWrap == device.usedWrap)
      #expect(ring.nextAvail == UInt16(device.nextAvail) && ring.availWrap == device.availWrap)
    }
    #expect(laps >= 20, "only \(laps) wrap counter flips")
    _ = memory
  }

  /// A used descriptor naming a buffer id not in flight is a protocol violation, not a crash
  /// or a completion for someone else.
  @Test func unknownUsedIDIsAViolation() throws {
    let (memory, ring, device0) = try Self.ring(size: 8, eventIdx: false)
    var device = device0
    let id = try #require(ring.publish(Self.chain(2, tag: 1)))
    let popped = device.pop()
    try #require(popped?.id == id)
    device.push(id &+ 3, written: 0)
    #expect(throws: VhostClientError.self) { try ring.takeUsed() }
    _ = memory
  }

  /// The device's event suppression: enabled, disabled, and (EVENT_IDX) a descriptor offset
  /// that the driver must pass, in this lap or across a wrap.
  @Test func notificationFollowsDeviceEventSuppression() throws {
    let (memory, ring, device0) = try Self.ring(size: 8, eventIdx: true)
    var device = device0
    let area = ring.deviceEvent
    func publish(_ n: Int) throws {
      _ = try #require(ring.publish(Self.chain(n, tag: 9)))
    }
    /// Lets the device take and complete everything, then the driver reap it.
    func complete() throws {
      while let buffer = device.pop() { device.push(buffer.id, written: 0) }
      _ = try ring.takeUsed()
    }

    #expect(!ring.deviceWantsNotification(), "nothing published")
    SpecDevice.setEvent(area, flags: VirtqEventFlag.enable)
    try publish(1)
    #expect(ring.deviceWantsNotification())
    #expect(!ring.deviceWantsNotification(), "nothing published since")
    SpecDevice.setEvent(area, flags: VirtqEventFlag.disable)
    try publish(1)
    #expect(!ring.deviceWantsNotification())
    try complete()

    // Slots 2.. of the first lap: notify once slot 4 is made available, not before.
    SpecDevice.setEvent(area, flags: VirtqEventFlag.desc, offset: 4, wrap: true)
    try publish(2)
    #expect(!ring.deviceWantsNotification(), "slots 2-3 do not reach slot 4")
    try publish(1)
    #expect(ring.deviceWantsNotification(), "slot 4 made available")
    try publish(1)
    #expect(!ring.deviceWantsNotification(), "slot 5: past the event already notified")
    try complete()

    // Across the wrap: slots 6, 7, 0, 1 (next lap), and an event at slot 1 of the next lap.
    #expect(ring.nextAvail == 6 && ring.availWrap)
    SpecDevice.setEvent(area, flags: VirtqEventFlag.desc, offset: 1, wrap: false)
    try publish(2)
    #expect(!ring.deviceWantsNotification(), "slots 6-7 of this lap")
    try publish(2)
    #expect(ring.deviceWantsNotification(), "slot 1 of the next lap made available")
    try complete()
    // An event at slot 7 of the lap before: long passed, no notification.
    SpecDevice.setEvent(area, flags: VirtqEventFlag.desc, offset: 7, wrap: true)
    try publish(1)
    #expect(!ring.deviceWantsNotification(), "an event of the previous lap")
    // The same position in the current lap (wrap 0) is ahead: reached by slots 3..7.
    SpecDevice.setEvent(area, flags: VirtqEventFlag.desc, offset: 7, wrap: false)
    try publish(3)
    #expect(!ring.deviceWantsNotification(), "slots 3-5")
    try publish(2)
    #expect(ring.deviceWantsNotification(), "slot 7 of this lap")
    try complete()
    _ = memory
  }

  /// Without EVENT_IDX the descriptor mode is not valid: the driver notifies.
  @Test func descModeWithoutEventIdxNotifies() throws {
    let (memory, ring, _) = try Self.ring(size: 8, eventIdx: false)
    SpecDevice.setEvent(ring.deviceEvent, flags: VirtqEventFlag.desc, offset: 7, wrap: true)
    _ = try #require(ring.publish(Self.chain(1, tag: 1)))
    #expect(ring.deviceWantsNotification())
    // The driver asks for every interrupt.
    #expect(UInt16(littleEndian: ring.driverEvent.load(fromByteOffset: 2, as: UInt16.self)) == VirtqEventFlag.enable)
    _ = memory
  }

  /// With EVENT_IDX the driver asks for an interrupt at its next used descriptor (with its wrap
  /// counter), and the ring base follows the used descriptors in guest memory.
  @Test func armNotificationAndResumeBase() throws {
    let (memory, ring, device0) = try Self.ring(size: 4, eventIdx: true)
    var device = device0
    let event = ring.driverEvent
    func offWrap() -> UInt16 { UInt16(littleEndian: event.load(as: UInt16.self)) }
    #expect(UInt16(littleEndian: event.load(fromByteOffset: 2, as: UInt16.self)) == VirtqEventFlag.desc)
    #expect(offWrap() == 0x8000)
    #expect(ring.resumeBase == 0x8000_8000, "a new ring: index 0, both wrap counters 1")

    let a = try #require(ring.publish(Self.chain(3, tag: 1)))
    let b = try #require(ring.publish(Self.chain(1, tag: 2)))
    #expect(ring.publish(Self.chain(1, tag: 3)) == nil, "a full ring takes nothing")
    for _ in 0..<2 {
      let popped = device.pop()
      try #require(popped != nil)
    }
    device.push(b, written: 0)
    // Used in memory, not reaped: the base is past it (b took one slot).
    #expect(ring.resumeBase == 0x0001_0001 | 0x8000_8000)
    device.push(a, written: 0)
    // Both used: the device's position wrapped to slot 0 of the next lap.
    #expect(ring.resumeBase == 0)
    #expect(try ring.takeUsed().map(\.id) == [UInt32(b), UInt32(a)])
    ring.armNotification()
    #expect(offWrap() == 0x0000, "next used descriptor: slot 0, wrap counter 0")
    #expect(!ring.hasUsed())
    _ = memory
  }
}
