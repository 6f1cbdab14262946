// Random inflight regions, split and packed, recovered as a new back-end recovers the one a
// front-end hands it: the region is front-end memory, so whatever it holds, recovery must not
// crash and may only resubmit buffers of the ring, each once. fuzz/FuzzInflight runs the same
// check under libFuzzer.

@_spi(Fuzzing) import StrataVhost
import Testing

@Suite("inflight recovery of random regions")
struct InflightRecoveryFuzzTests {
  @Test(arguments: [false, true])
  func randomRegionsResubmitOnlyRingBuffersOnce(packed: Bool) {
    var rng = SystemRandomNumberGenerator()
    var resubmitted = 0
    for round in 0..<1500 {
      let queueSize = [1, 2, 3, 8, 16, 64, 256][round % 7]
      // Half the rounds mostly zero, with a version and a few set fields: closer to real regions.
      var region = [UInt8](repeating: 0, count: 64 + 32 * queueSize)
      if round % 2 == 0 {
        for i in region.indices { region[i] = UInt8.random(in: 0...255, using: &rng) }
      } else {
        region[8] = 1
        for _ in 0..<(4 + queueSize) {
          region[Int.random(in: 0..<region.count, using: &rng)] = UInt8.random(in: 0...255, using: &rng)
        }
      }
      let ring = (0..<(16 * queueSize)).map { _ in UInt8.random(in: 0...255, using: &rng) }
      let position = UInt32.random(in: 0...UInt32.max, using: &rng)
      let found = region.withUnsafeBytes { r in
        ring.withUnsafeBytes { g in
          InflightRecovery.resubmissions(
            region: r, queueSize: queueSize, packed: packed, ring: g.baseAddress!, position: position)
        }
      }
      resubmitted += found.count
      #expect(found.allSatisfy { $0.id >= 0 && $0.id < queueSize }, "ids \(found.map(\.id)) for size \(queueSize)")
      #expect(Set(found.map(\.id)).count == found.count, "an id resubmitted twice: \(found.map(\.id))")
      #expect(found.allSatisfy { $0.descriptors >= 1 && $0.descriptors <= queueSize })
      #expect(found.reduce(0) { $0 + $1.descriptors } <= queueSize)
    }
    // Not every region is refused: some recoveries resubmit something (split ones easily).
    if !packed { #expect(resubmitted > 0) }
  }
}
