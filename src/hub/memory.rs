//! The single-node broker: sequence and history in memory, fan-out by calling
//! the hub directly under the room's lock, so every member sees seq order.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use tokio_tungstenite::tungstenite::Utf8Bytes;

use super::broker::{
    Broker, BrokerError, DeleteOutcome, Draft, EventSink, History, RoomEvent, replay_window,
};
use crate::protocol::{MessageFrame, ServerFrame};
use crate::rooms::HistoryBound;
use crate::sync::lock;

struct Stored {
    seq: u64,
    author: String,
    frame: Utf8Bytes,
    at: Instant,
}

struct RoomLog {
    /// This run of the room's sequence: a new log starts a new one.
    epoch: String,
    /// The last seq given out.
    latest: u64,
    /// The highest seq dropped from history for length or age (not deletion).
    evicted_through: u64,
    history: VecDeque<Stored>,
    /// The room's bound, as of its last publish.
    max_age: Option<Duration>,
}

impl RoomLog {
    fn new() -> Self {
        Self {
            epoch: format!("{:016x}", rand::random::<u64>()),
            latest: 0,
            evicted_through: 0,
            history: VecDeque::new(),
            max_age: None,
        }
    }

    /// Drops what is over the length or older than the age bound.
    fn trim(&mut self, len: usize, now: Instant) {
        while self.history.len() > len
            || self
                .history
                .front()
                .zip(self.max_age)
                .is_some_and(|(oldest, age)| now.duration_since(oldest.at) > age)
        {
            if let Some(old) = self.history.pop_front() {
                self.evicted_through = old.seq;
            }
        }
    }
}

/// In-memory broker. Room logs are bounded in number: past `max_rooms`, the
/// log of a room nobody is subscribed to is dropped to make space.
pub struct MemoryBroker {
    rooms: Mutex<HashMap<String, Arc<Mutex<RoomLog>>>>,
    subscribed: Mutex<std::collections::HashSet<String>>,
    max_rooms: usize,
    sink: OnceLock<Weak<dyn EventSink>>,
}

impl MemoryBroker {
    pub fn new(max_rooms: usize) -> Self {
        Self {
            rooms: Mutex::new(HashMap::new()),
            subscribed: Mutex::new(Default::default()),
            max_rooms,
            sink: OnceLock::new(),
        }
    }

    fn log(&self, room: &str) -> Result<Arc<Mutex<RoomLog>>, BrokerError> {
        let mut rooms = lock(&self.rooms);
        if let Some(log) = rooms.get(room) {
            return Ok(log.clone());
        }
        if rooms.len() >= self.max_rooms {
            let subscribed = lock(&self.subscribed);
            let idle = rooms.keys().find(|r| !subscribed.contains(*r)).cloned();
            match idle {
                Some(idle) => {
                    rooms.remove(&idle);
                }
                None => return Err(BrokerError("room limit reached".into())),
            }
        }
        let log = Arc::new(Mutex::new(RoomLog::new()));
        rooms.insert(room.to_owned(), log.clone());
        Ok(log)
    }

    fn deliver(&self, room: &str, event: &RoomEvent) {
        if let Some(sink) = self.sink.get().and_then(Weak::upgrade) {
            sink.deliver(room, event);
        }
    }
}

/// A fresh random id for a message, 128 bits in hex.
fn message_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

#[async_trait::async_trait]
impl Broker for MemoryBroker {
    fn attach(&self, sink: Weak<dyn EventSink>) {
        let _ = self.sink.set(sink);
    }

    async fn subscribe(&self, room: &str) -> Result<(), BrokerError> {
        lock(&self.subscribed).insert(room.to_owned());
        Ok(())
    }

    fn unsubscribe(&self, room: &str) {
        lock(&self.subscribed).remove(room);
    }

    async fn publish(
        &self,
        room: &str,
        history: HistoryBound,
        draft: Draft,
    ) -> Result<u64, BrokerError> {
        let accepted = Instant::now();
        let log = self.log(room)?;
        let mut log = lock(&log);
        let seq = log.latest + 1;
        let id = message_id();
        let ts = crate::protocol::now_rfc3339();
        let frame = MessageFrame {
            kind: "message",
            room,
            seq,
            id: &id,
            from: &draft.from,
            payload: &draft.payload,
            ts: &ts,
        };
        let text = serde_json::to_string(&frame).map_err(|e| BrokerError(e.to_string()))?;
        let frame = Utf8Bytes::from(text);
        log.latest = seq;
        log.max_age = Some(history.max_age);
        log.history.push_back(Stored {
            seq,
            author: draft.from.sub.clone(),
            frame: frame.clone(),
            at: accepted,
        });
        log.trim(history.len, accepted);
        // Delivered under the room's lock: the next publish waits, so every
        // member's queue receives this room's messages in seq order.
        self.deliver(room, &RoomEvent::Message { seq, frame });
        Ok(seq)
    }

    async fn history(&self, room: &str, since: Option<u64>) -> Result<History, BrokerError> {
        let log = self.log(room)?;
        let mut log = lock(&log);
        let len = log.history.len();
        log.trim(len, Instant::now());
        let Some(since) = since else {
            return Ok(History {
                latest: log.latest,
                messages: Vec::new(),
                complete: true,
                epoch: log.epoch.clone(),
            });
        };
        let (from, complete) = replay_window(since, log.latest, log.evicted_through);
        let messages = log
            .history
            .iter()
            .filter(|m| m.seq > from)
            .map(|m| (m.seq, m.frame.clone()))
            .collect();
        Ok(History {
            latest: log.latest,
            messages,
            complete,
            epoch: log.epoch.clone(),
        })
    }

    async fn delete(
        &self,
        room: &str,
        seq: u64,
        by: &str,
        any_author: bool,
    ) -> Result<DeleteOutcome, BrokerError> {
        let log = self.log(room)?;
        let mut log = lock(&log);
        let Ok(index) = log.history.binary_search_by_key(&seq, |m| m.seq) else {
            return Ok(DeleteOutcome::NotFound);
        };
        if !any_author && log.history[index].author != by {
            return Ok(DeleteOutcome::Forbidden);
        }
        log.history.remove(index);
        let frame = ServerFrame::Deleted { room, seq, by }.to_json();
        self.deliver(
            room,
            &RoomEvent::Deleted {
                seq,
                frame: Utf8Bytes::from(frame),
            },
        );
        Ok(DeleteOutcome::Deleted)
    }

    async fn kick(&self, room: &str, user: &str) -> Result<(), BrokerError> {
        self.deliver(
            room,
            &RoomEvent::Kick {
                user: user.to_owned(),
            },
        );
        Ok(())
    }
}
