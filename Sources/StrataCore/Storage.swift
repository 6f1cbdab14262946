import CStrataLinux
import StrataFormat
import StrataIO

#if canImport(Glibc)
  import Glibc
#endif

/// Where an image's bytes live. The image does all its I/O through this protocol, so tests can
/// inject faults and the io_uring engine can plug in underneath.
///
/// Contract: `write` may be lost or torn by a crash until `sync` returns; after `sync` returns,
/// everything written before it is durable.
public protocol ImageStorage: AnyObject {
  /// Reads up to `buffer.count` bytes at `offset`; returns fewer only at the end of the storage.
  func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws -> Int
  func write(_ bytes: UnsafeRawBufferPointer, at offset: UInt64) throws
  /// Makes every completed write durable (fdatasync).
  func sync() throws
  func size() throws -> UInt64
  /// Sets the size (truncate or extend with zeros).
  func setSize(_ size: UInt64) throws
  /// Releases the storage. Called exactly once by the image.
  func close() throws
  /// Starts a write that may complete later; `bytes` must stay unchanged until
  /// `completeWrites` returns. Errors may surface here or in `completeWrites`.
  func submitWrite(_ bytes: UnsafeRawBufferPointer, at offset: UInt64) throws
  /// Waits for every submitted write; throws the first error any of them met.
  func completeWrites() throws
  /// Counts the writes submitted so far: a mark for `completeWrites(through:)`.
  var writeMark: UInt64 { get }
  /// Waits for the writes submitted up to `mark` (later ones may stay in flight); throws the
  /// first error any write met.
  func completeWrites(through mark: UInt64) throws
  /// Reserves space for a range about to be written (a new log segment), so that the writes
  /// neither extend the file nor fail half-way for lack of space.
  func preallocate(at offset: UInt64, length: UInt64) throws
  /// Gives the space of a byte range back to the file system (the file keeps its size; what
  /// the range then reads is unspecified): the cleaner shrinks the image in `du` this way.
  func punchHole(at offset: UInt64, length: UInt64) throws
  /// A write and a sync that another thread may run while the image's thread keeps using the
  /// storage (group commit writes and syncs outside the image lock); nil when the storage
  /// cannot, and the caller then does both under its lock.
  var anyThreadIO: AnyThreadIO? { get }
  /// Whether the writes submitted up to `mark` completed, without waiting (throws the first
  /// error any write met, as `completeWrites`).
  func writesComplete(through mark: UInt64) throws -> Bool
  /// A descriptor that becomes readable when a submitted write completes, so a thread can wait
  /// for `writesComplete` without holding the image lock; nil when the storage has none.
  var completionFD: Int32? { get }
  /// Whether writes submitted up to `mark` may still be in flight, without a system call
  /// (false lets a caller skip `writesComplete`; a failed write still surfaces at the next wait).
  func writesInFlight(through mark: UInt64) -> Bool
}

extension ImageStorage {
  public func writesComplete(through mark: UInt64) throws -> Bool {
    try completeWrites(through: mark)
    return true
  }

  public var completionFD: Int32? { nil }
  public func writesInFlight(through mark: UInt64) -> Bool { true }
}

/// A synchronous write and an fdatasync callable from any thread (see `anyThreadIO`). The sync
/// covers every write completed before it started.
public struct AnyThreadIO: Sendable {
  public var write: @Sendable (_ bytes: UnsafeRawBufferPointer, _ offset: UInt64) throws -> Void
  public var sync: @Sendable () throws -> Void
  /// Fills the whole buffer (page aligned) from `offset`; a short file is an error.
  public var read: (@Sendable (_ buffer: UnsafeMutableRawBufferPointer, _ offset: UInt64) throws -> Void)?

  public init(
    write: @escaping @Sendable (UnsafeRawBufferPointer, UInt64) throws -> Void,
    sync: @escaping @Sendable () throws -> Void,
    read: (@Sendable (UnsafeMutableRawBufferPointer, UInt64) throws -> Void)? = nil
  ) {
    self.write = write
    self.sync = sync
    self.read = read
  }
}

extension ImageStorage {
  /// Storage that cannot give space back keeps it (the log reuses it all the same).
  public func punchHole(at offset: UInt64, length: UInt64) throws {}
  public func submitWrite(_ bytes: UnsafeRawBufferPointer, at offset: UInt64) throws { try write(bytes, at: offset) }
  public var anyThreadIO: AnyThreadIO? { nil }
  public func completeWrites() throws {}
  public var writeMark: UInt64 { 0 }
  /// Storage that cannot wait selectively waits for everything.
  public func completeWrites(through mark: UInt64) throws { try completeWrites() }
  public func preallocate(at offset: UInt64, length: UInt64) throws {}
}

/// A regular file accessed through an I/O engine (io_uring, native AIO or pread/pwrite), with
/// O_DIRECT where the file system supports it, and locked with flock so that two processes
/// never write one image.
public final class FileStorage: ImageStorage {
  public enum Mode: Sendable {
    case readOnly
    /// Read-only without taking the lock: for reading data that never changes (a snapshot's
    /// view) while another process may write the file.
    case readOnlyUnlocked
    case readWrite
    /// Creates the file; fails if it exists unless `overwrite`.
    case create(overwrite: Bool)
  }

  /// Bounce buffer size for callers whose memory is not aligned for O_DIRECT.
  private static let bounceBytes = 1 << 20

  public let path: String
  private var fd: Int32
  public private(set) var engine: (any IOEngine)?
  /// Which engine runs and why (for the log line users need when performance surprises them).
  public private(set) var engineDescription = ""
  public private(set) var isDirect = false
  private let bounce: UnsafeMutableRawBufferPointer
  /// Signalled by the engine as requests complete (see `completionFD`); -1 without one.
  private var completionEvent: Int32 = -1

  /// The engine the user asked for (`--aio`, STRATA_AIO), which queues on this file use too.
  private let requestedEngine: IOEngineKind?
  /// The engine queues on this file get unless they ask for one (nil: the best available).
  public var queueEngine: IOEngineKind? { requestedEngine }

  public init(path: String, mode: Mode, engine requested: IOEngineKind? = nil, direct: Bool = true) throws {
    self.path = path
    requestedEngine = requested ?? StrataEnvironment.engine
    bounce = .allocate(byteCount: Self.bounceBytes, alignment: Layout.pageSize)
    let flags: Int32
    switch mode {
    case .readOnly, .readOnlyUnlocked: flags = O_RDONLY
    case .readWrite: flags = O_RDWR
    case .create(let overwrite): flags = O_RDWR | O_CREAT | (overwrite ? 0 : O_EXCL)
    }
    var fd: Int32 = -1
    if direct {
      fd = Self.retrying { Glibc.open(path, flags | O_CLOEXEC | strata_o_direct(), 0o644) }
      isDirect = fd >= 0
    }
    // File systems without O_DIRECT (tmpfs) refuse it with EINVAL: use the page cache there.
    if fd < 0 && (!direct || Glibc.errno == EINVAL) {
      fd = Self.retrying { Glibc.open(path, flags | O_CLOEXEC, 0o644) }
    }
    guard fd >= 0 else {
      let e = Glibc.errno
      bounce.deallocate()
      if e == EEXIST {
        throw StrataError(.alreadyExists, "\(path) already exists (use --force to overwrite)", errno: e)
      }
      if e == ENOENT { throw StrataError(.notFound, "\(path): no such file", errno: e) }
      throw StrataError.system("open", path, errno: e)
    }
    self.fd = fd
    // From here on, every failure closes the descriptor and forgets it before throwing.
    func fail(_ error: StrataError) -> StrataError {
      Glibc.close(fd)
      self.fd = -1
      return error
    }
    var st = stat()
    if fstat(fd, &st) == 0, (st.st_mode & S_IFMT) == S_IFDIR {
      throw fail(StrataError(.invalidArgument, "\(path) is a directory"))
    }
    let lock: Int32
    switch mode {
    case .readOnly: lock = LOCK_SH
    case .readOnlyUnlocked: lock = 0
    case .readWrite, .create: lock = LOCK_EX
    }
    if lock != 0, Self.retrying({ flock(fd, lock | LOCK_NB) }) != 0 {
      let e = Glibc.errno
      if e == EWOULDBLOCK {
        throw fail(StrataError(.locked, "\(path) is in use by another process (it holds the image lock)", errno: e))
      }
      throw fail(StrataError.system("flock", path, errno: e))
    }
    // Overwriting truncates only once the lock is held, never under another process's feet.
    if case .create(overwrite: true) = mode, Self.retrying({ ftruncate(fd, 0) }) != 0 {
      throw fail(StrataError.system("ftruncate", path, errno: Glibc.errno))
    }
    do {
      let choice = try IOEngines.make(fd: fd, depth: 64, requested: requestedEngine)
      engine = choice.engine
      engineDescription = "\(choice.engine.kind.rawValue) (\(choice.reason))\(isDirect ? ", O_DIRECT" : ", page cache")"
    } catch {
      throw fail(StrataError.system(error.call, path, errno: error.errno))
    }
    // Without it, threads wait for the log's writes under the image lock (still correct).
    let event = strata_eventfd(0, strata_efd_nonblock())
    if event >= 0 {
      if (try? engine?.signalCompletions(to: event)) != nil { completionEvent = event } else { Glibc.close(event) }
    }
  }

  /// A second engine on the same file for a high-queue-depth queue (one engine per thread).
  /// `registered` memory is registered with io_uring so requests into it skip page pinning;
  /// `otherFiles` are the engine's files 1, 2, ... (a clone's parents).
  public func makeEngine(
    depth: Int, kind: IOEngineKind?, registered: [UnsafeMutableRawBufferPointer], singleThread: Bool,
    otherFiles: [FileStorage] = []
  )
    throws -> EngineChoice
  {
    precondition(fd >= 0 && otherFiles.allSatisfy { $0.fd >= 0 })
    do {
      return try IOEngines.make(
        fd: fd, otherFiles: otherFiles.map(\.fd), depth: depth, requested: kind ?? requestedEngine,
        registeredBuffers: registered, singleThread: singleThread)
    } catch {
      throw StrataError.system(error.call, path, errno: error.errno)
    }
  }

  deinit {
    assert(fd < 0, "FileStorage for \(path) was never closed")
    bounce.deallocate()
  }

  public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws -> Int {
    try transfer(.read, UnsafeMutableRawPointer(buffer.baseAddress), count: buffer.count, at: offset)
  }

  public func write(_ bytes: UnsafeRawBufferPointer, at offset: UInt64) throws {
    _ = try transfer(.write, UnsafeMutableRawPointer(mutating: bytes.baseAddress), count: bytes.count, at: offset)
  }

  /// Moves bytes through the engine, bouncing through an aligned buffer when O_DIRECT cannot
  /// use the caller's memory or range directly; returns the byte count (short only at EOF).
  private func transfer(_ op: IOOpcode, _ base: UnsafeMutableRawPointer?, count: Int, at offset: UInt64) throws -> Int {
    guard count > 0, let base else { return 0 }
    let aligned = !isDirect || (Int(bitPattern: base) % Layout.pageSize == 0 && count % 512 == 0 && offset % 512 == 0)
    if !aligned {
      precondition(offset % 512 == 0 || op == .read, "unaligned O_DIRECT write at \(offset)")
      precondition(op == .read || count % 512 == 0, "unaligned O_DIRECT write of \(count) bytes")
    }
    var done = 0
    while done < count {
      let chunk = aligned ? count - done : min(count - done, bounce.count)
      let target = aligned ? base + done : bounce.baseAddress!
      let length = aligned ? chunk : (chunk + 511) & ~511
      if !aligned && op == .write { bounce.baseAddress!.copyMemory(from: base + done, byteCount: chunk) }
      let r = try perform(
        IORequest(opcode: op, buffer: target, length: length, offset: offset + UInt64(done), userData: 1))
      let got = min(r, chunk)
      if !aligned && op == .read && got > 0 { (base + done).copyMemory(from: target, byteCount: got) }
      done += got
      if r < length { break }
    }
    return done
  }

  // MARK: Asynchronous writes (the log's write-out overlaps with appending)

  /// Completions of submitWrite carry this in their low 16 bits, the write's slot in the next
  /// 16 and its length in the high 32.
  private static let writeTag: UInt64 = 0x5749
  private static let syncTag: UInt64 = 0x5359_4e43  // the one synchronous request at a time
  /// The mark of each write in flight, by slot (0: free); there are fewer than the engine depth.
  private var inFlightMarks = [UInt64](repeating: 0, count: 64)
  public private(set) var writeMark: UInt64 = 0
  private var writeError: StrataError?
  private var completions = [IOCompletion](repeating: IOCompletion(userData: 0, result: 0), count: 64)

  public func submitWrite(_ bytes: UnsafeRawBufferPointer, at offset: UInt64) throws {
    guard let engine, isDirect, engine.kind != .threads, Int(bitPattern: bytes.baseAddress) % Layout.pageSize == 0,
      bytes.count % Layout.pageSize == 0, offset % UInt64(Layout.pageSize) == 0
    else {
      return try write(bytes, at: offset)
    }
    while engine.inFlight >= engine.depth { try reapOne(waitingFor: nil) }
    guard let slot = inFlightMarks.firstIndex(of: 0) else { preconditionFailure("more writes in flight than slots") }
    var request = IORequest(
      opcode: .write, buffer: UnsafeMutableRawPointer(mutating: bytes.baseAddress), length: bytes.count, offset: offset,
      userData: Self.writeTag | UInt64(slot) << 16 | UInt64(bytes.count) << 32)
    let accepted: Int
    do {
      accepted = try withUnsafePointer(to: &request) { try engine.submit(UnsafeBufferPointer(start: $0, count: 1)) }
      try engine.flushSubmissions()
    } catch let e as SystemError {
      throw StrataError.system(e.call, path, errno: e.errno)
    }
    precondition(accepted == 1)
    writeMark += 1
    inFlightMarks[slot] = writeMark
  }

  public func completeWrites() throws {
    try completeWrites(through: .max)
  }

  public func completeWrites(through mark: UInt64) throws {
    while writesInFlight(through: mark) { try reapOne(waitingFor: nil) }
    if let e = writeError {
      writeError = nil
      throw e
    }
  }

  public var completionFD: Int32? { completionEvent >= 0 ? completionEvent : nil }

  public func writesInFlight(through mark: UInt64) -> Bool {
    inFlightMarks.contains { $0 != 0 && $0 <= mark }
  }

  public func writesComplete(through mark: UInt64) throws -> Bool {
    // Reset first: a completion from here on signals the descriptor again.
    var count: UInt64 = 0
    if completionEvent >= 0 { _ = Glibc.read(completionEvent, &count, 8) }
    if try reapAvailable() > 0 && completionEvent >= 0 {
      // Another thread may be waiting for a write this reaped: let it look again.
      var one: UInt64 = 1
      _ = Glibc.write(completionEvent, &one, 8)
    }
    guard !writesInFlight(through: mark) else { return false }
    try completeWrites(through: mark)  // reports a failed write
    return true
  }

  /// Takes the write completions already there; returns how many.
  private func reapAvailable() throws -> Int {
    guard let engine, engine.inFlight > 0 else { return 0 }
    let n: Int
    do {
      n = try completions.withUnsafeMutableBufferPointer { try engine.reap($0, minimum: 0) }
    } catch let e as SystemError {
      throw StrataError.system(e.call, path, errno: e.errno)
    }
    precondition(!completions[..<n].contains { $0.userData == Self.syncTag }, "a synchronous request was in flight")
    for c in completions[..<n] { noteWriteCompleted(c) }
    return n
  }

  private func noteWriteCompleted(_ c: IOCompletion) {
    inFlightMarks[Int((c.userData >> 16) & 0xFFFF)] = 0
    let expected = Int32(truncatingIfNeeded: c.userData >> 32)
    if c.result != expected && writeError == nil {
      writeError = StrataError.system("write", path, errno: c.result < 0 ? -c.result : EIO)
    }
  }

  /// Reaps completions until one arrives (or the one tagged `waitingFor`); returns its result.
  @discardableResult
  private func reapOne(waitingFor tag: UInt64?) throws -> Int32? {
    guard let engine else { preconditionFailure("FileStorage used after close") }
    while true {
      let n: Int
      do {
        n = try completions.withUnsafeMutableBufferPointer { try engine.reap($0, minimum: 1) }
      } catch let e as SystemError {
        throw StrataError.system(e.call, path, errno: e.errno)
      }
      var found: Int32?
      for c in completions[..<n] {
        if c.userData == tag { found = c.result } else { noteWriteCompleted(c) }
      }
      if tag == nil || found != nil { return found }
    }
  }

  private func perform(_ request: IORequest) throws -> Int {
    guard let engine else { preconditionFailure("FileStorage used after close") }
    var request = request
    request.userData = Self.syncTag
    let r: Int32
    do {
      let accepted = try withUnsafePointer(to: &request) { try engine.submit(UnsafeBufferPointer(start: $0, count: 1)) }
      if accepted == 0 {
        try reapOne(waitingFor: nil)  // the queue is full of writes: make room
        return try perform(request)
      }
    } catch let e as SystemError {
      throw StrataError.system(e.call, path, errno: e.errno)
    }
    guard let result = try reapOne(waitingFor: Self.syncTag) else { preconditionFailure("lost a completion") }
    r = result
    if r < 0 {
      let call = request.opcode == .read ? "read" : request.opcode == .write ? "write" : "fdatasync"
      throw StrataError.system(call, path, errno: -r)
    }
    return Int(r)
  }

  public func sync() throws {
    try completeWrites()  // fdatasync covers completed writes only
    _ = try perform(.fsync(userData: 2))
  }

  /// pwrite and fdatasync on the descriptor itself, not through the engine (whose ring belongs
  /// to the thread holding the image lock). Buffers are page aligned, as O_DIRECT wants.
  public var anyThreadIO: AnyThreadIO? {
    precondition(fd >= 0, "FileStorage used after close")
    let (fd, path) = (fd, path)
    return AnyThreadIO(
      write: { bytes, offset in
        var done = 0
        while done < bytes.count {
          let n = Self.retrying {
            pwrite(fd, bytes.baseAddress! + done, bytes.count - done, off_t(offset) + off_t(done))
          }
          guard n > 0 else { throw StrataError.system("pwrite", path, errno: n < 0 ? Glibc.errno : EIO) }
          done += n
        }
      },
      sync: {
        if Self.retrying({ fdatasync(fd) }) != 0 { throw StrataError.system("fdatasync", path, errno: Glibc.errno) }
      },
      read: { buffer, offset in
        var done = 0
        while done < buffer.count {
          let n = Self.retrying {
            pread(fd, buffer.baseAddress! + done, buffer.count - done, off_t(offset) + off_t(done))
          }
          guard n > 0 else {
            if n == 0 {
              throw StrataError(.corrupt, "image file is truncated: byte \(offset + UInt64(done)) lies past its end")
            }
            throw StrataError.system("pread", path, errno: Glibc.errno)
          }
          done += n
        }
      })
  }

  public func size() throws -> UInt64 {
    var st = stat()
    if fstat(fd, &st) != 0 { throw StrataError.system("fstat", path, errno: Glibc.errno) }
    return UInt64(st.st_size)
  }

  /// Bytes actually allocated on disk (st_blocks), what `du` shows.
  public func allocatedSize() throws -> UInt64 {
    var st = stat()
    if fstat(fd, &st) != 0 { throw StrataError.system("fstat", path, errno: Glibc.errno) }
    return UInt64(st.st_blocks) * 512
  }

  /// fallocate: appending O_DIRECT writes that extend a file are serialized by the file system
  /// (io_uring hands them to worker threads); writes into allocated space are not.
  public func preallocate(at offset: UInt64, length: UInt64) throws {
    if Self.retrying({ strata_fallocate(fd, off_t(offset), off_t(length)) }) != 0 {
      let e = Glibc.errno
      if e == EOPNOTSUPP || e == ENOSYS { return }  // a file system without fallocate: plain appends
      throw StrataError.system("fallocate", path, errno: e)
    }
  }

  public func punchHole(at offset: UInt64, length: UInt64) throws {
    if Self.retrying({ strata_punch_hole(fd, off_t(offset), off_t(length)) }) != 0 {
      let e = Glibc.errno
      if e == EOPNOTSUPP || e == ENOSYS { return }  // the space stays allocated; the log reuses it
      throw StrataError.system("fallocate(PUNCH_HOLE)", path, errno: e)
    }
  }

  public func setSize(_ size: UInt64) throws {
    if Self.retrying({ ftruncate(fd, off_t(size)) }) != 0 {
      throw StrataError.system("ftruncate", path, errno: Glibc.errno)
    }
  }

  public func close() throws {
    precondition(fd >= 0, "FileStorage closed twice")
    let pending = Result { try completeWrites() }
    engine?.close()
    engine = nil
    if completionEvent >= 0 { Glibc.close(completionEvent) }
    completionEvent = -1
    // io_uring tears a ring down asynchronously and may hold the registered file (and with it
    // the flock) a little longer than the ring: release the lock explicitly.
    _ = flock(fd, LOCK_UN)
    let result = Glibc.close(fd)
    fd = -1
    try pending.get()
    if result != 0 { throw StrataError.system("close", path, errno: Glibc.errno) }
  }

  private static func retrying<T: BinaryInteger>(_ call: () -> T) -> T {
    while true {
      let r = call()
      if r >= 0 || Glibc.errno != EINTR { return r }
    }
  }
}

/// Settings read from the environment, so that a whole test suite can run on each engine
/// (`STRATA_AIO=io_uring|native|threads`).
enum StrataEnvironment {
  static var engine: IOEngineKind? {
    guard let raw = getenv("STRATA_AIO") else { return nil }
    return IOEngineKind(rawValue: String(cString: raw))
  }
}
