import Foundation
import Glibc
import Testing

@testable import StrataCore

/// A fresh directory under /tmp for one test's files, removed when the test process exits.
func temporaryDirectory(_ prefix: String = "strata-smoke") -> String {
  var template = Array("/tmp/\(prefix)-XXXXXX".utf8CString)
  let path = String(cString: mkdtemp(&template)!)
  TemporaryDirectories.shared.add(path)
  return path
}

/// The directories `temporaryDirectory` made (a run of the suite left ~300 MB in /tmp).
private final class TemporaryDirectories: @unchecked Sendable {
  static let shared: TemporaryDirectories = {
    atexit { TemporaryDirectories.shared.removeAll() }
    return TemporaryDirectories()
  }()
  private let lock = NSLock()
  private var paths: [String] = []

  func add(_ path: String) { lock.withLock { paths.append(path) } }

  func removeAll() {
    for path in lock.withLock({ paths }) { try? FileManager.default.removeItem(atPath: path) }
  }
}

@Test func smokeCreateWriteReopen() throws {
  let path = temporaryDirectory() + "/a.strata"
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

@Test func smokeCheckAndInspect() throws {
  let path = temporaryDirectory() + "/b.strata"
  let img = try StrataImage.create(path: path, virtualSize: 64 << 20, overwrite: true)
  try img.write([UInt8](repeating: 7, count: 100_000), at: 5000)
  try img.createSnapshot(name: "s1")
  try img.write([UInt8](repeating: 3, count: 100_000), at: 50000)
  try img.flush()
  let r = try img.check()
  #expect(r.result == .clean, "\(r)")
  let ins = try img.inspect()
  #expect(ins.totalRecords > 2)
  let ext = try img.extents()
  let dataPage = try #require(ext.first { $0.state == .data }?.fileOffset)
  try img.close()
  // Flip a byte inside the first data block.
  let fd = open(path, O_RDWR)
  var b: UInt8 = 0
  pread(fd, &b, 1, off_t(dataPage) + 10)
  b ^= 0xFF
  pwrite(fd, &b, 1, off_t(dataPage) + 10)
  close(fd)
  let img2 = try StrataImage.open(path: path)
  let r2 = try img2.check()
  #expect(r2.result == .corrupt)
  #expect(r2.errors.contains { $0.contains("checksum") })
  #expect(throws: StrataError.self) { try img2.read(at: 5000, count: 100) }
  try img2.close()
}
