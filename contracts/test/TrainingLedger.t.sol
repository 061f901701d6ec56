// SPDX-License-Identifier: MIT OR Apache-2.0
pragma solidity 0.8.30;

import {Test} from "./utils/Test.sol";
import {TrainingLedger} from "../src/TrainingLedger.sol";
import {ITrainingLedger} from "../src/interfaces/ITrainingLedger.sol";

contract TrainingLedgerTest is Test {
    TrainingLedger internal ledger;

    bytes32 internal constant RUN = keccak256("run");
    bytes32 internal constant CONFIG = keccak256("config");
    uint64 internal constant K = 10;
    /// Two thirds, rounded up: 4 peers need 3 identical votes.
    uint16 internal constant QUORUM_BPS = 6667;

    address internal constant ALICE = address(0xA11CE);
    address internal constant BOB = address(0xB0B);
    address internal constant CAROL = address(0xCA401);
    address internal constant DAVE = address(0xDA7E);
    address internal constant MALLORY = address(0xBAD);

    bytes32 internal constant H1 = keccak256("params-1");
    bytes32 internal constant H2 = keccak256("params-2");
    bytes32 internal constant ROOT = keccak256("commits");

    function setUp() public {
        ledger = new TrainingLedger();
        ledger.createRun(RUN, CONFIG, K, QUORUM_BPS, 1);
        _register(ALICE, "alice");
        _register(BOB, "bob");
        _register(CAROL, "carol");
        _register(DAVE, "dave");
    }

    function _register(address who, bytes memory peerId) internal {
        vm.prank(who);
        ledger.register(RUN, peerId);
    }

    function _vote(address who, uint64 round, bytes32 hash) internal {
        vm.prank(who);
        ledger.voteCheckpoint(RUN, round, hash);
    }

    // ---------------------------------------------------------------- createRun

    function test_createRun_storesConfigAndEmits() public {
        bytes32 run = keccak256("other");
        vm.expectEmit();
        emit ITrainingLedger.RunCreated(run, CONFIG, ALICE, 5, 5000, 2);
        vm.prank(ALICE);
        ledger.createRun(run, CONFIG, 5, 5000, 2);

        ITrainingLedger.Run memory r = ledger.getRun(run);
        assertEq(r.configHash, CONFIG, "config hash");
        assertEq(r.creator, ALICE, "creator");
        assertEq(r.epochRounds, 5, "epoch rounds");
        assertEq(r.quorumBps, 5000, "quorum bps");
        assertEq(r.minVotes, 2, "min votes");
        assertEq(r.peerCount, 0, "no peers yet");
        assertTrue(ledger.runExists(run), "run exists");
        assertTrue(!ledger.runExists(keccak256("nope")), "unknown run does not exist");
    }

    function test_createRun_revertsOnZeroRunId() public {
        vm.expectRevert(abi.encodeWithSelector(ITrainingLedger.ZeroRunId.selector));
        ledger.createRun(bytes32(0), CONFIG, K, QUORUM_BPS, 1);
    }

    function test_createRun_revertsOnZeroConfigHash() public {
        vm.expectRevert(abi.encodeWithSelector(ITrainingLedger.ZeroHash.selector));
        ledger.createRun(keccak256("x"), bytes32(0), K, QUORUM_BPS, 1);
    }

    function test_createRun_revertsWhenRunExists() public {
        vm.expectRevert(abi.encodeWithSelector(ITrainingLedger.RunAlreadyExists.selector, RUN, CONFIG));
        ledger.createRun(RUN, keccak256("another config"), K, QUORUM_BPS, 1);
    }

    function test_createRun_revertsOnZeroEpochRounds() public {
        vm.expectRevert(abi.encodeWithSelector(ITrainingLedger.InvalidEpochRounds.selector, uint64(0)));
        ledger.createRun(keccak256("x"), CONFIG, 0, QUORUM_BPS, 1);
    }

    function test_createRun_revertsOnInvalidQuorum() public {
        vm.expectRevert(abi.encodeWithSelector(ITrainingLedger.InvalidQuorum.selector, uint16(0), uint16(1)));
        ledger.createRun(keccak256("x"), CONFIG, K, 0, 1);
        vm.expectRevert(abi.encodeWithSelector(ITrainingLedger.InvalidQuorum.selector, uint16(10_001), uint16(1)));
        ledger.createRun(keccak256("x"), CONFIG, K, 10_001, 1);
        vm.expectRevert(abi.encodeWithSelector(ITrainingLedger.InvalidQuorum.selector, uint16(5000), uint16(0)));
        ledger.createRun(keccak256("x"), CONFIG, K, 5000, 0);
    }

    // ---------------------------------------------------------------- register

    function test_register_bindsPeerIdAndEmits() public {
        vm.expectEmit();
        emit ITrainingLedger.PeerRegistered(RUN, MALLORY, hex"0024080112");
        _register(MALLORY, hex"0024080112");

        (bool registered, bytes memory peerId,) = ledger.peerInfo(RUN, MALLORY);
        assertTrue(registered, "registered");
        assertEq(keccak256(peerId), keccak256(hex"0024080112"), "peer id stored");
        assertEq(ledger.ownerOfPeerId(RUN, hex"0024080112"), MALLORY, "peer id owner");
        assertEq(ledger.peerCount(RUN), 5, "peer count");
        assertEq(ledger.getRun(RUN).peerCount, 5, "run peer count");
    }

    function test_register_revertsOnUnknownRun() public {
        vm.expectRevert(abi.encodeWithSelector(ITrainingLedger.UnknownRun.selector, keccak256("nope")));
        vm.prank(MALLORY);
        ledger.register(keccak256("nope"), "m");
    }

    function test_register_revertsOnEmptyOrLongPeerId() public {
        vm.expectRevert(abi.encodeWithSelector(ITrainingLedger.InvalidPeerId.selector, uint256(0)));
        _register(MALLORY, "");
        vm.expectRevert(abi.encodeWithSelector(ITrainingLedger.InvalidPeerId.selector, uint256(129)));
        _register(MALLORY, new bytes(129));
        // Exactly the limit is accepted.
        _register(MALLORY, new bytes(128));
    }

    function test_register_revertsWhenAlreadyRegistered() public {
        vm.expectRevert(abi.encodeWithSelector(ITrainingLedger.AlreadyRegistered.selector, RUN, ALICE));
        _register(ALICE, "alice-again");
    }

    function test_register_revertsWhenPeerIdTaken() public {
        vm.expectRevert(abi.encodeWithSelector(ITrainingLedger.PeerIdTaken.selector, RUN, BOB));
        _register(MALLORY, "bob");
    }

    function test_register_samePeerIdInAnotherRun() public {
        bytes32 run = keccak256("other");
        ledger.createRun(run, CONFIG, K, QUORUM_BPS, 1);
        vm.prank(MALLORY);
        ledger.register(run, "alice");
        assertEq(ledger.ownerOfPeerId(run, "alice"), MALLORY, "runs are independent");
        assertEq(ledger.ownerOfPeerId(RUN, "alice"), ALICE, "first run unchanged");
    }

    /// Any peer id: accepted exactly when 1..=128 bytes and unbound; then bound to its caller once.
    function testFuzz_register(bytes calldata peerId, address who) public {
        vm.assume(who != ALICE && who != BOB && who != CAROL && who != DAVE && who != address(0));
        bool taken = ledger.ownerOfPeerId(RUN, peerId) != address(0);
        if (peerId.length == 0 || peerId.length > 128) {
            vm.expectRevert(abi.encodeWithSelector(ITrainingLedger.InvalidPeerId.selector, peerId.length));
        } else if (taken) {
            vm.expectRevert(
                abi.encodeWithSelector(ITrainingLedger.PeerIdTaken.selector, RUN, ledger.ownerOfPeerId(RUN, peerId))
            );
        }
        vm.prank(who);
        ledger.register(RUN, peerId);
        bool ok = peerId.length >= 1 && peerId.length <= 128 && !taken;
        (bool registered,,) = ledger.peerInfo(RUN, who);
        assertTrue(registered == ok, "registered exactly when valid");
        assertEq(ledger.peerCount(RUN), ok ? 5 : 4, "peer count");
        if (ok) {
            vm.expectRevert(abi.encodeWithSelector(ITrainingLedger.AlreadyRegistered.selector, RUN, who));
            vm.prank(who);
            ledger.register(RUN, "another id");
        }
    }

    function test_peers_pages() public view {
        address[] memory all = ledger.peers(RUN, 0, 100);
        assertEq(all.length, 4, "all peers");
        assertEq(all[0], ALICE, "registration order 0");
        assertEq(all[3], DAVE, "registration order 3");
        address[] memory mid = ledger.peers(RUN, 1, 2);
        assertEq(mid.length, 2, "page length");
        assertEq(mid[0], BOB, "page 0");
        assertEq(mid[1], CAROL, "page 1");
        assertEq(ledger.peers(RUN, 4, 10).length, 0, "past the end");
        assertEq(ledger.peers(RUN, 99, 10).length, 0, "far past the end");
        assertEq(ledger.peers(RUN, 0, 0).length, 0, "zero limit");
    }

    // ---------------------------------------------------------------- contributions

    function test_recordContribution_storesTotalsAndEmits() public {
        vm.roll(42);
        vm.expectEmit();
        emit ITrainingLedger.ContributionRecorded(RUN, ALICE, 0, 0, K, 640, ROOT);
        vm.prank(ALICE);
        ledger.recordContribution(RUN, 0, 0, K, 640, ROOT);
        vm.prank(ALICE);
        ledger.recordContribution(RUN, 3, 0, 4, 256, ROOT);

        ITrainingLedger.Contribution memory c = ledger.contributionOf(RUN, ALICE, 0, 0);
        assertEq(c.epoch, 0, "epoch");
        assertEq(c.part, 0, "part");
        assertEq(c.rounds, K, "rounds");
        assertEq(c.samples, 640, "samples");
        assertEq(c.commitRoot, ROOT, "root");
        assertEq(c.recordedAt, 42, "block");
        assertEq(ledger.contributionOf(RUN, ALICE, 1, 0).recordedAt, 0, "no record for epoch 1");
        assertEq(ledger.contributionOf(RUN, ALICE, 0, 1).recordedAt, 0, "no second part of epoch 0");

        ITrainingLedger.Totals memory t = ledger.totalsOf(RUN, ALICE);
        assertEq(t.epochs, 2, "epochs");
        assertEq(t.rounds, K + 4, "total rounds");
        assertEq(t.samples, 896, "total samples");
        assertEq(ledger.contributionCount(RUN, ALICE), 2, "count");
        ITrainingLedger.Contribution[] memory records = ledger.contributions(RUN, ALICE, 0, 10);
        assertEq(records.length, 2, "records listed");
        assertEq(records[1].epoch, 3, "second epoch");
        assertEq(records[1].samples, 256, "second record's samples");
        assertEq(ledger.contributions(RUN, ALICE, 1, 10).length, 1, "page from 1");
        assertEq(ledger.contributions(RUN, ALICE, 5, 10).length, 0, "past the end");
        assertEq(ledger.totalsOf(RUN, BOB).rounds, 0, "others untouched");
    }

    /// A peer that leaves and comes back within an epoch records each stretch as its own part; the
    /// parts cover at most K rounds together and count the epoch once.
    function test_recordContribution_partsOfAnEpoch() public {
        vm.prank(ALICE);
        ledger.recordContribution(RUN, 2, 0, 3, 30, ROOT);
        vm.prank(ALICE);
        ledger.recordContribution(RUN, 2, 1, K - 3, 70, keccak256("second stretch"));
        assertEq(ledger.epochRoundsOf(RUN, ALICE, 2), K, "the epoch is full");
        ITrainingLedger.Totals memory t = ledger.totalsOf(RUN, ALICE);
        assertEq(t.epochs, 1, "one epoch");
        assertEq(t.rounds, K, "rounds of both parts");
        assertEq(t.samples, 100, "samples of both parts");
        assertEq(ledger.contributionOf(RUN, ALICE, 2, 1).samples, 70, "second part");
        // No room is left in the epoch: a third part is refused.
        vm.expectRevert(abi.encodeWithSelector(ITrainingLedger.InvalidContribution.selector, uint64(1), uint64(0)));
        vm.prank(ALICE);
        ledger.recordContribution(RUN, 2, 2, 1, 1, ROOT);
    }

    function test_recordContribution_revertsOnUnknownRun() public {
        vm.expectRevert(abi.encodeWithSelector(ITrainingLedger.UnknownRun.selector, keccak256("nope")));
        vm.prank(ALICE);
        ledger.recordContribution(keccak256("nope"), 0, 0, 1, 1, ROOT);
    }

    function test_recordContribution_revertsWhenNotRegistered() public {
        vm.expectRevert(abi.encodeWithSelector(ITrainingLedger.NotRegistered.selector, RUN, MALLORY));
        vm.prank(MALLORY);
        ledger.recordContribution(RUN, 0, 0, 1, 1, ROOT);
    }

    function test_recordContribution_revertsOnRoundsOutOfRange() public {
        vm.expectRevert(abi.encodeWithSelector(ITrainingLedger.InvalidContribution.selector, uint64(0), K));
        vm.prank(ALICE);
        ledger.recordContribution(RUN, 0, 0, 0, 1, ROOT);
        vm.expectRevert(abi.encodeWithSelector(ITrainingLedger.InvalidContribution.selector, K + 1, K));
        vm.prank(ALICE);
        ledger.recordContribution(RUN, 0, 0, K + 1, 1, ROOT);
    }

    function test_recordContribution_revertsOnZeroRoot() public {
        vm.expectRevert(abi.encodeWithSelector(ITrainingLedger.ZeroHash.selector));
        vm.prank(ALICE);
        ledger.recordContribution(RUN, 0, 0, 1, 1, bytes32(0));
    }

    function test_recordContribution_revertsOnDuplicatePart() public {
        vm.prank(ALICE);
        ledger.recordContribution(RUN, 7, 0, 1, 1, ROOT);
        vm.expectRevert(
            abi.encodeWithSelector(ITrainingLedger.ContributionExists.selector, RUN, ALICE, uint64(7), uint32(0))
        );
        vm.prank(ALICE);
        ledger.recordContribution(RUN, 7, 0, 2, 2, ROOT);
        assertEq(ledger.totalsOf(RUN, ALICE).rounds, 1, "duplicate not counted");
    }

    /// Any sequence of records: accepted ones add up exactly, rejected ones change nothing.
    function testFuzz_recordContribution(uint64 epoch, uint32 part, uint64 rounds, uint64 samples, bytes32 root)
        public
    {
        bool validRounds = rounds >= 1 && rounds <= K;
        bool valid = validRounds && root != bytes32(0);
        if (!validRounds) {
            vm.expectRevert(abi.encodeWithSelector(ITrainingLedger.InvalidContribution.selector, rounds, K));
        } else if (!valid) {
            vm.expectRevert(abi.encodeWithSelector(ITrainingLedger.ZeroHash.selector));
        }
        vm.prank(BOB);
        ledger.recordContribution(RUN, epoch, part, rounds, samples, root);

        ITrainingLedger.Totals memory t = ledger.totalsOf(RUN, BOB);
        assertEq(t.epochs, valid ? 1 : 0, "epochs");
        assertEq(t.rounds, valid ? rounds : 0, "rounds");
        assertEq(t.samples, valid ? samples : 0, "samples");
        assertEq(ledger.contributionOf(RUN, BOB, epoch, part).recordedAt == 0 ? 0 : 1, valid ? 1 : 0, "record");
        assertEq(ledger.epochRoundsOf(RUN, BOB, epoch), valid ? rounds : 0, "epoch rounds");

        if (valid) {
            // The same part again is always refused, whatever the values.
            vm.expectRevert(abi.encodeWithSelector(ITrainingLedger.ContributionExists.selector, RUN, BOB, epoch, part));
            vm.prank(BOB);
            ledger.recordContribution(RUN, epoch, part, 1, 1, ROOT);
            assertEq(ledger.totalsOf(RUN, BOB).rounds, rounds, "nothing added");
        }
    }

    /// Totals over many epochs equal the sum of the records, samples summed without overflow.
    function testFuzz_totalsAccumulate(uint64[8] memory samples, uint8 roundsSeed) public {
        uint256 expectedRounds;
        uint256 expectedSamples;
        for (uint64 e = 0; e < 8; ++e) {
            uint64 rounds = uint64(bound(uint256(roundsSeed) + e, 1, K));
            vm.prank(CAROL);
            ledger.recordContribution(RUN, e, 0, rounds, samples[e], ROOT);
            expectedRounds += rounds;
            expectedSamples += samples[e];
        }
        ITrainingLedger.Totals memory t = ledger.totalsOf(RUN, CAROL);
        assertEq(t.epochs, 8, "epochs");
        assertEq(t.rounds, expectedRounds, "rounds");
        assertEq(t.samples, expectedSamples, "samples");
    }

    // ---------------------------------------------------------------- votes and quorum

    function test_quorumThreshold() public {
        assertEq(ledger.quorumThreshold(RUN), 3, "ceil(4 * 2/3) = 3");
        bytes32 run = keccak256("floor");
        ledger.createRun(run, CONFIG, K, 1, 2);
        assertEq(ledger.quorumThreshold(run), 2, "the vote floor applies with no peers");
    }

    function test_vote_oneBelowQuorumDoesNotFinalize() public {
        _vote(ALICE, 9, H1);
        _vote(BOB, 9, H1);
        assertEq(ledger.votesFor(RUN, 9, H1), 2, "two votes");
        assertEq(ledger.checkpointOf(RUN, 9).finalizedAt, 0, "one below quorum: not finalized");
        assertEq(ledger.getRun(RUN).finalizedCount, 0, "nothing finalized");
        assertEq(ledger.latestCheckpoint(RUN).finalizedAt, 0, "no latest");
    }

    function test_vote_exactlyAtQuorumFinalizes() public {
        _vote(ALICE, 9, H1);
        _vote(BOB, 9, H1);
        vm.roll(77);
        vm.expectEmit();
        emit ITrainingLedger.CheckpointVoted(RUN, 9, CAROL, H1, 3);
        vm.expectEmit();
        emit ITrainingLedger.CheckpointFinalized(RUN, 9, H1, 3);
        _vote(CAROL, 9, H1);

        ITrainingLedger.Checkpoint memory c = ledger.checkpointOf(RUN, 9);
        assertEq(c.paramHash, H1, "finalized hash");
        assertEq(c.round, 9, "round");
        assertEq(c.votes, 3, "votes at finalization");
        assertEq(c.finalizedAt, 77, "block");
        assertEq(ledger.latestCheckpoint(RUN).paramHash, H1, "latest");
        assertEq(ledger.getRun(RUN).finalizedCount, 1, "count");
        assertEq(ledger.voteOf(RUN, 9, CAROL), H1, "vote stored");
    }

    function test_vote_splitVotesDoNotFinalize() public {
        _vote(ALICE, 9, H1);
        _vote(BOB, 9, H1);
        _vote(CAROL, 9, H2);
        _vote(DAVE, 9, H2);
        assertEq(ledger.checkpointOf(RUN, 9).finalizedAt, 0, "2-2 split: no quorum");
    }

    function test_vote_finalizedCheckpointNeverChanges() public {
        bytes32 run = keccak256("low quorum");
        ledger.createRun(run, CONFIG, K, 2500, 1); // 4 peers: threshold 1
        address[4] memory who = [ALICE, BOB, CAROL, DAVE];
        for (uint256 i = 0; i < 4; ++i) {
            vm.prank(who[i]);
            ledger.register(run, abi.encodePacked(i + 1));
        }
        vm.prank(ALICE);
        ledger.voteCheckpoint(run, 5, H1);
        vm.prank(BOB);
        ledger.voteCheckpoint(run, 5, H2);
        vm.prank(CAROL);
        ledger.voteCheckpoint(run, 5, H2);
        ITrainingLedger.Checkpoint memory c = ledger.checkpointOf(run, 5);
        assertEq(c.paramHash, H1, "first hash to reach quorum stays");
        assertEq(c.votes, 1, "votes at finalization stay");
        assertEq(ledger.votesFor(run, 5, H2), 2, "later votes are still counted");
        assertEq(ledger.getRun(run).finalizedCount, 1, "finalized once");
    }

    function test_vote_latestIsHighestRoundEvenOutOfOrder() public {
        uint64[2] memory rounds = [uint64(19), uint64(9)];
        for (uint256 i = 0; i < 2; ++i) {
            uint64 r = rounds[i];
            _vote(ALICE, r, H1);
            _vote(BOB, r, H1);
            _vote(CAROL, r, H1);
        }
        assertEq(ledger.latestCheckpoint(RUN).round, 19, "highest round");
        ITrainingLedger.Checkpoint[] memory all = ledger.checkpoints(RUN, 0, 10);
        assertEq(all.length, 2, "two finalized");
        assertEq(all[0].round, 19, "finalization order 0");
        assertEq(all[1].round, 9, "finalization order 1");
        assertEq(ledger.checkpoints(RUN, 2, 10).length, 0, "past the end");
    }

    function test_vote_revertsOnUnknownRun() public {
        vm.expectRevert(abi.encodeWithSelector(ITrainingLedger.UnknownRun.selector, keccak256("nope")));
        vm.prank(ALICE);
        ledger.voteCheckpoint(keccak256("nope"), 1, H1);
    }

    function test_vote_revertsWhenNotRegistered() public {
        vm.expectRevert(abi.encodeWithSelector(ITrainingLedger.NotRegistered.selector, RUN, MALLORY));
        _vote(MALLORY, 1, H1);
    }

    function test_vote_revertsOnZeroHash() public {
        vm.expectRevert(abi.encodeWithSelector(ITrainingLedger.ZeroHash.selector));
        _vote(ALICE, 1, bytes32(0));
    }

    function test_vote_revertsOnSecondVote() public {
        _vote(ALICE, 1, H1);
        vm.expectRevert(abi.encodeWithSelector(ITrainingLedger.AlreadyVoted.selector, RUN, ALICE, uint64(1), H1));
        _vote(ALICE, 1, H2);
        assertEq(ledger.votesFor(RUN, 1, H2), 0, "second vote not counted");
    }

    /// Whatever the votes, a round finalizes exactly when some hash first reaches the threshold,
    /// and then keeps that hash.
    function testFuzz_voteQuorum(uint8 pattern, uint64 round) public {
        address[4] memory who = [ALICE, BOB, CAROL, DAVE];
        uint256[2] memory count;
        bytes32 expected;
        for (uint256 i = 0; i < 4; ++i) {
            uint256 pick = (pattern >> i) & 1;
            bytes32 hash = pick == 0 ? H1 : H2;
            _vote(who[i], round, hash);
            count[pick] += 1;
            if (expected == bytes32(0) && count[pick] == 3) expected = hash;
            assertEq(ledger.checkpointOf(RUN, round).paramHash, expected, "finalized hash after each vote");
        }
    }

    // ---------------------------------------------------------------- faults

    function test_reportFault_countsAndEmits() public {
        vm.expectEmit();
        emit ITrainingLedger.FaultReported(RUN, DAVE, ALICE, 12, 3, H2);
        vm.prank(ALICE);
        ledger.reportFault(RUN, DAVE, 12, 3, H2);
        assertTrue(ledger.isFaultReported(RUN, DAVE, 12, 3), "reported");
        assertTrue(!ledger.isFaultReported(RUN, DAVE, 12, 4), "other kind not reported");
        assertEq(ledger.totalsOf(RUN, DAVE).faults, 1, "fault counted");
    }

    /// Any fault: counted once for the accused, whoever reports it first.
    function testFuzz_reportFault(uint64 round, uint8 kind, bytes32 evidence) public {
        if (evidence == bytes32(0)) {
            vm.expectRevert(abi.encodeWithSelector(ITrainingLedger.ZeroHash.selector));
        }
        vm.prank(ALICE);
        ledger.reportFault(RUN, DAVE, round, kind, evidence);
        uint256 expected = evidence == bytes32(0) ? 0 : 1;
        assertEq(ledger.totalsOf(RUN, DAVE).faults, expected, "faults");
        assertTrue(ledger.isFaultReported(RUN, DAVE, round, kind) == (expected == 1), "reported flag");
        if (expected == 1) {
            vm.expectRevert(
                abi.encodeWithSelector(ITrainingLedger.FaultAlreadyReported.selector, RUN, DAVE, round, kind)
            );
            vm.prank(BOB);
            ledger.reportFault(RUN, DAVE, round, kind, evidence);
        }
    }

    function test_reportFault_reverts() public {
        vm.expectRevert(abi.encodeWithSelector(ITrainingLedger.UnknownRun.selector, keccak256("nope")));
        vm.prank(ALICE);
        ledger.reportFault(keccak256("nope"), DAVE, 1, 1, H1);

        vm.expectRevert(abi.encodeWithSelector(ITrainingLedger.NotRegistered.selector, RUN, MALLORY));
        vm.prank(MALLORY);
        ledger.reportFault(RUN, DAVE, 1, 1, H1);

        vm.expectRevert(abi.encodeWithSelector(ITrainingLedger.SelfReport.selector));
        vm.prank(ALICE);
        ledger.reportFault(RUN, ALICE, 1, 1, H1);

        vm.expectRevert(abi.encodeWithSelector(ITrainingLedger.NotRegistered.selector, RUN, MALLORY));
        vm.prank(ALICE);
        ledger.reportFault(RUN, MALLORY, 1, 1, H1);

        vm.expectRevert(abi.encodeWithSelector(ITrainingLedger.ZeroHash.selector));
        vm.prank(ALICE);
        ledger.reportFault(RUN, DAVE, 1, 1, bytes32(0));

        vm.prank(ALICE);
        ledger.reportFault(RUN, DAVE, 1, 1, H1);
        vm.expectRevert(
            abi.encodeWithSelector(ITrainingLedger.FaultAlreadyReported.selector, RUN, DAVE, uint64(1), uint8(1))
        );
        vm.prank(BOB);
        ledger.reportFault(RUN, DAVE, 1, 1, H2);
        assertEq(ledger.totalsOf(RUN, DAVE).faults, 1, "duplicate report not counted");
    }
}
