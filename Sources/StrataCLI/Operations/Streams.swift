import StrataCore

/// Copying between images and plain byte streams, in chunks of a fixed size.
enum Streams {
  static let chunkSize = 1 << 20

  /// Copies all of `input` into `image` at `offset` and flushes; returns the bytes written.
  ///
  /// A regular file is checked against the disk size before anything is written; a pipe is
  /// checked chunk by chunk, so a too-long pipe leaves the chunks before the failing one written.
  static func copy(from input: RawFile, to image: StrataImage, at offset: UInt64) throws -> UInt64 {
    guard offset <= image.size else {
      throw StrataError(.outOfRange, "offset \(offset) lies past the end of the \(image.size)-byte disk")
    }
    let room = image.size - offset
    if try input.isRegularFile {
      let length = try input.size
      guard length <= room else {
        throw StrataError(
          .outOfRange,
          "the input is \(length) bytes, but only \(room) bytes fit between offset \(offset) and the end of the "
            + "\(image.size)-byte disk")
      }
    }
    let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: chunkSize, alignment: 4096)
    defer { buffer.deallocate() }
    var done: UInt64 = 0
    while true {
      let n = try input.readSome(into: buffer)
      if n == 0 { break }
      guard UInt64(n) <= room - done else {
        try image.flush()
        throw StrataError(
          .outOfRange,
          "the input is longer than the \(room) bytes that fit between offset \(offset) and the end of the "
            + "\(image.size)-byte disk; only its first \(done) bytes were written")
      }
      try image.write(UnsafeRawBufferPointer(rebasing: buffer[0..<n]), at: offset + done)
      done += UInt64(n)
    }
    try image.flush()
    return done
  }

  /// Copies `length` bytes of `source` at `offset` to `output`.
  static func copy(from source: ImageSource, offset: UInt64, length: UInt64, to output: RawFile) throws {
    try source.checkRange(offset: offset, length: length)
    let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: chunkSize, alignment: 4096)
    defer { buffer.deallocate() }
    var done: UInt64 = 0
    while done < length {
      let n = Int(min(UInt64(chunkSize), length - done))
      let chunk = UnsafeMutableRawBufferPointer(rebasing: buffer[0..<n])
      try source.read(chunk, offset + done)
      try output.write(UnsafeRawBufferPointer(chunk))
      done += UInt64(n)
    }
  }
}
