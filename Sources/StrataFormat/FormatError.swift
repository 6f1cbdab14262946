/// Why a byte sequence is not a valid Strata structure.
///
/// Decoders throw this; the core library wraps it into its own error with the location that
/// failed, so every message names both the structure and the field.
public struct FormatError: Error, Equatable, CustomStringConvertible, Sendable {
  public enum Kind: Sendable, Equatable {
    /// The input ended before the structure did.
    case truncated
    /// A magic number did not match: this is not the structure we expected.
    case badMagic
    /// A stored checksum does not match the bytes.
    case badChecksum
    /// A version this implementation does not know.
    case unsupportedVersion
    /// An incompatible feature bit this implementation does not know.
    case unsupportedFeatures
    /// A field holds a value outside its documented range.
    case invalidField
  }

  public var kind: Kind
  public var structure: String
  public var detail: String

  public init(_ kind: Kind, _ structure: String, _ detail: String) {
    self.kind = kind
    self.structure = structure
    self.detail = detail
  }

  public var description: String { "\(structure): \(detail)" }
}
