import StrataCore

/// One line of `strata map`.
struct MapEntry: Encodable {
  var offset: UInt64
  var length: UInt64
  /// `data`, `zero` or `unallocated`.
  var state: String
  /// Where a data extent's bytes start in the image file; absent for other states.
  var fileOffset: UInt64?
  /// 0: this image holds the extent; 1: its backing file; and so on down the chain.
  var depth: Int

  enum CodingKeys: String, CodingKey {
    case offset, length, state, depth
    case fileOffset = "file_offset"
  }

  init(_ extent: Extent) {
    offset = extent.offset
    length = extent.length
    state =
      switch extent.state {
      case .data: "data"
      case .zero: "zero"
      case .unallocated: "unallocated"
      }
    fileOffset = extent.fileOffset
    depth = extent.layer
  }

  /// A qemu-img map style table with hexadecimal offsets.
  /// `files`: the image, then its backing chain (the file of an extent at depth d is files[d]).
  static func table(_ entries: [MapEntry], files: [String]) -> String {
    Printer.table(
      header: ["Offset", "Length", "State", "Mapped to", "File"],
      rows: entries.map { e in
        [
          hex(e.offset), hex(e.length), e.state, e.fileOffset.map(hex) ?? "-",
          e.fileOffset == nil ? "-" : files[min(e.depth, files.count - 1)],
        ]
      })
  }
}
