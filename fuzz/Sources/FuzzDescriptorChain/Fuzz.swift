@_spi(Fuzzing) import StrataVhost
import VhostProtocol

#if canImport(Glibc)
  import Glibc
#endif

/// A hostile virtqueue, split or packed: the input fills guest memory (split: available ring at
/// offset 0, descriptor table at 512; packed: driver event area at 0, descriptor ring at 512,
/// device event area at 4096; buffers after); every chain the ring offers is walked. Walking
/// must throw on loops, bad indices, bad indirect tables and addresses outside guest memory, and
/// every buffer it returns must lie inside the guest's region.
///
/// Input: byte 0 picks the queue size (1 << (b & 7)), byte 1 the features (bit 0 indirect
/// descriptors, bit 1 EVENT_IDX, bit 2 a packed ring); the rest is copied to guest memory.
@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>, _ size: Int) -> Int32 {
  guard size >= 2 else { return 0 }
  let queueSize = 1 << Int(data[0] & 7)
  let features = data[1]
  let base = guest.base
  base.initializeMemory(as: UInt8.self, repeating: 0, count: Guest.size)
  base.copyMemory(from: data + 2, byteCount: min(size - 2, Guest.size - Guest.usedOffset))
  if features & 4 != 0 { return fuzzPacked(queueSize: queueSize, features: features) }
  let queue = SplitQueue(
    size: queueSize, desc: base + Guest.descOffset, avail: base, used: base + Guest.usedOffset, base: 0,
    eventIdx: features & 2 != 0, indirect: features & 1 != 0, maxSegments: Guest.maxSegments)
  var segments: [GuestSegment] = []
  // At most a ring's worth of chains (the ring refuses an index further ahead).
  for _ in 0..<queueSize {
    let head: UInt16
    do {
      guard let next = try queue.popAvailable() else { break }
      head = next
    } catch {
      break
    }
    do {
      try queue.walk(head: head, memory: guest.memory, into: &segments)
    } catch {
      continue
    }
    precondition(segments.count <= Guest.maxSegments, "\(segments.count) segments")
    for s in segments {
      precondition(
        s.pointer >= base && s.length <= Guest.size && s.pointer + s.length <= base + Guest.size,
        "a segment lies outside guest memory")
    }
  }
  return 0
}

/// The packed ring over the same memory: every buffer it pops lies inside guest memory, and
/// completing them (in reverse order) never writes outside the ring.
private func fuzzPacked(queueSize: Int, features: UInt8) -> Int32 {
  let base = guest.base
  let queue = PackedQueue(
    size: queueSize, ring: base + Guest.descOffset, driverEvent: base, deviceEvent: base + Guest.usedOffset,
    base: 0x8000_8000, eventIdx: features & 2 != 0, indirect: features & 1 != 0, maxSegments: Guest.maxSegments)
  var segments: [GuestSegment] = []
  var popped: [UInt16] = []
  for _ in 0..<queueSize {
    guard let id = try? queue.next(into: &segments, memory: guest.memory) else { break }
    popped.append(id)
    precondition(Int(id) < queueSize, "id \(id) past the ring")
    for s in segments {
      precondition(
        s.pointer >= base && s.length <= Guest.size && s.pointer + s.length <= base + Guest.size,
        "a segment lies outside guest memory")
    }
  }
  for id in popped.reversed() { queue.pushUsed(head: id, written: 1) }
  _ = queue.shouldNotify()
  return 0
}

/// One 64 KiB region of guest memory at guest address 0x10000, mapped once from a temporary file.
private struct Guest {
  static let size = 1 << 16
  static let address: UInt64 = 0x10000
  static let descOffset = 512
  static let usedOffset = 4096
  static let maxSegments = 130
  let memory: GuestMemory
  let base: UnsafeMutableRawPointer
}

nonisolated(unsafe) private let guest: Guest = {
  var template = Array("/tmp/strata-fuzz-guest-XXXXXX".utf8CString)
  let fd = mkstemp(&template)
  precondition(fd >= 0 && ftruncate(fd, off_t(Guest.size)) == 0, "cannot create the guest memory file")
  unlink(template)
  defer { close(fd) }
  let memory = GuestMemory()
  do {
    try memory.add(
      MemoryRegion(guestAddress: Guest.address, size: UInt64(Guest.size), userAddress: 0, mmapOffset: 0), fd: fd)
  } catch {
    preconditionFailure("cannot map the guest memory: \(error)")
  }
  guard let base = memory.guest(Guest.address, length: Guest.size) else { preconditionFailure("no guest memory") }
  return Guest(memory: memory, base: base)
}()
