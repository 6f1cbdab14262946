/// What the image may hold after a crash: the state at the last completed flush plus, per
/// block, every content the block had since.
public struct CrashModel: Sendable {
  /// What the image shows now.
  public var head: DiskModel
  /// The head when the last flush returned.
  public private(set) var flushed: DiskModel
  /// Per block changed since the last flush: every content it had since, the flushed one first.
  public private(set) var candidates: [UInt64: [[UInt8]?]] = [:]
  /// Sizes the disk had since the last flush.
  public private(set) var sizes: Set<UInt64>
  /// Snapshots of the head now, with their frozen contents.
  public private(set) var snapshots: [String: DiskModel] = [:]
  /// Their names in creation order.
  public private(set) var order: [String] = []
  /// Snapshots that existed at the last flush and were not deleted since: they must survive.
  public private(set) var mustExist: Set<String> = []
  /// Snapshots created or deleted since the last flush: they may or may not survive.
  public private(set) var mayExist: [String: DiskModel] = [:]

  public init(size: UInt64) {
    head = DiskModel(size: size)
    flushed = head
    sizes = [size]
  }

  /// The contents block `b` may hold after a crash: the flushed one first.
  public func allowed(_ b: UInt64) -> [[UInt8]?] { candidates[b] ?? [flushed.block(b)] }

  /// Applies a change to the head and remembers the new contents of the blocks it changed
  /// (within `blocks`, or anywhere when nil).
  public mutating func change(blocks: Range<UInt64>? = nil, _ body: (inout DiskModel) -> Void) {
    let old = head
    body(&head)
    sizes.insert(head.size)
    let keys: Set<UInt64>
    if let blocks {
      keys = Set(old.keys(in: blocks)).union(head.keys(in: blocks))
    } else {
      keys = Set(old.storedBlocks).union(head.storedBlocks)
    }
    for b in keys where !sameContent(old.block(b), head.block(b)) { addCandidate(b, head.block(b)) }
  }

  private mutating func addCandidate(_ b: UInt64, _ content: [UInt8]?) {
    var list = candidates[b] ?? [flushed.block(b)]
    if !list.contains(where: { sameContent($0, content) }) { list.append(content) }
    candidates[b] = list
  }

  /// A flush returned: everything so far survives any crash.
  public mutating func markDurable() {
    flushed = head
    candidates = [:]
    sizes = [head.size]
    mustExist = Set(snapshots.keys)
    mayExist = [:]
  }

  public mutating func createSnapshot(_ name: String) {
    snapshots[name] = head
    order.append(name)
    mayExist[name] = head
  }

  public mutating func deleteSnapshot(_ name: String) {
    guard let frozen = snapshots.removeValue(forKey: name) else { return }
    order.removeAll { $0 == name }
    mustExist.remove(name)
    mayExist[name] = frozen
  }

  /// After a call that failed (it may or may not have taken effect): the head and the snapshots
  /// are what the image was seen to hold, which `observe` checked against what is allowed.
  public mutating func adopt(_ seen: Observed) {
    change { $0 = seen.head }
    for name in order where seen.snapshots[name] == nil { deleteSnapshot(name) }
    for name in seen.order where snapshots[name] == nil {
      guard let frozen = seen.snapshots[name] else { continue }
      snapshots[name] = frozen
      order.append(name)
      mayExist[name] = frozen
    }
  }

  /// Every block that holds, held or may hold data.
  public var trackedBlocks: Set<UInt64> {
    Set(flushed.storedBlocks).union(candidates.keys).union(head.storedBlocks)
  }
}
