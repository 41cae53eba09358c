//! What every connection shares: configuration, keys, rules, the hub, and
//! the shutdown signal.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admission::{AddressGuard, Users};
use crate::auth::jwt::KeyRing;
use crate::auth::origin::AllowedOrigins;
use crate::config::Config;
use crate::hub::Hub;
use crate::rooms::Rooms;

pub struct AppState {
    /// The validated configuration.
    pub config: Arc<Config>,
    /// Token verification keys, swapped whole on reload.
    pub keys: arc_swap::ArcSwap<KeyRing>,
    /// The Origin allow-list.
    pub origins: AllowedOrigins,
    /// Room rules.
    pub rooms: Rooms,
    /// Rooms and members on this node.
    pub hub: Arc<Hub>,
    /// Set when shutdown starts: `/readyz` answers 503 and upgrades are refused.
    pub draining: AtomicBool,
    /// Cancelled when shutdown starts; every session closes with 1001.
    pub shutdown: CancellationToken,
    /// Every connection and session task, awaited on shutdown.
    pub tasks: TaskTracker,
    /// WebSocket limits for every session.
    pub ws_config: WebSocketConfig,
    /// Per-address caps, handshake rates and bans.
    pub addresses: Arc<AddressGuard>,
    /// Per-user connection caps and message-rate buckets.
    pub users: Arc<Users>,
    /// Peers whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// Whether the node is busy enough for write coalescing.
    pub load: Arc<crate::session::load::NodeLoad>,
    next_session: AtomicU64,
}

impl AppState {
    pub fn new(config: Arc<Config>, keys: KeyRing, hub: Arc<Hub>) -> Self {
        let limits = &config.limits;
        let ws_config = WebSocketConfig::default()
            .read_buffer_size(limits.read_buffer_bytes)
            .write_buffer_size(limits.write_buffer_bytes)
            .max_write_buffer_size(limits.max_write_buffer_bytes)
            .max_message_size(Some(limits.max_message_bytes))
            .max_frame_size(Some(limits.max_frame_bytes))
            .accept_unmasked_frames(false);
        Self {
            origins: AllowedOrigins::new(&config.security.allowed_origins).unwrap_or_default(),
            rooms: Rooms::new(&config.rooms, &config.dm),
            keys: arc_swap::ArcSwap::from_pointee(keys),
            hub,
            draining: AtomicBool::new(false),
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
            ws_config,
            addresses: Arc::new(AddressGuard::new(limits, &config.bans)),
            users: Arc::new(Users::new(limits)),
            trusted_proxies: config
                .server
                .trusted_proxies
                .iter()
                .filter_map(|n| crate::config::parse_net(n).ok())
                .collect(),
            load: Arc::new(crate::session::load::NodeLoad::new(
                config.session.write_coalesce_busy_percent,
            )),
            next_session: AtomicU64::new(1),
            config,
        }
    }

    /// A node-unique session number.
    pub fn next_session_id(&self) -> u64 {
        self.next_session.fetch_add(1, Ordering::Relaxed)
    }

    /// Whether `ip` is a proxy whose `X-Forwarded-For` names the client.
    pub fn is_trusted_proxy(&self, ip: std::net::IpAddr) -> bool {
        self.trusted_proxies.iter().any(|net| net.contains(&ip))
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }
}
