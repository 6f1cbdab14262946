import ArgumentParser
import StrataCore

/// Exit codes shared by every command.
///
/// - 0: success.
/// - 1: the operation failed (I/O error, damaged image, out-of-range request, ...).
/// - 63: the file is not a Strata image at all.
/// - 64: usage error (a bad or missing argument), ArgumentParser's default (EX_USAGE).
enum ExitStatus {
  static let failure: Int32 = 1
  static let notStrataImage: Int32 = 63
}

/// A library error tagged with the file it concerns, so the message names it exactly once.
struct FileError: Error, CustomStringConvertible {
  var path: String
  var underlying: StrataError

  var description: String {
    underlying.message.contains(path) ? underlying.message : "\(path): \(underlying.message)"
  }
}

/// Runs a command body and turns library errors into `strata: error: ...` plus an exit code.
///
/// Usage errors (`ValidationError`) and explicit exits pass through to ArgumentParser, which
/// prints the usage and exits 64 (or the given code).
func runReportingErrors(_ body: () throws -> Void) throws {
  do {
    try body()
  } catch let error as ExitCode {
    throw error
  } catch let error as CleanExit {
    throw error
  } catch let error as ValidationError {
    throw error
  } catch let error as FileError {
    throw report(error.description, error.underlying.code)
  } catch let error as StrataError {
    throw report(error.message, error.code)
  } catch let error as ByteCount.ParseError {
    throw report(error.description, .invalidArgument)
  } catch {
    Printer.note("strata: error: \(error)")
    throw ExitCode(ExitStatus.failure)
  }
}

/// Tags any `StrataError` thrown by `body` with `path`.
func about<T>(_ path: String, _ body: () throws -> T) throws -> T {
  do {
    return try body()
  } catch let error as StrataError {
    throw FileError(path: path, underlying: error)
  }
}

private func report(_ message: String, _ code: StrataError.Code) -> ExitCode {
  var line = "strata: error: \(message)"
  if let hint = hint(for: code) { line += "\n" + hint }
  Printer.note(line)
  return ExitCode(code == .notStrataImage ? ExitStatus.notStrataImage : ExitStatus.failure)
}

/// What to do about an error, where there is something useful to say.
private func hint(for code: StrataError.Code) -> String? {
  switch code {
  case .notStrataImage:
    "strata: hint: to import a raw disk image, use 'strata convert -f raw SOURCE DEST.strata'"
  case .unsupported:
    "strata: hint: the image was written by a newer version of strata; open it with that version"
  case .noSpace:
    "strata: hint: free space on the file system holding the image and try again"
  case .locked:
    "strata: hint: wait for the other process to close the image, then try again; if `strata serve` serves it, "
      + "pass its control socket (--control PATH) to snapshot create/delete/prune, resize, set, compact or clone"
  default:
    nil
  }
}
