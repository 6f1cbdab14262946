import StrataFormat

#if canImport(Glibc)
  import Glibc
#endif

/// Every failure the library reports. A struct with a code (so new cases do not break callers),
/// a message that names the problem and, for system calls, the errno.
public struct StrataError: Error, CustomStringConvertible, Sendable, Equatable {
  public enum Code: Sendable, Equatable, CaseIterable {
    /// The file is not a Strata image at all (no magic).
    case notStrataImage
    /// A version or incompatible feature this build does not support.
    case unsupported
    /// Metadata is damaged: a checksum or invariant failed.
    case corrupt
    /// A data block failed its checksum: the bytes are not served.
    case dataCorrupt
    /// A system call failed; `errno` says why.
    case io
    case noSpace
    case invalidArgument
    case outOfRange
    case notFound
    case alreadyExists
    case readOnly
    /// Another process holds the image open for writing.
    case locked
  }

  public var code: Code
  public var message: String
  public var errno: Int32?

  public init(_ code: Code, _ message: String, errno: Int32? = nil) {
    self.code = code
    self.message = message
    self.errno = errno
  }

  public var description: String { message }

  static func corrupt(_ what: String, _ error: FormatError) -> StrataError {
    switch error.kind {
    case .unsupportedVersion, .unsupportedFeatures:
      StrataError(.unsupported, "\(what): \(error)")
    default:
      StrataError(.corrupt, "\(what): \(error)")
    }
  }

  /// A failed system call on `path`, with the errno explained.
  public static func system(_ call: String, _ path: String, errno e: Int32) -> StrataError {
    let reason = String(cString: strerror(e))
    if e == ENOSPC || e == EDQUOT { return StrataError(.noSpace, "\(call) \(path): \(reason)", errno: e) }
    return StrataError(.io, "\(call) \(path): \(reason)", errno: e)
  }
}
