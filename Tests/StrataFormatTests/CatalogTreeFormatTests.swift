import Testing

@testable import StrataFormat

/// Catalog tree node pages (format-spec 8.6): layout, checks, and the name hash.
@Suite struct CatalogTreeFormatTests {
  @Test func nameHashIsFNV1a64() {
    #expect(nameHash("") == 0xcbf2_9ce4_8422_2325)
    #expect(nameHash("a") == 0xaf63_dc4c_8601_ec8c)
    #expect(nameHash("foobar") == 0x8594_4171_f739_67e8)
  }

  @Test func leafLayout() throws {
    let e = SnapshotEntry(seq: 0x11, timestampNanoseconds: 0x22, baseCheckpoint: 0x33, name: "abc")
    let page = CatalogNodePage.encodeLeaf([e])
    #expect(page.count == 4096)
    #expect(Array(page[0..<8]) == [0, 0] + le(UInt16(1)) + le(UInt32(0)))
    #expect(Array(page[8..<34]) == le(UInt64(0x11)) + le(UInt64(0x22)) + le(UInt64(0x33)) + le(UInt16(3)))
    #expect(Array(page[34..<37]) == Array("abc".utf8))
    #expect(page[37...].allSatisfy { $0 == 0 })
    #expect(try page.withUnsafeBytes { try CatalogNodePage.decodeLeaf($0, as: SnapshotEntry.self) } == [e])

    let names = [NameIndexEntry(hash: 5, seq: 9), NameIndexEntry(hash: 5, seq: 10), NameIndexEntry(hash: 6, seq: 1)]
    let namePage = CatalogNodePage.encodeLeaf(names)
    #expect(Array(namePage[8..<24]) == le(UInt64(5)) + le(UInt64(9)))
    #expect(try namePage.withUnsafeBytes { try CatalogNodePage.decodeLeaf($0, as: NameIndexEntry.self) } == names)
  }

  @Test func internalLayout() throws {
    let children = [
      CatalogChild(key: CatalogKey(7, 0), ref: PageRef(page: 300, checksum: 0xAA)),
      CatalogChild(key: CatalogKey(90, 0), ref: PageRef(page: 301, checksum: 0xBB)),
    ]
    let page = CatalogNodePage.encodeInternal(level: 2, children)
    #expect(Array(page[0..<8]) == [2, 0] + le(UInt16(2)) + le(UInt32(0)))
    #expect(
      Array(page[8..<40]) == le(UInt64(7)) + le(UInt64(0)) + le(UInt64(300)) + le(UInt32(0xAA)) + le(UInt32(0)))
    let back = try page.withUnsafeBytes { try CatalogNodePage.decodeInternal($0, kind: .catalogSeqNode, level: 2) }
    #expect(back == children)
  }

  @Test func nodeChecks() {
    let leaf = CatalogNodePage.encodeLeaf([NameIndexEntry(hash: 1, seq: 2), NameIndexEntry(hash: 1, seq: 3)])
    func rejectsLeaf(_ patchIt: (inout [UInt8]) -> Void, _ what: String) {
      var b = leaf
      patchIt(&b)
      expectFormatError(.invalidField, what) {
        _ = try b.withUnsafeBytes { try CatalogNodePage.decodeLeaf($0, as: NameIndexEntry.self) }
      }
    }
    rejectsLeaf({ $0[0] = 1 }, "a leaf claiming level 1")
    rejectsLeaf({ $0[1] = 1 }, "reserved byte")
    rejectsLeaf({ patch(&$0, 4, UInt32(1)) }, "reserved word")
    rejectsLeaf({ patch(&$0, 2, UInt16(0)) }, "no entries")
    rejectsLeaf({ patch(&$0, 16, UInt64(3)) }, "keys not increasing")
    var seqLeaf = CatalogNodePage.encodeLeaf([
      SnapshotEntry(seq: 4, timestampNanoseconds: 0, baseCheckpoint: 0, name: "x")
    ])
    seqLeaf[34] = UInt8(ascii: "/")
    expectFormatError(.invalidField) {
      _ = try seqLeaf.withUnsafeBytes { try CatalogNodePage.decodeLeaf($0, as: SnapshotEntry.self) }
    }

    let node = CatalogNodePage.encodeInternal(
      level: 1,
      [
        CatalogChild(key: CatalogKey(1, 0), ref: PageRef(page: 300, checksum: 1)),
        CatalogChild(key: CatalogKey(2, 0), ref: PageRef(page: 301, checksum: 2)),
      ])
    func rejectsNode(_ patchIt: (inout [UInt8]) -> Void, _ what: String, kind: PageKind = .catalogSeqNode) {
      var b = node
      patchIt(&b)
      expectFormatError(.invalidField, what) {
        _ = try b.withUnsafeBytes { try CatalogNodePage.decodeInternal($0, kind: kind, level: 1) }
      }
    }
    rejectsNode({ $0[0] = 2 }, "wrong level")
    rejectsNode({ patch(&$0, 24, UInt64(0)) }, "null child")
    rejectsNode({ patch(&$0, 24, UInt64(1) << 48) }, "child beyond 48 bits")
    rejectsNode({ patch(&$0, 16, UInt64(1)) }, "seq key with a low word")
    rejectsNode({ patch(&$0, 40, UInt64(1)) }, "keys not increasing")
    rejectsNode({ patch(&$0, 2, UInt16(200)) }, "more children than fit")
    var nameNode = node
    patch(&nameNode, 16, UInt64(1))
    #expect((try? nameNode.withUnsafeBytes { try CatalogNodePage.decodeInternal($0, kind: .catalogNameNode, level: 1) }) != nil)
  }
}
