import CStrataLinux

#if canImport(Glibc)
  import Glibc
#endif

/// A thread that runs until it is told to stop: its body gets an eventfd that becomes readable
/// when `stop()` is called, to `poll` together with its own descriptors, and returns; `stop()`
/// waits for it. The servers' queue workers, control socket and timers are these.
public final class WorkerThread: @unchecked Sendable {
  private let body: (_ stopFd: Int32) -> Void
  private let stopFd = strata_eventfd(0, 0)
  private var thread: pthread_t?

  public init(_ body: @escaping (_ stopFd: Int32) -> Void) {
    precondition(stopFd >= 0, "eventfd failed")
    self.body = body
  }

  deinit {
    precondition(thread == nil, "a WorkerThread must be stopped before it goes away")
    close(stopFd)
  }

  public func start() {
    precondition(thread == nil, "started twice")
    let box = Unmanaged.passRetained(self)
    var t = pthread_t()
    let r = pthread_create(
      &t, nil,
      { arg in
        let worker = Unmanaged<WorkerThread>.fromOpaque(arg!).takeRetainedValue()
        worker.body(worker.stopFd)
        return nil
      }, box.toOpaque())
    precondition(r == 0, "pthread_create failed: \(r)")
    thread = t
  }

  /// Signals the body to return and waits for it (no-op when not running).
  public func stop() {
    guard let t = thread else { return }
    var one: UInt64 = 1
    _ = write(stopFd, &one, 8)
    pthread_join(t, nil)
    thread = nil
  }
}
