import Testing

@testable import StrataFormat

/// Catalog tree node pages (format-spec 8.6): layout and checks.
@Suite struct CatalogTreeFormatTests {
  @Test func namesCompareAsBytes() {
    #expect(SnapshotName("a") < SnapshotName("b"))
    #expect(SnapshotName("a") < SnapshotName("aa"))
    #expect(SnapshotName("Z") < SnapshotName("a"))
    // U+00E9 and "e" + U+0301 are equal Strings but different names.
    #expect(SnapshotName("\u{E9}") != SnapshotName("e\u{301}"))
    #expect(SnapshotName("e\u{301}") < SnapshotName("\u{E9}"))
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

    let names = [
      NameIndexEntry(name: SnapshotName("ab"), seq: 9), NameIndexEntry(name: SnapshotName("abcdefg"), seq: 4),
    ]
    let namePage = CatalogNodePage.encodeLeaf(names)
    #expect(Array(namePage[8..<24]) == le(UInt64(9)) + le(UInt16(2)) + Array("ab".utf8) + [0, 0, 0, 0])
    #expect(
      Array(namePage[24..<48]) == le(UInt64(4)) + le(UInt16(7)) + Array("abcdefg".utf8)
        + [UInt8](repeating: 0, count: 7))
    #expect(names.map(\.encodedLength) == [16, 24])
    #expect(try namePage.withUnsafeBytes { try CatalogNodePage.decodeLeaf($0, as: NameIndexEntry.self) } == names)
  }

  @Test func internalLayout() throws {
    let children = [
      CatalogChild(ref: PageRef(page: 300, checksum: 0xAA), key: UInt64(7)),
      CatalogChild(ref: PageRef(page: 301, checksum: 0xBB), key: UInt64(90)),
    ]
    let page = CatalogNodePage.encodeInternal(level: 2, children, of: SnapshotEntry.self)
    #expect(Array(page[0..<8]) == [2, 0] + le(UInt16(2)) + le(UInt32(0)))
    #expect(Array(page[8..<32]) == le(UInt64(300)) + le(UInt32(0xAA)) + le(UInt32(0)) + le(UInt64(7)))
    let back = try page.withUnsafeBytes { try CatalogNodePage.decodeInternal($0, as: SnapshotEntry.self, level: 2) }
    #expect(back.map(\.key) == [7, 90] && back.map(\.ref) == children.map(\.ref))

    let nameChildren = [CatalogChild(ref: PageRef(page: 5, checksum: 1), key: SnapshotName("hello"))]
    let namePage = CatalogNodePage.encodeInternal(level: 1, nameChildren, of: NameIndexEntry.self)
    #expect(Array(namePage[24..<32]) == le(UInt16(5)) + Array("hello".utf8) + [0])
    #expect(CatalogNodePage.childLength(SnapshotName("hello"), of: NameIndexEntry.self) == 24)
  }

  @Test func nodeChecks() {
    let leaf = CatalogNodePage.encodeLeaf([
      NameIndexEntry(name: SnapshotName("a"), seq: 2), NameIndexEntry(name: SnapshotName("b"), seq: 3),
    ])
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
    rejectsLeaf({ $0[34] = UInt8(ascii: "a") }, "keys not increasing")
    rejectsLeaf({ $0[18] = UInt8(ascii: "/") }, "an invalid name")
    rejectsLeaf({ patch(&$0, 16, UInt16(0)) }, "an empty name")

    let node = CatalogNodePage.encodeInternal(
      level: 1,
      [
        CatalogChild(ref: PageRef(page: 300, checksum: 1), key: UInt64(1)),
        CatalogChild(ref: PageRef(page: 301, checksum: 2), key: UInt64(2)),
      ], of: SnapshotEntry.self)
    func rejectsNode(_ patchIt: (inout [UInt8]) -> Void, _ what: String) {
      var b = node
      patchIt(&b)
      expectFormatError(.invalidField, what) {
        _ = try b.withUnsafeBytes { try CatalogNodePage.decodeInternal($0, as: SnapshotEntry.self, level: 1) }
      }
    }
    rejectsNode({ $0[0] = 2 }, "wrong level")
    rejectsNode({ patch(&$0, 8, UInt64(0)) }, "null child")
    rejectsNode({ patch(&$0, 8, UInt64(1) << 48) }, "child beyond 48 bits")
    rejectsNode({ patch(&$0, 48, UInt64(1)) }, "keys not increasing")
    rejectsNode({ patch(&$0, 2, UInt16(200)) }, "more children than written")
  }
}
