import ArgumentParser
import StrataCore

struct BranchCommand: ParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "branch",
    abstract: "List and delete the branches of an image (create them with 'strata clone').",
    discussion: """
      A branch of IMAGE is the image IMAGE.branches/NAME.strata: a writable disk that shares the data of \
      the snapshot it is based on. Read, write, map, serve and diff take --branch NAME.
      """,
    subcommands: [BranchListCommand.self, BranchDeleteCommand.self]
  )
}

struct BranchListCommand: ParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "list",
    abstract: "List the branches of an image by name.",
    discussion: """
      Shows each branch's name, what it is based on (a snapshot of the image, or a point of \
      its timeline pinned by the snapshot branch:NAME), its size and when it was created. \
      Reads only; the image may be served meanwhile.
      """
  )

  @Argument(help: "Path of the image.")
  var image: String

  @OptionGroup var format: OutputOptions

  func run() throws {
    try runReportingErrors {
      let entries = try about(image) { try StrataImage.branches(of: image) }.map(BranchEntry.init)
      switch format.output {
      case .human:
        guard !entries.isEmpty else {
          print("No branches.")
          return
        }
        print(
          Printer.table(
            header: ["NAME", "BASE", "SIZE", "CREATED"],
            rows: entries.map {
              [$0.name, $0.base, $0.size.map(ByteCount.format) ?? "?", $0.created ?? ($0.problem ?? "?")]
            }))
      case .json: try Printer.printJSON(entries)
      }
    }
  }
}

struct BranchDeleteCommand: ParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "delete",
    abstract: "Delete a branch (and the snapshot that pins it, for a branch made with --at).",
    discussion: """
      Removes IMAGE.branches/NAME.strata. Refused while the branch is in use. The snapshot the branch \
      was based on can be deleted afterwards; a pin (branch:NAME) is deleted with the branch, \
      which needs the image open for writing.
      """
  )

  @Argument(help: "Path of the image.")
  var image: String

  @Argument(help: ArgumentHelp("Name of the branch to delete.", valueName: "name"))
  var name: String

  func run() throws {
    try runReportingErrors {
      let path = try ImageAccess.branchPath(of: image, name: name)
      let pin = try StrataImage.branches(of: image).first { $0.name == name && $0.ownsSnapshot }?.snapshot
      try about(image) { try StrataImage.deleteBranch(of: image, name: name) }
      print("Deleted branch '\(name)' (\(path))\(pin.map { " and its pin snapshot '\($0)'" } ?? "").")
    }
  }
}

/// One branch as `strata branch list` and `clone` print it.
struct BranchEntry: Encodable {
  var name: String
  var path: String
  /// The image's snapshot the branch reads through to.
  var snapshot: String
  var seq: UInt64
  /// The point the branch was made at, when it is not the snapshot (`clone --at`).
  var atSeq: UInt64?
  /// The snapshot is the branch's pin (deleted with it).
  var pin: Bool
  var size: UInt64?
  /// RFC 3339, UTC.
  var created: String?
  var problem: String?

  enum CodingKeys: String, CodingKey {
    case name, path, snapshot, seq, pin, size, created, problem
    case atSeq = "at_seq"
  }

  init(_ info: BranchInfo) {
    name = info.name
    path = info.path
    snapshot = info.snapshot
    seq = info.seq
    atSeq = info.originSeq
    pin = info.ownsSnapshot
    size = info.size
    created = info.createdNanoseconds.map { rfc3339(nanoseconds: $0) }
    problem = info.problem
  }

  /// "snapshot NAME (seq N)" or "at/SEQ (pin branch:NAME)".
  var base: String {
    if let atSeq { return "at/\(atSeq) (pin '\(snapshot)')" }
    return "snapshot '\(snapshot)' (seq \(seq))"
  }
}
