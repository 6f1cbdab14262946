import ArgumentParser
import StrataCore

struct CheckCommand: ParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "check",
    abstract: "Verify every checksum and invariant of an image, and optionally repair it.",
    discussion: """
      Reads both superblocks, every map node and every data block of the disk and of each \
      snapshot, and recounts the space accounting. With --repair, rebuilds the accounting \
      (reclaiming leaked space), rewrites damaged superblocks and drops map subtrees that \
      cannot be read (their data is already lost; the report lists the byte ranges). Damaged \
      data blocks are left in place so that reading them keeps failing rather than returning \
      wrong bytes.

      Exit status, as 'qemu-img check': 0 the image is clean, 2 corruption was found, 3 only \
      leaked space was found, 1 the check could not run, 63 the file is not a Strata image.
      """
  )

  @Argument(help: "Path of the image.")
  var image: String

  @Flag(help: "Repair what can be repaired without guessing, then check again.")
  var repair = false

  @OptionGroup var format: OutputOptions

  private enum Status {
    static let corrupt: Int32 = 2
    static let leaks: Int32 = 3
  }

  func run() throws {
    var outcome: CheckOutcome?
    try runReportingErrors {
      do {
        outcome = try ImageAccess.with(image, readOnly: !repair, allowDamaged: true) { opened in
          let meter = ProgressMeter(total: 10_000, enabled: format.output == .human && standardErrorIsTerminal)
          let first = try opened.check(repair: repair) { meter.update(UInt64($0 * 10_000)) }
          meter.finish()
          return CheckOutcome(filename: image, found: first, afterRepair: repair ? try opened.check() : nil)
        }
      } catch let error as FileError where error.underlying.code == .corrupt {
        // The image cannot even be opened: that is corruption found, not a failed check.
        var report = CheckReport()
        report.errors = [error.underlying.message]
        outcome = CheckOutcome(filename: image, found: report, afterRepair: nil)
      }
    }
    guard let outcome else { return }
    switch format.output {
    case .human: print(outcome.humanText)
    case .json: try Printer.printJSON(outcome)
    }
    switch outcome.final.result {
    case .clean: return
    case .leaks: throw ExitCode(Status.leaks)
    case .corrupt: throw ExitCode(Status.corrupt)
    }
  }
}

/// What `strata check` prints: the findings, and with --repair the state after repairing.
struct CheckOutcome: Encodable {
  var filename: String
  var found: CheckReport
  var afterRepair: CheckReport?
  var final: CheckReport { afterRepair ?? found }

  enum CodingKeys: String, CodingKey {
    case filename, found, result
    case afterRepair = "after_repair"
  }

  func encode(to encoder: Encoder) throws {
    var c = encoder.container(keyedBy: CodingKeys.self)
    try c.encode(filename, forKey: .filename)
    try c.encode(found, forKey: .found)
    try c.encodeIfPresent(afterRepair, forKey: .afterRepair)
    try c.encode(final.result.rawValue, forKey: .result)
  }

  var humanText: String {
    var lines: [String] = []
    func describe(_ r: CheckReport) {
      lines += r.errors.map { "ERROR: \($0)" }
      lines += r.leaks.map { "Leaked: \($0)" }
      lines += r.warnings.map { "Warning: \($0)" }
    }
    describe(found)
    if let afterRepair {
      lines += found.repairs.map { "Repaired: \($0)" }
      lines.append("Double checking the repaired image now...")
      describe(afterRepair)
    }
    let r = final
    switch r.result {
    case .clean: lines.append("No errors were found on the image.")
    case .leaks:
      lines.append(
        "\(ByteCount.format(r.leakedBytes)) of leaked space were found on the image.\n"
          + "This means waste of disk space, but no harm to data. 'strata check --repair' reclaims it.")
    case .corrupt:
      lines.append(
        "\(r.errors.count) errors were found on the image.\n"
          + "Data may be corrupted, or further writes to the image may corrupt it.")
    }
    lines.append(
      "Checked \(r.checkedMapNodes) map nodes, \(r.checkedDataBlocks) data blocks, \(r.checkedCatalogNodes) catalog nodes and \(r.checkedSnapshots) snapshots."
    )
    return lines.joined(separator: "\n")
  }
}
