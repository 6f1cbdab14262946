import CAIO

#if canImport(Glibc)
  import Glibc
#endif

/// Linux native AIO through libaio. Asynchronous only for files opened with O_DIRECT (the
/// kernel runs buffered AIO synchronously). Linux AIO has no usable fdatasync on common file
/// systems, so FSYNC runs synchronously at submission, after the caller's writes completed,
/// which is the ordering the engine contract promises anyway.
public final class AIOEngine: IOEngine {
  public let kind = IOEngineKind.native
  public let depth: Int
  public private(set) var inFlight = 0
  /// The file it was made for, then `otherFiles` (`IORequest.file` indexes them).
  private let files: [Int32]
  private var context: io_context_t?
  private let iocbs: UnsafeMutablePointer<iocb>
  private let batch: UnsafeMutablePointer<UnsafeMutablePointer<iocb>?>
  private let events: UnsafeMutablePointer<io_event>
  private let userData: UnsafeMutablePointer<UInt64>
  private var freeSlots: [Int]
  /// Completions produced at submission (FSYNC), handed out by the next reap.
  private var ready: CompletionQueue
  private var closed = false
  private var eventFD: Int32 = -1

  public init(fd: Int32, otherFiles: [Int32] = [], depth: Int) throws(SystemError) {
    precondition(depth >= 1 && depth <= 4096)
    files = [fd] + otherFiles
    self.depth = depth
    var ctx: io_context_t?
    let r = io_setup(Int32(depth), &ctx)
    guard r == 0 else { throw SystemError("io_setup", errno: -r) }
    context = ctx
    iocbs = .allocate(capacity: depth)
    iocbs.initialize(repeating: iocb(), count: depth)
    batch = .allocate(capacity: depth)
    events = .allocate(capacity: depth)
    userData = .allocate(capacity: depth)
    freeSlots = Array((0..<depth).reversed())
    ready = CompletionQueue(capacity: depth)
  }

  deinit {
    precondition(closed, "AIOEngine was never closed")
    iocbs.deallocate()
    batch.deallocate()
    events.deallocate()
    userData.deallocate()
  }

  public func submit(_ requests: UnsafeBufferPointer<IORequest>) throws(SystemError) -> Int {
    var accepted = 0
    var queued = 0
    for request in requests {
      guard inFlight + queued < depth else { break }
      precondition(Int(request.file) < files.count, "request for file \(request.file) of \(files.count)")
      let fd = files[Int(request.file)]
      if request.opcode == .fsync {
        try flushBatch(&queued)
        let r = fdatasync(fd)
        ready.push(IOCompletion(userData: request.userData, result: r == 0 ? 0 : -errno))
        inFlight += 1
        accepted += 1
        continue
      }
      let slot = freeSlots.removeLast()
      let cb = iocbs + slot
      if request.opcode == .read {
        io_prep_pread(cb, fd, request.buffer, request.length, Int64(request.offset))
      } else {
        io_prep_pwrite(cb, fd, request.buffer, request.length, Int64(request.offset))
      }
      if eventFD >= 0 { io_set_eventfd(cb, eventFD) }
      userData[slot] = request.userData
      batch[queued] = cb
      queued += 1
      accepted += 1
    }
    try flushBatch(&queued)
    return accepted
  }

  private func flushBatch(_ queued: inout Int) throws(SystemError) {
    var done = 0
    while done < queued {
      let r = io_submit(context, queued - done, batch + done)
      if r == -EINTR || r == -EAGAIN { continue }
      if r <= 0 {
        // The kernel refused batch[done] (the ones before it are in flight): complete it with
        // the error, as io_uring would, so the caller learns which request failed.
        let slot = batch[done]! - iocbs
        ready.push(IOCompletion(userData: userData[slot], result: r < 0 ? Int32(r) : -EIO))
        freeSlots.append(slot)
        inFlight += 1
        done += 1
        continue
      }
      done += Int(r)
      inFlight += Int(r)
    }
    queued = 0
  }

  public func reap(_ completions: UnsafeMutableBufferPointer<IOCompletion>, minimum: Int) throws(SystemError) -> Int {
    precondition(minimum <= inFlight && minimum <= completions.count)
    var n = 0
    while n < completions.count, let c = ready.pop() {
      completions[n] = c
      n += 1
      inFlight -= 1
    }
    let kernelInFlight = inFlight - ready.count
    guard kernelInFlight > 0, n < completions.count else { return n }
    let want = min(completions.count - n, kernelInFlight)
    let atLeast = max(0, min(minimum - n, want))
    var got: Int32
    repeat { got = io_getevents(context, atLeast, want, events, nil) } while got == -EINTR
    guard got >= 0 else { throw SystemError("io_getevents", errno: -got) }
    for i in 0..<Int(got) {
      let event = events[i]
      let slot = event.obj - iocbs
      let result = Int64(bitPattern: UInt64(event.res))
      completions[n] = IOCompletion(userData: userData[slot], result: Int32(truncatingIfNeeded: result))
      freeSlots.append(slot)
      n += 1
    }
    inFlight -= Int(got)
    return n
  }

  public func flushSubmissions() throws(SystemError) {}

  public func signalCompletions(to eventFD: Int32) throws(SystemError) {
    precondition(eventFD >= 0)
    self.eventFD = eventFD
  }

  public func close() {
    precondition(!closed)
    drain(self)
    io_destroy(context)
    closed = true
  }
}

/// A fixed-capacity FIFO of completions, allocated once.
struct CompletionQueue {
  private var slots: [IOCompletion]
  private var head = 0
  private(set) var count = 0

  init(capacity: Int) {
    slots = Array(repeating: IOCompletion(userData: 0, result: 0), count: capacity)
  }

  mutating func push(_ c: IOCompletion) {
    precondition(count < slots.count, "completion queue overflow")
    slots[(head + count) % slots.count] = c
    count += 1
  }

  mutating func pop() -> IOCompletion? {
    guard count > 0 else { return nil }
    let c = slots[head]
    head = (head + 1) % slots.count
    count -= 1
    return c
  }
}
