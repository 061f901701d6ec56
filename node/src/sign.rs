//! Signatures with the peer's libp2p identity key (ed25519): on commits, on
//! ring segments and on sum checks, so that what a peer sent can be shown to anyone as its own.
//! A peer id of an ed25519 key inlines the key, so anyone can check a signature
//! from the peer id alone.

use libp2p::PeerId;
use libp2p::identity::{Keypair, PublicKey};
use p2p_proto::message::{GradientCommit, RingStep, RunId, SignedStep, SumCheck};

/// The public key behind a peer id (ed25519 ids inline it).
pub fn public_key(peer: &PeerId) -> Option<PublicKey> {
    let mh = peer.as_ref();
    // 0x00: the identity multihash, which holds the protobuf-encoded key itself.
    (mh.code() == 0).then(|| PublicKey::try_decode_protobuf(mh.digest()).ok()).flatten()
}

fn key_of(peer: &str) -> Option<PublicKey> {
    public_key(&peer.parse().ok()?)
}

/// Whether `commit` carries a valid signature of the peer it names.
pub fn commit_is_signed(commit: &GradientCommit) -> bool {
    key_of(&commit.peer).is_some_and(|k| k.verify(&commit.signing_bytes(), &commit.signature))
}

/// Whether `check` carries a valid signature of the peer it names.
pub fn sum_check_is_signed(check: &SumCheck) -> bool {
    key_of(&check.peer).is_some_and(|k| k.verify(&check.signing_bytes(), &check.signature))
}

/// Whether `step` of `(run, round, attempt)` carries a valid signature of `peer`.
pub fn step_is_signed(key: &PublicKey, run: RunId, round: u64, attempt: u32, step: &SignedStep) -> bool {
    key.verify(&step.signing_bytes(run, round, attempt), &step.signature)
}

/// Signs with this peer's identity key.
#[derive(Debug, Clone)]
pub struct Signer(Keypair);

impl Signer {
    pub fn new(key: Keypair) -> Self {
        Self(key)
    }

    pub fn sign(&self, bytes: &[u8]) -> Vec<u8> {
        self.0.sign(bytes).expect("an ed25519 key signs")
    }

    /// Signs a sum check in place.
    pub fn sign_sum_check(&self, check: &mut SumCheck) {
        check.signature = self.sign(&check.signing_bytes());
    }

    /// Signs a ring segment in place.
    pub fn sign_step(&self, step: &mut RingStep) {
        step.signature = self.sign(&RingStep::signing_bytes(step.run, step.round, step.attempt, &step.id, &step.hash));
    }
}

/// The public key of the peer named `peer`, for checking its evidence.
pub fn peer_key(peer: &str) -> Option<PublicKey> {
    key_of(peer)
}
