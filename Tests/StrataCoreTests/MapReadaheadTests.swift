import Glibc
import StrataSimulation
import Testing

@_spi(Simulation) @testable import StrataCore

/// A map lookup that misses the node cache reads the sibling nodes stored next to the one it
/// needs in the same read (PageReader.load(_:level:index:parent:)).
@Suite("map readahead")
struct MapReadaheadTests {
  static let leaves = 64
  static let blockSize = 4096

  static func pattern(_ leaf: Int) -> [UInt8] {
    (0..<blockSize).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ leaf &* 7 &+ 1) }
  }

  /// An image whose first 64 leaves each hold one written block, written by one checkpoint
  /// (so the leaves lie on consecutive pages). Returns its path.
  static func makeImage() throws -> String {
    let path = temporaryDirectory("strata-readahead") + "/disk.strata"
    let image = try StrataImage.create(path: path, virtualSize: UInt64(leaves * 256 * blockSize))
    for leaf in 0..<leaves { try image.write(pattern(leaf), at: UInt64(leaf * 256 * blockSize)) }
    try image.flush()
    try image.close()
    return path
  }

  static func open(_ path: String, cacheNodes: Int = ImageOptions().mapCacheNodes) throws -> StrataImage {
    var options = ImageOptions()
    options.readOnly = true
    options.mapCacheNodes = cacheNodes
    return try StrataImage.open(path: path, options: options)
  }

  /// The page each leaf is stored at, from the root's references.
  static func leafPages(_ image: StrataImage) throws -> [UInt64] {
    #expect(image.map.depth == 2)
    guard case .node(let root) = try image.map.resolve(level: 1, index: 0) else {
      Issue.record("the root is empty")
      return []
    }
    return (0..<leaves).map { root.child($0).page }
  }

  @Test func aColdLookupBringsInTheNeighbouringLeaves() throws {
    let path = try Self.makeImage()
    let image = try Self.open(path)
    defer { try? image.close() }
    let pages = try Self.leafPages(image)
    #expect(zip(pages, pages.dropFirst()).allSatisfy { $1 == $0 + 1 }, "leaves at \(pages)")
    let before = image.cachedMapNodes
    #expect(try image.read(at: UInt64(20 * 256 * Self.blockSize), count: Self.blockSize) == Self.pattern(20))
    // One read brought in up to 32 leaves around leaf 20, not just leaf 20.
    #expect(image.cachedMapNodes - before == PageReader.readaheadNodes)
    for leaf in 0..<Self.leaves {
      #expect(try image.read(at: UInt64(leaf * 256 * Self.blockSize), count: Self.blockSize) == Self.pattern(leaf))
    }
  }

  @Test func aDamagedSiblingFailsOnlyItsOwnBlocks() throws {
    let path = try Self.makeImage()
    let probe = try Self.open(path)
    let damaged = try Self.leafPages(probe)[11]
    try probe.close()
    CheckRepairTests.flip(path, at: damaged * 4096 + 64)

    let image = try Self.open(path)
    defer { try? image.close() }
    #expect(try image.read(at: UInt64(10 * 256 * Self.blockSize), count: Self.blockSize) == Self.pattern(10))
    #expect(try image.read(at: UInt64(12 * 256 * Self.blockSize), count: Self.blockSize) == Self.pattern(12))
    let error = #expect(throws: StrataError.self) {
      try image.read(at: UInt64(11 * 256 * Self.blockSize), count: Self.blockSize)
    }
    #expect(error?.code == .corrupt)
  }

  /// An I/O error in the read that brings the siblings in fails the lookup: it is not taken
  /// for a sibling's problem and retried quietly.
  @Test func anIOErrorInTheReadaheadIsReported() throws {
    let storage = SimulatedStorage(seed: 3)
    let created = try StrataImage.create(storage: storage, virtualSize: UInt64(Self.leaves * 256 * Self.blockSize))
    for leaf in 0..<Self.leaves { try created.write(Self.pattern(leaf), at: UInt64(leaf * 256 * Self.blockSize)) }
    try created.close()
    storage.reopen()
    let image = try StrataImage.open(storage: storage)
    defer { try? image.close() }
    let before = image.cachedMapNodes
    storage.failNext(.read)
    let error = #expect(throws: StrataError.self) {
      try image.read(at: UInt64(20 * 256 * Self.blockSize), count: Self.blockSize)
    }
    #expect(error?.code == .io)
    #expect(image.cachedMapNodes == before)
    #expect(try image.read(at: UInt64(20 * 256 * Self.blockSize), count: Self.blockSize) == Self.pattern(20))
  }

  @Test func aFullCacheReadsOneNodePerMiss() throws {
    let path = try Self.makeImage()
    let image = try Self.open(path, cacheNodes: 16)
    defer { try? image.close() }
    for leaf in 0..<Self.leaves {
      #expect(try image.read(at: UInt64(leaf * 256 * Self.blockSize), count: Self.blockSize) == Self.pattern(leaf))
      #expect(image.cachedMapNodes <= 16)
    }
  }
}
