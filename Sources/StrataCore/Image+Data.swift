import StrataFormat

extension StrataImage {
  /// Reads through `map` (the head's or a view's). Runs of data blocks that are contiguous in
  /// the file are read with one call straight into `out`, then verified block by block.
  func readMapped(_ map: BlockMap, into out: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
    let bs = geometry.blockSize
    let ppb = geometry.pagesPerBlock
    var done = 0
    while done < out.count {
      let position = offset + UInt64(done)
      let block = position / UInt64(bs)
      let inBlock = Int(position % UInt64(bs))
      let n = min(bs - inBlock, out.count - done)
      let entry = try map.entry(block)
      if entry.state == .unallocated && backing != nil {
        // A run of blocks this image never wrote: one read from the backing chain.
        var end = done + n
        while end < out.count, try map.entry((offset + UInt64(end)) / UInt64(bs)).state == .unallocated {
          end = min(out.count, end + bs - Int((offset + UInt64(end)) % UInt64(bs)))
        }
        try readBacking(into: UnsafeMutableRawBufferPointer(rebasing: out[done..<end]), at: position)
        done = end
        continue
      }
      guard entry.state == .data else {
        UnsafeMutableRawBufferPointer(rebasing: out[done..<(done + n)]).initializeMemory(as: UInt8.self, repeating: 0)
        done += n
        continue
      }
      if inBlock == 0 && n == bs {
        // A run of blocks contiguous in the file; their checksums are kept for the verification.
        let checksums = scratch.runChecksums
        checksums[0] = entry.checksum
        var run = 1
        while done + (run + 1) * bs <= out.count && run < checksums.count {
          let next = try map.entry(block + UInt64(run))
          guard next.state == .data, next.page == entry.page + UInt64(run * ppb) else { break }
          checksums[run] = next.checksum
          run += 1
        }
        let dest = UnsafeMutableRawBufferPointer(rebasing: out[done..<(done + run * bs)])
        try pages.readPages(entry.page, run * ppb, into: dest)
        for i in 0..<run {
          let expected = MapEntry.data(page: entry.page + UInt64(i * ppb), checksum: checksums[i])
          try verify(
            UnsafeRawBufferPointer(rebasing: dest[(i * bs)..<((i + 1) * bs)]), expected, block: block + UInt64(i))
        }
        done += run * bs
      } else {
        let scratch = scratch.readBlock
        try pages.readPages(entry.page, ppb, into: scratch)
        try verify(UnsafeRawBufferPointer(scratch), entry, block: block)
        UnsafeMutableRawBufferPointer(rebasing: out[done..<(done + n)])
          .copyMemory(from: UnsafeRawBufferPointer(rebasing: scratch[inBlock..<(inBlock + n)]))
        done += n
      }
    }
  }

  private func verify(_ bytes: UnsafeRawBufferPointer, _ entry: MapEntry, block: UInt64) throws {
    let actual = CRC32C.checksum(bytes)
    guard actual == entry.checksum else {
      throw StrataError(
        .dataCorrupt,
        "block \(block) (byte offset \(block * UInt64(geometry.blockSize))) at page \(entry.page) failed its checksum "
          + "(stored \(hex32(entry.checksum)), read \(hex32(actual))): the data is damaged and is not returned")
    }
  }

  /// Writes any byte range: whole blocks go to the log directly, partial blocks are merged with
  /// their current contents first.
  func writeBytes(_ data: UnsafeRawBufferPointer, at offset: UInt64) throws {
    let bs = geometry.blockSize
    var done = 0
    while done < data.count {
      let position = offset + UInt64(done)
      let block = position / UInt64(bs)
      let inBlock = Int(position % UInt64(bs))
      let n = min(bs - inBlock, data.count - done)
      if n < bs {
        let scratch = scratch.writeBlock
        try readMapped(map, into: scratch, at: block * UInt64(bs))
        UnsafeMutableRawBufferPointer(rebasing: scratch[inBlock..<(inBlock + n)])
          .copyMemory(from: UnsafeRawBufferPointer(rebasing: data[done..<(done + n)]))
        try writeBlocks(block, UnsafeRawBufferPointer(scratch), count: 1)
        done += n
      } else {
        var count = min((data.count - done) / bs, writer?.maxBlocksPerWrite ?? 1)
        // Fill the segment's rest instead of sealing it half empty, unless only a sliver is left.
        if let left = writer?.blocksLeftInSegment, left < count, left >= min(count, Self.minimumSplitBlocks) {
          count = left
        }
        try writeBlocks(block, UnsafeRawBufferPointer(rebasing: data[done..<(done + count * bs)]), count: count)
        done += count * bs
      }
    }
  }

  /// A write is split at a segment's end only if at least this many blocks fit before it.
  static let minimumSplitBlocks = 16

  /// Appends whole blocks; all-zero blocks become ZERO operations and store nothing.
  func writeBlocks(_ first: UInt64, _ bytes: UnsafeRawBufferPointer, count: Int) throws {
    guard let writer else { throw StrataError(.readOnly, "the image is open read-only") }
    precondition(bytes.count == count * geometry.blockSize)
    let bs = geometry.blockSize
    func block(_ i: Int) -> UnsafeRawBufferPointer {
      UnsafeRawBufferPointer(rebasing: bytes[(i * bs)..<((i + 1) * bs)])
    }
    var i = 0
    while i < count {
      let zero = isAllZero(block(i))
      var j = i + 1
      while j < count && isAllZero(block(j)) == zero { j += 1 }
      if zero {
        try logAndApply(.zero(firstBlock: first + UInt64(i), count: UInt64(j - i)))
      } else {
        let checksums = UnsafeMutableBufferPointer(rebasing: scratch.checksums[0..<(j - i)])
        for k in i..<j { checksums[k - i] = CRC32C.checksum(block(k)) }
        let run = UnsafeRawBufferPointer(rebasing: bytes[(i * bs)..<(j * bs)])
        let (seq, page) = try writer.appendWrite(
          firstBlock: first + UInt64(i), data: run, checksums: UnsafeBufferPointer(checksums))
        try applyLogged(seq) {
          try applyWrite(
            firstBlock: first + UInt64(i), checksums: UnsafeBufferPointer(checksums), payloadPage: page, map: map,
            seq: seq)
        }
        changedSinceCheckpoint = true
        try writer.writeOutIfDue()
      }
      i = j
    }
  }

  func zeroBytes(at offset: UInt64, length: UInt64) throws {
    let bs = UInt64(geometry.blockSize)
    let end = offset + length
    let firstFull = (offset + bs - 1) / bs
    let endFull = end / bs
    guard firstFull < endFull else {
      try writeZeroPartial(offset, end)
      return
    }
    try writeZeroPartial(offset, firstFull * bs)
    try logAndApply(.zero(firstBlock: firstFull, count: endFull - firstFull))
    try writeZeroPartial(endFull * bs, end)
  }

  private func writeZeroPartial(_ from: UInt64, _ to: UInt64) throws {
    guard from < to else { return }
    let zeros = [UInt8](repeating: 0, count: Int(to - from))
    try zeros.withUnsafeBytes { try writeBytes($0, at: from) }
  }

  /// Merged extents of `map` within `offset..<offset+length` (clipped to `size`); unless
  /// `resolve` is false, unallocated ones are replaced by what the backing chain holds there.
  func extents(of map: BlockMap, size: UInt64, from offset: UInt64, length: UInt64?, resolve: Bool = true) throws
    -> [Extent]
  {
    let end = min(size, length.map { offset + $0 } ?? size)
    guard offset < end else { return [] }
    let bs = UInt64(geometry.blockSize)
    var out: [Extent] = []
    try map.forEachRun(offset / bs, (end + bs - 1) / bs) { first, count, entry in
      let start = max(first * bs, offset)
      let stop = min((first + count) * bs, end)
      let file = entry.state == .data ? Geometry.byteOffset(ofPage: entry.page) + (start - first * bs) : nil
      if let last = out.last, last.state == entry.state, last.offset + last.length == start,
        last.fileOffset.map({ $0 + last.length }) == file
      {
        out[out.count - 1].length += stop - start
      } else {
        out.append(Extent(offset: start, length: stop - start, state: entry.state, fileOffset: file))
      }
    }
    return resolve ? try resolveBacking(out) : out
  }
}

/// True when every byte is zero; compares eight bytes at a time.
public func isAllZero(_ bytes: UnsafeRawBufferPointer) -> Bool {
  var i = 0
  let n = bytes.count
  while i + 8 <= n {
    if bytes.loadUnaligned(fromByteOffset: i, as: UInt64.self) != 0 { return false }
    i += 8
  }
  while i < n {
    if bytes[i] != 0 { return false }
    i += 1
  }
  return true
}

/// Buffers the data path reuses instead of allocating per request.
final class ImageScratch {
  let readBlock: UnsafeMutableRawBufferPointer
  let writeBlock: UnsafeMutableRawBufferPointer
  let checksums: UnsafeMutableBufferPointer<UInt32>
  /// Checksums of one contiguous read run (at most 256 blocks).
  let runChecksums: UnsafeMutableBufferPointer<UInt32>

  init(blockSize: Int, maxBlocksPerWrite: Int) {
    readBlock = .allocate(byteCount: blockSize, alignment: Layout.pageSize)
    writeBlock = .allocate(byteCount: blockSize, alignment: Layout.pageSize)
    checksums = .allocate(capacity: maxBlocksPerWrite)
    runChecksums = .allocate(capacity: 256)
  }

  deinit {
    readBlock.deallocate()
    writeBlock.deallocate()
    checksums.deallocate()
    runChecksums.deallocate()
  }
}
