#if canImport(Glibc)
  import Glibc
#endif

/// Group commit across the threads that share an image: one fdatasync makes durable what every
/// waiting thread appended.
///
/// The first thread that needs a durable position and finds no sync running becomes the
/// leader: under the image lock it closes the record and writes the log out, then it syncs
/// *outside* the lock, so other threads keep appending (snapshots, writes) meanwhile. Threads
/// that arrive during the sync wait for a durable position that covers theirs; if the finished
/// sync does not cover them, one of them leads the next. Lock order: the image lock is never
/// taken while this mutex is held.
final class GroupCommit: @unchecked Sendable {
  private let mutex: UnsafeMutablePointer<pthread_mutex_t>
  private let changed: UnsafeMutablePointer<pthread_cond_t>
  /// Highest seq a finished group sync made durable.
  private var durable: UInt64 = 0
  private var syncing = false

  init() {
    mutex = .allocate(capacity: 1)
    changed = .allocate(capacity: 1)
    pthread_mutex_init(mutex, nil)
    pthread_cond_init(changed, nil)
  }

  deinit {
    pthread_cond_destroy(changed)
    pthread_mutex_destroy(mutex)
    changed.deallocate()
    mutex.deallocate()
  }

  /// Returns once a sync covering `target` finished. `lead` performs one sync (called without
  /// this mutex held) and returns the seq it made durable; its error goes to the thread that
  /// led, and the waiters try again with a new leader.
  func wait(through target: UInt64, lead: () throws -> UInt64) throws {
    pthread_mutex_lock(mutex)
    defer { pthread_mutex_unlock(mutex) }
    while durable < target {
      if syncing {
        pthread_cond_wait(changed, mutex)
        continue
      }
      syncing = true
      pthread_mutex_unlock(mutex)
      let outcome = Result { try lead() }
      pthread_mutex_lock(mutex)
      syncing = false
      if case .success(let seq) = outcome { durable = max(durable, seq) }
      pthread_cond_broadcast(changed)
      _ = try outcome.get()
    }
  }
}

extension StrataImage {
  /// The last operation appended so far.
  var appendedSeq: UInt64 { (writer?.nextSeq ?? recoveredEnd.nextSeq) - 1 }

  /// One group sync, led by the calling thread (see `GroupCommit`); returns the durable seq.
  static func leadGroupSync(_ shared: SharedImage, target: UInt64) throws -> UInt64 {
    let step = try shared.with { image -> (LogWriter, LogWriter.SyncTicket, AnyThreadIO)? in
      try image.checkOpen()
      guard let writer = image.writer, writer.durableSeq < target else { return nil }
      if try image.markTailWithoutPoint() { return nil }  // a checkpoint: flushed under the lock
      guard let io = image.storage.anyThreadIO else {
        try writer.flush()  // the storage cannot work from here: write and sync under the lock
        return nil
      }
      return (writer, try writer.beginSync(), io)
    }
    guard let (writer, ticket, io) = step else { return shared.with { $0.writer?.durableSeq ?? target } }
    let outcome = Result {
      if let copy = ticket.copy { try io.write(UnsafeRawBufferPointer(copy), ticket.offset) }
      try io.sync()
    }
    ticket.copy?.deallocate()
    writer.outside.leave(failed: (try? outcome.get()) == nil)
    return try shared.with { _ in
      writer.endSync(ticket, failed: (try? outcome.get()) == nil)
      try outcome.get()
      return writer.durableSeq
    }
  }
}

extension SharedImage {
  /// Runs `body` under the lock, then waits until everything it appended (and everything
  /// before) is durable, sharing the sync with every other thread flushing at the same time.
  /// Creating a snapshot this way costs one log operation plus a share of one fdatasync.
  public func durably<T>(_ body: (StrataImage) throws -> T) throws -> T {
    let (result, target) = try with { image in (try body(image), image.appendedSeq) }
    try waitDurable(through: target)
    return result
  }

  /// Returns once every operation up to `seq` is durable (group commit, see `durably`).
  public func waitDurable(through seq: UInt64) throws {
    try with { $0.groupCommit }.wait(through: seq) { try StrataImage.leadGroupSync(self, target: seq) }
  }

  /// The last operation appended so far: `waitDurable(through:)` it to flush.
  public var appendedSeq: UInt64 { with { $0.appendedSeq } }
}
