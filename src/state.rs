//! What every connection shares: configuration, keys, rules, the hub, and
//! the shutdown signal.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::jwt::KeyRing;
use crate::auth::origin::AllowedOrigins;
use crate::config::Config;
use crate::hub::Hub;
use crate::rooms::Rooms;

pub struct AppState {
    /// The validated configuration.
    pub config: Arc<Config>,
    /// Token verification keys.
    pub keys: Arc<KeyRing>,
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
    next_session: AtomicU64,
}

impl AppState {
    pub fn new(config: Arc<Config>, keys: Arc<KeyRing>, hub: Arc<Hub>) -> Self {
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
            keys,
            hub,
            draining: AtomicBool::new(false),
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
            ws_config,
            next_session: AtomicU64::new(1),
            config,
        }
    }

    /// A node-unique session number.
    pub fn next_session_id(&self) -> u64 {
        self.next_session.fetch_add(1, Ordering::Relaxed)
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }
}
