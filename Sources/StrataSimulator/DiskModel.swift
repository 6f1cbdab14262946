import StrataCore
import StrataFormat

#if canImport(Glibc)
  import Glibc
#endif

/// A sparse model of a virtual disk in 4 KiB blocks: only blocks that are not all zeros are
/// stored, so a 16 TiB disk costs nothing.
public struct DiskModel: Sendable {
  public static let blockSize = 4096
  public static let bs = UInt64(blockSize)

  public var size: UInt64
  /// Blocks that hold something other than zeros; each is `blockSize` bytes.
  public private(set) var blocks: [UInt64: [UInt8]] = [:]

  public init(size: UInt64) { self.size = size }

  public var blockCount: UInt64 { (size + Self.bs - 1) / Self.bs }

  /// The content of block `b` (nil: all zeros).
  public func block(_ b: UInt64) -> [UInt8]? { blocks[b] }

  public func read(_ offset: UInt64, _ count: Int) -> [UInt8] {
    var out = [UInt8](repeating: 0, count: count)
    out.withUnsafeMutableBytes { dst in
      var done = 0
      while done < count {
        let position = offset + UInt64(done)
        let b = position / Self.bs
        let inBlock = Int(position % Self.bs)
        let n = min(Self.blockSize - inBlock, count - done)
        if let stored = blocks[b] {
          stored.withUnsafeBytes { src in
            UnsafeMutableRawBufferPointer(rebasing: dst[done..<(done + n)])
              .copyMemory(from: UnsafeRawBufferPointer(rebasing: src[inBlock..<(inBlock + n)]))
          }
        }
        done += n
      }
    }
    return out
  }

  public mutating func write(_ data: [UInt8], at offset: UInt64) {
    data.withUnsafeBytes { src in
      var done = 0
      while done < data.count {
        let position = offset + UInt64(done)
        let b = position / Self.bs
        let inBlock = Int(position % Self.bs)
        let n = min(Self.blockSize - inBlock, data.count - done)
        var stored = blocks[b] ?? [UInt8](repeating: 0, count: Self.blockSize)
        stored.withUnsafeMutableBytes { dst in
          UnsafeMutableRawBufferPointer(rebasing: dst[inBlock..<(inBlock + n)])
            .copyMemory(from: UnsafeRawBufferPointer(rebasing: src[done..<(done + n)]))
        }
        set(b, stored)
        done += n
      }
    }
  }

  /// Block `b` holds `content` (nil or all zeros: nothing stored).
  public mutating func set(_ b: UInt64, _ content: [UInt8]?) {
    if let content, !allZero(content) { blocks[b] = content } else { blocks[b] = nil }
  }

  /// `writeZeroes`: exactly the range reads as zeros.
  public mutating func zero(at offset: UInt64, length: UInt64) {
    let end = offset + length
    for b in keys(in: (offset / Self.bs)..<((end + Self.bs - 1) / Self.bs)) {
      let lo = max(offset, b * Self.bs)
      let hi = min(end, (b + 1) * Self.bs)
      if lo == b * Self.bs && hi == (b + 1) * Self.bs {
        blocks[b] = nil
      } else if var stored = blocks[b] {
        for i in Int(lo - b * Self.bs)..<Int(hi - b * Self.bs) { stored[i] = 0 }
        set(b, stored)
      }
    }
  }

  /// `discard`: whole blocks inside the range read as zeros, partial edge blocks are unchanged.
  public mutating func discard(at offset: UInt64, length: UInt64) {
    let first = (offset + Self.bs - 1) / Self.bs
    let end = (offset + length) / Self.bs
    guard first < end else { return }
    for b in keys(in: first..<end) { blocks[b] = nil }
  }

  /// Growing adds zeros; shrinking drops the blocks past the new end and clears the bytes
  /// past it in the last block (so that a later grow reads zeros there).
  public mutating func resize(to newSize: UInt64) {
    if newSize < size {
      let keep = (newSize + Self.bs - 1) / Self.bs
      for b in keys(in: keep..<UInt64.max) { blocks[b] = nil }
      if newSize % Self.bs != 0 { zero(at: newSize, length: keep * Self.bs - newSize) }
    }
    size = newSize
  }

  /// The stored (non-zero) blocks in `range`, ascending.
  public func keys(in range: Range<UInt64>) -> [UInt64] {
    if range.upperBound - range.lowerBound < UInt64(4 * blocks.count + 64) {
      return range.filter { blocks[$0] != nil }
    }
    return blocks.keys.filter { range.contains($0) }.sorted()
  }

  public var storedBlocks: [UInt64] { blocks.keys.sorted() }

  /// The blocks a byte range touches.
  public static func blocks(_ offset: UInt64, _ count: UInt64) -> Range<UInt64> {
    (offset / bs)..<((offset + count + bs - 1) / bs)
  }
}

// MARK: - Byte helpers

public func allZero(_ bytes: [UInt8]) -> Bool {
  bytes.withUnsafeBytes { isAllZero($0) }
}

/// Byte equality via memcmp (element-wise comparison is slow in debug builds).
public func sameBytes(_ a: [UInt8], _ b: [UInt8]) -> Bool {
  sameBytes(a[...], b[...])
}

public func sameBytes(_ a: ArraySlice<UInt8>, _ b: ArraySlice<UInt8>) -> Bool {
  a.count == b.count
    && a.withUnsafeBytes { x in
      b.withUnsafeBytes { y in a.isEmpty || memcmp(x.baseAddress!, y.baseAddress!, a.count) == 0 }
    }
}

public func firstDifference(_ a: [UInt8], _ b: [UInt8]) -> String {
  let i = (0..<min(a.count, b.count)).first { a[$0] != b[$0] } ?? min(a.count, b.count)
  let show = { (x: [UInt8]) in i < x.count ? String(x[i], radix: 16) : "end" }
  return "first difference at byte \(i) (read \(show(a)), expected \(show(b))), lengths \(a.count)/\(b.count)"
}

/// Whether two block contents are the same (nil: zeros).
public func sameContent(_ a: [UInt8]?, _ b: [UInt8]?) -> Bool {
  switch (a, b) {
  case (nil, nil): true
  case (nil, let x?), (let x?, nil): allZero(x)
  case (let x?, let y?): sameBytes(x, y)
  }
}

/// Whether `got` (the first `got.count` bytes of a block) is `content` (nil: zeros).
public func blockMatches(_ got: [UInt8], _ content: [UInt8]?) -> Bool {
  guard let content else { return allZero(got) }
  return sameBytes(got[...], content[..<got.count])
}

/// A short description of a block's content for failure messages.
public func fingerprint(_ bytes: [UInt8]?) -> String {
  guard let bytes, !allZero(bytes) else { return "zeros" }
  let head = bytes.prefix(8).map { String($0, radix: 16) }.joined(separator: " ")
  return "[\(head) …] crc \(String(CRC32C.checksum(bytes), radix: 16))"
}
