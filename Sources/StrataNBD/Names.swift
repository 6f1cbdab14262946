// Export names, metadata context names and listen addresses: parsing only.
import StrataCore

/// What an export name refers to.
public enum NBDExportName: Equatable, Sendable {
  /// "" (the default export) or "head".
  case head
  /// "snapshot/NAME": a snapshot, read-only.
  case snapshot(String)
  /// "at/SEQ": the image just before log operation SEQ (a point of `strata timeline`), read-only.
  case pointInTime(UInt64)
  /// "at/TIME" (RFC 3339): the latest point of the timeline at or before that time, read-only.
  case pointAtTime(nanoseconds: UInt64, text: String)

  public init?(_ name: String) {
    if name.isEmpty || name == "head" {
      self = .head
    } else if name.hasPrefix("snapshot/"), name.count > "snapshot/".count {
      self = .snapshot(String(name.dropFirst("snapshot/".count)))
    } else if name.hasPrefix("at/"), let seq = UInt64(name.dropFirst("at/".count)) {
      self = .pointInTime(seq)
    } else if name.hasPrefix("at/"), let ns = RFC3339.nanoseconds(String(name.dropFirst("at/".count))) {
      self = .pointAtTime(nanoseconds: ns, text: String(name.dropFirst("at/".count)))
    } else {
      return nil
    }
  }

  public var name: String {
    switch self {
    case .head: "head"
    case .snapshot(let s): "snapshot/\(s)"
    case .pointInTime(let seq): "at/\(seq)"
    case .pointAtTime(_, let text): "at/\(text)"
    }
  }
}

/// A metadata context this server offers.
public enum NBDMetaContext: Hashable, Sendable {
  /// `base:allocation`: holes and zeros, from the block map.
  case allocation
  /// `strata:changed:SNAPSHOT`: blocks whose contents may differ from that snapshot (flag 1).
  case changed(since: String)

  public static let allocationName = "base:allocation"
  public static let changedPrefix = "strata:changed:"
  /// The flag of a changed extent in `strata:changed:*` (as qemu's dirty bitmaps use 1 = dirty).
  public static let changedFlag: UInt32 = 1

  public var name: String {
    switch self {
    case .allocation: Self.allocationName
    case .changed(let s): Self.changedPrefix + s
    }
  }

  /// The contexts a query selects, given the image's snapshot names. SET_META_CONTEXT takes exact
  /// names only; LIST_META_CONTEXT also takes the namespace prefixes "base:" and "strata:" (and
  /// "strata:changed:"), which list every context in them.
  public static func matching(_ query: String, snapshots: [String], listing: Bool) -> [NBDMetaContext] {
    if query == allocationName || listing && query == "base:" { return [.allocation] }
    if listing && (query == "strata:" || query == changedPrefix) { return snapshots.map { .changed(since: $0) } }
    if query.hasPrefix(changedPrefix) {
      let name = String(query.dropFirst(changedPrefix.count))
      if snapshots.contains(name) { return [.changed(since: name)] }
    }
    return []
  }
}

/// Where `strata serve --nbd` listens: `unix:PATH` or `tcp:HOST:PORT` (`tcp:[::1]:10809`).
public enum NBDAddress: Equatable, Sendable, CustomStringConvertible {
  case unix(path: String)
  case tcp(host: String, port: UInt16)

  public init(parsing text: String) throws {
    if text.hasPrefix("unix:") {
      let path = String(text.dropFirst(5))
      guard !path.isEmpty else { throw NBDWireError("unix: needs a socket path (unix:/run/disk.sock)") }
      self = .unix(path: path)
    } else if text.hasPrefix("tcp:") {
      let rest = text.dropFirst(4)
      guard let colon = rest.lastIndex(of: ":"), let port = UInt16(rest[rest.index(after: colon)...]), port > 0
      else {
        throw NBDWireError("tcp: needs HOST:PORT with a port from 1 to 65535 (tcp:127.0.0.1:10809)")
      }
      var host = String(rest[..<colon])
      if host.hasPrefix("[") && host.hasSuffix("]") { host = String(host.dropFirst().dropLast()) }
      self = .tcp(host: host, port: port)
    } else {
      throw NBDWireError("\"\(text)\" is not unix:PATH or tcp:HOST:PORT")
    }
  }

  public var description: String {
    switch self {
    case .unix(let p): "unix:\(p)"
    case .tcp(let h, let p): h.contains(":") ? "tcp:[\(h)]:\(p)" : "tcp:\(h):\(p)"
    }
  }
}
