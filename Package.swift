// swift-tools-version:6.0
import PackageDescription

// Module graph (dependencies point one way, top to bottom):
//   strata (executable) -> StrataCLI -> StrataCore -> StrataFormat -> CStrataCRC32C
//                                       StrataCore -> StrataIO -> CURing, CAIO, CStrataLinux
//   StrataCLI -> StrataVhost, StrataNBD, StrataControl (the servers of `strata serve`) -> StrataCore
//   StrataCABI (libStrataC.so, the C ABI) -> StrataCore
//   StrataSimulation (fault-injecting storage, test support) -> StrataCore
//   strata-sim (executable) -> StrataSimulator (model, workload, crash and fault runs) -> StrataSimulation
let package = Package(
  name: "Strata",
  products: [
    .executable(name: "strata", targets: ["strata"]),
    // The deterministic simulator: a seed replays a run of crashes and I/O errors exactly.
    .executable(name: "strata-sim", targets: ["strata-sim"]),
    .library(name: "StrataCore", targets: ["StrataCore"]),
    // For the fuzzers (fuzz/Package.swift) and other tools that decode the formats.
    .library(name: "StrataFormat", targets: ["StrataFormat"]),
    .library(name: "VhostProtocol", targets: ["VhostProtocol"]),
    // For the fuzzers: the descriptor-chain walker (SPI "Fuzzing") and in-memory storage.
    .library(name: "StrataVhost", targets: ["StrataVhost"]),
    .library(name: "StrataSimulation", targets: ["StrataSimulation"]),
    .library(name: "StrataNBD", targets: ["StrataNBD"]),
    // The C ABI (Sources/StrataCABI/include/strata.h) as a shared library: libStrataC.so.
    .library(name: "StrataC", type: .dynamic, targets: ["StrataCABI"]),
  ],
  dependencies: [
    .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
    .package(url: "https://github.com/apple/swift-log", from: "1.16.2"),
  ],
  targets: [
    // CRC-32C with the SSE4.2 instruction when the CPU has it, a table otherwise.
    .target(name: "CStrataCRC32C"),
    // System libraries and Linux calls, one shim each.
    .systemLibrary(name: "CURing", pkgConfig: "liburing", providers: [.apt(["liburing-dev"])]),
    .systemLibrary(name: "CAIO", providers: [.apt(["libaio-dev"])]),
    .target(name: "CStrataLinux"),
    // I/O engines: io_uring, native AIO, synchronous; no knowledge of images.
    .target(name: "StrataIO", dependencies: ["CURing", "CAIO", "CStrataLinux"]),
    // vhost-user and virtio wire formats: syntax only, no I/O (server, client and fuzzers share it).
    .target(name: "VhostProtocol"),
    .target(name: "VhostClient", dependencies: ["VhostProtocol", "CStrataLinux"]),
    // The vhost-user-blk back-end: protocol state machine, guest memory, virtqueues, workers.
    .target(
      name: "StrataVhost",
      dependencies: ["StrataCore", "VhostProtocol", "CStrataLinux", .product(name: "Logging", package: "swift-log")]
    ),
    // The NBD server: wire format (Wire.swift, Names.swift: syntax only, for tests and fuzzers),
    // handshake and transmission per connection, the listener.
    .target(
      name: "StrataNBD",
      dependencies: ["StrataCore", "CStrataLinux", .product(name: "Logging", package: "swift-log")]
    ),
    // Pure on-disk format: encoding, decoding and validation. No I/O.
    .target(name: "StrataFormat", dependencies: ["CStrataCRC32C"]),
    // The image: log, block map, checkpoints, recovery, snapshots, storage protocol.
    .target(name: "StrataCore", dependencies: ["StrataFormat", "StrataIO", "CStrataLinux"]),
    // Deterministic fault-injecting storage for crash tests and the simulator.
    .target(name: "StrataSimulation", dependencies: ["StrataCore"]),
    // The model of a disk, the seeded workload and the crash and fault runs that the tests and
    // `strata-sim` share.
    .target(name: "StrataSimulator", dependencies: ["StrataSimulation", "StrataCore", "StrataFormat"]),
    .executableTarget(
      name: "strata-sim",
      dependencies: ["StrataSimulator", .product(name: "ArgumentParser", package: "swift-argument-parser")]
    ),
    // The `strata` command set; the executable only calls into it.
    .target(
      name: "StrataCLI",
      dependencies: [
        "StrataCore",
        "StrataIO",
        "StrataVhost",
        "StrataNBD",
        "StrataControl",
        "VhostClient",
        .product(name: "ArgumentParser", package: "swift-argument-parser"),
        .product(name: "Logging", package: "swift-log"),
      ]
    ),
    // The control socket of `strata serve` (JSON lines) and its client.
    .target(
      name: "StrataControl",
      dependencies: ["StrataCore", "CStrataLinux", .product(name: "Logging", package: "swift-log")]
    ),
    // The C ABI for VMMs and tools in other languages: include/strata.h over StrataCore.
    .target(name: "StrataCABI", dependencies: ["StrataCore"], exclude: ["include"]),
    .executableTarget(name: "strata", dependencies: ["StrataCLI"]),
    .testTarget(name: "StrataFormatTests", dependencies: ["StrataFormat", "StrataSimulation"]),
    .testTarget(name: "StrataCoreTests", dependencies: ["StrataCore", "StrataSimulation", "StrataSimulator"]),
    // What the end-to-end suites share: the built binary's location, child processes.
    .target(name: "StrataTestSupport", path: "Tests/StrataTestSupport"),
    .testTarget(name: "StrataCLITests", dependencies: ["StrataCore", "StrataCLI", "StrataTestSupport"]),
    .testTarget(name: "StrataIOTests", dependencies: ["StrataIO"]),
    .testTarget(name: "VhostClientTests", dependencies: ["VhostClient", "StrataTestSupport", "StrataSimulation"]),
    .testTarget(
      name: "StrataVhostTests",
      dependencies: [
        "StrataVhost", "VhostProtocol", "CStrataLinux", "StrataCore", "StrataSimulation",
        .product(name: "Logging", package: "swift-log"),
      ]
    ),
    .testTarget(
      name: "StrataServeTests",
      dependencies: [
        "VhostClient", "StrataCore", "StrataControl", "StrataNBD", "StrataSimulation", "StrataTestSupport",
      ]
    ),
    .testTarget(name: "StrataNBDTests", dependencies: ["StrataNBD"]),
  ],
  swiftLanguageModes: [.v6]
)
