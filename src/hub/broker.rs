//! The broker: per-room sequence, history and fan-out between nodes. The hub
//! sits on top and never cares which implementation it talks to; the
//! in-memory one serves a single node.

use std::sync::Weak;

use tokio_tungstenite::tungstenite::Utf8Bytes;

use crate::protocol::{Payload, Sender};
use crate::rooms::HistoryBound;

/// A message a session asks to publish; the broker gives it seq, id and time.
#[derive(Debug, Clone)]
pub struct Draft {
    pub from: std::sync::Arc<Sender>,
    pub payload: Payload,
}

/// Something that happened in a room, as delivered to every node's hub.
/// Frames are serialized once, here, and the bytes shared by all recipients.
#[derive(Debug, Clone)]
pub enum RoomEvent {
    /// A `message` frame with its seq.
    Message { seq: u64, frame: Utf8Bytes },
    /// A `deleted` frame.
    Deleted { seq: u64, frame: Utf8Bytes },
    /// A moderator removed `user` from the room.
    Kick { user: String },
    /// The room's sequence restarted (its history was lost); seqs start
    /// again from 1.
    Reset,
}

/// Messages after a client's `since`, from the room's history.
#[derive(Debug, Clone, Default)]
pub struct History {
    /// The room's latest seq (0 before the first message).
    pub latest: u64,
    /// `message` frames with seq greater than `since`, in seq order.
    pub messages: Vec<(u64, Utf8Bytes)>,
    /// Whether history still held every message after `since`.
    pub complete: bool,
    /// The current run of the room's sequence.
    pub epoch: String,
}

/// Where a replay after `since` starts, and whether it can be complete,
/// given the room's latest seq and the highest seq dropped from history. A
/// `since` beyond the latest seq means the sequence restarted: replay all
/// that is held, not recovered.
pub fn replay_window(since: u64, latest: u64, evicted_through: u64) -> (u64, bool) {
    if since > latest {
        (0, false)
    } else {
        (since, since >= evicted_through)
    }
}

/// The answer to a delete request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeleteOutcome {
    Deleted,
    /// Not in history (never sent, already deleted, or aged out).
    NotFound,
    /// Neither the author nor allowed to delete others' messages.
    Forbidden,
}

/// The broker could not serve the request; the client gets `error internal`.
#[derive(Debug, thiserror::Error)]
#[error("broker unavailable: {0}")]
pub struct BrokerError(pub String);

/// Where the broker delivers room events: the hub of this node.
pub trait EventSink: Send + Sync {
    /// Called in seq order per room. Must not block.
    fn deliver(&self, room: &str, event: &RoomEvent);
}

/// Publish, history and subscriptions for rooms.
#[async_trait::async_trait]
pub trait Broker: Send + Sync + 'static {
    /// Tells the broker where to deliver events. Called once, by the hub.
    fn attach(&self, sink: Weak<dyn EventSink>);
    /// Whether the broker can serve now; `/readyz` answers 503 when not.
    fn is_ready(&self) -> bool {
        true
    }
    /// Starts delivering events of `room` to this node.
    async fn subscribe(&self, room: &str) -> Result<(), BrokerError>;
    /// Stops delivering events of `room` to this node.
    fn unsubscribe(&self, room: &str);
    /// Assigns the next seq, stores the message in history (within
    /// `history`), fans it out, and returns its seq.
    async fn publish(
        &self,
        room: &str,
        history: HistoryBound,
        draft: Draft,
    ) -> Result<u64, BrokerError>;
    /// Messages after `since` (none asked: no replay, only the latest seq).
    async fn history(&self, room: &str, since: Option<u64>) -> Result<History, BrokerError>;
    /// Removes a message from history and fans out `deleted`, if `by` wrote
    /// it or `any_author` allows deleting others' messages.
    async fn delete(
        &self,
        room: &str,
        seq: u64,
        by: &str,
        any_author: bool,
    ) -> Result<DeleteOutcome, BrokerError>;
    /// Fans out the removal of `user` from `room` to every node.
    async fn kick(&self, room: &str, user: &str) -> Result<(), BrokerError>;
}
