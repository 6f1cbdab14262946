// Conformance suite for the `IOEngine` contract (Sources/StrataIO/Engine.swift), run against every
// engine: io_uring (URingEngine), native AIO (AIOEngine) and synchronous pread/pwrite
// (SyncEngine). Every data-path test runs on files opened with O_DIRECT (falling back to buffered
// I/O when the file system answers EINVAL) and on buffered files, with page-aligned buffers.

import CStrataLinux
import Glibc
import Testing

@testable import StrataIO

// MARK: - Fixtures

/// How the test file is opened.
enum OpenMode: String, CaseIterable, Sendable, CustomTestStringConvertible {
  /// O_DIRECT when the file system accepts it, else buffered.
  case direct
  case buffered
  var testDescription: String { rawValue }
}

let page = 4096
let depth = 32

/// A private directory under /tmp, removed (with its plain files) by `remove()`.
final class Scratch {
  let path: String

  init() throws {
    var template = Array("/tmp/strata-io-tests-XXXXXX".utf8CString)
    guard let p = mkdtemp(&template) else { throw SystemError("mkdtemp", errno: errno) }
    path = String(cString: p)
  }

  func file(_ name: String) -> String { path + "/" + name }

  func remove() {
    if let dir = opendir(path) {
      while let entry = readdir(dir) {
        let name = withUnsafePointer(to: &entry.pointee.d_name) {
          String(cString: UnsafeRawPointer($0).assumingMemoryBound(to: CChar.self))
        }
        if name != "." && name != ".." { unlink(file(name)) }
      }
      closedir(dir)
    }
    rmdir(path)
  }
}

/// Opens `path`; in `.direct` mode with O_DIRECT unless the file system refuses it (EINVAL).
/// Returns the descriptor and whether O_DIRECT is in effect.
func openFile(_ path: String, _ mode: OpenMode, flags: Int32 = O_RDWR | O_CREAT) throws -> (fd: Int32, direct: Bool) {
  if mode == .direct {
    let fd = open(path, flags | strata_o_direct(), 0o644)
    if fd >= 0 { return (fd, true) }
    guard errno == EINVAL else { throw SystemError("open(O_DIRECT) \(path)", errno: errno) }
  }
  let fd = open(path, flags, 0o644)
  guard fd >= 0 else { throw SystemError("open \(path)", errno: errno) }
  return (fd, false)
}

/// A zeroed page-aligned buffer; the caller deallocates it (after the engine using it is closed):
/// `EngineFixture.buffer` does.
func alignedBuffer(_ bytes: Int) -> UnsafeMutableRawBufferPointer {
  let b = UnsafeMutableRawBufferPointer.allocate(byteCount: bytes, alignment: page)
  b.initializeMemory(as: UInt8.self, repeating: 0)
  return b
}

/// Deterministic, position-dependent content so a block read from the wrong offset is caught.
func fillPattern(_ b: UnsafeMutableRawBufferPointer, seed: UInt32) {
  var x = seed &* 2_654_435_761 | 1
  for i in 0..<b.count {
    x ^= x << 13
    x ^= x >> 17
    x ^= x << 5
    b[i] = UInt8(truncatingIfNeeded: x)
  }
}

func same(_ a: UnsafeRawPointer, _ b: UnsafeRawPointer, _ n: Int) -> Bool { memcmp(a, b, n) == 0 }

/// What one test holds: an open file (by default "data" in a fresh `Scratch` directory), the engines
/// made on its descriptor and page-aligned buffers. `release()` gives everything back in the one
/// safe order: engines closed (each waits for its requests in flight), then buffers freed, then the
/// descriptor closed and the scratch directory removed. Use as
/// `let f = try EngineFixture(mode); defer { f.release() }`.
final class EngineFixture {
  let path: String
  let mode: OpenMode
  /// The descriptor of `path`; -1 after `release()`.
  private(set) var fd: Int32 = -1
  /// Whether O_DIRECT is in effect on `fd`.
  private(set) var direct = false
  private let scratch: Scratch?
  private var engines: [any IOEngine] = []
  private var buffers: [UnsafeMutableRawBufferPointer] = []

  /// Opens `path` in `mode` with `flags` (see `openFile`); without a path, "data" in a new scratch
  /// directory, which `release()` removes.
  init(_ mode: OpenMode, flags: Int32 = O_RDWR | O_CREAT, path: String? = nil) throws {
    let scratch: Scratch? = if path == nil { try Scratch() } else { nil }
    self.scratch = scratch
    self.path = path ?? scratch!.file("data")
    self.mode = mode
    do {
      (fd, direct) = try openFile(self.path, mode, flags: flags)
    } catch {
      scratch?.remove()
      throw error
    }
  }

  /// A zeroed page-aligned buffer of `bytes` (filled by `fillPattern` with `pattern` when given),
  /// freed by `release()` after the engines are closed.
  func buffer(_ bytes: Int, pattern seed: UInt32? = nil) -> UnsafeMutableRawBufferPointer {
    let b = alignedBuffer(bytes)
    buffers.append(b)
    if let seed { fillPattern(b, seed: seed) }
    return b
  }

  /// An engine of `kind` on `fd`, checked to be of that kind and depth and idle; closed by
  /// `closeEngines()` or `release()`.
  func makeEngine(
    _ kind: IOEngineKind, depth: Int = depth, registered: [UnsafeMutableRawBufferPointer] = []
  ) throws -> any IOEngine {
    let choice = try IOEngines.make(fd: fd, depth: depth, requested: kind, registeredBuffers: registered)
    engines.append(choice.engine)
    #expect(choice.engine.kind == kind)
    #expect(choice.engine.depth == depth)
    #expect(choice.engine.inFlight == 0)
    return choice.engine
  }

  /// Closes every engine made so far (each waits for the requests it has in flight).
  func closeEngines() {
    for engine in engines { engine.close() }
    engines.removeAll()
  }

  /// Closes the engines and the descriptor, then opens `path` again in the same mode with `flags`.
  func reopen(flags: Int32) throws {
    closeEngines()
    close(fd)
    fd = -1
    (fd, direct) = try openFile(path, mode, flags: flags)
  }

  func release() {
    closeEngines()
    for b in buffers { b.deallocate() }
    buffers.removeAll()
    if fd >= 0 { close(fd) }
    fd = -1
    scratch?.remove()
  }
}

/// Submits `requests[from...]`; returns how many the engine accepted.
func submit(_ engine: any IOEngine, _ requests: [IORequest], from: Int = 0) throws -> Int {
  let accepted = try requests.withUnsafeBufferPointer { all in
    try engine.submit(UnsafeBufferPointer(rebasing: all[from...]))
  }
  #expect(accepted >= 0 && accepted <= requests.count - from)
  #expect(engine.inFlight <= engine.depth)
  return accepted
}

/// Collects completions by userData; a duplicate or unknown userData is a failure.
struct Completions {
  var results: [UInt64: Int32] = [:]
  let expected: Set<UInt64>
  private var scratch: [IOCompletion]

  init(_ requests: [IORequest], depth: Int) {
    expected = Set(requests.map(\.userData))
    scratch = Array(repeating: IOCompletion(userData: 0, result: 0), count: depth)
  }

  /// Reaps at least `minimum`; returns how many arrived.
  @discardableResult
  mutating func reap(_ engine: any IOEngine, minimum: Int) throws -> Int {
    let before = engine.inFlight
    let n = try scratch.withUnsafeMutableBufferPointer { try engine.reap($0, minimum: minimum) }
    #expect(n >= minimum && n <= before)
    #expect(engine.inFlight == before - n)
    for c in scratch[..<n] {
      #expect(expected.contains(c.userData), "unknown userData \(c.userData)")
      #expect(results.updateValue(c.result, forKey: c.userData) == nil, "duplicate completion for \(c.userData)")
    }
    return n
  }
}

/// Runs every request to completion with as many in flight as the engine takes.
@discardableResult
func runAll(_ engine: any IOEngine, _ requests: [IORequest]) throws -> [UInt64: Int32] {
  var done = Completions(requests, depth: engine.depth)
  var next = 0
  while next < requests.count || engine.inFlight > 0 {
    if next < requests.count { next += try submit(engine, requests, from: next) }
    guard engine.inFlight > 0 else {
      Issue.record("engine accepted nothing with nothing in flight")
      break
    }
    try done.reap(engine, minimum: 1)
  }
  #expect(Set(done.results.keys) == done.expected)
  return done.results
}

/// `reap` returned at least `minimum`.
func expectReapedMinimum(
  _ n: Int, _ minimum: Int, _ kind: IOEngineKind, sourceLocation: SourceLocation = #_sourceLocation
) {
  #expect(n >= minimum, "reap(minimum: \(minimum)) on \(kind) returned \(n)", sourceLocation: sourceLocation)
}

/// userData values with the high bits set, to check they come back unchanged.
func tag(_ i: Int) -> UInt64 { 0xA5A5_0000_0000_0000 | UInt64(i) }

/// One write of a page per block `b` of `blocks`, in that order: page `b` of `buffer` to offset
/// `b * page`, with userData `tag(b)`.
func pageWrites(_ buffer: UnsafeMutableRawBufferPointer, _ blocks: some Sequence<Int>) -> [IORequest] {
  blocks.map { b in
    IORequest(
      opcode: .write, buffer: buffer.baseAddress! + b * page, length: page, offset: UInt64(b * page), userData: tag(b))
  }
}

// MARK: - Suite

@Suite("IOEngine conformance")
struct EngineConformanceTests {

  // Writes at full depth, then reads back byte-exact. Submitting more than `depth` accepts exactly
  // `depth`, a submit on a full queue accepts nothing, and each reap makes room for exactly as many.
  @Test(arguments: IOEngineKind.allCases, OpenMode.allCases)
  func writeThenReadBackAtFullDepth(kind: IOEngineKind, mode: OpenMode) throws {
    let f = try EngineFixture(mode)
    defer { f.release() }
    let blocks = 3 * depth
    let source = f.buffer(blocks * page, pattern: 7)
    let sink = f.buffer(blocks * page)

    let engine = try f.makeEngine(kind)

    // Writes, submitted in reverse file order.
    let writes = pageWrites(source, (0..<blocks).reversed())
    var done = Completions(writes, depth: depth)
    var next = try submit(engine, writes)
    #expect(next == depth, "submit of \(blocks) on an empty queue of depth \(depth)")
    #expect(engine.inFlight == depth)
    #expect(try submit(engine, writes, from: next) == 0, "a full queue accepts nothing")
    while next < writes.count {
      let room = try done.reap(engine, minimum: 1)
      let accepted = try submit(engine, writes, from: next)
      #expect(accepted == min(room, writes.count - next), "after reaping \(room) the engine takes as many")
      next += accepted
    }
    while engine.inFlight > 0 { try done.reap(engine, minimum: 1) }
    #expect(done.results.count == blocks)
    for (ud, result) in done.results { #expect(result == Int32(page), "write \(ud)") }

    // Reads of two blocks each, alternating between the two ends of the file.
    let pairs = (0..<blocks / 2).map { $0 * 2 }
    let order = zip(pairs, pairs.reversed()).flatMap { [$0, $1] }.prefix(pairs.count)
    #expect(Set(order).count == pairs.count)
    let reads = order.map { b in
      IORequest(
        opcode: .read, buffer: sink.baseAddress! + b * page, length: 2 * page, offset: UInt64(b * page),
        userData: tag(1000 + b))
    }
    let results = try runAll(engine, reads)
    for r in reads { #expect(results[r.userData] == Int32(r.length), "read at \(r.offset)") }
    #expect(same(source.baseAddress!, sink.baseAddress!, blocks * page), "read-back differs from what was written")
  }

  // reap: `minimum` is a floor (0 never blocks, `inFlight` returns all), and it never stores more
  // than the completion buffer holds, leaving the rest in flight for the next call.
  @Test(arguments: IOEngineKind.allCases, OpenMode.allCases)
  func reapHonoursMinimumAndBufferSize(kind: IOEngineKind, mode: OpenMode) throws {
    let f = try EngineFixture(mode)
    defer { f.release() }
    let buf = f.buffer(depth * page, pattern: 13)
    let engine = try f.makeEngine(kind)
    let writes = pageWrites(buf, 0..<depth)
    #expect(try submit(engine, writes) == depth)
    var seen: [UInt64: Int32] = [:]
    var small = [IOCompletion](repeating: IOCompletion(userData: 0, result: 0), count: 4)
    // minimum 0: whatever is ready, at most 4.
    let first = try small.withUnsafeMutableBufferPointer { try engine.reap($0, minimum: 0) }
    #expect(first <= 4 && engine.inFlight == depth - first)
    for c in small[..<first] { seen[c.userData] = c.result }
    // minimum 4 with room for 4: exactly 4.
    if engine.inFlight >= 4 {
      let n = try small.withUnsafeMutableBufferPointer { try engine.reap($0, minimum: 4) }
      expectReapedMinimum(n, 4, kind)
      #expect(n <= 4)
      for c in small[..<n] { #expect(seen.updateValue(c.result, forKey: c.userData) == nil) }
    }
    // minimum = everything left, with room for all of it: one call returns them all.
    var rest = [IOCompletion](repeating: IOCompletion(userData: 0, result: 0), count: depth)
    let left = engine.inFlight
    let n = try rest.withUnsafeMutableBufferPointer { try engine.reap($0, minimum: left) }
    expectReapedMinimum(n, left, kind)
    #expect(engine.inFlight == left - n)
    for c in rest[..<n] { #expect(seen.updateValue(c.result, forKey: c.userData) == nil) }
    // Whatever a short reap left behind, so the checks below still cover every request.
    while engine.inFlight > 0 {
      let m = try rest.withUnsafeMutableBufferPointer { try engine.reap($0, minimum: 1) }
      for c in rest[..<m] { #expect(seen.updateValue(c.result, forKey: c.userData) == nil) }
    }
    #expect(Set(seen.keys) == Set(writes.map(\.userData)))
    #expect(seen.values.allSatisfy { $0 == Int32(page) })
  }

  // reap(minimum:) when some completions are already in the ring and more are still running: it
  // must wait for `minimum` in total, not `minimum` minus those already there. Batch A is left to
  // complete (sleep) before batch B is submitted; then one reap asks for both.
  @Test(arguments: IOEngineKind.allCases, OpenMode.allCases)
  func reapWaitsForMinimumWithCompletionsAlreadyReady(kind: IOEngineKind, mode: OpenMode) throws {
    let f = try EngineFixture(mode)
    defer { f.release() }
    let half = depth / 2
    let buf = f.buffer(depth * 4 * page, pattern: 17)
    let engine = try f.makeEngine(kind)
    let writes = (0..<depth).map { i in
      IORequest(
        opcode: .write, buffer: buf.baseAddress! + i * 4 * page, length: 4 * page, offset: UInt64(i * 4 * page),
        userData: tag(i))
    }
    #expect(try submit(engine, Array(writes[..<half])) == half)
    try engine.flushSubmissions()
    usleep(30_000)
    #expect(try submit(engine, Array(writes[half...])) == half)
    var out = [IOCompletion](repeating: IOCompletion(userData: 0, result: 0), count: depth)
    let n = try out.withUnsafeMutableBufferPointer { try engine.reap($0, minimum: depth) }
    expectReapedMinimum(n, depth, kind)
    var seen = Set(out[..<n].map(\.userData))
    #expect(out[..<n].allSatisfy { $0.result == Int32(4 * page) })
    while engine.inFlight > 0 {
      let m = try out.withUnsafeMutableBufferPointer { try engine.reap($0, minimum: 1) }
      seen.formUnion(out[..<m].map(\.userData))
    }
    #expect(seen == Set(writes.map(\.userData)))
  }

  // flushSubmissions starts what submit only queued: the data reaches the file with no reap.
  @Test(arguments: IOEngineKind.allCases, OpenMode.allCases)
  func flushSubmissionsStartsQueuedRequestsWithoutReap(kind: IOEngineKind, mode: OpenMode) throws {
    let f = try EngineFixture(mode)
    defer { f.release() }
    let blocks = 8
    let source = f.buffer(blocks * page, pattern: 19)
    let check = f.buffer(blocks * page)
    let engine = try f.makeEngine(kind)
    let writes = pageWrites(source, 0..<blocks)
    #expect(try submit(engine, writes) == blocks)
    try engine.flushSubmissions()
    try engine.flushSubmissions()  // idempotent
    var landed = false
    for _ in 0..<200 {  // up to 2 s
      if pread(f.fd, check.baseAddress!, blocks * page, 0) == blocks * page
        && same(source.baseAddress!, check.baseAddress!, blocks * page)
      {
        landed = true
        break
      }
      usleep(10_000)
    }
    #expect(landed, "writes did not reach the file after flushSubmissions (no reap)")
    var done = Completions(writes, depth: depth)
    while engine.inFlight > 0 { try done.reap(engine, minimum: 1) }
    #expect(done.results == Dictionary(uniqueKeysWithValues: writes.map { ($0.userData, Int32(page)) }))
  }

  // Registered buffers (io_uring fixed buffers; the index is ignored by the other engines): the
  // same bytes and results as plain buffers, also mixed in one batch with unregistered ones.
  @Test(arguments: IOEngineKind.allCases, OpenMode.allCases)
  func registeredBuffersGiveSameResults(kind: IOEngineKind, mode: OpenMode) throws {
    let f = try EngineFixture(mode)
    defer { f.release() }
    let blocks = depth
    let source = f.buffer(blocks * page, pattern: 11)
    let sink = f.buffer(blocks * page)
    let plain = f.buffer(blocks * page)

    let engine = try f.makeEngine(kind, registered: [source, sink])

    // Even blocks through registered buffer 0, odd blocks through plain pointers into it.
    let writes = (0..<blocks).map { b in
      IORequest(
        opcode: .write, buffer: source.baseAddress! + b * page, length: page, offset: UInt64(b * page),
        userData: tag(b),
        registeredBuffer: b % 2 == 0 ? 0 : -1)
    }
    for (_, r) in try runAll(engine, writes) { #expect(r == Int32(page)) }
    // Read back into registered buffer 1 (16 KiB requests), and again into an unregistered buffer.
    let fixedReads = stride(from: 0, to: blocks, by: 4).map { b in
      IORequest(
        opcode: .read, buffer: sink.baseAddress! + b * page, length: 4 * page, offset: UInt64(b * page),
        userData: tag(100 + b), registeredBuffer: 1)
    }
    let plainReads = stride(from: 0, to: blocks, by: 4).map { b in
      IORequest(
        opcode: .read, buffer: plain.baseAddress! + b * page, length: 4 * page, offset: UInt64(b * page),
        userData: tag(200 + b))
    }
    let results = try runAll(engine, fixedReads + plainReads)
    for r in fixedReads + plainReads { #expect(results[r.userData] == Int32(4 * page)) }
    #expect(same(source.baseAddress!, sink.baseAddress!, blocks * page), "registered-buffer read-back differs")
    #expect(same(source.baseAddress!, plain.baseAddress!, blocks * page), "plain read-back differs")
  }

  // Flush ordering: writes complete, then an fsync completes with 0; a new descriptor (and a new
  // engine on it) reads the data back after the first engine and descriptor are closed.
  @Test(arguments: IOEngineKind.allCases, OpenMode.allCases)
  func fsyncAfterCompletedWritesThenReopen(kind: IOEngineKind, mode: OpenMode) throws {
    let f = try EngineFixture(mode)
    defer { f.release() }
    let blocks = 2 * depth
    let source = f.buffer(blocks * page, pattern: 23)
    let sink = f.buffer(blocks * page)

    do {
      let engine = try f.makeEngine(kind)
      let writes = pageWrites(source, 0..<blocks)
      for (_, r) in try runAll(engine, writes) { #expect(r == Int32(page)) }
      #expect(engine.inFlight == 0)
      let flush = try runAll(engine, [.fsync(userData: 0xF1F1_F1F1_F1F1_F1F1)])
      #expect(flush == [0xF1F1_F1F1_F1F1_F1F1: 0])
      // After one more completed write, two fsyncs submitted in one batch both report 0.
      let rewrite = [
        IORequest(opcode: .write, buffer: source.baseAddress!, length: page, offset: 0, userData: 1)
      ]
      #expect(try runAll(engine, rewrite) == [1: Int32(page)])
      #expect(try runAll(engine, [.fsync(userData: 2), .fsync(userData: 3)]) == [2: 0, 3: 0])
    }

    // The first engine and descriptor closed, a new descriptor and a new engine on it.
    try f.reopen(flags: O_RDONLY)
    var st = stat()
    #expect(fstat(f.fd, &st) == 0 && st.st_size == blocks * page)
    let engine2 = try f.makeEngine(kind)
    let reads = (0..<blocks / 4).map { i in
      IORequest(
        opcode: .read, buffer: sink.baseAddress! + i * 4 * page, length: 4 * page, offset: UInt64(i * 4 * page),
        userData: tag(i))
    }
    for (_, r) in try runAll(engine2, reads) { #expect(r == Int32(4 * page)) }
    #expect(same(source.baseAddress!, sink.baseAddress!, blocks * page), "data lost across reopen")
  }

  // Short reads: a read straddling the end of the file returns the bytes up to it; a read that
  // starts at or past the end returns 0. All in flight together.
  @Test(arguments: IOEngineKind.allCases, OpenMode.allCases)
  func shortReadsAtEndOfFile(kind: IOEngineKind, mode: OpenMode) throws {
    let f = try EngineFixture(mode)
    defer { f.release() }
    let source = f.buffer(2 * page, pattern: 31)
    let sink = f.buffer(16 * page)

    let engine = try f.makeEngine(kind)
    let w = IORequest(opcode: .write, buffer: source.baseAddress!, length: 2 * page, offset: 0, userData: 1)
    #expect(try engine.perform(w) == Int32(2 * page))
    let size = page + 1000
    #expect(ftruncate(f.fd, off_t(size)) == 0)

    let s = sink.baseAddress!
    let reads = [
      IORequest(opcode: .read, buffer: s, length: 2 * page, offset: 0, userData: 10),  // straddles: size
      IORequest(opcode: .read, buffer: s + 2 * page, length: page, offset: UInt64(page), userData: 11),  // 1000
      IORequest(opcode: .read, buffer: s + 4 * page, length: 4 * page, offset: 0, userData: 12),  // size
      IORequest(opcode: .read, buffer: s + 8 * page, length: page, offset: UInt64(2 * page), userData: 13),  // at EOF
      IORequest(opcode: .read, buffer: s + 9 * page, length: page, offset: 1 << 20, userData: 14),  // far past
      IORequest(opcode: .read, buffer: s + 10 * page, length: 2 * page, offset: 1 << 30, userData: 15),  // far past
    ]
    let results = try runAll(engine, reads)
    #expect(results[10] == Int32(size))
    #expect(results[11] == 1000)
    #expect(results[12] == Int32(size))
    #expect(results[13] == 0)
    #expect(results[14] == 0)
    #expect(results[15] == 0)
    #expect(same(s, source.baseAddress!, size))
    #expect(same(s + 2 * page, source.baseAddress! + page, 1000))
    #expect(same(s + 4 * page, source.baseAddress!, size))
  }

  // A read on a write-only descriptor completes with -EBADF (or submit throws EBADF), and the
  // engine stays usable: nothing left in flight, later writes succeed.
  @Test(arguments: IOEngineKind.allCases, OpenMode.allCases)
  func readOnWriteOnlyDescriptorFailsWithEBADF(kind: IOEngineKind, mode: OpenMode) throws {
    let f = try EngineFixture(mode, flags: O_WRONLY | O_CREAT)
    defer { f.release() }
    let buf = f.buffer(2 * page, pattern: 3)
    let engine = try f.makeEngine(kind)

    #expect(
      try engine.perform(IORequest(opcode: .write, buffer: buf.baseAddress!, length: page, offset: 0, userData: 1))
        == Int32(page))
    let read = IORequest(opcode: .read, buffer: buf.baseAddress! + page, length: page, offset: 0, userData: 2)
    do {
      let r = try engine.perform(read)
      #expect(r == -EBADF, "read on O_WRONLY completed with \(r)")
    } catch {
      #expect(error.errno == EBADF, "read on O_WRONLY threw \(error)")
    }
    #expect(engine.inFlight == 0)
    #expect(
      try engine.perform(
        IORequest(opcode: .write, buffer: buf.baseAddress!, length: page, offset: UInt64(page), userData: 3))
        == Int32(page))
    #expect(try engine.perform(.fsync(userData: 4)) == 0)
  }

  // A batch where one request fails: whatever `submit` does, the caller must be able to tell which
  // requests were accepted. Either submit returns a count (and the failing request completes with
  // -EBADF), or it throws having accepted nothing (inFlight unchanged), so the batch can be retried.
  @Test(arguments: IOEngineKind.allCases, OpenMode.allCases)
  func failingRequestInsideABatch(kind: IOEngineKind, mode: OpenMode) throws {
    let f = try EngineFixture(mode, flags: O_WRONLY | O_CREAT)
    defer { f.release() }
    let buf = f.buffer(4 * page, pattern: 5)
    let engine = try f.makeEngine(kind)

    let b = buf.baseAddress!
    let batch = [
      IORequest(opcode: .write, buffer: b, length: page, offset: 0, userData: 1),
      IORequest(opcode: .write, buffer: b + page, length: page, offset: UInt64(page), userData: 2),
      IORequest(opcode: .read, buffer: b + 2 * page, length: page, offset: 0, userData: 3),
      IORequest(opcode: .write, buffer: b + 3 * page, length: page, offset: UInt64(3 * page), userData: 4),
    ]
    var done = Completions(batch, depth: depth)
    do {
      let accepted = try submit(engine, batch)
      #expect(accepted == batch.count)
      while engine.inFlight > 0 { try done.reap(engine, minimum: 1) }
      #expect(done.results == [1: Int32(page), 2: Int32(page), 3: -EBADF, 4: Int32(page)])
    } catch let error as SystemError {
      #expect(error.errno == EBADF)
      #expect(
        engine.inFlight == 0,
        "submit threw \(error) yet left \(engine.inFlight) request(s) in flight: the caller cannot know which")
      while engine.inFlight > 0 { try done.reap(engine, minimum: 1) }
    }
  }

  // ENOSPC: on a 256 KiB tmpfs (root only; tmpfs is opened buffered), writing 512 KiB at full depth
  // makes some completion report -ENOSPC; every other write completes whole or short, never garbage.
  @Test(
    .enabled(if: getuid() == 0, "needs root to mount a small tmpfs; without it ENOSPC is not reachable fast"),
    arguments: IOEngineKind.allCases)
  func writesToAFullFileSystemReportENOSPC(kind: IOEngineKind) throws {
    let scratch = try Scratch()
    defer { scratch.remove() }
    let mnt = scratch.file("tmpfs")
    #expect(mkdir(mnt, 0o755) == 0)
    defer { rmdir(mnt) }
    // Equivalent to `mount -t tmpfs -o size=256k tmpfs DIR`, without depending on mount(8).
    guard mount("tmpfs", mnt, "tmpfs", 0, "size=256k") == 0 else {
      let e = errno
      try Test.cancel("mount tmpfs failed (\(String(cString: strerror(e)))); no ENOSPC check possible here")
    }
    defer {
      if umount(mnt) != 0 { umount2(mnt, Int32(MNT_DETACH)) }
    }
    let f = try EngineFixture(.buffered, path: mnt + "/full")
    defer { f.release() }  // before the unmount
    #expect(!f.direct)
    let blocks = 128
    let buf = f.buffer(blocks * page, pattern: 9)
    let engine = try f.makeEngine(kind)
    let writes = pageWrites(buf, 0..<blocks)
    let results = try runAll(engine, writes)
    let enospc = results.values.filter { $0 == -ENOSPC }.count
    #expect(enospc > 0, "no -ENOSPC writing \(blocks * page) bytes to a 256 KiB tmpfs")
    for (ud, r) in results {
      #expect(r == -ENOSPC || (r >= 0 && r <= Int32(page)), "write \(ud) completed with \(r)")
    }
    #expect(results.values.filter { $0 == Int32(page) }.count <= 64, "more than 256 KiB accepted")
  }

  // EIO: a device-mapper "error" target fails every read with EIO. Needs root, /dev/mapper/control
  // (a kernel with device-mapper) and dmsetup. Where those are missing (as on the VM this suite was
  // written on: no device-mapper in /proc/devices), EIO propagation is NOT covered: the test is
  // skipped rather than faked (an EIO cannot be produced on a regular file system without it).
  @Test(
    .enabled(
      if: getuid() == 0 && access("/dev/mapper/control", F_OK) == 0
        && (access("/usr/sbin/dmsetup", X_OK) == 0 || access("/sbin/dmsetup", X_OK) == 0),
      "needs root, device-mapper (/dev/mapper/control) and dmsetup for an EIO device"),
    arguments: IOEngineKind.allCases)
  func readsFromAFailingDeviceReportEIO(kind: IOEngineKind) throws {
    let name = "strata-io-eio-\(getpid())-\(kind.rawValue)"
    guard system("dmsetup create \(name) --table '0 2048 error' >/dev/null 2>&1") == 0 else {
      try Test.cancel("dmsetup create failed; EIO not covered")
    }
    defer { _ = system("dmsetup remove \(name) >/dev/null 2>&1") }
    _ = system("dmsetup mknodes \(name) >/dev/null 2>&1")
    let f = try EngineFixture(.direct, flags: O_RDONLY, path: "/dev/mapper/\(name)")
    defer { f.release() }
    let buf = f.buffer(depth * page)
    let engine = try f.makeEngine(kind)
    let reads = (0..<8).map { i in
      IORequest(
        opcode: .read, buffer: buf.baseAddress! + i * page, length: page, offset: UInt64(i * page), userData: tag(i))
    }
    let results = try runAll(engine, reads)
    for (ud, r) in results { #expect(r == -EIO, "read \(ud) on a dm error target completed with \(r)") }
  }

  // close() with requests in flight and nothing reaped: no crash, and it waits for them (every
  // write is in the file once close returns, so the buffers may be freed right after).
  @Test(arguments: IOEngineKind.allCases, OpenMode.allCases)
  func closeWithRequestsInFlightWaitsForThem(kind: IOEngineKind, mode: OpenMode) throws {
    let f = try EngineFixture(mode)
    defer { f.release() }
    let blocks = depth
    let source = f.buffer(blocks * page, pattern: 41)
    let check = f.buffer(blocks * page)

    let engine = try f.makeEngine(kind)
    let writes = pageWrites(source, 0..<blocks)
    #expect(try submit(engine, writes) == blocks)
    f.closeEngines()  // engine.close() with every write in flight

    // The engine is closed; read with plain pread on the same descriptor.
    var done = 0
    while done < blocks * page {
      let n = pread(f.fd, check.baseAddress! + done, blocks * page - done, off_t(done))
      guard n > 0 else { break }
      done += n
    }
    #expect(done == blocks * page)
    #expect(same(source.baseAddress!, check.baseAddress!, blocks * page), "close returned before writes landed")
  }

  // Leaks: engines closed with requests in flight release their kernel objects (io_uring ring
  // descriptors, AIO ring mappings). Checked in a child process so parallel tests don't interfere.
  @Test(arguments: IOEngineKind.allCases)
  func closeReleasesKernelResources(kind: IOEngineKind) async {
    await #expect(processExitsWith: .success, observing: [\.standardErrorContent]) { [raw = kind.rawValue as String] in
      let kind = IOEngineKind(rawValue: raw)!
      let f = try EngineFixture(.direct)
      defer { f.release() }
      let buf = f.buffer(8 * page)
      let before = kernelHandles()
      for round in 0..<20 {
        let engine = try IOEngines.make(fd: f.fd, depth: 8, requested: kind, registeredBuffers: [buf]).engine
        if round == 0 {
          // The probe must see the engine's kernel objects, or the leak check below proves nothing.
          let open = kernelHandles()
          let seen =
            switch kind {
            case .ioUring: open.uring == before.uring + 1
            case .native: open.aio == before.aio + 1
            case .threads: open == before
            }
          if !seen { die("probe did not see the engine: \(before) -> \(open)", 5) }
        }
        let writes = (0..<8).map { b in
          IORequest(
            opcode: .write, buffer: buf.baseAddress! + b * page, length: page, offset: UInt64(b * page),
            userData: UInt64(round * 8 + b))
        }
        _ = try writes.withUnsafeBufferPointer { try engine.submit($0) }
        engine.close()
      }
      let after = kernelHandles()
      if after != before {
        die("leak: \(before) before, \(after) after 20 engines", 1)
      }
    }
  }

  // `IOEngines.make` prefers io_uring (available on this kernel) and says why.
  @Test func makeWithoutRequestChoosesIOUring() throws {
    let f = try EngineFixture(.direct)
    defer { f.release() }
    let choice = try IOEngines.make(fd: f.fd, depth: depth)
    defer { choice.engine.close() }
    #expect(choice.engine.kind == .ioUring)
    #expect(!choice.reason.isEmpty)
  }

  @Test(arguments: IOEngineKind.allCases)
  func makeWithRequestReturnsThatKind(kind: IOEngineKind) throws {
    let f = try EngineFixture(.direct)
    defer { f.release() }
    let choice = try IOEngines.make(fd: f.fd, depth: 16, requested: kind)
    defer { choice.engine.close() }
    #expect(choice.engine.kind == kind)
    #expect(choice.engine.depth == 16)
    #expect(!choice.reason.isEmpty)
    switch kind {
    case .ioUring: #expect(choice.engine is URingEngine)
    case .native: #expect(choice.engine is AIOEngine)
    case .threads: #expect(choice.engine is SyncEngine)
    }
  }

  // A failed URingEngine init must throw, so that `IOEngines.make` can fall back. Checked in a
  // child process, so that a trap fails the test instead of the whole run.
  @Test func uringInitFailureThrowsAndMakeFallsBack() async {
    do {
      await #expect(processExitsWith: .success, observing: [\.standardErrorContent]) {
        // An fd that cannot be open: io_uring_register_files fails with EBADF.
        let bad: Int32 = 1_000_000
        do {
          let e = try URingEngine(fd: bad, depth: 8)
          e.close()
          die("URingEngine accepted a bad fd", 2)
        } catch {
          guard (error as? SystemError)?.errno == EBADF else { die("URingEngine threw \(error)", 3) }
        }
        let choice = try IOEngines.make(fd: bad, depth: 8)
        defer { choice.engine.close() }
        guard choice.engine.kind != .ioUring, choice.reason.contains("io_uring unavailable") else {
          die("make chose \(choice.engine.kind): \(choice.reason)", 4)
        }
      }
    }
  }

  // The synchronous convenience: write, fsync, read.
  @Test(arguments: IOEngineKind.allCases, OpenMode.allCases)
  func performReadWriteFsync(kind: IOEngineKind, mode: OpenMode) throws {
    let f = try EngineFixture(mode)
    defer { f.release() }
    let source = f.buffer(4 * page, pattern: 77)
    let sink = f.buffer(4 * page)
    let engine = try f.makeEngine(kind, registered: [sink])

    #expect(
      try engine.perform(
        IORequest(opcode: .write, buffer: source.baseAddress!, length: 4 * page, offset: 8192, userData: 1))
        == Int32(4 * page))
    #expect(engine.inFlight == 0)
    #expect(try engine.perform(.fsync(userData: 2)) == 0)
    #expect(engine.inFlight == 0)
    #expect(
      try engine.perform(
        IORequest(opcode: .read, buffer: sink.baseAddress!, length: 4 * page, offset: 8192, userData: 3))
        == Int32(4 * page))
    #expect(same(source.baseAddress!, sink.baseAddress!, 4 * page))
    // Through the registered buffer as well, and a hole reads as zeros.
    #expect(
      try engine.perform(
        IORequest(
          opcode: .read, buffer: sink.baseAddress!, length: 2 * page, offset: 0, userData: 4, registeredBuffer: 0))
        == Int32(2 * page))
    #expect(sink.prefix(2 * page).allSatisfy { $0 == 0 })
    #expect(engine.inFlight == 0)
  }
}

/// Kernel objects an engine may hold: io_uring descriptors and AIO ring mappings of this process.
func kernelHandles() -> (uring: Int, aio: Int) {
  var uring = 0
  if let dir = opendir("/proc/self/fd") {
    while let entry = readdir(dir) {
      let name = withUnsafePointer(to: &entry.pointee.d_name) {
        String(cString: UnsafeRawPointer($0).assumingMemoryBound(to: CChar.self))
      }
      var target = [CChar](repeating: 0, count: 256)
      let n = readlink("/proc/self/fd/" + name, &target, 255)
      if n > 0 && String(decoding: target[..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self).contains("io_uring") {
        uring += 1
      }
    }
    closedir(dir)
  }
  var aio = 0
  let fd = open("/proc/self/maps", O_RDONLY)
  if fd >= 0 {
    var bytes: [UInt8] = []
    var chunk = [UInt8](repeating: 0, count: 65536)
    while true {
      let n = read(fd, &chunk, chunk.count)
      if n <= 0 { break }
      bytes += chunk[..<n]
    }
    close(fd)
    aio = String(decoding: bytes, as: UTF8.self).split(separator: "\n").filter { $0.contains("[aio]") }.count
  }
  return (uring, aio)
}

/// Ends an exit-test child with a message on standard error.
func die(_ message: String, _ code: Int32) -> Never {
  let line = message + "\n"
  _ = line.withCString { write(2, $0, strlen($0)) }
  exit(code)
}
