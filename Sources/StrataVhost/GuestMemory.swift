import VhostProtocol

#if canImport(Glibc)
  import Glibc
#endif

/// The guest's memory, mapped from the file descriptors of SET_MEM_TABLE / ADD_MEM_REG.
///
/// Every address the guest gives (descriptor addresses, ring addresses) goes through
/// `guest(_:length:)` or `user(_:length:)`, which return a pointer only when the whole range
/// lies inside one region: the server never touches memory outside the guest's regions.
@_spi(Fuzzing) public final class GuestMemory: @unchecked Sendable {
  struct Region {
    var info: MemoryRegion
    var mapping: UnsafeMutableRawPointer
    var mappingLength: Int
    var base: UnsafeMutableRawPointer { mapping + Int(info.mmapOffset) }
  }

  static let maxRegions = 32
  private(set) var regions: [Region] = []

  public init() {}

  deinit {
    for r in regions { munmap(r.mapping, r.mappingLength) }
  }

  /// Maps `region` from `fd` (which the caller closes afterwards).
  public func add(_ region: MemoryRegion, fd: Int32) throws(VhostError) {
    guard regions.count < Self.maxRegions else { throw .invalid("more than \(Self.maxRegions) memory regions") }
    guard region.size <= UInt64(Int.max) / 2, region.mmapOffset <= UInt64(Int.max) / 2 else {
      throw .invalid("memory region too large")
    }
    for r in regions
    where region.guestAddress < r.info.guestAddress + r.info.size
      && r.info.guestAddress < region.guestAddress + region.size
    {
      throw .invalid("memory region at guest address \(region.guestAddress) overlaps another")
    }
    let length = Int(region.size + region.mmapOffset)
    // Touching a MAP_SHARED mapping past the end of its file raises SIGBUS: a region must lie
    // within its file (memfd, hugetlbfs or tmpfs file alike).
    var st = stat()
    guard fstat(fd, &st) == 0 else {
      throw .invalid("fstat of a memory region's fd failed: \(String(cString: strerror(errno)))")
    }
    guard (st.st_mode & S_IFMT) != S_IFREG || Int(st.st_size) >= length else {
      throw .invalid(
        "memory region of \(region.size) bytes at offset \(region.mmapOffset) exceeds its \(st.st_size)-byte file")
    }
    guard let p = mmap(nil, length, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0), p != MAP_FAILED else {
      throw .invalid("mmap of a \(length)-byte memory region failed: \(String(cString: strerror(errno)))")
    }
    regions.append(Region(info: region, mapping: p, mappingLength: length))
  }

  func remove(_ region: MemoryRegion) throws(VhostError) {
    guard
      let i = regions.firstIndex(where: { $0.info.guestAddress == region.guestAddress && $0.info.size == region.size })
    else { throw .invalid("no memory region at guest address \(region.guestAddress) to remove") }
    munmap(regions[i].mapping, regions[i].mappingLength)
    regions.remove(at: i)
  }

  /// Host pointer for guest-physical `address`...`address+length`, or nil if any byte is outside.
  @inline(__always)
  public func guest(_ address: UInt64, length: Int) -> UnsafeMutableRawPointer? {
    translate(address, length, user: false)
  }

  /// Host pointer for a front-end virtual address (how SET_VRING_ADDR names the rings).
  func user(_ address: UInt64, length: Int) -> UnsafeMutableRawPointer? {
    translate(address, length, user: true)
  }

  @inline(__always)
  private func translate(_ address: UInt64, _ length: Int, user: Bool) -> UnsafeMutableRawPointer? {
    for r in regions {
      let first = user ? r.info.userAddress : r.info.guestAddress
      guard address >= first else { continue }
      let offset = address - first
      guard offset < r.info.size, UInt64(length) <= r.info.size - offset else { continue }
      return r.base + Int(offset)
    }
    return nil
  }
}
