import Logging
import StrataCore

#if canImport(Glibc)
  import Glibc
#endif

/// Why a connection ends: the client left, or broke the protocol so that the stream cannot be
/// followed any more (NBD has no way to resynchronize).
struct Hangup: Error, CustomStringConvertible {
  var description: String
  /// A client that disconnects between requests or after NBD_CMD_DISC is not a problem.
  var orderly = false
  init(_ d: String, orderly: Bool = false) {
    description = d
    self.orderly = orderly
  }
}

/// An export as a connection serves it after NBD_OPT_GO or NBD_OPT_EXPORT_NAME.
final class OpenExport {
  struct Context {
    var id: UInt32
    var context: NBDMetaContext
    /// The snapshot a `strata:changed:*` context compares with.
    var since: SnapshotView?
  }

  let name: NBDExportName
  let size: UInt64
  let readOnly: Bool
  /// The frozen snapshot, nil for the head.
  let view: SnapshotView?
  var contexts: [Context] = []

  init(name: NBDExportName, size: UInt64, readOnly: Bool, view: SnapshotView?) {
    self.name = name
    self.size = size
    self.readOnly = readOnly
    self.view = view
  }

  var description: String {
    switch name {
    case .head: "image head"
    case .snapshot(let s): "snapshot \(s), read-only"
    case .pointInTime(let seq): "the image just before operation \(seq), read-only"
    case .pointAtTime(_, let text): "the image at \(text), read-only"
    }
  }

  var flags: NBDTransmissionFlags {
    var f: NBDTransmissionFlags = [.hasFlags, .sendFlush, .sendDF, .sendCache, .canMultiConn]
    if readOnly {
      f.insert(.readOnly)
    } else {
      f.formUnion([.sendFUA, .sendTrim, .sendWriteZeroes, .sendFastZero])
    }
    return f
  }
}

/// One client: the handshake, then requests in order. Pipelined requests are read in bulk and
/// their replies sent in batches; before a batch holding write replies goes out, the log is
/// handed to the file (so an acknowledged write survives a kill of the server, as in vhost).
/// All image access goes through the shared image's lock, never across socket I/O.
final class NBDConnection: @unchecked Sendable {
  let fd: Int32
  let image: SharedImage
  let serverReadOnly: Bool
  let logger: Logger

  private var structured = false
  private var noZeroes = false
  /// The last SET_META_CONTEXT: for which export, and what.
  private var selection: (export: NBDExportName, contexts: [NBDMetaContext])?

  private let input: UnsafeMutableRawBufferPointer
  private var inStart = 0
  private var inEnd = 0
  private let output: UnsafeMutableRawBufferPointer
  private var outCount = 0
  /// For payloads and replies larger than the input or output buffer; grown on demand, reused.
  private var large: UnsafeMutableRawBufferPointer?
  /// Write replies wait in `output` for the log to reach the file.
  private var logPending = false
  /// Reads of the head go through an image queue in batches: the reads of one burst of requests
  /// are submitted together and reaped together (many reads in flight, the image lock held only
  /// for map lookups), their replies filled in place in `output`.
  private var queue: ImageQueue?
  /// The export's frozen view (snapshot or point in time), which queued reads go through.
  private var currentView: SnapshotView?
  private var pendingReads: [PendingRead] = []
  /// Where in `output` the first batched reply goes (replies before it are sent first).
  private var batchStart = 0
  private let completions: UnsafeMutableBufferPointer<QueueCompletion>
  /// What a batch sends: the replies before it, then each read's reply (reused, no allocation).
  private var vectors: [iovec] = []
  private var wroteAnything = false

  static let inputSize = 256 << 10
  static let outputSize = 8 << 20 + 64 << 10
  /// The image queue reads straight into page-aligned memory only (O_DIRECT).
  static let dataAlignment = 4096
  /// Reads in flight in one batch.
  static let queueDepth = 64
  /// Room before read data for the longest reply header (a structured chunk and its offset).
  static let readHeaderRoom = NBDReplyHeader.chunkSize + 8
  /// Block status replies cover at most this much of the disk and this many extents per context.
  static let maxStatusSpan: UInt64 = 1 << 30
  static let maxExtents = 8192
  /// Metadata contexts one connection may select.
  static let maxContexts = 8
  /// Snapshots listed by NBD_OPT_LIST and LIST_META_CONTEXT (any other is reached by name).
  static let maxListedSnapshots = 1000

  init(fd: Int32, image: SharedImage, serverReadOnly: Bool, logger: Logger) {
    self.fd = fd
    self.image = image
    self.serverReadOnly = serverReadOnly
    self.logger = logger
    input = .allocate(byteCount: Self.inputSize, alignment: 64)
    output = .allocate(byteCount: Self.outputSize, alignment: Self.dataAlignment)
    completions = .allocate(capacity: Self.queueDepth)
    completions.initialize(repeating: QueueCompletion(tag: 0, error: nil))
    pendingReads.reserveCapacity(Self.queueDepth)
    vectors.reserveCapacity(Self.queueDepth + 1)
  }

  deinit {
    precondition(queue == nil, "the image queue was not closed")
    input.deallocate()
    completions.deinitialize()
    completions.deallocate()
    output.deallocate()
    large?.deallocate()
  }

  /// Serves the connection until the client leaves; never throws (the caller closes the socket).
  func run() {
    do {
      if let export = try negotiate() { try transmit(export) }
    } catch let h as Hangup {
      if h.orderly { logger.debug("client left: \(h)") } else { logger.warning("dropping client: \(h)") }
    } catch {
      logger.warning("dropping client: \(error)")
    }
    queue?.close()
    queue = nil
    if wroteAnything {
      do { try image.durably { _ in } } catch { logger.error("flush after disconnect failed: \(error)") }
    }
  }

  // MARK: Handshake

  /// The fixed newstyle handshake; the export to serve, or nil when the client aborted.
  private func negotiate() throws -> OpenExport? {
    var greeting = NBDWriter()
    greeting.u64(NBDMagic.server)
    greeting.u64(NBDMagic.option)
    greeting.u16(NBDHandshakeFlag.fixedNewstyle | NBDHandshakeFlag.noZeroes)
    try send(greeting.bytes)
    let clientFlags = try receiveU32()
    guard clientFlags & ~UInt32(NBDHandshakeFlag.fixedNewstyle | NBDHandshakeFlag.noZeroes) == 0 else {
      throw Hangup("unknown client flags 0x\(String(clientFlags, radix: 16))")
    }
    noZeroes = clientFlags & UInt32(NBDHandshakeFlag.noZeroes) != 0
    var header = [UInt8](repeating: 0, count: 16)
    var payload = [UInt8](repeating: 0, count: NBDLimits.maxOptionLength)
    while true {
      try header.withUnsafeMutableBytes { try receive(into: $0) }
      let (magic, option, length) = try header.withUnsafeBytes { h in
        var r = NBDReader(h)
        return try (r.u64(), r.u32(), r.u32())
      }
      guard magic == NBDMagic.option else { throw Hangup("bad option magic 0x\(String(magic, radix: 16))") }
      guard length <= UInt32(NBDLimits.maxOptionLength) else {
        throw Hangup("option \(option) with a \(length)-byte payload (limit \(NBDLimits.maxOptionLength))")
      }
      let n = Int(length)
      try payload.withUnsafeMutableBytes { try receive(into: UnsafeMutableRawBufferPointer(rebasing: $0[0..<n])) }
      let done = try payload.withUnsafeBytes { p in
        try handleOption(option, UnsafeRawBufferPointer(rebasing: p[0..<n]))
      }
      switch done {
      case .next: continue
      case .abort: return nil
      case .serve(let export): return export
      }
    }
  }

  private enum OptionOutcome {
    case next
    case abort
    case serve(OpenExport)
  }

  private func handleOption(_ option: UInt32, _ payload: UnsafeRawBufferPointer) throws -> OptionOutcome {
    switch option {
    case NBDOption.exportName:
      // No error reply exists for this option: an unknown export closes the connection.
      let name = String(decoding: payload, as: UTF8.self)
      guard case .success(let export) = open(name, contextsFor: nil) else {
        throw Hangup("NBD_OPT_EXPORT_NAME for unknown export \"\(name)\"")
      }
      var w = NBDWriter()
      w.u64(export.size)
      w.u16(export.flags.rawValue)
      if !noZeroes { w.raw([UInt8](repeating: 0, count: 124)) }
      try send(w.bytes)
      return .serve(export)
    case NBDOption.abort:
      try? sendOptionReply(option, NBDReply.ack)
      throw Hangup("client aborted the handshake", orderly: true)
    case NBDOption.list:
      guard payload.isEmpty else { return try refuse(option, NBDReply.errInvalid, "NBD_OPT_LIST takes no data") }
      let exports: [(String, String)]
      do { exports = try listExports() } catch {
        return try refuse(option, NBDReply.errUnknown, "the snapshot catalog cannot be read: \(error)")
      }
      for (name, description) in exports {
        var w = NBDWriter()
        w.string(name)
        w.raw(description.utf8)
        try sendOptionReply(option, NBDReply.server, w.bytes)
      }
      try sendOptionReply(option, NBDReply.ack)
      return .next
    case NBDOption.info, NBDOption.go:
      let request: NBDExportRequest
      do { request = try NBDExportRequest.decode(payload) } catch {
        return try refuse(option, NBDReply.errInvalid, "\(error)")
      }
      let export: OpenExport
      switch open(request.name, contextsFor: option == NBDOption.go ? request.name : nil) {
      case .success(let e): export = e
      case .failure(let f): return try refuse(option, f.reply, f.message)
      }
      try sendInfo(option, export, requested: request.infos, name: request.name)
      try sendOptionReply(option, NBDReply.ack)
      return option == NBDOption.go ? .serve(export) : .next
    case NBDOption.structuredReply:
      guard payload.isEmpty else {
        return try refuse(option, NBDReply.errInvalid, "NBD_OPT_STRUCTURED_REPLY takes no data")
      }
      guard !structured else { return try refuse(option, NBDReply.errInvalid, "structured replies already on") }
      structured = true
      try sendOptionReply(option, NBDReply.ack)
      return .next
    case NBDOption.listMetaContext, NBDOption.setMetaContext:
      return try metaContextOption(option, payload)
    default:
      // STARTTLS, EXTENDED_HEADERS and options this server does not know.
      return try refuse(option, NBDReply.errUnsupported, "option \(option) is not supported")
    }
  }

  private func refuse(_ option: UInt32, _ reply: UInt32, _ message: String) throws -> OptionOutcome {
    logger.debug("option \(option) refused: \(message)")
    try sendOptionReply(option, reply, Array(message.utf8))
    return .next
  }

  private func metaContextOption(_ option: UInt32, _ payload: UnsafeRawBufferPointer) throws -> OptionOutcome {
    let listing = option == NBDOption.listMetaContext
    guard listing || structured else {
      return try refuse(option, NBDReply.errInvalid, "metadata contexts need structured replies first")
    }
    let request: NBDMetaContextRequest
    do { request = try NBDMetaContextRequest.decode(payload) } catch {
      return try refuse(option, NBDReply.errInvalid, "\(error)")
    }
    let exportName: NBDExportName
    switch resolve(request.exportName) {
    case .failure(let f): return try refuse(option, f.reply, f.message)
    case .success(let name): exportName = name
    }
    var found: [NBDMetaContext] = []
    do {
      if listing && request.queries.isEmpty {
        found = [.allocation] + (try listedSnapshots()).map { .changed(since: $0.name) }
      } else {
        for q in request.queries {
          // The catalog may hold millions: a listing shows the first ones, a name is looked up.
          let candidates =
            listing && (q == "strata:" || q == NBDMetaContext.changedPrefix)
            ? try listedSnapshots().map(\.name)
            : q.hasPrefix(NBDMetaContext.changedPrefix)
              ? [String(q.dropFirst(NBDMetaContext.changedPrefix.count))].filter {
                Self.isPoint($0) || snapshotExists($0)
              }
              : []
          for c in NBDMetaContext.matching(q, snapshots: candidates, listing: listing) where !found.contains(c) {
            found.append(c)
          }
        }
      }
    } catch {
      return try refuse(option, NBDReply.errUnknown, "the snapshot catalog cannot be read: \(error)")
    }
    if !listing {
      guard found.count <= Self.maxContexts else {
        selection = nil
        return try refuse(option, NBDReply.errTooBig, "at most \(Self.maxContexts) metadata contexts")
      }
      selection = (exportName, found)
    }
    for (i, c) in found.enumerated() {
      var w = NBDWriter()
      w.u32(listing ? 0 : UInt32(i + 1))
      w.raw(c.name.utf8)
      try sendOptionReply(option, NBDReply.metaContext, w.bytes)
    }
    try sendOptionReply(option, NBDReply.ack)
    return .next
  }

  private struct Failure: Error {
    var reply: UInt32
    var message: String
  }

  /// Parses an export name and checks that the export exists.
  /// Whether a `strata:changed:` base names a point of the timeline (`at/SEQ`, `at/TIME`), which
  /// is checked when the view is made rather than looked up.
  private static func isPoint(_ name: String) -> Bool {
    switch NBDExportName(name) {
    case .pointInTime, .pointAtTime: true
    default: false
    }
  }

  /// What a `strata:changed:BASE` context compares with: a point of the timeline or a snapshot.
  private static func baseView(_ name: String, in image: StrataImage) throws -> SnapshotView {
    switch NBDExportName(name) {
    case .pointInTime(let seq): try image.view(atSeq: seq)
    case .pointAtTime(let ns, let text): try image.view(atSeq: seq(atOrBefore: ns, text, in: image))
    default: try image.snapshotView(name: name)
    }
  }

  /// The seq of the latest timeline point at or before `ns` (an `at/TIME` export).
  private static func seq(atOrBefore ns: UInt64, _ text: String, in image: StrataImage) throws -> UInt64 {
    guard let point = try image.point(atOrBefore: ns) else {
      throw StrataError(.notFound, "no point of the timeline at or before \(text)")
    }
    return point.seq
  }

  private func resolve(_ text: String) -> Result<NBDExportName, Failure> {
    guard let name = NBDExportName(text) else {
      return .failure(
        Failure(
          reply: NBDReply.errUnknown, message: "no export \"\(text)\": exports are head, snapshot/NAME and at/SEQ"))
    }
    switch name {
    case .head: return .success(name)
    // Whether the log still reaches that point shows when the view is made (`open`).
    case .pointInTime, .pointAtTime: return .success(name)
    case .snapshot(let s):
      return snapshotExists(s)
        ? .success(name) : .failure(Failure(reply: NBDReply.errUnknown, message: "no snapshot \"\(s)\""))
    }
  }

  /// Opens an export; for GO also the metadata contexts selected for the same export.
  private func open(_ text: String, contextsFor goName: String?) -> Result<OpenExport, Failure> {
    let name: NBDExportName
    switch resolve(text) {
    case .failure(let f): return .failure(f)
    case .success(let n): name = n
    }
    let wanted = goName != nil && selection?.export == name ? selection?.contexts ?? [] : []
    do {
      return .success(
        try image.with { img in
          let view: SnapshotView? =
            switch name {
            case .head: nil
            case .snapshot(let s): try img.snapshotView(name: s)
            case .pointInTime(let seq): try img.view(atSeq: seq)
            case .pointAtTime(let ns, let text): try img.view(atSeq: Self.seq(atOrBefore: ns, text, in: img))
            }
          let export = OpenExport(
            name: name, size: view?.size ?? img.size, readOnly: serverReadOnly || img.readOnly || view != nil,
            view: view)
          for (i, c) in wanted.enumerated() {
            var since: SnapshotView?
            if case .changed(let s) = c { since = try Self.baseView(s, in: img) }
            export.contexts.append(OpenExport.Context(id: UInt32(i + 1), context: c, since: since))
          }
          return export
        })
    } catch {
      return .failure(Failure(reply: NBDReply.errUnknown, message: "cannot open \(name.name): \(error)"))
    }
  }

  /// The snapshots NBD_OPT_LIST and LIST_META_CONTEXT show: the oldest `maxListedSnapshots`.
  private func listedSnapshots() throws -> [SnapshotInfo] {
    try image.with { try $0.snapshots(after: 0, limit: Self.maxListedSnapshots) }
  }

  private func snapshotExists(_ name: String) -> Bool {
    image.with { (try? $0.snapshot(named: name)) != nil }
  }

  private func listExports() throws -> [(String, String)] {
    let readOnly = image.with { $0.readOnly } || serverReadOnly
    return [("head", readOnly ? "the image (read-only)" : "the image")]
      + (try listedSnapshots()).map { ("snapshot/\($0.name)", "snapshot \($0.name) (seq \($0.seq), read-only)") }
  }

  private func sendInfo(_ option: UInt32, _ export: OpenExport, requested: [UInt16], name: String) throws {
    var w = NBDWriter()
    w.u16(NBDInfo.export)
    w.u64(export.size)
    w.u16(export.flags.rawValue)
    try sendOptionReply(option, NBDReply.info, w.bytes)
    // Sent unasked as well: a minimum of 1 asks nothing of clients that did not ask.
    let blockSize = image.with { $0.blockSize }
    w = NBDWriter()
    w.u16(NBDInfo.blockSize)
    w.u32(1)
    w.u32(UInt32(blockSize))
    w.u32(UInt32(NBDLimits.maxPayload))
    try sendOptionReply(option, NBDReply.info, w.bytes)
    if requested.contains(NBDInfo.name) {
      w = NBDWriter()
      w.u16(NBDInfo.name)
      w.raw(export.name.name.utf8)
      try sendOptionReply(option, NBDReply.info, w.bytes)
    }
    if requested.contains(NBDInfo.description) {
      w = NBDWriter()
      w.u16(NBDInfo.description)
      w.raw(export.description.utf8)
      try sendOptionReply(option, NBDReply.info, w.bytes)
    }
  }

  private func sendOptionReply(_ option: UInt32, _ type: UInt32, _ data: [UInt8] = []) throws {
    var w = NBDWriter()
    w.u64(NBDMagic.optionReply)
    w.u32(option)
    w.u32(type)
    w.u32(UInt32(data.count))
    w.raw(data)
    try send(w.bytes)
  }

  // MARK: Transmission

  private func transmit(_ export: OpenExport) throws {
    logger.debug("serving \(export.name.name) (\(export.size) bytes\(export.readOnly ? ", read-only" : ""))")
    do {
      // Made in this thread, which alone uses it (its io_uring is single-issuer).
      queue = try ImageQueue(shared: image, depth: Self.queueDepth, ownerThreadOnly: true)
    } catch {
      logger.warning("no image queue (\(error)); reads are synchronous")
    }
    currentView = export.view
    let header = UnsafeMutableRawBufferPointer.allocate(byteCount: NBDRequest.size, alignment: 8)
    defer { header.deallocate() }
    while true {
      // Replies wait while more requests are already here: one send (and one log write-out)
      // per burst instead of one per request.
      if inEnd - inStart < NBDRequest.size, try !fill(blocking: false) { try flushOutput() }
      if inStart == inEnd, try !fill(blocking: true) {
        throw Hangup("client closed the connection without NBD_CMD_DISC", orderly: true)
      }
      try receive(into: header)
      let request: NBDRequest
      do { request = try NBDRequest.decode(UnsafeRawBufferPointer(header)) } catch {
        throw Hangup("\(error)")
      }
      if request.command == .disconnect {
        try flushOutput()
        throw Hangup("client disconnected", orderly: true)
      }
      try handle(request, export)
    }
  }

  /// Flags each command accepts.
  private static func allowedFlags(_ command: NBDCommand) -> NBDCommandFlags {
    switch command {
    case .read: [.dontFragment]
    case .write, .trim: [.fua]
    case .writeZeroes: [.fua, .noHole, .fastZero]
    case .blockStatus: [.requestOne]
    case .flush, .cache, .disconnect: []
    }
  }

  private func handle(_ r: NBDRequest, _ export: OpenExport) throws {
    let length = Int(r.length)
    // A write's payload follows its header whatever the answer: read it first. One too large to
    // buffer cannot be skipped cheaply, and no client sends one after seeing the block size limit.
    var payload = UnsafeRawBufferPointer(start: nil, count: 0)
    if r.command == .write {
      guard length <= NBDLimits.maxPayload else {
        throw Hangup("write of \(length) bytes exceeds the \(NBDLimits.maxPayload)-byte limit")
      }
      payload = try receivePayload(length)
    }
    guard let command = r.command else { return try replyError(r, NBDErrno.invalid, "unknown command \(r.type)") }
    guard r.flags.isSubset(of: Self.allowedFlags(command)) else {
      return try replyError(r, NBDErrno.invalid, "flags 0x\(String(r.flags.rawValue, radix: 16)) on \(command)")
    }
    let end = r.offset.addingReportingOverflow(UInt64(r.length))
    let inRange = !end.overflow && end.partialValue <= export.size
    let fua = r.flags.contains(.fua)
    switch command {
    case .read:
      guard length > 0 && length <= NBDLimits.maxPayload else {
        return try replyError(r, NBDErrno.invalid, "read length \(length)")
      }
      guard inRange else { return try replyError(r, NBDErrno.invalid, "read past the end") }
      try replyRead(r, export)
    case .write:
      guard !export.readOnly else { return try replyError(r, NBDErrno.perm, "read-only export") }
      guard inRange else { return try replyError(r, NBDErrno.noSpace, "write past the end") }
      try modify(r, fua: fua) { try $0.write(payload, at: r.offset) }
    case .trim:
      guard !export.readOnly else { return try replyError(r, NBDErrno.perm, "read-only export") }
      guard inRange else { return try replyError(r, NBDErrno.noSpace, "trim past the end") }
      try modify(r, fua: fua) { try $0.discard(at: r.offset, length: UInt64(r.length)) }
    case .writeZeroes:
      // Zeroing only changes the map, so it is always fast (FAST_ZERO) and leaves blocks in the
      // zero state, which is not a hole (NO_HOLE holds either way).
      guard !export.readOnly else { return try replyError(r, NBDErrno.perm, "read-only export") }
      guard inRange else { return try replyError(r, NBDErrno.noSpace, "write zeroes past the end") }
      try modify(r, fua: fua) { try $0.writeZeroes(at: r.offset, length: UInt64(r.length)) }
    case .flush:
      // Group commit: the sync runs outside the image lock, shared with every other flush.
      do { try image.durably { _ in } } catch { return try replyError(r, error) }
      try replyOK(r)
    case .cache:
      guard inRange else { return try replyError(r, NBDErrno.invalid, "cache past the end") }
      try replyOK(r)
    case .blockStatus:
      guard structured, !export.contexts.isEmpty else {
        return try replyError(r, NBDErrno.invalid, "block status needs a metadata context")
      }
      guard length > 0, inRange else { return try replyError(r, NBDErrno.invalid, "block status range") }
      try replyBlockStatus(r, export)
    case .disconnect:
      preconditionFailure("handled by the caller")
    }
  }

  /// A change to the head; FUA makes it durable before the reply.
  private func modify(_ r: NBDRequest, fua: Bool, _ change: (StrataImage) throws -> Void) throws {
    // Reads batched before this request see the disk as it was before it: requests take effect
    // in the order they came (NBD would allow reordering; keeping the order costs a batch cut).
    try runPendingReads()
    do {
      if fua { try image.durably(change) } else { try image.with(change) }
    } catch {
      return try replyError(r, error)
    }
    wroteAnything = true
    logPending = !fua
    try replyOK(r)
  }

  private func replyRead(_ r: NBDRequest, _ export: OpenExport) throws {
    let length = Int(r.length)
    let head = structured ? NBDReplyHeader.chunkSize + 8 : NBDReplyHeader.simpleSize
    let total = head + length
    if queue != nil, length <= ImageQueue.maxRequestBytes {
      // The data goes where its whole blocks land page-aligned (the queue reads them O_DIRECT),
      // its header just before; the send skips the gaps.
      let skew = Int(r.offset % UInt64(Self.dataAlignment))
      func dataStart() -> Int {
        (outCount + head + Self.dataAlignment - 1) / Self.dataAlignment * Self.dataAlignment + skew
      }
      if dataStart() + length > output.count { try flushOutput() }
      precondition(dataStart() + length <= output.count, "output buffer smaller than one queued read")
      if pendingReads.isEmpty { batchStart = outCount }
      let start = dataStart() - head
      pendingReads.append(PendingRead(request: r, start: start, size: total, head: head))
      outCount = start + total
      if pendingReads.count == Self.queueDepth { try runPendingReads() }
      return
    }
    let direct: Bool
    let reply: UnsafeMutableRawBufferPointer
    if let b = try reserveReply(total) {
      reply = b
      direct = false
    } else {
      reply = largeBuffer(total)
      direct = true
    }
    let data = UnsafeMutableRawBufferPointer(rebasing: reply[head..<total])
    do {
      try image.with { img in
        if let view = export.view {
          try view.read(into: data, at: r.offset)
        } else {
          try img.read(into: data, at: r.offset)
        }
      }
    } catch {
      return try replyError(r, error)
    }
    storeReadHeader(into: reply, r)
    if direct {
      try sendAll(UnsafeRawBufferPointer(rebasing: reply[0..<total]))
    } else {
      outCount += total
    }
  }

  private func replyBlockStatus(_ r: NBDRequest, _ export: OpenExport) throws {
    let offset = r.offset
    let length = min(UInt64(r.length), Self.maxStatusSpan)
    let limit = r.flags.contains(.requestOne) ? 1 : Self.maxExtents
    var replies: [[(length: UInt32, flags: UInt32)]] = []
    do {
      try image.with { img in
        for c in export.contexts {
          var extents: [(length: UInt32, flags: UInt32)] = []
          func add(_ n: UInt64, _ flags: UInt32) {
            if let last = extents.last, last.flags == flags {
              extents[extents.count - 1].length += UInt32(n)
            } else {
              extents.append((UInt32(n), flags))
            }
          }
          switch c.context {
          case .allocation:
            let map =
              try export.view?.extents(from: offset, length: length) ?? img.extents(from: offset, length: length)
            for e in map {
              switch e.state {
              case .unallocated: add(e.length, NBDAllocation.hole | NBDAllocation.zero)
              case .zero: add(e.length, NBDAllocation.zero)
              case .data: add(e.length, 0)
              }
            }
          case .changed:
            guard let since = c.since else { preconditionFailure("changed context without its snapshot") }
            var position = offset
            for range in try img.changedRanges(since: since, in: export.view, from: offset, length: length) {
              if range.lowerBound > position { add(range.lowerBound - position, 0) }
              add(UInt64(range.count), NBDMetaContext.changedFlag)
              position = range.upperBound
            }
            if position < offset + length { add(offset + length - position, 0) }
          }
          replies.append(Array(extents.prefix(limit)))
        }
      }
    } catch {
      return try replyError(r, error)
    }
    for (i, extents) in replies.enumerated() {
      let size = NBDReplyHeader.chunkSize + 4 + 8 * extents.count
      guard let b = try reserveReply(size) else { preconditionFailure("block status reply larger than the buffer") }
      NBDReplyHeader.storeChunk(
        into: b, flags: i == replies.count - 1 ? NBDChunk.done : 0, type: NBDChunk.blockStatus, cookie: r.cookie,
        length: UInt32(size - NBDReplyHeader.chunkSize))
      b.storeBigEndian(export.contexts[i].id, at: NBDReplyHeader.chunkSize)
      for (j, e) in extents.enumerated() {
        b.storeBigEndian(e.length, at: NBDReplyHeader.chunkSize + 4 + 8 * j)
        b.storeBigEndian(e.flags, at: NBDReplyHeader.chunkSize + 8 + 8 * j)
      }
      outCount += size
    }
  }

  private func replyOK(_ r: NBDRequest) throws {
    guard let b = try reserveReply(NBDReplyHeader.simpleSize) else { preconditionFailure("output buffer too small") }
    NBDReplyHeader.storeSimple(into: b, error: 0, cookie: r.cookie)
    outCount += NBDReplyHeader.simpleSize
  }

  static func nbdError(for error: Error) -> UInt32 {
    switch (error as? StrataError)?.code {
    case .readOnly: NBDErrno.perm
    case .outOfRange, .invalidArgument: NBDErrno.invalid
    case .noSpace: NBDErrno.noSpace
    default: NBDErrno.io
    }
  }

  private func replyError(_ r: NBDRequest, _ error: Error) throws {
    logger.warning("request \(r.command.map { "\($0)" } ?? "\(r.type)") at \(r.offset)+\(r.length) failed: \(error)")
    try replyError(r, Self.nbdError(for: error), "\(error)")
  }

  private func replyError(_ r: NBDRequest, _ code: UInt32, _ message: String) throws {
    logger.debug("request \(r.type) at \(r.offset)+\(r.length): error \(code): \(message)")
    let text = Array(message.utf8.prefix(1024))
    guard let b = try reserveReply(NBDReplyHeader.chunkSize + 6 + text.count) else {
      preconditionFailure("output buffer too small")
    }
    outCount += storeError(into: b, r, code, text: text)
  }

  /// A simple reply, or a structured error chunk carrying `text`; returns its size.
  private func storeError(into b: UnsafeMutableRawBufferPointer, _ r: NBDRequest, _ code: UInt32, text: [UInt8]) -> Int
  {
    guard structured else {
      NBDReplyHeader.storeSimple(into: b, error: code, cookie: r.cookie)
      return NBDReplyHeader.simpleSize
    }
    let size = NBDReplyHeader.chunkSize + 6 + text.count
    NBDReplyHeader.storeChunk(
      into: b, flags: NBDChunk.done, type: NBDChunk.error, cookie: r.cookie,
      length: UInt32(size - NBDReplyHeader.chunkSize))
    b.storeBigEndian(code, at: NBDReplyHeader.chunkSize)
    b.storeBigEndian(UInt16(text.count), at: NBDReplyHeader.chunkSize + 4)
    for (i, c) in text.enumerated() { b[NBDReplyHeader.chunkSize + 6 + i] = c }
    return size
  }

  /// The header of a successful read's reply, before its data.
  private func storeReadHeader(into b: UnsafeMutableRawBufferPointer, _ r: NBDRequest) {
    if structured {
      NBDReplyHeader.storeChunk(
        into: b, flags: NBDChunk.done, type: NBDChunk.offsetData, cookie: r.cookie, length: 8 + r.length)
      b.storeBigEndian(r.offset, at: NBDReplyHeader.chunkSize)
    } else {
      NBDReplyHeader.storeSimple(into: b, error: 0, cookie: r.cookie)
    }
  }

  // MARK: Buffers and the socket

  /// Room for a reply after the batched reads are done (their replies come first in `output`).
  private func reserveReply(_ count: Int) throws -> UnsafeMutableRawBufferPointer? {
    try runPendingReads()
    return try reserveOutput(count)
  }

  /// `count` bytes at the end of the output buffer (sending what is there first if needed), or
  /// nil when a reply that large does not fit even an empty buffer.
  private func reserveOutput(_ count: Int) throws -> UnsafeMutableRawBufferPointer? {
    if output.count - outCount < count { try flushOutput() }
    guard output.count - outCount >= count else { return nil }
    return UnsafeMutableRawBufferPointer(rebasing: output[outCount..<(outCount + count)])
  }

  /// Sends the waiting replies; write replies only once the log holding the writes is in the file.
  private func flushOutput() throws {
    guard pendingReads.isEmpty else { return try runPendingReads() }
    try writeOutLogIfPending()
    if outCount > 0 {
      try sendAll(UnsafeRawBufferPointer(rebasing: output[0..<outCount]))
      outCount = 0
    }
  }

  /// Write replies go out only once the log holding the writes is in the file.
  private func writeOutLogIfPending() throws {
    guard logPending else { return }
    do { try image.writeOutLog() } catch {
      // The writes are not acknowledged: the client sees the connection end instead.
      throw Hangup("writing the log out failed: \(error)")
    }
    logPending = false
  }

  private struct PendingRead {
    var request: NBDRequest
    /// Where its reply lies in `output`: `size` bytes, the data after `head` header bytes.
    var start: Int
    var size: Int
    var head: Int
  }

  /// Reads every batched request into its reply's place in `output`, writes the headers and
  /// sends everything in `output` with one vectored send that skips the alignment gaps. A failed
  /// read's reply is an error without data (no longer than the room it had).
  private func runPendingReads() throws {
    guard !pendingReads.isEmpty, let queue else { return }
    var failed: [Int: UInt32] = [:]
    // The queue takes the image lock for map lookups only: the reads run outside it.
    do {
      var submitted = 0
      for (i, p) in pendingReads.enumerated() {
        let data = UnsafeMutableRawBufferPointer(rebasing: output[(p.start + p.head)..<(p.start + p.size)])
        do {
          try queue.submitRead(into: data, at: p.request.offset, tag: UInt64(i), view: currentView)
          submitted += 1
        } catch {
          failed[i] = Self.nbdError(for: error)
        }
      }
      var reaped = 0
      while reaped < submitted {
        let n = try queue.reap(completions, minimum: submitted - reaped)
        for c in completions[0..<n] {
          if let e = c.error { failed[Int(c.tag)] = Self.nbdError(for: e) }
        }
        reaped += n
      }
    } catch {
      // The queue's engine failed: nothing can be said about the reads in flight.
      throw Hangup("image queue failed: \(error)")
    }
    vectors.removeAll(keepingCapacity: true)
    if batchStart > 0 { vectors.append(iovec(iov_base: output.baseAddress!, iov_len: batchStart)) }
    for (i, p) in pendingReads.enumerated() {
      let at = UnsafeMutableRawBufferPointer(rebasing: output[p.start..<(p.start + p.size)])
      var length = p.size
      if let code = failed[i] {
        logger.warning("read at \(p.request.offset)+\(p.request.length) failed: errno \(code)")
        length = storeError(into: at, p.request, code, text: [])
      } else {
        storeReadHeader(into: at, p.request)
      }
      vectors.append(iovec(iov_base: at.baseAddress!, iov_len: length))
    }
    pendingReads.removeAll(keepingCapacity: true)
    try writeOutLogIfPending()
    try sendVectors()
    outCount = 0
  }

  /// Sends `vectors` (sendmsg until all is gone).
  private func sendVectors() throws {
    var first = 0
    while first < vectors.count {
      let sent = vectors.withUnsafeMutableBufferPointer { v in
        var message = msghdr()
        message.msg_iov = v.baseAddress! + first
        message.msg_iovlen = min(v.count - first, Int(UIO_MAXIOV))
        return sendmsg(fd, &message, Int32(MSG_NOSIGNAL))
      }
      if sent < 0 && errno == EINTR { continue }
      guard sent > 0 else { throw Hangup("send failed: \(String(cString: strerror(errno)))") }
      var left = sent
      while left > 0 {
        if left >= vectors[first].iov_len {
          left -= vectors[first].iov_len
          first += 1
        } else {
          vectors[first].iov_base += left
          vectors[first].iov_len -= left
          left = 0
        }
      }
    }
  }

  private func largeBuffer(_ count: Int) -> UnsafeMutableRawBufferPointer {
    if let l = large, l.count >= count { return UnsafeMutableRawBufferPointer(rebasing: l[0..<count]) }
    large?.deallocate()
    let l = UnsafeMutableRawBufferPointer.allocate(
      byteCount: NBDLimits.maxPayload + Self.readHeaderRoom, alignment: 4096)
    precondition(l.count >= count)
    large = l
    return UnsafeMutableRawBufferPointer(rebasing: l[0..<count])
  }

  /// A write's payload: in place in the input buffer when it is all there, else read into the
  /// large buffer. Valid until the next read from the socket.
  private func receivePayload(_ count: Int) throws -> UnsafeRawBufferPointer {
    if inEnd - inStart >= count {
      let p = UnsafeRawBufferPointer(rebasing: input[inStart..<(inStart + count)])
      inStart += count
      return p
    }
    let b = largeBuffer(count)
    try receive(into: b)
    return UnsafeRawBufferPointer(b)
  }

  /// Reads more from the socket into the input buffer; false when nothing came (non-blocking)
  /// or at the end of the stream (blocking).
  private func fill(blocking: Bool) throws -> Bool {
    if inStart == inEnd {
      inStart = 0
      inEnd = 0
    } else if inEnd == input.count {
      let n = inEnd - inStart
      input.baseAddress!.copyMemory(from: input.baseAddress! + inStart, byteCount: n)
      inStart = 0
      inEnd = n
    }
    while true {
      let n = recv(fd, input.baseAddress! + inEnd, input.count - inEnd, blocking ? 0 : Int32(MSG_DONTWAIT))
      if n > 0 {
        inEnd += n
        return true
      }
      if n == 0 { return false }
      if errno == EINTR { continue }
      if errno == EAGAIN || errno == EWOULDBLOCK { return false }
      throw Hangup("receive failed: \(String(cString: strerror(errno)))")
    }
  }

  /// Exactly `dest.count` bytes: first what is buffered, large remainders straight from the socket.
  private func receive(into dest: UnsafeMutableRawBufferPointer) throws {
    var done = 0
    while done < dest.count {
      let buffered = min(inEnd - inStart, dest.count - done)
      if buffered > 0 {
        (dest.baseAddress! + done).copyMemory(from: input.baseAddress! + inStart, byteCount: buffered)
        inStart += buffered
        done += buffered
        continue
      }
      if dest.count - done >= input.count / 2 {
        let n = recv(fd, dest.baseAddress! + done, dest.count - done, Int32(MSG_WAITALL))
        if n > 0 {
          done += n
        } else if n == 0 {
          throw Hangup("client closed the connection in the middle of a message")
        } else if errno != EINTR {
          throw Hangup("receive failed: \(String(cString: strerror(errno)))")
        }
      } else if try !fill(blocking: true) {
        throw Hangup("client closed the connection in the middle of a message")
      }
    }
  }

  private func receiveU32() throws -> UInt32 {
    var b = [UInt8](repeating: 0, count: 4)
    try b.withUnsafeMutableBytes { try receive(into: $0) }
    return try b.withUnsafeBytes { p in
      var r = NBDReader(p)
      return try r.u32()
    }
  }

  private func send(_ bytes: [UInt8]) throws {
    try bytes.withUnsafeBytes { try sendAll($0) }
  }

  private func sendAll(_ bytes: UnsafeRawBufferPointer) throws {
    var done = 0
    while done < bytes.count {
      let n = Glibc.send(fd, bytes.baseAddress! + done, bytes.count - done, Int32(MSG_NOSIGNAL))
      if n > 0 {
        done += n
      } else if n < 0 && errno == EINTR {
        continue
      } else {
        throw Hangup("send failed: \(String(cString: strerror(errno)))")
      }
    }
  }
}
