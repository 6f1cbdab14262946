import ArgumentParser
import StrataControl
import StrataCore

struct SetCommand: ParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "set",
    abstract: "Change a setting of an image.",
    discussion: """
      --cdp-window says how much of the timeline (`strata timeline`) must stay restorable, \
      for continuous data protection. A duration keeps the disk as it was at every instant of \
      that last stretch of time: every flush point, checkpoint and snapshot in it, and the \
      point just before it. A size keeps every point with at most that much log written after \
      it. 'none' removes the window. Units: s, m, h, d, w for durations; K, M, G, T for sizes \
      (powers of 1024). Only m depends on case: 30m is 30 minutes, 30M is 30 MiB.

      The cleaner (`strata compact`, and `strata serve` in the background) reclaims the log of \
      points outside the window; snapshots stay whatever the window says. Without a window it \
      keeps only snapshots and the current disk. The setting is stored in the image and durable \
      when the command returns. For an image that `strata serve` is serving, pass its control \
      socket: the server's cleaner follows the new window from its next pass.

      Examples:
        strata set vm.strata --cdp-window 24h
        strata set vm.strata --cdp-window 50G
        strata set vm.strata --cdp-window none
        strata set vm.strata --cdp-window 7d --control /run/vm1.control
      """
  )

  @Argument(help: "Path of the image.")
  var image: String

  @Option(
    name: .customLong("cdp-window"),
    help: ArgumentHelp(
      "Keep every point of this last duration (30m, 12h, 7d) or log size (512M, 10G) restorable; 'none' for no window.",
      valueName: "duration|size|none"),
    transform: CDPWindowArgument.parse)
  var cdpWindow: CDPWindowArgument?

  @OptionGroup var control: ControlOption

  func validate() throws {
    if cdpWindow == nil { throw ValidationError("Nothing to set: give --cdp-window DURATION|SIZE|none.") }
  }

  func run() throws {
    try runReportingErrors {
      let window = cdpWindow?.window
      let previous =
        try control.control.map { try setServed(window, $0) }
        ?? ImageAccess.with(image, readOnly: false) { opened -> CDPWindow? in
          let previous = opened.cdpWindow
          try opened.setCDPWindow(window)
          return previous
        }
      let was = previous.map { " (was \(CDPWindowArgument.format($0)))" } ?? ""
      if let window {
        print(
          "CDP window set to \(CDPWindowArgument.format(window))\(was): \(CDPWindowArgument.describe(window)) stays restorable."
        )
      } else {
        print("CDP window removed\(was): the cleaner may reclaim any point that no snapshot needs.")
      }
    }
  }

  /// The same through the control socket of the server serving the image; returns the window
  /// it replaced.
  private func setServed(_ window: CDPWindow?, _ socket: String) throws -> CDPWindow? {
    let request = ControlWire.cdpWindow(window).merging(["command": "set"]) { a, _ in a }
    let reply = try ControlClient.request(request, path: socket)
    return try ControlWire.cdpWindow(from: reply["previous"] as? [String: Any] ?? [:])
  }
}
