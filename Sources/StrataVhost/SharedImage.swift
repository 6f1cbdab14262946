import StrataCore

#if canImport(Glibc)
  import Glibc
#endif

/// The image shared by the queue workers. `StrataImage` is single-threaded (its log and map
/// are one sequence), so each request's metadata work and log append happen under this lock;
/// the critical sections are memory operations plus, for reads, the data I/O.
final class SharedImage: @unchecked Sendable {
  private let image: StrataImage
  private let mutex: UnsafeMutablePointer<pthread_mutex_t>

  init(_ image: StrataImage) {
    self.image = image
    mutex = .allocate(capacity: 1)
    pthread_mutex_init(mutex, nil)
  }

  deinit {
    pthread_mutex_destroy(mutex)
    mutex.deallocate()
  }

  func with<T>(_ body: (StrataImage) throws -> T) rethrows -> T {
    pthread_mutex_lock(mutex)
    defer { pthread_mutex_unlock(mutex) }
    return try body(image)
  }
}
