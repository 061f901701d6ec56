use tests::Node;

/// A peer restarted with the same data directory keeps its peer id; a peer
/// with a new directory gets another.
#[test]
fn a_restarted_peer_keeps_its_identity() {
    let flags = ["--run", "it-identity", "--min-peers", "2"];
    let first = Node::start("id", &flags);
    let id = first.peer_id();
    let dir = first.into_dir();
    let again = Node::start_in("id-again", dir, &flags);
    assert_eq!(again.peer_id(), id);
    let other = Node::start("id-other", &flags);
    assert_ne!(other.peer_id(), id);
}
