import StrataCore

/// A loop on a thread of its own, from `start` until `stop` (the periodic jobs of
/// `strata serve`: snapshots, cleaning). Subclasses implement `run`, which returns once
/// `stopFd` becomes readable.
public class BackgroundWorker: @unchecked Sendable {
  private var thread: WorkerThread?

  public func start() {
    let t = WorkerThread { [self] stopFd in run(stopFd) }
    thread = t
    t.start()
  }

  public func stop() {
    thread?.stop()
    thread = nil
  }

  func run(_ stopFd: Int32) { preconditionFailure("\(type(of: self)) does not implement run") }
}
