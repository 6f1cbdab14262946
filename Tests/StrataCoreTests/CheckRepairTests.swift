import Glibc
import Testing

@testable import StrataCore

/// Corruption injected into each kind of metadata (and data) of a real image file is detected
/// by `check`; `check --repair` makes nothing worse: every block that read correctly before
/// still reads the same afterwards, and the repaired image checks clean of errors it could fix.
@Suite("check and repair on damaged images")
struct CheckRepairTests {
  /// A small image with data, a snapshot and more data after it; returns the path and the
  /// bytes the head holds.
  static func makeImage() throws -> (String, [UInt8]) {
    let dir = temporaryDirectory("strata-check")
    let path = dir + "/disk.strata"
    let image = try StrataImage.create(path: path, virtualSize: 8 << 20)
    var state: UInt64 = 7
    func bytes(_ n: Int) -> [UInt8] {
      (0..<n).map { _ in
        state = state &* 6_364_136_223_846_793_005 &+ 1
        return UInt8(truncatingIfNeeded: state >> 33)
      }
    }
    try image.write(bytes(1 << 20), at: 0)
    try image.createSnapshot(name: "s1")
    try image.write(bytes(300_000), at: 2 << 20)
    try image.flush()
    let head = try image.read(at: 0, count: 8 << 20)
    try image.close()
    return (path, head)
  }

  static func flip(_ path: String, at offset: UInt64, count: Int = 16) {
    let fd = open(path, O_RDWR)
    defer { close(fd) }
    var b = [UInt8](repeating: 0, count: count)
    _ = pread(fd, &b, count, off_t(offset))
    for i in 0..<count { b[i] ^= 0xA5 }
    _ = pwrite(fd, b, count, off_t(offset))
  }

  /// Reads every 4 KiB block that can be read; nil for one that fails.
  static func readable(_ image: StrataImage) -> [[UInt8]?] {
    (0..<(8 << 20) / 4096).map { try? image.read(at: UInt64($0) * 4096, count: 4096) }
  }

  enum Damage: String, CaseIterable, CustomTestStringConvertible {
    case dataBlock, spareSuperblock, currentSuperblock, mapLeaf, usagePage, truncatedTail
    var testDescription: String { rawValue }
  }

  @Test(arguments: Damage.allCases)
  func damageIsDetectedAndRepairMakesNothingWorse(damage: Damage) throws {
    let (path, head) = try Self.makeImage()
    let probe = try StrataImage.open(
      path: path,
      options: {
        var o = ImageOptions(); o.readOnly = true; return o
      }())
    let report = try probe.inspect(recordLimit: 1000)
    let firstData = try #require(try probe.extents().first { $0.state == .data }?.fileOffset)
    let checkpoint = try #require(report.checkpoints.first)
    let inUse = try #require(report.superblocks.first { $0.inUse })
    let usagePage = probe.usage.pageRefs[0].page
    try probe.close()

    switch damage {
    case .dataBlock: Self.flip(path, at: firstData + 100)
    case .spareSuperblock: Self.flip(path, at: inUse.slot == 0 ? 4096 : 0)
    case .currentSuperblock: Self.flip(path, at: inUse.offset + 40)
    case .mapLeaf:
      // The leaf under the root: the first internal reference's target (or the root itself).
      Self.flip(path, at: checkpoint.rootPage * 4096 + 8)
    case .usagePage: Self.flip(path, at: usagePage * 4096)
    case .truncatedTail:
      let fd = open(path, O_RDWR)
      var st = stat()
      fstat(fd, &st)
      ftruncate(fd, st.st_size - 8192)
      close(fd)
    }

    // Detection: opening fails as corrupt, or check reports the damage.
    let image: StrataImage
    do {
      image = try StrataImage.open(path: path)
    } catch let e as StrataError {
      #expect(e.code == .corrupt, "\(damage): open failed with \(e)")
      return
    }
    defer { try? image.close() }
    let before = Self.readable(image)
    let found = try image.check()
    switch damage {
    case .spareSuperblock, .currentSuperblock:
      #expect(!found.warnings.isEmpty || !found.errors.isEmpty, "\(damage) went unnoticed: \(found)")
    default:
      #expect(found.result != .clean || !image.recoveryNotes.isEmpty, "\(damage) went unnoticed: \(found)")
    }

    // Repair never makes a readable block unreadable or different.
    let repaired = try image.check(repair: true)
    let after = Self.readable(image)
    for (i, b) in before.enumerated() {
      guard let b else { continue }
      #expect(after[i] == b, "\(damage): block \(i) changed or became unreadable after repair")
    }
    // Blocks that read fine still hold the bytes written.
    for (i, b) in after.enumerated() where b != nil && damage != .mapLeaf && damage != .truncatedTail {
      #expect(b! == Array(head[(i * 4096)..<((i + 1) * 4096)]), "\(damage): block \(i) reads wrong bytes")
    }
    let again = try image.check()
    #expect(again.leaks.isEmpty, "\(damage): leaks remain after repair: \(again.leaks)")
    #expect(
      again.warnings.allSatisfy { !$0.contains("superblock slot") }, "\(damage): a damaged superblock remains: \(again)"
    )
    if damage != .dataBlock {
      #expect(
        again.errors.isEmpty, "\(damage): errors remain after repair: \(again.errors); repairs: \(repaired.repairs)")
    }
  }
}
