import CStrataLinux
import VhostProtocol

#if canImport(Glibc)
  import Glibc
#endif

/// The shared memory of VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD (vhost-user.rst, "Inflight I/O
/// tracking"): the back-end records which chains it has popped and not yet returned, the
/// front-end keeps the memory across a back-end crash and hands it to the next back-end
/// (SET_INFLIGHT_FD), which resubmits those chains.
///
/// Layout, as libvhost-user's (so that the area means the same to any back-end a front-end
/// hands it to): `numQueues` regions of `regionSize(queueSize)` bytes each, back to back from
/// the mapping's start. One split-ring region (VuVirtqInflight / QueueRegionSplit):
///
///     offset 0   features         u64   (0)
///     offset 8   version          u16   (0: not initialized yet; 1)
///     offset 10  desc_num         u16   (the area's queue size)
///     offset 12  last_batch_head  u16   (head of the used entry being published)
///     offset 14  used_idx         u16   (used->idx once that entry is fully recorded)
///     offset 16  desc[desc_num], 16 bytes each (VuDescStateSplit):
///                inflight u8 @0, padding[5] @1, next u16 @6, counter u64 @8
///
/// Packed rings use QueueRegionPacked instead (vhost-user.rst; libvhost-user has no packed
/// layout, DPDK's rte_vhost_inflight_info_packed is this one), see `PackedInflightRing`:
///
///     offset 0   features u64, version u16 @8, desc_num u16 @10, free_head u16 @12,
///                old_free_head u16 @14, used_idx u16 @16, old_used_idx u16 @18,
///                used_wrap_counter u8 @20, old_used_wrap_counter u8 @21, padding[7] @22
///     offset 32  desc[desc_num], 32 bytes each (DescStatePacked, 8-byte aligned):
///                inflight u8 @0, padding u8 @1, next u16 @2, last u16 @4, num u16 @6,
///                counter u64 @8, id u16 @16, flags u16 @18, len u32 @20, addr u64 @24
///
/// All fields are little-endian (the only byte order this back-end runs on).
final class InflightArea: @unchecked Sendable {
  static let regionAlignment = 64
  static let headerSize = 16
  static let descStateSize = 16
  static let packedHeaderSize = 32
  static let packedDescStateSize = 32
  static let currentVersion: UInt16 = 1
  /// Largest area accepted from a front-end (64 queues of 32768 entries need 32 MiB split; this
  /// back-end's queues have at most 1024, 2 MiB packed for 64 queues).
  static let maxMmapSize: UInt64 = 64 << 20

  /// Bytes of one queue's region. Split: libvhost-user's vu_inflight_queue_size, which rounds
  /// `16 * queueSize + 2` up to 64 bytes (that always leaves room for the 16-byte header).
  /// Packed: the 32-byte header and `queueSize` 32-byte entries, rounded up to 64 bytes; the
  /// same as DPDK's get_pervq_shm_size_packed (`32 * queueSize + 29` rounded up to 64), since
  /// 32 * queueSize is a multiple of 32. The back-end alone decides this: a front-end (QEMU)
  /// maps whatever mmap_size GET_INFLIGHT_FD answers and hands the same area back.
  static func regionSize(queueSize: Int, packed: Bool = false) -> Int {
    let bytes =
      packed
      ? packedHeaderSize + packedDescStateSize * queueSize
      : descStateSize * queueSize + 2
    return (bytes + regionAlignment - 1) / regionAlignment * regionAlignment
  }

  static func mmapSize(numQueues: Int, queueSize: Int, packed: Bool = false) -> Int {
    numQueues * regionSize(queueSize: queueSize, packed: packed)
  }

  /// The descriptor to hand to the front-end (GET_INFLIGHT_FD), or -1 for an area it gave us.
  let fd: Int32
  let mapping: UnsafeMutableRawPointer
  let mappingLength: Int
  /// Where the first region starts (mmap_offset's part below a page; 0 here).
  let start: UnsafeMutableRawPointer
  let numQueues: Int
  let queueSize: Int
  /// Whether the regions are QueueRegionPacked ones (the rings were negotiated packed when the
  /// area was made or handed over).
  let packed: Bool

  private init(
    fd: Int32, mapping: UnsafeMutableRawPointer, length: Int, numQueues: Int, queueSize: Int, packed: Bool
  ) {
    self.fd = fd
    self.mapping = mapping
    self.mappingLength = length
    self.start = mapping
    self.numQueues = numQueues
    self.queueSize = queueSize
    self.packed = packed
  }

  deinit {
    munmap(mapping, mappingLength)
    if fd >= 0 { close(fd) }
  }

  /// One queue's area in memory mapped by the caller (`InflightRecovery`); unmapped at deinit.
  convenience init(anonymous mapping: UnsafeMutableRawPointer, length: Int, queueSize: Int, packed: Bool) {
    precondition(length >= Self.regionSize(queueSize: queueSize, packed: packed))
    self.init(fd: -1, mapping: mapping, length: length, numQueues: 1, queueSize: queueSize, packed: packed)
  }

  /// GET_INFLIGHT_FD: a new zero-filled memfd for `numQueues` queues of `queueSize` entries,
  /// mapped here. The area keeps its descriptor open (the reply carries it).
  static func allocate(numQueues: Int, queueSize: Int, packed: Bool = false) throws(VhostError) -> InflightArea {
    let size = mmapSize(numQueues: numQueues, queueSize: queueSize, packed: packed)
    let fd = strata_memfd("strata-vhost-inflight")
    guard fd >= 0 else {
      throw .invalid("memfd_create for the inflight area failed: \(String(cString: strerror(errno)))")
    }
    // A new memfd reads as zeroes: every region starts with version 0 (not initialized).
    // Sealed: the front-end holds the fd and hands it to the next back-end, which maps it; a
    // front-end that shrank it would make both fault (SIGBUS) on their next access.
    guard ftruncate(fd, off_t(size)) == 0, strata_seal_size(fd) == 0 else {
      let e = errno
      close(fd)
      throw .invalid("sizing the \(size)-byte inflight area failed: \(String(cString: strerror(e)))")
    }
    guard let p = mmap(nil, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0), p != MAP_FAILED else {
      let e = errno
      close(fd)
      throw .invalid("mmap of the \(size)-byte inflight area failed: \(String(cString: strerror(e)))")
    }
    return InflightArea(fd: fd, mapping: p, length: size, numQueues: numQueues, queueSize: queueSize, packed: packed)
  }

  /// SET_INFLIGHT_FD: maps the front-end's area after checking its description against the
  /// limits and against the file (a mapping past the end of a file raises SIGBUS when touched).
  /// Areas a Strata back-end made are size-sealed, so the check stays true. Does not keep `fd`
  /// (the caller closes it).
  static func map(
    fd: Int32, _ d: InflightDescription, maxQueues: Int, maxQueueSize: Int, packed: Bool = false
  ) throws(VhostError) -> InflightArea {
    let numQueues = Int(d.numQueues)
    let queueSize = Int(d.queueSize)
    guard numQueues >= 1, numQueues <= maxQueues else {
      throw .invalid("inflight area for \(numQueues) queues; this back-end has \(maxQueues)")
    }
    guard queueSize >= 1, queueSize <= maxQueueSize else {
      throw .invalid("inflight area for queues of \(queueSize) entries; at most \(maxQueueSize)")
    }
    let needed = UInt64(mmapSize(numQueues: numQueues, queueSize: queueSize, packed: packed))
    guard d.mmapSize >= needed, d.mmapSize <= maxMmapSize else {
      throw .invalid("inflight mmap_size \(d.mmapSize) for \(numQueues) x \(queueSize) entries (needs \(needed))")
    }
    let page = UInt64(sysconf(Int32(_SC_PAGESIZE)))
    guard d.mmapOffset % page == 0, d.mmapOffset <= UInt64(Int.max / 2) else {
      throw .invalid("inflight mmap_offset \(d.mmapOffset) is not a page-aligned offset")
    }
    var st = stat()
    guard fstat(fd, &st) == 0 else {
      throw .invalid("fstat of the inflight fd failed: \(String(cString: strerror(errno)))")
    }
    guard (st.st_mode & S_IFMT) == S_IFREG else { throw .invalid("the inflight fd is not a memfd or file") }
    guard UInt64(st.st_size) >= d.mmapOffset + d.mmapSize else {
      throw .invalid(
        "inflight area of \(d.mmapSize) bytes at offset \(d.mmapOffset) exceeds its \(st.st_size)-byte file")
    }
    let length = Int(d.mmapSize)
    guard let p = mmap(nil, length, PROT_READ | PROT_WRITE, MAP_SHARED, fd, off_t(d.mmapOffset)), p != MAP_FAILED else {
      throw .invalid("mmap of the \(length)-byte inflight area failed: \(String(cString: strerror(errno)))")
    }
    let area = InflightArea(
      fd: -1, mapping: p, length: length, numQueues: numQueues, queueSize: queueSize, packed: packed)
    // As libvhost-user does on SET_INFLIGHT_FD: every region says how many entries it has
    // (desc_num is at offset 10 in both layouts).
    for q in 0..<numQueues {
      area.regionStart(q).storeBytes(of: UInt16(queueSize).littleEndian, toByteOffset: 10, as: UInt16.self)
    }
    return area
  }

  func regionStart(_ queue: Int) -> UnsafeMutableRawPointer {
    precondition(queue >= 0 && queue < numQueues)
    return start + queue * Self.regionSize(queueSize: queueSize, packed: packed)
  }

  var wireDescription: InflightDescription {
    InflightDescription(
      mmapSize: UInt64(mappingLength), mmapOffset: 0, numQueues: UInt16(numQueues), queueSize: UInt16(queueSize))
  }
}

/// What a queue worker asks of an inflight region, split or packed alike.
protocol InflightResumption: AnyObject {
  /// Chains in flight when the previous back-end stopped, still to resubmit.
  var resubmissionsLeft: Int { get }
  /// Set when the ring resumed an initialized region (see `InflightRing.resumed`).
  var resumed: Bool { get set }
}

/// One virtqueue's inflight region and the back-end's bookkeeping for it: the pop counter and
/// the chains to resubmit. Lives as long as the connection's area (across the worker restarts
/// of SET_MEM_TABLE and the like); used by the queue's worker thread only while it runs.
@_spi(Fuzzing) public final class InflightRing: InflightResumption, @unchecked Sendable {
  let area: InflightArea
  let queue: Int
  private let region: UnsafeMutableRawPointer
  /// Entries in `desc[]`: the area's queue size (never read back from shared memory).
  let descNum: Int
  /// The next counter value to stamp on a popped head.
  private(set) var counter: UInt64 = 0
  /// Heads that were in flight when the previous back-end stopped, oldest pop first.
  var resubmit: [UInt16] = []
  /// Set when the ring resumed an initialized region (a back-end restart): the worker then
  /// signals the call eventfd once, since a used entry may have been published without a
  /// notification just before the previous back-end died.
  var resumed = false
  var resubmissionsLeft: Int { resubmit.count }

  init(area: InflightArea, queue: Int) {
    self.area = area
    self.queue = queue
    self.region = area.regionStart(queue)
    self.descNum = area.queueSize
  }

  // MARK: Fields

  private var versionPointer: UnsafeMutablePointer<UInt16> { (region + 8).assumingMemoryBound(to: UInt16.self) }
  private var lastBatchHeadPointer: UnsafeMutablePointer<UInt16> {
    (region + 12).assumingMemoryBound(to: UInt16.self)
  }
  private var usedIdxPointer: UnsafeMutablePointer<UInt16> { (region + 14).assumingMemoryBound(to: UInt16.self) }
  private func desc(_ i: Int) -> UnsafeMutableRawPointer {
    region + InflightArea.headerSize + InflightArea.descStateSize * i
  }
  /// `inflight` and padding[0] as one u16, so that the flag can be stored with release ordering
  /// (the padding stays 0).
  private func flagPointer(_ i: Int) -> UnsafeMutablePointer<UInt16> { desc(i).assumingMemoryBound(to: UInt16.self) }

  var version: UInt16 { UInt16(littleEndian: strata_load_acquire_u16(versionPointer)) }
  var recordedUsedIdx: UInt16 { UInt16(littleEndian: strata_load_acquire_u16(usedIdxPointer)) }
  func isInflight(_ head: Int) -> Bool { desc(head).load(as: UInt8.self) != 0 }
  func counter(of head: Int) -> UInt64 {
    UInt64(littleEndian: desc(head).loadUnaligned(fromByteOffset: 8, as: UInt64.self))
  }

  // MARK: Start (vu_check_queue_inflights)

  struct Recovery {
    /// The avail index to resume from, or nil when the region was not initialized (then the
    /// SET_VRING_BASE value stands).
    var base: UInt16?
    var resubmitted: Int
    /// In-flight marks on heads past the ring's size, cleared (a corrupt or foreign region).
    var discarded: Int
    var repairedLastBatch: Bool
  }

  /// Called when the ring starts after SET_VRING_KICK (or a new area), with the used index in
  /// guest memory. A region never initialized is initialized; otherwise the entry of a used
  /// element published but not yet recorded (last_batch_head) is cleared, the in-flight heads
  /// are collected in counter order for resubmission and the ring resumes at
  /// used_idx + in-flight count, whatever SET_VRING_BASE said: the front-end of a crashed
  /// back-end can only give the used index.
  func recover(ringSize: Int, usedIdx: UInt16) -> Recovery {
    precondition(ringSize <= descNum)
    resubmit = []
    resumed = false
    if version == 0 {
      // A fresh (or reset) region: nothing in it means anything yet.
      for i in 0..<descNum { desc(i).initializeMemory(as: UInt8.self, repeating: 0, count: InflightArea.descStateSize) }
      lastBatchHeadPointer.pointee = 0
      strata_store_release_u16(usedIdxPointer, usedIdx.littleEndian)
      region.storeBytes(of: UInt64(0), as: UInt64.self)
      strata_store_release_u16(versionPointer, InflightArea.currentVersion.littleEndian)
      counter = 0
      return Recovery(base: nil, resubmitted: 0, discarded: 0, repairedLastBatch: false)
    }
    var repaired = false
    if recordedUsedIdx != usedIdx {
      // The previous back-end published a used entry and died before clearing its head.
      let head = Int(UInt16(littleEndian: lastBatchHeadPointer.pointee))
      if head < descNum { strata_store_release_u16(flagPointer(head), 0) }
      strata_store_release_u16(usedIdxPointer, usedIdx.littleEndian)
      repaired = true
    }
    var found: [(head: UInt16, counter: UInt64)] = []
    var discarded = 0
    for i in 0..<descNum where isInflight(i) {
      guard i < ringSize else {
        strata_store_release_u16(flagPointer(i), 0)
        discarded += 1
        continue
      }
      found.append((UInt16(i), counter(of: i)))
    }
    found.sort { $0.counter < $1.counter }
    resubmit = found.map(\.head)
    counter = found.last.map { $0.counter &+ 1 } ?? 0
    resumed = true
    return Recovery(
      base: usedIdx &+ UInt16(found.count), resubmitted: found.count, discarded: discarded, repairedLastBatch: repaired)
  }

  // MARK: Running (vu_queue_inflight_get / pre_put / post_put)

  /// A head was popped from the avail ring: stamp it and mark it in flight.
  @inline(__always)
  func popped(_ head: UInt16) {
    let d = desc(Int(head))
    d.storeBytes(of: counter.littleEndian, toByteOffset: 8, as: UInt64.self)
    counter &+= 1
    // Release: the counter is in memory before the mark.
    strata_store_release_u16(flagPointer(Int(head)), UInt16(1).littleEndian)
  }

  /// Before used->idx is published for `head`.
  @inline(__always)
  func willPublish(_ head: UInt16) {
    lastBatchHeadPointer.pointee = head.littleEndian
  }

  /// After used->idx was published (as `usedIdx`) for `head`.
  @inline(__always)
  func published(_ head: UInt16, usedIdx: UInt16) {
    strata_store_release_u16(flagPointer(Int(head)), 0)
    strata_store_release_u16(usedIdxPointer, usedIdx.littleEndian)
  }
}

/// Recovery of a front-end-controlled inflight region as a new back-end does it, on bytes of the
/// caller's (fuzz/FuzzInflight and the random-region tests): the region is copied into memory of
/// its own, so any input is a region.
@_spi(Fuzzing) public enum InflightRecovery {
  /// What a back-end would resubmit from a one-queue region holding `bytes` (zero-filled past
  /// them): split rings give heads, packed rings buffer ids with their descriptor counts.
  /// `ring` is the packed descriptor ring (16 bytes per slot), unused for split rings.
  public static func resubmissions(
    region bytes: UnsafeRawBufferPointer, queueSize: Int, packed: Bool, ring: UnsafeRawPointer, position: UInt32
  ) -> [(id: Int, descriptors: Int)] {
    precondition(queueSize >= 1 && queueSize <= 32768)
    let size = InflightArea.regionSize(queueSize: queueSize, packed: packed)
    guard let p = mmap(nil, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0), p != MAP_FAILED else {
      preconditionFailure("mmap of \(size) bytes failed")
    }
    if let base = bytes.baseAddress { p.copyMemory(from: base, byteCount: min(bytes.count, size)) }
    let area = InflightArea(anonymous: p, length: size, queueSize: queueSize, packed: packed)
    if packed {
      let packedRing = PackedInflightRing(area: area, queue: 0)
      _ = packedRing.recover(ringSize: queueSize, ring: ring, base: position)
      return packedRing.resubmit.map { (Int($0.id), $0.descriptors.count) }
    }
    let split = InflightRing(area: area, queue: 0)
    _ = split.recover(ringSize: queueSize, usedIdx: UInt16(truncatingIfNeeded: position))
    return split.resubmit.map { (Int($0), 1) }
  }
}
