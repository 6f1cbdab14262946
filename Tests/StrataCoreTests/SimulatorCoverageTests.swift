import StrataSimulation
import StrataSimulator
import Testing

/// The simulator's workload reaches what it claims to: a run that silently stopped making
/// restores, group commits or clones would still pass every check.
@Suite("strata-sim coverage")
struct SimulatorCoverageTests {
  @Test func oneSeedReachesEveryOperationKind() throws {
    var config = SimulationConfig()
    config.operations = 1000
    let stats = try Simulation(seed: 1, config: config).run()
    #expect(stats.crashPoints >= 10)
    #expect(stats.midOperationCrashes >= 1)
    #expect(stats.restores >= 5)
    #expect(stats.pointRestores >= 2, "restores to flush points")
    #expect(stats.groupCommits >= 5, "flushes through SharedImage.durably")
    #expect(stats.clones >= 1, "external clones")
    #expect(stats.cloneCrashes >= 1)
    #expect(stats.faultsInjected >= 1)
    #expect(stats.compactions >= 3, "cleaner passes")
    #expect(stats.segmentsFreed >= 1, "segments the cleaner freed")
  }
}
