import ArgumentParser
import StrataCore

struct InspectCommand: ParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "inspect",
    abstract: "Show the internals of an image: superblocks, checkpoints, segments, log records.",
    discussion: """
      The debugging view. Walks the whole log from its first record and shows the last \
      --records records (sequence number, page, operations with their block ranges), the \
      checkpoint chain, each segment's fill and live bytes, both superblock slots and the \
      snapshots. Opens the image read-only.
      """
  )

  @Argument(help: "Path of the image.")
  var image: String

  @Option(help: ArgumentHelp("Show at most this many log records and checkpoints (the newest).", valueName: "n"))
  var records = 100

  @OptionGroup var format: OutputOptions

  func validate() throws {
    guard records >= 0 else { throw ValidationError("--records must not be negative") }
  }

  func run() throws {
    try runReportingErrors {
      let report = try ImageAccess.with(image, readOnly: true, allowDamaged: true) {
        try $0.inspect(recordLimit: records)
      }
      switch format.output {
      case .human: print(Self.text(report))
      case .json: try Printer.printJSON(report)
      }
    }
  }

  static func text(_ r: InspectReport) -> String {
    var out: [String] = ["Superblocks:"]
    out.append(
      Printer.table(
        header: ["slot", "offset", "state", "generation", "checkpoint page", "checkpoint seq"],
        rows: r.superblocks.map { s in
          [
            "\(s.slot)", hex(s.offset), s.valid ? (s.inUse ? "valid, in use" : "valid") : "damaged: \(s.error ?? "?")",
            s.generation.map(String.init) ?? "-", s.checkpointPage.map(String.init) ?? "-",
            s.checkpointSeq.map(String.init) ?? "-",
          ]
        }))
    out.append("\nCheckpoints (newest first):")
    out.append(
      Printer.table(
        header: ["seq", "page", "virtual size", "depth", "root page", "data blocks", "segments", "snapshots"],
        rows: r.checkpoints.map { c in
          [
            "\(c.seq)", "\(c.page)", ByteCount.format(c.virtualSize), "\(c.mapDepth)", "\(c.rootPage)",
            "\(c.dataBlocks)",
            "\(c.segments)", "\(c.snapshots)",
          ]
        }))
    out.append("\nSegments:")
    out.append(
      Printer.table(
        header: ["segment", "state", "offset", "filled", "live", "sealed at seq"],
        rows: r.segments.map { s in
          [
            "\(s.index)", s.state, hex(s.fileOffset), ByteCount.format(s.filledBytes), ByteCount.format(s.liveBytes),
            s.lastSeq == 0 ? "-" : "\(s.lastSeq)",
          ]
        }))
    out.append("\nLog records (\(r.records.count) of \(r.totalRecords); the log ends before seq \(r.logEndSeq)):")
    out.append(
      Printer.table(
        header: ["seq", "page", "pages", "flush", "time", "operations"],
        rows: r.records.map { rec in
          [
            "\(rec.seq)", "\(rec.page)", "\(rec.pages)", rec.flushPoint ? "yes" : "",
            rfc3339(nanoseconds: rec.timestampNanoseconds),
            rec.operations.map(describe).joined(separator: "; "),
          ]
        }))
    let c = r.catalog
    out.append(
      "\nCatalog: \(c.snapshots) snapshots, \(c.format)"
        + (c.format == "tree"
          ? " (seq tree \(c.seqTreeNodes) nodes in \(c.seqTreeLevels) levels, name index \(c.nameIndexNodes) nodes in \(c.nameIndexLevels) levels)"
          : ""))
    if !r.snapshots.isEmpty {
      out.append("\nSnapshots (the newest \(r.snapshots.count)):")
      out.append(
        Printer.table(
          header: ["seq", "name", "time", "base checkpoint page"],
          rows: r.snapshots.map {
            ["\($0.seq)", $0.name, rfc3339(nanoseconds: $0.timestampNanoseconds), "\($0.baseCheckpointPage)"]
          }))
    }
    if !r.recoveryNotes.isEmpty {
      out.append("\nRecovery notes:")
      out += r.recoveryNotes.map { "  \($0)" }
    }
    return out.joined(separator: "\n")
  }

  private static func describe(_ op: InspectReport.Operation) -> String {
    var s = op.type
    if let first = op.firstBlock, let n = op.blocks { s += " blocks \(first)+\(n)" }
    if let name = op.name { s += " \"\(name)\"" }
    if let target = op.targetSeq { s += " seq \(target)" }
    if let pages = op.pages { s += " \(pages) pages" }
    if let next = op.nextSegment { s += " -> segment \(next)" }
    if let size = op.virtualSize { s += " size \(ByteCount.format(size))" }
    return s
  }
}
