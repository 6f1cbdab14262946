import StrataSimulation

/// Picks offsets, lengths and data: mostly inside a few hot zones (so that operations overlap),
/// some anywhere, some at the end of the disk; unaligned, block-aligned and multi-block.
public struct Workload {
  public var rng: SeededRandom
  private var zones: [UInt64] = []
  private let zoneSize: UInt64 = 3 << 20

  public init(rng: SeededRandom) { self.rng = rng }

  public mutating func length(max: Int = 300 << 10) -> Int {
    switch rng.int(in: 0..<10) {
    case 0..<4: rng.int(in: 1...4096)
    case 4..<6: rng.int(in: 1...8) * 4096  // block aligned sizes
    case 6..<8: rng.int(in: 4097...65536)
    default: rng.int(in: 1...max)
    }
  }

  /// A range of `length` bytes (clipped to the disk) somewhere useful on a disk of `size` bytes.
  public mutating func range(size: UInt64, length: Int) -> (UInt64, Int) {
    let length = UInt64(min(UInt64(length), size))
    let span = size - length
    let offset: UInt64
    switch rng.int(in: 0..<20) {
    case 0..<14:
      if zones.isEmpty || rng.chance(0.02) { zones.append(rng.uint64(in: 0...size)) }
      if zones.count > 4 { zones.removeFirst() }
      let z = min(rng.element(of: zones)!, span)
      let within = rng.uint64(in: 0...min(zoneSize, span - z))
      // Half the time block aligned, so whole-block paths run too.
      offset = rng.bool() ? within / 4096 * 4096 + z / 4096 * 4096 : z + within
    case 14..<17:
      offset = rng.uint64(in: 0...span)
    default:
      offset = span - rng.uint64(in: 0...min(span, 3 * 4096))  // at or near the end
    }
    return (min(offset, span), Int(length))
  }

  /// Data to write at `offset`: random bytes, zeros, a fill byte, or a mix of zero and random
  /// blocks (so that writes split into data and zero runs).
  public mutating func data(count: Int, at offset: UInt64) -> [UInt8] {
    switch rng.int(in: 0..<10) {
    case 0..<6:
      return rng.bytes(count)
    case 6:
      return [UInt8](repeating: 0, count: count)
    case 7:
      return [UInt8](repeating: UInt8(rng.int(in: 1...255)), count: count)
    default:
      var out = rng.bytes(count)
      var i = 0
      while i < count {
        let end = min(count, Int((offset + UInt64(i)) / 4096 * 4096 + 4096 - offset))
        if rng.bool() { for j in i..<end { out[j] = 0 } }
        i = end
      }
      return out
    }
  }
}
