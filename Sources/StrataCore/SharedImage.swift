#if canImport(Glibc)
  import Glibc
#endif

/// An image shared by several threads (a server's queue workers, NBD connections, the control
/// socket). `StrataImage` is single-threaded (its log and map are one sequence), so each
/// request's metadata work and log append happen under this lock; data reads that go through an
/// `ImageQueue` leave it before their I/O.
public final class SharedImage: @unchecked Sendable {
  private let image: StrataImage
  private let mutex = Lock()

  public init(_ image: StrataImage) {
    self.image = image
  }

  public func with<T>(_ body: (StrataImage) throws -> T) rethrows -> T {
    try mutex.with { try body(image) }
  }

  /// The storage's write callable from any thread, fetched once under the lock (`.some(nil)`:
  /// the storage has none, and write-outs run under the lock).
  private var anyThreadIO: AnyThreadIO??

  /// `StrataImage.writeOutLog` for a thread sharing the image: the pages are taken under the
  /// lock and written outside it, and the wait for earlier write-outs holding this thread's
  /// records is outside it too, so the other threads' requests go on meanwhile (two queues
  /// each writing under the lock ran one at a time).
  public func writeOutLog() throws {
    let step = try with { image -> (LogWriter, LogWriter.WriteOut, AnyThreadIO)? in
      try image.checkOpen()
      if anyThreadIO == nil { anyThreadIO = .some(image.storage.anyThreadIO) }
      guard let writer = image.writer, let io = anyThreadIO ?? nil else { return nil }
      var writeOut = try writer.beginWriteOut()
      if !image.storage.writesInFlight(through: writeOut.storageMark) { writeOut.storageMark = 0 }
      return (writer, writeOut, io)
    }
    guard let (writer, writeOut, io) = step else { return try writeOutUnderLock() }
    var failure: (any Error)?
    if let pages = writeOut.pages {
      do { try io.write(pages.bytes, pages.offset) } catch { failure = error }
      writer.outside.endWriteOut(pages.number, failed: failure != nil)
    }
    writer.outside.waitWriteOuts(through: writeOut.through)
    if let failure { throw failure }
    if writeOut.storageMark > 0 { try waitForStorageWrites(through: writeOut.storageMark) }
  }

  /// `writeOutLog` for a storage without an any-thread write: the writes start under the lock
  /// and are waited for outside it.
  private func writeOutUnderLock() throws {
    try waitForStorageWrites(through: try with { try $0.startLogWriteOut() })
  }

  private func waitForStorageWrites(through mark: UInt64) throws {
    guard let event = with({ $0.storage.completionFD }) else {
      return try with { try $0.completeLogWrites(through: mark) }
    }
    while try !with({ try $0.logWritesComplete(through: mark) }) {
      var p = pollfd(fd: event, events: Int16(POLLIN), revents: 0)
      _ = poll(&p, 1, 10)  // bounded: a wake-up is a hint, the check above decides
    }
  }
}

/// A pthread mutex guarding state kept elsewhere (`Synchronization.Mutex` owns the value it
/// guards, which does not fit state spread over a class). Not recursive.
public final class Lock: @unchecked Sendable {
  private let mutex: UnsafeMutablePointer<pthread_mutex_t>

  public init() {
    mutex = .allocate(capacity: 1)
    pthread_mutex_init(mutex, nil)
  }

  deinit {
    pthread_mutex_destroy(mutex)
    mutex.deallocate()
  }

  public func with<T>(_ body: () throws -> T) rethrows -> T {
    pthread_mutex_lock(mutex)
    defer { pthread_mutex_unlock(mutex) }
    return try body()
  }
}
