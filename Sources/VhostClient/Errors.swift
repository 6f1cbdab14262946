import Glibc

/// Why a vhost-user client operation failed.
public enum VhostClientError: Error, Equatable, CustomStringConvertible, Sendable {
  /// A system call failed.
  case system(String, errno: Int32)
  /// The back-end closed the connection (EOF or hang-up on the socket).
  case disconnected
  /// No reply or completion within the time allowed.
  case timeout(String)
  /// The back-end answered something the protocol does not allow.
  case protocolViolation(String)
  /// A REPLY_ACK carried a non-zero value: the back-end refused the request.
  case nack(request: UInt32, value: UInt64)
  /// The back-end lacks something the client needs (VERSION_1, a queue, ...).
  case unsupported(String)
  /// Not enough free descriptors in the queue for the request.
  case queueFull(queue: Int)
  /// The guest-memory allocator has no room for the request's buffers.
  case outOfGuestMemory(requested: Int)
  /// A caller error: bad queue index, empty request, wrong state.
  case invalidArgument(String)
  /// A request completed with a non-OK virtio-blk status.
  case requestFailed(status: UInt8)

  public var description: String {
    switch self {
    case .system(let what, let e): "\(what): \(String(cString: strerror(e))) (errno \(e))"
    case .disconnected: "the vhost-user back-end closed the connection"
    case .timeout(let what): "timed out waiting for \(what)"
    case .protocolViolation(let why): "protocol violation: \(why)"
    case .nack(let r, let v): "back-end refused request \(r) (ack value \(v))"
    case .unsupported(let why): "unsupported: \(why)"
    case .queueFull(let q): "queue \(q) has no free descriptors"
    case .outOfGuestMemory(let n): "no room in guest memory for \(n) bytes"
    case .invalidArgument(let why): "invalid argument: \(why)"
    case .requestFailed(let s): "request completed with status \(s)"
    }
  }
}
