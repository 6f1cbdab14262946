#if canImport(Glibc)
  import Glibc
#endif

/// Runs `body(0)` … `body(count − 1)` on `count` threads and waits for all of them: how
/// benchmarks and tests drive a `SharedImage` from several threads (a server's workers do
/// the same with their own threads).
public func runThreads(_ count: Int, _ body: @escaping @Sendable (Int) -> Void) {
  final class Job: @unchecked Sendable {
    let body: @Sendable (Int) -> Void
    let index: Int
    init(_ body: @escaping @Sendable (Int) -> Void, _ index: Int) {
      self.body = body
      self.index = index
    }
  }
  let threads = (0..<count).map { i -> pthread_t in
    var t = pthread_t()
    let job = Unmanaged.passRetained(Job(body, i)).toOpaque()
    let r = pthread_create(
      &t, nil,
      { arg in
        guard let arg else { preconditionFailure("thread started without its job") }
        let job = Unmanaged<Job>.fromOpaque(arg).takeRetainedValue()
        job.body(job.index)
        return nil
      }, job)
    precondition(r == 0, "pthread_create failed: \(r)")
    return t
  }
  for t in threads { pthread_join(t, nil) }
}
