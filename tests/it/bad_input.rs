//! A hostile peer connects to a running node and sends it an unsigned ring
//! payload, a payload whose hash is wrong, an oversize frame, garbage bytes, a well-formed payload while
//! not being the node's ring neighbour (each on a ring stream and again on the direct TCP
//! connection the node offers), a direct connection with a forged token, garbage gossip, and on the state
//! protocol garbage and a request for another run. The node rejects each (with
//! a logged reason, a refusal or a closed stream), keeps running, and its rounds
//! stay correct.

use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
use libp2p::{Multiaddr, PeerId, StreamProtocol, gossipsub, noise, swarm::NetworkBehaviour, tcp, yamux};
use p2p_proto::codec::decode_exact;
use p2p_proto::codec::encode_frame;
use p2p_proto::message::{
    RING_OFFER_DIRECT, RING_OFFER_STREAM, RING_PROTOCOL, RING_TOKEN_BYTES, RingFrame, RingStep, RunId, STATE_PROTOCOL,
    StateReply, StateRequest, StepId,
};
use p2p_proto::ring::Phase;
use std::time::Duration;
use tests::{Node, expected_sum_hash, wait_until};

const LEN: usize = 50_000;

#[derive(NetworkBehaviour)]
struct Rogue {
    stream: libp2p_stream::Behaviour,
    gossipsub: gossipsub::Behaviour,
}

/// What the rogue sends on one ring stream each; its frames carry its own valid signature
/// (but the unsigned one), so they reach the checks after it.
fn attacks(run: RunId, key: &libp2p::identity::Keypair) -> Vec<(&'static str, Vec<u8>)> {
    let sign = |mut step: RingStep| {
        step.signature =
            key.sign(&RingStep::signing_bytes(step.run, step.round, step.attempt, &step.id, &step.hash)).unwrap();
        step
    };
    let id = StepId { level: 0, phase: Phase::ReduceScatter, step: 0, chunk: 0, segment: 0 };
    let mut wrong = RingStep::new(run, 0, 0, id, vec![7u8; 64]);
    wrong.hash[0] ^= 1;
    let wrong = sign(wrong);
    let unsigned = RingStep::new(run, 0, 0, id, vec![7u8; 64]);
    let mut oversize = (u32::MAX).to_le_bytes().to_vec();
    oversize.extend([1u8; 64]);
    let mut garbage_body = 40u32.to_le_bytes().to_vec();
    garbage_body.push(p2p_proto::PROTOCOL_VERSION);
    garbage_body.extend((0..39u8).map(|i| i.wrapping_mul(97) ^ 0xa5));
    let stray = sign(RingStep::new(run, 0, 0, id, vec![1u8; 64]));
    vec![
        ("unsigned", encode_frame(&RingFrame::Step(unsigned))),
        ("wrong hash", encode_frame(&RingFrame::Step(wrong))),
        ("oversize", oversize),
        ("garbage", garbage_body),
        ("not a neighbour", encode_frame(&RingFrame::Step(stray))),
    ]
}

/// Which attacks one rogue (a fresh identity each time) makes.
#[derive(Clone, Copy)]
enum Mode {
    /// Every attack on a ring stream, a forged token, the state protocol and gossip.
    Stream,
    /// Attack `i` on the direct TCP connection the node offers; a frame that fails its checks
    /// there blames nobody, so the node keeps this rogue to the stream afterwards.
    Direct(usize),
}

async fn attack(target: Multiaddr, run: RunId, mode: Mode) {
    let key = libp2p::identity::Keypair::generate_ed25519();
    let mut swarm = libp2p::SwarmBuilder::with_existing_identity(key.clone())
        .with_tokio()
        .with_tcp(tcp::Config::default(), noise::Config::new, yamux::Config::default)
        .unwrap()
        .with_behaviour(|key| Rogue {
            stream: libp2p_stream::Behaviour::new(),
            gossipsub: gossipsub::Behaviour::new(
                gossipsub::MessageAuthenticity::Signed(key.clone()),
                gossipsub::Config::default(),
            )
            .unwrap(),
        })
        .unwrap()
        .build();
    let topic = gossipsub::IdentTopic::new(run.topic());
    swarm.behaviour_mut().gossipsub.subscribe(&topic).unwrap();
    let peer: PeerId = target
        .iter()
        .find_map(|p| match p {
            libp2p::multiaddr::Protocol::P2p(id) => Some(id),
            _ => None,
        })
        .unwrap();
    swarm.dial(target).unwrap();
    let mut control = swarm.behaviour().stream.new_control();
    let (publish_tx, mut publish_rx) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
    let driver = tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = swarm.select_next_some() => {}
                Some(data) = publish_rx.recv() => {
                    let _ = swarm.behaviour_mut().gossipsub.publish(topic.clone(), data);
                }
            }
        }
    });
    // A node busy accepting another stream (its own ring's) may drop a new one before its
    // offer: open it again, as the node's own writers do.
    let open = |mut control: libp2p_stream::Control| async move {
        let mut offer = [0u8; 3 + RING_TOKEN_BYTES];
        for _ in 0..4 {
            let mut s = control.open_stream(peer, StreamProtocol::new(RING_PROTOCOL)).await.expect("ring stream");
            if s.read_exact(&mut offer[..1]).await.is_err() {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            if offer[0] == RING_OFFER_DIRECT {
                s.read_exact(&mut offer[1..]).await.expect("offer");
            }
            return (s, offer);
        }
        panic!("the node dropped 4 ring streams in a row before offering anything");
    };
    if let Mode::Direct(i) = mode {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let (what, bytes) = attacks(run, &key).swap_remove(i);
        let (_s, offer) = open(control.clone()).await;
        assert_eq!(offer[0], RING_OFFER_DIRECT, "{what}: the node offers a direct connection on loopback");
        let port = u16::from_le_bytes([offer[1], offer[2]]);
        let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.expect(what);
        tcp.write_all(&offer[3..]).await.expect(what);
        let mut ack = [0u8; 1];
        tcp.read_exact(&mut ack).await.expect("the node takes an offered token");
        tcp.write_all(&bytes).await.expect(what);
        let mut buf = [0u8; 1];
        let closed = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut buf)).await;
        assert!(matches!(closed, Ok(Ok(0)) | Ok(Err(_))), "{what} (direct): the node closed the connection");
        if what != "not a neighbour" {
            // Failed its checks on the unauthenticated connection: this rogue is kept to the stream.
            let (_s, offer) = open(control.clone()).await;
            assert_eq!(offer[0], RING_OFFER_STREAM, "{what} (direct): the node no longer offers a direct connection");
        }
        driver.abort();
        return;
    }
    for (what, bytes) in attacks(run, &key) {
        let (mut s, offer) = open(control.clone()).await;
        assert_eq!(offer[0], RING_OFFER_DIRECT, "{what}: the node offers a direct connection on loopback");
        s.write_all(&bytes).await.expect(what);
        s.flush().await.expect(what);
        // The node closes the stream after rejecting the frame.
        let mut buf = [0u8; 1];
        let closed = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await;
        assert!(matches!(closed, Ok(Ok(0)) | Ok(Err(_))), "{what}: the node closed the stream");
    }
    // A direct connection with a token the node never offered is closed at once, whatever follows.
    {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let (_s, offer) = open(control.clone()).await;
        assert_eq!(offer[0], RING_OFFER_DIRECT, "the node offers a direct connection on loopback");
        let port = u16::from_le_bytes([offer[1], offer[2]]);
        let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.expect("data port");
        let mut forged = [0u8; RING_TOKEN_BYTES];
        forged.copy_from_slice(&offer[3..]);
        forged[0] ^= 1;
        tcp.write_all(&forged).await.expect("forged token");
        let _ = tcp
            .write_all(&encode_frame(&RingFrame::Step(RingStep::new(
                run,
                0,
                0,
                StepId { level: 0, phase: Phase::ReduceScatter, step: 0, chunk: 0, segment: 0 },
                vec![1u8; 64],
            ))))
            .await;
        let mut buf = [0u8; 1];
        let closed = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut buf)).await;
        assert!(matches!(closed, Ok(Ok(0)) | Ok(Err(_))), "a forged token: the node closed the connection");
    }
    // The state protocol: garbage closes the stream; a request for another run is refused.
    let mut s = control.open_stream(peer, StreamProtocol::new(STATE_PROTOCOL)).await.expect("state stream");
    s.write_all(&[0xff; 64]).await.expect("garbage request");
    s.flush().await.unwrap();
    let mut buf = [0u8; 1];
    let closed = tokio::time::timeout(Duration::from_secs(20), s.read(&mut buf)).await;
    assert!(matches!(closed, Ok(Ok(0)) | Ok(Err(_))), "garbage on the state protocol: the node closed the stream");
    let mut s = control.open_stream(peer, StreamProtocol::new(STATE_PROTOCOL)).await.expect("state stream");
    let other = StateRequest { run: RunId::from_name("another run"), round: Some(1), unsettled: Vec::new() };
    s.write_all(&encode_frame(&other)).await.unwrap();
    s.flush().await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut answer)).await.expect("an answer").unwrap();
    let reply: StateReply = decode_exact(&answer).expect("one well-formed frame");
    assert!(matches!(reply, StateReply::Refused { .. }), "{reply:?}");
    // Give gossipsub time to learn the node's subscription, then send garbage.
    tokio::time::sleep(Duration::from_secs(2)).await;
    publish_tx.send(vec![0xde, 0xad, 0xbe, 0xef, 1, 2, 3]).unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    driver.abort();
}

#[test]
fn a_hostile_peer_cannot_crash_a_node_or_corrupt_a_round() {
    let run = "it-bad-input";
    let flags = ["--run", run, "--min-peers", "3", "--demo-vector-len", "50000"];
    let a = Node::start("a", &flags);
    let boot = a.address();
    let mut nodes = vec![a];
    for name in ["b", "c"] {
        let mut f = flags.to_vec();
        f.extend(["--bootstrap", boot.as_str()]);
        if name == "c" {
            // Its left neighbour writes to it on the libp2p stream; the others receive direct.
            f.extend(["--ring-transport", "libp2p"]);
        }
        nodes.push(Node::start(name, &f));
    }
    let started = wait_until(Duration::from_secs(60), || nodes.iter().all(|n| !n.rounds().is_empty()).then_some(()));
    if started.is_none() {
        nodes.iter().for_each(Node::dump);
        panic!("the three peers never completed a round");
    }
    let target: Multiaddr = nodes[1].address().parse().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(attack(target.clone(), RunId::from_name(run), Mode::Stream));
    for i in 0..5 {
        rt.block_on(attack(target.clone(), RunId::from_name(run), Mode::Direct(i)));
    }
    let before = nodes[1].rounds().len();

    let victim = &mut nodes[1];
    assert!(victim.is_running(), "the node survived");
    let wants = [
        "signature does not verify",
        "hash mismatch",
        "oversize",
        "malformed",
        "sends this peer nothing in its current ring",
    ];
    let reasons = || -> Vec<String> {
        let rejected = victim.events_containing("rejected ring frame");
        rejected.iter().map(|e| format!("{} {}", e["message"], e["reason"].as_str().unwrap_or_default())).collect()
    };
    // Once on a stream, once on a direct connection. The node logs a refusal before it closes
    // the connection, but the log line may reach this process just after the attack returns.
    let count = |reasons: &[String], want: &str| reasons.iter().filter(|r| r.contains(want)).count();
    let _ = wait_until(Duration::from_secs(10), || {
        let r = reasons();
        wants.iter().all(|w| count(&r, w) >= 2).then_some(())
    });
    let reasons = reasons();
    for want in wants {
        let n = count(&reasons, want);
        assert!(n >= 2, "{n} rejections for '{want}' in {reasons:?}");
    }
    assert!(!victim.events_containing("rejected gossip message").is_empty(), "garbage gossip was rejected");
    assert!(!victim.events_containing("token nobody offered").is_empty(), "the forged token was refused");

    // Rounds go on, and stay exact and identical at every peer.
    let more = wait_until(Duration::from_secs(30), || (nodes[1].rounds().len() >= before + 3).then_some(()));
    if more.is_none() {
        nodes.iter().for_each(Node::dump);
        panic!("rounds stopped after the attack");
    }
    for n in &nodes {
        for r in n.rounds() {
            assert_eq!(r.result_hash, expected_sum_hash(run, r.round, &r.members, LEN), "{} round {}", n.name, r.round);
        }
    }
}
