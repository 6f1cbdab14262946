#if canImport(Glibc)
  import Glibc
#endif

/// Unix stream sockets for the servers (vhost-user, NBD, control).
public enum UnixSocket {
  /// Binds and listens on `path` (close-on-exec). A socket file left behind by a dead server
  /// is replaced; one a live server listens on is not stolen, and other files are left alone.
  public static func listen(path: String, backlog: Int32) throws -> Int32 {
    var address = try self.address(path)
    let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
    guard fd >= 0 else { throw StrataError.system("socket", path, errno: errno) }
    let length = socklen_t(MemoryLayout<sockaddr_un>.size)
    var st = stat()
    if lstat(path, &st) == 0 {
      guard (st.st_mode & S_IFMT) == S_IFSOCK else {
        close(fd)
        throw StrataError(.alreadyExists, "\(path) exists and is not a socket")
      }
      let probe = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
      let live = withUnsafePointer(to: &address) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.connect(probe, $0, length) == 0 }
      }
      close(probe)
      if live {
        close(fd)
        throw StrataError(.locked, "\(path) is a socket another server is listening on")
      }
      unlink(path)
    }
    let bound = withUnsafePointer(to: &address) {
      $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, length) }
    }
    guard bound == 0, Glibc.listen(fd, backlog) == 0 else {
      let e = errno
      close(fd)
      throw StrataError.system("bind", path, errno: e)
    }
    return fd
  }

  /// Connects to the socket at `path`.
  public static func connect(path: String) throws -> Int32 {
    var address = try self.address(path)
    let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
    guard fd >= 0 else { throw StrataError.system("socket", path, errno: errno) }
    let r = withUnsafePointer(to: &address) {
      $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
        Glibc.connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size))
      }
    }
    guard r == 0 else {
      let e = errno
      close(fd)
      throw StrataError.system("connect", path, errno: e)
    }
    return fd
  }

  private static func address(_ path: String) throws -> sockaddr_un {
    var address = sockaddr_un()
    address.sun_family = sa_family_t(AF_UNIX)
    let bytes = Array(path.utf8)
    guard bytes.count < MemoryLayout.size(ofValue: address.sun_path) else {
      throw StrataError(.invalidArgument, "socket path \(path) is too long (at most 107 bytes)")
    }
    withUnsafeMutableBytes(of: &address.sun_path) { raw in
      for (i, b) in bytes.enumerated() { raw[i] = b }
    }
    return address
  }
}
