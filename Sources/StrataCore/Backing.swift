import StrataFormat

#if canImport(Glibc)
  import Glibc
#endif

/// External clones (golden-image provisioning): an image created with a backing file reads
/// every block it never wrote from its parent, opened read-only; writes, snapshots and the log
/// stay in the child. Discarded and zeroed blocks are stored as zeros, so they never show the
/// parent's data again.
///
/// Long chains: a block the child does not hold costs one in-memory map lookup per layer until
/// a layer holds it, and only that layer reads from disk; runs of such blocks are looked up and
/// read as one range per layer. A chain of 100 layers therefore adds map lookups (tens of
/// nanoseconds each, against tens of microseconds for the read), not 100 reads. Parents keep a
/// small map cache (`parentCacheNodes`), so a deep chain does not multiply metadata memory.
extension StrataImage {
  /// Deepest chain opened (a loop or a runaway chain fails instead of exhausting descriptors).
  public static let maxBackingDepth = 256
  static let parentCacheNodes = 1024

  /// The parent, if this image has a backing file.
  public var backingImage: StrataImage? { backing?.image }
  /// The backing file as stored in the image (absolute, or relative to the image's directory).
  public var backingPath: String? { backing?.descriptor.path }
  /// Every backing file of the chain, parent first.
  public var backingChain: [String] {
    guard let backing else { return [] }
    return [backing.descriptor.path] + backing.image.backingChain
  }

  /// Creates `path` as a child of the image at `parent` (`parentPath` is stored as given: keep it
  /// relative to move the pair together). The child has the parent's size unless `virtualSize`
  /// says otherwise.
  public static func create(
    path: String, backing parentPath: String, virtualSize: UInt64? = nil, options: ImageOptions = ImageOptions(),
    overwrite: Bool = false
  ) throws -> StrataImage {
    let parent = try openParent(parentPath, relativeTo: path, depth: 1, options: options, locked: true)
    let descriptor = BackingDescriptor(
      path: parentPath, parentImageID: parent.superblock.imageID, parentSize: parent.size)
    return try create(
      path: path, descriptor: descriptor, backing: Backing(descriptor: descriptor, image: parent),
      virtualSize: virtualSize, options: options, overwrite: overwrite)
  }

  /// Creates a child over an attached parent (closed here when creation fails).
  static func create(
    path: String, descriptor: BackingDescriptor, backing: Backing, virtualSize: UInt64?, options: ImageOptions,
    overwrite: Bool
  ) throws -> StrataImage {
    let child: StrataImage
    do {
      var childOptions = options
      childOptions.backing = descriptor
      child = try create(
        path: path, virtualSize: virtualSize ?? backing.size, options: childOptions, overwrite: overwrite)
    } catch {
      try? backing.image.close()
      throw error
    }
    child.backing = backing
    return child
  }

  /// Writes the backing page of a new image (before its first superblock names the feature).
  static func writeBackingPage(_ descriptor: BackingDescriptor, to storage: ImageStorage) throws {
    let page: [UInt8]
    do { page = try descriptor.encode() } catch let e as FormatError {
      throw StrataError(.invalidArgument, "backing file \(descriptor.path): \(e.detail)")
    }
    try page.withUnsafeBytes { try storage.write($0, at: BackingDescriptor.offset) }
  }

  /// Reads the backing page of an image whose superblock sets BACKING_FILE.
  static func readBackingPage(from storage: ImageStorage) throws -> BackingDescriptor {
    var page = [UInt8](repeating: 0, count: Layout.pageSize)
    let got = try page.withUnsafeMutableBytes { try storage.read(into: $0, at: BackingDescriptor.offset) }
    guard got == Layout.pageSize else { throw StrataError(.corrupt, "the backing file page is cut short") }
    do {
      return try page.withUnsafeBytes { try BackingDescriptor.decode($0) }
    } catch let e as FormatError {
      throw StrataError.corrupt("backing file page", e)
    }
  }

  /// Opens the parent named by `descriptor` for the image at `childPath` and checks it is the
  /// image the child was made from. A child over a point (a branch) reads only the snapshot's
  /// view, which is immutable log data, so its parent is opened without the file lock: a branch
  /// can be read while its parent is served or written, and does not keep the parent from
  /// being opened for writing.
  static func attachParent(_ descriptor: BackingDescriptor, childPath: String, depth: Int, options: ImageOptions) throws
    -> Backing
  {
    let parent = try openParent(
      descriptor.path, relativeTo: childPath, depth: depth, options: options, locked: descriptor.point == nil)
    do {
      guard parent.superblock.imageID == descriptor.parentImageID else {
        throw StrataError(
          .corrupt,
          "backing file \(descriptor.path) is not the image this one was created from (its image id differs): "
            + "reading through it would return another disk's data")
      }
      guard let point = descriptor.point else { return Backing(descriptor: descriptor, image: parent) }
      return Backing(
        descriptor: descriptor, image: parent, view: try parent.pointView(point, parentPath: descriptor.path))
    } catch {
      try? parent.close()
      throw error
    }
  }

  /// The view a branch reads through to: the snapshot the point names, which must still be in
  /// the catalog with the same seq and base checkpoint (a deleted snapshot's log may be
  /// reclaimed, and another snapshot of that name is another disk).
  func pointView(_ point: BackingPoint, parentPath: String) throws -> SnapshotView {
    guard let entry = try catalog.entry(seq: point.seq), entry.name == point.name,
      entry.baseCheckpoint == point.baseCheckpoint
    else {
      throw StrataError(
        .notFound,
        "snapshot \"\(point.name)\" (seq \(point.seq)) of \(parentPath), which this branch is based on, "
          + "is no longer there: the branch cannot be read")
    }
    return SnapshotView(
      image: self, view: try view(at: entry.seq, base: entry.baseCheckpoint), info: SnapshotInfo(entry))
  }

  static func openParent(
    _ parentPath: String, relativeTo childPath: String, depth: Int, options: ImageOptions, locked: Bool
  ) throws -> StrataImage {
    guard depth <= maxBackingDepth else {
      throw StrataError(
        .invalidArgument, "the backing chain is deeper than \(maxBackingDepth) images (a loop of backing files?)")
    }
    var parentOptions = ImageOptions()
    parentOptions.readOnly = true
    parentOptions.unlocked = !locked
    parentOptions.ioEngine = options.ioEngine
    parentOptions.mapCacheNodes = parentCacheNodes
    parentOptions.backingDepth = depth
    let resolved = parentPath.hasPrefix("/") ? parentPath : directory(of: childPath) + "/" + parentPath
    do {
      // Read without the lock, the file may change under recovery (the writer checkpoints, the
      // cleaner reuses a segment the superblock read a moment ago named): that looks like
      // damage and passes on the next try.
      var attempt = 1
      while true {
        do {
          let parent = try open(path: resolved, options: parentOptions)
          guard !locked, attempt < 3, !parent.recoveryProblems.isEmpty else { return parent }
          try? parent.close()  // it fell back to an older checkpoint: try again
        } catch let e as StrataError where e.code == .corrupt && !locked && attempt < 3 {}
        attempt += 1
      }
    } catch let e as StrataError where e.code == .notFound {
      throw StrataError(.notFound, "backing file \(resolved) not found (named \(parentPath) in \(childPath))")
    }
  }

  static func directory(of path: String) -> String {
    guard let slash = path.lastIndex(of: "/") else { return "." }
    return slash == path.startIndex ? "/" : String(path[..<slash])
  }

  /// Reads `out.count` bytes at `offset` of the backing chain into blocks this image does not
  /// hold: the parent's data (its head, or the branch's point) where it has some, zeros past
  /// its end.
  func readBacking(into out: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
    guard let backing, offset < backing.size else {
      out.initializeMemory(as: UInt8.self, repeating: 0)
      return
    }
    let inParent = Int(min(UInt64(out.count), backing.size - offset))
    let part = UnsafeMutableRawBufferPointer(rebasing: out[..<inParent])
    if let view = backing.view {
      try view.read(into: part, at: offset)
    } else {
      try backing.image.read(into: part, at: offset)
    }
    if inParent < out.count {
      UnsafeMutableRawBufferPointer(rebasing: out[inParent...]).initializeMemory(as: UInt8.self, repeating: 0)
    }
  }

  /// Replaces the unallocated extents of `extents` with what the backing chain holds there.
  func resolveBacking(_ extents: [Extent]) throws -> [Extent] {
    guard let backing else { return extents }
    var out: [Extent] = []
    for e in extents {
      guard e.state == .unallocated, e.offset < backing.size else {
        out.append(e)
        continue
      }
      let inParent = min(e.length, backing.size - e.offset)
      let below =
        try backing.view?.extents(from: e.offset, length: inParent)
        ?? backing.image.extents(from: e.offset, length: inParent)
      for var p in below {
        p.layer += 1
        out.append(p)
      }
      if inParent < e.length {
        out.append(
          Extent(offset: e.offset + inParent, length: e.length - inParent, state: .unallocated, fileOffset: nil))
      }
    }
    return out
  }
}

/// A child's parent and the page that names it; for a branch, the view of the parent's snapshot
/// it reads through to.
struct Backing {
  var descriptor: BackingDescriptor
  var image: StrataImage
  var view: SnapshotView?

  /// How far the parent's disk reaches: past it, a child's unwritten blocks read as zeros.
  var size: UInt64 { view?.size ?? image.size }
}
