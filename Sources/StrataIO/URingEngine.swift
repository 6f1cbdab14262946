import CStrataLinux
import CURing

#if canImport(Glibc)
  import Glibc
#endif

/// io_uring through liburing. The files are registered (the engine's own at index 0, then
/// `otherFiles`), so the kernel skips the file table lookup on every request; buffers given at creation are registered too, so reads and
/// writes into them skip page pinning. Completions already in the ring are taken without a
/// system call.
public final class URingEngine: IOEngine {
  public let kind = IOEngineKind.ioUring
  public let depth: Int
  public private(set) var inFlight = 0
  /// Requests prepared in the submission queue but not yet handed to the kernel.
  private var unsubmitted = 0
  private let ring: UnsafeMutablePointer<io_uring>
  private let cqes: UnsafeMutablePointer<UnsafeMutablePointer<io_uring_cqe>?>
  private var closed = false
  /// SINGLE_ISSUER + DEFER_TASKRUN: completions reach the ring only when this thread enters
  /// the kernel. The kernel signals a registered eventfd only for the first completion waiting
  /// so, and marks IORING_SQ_TASKRUN while any wait: a reap that does not wait must fetch them,
  /// or the eventfd stays silent for good.
  private var deferredCompletions = false
  /// Registered files (`IORequest.file` indexes them).
  private let fileCount: Int

  /// `singleThread`: the creating thread is the only one that will ever submit or reap, which
  /// lets the kernel deliver completions when that thread enters it instead of interrupting it
  /// (SINGLE_ISSUER + DEFER_TASKRUN, Linux 6.1+). Any other thread's submission then fails.
  public init(
    fd: Int32, otherFiles: [Int32] = [], depth: Int, registeredBuffers: [UnsafeMutableRawBufferPointer] = [],
    sqpoll: Bool = false, singleThread: Bool = false
  ) throws(SystemError) {
    precondition(depth >= 1 && depth <= 4096)
    self.depth = depth
    fileCount = 1 + otherFiles.count
    ring = .allocate(capacity: 1)
    cqes = .allocate(capacity: depth)
    var params = io_uring_params()
    if sqpoll {
      params.flags |= UInt32(IORING_SETUP_SQPOLL)
      params.sq_thread_idle = 1000
    } else if singleThread {
      // TASKRUN_FLAG: the kernel flags completions waiting for this thread (see `reap`).
      params.flags |=
        UInt32(IORING_SETUP_SINGLE_ISSUER) | UInt32(IORING_SETUP_DEFER_TASKRUN) | UInt32(IORING_SETUP_TASKRUN_FLAG)
    }
    var r = io_uring_queue_init_params(UInt32(depth), ring, &params)
    if r == -EINVAL && singleThread {
      params = io_uring_params()  // an older kernel: plain setup
      r = io_uring_queue_init_params(UInt32(depth), ring, &params)
    }
    deferredCompletions = params.flags & UInt32(IORING_SETUP_DEFER_TASKRUN) != 0
    // From here on deinit runs even when init throws: mark the engine closed so it only frees.
    guard r == 0 else {
      closed = true
      throw SystemError("io_uring_queue_init", errno: -r)
    }
    var fds = [fd] + otherFiles
    let rf = io_uring_register_files(ring, &fds, UInt32(fds.count))
    if rf != 0 {
      io_uring_queue_exit(ring)
      closed = true
      throw SystemError("io_uring_register_files", errno: -rf)
    }
    if !registeredBuffers.isEmpty {
      var iovecs = registeredBuffers.map { iovec(iov_base: $0.baseAddress, iov_len: $0.count) }
      let rb = io_uring_register_buffers(ring, &iovecs, UInt32(iovecs.count))
      if rb != 0 {
        io_uring_queue_exit(ring)
        closed = true
        throw SystemError("io_uring_register_buffers", errno: -rb)
      }
    }
  }

  deinit {
    precondition(closed, "URingEngine was never closed")
    ring.deallocate()
    cqes.deallocate()
  }

  public func submit(_ requests: UnsafeBufferPointer<IORequest>) throws(SystemError) -> Int {
    var queued = 0
    for request in requests {
      guard inFlight + queued < depth, let sqe = io_uring_get_sqe(ring) else { break }
      precondition(Int(request.file) < fileCount, "request for file \(request.file) of \(fileCount)")
      let file = Int32(request.file)
      switch request.opcode {
      case .read where request.registeredBuffer >= 0:
        io_uring_prep_read_fixed(
          sqe, file, request.buffer, UInt32(request.length), request.offset, Int32(request.registeredBuffer))
      case .read:
        io_uring_prep_read(sqe, file, request.buffer, UInt32(request.length), request.offset)
      case .write where request.registeredBuffer >= 0:
        io_uring_prep_write_fixed(
          sqe, file, request.buffer, UInt32(request.length), request.offset, Int32(request.registeredBuffer))
      case .write:
        io_uring_prep_write(sqe, file, request.buffer, UInt32(request.length), request.offset)
      case .fsync:
        io_uring_prep_fsync(sqe, file, UInt32(IORING_FSYNC_DATASYNC))
      }
      sqe.pointee.flags |= UInt8(1 << IOSQE_FIXED_FILE_BIT)
      sqe.pointee.user_data = request.userData
      queued += 1
    }
    inFlight += queued
    unsubmitted += queued
    return queued
  }

  /// Hands queued requests to the kernel. `reap` does it too, in the same system call as the
  /// wait, so a burst of submissions costs one `io_uring_enter`.
  public func flushSubmissions() throws(SystemError) {
    guard unsubmitted > 0 else { return }
    var submitted: Int32
    repeat { submitted = io_uring_submit(ring) } while submitted == -EINTR
    guard submitted >= 0 else { throw SystemError("io_uring_submit", errno: -submitted) }
    unsubmitted = 0
  }

  public func reap(_ completions: UnsafeMutableBufferPointer<IOCompletion>, minimum: Int) throws(SystemError) -> Int {
    precondition(minimum <= inFlight && minimum <= completions.count)
    let want = min(completions.count, depth)
    var n = Int(io_uring_peek_batch_cqe(ring, cqes, UInt32(want)))
    if n < want && n < inFlight && unsubmitted == 0 && deferredCompletions
      && strata_load_acquire_u32(ring.pointee.sq.kflags) & UInt32(IORING_SQ_TASKRUN) != 0
    {
      var r: Int32
      repeat { r = io_uring_get_events(ring) } while r == -EINTR
      guard r >= 0 else { throw SystemError("io_uring_get_events", errno: -r) }
      n = Int(io_uring_peek_batch_cqe(ring, cqes, UInt32(want)))
    }
    if unsubmitted > 0 || n < minimum {
      // The kernel counts completions already in the ring towards the wait, so wait for
      // `minimum` itself, again until enough arrived.
      repeat {
        var r: Int32
        repeat { r = io_uring_submit_and_wait(ring, UInt32(n < minimum ? minimum : 0)) } while r == -EINTR
        guard r >= 0 else { throw SystemError("io_uring_submit_and_wait", errno: -r) }
        unsubmitted = 0
        n = Int(io_uring_peek_batch_cqe(ring, cqes, UInt32(want)))
      } while n < minimum
    }
    for i in 0..<n {
      let cqe = cqes[i]!.pointee
      completions[i] = IOCompletion(userData: cqe.user_data, result: cqe.res)
    }
    io_uring_cq_advance(ring, UInt32(n))
    inFlight -= n
    return n
  }

  public func signalCompletions(to eventFD: Int32) throws(SystemError) {
    let r = io_uring_register_eventfd(ring, eventFD)
    guard r == 0 else { throw SystemError("io_uring_register_eventfd", errno: -r) }
  }

  public func close() {
    precondition(!closed)
    drain(self)
    _ = io_uring_unregister_files(ring)
    io_uring_queue_exit(ring)
    closed = true
  }
}

/// Waits for every request in flight (close must not free memory the kernel still writes).
func drain(_ engine: some IOEngine) {
  var scratch = [IOCompletion](repeating: IOCompletion(userData: 0, result: 0), count: max(engine.inFlight, 1))
  while engine.inFlight > 0 {
    let want = engine.inFlight
    _ = scratch.withUnsafeMutableBufferPointer { try? engine.reap($0, minimum: min(want, $0.count)) }
  }
}
