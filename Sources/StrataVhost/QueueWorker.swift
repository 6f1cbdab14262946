import CStrataLinux
import Logging
import StrataCore
import VhostProtocol

#if canImport(Glibc)
  import Glibc
#endif

/// One thread per virtqueue: waits for kicks and read completions, runs every available chain,
/// signals the call eventfd once per batch (when the guest asked for it). Reads go through the
/// worker's own `ImageQueue` (its own io_uring), so many are in flight and none holds the image
/// lock during its I/O; writes, flushes and discards run at once under the lock. Stopped
/// through its own eventfd, after every request in flight has completed.
final class QueueWorker: @unchecked Sendable {
  let index: Int
  let queue: DeviceQueue
  let memory: GuestMemory
  let handler: BlockHandler
  let kickFd: Int32
  let callFd: Int32
  let logger: Logger
  /// Signalled by the image queue's engine when reads complete.
  private let completionFd: Int32
  private var thread: WorkerThread?
  /// Requests completed, reads in flight and whether the ring is broken: written by the
  /// worker, read by the control socket.
  private let counters = UnsafeMutablePointer<UInt64>.allocate(capacity: 3)
  var completed: UInt64 { strata_load_acquire_u64(counters) }
  var readsInFlight: UInt64 { strata_load_acquire_u64(counters + 1) }
  private var completedCount: UInt64 = 0 {
    didSet { strata_store_release_u64(counters, completedCount) }
  }
  private var readCount: UInt64 = 0 {
    didSet { strata_store_release_u64(counters + 1, readCount) }
  }
  /// Chains finished but not yet returned to the guest (see `publishBatch`).
  private var done: [(head: UInt16, written: UInt32)] = []
  /// Reads in flight, by head: where their status byte goes and how many data bytes they carry.
  private var pendingStatus: [UnsafeMutableRawPointer?]
  private var pendingBytes: [Int]
  /// Set when the guest broke the ring; the queue stops until it is reset.
  private(set) var broken = false {
    didSet { strata_store_release_u64(counters + 2, broken ? 1 : 0) }
  }
  var isBroken: Bool { strata_load_acquire_u64(counters + 2) != 0 }

  init(
    index: Int, queue: DeviceQueue, memory: GuestMemory, handler: BlockHandler, kickFd: Int32, callFd: Int32,
    logger: Logger
  ) {
    self.index = index
    self.queue = queue
    self.memory = memory
    self.handler = handler
    self.kickFd = kickFd
    self.callFd = callFd
    self.logger = logger
    counters.initialize(repeating: 0, count: 3)
    completionFd = strata_eventfd(0, 0)
    pendingStatus = Array(repeating: nil, count: queue.size)
    pendingBytes = Array(repeating: 0, count: queue.size)
    done.reserveCapacity(queue.size)
  }

  deinit {
    close(completionFd)
    counters.deallocate()
  }

  func start() {
    let t = WorkerThread { [self] stopFd in run(stopFd) }
    thread = t
    t.start()
  }

  /// Stops the thread and waits for it; requests in flight complete first.
  func stop() {
    thread?.stop()
    thread = nil
  }

  private func run(_ stopFd: Int32) {
    // Created here: the queue's io_uring then belongs to this thread alone (SINGLE_ISSUER).
    var reads: ImageQueue?
    do {
      reads = try ImageQueue(
        shared: handler.image, depth: min(queue.size, 1024), ownerThreadOnly: true, completionEventFD: completionFd)
    } catch {
      logger.error("queue \(index): no I/O queue (\(error)); reads run synchronously")
    }
    var completions = [QueueCompletion](repeating: QueueCompletion(tag: 0, error: nil), count: reads?.depth ?? 1)
    var fds = [
      pollfd(fd: kickFd, events: Int16(POLLIN), revents: 0), pollfd(fd: stopFd, events: Int16(POLLIN), revents: 0),
      pollfd(fd: completionFd, events: Int16(POLLIN), revents: 0),
    ]
    var segments: [GuestSegment] = []
    segments.reserveCapacity(queue.maxSegments)
    // Requests may be waiting from before a restart or before the kick fd was set.
    process(&segments, reads, &completions)
    while true {
      let r = poll(&fds, 3, -1)
      if r < 0 {
        if errno == EINTR { continue }
        logger.error("queue \(index): poll failed: \(String(cString: strerror(errno)))")
        break
      }
      if fds[1].revents != 0 { break }
      var value: UInt64 = 0
      if fds[0].revents != 0 { _ = read(kickFd, &value, 8) }
      if fds[2].revents != 0 { _ = read(completionFd, &value, 8) }
      process(&segments, reads, &completions)
    }
    if let reads {
      while reads.inFlight > 0 { complete(reads, &completions, wait: true) }
      publishBatch()
      notify(force: true)
      reads.close()
    }
  }

  private func process(_ segments: inout [GuestSegment], _ reads: ImageQueue?, _ completions: inout [QueueCompletion]) {
    var forceNotify = false
    if !broken {
      let hasRoom = { reads.map { $0.inFlight < $0.depth } ?? true }
      // Chains the previous back-end popped and never returned go first, oldest pop first;
      // they are still marked in flight (with their counters) until their used entries go out.
      let pending = queue.resubmissionsPending
      if pending > 0 {
        logger.info("queue \(index): resubmitting \(pending) request(s) in flight before the restart")
      }
      while !broken, hasRoom(), let (head, walked) = queue.nextResubmission(memory: memory, into: &segments) {
        execute(head, walked, &segments, reads)
      }
      if queue.takeResumed() { forceNotify = true }
      do {
        while !broken, queue.resubmissionsPending == 0, hasRoom(),
          let (head, walked) = try queue.next(into: &segments, memory: memory)
        {
          execute(head, walked, &segments, reads)
        }
      } catch {
        broken = true
        logger.error("queue \(index): the guest broke the ring (\(error)); the queue is stopped until it is reset")
      }
    }
    if let reads { complete(reads, &completions, wait: false) }
    publishBatch()
    notify(force: forceNotify)
  }

  /// Runs one chain (walked into `segments`, unless `walked` says why it could not be); its used
  /// entry waits in `done` (or the read's completion) until published.
  private func execute(_ head: UInt16, _ walked: ChainError?, _ segments: inout [GuestSegment], _ reads: ImageQueue?) {
    guard pendingStatus[Int(head)] == nil else {
      // The driver made a chain available again while its read is in flight: two completions
      // would name one head. Nothing of it is touched; the queue stops as for a broken ring.
      broken = true
      logger.error(
        "queue \(index): the guest reused head \(head) while its request was in flight; the queue is stopped until it is reset"
      )
      return
    }
    if let walked {
      // The chain cannot be trusted: complete it without touching it, as an error.
      logger.warning("queue \(index): bad descriptor chain at head \(head): \(walked); request failed")
      done.append((head, 0))
      return
    }
    switch handler.handle(segments, head: head, queue: reads) {
    case .done(let written):
      done.append((head, written))
      completedCount += 1
    case .reading(let status, let dataBytes):
      pendingStatus[Int(head)] = status
      pendingBytes[Int(head)] = dataBytes
      readCount += 1
    case .noStatus:
      logger.warning("queue \(index): request without a status byte at head \(head)")
      done.append((head, 0))
    }
  }

  /// Takes the reads that finished (waiting for at least one when `wait`) into `done`.
  private func complete(_ reads: ImageQueue, _ completions: inout [QueueCompletion], wait: Bool) {
    while true {
      let n: Int
      do {
        n = try completions.withUnsafeMutableBufferPointer { try reads.reap($0, minimum: wait ? 1 : 0) }
      } catch {
        // The engine itself failed; what is in flight stays so and is reaped on the next try.
        logger.error("queue \(index): reaping reads failed: \(error)")
        return
      }
      for c in completions[..<n] {
        let head = Int(c.tag)
        guard let status = pendingStatus[head] else { preconditionFailure("completion for head \(head) not in flight") }
        if let e = c.error { logger.warning("queue \(index): read failed: \(e)") }
        done.append(
          (UInt16(head), BlockHandler.complete(status: status, dataBytes: pendingBytes[head], ok: c.error == nil)))
        pendingStatus[head] = nil
        completedCount += 1
        readCount -= 1
      }
      if n < completions.count { return }
    }
  }

  /// Completes the batch: first the log the batch appended goes to the file (no sync), so an
  /// acknowledged write survives the server being killed (not a power loss: that is what FLUSH
  /// is for); then the used entries are published.
  private func publishBatch() {
    guard !done.isEmpty else { return }
    if handler.takeAppended() {
      do {
        try handler.image.writeOutLog()
      } catch {
        // The data stays in the log buffer and the next flush retries it (or reports IOERR).
        logger.error("queue \(index): writing the log out failed: \(error)")
      }
    }
    for (head, written) in done { queue.pushUsed(head: head, written: written) }
    done.removeAll(keepingCapacity: true)
  }

  private func notify(force: Bool) {
    if queue.shouldNotify() || force {
      var one: UInt64 = 1
      _ = write(callFd, &one, 8)
    }
  }
}

/// The virtqueue a worker drives: a split ring, or a packed ring (VIRTIO_F_RING_PACKED).
enum DeviceQueue {
  case split(SplitQueue)
  case packed(PackedQueue)

  var size: Int {
    switch self {
    case .split(let q): q.size
    case .packed(let q): q.size
    }
  }

  var maxSegments: Int {
    switch self {
    case .split(let q): q.maxSegments
    case .packed(let q): q.maxSegments
    }
  }

  /// INFLIGHT_SHMFD tracking, if the ring has it.
  private var inflight: (any InflightResumption)? {
    switch self {
    case .split(let q): q.inflight
    case .packed(let q): q.inflight
    }
  }

  /// INFLIGHT_SHMFD: chains the previous back-end left in flight, still to run.
  var resubmissionsPending: Int { inflight?.resubmissionsLeft ?? 0 }

  /// The next chain to resubmit: its head (split) or buffer id (packed) and, when it cannot be
  /// walked, why. The chain stays in flight until its used entry is published.
  func nextResubmission(memory: GuestMemory, into segments: inout [GuestSegment]) -> (UInt16, ChainError?)? {
    switch self {
    case .split(let q):
      guard let inflight = q.inflight, !inflight.resubmit.isEmpty else { return nil }
      let head = inflight.resubmit.removeFirst()
      return (head, Self.walkError { () throws(ChainError) in try q.walk(head: head, memory: memory, into: &segments) })
    case .packed(let q):
      guard let inflight = q.inflight, !inflight.resubmit.isEmpty else { return nil }
      let r = inflight.resubmit.removeFirst()
      return (
        r.id, Self.walkError { () throws(ChainError) in try q.walk(r.descriptors, memory: memory, into: &segments) }
      )
    }
  }

  /// Why a chain could not be walked, or nil.
  private static func walkError(_ walk: () throws(ChainError) -> Void) -> ChainError? {
    do throws(ChainError) {
      try walk()
      return nil
    } catch {
      return error
    }
  }

  /// Whether the ring resumed an initialized inflight region since the last call (the worker
  /// then signals once: see `InflightRing.resumed`).
  func takeResumed() -> Bool {
    guard let inflight, inflight.resumed else { return false }
    inflight.resumed = false
    return true
  }

  /// Where the ring resumes (GET_VRING_BASE): the next available index (packed: with its wrap
  /// counter, and the used position, as `PackedQueue.base`).
  var base: UInt32 {
    switch self {
    case .split(let q): UInt32(q.lastAvail)
    case .packed(let q): q.base
    }
  }

  /// The next available chain: its head (the id its used entry carries) and, when the chain
  /// itself is bad but the ring is not, why it could not be walked. Throws when the ring is broken.
  func next(into segments: inout [GuestSegment], memory: GuestMemory) throws(ChainError) -> (UInt16, ChainError?)? {
    switch self {
    case .split(let q):
      guard let head = try q.popAvailable() else { return nil }
      return (head, Self.walkError { () throws(ChainError) in try q.walk(head: head, memory: memory, into: &segments) })
    case .packed(let q):
      guard let id = try q.next(into: &segments, memory: memory) else { return nil }
      return (id, nil)
    }
  }

  func pushUsed(head: UInt16, written: UInt32) {
    switch self {
    case .split(let q): q.pushUsed(head: head, written: written)
    case .packed(let q): q.pushUsed(head: head, written: written)
    }
  }

  func shouldNotify() -> Bool {
    switch self {
    case .split(let q): q.shouldNotify()
    case .packed(let q): q.shouldNotify()
    }
  }
}
