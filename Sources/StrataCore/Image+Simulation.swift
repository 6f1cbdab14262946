// Hooks for the simulator (StrataSimulator) and the tests: internal state that invariants are
// stated about, exposed as SPI so that the public API stays as it is.

extension StrataImage {
  /// Clean map nodes in the cache (bounded by `ImageOptions.mapCacheNodes`).
  @_spi(Simulation) public var cachedMapNodes: Int { pages.cache.count }

  /// Dirty map nodes waiting for a checkpoint.
  @_spi(Simulation) public var dirtyMapNodes: Int { map.dirtyCount }

  /// Where the live-page and data-block accounting of the head disagrees with a recount from
  /// the map (nil: it agrees). Walks the whole map.
  @_spi(Simulation) public func accountingMismatch() throws -> String? {
    try checkOpen()
    let count = try recount()
    let stored = usage.entries.map(\.livePages)
    if count.livePages != stored { return "usage table says live pages \(stored), recount says \(count.livePages)" }
    if count.dataBlocks != map.dataBlocks {
      return "map says \(map.dataBlocks) data blocks, recount says \(count.dataBlocks)"
    }
    return nil
  }

  /// Forgets the image without closing it: after a simulated power loss its storage is gone.
  @_spi(Simulation) public func abandon() {
    isClosed = true
  }
}
