import StrataCore

/// One line of `strata map`.
struct MapEntry: Encodable {
  var offset: UInt64
  var length: UInt64
  /// `data`, `zero` or `unallocated`.
  var state: String
  /// Where a data extent's bytes start in the image file; absent for other states.
  var fileOffset: UInt64?

  enum CodingKeys: String, CodingKey {
    case offset, length, state
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
  }

  /// A qemu-img map style table with hexadecimal offsets.
  static func table(_ entries: [MapEntry], file: String) -> String {
    Printer.table(
      header: ["Offset", "Length", "State", "Mapped to", "File"],
      rows: entries.map { e in
        [hex(e.offset), hex(e.length), e.state, e.fileOffset.map(hex) ?? "-", e.fileOffset == nil ? "-" : file]
      })
  }
}
