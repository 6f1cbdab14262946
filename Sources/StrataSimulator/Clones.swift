@_spi(Simulation) import StrataCore
import StrataFormat
import StrataSimulation

#if canImport(Glibc)
  import Glibc
#endif

/// External clones, the smallest sound version.
///
/// A child opens its parent by path (`StrataImage.create(path:backing:)`, `open(path:)`): both
/// are files, and `open(storage:)` refuses an image with a backing file. So the simulated storage
/// cannot hold a parent and a child, and clones run on real files in a temporary directory,
/// where the simulator cannot drop, reorder or tear unsynced writes:
///   - the parent is the simulated image's file as a power loss right after a flush leaves it
///     (its log tail is replayed by the child's read-only open), or that file restored to one of
///     its snapshots and closed;
///   - the child gets its own small workload (writes, discards, write-zeroes, reads, flushes,
///     snapshots, snapshot-view reads, restores)
///     and crashes of two kinds whose outcome is a real state of the file: a process crash
///     (every completed write kept: the file as it is) and a power loss right after the last
///     flush (the file as that flush left it; everything since lost);
///   - after each crash the child must open and read, block by block, the parent's data where
///     it wrote nothing and its own flushed writes (unflushed ones old or new), with `check`
///     and the accounting clean; at the end the parent file must be unchanged.
/// Faults and torn writes in a child stay untested (real files); the parent's own crash and
/// fault behaviour is the rest of the run.
extension Simulation {
  func cloneSession() throws {
    guard !storage.isPoweredOff else {
      try crash("power failed after the last operation")
      return
    }
    log.note("clone: flush the parent")
    guard try attempt("flush before a clone", { try self.current.flush() }) == .done else { return }
    markFlushed()
    counts.flushes += 1
    recordFlushPoint()
    let source = rng.chance(0.5) ? rng.element(of: model.order) : nil
    let parentDisk: DiskModel
    if let source {
      guard let frozen = model.snapshots[source] else { return }
      parentDisk = frozen
    } else {
      parentDisk = model.head
    }
    var session = try CloneSession(seed: rng.next(), log: log, fullScan: config.fullScan)
    defer { session.remove() }
    try session.run(parentFile: storage.durable, snapshot: source, parentDisk: parentDisk, work: &work)
    counts.clones += 1
    counts.cloneCrashes += session.crashes
    cloneDigest = CRC32C.checksum(withUnsafeBytes(of: cloneDigest.littleEndian) { Array($0) } + session.digest)
  }
}

/// One external clone on real files (see `Simulation.cloneSession`).
struct CloneSession {
  private var rng: SeededRandom
  private let log: RunLog
  /// Read every block after a crash, or only the tracked ones and the data extents.
  private let fullScan: Bool
  private let directory: String
  private var parentPath: String { directory + "/parent.strata" }
  private var childPath: String { directory + "/child.strata" }
  private(set) var crashes = 0
  private var snapshots = 0
  /// The child's final file, for the run's digest.
  private(set) var digest: [UInt8] = []

  init(seed: UInt64, log: RunLog, fullScan: Bool) throws {
    rng = SeededRandom(seed: seed)
    self.log = log
    self.fullScan = fullScan
    // tmpfs when there is one: real fdatasyncs would make clones cost seconds of waiting.
    let base = access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp"
    var template = Array("\(base)/strata-sim-XXXXXX".utf8CString)
    guard let made = template.withUnsafeMutableBufferPointer({ $0.baseAddress.flatMap { mkdtemp($0) } }) else {
      throw log.fail("clone: mkdtemp failed: errno \(errno)")
    }
    directory = String(cString: made)
  }

  func remove() {
    unlink(childPath)
    unlink(parentPath)
    rmdir(directory)
  }

  private func options(imageID: [UInt8]) -> ImageOptions {
    var o = stressOptions(clock: SimulatedClock())
    o.imageID = imageID
    o.ioEngine = .threads  // synchronous pread/pwrite: nothing in flight when the file is copied
    return o
  }

  mutating func run(parentFile: [UInt8], snapshot: String?, parentDisk: DiskModel, work: inout Workload) throws {
    try writeFile(parentPath, parentFile)
    if let snapshot {
      log.note("clone: parent restored to snapshot \(snapshot)")
      try log.run("clone: restore the parent to \(snapshot)") {
        let parent = try StrataImage.open(path: parentPath, options: options(imageID: []))
        defer { try? parent.close() }
        try parent.restore(snapshot: snapshot)
      }
    } else {
      log.note("clone: parent is the head as a power loss after the flush leaves it")
    }
    let parentBytes = try readFile(parentPath)

    let grow = rng.chance(0.3) ? UInt64(rng.int(in: 1...256)) * 512 : 0
    let size = parentDisk.size + grow
    let childOptions = options(imageID: Array(16..<32))
    var model = CrashModel(size: size)
    model.change {
      $0 = parentDisk
      $0.resize(to: size)
    }
    model.markDurable()
    log.note("clone: create the child (\(size) bytes)")
    var child = try log.run("clone: create") {
      try StrataImage.create(path: childPath, backing: "parent.strata", virtualSize: size, options: childOptions)
    }
    var flushedFile = try readFile(childPath)
    do {
      model = try verifyRecovered(child, model, log, fullScan: fullScan, what: "clone: new child")
      for _ in 0..<rng.int(in: 20...60) {
        switch rng.int(in: 0..<100) {
        case 0..<40:
          let (offset, count) = work.range(size: size, length: work.length())
          let data = work.data(count: count, at: offset)
          log.note("clone: write \(offset)+\(count)")
          model.change(blocks: DiskModel.blocks(offset, UInt64(count))) { $0.write(data, at: offset) }
          try log.run("clone: write") { try child.write(data, at: offset) }
        case 40..<48:
          let (offset, count) = work.range(size: size, length: work.length(max: 1 << 20))
          log.note("clone: discard \(offset)+\(count)")
          model.change(blocks: DiskModel.blocks(offset, UInt64(count))) {
            $0.discard(at: offset, length: UInt64(count))
          }
          try log.run("clone: discard") { try child.discard(at: offset, length: UInt64(count)) }
        case 48..<56:
          let (offset, count) = work.range(size: size, length: work.length(max: 1 << 20))
          log.note("clone: writeZeroes \(offset)+\(count)")
          model.change(blocks: DiskModel.blocks(offset, UInt64(count))) { $0.zero(at: offset, length: UInt64(count)) }
          try log.run("clone: writeZeroes") { try child.writeZeroes(at: offset, length: UInt64(count)) }
        case 56..<64:
          let (offset, count) = work.range(size: size, length: work.length())
          try compareRead({ try child.read(at: $0, count: $1) }, model.head, offset, count, "clone: head", log)
        case 64..<70:
          if model.order.count >= 3, let oldest = model.order.first {
            log.note("clone: delete snapshot \(oldest)")
            model.deleteSnapshot(oldest)
            try log.run("clone: delete snapshot") { try child.deleteSnapshot(name: oldest) }
          }
          snapshots += 1
          let name = "c\(snapshots)"
          log.note("clone: create snapshot \(name)")
          model.createSnapshot(name)
          try log.run("clone: create snapshot") { _ = try child.createSnapshot(name: name) }
        case 70..<74:  // a snapshot view of a child reads through to the parent too
          guard let name = rng.element(of: model.order), let frozen = model.snapshots[name] else { break }
          let (offset, count) = work.range(size: frozen.size, length: work.length())
          try compareRead(
            { try child.snapshotView(name: name).read(at: $0, count: $1) }, frozen, offset, count,
            "clone: view \(name)", log)
        case 74..<77:  // durable once it returns, like any restore
          guard let name = rng.element(of: model.order), let frozen = model.snapshots[name] else { break }
          log.note("clone: restore \(name)")
          model.change { $0 = frozen }
          try log.run("clone: restore") { try child.restore(snapshot: name) }
          model.markDurable()
          flushedFile = try readFile(childPath)
        case 77..<90:
          log.note("clone: flush")
          try log.run("clone: flush") { try child.flush() }
          model.markDurable()
          flushedFile = try readFile(childPath)
        default:
          (child, model, flushedFile) = try crash(child, model, flushedFile, childOptions)
        }
      }
      log.note("clone: final flush")
      try log.run("clone: final flush") { try child.flush() }
      model.markDurable()
      flushedFile = try readFile(childPath)
      (child, model, flushedFile) = try crash(child, model, flushedFile, childOptions)
      try log.run("clone: close") { try child.close() }
    } catch {
      try? child.close()
      throw error
    }
    digest = try readFile(childPath)
    try log.check(
      sameBytes(try readFile(parentPath), parentBytes), "clone: the parent file changed while a child used it")
  }

  /// A crash of the child: a process crash (the file as it is) or a power loss right after the
  /// last flush (the file as that flush left it). Then it must open and match `model`.
  private mutating func crash(
    _ child: StrataImage, _ model: CrashModel, _ flushedFile: [UInt8], _ options: ImageOptions
  ) throws -> (StrataImage, CrashModel, [UInt8]) {
    crashes += 1
    let processCrash = rng.bool()
    let file = processCrash ? try readFile(childPath) : flushedFile
    log.note(
      "clone: crash \(crashes) (\(processCrash ? "process: every completed write kept" : "power: back to the last flush"))"
    )
    // Release the file (a close writes a checkpoint, which the copy then undoes).
    try log.run("clone: close before the crash") { try child.close() }
    try writeFile(childPath, file)
    let what = "clone: crash \(crashes)"
    let reopened = try log.run("clone: open after crash \(crashes)") {
      try StrataImage.open(path: childPath, options: options)
    }
    do {
      let recovered = try verifyRecovered(reopened, model, log, fullScan: fullScan, what: what)
      return (reopened, recovered, try readFile(childPath))
    } catch {
      try? reopened.close()
      throw error
    }
  }

  private func readFile(_ path: String) throws -> [UInt8] {
    let fd = open(path, O_RDONLY | O_CLOEXEC)
    guard fd >= 0 else { throw log.fail("clone: open \(path): errno \(errno)") }
    defer { close(fd) }
    var st = stat()
    guard fstat(fd, &st) == 0 else { throw log.fail("clone: fstat \(path): errno \(errno)") }
    var bytes = [UInt8](repeating: 0, count: Int(st.st_size))
    var done = 0
    while done < bytes.count {
      let n = bytes.withUnsafeMutableBytes { buffer in
        buffer.baseAddress.map { pread(fd, $0 + done, buffer.count - done, off_t(done)) } ?? -1
      }
      guard n > 0 else { throw log.fail("clone: read \(path): errno \(errno)") }
      done += n
    }
    return bytes
  }

  private func writeFile(_ path: String, _ bytes: [UInt8]) throws {
    let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
    guard fd >= 0 else { throw log.fail("clone: create \(path): errno \(errno)") }
    defer { close(fd) }
    var done = 0
    while done < bytes.count {
      let n = bytes.withUnsafeBytes { buffer in
        buffer.baseAddress.map { pwrite(fd, $0 + done, buffer.count - done, off_t(done)) } ?? -1
      }
      guard n > 0 else { throw log.fail("clone: write \(path): errno \(errno)") }
      done += n
    }
  }
}
