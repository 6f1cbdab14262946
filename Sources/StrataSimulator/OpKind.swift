/// The operations of the workload and how often each runs (weights out of `totalWeight`).
enum OpKind: CaseIterable {
  case write, read, discard, writeZeroes
  case flush
  /// A write or a snapshot made durable through group commit (`SharedImage.durably`): the
  /// write and the fdatasync run outside the image lock (`AnyThreadIO`).
  case groupCommit
  /// A write a server acknowledges: appended, then handed to the file by
  /// `SharedImage.writeOutLog`, whose write runs outside the image lock (`AnyThreadIO`).
  case writeOut
  case snapshot, deleteSnapshot, snapshotRead
  /// `restore(snapshot:)` and `restore(toSeq:)` to a flush point the timeline lists.
  case restoreSnapshot, restorePoint
  case resize
  /// A clean close and reopen.
  case reopen
  /// A read of the disk at a past flush point (`view(atSeq:)`).
  case pointRead
  /// An external clone on real files: a child of the head or of a snapshot, its own small
  /// workload, crashes and checks (see `cloneSession`).
  case clone
  /// A pass of the segment cleaner (`compact`): the model does not change, the flush points it
  /// may drop leave `flushPoints` (see `compactPass`).
  case compact
  /// A recount of the accounting.
  case recount

  var weight: Int {
    switch self {
    case .write: 370
    case .read: 100
    case .discard: 50
    case .writeZeroes: 50
    case .flush: 140
    case .groupCommit: 20
    case .writeOut: 30
    case .snapshot: 40
    case .deleteSnapshot: 20
    case .snapshotRead: 30
    case .restoreSnapshot: 10
    case .restorePoint: 12
    case .resize: 10
    case .reopen: 20
    case .pointRead: 20
    case .clone: 2
    case .compact: 8
    case .recount: 106
    }
  }

  static let totalWeight = allCases.reduce(0) { $0 + $1.weight }

  /// The kind a draw in `0..<totalWeight` selects.
  static func pick(_ draw: Int) -> OpKind {
    var rest = draw
    for kind in allCases {
      if rest < kind.weight { return kind }
      rest -= kind.weight
    }
    return .recount
  }
}
