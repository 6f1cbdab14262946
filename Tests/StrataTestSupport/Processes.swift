// What the end-to-end test suites share: finding the built `strata` executable and running
// child processes (the binary, qemu-storage-daemon, fio, qemu-img) with a clean signal state.

import Foundation

#if canImport(Glibc)
  import Glibc
#endif

/// A test fixture's failure, with what went wrong.
public struct TestFailure: Error, CustomStringConvertible {
  public var description: String
  public init(_ d: String) { description = d }
}

/// Where the `strata` executable is, or nil when it has not been built. In this order:
/// the STRATA_BIN environment variable, next to the test bundle (the build directory, whatever
/// --scratch-path was used), `<package root>/.build/debug/strata`.
public let strataExecutable: URL? = {
  let fm = FileManager.default
  var candidates: [URL] = []
  if let path = ProcessInfo.processInfo.environment["STRATA_BIN"], !path.isEmpty {
    candidates.append(URL(fileURLWithPath: path))
  }
  if let exe = Bundle.main.executableURL?.resolvingSymlinksInPath() {
    candidates.append(exe.deletingLastPathComponent().appendingPathComponent("strata"))
  }
  candidates.append(Bundle.main.bundleURL.deletingLastPathComponent().appendingPathComponent("strata"))
  // Walk up from this file to the package root (the directory holding Package.swift).
  var dir = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
  while dir.path != "/" {
    if fm.fileExists(atPath: dir.appendingPathComponent("Package.swift").path) {
      candidates.append(dir.appendingPathComponent(".build/debug/strata"))
      break
    }
    dir = dir.deletingLastPathComponent()
  }
  return candidates.first { fm.isExecutableFile(atPath: $0.path) }
}()

public let strataExecutableMissing = "the strata executable was not found (build it, or set STRATA_BIN)"

/// posix_spawn with an empty signal mask and default dispositions (test threads may block
/// signals and a child inherits that), stdin on /dev/null, stdout and stderr to files, and the
/// test's environment plus `environment` ("NAME=value").
public func spawnProcess(
  _ path: String, _ args: [String], stdoutPath: String = "/dev/null", stderrPath: String, environment: [String] = []
) throws -> pid_t {
  var actions = posix_spawn_file_actions_t()
  posix_spawn_file_actions_init(&actions)
  defer { posix_spawn_file_actions_destroy(&actions) }
  posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
  posix_spawn_file_actions_addopen(&actions, 1, stdoutPath, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
  posix_spawn_file_actions_addopen(&actions, 2, stderrPath, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
  var attr = posix_spawnattr_t()
  posix_spawnattr_init(&attr)
  defer { posix_spawnattr_destroy(&attr) }
  var empty = sigset_t()
  sigemptyset(&empty)
  posix_spawnattr_setsigmask(&attr, &empty)
  var defaults = sigset_t()
  sigemptyset(&defaults)
  for s in [SIGTERM, SIGINT, SIGHUP, SIGPIPE, SIGCHLD] { sigaddset(&defaults, s) }
  posix_spawnattr_setsigdefault(&attr, &defaults)
  posix_spawnattr_setflags(&attr, Int16(POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF))
  let argv = ([path] + args).map { strdup($0) } + [nil]
  let envp = (ProcessInfo.processInfo.environment.map { "\($0)=\($1)" } + environment).map { strdup($0) } + [nil]
  defer {
    for p in argv { free(p) }
    for p in envp { free(p) }
  }
  var pid: pid_t = 0
  let r = posix_spawn(&pid, path, &actions, &attr, argv, envp)
  guard r == 0 else { throw TestFailure("posix_spawn \(path): errno \(r)") }
  return pid
}

/// Waits for `pid` at most `seconds`; returns the raw wait status, or nil on timeout.
public func waitStatus(_ pid: pid_t, seconds: Double) -> Int32? {
  let deadline = Date().addingTimeInterval(seconds)
  var status: Int32 = 0
  while true {
    let r = waitpid(pid, &status, WNOHANG)
    if r == pid { return status }
    if r < 0 && errno != EINTR { return nil }
    if Date() > deadline { return nil }
    usleep(2_000)
  }
}

public func exitedNormally(_ status: Int32) -> Bool { status & 0x7f == 0 }
public func exitCode(_ status: Int32) -> Int32 { (status >> 8) & 0xff }
public func describeStatus(_ status: Int32) -> String {
  exitedNormally(status) ? "exit \(exitCode(status))" : "killed by signal \(status & 0x7f)"
}
