import CStrataLinux
import Glibc

/// The "guest RAM" the client shares with the back-end: one memfd mapped MAP_SHARED, announced
/// as a single region at guest physical address 0 whose userspace address is the client's
/// mapping. Guest physical address = offset into the memfd.
public final class GuestMemory {
  public let fd: Int32
  public let base: UnsafeMutableRawPointer
  public let size: Int
  private var allocator: RangeAllocator

  /// The mapping's address in this process: the region's userspace_addr.
  public var userAddress: UInt64 { UInt64(UInt(bitPattern: base)) }

  init(size: Int) throws(VhostClientError) {
    guard size >= 1 << 20, size % 4096 == 0 else {
      throw .invalidArgument("guest memory size \(size) must be a multiple of 4096 and at least 1 MiB")
    }
    let fd = strata_memfd("strata-vhost-client-guest")
    guard fd >= 0 else { throw .system("memfd_create", errno: errno) }
    guard ftruncate(fd, off_t(size)) == 0 else {
      let e = errno
      close(fd)
      throw .system("ftruncate(memfd)", errno: e)
    }
    guard let p = mmap(nil, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0),
      p != UnsafeMutableRawPointer(bitPattern: -1)
    else {
      let e = errno
      close(fd)
      throw .system("mmap(guest memory)", errno: e)
    }
    self.fd = fd
    self.base = p
    self.size = size
    self.allocator = RangeAllocator(size: size)
  }

  deinit {
    munmap(base, size)
    close(fd)
  }

  /// The address in this process of a guest physical address (no bounds check: callers check).
  public func pointer(_ guestAddress: UInt64) -> UnsafeMutableRawPointer { base + Int(guestAddress) }

  /// The userspace (front-end virtual) address of a guest physical address, as SET_VRING_ADDR wants.
  public func userAddress(of guestAddress: UInt64) -> UInt64 { userAddress + guestAddress }

  public func contains(_ guestAddress: UInt64, length: Int) -> Bool {
    length >= 0 && guestAddress <= UInt64(size) && UInt64(length) <= UInt64(size) - guestAddress
  }

  /// Copies bytes into guest memory at a guest physical address.
  public func write(_ bytes: [UInt8], at guestAddress: UInt64) {
    precondition(contains(guestAddress, length: bytes.count), "guest write out of bounds")
    bytes.withUnsafeBytes { b in
      if let src = b.baseAddress { pointer(guestAddress).copyMemory(from: src, byteCount: b.count) }
    }
  }

  /// Copies bytes out of guest memory.
  public func read(at guestAddress: UInt64, count: Int) -> [UInt8] {
    precondition(contains(guestAddress, length: count), "guest read out of bounds")
    return [UInt8](unsafeUninitializedCapacity: count) { buf, n in
      if count > 0 {
        UnsafeMutableRawPointer(buf.baseAddress!).copyMemory(from: pointer(guestAddress), byteCount: count)
      }
      n = count
    }
  }

  /// Carves `count` bytes (rounded up to 64) aligned to `alignment` (a power of two) out of guest
  /// memory; returns the guest physical address, nil when there is no room.
  public func allocate(_ count: Int, alignment: Int = 64) -> UInt64? {
    allocator.allocate(count, alignment: alignment).map { UInt64($0) }
  }

  /// Returns a block from `allocate` (same count).
  public func free(_ guestAddress: UInt64, count: Int) {
    allocator.free(Int(guestAddress), count)
  }

  /// Bytes not handed out.
  public var freeBytes: Int { allocator.freeBytes }
}

/// First-fit allocator over [0, size) with coalescing; granules of 64 bytes.
struct RangeAllocator {
  static let granule = 64
  /// Free ranges sorted by start, never adjacent.
  private(set) var free: [(start: Int, length: Int)]

  init(size: Int) { free = [(0, size)] }

  static func rounded(_ n: Int) -> Int { (max(n, 1) + granule - 1) / granule * granule }

  var freeBytes: Int { free.reduce(0) { $0 + $1.length } }

  mutating func allocate(_ count: Int, alignment: Int) -> Int? {
    let need = Self.rounded(count)
    let align = max(alignment, Self.granule)
    precondition(align & (align - 1) == 0, "alignment must be a power of two")
    for i in free.indices {
      let (start, length) = free[i]
      let aligned = (start + align - 1) & ~(align - 1)
      let pad = aligned - start
      guard pad + need <= length else { continue }
      let tailStart = aligned + need
      let tailLength = start + length - tailStart
      var replacement: [(start: Int, length: Int)] = []
      if pad > 0 { replacement.append((start, pad)) }
      if tailLength > 0 { replacement.append((tailStart, tailLength)) }
      free.replaceSubrange(i...i, with: replacement)
      return aligned
    }
    return nil
  }

  mutating func free(_ start: Int, _ count: Int) {
    let length = Self.rounded(count)
    var i = 0
    while i < free.count && free[i].start < start { i += 1 }
    precondition(i == 0 || free[i - 1].start + free[i - 1].length <= start, "double free in guest memory")
    precondition(i == free.count || start + length <= free[i].start, "double free in guest memory")
    free.insert((start, length), at: i)
    if i + 1 < free.count && free[i].start + free[i].length == free[i + 1].start {
      free[i].length += free[i + 1].length
      free.remove(at: i + 1)
    }
    if i > 0 && free[i - 1].start + free[i - 1].length == free[i].start {
      free[i - 1].length += free[i].length
      free.remove(at: i)
    }
  }
}
