#if canImport(Glibc)
  import Glibc
#endif

/// Synchronous pread/pwrite/fdatasync, performed at submission in the calling thread; the
/// completions wait for the next reap. The portable fallback when neither io_uring nor native
/// AIO is available (QEMU runs these in a thread pool; here the queue thread is the pool).
public final class SyncEngine: IOEngine {
  public let kind = IOEngineKind.threads
  public let depth: Int
  public var inFlight: Int { ready.count }
  /// The file it was made for, then `otherFiles` (`IORequest.file` indexes them).
  private let files: [Int32]
  private var ready: CompletionQueue

  public init(fd: Int32, otherFiles: [Int32] = [], depth: Int) {
    precondition(depth >= 1)
    files = [fd] + otherFiles
    self.depth = depth
    ready = CompletionQueue(capacity: depth)
  }

  public func submit(_ requests: UnsafeBufferPointer<IORequest>) throws(SystemError) -> Int {
    var accepted = 0
    for request in requests {
      guard ready.count < depth else { break }
      ready.push(IOCompletion(userData: request.userData, result: perform(request)))
      accepted += 1
    }
    return accepted
  }

  private func perform(_ r: IORequest) -> Int32 {
    precondition(Int(r.file) < files.count, "request for file \(r.file) of \(files.count)")
    let fd = files[Int(r.file)]
    switch r.opcode {
    case .fsync:
      return fdatasync(fd) == 0 ? 0 : -errno
    case .read, .write:
      var done = 0
      while done < r.length {
        let n =
          r.opcode == .read
          ? pread(fd, r.buffer! + done, r.length - done, off_t(r.offset) + off_t(done))
          : pwrite(fd, r.buffer! + done, r.length - done, off_t(r.offset) + off_t(done))
        if n < 0 {
          if errno == EINTR { continue }
          return done > 0 ? Int32(done) : -errno
        }
        if n == 0 { break }
        done += n
      }
      return Int32(done)
    }
  }

  public func reap(_ completions: UnsafeMutableBufferPointer<IOCompletion>, minimum: Int) throws(SystemError) -> Int {
    precondition(minimum <= inFlight)
    var n = 0
    while n < completions.count, let c = ready.pop() {
      completions[n] = c
      n += 1
    }
    return n
  }

  public func flushSubmissions() throws(SystemError) {}

  /// Nothing to signal: every request completes inside `submit`.
  public func signalCompletions(to eventFD: Int32) throws(SystemError) {}

  public func close() {}
}
