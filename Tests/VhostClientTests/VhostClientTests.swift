// VhostClient against a real vhost-user-blk back-end: Debian's qemu-storage-daemon.

import Glibc
import Testing
import VhostProtocol

@testable import VhostClient

let daemonAvailable = qemuStorageDaemon != nil

@Suite(.enabled(if: daemonAvailable, Comment(rawValue: qsdMissing)))
struct AgainstQemuStorageDaemon {
  @Test func negotiationAndConfig() throws {
    try withDaemon(size: 48 << 20, queues: 2) { d in
      let c = try d.client(
        {
          var o = VhostUserClient.Options()
          o.queues = 4
          return o
        }())
      defer { c.shutdown() }
      #expect(c.backendFeatures & VirtioFeature.version1 != 0)
      #expect(c.backendFeatures & VirtioFeature.protocolFeatures != 0)
      #expect(c.features & VirtioFeature.version1 != 0)
      #expect(c.hasProtocol(.replyAck))
      #expect(c.replyAckEnabled)
      #expect(c.hasProtocol(.config))
      #expect(c.hasProtocol(.mq))
      #expect(!c.hasProtocol(.inflightShmfd))
      #expect(c.backendQueueCount == 2)
      let config = try #require(c.config)
      #expect(config.capacitySectors == UInt64(d.size / 512))
      #expect(c.capacityBytes == UInt64(d.size))
      #expect(config.blkSize == 512)
      #expect(config.numQueues == 2)
      #expect(c.queueCount == 2)
      #expect(c.isConnected)
      // GET_CONFIG again after start answers the same.
      #expect(try c.getConfig() == config)
    }
  }

  @Test func writeThenReadBackAtSeveralSectorsAndSizes() throws {
    try withDaemon { d in
      let c = try d.client()
      defer { c.shutdown() }
      let cases: [(sector: UInt64, bytes: Int)] = [
        (0, 512), (1, 4096), (7, 512 * 7), (100, 65536), (2048, 1 << 20), (UInt64(d.size / 512 - 8), 4096),
      ]
      for (i, t) in cases.enumerated() {
        let data = pattern(t.bytes, seed: UInt64(i + 1))
        let w = try c.perform(.write(sector: t.sector, data: data))
        #expect(w.isOK, "write at sector \(t.sector)")
        let r = try c.perform(.read(sector: t.sector, length: t.bytes))
        #expect(r.isOK)
        #expect(r.data == data, "read back at sector \(t.sector), \(t.bytes) bytes")
        #expect(d.fileBytes(at: Int(t.sector) * 512, count: t.bytes) == data, "file content at sector \(t.sector)")
      }
      // Beyond the end: an I/O error, not a crash.
      let past = try c.perform(.read(sector: UInt64(d.size / 512), length: 512))
      #expect(past.status == VirtioBlkStatus.ioError.rawValue)
      #expect(c.isConnected)
    }
  }

  @Test func flushAndGetID() throws {
    try withDaemon { d in
      let c = try d.client()
      defer { c.shutdown() }
      #expect(c.features & VirtioBlkFeature.flush != 0)
      #expect(try c.perform(.write(sector: 8, data: pattern(4096, seed: 9))).isOK)
      #expect(try c.perform(.flush).isOK)
      let id = try c.perform(.getID)
      if id.isOK {
        #expect(id.data.count == 20)
        #expect(id.data.contains { $0 != 0 }, "GET_ID returned an all-zero serial")
      } else {
        #expect(id.status == VirtioBlkStatus.unsupported.rawValue)
      }
      // An unknown type is refused with UNSUPP.
      let odd = try c.perform(.custom(type: 0x7777, sector: 0, readable: [], writableLength: 0))
      #expect(odd.status == VirtioBlkStatus.unsupported.rawValue)
    }
  }

  @Test func discardAndWriteZeroes() throws {
    try withDaemon { d in
      let c = try d.client()
      defer { c.shutdown() }
      let data = pattern(64 << 10, seed: 3)
      if c.features & VirtioBlkFeature.writeZeroes != 0 {
        for unmap in [false, true] {
          #expect(try c.perform(.write(sector: 256, data: data)).isOK)
          let z = try c.perform(
            .writeZeroes([VirtioBlkDiscardSegment(sector: 264, numSectors: 16, flags: 0)], unmap: unmap))
          #expect(z.isOK, "write zeroes unmap=\(unmap)")
          let r = try c.perform(.read(sector: 256, length: data.count))
          var expected = data
          for i in (8 * 512)..<(24 * 512) { expected[i] = 0 }
          #expect(r.data == expected, "write zeroes unmap=\(unmap)")
        }
      }
      if c.features & VirtioBlkFeature.discard != 0 {
        let config = try #require(c.config)
        #expect(config.maxDiscardSectors > 0)
        #expect(try c.perform(.write(sector: 1024, data: data)).isOK)
        let r = try c.perform(.discard([VirtioBlkDiscardSegment(sector: 1024, numSectors: 128, flags: 0)]))
        #expect(r.isOK)
        // The discarded range reads back as the device likes (zeroes here), but reads succeed.
        #expect(try c.perform(.read(sector: 1024, length: data.count)).isOK)
      }
    }
  }

  @Test func twoQueues() throws {
    try withDaemon(queues: 2) { d in
      let c = try d.client(
        {
          var o = VhostUserClient.Options()
          o.queues = 2
          return o
        }())
      defer { c.shutdown() }
      #expect(c.queueCount == 2)
      let a = pattern(8192, seed: 21)
      let b = pattern(8192, seed: 22)
      #expect(try c.perform(queue: 0, .write(sector: 0, data: a)).isOK)
      #expect(try c.perform(queue: 1, .write(sector: 16, data: b)).isOK)
      #expect(try c.perform(queue: 1, .read(sector: 0, length: 8192)).data == a)
      #expect(try c.perform(queue: 0, .read(sector: 16, length: 8192)).data == b)
      // Both queues busy at once.
      var ids: [UInt64: (Int, UInt64)] = [:]
      for i in 0..<16 {
        let q = i % 2
        let id = try c.submit(queue: q, .read(sector: UInt64(i % 2) * 16, length: 8192))
        ids[id] = (q, UInt64(i % 2) * 16)
      }
      var seen = 0
      while seen < 16 {
        for comp in try c.waitAny() {
          let rid = try #require(comp.requestID)
          let (q, sector) = try #require(ids[rid])
          #expect(comp.queue == q)
          #expect(comp.data == (sector == 0 ? a : b))
          seen += 1
        }
      }
      #expect(c.inFlight(queue: 0) == 0 && c.inFlight(queue: 1) == 0)
    }
  }

  @Test func queueDepth32OfMixedRequests() throws {
    try withDaemon { d in
      let c = try d.client()
      defer { c.shutdown() }
      let blockSize = 4096
      let blocks = 64
      // Model of the disk's first `blocks` blocks.
      var model = (0..<blocks).map { pattern(blockSize, seed: UInt64(1000 + $0)) }
      for (i, b) in model.enumerated() {
        try c.submit(queue: 0, .write(sector: UInt64(i * 8), data: b))
        if c.inFlight(queue: 0) == 32 { _ = try c.wait(queue: 0) }
      }
      while c.inFlight(queue: 0) > 0 { for x in try c.wait(queue: 0) { #expect(x.isOK) } }

      var rng: UInt64 = 77
      func next(_ n: Int) -> Int {
        rng = rng &* 6_364_136_223_846_793_005 &+ 1_442_695_040_888_963_407
        return Int((rng >> 33) % UInt64(n))
      }
      for round in 0..<8 {
        // 32 requests in flight at once, never two on the same block.
        var used = Set<Int>()
        var expect: [UInt64: (kind: Int, block: Int, data: [UInt8])] = [:]
        for k in 0..<32 {
          var block = next(blocks)
          while used.contains(block) { block = (block + 1) % blocks }
          used.insert(block)
          let kind = k % 8 == 7 ? 2 : next(2)  // 0 read, 1 write, 2 flush
          switch kind {
          case 0:
            let id = try c.submit(queue: 0, .read(sector: UInt64(block * 8), length: blockSize), kick: false)
            expect[id] = (0, block, model[block])
          case 1:
            let data = pattern(blockSize, seed: UInt64(round * 100 + k))
            model[block] = data
            let id = try c.submit(queue: 0, .write(sector: UInt64(block * 8), data: data), kick: false)
            expect[id] = (1, block, data)
          default:
            let id = try c.submit(queue: 0, .flush, kick: false)
            expect[id] = (2, block, [])
          }
        }
        #expect(c.inFlight(queue: 0) == 32)
        try c.kick(queue: 0)
        var done = 0
        while done < 32 {
          for comp in try c.wait(queue: 0) {
            let rid = try #require(comp.requestID)
            let e = try #require(expect[rid])
            #expect(comp.isOK)
            if e.kind == 0 { #expect(comp.data == e.data, "round \(round) block \(e.block)") }
            done += 1
          }
        }
      }
      // Everything the model holds is what the disk holds.
      for i in 0..<blocks {
        #expect(try c.perform(.read(sector: UInt64(i * 8), length: blockSize)).data == model[i])
      }
    }
  }

  /// The QEMU variants: indirect descriptors, inflight area, ADD_MEM_REG, no EVENT_IDX, no REPLY_ACK.
  @Test(arguments: ["indirect", "inflight", "memslots", "no-event-idx", "no-reply-ack", "small-queue"])
  func optionVariants(_ variant: String) throws {
    try withDaemon { d in
      var o = VhostUserClient.Options()
      o.queues = 2
      switch variant {
      case "indirect": o.indirect = true
      case "inflight": o.inflight = true
      case "memslots": o.memSlots = true
      case "no-event-idx": o.eventIdx = false
      case "no-reply-ack": o.replyAck = false
      default:
        o.queueSize = 8
        o.memorySize = 4 << 20
      }
      let c = try d.client(o)
      defer { c.shutdown() }
      switch variant {
      case "indirect": #expect(c.features & VirtioFeature.indirectDesc != 0)
      case "inflight":
        // qemu-storage-daemon 7.2 does not offer INFLIGHT_SHMFD; FakeBackendTests cover it.
        let offered = c.backendProtocolFeatures & VhostProtocolFeature.inflightShmfd.bit != 0
        #expect(c.hasProtocol(.inflightShmfd) == offered)
        #expect((c.inflightDescription != nil) == offered)
      case "memslots":
        #expect(c.hasProtocol(.configureMemSlots))
        #expect((c.maxMemSlots ?? 0) >= 1)
      case "no-event-idx": #expect(c.features & VirtioFeature.eventIdx == 0)
      case "no-reply-ack": #expect(!c.replyAckEnabled)
      default: break
      }
      for q in 0..<c.queueCount {
        var ids: [UInt64: [UInt8]] = [:]
        for i in 0..<24 {
          let data = pattern(4096 * (1 + i % 3), seed: UInt64(q * 100 + i))
          let sector = UInt64((q * 24 + i) * 32)
          while true {
            do {
              try c.submit(queue: q, .write(sector: sector, data: data))
              break
            } catch VhostClientError.queueFull {
              for x in try c.wait(queue: q) { #expect(x.isOK) }
            }
          }
          ids[sector] = data
        }
        while c.inFlight(queue: q) > 0 { for x in try c.wait(queue: q) { #expect(x.isOK) } }
        for (sector, data) in ids {
          #expect(try c.perform(queue: q, .read(sector: sector, length: data.count)).data == data)
        }
      }
    }
  }

  @Test func rawMessagesAndDescriptors() throws {
    try withDaemon { d in
      let c = try d.client()
      defer { c.shutdown() }
      // A hand-made GET_FEATURES.
      try c.sendMessage(request: VhostRequest.getFeatures.rawValue)
      var reply = try c.receiveMessage()
      reply.closeFds()
      #expect(reply.request == VhostRequest.getFeatures.rawValue)
      #expect(reply.isReply)
      #expect(reply.u64 == c.backendFeatures)

      // A read of sector 4 built by hand: header, data, status in reserved descriptors.
      let data = pattern(1024, seed: 5)
      #expect(try c.perform(.write(sector: 4, data: data)).isOK)
      let memory = try #require(c.memory)
      let block = try #require(memory.allocate(4096))
      var header = PayloadWriter()
      header.u32(VirtioBlkRequestType.read.rawValue)
      header.u32(0)
      header.u64(4)
      memory.write(header.bytes, at: block)
      memory.write([0xAA], at: block + 2048)
      let ds = try c.reserveDescriptors(queue: 0, count: 3)
      try c.placeDescriptor(queue: 0, index: ds[0], address: block, length: 16, flags: VirtqDescFlag.next, next: ds[1])
      try c.placeDescriptor(
        queue: 0, index: ds[1], address: block + 1024, length: 1024, flags: VirtqDescFlag.next | VirtqDescFlag.write,
        next: ds[2])
      try c.placeDescriptor(
        queue: 0, index: ds[2], address: block + 2048, length: 1, flags: VirtqDescFlag.write, next: 0)
      try c.publish(queue: 0, head: ds[0])
      let done = try c.waitRaw(queue: 0)
      #expect(done.count == 1)
      #expect(done.first?.requestID == nil)
      #expect(done.first?.head == UInt32(ds[0]))
      #expect(done.first?.usedLength == 1025)
      #expect(memory.read(at: block + 2048, count: 1) == [0])
      #expect(memory.read(at: block + 1024, count: 1024) == data)
      try c.releaseDescriptors(queue: 0, ds)
      memory.free(block, count: 4096)
      // The managed path still works afterwards.
      #expect(try c.perform(.read(sector: 4, length: 1024)).data == data)
    }
  }

  @Test func shutdownLetsTheNextClientIn() throws {
    try withDaemon { d in
      let first = try d.client()
      #expect(try first.perform(.write(sector: 0, data: pattern(512, seed: 1))).isOK)
      first.shutdown()
      let second = try d.client()
      defer { second.shutdown() }
      #expect(try second.perform(.read(sector: 0, length: 512)).data == pattern(512, seed: 1))
      #expect(d.isRunning())
    }
  }

  @Test func benchmarkSmoke() throws {
    try withDaemon { d in
      let c = try d.client(
        {
          var o = VhostUserClient.Options()
          o.queues = 2
          return o
        }())
      defer { c.shutdown() }
      for write in [true, false] {
        let r = try runBenchmark(
          client: c, queues: 2, depth: 16, requests: 2000, blockSize: 4096, write: write, random: true, span: 16 << 20)
        #expect(r.iops > 0)
        #expect(r.p50us > 0 && r.p50us <= r.p99us)
      }
      let s = try runBenchmark(
        client: c, queues: 1, depth: 4, requests: 200, blockSize: 65536, write: false, random: false, span: 0)
      #expect(s.iops > 0)
      #expect(c.inFlight(queue: 0) == 0 && c.inFlight(queue: 1) == 0)
    }
  }
}

/// Parts that need no back-end.
struct ClientUnits {
  @Test func allocatorCoalesces() {
    var a = RangeAllocator(size: 1 << 20)
    let x = a.allocate(100, alignment: 64)!
    let y = a.allocate(5000, alignment: 4096)!
    let z = a.allocate(64, alignment: 64)!
    #expect(x == 0 && y == 4096 && z == 128)
    #expect(a.allocate(2 << 20, alignment: 64) == nil)
    a.free(y, 5000)
    a.free(x, 100)
    a.free(z, 64)
    #expect(a.free.count == 1 && a.freeBytes == 1 << 20)
  }

  @Test func segmentsEncodeUnmap() {
    let b = encodeSegments([VirtioBlkDiscardSegment(sector: 5, numSectors: 8, flags: 0)], forceUnmap: true)
    #expect(b.count == 16)
    #expect(b[0] == 5 && b[8] == 8 && b[12] == 1)
  }

  @Test func connectToNothingFails() {
    #expect(throws: VhostClientError.self) { try VhostUserClient(path: "/nonexistent/strata.sock") }
  }
}
