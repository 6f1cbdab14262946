import StrataFormat

/// Superblocks: decode throws or yields a value that encodes back to the same 128 bytes.
@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>, _ size: Int) -> Int32 {
  let bytes = UnsafeRawBufferPointer(start: data, count: size)
  guard let sb = try? Superblock.decode(bytes) else { return 0 }
  let again = sb.encode().withUnsafeBytes { try? Superblock.decode($0) }
  precondition(again == sb, "superblock does not survive a re-encode")
  return 0
}
