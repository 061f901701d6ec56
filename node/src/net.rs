//! The libp2p swarm, owned by one task (the event loop), and the handle the
//! rest of the node uses to talk to it.
//!
//! - Kademlia (server mode, the trainer's own protocol name) finds peers: a
//!   peer that bootstraps from one address learns the others from the DHT and
//!   dials them.
//! - Identify tells each side the other's listen addresses, which feed Kademlia.
//! - Gossipsub carries small signed messages on the run's topic; the sender's
//!   signature is checked by gossipsub (strict validation).
//! - libp2p-stream opens direct streams for ring payloads; its [`Control`] is
//!   handed out so the ring I/O never goes through this loop. The handle also
//!   knows each connected peer's IP address, where [`crate::ring_io`] may move
//!   the payload bytes onto a plain TCP connection.

use futures::StreamExt;
use libp2p::{
    Multiaddr, PeerId, StreamProtocol, Swarm, gossipsub, identify,
    identity::Keypair,
    kad, noise, ping,
    swarm::{NetworkBehaviour, SwarmEvent},
    tcp, yamux,
};
use libp2p_stream::Control;
use p2p_proto::message::{IDENTIFY_PROTOCOL, KAD_PROTOCOL};
use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

/// Largest gossip message: gossip carries hashes and membership, never tensors. The largest
/// an honest peer sends grow with the ring: a commit holds a hash per chunk (32 bytes a member
/// of a plain ring) and a `Done` that names the next ring a peer id per member (53 bytes), so
/// 256 KiB leaves room for rings of about 4,800 peers (64 KiB stopped them near 1,200).
pub const MAX_GOSSIP_BYTES: usize = 256 * 1024;

/// How often the DHT is walked for new peers.
const DISCOVERY_INTERVAL: Duration = Duration::from_secs(2);

#[derive(NetworkBehaviour)]
struct Behaviour {
    kad: kad::Behaviour<kad::store::MemoryStore>,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
    gossipsub: gossipsub::Behaviour,
    stream: libp2p_stream::Behaviour,
}

/// Why the network could not start.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("cannot listen on {addr}: {reason}: the port may be in use; choose another with --listen")]
    Listen { addr: Multiaddr, reason: String },
    #[error("bootstrap address {addr} has no /p2p/<peer id> suffix: copy the full address the first peer printed")]
    BootstrapWithoutPeerId { addr: Multiaddr },
    #[error("cannot build the network: {0}")]
    Build(String),
}

/// What the network reports to the node.
#[derive(Debug)]
pub enum NetEvent {
    /// Listening on this full address (with /p2p/<peer id>).
    Listening(Multiaddr),
    /// A gossip message on the run's topic, signed by `source`.
    Gossip { source: PeerId, data: Vec<u8> },
    /// The last connection to `peer` closed (it crashed, left or lost its network).
    Disconnected(PeerId),
}

enum Command {
    Publish(Vec<u8>),
}

/// Cheap handle to the network task.
#[derive(Clone)]
pub struct NetHandle {
    commands: mpsc::UnboundedSender<Command>,
    control: Control,
    pub local_peer_id: PeerId,
    /// Where ring payloads are received directly over TCP (`None`: only over libp2p streams).
    pub direct_ip: Option<IpAddr>,
    /// The TCP port for them (0: an ephemeral one).
    pub direct_port: u16,
    /// The IP address each connected peer is reached at, from its libp2p connection.
    remote_ips: Arc<Mutex<HashMap<PeerId, IpAddr>>>,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Command::Publish(d) => write!(f, "Publish({} bytes)", d.len()),
        }
    }
}

impl std::fmt::Debug for NetHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetHandle").field("local_peer_id", &self.local_peer_id).finish()
    }
}

impl NetHandle {
    /// Gossips `data` on the run's topic. Fire and forget: gossip is best effort
    /// and the protocol re-sends what it must.
    pub fn publish(&self, data: Vec<u8>) {
        let _ = self.commands.send(Command::Publish(data));
    }

    /// A control for opening and accepting streams.
    pub fn control(&self) -> Control {
        self.control.clone()
    }

    /// The IP address of a connected peer, as its libp2p connection reaches it.
    pub fn remote_ip(&self, peer: &PeerId) -> Option<IpAddr> {
        self.remote_ips.lock().expect("never poisoned").get(peer).copied()
    }
}

/// The IP address of the first `/ip4` or `/ip6` component of `addr`.
fn ip_of(addr: &Multiaddr) -> Option<IpAddr> {
    addr.iter().find_map(|p| match p {
        libp2p::multiaddr::Protocol::Ip4(ip) => Some(IpAddr::V4(ip)),
        libp2p::multiaddr::Protocol::Ip6(ip) => Some(IpAddr::V6(ip)),
        _ => None,
    })
}

/// Settings of the network.
#[derive(Debug, Clone)]
pub struct NetConfig {
    pub listen: Vec<Multiaddr>,
    pub bootstrap: Vec<Multiaddr>,
    pub topic: String,
    /// Receive ring payloads over direct TCP connections (on the first listen address's IP)
    /// instead of through the libp2p connection; see [`crate::ring_io`].
    pub direct_ring: bool,
    /// Their TCP port (0: an ephemeral one).
    pub ring_port: u16,
}

/// The task that owns the swarm.
pub struct EventLoop {
    swarm: Swarm<Behaviour>,
    commands: mpsc::UnboundedReceiver<Command>,
    events: mpsc::UnboundedSender<NetEvent>,
    topic: gossipsub::IdentTopic,
    discovered: HashSet<PeerId>,
    remote_ips: Arc<Mutex<HashMap<PeerId, IpAddr>>>,
}

impl std::fmt::Debug for EventLoop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventLoop").field("peer", self.swarm.local_peer_id()).finish()
    }
}

/// Builds the swarm, starts listening and dials the bootstrap peers.
pub fn new(
    key: Keypair,
    cfg: NetConfig,
) -> Result<(NetHandle, mpsc::UnboundedReceiver<NetEvent>, EventLoop), NetError> {
    let build = |e: &dyn std::fmt::Display| NetError::Build(e.to_string());
    let mut swarm = libp2p::SwarmBuilder::with_existing_identity(key)
        .with_tokio()
        .with_tcp(tcp::Config::default().nodelay(true), noise::Config::new, yamux::Config::default)
        .map_err(|e| build(&e))?
        .with_dns()
        .map_err(|e| build(&e))?
        .with_behaviour(|key| {
            let peer = key.public().to_peer_id();
            let mut kad_cfg = kad::Config::new(StreamProtocol::new(KAD_PROTOCOL));
            kad_cfg.set_periodic_bootstrap_interval(Some(Duration::from_secs(30)));
            let mut kad = kad::Behaviour::with_config(peer, kad::store::MemoryStore::new(peer), kad_cfg);
            // Answer DHT queries even without a confirmed public address (loopback, LAN).
            kad.set_mode(Some(kad::Mode::Server));
            let gossip_cfg = gossipsub::ConfigBuilder::default()
                .heartbeat_interval(Duration::from_millis(500))
                .validation_mode(gossipsub::ValidationMode::Strict)
                .max_transmit_size(MAX_GOSSIP_BYTES)
                .build()
                .map_err(|e| e.to_string())?;
            let gossipsub = gossipsub::Behaviour::new(gossipsub::MessageAuthenticity::Signed(key.clone()), gossip_cfg)?;
            Ok(Behaviour {
                kad,
                identify: identify::Behaviour::new(identify::Config::new(IDENTIFY_PROTOCOL.into(), key.public())),
                ping: ping::Behaviour::new(ping::Config::new()),
                gossipsub,
                stream: libp2p_stream::Behaviour::new(),
            })
        })
        .map_err(|e| build(&e))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(120)))
        .build();

    let topic = gossipsub::IdentTopic::new(cfg.topic.clone());
    swarm.behaviour_mut().gossipsub.subscribe(&topic).map_err(|e| build(&e))?;
    for addr in &cfg.listen {
        swarm.listen_on(addr.clone()).map_err(|e| NetError::Listen { addr: addr.clone(), reason: e.to_string() })?;
    }
    for addr in &cfg.bootstrap {
        let Some(peer) = addr.iter().find_map(|p| match p {
            libp2p::multiaddr::Protocol::P2p(peer) => Some(peer),
            _ => None,
        }) else {
            return Err(NetError::BootstrapWithoutPeerId { addr: addr.clone() });
        };
        swarm.behaviour_mut().kad.add_address(&peer, addr.clone());
        if let Err(e) = swarm.dial(addr.clone()) {
            warn!(%addr, error = %e, "cannot dial bootstrap peer; will retry through the DHT");
        }
    }
    let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
    let (ev_tx, ev_rx) = mpsc::unbounded_channel();
    let remote_ips = Arc::new(Mutex::new(HashMap::new()));
    let handle = NetHandle {
        commands: cmd_tx,
        control: swarm.behaviour().stream.new_control(),
        local_peer_id: *swarm.local_peer_id(),
        direct_ip: cfg.direct_ring.then(|| cfg.listen.iter().find_map(ip_of)).flatten(),
        direct_port: cfg.ring_port,
        remote_ips: remote_ips.clone(),
    };
    let ev = EventLoop { swarm, commands: cmd_rx, events: ev_tx, topic, discovered: HashSet::new(), remote_ips };
    Ok((handle, ev_rx, ev))
}

impl EventLoop {
    /// Runs until the command channel closes.
    pub async fn run(mut self) {
        let mut discovery = tokio::time::interval(DISCOVERY_INTERVAL);
        loop {
            tokio::select! {
                event = self.swarm.select_next_some() => self.on_swarm_event(event),
                cmd = self.commands.recv() => match cmd {
                    Some(Command::Publish(data)) => self.publish(data),
                    None => return,
                },
                _ = discovery.tick() => {
                    // Walk the DHT towards a random key: finds peers nobody told us about.
                    self.swarm.behaviour_mut().kad.get_closest_peers(PeerId::random());
                }
            }
        }
    }

    fn publish(&mut self, data: Vec<u8>) {
        let topic = self.topic.clone();
        match self.swarm.behaviour_mut().gossipsub.publish(topic, data) {
            Ok(_) => {}
            Err(gossipsub::PublishError::NoPeersSubscribedToTopic) => debug!("gossip not sent: no peers yet"),
            Err(gossipsub::PublishError::Duplicate) => {}
            Err(e) => warn!(error = %e, "gossip publish failed"),
        }
    }

    fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::NewListenAddr { address, .. } => {
                let full = address.with_p2p(*self.swarm.local_peer_id()).expect("own peer id");
                let _ = self.events.send(NetEvent::Listening(full));
            }
            SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received { peer_id, info, .. }))
                if info.protocols.iter().any(|p| p.as_ref() == KAD_PROTOCOL) =>
            {
                for addr in info.listen_addrs {
                    self.swarm.behaviour_mut().kad.add_address(&peer_id, addr);
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Kad(kad::Event::RoutingUpdated {
                peer, is_new_peer: true, ..
            })) if self.discovered.insert(peer) => {
                info!(%peer, via = "kademlia", "peer discovered");
                if !self.swarm.is_connected(&peer)
                    && let Err(e) = self.swarm.dial(peer)
                {
                    debug!(%peer, error = %e, "dial after discovery failed");
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Gossipsub(gossipsub::Event::Message { message, .. })) => {
                // Strict validation: every delivered message is signed and has a source.
                if let Some(source) = message.source {
                    let _ = self.events.send(NetEvent::Gossip { source, data: message.data });
                }
            }
            SwarmEvent::ConnectionEstablished { peer_id, endpoint, .. } => {
                debug!(peer = %peer_id, addr = %endpoint.get_remote_address(), "connected");
                if let Some(ip) = ip_of(endpoint.get_remote_address()) {
                    self.remote_ips.lock().expect("never poisoned").insert(peer_id, ip);
                }
            }
            SwarmEvent::ConnectionClosed { peer_id, cause, num_established: 0, .. } => {
                debug!(peer = %peer_id, cause = ?cause, "disconnected");
                self.remote_ips.lock().expect("never poisoned").remove(&peer_id);
                let _ = self.events.send(NetEvent::Disconnected(peer_id));
            }
            SwarmEvent::OutgoingConnectionError { peer_id, error, .. } => {
                debug!(peer = ?peer_id, error = %error, "outgoing connection failed");
            }
            SwarmEvent::IncomingConnectionError { error, .. } => {
                debug!(error = %error, "incoming connection failed");
            }
            _ => {}
        }
    }
}
