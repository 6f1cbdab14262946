// swift-tools-version:6.0
import Foundation
import PackageDescription

// The main package is the parent folder, and SwiftPM names a path dependency after its folder:
// "main" in the main checkout, another name in a worktree.
let main = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().lastPathComponent
  .lowercased()

// libFuzzer targets, kept out of the main package so that a normal build never links them
// (they have no main). Build one with fuzz/run.sh.
let package = Package(
  name: "StrataFuzz",
  dependencies: [.package(path: "..")],
  targets: [
    .executableTarget(name: "FuzzRecord", dependencies: [.product(name: "StrataFormat", package: main)]),
    .executableTarget(name: "FuzzSuperblock", dependencies: [.product(name: "StrataFormat", package: main)]),
    .executableTarget(name: "FuzzPages", dependencies: [.product(name: "StrataFormat", package: main)]),
    .executableTarget(name: "FuzzVhostMessage", dependencies: [.product(name: "VhostProtocol", package: main)]),
    .executableTarget(
      name: "FuzzImageOpen",
      dependencies: [
        .product(name: "StrataCore", package: main), .product(name: "StrataFormat", package: main),
        .product(name: "StrataSimulation", package: main),
      ]
    ),
    .executableTarget(name: "FuzzNBD", dependencies: [.product(name: "StrataNBD", package: main)]),
    .executableTarget(name: "FuzzInflight", dependencies: [.product(name: "StrataVhost", package: main)]),
    .executableTarget(
      name: "FuzzDescriptorChain",
      dependencies: [
        .product(name: "StrataVhost", package: main), .product(name: "VhostProtocol", package: main),
      ]
    ),
  ],
  swiftLanguageModes: [.v6]
)
