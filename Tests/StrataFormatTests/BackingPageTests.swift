import StrataFormat
import Testing

/// The backing page of format-spec 5.1: version 1 as before, version 2 with the point at the
/// offsets the table gives, flags, and damage detected.
@Test func backingPagePointRoundTrips() throws {
  let id = [UInt8](repeating: 7, count: 16)
  let plain = BackingDescriptor(path: "golden.strata", parentImageID: id, parentSize: 4096)
  let plainPage = try plain.encode()
  #expect(plainPage[8] == 1 && plainPage[40] == UInt8(ascii: "g"))
  #expect(try plainPage.withUnsafeBytes { try BackingDescriptor.decode($0) } == plain)
  let point = BackingPoint(name: "branch:x", seq: 42, baseCheckpoint: 9, originSeq: 17, ownedByBranch: true)
  let branch = BackingDescriptor(path: "../vm.strata", parentImageID: id, parentSize: 8192, point: point)
  var page = try branch.encode()
  func u64(_ at: Int) -> UInt64 { (0..<8).reduce(0) { $0 | UInt64(page[at + $1]) << (8 * UInt64($1)) } }
  #expect(page[8] == 2 && page[10] == 12 && page[12] == 1 && page[16] == 7 && u64(32) == 8192)
  #expect(u64(40) == 42 && u64(48) == 9 && u64(56) == 17 && page[64] == 8)
  #expect(Array(page[72..<80]) == Array("branch:x".utf8) && page[80] == 0)
  #expect(Array(page[328..<340]) == Array("../vm.strata".utf8) && page[340] == 0)
  #expect(BackingDescriptor.maxPathLength == 4052 && BackingDescriptor.maxPointPathLength == 3764)
  #expect(try page.withUnsafeBytes { try BackingDescriptor.decode($0) } == branch)
  page[100] ^= 1
  #expect(throws: FormatError.self) { try page.withUnsafeBytes { try BackingDescriptor.decode($0) } }
  // A path too long for version 2, a point without a name, an invalid point name.
  let long = String(repeating: "p", count: BackingDescriptor.maxPointPathLength + 1)
  #expect(throws: FormatError.self) {
    try BackingDescriptor(path: long, parentImageID: id, parentSize: 0, point: point).encode()
  }
  #expect(throws: FormatError.self) {
    try BackingDescriptor(
      path: "p", parentImageID: id, parentSize: 0, point: BackingPoint(name: "", seq: 1, baseCheckpoint: 1)
    ).encode()
  }
  #expect(throws: FormatError.self) {
    let bad = BackingPoint(name: "a/b", seq: 1, baseCheckpoint: 1)
    let bytes = try BackingDescriptor(path: "p", parentImageID: id, parentSize: 0, point: bad).encode()
    _ = try bytes.withUnsafeBytes { try BackingDescriptor.decode($0) }
  }
}
