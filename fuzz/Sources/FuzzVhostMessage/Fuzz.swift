import VhostProtocol

/// vhost-user messages: a header and every payload decoder over the same bytes.
@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>, _ size: Int) -> Int32 {
  let bytes = UnsafeRawBufferPointer(start: data, count: size)
  _ = try? VhostHeader.decode(bytes)
  let payload = UnsafeRawBufferPointer(rebasing: bytes[min(size, VhostHeader.size)...])
  _ = try? VringState.decode(payload)
  _ = try? VringAddress.decode(payload)
  if let table = try? MemoryTable.decode(payload) {
    precondition(table.encode().count == payload.count, "memory table re-encodes to another size")
  }
  _ = try? SingleMemoryRegion.decode(payload)
  if let config = try? ConfigSpace.decode(payload) { precondition(config.encode().count == payload.count) }
  _ = try? InflightDescription.decode(payload)
  _ = try? decodeU64(payload, "u64")
  return 0
}
