import CStrataLinux
import Logging
import StrataCore
import VhostProtocol

#if canImport(Glibc)
  import Glibc
#endif

/// `strata serve`: a vhost-user-blk back-end on a Unix socket. Serves one front-end at a time
/// and waits for the next when it disconnects (QEMU's `reconnect=`); SIGINT/SIGTERM stop the
/// queues, flush and close the image and remove the socket. `run` belongs to one thread;
/// `status` and `configurationChanged` may be called from any (they take the state lock).
public final class VhostBlkServer: @unchecked Sendable {
  public struct Options: Sendable {
    public var socketPath: String
    public var numQueues: Int = 1
    public var readOnly: Bool = false
    public var serial: String = "strata"
    /// Offer VIRTIO_F_RING_PACKED (the front-end chooses: QEMU with `packed=on`).
    public var packedRing: Bool = false
    public init(socketPath: String) { self.socketPath = socketPath }
  }

  /// One virtqueue's counters, for the control socket.
  public struct QueueStats: Sendable, Equatable {
    public var index: Int
    public var completed: UInt64
    public var inFlight: UInt64
    public var broken: Bool
  }

  let options: Options
  let logger: Logger
  let image: SharedImage
  private var listenFd: Int32 = -1
  private let signalFd: Int32
  /// The connected front-end's back-end. Guarded by `stateLock`, which the connection thread
  /// holds while it handles a message and other threads (the control socket) take to look at
  /// the queues or to notify the front-end.
  private var backend: VhostBlkBackend?
  private let stateLock = Lock()

  /// Blocks the termination signals in this thread (call before any other thread starts) and
  /// binds the socket.
  public init(image: SharedImage, options: Options, logger: Logger) throws {
    precondition(options.numQueues >= 1 && options.numQueues <= 64)
    self.options = options
    self.logger = logger
    self.image = image
    signalFd = strata_termination_signalfd()
    guard signalFd >= 0 else { throw StrataError.system("signalfd", options.socketPath, errno: errno) }
    listenFd = try UnixSocket.listen(path: options.socketPath, backlog: 1)
  }

  deinit {
    if listenFd >= 0 { close(listenFd) }
    close(signalFd)
  }

  /// Serves until a termination signal; then cleans up.
  public func run() throws {
    defer {
      close(listenFd)
      listenFd = -1
      unlink(options.socketPath)
    }
    logger.info(
      "serving on \(options.socketPath) with \(options.numQueues) queue(s)\(options.readOnly ? ", read-only" : "")")
    while true {
      guard let connection = try waitForConnection() else { break }
      logger.info("front-end connected")
      let stop = serve(connection)
      close(connection)
      if stop { break }
      logger.info("front-end disconnected; waiting for it to reconnect")
    }
    logger.info("shutting down")
  }

  /// The next front-end, or nil when a termination signal arrived first.
  private func waitForConnection() throws -> Int32? {
    var fds = [
      pollfd(fd: listenFd, events: Int16(POLLIN), revents: 0), pollfd(fd: signalFd, events: Int16(POLLIN), revents: 0),
    ]
    while true {
      if poll(&fds, 2, -1) < 0 {
        if errno == EINTR { continue }
        throw StrataError.system("poll", options.socketPath, errno: errno)
      }
      if fds[1].revents != 0 {
        logger.info("received signal \(strata_read_signal(signalFd))")
        return nil
      }
      let c = accept(listenFd, nil, nil)
      if c >= 0 {
        _ = fcntl(c, F_SETFD, FD_CLOEXEC)
        return c
      }
      if errno != EINTR && errno != EAGAIN { throw StrataError.system("accept", options.socketPath, errno: errno) }
    }
  }

  /// Whether a front-end is connected, and its queues' counters.
  public func status() -> (connected: Bool, queues: [QueueStats]) {
    stateLock.with {
      guard let backend else { return (false, []) }
      return (true, backend.queueStats)
    }
  }

  /// Tells the connected front-end that the configuration space changed (after a resize), so
  /// the guest rereads the capacity. Returns false when no front-end can be told.
  @discardableResult
  public func configurationChanged() -> Bool {
    stateLock.with { backend?.notifyConfigChange() ?? false }
  }

  /// Runs one connection; returns true when the server must stop (a signal).
  private func serve(_ connection: Int32) -> Bool {
    let backend = VhostBlkBackend(
      image: image, readOnly: options.readOnly, serial: options.serial, numQueues: options.numQueues,
      packedRing: options.packedRing, logger: logger)
    stateLock.with { self.backend = backend }
    defer {
      stateLock.with {
        backend.reset()
        self.backend = nil
      }
      do { try image.with { try $0.flush() } } catch { logger.error("flush after disconnect failed: \(error)") }
    }
    var fds = [
      pollfd(fd: connection, events: Int16(POLLIN), revents: 0),
      pollfd(fd: signalFd, events: Int16(POLLIN), revents: 0),
    ]
    var headerBytes = [UInt8](repeating: 0, count: VhostHeader.size)
    var payload = [UInt8](repeating: 0, count: VhostHeader.maxPayload)
    var received = [Int32](repeating: -1, count: 16)
    while true {
      if poll(&fds, 2, -1) < 0 {
        if errno == EINTR { continue }
        return false
      }
      if fds[1].revents != 0 {
        logger.info("received signal \(strata_read_signal(signalFd))")
        return true
      }
      var nfds: Int32 = 0
      let n = headerBytes.withUnsafeMutableBytes { h in
        received.withUnsafeMutableBufferPointer {
          strata_recv_with_fds(connection, h.baseAddress, VhostHeader.size, $0.baseAddress, 16, &nfds)
        }
      }
      let fdsIn = Array(received[..<Int(max(nfds, 0))])
      guard n == VhostHeader.size else {
        fdsIn.forEach { close($0) }
        if n != 0 { logger.warning("short or failed read of a message header (\(n)); dropping the connection") }
        return false
      }
      let header: VhostHeader
      do {
        header = try headerBytes.withUnsafeBytes { try VhostHeader.decode($0) }
      } catch {
        fdsIn.forEach { close($0) }
        logger.warning("malformed message header: \(error); dropping the connection")
        return false
      }
      let size = Int(header.size)
      guard readFully(connection, &payload, size) else {
        fdsIn.forEach { close($0) }
        logger.warning("connection closed in the middle of a message")
        return false
      }
      let reply = stateLock.with {
        payload.withUnsafeBytes { backend.handle(header, UnsafeRawBufferPointer(rebasing: $0[..<size]), fds: fdsIn) }
      }
      if let reply {
        let h = VhostHeader(
          request: header.request, flags: VhostHeader.version | VhostHeader.replyFlag, size: UInt32(reply.payload.count)
        )
        let message = h.encode() + reply.payload
        let sent = message.withUnsafeBytes {
          strata_send_with_fds(connection, $0.baseAddress, $0.count, reply.fds, Int32(reply.fds.count))
        }
        guard sent == message.count else {
          logger.warning("reply to \(header.request) failed; dropping the connection")
          return false
        }
      }
    }
  }

  private func readFully(_ fd: Int32, _ buffer: inout [UInt8], _ count: Int) -> Bool {
    var done = 0
    while done < count {
      let n = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress! + done, count - done) }
      if n < 0 && errno == EINTR { continue }
      if n <= 0 { return false }
      done += n
    }
    return true
  }
}
