import StrataFormat

#if canImport(Glibc)
  import Glibc
#endif

/// A branch as `branches(of:)` lists it.
public struct BranchInfo: Equatable, Sendable {
  public var name: String
  /// The branch's image file (`IMAGE.branches/NAME.strata`).
  public var path: String
  /// The parent's snapshot the branch reads through to, and its seq.
  public var snapshot: String
  public var seq: UInt64
  /// The point the branch was made at when it is not the snapshot itself (`--at`).
  public var originSeq: UInt64?
  /// The snapshot is a pin made for the branch, deleted with it.
  public var ownsSnapshot: Bool
  /// The branch's virtual size and creation time; nil when the branch cannot be opened
  /// (`problem` says why).
  public var size: UInt64?
  public var createdNanoseconds: UInt64?
  public var problem: String?
}

/// Branches (format-spec 5.1 and 5.4): writable heads that share the image's data. A branch of
/// `IMAGE` is an external clone in `IMAGE.branches/NAME.strata` whose backing page names a snapshot of
/// `IMAGE` (a version-2 page) instead of its head, with a relative path (`../IMAGE`), so the
/// image and its branches move together. Blocks the branch never wrote read as that snapshot
/// does, whatever the image's head does afterwards; a snapshot's view is immutable log data, so
/// the parent is opened without its lock and a branch can be read while the image is served.
///
/// A branch made at a point that is not a snapshot (`createBranch(of:name:atSeq:)`) pins the
/// image's head with a snapshot named `branch:NAME` and copies into itself the blocks that
/// differ between the point and the pin (found from the block maps). A snapshot a branch is
/// based on cannot be deleted (`deleteSnapshot` refuses, `pruneSnapshots` skips it) until the
/// branch is deleted; deleting a branch deletes its pin.
extension StrataImage {
  /// Longest branch name, so that its pin `branch:NAME` is a valid snapshot name.
  public static let maxBranchNameLength = Layout.maxSnapshotNameLength - branchPinPrefix.utf8.count
  /// The prefix of the snapshot that pins a branch made at a point.
  public static let branchPinPrefix = "branch:"

  /// The directory that holds the branches of the image at `imagePath`.
  public static func branchDirectory(of imagePath: String) -> String { imagePath + ".branches" }

  /// The image file of branch `name` of the image at `imagePath` (`IMAGE.branches/NAME.strata`:
  /// the extension lets tools such as `strata convert` tell it is a Strata image).
  public static func branchPath(of imagePath: String, name: String) -> String {
    branchDirectory(of: imagePath) + "/" + name + branchExtension
  }

  static let branchExtension = ".strata"

  /// Branch names are file names and, behind `branch:`, snapshot names: 1 to 248 bytes of
  /// UTF-8, no `/`, no control characters, not starting with `.`.
  public static func validateBranchName(_ name: String) throws {
    let n = name.utf8.count
    guard n >= 1, n <= maxBranchNameLength else {
      throw StrataError(
        .invalidArgument, "invalid branch name \"\(name)\": it must be 1 to \(maxBranchNameLength) bytes, got \(n)")
    }
    guard !name.unicodeScalars.contains(where: { $0.value < 0x20 || $0 == "/" || $0.value == 0x7F }),
      !name.hasPrefix(".")
    else {
      throw StrataError(
        .invalidArgument,
        "invalid branch name \"\(name)\": it must not contain '/' or control characters nor start with '.'")
    }
  }

  /// Opens the image read-only without its file lock, to read snapshots, points of the
  /// timeline and branches (immutable log data) while another process may be writing it (`strata
  /// serve`). The head is whatever recovery found in the file at that moment, possibly behind
  /// the writer's: do not rely on it.
  public static func openForViews(path: String, options: ImageOptions = ImageOptions()) throws -> StrataImage {
    var options = options
    options.readOnly = true
    options.unlocked = true
    return try open(path: path, options: options)
  }

  /// The file path the image was opened from (nil for other storage).
  var path: String? { (storage as? FileStorage)?.path }

  /// For a branch: the snapshot of its parent it reads through to.
  public var branchPoint: BackingPoint? { backing?.descriptor.point }

  /// Creates branch `name` of the image at `imagePath`, reading through to its snapshot
  /// `snapshot`, and returns it open. Only reads the image (without its lock: the image may be
  /// served meanwhile).
  public static func createBranch(
    of imagePath: String, name: String, snapshot: String, options: ImageOptions = ImageOptions()
  ) throws -> StrataImage {
    try validateBranchName(name)
    let path = try prepareBranchPath(of: imagePath, name: name)
    do {
      return try makeBranch(path, of: imagePath, snapshot: snapshot, virtualSize: nil, pinnedAt: nil, options: options)
    } catch {
      removeFailedBranch(path, of: imagePath)
      throw error
    }
  }

  /// Removes what a failed creation left: the branch file, and the directory if it is empty.
  private static func removeFailedBranch(_ path: String, of imagePath: String) {
    _ = unlink(path)
    _ = rmdir(branchDirectory(of: imagePath))
  }

  /// Creates the branch file at `path` over snapshot `snapshot` of the image; with `pinnedAt`,
  /// the snapshot is the pin of a branch made at that seq.
  private static func makeBranch(
    _ path: String, of imagePath: String, snapshot: String, virtualSize: UInt64?, pinnedAt seq: UInt64?,
    options: ImageOptions
  ) throws -> StrataImage {
    let parentPath = "../" + baseName(of: imagePath)
    let parent = try openParent(parentPath, relativeTo: path, depth: 1, options: options, locked: false)
    let backing: Backing
    do {
      let entry = try parent.snapshotEntry(snapshot)
      let point = BackingPoint(
        name: entry.name, seq: entry.seq, baseCheckpoint: entry.baseCheckpoint, originSeq: seq ?? 0,
        ownedByBranch: seq != nil)
      let descriptor = BackingDescriptor(
        path: parentPath, parentImageID: parent.superblock.imageID, parentSize: parent.size, point: point)
      backing = Backing(descriptor: descriptor, image: parent, view: try parent.pointView(point, parentPath: imagePath))
    } catch {
      try? parent.close()
      throw error
    }
    return try create(
      path: path, descriptor: backing.descriptor, backing: backing, virtualSize: virtualSize, options: options,
      overwrite: false)
  }

  /// Creates branch `name` of the image at `imagePath` holding the disk as it was just before
  /// operation `seq`, and returns it open. Opens the image for writing: it adds the pin snapshot
  /// `branch:NAME` at its head; the blocks that differ between the point and the pin are
  /// copied into the branch.
  public static func createBranch(
    of imagePath: String, name: String, atSeq seq: UInt64, options: ImageOptions = ImageOptions()
  ) throws -> StrataImage {
    try createBranch(of: imagePath, name: name, at: { _ in seq }, options: options)
  }

  /// As `createBranch(of:name:atSeq:)`, with the point found in the open image (a time, say).
  /// With `pinner`, the image is another process's (`strata serve`): it is only read here,
  /// without its lock, and `pinner` has that process create the pin snapshot of the name it is
  /// given, returning once the snapshot is durable (the control socket's `snapshot` command).
  public static func createBranch(
    of imagePath: String, name: String, at point: (StrataImage) throws -> UInt64,
    pinner: ((String) throws -> Void)? = nil, options: ImageOptions = ImageOptions()
  ) throws -> StrataImage {
    try validateBranchName(name)
    let path = try prepareBranchPath(of: imagePath, name: name)
    let pinName = branchPinPrefix + name
    var imageOptions = options
    imageOptions.readOnly = false
    // The point, the pin, and the ranges that differ between them.
    let seq: UInt64
    let plan: (ranges: [Range<UInt64>], size: UInt64)
    do {
      if let pinner {
        seq = try withImage(try openForViews(path: imagePath, options: options)) { image in
          let seq = try point(image)
          _ = try image.view(atSeq: seq)
          return seq
        }
        try pinner(pinName)
        plan = try withImage(try openForViews(path: imagePath, options: options)) {
          try $0.pinPlan(from: seq, to: pinName)
        }
      } else {
        (seq, plan) = try withImage(try open(path: imagePath, options: imageOptions)) { image in
          let seq = try point(image)
          _ = try image.view(atSeq: seq)
          try image.createSnapshot(name: pinName)
          try image.flush()
          return (seq, try image.pinPlan(from: seq, to: pinName))
        }
      }
    } catch {
      _ = rmdir(branchDirectory(of: imagePath))
      throw error
    }
    let ranges = plan.ranges
    let size = plan.size
    do {
      let branch = try makeBranch(
        path, of: imagePath, snapshot: pinName, virtualSize: size, pinnedAt: seq, options: options)
      do {
        guard let parent = branch.backingImage else { throw StrataError(.corrupt, "the branch lost its parent") }
        let old = try parent.view(atSeq: seq)
        let chunk = 1 << 20
        var buffer = [UInt8](repeating: 0, count: chunk)
        for range in ranges {
          var offset = range.lowerBound
          while offset < min(range.upperBound, size) {
            let n = Int(min(UInt64(chunk), min(range.upperBound, size) - offset))
            try buffer.withUnsafeMutableBytes {
              try old.read(into: UnsafeMutableRawBufferPointer(rebasing: $0[..<n]), at: offset)
            }
            try buffer.withUnsafeBytes { try branch.write(UnsafeRawBufferPointer(rebasing: $0[..<n]), at: offset) }
            offset += UInt64(n)
          }
        }
        try branch.flush()
        return branch
      } catch {
        try? branch.close()
        throw error
      }
    } catch {
      // Leave nothing behind: no half-copied branch, no pin.
      removeFailedBranch(path, of: imagePath)
      if let image = try? open(path: imagePath, options: imageOptions) {
        try? image.deleteSnapshot(name: pinName)
        try? image.close()
      } else if let e = error as? StrataError {
        throw StrataError(
          e.code,
          e.message + " (the pin snapshot \"\(pinName)\" stays in \(imagePath): delete it with "
            + "'strata snapshot delete' once the image is free)", errno: e.errno)
      }
      throw error
    }
  }

  /// Runs `body` on `image`, then closes it (also when `body` throws).
  private static func withImage<T>(_ image: StrataImage, _ body: (StrataImage) throws -> T) throws -> T {
    let result: T
    do { result = try body(image) } catch {
      try? image.close()
      throw error
    }
    try image.close()
    return result
  }

  /// What a branch at `seq` pinned by snapshot `pinName` must copy: the ranges that differ
  /// between the two views, and the point's size.
  private func pinPlan(from seq: UInt64, to pinName: String) throws -> (ranges: [Range<UInt64>], size: UInt64) {
    let old = try view(atSeq: seq)
    let pin = try snapshotView(name: pinName)
    return (try changedRanges(since: old, in: pin, from: 0, length: old.size), old.size)
  }

  /// The branches of the image at `imagePath`, by name. An image without branches has none
  /// (and no directory).
  public static func branches(of imagePath: String) throws -> [BranchInfo] {
    guard access(imagePath, F_OK) == 0 else { throw StrataError(.notFound, "\(imagePath): no such file") }
    var out: [BranchInfo] = []
    for name in try branchFiles(of: imagePath) {
      let path = branchPath(of: imagePath, name: name)
      guard let descriptor = try? readDescriptor(path), let point = descriptor.point else { continue }
      var info = BranchInfo(
        name: name, path: path, snapshot: point.name, seq: point.seq,
        originSeq: point.originSeq == 0 ? nil : point.originSeq, ownsSnapshot: point.ownedByBranch)
      var options = ImageOptions()
      options.readOnly = true
      options.unlocked = true
      do {
        let branch = try open(path: path, options: options)
        info.size = branch.size
        info.createdNanoseconds = branch.superblock.createdNanoseconds
        try branch.close()
      } catch let e as StrataError {
        info.problem = e.message
      }
      out.append(info)
    }
    return out.sorted { Array($0.name.utf8).lexicographicallyPrecedes(Array($1.name.utf8)) }
  }

  /// Deletes branch `name` of the image at `imagePath`, and its pin snapshot if it has one (and
  /// no other branch is based on it). Refuses while the branch is in use (served or open), and,
  /// for a branch with a pin, while the image is.
  public static func deleteBranch(of imagePath: String, name: String, options: ImageOptions = ImageOptions()) throws {
    try validateBranchName(name)
    let path = branchPath(of: imagePath, name: name)
    guard access(path, F_OK) == 0 else {
      throw StrataError(.notFound, "\(imagePath) has no branch named \"\(name)\" (no file \(path))")
    }
    let descriptor: BackingDescriptor
    do { descriptor = try readDescriptor(path) } catch let e as StrataError {
      throw StrataError(.invalidArgument, "\(path) is not a branch of \(imagePath): \(e.message)")
    }
    guard let point = descriptor.point else {
      throw StrataError(.invalidArgument, "\(path) is not a branch of \(imagePath) (its backing file is no snapshot)")
    }
    let nested = try branchFiles(of: path)
    guard nested.isEmpty else {
      throw StrataError(
        .invalidArgument,
        "branch \"\(name)\" has branches of its own (\(nested.joined(separator: ", ")) in "
          + "\(branchDirectory(of: path))): delete them first")
    }
    // Holding the branch's lock keeps a served branch from being removed under its server.
    let lock = try FileStorage(path: path, mode: .readWrite, engine: .threads)
    defer { try? lock.close() }
    var image: StrataImage?
    if point.ownedByBranch {
      var imageOptions = options
      imageOptions.readOnly = false
      let opened: StrataImage
      do { opened = try open(path: imagePath, options: imageOptions) } catch let e as StrataError
        where e.code == .locked
      {
        throw StrataError(
          .locked,
          "branch \"\(name)\" is deleted with its pin snapshot \"\(point.name)\", which needs \(imagePath) for "
            + "writing: \(e.message)")
      }
      let sharers: [String]
      do { sharers = try opened.branchPins()[point.seq] ?? [] } catch {
        try? opened.close()
        throw error
      }
      if sharers == [name] {
        image = opened
      } else {
        try opened.close()  // another branch is based on the pin too: it stays
      }
    }
    guard unlink(path) == 0 else {
      let e = errno
      try? image?.close()
      throw StrataError.system("unlink", path, errno: e)
    }
    _ = rmdir(branchDirectory(of: imagePath))  // when it is empty
    if let image {
      do {
        if let entry = try image.catalog.entry(seq: point.seq), entry.name == point.name {
          try image.deleteSnapshot(name: entry.name)
          try image.flush()
        }
        try image.close()
      } catch {
        try? image.close()
        throw error
      }
    }
  }

  /// The branches of this image by the seq of the snapshot each is based on: those snapshots
  /// cannot be deleted. Read from the backing pages in `IMAGE.branches/` (none for storage that
  /// is not a file).
  public func branchPins() throws -> [UInt64: [String]] {
    guard let path else { return [:] }
    var pins: [UInt64: [String]] = [:]
    for name in try Self.branchFiles(of: path) {
      guard let d = try? Self.readDescriptor(Self.branchPath(of: path, name: name)), let point = d.point,
        d.parentImageID == superblock.imageID
      else { continue }
      pins[point.seq, default: []].append(name)
    }
    return pins
  }

  /// The block-aligned ranges this image holds itself (data or zeros), not through its
  /// backing file: for a branch, what was written (or copied) into it.
  public func ownRanges() throws -> [Range<UInt64>] {
    try checkOpen()
    var out: [Range<UInt64>] = []
    for e in try extents(of: map, size: virtualSize, from: 0, length: nil, resolve: false) where e.state != .unallocated
    {
      if let last = out.last, last.upperBound == e.offset {
        out[out.count - 1] = last.lowerBound..<(e.offset + e.length)
      } else {
        out.append(e.offset..<(e.offset + e.length))
      }
    }
    return out
  }

  /// The point of this image a branch of it stands on, for `changedRanges(from:to:)`.
  public func diffPoint(branch: StrataImage) throws -> DiffPoint {
    try checkOpen()
    guard let descriptor = branch.backing?.descriptor, let point = descriptor.point,
      descriptor.parentImageID == superblock.imageID
    else {
      throw StrataError(.invalidArgument, "\(branch.path ?? "the image") is not a branch of \(path ?? "this image")")
    }
    return DiffPoint(
      view: try pointView(point, parentPath: path ?? "the image"), own: try branch.ownRanges(), size: branch.size)
  }

  /// A view of this image (nil: its head) as a point for `changedRanges(from:to:)`.
  public func diffPoint(_ view: SnapshotView?) -> DiffPoint {
    DiffPoint(view: view, own: [], size: view?.size ?? size)
  }

  /// The ranges whose contents may differ between two points, each a view or the head of this
  /// image or a branch of it, from metadata alone: what the branches hold themselves plus what
  /// differs between the points of this image they stand on. Merged, block-aligned.
  public func changedRanges(from a: DiffPoint, to b: DiffPoint) throws -> [Range<UInt64>] {
    let length = max(a.size, b.size)
    var ranges: [Range<UInt64>]
    switch (a.view, b.view) {
    case (nil, nil): ranges = []
    case (let x?, nil): ranges = try changedRanges(since: x, in: nil, from: 0, length: length)
    case (nil, let y?): ranges = try changedRanges(since: y, in: nil, from: 0, length: length)
    case (let x?, let y?): ranges = try changedRanges(since: x, in: y, from: 0, length: length)
    }
    ranges += a.own + b.own
    ranges.sort { $0.lowerBound < $1.lowerBound }
    var out: [Range<UInt64>] = []
    for r in ranges {
      let r = r.clamped(to: 0..<length)
      guard !r.isEmpty else { continue }
      if let last = out.last, last.upperBound >= r.lowerBound {
        out[out.count - 1] = last.lowerBound..<max(last.upperBound, r.upperBound)
      } else {
        out.append(r)
      }
    }
    return out
  }

  // MARK: Helpers

  /// Checks the name, makes the branch directory and refuses an existing branch.
  private static func prepareBranchPath(of imagePath: String, name: String) throws -> String {
    guard access(imagePath, F_OK) == 0 else { throw StrataError(.notFound, "\(imagePath): no such file") }
    let directory = branchDirectory(of: imagePath)
    if mkdir(directory, 0o755) != 0 && errno != EEXIST {
      throw StrataError.system("mkdir", directory, errno: errno)
    }
    let path = branchPath(of: imagePath, name: name)
    guard access(path, F_OK) != 0 else {
      throw StrataError(.alreadyExists, "branch \"\(name)\" of \(imagePath) already exists (\(path))")
    }
    return path
  }

  /// The names of the `NAME.strata` files in the branch directory (not hidden ones).
  static func branchFiles(of imagePath: String) throws -> [String] {
    let directory = branchDirectory(of: imagePath)
    guard let dir = opendir(directory) else {
      if errno == ENOENT || errno == ENOTDIR { return [] }
      throw StrataError.system("opendir", directory, errno: errno)
    }
    defer { closedir(dir) }
    var names: [String] = []
    while let entry = readdir(dir) {
      let name = withUnsafeBytes(of: entry.pointee.d_name) { raw in
        String(decoding: raw.prefix(while: { $0 != 0 }), as: UTF8.self)
      }
      if !name.hasPrefix("."), name.hasSuffix(branchExtension), name.utf8.count > branchExtension.utf8.count {
        names.append(String(name.dropLast(branchExtension.count)))
      }
    }
    return names
  }

  /// The backing page of the image file at `path`, read without the lock (it never changes).
  static func readDescriptor(_ path: String) throws -> BackingDescriptor {
    let storage = try FileStorage(path: path, mode: .readOnlyUnlocked, engine: .threads)
    defer { try? storage.close() }
    return try readBackingPage(from: storage)
  }

  private static func baseName(of path: String) -> String {
    guard let slash = path.lastIndex(of: "/") else { return path }
    return String(path[path.index(after: slash)...])
  }
}

/// One side of `changedRanges(from:to:)`: a view of an image or its head, plus the ranges a
/// branch holds itself.
public struct DiffPoint {
  let view: SnapshotView?
  let own: [Range<UInt64>]
  public let size: UInt64
}
