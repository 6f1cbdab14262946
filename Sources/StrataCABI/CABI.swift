import StrataCore

#if canImport(Glibc)
  import Glibc
#endif

// The C ABI declared in include/strata.h. Every entry point catches what the library throws and
// returns a negated errno, keeping the message for strata_last_error(); nothing here may trap on
// a caller's input. A handle is a retained `Handle`; the image behind it is shared by the
// caller's threads through `SharedImage`.

private final class Handle {
  let image: SharedImage
  let readOnly: Bool

  init(_ image: StrataImage) {
    self.image = SharedImage(image)
    readOnly = image.readOnly
  }
}

/// The last error message of each thread, as a C string the caller may read until its next call.
private let lastErrorKey: pthread_key_t = {
  var key = pthread_key_t()
  pthread_key_create(&key) { free($0) }
  return key
}()

private func setLastError(_ message: String) {
  free(pthread_getspecific(lastErrorKey))
  pthread_setspecific(lastErrorKey, strdup(message))
}

private func errnoValue(_ error: StrataError) -> Int32 {
  switch error.code {
  case .notStrataImage, .unsupported: ENOTSUP
  case .corrupt: EUCLEAN
  case .dataCorrupt: EBADMSG
  case .io: error.errno ?? EIO
  case .noSpace: ENOSPC
  case .invalidArgument, .outOfRange: EINVAL
  case .notFound: ENOENT
  case .alreadyExists: EEXIST
  case .readOnly: EROFS
  case .locked: EBUSY
  }
}

/// Runs `body`, turning a thrown error into a negated errno (0 on success).
private func call(_ body: () throws -> Void) -> Int32 {
  do {
    try body()
    setLastError("")
    return 0
  } catch let e as StrataError {
    setLastError(e.message)
    return -errnoValue(e)
  } catch {
    setLastError("\(error)")
    return -EIO
  }
}

private func handle(_ p: OpaquePointer?) throws -> Handle {
  guard let p else { throw StrataError(.invalidArgument, "the image handle is NULL") }
  return Unmanaged<Handle>.fromOpaque(UnsafeRawPointer(p)).takeUnretainedValue()
}

private func string(_ p: UnsafePointer<CChar>?, _ what: String) throws -> String {
  guard let p else { throw StrataError(.invalidArgument, "\(what) is NULL") }
  return String(cString: p)
}

private func output(_ out: UnsafeMutablePointer<OpaquePointer?>?, _ image: StrataImage) throws {
  guard let out else {
    try? image.close()
    throw StrataError(.invalidArgument, "the result pointer is NULL")
  }
  out.pointee = OpaquePointer(Unmanaged.passRetained(Handle(image)).toOpaque())
}

private func buffer(_ p: UnsafeRawPointer?, _ length: Int) throws -> UnsafeRawBufferPointer {
  guard p != nil || length == 0 else { throw StrataError(.invalidArgument, "the buffer is NULL") }
  return UnsafeRawBufferPointer(start: p, count: length)
}

@_cdecl("strata_create")
public func strata_create(
  _ path: UnsafePointer<CChar>?, _ size: UInt64, _ out: UnsafeMutablePointer<OpaquePointer?>?
) -> Int32 {
  call { try output(out, try StrataImage.create(path: try string(path, "the path"), virtualSize: size)) }
}

@_cdecl("strata_open")
public func strata_open(_ path: UnsafePointer<CChar>?, _ flags: UInt32, _ out: UnsafeMutablePointer<OpaquePointer?>?)
  -> Int32
{
  call {
    var options = ImageOptions()
    options.readOnly = flags & 1 != 0
    try output(out, try StrataImage.open(path: try string(path, "the path"), options: options))
  }
}

@_cdecl("strata_close")
public func strata_close(_ p: OpaquePointer?) -> Int32 {
  call {
    let h = try handle(p)
    Unmanaged<Handle>.fromOpaque(UnsafeRawPointer(p!)).release()
    try h.image.with { image in
      if !h.readOnly { try image.flush() }
      try image.close()
    }
  }
}

@_cdecl("strata_size")
public func strata_size(_ p: OpaquePointer?) -> UInt64 {
  (try? handle(p).image.with { $0.size }) ?? 0
}

@_cdecl("strata_block_size")
public func strata_block_size(_ p: OpaquePointer?) -> UInt32 {
  (try? handle(p).image.with { UInt32($0.blockSize) }) ?? 0
}

@_cdecl("strata_read")
public func strata_read(_ p: OpaquePointer?, _ buf: UnsafeMutableRawPointer?, _ length: Int, _ offset: UInt64) -> Int32
{
  call {
    let target = UnsafeMutableRawBufferPointer(mutating: try buffer(buf, length))
    try handle(p).image.with { try $0.read(into: target, at: offset) }
  }
}

@_cdecl("strata_write")
public func strata_write(_ p: OpaquePointer?, _ buf: UnsafeRawPointer?, _ length: Int, _ offset: UInt64) -> Int32 {
  call {
    let source = try buffer(buf, length)
    try handle(p).image.with { try $0.write(source, at: offset) }
  }
}

@_cdecl("strata_flush")
public func strata_flush(_ p: OpaquePointer?) -> Int32 {
  call { try handle(p).image.with { try $0.flush() } }
}

@_cdecl("strata_discard")
public func strata_discard(_ p: OpaquePointer?, _ offset: UInt64, _ length: UInt64) -> Int32 {
  call { try handle(p).image.with { try $0.discard(at: offset, length: length) } }
}

@_cdecl("strata_write_zeroes")
public func strata_write_zeroes(_ p: OpaquePointer?, _ offset: UInt64, _ length: UInt64) -> Int32 {
  call { try handle(p).image.with { try $0.writeZeroes(at: offset, length: length) } }
}

@_cdecl("strata_resize")
public func strata_resize(_ p: OpaquePointer?, _ size: UInt64, _ allowShrink: Int32) -> Int32 {
  call {
    try handle(p).image.with { image in
      try image.resize(to: size, allowShrink: allowShrink != 0)
      try image.flush()
    }
  }
}

@_cdecl("strata_snapshot_create")
public func strata_snapshot_create(
  _ p: OpaquePointer?, _ name: UnsafePointer<CChar>?, _ seq: UnsafeMutablePointer<UInt64>?
)
  -> Int32
{
  call {
    let n = try string(name, "the snapshot name")
    let info = try handle(p).image.with { image in
      let info = try image.createSnapshot(name: n)
      try image.flush()
      return info
    }
    seq?.pointee = info.seq
  }
}

@_cdecl("strata_snapshot_delete")
public func strata_snapshot_delete(_ p: OpaquePointer?, _ name: UnsafePointer<CChar>?) -> Int32 {
  call {
    let n = try string(name, "the snapshot name")
    try handle(p).image.with { image in
      try image.deleteSnapshot(name: n)
      try image.flush()
    }
  }
}

@_cdecl("strata_compact")
public func strata_compact(_ p: OpaquePointer?, _ maxSegments: UInt32, _ freed: UnsafeMutablePointer<UInt32>?) -> Int32
{
  call {
    let options = CompactOptions(maxSegments: maxSegments == 0 ? .max : Int(maxSegments))
    let report = try handle(p).image.with { try $0.compact(options) }
    freed?.pointee = UInt32(clamping: report.segmentsFreed)
  }
}

@_cdecl("strata_snapshot_read")
public func strata_snapshot_read(
  _ p: OpaquePointer?, _ name: UnsafePointer<CChar>?, _ buf: UnsafeMutableRawPointer?, _ length: Int,
  _ offset: UInt64
) -> Int32 {
  call {
    let n = try string(name, "the snapshot name")
    let target = UnsafeMutableRawBufferPointer(mutating: try buffer(buf, length))
    try handle(p).image.with { try $0.snapshotView(name: n).read(into: target, at: offset) }
  }
}

@_cdecl("strata_last_error")
public func strata_last_error() -> UnsafePointer<CChar>? {
  UnsafePointer(pthread_getspecific(lastErrorKey)?.assumingMemoryBound(to: CChar.self))
}
