import StrataCore
import Synchronization

#if canImport(Glibc)
  import Glibc
#endif

// Deterministic, fault-injecting storage for crash tests and the simulator.
//
// The model follows TigerBeetle's testing storage and SQLite's test6.c: the storage keeps what a
// power loss would leave (`durable`) apart from the writes issued since the last `sync` (the
// "page cache"). Reads see the latest writes. `crash(mode:)` decides, with seeded randomness,
// which unsynced writes reached the platter: none, any subset, a prefix ending in a torn write,
// or any subset of their sectors. Faults (EIO, ENOSPC) can be injected on any operation, and a
// failed write may be partially applied, as a real disk's can.
//
// Asynchronous writes (`submitWrite`) stay in flight until `completeWrites`: reads do not see
// them yet (an io_uring read racing an in-flight O_DIRECT write may return the old bytes), a sync
// does not cover them, a crash may or may not keep them, an injected error surfaces at completion,
// and a caller that changes the buffer before completion is caught (`violations`).

// MARK: - Seeded randomness

/// SplitMix64: tiny, fast, and identical on every platform and toolchain, so a seed printed by a
/// failing test reproduces the run exactly. (The standard library's `random(in:using:)` may change
/// its algorithm between releases; these helpers never do.)
public struct SeededRandom: RandomNumberGenerator, Sendable {
  public private(set) var state: UInt64

  public init(seed: UInt64) { state = seed }

  public mutating func next() -> UInt64 {
    state &+= 0x9E37_79B9_7F4A_7C15
    var z = state
    z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
    z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
    return z ^ (z >> 31)
  }

  /// Uniform in `0..<bound` (bound > 0), without modulo bias.
  public mutating func below(_ bound: UInt64) -> UInt64 {
    precondition(bound > 0, "empty range")
    let limit = UInt64.max - UInt64.max % bound
    while true {
      let x = next()
      if x < limit { return x % bound }
    }
  }

  public mutating func uint64(in range: Range<UInt64>) -> UInt64 {
    precondition(!range.isEmpty, "empty range")
    return range.lowerBound + below(range.upperBound - range.lowerBound)
  }

  public mutating func uint64(in range: ClosedRange<UInt64>) -> UInt64 {
    let span = range.upperBound - range.lowerBound
    if span == .max { return next() }
    return range.lowerBound + below(span + 1)
  }

  public mutating func int(in range: Range<Int>) -> Int {
    precondition(!range.isEmpty, "empty range")
    return range.lowerBound + Int(below(UInt64(range.upperBound - range.lowerBound)))
  }

  public mutating func int(in range: ClosedRange<Int>) -> Int {
    range.lowerBound + Int(below(UInt64(range.upperBound - range.lowerBound) + 1))
  }

  /// A double in `0..<1` (53 random bits).
  public mutating func unit() -> Double { Double(next() >> 11) * 0x1p-53 }

  /// True with probability `p`.
  public mutating func chance(_ p: Double) -> Bool { p > 0 && unit() < p }

  public mutating func bool() -> Bool { next() & 1 == 1 }

  public mutating func element<C: Collection>(of c: C) -> C.Element? {
    guard !c.isEmpty else { return nil }
    return c[c.index(c.startIndex, offsetBy: int(in: 0..<c.count))]
  }

  public mutating func fill(_ buffer: UnsafeMutableRawBufferPointer) {
    var i = 0
    while i + 8 <= buffer.count {
      buffer.storeBytes(of: next(), toByteOffset: i, as: UInt64.self)
      i += 8
    }
    if i < buffer.count {
      var last = next()
      while i < buffer.count {
        buffer[i] = UInt8(truncatingIfNeeded: last)
        last >>= 8
        i += 1
      }
    }
  }

  public mutating func bytes(_ count: Int) -> [UInt8] {
    var out = [UInt8](repeating: 0, count: count)
    out.withUnsafeMutableBytes { fill($0) }
    return out
  }

  /// An independent stream derived from this one (for a component that must not perturb the
  /// caller's sequence when it draws more or fewer numbers).
  public mutating func split() -> SeededRandom { SeededRandom(seed: next()) }
}

/// A deterministic clock for `ImageOptions.clock`: every call advances by `step` nanoseconds.
public final class SimulatedClock: Sendable {
  private let ticks: Atomic<UInt64>
  public let step: UInt64

  public init(start: UInt64 = 1_700_000_000_000_000_000, step: UInt64 = 1_000) {
    ticks = Atomic(start)
    self.step = step
  }

  public func now() -> UInt64 { ticks.add(step, ordering: .relaxed).newValue }

  /// A closure to put in `ImageOptions.clock`.
  public var function: @Sendable () -> UInt64 { { [self] in now() } }
}

// MARK: - Simulated storage

/// A deterministic in-memory `ImageStorage` that can lose, tear and fail writes.
public final class SimulatedStorage: ImageStorage {
  public enum Operation: Sendable, Hashable, CaseIterable, CustomStringConvertible {
    case read, write, sync, setSize, preallocate

    public var description: String {
      switch self {
      case .read: "pread"
      case .write: "pwrite"
      case .sync: "fdatasync"
      case .setSize: "ftruncate"
      case .preallocate: "fallocate"
      }
    }
  }

  /// What a power loss leaves of the writes issued since the last completed `sync`.
  public enum CrashMode: Sendable, Hashable, CustomStringConvertible {
    /// None of them reached the disk.
    case dropUnsynced
    /// All of them did (a process crash, or a lucky power loss).
    case keepUnsynced
    /// Each reached the disk or not, independently (the disk reorders its cache freely).
    /// Survivors land in issue order, so a later write to the same bytes wins.
    case randomSubset
    /// The writes up to a random one reached the disk; that one is torn at a random multiple of
    /// `granularity` bytes (1: any byte, 512: a sector) and the rest are lost.
    case tornPrefix(granularity: Int)
    /// Every `sectorSize`-byte sector of every unsynced write reached the disk or not,
    /// independently: a large write is not atomic, and a disk persists sectors in any order.
    /// Each crash draws the survival probability from 50%, 90%, 99% and 99.9%: with most
    /// sectors surviving, a long chain of records persists with a hole somewhere in it.
    case randomSectors(sectorSize: Int)

    /// The modes a crash test should cycle through.
    public static let all: [CrashMode] = [
      .dropUnsynced, .keepUnsynced, .randomSubset, .tornPrefix(granularity: 1), .tornPrefix(granularity: 512),
      .randomSectors(sectorSize: 512),
    ]

    public var description: String {
      switch self {
      case .dropUnsynced: "drop-unsynced"
      case .keepUnsynced: "keep-unsynced"
      case .randomSubset: "random-subset"
      case .tornPrefix(let g): "torn-prefix(\(g))"
      case .randomSectors(let s): "random-sectors(\(s))"
      }
    }
  }

  /// How much of a write that fails with an injected error reaches the storage.
  public enum PartialWrite: Sendable, Hashable {
    /// Nothing.
    case none
    /// A random prefix, cut at a multiple of `granularity` bytes (possibly empty, never whole).
    case prefix(granularity: Int)
  }

  /// An injected fault: operations of kind `op` that match fail with `errno`.
  public struct Fault: Sendable {
    public var op: Operation
    public var errno: Int32
    /// Matching operations to let through before failing.
    public var skip: Int
    /// Failures left (Int.max: until cleared).
    public var remaining: Int
    /// Probability that a matching operation (after `skip`) fails.
    public var probability: Double
    public var partial: PartialWrite
    /// Byte range the operation must touch to match (nil: any); a sync or setSize always matches.
    public var range: Range<UInt64>?

    public init(
      op: Operation, errno: Int32 = EIO, skip: Int = 0, remaining: Int = 1, probability: Double = 1,
      partial: PartialWrite = .none, range: Range<UInt64>? = nil
    ) {
      self.op = op
      self.errno = errno
      self.skip = skip
      self.remaining = remaining
      self.probability = probability
      self.partial = partial
      self.range = range
    }
  }

  public struct Counters: Sendable, Equatable {
    public var reads = 0
    public var writes = 0
    public var syncs = 0
    public var setSizes = 0
    public var preallocations = 0
    public var bytesRead: UInt64 = 0
    public var bytesWritten: UInt64 = 0
    /// Operations that failed with an injected fault (or because the power was off).
    public var failures = 0
    /// Of which failed by an injected fault (not by a power loss).
    public var faultsHit = 0
    /// Of which reads (a read fails in the call that made it, never later).
    public var readFaultsHit = 0
    public var crashes = 0
    /// Calls made while the storage was closed or after a second `close` (misuse by the caller).
    public var misuse = 0
  }

  private enum Pending {
    case write(offset: UInt64, bytes: [UInt8])
    case setSize(UInt64)
    /// Preallocation: extends the file to at least this size, never shrinks it.
    case grow(UInt64)
  }

  /// A submitted write that has not completed.
  private struct InFlight {
    var offset: UInt64
    /// What will land: the bytes as submitted (a prefix only, for an injected torn failure).
    var bytes: [UInt8]
    /// The caller's buffer, compared with `bytes` at completion (nil after a failure or a clone).
    var source: UnsafeRawBufferPointer?
    var count: Int
    /// An injected failure reported at completion.
    var errno: Int32?
    /// `writeMark` right after this write was submitted.
    var mark: UInt64 = 0
  }

  /// What survives a power loss right now.
  public private(set) var durable: [UInt8]
  /// What reads see: `durable` with every pending operation applied.
  private var current: [UInt8]
  private var pending: [Pending] = []
  private var inFlight: [InFlight] = []
  /// Broken contracts seen, e.g. a submitted buffer changed before `completeWrites`.
  public private(set) var violations: [String] = []
  /// Report an injected failure of a submitted write at `completeWrites` (as io_uring does)
  /// rather than from `submitWrite` itself.
  public var deferWriteErrors = true
  /// Whether reads see writes still in flight. Off by default: an io_uring read may overtake
  /// an in-flight O_DIRECT write, so a caller must not rely on it.
  public var readsSeeWritesInFlight = false
  /// The randomness behind crashes and probabilistic faults; reseed it to replay a run.
  public var random: SeededRandom
  public private(set) var counters = Counters()
  public private(set) var isOpen = true
  /// Set by `powerFail(after:)` once the countdown ran out: every operation fails until `crash`.
  public private(set) var isPoweredOff = false
  public var faults: [Fault] = []
  /// When a sync fails, the kernel may drop the dirty pages it could not write and mark them
  /// clean (Linux does: "fsyncgate"). Then a later sync succeeds without them. Off by default.
  public var failedSyncDropsUnsynced = false
  private var powerFailCountdown: Int?
  private var powerFailCounts: Set<Operation> = [.write, .sync]

  public init(seed: UInt64, contents: [UInt8] = []) {
    random = SeededRandom(seed: seed)
    durable = contents
    current = contents
  }

  /// An independent copy of the whole state (durable bytes, unsynced writes, faults, counters):
  /// crash the copy in several ways while the original carries on. Without `seed` the copy's
  /// randomness is drawn from (and advances) the original's.
  public func clone(seed: UInt64? = nil) -> SimulatedStorage {
    let c = SimulatedStorage(seed: seed ?? random.next(), contents: durable)
    c.current = current
    c.pending = pending
    c.inFlight = inFlight.map {
      var w = $0
      w.source = nil
      return w
    }
    c.violations = violations
    c.deferWriteErrors = deferWriteErrors
    c.readsSeeWritesInFlight = readsSeeWritesInFlight
    c.counters = counters
    c.writeMark = writeMark
    c.isOpen = true
    c.isPoweredOff = isPoweredOff
    c.faults = faults
    c.failedSyncDropsUnsynced = failedSyncDropsUnsynced
    c.offersAnyThreadIO = offersAnyThreadIO
    c.powerFailCountdown = powerFailCountdown
    c.powerFailCounts = powerFailCounts
    return c
  }

  /// What reads see now (durable plus unsynced, completed writes).
  public var contents: [UInt8] { current }
  /// Unsynced operations, including writes still in flight.
  public var unsyncedWrites: Int { pending.count + inFlight.count }
  /// Submitted writes that have not completed.
  public var writesInFlight: Int { inFlight.count }

  /// An operation issued since the last completed sync.
  public enum UnsyncedOperation: Sendable, Hashable {
    case write(offset: UInt64, count: Int)
    case setSize(UInt64)
    /// A preallocation that extends the file to this size.
    case grow(UInt64)
  }

  /// The operations issued since the last completed sync, in order, then the writes in flight.
  public var unsyncedOperations: [UnsyncedOperation] {
    losable.map {
      switch $0 {
      case .write(let offset, let bytes): .write(offset: offset, count: bytes.count)
      case .setSize(let size): .setSize(size)
      case .grow(let size): .grow(size)
      }
    }
  }

  /// What a power loss may keep or lose: unsynced operations, then writes in flight.
  private var losable: [Pending] {
    pending + inFlight.map { .write(offset: $0.offset, bytes: $0.bytes) }
  }

  // MARK: Fault injection

  /// The next `count` operations of kind `op` (after letting `skip` through) fail with `errno`
  /// (EIO, ENOSPC, …); a failed write applies `partial` of its bytes first.
  public func failNext(
    _ op: Operation, errno: Int32 = EIO, count: Int = 1, skip: Int = 0, partial: PartialWrite = .none,
    range: Range<UInt64>? = nil
  ) {
    faults.append(Fault(op: op, errno: errno, skip: skip, remaining: count, partial: partial, range: range))
  }

  /// Every operation of kind `op` fails with probability `p` until `clearFaults`.
  public func failRandomly(_ op: Operation, probability p: Double, errno: Int32 = EIO, partial: PartialWrite = .none) {
    faults.append(Fault(op: op, errno: errno, remaining: .max, probability: p, partial: partial))
  }

  public func clearFaults() { faults.removeAll() }

  /// The power fails once `count` more operations of the kinds in `counting` have completed:
  /// from then on every operation throws until `crash(mode:)`.
  public func powerFail(after count: Int, counting: Set<Operation> = [.write, .sync]) {
    precondition(count >= 0)
    powerFailCountdown = count
    powerFailCounts = counting
    if count == 0 { isPoweredOff = true }
  }

  public func cancelPowerFail() { powerFailCountdown = nil }

  /// The injected fault that hits this operation, if any (consumes it).
  private func fault(for op: Operation, offset: UInt64, length: Int) -> Fault? {
    for i in faults.indices where faults[i].op == op && faults[i].remaining > 0 {
      if let r = faults[i].range, op == .write || op == .read {
        let end = offset + UInt64(length)
        guard offset < r.upperBound && end > r.lowerBound else { continue }
      }
      if faults[i].skip > 0 {
        faults[i].skip -= 1
        continue
      }
      if faults[i].probability < 1 && !random.chance(faults[i].probability) { continue }
      let hit = faults[i]
      counters.faultsHit += 1
      if op == .read { counters.readFaultsHit += 1 }
      if faults[i].remaining != .max { faults[i].remaining -= 1 }
      faults.removeAll { $0.remaining == 0 }
      return hit
    }
    return nil
  }

  private func error(_ op: Operation, _ e: Int32, _ detail: String) -> StrataError {
    let reason = String(cString: strerror(e))
    let code: StrataError.Code = (e == ENOSPC || e == EDQUOT) ? .noSpace : .io
    return StrataError(code, "\(op) \(detail) on simulated storage: \(reason)", errno: e)
  }

  /// Common entry checks: open, powered; then the injected fault for the operation, if any.
  private func enter(_ op: Operation, offset: UInt64 = 0, length: Int = 0, injectFaults: Bool = true) throws -> Fault? {
    guard isOpen else {
      counters.misuse += 1
      throw StrataError(.io, "\(op) on closed simulated storage", errno: EBADF)
    }
    if isPoweredOff {
      counters.failures += 1
      throw StrataError(.io, "\(op) failed: simulated power loss", errno: EIO)
    }
    return injectFaults ? fault(for: op, offset: offset, length: length) : nil
  }

  /// Counts a completed operation toward a scheduled power failure.
  private func completed(_ op: Operation) {
    guard let n = powerFailCountdown, powerFailCounts.contains(op) else { return }
    if n <= 1 {
      powerFailCountdown = nil
      isPoweredOff = true
    } else {
      powerFailCountdown = n - 1
    }
  }

  // MARK: ImageStorage

  public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws -> Int {
    if let f = try enter(.read, offset: offset, length: buffer.count) {
      counters.failures += 1
      throw error(.read, f.errno, "at \(offset) (+\(buffer.count) bytes)")
    }
    counters.reads += 1
    var end = UInt64(current.count)
    if readsSeeWritesInFlight { for w in inFlight { end = max(end, w.offset + UInt64(w.bytes.count)) } }
    guard offset < end else { return 0 }
    let n = Int(min(UInt64(buffer.count), end - offset))
    let stored = max(0, min(n, current.count - Int(min(offset, UInt64(current.count)))))
    current.withUnsafeBytes { src in
      UnsafeMutableRawBufferPointer(rebasing: buffer[..<stored])
        .copyMemory(from: UnsafeRawBufferPointer(rebasing: src[Int(offset)..<(Int(offset) + stored)]))
    }
    UnsafeMutableRawBufferPointer(rebasing: buffer[stored..<n]).initializeMemory(as: UInt8.self, repeating: 0)
    if readsSeeWritesInFlight {
      for w in inFlight {
        let lo = max(offset, w.offset)
        let hi = min(offset + UInt64(n), w.offset + UInt64(w.bytes.count))
        guard lo < hi else { continue }
        w.bytes.withUnsafeBytes { src in
          UnsafeMutableRawBufferPointer(rebasing: buffer[Int(lo - offset)..<Int(hi - offset)])
            .copyMemory(from: UnsafeRawBufferPointer(rebasing: src[Int(lo - w.offset)..<Int(hi - w.offset)]))
        }
      }
    }
    counters.bytesRead += UInt64(n)
    completed(.read)
    return n
  }

  public func write(_ bytes: UnsafeRawBufferPointer, at offset: UInt64) throws {
    if let f = try enter(.write, offset: offset, length: bytes.count) {
      counters.failures += 1
      if case .prefix(let g) = f.partial, bytes.count > 0 {
        let keep = cut(offset: offset, count: bytes.count, granularity: g)
        if keep > 0 { issue(.write(offset: offset, bytes: Array(UnsafeRawBufferPointer(rebasing: bytes[..<keep])))) }
      }
      throw error(.write, f.errno, "at \(offset) (+\(bytes.count) bytes)")
    }
    counters.writes += 1
    counters.bytesWritten += UInt64(bytes.count)
    issue(.write(offset: offset, bytes: Array(bytes)))
    completed(.write)
  }

  /// Starts a write: it lands at `completeWrites` (reads do not see it before), a crash first
  /// may or may not keep it, and `bytes` must not change until then.
  public func submitWrite(_ bytes: UnsafeRawBufferPointer, at offset: UInt64) throws {
    if let f = try enter(.write, offset: offset, length: bytes.count) {
      counters.failures += 1
      var keep = 0
      if case .prefix(let g) = f.partial, bytes.count > 0 {
        keep = cut(offset: offset, count: bytes.count, granularity: g)
      }
      let prefix = Array(UnsafeRawBufferPointer(rebasing: bytes[..<keep]))
      guard deferWriteErrors else {
        if keep > 0 { issue(.write(offset: offset, bytes: prefix)) }
        throw error(.write, f.errno, "at \(offset) (+\(bytes.count) bytes)")
      }
      writeMark += 1
      inFlight.append(
        InFlight(offset: offset, bytes: prefix, source: nil, count: bytes.count, errno: f.errno, mark: writeMark))
      completed(.write)
      return
    }
    counters.writes += 1
    counters.bytesWritten += UInt64(bytes.count)
    writeMark += 1
    inFlight.append(
      InFlight(offset: offset, bytes: Array(bytes), source: bytes, count: bytes.count, errno: nil, mark: writeMark))
    completed(.write)
  }

  /// Counts the writes submitted so far (`completeWrites(through:)`).
  public private(set) var writeMark: UInt64 = 0

  /// Lands every write in flight, in submission order; throws the first injected failure.
  public func completeWrites() throws {
    try completeWrites(through: writeMark)
  }

  /// Lands the writes in flight submitted up to `mark`, in submission order (later ones stay in
  /// flight); throws the first injected failure among them.
  public func completeWrites(through mark: UInt64) throws {
    _ = try enter(.write, injectFaults: false)
    var first: StrataError?
    let landing = inFlight.prefix { $0.mark <= mark }
    for w in landing {
      if let source = w.source, w.count > 0,
        !w.bytes.withUnsafeBytes({ memcmp($0.baseAddress!, source.baseAddress!, w.count) == 0 })
      {
        violations.append("the buffer of the \(w.count)-byte write at \(w.offset) changed before the write completed")
        counters.misuse += 1
      }
      if !w.bytes.isEmpty { issue(.write(offset: w.offset, bytes: w.bytes)) }
      if let e = w.errno, first == nil { first = error(.write, e, "at \(w.offset) (+\(w.count) bytes, completed)") }
    }
    inFlight.removeFirst(landing.count)
    if let first { throw first }
  }

  /// Makes the completed writes durable; writes still in flight are not covered.
  public func sync() throws {
    if let f = try enter(.sync) {
      counters.failures += 1
      if failedSyncDropsUnsynced {
        // The dirty pages are gone from the write-back queue but stay in the cache: reads still
        // see them, a crash loses them, and the next sync succeeds without writing them.
        pending.removeAll()
      }
      throw error(.sync, f.errno, "")
    }
    counters.syncs += 1
    for p in pending { Self.apply(p, to: &durable) }
    pending.removeAll()
    completed(.sync)
  }

  public func size() throws -> UInt64 {
    guard isOpen else {
      counters.misuse += 1
      throw StrataError(.io, "fstat on closed simulated storage", errno: EBADF)
    }
    if isPoweredOff { throw StrataError(.io, "fstat failed: simulated power loss", errno: EIO) }
    return UInt64(current.count)
  }

  public func setSize(_ size: UInt64) throws {
    if let f = try enter(.setSize) {
      counters.failures += 1
      throw error(.setSize, f.errno, "to \(size) bytes")
    }
    counters.setSizes += 1
    issue(.setSize(size))
    completed(.setSize)
  }

  /// Like fallocate: extends the file (with zeros) to cover the range, never shrinks it. The new
  /// size is durable only after a sync, like any other change.
  public func preallocate(at offset: UInt64, length: UInt64) throws {
    if let f = try enter(.preallocate) {
      counters.failures += 1
      throw error(.preallocate, f.errno, "at \(offset) (+\(length) bytes)")
    }
    counters.preallocations += 1
    if offset + length > UInt64(current.count) { issue(.grow(offset + length)) }
    completed(.preallocate)
  }

  /// Offer `anyThreadIO`, the write and sync that group commit runs outside the image lock
  /// (`SharedImage.durably`). Off by default: the image then writes and syncs under its lock.
  /// The simulator calls them from its one thread, so runs stay deterministic.
  public var offersAnyThreadIO = false
  /// Called before each `anyThreadIO` write or sync (outside the image lock): the simulator
  /// reads the image there, as other threads may while a group sync runs.
  public var beforeAnyThreadIO: ((Operation) -> Void)?

  public var anyThreadIO: AnyThreadIO? {
    guard offersAnyThreadIO else { return nil }
    let storage = UncheckedStorage(self)
    return AnyThreadIO(
      write: { bytes, offset in
        storage.value.beforeAnyThreadIO?(.write)
        try storage.value.write(bytes, at: offset)
      },
      sync: {
        storage.value.beforeAnyThreadIO?(.sync)
        try storage.value.sync()
      })
  }

  public func close() throws {
    guard isOpen else {
      counters.misuse += 1
      throw StrataError(.io, "simulated storage closed twice", errno: EBADF)
    }
    // As FileStorage does (and the kernel would anyway), writes in flight land before the file
    // is closed. Closing does not make them durable: unsynced writes stay unsynced.
    let landed = Result { try completeWrites() }
    isOpen = false
    try landed.get()
  }

  // MARK: Crash and reopen

  /// Allows a new `StrataImage.open` after a clean `close` (nothing is lost).
  public func reopen() {
    isOpen = true
  }

  /// Loses power: what survives of the unsynced writes follows `mode` and the seeded
  /// randomness. Afterwards the storage is open again with no faults and no unsynced writes,
  /// as after a reboot. Returns how many unsynced operations (whole or torn) survived.
  @discardableResult
  public func crash(mode: CrashMode) -> Int {
    let pending = losable
    var survived = 0
    switch mode {
    case .dropUnsynced:
      break
    case .keepUnsynced:
      for p in pending { Self.apply(p, to: &durable) }
      survived = pending.count
    case .randomSubset:
      for p in pending where random.bool() {
        Self.apply(p, to: &durable)
        survived += 1
      }
    case .tornPrefix(let g):
      if !pending.isEmpty {
        let torn = random.int(in: 0..<pending.count)
        for p in pending[..<torn] { Self.apply(p, to: &durable) }
        survived = torn
        switch pending[torn] {
        case .write(let offset, let bytes):
          let keep = cut(offset: offset, count: bytes.count, granularity: g)
          if keep > 0 {
            Self.apply(.write(offset: offset, bytes: Array(bytes[..<keep])), to: &durable)
            survived += 1
          }
        case .setSize, .grow:
          if random.bool() {
            Self.apply(pending[torn], to: &durable)
            survived += 1
          }
        }
      }
    case .randomSectors(let s):
      precondition(s > 0)
      let survival = random.element(of: [0.5, 0.9, 0.99, 0.999])!
      for p in pending {
        switch p {
        case .setSize, .grow:
          if random.bool() {
            Self.apply(p, to: &durable)
            survived += 1
          }
        case .write(let offset, let bytes):
          // Sectors are aligned to absolute offsets, as on a disk.
          var start = 0
          var any = false
          while start < bytes.count {
            let absolute = offset + UInt64(start)
            let end = min(bytes.count, start + s - Int(absolute % UInt64(s)))
            if random.chance(survival) {
              Self.apply(.write(offset: absolute, bytes: Array(bytes[start..<end])), to: &durable)
              any = true
            }
            start = end
          }
          if any { survived += 1 }
        }
      }
    }
    rebooted()
    return survived
  }

  /// Loses power with an exact outcome: the first `count` unsynced operations reached the disk,
  /// then the first `bytes` bytes of the next one (a write), and nothing after. Exhaustive tests
  /// use it to tear a flush at every sector.
  public func crash(keepingFirst count: Int, thenBytes bytes: Int = 0) {
    let pending = losable
    precondition(count >= 0 && count <= pending.count)
    for p in pending[..<count] { Self.apply(p, to: &durable) }
    if bytes > 0, count < pending.count, case .write(let offset, let data) = pending[count] {
      Self.apply(.write(offset: offset, bytes: Array(data[..<min(bytes, data.count)])), to: &durable)
    }
    rebooted()
  }

  /// Loses power with an exact outcome: of the unsynced operations (in the order of
  /// `unsyncedOperations`), those in `keeping` reach the disk, each whole or only its first
  /// `keeping[i]` bytes (a write), in issue order; the rest are lost.
  public func crash(keepingOperations keeping: [Int: Int]) {
    let pending = losable
    for (i, p) in pending.enumerated() {
      guard let bytes = keeping[i] else { continue }
      if case .write(let offset, let data) = p, bytes < data.count {
        if bytes > 0 { Self.apply(.write(offset: offset, bytes: Array(data[..<bytes])), to: &durable) }
      } else {
        Self.apply(p, to: &durable)
      }
    }
    rebooted()
  }

  private func rebooted() {
    pending.removeAll()
    inFlight.removeAll()
    current = durable
    isPoweredOff = false
    powerFailCountdown = nil
    faults.removeAll()
    isOpen = true
    counters.crashes += 1
  }

  /// A random number of bytes to keep of a write, in `0..<count`, ending on an absolute
  /// multiple of `granularity` (a torn write never completes).
  private func cut(offset: UInt64, count: Int, granularity g: Int) -> Int {
    precondition(g > 0)
    // Boundaries b with offset <= b < offset+count and b % g == 0, plus the start itself.
    let g64 = UInt64(g)
    let firstBoundary = (offset + g64 - 1) / g64 * g64
    let end = offset + UInt64(count)
    var choices = 1  // keep nothing
    if firstBoundary < end {
      let inside = (end - 1 - firstBoundary) / g64 + 1
      choices += Int(inside) - (firstBoundary == offset ? 1 : 0)
    }
    let pick = random.int(in: 0..<choices)
    if pick == 0 { return 0 }
    let firstInside = firstBoundary == offset ? firstBoundary + g64 : firstBoundary
    return Int(firstInside + UInt64(pick - 1) * g64 - offset)
  }

  private func issue(_ p: Pending) {
    Self.apply(p, to: &current)
    pending.append(p)
  }

  private static func apply(_ p: Pending, to image: inout [UInt8]) {
    switch p {
    case .grow(let size):
      if Int(size) > image.count { image += [UInt8](repeating: 0, count: Int(size) - image.count) }
    case .setSize(let size):
      let n = Int(size)
      if n < image.count {
        image.removeSubrange(n...)
      } else if n > image.count {
        image += [UInt8](repeating: 0, count: n - image.count)
      }
    case .write(let offset, let bytes):
      let start = Int(offset)
      let end = start + bytes.count
      if end > image.count { image += [UInt8](repeating: 0, count: end - image.count) }
      image.withUnsafeMutableBytes { dst in
        bytes.withUnsafeBytes { src in
          UnsafeMutableRawBufferPointer(rebasing: dst[start..<end]).copyMemory(from: src)
        }
      }
    }
  }
}

/// The storage inside `AnyThreadIO`'s closures: it is not thread-safe, and needs not be, since
/// the simulator calls them from the one thread that drives the image.
private struct UncheckedStorage: @unchecked Sendable {
  let value: SimulatedStorage
  init(_ value: SimulatedStorage) { self.value = value }
}
