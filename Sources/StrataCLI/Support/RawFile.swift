import StrataCore

#if canImport(Glibc)
  import Glibc
#elseif canImport(Musl)
  import Musl
#elseif canImport(Darwin)
  import Darwin
#endif

/// A plain file (or standard input/output) used through POSIX calls, so that every failure is
/// a thrown `StrataError` rather than a trap, and raw images can be written sparsely.
final class RawFile {
  let path: String
  private var fd: Int32
  private let ownsDescriptor: Bool

  private init(path: String, fd: Int32, ownsDescriptor: Bool) {
    self.path = path
    self.fd = fd
    self.ownsDescriptor = ownsDescriptor
  }

  deinit {
    if ownsDescriptor && fd >= 0 { _ = systemClose(fd) }
  }

  /// The open descriptor, or nil once closed.
  var descriptor: Int32? { fd >= 0 ? fd : nil }

  static var standardInput: RawFile { RawFile(path: "<stdin>", fd: 0, ownsDescriptor: false) }
  static var standardOutput: RawFile { RawFile(path: "<stdout>", fd: 1, ownsDescriptor: false) }

  /// Opens `path` for reading; `-` is standard input.
  static func openForReading(_ path: String) throws -> RawFile {
    if path == "-" { return standardInput }
    let fd = retrying { systemOpen(path, O_RDONLY | O_CLOEXEC, 0) }
    guard fd >= 0 else { throw failure("open", path) }
    let file = RawFile(path: path, fd: fd, ownsDescriptor: true)
    if try file.isDirectory { throw StrataError(.invalidArgument, "\(path) is a directory") }
    return file
  }

  /// Creates `path` for writing; an existing file is replaced only with `overwrite`.
  /// `-` is standard output.
  static func create(_ path: String, overwrite: Bool) throws -> RawFile {
    if path == "-" { return standardOutput }
    let flags = O_WRONLY | O_CREAT | O_CLOEXEC | (overwrite ? O_TRUNC : O_EXCL)
    let fd = retrying { systemOpen(path, flags, 0o644) }
    guard fd >= 0 else {
      if errno == EEXIST {
        throw StrataError(.alreadyExists, "\(path) already exists (use --force to overwrite)", errno: EEXIST)
      }
      throw failure("open", path)
    }
    return RawFile(path: path, fd: fd, ownsDescriptor: true)
  }

  private var status: stat {
    get throws {
      var st = stat()
      guard fstat(fd, &st) == 0 else { throw Self.failure("fstat", path) }
      return st
    }
  }

  private var isDirectory: Bool {
    get throws { (try status.st_mode & S_IFMT) == S_IFDIR }
  }

  /// True for a regular file: it has a size and supports positioned I/O.
  var isRegularFile: Bool {
    get throws { (try status.st_mode & S_IFMT) == S_IFREG }
  }

  var size: UInt64 {
    get throws { UInt64(try status.st_size) }
  }

  /// Reads until `buffer` is full or the input ends; returns the byte count. Sequential.
  func readSome(into buffer: UnsafeMutableRawBufferPointer) throws -> Int {
    var done = 0
    while done < buffer.count {
      let n = Self.retrying { systemRead(fd, buffer.baseAddress! + done, buffer.count - done) }
      if n < 0 { throw Self.failure("read", path) }
      if n == 0 { break }
      done += n
    }
    return done
  }

  /// Reads at `offset`; bytes past the end of the file read as zeros.
  func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
    var done = 0
    while done < buffer.count {
      let n = Self.retrying { pread(fd, buffer.baseAddress! + done, buffer.count - done, off_t(offset) + off_t(done)) }
      if n < 0 { throw Self.failure("pread", path) }
      if n == 0 { break }
      done += n
    }
    if done < buffer.count {
      UnsafeMutableRawBufferPointer(rebasing: buffer[done...]).initializeMemory(as: UInt8.self, repeating: 0)
    }
  }

  /// Writes all of `bytes` at the current position (works for pipes and terminals).
  func write(_ bytes: UnsafeRawBufferPointer) throws {
    var done = 0
    while done < bytes.count {
      let n = Self.retrying { systemWrite(fd, bytes.baseAddress! + done, bytes.count - done) }
      if n < 0 { throw Self.failure("write", path) }
      done += n
    }
  }

  /// Writes all of `bytes` at `offset`.
  func write(_ bytes: UnsafeRawBufferPointer, at offset: UInt64) throws {
    var done = 0
    while done < bytes.count {
      let n = Self.retrying { pwrite(fd, bytes.baseAddress! + done, bytes.count - done, off_t(offset) + off_t(done)) }
      if n < 0 { throw Self.failure("pwrite", path) }
      done += n
    }
  }

  /// Sets the length; growing leaves a hole that reads as zeros and takes no space.
  func setSize(_ size: UInt64) throws {
    if Self.retrying({ ftruncate(fd, off_t(size)) }) != 0 { throw Self.failure("ftruncate", path) }
  }

  /// Makes the contents durable; a no-op for pipes and terminals.
  func sync() throws {
    guard try isRegularFile else { return }
    if Self.retrying({ fsync(fd) }) != 0 { throw Self.failure("fsync", path) }
  }

  func close() throws {
    guard ownsDescriptor, fd >= 0 else { return }
    let result = systemClose(fd)
    fd = -1
    if result != 0 { throw Self.failure("close", path) }
  }

  private static func failure(_ call: String, _ path: String) -> StrataError {
    let e = errno
    let reason = String(cString: strerror(e))
    switch e {
    case ENOENT: return StrataError(.notFound, "\(path): \(reason)", errno: e)
    case ENOSPC, EDQUOT: return StrataError(.noSpace, "\(call) \(path): \(reason)", errno: e)
    default: return StrataError(.io, "\(call) \(path): \(reason)", errno: e)
    }
  }

  private static func retrying<T: BinaryInteger>(_ call: () -> T) -> T {
    while true {
      let r = call()
      if r >= 0 || errno != EINTR { return r }
    }
  }
}

/// Identity of an existing file (device and inode), to refuse converting a file onto itself.
func fileIdentity(_ path: String) -> (UInt64, UInt64)? {
  var st = stat()
  guard stat(path, &st) == 0 else { return nil }
  return (UInt64(st.st_dev), UInt64(st.st_ino))
}

/// True when `path` exists and is something other than a regular file (a device, a directory).
func existsAsNonRegularFile(_ path: String) -> Bool {
  var st = stat()
  guard stat(path, &st) == 0 else { return false }
  return (st.st_mode & S_IFMT) != S_IFREG
}

/// True when standard error is a terminal (progress is drawn only there).
var standardErrorIsTerminal: Bool { isatty(2) != 0 }

private func systemOpen(_ path: String, _ flags: Int32, _ mode: mode_t) -> Int32 { open(path, flags, mode) }
private func systemRead(_ fd: Int32, _ p: UnsafeMutableRawPointer, _ n: Int) -> Int { read(fd, p, n) }
private func systemWrite(_ fd: Int32, _ p: UnsafeRawPointer, _ n: Int) -> Int { write(fd, p, n) }
private func systemClose(_ fd: Int32) -> Int32 { close(fd) }
