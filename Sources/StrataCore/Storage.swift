#if canImport(Glibc)
  import Glibc
#endif

/// Where an image's bytes live. The image does all its I/O through this protocol, so tests can
/// inject faults and the io_uring engine can plug in underneath.
///
/// Contract: `write` may be lost or torn by a crash until `sync` returns; after `sync` returns,
/// everything written before it is durable.
public protocol ImageStorage: AnyObject {
  /// Reads up to `buffer.count` bytes at `offset`; returns fewer only at the end of the storage.
  func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws -> Int
  func write(_ bytes: UnsafeRawBufferPointer, at offset: UInt64) throws
  /// Makes every completed write durable (fdatasync).
  func sync() throws
  func size() throws -> UInt64
  /// Sets the size (truncate or extend with zeros).
  func setSize(_ size: UInt64) throws
  /// Releases the storage. Called exactly once by the image.
  func close() throws
}

/// A regular file accessed with pread/pwrite, locked with flock so that two processes never
/// write one image.
public final class FileStorage: ImageStorage {
  public enum Mode: Sendable {
    case readOnly
    case readWrite
    /// Creates the file; fails if it exists unless `overwrite`.
    case create(overwrite: Bool)
  }

  public let path: String
  private var fd: Int32

  public init(path: String, mode: Mode) throws {
    self.path = path
    let flags: Int32
    switch mode {
    case .readOnly: flags = O_RDONLY
    case .readWrite: flags = O_RDWR
    case .create(let overwrite): flags = O_RDWR | O_CREAT | (overwrite ? 0 : O_EXCL)
    }
    let fd = Self.retrying { Glibc.open(path, flags | O_CLOEXEC, 0o644) }
    guard fd >= 0 else {
      let e = Glibc.errno
      if e == EEXIST {
        throw StrataError(.alreadyExists, "\(path) already exists (use --force to overwrite)", errno: e)
      }
      if e == ENOENT { throw StrataError(.notFound, "\(path): no such file", errno: e) }
      throw StrataError.system("open", path, errno: e)
    }
    self.fd = fd
    // From here on, every failure closes the descriptor and forgets it before throwing.
    func fail(_ error: StrataError) -> StrataError {
      Glibc.close(fd)
      self.fd = -1
      return error
    }
    var st = stat()
    if fstat(fd, &st) == 0, (st.st_mode & S_IFMT) == S_IFDIR {
      throw fail(StrataError(.invalidArgument, "\(path) is a directory"))
    }
    let lock: Int32 = if case .readOnly = mode { LOCK_SH } else { LOCK_EX }
    if Self.retrying({ flock(fd, lock | LOCK_NB) }) != 0 {
      let e = Glibc.errno
      if e == EWOULDBLOCK {
        throw fail(StrataError(.locked, "\(path) is in use by another process (it holds the image lock)", errno: e))
      }
      throw fail(StrataError.system("flock", path, errno: e))
    }
    // Overwriting truncates only once the lock is held, never under another process's feet.
    if case .create(overwrite: true) = mode, Self.retrying({ ftruncate(fd, 0) }) != 0 {
      throw fail(StrataError.system("ftruncate", path, errno: Glibc.errno))
    }
  }

  deinit {
    assert(fd < 0, "FileStorage for \(path) was never closed")
  }

  public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws -> Int {
    var done = 0
    while done < buffer.count {
      let n = Self.retrying {
        pread(fd, buffer.baseAddress! + done, buffer.count - done, off_t(offset) + off_t(done))
      }
      if n < 0 { throw StrataError.system("pread", path, errno: Glibc.errno) }
      if n == 0 { break }
      done += n
    }
    return done
  }

  public func write(_ bytes: UnsafeRawBufferPointer, at offset: UInt64) throws {
    var done = 0
    while done < bytes.count {
      let n = Self.retrying {
        pwrite(fd, bytes.baseAddress! + done, bytes.count - done, off_t(offset) + off_t(done))
      }
      if n < 0 { throw StrataError.system("pwrite", path, errno: Glibc.errno) }
      done += n
    }
  }

  public func sync() throws {
    if Self.retrying({ fdatasync(fd) }) != 0 { throw StrataError.system("fdatasync", path, errno: Glibc.errno) }
  }

  public func size() throws -> UInt64 {
    var st = stat()
    if fstat(fd, &st) != 0 { throw StrataError.system("fstat", path, errno: Glibc.errno) }
    return UInt64(st.st_size)
  }

  /// Bytes actually allocated on disk (st_blocks), what `du` shows.
  public func allocatedSize() throws -> UInt64 {
    var st = stat()
    if fstat(fd, &st) != 0 { throw StrataError.system("fstat", path, errno: Glibc.errno) }
    return UInt64(st.st_blocks) * 512
  }

  public func setSize(_ size: UInt64) throws {
    if Self.retrying({ ftruncate(fd, off_t(size)) }) != 0 {
      throw StrataError.system("ftruncate", path, errno: Glibc.errno)
    }
  }

  public func close() throws {
    precondition(fd >= 0, "FileStorage closed twice")
    let result = Glibc.close(fd)
    fd = -1
    if result != 0 { throw StrataError.system("close", path, errno: Glibc.errno) }
  }

  private static func retrying<T: BinaryInteger>(_ call: () -> T) -> T {
    while true {
      let r = call()
      if r >= 0 || Glibc.errno != EINTR { return r }
    }
  }
}
