import CStrataLinux
import Foundation
import Logging
import StrataCore

/// `strata serve --control PATH`: a Unix socket that takes one JSON object per line and answers
/// each with one JSON object on a line, for the tools that manage a served image (the `strata`
/// command's `--control` options, scripts with `socat`):
///
///     {"command":"status"}                 -> {"ok":true,"image":{...},"queues":[...],...}
///     {"command":"snapshot","name":"x"}    -> {"ok":true,"snapshot":{"name":"x","seq":N,...}}
///     {"command":"resize","size":BYTES}    -> {"ok":true,"size":BYTES}   (grow only)
///     {"command":"flush"}                  -> {"ok":true}
///     {"command":"compact"}                -> {"ok":true,"segments_freed":N,...}
///
/// A failure is `{"ok":false,"error":"...","code":"..."}`; a malformed line gets one too and the
/// connection stays open. Clients are served one at a time, in a thread of their own.
public final class ControlServer: @unchecked Sendable {
  /// What the servers in the process add to the control commands.
  public struct Hooks: Sendable {
    /// Extra members of the `status` reply (e.g. the vhost-user queues).
    public var status: @Sendable () -> [String: any Sendable]
    /// Called after the image grew, to tell the clients (the guest) about it.
    public var resized: @Sendable (UInt64) -> Void

    public init(
      status: @escaping @Sendable () -> [String: any Sendable] = { [:] },
      resized: @escaping @Sendable (UInt64) -> Void = { _ in }
    ) {
      self.status = status
      self.resized = resized
    }
  }

  /// Longest request line accepted.
  static let maxLine = 64 << 10

  let path: String
  let image: SharedImage
  let hooks: Hooks
  let logger: Logger
  private let listenFd: Int32
  private var thread: WorkerThread?

  public init(path: String, image: SharedImage, hooks: Hooks, logger: Logger) throws {
    self.path = path
    self.image = image
    self.hooks = hooks
    self.logger = logger
    listenFd = try UnixSocket.listen(path: path, backlog: 4)
  }

  deinit { close(listenFd) }

  public func start() {
    let t = WorkerThread { [self] stopFd in run(stopFd) }
    thread = t
    t.start()
    logger.info("control socket on \(path)")
  }

  /// Stops serving (a command being handled finishes first) and removes the socket file.
  public func stop() {
    guard let thread else { return }
    thread.stop()
    self.thread = nil
    unlink(path)
  }

  private func run(_ stopFd: Int32) {
    while let connection = next(listenFd, accepting: true, stopFd: stopFd) {
      serve(connection, stopFd: stopFd)
      close(connection)
    }
  }

  /// Waits until `fd` is readable (accepting a connection on it when `accepting`); nil once
  /// the server is stopping.
  private func next(_ fd: Int32, accepting: Bool, stopFd: Int32) -> Int32? {
    var fds = [
      pollfd(fd: fd, events: Int16(POLLIN), revents: 0), pollfd(fd: stopFd, events: Int16(POLLIN), revents: 0),
    ]
    while true {
      if poll(&fds, 2, -1) < 0 {
        if errno == EINTR { continue }
        logger.error("control socket: poll failed: \(String(cString: strerror(errno)))")
        return nil
      }
      if fds[1].revents != 0 { return nil }
      guard accepting else { return fd }
      let c = accept(fd, nil, nil)
      if c >= 0 {
        _ = fcntl(c, F_SETFD, FD_CLOEXEC)
        return c
      }
      if errno != EINTR && errno != EAGAIN && errno != ECONNABORTED {
        logger.error("control socket: accept failed: \(String(cString: strerror(errno)))")
        return nil
      }
    }
  }

  private func serve(_ connection: Int32, stopFd: Int32) {
    var pending: [UInt8] = []
    var chunk = [UInt8](repeating: 0, count: 4096)
    while next(connection, accepting: false, stopFd: stopFd) != nil {
      let n = chunk.withUnsafeMutableBytes { read(connection, $0.baseAddress, $0.count) }
      if n < 0 && errno == EINTR { continue }
      if n <= 0 { return }
      pending += chunk[..<n]
      while let newline = pending.firstIndex(of: UInt8(ascii: "\n")) {
        let line = Array(pending[..<newline])
        pending.removeSubrange(...newline)
        guard send(reply(to: line), to: connection) else { return }
      }
      if pending.count > Self.maxLine {
        _ = send(failure(StrataError(.invalidArgument, "request longer than \(Self.maxLine) bytes")), to: connection)
        return
      }
    }
  }

  private func send(_ object: [String: Any], to connection: Int32) -> Bool {
    guard var data = try? JSONSerialization.data(withJSONObject: object, options: [.sortedKeys]) else { return false }
    data.append(UInt8(ascii: "\n"))
    return data.withUnsafeBytes { raw in
      var done = 0
      while done < raw.count {
        let n = Glibc.send(connection, raw.baseAddress! + done, raw.count - done, Int32(MSG_NOSIGNAL))
        if n < 0 && errno == EINTR { continue }
        if n <= 0 { return false }
        done += n
      }
      return true
    }
  }

  /// Runs one request line.
  func reply(to line: [UInt8]) -> [String: Any] {
    guard let object = try? JSONSerialization.jsonObject(with: Data(line)), let request = object as? [String: Any],
      let command = request["command"] as? String
    else {
      return failure(StrataError(.invalidArgument, "expected a JSON object with a \"command\" string"))
    }
    do {
      switch command {
      case "status":
        var reply = hooks.status().reduce(into: [String: Any]()) { $0[$1.key] = $1.value }
        reply["ok"] = true
        reply["image"] = image.with { img -> [String: Any] in
          ["size": img.size, "block_size": img.blockSize, "snapshots": img.snapshotCount, "read_only": img.readOnly]
        }
        return reply
      case "snapshot":
        guard let name = request["name"] as? String else {
          throw StrataError(.invalidArgument, "snapshot needs a \"name\" string")
        }
        // Every write acknowledged to a client is in the log before this record, so the
        // snapshot holds all of them; it is durable before the reply (group commit: the sync
        // runs outside the image lock, so the queues keep serving meanwhile).
        let info = try image.durably { try $0.createSnapshot(name: name) }
        logger.info("control: snapshot '\(name)' created (seq \(info.seq))")
        return [
          "ok": true, "snapshot": ControlWire.snapshot(info),
        ]
      case "resize":
        guard let size = (request["size"] as? NSNumber)?.uint64Value else {
          throw StrataError(.invalidArgument, "resize needs a \"size\" in bytes")
        }
        let grown = try image.with { img -> Bool in
          guard size >= img.size else {
            throw StrataError(
              .invalidArgument,
              "a served disk can only grow (it is \(img.size) bytes): shrinking would take blocks away from the guest")
          }
          guard size > img.size else { return false }
          try img.resize(to: size)
          try img.flush()
          return true
        }
        if grown {
          logger.info("control: disk grown to \(size) bytes")
          hooks.resized(size)
        }
        return ["ok": true, "size": size]
      case "flush":
        try image.durably { _ in }
        return ["ok": true]
      case "delete_snapshot":
        guard let name = request["name"] as? String else {
          throw StrataError(.invalidArgument, "delete_snapshot needs a \"name\" string")
        }
        try image.durably { try $0.deleteSnapshot(name: name) }
        logger.info("control: snapshot '\(name)' deleted")
        return ["ok": true]
      case "prune":
        let counts = try ["keep_last", "keep_hourly", "keep_daily", "keep_weekly"].map { key -> Int in
          guard let value = request[key] else { return 0 }
          guard let n = (value as? NSNumber)?.intValue, n >= 0 else {
            throw StrataError(.invalidArgument, "prune: \"\(key)\" must be a count (0 or more)")
          }
          return n
        }
        let policy = RetentionPolicy(last: counts[0], hourly: counts[1], daily: counts[2], weekly: counts[3])
        guard !policy.keepsNothing else {
          throw StrataError(
            .invalidArgument,
            "prune needs at least one keep_* rule (a policy that keeps nothing would delete every snapshot)")
        }
        let prefix = request["prefix"] as? String ?? ""
        let dryRun = request["dry_run"] as? Bool ?? false
        let deleted = try image.durably { try $0.pruneSnapshots(policy, prefix: prefix, dryRun: dryRun) }
        if !dryRun { logger.info("control: pruned \(deleted.count) snapshot(s)") }
        return [
          "ok": true,
          "deleted": deleted.map(ControlWire.snapshot),
        ]
      case "set":
        let window = try ControlWire.cdpWindow(from: request)
        let previous = try image.durably { img -> CDPWindow? in
          let previous = img.cdpWindow
          try img.setCDPWindow(window)
          return previous
        }
        logger.info("control: CDP window set to \(window.map { "\($0)" } ?? "none")")
        return ["ok": true, "previous": ControlWire.cdpWindow(previous)]
      case "compact":
        // A whole pass under the image lock: the guest waits for it (the background cleaner
        // takes small steps instead).
        let report = try image.with { img in
          try img.compact()
        }
        logger.info("control: compact freed \(report.segmentsFreed) segments")
        return [
          "ok": true, "segments_freed": report.segmentsFreed, "segments_pinned": report.segmentsPinned,
          "blocks_copied": report.blocksCopied, "bytes_reclaimed": report.bytesReclaimed,
          "bytes_punched": report.bytesPunched, "log_start_seq": report.logStartSeq,
        ]
      default:
        throw StrataError(
          .invalidArgument,
          "unknown command \"\(command)\" (status, snapshot, delete_snapshot, prune, set, resize, flush, compact)")
      }
    } catch let e as StrataError {
      return failure(e)
    } catch {
      return failure(StrataError(.io, "\(error)"))
    }
  }

  private func failure(_ error: StrataError) -> [String: Any] {
    ["ok": false, "error": error.message, "code": "\(error.code)"]
  }
}
