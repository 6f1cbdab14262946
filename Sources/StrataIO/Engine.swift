#if canImport(Glibc)
  import Glibc
#endif

/// The I/O engines, named as QEMU names its `aio=` choices.
public enum IOEngineKind: String, Sendable, CaseIterable {
  /// io_uring through liburing: registered file and buffers, batched submission, completions
  /// reaped from the shared ring without a system call when they are already there.
  case ioUring = "io_uring"
  /// Linux native AIO through libaio (asynchronous only with O_DIRECT).
  case native
  /// Plain pread/pwrite, performed synchronously in the submitting thread; the portable fallback.
  case threads
}

public enum IOOpcode: UInt8, Sendable {
  case read
  case write
  /// fdatasync: completes once every write that completed before it was submitted is durable.
  case fsync
}

/// One request. `buffer` must stay valid until its completion is reaped.
public struct IORequest {
  public var opcode: IOOpcode
  public var buffer: UnsafeMutableRawPointer?
  public var length: Int
  public var offset: UInt64
  /// Returned unchanged in the completion.
  public var userData: UInt64
  /// Index of a buffer registered at engine creation that contains `buffer`, or -1.
  public var registeredBuffer: Int16
  /// Which of the engine's files: 0 is the one it was made for, 1... its `otherFiles` (a
  /// clone's queue reads its parents' files through the same ring).
  public var file: UInt16 = 0

  public init(
    opcode: IOOpcode, buffer: UnsafeMutableRawPointer?, length: Int, offset: UInt64, userData: UInt64,
    registeredBuffer: Int16 = -1
  ) {
    self.opcode = opcode
    self.buffer = buffer
    self.length = length
    self.offset = offset
    self.userData = userData
    self.registeredBuffer = registeredBuffer
  }

  public static func fsync(userData: UInt64) -> IORequest {
    IORequest(opcode: .fsync, buffer: nil, length: 0, offset: 0, userData: userData)
  }
}

/// A finished request: `result` is the byte count (reads may be short at the end of the file)
/// or a negated errno.
public struct IOCompletion: Sendable, Equatable {
  public var userData: UInt64
  public var result: Int32

  public init(userData: UInt64, result: Int32) {
    self.userData = userData
    self.result = result
  }
}

/// An asynchronous I/O engine bound to one open file. One engine serves one thread: it has no
/// locks, and `submit`/`reap` allocate nothing.
///
/// Contract: at most `depth` requests are in flight; `submit` accepts as many as fit and returns
/// the count but may only queue them until `flushSubmissions` or `reap` (batching); `reap`
/// waits for at least `minimum` completions (never more than are in flight) and returns how
/// many it stored. Requests complete in any order.
public protocol IOEngine: AnyObject {
  var kind: IOEngineKind { get }
  var depth: Int { get }
  var inFlight: Int { get }
  func submit(_ requests: UnsafeBufferPointer<IORequest>) throws(SystemError) -> Int
  func reap(_ completions: UnsafeMutableBufferPointer<IOCompletion>, minimum: Int) throws(SystemError) -> Int
  /// Starts requests that `submit` only queued (engines may defer them to batch system calls;
  /// `reap` always starts them first).
  func flushSubmissions() throws(SystemError)
  /// From now on, signals `eventFD` (an eventfd) when a request the kernel ran completes, so a
  /// thread can wait for completions and other file descriptors in one `poll`. Completions an
  /// engine produces during `submit` (SyncEngine, a refused AIO request) are not signalled:
  /// reap with `minimum: 0` after submitting.
  func signalCompletions(to eventFD: Int32) throws(SystemError)
  /// Cancels nothing: waits for every request in flight, then releases the engine.
  func close()
}

extension IOEngine {
  /// Submits one request and waits for it: the synchronous path (metadata, tools).
  public func perform(_ request: IORequest) throws(SystemError) -> Int32 {
    precondition(inFlight == 0, "perform needs an idle engine")
    var request = request
    let accepted = try withUnsafePointer(to: &request) { p throws(SystemError) in
      try submit(UnsafeBufferPointer(start: p, count: 1))
    }
    precondition(accepted == 1)
    var completion = IOCompletion(userData: 0, result: 0)
    let n = try withUnsafeMutablePointer(to: &completion) { p throws(SystemError) in
      try reap(UnsafeMutableBufferPointer(start: p, count: 1), minimum: 1)
    }
    precondition(n == 1 && completion.userData == request.userData)
    return completion.result
  }
}

/// A failed system call: its name and errno. Errnos that can only mean a bug trip a
/// precondition at the call site instead of reaching here.
public struct SystemError: Error, CustomStringConvertible, Sendable, Equatable {
  public var call: String
  public var errno: Int32

  public init(_ call: String, errno: Int32) {
    self.call = call
    self.errno = errno
  }

  public var description: String { "\(call): \(String(cString: strerror(errno)))" }
}

/// Which engine runs and why, for the log line users need when performance surprises them.
public struct EngineChoice {
  public var engine: any IOEngine
  public var reason: String
}

public enum IOEngines {
  /// Opens the best available engine for `fd`: io_uring unless the kernel refuses it, then
  /// native AIO, then synchronous I/O. `requested` forces one (and fails if it is unavailable).
  public static func make(
    fd: Int32, otherFiles: [Int32] = [], depth: Int, requested: IOEngineKind? = nil,
    registeredBuffers: [UnsafeMutableRawBufferPointer] = [], sqpoll: Bool = false, singleThread: Bool = false
  ) throws(SystemError) -> EngineChoice {
    if let requested {
      let engine: any IOEngine =
        switch requested {
        case .ioUring:
          try URingEngine(
            fd: fd, otherFiles: otherFiles, depth: depth, registeredBuffers: registeredBuffers, sqpoll: sqpoll,
            singleThread: singleThread)
        case .native: try AIOEngine(fd: fd, otherFiles: otherFiles, depth: depth)
        case .threads: SyncEngine(fd: fd, otherFiles: otherFiles, depth: depth)
        }
      return EngineChoice(engine: engine, reason: "requested")
    }
    var reasons: [String] = []
    do {
      let e = try URingEngine(
        fd: fd, otherFiles: otherFiles, depth: depth, registeredBuffers: registeredBuffers, sqpoll: sqpoll,
        singleThread: singleThread)
      return EngineChoice(engine: e, reason: "io_uring is available")
    } catch {
      reasons.append("io_uring unavailable (\(error))")
    }
    do {
      let e = try AIOEngine(fd: fd, otherFiles: otherFiles, depth: depth)
      return EngineChoice(engine: e, reason: reasons.joined(separator: "; "))
    } catch {
      reasons.append("native AIO unavailable (\(error))")
    }
    return EngineChoice(
      engine: SyncEngine(fd: fd, otherFiles: otherFiles, depth: depth), reason: reasons.joined(separator: "; "))
  }
}
