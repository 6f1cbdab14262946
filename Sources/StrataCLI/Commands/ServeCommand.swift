import ArgumentParser
import Logging
import StrataControl
import StrataCore
import StrataIO
import StrataNBD
import StrataVhost

#if canImport(Glibc)
  import Glibc
#endif

extension Logger.Level: @retroactive ExpressibleByArgument {}

struct ServeCommand: ParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "serve",
    abstract: "Serve an image to a virtual machine as a vhost-user-blk disk, or over NBD.",
    discussion: """
      Listens on a Unix socket for a vhost-user front-end such as QEMU:

        qemu-system-x86_64 ... \\
          -object memory-backend-memfd,id=mem,size=1G,share=on -machine q35,memory-backend=mem \\
          -chardev socket,id=c0,path=/run/vm1.sock,reconnect=1 \\
          -device vhost-user-blk-pci,chardev=c0,num-queues=2

      The guest sees a virtio-blk disk with flush, discard and write-zeroes. When the front-end \
      disconnects, the server flushes and waits for it to reconnect. SIGINT or SIGTERM stop \
      the queues, flush and close the image and remove the socket. An image can be served by \
      one process at a time.

      With --nbd (alone or with --socket), NBD clients such as qemu-img, nbdcopy, nbdinfo, fio or \
      nbd-client reach the image too: export "" or "head" is the image (writable unless \
      --read-only), "snapshot/NAME" each snapshot and "at/SEQ" each point of `strata timeline` \
      (read-only, frozen while the head changes). \
      Metadata contexts: base:allocation and strata:changed:SNAPSHOT (blocks changed since a \
      snapshot, for incremental backups).

        strata serve disk.strata --nbd unix:/run/disk.nbd
        qemu-img convert -O qcow2 'nbd+unix:///snapshot/nightly?socket=/run/disk.nbd' backup.qcow2
      """
  )

  @Argument(help: "Path of the image.")
  var image: String

  @OptionGroup var branch: BranchOption

  @Option(help: ArgumentHelp("Unix socket to listen on for a vhost-user front-end.", valueName: "path"))
  var socket: String?

  @Option(help: ArgumentHelp("Serve NBD on unix:PATH or tcp:HOST:PORT.", valueName: "address"))
  var nbd: String?

  @Option(help: "Number of virtqueues (one worker thread each).")
  var numQueues = 1

  @Flag(help: "Serve the disk read-only (the guest sees VIRTIO_BLK_F_RO).")
  var readOnly = false

  @Option(help: ArgumentHelp("Serial number the guest reads with GET_ID (at most 20 bytes).", valueName: "id"))
  var serial = "strata"

  @Flag(help: "Offer packed virtqueues (VIRTIO_F_RING_PACKED; QEMU uses them with packed=on).")
  var packedRing = false

  @Option(name: .customLong("aio"), help: "I/O engine: io_uring, native or threads (default: the best available).")
  var engine: IOEngineKind?

  @Option(
    help: ArgumentHelp(
      "Control socket (JSON lines: status, snapshot, resize, flush) for `strata ... --control PATH`.",
      valueName: "path"))
  var control: String?

  @Option(
    help: ArgumentHelp(
      "Take a snapshot named auto-<time> this often (e.g. 10s, 5m, 1h): continuous data protection.",
      valueName: "duration"),
    transform: DurationArgument.parseNanoseconds)
  var snapshotEvery: UInt64?

  @Option(help: ArgumentHelp("Keep only the newest N auto snapshots (0: keep all).", valueName: "n"))
  var snapshotKeep = 0

  @Flag(help: "Do not reclaim overwritten space in the background (strata compact does it on demand).")
  var noClean = false

  @Option(
    help: ArgumentHelp(
      "Seconds to wait for the image lock when another process holds it: a server killed just before (kill -9) may hold it for a moment while the kernel tears down its I/O rings.",
      valueName: "seconds"))
  var lockWait = 3.0

  @Option(help: "Log level: trace, debug, info, notice, warning, error or critical.")
  var logLevel = Logger.Level.info

  /// Opens the image, retrying while another process holds its lock, for up to `lockWait` s.
  private func openWaitingForLock(_ path: String, _ options: ImageOptions, _ logger: Logger) throws -> StrataImage {
    let deadline = monotonicNanoseconds() + UInt64(lockWait * 1e9)
    var logged = false
    while true {
      do {
        return try ImageAccess.open(path, readOnly: readOnly, options: options)
      } catch let e as FileError where e.underlying.code == .locked && monotonicNanoseconds() < deadline {
        if !logged {
          logger.notice("\(path) is in use by another process; waiting up to \(lockWait) s for its lock")
          logged = true
        }
        usleep(50_000)
      }
    }
  }

  func validate() throws {
    guard lockWait >= 0 && lockWait <= 3600 else { throw ValidationError("--lock-wait must be 0...3600 seconds") }
    guard socket != nil || nbd != nil else {
      throw ValidationError("nothing to serve on: give --socket PATH (vhost-user), --nbd ADDRESS, or both")
    }
    if case .unix(let path) = try nbdAddress(), path == socket {
      throw ValidationError("--socket and --nbd cannot share the socket path \(path)")
    }
    guard (1...64).contains(numQueues) else { throw ValidationError("--num-queues must be 1...64") }
    guard serial.utf8.count <= 20 else { throw ValidationError("--serial must be at most 20 bytes") }
    guard snapshotKeep >= 0 else { throw ValidationError("--snapshot-keep cannot be negative") }
    if readOnly && snapshotEvery != nil { throw ValidationError("--snapshot-every needs a writable image") }
    if let every = snapshotEvery, every < 10_000_000 { throw ValidationError("--snapshot-every must be at least 10ms") }
  }

  func run() throws {
    let level = logLevel
    LoggingSystem.bootstrap { label in
      var handler = StreamLogHandler.standardError(label: label)
      handler.logLevel = level
      return handler
    }
    let logger = Logger(label: "strata.serve")
    try runReportingErrors {
      var options = ImageOptions()
      options.readOnly = readOnly
      options.ioEngine = engine
      let path = try branch.path(of: image)
      let opened = try openWaitingForLock(path, options, logger)
      try ImageAccess.withOpened(opened, path: path) { img in
        logger.info("image \(path): \(img.size) bytes, I/O engine \(img.engineDescription)")
        let shared = SharedImage(img)
        var nbdOptions = try nbdAddress().map { NBDServer.Options(address: $0) }
        nbdOptions?.readOnly = readOnly
        // The server whose loop runs in this thread comes first: it blocks the termination
        // signals before any other thread starts (threads inherit that).
        let vhost = try socket.map { path in
          var serverOptions = VhostBlkServer.Options(socketPath: path)
          serverOptions.numQueues = numQueues
          serverOptions.readOnly = readOnly
          serverOptions.serial = serial
          serverOptions.packedRing = packedRing
          return try VhostBlkServer(image: shared, options: serverOptions, logger: logger)
        }
        let nbdServer = try nbdOptions.map {
          try NBDServer(image: shared, options: $0, logger: logger, stopOnSignals: vhost == nil)
        }
        let cleaner = readOnly || noClean ? nil : BackgroundCleaner(image: shared, logger: logger)
        cleaner?.start()
        defer { cleaner?.stop() }
        let controlServer = try control.map { path in
          try ControlServer(
            path: path, image: shared,
            hooks: ControlServer.Hooks(
              status: {
                var status: [String: any Sendable] = [:]
                if let vhost { status["vhost"] = Self.status(of: vhost) }
                if let nbdServer { status["nbd"] = ["connections": nbdServer.connectionCount] }
                if let t = cleaner?.totals {
                  status["cleaner"] = [
                    "passes": t.passes as any Sendable, "segments_freed": t.segmentsFreed,
                    "blocks_copied": t.blocksCopied,
                    "bytes_reclaimed": t.bytesReclaimed,
                  ]
                }
                return status
              },
              // NBD has no way to tell a connected client; new connections see the new size.
              resized: { _ in vhost?.configurationChanged() }),
            logger: logger)
        }
        controlServer?.start()
        defer { controlServer?.stop() }
        let periodic = snapshotEvery.map {
          PeriodicSnapshots(image: shared, intervalNanoseconds: $0, keepLast: snapshotKeep, logger: logger)
        }
        periodic?.start()
        defer { periodic?.stop() }
        if let vhost {
          nbdServer?.start()
          defer { nbdServer?.stop() }
          try vhost.run()
        } else {
          try nbdServer?.run()
        }
      }
    }
  }

  private func nbdAddress() throws -> NBDAddress? {
    do { return try nbd.map { try NBDAddress(parsing: $0) } } catch { throw ValidationError("--nbd: \(error)") }
  }

  private static func status(of server: VhostBlkServer) -> [String: any Sendable] {
    let (connected, queues) = server.status()
    let list: [[String: any Sendable]] = queues.map {
      ["index": $0.index, "completed": $0.completed, "in_flight": $0.inFlight, "broken": $0.broken]
    }
    return ["connected": connected, "queues": list]
  }
}
