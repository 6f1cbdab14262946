// INFLIGHT_SHMFD end to end: negotiation and GET/SET_INFLIGHT_FD, resubmission of a forged
// inflight region (counter order, the last-batch repair), and a kill -9 torture in which
// `strata serve` dies at random moments under load, restarts on the same socket and the
// front-end reconnects with the same inflight area, memory and rings.

import Foundation
import Glibc
import StrataSimulation
import Testing
import VhostClient
import VhostProtocol

/// Bytes of one queue's region in an inflight area (libvhost-user's vu_inflight_queue_size).
func inflightRegionSize(queueSize: Int) -> Int { (16 * queueSize + 2 + 63) / 64 * 64 }

/// Bytes of one packed queue's region (QueueRegionPacked: a 32-byte header and 32 bytes per
/// descriptor, rounded up to 64 bytes as DPDK's get_pervq_shm_size_packed does).
func packedInflightRegionSize(queueSize: Int) -> Int { (32 + 32 * queueSize + 63) / 64 * 64 }

/// One queue's region of a client's inflight area, as libvhost-user lays it out
/// (VuVirtqInflight): features u64, version u16, desc_num u16, last_batch_head u16,
/// used_idx u16, then desc[] of {inflight u8, padding[5], next u16, counter u64}.
struct InflightView {
  let base: UnsafeMutableRawPointer

  init(_ c: VhostUserClient, queue: Int) throws {
    let area = try #require(c.inflightArea)
    let d = try #require(c.inflightDescription)
    base = area.baseAddress! + queue * inflightRegionSize(queueSize: Int(d.queueSize))
  }

  private func u16(_ offset: Int) -> UInt16 {
    UInt16(littleEndian: base.loadUnaligned(fromByteOffset: offset, as: UInt16.self))
  }
  private func setU16(_ offset: Int, _ v: UInt16) {
    base.storeBytes(of: v.littleEndian, toByteOffset: offset, as: UInt16.self)
  }

  var features: UInt64 { UInt64(littleEndian: base.loadUnaligned(as: UInt64.self)) }
  var version: UInt16 {
    get { u16(8) }
    nonmutating set { setU16(8, newValue) }
  }
  var descNum: UInt16 { u16(10) }
  var lastBatchHead: UInt16 {
    get { u16(12) }
    nonmutating set { setU16(12, newValue) }
  }
  var usedIdx: UInt16 {
    get { u16(14) }
    nonmutating set { setU16(14, newValue) }
  }
  func inflight(_ head: Int) -> UInt8 { base.load(fromByteOffset: 16 + 16 * head, as: UInt8.self) }
  func setInflight(_ head: Int, _ v: UInt8) { base.storeBytes(of: v, toByteOffset: 16 + 16 * head, as: UInt8.self) }
  func counter(_ head: Int) -> UInt64 {
    UInt64(littleEndian: base.loadUnaligned(fromByteOffset: 16 + 16 * head + 8, as: UInt64.self))
  }
  func setCounter(_ head: Int, _ v: UInt64) {
    base.storeBytes(of: v.littleEndian, toByteOffset: 16 + 16 * head + 8, as: UInt64.self)
  }
  func inflightHeads(_ n: Int) -> [Int] { (0..<n).filter { inflight($0) != 0 } }
}

/// Expects the reply to GET_INFLIGHT_FD to be a refusal: a description with mmap_size 0 and no fd.
func expectInflightRefused(
  _ c: VhostUserClient, _ ask: InflightDescription, _ what: String, sourceLocation: SourceLocation = #_sourceLocation
) throws {
  var reply = try #require(try c.send(.getInflightFd, payload: ask.encode()), sourceLocation: sourceLocation)
  defer { reply.closeFds() }
  #expect(
    reply.fds.isEmpty, "\(what): GET_INFLIGHT_FD refused but sent \(reply.fds.count) fd(s)",
    sourceLocation: sourceLocation)
  let d = try reply.payload.withUnsafeBytes { (b) throws(VhostError) in try InflightDescription.decode(b) }
  #expect(d.mmapSize == 0, "\(what): GET_INFLIGHT_FD answered mmap_size \(d.mmapSize)", sourceLocation: sourceLocation)
}

/// The model of the torture: which contents each block may have once the server has stopped.
///
/// A write is durable once a flush submitted after its completion completes in the same server
/// incarnation (the server buffers acknowledged writes until a flush; a kill -9 may lose those
/// that were not flushed, and a flush by the next incarnation does not bring them back). A
/// block may therefore hold its last durable version or any later one, nothing else. Writes to
/// one block are serialized by the test, so "later" is well defined.
struct TortureModel {
  /// The server hands a batch's log to the kernel before publishing its used entries, so every
  /// completed write must survive a kill (not a power loss; that needs a flush).
  static let completedWritesSurviveKill = true

  enum Kind {
    case write(block: Int, seed: UInt64)
    case flush(writesBefore: Int)
  }

  /// Per block: the seeds of its completed writes in order; 0 = the zeroes it starts with.
  var history: [[UInt64]]
  /// Per block: the index in `history` of its last durable version.
  var durable: [Int]
  var busy: Set<Int> = []
  /// Completed writes in completion order: (block, index in its history, incarnation).
  var completedWrites: [(block: Int, index: Int, epoch: Int)] = []
  var pending: [UInt64: Kind] = [:]
  /// The server incarnation completions are counted in (bumped after each kill's drain).
  var epoch = 0
  var writes = 0
  var flushes = 0
  var problems: [String] = []

  init(blocks: Int) {
    history = Array(repeating: [0], count: blocks)
    durable = Array(repeating: 0, count: blocks)
  }

  mutating func complete(_ c: VhostCompletion) {
    guard let id = c.requestID, let kind = pending.removeValue(forKey: id) else {
      problems.append("used entry for head \(c.head) on queue \(c.queue) that no request owns (a duplicate completion)")
      return
    }
    if c.status != statusOK {
      problems.append("request \(id) (\(kind)) on queue \(c.queue) failed with status \(String(describing: c.status))")
    }
    switch kind {
    case .write(let block, let seed):
      busy.remove(block)
      guard c.status == statusOK else { return }
      history[block].append(seed)
      completedWrites.append((block, history[block].count - 1, epoch))
      if Self.completedWritesSurviveKill { durable[block] = history[block].count - 1 }
      writes += 1
    case .flush(let before):
      guard c.status == statusOK else { return }
      flushes += 1
      for w in completedWrites[..<before] where w.epoch == epoch && w.index > durable[w.block] {
        durable[w.block] = w.index
      }
    }
  }

  /// The contents a block may have: its last durable version or a later one.
  func acceptable(_ block: Int, blockSize: Int) -> [[UInt8]] {
    history[block][durable[block]...].map {
      $0 == 0 ? [UInt8](repeating: 0, count: blockSize) : pattern(blockSize, seed: $0)
    }
  }
}

@Suite(.enabled(if: strataBinary != nil, Comment(rawValue: binaryMissing)))
struct StrataServeInflightTests {
  // MARK: Negotiation, GET_INFLIGHT_FD, SET_INFLIGHT_FD

  @Test func inflightNegotiationGetAndSet() throws {
    try withServer(arguments: ["--num-queues", "2"]) { s in
      var o = ServeProcess.options(queues: 2)
      o.inflight = true
      let c = try s.client(o)
      defer { c.shutdown() }
      #expect(c.backendProtocolFeatures & VhostProtocolFeature.inflightShmfd.bit != 0, "INFLIGHT_SHMFD not offered")
      #expect(c.hasProtocol(.inflightShmfd))
      let d = try #require(c.inflightDescription)
      #expect(d.mmapSize == UInt64(2 * inflightRegionSize(queueSize: 256)), "mmap_size \(d.mmapSize)")
      #expect(d.mmapOffset == 0 && d.numQueues == 2 && d.queueSize == 256)

      // The rings record into the area: version 1, desc_num, used_idx following used->idx,
      // nothing left in flight, counters in pop order.
      for q in 0..<2 {
        var heads: [UInt32] = []
        for i in 0..<5 {
          let r = try c.perform(
            queue: q, .write(sector: UInt64(64 * q + 8 * i), data: pattern(4096, seed: UInt64(10 * q + i + 1))))
          #expect(r.isOK)
          heads.append(r.head)
        }
        let v = try InflightView(c, queue: q)
        #expect(v.version == 1, "queue \(q): region version \(v.version)")
        #expect(v.descNum == 256, "queue \(q): desc_num \(v.descNum)")
        #expect(v.features == 0)
        #expect(v.usedIdx == (try c.usedIndex(queue: q)), "queue \(q): used_idx \(v.usedIdx)")
        #expect(v.inflightHeads(256).isEmpty, "queue \(q): heads still marked in flight: \(v.inflightHeads(256))")
        #expect(v.lastBatchHead == UInt16(heads.last!))
        // The client reuses the same descriptors for serial requests; the counters still grow.
        #expect(v.counter(Int(heads.last!)) >= 4, "queue \(q): counter \(v.counter(Int(heads.last!)))")
      }

      // GET/SET on another connection, by hand (the server serves one front-end at a time).
      c.shutdown()
      let raw = try s.client(o, start: false)
      defer { raw.shutdown() }
      try raw.negotiate()
      try #require(raw.hasProtocol(.inflightShmfd))
      for (nq, qs, what) in [
        (0, 64, "0 queues"), (3, 64, "3 of 2 queues"), (1, 0, "queue size 0"), (1, 2048, "queue size 2048"),
      ] {
        try expectInflightRefused(
          raw, InflightDescription(mmapSize: 0, mmapOffset: 0, numQueues: UInt16(nq), queueSize: UInt16(qs)), what)
      }
      var got = try #require(
        try raw.send(
          .getInflightFd, payload: InflightDescription(mmapSize: 0, mmapOffset: 0, numQueues: 1, queueSize: 64).encode()
        ))
      defer { got.closeFds() }
      try #require(got.fds.count == 1, "GET_INFLIGHT_FD sent \(got.fds.count) fds")
      let g = try got.payload.withUnsafeBytes { (b) throws(VhostError) in try InflightDescription.decode(b) }
      #expect(
        g
          == InflightDescription(
            mmapSize: UInt64(inflightRegionSize(queueSize: 64)), mmapOffset: 0, numQueues: 1, queueSize: 64))
      let fd = got.fds[0]
      var st = stat()
      #expect(fstat(fd, &st) == 0 && UInt64(st.st_size) >= g.mmapSize, "the inflight memfd has \(st.st_size) bytes")
      // Its size is sealed: a front-end cannot truncate it under the back-end's mapping.
      #expect(ftruncate(fd, 4096) == -1 && errno == EPERM, "the inflight memfd can be shrunk")
      #expect(ftruncate(fd, off_t(st.st_size) * 2) == -1 && errno == EPERM, "the inflight memfd can be grown")
      if let p = mmap(nil, Int(g.mmapSize), PROT_READ, MAP_SHARED, fd, 0), p != MAP_FAILED {
        let zero = UnsafeRawBufferPointer(start: p, count: Int(g.mmapSize)).allSatisfy { $0 == 0 }
        #expect(zero, "a new inflight area is not zeroed")
        munmap(p, Int(g.mmapSize))
      } else {
        Issue.record("mmap of the inflight fd failed")
      }
      // Handed back as it came: accepted.
      try raw.send(.setInflightFd, payload: g.encode(), fds: [fd])
      // Refused: descriptions that do not fit the file or the limits, and wrong fds.
      func bad(_ d: InflightDescription, fds: [Int32]? = nil, _ what: String) {
        expectNack("SET_INFLIGHT_FD \(what)") { try raw.send(.setInflightFd, payload: d.encode(), fds: fds ?? [fd]) }
      }
      bad(
        InflightDescription(mmapSize: g.mmapSize - 64, mmapOffset: 0, numQueues: 1, queueSize: 64),
        "mmap_size too small")
      bad(InflightDescription(mmapSize: g.mmapSize, mmapOffset: 64, numQueues: 1, queueSize: 64), "unaligned offset")
      bad(InflightDescription(mmapSize: g.mmapSize, mmapOffset: 4096, numQueues: 1, queueSize: 64), "past the file")
      bad(InflightDescription(mmapSize: 1 << 20, mmapOffset: 0, numQueues: 1, queueSize: 64), "larger than the file")
      bad(InflightDescription(mmapSize: 1 << 40, mmapOffset: 0, numQueues: 1, queueSize: 64), "of a terabyte")
      bad(InflightDescription(mmapSize: g.mmapSize, mmapOffset: 0, numQueues: 3, queueSize: 64), "3 of 2 queues")
      bad(InflightDescription(mmapSize: g.mmapSize, mmapOffset: 0, numQueues: 0, queueSize: 64), "0 queues")
      bad(InflightDescription(mmapSize: g.mmapSize, mmapOffset: 0, numQueues: 1, queueSize: 0), "queue size 0")
      bad(InflightDescription(mmapSize: g.mmapSize, mmapOffset: 0, numQueues: 1, queueSize: 4096), "queue size 4096")
      bad(g, fds: [], "without an fd")
      let null = devNull()
      bad(InflightDescription(mmapSize: 4096, mmapOffset: 0, numQueues: 1, queueSize: 64), fds: [null], "on /dev/null")
      close(null)
      expectNack("SET_INFLIGHT_FD with a short payload") {
        try raw.send(.setInflightFd, payload: [1, 2, 3], fds: [fd])
      }
      raw.shutdown()

      // Without the protocol feature both are refused.
      let plain = try s.client(ServeProcess.options(queues: 1), start: false)
      defer { plain.shutdown() }
      try plain.negotiate()
      #expect(!plain.hasProtocol(.inflightShmfd))
      try expectInflightRefused(
        plain, InflightDescription(mmapSize: 0, mmapOffset: 0, numQueues: 1, queueSize: 64), "not negotiated")
      expectNack("SET_INFLIGHT_FD not negotiated") { try plain.send(.setInflightFd, payload: g.encode(), fds: [fd]) }
      plain.shutdown()
      try checkAliveAndServing(s, after: "GET/SET_INFLIGHT_FD")
    }
  }

  // MARK: Resubmission of a forged region

  /// What a back-end that died leaves behind, forged by hand: three chains popped (in the
  /// avail ring, marked in flight with counters out of avail order) and one whose used entry
  /// was published but whose mark was not cleared (last_batch_head, used_idx one behind). The
  /// next back-end must run the three in counter order, not the fourth, and resume the ring
  /// after them although SET_VRING_BASE says the used index.
  @Test func forgedInflightRegionIsResubmittedInCounterOrder() throws {
    try withServer { s in
      var o = ServeProcess.options(queues: 1)
      o.inflight = true
      let c = try s.client(o)
      defer { c.shutdown() }
      let m = try #require(c.memory)
      struct Forged {
        var descriptors: [UInt16]
        var header: UInt64
        var sector: UInt64
        var data: [UInt8]
        var counter: UInt64
      }
      var forged: [Forged] = []
      for (k, counter) in [UInt64(11), 10, 12].enumerated() {
        let header = try #require(m.allocate(64))
        let buffer = try #require(m.allocate(4096, alignment: 4096))
        let f = Forged(
          descriptors: try c.reserveDescriptors(queue: 0, count: 3), header: header, sector: UInt64(1000 + 8 * k),
          data: pattern(4096, seed: UInt64(700 + k)), counter: counter)
        m.write(requestHeader(.write, sector: f.sector), at: header)
        m.write([0xFF], at: header + 16)
        m.write(f.data, at: buffer)
        let d = f.descriptors
        try c.placeDescriptor(queue: 0, index: d[0], address: header, length: 16, flags: VirtqDescFlag.next, next: d[1])
        try c.placeDescriptor(
          queue: 0, index: d[1], address: buffer, length: 4096, flags: VirtqDescFlag.next, next: d[2])
        try c.placeDescriptor(
          queue: 0, index: d[2], address: header + 16, length: 1, flags: VirtqDescFlag.write, next: 0)
        forged.append(f)
      }
      // Real requests: a write, then a flush (so that the kill cannot lose the write), whose
      // head plays the one published just before the crash.
      let w = try c.perform(.write(sector: 0, data: pattern(4096, seed: 1)))
      #expect(w.isOK)
      let flushHeader = try #require(m.allocate(64))
      m.write(requestHeader(.flush, sector: 0), at: flushHeader)
      m.write([0xFF], at: flushHeader + 16)
      let flushed = try c.runChain(
        queue: 0, [RawDescriptor(flushHeader, 16, next: 1), RawDescriptor(flushHeader + 16, 1, writable: true)])
      #expect(m.read(at: flushHeader + 16, count: 1) == [statusOK])
      let region = try InflightView(c, queue: 0)
      let used = try c.usedIndex(queue: 0)
      #expect(region.version == 1 && region.usedIdx == used && region.inflightHeads(256).isEmpty)

      s.crash()
      let publishedHead = Int(flushed.head)
      #expect(!forged.contains { $0.descriptors.contains(UInt16(publishedHead)) })
      region.usedIdx = used &- 1
      region.lastBatchHead = UInt16(publishedHead)
      region.setInflight(publishedHead, 1)
      region.setCounter(publishedHead, 9)
      for f in forged {
        region.setInflight(Int(f.descriptors[0]), 1)
        region.setCounter(Int(f.descriptors[0]), f.counter)
        try c.publish(queue: 0, head: f.descriptors[0], kick: false)
      }

      try s.restart()
      try s.reconnect(c)
      var completions: [VhostCompletion] = []
      let deadline = Date().addingTimeInterval(10)
      while completions.count < 3 && Date() < deadline {
        completions += try c.waitRaw(queue: 0, timeoutMs: 10_000)
      }
      usleep(100_000)
      completions += try c.poll(queue: 0)
      let order = [forged[1], forged[0], forged[2]].map { UInt32($0.descriptors[0]) }
      #expect(
        completions.map(\.head) == order, "used entries \(completions.map(\.head)), expected \(order) (counter order)")
      for f in forged {
        #expect(m.read(at: f.header + 16, count: 1) == [statusOK], "forged chain at head \(f.descriptors[0]) not OK")
        try c.releaseDescriptors(queue: 0, f.descriptors)
      }
      #expect(region.usedIdx == (try c.usedIndex(queue: 0)))
      #expect(region.inflightHeads(256).isEmpty, "still marked in flight: \(region.inflightHeads(256))")
      #expect(s.log.contains("resubmitting 3 request"), "log:\n\(s.logTail)")

      // The ring goes on after them, and the counter after the largest one.
      let next = try c.perform(.write(sector: 2000, data: pattern(4096, seed: 2)))
      #expect(next.isOK)
      #expect(region.counter(Int(next.head)) == 13, "counter \(region.counter(Int(next.head))) after resubmission")
      for f in forged {
        #expect(try c.perform(.read(sector: f.sector, length: 4096)).data == f.data, "sector \(f.sector)")
      }
      #expect(try c.perform(.read(sector: 0, length: 4096)).data == pattern(4096, seed: 1))
    }
  }

  // MARK: kill -9 torture

  /// Writes and flushes at depth 16-32 on two queues; `strata serve` is killed with SIGKILL at
  /// random moments (seeded), sometimes again while it resubmits, restarted on the same
  /// socket, and the front-end reconnects with the same inflight area, memory and rings. Every
  /// request submitted before a kill completes OK afterwards (none lost, none failed, none
  /// completed twice); at the end `strata read` finds every durable write (see TortureModel).
  ///
  /// With packed rings the back-end resubmits from the descriptors saved in its
  /// QueueRegionPacked regions (the ring slots may hold used descriptors by then), in an area
  /// it sized for packed rings because SET_FEATURES came first.
  @Test(arguments: RingKind.allCases)
  func killNineTortureLosesNoRequest(ring: RingKind) throws {
    let seed = ProcessInfo.processInfo.environment["STRATA_TORTURE_SEED"].flatMap { UInt64($0) } ?? 0x1F1_16E7
    try withServer(size: 64 << 20, arguments: ["--num-queues", "2"] + ring.serveArguments) { s in
      var rng = SeededRandom(seed: seed)
      var o = ServeProcess.options(queues: 2, ring: ring)
      o.inflight = true
      o.ioTimeoutMs = 15_000
      let c = try s.client(o)
      defer { c.shutdown() }
      try #require(c.hasProtocol(.inflightShmfd) && c.queueCount == 2)
      try #require(c.ringKind == ring)
      let area = try #require(c.inflightDescription)
      let regionBytes = ring == .packed ? packedInflightRegionSize(queueSize: 256) : inflightRegionSize(queueSize: 256)
      #expect(area.mmapSize == UInt64(2 * regionBytes), "inflight mmap_size \(area.mmapSize) for \(ring) rings")
      let blockSize = 4096
      let blocks = 384
      let firstSector: UInt64 = 2048
      var model = TortureModel(blocks: blocks)
      var kills = 0

      func submitOne(queue q: Int) throws {
        let id: UInt64
        if rng.next() % 10 == 0 {
          id = try c.submit(queue: q, .flush, kick: false)
          model.pending[id] = .flush(writesBefore: model.completedWrites.count)
        } else {
          var block = Int(rng.next() % UInt64(blocks))
          while model.busy.contains(block) { block = (block + 1) % blocks }
          let seed = rng.next() | 1
          id = try c.submit(
            queue: q,
            .write(sector: firstSector + UInt64(block * blockSize / 512), data: pattern(blockSize, seed: seed)),
            kick: false)
          model.busy.insert(block)
          model.pending[id] = .write(block: block, seed: seed)
        }
      }
      func topUp(_ depth: [Int]) throws {
        for q in 0..<2 {
          while c.inFlight(queue: q) < depth[q] { try submitOne(queue: q) }
          try c.kick(queue: q)
        }
      }
      /// Kills the server, takes what it completed before dying (that incarnation's), restarts
      /// it and reconnects.
      func crashAndRestart() throws {
        s.crash()
        kills += 1
        for q in 0..<2 { for x in try c.poll(queue: q) { model.complete(x) } }
        model.epoch += 1
        try s.restart()
        try s.reconnect(c)
      }
      /// Waits until nothing is in flight.
      func drain(_ what: String) throws {
        let deadline = Date().addingTimeInterval(20)
        while c.inFlight(queue: 0) + c.inFlight(queue: 1) > 0 {
          guard Date() < deadline else {
            throw ServeTestError("\(what): \(c.inFlight(queue: 0)) + \(c.inFlight(queue: 1)) requests never completed")
          }
          do {
            for x in try c.waitAny(timeoutMs: 10_000) { model.complete(x) }
          } catch VhostClientError.timeout(let t) {
            throw ServeTestError("\(what): requests submitted before the kill did not complete: \(t)")
          }
        }
      }

      let rounds = 8
      for round in 0..<rounds {
        let depth = [16 + Int(rng.next() % 17), 16 + Int(rng.next() % 17)]
        let killAt = Date().addingTimeInterval(Double(40 + rng.next() % 260) / 1000)
        let afterSubmit = rng.next() % 2 == 0
        while true {
          try topUp(depth)
          if afterSubmit && Date() >= killAt { break }
          for x in try c.waitAny(timeoutMs: 10_000) { model.complete(x) }
          if Date() >= killAt { break }
        }
        let outstanding = c.inFlight(queue: 0) + c.inFlight(queue: 1)
        try crashAndRestart()
        // Now and then, kill it again while it resubmits and works through the backlog.
        if rng.next() % 3 == 0 {
          usleep(UInt32(rng.next() % 15_000))
          try crashAndRestart()
        }
        try drain("round \(round) (\(outstanding) outstanding at the kill)")
        #expect(model.problems.isEmpty, "round \(round): \(model.problems.prefix(5))")
        if !model.problems.isEmpty { break }
      }

      // A last flush on each queue makes everything written in this incarnation durable.
      for q in 0..<2 {
        let id = try c.submit(queue: q, .flush)
        model.pending[id] = .flush(writesBefore: model.completedWrites.count)
      }
      try drain("final flush")
      #expect(model.problems.isEmpty, "\(model.problems.prefix(5))")
      #expect(model.writes > 50, "only \(model.writes) writes completed")
      let logs = s.allLogs
      let resubmitted = logs.split(separator: "\n").compactMap { line -> Int? in
        guard let r = line.range(of: "resubmitting ") else { return nil }
        return Int(line[r.upperBound...].prefix { $0.isNumber })
      }.reduce(0, +)
      #expect(resubmitted > 0, "no kill caught a request in flight in \(kills) kills")
      #expect(!logs.contains("without inflight tracking"), "a ring ran untracked; logs:\n\(s.logTail)")
      print(
        "kill -9 torture (\(ring) rings, seed \(seed)): \(kills) kills, \(model.writes) writes and \(model.flushes) flushes completed, \(resubmitted) request(s) resubmitted"
      )
      c.shutdown()
      s.stop()

      let r = try s.strata([
        "read", s.image, "--offset", String(firstSector * 512), "--length", String(blocks * blockSize),
      ])
      try #require(r.succeeded, "strata read: \(r.stderr)")
      var latest = 0
      for b in 0..<blocks {
        let got = Array(r.stdout[(b * blockSize)..<((b + 1) * blockSize)])
        let allowed = model.acceptable(b, blockSize: blockSize)
        if got == allowed.last { latest += 1 }
        #expect(
          allowed.contains(got),
          "block \(b): not its last durable write nor a later one (\(model.history[b].count - 1) writes, durable #\(model.durable[b]))"
        )
      }
      let undurable = (0..<blocks).filter { model.durable[$0] < model.history[$0].count - 1 }.count
      // Blocks whose last write completed but was never flushed before a kill may have lost it:
      // the server buffers acknowledged writes until a flush (see the report of this test).
      print(
        "kill -9 torture (\(ring) rings): \(latest) of \(blocks) blocks hold their last write; \(undurable) last writes were not durable at a kill, \(blocks - latest) of those were lost"
      )
      let check = try s.strata(["check", s.image])
      #expect(check.succeeded, "strata check: \(check.stderr)\(String(decoding: check.stdout, as: UTF8.self))")
    }
  }
}
