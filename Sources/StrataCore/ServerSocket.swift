#if canImport(Glibc)
  import Glibc
#endif

/// Listening sockets for the servers in `strata serve` (vhost-user, NBD).
public enum ServerSocket {
  /// Binds and listens on a Unix socket at `path`. A socket file left behind by a dead server is
  /// replaced; one a live server listens on is not stolen, and a file that is not a socket is
  /// left alone.
  public static func listenUnix(_ path: String, backlog: Int32) throws -> Int32 {
    var address = sockaddr_un()
    address.sun_family = sa_family_t(AF_UNIX)
    let bytes = Array(path.utf8)
    guard bytes.count < MemoryLayout.size(ofValue: address.sun_path) else {
      throw StrataError(.invalidArgument, "socket path \(path) is too long")
    }
    withUnsafeMutableBytes(of: &address.sun_path) { raw in
      for (i, b) in bytes.enumerated() { raw[i] = b }
    }
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
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(probe, $0, length) == 0 }
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
    guard bound == 0, listen(fd, backlog) == 0 else {
      let e = errno
      close(fd)
      throw StrataError.system("bind", path, errno: e)
    }
    return fd
  }

  /// Binds and listens on a TCP address (a host name or IPv4/IPv6 literal; "" for every address).
  public static func listenTCP(host: String, port: UInt16, backlog: Int32) throws -> Int32 {
    var hints = addrinfo()
    hints.ai_family = AF_UNSPEC
    hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
    hints.ai_flags = AI_PASSIVE
    var list: UnsafeMutablePointer<addrinfo>?
    let r = getaddrinfo(host.isEmpty ? nil : host, String(port), &hints, &list)
    guard r == 0, let first = list else {
      throw StrataError(.invalidArgument, "cannot resolve \(host):\(port): \(String(cString: gai_strerror(r)))")
    }
    defer { freeaddrinfo(list) }
    var lastErrno: Int32 = EADDRNOTAVAIL
    var candidate: UnsafeMutablePointer<addrinfo>? = first
    while let ai = candidate {
      candidate = ai.pointee.ai_next
      let fd = socket(ai.pointee.ai_family, ai.pointee.ai_socktype | Int32(SOCK_CLOEXEC.rawValue), 0)
      guard fd >= 0 else {
        lastErrno = errno
        continue
      }
      var one: Int32 = 1
      setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
      if bind(fd, ai.pointee.ai_addr, ai.pointee.ai_addrlen) == 0 && listen(fd, backlog) == 0 { return fd }
      lastErrno = errno
      close(fd)
    }
    throw StrataError.system("bind", "\(host):\(port)", errno: lastErrno)
  }
}
