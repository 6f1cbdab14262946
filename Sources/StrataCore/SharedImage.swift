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

  /// `StrataImage.writeOutLog` for a thread sharing the image: the writes start under the lock
  /// and are waited for outside it, so the other threads' requests go on meanwhile (two
  /// queues each waiting for its own write under the lock ran one at a time).
  public func writeOutLog() throws {
    let (mark, event) = try with { image in (try image.startLogWriteOut(), image.storage.completionFD) }
    guard let event else { return try with { try $0.storage.completeWrites(through: mark) } }
    while try !with({ try $0.storage.writesComplete(through: mark) }) {
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
