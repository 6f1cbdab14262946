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
    let parent = try openParent(parentPath, relativeTo: path, depth: 1, options: options)
    let descriptor = BackingDescriptor(
      path: parentPath, parentImageID: parent.superblock.imageID, parentSize: parent.size)
    let child: StrataImage
    do {
      var childOptions = options
      childOptions.backing = descriptor
      child = try create(
        path: path, virtualSize: virtualSize ?? parent.size, options: childOptions, overwrite: overwrite)
    } catch {
      try? parent.close()
      throw error
    }
    child.backing = Backing(descriptor: descriptor, image: parent)
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
  /// image the child was made from.
  static func attachParent(_ descriptor: BackingDescriptor, childPath: String, depth: Int, options: ImageOptions) throws
    -> Backing
  {
    let parent = try openParent(descriptor.path, relativeTo: childPath, depth: depth, options: options)
    guard parent.superblock.imageID == descriptor.parentImageID else {
      try? parent.close()
      throw StrataError(
        .corrupt,
        "backing file \(descriptor.path) is not the image this one was created from (its image id differs): "
          + "reading through it would return another disk's data")
    }
    return Backing(descriptor: descriptor, image: parent)
  }

  private static func openParent(_ parentPath: String, relativeTo childPath: String, depth: Int, options: ImageOptions)
    throws -> StrataImage
  {
    guard depth <= maxBackingDepth else {
      throw StrataError(
        .invalidArgument, "the backing chain is deeper than \(maxBackingDepth) images (a loop of backing files?)")
    }
    var parentOptions = ImageOptions()
    parentOptions.readOnly = true
    parentOptions.ioEngine = options.ioEngine
    parentOptions.mapCacheNodes = parentCacheNodes
    parentOptions.backingDepth = depth
    let resolved = parentPath.hasPrefix("/") ? parentPath : directory(of: childPath) + "/" + parentPath
    do {
      return try open(path: resolved, options: parentOptions)
    } catch let e as StrataError where e.code == .notFound {
      throw StrataError(.notFound, "backing file \(resolved) not found (named \(parentPath) in \(childPath))")
    }
  }

  private static func directory(of path: String) -> String {
    guard let slash = path.lastIndex(of: "/") else { return "." }
    return slash == path.startIndex ? "/" : String(path[..<slash])
  }

  /// Reads `out.count` bytes at `offset` of the backing chain into blocks this image does not
  /// hold: the parent's data where it has some, zeros past its end.
  func readBacking(into out: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
    guard let parent = backing?.image, offset < parent.size else {
      out.initializeMemory(as: UInt8.self, repeating: 0)
      return
    }
    let inParent = Int(min(UInt64(out.count), parent.size - offset))
    try parent.read(into: UnsafeMutableRawBufferPointer(rebasing: out[..<inParent]), at: offset)
    if inParent < out.count {
      UnsafeMutableRawBufferPointer(rebasing: out[inParent...]).initializeMemory(as: UInt8.self, repeating: 0)
    }
  }

  /// Replaces the unallocated extents of `extents` with what the backing chain holds there.
  func resolveBacking(_ extents: [Extent]) throws -> [Extent] {
    guard let parent = backing?.image else { return extents }
    var out: [Extent] = []
    for e in extents {
      guard e.state == .unallocated, e.offset < parent.size else {
        out.append(e)
        continue
      }
      let inParent = min(e.length, parent.size - e.offset)
      for var p in try parent.extents(from: e.offset, length: inParent) {
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

/// A child's parent and the page that names it.
struct Backing {
  var descriptor: BackingDescriptor
  var image: StrataImage
}
