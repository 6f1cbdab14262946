import ArgumentParser
import Foundation
import StrataControl
import StrataCore

struct CompactCommand: ParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "compact",
    abstract: "Reclaim the space of overwritten data, keeping every snapshot.",
    discussion: """
      Runs the cleaner to the end: every log segment that no snapshot (and no point of the \
      continuous-protection window) needs is emptied — the disk's live blocks in it are copied \
      forward — and freed. Freed segments are reused by later writes; their space is given back \
      to the file system (the file shrinks in 'du', not in 'ls -l').

      Points in time that no snapshot or window retains may no longer be restorable afterwards; \
      the report says from which seq on the timeline is whole. Snapshots always stay readable. \
      Safe to interrupt or crash at any moment: a segment is freed only once nothing refers to \
      it any more.

      An image being served is cleaned by the server itself, in the background; a whole pass \
      can be asked of it through its control socket (the guest waits while it runs):
        strata compact vm.strata --control /run/vm1.control
      """
  )

  @Argument(help: "Path of the image.")
  var image: String

  @Option(help: "Free at most this many segments (default: all that can be).")
  var maxSegments: Int?

  @Option(
    help: ArgumentHelp(
      "Skip segments whose live share is above this percentage (copying them gains little).", valueName: "percent"))
  var maxLive: Double = 90

  @OptionGroup var control: ControlOption

  @OptionGroup var format: OutputOptions

  func validate() throws {
    guard (0...100).contains(maxLive) else { throw ValidationError("--max-live must be between 0 and 100") }
    if let maxSegments, maxSegments < 1 { throw ValidationError("--max-segments must be at least 1") }
  }

  func run() throws {
    var outcome: CompactOutcome?
    try runReportingErrors {
      if let socket = control.control {
        let reply = try ControlClient.request(["command": "compact"], path: socket)
        func number(_ key: String) -> UInt64 { (reply[key] as? NSNumber)?.uint64Value ?? 0 }
        var report = CompactReport()
        report.segmentsFreed = Int(number("segments_freed"))
        report.segmentsPinned = Int(number("segments_pinned"))
        report.blocksCopied = Int(number("blocks_copied"))
        report.bytesReclaimed = number("bytes_reclaimed")
        report.bytesPunched = number("bytes_punched")
        report.logStartSeq = number("log_start_seq")
        outcome = CompactOutcome(filename: image, report: report, diskUsageBefore: nil, diskUsageAfter: nil)
        return
      }
      outcome = try ImageAccess.with(image, readOnly: false) { opened -> CompactOutcome in
        let before = try opened.info
        let meter = ProgressMeter(total: 10_000, enabled: format.output == .human && standardErrorIsTerminal)
        let options = CompactOptions(maxSegments: maxSegments ?? .max, maxLiveRatio: maxLive / 100)
        let report = try opened.compact(options) { meter.update(UInt64($0 * 10_000)) }
        meter.finish()
        return CompactOutcome(
          filename: image, report: report, diskUsageBefore: before.diskUsage ?? before.fileSize, diskUsageAfter: nil)
      }
      // After the close, which gives back the space allocated ahead of the log's end.
      var st = stat()
      if stat(image, &st) == 0 { outcome?.diskUsageAfter = UInt64(st.st_blocks) * 512 }
    }
    guard let outcome else { return }
    switch format.output {
    case .human: print(outcome.humanText)
    case .json: try Printer.printJSON(outcome)
    }
  }
}

/// What `strata compact` prints.
struct CompactOutcome: Encodable {
  var filename: String
  var report: CompactReport
  /// Unknown when the server did the work.
  var diskUsageBefore: UInt64?
  var diskUsageAfter: UInt64?

  enum CodingKeys: String, CodingKey {
    case filename
    case segmentsFreed = "segments_freed"
    case segmentsPinned = "segments_pinned"
    case blocksCopied = "blocks_copied"
    case metadataPagesMoved = "metadata_pages_moved"
    case bytesReclaimed = "bytes_reclaimed"
    case bytesPunched = "bytes_punched"
    case logStartSeq = "log_start_seq"
    case diskUsageBefore = "disk_usage_before"
    case diskUsageAfter = "disk_usage_after"
  }

  func encode(to encoder: Encoder) throws {
    var c = encoder.container(keyedBy: CodingKeys.self)
    try c.encode(filename, forKey: .filename)
    try c.encode(report.segmentsFreed, forKey: .segmentsFreed)
    try c.encode(report.segmentsPinned, forKey: .segmentsPinned)
    try c.encode(report.blocksCopied, forKey: .blocksCopied)
    try c.encode(report.metadataPagesMoved, forKey: .metadataPagesMoved)
    try c.encode(report.bytesReclaimed, forKey: .bytesReclaimed)
    try c.encode(report.bytesPunched, forKey: .bytesPunched)
    try c.encode(report.logStartSeq, forKey: .logStartSeq)
    try c.encodeIfPresent(diskUsageBefore, forKey: .diskUsageBefore)
    try c.encodeIfPresent(diskUsageAfter, forKey: .diskUsageAfter)
  }

  var humanText: String {
    var lines: [String] = []
    if report.segmentsFreed == 0 {
      lines.append("Nothing to reclaim in \(filename).")
    } else {
      lines.append(
        "Freed \(report.segmentsFreed) segments (\(ByteCount.format(report.bytesReclaimed)) of log) in \(filename); "
          + "copied \(report.blocksCopied) live blocks and \(report.metadataPagesMoved) metadata pages forward.")
    }
    if report.segmentsPinned > 0 {
      lines.append("\(report.segmentsPinned) segments are kept for snapshots or the protection window.")
    }
    if let diskUsageBefore, let diskUsageAfter {
      lines.append(
        "Disk usage: \(ByteCount.format(diskUsageBefore)) before, \(ByteCount.format(diskUsageAfter)) after.")
    }
    lines.append("The timeline is whole from seq \(report.logStartSeq) on; every snapshot stays readable.")
    return lines.joined(separator: "\n")
  }
}
