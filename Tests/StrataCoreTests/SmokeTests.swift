import Testing
@testable import StrataCore

@Test func smokeCreateWriteReopen() throws {
  let path = "/tmp/smoke/a.strata"
  let img = try StrataImage.create(path: path, virtualSize: 64 << 20, overwrite: true)
  try img.write([UInt8](repeating: 7, count: 10000), at: 5000)
  #expect(try img.read(at: 5000, count: 10000) == [UInt8](repeating: 7, count: 10000))
  #expect(try img.read(at: 0, count: 5000) == [UInt8](repeating: 0, count: 5000))
  try img.createSnapshot(name: "s1")
  try img.write([UInt8](repeating: 9, count: 4096), at: 8192)
  try img.flush()
  try img.close()
  let img2 = try StrataImage.open(path: path)
  #expect(try img2.read(at: 8192, count: 4096) == [UInt8](repeating: 9, count: 4096))
  let v = try img2.snapshotView(name: "s1")
  #expect(try v.read(at: 8192, count: 4096) == [UInt8](repeating: 7, count: 4096))
  try img2.restore(snapshot: "s1")
  #expect(try img2.read(at: 8192, count: 4096) == [UInt8](repeating: 7, count: 4096))
  let c = try img2.recount()
  #expect(c.livePages == img2.usage.entries.map(\.livePages))
  try img2.close()
}
