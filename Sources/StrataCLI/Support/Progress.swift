import Foundation

/// A qemu-img style progress line, `    (42.00/100%)`, redrawn in place on standard error.
///
/// Draws nothing unless enabled (the commands enable it only when standard error is a terminal),
/// so redirected output and logs stay clean.
final class ProgressMeter {
  private let total: UInt64
  private let enabled: Bool
  private var lastHundredths = -1

  init(total: UInt64, enabled: Bool) {
    self.total = total
    self.enabled = enabled
    update(0)
  }

  /// Reports `done` of `total` units; redraws only when the shown value changes.
  func update(_ done: UInt64) {
    guard enabled else { return }
    let hundredths = total == 0 ? 10_000 : Int(Double(min(done, total)) / Double(total) * 10_000)
    guard hundredths != lastHundredths else { return }
    lastHundredths = hundredths
    let whole = hundredths / 100
    let fraction = hundredths % 100
    draw("\r    (\(whole).\(fraction < 10 ? "0" : "")\(fraction)/100%)")
  }

  /// Shows 100% and ends the line.
  func finish() {
    guard enabled else { return }
    update(total)
    draw("\n")
  }

  /// Ends the line where it stopped, so that an error message starts on a line of its own.
  func abandon() {
    guard enabled else { return }
    draw("\n")
  }

  private func draw(_ text: String) {
    try? FileHandle.standardError.write(contentsOf: Data(text.utf8))
  }
}
