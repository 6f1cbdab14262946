import ArgumentParser
import StrataControl
import StrataCore

struct CloneCommand: ParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "clone",
    abstract: "Create a branch: a writable disk that starts as a snapshot or point of the image and shares its data.",
    discussion: """
      The branch is an image of its own, IMAGE.branches/NAME.strata, whose unwritten blocks read as the \
      snapshot it is based on: nothing is copied, and whatever the image's head does afterwards, \
      the branch keeps its snapshot's data. Use it with --branch NAME on read, write, map, serve \
      and diff; 'strata branch list' and 'strata branch delete' manage branches. Moving IMAGE \
      and IMAGE.branches together keeps them working.

      --from SNAPSHOT only reads the image (it may be served meanwhile). --at SEQ|TIME (a point \
      of 'strata timeline') pins the head with a snapshot named branch:NAME and copies into the \
      branch only the blocks that differ between the point and the pin: it opens the image for \
      writing or, with --control, has the `strata serve` serving it take the pin. The snapshot a \
      branch is based on cannot be deleted or pruned until the branch is deleted; deleting the \
      branch deletes its pin.

      Examples:
        strata clone vm.strata --from before-upgrade --name test
        strata clone vm.strata --at 2026-11-26T09:30:00Z --name forensics
        strata clone vm.strata --at 18312 --name then --control /run/vm1.control
        strata write vm.strata --branch test --offset 1M --input patch.bin
      """
  )

  @Argument(help: "Path of the image.")
  var image: String

  @Option(help: ArgumentHelp("The snapshot the branch starts from.", valueName: "snapshot"))
  var from: String?

  @Option(
    help: ArgumentHelp(
      "The point the branch starts from instead: a seq or an RFC 3339 time (see `strata timeline`).",
      valueName: "seq|time"),
    transform: PointInTime.parse)
  var at: PointInTime?

  @Option(help: ArgumentHelp("Name of the new branch.", valueName: "branch"))
  var name: String

  @OptionGroup var control: ControlOption

  @OptionGroup var format: OutputOptions

  func validate() throws {
    guard (from == nil) != (at == nil) else {
      throw ValidationError("Give the branch's starting point with either --from SNAPSHOT or --at SEQ|TIME.")
    }
  }

  func run() throws {
    try runReportingErrors {
      let branch = try about(image) { () throws -> StrataImage in
        if let from { return try StrataImage.createBranch(of: image, name: name, snapshot: from) }
        guard let at else { throw StrataError(.invalidArgument, "no starting point") }
        let pinner = control.control.map { socket in
          { (pin: String) throws -> Void in
            _ = try ControlClient.request(["command": "snapshot", "name": pin], path: socket)
          }
        }
        return try StrataImage.createBranch(of: image, name: name, at: { try at.seq(in: $0) }, pinner: pinner)
      }
      let path = StrataImage.branchPath(of: image, name: name)
      try ImageAccess.withOpened(branch, path: path) { _ in }
      guard let entry = try StrataImage.branches(of: image).first(where: { $0.name == name }) else {
        throw StrataError(.notFound, "branch \"\(name)\" vanished after its creation")
      }
      let report = BranchEntry(entry)
      switch format.output {
      case .human: print("Created branch '\(name)' of \(image) at \(report.base): \(path)")
      case .json: try Printer.printJSON(report)
      }
    }
  }
}
