import Foundation
import StrataCore

/// The client side of the control socket: one request, one reply.
public enum ControlClient {
  /// Sends `request` to the server at `path` and returns its reply; a reply with `"ok": false`
  /// is thrown as the `StrataError` it describes.
  public static func request(_ request: [String: Any], path: String) throws -> [String: Any] {
    let fd = try UnixSocket.connect(path: path)
    defer { close(fd) }
    var line = try JSONSerialization.data(withJSONObject: request, options: [.sortedKeys])
    line.append(UInt8(ascii: "\n"))
    try line.withUnsafeBytes { raw in
      var done = 0
      while done < raw.count {
        let n = send(fd, raw.baseAddress! + done, raw.count - done, Int32(MSG_NOSIGNAL))
        if n < 0 && errno == EINTR { continue }
        guard n > 0 else { throw StrataError.system("send", path, errno: errno) }
        done += n
      }
    }
    var reply: [UInt8] = []
    var chunk = [UInt8](repeating: 0, count: 4096)
    while !reply.contains(UInt8(ascii: "\n")) {
      let n = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
      if n < 0 && errno == EINTR { continue }
      guard n > 0 else { throw StrataError(.io, "\(path): the server closed the control connection without a reply") }
      reply += chunk[..<n]
    }
    guard let object = try? JSONSerialization.jsonObject(with: Data(reply)) as? [String: Any] else {
      throw StrataError(.io, "\(path): the reply is not a JSON object")
    }
    guard object["ok"] as? Bool == true else {
      let name = object["code"] as? String
      let code = StrataError.Code.allCases.first { "\($0)" == name } ?? .io
      throw StrataError(code, object["error"] as? String ?? "the server refused the request")
    }
    return object
  }
}
