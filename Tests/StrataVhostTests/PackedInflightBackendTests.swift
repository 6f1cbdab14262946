// INFLIGHT_SHMFD for packed rings through the back-end's message handling: a first back-end
// pops write requests and dies without running them; the next one gets the front-end's
// inflight area (SET_INFLIGHT_FD) and the same memory and ring, and must run them before
// anything new, and not run again the one the first back-end had completed.

import CStrataLinux
import Glibc
import Logging
import StrataCore
import Testing
import VhostProtocol

@_spi(Fuzzing) @testable import StrataVhost

/// An image, a guest with a packed ring of `PackedInflightBackendTests.ringSize` entries, and
/// the back-end that a front-end drives through `VhostBlkBackend.handle`.
private final class FrontEnd {
  let dir: String
  let path: String
  let image: StrataImage
  let shared: SharedImage
  let guest: Guest
  var driver: Driver
  let callFd = strata_eventfd(0, 0)
  let kickFd = strata_eventfd(0, 0)
  var backend: VhostBlkBackend?

  init() throws {
    var template = Array("/tmp/strata-packed-inflight-XXXXXX".utf8CString)
    dir = try #require(mkdtemp(&template).map { String(cString: $0) })
    path = dir + "/vm.strata"
    image = try StrataImage.create(path: path, virtualSize: 1 << 20)
    shared = SharedImage(image)
    guest = try Guest()
    driver = Driver(guest: guest, size: PackedInflightBackendTests.ringSize)
  }

  deinit {
    backend = nil
    try? image.close()
    close(callFd)
    unlink(path)
    rmdir(dir)
  }

  func send(_ r: VhostRequest, _ payload: [UInt8], fds: [Int32] = []) -> VhostBlkBackend.Reply? {
    guard let backend else { return nil }
    let h = VhostHeader(
      request: r.rawValue, flags: VhostHeader.version | VhostHeader.needReplyFlag, size: UInt32(payload.count))
    return payload.withUnsafeBytes { backend.handle(h, $0, fds: fds) }
  }

  func expectOK(
    _ r: VhostRequest, _ payload: [UInt8], fds: [Int32] = [], sourceLocation: SourceLocation = #_sourceLocation
  ) {
    #expect(send(r, payload, fds: fds)?.payload == encodeU64(0), "\(r) refused", sourceLocation: sourceLocation)
  }

  /// A new back-end, given `area` (SET_INFLIGHT_FD), the memory and the packed ring, told the
  /// stale ring base 0x8000_8000 (QEMU has no other for a packed ring after a crash).
  func connect(area: InflightArea) {
    let size = PackedInflightBackendTests.ringSize
    let userBase = PackedInflightBackendTests.userBase
    backend = VhostBlkBackend(
      image: shared, readOnly: false, serial: "packed", numQueues: 1, packedRing: true,
      logger: Logger(label: "packed-inflight-test"))
    // Before REPLY_ACK is negotiated nothing is acknowledged.
    #expect(
      send(.setFeatures, encodeU64(VirtioFeature.version1 | VirtioFeature.protocolFeatures | VirtioFeature.ringPacked))
        == nil)
    expectOK(
      .setProtocolFeatures, encodeU64(VhostProtocolFeature.inflightShmfd.bit | VhostProtocolFeature.replyAck.bit))
    expectOK(.setInflightFd, area.wireDescription.encode(), fds: [dup(area.fd)])
    let region = MemoryRegion(guestAddress: 0, size: UInt64(Guest.size), userAddress: userBase, mmapOffset: 0)
    expectOK(.setMemTable, MemoryTable(regions: [region]).encode(), fds: [dup(guest.fd)])
    expectOK(.setVringNum, VringState(index: 0, num: UInt32(size)).encode())
    expectOK(
      .setVringAddr,
      VringAddress(
        index: 0, flags: 0, descUser: userBase + UInt64(Guest.ring), usedUser: userBase + 0x10, availUser: userBase,
        logGuest: 0
      ).encode())
    expectOK(.setVringBase, VringState(index: 0, num: 0x8000_8000).encode())
    expectOK(.setVringCall, encodeU64(0), fds: [dup(callFd)])
    expectOK(.setVringKick, encodeU64(0), fds: [dup(kickFd)])
    expectOK(.setVringEnable, VringState(index: 0, num: 1).encode())
  }

  func kick() {
    var one: UInt64 = 1
    #expect(write(kickFd, &one, 8) == 8)
  }

  /// The ids of the next `n` used buffers (fewer after 5 s).
  func waitUsed(_ n: Int) -> [UInt16] {
    var ids: [UInt16] = []
    for _ in 0..<5000 where ids.count < n {
      while let (id, _) = driver.used() { ids.append(id) }
      if ids.count < n { usleep(1000) }
    }
    return ids
  }
}

@Suite struct PackedInflightBackendTests {
  static let ringSize = 16
  static let userBase: UInt64 = 0x1000_0000

  /// Where request `id`'s header, 4 KiB of data and status byte are.
  static func header(_ id: UInt16) -> Int { Guest.buffers + 0x3000 * Int(id) }
  static func data(_ id: UInt16) -> Int { header(id) + 0x1000 }
  static func status(_ id: UInt16) -> Int { header(id) + 0x2000 }
  static func pattern(_ seed: Int) -> [UInt8] {
    (0..<4096).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ seed &* 37 &+ 1) }
  }

  /// Makes request `id` available: `type` on the 4 KiB at `sector` (data filled with `pattern(seed)`).
  static func request(
    _ driver: inout Driver, _ guest: Guest, id: UInt16, type: VirtioBlkRequestType, sector: UInt64, seed: Int
  ) {
    let h = guest.base + header(id)
    h.storeBytes(of: type.rawValue.littleEndian, as: UInt32.self)
    h.storeBytes(of: UInt32(0), toByteOffset: 4, as: UInt32.self)
    h.storeBytes(of: sector.littleEndian, toByteOffset: 8, as: UInt64.self)
    let bytes = type == .write ? pattern(seed) : [UInt8](repeating: 0, count: 4096)
    bytes.withUnsafeBytes { (guest.base + data(id)).copyMemory(from: $0.baseAddress!, byteCount: 4096) }
    (guest.base + status(id)).storeBytes(of: UInt8(0xFF), as: UInt8.self)
    driver.add(
      id: id,
      [
        (UInt64(header(id)), 16, false), (UInt64(data(id)), 4096, type == .read),
        (UInt64(status(id)), 1, true),
      ])
  }

  @Test func packedRequestsResubmittedByTheNextBackend() throws {
    let f = try FrontEnd()
    let guest = f.guest
    let ring = guest.base + Guest.ring
    // The front-end's area, as the first back-end's GET_INFLIGHT_FD made it.
    let frontEndArea = try InflightArea.allocate(numQueues: 1, queueSize: Self.ringSize, packed: true)

    // The first back-end: pops writes 0, 1 and 2, completes 1 (without running it: so that
    // running it again would show in the image) and dies.
    do {
      let area = try InflightArea.map(
        fd: frontEndArea.fd, frontEndArea.wireDescription, maxQueues: 1, maxQueueSize: 1024, packed: true)
      let inflight = PackedInflightRing(area: area, queue: 0)
      _ = inflight.recover(ringSize: Self.ringSize, ring: ring, base: 0x8000_8000)
      let queue = PackedQueue(
        size: Self.ringSize, ring: ring, driverEvent: guest.base, deviceEvent: guest.base + 0x10, base: 0x8000_8000,
        eventIdx: false, indirect: false, maxSegments: 16, inflight: inflight)
      for id: UInt16 in 0..<3 {
        Self.request(&f.driver, guest, id: id, type: .write, sector: 8 * UInt64(id), seed: Int(id) + 1)
      }
      var segments: [GuestSegment] = []
      var popped: [UInt16] = []
      while let id = try queue.next(into: &segments, memory: guest.memory) { popped.append(id) }
      #expect(popped == [0, 1, 2])
      (guest.base + Self.status(1)).storeBytes(of: UInt8(0), as: UInt8.self)
      queue.pushUsed(head: 1, written: 1)
    }
    #expect(f.waitUsed(1) == [1])

    // The next back-end.
    f.connect(area: frontEndArea)
    // Resubmitted at start, without a kick: 0 then 2, oldest pop first.
    #expect(f.waitUsed(2) == [0, 2])
    for id: UInt16 in [0, 2] {
      #expect(guest.base.load(fromByteOffset: Self.status(id), as: UInt8.self) == 0, "request \(id) status")
    }
    let written = try f.shared.with { img in try (0..<3).map { try img.read(at: 4096 * UInt64($0), count: 4096) } }
    #expect(written[0] == Self.pattern(1), "write 0 was not run")
    #expect(written[1] == [UInt8](repeating: 0, count: 4096), "write 1, completed before the crash, was run again")
    #expect(written[2] == Self.pattern(3), "write 2 was not run")

    // A new request goes on where the ring stands.
    Self.request(&f.driver, guest, id: 1, type: .read, sector: 16, seed: 0)
    f.kick()
    #expect(f.waitUsed(1) == [1])
    #expect(guest.base.load(fromByteOffset: Self.status(1), as: UInt8.self) == 0)
    #expect(Array(UnsafeRawBufferPointer(start: guest.base + Self.data(1), count: 4096)) == Self.pattern(3))

    // Stopped, the ring reports the driver's position; nothing is left marked in flight.
    let reply = try #require(f.send(.getVringBase, VringState(index: 0, num: 0).encode()))
    let base = try reply.payload.withUnsafeBytes { (b) throws(VhostError) in try VringState.decode(b) }
    let position = UInt32(f.driver.next) | (f.driver.wrap ? 0x8000 : 0)
    #expect(base.num == position | position << 16)
    let marks = (0..<Self.ringSize).filter {
      frontEndArea.regionStart(0).load(fromByteOffset: 32 + 32 * $0, as: UInt8.self) != 0
    }
    #expect(marks.isEmpty, "entries still marked in flight: \(marks)")
  }

  /// An area sized for split rings (a front-end that asked before SET_FEATURES) is taken with a
  /// packed ring, which then runs without tracking: requests complete, the area stays untouched.
  @Test func splitSizedAreaWithAPackedRing() throws {
    let f = try FrontEnd()
    let area = try InflightArea.allocate(numQueues: 1, queueSize: Self.ringSize)
    #expect(area.mappingLength < InflightArea.mmapSize(numQueues: 1, queueSize: Self.ringSize, packed: true))
    f.connect(area: area)
    Self.request(&f.driver, f.guest, id: 3, type: .write, sector: 0, seed: 9)
    f.kick()
    #expect(f.waitUsed(1) == [3])
    #expect(f.guest.base.load(fromByteOffset: Self.status(3), as: UInt8.self) == 0)
    let bytes = UnsafeRawBufferPointer(start: area.regionStart(0), count: area.mappingLength)
    #expect(bytes.allSatisfy { $0 == 0 } == false, "desc_num is set on SET_INFLIGHT_FD")
    #expect(area.regionStart(0).load(fromByteOffset: 8, as: UInt16.self) == 0, "a split region was initialized")
    #expect(bytes.dropFirst(12).allSatisfy { $0 == 0 }, "the area was written")
  }
}
