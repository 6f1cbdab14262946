// swift-tools-version:6.0
import PackageDescription

// libFuzzer targets, kept out of the main package so that a normal build never links them
// (they have no main). Build one with fuzz/run.sh.
let package = Package(
  name: "StrataFuzz",
  dependencies: [.package(path: "..")],
  targets: [
    .executableTarget(name: "FuzzRecord", dependencies: [.product(name: "StrataFormat", package: "main")]),
    .executableTarget(name: "FuzzSuperblock", dependencies: [.product(name: "StrataFormat", package: "main")]),
    .executableTarget(name: "FuzzPages", dependencies: [.product(name: "StrataFormat", package: "main")]),
    .executableTarget(name: "FuzzVhostMessage", dependencies: [.product(name: "VhostProtocol", package: "main")]),
  ],
  swiftLanguageModes: [.v6]
)
