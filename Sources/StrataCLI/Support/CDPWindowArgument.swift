import StrataCore

/// `--cdp-window`: how much of the timeline stays restorable. A duration has a unit s, m, h, d
/// or w (`90s`, `30m`, `12h`, `7d`, `2w`, `1.5h`); a size of log has a byte unit K, M, G, T, P or
/// E, or B for bytes (`512M`, `10G`, `1.5T`; `MiB`... work too); `none` is no window. Only `m`
/// depends on case: lower-case `m` is minutes, `M` is MiB. A bare number is refused, since
/// it could mean either.
enum CDPWindowArgument: Equatable {
  case none
  case window(CDPWindow)

  var window: CDPWindow? {
    switch self {
    case .none: nil
    case .window(let w): w
    }
  }

  static let unitsHelp =
    "a duration with s, m, h, d or w (30m, 12h, 7d) or a size of log with K, M, G or T (512M, 10G); m is minutes, M is MiB"

  private static let durationUnits: [(unit: String, nanoseconds: UInt64)] = [
    ("w", 604_800_000_000_000), ("d", 86_400_000_000_000), ("h", 3_600_000_000_000), ("m", 60_000_000_000),
    ("s", 1_000_000_000),
  ]

  private static let sizeUnits: Set<String> = [
    "b", "k", "kib", "m", "mib", "g", "gib", "t", "tib", "p", "pib", "e", "eib",
  ]

  /// Nanoseconds per unit of a duration unit, nil when `unit` is not one.
  private static func durationScale(_ unit: String) -> UInt64? {
    if unit == "M" { return nil }  // MiB; lower-case m is minutes
    return durationUnits.first { $0.unit == unit.lowercased() }?.nanoseconds
  }

  @Sendable static func parse(_ text: String) throws -> CDPWindowArgument {
    let s = text.trimmingWhitespace()
    if s.lowercased() == "none" { return .none }
    let number = s.prefix { $0.isASCII && ($0.isNumber || $0 == ".") }
    let unit = String(s.dropFirst(number.count))
    guard !number.isEmpty else {
      if s.hasPrefix("-") { throw ByteCount.ParseError("a CDP window must not be negative") }
      throw ByteCount.ParseError("'\(s)' is not a CDP window: give \(unitsHelp), or none")
    }
    guard !unit.isEmpty else {
      throw ByteCount.ParseError("'\(s)' needs a unit: \(unitsHelp)")
    }
    let zero = ByteCount.ParseError("a CDP window must be longer than zero (use 'none' for no window)")
    if let scale = durationScale(unit) {
      let ns = try scaled(number, by: scale, text: s)
      guard ns > 0 else { throw zero }
      return .window(.duration(nanoseconds: ns))
    }
    guard sizeUnits.contains(unit.lowercased()) else {
      throw ByteCount.ParseError("unknown unit '\(unit)' in '\(s)': give \(unitsHelp)")
    }
    let bytes = try ByteCount.parse(s)
    guard bytes > 0 else { throw zero }
    return .window(.size(bytes: bytes))
  }

  /// `number` (digits, at most one '.') times `scale`, truncated to whole nanoseconds.
  private static func scaled(_ number: Substring, by scale: UInt64, text: String) throws -> UInt64 {
    let parts = number.split(separator: ".", omittingEmptySubsequences: false)
    guard parts.count <= 2, parts.allSatisfy({ !$0.isEmpty }) else {
      throw ByteCount.ParseError("'\(text)' is not a number with a unit")
    }
    let tooLong = ByteCount.ParseError("'\(text)' is too long a CDP window")
    guard let whole = UInt64(parts[0]) else { throw tooLong }
    let (base, overflow) = whole.multipliedReportingOverflow(by: scale)
    guard !overflow else { throw tooLong }
    guard parts.count == 2 else { return base }
    let digits = parts[1]
    guard digits.count <= 18, let fraction = UInt64(digits) else {
      throw ByteCount.ParseError("'\(text)' has too many decimals")
    }
    var denominator: UInt64 = 1
    for _ in 0..<digits.count { denominator *= 10 }
    // fraction / 10^n < 1, so the quotient stays below `scale`.
    let part = denominator.dividingFullWidth(fraction.multipliedFullWidth(by: scale)).quotient
    let (total, overflow2) = base.addingReportingOverflow(part)
    guard !overflow2 else { throw tooLong }
    return total
  }

  /// The window as `--cdp-window` takes it: the largest unit that divides it (`1h`, `90m`,
  /// `10G`), else seconds with decimals or bytes (`1.5s`, `1000B`).
  static func format(_ window: CDPWindow) -> String {
    switch window {
    case .duration(let ns):
      if let (unit, scale) = durationUnits.first(where: { ns % $0.nanoseconds == 0 }) {
        return "\(ns / scale)\(unit)"
      }
      var fraction = String(ns % 1_000_000_000)
      fraction = String(repeating: "0", count: 9 - fraction.count) + fraction
      while fraction.hasSuffix("0") { fraction.removeLast() }
      return "\(ns / 1_000_000_000).\(fraction)s"
    case .size(let bytes):
      for (unit, shift) in [("E", 60), ("P", 50), ("T", 40), ("G", 30), ("M", 20), ("K", 10)]
      where bytes % (1 << UInt64(shift)) == 0 {
        return "\(bytes >> UInt64(shift))\(unit)"
      }
      return "\(bytes)B"
    }
  }

  /// What the window keeps, in words: "every point of the last 1h", "every point within the
  /// last 10 GiB of log".
  static func describe(_ window: CDPWindow) -> String {
    switch window {
    case .duration: "every point of the last \(format(window))"
    case .size(let bytes): "every point within the last \(ByteCount.format(bytes)) of log"
    }
  }
}
