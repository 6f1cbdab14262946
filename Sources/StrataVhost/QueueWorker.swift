import CStrataLinux
import Logging
import VhostProtocol

#if canImport(Glibc)
  import Glibc
#endif

/// One thread per virtqueue: waits for kicks, runs every available chain, signals the call
/// eventfd once per batch (when the guest asked for it). Stopped through its own eventfd.
final class QueueWorker: @unchecked Sendable {
  let index: Int
  let queue: SplitQueue
  let memory: GuestMemory
  let handler: BlockHandler
  let kickFd: Int32
  let callFd: Int32
  let logger: Logger
  private let stopFd: Int32
  private var thread: pthread_t?
  /// Requests completed, for the control socket and tests.
  private(set) var completed: UInt64 = 0
  /// Chains run but not yet returned to the guest (see `publishBatch`).
  private var done: [(head: UInt16, written: UInt32)] = []
  /// Set when the guest broke the ring; the queue stops until it is reset.
  private(set) var broken = false

  init(
    index: Int, queue: SplitQueue, memory: GuestMemory, handler: BlockHandler, kickFd: Int32, callFd: Int32,
    logger: Logger
  ) {
    self.index = index
    self.queue = queue
    self.memory = memory
    self.handler = handler
    self.kickFd = kickFd
    self.callFd = callFd
    self.logger = logger
    stopFd = strata_eventfd(0, 0)
  }

  deinit { close(stopFd) }

  func start() {
    let box = Unmanaged.passRetained(self)
    var t = pthread_t()
    let r = pthread_create(
      &t, nil,
      { arg in
        let worker = Unmanaged<QueueWorker>.fromOpaque(arg!).takeRetainedValue()
        worker.run()
        return nil
      }, box.toOpaque())
    precondition(r == 0, "pthread_create failed: \(r)")
    thread = t
  }

  /// Stops the thread and waits for it; the chain being processed completes first.
  func stop() {
    guard let t = thread else { return }
    var one: UInt64 = 1
    _ = write(stopFd, &one, 8)
    pthread_join(t, nil)
    thread = nil
  }

  private func run() {
    var fds = [
      pollfd(fd: kickFd, events: Int16(POLLIN), revents: 0), pollfd(fd: stopFd, events: Int16(POLLIN), revents: 0),
    ]
    var segments: [GuestSegment] = []
    segments.reserveCapacity(queue.maxSegments)
    // Requests may be waiting from before a restart or before the kick fd was set.
    process(&segments)
    while true {
      let r = poll(&fds, 2, -1)
      if r < 0 {
        if errno == EINTR { continue }
        logger.error("queue \(index): poll failed: \(String(cString: strerror(errno)))")
        return
      }
      if fds[1].revents != 0 { return }
      if fds[0].revents != 0 {
        var value: UInt64 = 0
        _ = read(kickFd, &value, 8)
        process(&segments)
      }
    }
  }

  private func process(_ segments: inout [GuestSegment]) {
    guard !broken else { return }
    var pushed = false
    var forceNotify = false
    if let inflight = queue.inflight {
      // Chains the previous back-end popped and never returned go first, oldest pop first;
      // they are still marked in flight (with their counters) until their used entries go out.
      if !inflight.resubmit.isEmpty {
        logger.info("queue \(index): resubmitting \(inflight.resubmit.count) request(s) in flight before the restart")
      }
      while !inflight.resubmit.isEmpty {
        let head = inflight.resubmit.removeFirst()
        execute(head, &segments)
        pushed = true
      }
      if inflight.resumed {
        inflight.resumed = false
        forceNotify = true
      }
    }
    do {
      while let head = try queue.popAvailable() {
        execute(head, &segments)
        pushed = true
      }
    } catch {
      broken = true
      logger.error("queue \(index): the guest broke the ring (\(error)); the queue is stopped until it is reset")
    }
    publishBatch()
    let wanted = pushed && queue.shouldNotify()
    if wanted || forceNotify {
      var one: UInt64 = 1
      _ = write(callFd, &one, 8)
    }
  }

  /// Runs one chain and returns it to the used ring.
  /// Runs one chain; its used entry waits in `done` until the batch's writes reached the file.
  private func execute(_ head: UInt16, _ segments: inout [GuestSegment]) {
    do {
      try queue.walk(head: head, memory: memory, into: &segments)
    } catch {
      // The chain cannot be trusted: complete it without touching it, as an error.
      logger.warning("queue \(index): bad descriptor chain at head \(head): \(error); request failed")
      done.append((head, 0))
      return
    }
    let written = handler.handle(segments)
    if written == nil { logger.warning("queue \(index): request without a status byte at head \(head)") }
    done.append((head, written ?? 0))
    completed += 1
  }

  /// Completes the batch: first the log the batch appended goes to the file (no sync), so an
  /// acknowledged write survives the server being killed (not a power loss: that is what FLUSH
  /// is for); then the used entries are published.
  private func publishBatch() {
    guard !done.isEmpty else { return }
    do {
      try handler.image.with { try $0.writeOutLog() }
    } catch {
      // The data stays in the log buffer and the next flush retries it (or reports IOERR).
      logger.error("queue \(index): writing the log out failed: \(error)")
    }
    for (head, written) in done { queue.pushUsed(head: head, written: written) }
    done.removeAll(keepingCapacity: true)
  }

}
