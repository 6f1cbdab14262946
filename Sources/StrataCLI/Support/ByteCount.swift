import ArgumentParser

/// Byte counts on the command line: `4096`, `64K`, `1.5G`, `2GiB`, `0x10000`.
///
/// Suffixes are binary, as in qemu-img: K, M, G, T, P and E (any case) multiply by 1024^1...6;
/// the spelled-out KiB, MiB, ... forms mean the same; a bare number or a `B` suffix is bytes.
/// A fraction is allowed with a suffix when the result is a whole number of bytes (`1.5K`).
enum ByteCount {
  /// Why a byte count was rejected; ArgumentParser shows it after "The value '...' is invalid".
  struct ParseError: Error, CustomStringConvertible {
    var description: String
    init(_ description: String) { self.description = description }
  }

  static let suffixHelp = "K, M, G, T, P or E (powers of 1024; KiB, MiB... also work)"

  private static let shifts: [String: UInt64] = [
    "": 0, "b": 0,
    "k": 10, "kib": 10, "m": 20, "mib": 20, "g": 30, "gib": 30,
    "t": 40, "tib": 40, "p": 50, "pib": 50, "e": 60, "eib": 60,
  ]

  /// Any non-negative byte count (offsets, lengths).
  @Sendable static func parse(_ text: String) throws -> UInt64 {
    let s = text.trimmingWhitespace()
    guard !s.isEmpty else { throw ParseError("a byte count is required") }
    if s.hasPrefix("-") { throw ParseError("it must not be negative") }
    if s.hasPrefix("+") { throw ParseError("a sign is only allowed for a relative resize") }
    if s.lowercased().hasPrefix("0x") {
      guard let v = UInt64(s.dropFirst(2), radix: 16) else {
        throw ParseError("'\(s)' is not a hexadecimal number")
      }
      return v
    }
    let number = s.prefix { $0.isASCII && ($0.isNumber || $0 == ".") }
    let suffix = s.dropFirst(number.count)
    guard let shift = shifts[suffix.lowercased()] else {
      throw ParseError("unknown suffix '\(suffix)'; use \(suffixHelp)")
    }
    let parts = number.split(separator: ".", omittingEmptySubsequences: false)
    guard !number.isEmpty, parts.count <= 2, parts.allSatisfy({ !$0.isEmpty }) else {
      throw ParseError("'\(s)' is not a number of bytes")
    }
    let tooLarge = ParseError("'\(s)' is too large")
    guard let whole = UInt64(parts[0]) else { throw tooLarge }
    guard shift < 64 else { throw tooLarge }
    let (scaled, overflow) = whole.multipliedReportingOverflow(by: 1 << shift)
    guard !overflow else { throw tooLarge }
    guard parts.count == 2 else { return scaled }

    // A fraction: digits / 10^n of the unit must come out as whole bytes.
    let digits = parts[1]
    guard shift > 0 else { throw ParseError("a number of bytes must be whole (no fraction without a suffix)") }
    guard digits.count <= 18, let fraction = UInt64(digits) else { throw ParseError("'\(s)' has too many decimals") }
    var denominator: UInt64 = 1
    for _ in 0..<digits.count { denominator *= 10 }
    // fraction / 10^n < 1, so the quotient stays below 2^shift; the product needs 128 bits.
    let product = fraction.multipliedFullWidth(by: 1 << shift)
    let (part, remainder) = denominator.dividingFullWidth(product)
    guard remainder == 0 else { throw ParseError("'\(s)' is not a whole number of bytes") }
    let (total, overflow2) = scaled.addingReportingOverflow(part)
    guard !overflow2 else { throw tooLarge }
    return total
  }

  /// A virtual disk size: positive and a multiple of 512.
  @Sendable static func parseDiskSize(_ text: String) throws -> UInt64 {
    let size = try parse(text)
    try checkDiskSize(size)
    return size
  }

  static func checkDiskSize(_ size: UInt64) throws {
    guard size > 0 else { throw ParseError("a disk size must be larger than zero") }
    guard size % 512 == 0 else {
      let down = size / 512 * 512
      let up = down + 512
      let hint = down > 0 ? "\(down) or \(up)" : "\(up)"
      throw ParseError("\(size) bytes is not a multiple of 512 (the sector size); try \(hint)")
    }
  }

  /// "512 B", "4 KiB", "1.50 GiB": powers of 1024, two decimals unless exact.
  static func format(_ bytes: UInt64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"]
    var unit = 0
    while unit + 1 < units.count && bytes >= UInt64(1) << (10 * UInt64(unit + 1)) { unit += 1 }
    if unit == 0 { return "\(bytes) B" }
    let base = UInt64(1) << (10 * UInt64(unit))
    if bytes % base == 0 { return "\(bytes / base) \(units[unit])" }
    // Two decimals, rounded half up, with integer arithmetic (no locale, no floating error).
    let hundredths = (bytes / base) * 100 + ((bytes % base) * 100 + base / 2) / base
    let fraction = hundredths % 100
    return "\(hundredths / 100).\(fraction < 10 ? "0" : "")\(fraction) \(units[unit])"
  }
}

/// `SIZE`, `+SIZE` or `-SIZE` for `strata resize`.
enum SizeChange: Equatable {
  case absolute(UInt64)
  case grow(UInt64)
  case shrink(UInt64)

  @Sendable static func parse(_ text: String) throws -> SizeChange {
    let s = text.trimmingWhitespace()
    if s.hasPrefix("+") { return .grow(try ByteCount.parse(String(s.dropFirst()))) }
    if s.hasPrefix("-") { return .shrink(try ByteCount.parse(String(s.dropFirst()))) }
    return .absolute(try ByteCount.parseDiskSize(s))
  }

  /// The new size given the current one; throws when the result is negative or overflows.
  func apply(to current: UInt64) throws -> UInt64 {
    switch self {
    case .absolute(let size):
      return size
    case .grow(let delta):
      let (sum, overflow) = current.addingReportingOverflow(delta)
      guard !overflow else { throw ByteCount.ParseError("growing \(current) bytes by \(delta) overflows") }
      return sum
    case .shrink(let delta):
      guard delta < current else {
        throw ByteCount.ParseError("cannot shrink a \(current)-byte disk by \(delta) bytes: nothing would be left")
      }
      return current - delta
    }
  }
}

extension String {
  func trimmingWhitespace() -> String {
    String(drop { $0.isWhitespace }.reversed().drop { $0.isWhitespace }.reversed())
  }
}

/// Durations on the command line: a number with a unit, `ms`, `s`, `m`, `h` or `d` (`500ms`,
/// `10s`, `1h`).
enum DurationArgument {
  @Sendable static func parseNanoseconds(_ text: String) throws -> UInt64 {
    let units: [(String, UInt64)] = [
      ("ms", 1_000_000), ("s", 1_000_000_000), ("m", 60_000_000_000), ("h", 3_600_000_000_000),
      ("d", 86_400_000_000_000),
    ]
    for (suffix, scale) in units where text.hasSuffix(suffix) {
      let number = text.dropLast(suffix.count)
      if let n = UInt64(number), n > 0, n <= UInt64.max / scale { return n * scale }
    }
    throw ValidationError("'\(text)' is not a duration: a positive number with ms, s, m, h or d (e.g. 10s, 1h)")
  }
}
