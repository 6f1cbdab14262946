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
  /// A signalfd for SIGINT, SIGTERM and SIGHUP when `run()` is to stop on them.
  private let signalFd: Int32?
  /// The accept loop when it runs beside another server (`start()`).
  private var acceptThread: WorkerThread?

  /// Binds the listening socket; starts no thread. With `stopOnSignals` (for `run()`), blocks
  /// the termination signals in this thread first: construct it before any other thread starts.
  public init(image: SharedImage, options: Options, logger: Logger, stopOnSignals: Bool = false) throws {
    precondition(options.maxConnections >= 1)
    self.image = image
    self.options = options
    self.logger = logger
    if stopOnSignals {
      let fd = strata_termination_signalfd()
      guard fd >= 0 else { throw StrataError.system("signalfd", "\(options.address)", errno: errno) }
      signalFd = fd
    } else {
      signalFd = nil
    }
    do {
      switch options.address {
      case .unix(let path): listenFd = try UnixSocket.listen(path: path, backlog: 16)
      case .tcp(let host, let port): listenFd = try Self.listenTCP(host: host, port: port, backlog: 16)
      }
    } catch {
      if let signalFd { close(signalFd) }
      throw error
    }
    pthread_mutex_init(mutex, nil)
    pthread_cond_init(allGone, nil)
  }

  deinit {
    precondition(acceptThread == nil, "NBDServer started and never stopped")
    closeListener()
    if let signalFd { close(signalFd) }
    pthread_cond_destroy(allGone)
    pthread_mutex_destroy(mutex)
    mutex.deallocate()
    allGone.deallocate()
  }

  /// Serves in this thread until SIGINT, SIGTERM or SIGHUP (needs `stopOnSignals`), then ends
  /// every connection.
  public func run() throws {
    guard let signalFd else { preconditionFailure("run() needs an NBDServer made with stopOnSignals") }
    serve(until: signalFd)
    logger.info("received signal \(strata_read_signal(signalFd)); NBD server stopped")
  }

  /// Clients connected now.
  public var connectionCount: Int {
    pthread_mutex_lock(mutex)
    defer { pthread_mutex_unlock(mutex) }
    return connections.count
  }

  /// Serves on a thread of its own (alongside another server) until `stop()`.
  public func start() {
    precondition(acceptThread == nil)
    let thread = WorkerThread { [self] stopFd in serve(until: stopFd) }
    thread.start()
    acceptThread = thread
  }

  /// Ends every connection and the accept thread and waits for them.
  public func stop() {
    acceptThread?.stop()
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

extension NBDServer {
  /// Binds and listens on a TCP address (a host name or IPv4/IPv6 literal; "" for every address).
  static func listenTCP(host: String, port: UInt16, backlog: Int32) throws -> Int32 {
    var hints = addrinfo()
    hints.ai_family = AF_UNSPEC
    hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
    hints.ai_flags = AI_PASSIVE
    var list: UnsafeMutablePointer<addrinfo>?
    let r = getaddrinfo(host.isEmpty ? nil : host, String(port), &hints, &list)
    guard r == 0, let first = list else {
      throw StrataError(.invalidArgument, "cannot resolve \(host):\(port): \(String(cString: gai_strerror(r)))")
    }
    defer { freeaddrinfo(list) }
    var lastErrno: Int32 = EADDRNOTAVAIL
    var candidate: UnsafeMutablePointer<addrinfo>? = first
    while let ai = candidate {
      candidate = ai.pointee.ai_next
      let fd = socket(ai.pointee.ai_family, ai.pointee.ai_socktype | Int32(SOCK_CLOEXEC.rawValue), 0)
      guard fd >= 0 else {
        lastErrno = errno
        continue
      }
      var one: Int32 = 1
      setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
      if bind(fd, ai.pointee.ai_addr, ai.pointee.ai_addrlen) == 0 && listen(fd, backlog) == 0 { return fd }
      lastErrno = errno
      close(fd)
    }
    throw StrataError.system("bind", "\(host):\(port)", errno: lastErrno)
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
