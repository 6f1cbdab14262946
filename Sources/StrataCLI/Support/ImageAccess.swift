import ArgumentParser
import StrataCore

#if canImport(Glibc)
  import Glibc
#endif

/// Opening and closing images so that every path closes exactly once, errors name the file,
/// and a failed command never leaves an image open.
enum ImageAccess {
  /// Opens an image. Unless `allowDamaged`, an image whose recovery had to fall back past
  /// damage a crash does not explain (`recoveryProblems`) is refused: reads could return an
  /// older state without saying so, and a write would checkpoint over the evidence.
  static func open(_ path: String, readOnly: Bool, allowDamaged: Bool = false, options: ImageOptions = ImageOptions())
    throws -> StrataImage
  {
    var options = options
    options.readOnly = readOnly
    return try about(path) {
      let image = try StrataImage.open(path: path, options: options)
      guard allowDamaged || image.recoveryProblems.isEmpty else {
        let problems = image.recoveryProblems.joined(separator: "; ")
        try? image.close()
        throw StrataError(
          .corrupt,
          "the image is damaged (\(problems)); recent changes may be lost, so it is not used "
            + "('strata info' shows what recovery found)")
      }
      return image
    }
  }

  /// Creates a new image; with `overwrite`, an existing file is replaced, but never one that
  /// another process has open (the library takes the lock before truncating).
  static func create(_ path: String, size: UInt64, options: ImageOptions, overwrite: Bool) throws -> StrataImage {
    try about(path) {
      try StrataImage.create(path: path, virtualSize: size, options: options, overwrite: overwrite)
    }
  }

  /// Opens `path`, runs `body`, then closes the image (which flushes and checkpoints a writable
  /// one). On failure the image is still closed and the first error is the one reported.
  static func with<T>(
    _ path: String, readOnly: Bool, allowDamaged: Bool = false, _ body: (StrataImage) throws -> T
  ) throws -> T {
    try withOpened(try open(path, readOnly: readOnly, allowDamaged: allowDamaged), path: path, body)
  }

  /// Runs `body` on an already open image and closes it afterwards, whatever happens.
  static func withOpened<T>(_ image: StrataImage, path: String, _ body: (StrataImage) throws -> T) throws -> T {
    let result: T
    do {
      result = try about(path) { try body(image) }
    } catch {
      try? image.close()
      throw error
    }
    try about(path) { try image.close() }
    return result
  }

  /// Reads from the head or, with a name, from a snapshot of the image.
  /// The head, a snapshot or a point in time (at most one of the last two).
  static func source(_ image: StrataImage, snapshot: String?, at point: PointInTime? = nil) throws -> ImageSource {
    precondition(snapshot == nil || point == nil, "the command validates --snapshot against --at")
    let view =
      try snapshot.map { try image.snapshotView(name: $0) } ?? point.map { try image.view(atSeq: $0.seq(in: image)) }
    if let view {
      return ImageSource(
        size: view.size, read: { try view.read(into: $0, at: $1) },
        extents: { try view.extents(from: $0, length: $1) })
    }
    return ImageSource(
      size: image.size, read: { try image.read(into: $0, at: $1) },
      extents: { try image.extents(from: $0, length: $1) })
  }
}

/// The readable side of an image: its head or one of its snapshots.
struct ImageSource {
  var size: UInt64
  var read: (UnsafeMutableRawBufferPointer, UInt64) throws -> Void
  var extents: (UInt64, UInt64?) throws -> [Extent]

  /// Fails with the library's out-of-range message before anything is read or printed.
  func checkRange(offset: UInt64, length: UInt64) throws {
    guard offset <= size, length <= size - offset else {
      throw StrataError(
        .outOfRange,
        "range \(offset)+\(length) lies outside the \(size)-byte disk (\(ByteCount.format(size)))")
    }
  }
}

/// `--branch NAME`: use branch NAME of the image (the file `IMAGE.branches/NAME.strata`, see `strata
/// clone`) instead of the image itself (read, write, map, serve, diff).
struct BranchOption: ParsableArguments {
  @Option(help: ArgumentHelp("Use this branch of the image (see 'strata clone').", valueName: "name"))
  var branch: String?

  init() {}

  /// The file to open: the image, or the branch's file.
  func path(of image: String) throws -> String {
    guard let branch else { return image }
    return try ImageAccess.branchPath(of: image, name: branch)
  }
}

extension ImageAccess {
  /// The file of branch `name` of `image`, which must exist.
  static func branchPath(of image: String, name: String) throws -> String {
    try StrataImage.validateBranchName(name)
    let path = StrataImage.branchPath(of: image, name: name)
    guard access(path, F_OK) == 0 else {
      throw StrataError(
        .notFound,
        "\(image) has no branch named \"\(name)\" (no file \(path); 'strata branch list \(image)' lists them)")
    }
    return path
  }
}
