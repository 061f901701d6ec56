use std::collections::BTreeSet;
use std::time::Duration;
use tests::{Node, expected_sum_hash};

const LEN: usize = 1_000_000;
const ROUNDS: u64 = 6;

/// Four processes, only the first given as bootstrap: they find each other
/// through Kademlia, agree on rings, and every round every peer holds the same
/// sum, equal to the exact sum this test computes from the inputs.
#[test]
fn four_peers_discover_each_other_and_all_reduce() {
    let run = "it-allreduce";
    let flags = ["--run", run, "--min-peers", "4", "--rounds", "6", "--demo-vector-len", "1000000"];
    let a = Node::start("a", &flags);
    let boot = a.address();
    let mut nodes = vec![a];
    for name in ["b", "c", "d"] {
        let mut f = flags.to_vec();
        f.extend(["--bootstrap", boot.as_str()]);
        nodes.push(Node::start(name, &f));
    }
    let ids: Vec<String> = nodes.iter().map(Node::peer_id).collect();

    for n in &mut nodes {
        let code = n.wait_exit(Duration::from_secs(120));
        if code != Some(0) {
            nodes.iter().for_each(Node::dump);
            panic!("a node did not finish its rounds cleanly: {code:?}");
        }
    }

    // Discovery: b, c and d were told only about a, and found each other.
    for (i, n) in nodes.iter().enumerate().skip(1) {
        let found: BTreeSet<String> = n.discovered().into_iter().collect();
        for (j, id) in ids.iter().enumerate() {
            if i != j {
                assert!(found.contains(id), "{} did not discover {} through Kademlia", n.name, nodes[j].name);
            }
        }
    }

    // Every peer completed every round in a ring of all four, with the same sum.
    let all: BTreeSet<String> = ids.iter().cloned().collect();
    for round in 0..ROUNDS {
        let mut hashes = BTreeSet::new();
        for n in &nodes {
            let rs: Vec<_> = n.rounds().into_iter().filter(|r| r.round == round).collect();
            assert_eq!(rs.len(), 1, "{} completed round {round} once", n.name);
            let r = &rs[0];
            assert_eq!(r.members.iter().cloned().collect::<BTreeSet<_>>(), all, "ring of round {round}");
            assert_eq!(r.len, LEN);
            hashes.insert(r.result_hash.clone());
        }
        assert_eq!(hashes.len(), 1, "all peers hold the same sum in round {round}: {hashes:?}");
        let members = nodes[0].rounds().into_iter().find(|r| r.round == round).unwrap().members;
        let want = expected_sum_hash(run, round, &members, LEN);
        assert_eq!(hashes.into_iter().next().unwrap(), want, "round {round} holds the exact sum");
    }
}
