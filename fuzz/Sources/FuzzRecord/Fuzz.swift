import StrataFormat

/// Record header areas: decoding must throw on anything invalid, never crash; whatever decodes
/// must re-encode to an area that decodes to the same record.
@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>, _ size: Int) -> Int32 {
  let bytes = UnsafeRawBufferPointer(start: data, count: size)
  guard let record = try? LogRecord.decode(headerArea: bytes, blockSize: 4096) else { return 0 }
  let (area, _) = LogRecord.encodeHeaderArea(
    ops: record.ops, seq: record.header.seq, previousChecksum: record.header.previousChecksum,
    timestampNanoseconds: record.header.timestampNanoseconds, flags: record.header.flags, blockSize: 4096)
  let again = area.withUnsafeBytes { try? LogRecord.decode(headerArea: $0, blockSize: 4096) }
  precondition(again?.ops == record.ops, "record does not survive a re-encode")
  return 0
}
