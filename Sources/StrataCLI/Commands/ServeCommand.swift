import ArgumentParser
import Logging
import StrataControl
import StrataCore
import StrataIO
import StrataVhost

extension Logger.Level: @retroactive ExpressibleByArgument {}

struct ServeCommand: ParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "serve",
    abstract: "Serve an image to a virtual machine as a vhost-user-blk disk.",
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
      """
  )

  @Argument(help: "Path of the image.")
  var image: String

  @Option(help: ArgumentHelp("Unix socket to listen on.", valueName: "path"))
  var socket: String

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

  @Option(help: "Log level: trace, debug, info, notice, warning, error or critical.")
  var logLevel = Logger.Level.info

  func validate() throws {
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
      let opened = try ImageAccess.open(image, readOnly: readOnly, options: options)
      try ImageAccess.withOpened(opened, path: image) { img in
        logger.info("image \(image): \(img.size) bytes, I/O engine \(img.engineDescription)")
        var serverOptions = VhostBlkServer.Options(socketPath: socket)
        serverOptions.numQueues = numQueues
        serverOptions.readOnly = readOnly
        serverOptions.serial = serial
        serverOptions.packedRing = packedRing
        let shared = SharedImage(img)
        // The server blocks the termination signals first: threads started after it inherit that.
        let server = try VhostBlkServer(image: shared, options: serverOptions, logger: logger)
        let controlServer = try control.map { path in
          try ControlServer(
            path: path, image: shared,
            hooks: ControlServer.Hooks(
              status: { ["vhost": Self.status(of: server)] },
              resized: { _ in server.configurationChanged() }),
            logger: logger)
        }
        controlServer?.start()
        defer { controlServer?.stop() }
        let periodic = snapshotEvery.map {
          PeriodicSnapshots(image: shared, intervalNanoseconds: $0, keepLast: snapshotKeep, logger: logger)
        }
        periodic?.start()
        defer { periodic?.stop() }
        try server.run()
      }
    }
  }

  private static func status(of server: VhostBlkServer) -> [String: any Sendable] {
    let (connected, queues) = server.status()
    let list: [[String: any Sendable]] = queues.map {
      ["index": $0.index, "completed": $0.completed, "in_flight": $0.inFlight, "broken": $0.broken]
    }
    return ["connected": connected, "queues": list]
  }
}
