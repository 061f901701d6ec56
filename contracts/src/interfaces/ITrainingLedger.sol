// SPDX-License-Identifier: MIT OR Apache-2.0
pragma solidity 0.8.30;

/// @title ITrainingLedger
/// @notice The public record of a decentralized training run: who took part, how much work each
///         peer contributed per epoch of rounds, and which parameter hashes a quorum of peers agreed
///         on. Peers write their own records; anyone reads them.
/// @dev Every write is O(1): no function loops over peers, rounds or votes. Lists are read in pages.
interface ITrainingLedger {
    // ---------------------------------------------------------------------------------------------
    // Types
    // ---------------------------------------------------------------------------------------------

    /// @notice A run's fixed configuration and its running counters.
    /// @param configHash blake3 of the run's full configuration (model, data, optimizer, ...).
    /// @param creator The account that created the run.
    /// @param epochRounds K: peers record one contribution per K rounds.
    /// @param quorumBps Share of the registered peers, in basis points, whose identical votes finalize a checkpoint.
    /// @param minVotes Floor on the number of votes a checkpoint needs, whatever the share.
    /// @param peerCount Registered peers.
    /// @param finalizedCount Finalized checkpoints.
    /// @param createdAt Block number of creation.
    struct Run {
        bytes32 configHash;
        address creator;
        uint64 epochRounds;
        uint16 quorumBps;
        uint16 minVotes;
        uint32 peerCount;
        uint64 finalizedCount;
        uint64 createdAt;
    }

    /// @notice One record of a peer's work in an epoch. A peer that stays for a whole epoch records it
    ///         in one part (part 0); one that leaves and comes back within the epoch records each stretch
    ///         of rounds as its own part. The parts of an epoch cover at most K rounds together.
    /// @param epoch The epoch (rounds epoch*K .. epoch*K + K - 1).
    /// @param part Which of the peer's records for this epoch (0, 1, ...).
    /// @param rounds Rounds of the epoch the peer completed in this part (1..K).
    /// @param samples Training samples the peer processed in those rounds.
    /// @param commitRoot blake3 root over the peer's gradient commits of those rounds.
    /// @param recordedAt Block number of the record; zero means no record.
    struct Contribution {
        uint64 epoch;
        uint32 part;
        uint64 rounds;
        uint64 samples;
        bytes32 commitRoot;
        uint64 recordedAt;
    }

    /// @notice A peer's cumulative totals in a run; `epochs` counts distinct epochs with a record.
    struct Totals {
        uint64 epochs;
        uint64 rounds;
        uint128 samples;
        uint32 faults;
    }

    /// @notice A finalized checkpoint: the parameter hash a quorum voted for at a round.
    /// @param finalizedAt Block number of finalization; zero means the round is not finalized.
    struct Checkpoint {
        uint64 round;
        bytes32 paramHash;
        uint32 votes;
        uint64 finalizedAt;
    }

    // ---------------------------------------------------------------------------------------------
    // Events
    // ---------------------------------------------------------------------------------------------

    /// @notice A run was created.
    event RunCreated(
        bytes32 indexed runId,
        bytes32 configHash,
        address indexed creator,
        uint64 epochRounds,
        uint16 quorumBps,
        uint16 minVotes
    );

    /// @notice `peer` joined the run as the libp2p peer `libp2pPeerId` (its multihash bytes).
    event PeerRegistered(bytes32 indexed runId, address indexed peer, bytes libp2pPeerId);

    /// @notice `peer` recorded its work for `epoch` (part `part` of its records for that epoch).
    event ContributionRecorded(
        bytes32 indexed runId,
        address indexed peer,
        uint64 indexed epoch,
        uint32 part,
        uint64 rounds,
        uint64 samples,
        bytes32 commitRoot
    );

    /// @notice `peer` voted `paramHash` for `round`; `votesForHash` counts the votes that hash now has.
    event CheckpointVoted(
        bytes32 indexed runId, uint64 indexed round, address indexed peer, bytes32 paramHash, uint32 votesForHash
    );

    /// @notice A quorum agreed on `paramHash` at `round`. Emitted once per (run, round); never revised.
    event CheckpointFinalized(bytes32 indexed runId, uint64 indexed round, bytes32 paramHash, uint32 votes);

    /// @notice `reporter` reported a fault of `accused` at `round` with the hash of its evidence.
    event FaultReported(
        bytes32 indexed runId,
        address indexed accused,
        address indexed reporter,
        uint64 round,
        uint8 kind,
        bytes32 evidenceHash
    );

    // ---------------------------------------------------------------------------------------------
    // Errors
    // ---------------------------------------------------------------------------------------------

    /// @notice The run id is zero; derive it from the run's configuration.
    error ZeroRunId();
    /// @notice A run with this id exists already, with configuration hash `configHash`.
    error RunAlreadyExists(bytes32 runId, bytes32 configHash);
    /// @notice No run has this id; create it first.
    error UnknownRun(bytes32 runId);
    /// @notice The epoch length K must be at least one round.
    error InvalidEpochRounds(uint64 epochRounds);
    /// @notice The quorum share must be in 1..=10000 basis points and the vote floor at least one.
    error InvalidQuorum(uint16 quorumBps, uint16 minVotes);
    /// @notice A libp2p peer id is 1..=128 bytes of multihash.
    error InvalidPeerId(uint256 length);
    /// @notice `peer` is registered in this run already.
    error AlreadyRegistered(bytes32 runId, address peer);
    /// @notice This libp2p peer id is bound to `owner` in this run already.
    error PeerIdTaken(bytes32 runId, address owner);
    /// @notice `account` is not a registered peer of this run; register first.
    error NotRegistered(bytes32 runId, address account);
    /// @notice `peer` recorded part `part` of its contribution for `epoch` already; one record per part.
    error ContributionExists(bytes32 runId, address peer, uint64 epoch, uint32 part);
    /// @notice A record covers 1..=`room` rounds: the parts of an epoch cover at most K rounds together,
    ///         and `room` is what this peer's records for the epoch have left.
    error InvalidContribution(uint64 rounds, uint64 room);
    /// @notice A hash argument is zero.
    error ZeroHash();
    /// @notice `peer` voted `paramHash` for `round` already; one vote per round.
    error AlreadyVoted(bytes32 runId, address peer, uint64 round, bytes32 paramHash);
    /// @notice This fault (accused, round, kind) was reported already.
    error FaultAlreadyReported(bytes32 runId, address accused, uint64 round, uint8 kind);
    /// @notice A peer cannot report itself.
    error SelfReport();

    // ---------------------------------------------------------------------------------------------
    // Writes
    // ---------------------------------------------------------------------------------------------

    /// @notice Creates a run. The caller becomes its creator; it still registers like every peer.
    function createRun(bytes32 runId, bytes32 configHash, uint64 epochRounds, uint16 quorumBps, uint16 minVotes)
        external;

    /// @notice Binds the caller to the libp2p peer id `libp2pPeerId` in the run, once.
    function register(bytes32 runId, bytes calldata libp2pPeerId) external;

    /// @notice Records the caller's work in `epoch` as part `part`, once per (epoch, part); the parts of
    ///         an epoch cover at most K rounds together.
    function recordContribution(
        bytes32 runId,
        uint64 epoch,
        uint32 part,
        uint64 rounds,
        uint64 samples,
        bytes32 commitRoot
    ) external;

    /// @notice Votes the caller's parameter hash at `round`, once per round; may finalize the checkpoint.
    function voteCheckpoint(bytes32 runId, uint64 round, bytes32 paramHash) external;

    /// @notice Reports a proven fault of the registered peer `accused`, once per (accused, round, kind).
    function reportFault(bytes32 runId, address accused, uint64 round, uint8 kind, bytes32 evidenceHash) external;
}
