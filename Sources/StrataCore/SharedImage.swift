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
