import StrataCore
import StrataFormat
import StrataSimulation

/// A whole hostile image file, opened read-only over in-memory storage: recovery, reads of the
/// head and of every snapshot, `check` and `inspect` must throw on damage, never crash.
///
/// Every image holds zeros between its superblocks (the first 8 KiB) and its data area (from
/// 1 MiB on), so the input is the file with that gap left out: mutations land on metadata.
@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>, _ size: Int) -> Int32 {
  let input = UnsafeBufferPointer(start: data, count: size)
  let header = 2 * Layout.pageSize
  var file = Array(input.prefix(header))
  if size > header {
    file += [UInt8](repeating: 0, count: Int(Layout.defaultDataOffset) - header)
    file += input[header...]
  }
  var options = ImageOptions()
  options.readOnly = true
  options.mapCacheNodes = 64
  guard let image = try? StrataImage.open(storage: SimulatedStorage(seed: 0, contents: file), options: options)
  else { return 0 }
  defer { try? image.close() }
  readData(image.size, { try image.extents() }, { try image.read(at: $0, count: $1) })
  for info in (try? image.snapshots) ?? [] {
    guard let view = try? image.snapshotView(name: info.name) else { continue }
    readData(view.size, { try view.extents() }, { try view.read(at: $0, count: $1) })
  }
  _ = try? image.check()
  _ = try? image.inspect(recordLimit: 16)
  return 0
}

/// Reads the data extents, the first and the last block; a bounded amount, since a hostile
/// map may claim a huge disk.
private func readData(_ size: UInt64, _ extents: () throws -> [Extent], _ read: (UInt64, Int) throws -> [UInt8]) {
  var budget: UInt64 = 4 << 20
  for e in (try? extents()) ?? [] where e.state == .data && budget > 0 {
    let n = min(budget, e.length, 1 << 20)
    budget -= n
    _ = try? read(e.offset, Int(n))
  }
  let edge = min(size, 4096)
  _ = try? read(0, Int(edge))
  _ = try? read(size - edge, Int(edge))
}
