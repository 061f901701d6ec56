use std::collections::BTreeSet;
use std::time::Duration;
use tests::{Node, expected_sum_hash, wait_until};

const LEN: usize = 100_000;

/// The bootstrap peer is SIGKILLed after discovery: the other three detect it,
/// form a ring without it (no coordinator), and keep completing rounds with
/// correct, identical sums.
#[test]
fn survivors_keep_running_rounds_after_the_bootstrap_peer_is_killed() {
    let run = "it-bootstrap-killed";
    let flags = [
        "--run",
        run,
        "--min-peers",
        "4",
        "--demo-vector-len",
        "100000",
        "--heartbeat-ms",
        "200",
        "--peer-timeout-ms",
        "1000",
        "--commit-timeout-ms",
        "2000",
        "--step-timeout-ms",
        "2000",
        "--done-timeout-ms",
        "2000",
    ];
    let a = Node::start("boot", &flags);
    let boot = a.address();
    let boot_id = a.peer_id();
    let nodes: Vec<Node> = ["b", "c", "d"]
        .iter()
        .map(|name| {
            let mut f = flags.to_vec();
            f.extend(["--bootstrap", boot.as_str()]);
            Node::start(name, &f)
        })
        .collect();
    // All four run rounds together.
    let together = wait_until(Duration::from_secs(60), || {
        nodes.iter().all(|n| n.rounds().iter().filter(|r| r.members.len() == 4).count() >= 2).then_some(())
    });
    if together.is_none() {
        a.dump();
        nodes.iter().for_each(Node::dump);
        panic!("the four peers never ran two rounds together");
    }
    let mut a = a;
    a.kill();
    let killed_at: Vec<usize> = nodes.iter().map(|n| n.rounds().len()).collect();

    // Within a bounded time the three survivors complete rounds without it.
    let after = wait_until(Duration::from_secs(40), || {
        nodes
            .iter()
            .all(|n| n.rounds().iter().filter(|r| r.members.len() == 3 && !r.members.contains(&boot_id)).count() >= 3)
            .then_some(())
    });
    if after.is_none() {
        nodes.iter().for_each(Node::dump);
        panic!("the survivors did not go on without the bootstrap peer");
    }
    let ids: BTreeSet<String> = nodes.iter().map(Node::peer_id).collect();
    let mut checked = 0;
    for (i, n) in nodes.iter().enumerate() {
        for r in n.rounds().into_iter().skip(killed_at[i]).filter(|r| r.members.len() == 3) {
            assert_eq!(r.members.iter().cloned().collect::<BTreeSet<_>>(), ids);
            assert_eq!(r.result_hash, expected_sum_hash(run, r.round, &r.members, LEN), "{} round {}", n.name, r.round);
            // Every survivor that completed this round holds the same hash.
            for other in &nodes {
                if let Some(o) = other.rounds().into_iter().find(|o| (o.round, o.attempt) == (r.round, r.attempt)) {
                    assert_eq!(o.result_hash, r.result_hash);
                }
            }
            checked += 1;
        }
    }
    assert!(checked >= 9);
    // No round number was completed twice by a peer (a failed attempt is redone, never counted twice).
    for n in &nodes {
        let rounds: Vec<u64> = n.rounds().iter().map(|r| r.round).collect();
        let unique: BTreeSet<u64> = rounds.iter().copied().collect();
        assert_eq!(rounds.len(), unique.len(), "{} completed a round twice", n.name);
    }
}
