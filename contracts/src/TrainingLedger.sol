// SPDX-License-Identifier: MIT OR Apache-2.0
pragma solidity 0.8.30;

import {ITrainingLedger} from "./interfaces/ITrainingLedger.sol";

/// @title TrainingLedger
/// @notice Records, per training run, the registered peers, each peer's contribution per epoch of
///         rounds, checkpoint votes and the checkpoints a quorum finalized, and fault reports.
/// @dev Rules: only a registered peer writes its own records; one record per (run, peer, epoch, part)
///      with at most K rounds per (run, peer, epoch) over all parts, one vote per (run, peer, round), one report per (run, accused, round, kind); a finalized
///      checkpoint never changes. Every write is O(1); lists are read in pages.
contract TrainingLedger is ITrainingLedger {
    /// @notice Basis points in one whole.
    uint16 public constant BPS = 10_000;
    /// @notice Longest libp2p peer id accepted: a multihash of an inlined public key stays far below.
    uint256 public constant MAX_PEER_ID_BYTES = 128;

    struct Peer {
        bool registered;
        bytes libp2pPeerId;
        Totals totals;
    }

    mapping(bytes32 runId => Run) private _runs;
    mapping(bytes32 runId => address[]) private _peerList;
    mapping(bytes32 runId => mapping(address peer => Peer)) private _peers;
    mapping(bytes32 runId => mapping(bytes32 peerIdHash => address)) private _peerIdOwner;
    mapping(bytes32 runId => mapping(address peer => Contribution[])) private _records;
    /// Index + 1 into `_records` of each (epoch, part); zero means none.
    mapping(bytes32 runId => mapping(address peer => mapping(uint64 epoch => mapping(uint32 part => uint256)))) private
        _recordIndex;
    mapping(bytes32 runId => mapping(address peer => mapping(uint64 epoch => uint64))) private _epochRounds;
    mapping(bytes32 runId => mapping(uint64 round => mapping(address peer => bytes32))) private _votes;
    mapping(bytes32 runId => mapping(uint64 round => mapping(bytes32 paramHash => uint32))) private _voteCounts;
    mapping(bytes32 runId => mapping(uint64 round => Checkpoint)) private _checkpoints;
    mapping(bytes32 runId => uint64[]) private _finalizedRounds;
    mapping(bytes32 runId => uint64) private _latestRound;
    mapping(bytes32 runId => mapping(bytes32 faultKey => bool)) private _faults;

    modifier onlyRegistered(bytes32 runId) {
        _requireRun(runId);
        if (!_peers[runId][msg.sender].registered) revert NotRegistered(runId, msg.sender);
        _;
    }

    // ---------------------------------------------------------------------------------------------
    // Writes
    // ---------------------------------------------------------------------------------------------

    /// @inheritdoc ITrainingLedger
    function createRun(bytes32 runId, bytes32 configHash, uint64 epochRounds, uint16 quorumBps, uint16 minVotes)
        external
    {
        if (runId == bytes32(0)) revert ZeroRunId();
        if (configHash == bytes32(0)) revert ZeroHash();
        Run storage run = _runs[runId];
        if (run.createdAt != 0) revert RunAlreadyExists(runId, run.configHash);
        if (epochRounds == 0) revert InvalidEpochRounds(epochRounds);
        if (quorumBps == 0 || quorumBps > BPS || minVotes == 0) revert InvalidQuorum(quorumBps, minVotes);

        run.configHash = configHash;
        run.creator = msg.sender;
        run.epochRounds = epochRounds;
        run.quorumBps = quorumBps;
        run.minVotes = minVotes;
        // Block numbers start at 1 on every chain that matters here, but a zero would read as
        // "no run": store at least 1.
        run.createdAt = uint64(block.number == 0 ? 1 : block.number);
        emit RunCreated(runId, configHash, msg.sender, epochRounds, quorumBps, minVotes);
    }

    /// @inheritdoc ITrainingLedger
    function register(bytes32 runId, bytes calldata libp2pPeerId) external {
        Run storage run = _requireRun(runId);
        if (libp2pPeerId.length == 0 || libp2pPeerId.length > MAX_PEER_ID_BYTES) {
            revert InvalidPeerId(libp2pPeerId.length);
        }
        Peer storage peer = _peers[runId][msg.sender];
        if (peer.registered) revert AlreadyRegistered(runId, msg.sender);
        bytes32 idHash = keccak256(libp2pPeerId);
        address owner = _peerIdOwner[runId][idHash];
        if (owner != address(0)) revert PeerIdTaken(runId, owner);

        peer.registered = true;
        peer.libp2pPeerId = libp2pPeerId;
        _peerIdOwner[runId][idHash] = msg.sender;
        _peerList[runId].push(msg.sender);
        run.peerCount += 1;
        emit PeerRegistered(runId, msg.sender, libp2pPeerId);
    }

    /// @inheritdoc ITrainingLedger
    function recordContribution(
        bytes32 runId,
        uint64 epoch,
        uint32 part,
        uint64 rounds,
        uint64 samples,
        bytes32 commitRoot
    ) external onlyRegistered(runId) {
        mapping(uint32 part => uint256) storage index = _recordIndex[runId][msg.sender][epoch];
        if (index[part] != 0) revert ContributionExists(runId, msg.sender, epoch, part);
        uint64 used = _epochRounds[runId][msg.sender][epoch];
        uint64 room = _runs[runId].epochRounds - used;
        if (rounds == 0 || rounds > room) revert InvalidContribution(rounds, room);
        if (commitRoot == bytes32(0)) revert ZeroHash();

        Contribution[] storage records = _records[runId][msg.sender];
        records.push(
            Contribution({
                epoch: epoch,
                part: part,
                rounds: rounds,
                samples: samples,
                commitRoot: commitRoot,
                recordedAt: uint64(block.number == 0 ? 1 : block.number)
            })
        );
        index[part] = records.length;
        _epochRounds[runId][msg.sender][epoch] = used + rounds;

        Totals storage totals = _peers[runId][msg.sender].totals;
        if (used == 0) totals.epochs += 1;
        totals.rounds += rounds;
        totals.samples += samples;
        emit ContributionRecorded(runId, msg.sender, epoch, part, rounds, samples, commitRoot);
    }

    /// @inheritdoc ITrainingLedger
    function voteCheckpoint(bytes32 runId, uint64 round, bytes32 paramHash) external onlyRegistered(runId) {
        if (paramHash == bytes32(0)) revert ZeroHash();
        bytes32 previous = _votes[runId][round][msg.sender];
        if (previous != bytes32(0)) revert AlreadyVoted(runId, msg.sender, round, previous);

        _votes[runId][round][msg.sender] = paramHash;
        uint32 count = _voteCounts[runId][round][paramHash] + 1;
        _voteCounts[runId][round][paramHash] = count;
        emit CheckpointVoted(runId, round, msg.sender, paramHash, count);

        Checkpoint storage checkpoint = _checkpoints[runId][round];
        if (checkpoint.finalizedAt == 0 && count >= quorumThreshold(runId)) {
            checkpoint.round = round;
            checkpoint.paramHash = paramHash;
            checkpoint.votes = count;
            checkpoint.finalizedAt = uint64(block.number == 0 ? 1 : block.number);
            _finalizedRounds[runId].push(round);
            // Rounds may finalize out of order (late votes for an older round): keep the highest.
            if (round > _latestRound[runId]) _latestRound[runId] = round;
            _runs[runId].finalizedCount += 1;
            emit CheckpointFinalized(runId, round, paramHash, count);
        }
    }

    /// @inheritdoc ITrainingLedger
    function reportFault(bytes32 runId, address accused, uint64 round, uint8 kind, bytes32 evidenceHash)
        external
        onlyRegistered(runId)
    {
        if (accused == msg.sender) revert SelfReport();
        Peer storage target = _peers[runId][accused];
        if (!target.registered) revert NotRegistered(runId, accused);
        if (evidenceHash == bytes32(0)) revert ZeroHash();
        bytes32 key = _faultKey(accused, round, kind);
        if (_faults[runId][key]) revert FaultAlreadyReported(runId, accused, round, kind);

        _faults[runId][key] = true;
        target.totals.faults += 1;
        emit FaultReported(runId, accused, msg.sender, round, kind, evidenceHash);
    }

    // ---------------------------------------------------------------------------------------------
    // Views
    // ---------------------------------------------------------------------------------------------

    /// @notice Whether a run with this id exists.
    function runExists(bytes32 runId) external view returns (bool) {
        return _runs[runId].createdAt != 0;
    }

    /// @notice The run's configuration and counters; reverts with `UnknownRun` if there is none.
    function getRun(bytes32 runId) external view returns (Run memory) {
        return _requireRun(runId);
    }

    /// @notice Votes one parameter hash needs to finalize a checkpoint now:
    ///         max(minVotes, ceil(peerCount * quorumBps / 10000)).
    function quorumThreshold(bytes32 runId) public view returns (uint32) {
        Run storage run = _runs[runId];
        uint256 share = (uint256(run.peerCount) * run.quorumBps + BPS - 1) / BPS;
        uint256 threshold = share > run.minVotes ? share : run.minVotes;
        // peerCount is a uint32 and quorumBps <= BPS, so the share fits; so does the uint16 floor.
        // forge-lint: disable-next-line(unsafe-typecast)
        return uint32(threshold);
    }

    /// @notice Registered peers of the run.
    function peerCount(bytes32 runId) external view returns (uint256) {
        return _peerList[runId].length;
    }

    /// @notice Up to `limit` registered peers starting at `offset`, in registration order.
    function peers(bytes32 runId, uint256 offset, uint256 limit) external view returns (address[] memory page) {
        address[] storage list = _peerList[runId];
        uint256 end = _pageEnd(list.length, offset, limit);
        page = new address[](end > offset ? end - offset : 0);
        for (uint256 i = offset; i < end; ++i) {
            page[i - offset] = list[i];
        }
    }

    /// @notice Whether `peer` is registered, its libp2p peer id, and its totals.
    function peerInfo(bytes32 runId, address peer)
        external
        view
        returns (bool registered, bytes memory libp2pPeerId, Totals memory totals)
    {
        Peer storage p = _peers[runId][peer];
        return (p.registered, p.libp2pPeerId, p.totals);
    }

    /// @notice The account bound to a libp2p peer id in the run, or zero.
    function ownerOfPeerId(bytes32 runId, bytes calldata libp2pPeerId) external view returns (address) {
        return _peerIdOwner[runId][keccak256(libp2pPeerId)];
    }

    /// @notice A peer's cumulative totals in the run.
    function totalsOf(bytes32 runId, address peer) external view returns (Totals memory) {
        return _peers[runId][peer].totals;
    }

    /// @notice A peer's record for part `part` of an epoch; `recordedAt == 0` means none.
    function contributionOf(bytes32 runId, address peer, uint64 epoch, uint32 part)
        external
        view
        returns (Contribution memory record)
    {
        uint256 i = _recordIndex[runId][peer][epoch][part];
        if (i != 0) record = _records[runId][peer][i - 1];
    }

    /// @notice Rounds a peer's records for an epoch cover, over all parts.
    function epochRoundsOf(bytes32 runId, address peer, uint64 epoch) external view returns (uint64) {
        return _epochRounds[runId][peer][epoch];
    }

    /// @notice Number of contribution records (parts of epochs) a peer has made.
    function contributionCount(bytes32 runId, address peer) external view returns (uint256) {
        return _records[runId][peer].length;
    }

    /// @notice Up to `limit` of a peer's records starting at `offset`, in recording order.
    function contributions(bytes32 runId, address peer, uint256 offset, uint256 limit)
        external
        view
        returns (Contribution[] memory page)
    {
        Contribution[] storage list = _records[runId][peer];
        uint256 end = _pageEnd(list.length, offset, limit);
        page = new Contribution[](end > offset ? end - offset : 0);
        for (uint256 i = offset; i < end; ++i) {
            page[i - offset] = list[i];
        }
    }

    /// @notice The hash `peer` voted for `round`, or zero.
    function voteOf(bytes32 runId, uint64 round, address peer) external view returns (bytes32) {
        return _votes[runId][round][peer];
    }

    /// @notice Votes cast for `paramHash` at `round`.
    function votesFor(bytes32 runId, uint64 round, bytes32 paramHash) external view returns (uint32) {
        return _voteCounts[runId][round][paramHash];
    }

    /// @notice The finalized checkpoint of `round`; `finalizedAt == 0` means not finalized.
    function checkpointOf(bytes32 runId, uint64 round) external view returns (Checkpoint memory) {
        return _checkpoints[runId][round];
    }

    /// @notice The finalized checkpoint with the highest round; `finalizedAt == 0` means none yet.
    /// @dev Kept on write, since reading it from the list of finalized rounds would loop.
    function latestCheckpoint(bytes32 runId) external view returns (Checkpoint memory) {
        return _checkpoints[runId][_latestRound[runId]];
    }

    /// @notice Up to `limit` finalized checkpoints starting at `offset`, in finalization order.
    function checkpoints(bytes32 runId, uint256 offset, uint256 limit)
        external
        view
        returns (Checkpoint[] memory page)
    {
        uint64[] storage rounds = _finalizedRounds[runId];
        uint256 end = _pageEnd(rounds.length, offset, limit);
        page = new Checkpoint[](end > offset ? end - offset : 0);
        for (uint256 i = offset; i < end; ++i) {
            page[i - offset] = _checkpoints[runId][rounds[i]];
        }
    }

    /// @notice Whether the fault (accused, round, kind) was reported in the run.
    function isFaultReported(bytes32 runId, address accused, uint64 round, uint8 kind) external view returns (bool) {
        return _faults[runId][_faultKey(accused, round, kind)];
    }

    // ---------------------------------------------------------------------------------------------
    // Internals
    // ---------------------------------------------------------------------------------------------

    function _requireRun(bytes32 runId) private view returns (Run storage run) {
        run = _runs[runId];
        if (run.createdAt == 0) revert UnknownRun(runId);
    }

    function _faultKey(address accused, uint64 round, uint8 kind) private pure returns (bytes32) {
        return keccak256(abi.encode(accused, round, kind));
    }

    function _pageEnd(uint256 length, uint256 offset, uint256 limit) private pure returns (uint256) {
        if (offset >= length) return offset;
        uint256 room = length - offset;
        return offset + (limit < room ? limit : room);
    }
}
