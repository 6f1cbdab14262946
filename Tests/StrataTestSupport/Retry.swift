// Connecting to a server that a test has just started: retrying while it is not listening yet.

import Foundation

#if canImport(Glibc)
  import Glibc
#endif

/// Runs `attempt` (a connect, and whatever follows it) until it succeeds, retrying every
/// `interval` microseconds while the server it talks to starts: as long as the failure is only a
/// `connect` that found no socket (ENOENT) or no listener (ECONNREFUSED) (`systemCall` gives the
/// failed call's name and errno, nil for any other error), the server `isAlive()` and `timeout`
/// seconds have not passed.
/// Any other failure is thrown as `failed(error)`; a dead server or the timeout throws
/// `notListening()`.
public func retryWhileNotListening<T, E: Error>(
  timeout: TimeInterval, every interval: useconds_t, isAlive: () -> Bool,
  systemCall: (E) -> (call: String, errno: Int32)?, failed: (E) -> any Error = { $0 },
  notListening: () -> any Error, _ attempt: () throws(E) -> T
) throws -> T {
  let deadline = Date().addingTimeInterval(timeout)
  while true {
    do throws(E) {
      return try attempt()
    } catch {
      guard let (call, e) = systemCall(error), e == ENOENT || e == ECONNREFUSED, call.hasPrefix("connect") else {
        throw failed(error)
      }
      guard isAlive(), Date() < deadline else { throw notListening() }
      usleep(interval)
    }
  }
}

/// A client that connects to a server's socket, then negotiates and starts (VhostUserClient, made
/// to conform in the suites that use it): what `connectWhenListening` needs.
public protocol SocketClient {
  associatedtype Options
  associatedtype Failure: Error
  init(path: String, options: Options) throws(Failure)
  func negotiate() throws(Failure)
  func start() throws(Failure)
  /// The name and errno of a failed system call; nil for any other failure.
  static func failedSystemCall(_ error: Failure) -> (call: String, errno: Int32)?
}

/// Connects a client to `path`, retrying while the server starts listening (see
/// `retryWhileNotListening` for `timeout`, `interval`, `isAlive`, `failed` and `notListening`), and
/// negotiates and starts it unless `start` is false.
public func connectWhenListening<C: SocketClient>(
  path: String, options: C.Options, start: Bool, timeout: TimeInterval, every interval: useconds_t,
  isAlive: () -> Bool, failed: (C.Failure) -> any Error = { $0 }, notListening: () -> any Error
) throws -> C {
  try retryWhileNotListening(
    timeout: timeout, every: interval, isAlive: isAlive, systemCall: C.failedSystemCall, failed: failed,
    notListening: notListening
  ) { () throws(C.Failure) in
    let c = try C(path: path, options: options)
    if start {
      try c.negotiate()
      try c.start()
    }
    return c
  }
}
