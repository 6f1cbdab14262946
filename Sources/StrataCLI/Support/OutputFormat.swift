import ArgumentParser
import Foundation

/// How a command prints its result.
enum OutputFormat: String, ExpressibleByArgument, CaseIterable {
  /// Aligned text for people.
  case human
  /// Pretty-printed JSON with sorted keys, for scripts.
  case json
}

/// The shared `--output human|json` option.
struct OutputOptions: ParsableArguments {
  @Option(
    name: .long, help: ArgumentHelp("Print the result as text for people or as JSON for scripts.", valueName: "format"))
  var output: OutputFormat = .human

  init() {}
}

enum Printer {
  /// Prints `value` as pretty-printed JSON with sorted keys and a final newline.
  static func printJSON<T: Encodable>(_ value: T) throws {
    let encoder = JSONEncoder()
    encoder.outputFormatting = [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]
    let data = try encoder.encode(value)
    print(String(decoding: data, as: UTF8.self))
  }

  /// Left-aligned columns separated by two spaces; the last column is not padded.
  static func table(header: [String], rows: [[String]]) -> String {
    let all = [header] + rows
    let columns = header.count
    var widths = [Int](repeating: 0, count: columns)
    for row in all {
      for (i, cell) in row.enumerated() where i < columns { widths[i] = max(widths[i], cell.count) }
    }
    return all.map { row in
      row.enumerated().map { i, cell in
        i == row.count - 1 ? cell : cell + String(repeating: " ", count: widths[i] - cell.count)
      }.joined(separator: "  ")
    }.joined(separator: "\n")
  }

  /// Writes a line to standard error (unbuffered).
  static func note(_ message: String) {
    try? FileHandle.standardError.write(contentsOf: Data((message + "\n").utf8))
  }
}

/// RFC 3339 time in UTC, e.g. `2025-03-01T12:34:56.789Z`.
func rfc3339(nanoseconds: UInt64) -> String {
  let formatter = ISO8601DateFormatter()
  formatter.formatOptions = [.withInternetDateTime, .withFractionalSeconds]
  formatter.timeZone = TimeZone(identifier: "UTC")
  let date = Date(timeIntervalSince1970: TimeInterval(nanoseconds / 1_000_000_000))
    .addingTimeInterval(TimeInterval(nanoseconds % 1_000_000_000) / 1e9)
  return formatter.string(from: date)
}

/// `0x` and lower-case hex, as qemu-img map prints offsets.
func hex(_ value: UInt64) -> String { "0x" + String(value, radix: 16) }

/// The shared `--control PATH` option: act on a served image through its server.
struct ControlOption: ParsableArguments {
  @Option(
    help: ArgumentHelp(
      "Control socket of the `strata serve` serving the image (its --control); the server does the work.",
      valueName: "path"))
  var control: String?

  init() {}
}
