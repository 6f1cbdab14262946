import Testing

@testable import StrataFormat

/// The superblock extension holding the continuous-data-protection window (format-spec 4.1,
/// autoclear bit CDP_WINDOW).
@Suite struct CDPWindowSuperblockTests {
  static let windows: [CDPWindow] = [
    .duration(nanoseconds: 1), .duration(nanoseconds: 3_600_000_000_000), .duration(nanoseconds: .max),
    .size(bytes: 1), .size(bytes: 10 << 30), .size(bytes: .max),
  ]

  @Test(arguments: windows)
  func roundTripAndLayout(window: CDPWindow) throws {
    var sb = sampleSuperblock()
    sb.cdpWindow = window
    let b = sb.encode()
    #expect(b.count == 144 && Superblock.cdpWindowEncodedLength == 144 && sb.headerLength == 144)
    #expect(read32(b, 12) == 144)
    // The bit is written from the window whatever `features` says; the sample has autoclear 0x40.
    #expect(read64(b, 32) == 0x41)
    #expect(read64(b, 128) == window.fields.nanoseconds)
    #expect(read64(b, 136) == window.fields.bytes)
    var zeroed = b
    patch(&zeroed, 124, UInt32(0))
    #expect(read32(b, 124) == CRC32C.checksum(zeroed), "the checksum covers the extension")
    let decoded = try decodeSuperblock(b)
    #expect(decoded.cdpWindow == window)
    #expect(decoded.features.autoclear == 0x41)
    var expected = sb
    expected.features.autoclear |= FeatureSet.cdpWindow
    #expect(decoded == expected)
    // Inside a whole slot, with junk after header_length.
    #expect(try decodeSuperblock(b + [UInt8](repeating: 0xEE, count: 4096 - 144)) == expected)
    // A flipped extension byte fails the checksum.
    for i in 128..<144 {
      var bad = b
      bad[i] ^= 0x10
      expectFormatError(.badChecksum, "byte \(i)") { _ = try decodeSuperblock(bad) }
    }
  }

  @Test func noWindowKeepsTheVersion1Bytes() throws {
    let plain = sampleSuperblock()
    #expect(plain.cdpWindow == nil && plain.headerLength == 128)
    let b = plain.encode()
    #expect(b.count == 128 && read32(b, 12) == 128)
    // A stray CDP_WINDOW bit in `features` without a window is not written.
    var stray = plain
    stray.features.autoclear |= FeatureSet.cdpWindow
    #expect(stray.encode() == b)
    #expect(try decodeSuperblock(b).cdpWindow == nil)
    #expect(FeatureSet.cdpWindow == 1 && FeatureSet.knownAutoclear & FeatureSet.cdpWindow != 0)
  }

  /// An older writer that did not know the bit cleared it; whatever it left after byte 128
  /// (it should have dropped the extension, but header_length may have stayed) is stale.
  @Test func staleExtensionIsIgnoredWhenTheBitIsClear() throws {
    var sb = sampleSuperblock()
    sb.cdpWindow = .duration(nanoseconds: 60_000_000_000)
    var b = sb.encode()
    patch(&b, 32, UInt64(0x40))  // bit 0 cleared, extension left in place
    fixSuperblockChecksum(&b)
    let decoded = try decodeSuperblock(b)
    #expect(decoded.cdpWindow == nil)
    #expect(decoded == sampleSuperblock())
    // Even an extension that would be invalid under the bit.
    patch(&b, 136, UInt64.max)
    fixSuperblockChecksum(&b)
    #expect(try decodeSuperblock(b).cdpWindow == nil)
    // And a longer header (a later version's fields) with the bit clear.
    var long = sampleSuperblock().encode() + [UInt8](repeating: 0, count: 4096 - 128)
    patch(&long, 12, UInt32(512))
    patch(&long, 128, UInt64(5))
    fixSuperblockChecksum(&long)
    #expect(try decodeSuperblock(long).cdpWindow == nil)
  }

  @Test func longerHeaderStillCarriesTheWindow() throws {
    var sb = sampleSuperblock()
    sb.cdpWindow = .size(bytes: 512 << 20)
    var slot = sb.encode() + [UInt8](repeating: 0, count: 4096 - 144)
    patch(&slot, 12, UInt32(4096))
    slot[4000] = 0x5A  // a later version's field
    fixSuperblockChecksum(&slot)
    #expect(try decodeSuperblock(slot).cdpWindow == .size(bytes: 512 << 20))
  }

  @Test func hostileExtensionsAreRejected() throws {
    var sb = sampleSuperblock()
    sb.cdpWindow = .size(bytes: 4096)
    let good = sb.encode()
    // Both fields zero, both non-zero.
    for (ns, bytes) in [(UInt64(0), UInt64(0)), (1, 1), (.max, .max), (3_600_000_000_000, 10 << 30)] {
      var b = good
      patch(&b, 128, ns)
      patch(&b, 136, bytes)
      fixSuperblockChecksum(&b)
      expectFormatError(.invalidField, "ns \(ns) bytes \(bytes)") { _ = try decodeSuperblock(b) }
    }
    // The bit without room for the extension: header_length 128 and 136, in a full slot.
    for length: UInt32 in [128, 136] {
      var b = good + [UInt8](repeating: 0, count: 4096 - 144)
      patch(&b, 12, length)
      fixSuperblockChecksum(&b)
      expectFormatError(.invalidField, "header length \(length)") { _ = try decodeSuperblock(b) }
    }
    // A 144-byte header cut short by the input.
    expectFormatError(.invalidField) { _ = try decodeSuperblock(Array(good[0..<136])) }
    for n in 0..<128 {
      expectFormatError(.truncated, "\(n) bytes") { _ = try decodeSuperblock(Array(good[0..<n])) }
    }
  }

  @Test func fieldsMapping() {
    #expect(CDPWindow(nanoseconds: 0, bytes: 0) == nil)
    #expect(CDPWindow(nanoseconds: 5, bytes: 7) == nil)
    #expect(CDPWindow(nanoseconds: 5, bytes: 0) == .duration(nanoseconds: 5))
    #expect(CDPWindow(nanoseconds: 0, bytes: 7) == .size(bytes: 7))
    #expect(!CDPWindow.duration(nanoseconds: 0).isValid && !CDPWindow.size(bytes: 0).isValid)
    #expect(CDPWindow.size(bytes: 1).isValid)
  }
}
