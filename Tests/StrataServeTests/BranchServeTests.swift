// Branches and `strata serve`: a branch is read and written while its image is served (it reads
// only the snapshot's immutable log data, without the image's lock), and a branch is served
// itself with `--branch`.

import Foundation
import Glibc
import StrataCore
import StrataTestSupport
import Testing

@Suite(.enabled(if: nbdClientsPresent, Comment(rawValue: nbdClientsMissing)))
struct BranchServeTests {
  @Test func aBranchIsReadAndWrittenWhileItsImageIsServedAndWritten() throws {
    try withServer(vhost: false, nbd: true, prepare: NBDLayout.prepare) { s in
      try s.waitForNBD()
      // Made while the image is served: a branch from a snapshot only reads the image.
      let made = try s.strata(["clone", s.image, "--from", "s1", "--name", "b"])
      #expect(made.succeeded, "\(made.stderr)")
      // The client overwrites the first 8 MiB of the head.
      let patch = s.directory + "/patch.raw"
      try Data(pattern(8 << 20, seed: 11)).write(to: URL(fileURLWithPath: patch))
      let w = try s.client(qemuImg, ["convert", "-n", "-f", "raw", "-O", "raw", patch, s.nbdURI("head")])
      #expect(w.succeeded, "qemu-img convert -n into the head: \(w.stderr)")
      // Another process reads the branch meanwhile: the snapshot, not the new head.
      let out = s.directory + "/branch.raw"
      let r = try s.strata(["read", s.image, "--branch", "b", "--length", String(NBDLayout.size), "--output", out])
      #expect(r.succeeded, "\(r.stderr)")
      #expect(try s.read(out) == NBDLayout.snapshot)
      let small = s.directory + "/small.raw"
      try Data(pattern(4096, seed: 12)).write(to: URL(fileURLWithPath: small))
      let bw = try s.strata(["write", s.image, "--branch", "b", "--input", small, "--offset", "4096"])
      #expect(bw.succeeded, "\(bw.stderr)")
      let diff = try s.strata(["diff", s.image, "s1", "branch/b", "--output", "json"])
      #expect(diff.succeeded, "\(diff.stderr)")
      let ranges = try JSONSerialization.jsonObject(with: Data(diff.stdout)) as? [[String: Int]]
      #expect(ranges == [["offset": 4096, "length": 4096]])
      // The served head has the client's data and not the branch's.
      let head = s.directory + "/head.raw"
      let h = try s.client(qemuImg, ["convert", "-f", "raw", "-O", "raw", s.nbdURI("head"), head])
      #expect(h.succeeded)
      var expected = NBDLayout.head
      expected.replaceSubrange(0..<(8 << 20), with: pattern(8 << 20, seed: 11))
      #expect(try s.read(head) == expected)
    }
  }

  /// `clone --at` while the image is served: the server takes the pin (control socket), the
  /// rest only reads the image.
  @Test func aBranchAtAPointOfAServedImage() throws {
    let control = "/tmp/strata-branch-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).control"
    defer { unlink(control) }
    final class Box: @unchecked Sendable { var seq = 0 }
    let point = Box()
    let prepare: (ServeProcess) throws -> Void = { s in
      try NBDLayout.prepare(s)
      let img = try StrataImage.open(path: s.image)
      defer { try? img.close() }  // a failed expectation must not leave it open
      point.seq = Int(try #require(try img.timeline().last).seq)
      try img.write(pattern(64 << 10, seed: 15), at: 40 << 20)
    }
    try withServer(arguments: ["--control", control], vhost: false, nbd: true, prepare: prepare) { s in
      try s.waitForNBD()
      let made = try s.strata(["clone", s.image, "--at", String(point.seq), "--name", "then", "--control", control])
      #expect(made.succeeded, "\(made.stderr)")
      let out = s.directory + "/then.raw"
      let r = try s.strata(["read", s.image, "--branch", "then", "--length", String(NBDLayout.size), "--output", out])
      #expect(r.succeeded, "\(r.stderr)")
      #expect(try s.read(out) == NBDLayout.head, "the branch is the disk at the point, without the later write")
      let list = try s.strata(["branch", "list", s.image])
      #expect(String(decoding: list.stdout, as: UTF8.self).contains("at/\(point.seq)"))
      // Its pin cannot go while the image is served (deleting a snapshot needs the image).
      let delete = try s.strata(["branch", "delete", s.image, "then"])
      #expect(!delete.succeeded && delete.stderr.contains("pin"), "\(delete.stderr)")
    }
  }

  @Test func serveABranch() throws {
    let prepare: (ServeProcess) throws -> Void = { s in
      try NBDLayout.prepare(s)
      let b = try StrataImage.createBranch(of: s.image, name: "b", snapshot: "s1")
      try b.write(pattern(4096, seed: 13), at: 0)
      try b.close()
    }
    try withServer(arguments: ["--branch", "b"], vhost: false, nbd: true, prepare: prepare) { s in
      try s.waitForNBD()
      let out = s.directory + "/served.raw"
      let r = try s.client(qemuImg, ["convert", "-f", "raw", "-O", "raw", s.nbdURI("head"), out])
      #expect(r.succeeded, "\(r.stderr)")
      var expected = NBDLayout.snapshot
      expected.replaceSubrange(0..<4096, with: pattern(4096, seed: 13))
      #expect(try s.read(out) == expected)
      let patch = s.directory + "/patch.raw"
      try Data(pattern(1 << 20, seed: 14)).write(to: URL(fileURLWithPath: patch))
      let w = try s.client(qemuImg, ["convert", "-n", "-f", "raw", "-O", "raw", patch, s.nbdURI("head")])
      #expect(w.succeeded, "\(w.stderr)")
      // The image itself is not touched by writes to its served branch (read it unlocked meanwhile).
      let parent = try StrataImage.openForViews(path: s.image)
      #expect(try parent.read(at: 0, count: Int(NBDLayout.size)) == NBDLayout.head)
      try parent.close()
    }
  }
}
