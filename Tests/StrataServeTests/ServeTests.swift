// End-to-end tests of `strata serve`: the built binary serves a fresh image on a Unix socket and
// VhostUserClient (an in-process vhost-user front-end) drives it as QEMU would, well-behaved and
// hostile. Every test stops the server with SIGTERM and expects exit status 0 and the socket
// removed; a test that fails midway kills the server by PID.

import Foundation
import Glibc
import StrataSimulation
import StrataTestSupport
import Testing
import VhostClient
import VhostProtocol

/// The server is still running and a new front-end can connect and do I/O on every queue.
func checkAliveAndServing(_ s: ServeProcess, after what: String, sourceLocation: SourceLocation = #_sourceLocation)
  throws
{
  guard s.isAlive() else {
    throw ServeTestError(
      "strata serve died after \(what) (\(s.status.map(describeStatus) ?? "?")); log:\n\(s.logTail)")
  }
  let c = try s.client(ServeProcess.options(queues: 8))
  defer { c.shutdown() }
  let data = pattern(8192, seed: 99)
  let sector: UInt64 = 20_000
  for q in 0..<c.queueCount {
    let w = try c.perform(queue: q, .write(sector: sector, data: data))
    #expect(w.isOK, "write on queue \(q) after \(what)", sourceLocation: sourceLocation)
    let r = try c.perform(queue: q, .read(sector: sector, length: data.count))
    #expect(r.isOK && r.data == data, "read on queue \(q) after \(what)", sourceLocation: sourceLocation)
  }
  #expect(s.isAlive(), "strata serve died after \(what); log:\n\(s.log)", sourceLocation: sourceLocation)
}

/// Expects `body` to fail with a REPLY_ACK nack (the back-end refused the request).
func expectNack(_ what: String, sourceLocation: SourceLocation = #_sourceLocation, _ body: () throws -> Void) {
  do {
    try body()
    Issue.record("\(what) was accepted", sourceLocation: sourceLocation)
  } catch let e as VhostClientError {
    guard case .nack = e else {
      Issue.record("\(what): expected a nack, got \(e)", sourceLocation: sourceLocation)
      return
    }
  } catch {
    Issue.record("\(what): \(error)", sourceLocation: sourceLocation)
  }
}

/// Expects the back-end to drop the connection (no reply, EOF).
func expectDisconnect(_ c: VhostUserClient, _ what: String, sourceLocation: SourceLocation = #_sourceLocation) {
  do throws(VhostClientError) {
    var r = try c.receiveMessage(timeoutMs: 5_000)
    r.closeFds()
    Issue.record("\(what): got message \(r.request) instead of a disconnect", sourceLocation: sourceLocation)
  } catch {
    #expect(error == .disconnected, "\(what): \(error)", sourceLocation: sourceLocation)
  }
}

/// A file descriptor to send where the count, not the kind, matters.
func devNull() -> Int32 { open("/dev/null", O_RDWR | O_CLOEXEC) }

/// A 64 KiB block of guest memory for hand-made chains: header at +0, status at +512, data at +4096.
struct Scratch {
  let memory: GuestMemory
  let base: UInt64
  var header: UInt64 { base }
  var status: UInt64 { base + 512 }
  var data: UInt64 { base + 4096 }

  init(_ c: VhostUserClient) throws {
    memory = try #require(c.memory)
    base = try #require(memory.allocate(65536, alignment: 4096))
  }

  func prepare(_ type: VirtioBlkRequestType, sector: UInt64, data: [UInt8] = []) {
    memory.write(requestHeader(type, sector: sector), at: header)
    memory.write([0xFF], at: status)
    if !data.isEmpty { memory.write(data, at: self.data) }
  }

  var statusByte: UInt8 { memory.read(at: status, count: 1)[0] }
}

@Suite(.enabled(if: strataBinary != nil, Comment(rawValue: binaryMissing)))
struct StrataServeTests {
  // MARK: 1. Negotiation

  @Test(arguments: RingKind.allCases)
  func negotiationFeaturesAndConfig(ring: RingKind) throws {
    try withServer(size: 48 << 20, arguments: ["--num-queues", "3"] + ring.serveArguments) { s in
      let c = try s.client(ServeProcess.options(queues: 4, ring: ring))
      defer { c.shutdown() }
      let features: [(String, UInt64)] = [
        ("VERSION_1", VirtioFeature.version1), ("FLUSH", VirtioBlkFeature.flush),
        ("DISCARD", VirtioBlkFeature.discard), ("WRITE_ZEROES", VirtioBlkFeature.writeZeroes),
        ("MQ", VirtioBlkFeature.mq), ("BLK_SIZE", VirtioBlkFeature.blkSize), ("SEG_MAX", VirtioBlkFeature.segMax),
        ("EVENT_IDX", VirtioFeature.eventIdx), ("INDIRECT_DESC", VirtioFeature.indirectDesc),
        ("PROTOCOL_FEATURES", VirtioFeature.protocolFeatures),
      ]
      for (name, bit) in features {
        #expect(c.backendFeatures & bit != 0, "\(name) not offered (0x\(String(c.backendFeatures, radix: 16)))")
      }
      #expect(c.backendFeatures & VirtioBlkFeature.readOnly == 0, "RO offered without --read-only")
      #expect(
        (c.backendFeatures & VirtioFeature.ringPacked != 0) == (ring == .packed),
        "RING_PACKED offered: 0x\(String(c.backendFeatures, radix: 16))")
      #expect(c.hasFeature(VirtioFeature.ringPacked) == (ring == .packed))
      #expect(c.ringKind == ring)
      for f in [VhostProtocolFeature.replyAck, .config, .mq] {
        #expect(c.backendProtocolFeatures & f.bit != 0, "protocol feature \(f) not offered")
        #expect(c.hasProtocol(f))
      }
      #expect(c.replyAckEnabled)
      #expect(c.hasFeature(VirtioFeature.eventIdx | VirtioBlkFeature.mq | VirtioBlkFeature.flush))
      #expect(c.backendQueueCount == 3)

      let config = try #require(c.config)
      #expect(config.capacitySectors == (48 << 20) / 512)
      #expect(config.blkSize == 4096)
      #expect(config.numQueues == 3)
      #expect(config.segMax >= 1)
      #expect(c.queueCount == 3)
      #expect(try c.getConfig() == config)

      // Partial windows: exactly the bytes asked for, at the offset asked for.
      let full = config.encode() + [UInt8](repeating: 0, count: ConfigSpace.maxSize - VirtioBlkConfig.size)
      for (offset, size) in [(20, 4), (34, 2), (0, 8), (0, 1), (57, 3), (8, 52), (100, 10), (0, 256), (256, 0)] {
        let ask = ConfigSpace(
          offset: UInt32(offset), size: UInt32(size), flags: 0, payload: [UInt8](repeating: 0, count: size))
        var reply = try #require(try c.send(.getConfig, payload: ask.encode()))
        reply.closeFds()
        #expect(reply.payload.count == 12 + size, "GET_CONFIG \(offset)+\(size): \(reply.payload.count) bytes")
        let space = try reply.payload.withUnsafeBytes { (b) throws(VhostError) in try ConfigSpace.decode(b) }
        #expect(space.offset == UInt32(offset) && space.size == UInt32(size))
        #expect(space.payload == Array(full[offset..<(offset + size)]), "GET_CONFIG \(offset)+\(size)")
      }
      let blk = try #require(
        try c.send(.getConfig, payload: ConfigSpace(offset: 20, size: 4, flags: 0, payload: [0, 0, 0, 0]).encode()))
      #expect(Array(blk.payload[12...]) == [0x00, 0x10, 0x00, 0x00], "blk_size window")

      for q in 0..<3 {
        let data = pattern(4096, seed: UInt64(q + 1))
        #expect(try c.perform(queue: q, .write(sector: UInt64(q * 8), data: data)).isOK)
        #expect(try c.perform(queue: q, .read(sector: UInt64(q * 8), length: 4096)).data == data)
      }

      guard ring == .split else { return }
      // This server does not offer packed rings: a front-end that wants them gets told so
      // right after GET_FEATURES.
      c.shutdown()
      let refusal = #expect(throws: VhostClientError.self) {
        try VhostUserClient.connect(path: s.socketPath, options: ServeProcess.options(ring: .packed)).shutdown()
      }
      let said = refusal.map { "\($0)" } ?? ""
      #expect(said.hasPrefix("unsupported:") && said.contains("VIRTIO_F_RING_PACKED"), "\(said)")
      try checkAliveAndServing(s, after: "a packed-ring client was refused")
    }
  }

  // MARK: 2. Data

  @Test(arguments: RingKind.allCases)
  func writeThenReadBackOnBothQueuesAndAfterStop(ring: RingKind) throws {
    try withServer(size: 64 << 20, arguments: ["--num-queues", "2"] + ring.serveArguments) { s in
      let c = try s.client(ServeProcess.options(queues: 2, ring: ring))
      #expect(c.ringKind == ring)
      #expect(c.queueCount == 2)
      let last = s.size / 512
      // Non-overlapping: 512 B to 1 MiB, aligned and not, at the start, middle and end.
      let cases: [(sector: UInt64, bytes: Int)] = [
        (0, 512), (1, 4096), (16, 3584), (100, 65536), (2051, 1 << 20), (last - 8, 4096), (last - 9, 512),
        (9999, 1536), (8192, 8192), (30_001, 512 * 129),
      ]
      var expected: [(UInt64, [UInt8])] = []
      for (i, t) in cases.enumerated() {
        let data = pattern(t.bytes, seed: UInt64(i + 1))
        let wq = i % 2
        let w = try c.perform(queue: wq, .write(sector: t.sector, data: data))
        #expect(w.isOK, "write \(t.bytes) B at sector \(t.sector) on queue \(wq)")
        #expect(w.usedLength == 1)
        let r = try c.perform(queue: 1 - wq, .read(sector: t.sector, length: t.bytes))
        #expect(r.isOK)
        #expect(r.usedLength == UInt32(t.bytes + 1))
        #expect(r.data == data, "read back \(t.bytes) B at sector \(t.sector) on queue \(1 - wq)")
        expected.append((t.sector, data))
      }
      // Large writes read back at once from the other queue (the image's log is written out
      // asynchronously a megabyte at a time: the read may race that write-out).
      for i in 0..<12 {
        let data = pattern(1 << 20, seed: UInt64(100 + i))
        let sector = UInt64(40_000 + i * 2048 + i)
        let w = try c.perform(queue: i % 2, .write(sector: sector, data: data))
        #expect(w.isOK, "1 MiB write #\(i)")
        let r = try c.perform(queue: 1 - i % 2, .read(sector: sector, length: data.count))
        #expect(r.isOK && r.data == data, "1 MiB read right after write #\(i)")
        expected.append((sector, data))
      }
      // Nothing clobbered its neighbours; untouched space reads as zeros.
      for (i, (sector, data)) in expected.enumerated() {
        #expect(try c.perform(queue: i % 2, .read(sector: sector, length: data.count)).data == data)
      }
      #expect(try c.perform(.read(sector: 100_000, length: 8192)).data == [UInt8](repeating: 0, count: 8192))

      // Stop with the front-end still connected: the data must be on disk.
      s.stop()
      c.shutdown()
      for (sector, data) in expected {
        let r = try s.strata(["read", s.image, "--offset", String(sector * 512), "--length", String(data.count)])
        #expect(r.succeeded, "strata read: \(r.stderr)")
        #expect(r.stdout == data, "strata read at sector \(sector)")
      }
      let check = try s.strata(["check", s.image])
      #expect(check.succeeded, "strata check: \(check.stderr)\(String(decoding: check.stdout, as: UTF8.self))")
    }
  }

  /// Data split across descriptors of odd sizes at odd guest addresses (firmware and
  /// bootloaders do that), written and read back with different splits.
  @Test func scatterGatherAtUnalignedAddresses() throws {
    try withServer { s in
      let c = try s.client()
      defer { c.shutdown() }
      let x = try Scratch(c)
      let m = x.memory
      let buffer = try #require(m.allocate(64 << 10, alignment: 4096))
      let data = pattern(12288, seed: 31)
      let writeSplits: [[Int]] = [[1000, 3096, 8192], [1, 12287], [512, 512, 11264], [12288]]
      let readSplits: [[Int]] = [[7, 4089, 8192], [12288], [3000, 3000, 6288], [1, 1, 12286]]
      for (i, (ws, rs)) in zip(writeSplits, readSplits).enumerated() {
        let sector = UInt64(300 + i * 40 + i)
        // Write: the pieces land at odd addresses with gaps between them.
        var chain = [RawDescriptor(x.header, 16, next: 1)]
        var at = buffer + 1 + UInt64(i)
        var offset = 0
        for n in ws {
          m.write(Array(data[offset..<(offset + n)]), at: at)
          chain.append(RawDescriptor(at, UInt32(n), next: chain.count + 1))
          at += UInt64(n) + 13
          offset += n
        }
        chain.append(RawDescriptor(x.status, 1, writable: true))
        x.prepare(.write, sector: sector)
        _ = try c.runChain(chain)
        #expect(x.statusByte == statusOK, "split write \(ws)")
        #expect(try c.perform(.read(sector: sector, length: data.count)).data == data, "split write \(ws)")
        // Read into other pieces at other odd addresses.
        chain = [RawDescriptor(x.header, 16, next: 1)]
        at = buffer + 32768 + 3 + UInt64(i)
        var pieces: [(UInt64, Int)] = []
        for n in rs {
          m.write([UInt8](repeating: 0xEE, count: n), at: at)
          chain.append(RawDescriptor(at, UInt32(n), writable: true, next: chain.count + 1))
          pieces.append((at, n))
          at += UInt64(n) + 5
        }
        chain.append(RawDescriptor(x.status, 1, writable: true))
        x.prepare(.read, sector: sector)
        let r = try c.runChain(chain)
        #expect(x.statusByte == statusOK && r.usedLength == UInt32(data.count + 1), "split read \(rs)")
        let got = pieces.flatMap { m.read(at: $0.0, count: $0.1) }
        #expect(got == data, "split read \(rs)")
      }
    }
  }

  // MARK: 3. Request types

  @Test(arguments: RingKind.allCases)
  func flushGetIDErrorsDiscardAndWriteZeroes(ring: RingKind) throws {
    let serial = "STRATA-SERIAL-0042"
    try withServer(arguments: ["--serial", serial] + ring.serveArguments) { s in
      let c = try s.client(ServeProcess.options(ring: ring))
      #expect(c.ringKind == ring)
      defer { c.shutdown() }
      #expect(c.hasFeature(VirtioBlkFeature.flush | VirtioBlkFeature.discard | VirtioBlkFeature.writeZeroes))
      let capacity = s.size / 512

      #expect(try c.perform(.write(sector: 8, data: pattern(4096, seed: 9))).isOK)
      let flush = try c.perform(.flush)
      #expect(flush.isOK && flush.usedLength == 1)

      let id = try c.perform(.getID)
      #expect(id.isOK)
      #expect(id.data == Array(serial.utf8) + [0, 0], "GET_ID returned \(id.data)")
      #expect(id.usedLength == 21)

      let odd = try c.perform(.custom(type: 0x7777, sector: 0, readable: [], writableLength: 0))
      #expect(odd.status == statusUnsupp)
      let odd2 = try c.perform(.custom(type: 2, sector: 0, readable: [], writableLength: 512))
      #expect(odd2.status == statusUnsupp)

      // Past the end, straddling the end, absurd sectors, lengths not a multiple of 512.
      for (sector, length) in [
        (capacity, 512), (capacity - 1, 1024), (UInt64.max / 512, 512), (UInt64.max, 512), (0, 100),
      ] {
        let r = try c.perform(.read(sector: sector, length: length))
        #expect(r.status == statusIOErr, "read \(length) B at sector \(sector): status \(String(describing: r.status))")
      }
      for (sector, length) in [(capacity, 512), (capacity - 1, 1024), (UInt64.max / 512 + 1, 512), (0, 700)] {
        let r = try c.perform(.write(sector: sector, data: pattern(length, seed: 3)))
        #expect(r.status == statusIOErr, "write \(length) B at sector \(sector)")
      }
      #expect(try c.perform(.read(sector: 0, length: 512)).data == [UInt8](repeating: 0, count: 512))

      // DISCARD of whole blocks reads back as zeros.
      let data = pattern(64 << 10, seed: 3)
      #expect(try c.perform(.write(sector: 1024, data: data)).isOK)
      let d = try c.perform(.discard([VirtioBlkDiscardSegment(sector: 1024 + 16, numSectors: 64, flags: 0)]))
      #expect(d.isOK)
      var expected = data
      for i in (16 * 512)..<(80 * 512) { expected[i] = 0 }
      #expect(try c.perform(.read(sector: 1024, length: data.count)).data == expected, "after discard")
      // The unmap flag is not allowed on DISCARD (virtio 5.2.6.2): UNSUPP.
      let du = try c.perform(.discard([VirtioBlkDiscardSegment(sector: 1024, numSectors: 8, flags: 1)]))
      #expect(du.status == statusUnsupp)
      #expect(try c.perform(.discard([])).status == statusIOErr)
      #expect(try c.perform(.discard([.init(sector: capacity - 8, numSectors: 16, flags: 0)])).status == statusIOErr)

      // WRITE_ZEROES with and without unmap, aligned and not, one and two segments.
      for unmap in [false, true] {
        #expect(try c.perform(.write(sector: 256, data: data)).isOK)
        let z = try c.perform(
          .writeZeroes(
            [
              VirtioBlkDiscardSegment(sector: 264, numSectors: 16, flags: 0),
              .init(sector: 259, numSectors: 3, flags: 0),
            ],
            unmap: unmap))
        #expect(z.isOK, "write zeroes unmap=\(unmap)")
        var e = data
        for i in (3 * 512)..<(6 * 512) { e[i] = 0 }
        for i in (8 * 512)..<(24 * 512) { e[i] = 0 }
        #expect(try c.perform(.read(sector: 256, length: data.count)).data == e, "write zeroes unmap=\(unmap)")
      }
      let zp = try c.perform(.writeZeroes([.init(sector: capacity - 1, numSectors: 2, flags: 0)], unmap: false))
      #expect(zp.status == statusIOErr)
      let zf = try c.perform(.writeZeroes([.init(sector: 0, numSectors: 1, flags: 4)], unmap: false))
      #expect(zf.status == statusUnsupp)
      #expect(try c.perform(.flush).isOK)
    }
  }

  // MARK: 4. Read-only

  @Test(arguments: RingKind.allCases)
  func readOnlyServesReadsAndRefusesWrites(ring: RingKind) throws {
    let data = pattern(8192, seed: 77)
    try withServer(
      arguments: ["--read-only"] + ring.serveArguments,
      prepare: { s in
        let input = s.directory + "/input.bin"
        try Data(data).write(to: URL(fileURLWithPath: input))
        let w = try s.strata(["write", s.image, "--offset", "4096", "--input", input])
        guard w.succeeded else { throw ServeTestError("strata write: \(w.stderr)") }
      }
    ) { s in
      let c = try s.client(ServeProcess.options(ring: ring))
      defer { c.shutdown() }
      #expect(c.ringKind == ring)
      #expect(c.backendFeatures & VirtioBlkFeature.readOnly != 0, "VIRTIO_BLK_F_RO not offered")
      #expect(c.hasFeature(VirtioBlkFeature.readOnly))
      #expect(c.backendFeatures & (VirtioBlkFeature.discard | VirtioBlkFeature.writeZeroes) == 0)
      #expect(try c.perform(.read(sector: 8, length: 8192)).data == data)
      #expect(try c.perform(.read(sector: 0, length: 4096)).data == [UInt8](repeating: 0, count: 4096))

      let w = try c.perform(.write(sector: 8, data: pattern(4096, seed: 1)))
      #expect(w.status == statusIOErr)
      let w0 = try c.perform(.write(sector: 100, data: pattern(512, seed: 2)))
      #expect(w0.status == statusIOErr)
      // Sent anyway although not offered.
      #expect(
        try c.perform(.writeZeroes([.init(sector: 8, numSectors: 8, flags: 0)], unmap: false)).status == statusIOErr)
      #expect(try c.perform(.discard([.init(sector: 8, numSectors: 8, flags: 0)])).status == statusIOErr)
      #expect(try c.perform(.flush).status == statusOK, "FLUSH of a read-only disk")
      #expect(try c.perform(.getID).isOK)
      #expect(try c.perform(.read(sector: 8, length: 8192)).data == data, "data changed under --read-only")
      #expect(try c.perform(.read(sector: 100, length: 512)).data == [UInt8](repeating: 0, count: 512))
      c.shutdown()
      s.stop()
      let r = try s.strata(["read", s.image, "--offset", "4096", "--length", "8192"])
      #expect(r.succeeded && r.stdout == data)
    }
  }

  // MARK: 5. Queue depth 32 on two queues against a model

  /// Each queue's 384 requests go round its 256-descriptor ring at least once (four times and
  /// a half with 3-descriptor chains): a packed ring runs with both wrap counter values.
  @Test(arguments: RingKind.allCases, [(true, false), (true, true), (false, false), (false, true)])
  func queueDepth32MixedOnTwoQueues(ring: RingKind, variant: (eventIdx: Bool, indirect: Bool)) throws {
    let (eventIdx, indirect) = variant
    try withServer(arguments: ["--num-queues", "2"] + ring.serveArguments) { s in
      let c = try s.client(ServeProcess.options(queues: 2, eventIdx: eventIdx, indirect: indirect, ring: ring))
      defer { c.shutdown() }
      #expect(c.queueCount == 2)
      #expect(c.ringKind == ring)
      #expect(c.hasFeature(VirtioFeature.eventIdx) == eventIdx)
      #expect(c.usesIndirect == indirect)
      let bs = 4096
      let blocks = 256
      var model = [[UInt8]](repeating: [UInt8](repeating: 0, count: bs), count: blocks)
      var rng = SeededRandom(seed: (eventIdx ? 1 : 2) &* 31 &+ (indirect ? 7 : 0))
      enum Kind { case read, write, partialWrite, partialRead, zeroes, discard, flush }
      struct Pending {
        var kind: Kind
        var block: Int
        var sectorInBlock: Int
        var expected: [UInt8]
      }
      for round in 0..<12 {
        var free = Array(0..<blocks).shuffled(using: &rng)
        var pending: [UInt64: Pending] = [:]
        for q in 0..<2 {
          for _ in 0..<32 {
            let block = free.removeLast()
            let sector = UInt64(block * bs / 512)
            let sub = Int(rng.next() % 7)
            let roll = rng.next() % 100
            let id: UInt64
            var p = Pending(kind: .read, block: block, sectorInBlock: sub, expected: [])
            switch roll {
            case 0..<30:
              p.expected = model[block]
              id = try c.submit(queue: q, .read(sector: sector, length: bs), kick: false)
            case 30..<55:
              let data = pattern(bs, seed: rng.next())
              model[block] = data
              p.kind = .write
              id = try c.submit(queue: q, .write(sector: sector, data: data), kick: false)
            case 55..<67:
              let data = pattern(512, seed: rng.next())
              model[block].replaceSubrange((sub * 512)..<((sub + 1) * 512), with: data)
              p.kind = .partialWrite
              id = try c.submit(queue: q, .write(sector: sector + UInt64(sub), data: data), kick: false)
            case 67..<77:
              p.kind = .partialRead
              p.expected = Array(model[block][(sub * 512)..<((sub + 2) * 512)])
              id = try c.submit(queue: q, .read(sector: sector + UInt64(sub), length: 1024), kick: false)
            case 77..<86:
              model[block] = [UInt8](repeating: 0, count: bs)
              p.kind = .zeroes
              id = try c.submit(
                queue: q, .writeZeroes([.init(sector: sector, numSectors: 8, flags: 0)], unmap: roll % 2 == 0),
                kick: false)
            case 86..<94:
              model[block] = [UInt8](repeating: 0, count: bs)
              p.kind = .discard
              id = try c.submit(queue: q, .discard([.init(sector: sector, numSectors: 8, flags: 0)]), kick: false)
            default:
              p.kind = .flush
              id = try c.submit(queue: q, .flush, kick: false)
            }
            pending[id] = p
          }
        }
        #expect(c.inFlight(queue: 0) == 32 && c.inFlight(queue: 1) == 32)
        try c.kick(queue: 0)
        try c.kick(queue: 1)
        var done = 0
        while done < 64 {
          let got = try c.waitAny()
          if got.isEmpty { break }
          for comp in got {
            let rid = try #require(comp.requestID)
            let removed = pending.removeValue(forKey: rid)
            let p = try #require(removed)
            #expect(comp.isOK, "round \(round) \(p.kind) block \(p.block): status \(String(describing: comp.status))")
            if p.kind == .read || p.kind == .partialRead {
              #expect(comp.data == p.expected, "round \(round) \(p.kind) block \(p.block) on queue \(comp.queue)")
              #expect(comp.usedLength == UInt32(p.expected.count + 1))
            }
            done += 1
          }
        }
        #expect(done == 64, "round \(round): \(done) of 64 completed")
      }
      #expect(c.unsignalledWakeups == 0, "completions that came without an interrupt")
      // The whole area against the model, 16 blocks per read, alternating queues.
      for chunk in 0..<(blocks / 16) {
        let r = try c.perform(queue: chunk % 2, .read(sector: UInt64(chunk * 16 * bs / 512), length: 16 * bs))
        #expect(r.isOK)
        for i in 0..<16 where Array(r.data[(i * bs)..<((i + 1) * bs)]) != model[chunk * 16 + i] {
          Issue.record("block \(chunk * 16 + i) differs from the model")
        }
      }
    }
  }

  /// A ring stopped and started again (SET_VRING_ENABLE 0, 1) resumes at its base even when
  /// avail_event in guest memory is stale: with EVENT_IDX the back-end must publish where it
  /// is before sleeping, or the driver never kicks it again.
  @Test func ringRestartWithStaleAvailEvent() throws {
    try withServer { s in
      var o = ServeProcess.options(eventIdx: true)
      o.ioTimeoutMs = 3_000
      let c = try s.client(o)
      defer { c.shutdown() }
      #expect(c.hasFeature(VirtioFeature.eventIdx))
      let m = try #require(c.memory)
      let l = try c.layout(queue: 0)
      let data = pattern(4096, seed: 12)
      for i in 0..<5 { #expect(try c.perform(.write(sector: UInt64(i * 8), data: data)).isOK) }
      for round in 0..<3 {
        try c.send(.setVringEnable, payload: VringState(index: 0, num: 0).encode())
        m.write([0, 0], at: l.used + 4 + 8 * UInt64(l.size))  // avail_event back to 0
        try c.send(.setVringEnable, payload: VringState(index: 0, num: 1).encode())
        usleep(20_000)
        let r = try c.perform(.read(sector: 0, length: 4096))
        #expect(r.isOK && r.data == data, "round \(round)")
      }
    }
  }

  // MARK: 6. Hostile guest: descriptor chains

  @Test func hostileDescriptorChains() throws {
    try withServer(arguments: ["--num-queues", "2"]) { s in
      let good = pattern(4096, seed: 4242)
      do {
        let c = try s.client()
        defer { c.shutdown() }
        #expect(try c.perform(.write(sector: 0, data: good)).isOK)
      }

      /// Runs `body` on a client with two 64-entry queues, then checks the server is alive and serving.
      func hostile(_ name: String, indirect: Bool = false, _ body: (VhostUserClient, Scratch) throws -> Void) throws {
        do {
          let c = try s.client(ServeProcess.options(queues: 2, queueSize: 64, indirect: indirect))
          #expect(c.queueCount == 2)
          try body(c, try Scratch(c))
          c.shutdown()
          try checkAliveAndServing(s, after: name)
        } catch {
          throw ServeTestError("\(name): \(error)")
        }
      }
      /// The chain was refused without being touched: used len 0, status byte unwritten.
      func refused(_ c: VhostUserClient, _ x: Scratch, _ chain: [RawDescriptor], _ what: String) throws {
        let done = try c.runChain(chain)
        #expect(done.usedLength == 0, "\(what): used len \(done.usedLength)")
        #expect(x.statusByte == 0xFF, "\(what): status byte written (\(x.statusByte))")
      }
      func stillServing(_ c: VhostUserClient, queue: Int = 0, _ what: String) throws {
        let r = try c.perform(queue: queue, .read(sector: 0, length: 4096))
        #expect(r.isOK && r.data == good, "\(what): the queue no longer serves")
      }

      try hostile("descriptor addresses outside guest memory") { c, x in
        let m = x.memory
        let size = UInt64(m.size)
        for bad in [size, size + 4096, size - 100, UInt64.max - 100, UInt64.max, 1 << 62] {
          x.prepare(.read, sector: 0)
          try refused(
            c, x,
            [
              RawDescriptor(x.header, 16, next: 1), RawDescriptor(bad, 4096, writable: true, next: 2),
              RawDescriptor(x.status, 1, writable: true),
            ], "data at 0x\(String(bad, radix: 16))")
          x.prepare(.write, sector: 0)
          try refused(
            c, x,
            [
              RawDescriptor(x.header, 16, next: 1), RawDescriptor(bad, 4096, next: 2),
              RawDescriptor(x.status, 1, writable: true),
            ], "write data at 0x\(String(bad, radix: 16))")
          if bad > size - 16 {
            try refused(
              c, x, [RawDescriptor(bad, 16, next: 1), RawDescriptor(x.status, 1, writable: true)],
              "header at 0x\(String(bad, radix: 16))")
          }
        }
        x.prepare(.read, sector: 0)
        let done = try c.runChain([
          RawDescriptor(x.header, 16, next: 1), RawDescriptor(x.data, 4096, writable: true, next: 2),
          RawDescriptor(size + 64, 1, writable: true),
        ])
        #expect(done.usedLength == 0, "status byte outside guest memory")
        try stillServing(c, "after addresses outside guest memory")
        #expect(try c.perform(.read(sector: 0, length: 4096)).data == good)
      }

      try hostile("descriptor loops") { c, x in
        x.prepare(.read, sector: 0)
        try refused(c, x, [RawDescriptor(x.header, 16, next: 0)], "self loop")
        try refused(
          c, x,
          [
            RawDescriptor(x.header, 16, next: 1), RawDescriptor(x.data, 512, writable: true, next: 2),
            RawDescriptor(x.status, 1, writable: true, next: 0),
          ], "loop back to the head")
        try refused(
          c, x,
          [
            RawDescriptor(x.header, 16, next: 1), RawDescriptor(x.data, 512, writable: true, next: 2),
            RawDescriptor(x.data + 512, 512, writable: true, next: 1),
          ], "loop in the middle")
        try stillServing(c, "after loops")
      }

      try hostile("chains longer than the queue") { c, x in
        // All 64 descriptors: a valid read of 62 sectors...
        x.prepare(.read, sector: 0)
        var chain = [RawDescriptor(x.header, 16, next: 1)]
        for i in 0..<62 { chain.append(RawDescriptor(x.data + UInt64(i * 512), 512, writable: true, next: i + 2)) }
        chain.append(RawDescriptor(x.status, 1, writable: true))
        let ok = try c.runChain(chain)
        #expect(ok.usedLength == 62 * 512 + 1)
        #expect(x.statusByte == statusOK)
        #expect(x.memory.read(at: x.data, count: 4096) == good)
        // ...then the same 64 with the last one going on: 65 and more steps.
        x.prepare(.read, sector: 0)
        chain[63] = RawDescriptor(x.status, 1, writable: true, next: 1)
        try refused(c, x, chain, "chain of 64 descriptors continuing")
        try stillServing(c, "after long chains")
      }

      try hostile("chains without a writable status byte") { c, x in
        let other = pattern(4096, seed: 1)
        x.prepare(.write, sector: 0, data: other)
        try refused(c, x, [RawDescriptor(x.header, 16, next: 1), RawDescriptor(x.data, 4096)], "write, all readable")
        x.prepare(.read, sector: 0, data: other)
        try refused(c, x, [RawDescriptor(x.header, 16, next: 1), RawDescriptor(x.data, 4096)], "read, all readable")
        #expect(x.memory.read(at: x.data, count: 4096) == other, "the readable buffer of a refused read was written")
        try refused(c, x, [RawDescriptor(x.header, 16)], "header only")
        x.prepare(.read, sector: 0, data: other)
        try refused(
          c, x,
          [
            RawDescriptor(x.header, 16, next: 1), RawDescriptor(x.data, 4096, writable: true, next: 2),
            RawDescriptor(x.status, 0, writable: true),
          ], "zero-length status")
        x.prepare(.write, sector: 0, data: other)
        try refused(
          c, x,
          [
            RawDescriptor(x.header, 16, next: 1), RawDescriptor(x.status, 1, writable: true, next: 2),
            RawDescriptor(x.data, 4096),
          ], "writable descriptor before readable data")
        // None of those wrote to the disk.
        try stillServing(c, "after chains without status")
      }

      try hostile("head index >= queue size") { c, x in
        let before = try c.usedIndex(queue: 0)
        try c.publish(queue: 0, head: 64 + 3)
        usleep(100_000)
        #expect(try c.usedIndex(queue: 0) == before, "a used entry for an out-of-range head")
        // The other queue of the same connection still works.
        try stillServing(c, queue: 1, "queue 1 after a bad head on queue 0")
      }

      try hostile("a head made available again while its read is in flight") { c, x in
        // Published twice before one kick: the worker pops both before the first completes.
        // (The server used to die on the second completion for that head.)
        x.prepare(.read, sector: 0)
        let chain = [
          RawDescriptor(x.header, 16, next: 1), RawDescriptor(x.data, 4096, writable: true, next: 2),
          RawDescriptor(x.status, 1, writable: true),
        ]
        let ds = try c.reserveDescriptors(queue: 0, count: chain.count)
        for (i, d) in chain.enumerated() {
          try c.placeDescriptor(
            queue: 0, index: ds[i], address: d.address, length: d.length, flags: d.flags,
            next: d.next.map { ds[$0] } ?? 0)
        }
        try c.publish(queue: 0, head: ds[0], kick: false)
        try c.publish(queue: 0, head: ds[0], kick: false)
        try c.kick(queue: 0, force: true)
        usleep(200_000)
        try stillServing(c, queue: 1, "queue 1 after a head reused in flight on queue 0")
      }

      try hostile("avail index far ahead") { c, x in
        let before = try c.usedIndex(queue: 0)
        let (avail, _) = try c.ringIndices(queue: 0)
        try c.setAvailIndex(queue: 0, avail &+ 1000)
        usleep(100_000)
        #expect(try c.usedIndex(queue: 0) == before, "the back-end consumed more entries than the ring holds")
        try stillServing(c, queue: 1, "queue 1 after a jump on queue 0")
      }

      try hostile("data descriptors in the wrong direction") { c, x in
        // A read whose data buffer is device-readable: nothing may be returned as read.
        let sentinel = [UInt8](repeating: 0xAB, count: 4096)
        x.prepare(.read, sector: 0, data: sentinel)
        let r = try c.runChain([
          RawDescriptor(x.header, 16, next: 1), RawDescriptor(x.data, 4096, next: 2),
          RawDescriptor(x.status, 1, writable: true),
        ])
        #expect(x.statusByte == statusIOErr, "read into a device-readable buffer: status \(x.statusByte)")
        #expect(r.usedLength <= 1)
        #expect(x.memory.read(at: x.data, count: 4096) == sentinel)
        // A write whose data buffer is device-writable: nothing may be written, and not as success.
        x.prepare(.write, sector: 0, data: pattern(4096, seed: 5))
        _ = try c.runChain([
          RawDescriptor(x.header, 16, next: 1), RawDescriptor(x.data, 4096, writable: true, next: 2),
          RawDescriptor(x.status, 1, writable: true),
        ])
        #expect(x.statusByte == statusIOErr, "write from a device-writable buffer: status \(x.statusByte)")
        // Readable after writable.
        x.prepare(.read, sector: 0)
        _ = try c.runChain([
          RawDescriptor(x.header, 16, next: 1), RawDescriptor(x.data, 512, writable: true, next: 2),
          RawDescriptor(x.data + 512, 512, next: 3), RawDescriptor(x.status, 1, writable: true),
        ])
        #expect(x.statusByte == statusIOErr)
        try stillServing(c, "after wrong directions")
      }

      try hostile("indirect descriptor without INDIRECT_DESC") { c, x in
        #expect(!c.usesIndirect)
        x.prepare(.read, sector: 0)
        let table = try #require(x.memory.allocate(64))
        x.memory.write(
          indirectTable([RawDescriptor(x.header, 16, next: 1), RawDescriptor(x.status, 1, writable: true)]), at: table)
        try refused(c, x, [RawDescriptor(table, 32, flags: VirtqDescFlag.indirect)], "indirect not negotiated")
        try stillServing(c, "after an unnegotiated indirect descriptor")
      }

      try hostile("indirect tables with bad lengths", indirect: true) { c, x in
        #expect(c.usesIndirect)
        let m = x.memory
        let table = try #require(m.allocate(8192, alignment: 64))
        let readChain = [
          RawDescriptor(x.header, 16, next: 1), RawDescriptor(x.data, 4096, writable: true, next: 2),
          RawDescriptor(x.status, 1, writable: true),
        ]
        m.write(indirectTable(readChain), at: table)
        x.prepare(.read, sector: 0)
        // Control: the well-formed table works.
        let ok = try c.runChain([RawDescriptor(table, 48, flags: VirtqDescFlag.indirect)])
        #expect(ok.usedLength == 4097 && x.statusByte == statusOK)
        #expect(m.read(at: x.data, count: 4096) == good)
        for (length, what) in [
          (UInt32(0), "empty"), (17, "17 bytes"), (47, "47 bytes"), (300 * 16, "300 entries"),
          (UInt32.max & ~15, "4 GiB"),
        ] {
          x.prepare(.read, sector: 0)
          try refused(c, x, [RawDescriptor(table, length, flags: VirtqDescFlag.indirect)], "indirect table of \(what)")
        }
        x.prepare(.read, sector: 0)
        try refused(
          c, x, [RawDescriptor(UInt64(m.size) - 16, 48, flags: VirtqDescFlag.indirect)], "table past guest memory")
        try refused(
          c, x,
          [
            RawDescriptor(table, 48, next: 1, flags: VirtqDescFlag.indirect),
            RawDescriptor(x.status, 1, writable: true),
          ],
          "INDIRECT with NEXT")
        // A table inside a table.
        let inner = table + 4096
        m.write(indirectTable(readChain), at: inner)
        m.write(indirectTable([RawDescriptor(inner, 48, flags: VirtqDescFlag.indirect)]), at: table)
        try refused(c, x, [RawDescriptor(table, 16, flags: VirtqDescFlag.indirect)], "nested indirect table")
        // A loop and an out-of-range next inside the table.
        m.write(
          indirectTable([RawDescriptor(x.header, 16, next: 1), RawDescriptor(x.data, 512, writable: true, next: 0)]),
          at: table)
        try refused(c, x, [RawDescriptor(table, 32, flags: VirtqDescFlag.indirect)], "loop in an indirect table")
        m.write(
          indirectTable([RawDescriptor(x.header, 16, next: 1), RawDescriptor(x.data, 512, writable: true, next: 9)]),
          at: table)
        try refused(c, x, [RawDescriptor(table, 32, flags: VirtqDescFlag.indirect)], "next past an indirect table")
        // 300 valid-looking entries: more segments than the back-end takes.
        var long = [RawDescriptor(x.header, 16, next: 1)]
        for i in 0..<298 { long.append(RawDescriptor(x.data, 0, writable: true, next: i + 2)) }
        long.append(RawDescriptor(x.status, 1, writable: true))
        m.write(indirectTable(long), at: table)
        try refused(c, x, [RawDescriptor(table, 300 * 16, flags: VirtqDescFlag.indirect)], "300-entry table")
        try stillServing(c, "after bad indirect tables")
      }

      try hostile("zero-length descriptors") { c, x in
        let data = pattern(4096, seed: 11)
        x.prepare(.write, sector: 64, data: data)
        let w = try c.runChain([
          RawDescriptor(x.header, 16, next: 1), RawDescriptor(0, 0, next: 2), RawDescriptor(x.data, 4096, next: 3),
          RawDescriptor(x.data, 0, writable: true, next: 4), RawDescriptor(x.status, 1, writable: true),
        ])
        #expect(x.statusByte == statusOK && w.usedLength == 1, "write with zero-length descriptors")
        #expect(try c.perform(.read(sector: 64, length: 4096)).data == data)

        let buffer = try #require(x.memory.allocate(8192, alignment: 4096))
        x.prepare(.read, sector: 64)
        let r = try c.runChain([
          RawDescriptor(x.header, 8, next: 1), RawDescriptor(x.header + 8, 8, next: 2),
          RawDescriptor(buffer, 2048, writable: true, next: 3), RawDescriptor(0, 0, writable: true, next: 4),
          RawDescriptor(buffer + 2048, 2048, writable: true, next: 5), RawDescriptor(x.status, 1, writable: true),
        ])
        #expect(x.statusByte == statusOK && r.usedLength == 4097, "read with zero-length descriptors")
        #expect(x.memory.read(at: buffer, count: 4096) == data)

        x.prepare(.read, sector: 0)
        _ = try c.runChain([RawDescriptor(x.header, 0, next: 1), RawDescriptor(x.status, 1, writable: true)])
        #expect(x.statusByte == statusIOErr, "zero-length header")
        x.prepare(.read, sector: 0)
        _ = try c.runChain([RawDescriptor(x.header, 8, next: 1), RawDescriptor(x.status, 1, writable: true)])
        #expect(x.statusByte == statusIOErr, "8-byte header")
        x.prepare(.read, sector: 0)
        _ = try c.runChain([
          RawDescriptor(x.header, 16, next: 1), RawDescriptor(x.data, 0, writable: true, next: 2),
          RawDescriptor(x.status, 1, writable: true),
        ])
        #expect(x.statusByte == statusOK || x.statusByte == statusIOErr, "zero-length read")
        try stillServing(c, "after zero-length descriptors")
      }

      // Nothing above wrote to sector 0.
      let c = try s.client()
      defer { c.shutdown() }
      #expect(try c.perform(.read(sector: 0, length: 4096)).data == good)
    }
  }

  // MARK: 6. Hostile front-end: malformed messages

  @Test func malformedMessages() throws {
    try withServer(arguments: ["--num-queues", "2"]) { s in
      try checkAliveAndServing(s, after: "start")
      /// The server's descriptor count once it held still for 300 ms (a disconnected client's
      /// queues are torn down by their worker threads, which may take a moment under load: a
      /// 50 ms pause once measured a baseline with a previous client's 9 fds still open).
      func settledFdCount(expecting target: Int? = nil) -> Int {
        let deadline = Date().addingTimeInterval(6)
        var last = s.openFdCount()
        var steady = 0
        while Date() < deadline {
          usleep(50_000)
          let now = s.openFdCount()
          steady = now == last ? steady + 1 : 0
          last = now
          if steady >= 6 && (target == nil || now == target) { return now }
        }
        return last
      }
      let baseline = settledFdCount()
      #expect(baseline > 0, "cannot count the server's fds")

      func malformed(_ name: String, start: Bool = true, _ body: (VhostUserClient) throws -> Void) throws {
        do {
          let c = try s.client(ServeProcess.options(queues: 2), start: start)
          try body(c)
          c.shutdown()
          try checkAliveAndServing(s, after: name)
        } catch {
          throw ServeTestError("\(name): \(error)")
        }
      }
      func stillWorks(_ c: VhostUserClient, _ what: String) throws {
        for q in 0..<c.queueCount {
          let r = try c.perform(queue: q, .read(sector: 0, length: 4096))
          #expect(r.isOK, "\(what): I/O on queue \(q) of the same connection")
        }
      }
      func state(_ index: UInt32, _ num: UInt32) -> [UInt8] { VringState(index: index, num: num).encode() }

      try malformed("unknown request codes") { c in
        try c.sendMessage(request: 999, flags: VhostHeader.version | VhostHeader.needReplyFlag, payload: [1, 2, 3, 4])
        var r = try c.receiveMessage()
        r.closeFds()
        #expect(r.request == 999 && r.isReply)
        #expect(r.u64 != nil && r.u64 != 0, "unknown request acked with \(String(describing: r.u64))")
        try c.sendMessage(request: 0, payload: [UInt8](repeating: 7, count: 100))
        try c.sendMessage(request: 0xFFFF_FFFF, payload: [UInt8](repeating: 1, count: 4096))
        try c.sendMessage(request: 33)
        #expect(try c.getU64(.getFeatures) == c.backendFeatures, "framing lost after unknown requests")
        try stillWorks(c, "unknown requests")
      }

      try malformed("wrong payload sizes") { c in
        let m = try #require(c.memory)
        expectNack("SET_FEATURES of 4 bytes") { try c.send(.setFeatures, payload: [0, 0, 0, 1]) }
        expectNack("SET_FEATURES of 16 bytes") {
          try c.send(.setFeatures, payload: encodeU64(c.features) + [0, 0, 0, 0, 0, 0, 0, 0])
        }
        expectNack("SET_PROTOCOL_FEATURES empty") { try c.send(.setProtocolFeatures) }
        expectNack("SET_VRING_NUM of 12 bytes") { try c.send(.setVringNum, payload: [UInt8](repeating: 0, count: 12)) }
        expectNack("SET_VRING_BASE of 4 bytes") { try c.send(.setVringBase, payload: [0, 0, 0, 0]) }
        expectNack("SET_VRING_ADDR of 8 bytes") { try c.send(.setVringAddr, payload: [UInt8](repeating: 0, count: 8)) }
        expectNack("SET_VRING_ENABLE of 16 bytes") {
          try c.send(.setVringEnable, payload: [UInt8](repeating: 0, count: 16))
        }
        expectNack("SET_MEM_TABLE header only") {
          try c.send(.setMemTable, payload: [1, 0, 0, 0, 0, 0, 0, 0], fds: [m.fd])
        }
        expectNack("SET_MEM_TABLE of 0 regions") { try c.send(.setMemTable, payload: [0, 0, 0, 0, 0, 0, 0, 0]) }
        expectNack("SET_MEM_TABLE claiming 9 regions") {
          try c.send(.setMemTable, payload: [9, 0, 0, 0, 0, 0, 0, 0] + [UInt8](repeating: 0, count: 32), fds: [m.fd])
        }
        expectNack("ADD_MEM_REG of 20 bytes") {
          try c.send(.addMemReg, payload: [UInt8](repeating: 0, count: 20), fds: [m.fd])
        }
        let fd = devNull()
        expectNack("SET_VRING_KICK of 4 bytes") { try c.send(.setVringKick, payload: [0, 0, 0, 0], fds: [fd]) }
        close(fd)
        expectNack("SET_CONFIG of 3 bytes") { try c.send(.setConfig, payload: [0, 0, 0]) }
        expectNack("SET_CONFIG of capacity") {
          try c.send(.setConfig, payload: ConfigSpace(offset: 0, size: 8, flags: 0, payload: encodeU64(1)).encode())
        }
        // Requests that have replies still answer (the front-end would wait forever otherwise).
        for (payload, what) in [
          ([UInt8](repeating: 0, count: 4), "4 bytes"),
          (
            ConfigSpace(offset: 200, size: 100, flags: 0, payload: [UInt8](repeating: 0, count: 100)).encode(),
            "window past 256"
          ), ([UInt8](repeating: 0, count: 12 + 8), "size 0 with 8 bytes"),
        ] {
          var r = try #require(try c.send(.getConfig, payload: payload), "GET_CONFIG of \(what)")
          r.closeFds()
          #expect(r.payload.count <= 12, "GET_CONFIG of \(what) answered with \(r.payload.count) bytes")
        }
        var vb = try #require(try c.send(.getVringBase, payload: [0, 0, 0]))
        vb.closeFds()
        #expect(try c.getU64(.getFeatures) == c.backendFeatures)
        try stillWorks(c, "wrong payload sizes")
      }

      try malformed("SET_MEM_TABLE with fewer fds than regions") { c in
        let m = try #require(c.memory)
        let half = UInt64(m.size / 2)
        let two = MemoryTable(regions: [
          MemoryRegion(guestAddress: 0, size: half, userAddress: m.userAddress, mmapOffset: 0),
          MemoryRegion(guestAddress: half, size: half, userAddress: m.userAddress + half, mmapOffset: half),
        ])
        expectNack("2 regions, 1 fd") { try c.send(.setMemTable, payload: two.encode(), fds: [m.fd]) }
        let one = MemoryTable(regions: [
          MemoryRegion(guestAddress: 0, size: UInt64(m.size), userAddress: m.userAddress, mmapOffset: 0)
        ])
        expectNack("1 region, 0 fds") { try c.send(.setMemTable, payload: one.encode()) }
        expectNack("1 region, 2 fds") { try c.send(.setMemTable, payload: one.encode(), fds: [m.fd, m.fd]) }
        expectNack("ADD_MEM_REG without fd") {
          try c.send(.addMemReg, payload: SingleMemoryRegion(region: one.regions[0]).encode())
        }
        expectNack("overlapping regions") {
          let overlap = MemoryTable(regions: [
            one.regions[0], MemoryRegion(guestAddress: half, size: half, userAddress: 1 << 40, mmapOffset: 0),
          ])
          try c.send(.setMemTable, payload: overlap.encode(), fds: [m.fd, m.fd])
        }
        expectNack("empty region") {
          try c.send(
            .setMemTable,
            payload: MemoryTable(regions: [
              MemoryRegion(guestAddress: 0, size: 0, userAddress: m.userAddress, mmapOffset: 0)
            ]).encode(), fds: [m.fd])
        }
        expectNack("region wrapping around") {
          try c.send(
            .setMemTable,
            payload: MemoryTable(regions: [
              MemoryRegion(guestAddress: UInt64.max - 4095, size: 8192, userAddress: m.userAddress, mmapOffset: 0)
            ]).encode(), fds: [m.fd])
        }
        try stillWorks(c, "bad memory tables")
      }

      try malformed("a memory region larger than its file") { c in
        let m = try #require(c.memory)
        let huge = MemoryTable(regions: [
          MemoryRegion(guestAddress: 0, size: 1 << 30, userAddress: m.userAddress, mmapOffset: 0)
        ])
        expectNack("a 1 GiB region backed by a \(m.size >> 20) MiB memfd") {
          try c.send(.setMemTable, payload: huge.encode(), fds: [m.fd])
        }
        // Whatever the back-end made of it, a buffer beyond the file must not kill it.
        let x = try Scratch(c)
        x.prepare(.read, sector: 0)
        _ = try c.runChain([
          RawDescriptor(x.header, 16, next: 1), RawDescriptor(512 << 20, 4096, writable: true, next: 2),
          RawDescriptor(x.status, 1, writable: true),
        ])
        #expect(s.isAlive(), "strata serve died on a buffer beyond its memory file")
        try stillWorks(c, "an oversized region")
      }

      try malformed("SET_VRING_NUM and SET_VRING_BASE out of range", start: false) { c in
        try c.negotiate()
        #expect(c.replyAckEnabled)
        for num: UInt32 in [0, 3, 100, 255, 2048, 1 << 16, UInt32.max] {
          expectNack("SET_VRING_NUM \(num)") { try c.send(.setVringNum, payload: state(0, num)) }
        }
        expectNack("SET_VRING_NUM on queue 2 of 2") { try c.send(.setVringNum, payload: state(2, 64)) }
        expectNack("SET_VRING_NUM on queue 0xFFFFFFFF") { try c.send(.setVringNum, payload: state(UInt32.max, 64)) }
        expectNack("SET_VRING_BASE 0x10000") { try c.send(.setVringBase, payload: state(0, 0x10000)) }
        expectNack("SET_VRING_ENABLE 2") { try c.send(.setVringEnable, payload: state(0, 2)) }
        expectNack("SET_FEATURES not offered") {
          try c.send(.setFeatures, payload: encodeU64(c.features | VirtioFeature.ringPacked | 1 << 63))
        }
        expectNack("SET_PROTOCOL_FEATURES not offered") {
          try c.send(.setProtocolFeatures, payload: encodeU64(1 << 40))
        }
        // Then the proper sequence works.
        try c.send(.setProtocolFeatures, payload: encodeU64(c.protocolFeatures))
        try c.start()
        try stillWorks(c, "out-of-range ring settings")
      }

      try malformed("huge payload size") { c in
        try c.sendMessage(request: VhostRequest.getFeatures.rawValue, size: 0xFFFF_FFF0)
        expectDisconnect(c, "payload size 0xFFFFFFF0")
      }
      try malformed("payload just over the limit") { c in
        try c.sendMessage(
          request: VhostRequest.setOwner.rawValue, payload: [UInt8](repeating: 0, count: VhostHeader.maxPayload + 1))
        expectDisconnect(c, "payload of maxPayload+1")
      }
      try malformed("bad version") { c in
        try c.sendMessage(request: VhostRequest.getFeatures.rawValue, flags: 0x2)
        expectDisconnect(c, "version 2")
      }
      try malformed("truncated header") { c in
        try c.sendRaw([1, 0, 0, 0, 1])
      }
      try malformed("truncated payload") { c in
        try c.sendRaw(
          VhostHeader(request: VhostRequest.setFeatures.rawValue, flags: 1, size: 100).encode() + [1, 2, 3])
      }

      try malformed("wrong fd counts") { c in
        let a = devNull()
        let b = devNull()
        defer {
          close(a)
          close(b)
        }
        expectNack("SET_VRING_CALL with 2 fds") { try c.send(.setVringCall, payload: encodeU64(0), fds: [a, b]) }
        expectNack("SET_VRING_KICK without fd") { try c.send(.setVringKick, payload: encodeU64(1)) }
        expectNack("SET_VRING_KICK no-fd flag with an fd") {
          try c.send(.setVringKick, payload: encodeU64(VringFdPayload.noFdFlag), fds: [a])
        }
        expectNack("SET_VRING_ERR with reserved bits") {
          try c.send(.setVringErr, payload: encodeU64(1 << 20), fds: [a])
        }
        expectNack("SET_BACKEND_REQ_FD without fd") { try c.send(.setBackendReqFd) }
        expectNack("SET_BACKEND_REQ_FD with 2 fds") { try c.send(.setBackendReqFd, fds: [a, b]) }
        let m = try #require(c.memory)
        expectNack("SET_MEM_TABLE 1 region, 3 fds") {
          try c.send(
            .setMemTable,
            payload: MemoryTable(regions: [
              MemoryRegion(guestAddress: 0, size: UInt64(m.size), userAddress: m.userAddress, mmapOffset: 0)
            ]).encode(),
            fds: [m.fd, a, b])
        }
        var r = try #require(try c.send(.getFeatures, fds: [a, b, a]))
        r.closeFds()
        #expect(r.u64 == c.backendFeatures, "GET_FEATURES with fds")
        try c.send(.setOwner, fds: [a])
        try stillWorks(c, "wrong fd counts")
      }

      try malformed("ring addresses outside guest memory and bad queue indices") { c in
        let base = try c.getVringBase(queue: 1)
        #expect(base == 0)
        try c.send(
          .setVringAddr,
          payload: VringAddress(
            index: 1, flags: 0, descUser: 0xDEAD_0000_0000, usedUser: 0xDEAD_0001_0000, availUser: 0xDEAD_0002_0000,
            logGuest: 0
          ).encode())
        let fd = devNull()
        try c.send(.setVringKick, payload: encodeU64(1), fds: [fd])
        close(fd)
        expectNack("SET_VRING_ENABLE of a ring outside guest memory") {
          try c.send(.setVringEnable, payload: state(1, 1))
        }
        expectNack("SET_VRING_ADDR of a running ring") {
          try c.send(
            .setVringAddr,
            payload: VringAddress(index: 0, flags: 0, descUser: 0, usedUser: 0, availUser: 0, logGuest: 0).encode())
        }
        expectNack("SET_VRING_ENABLE on queue 5") { try c.send(.setVringEnable, payload: state(5, 1)) }
        let e = devNull()
        expectNack("SET_VRING_CALL on queue 200") { try c.send(.setVringCall, payload: encodeU64(200), fds: [e]) }
        close(e)
        var vb = try #require(try c.send(.getVringBase, payload: state(9, 0)))
        vb.closeFds()
        let r = try c.perform(queue: 0, .read(sector: 0, length: 4096))
        #expect(r.isOK, "queue 0 after queue 1 was broken")
      }

      try malformed("RESET_DEVICE mid-session") { c in
        #expect(try c.perform(.write(sector: 4, data: pattern(512, seed: 8))).isOK)
        try c.send(.resetDevice)
      }

      try malformed("disconnect with requests in flight") { c in
        for i in 0..<24 {
          try c.submit(queue: i % 2, .write(sector: UInt64(1000 + i * 8), data: pattern(4096, seed: UInt64(i))))
        }
      }

      let after = settledFdCount(expecting: baseline)
      #expect(after == baseline, "the server holds \(after) fds after the malformed messages, \(baseline) before")
    }
  }

  // MARK: 7. One server per image; reconnection

  @Test func secondServerIsRefusedAndReconnectKeepsData() throws {
    try withServer(arguments: ["--num-queues", "2"]) { s in
      let binary = try #require(strataBinary)
      let a = pattern(65536, seed: 501)
      do {
        let c = try s.client()
        defer { c.shutdown() }
        #expect(try c.perform(.write(sector: 128, data: a)).isOK)
      }

      // A second server of the same image, on another socket.
      let otherSocket = s.directory + "/other.sock"
      let secondLog = s.directory + "/second.log"
      let pid = try spawnProcess(binary, ["serve", s.image, "--socket", otherSocket], stderrPath: secondLog)
      guard let st = waitStatus(pid, seconds: 20) else {
        kill(pid, SIGKILL)
        _ = waitStatus(pid, seconds: 5)
        Issue.record("a second strata serve of the same image kept running")
        return
      }
      let message = (try? String(contentsOfFile: secondLog, encoding: .utf8)) ?? ""
      #expect(exitedNormally(st) && exitCode(st) != 0, "second serve: \(describeStatus(st)): \(message)")
      #expect(message.contains("in use"), "second serve said: \(message)")
      #expect(access(otherSocket, F_OK) != 0, "the refused server left a socket")

      // Another image on the live socket is refused too, and the first server keeps it.
      let other = s.directory + "/other.strata"
      #expect(try s.strata(["create", other, "--size", "1M"]).succeeded)
      let pid2 = try spawnProcess(binary, ["serve", other, "--socket", s.socketPath], stderrPath: secondLog)
      if let st2 = waitStatus(pid2, seconds: 20) {
        #expect(exitedNormally(st2) && exitCode(st2) != 0, "serve on a live socket: \(describeStatus(st2))")
      } else {
        kill(pid2, SIGKILL)
        _ = waitStatus(pid2, seconds: 5)
        Issue.record("strata serve on a live socket kept running")
      }
      #expect(s.isAlive())
      #expect(access(s.socketPath, F_OK) == 0, "the live socket was removed")

      // Reconnect: the data is there; add more.
      let b = pattern(12288, seed: 502)
      do {
        let c = try s.client(ServeProcess.options(queues: 2))
        defer { c.shutdown() }
        #expect(try c.perform(queue: 1, .read(sector: 128, length: a.count)).data == a)
        #expect(try c.perform(queue: 1, .write(sector: 4096, data: b)).isOK)
      }
      // A front-end that vanishes with requests in flight.
      do {
        let c = try s.client(ServeProcess.options(queues: 2))
        for i in 0..<16 {
          try c.submit(queue: i % 2, .write(sector: UInt64(8192 + i * 8), data: pattern(4096, seed: UInt64(600 + i))))
        }
        c.shutdown()
      }
      do {
        let c = try s.client(ServeProcess.options(queues: 2))
        defer { c.shutdown() }
        #expect(try c.perform(queue: 0, .read(sector: 128, length: a.count)).data == a)
        #expect(try c.perform(queue: 1, .read(sector: 4096, length: b.count)).data == b)
      }
      s.stop()
      for (sector, data) in [(UInt64(128), a), (4096, b)] {
        let r = try s.strata(["read", s.image, "--offset", String(sector * 512), "--length", String(data.count)])
        #expect(r.succeeded && r.stdout == data, "strata read at sector \(sector): \(r.stderr)")
      }
      let check = try s.strata(["check", s.image])
      #expect(check.succeeded, "strata check: \(check.stderr)")
    }
  }
}
