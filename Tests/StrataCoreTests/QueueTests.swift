import CStrataLinux
import Dispatch
import Glibc
import StrataIO
import StrataSimulation
import Testing

@testable import StrataCore

/// A block whose every byte names the block and the version written to it.
private func pattern(block: Int, version: UInt8, blockSize: Int) -> [UInt8] {
  (0..<blockSize).map { i in UInt8(truncatingIfNeeded: block &* 31 &+ i) ^ version }
}

/// Creates the image `name` in a new temporary directory and writes `pattern(version:)` to each
/// of `blocks` (nothing flushed); returns its path and the open image.
private func createImage(
  _ name: String, virtualSize: UInt64, options: ImageOptions = ImageOptions(), blocks: some Sequence<Int> = [],
  version: UInt8 = 0
) throws -> (path: String, image: StrataImage) {
  let path = temporaryDirectory() + "/" + name
  let image = try StrataImage.create(path: path, virtualSize: virtualSize, options: options, overwrite: true)
  try writePatterns(image, blocks: blocks, version: version)
  return (path, image)
}

/// Writes `pattern(block: b, version: version)` to every block `b` of `blocks`.
private func writePatterns(_ image: StrataImage, blocks: some Sequence<Int>, version: UInt8) throws {
  let bs = image.blockSize
  for b in blocks { try image.write(pattern(block: b, version: version, blockSize: bs), at: UInt64(b * bs)) }
}

/// Block `index` of `buffer`, for blocks of `blockSize` bytes.
private func block(_ index: Int, of buffer: UnsafeMutableRawBufferPointer, blockSize: Int)
  -> UnsafeMutableRawBufferPointer
{
  UnsafeMutableRawBufferPointer(rebasing: buffer[(index * blockSize)..<((index + 1) * blockSize)])
}

/// Reaps until `count` completions arrived; fails on any error.
private func reapAll(_ queue: ImageQueue, _ count: Int) throws -> [UInt64] {
  var out = [QueueCompletion](repeating: QueueCompletion(tag: 0, error: nil), count: count)
  var tags: [UInt64] = []
  while tags.count < count {
    let n = try out.withUnsafeMutableBufferPointer { try queue.reap($0, minimum: 1) }
    for c in out[..<n] {
      #expect(c.error == nil, "\(c.error.map { "\($0)" } ?? "")")
      tags.append(c.tag)
    }
  }
  return tags
}

/// Vectored reads into buffers of odd sizes at odd addresses, some blocks still in the log
/// tail and some stored: every byte equals what the synchronous path reads.
@Test func queueVectoredReadsMatchSynchronousReads() throws {
  let (_, img) = try createImage("q.strata", virtualSize: 8 << 20, blocks: (0..<256).filter { $0 % 3 != 0 }, version: 1)
  try img.flush()
  try writePatterns(img, blocks: stride(from: 0, to: 256, by: 7), version: 2)
  let queue = try ImageQueue(image: img, depth: 32)
  // Room for 512 KiB of data plus a 512-byte gap after each of up to 1024 pieces.
  let stride = (1 << 20) + 4096
  defer { queue.close() }
  var random = SeededRandom(seed: 11)
  let arena = UnsafeMutableRawBufferPointer.allocate(byteCount: 32 * stride, alignment: 4096)
  defer { arena.deallocate() }
  for round in 0..<20 {
    var expected: [[UInt8]] = []
    var layouts: [[UnsafeMutableRawBufferPointer]] = []
    for r in 0..<32 {
      let sectors = Int.random(in: 1...1024, using: &random)
      let offset = UInt64(Int.random(in: 0..<(16384 - sectors), using: &random)) * 512
      expected.append(try img.read(at: offset, count: sectors * 512))
      // Split the request into pieces of whole sectors; some pieces start off page alignment.
      var buffers: [UnsafeMutableRawBufferPointer] = []
      var cursor = arena.baseAddress! + r * stride + (Int.random(in: 0..<2, using: &random) == 0 ? 0 : 512)
      var left = sectors * 512
      while left > 0 {
        let n = min(left, Int.random(in: 1...64, using: &random) * 512)
        buffers.append(UnsafeMutableRawBufferPointer(start: cursor, count: n))
        // Some pieces are not adjacent to the previous one (and so not page aligned).
        cursor += n + (Int.random(in: 0..<3, using: &random) == 0 ? 512 : 0)
        left -= n
      }
      layouts.append(buffers)
      try queue.submitRead(segments: buffers.count, at: offset, tag: UInt64(r)) { buffers[$0] }
    }
    let tags = try reapAll(queue, 32)
    #expect(tags.sorted() == (0..<32).map { UInt64($0) }, "round \(round)")
    for r in 0..<32 {
      let got = layouts[r].flatMap { Array($0) }
      #expect(got == expected[r], "round \(round) request \(r)")
    }
  }
  try img.close()
}

/// Reads that start inside a block, into page-aligned memory, of blocks stored in the file (not
/// in the log tail): the whole blocks after the partial first one land off alignment and must
/// not be read O_DIRECT there (they were, and failed with EINVAL).
@Test func queueReadsAtByteOffsetsOfStoredBlocks() throws {
  let (path, created) = try createImage("odd.strata", virtualSize: 1 << 20, blocks: 0..<16, version: 3)
  try created.close()
  let img = try StrataImage.open(path: path)
  let bs = img.blockSize
  let queue = try ImageQueue(image: img, depth: 4)
  let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 5 * bs, alignment: 4096)
  defer { buffer.deallocate() }
  for offset in [1000, 512, 4095, 1] {
    let count = 3 * bs + 100
    let dest = UnsafeMutableRawBufferPointer(rebasing: buffer[0..<count])
    try queue.submitRead(into: dest, at: UInt64(offset), tag: UInt64(offset))
    #expect(try reapAll(queue, 1) == [UInt64(offset)])
    #expect(Array(dest) == (try img.read(at: UInt64(offset), count: count)), "offset \(offset)")
  }
  queue.close()
  try img.close()
}

/// A queue on a shared image signals its completion eventfd, and `reap(minimum: 0)` takes
/// what finished without waiting.
@Test func queueSignalsCompletionsThroughItsEventFD() throws {
  let (_, img) = try createImage("e.strata", virtualSize: 8 << 20, blocks: 0..<64, version: 3)
  let bs = img.blockSize
  try img.flush()
  let shared = SharedImage(img)
  let efd = strata_eventfd(0, 0)
  defer { close(efd) }
  let queue = try ImageQueue(shared: shared, depth: 16, ownerThreadOnly: true, completionEventFD: efd)
  defer { queue.close() }
  let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 16 * bs, alignment: 4096)
  defer { buffer.deallocate() }
  for r in 0..<16 {
    try queue.submitRead(
      into: block(r, of: buffer, blockSize: bs), at: UInt64(r * 4 * bs),
      tag: UInt64(r))
  }
  var out = [QueueCompletion](repeating: QueueCompletion(tag: 0, error: nil), count: 16)
  var done = try out.withUnsafeMutableBufferPointer { try queue.reap($0, minimum: 0) }
  while done < 16 {
    // The engine may have finished everything inside reap (threads); otherwise it signals.
    var fds = [pollfd(fd: efd, events: Int16(POLLIN), revents: 0)]
    #expect(poll(&fds, 1, 20_000) == 1, "no completion signalled")
    var value: UInt64 = 0
    _ = read(efd, &value, 8)
    done += try out.withUnsafeMutableBufferPointer {
      try queue.reap(UnsafeMutableBufferPointer(rebasing: $0[done...]), minimum: 0)
    }
  }
  for r in 0..<16 {
    #expect(Array(block(r, of: buffer, blockSize: bs)) == pattern(block: r * 4, version: 3, blockSize: bs))
  }
  try shared.with { try $0.close() }
}

/// Reads through a queue on one thread while another thread overwrites the same blocks:
/// every block read is one whole version that was written, never a mix or a checksum error.
@Test func queueReadsStayConsistentUnderConcurrentWrites() throws {
  let blocks = 32
  let (_, img) = try createImage("c.strata", virtualSize: 8 << 20, blocks: 0..<blocks, version: 0)
  let bs = img.blockSize
  try img.flush()
  let shared = SharedImage(img)
  let writer = WorkerThread { _ in
    for version in 1...40 {
      for b in 0..<blocks {
        let data = pattern(block: b, version: UInt8(version), blockSize: bs)
        try? shared.with { try $0.write(data, at: UInt64(b * bs)) }
      }
      try? shared.with { try $0.writeOutLog() }
    }
  }
  let queue = try ImageQueue(shared: shared, depth: blocks)
  let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: blocks * bs, alignment: 4096)
  defer { buffer.deallocate() }
  writer.start()
  for _ in 0..<40 {
    for b in 0..<blocks {
      try queue.submitRead(
        into: block(b, of: buffer, blockSize: bs), at: UInt64(b * bs),
        tag: UInt64(b))
    }
    _ = try reapAll(queue, blocks)
    for b in 0..<blocks {
      let got = Array(block(b, of: buffer, blockSize: bs))
      let version = got[0] ^ pattern(block: b, version: 0, blockSize: bs)[0]
      #expect(got == pattern(block: b, version: version, blockSize: bs), "block \(b) is not one written version")
    }
  }
  writer.stop()
  queue.close()
  try shared.with { try $0.close() }
}

/// Writes that fill several 1 MiB segments while a queue reads what was just written: blocks of
/// the segment being filled and of the one sealed before it (whose writes may still be in
/// flight) come from memory, older ones from the file; every read, and every block after a
/// reopen, is the last version written.
@Test func queueReadsAcrossSegmentSeals() throws {
  var options = ImageOptions()
  options.segmentSize = 1 << 20
  let (path, img) = try createImage("s.strata", virtualSize: 4 << 20, options: options)
  let bs = img.blockSize
  let blocks = 1024
  var versions = [UInt8](repeating: 0, count: blocks)
  let queue = try ImageQueue(image: img, depth: 8)
  let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 8 * bs, alignment: 4096)
  defer { buffer.deallocate() }
  var random = SeededRandom(seed: 5)
  for round in 0..<600 {
    let b = Int.random(in: 0..<blocks, using: &random)
    versions[b] &+= 1
    try img.write(pattern(block: b, version: versions[b], blockSize: bs), at: UInt64(b * bs))
    // Read back the block just written and seven random ones.
    let targets = [b] + (0..<7).map { _ in Int.random(in: 0..<blocks, using: &random) }
    for (slot, t) in targets.enumerated() {
      try queue.submitRead(
        into: block(slot, of: buffer, blockSize: bs), at: UInt64(t * bs),
        tag: UInt64(slot))
    }
    _ = try reapAll(queue, targets.count)
    for (slot, t) in targets.enumerated() {
      let expected =
        versions[t] == 0 ? [UInt8](repeating: 0, count: bs) : pattern(block: t, version: versions[t], blockSize: bs)
      #expect(Array(block(slot, of: buffer, blockSize: bs)) == expected, "round \(round) block \(t)")
    }
  }
  queue.close()
  try img.flush()
  try img.close()
  let reopened = try StrataImage.open(path: path)
  for b in 0..<blocks where versions[b] != 0 {
    #expect(try reopened.read(at: UInt64(b * bs), count: bs) == pattern(block: b, version: versions[b], blockSize: bs))
  }
  try reopened.close()
}

/// Reads of a snapshot and of a past flush point through the queue return the frozen disk, not
/// the head that has moved on.
@Test func queueReadsSnapshotAndPointViews() throws {
  let (_, img) = try createImage("v.strata", virtualSize: 4 << 20, blocks: 0..<64, version: 1)
  let bs = img.blockSize
  try img.flush()
  let point = try #require(try img.timeline().last { $0.kind == .flush })
  try img.createSnapshot(name: "one")
  try writePatterns(img, blocks: 0..<64, version: 2)
  let queue = try ImageQueue(image: img, depth: 8)
  defer { queue.close() }
  let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 64 * bs, alignment: 4096)
  defer { buffer.deallocate() }
  for view in [try img.snapshotView(name: "one"), try img.view(atSeq: point.seq)] {
    buffer.initializeMemory(as: UInt8.self, repeating: 0xEE)
    try queue.submitRead(into: buffer, at: 0, tag: 1, view: view)
    _ = try reapAll(queue, 1)
    for b in 0..<64 {
      #expect(Array(block(b, of: buffer, blockSize: bs)) == pattern(block: b, version: 1, blockSize: bs), "block \(b)")
    }
  }
  try queue.submitRead(into: UnsafeMutableRawBufferPointer(rebasing: buffer[..<bs]), at: 0, tag: 2)
  _ = try reapAll(queue, 1)
  #expect(Array(buffer[..<bs]) == pattern(block: 0, version: 2, blockSize: bs), "the head")
  try img.close()
}

/// A clone's queue reads the blocks it never wrote from the backing chain through its engine
/// (the parents' files are the engine's files 1, 2, ...): a three-layer chain with blocks in
/// each layer, zeroed blocks in the middle one, a child larger than its parent and blocks still
/// in the child's log tail reads byte for byte as the synchronous path does, at random offsets
/// and lengths, with every engine; a damaged block in the grandparent fails its checksum.
@Test(arguments: IOEngineKind.allCases)
func queueReadsThroughTheBackingChain(engine: IOEngineKind) throws {
  let directory = temporaryDirectory()
  let (grandparentPath, parentPath, childPath) = (
    directory + "/g.strata", directory + "/p.strata", directory + "/c.strata"
  )
  let grandparent = try StrataImage.create(path: grandparentPath, virtualSize: 2 << 20, overwrite: true)
  try writePatterns(grandparent, blocks: 0..<200, version: 1)
  try grandparent.close()
  let parent = try StrataImage.create(path: parentPath, backing: grandparentPath, overwrite: true)
  try writePatterns(parent, blocks: 50..<100, version: 2)
  try parent.writeZeroes(at: UInt64(120 * parent.blockSize), length: UInt64(10 * parent.blockSize))
  try parent.close()
  let child = try StrataImage.create(path: childPath, backing: parentPath, virtualSize: 3 << 20, overwrite: true)
  let bs = child.blockSize
  try writePatterns(child, blocks: 10..<20, version: 3)
  try child.flush()
  try writePatterns(child, blocks: 30..<35, version: 4)  // in the log tail
  let queue = try ImageQueue(image: child, depth: 16, engine: engine)
  let buffers = UnsafeMutableRawBufferPointer.allocate(byteCount: 16 * 64 * bs, alignment: 4096)
  defer { buffers.deallocate() }
  var random = SeededRandom(seed: 5)
  for round in 0..<10 {
    var expected: [[UInt8]] = []
    var requests: [UnsafeMutableRawBufferPointer] = []
    for r in 0..<16 {
      // Whole blocks mostly (the engine path), sometimes byte ranges (bounce blocks).
      let whole = random.next() % 4 != 0
      let count = whole ? Int(1 + random.next() % 64) * bs : Int(1 + random.next() % UInt64(8 * bs))
      let offset =
        whole ? (random.next() % UInt64(768 - count / bs)) * UInt64(bs) : random.next() % UInt64((3 << 20) - count)
      let dest = UnsafeMutableRawBufferPointer(rebasing: buffers[(r * 64 * bs)..<(r * 64 * bs + count)])
      expected.append(try child.read(at: offset, count: count))
      requests.append(dest)
      try queue.submitRead(into: dest, at: offset, tag: UInt64(r))
    }
    #expect(try reapAll(queue, 16).sorted() == (0..<16).map { UInt64($0) })
    // A Bool, not two arrays: on a mismatch Swift Testing would diff megabytes.
    for r in 0..<16 { #expect(requests[r].elementsEqual(expected[r]), "round \(round) request \(r)") }
  }
  queue.close()
  try child.close()

  // Damage block 150 where the grandparent stores it: the read through the chain fails.
  let grand = try StrataImage.open(path: grandparentPath)
  let stored = try #require(try grand.extents(from: UInt64(150 * bs), length: UInt64(bs)).first?.fileOffset)
  try grand.close()
  let fd = open(grandparentPath, O_RDWR)
  var byte: UInt8 = 0x5A
  #expect(pwrite(fd, &byte, 1, off_t(stored) + 7) == 1)
  close(fd)
  let reopened = try StrataImage.open(path: childPath)
  let again = try ImageQueue(image: reopened, depth: 4, engine: engine)
  let dest = UnsafeMutableRawBufferPointer(rebasing: buffers[0..<bs])
  try again.submitRead(into: dest, at: UInt64(150 * bs), tag: 9)
  var out = [QueueCompletion](repeating: QueueCompletion(tag: 0, error: nil), count: 1)
  #expect(try out.withUnsafeMutableBufferPointer { try again.reap($0, minimum: 1) } == 1)
  #expect(out[0].error?.code == .dataCorrupt, "\(String(describing: out[0].error))")
  again.close()
  try reopened.close()
}

/// Native AIO takes its events from a system-wide pool (fs.aio-max-nr, 65,536 by default): 20
/// queues of depth 256 on one image, as a server with 24 queues has, all get the native engine
/// (at 4,096 events a queue the pool ran out after 15 and the next io_setup failed), and read.
@Test func manyNativeQueuesFitTheSystemAIOPool() throws {
  let (_, img) = try createImage("aio.strata", virtualSize: 1 << 20, blocks: 0..<4, version: 5)
  defer { try? img.close() }  // after the queues (defers run in reverse), also when one fails
  try img.flush()
  var queues: [ImageQueue] = []
  defer { queues.forEach { $0.close() } }
  for _ in 0..<20 { queues.append(try ImageQueue(image: img, depth: 256, engine: .native)) }
  #expect(queues.allSatisfy { $0.engineDescription.hasPrefix("native") })
  let bs = img.blockSize
  let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: bs, alignment: 4096)
  defer { buffer.deallocate() }
  for (i, q) in queues.enumerated() {
    try q.submitRead(into: buffer, at: UInt64((i % 4) * bs), tag: 1)
    #expect(try reapAll(q, 1) == [1])
    #expect(buffer.elementsEqual(pattern(block: i % 4, version: 5, blockSize: bs)), "queue \(i)")
  }
}

/// Two threads write and hand the log to the file (`SharedImage.writeOutLog`, which waits for
/// the writes outside the image lock, each thread possibly reaping the other's completions) at
/// the same time: neither hangs, and after each call an image opened from the file alone (as
/// after a kill of the process) holds what that thread wrote. (Whether the wait itself is
/// needed is not observable here: the writes finish before a reader can open the file.)
@Test func writeOutLogFromTwoThreadsReachesTheFile() throws {
  let (path, img) = try createImage("w.strata", virtualSize: 4 << 20)
  let bs = img.blockSize
  let shared = SharedImage(img)
  var options = ImageOptions()
  options.readOnly = true
  options.unlocked = true
  let failures = Failures()
  let threads = (0..<2).map { t in
    WorkerThread { _ in
      for version in 1...12 {
        let block = t * 64 + version
        do {
          try shared.with {
            try $0.write(pattern(block: block, version: UInt8(version), blockSize: bs), at: UInt64(block * bs))
          }
          try shared.writeOutLog()
          let reader = try StrataImage.open(path: path, options: options)
          defer { try? reader.close() }
          if try reader.read(at: UInt64(block * bs), count: bs)
            != pattern(block: block, version: UInt8(version), blockSize: bs)
          {
            failures.add("thread \(t): block \(block) is not in the file after writeOutLog")
          }
        } catch {
          failures.add("thread \(t): \(error)")
        }
      }
    }
  }
  threads.forEach { $0.start() }
  threads.forEach { $0.stop() }
  #expect(failures.all.isEmpty, "\(failures.all)")
  try shared.with { try $0.close() }
}

/// A write-out may hold another thread's records: thread A's write-out takes the pages of a
/// write B appended before, so B's `writeOutLog`, finding nothing left to write, must not return
/// before A's write is done (B acknowledges its request then; a kill before A's write would lose
/// it). A's write is held at the storage until B has been waiting for a while.
@Test func writeOutLogWaitsForTheWriteOutHoldingItsRecords() throws {
  let storage = SimulatedStorage(seed: 1)
  storage.offersAnyThreadIO = true
  let image = try StrataImage.create(storage: storage, virtualSize: 4 << 20)
  let shared = SharedImage(image)
  let bs = image.blockSize
  let aWriting = DispatchSemaphore(value: 0)
  let releaseA = DispatchSemaphore(value: 0)
  let held = Failures()  // counts the writes held (one)
  storage.beforeAnyThreadIO = { op in
    guard op == .write, held.all.isEmpty else { return }
    held.add("A's write")
    aWriting.signal()
    releaseA.wait()
  }
  try shared.with {
    try $0.write(pattern(block: 1, version: 1, blockSize: bs), at: UInt64(bs))  // B's
    try $0.write(pattern(block: 2, version: 1, blockSize: bs), at: UInt64(2 * bs))  // A's
  }
  let failures = Failures()
  let bReturned = Failures()
  let a = WorkerThread { _ in
    do { try shared.writeOutLog() } catch { failures.add("A: \(error)") }
  }
  let b = WorkerThread { _ in
    do { try shared.writeOutLog() } catch { failures.add("B: \(error)") }
    bReturned.add("B")
  }
  a.start()
  aWriting.wait()
  b.start()
  usleep(200_000)
  #expect(bReturned.all.isEmpty, "B returned while the write holding its record was still running")
  releaseA.signal()
  a.stop()
  b.stop()
  #expect(bReturned.all == ["B"])
  #expect(failures.all.isEmpty, "\(failures.all)")
  #expect(try shared.with { try $0.read(at: UInt64(bs), count: bs) } == pattern(block: 1, version: 1, blockSize: bs))
  try shared.with { try $0.close() }
}

/// Three threads write and write the log out (outside the image lock, each write-out possibly
/// holding another thread's records) while a fourth takes snapshots through group commit and
/// flushes, over 1 MiB segments so that seals fall between a write-out's start and its end. An
/// image opened from the file alone before the writer closes (as after a kill) holds every
/// thread's last version of every block, and so does the image reopened after the close.
@Test func writeOutsOutsideTheLockSurviveSealsAndGroupSyncs() throws {
  var create = ImageOptions()
  create.segmentSize = 1 << 20
  let (path, img) = try createImage("seals.strata", virtualSize: 4 << 20, options: create)
  let bs = img.blockSize
  let shared = SharedImage(img)
  let failures = Failures()
  let latest = (0..<3).map { _ in LatestVersions() }
  let writers = (0..<3).map { t in
    WorkerThread { _ in
      var random = SeededRandom(seed: UInt64(t + 1))
      for step in 1...500 {
        let block = t * 256 + Int(random.next() % 256)
        let version = UInt8(truncatingIfNeeded: step)
        do {
          try shared.with {
            try $0.write(pattern(block: block, version: version, blockSize: bs), at: UInt64(block * bs))
          }
          try shared.writeOutLog()
          latest[t].set(block, version)
        } catch {
          failures.add("thread \(t): \(error)")
        }
      }
    }
  }
  let syncer = WorkerThread { stopFd in
    var n = 0
    var stop = pollfd(fd: stopFd, events: Int16(POLLIN), revents: 0)
    while poll(&stop, 1, 0) == 0 {
      n += 1
      do {
        if n % 2 == 0 {
          _ = try shared.durably { try $0.createSnapshot(name: "s\(n)") }
        } else {
          try shared.with { try $0.flush() }
        }
      } catch {
        failures.add("syncer: \(error)")
      }
    }
  }
  syncer.start()
  writers.forEach { $0.start() }
  writers.forEach { $0.stop() }
  syncer.stop()
  #expect(failures.all.isEmpty, "\(failures.all)")

  func expectLatest(_ image: StrataImage, _ when: String) throws {
    for t in 0..<3 {
      for (block, version) in latest[t].all {
        let got = try image.read(at: UInt64(block * bs), count: bs)
        #expect(got == pattern(block: block, version: version, blockSize: bs), "\(when): block \(block)")
      }
    }
  }
  var options = ImageOptions()
  options.readOnly = true
  options.unlocked = true
  let killed = try StrataImage.open(path: path, options: options)
  try expectLatest(killed, "read from the file before the close")
  try killed.close()
  try shared.with { try $0.close() }
  let reopened = try StrataImage.open(path: path)
  try expectLatest(reopened, "reopened")
  try reopened.close()
}

/// The last version each block got, written by one thread and read after it stopped.
private final class LatestVersions: @unchecked Sendable {
  private let lock = Lock()
  private var versions: [Int: UInt8] = [:]
  func set(_ block: Int, _ version: UInt8) { lock.with { versions[block] = version } }
  var all: [(Int, UInt8)] { lock.with { versions.map { ($0.key, $0.value) } } }
}

/// Messages from worker threads, for the test's thread to check.
private final class Failures: @unchecked Sendable {
  private let lock = Lock()
  private var messages: [String] = []
  func add(_ m: String) { lock.with { messages.append(m) } }
  var all: [String] { lock.with { messages } }
}
