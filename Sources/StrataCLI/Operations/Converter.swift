import ArgumentParser
import StrataCore

#if canImport(Glibc)
  import Glibc
#elseif canImport(Musl)
  import Musl
#elseif canImport(Darwin)
  import Darwin
#endif

/// Disk image formats `strata convert` reads and writes.
enum ImageFormat: String, ExpressibleByArgument, CaseIterable {
  /// A flat file: byte N of the file is byte N of the disk.
  case raw
  /// A Strata image.
  case strata

  /// `.strata` files are Strata images; anything else is taken as raw.
  static func guess(fromPath path: String) -> ImageFormat {
    path.lowercased().hasSuffix(".strata") ? .strata : .raw
  }
}

/// What `strata convert` was asked to do.
struct ConversionRequest {
  var source: String
  var sourceFormat: ImageFormat
  var snapshot: String?
  var at: PointInTime?
  var destination: String
  var destinationFormat: ImageFormat
  var overwrite: Bool
  var blockSize: Int?
  var segmentSize: Int?
  var showProgress: Bool
}

/// Copies a disk between formats without storing zeros.
///
/// Only ranges the source says hold data are read (a Strata source's data extents, a raw
/// source's non-hole ranges), in 1 MiB chunks aligned to 1 MiB; chunks that are entirely zero are
/// skipped, so they stay unallocated in a Strata destination and holes in a raw one. A Strata
/// source's zero extents stay zero extents in a Strata destination.
enum Converter {
  static let chunkSize = 1 << 20

  static func convert(_ request: ConversionRequest) throws {
    if let a = fileIdentity(request.source), let b = fileIdentity(request.destination), a == b {
      throw StrataError(.invalidArgument, "the source and the destination are the same file (\(request.source))")
    }
    // The destination is created as a regular file, and removed again if the conversion fails.
    guard !existsAsNonRegularFile(request.destination) else {
      throw StrataError(.invalidArgument, "\(request.destination) exists and is not a regular file")
    }
    switch request.sourceFormat {
    case .strata:
      try ImageAccess.with(request.source, readOnly: true) { image in
        let source = try ImageAccess.source(image, snapshot: request.snapshot, at: request.at)
        try copy(
          size: source.size, ranges: { try source.extents(0, nil).map { Range(extent: $0) } },
          read: source.read, sourcePath: request.source, request: request)
      }
    case .raw:
      let file = try about(request.source) { try RawFile.openForReading(request.source) }
      guard try file.isRegularFile else {
        throw StrataError(
          .invalidArgument, "\(request.source) is not a regular file; convert reads raw disks from files")
      }
      let size = try file.size
      try copy(
        size: size, ranges: { try file.dataRanges(size: size) }, read: { try file.read(into: $0, at: $1) },
        sourcePath: request.source, request: request)
      try file.close()
    }
  }

  /// A run of the source in one state.
  struct Range {
    enum Kind { case data, zero, unallocated }
    var offset: UInt64
    var length: UInt64
    var kind: Kind

    init(offset: UInt64, length: UInt64, kind: Kind) {
      self.offset = offset
      self.length = length
      self.kind = kind
    }

    init(extent: Extent) {
      let kind: Kind =
        switch extent.state {
        case .data: .data
        case .zero: .zero
        case .unallocated: .unallocated
        }
      self.init(offset: extent.offset, length: extent.length, kind: kind)
    }
  }

  private static func copy(
    size: UInt64, ranges: () throws -> [Range], read: (UnsafeMutableRawBufferPointer, UInt64) throws -> Void,
    sourcePath: String, request: ConversionRequest
  ) throws {
    let destination = try Destination.create(request, sourceSize: size)
    let progress = ProgressMeter(total: size, enabled: request.showProgress)
    do {
      let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: chunkSize, alignment: 4096)
      defer { buffer.deallocate() }
      for range in try about(sourcePath, ranges) {
        let end = range.offset + range.length
        switch range.kind {
        case .data:
          var position = range.offset
          while position < end {
            let n = Int(min(UInt64(chunkSize) - position % UInt64(chunkSize), end - position))
            let chunk = UnsafeMutableRawBufferPointer(rebasing: buffer[0..<n])
            try about(sourcePath) { try read(chunk, position) }
            if !isAllZero(UnsafeRawBufferPointer(chunk)) {
              try destination.write(UnsafeRawBufferPointer(chunk), at: position)
            }
            position += UInt64(n)
            progress.update(position)
          }
        case .zero:
          try destination.writeZeroes(at: range.offset, length: range.length)
        case .unallocated:
          break
        }
        progress.update(end)
      }
      try destination.finish()
      progress.finish()
    } catch {
      progress.abandon()
      destination.abandon()
      throw error
    }
  }
}

/// Where `convert` writes: a new Strata image or a new sparse raw file.
private final class Destination {
  private enum Target {
    case strata(StrataImage)
    case raw(RawFile)
  }

  private let path: String
  private let target: Target
  /// Set once the target is closed, so that it is never closed twice.
  private var closed = false

  private init(path: String, target: Target) {
    self.path = path
    self.target = target
  }

  static func create(_ request: ConversionRequest, sourceSize: UInt64) throws -> Destination {
    let path = request.destination
    switch request.destinationFormat {
    case .strata:
      let size = (sourceSize + 511) / 512 * 512
      guard size > 0 else {
        throw StrataError(.invalidArgument, "\(request.source) is empty; a disk needs at least 512 bytes")
      }
      var options = ImageOptions()
      if let blockSize = request.blockSize { options.blockSize = blockSize }
      if let segmentSize = request.segmentSize { options.segmentSize = segmentSize }
      let image = try ImageAccess.create(path, size: size, options: options, overwrite: request.overwrite)
      return Destination(path: path, target: .strata(image))
    case .raw:
      let file = try about(path) { try RawFile.create(path, overwrite: request.overwrite) }
      let destination = Destination(path: path, target: .raw(file))
      do {
        guard try file.isRegularFile else {
          throw StrataError(.invalidArgument, "\(path) is not a regular file; convert writes raw disks to files")
        }
        try about(path) { try file.setSize(sourceSize) }
      } catch {
        destination.abandon()
        throw error
      }
      return destination
    }
  }

  func write(_ bytes: UnsafeRawBufferPointer, at offset: UInt64) throws {
    try about(path) {
      switch target {
      case .strata(let image): try image.write(bytes, at: offset)
      case .raw(let file): try file.write(bytes, at: offset)
      }
    }
  }

  /// A Strata destination records the zeros; a raw one already reads zeros there (a hole).
  func writeZeroes(at offset: UInt64, length: UInt64) throws {
    guard case .strata(let image) = target else { return }
    try about(path) { try image.writeZeroes(at: offset, length: length) }
  }

  /// Makes the destination durable and closes it.
  func finish() throws {
    try about(path) {
      switch target {
      case .strata(let image):
        try image.flush()
        closed = true
        try image.close()
      case .raw(let file):
        try file.sync()
        closed = true
        try file.close()
      }
    }
  }

  /// Closes (if still open) and removes a destination whose conversion failed.
  func abandon() {
    if !closed {
      closed = true
      switch target {
      case .strata(let image): try? image.close()
      case .raw(let file): try? file.close()
      }
    }
    unlink(path)
  }
}

/// lseek whence values; glibc declares them only under _GNU_SOURCE, which Swift does not set.
/// Linux and Darwin both use 3 and 4.
private let seekData: Int32 = 3
private let seekHole: Int32 = 4

extension RawFile {
  /// The ranges of a raw file that hold data, found with SEEK_DATA/SEEK_HOLE; the rest are holes
  /// (unallocated). Falls back to the whole file where the file system cannot tell.
  func dataRanges(size: UInt64) throws -> [Converter.Range] {
    guard size > 0 else { return [] }
    guard let fd = descriptor else { return [.init(offset: 0, length: size, kind: .data)] }
    var ranges: [Converter.Range] = []
    var position: off_t = 0
    while UInt64(position) < size {
      let data = lseek(fd, position, seekData)
      if data < 0 {
        if errno == ENXIO { break }  // only a hole remains
        return [.init(offset: 0, length: size, kind: .data)]
      }
      var hole = lseek(fd, data, seekHole)
      if hole < 0 { hole = off_t(size) }
      let end = min(UInt64(hole), size)
      if UInt64(data) < end {
        ranges.append(.init(offset: UInt64(data), length: end - UInt64(data), kind: .data))
      }
      position = off_t(end)
      if end <= UInt64(data) { break }
    }
    return ranges
  }
}
