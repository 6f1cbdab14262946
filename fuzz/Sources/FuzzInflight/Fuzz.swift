@_spi(Fuzzing) import StrataVhost

/// A front-end's inflight region (INFLIGHT_SHMFD), split or packed, recovered as a new back-end
/// recovers it: recovery must never crash, and may resubmit only buffers of the ring, each once.
///
/// Input: byte 0 picks the queue size (1 << (b & 7)) and bit 7 a packed ring; bytes 1-4 the
/// ring position (SET_VRING_BASE, or the used index); then the packed descriptor ring (16 bytes
/// a slot), then the region.
@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>, _ size: Int) -> Int32 {
  guard size >= 5 else { return 0 }
  let queueSize = 1 << Int(data[0] & 7)
  let packed = data[0] & 0x80 != 0
  let position = UInt32(data[1]) | UInt32(data[2]) << 8 | UInt32(data[3]) << 16 | UInt32(data[4]) << 24
  var ring = [UInt8](repeating: 0, count: 16 * queueSize)
  let ringBytes = min(ring.count, size - 5)
  for i in 0..<ringBytes { ring[i] = data[5 + i] }
  let region = UnsafeRawBufferPointer(start: data + 5 + ringBytes, count: size - 5 - ringBytes)
  let found = ring.withUnsafeBytes {
    InflightRecovery.resubmissions(
      region: region, queueSize: queueSize, packed: packed, ring: $0.baseAddress!, position: position)
  }
  var seen = Set<Int>()
  var descriptors = 0
  for r in found {
    precondition(r.id >= 0 && r.id < queueSize, "resubmitted id \(r.id) of a \(queueSize)-entry ring")
    precondition(seen.insert(r.id).inserted, "id \(r.id) resubmitted twice")
    precondition(r.descriptors >= 1, "a buffer without descriptors")
    descriptors += r.descriptors
  }
  precondition(descriptors <= queueSize, "\(descriptors) descriptors in flight on a \(queueSize)-entry ring")
  return 0
}
