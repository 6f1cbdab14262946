import CStrataLinux
import Logging
import StrataCore

#if canImport(Glibc)
  import Glibc
#endif

/// `strata serve --nbd`: an NBD server (fixed newstyle) for the head and the snapshots of one
/// image. A thread per connection; every connection shares the image through `SharedImage`, so
/// a flush on any of them covers the writes of all (CAN_MULTI_CONN).
public final class NBDServer: @unchecked Sendable {
  public struct Options: Sendable {
    public var address: NBDAddress
    public var readOnly = false
    /// More clients than this are turned away (each may hold up to ~35 MiB of buffers).
    public var maxConnections = 64
    public init(address: NBDAddress) { self.address = address }
  }

  let options: Options
  let image: SharedImage
  let logger: Logger
  private var listenFd: Int32
  private let mutex = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)
  private let allGone = UnsafeMutablePointer<pthread_cond_t>.allocate(capacity: 1)
  /// Sockets of the running connections (guarded by `mutex`): shut down to stop them.
  private var connections: Set<Int32> = []
  private let stopFd: Int32
  private var acceptThread: pthread_t?

  /// Binds the listening socket. Starts no thread.
  public init(image: SharedImage, options: Options, logger: Logger) throws {
    precondition(options.maxConnections >= 1)
    self.image = image
    self.options = options
    self.logger = logger
    switch options.address {
    case .unix(let path): listenFd = try ServerSocket.listenUnix(path, backlog: 16)
    case .tcp(let host, let port): listenFd = try ServerSocket.listenTCP(host: host, port: port, backlog: 16)
    }
    stopFd = strata_eventfd(0, 0)
    pthread_mutex_init(mutex, nil)
    pthread_cond_init(allGone, nil)
  }

  deinit {
    precondition(acceptThread == nil, "NBDServer started and never stopped")
    closeListener()
    close(stopFd)
    pthread_cond_destroy(allGone)
    pthread_mutex_destroy(mutex)
    mutex.deallocate()
    allGone.deallocate()
  }

  /// Serves in this thread until SIGINT, SIGTERM or SIGHUP (blocked here first, so call it before
  /// starting other threads), then ends every connection.
  public func run() throws {
    let signalFd = strata_termination_signalfd()
    guard signalFd >= 0 else { throw StrataError.system("signalfd", "\(options.address)", errno: errno) }
    defer { close(signalFd) }
    serve(until: signalFd)
    logger.info("received signal \(strata_read_signal(signalFd)); NBD server stopped")
  }

  /// Serves on a thread of its own (alongside another server) until `stop()`.
  public func start() {
    precondition(acceptThread == nil)
    let box = Unmanaged.passRetained(self)
    var t = pthread_t()
    let r = pthread_create(
      &t, nil,
      { arg in
        guard let arg else { return nil }
        let server = Unmanaged<NBDServer>.fromOpaque(arg).takeRetainedValue()
        server.serve(until: server.stopFd)
        return nil
      }, box.toOpaque())
    precondition(r == 0, "pthread_create failed: \(r)")
    acceptThread = t
  }

  /// Ends every connection and the accept thread and waits for them.
  public func stop() {
    guard let t = acceptThread else { return }
    var one: UInt64 = 1
    _ = write(stopFd, &one, 8)
    pthread_join(t, nil)
    acceptThread = nil
  }

  private func serve(until stop: Int32) {
    logger.info("NBD server on \(options.address)\(options.readOnly ? ", read-only" : "")")
    var fds = [
      pollfd(fd: listenFd, events: Int16(POLLIN), revents: 0), pollfd(fd: stop, events: Int16(POLLIN), revents: 0),
    ]
    while true {
      if poll(&fds, 2, -1) < 0 {
        if errno == EINTR { continue }
        logger.error("poll failed: \(String(cString: strerror(errno)))")
        break
      }
      if fds[1].revents != 0 { break }
      let c = accept(listenFd, nil, nil)
      if c >= 0 { _ = fcntl(c, F_SETFD, FD_CLOEXEC) }
      if c < 0 {
        if errno != EINTR && errno != EAGAIN && errno != ECONNABORTED {
          logger.warning("accept failed: \(String(cString: strerror(errno)))")
        }
        continue
      }
      admit(c)
    }
    // Stop: shut every connection's socket down (its thread sees the end of the stream), wait.
    pthread_mutex_lock(mutex)
    for c in connections { shutdown(c, Int32(SHUT_RDWR)) }
    while !connections.isEmpty { pthread_cond_wait(allGone, mutex) }
    pthread_mutex_unlock(mutex)
    // Here, not in deinit: a connection thread may hold the last reference a moment longer.
    closeListener()
  }

  private func closeListener() {
    guard listenFd >= 0 else { return }
    close(listenFd)
    listenFd = -1
    if case .unix(let path) = options.address { unlink(path) }
  }

  private func admit(_ fd: Int32) {
    pthread_mutex_lock(mutex)
    let full = connections.count >= options.maxConnections
    if !full { connections.insert(fd) }
    pthread_mutex_unlock(mutex)
    guard !full else {
      logger.warning("turning a client away: \(options.maxConnections) connections already")
      close(fd)
      return
    }
    if case .tcp = options.address {
      var one: Int32 = 1
      setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
    }
    var logger = self.logger
    logger[metadataKey: "nbd-client"] = "\(fd)"
    let connection = NBDConnection(fd: fd, image: image, serverReadOnly: options.readOnly, logger: logger)
    let box = Unmanaged.passRetained(ConnectionJob(server: self, connection: connection))
    var attributes = pthread_attr_t()
    pthread_attr_init(&attributes)
    pthread_attr_setdetachstate(&attributes, Int32(PTHREAD_CREATE_DETACHED))
    defer { pthread_attr_destroy(&attributes) }
    var t = pthread_t()
    let r = pthread_create(
      &t, &attributes,
      { arg in
        guard let arg else { return nil }
        let job = Unmanaged<ConnectionJob>.fromOpaque(arg).takeRetainedValue()
        job.connection.run()
        job.server.finished(job.connection.fd)
        return nil
      }, box.toOpaque())
    if r != 0 {
      box.release()
      logger.error("cannot start a connection thread: \(r)")
      finished(fd)
    }
  }

  /// A connection ended: its socket is closed under the lock, so `serve` never shuts down a
  /// descriptor number that was reused.
  private func finished(_ fd: Int32) {
    pthread_mutex_lock(mutex)
    connections.remove(fd)
    close(fd)
    pthread_cond_signal(allGone)
    pthread_mutex_unlock(mutex)
  }
}

private final class ConnectionJob: @unchecked Sendable {
  let server: NBDServer
  let connection: NBDConnection
  init(server: NBDServer, connection: NBDConnection) {
    self.server = server
    self.connection = connection
  }
}
