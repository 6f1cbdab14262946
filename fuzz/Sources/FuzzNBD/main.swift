import StrataNBD

/// NBD wire parsing: a transmission request, the option payloads of NBD_OPT_GO/INFO and
/// SET/LIST_META_CONTEXT, export names, metadata context queries and listen addresses, all over
/// the same bytes. Every decoder must throw or return; what decodes must survive its checks.
@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>, _ size: Int) -> Int32 {
  let bytes = UnsafeRawBufferPointer(start: data, count: size)
  _ = try? NBDRequest.decode(bytes)
  if let export = try? NBDExportRequest.decode(bytes) { _ = NBDExportName(export.name) }
  if let meta = try? NBDMetaContextRequest.decode(bytes) {
    for query in meta.queries { _ = NBDMetaContext.matching(query, snapshots: ["a", "b/c"], listing: true) }
  }
  let text = String(decoding: bytes, as: UTF8.self)
  _ = NBDExportName(text)
  _ = NBDMetaContext.matching(text, snapshots: ["nightly"], listing: false)
  _ = try? NBDAddress(parsing: text)
  return 0
}
