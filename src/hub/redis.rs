//! The Redis broker: several nodes share rooms.
//!
//! - **Sequence and history.** One Lua script per message increments the
//!   room's seq, appends the frame to the room's stream (entry id
//!   `<seq>-1`), trims it to the room's length and age, and publishes it on
//!   the room's channel. Redis runs scripts one at a time, so the channel
//!   carries a room's messages in seq order and every node agrees on seq.
//! - **Fan-out.** Each node holds one subscription per room with local
//!   members. A gap in the seqs a node receives (a reconnect, a message
//!   lost while Redis was away) is filled from the stream before anything
//!   newer is delivered.
//! - **Integrity.** Every bus message carries an HMAC-SHA-256 with the
//!   cluster secret over its kind, room and content; a node drops and counts
//!   any message that fails the check, so a client that can reach Redis
//!   cannot inject messages. The seq itself is assigned inside Redis and is
//!   not covered: such a client could replay an old message, not forge one.
//!
//! Keys: `<prefix>:{<room>}:seq`, `:stream`, `:floor` (the highest seq
//! dropped for length or age), `:epoch` (a fresh value each time the
//! sequence starts, so nodes and clients notice a restart after Redis lost
//! the room); channel `<prefix>:{<room>}`. The braces keep a
//! room's keys in one Redis Cluster slot.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use aws_lc_rs::hmac;
use futures_util::StreamExt;
use redis::aio::ConnectionManager;
use redis::{AsyncCommands, IntoConnectionInfo, Script};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Utf8Bytes;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::broker::{
    Broker, BrokerError, DeleteOutcome, Draft, EventSink, History, RoomEvent, replay_window,
};
use crate::config::{BrokerConfig, Secret};
use crate::protocol::{MessageFrame, ServerFrame};
use crate::rooms::HistoryBound;
use crate::sync::lock;

/// INCR, XADD, trim by length and age, PUBLISH: one message, atomically.
/// KEYS: seq, stream, floor, epoch. ARGV: frame prefix, frame suffix, mac,
/// author, max length, now (ms), oldest allowed (ms), channel, key ttl (ms),
/// a fresh epoch (used when the sequence starts).
const PUBLISH: &str = r#"
local seq = redis.call('INCR', KEYS[1])
local epoch = redis.call('GET', KEYS[4])
if not epoch then
  epoch = ARGV[10]
  redis.call('SET', KEYS[4], epoch)
end
local frame = ARGV[1] .. seq .. ARGV[2]
redis.call('XADD', KEYS[2], seq .. '-1', 'f', frame, 'm', ARGV[3], 'a', ARGV[4], 't', ARGV[6])
local floor = 0
local maxlen = tonumber(ARGV[5])
local len = redis.call('XLEN', KEYS[2])
if len > maxlen then
  local old = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', len - maxlen)
  for _, entry in ipairs(old) do
    redis.call('XDEL', KEYS[2], entry[1])
    floor = tonumber(string.match(entry[1], '^(%d+)'))
  end
end
local oldest = tonumber(ARGV[7])
while true do
  local first = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 1)
  if #first == 0 then break end
  local fields = first[1][2]
  local at = 0
  for i = 1, #fields, 2 do
    if fields[i] == 't' then at = tonumber(fields[i + 1]) end
  end
  if at >= oldest then break end
  redis.call('XDEL', KEYS[2], first[1][1])
  floor = tonumber(string.match(first[1][1], '^(%d+)'))
end
if floor > 0 then
  local previous = tonumber(redis.call('GET', KEYS[3]) or '0')
  if floor > previous then redis.call('SET', KEYS[3], floor) end
end
local ttl = tonumber(ARGV[9])
redis.call('PEXPIRE', KEYS[1], ttl)
redis.call('PEXPIRE', KEYS[2], ttl)
redis.call('PEXPIRE', KEYS[3], ttl)
redis.call('PEXPIRE', KEYS[4], ttl)
redis.call('PUBLISH', ARGV[8], 'm\n' .. ARGV[3] .. '\n' .. epoch .. '\n' .. frame)
return seq
"#;

/// Delete one message if `by` wrote it or any author is allowed.
/// KEYS: stream. ARGV: seq, by, any (1/0), channel, envelope.
/// Returns 1 deleted, 0 not found, -1 forbidden.
const DELETE: &str = r#"
local id = ARGV[1] .. '-1'
local found = redis.call('XRANGE', KEYS[1], id, id)
if #found == 0 then return 0 end
local fields = found[1][2]
local author = ''
for i = 1, #fields, 2 do
  if fields[i] == 'a' then author = fields[i + 1] end
end
if ARGV[3] ~= '1' and author ~= ARGV[2] then return -1 end
redis.call('XDEL', KEYS[1], id)
redis.call('PUBLISH', ARGV[4], ARGV[5])
return 1
"#;

/// Subscription changes for the subscriber task; a subscribe is answered
/// once Redis confirmed it.
enum Change {
    Subscribe(String, tokio::sync::oneshot::Sender<bool>),
    Unsubscribe(String),
}

/// Per-room delivery state on this node.
#[derive(Default)]
struct RoomState {
    /// The last seq delivered here; `None` until the first one.
    last: Option<u64>,
    /// The epoch of `last`.
    epoch: Option<String>,
}

struct Shared {
    conn: ConnectionManager,
    client: redis::Client,
    key: hmac::Key,
    prefix: String,
    response_timeout: Duration,
    max_backoff: Duration,
    sink: OnceLock<Weak<dyn EventSink>>,
    /// Rooms this node is subscribed to, with their delivery state.
    rooms: Mutex<HashMap<String, RoomState>>,
    /// Whether the subscription connection is up: the node's signal that
    /// Redis is reachable.
    subscribed: AtomicBool,
}

/// The Redis broker; see the module docs.
pub struct RedisBroker {
    shared: Arc<Shared>,
    changes: mpsc::UnboundedSender<Change>,
    publish: Script,
    delete: Script,
    stop: CancellationToken,
}

/// Why the broker could not start.
#[derive(Debug, thiserror::Error)]
#[error("broker: {0}")]
pub struct RedisStartError(pub String);

fn read_secret(
    env: &Option<String>,
    file: &Option<std::path::PathBuf>,
    what: &str,
) -> Result<Option<Secret>, RedisStartError> {
    let bytes = if let Some(var) = env {
        std::env::var(var)
            .map_err(|_| RedisStartError(format!("{what}: environment variable {var} is not set")))?
            .into_bytes()
    } else if let Some(path) = file {
        let mut bytes = std::fs::read(path)
            .map_err(|e| RedisStartError(format!("{what}: cannot read {}: {e}", path.display())))?;
        while bytes.last().is_some_and(|b| b.is_ascii_whitespace()) {
            bytes.pop();
        }
        bytes
    } else {
        return Ok(None);
    };
    Ok(Some(Secret::new(bytes)))
}

impl RedisBroker {
    /// Connects to Redis (waiting at most `connect_timeout_ms`) and starts
    /// the subscriber task.
    pub async fn connect(config: &BrokerConfig) -> Result<Self, RedisStartError> {
        let secret = read_secret(
            &config.secret_env,
            &config.secret_file,
            "broker.secret_env/secret_file",
        )?
        .ok_or_else(|| RedisStartError("broker.secret_env or secret_file is required".into()))?;
        if let Some(weakness) = crate::auth::jwt::secret_weakness(secret.expose()) {
            return Err(RedisStartError(format!(
                "broker.secret_env/secret_file: {}",
                weakness.replacen("the secret", "the cluster secret", 1)
            )));
        }
        let mut info = config
            .url
            .as_str()
            .into_connection_info()
            .map_err(|e| RedisStartError(format!("broker.url: {e}")))?;
        if let Some(password) = read_secret(
            &config.password_env,
            &config.password_file,
            "broker.password_env/password_file",
        )? {
            let password = String::from_utf8(password.expose().to_vec())
                .map_err(|_| RedisStartError("the Redis password is not UTF-8".into()))?;
            let redis = info.redis_settings().clone().set_password(password);
            info = info.set_redis_settings(redis);
        }
        let client =
            redis::Client::open(info).map_err(|e| RedisStartError(format!("broker.url: {e}")))?;
        let connect_timeout = Duration::from_millis(config.connect_timeout_ms);
        let response_timeout = Duration::from_millis(config.response_timeout_ms);
        let manager_config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(connect_timeout))
            .set_response_timeout(Some(response_timeout))
            .set_max_delay(Duration::from_millis(config.max_backoff_ms))
            .set_number_of_retries(2);
        let conn = tokio::time::timeout(
            connect_timeout,
            client.get_connection_manager_with_config(manager_config),
        )
        .await
        .map_err(|_| {
            RedisStartError(format!(
                "cannot reach Redis at {} within {connect_timeout:?}",
                config.url
            ))
        })?
        .map_err(|e| RedisStartError(format!("cannot reach Redis at {}: {e}", config.url)))?;
        let shared = Arc::new(Shared {
            conn,
            client,
            key: hmac::Key::new(hmac::HMAC_SHA256, secret.expose()),
            prefix: config.key_prefix.clone(),
            response_timeout,
            max_backoff: Duration::from_millis(config.max_backoff_ms),
            sink: OnceLock::new(),
            rooms: Mutex::new(HashMap::new()),
            subscribed: AtomicBool::new(false),
        });
        let (changes, rx) = mpsc::unbounded_channel();
        let stop = CancellationToken::new();
        tokio::spawn(subscriber(shared.clone(), rx, stop.clone()));
        Ok(Self {
            shared,
            changes,
            publish: Script::new(PUBLISH),
            delete: Script::new(DELETE),
            stop,
        })
    }

    fn keys(&self, room: &str) -> (String, String, String) {
        let base = format!("{}:{{{room}}}", self.shared.prefix);
        (
            format!("{base}:seq"),
            format!("{base}:stream"),
            format!("{base}:floor"),
        )
    }

    fn epoch_key(&self, room: &str) -> String {
        format!("{}:{{{room}}}:epoch", self.shared.prefix)
    }

    /// Runs a command future under the response timeout.
    async fn command<T>(
        &self,
        future: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, BrokerError> {
        match tokio::time::timeout(self.shared.response_timeout, future).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(BrokerError(e.to_string())),
            Err(_) => Err(BrokerError("Redis did not answer in time".into())),
        }
    }
}

impl Drop for RedisBroker {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Shared {
    fn channel(&self, room: &str) -> String {
        format!("{}:{{{room}}}", self.prefix)
    }

    fn mac(&self, kind: &str, room: &str, content: &str) -> String {
        let tag = hmac::sign(&self.key, &mac_input(kind, room, content));
        hex(tag.as_ref())
    }

    fn verify(&self, kind: &str, room: &str, content: &str, mac: &str) -> bool {
        let Some(tag) = unhex(mac) else { return false };
        hmac::verify(&self.key, &mac_input(kind, room, content), &tag).is_ok()
    }

    fn deliver(&self, room: &str, event: &RoomEvent) {
        if let Some(sink) = self.sink.get().and_then(Weak::upgrade) {
            sink.deliver(room, event);
        }
    }
}

fn mac_input(kind: &str, room: &str, content: &str) -> Vec<u8> {
    let mut input = Vec::with_capacity(kind.len() + room.len() + content.len() + 2);
    input.extend_from_slice(kind.as_bytes());
    input.push(0);
    input.extend_from_slice(room.as_bytes());
    input.push(0);
    input.extend_from_slice(content.as_bytes());
    input
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// The part of a `message` frame before its seq; rooms names are plain
/// ASCII without quotes, so this prefix is exact.
fn frame_prefix(room: &str) -> String {
    format!(r#"{{"type":"message","room":"{room}","seq":"#)
}

/// Splits a stored or published `message` frame into its seq and the part
/// after the seq (what the MAC covers); `None` if it is not one.
fn split_frame<'a>(room: &str, frame: &'a str) -> Option<(u64, &'a str)> {
    let rest = frame.strip_prefix(&frame_prefix(room))?;
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    let seq = rest.get(..digits)?.parse().ok()?;
    Some((seq, &rest[digits..]))
}

/// A verified event from the bus or the stream.
fn verified_message(
    shared: &Shared,
    room: &str,
    mac: &str,
    frame: &str,
) -> Option<(u64, Utf8Bytes)> {
    let (seq, suffix) = split_frame(room, frame)?;
    shared
        .verify("m", room, suffix, mac)
        .then(|| (seq, Utf8Bytes::from(frame.to_owned())))
}

fn rejected(reason: &'static str) {
    metrics::counter!("securechat_bus_rejected_total", "reason" => reason).increment(1);
    warn!(
        event = "bus.rejected",
        reason, "dropped a bus message that failed its check"
    );
}

/// Reads stream entries `(from, +]` as verified `(seq, frame)` pairs.
async fn read_stream(
    shared: &Shared,
    room: &str,
    from: u64,
) -> Result<Vec<(u64, Utf8Bytes)>, BrokerError> {
    let stream_key = format!("{}:{{{room}}}:stream", shared.prefix);
    let mut conn = shared.conn.clone();
    let start = format!("{}-1", from + 1);
    let reply: redis::streams::StreamRangeReply = tokio::time::timeout(
        shared.response_timeout,
        conn.xrange(&stream_key, start, "+"),
    )
    .await
    .map_err(|_| BrokerError("Redis did not answer in time".into()))?
    .map_err(|e| BrokerError(e.to_string()))?;
    let mut out = Vec::with_capacity(reply.ids.len());
    for entry in reply.ids {
        let frame: Option<String> = entry.get("f");
        let mac: Option<String> = entry.get("m");
        match (frame, mac) {
            (Some(frame), Some(mac)) => match verified_message(shared, room, &mac, &frame) {
                Some(pair) => out.push(pair),
                None => rejected("history_mac"),
            },
            _ => rejected("history_malformed"),
        }
    }
    Ok(out)
}

#[async_trait::async_trait]
impl Broker for RedisBroker {
    fn attach(&self, sink: Weak<dyn EventSink>) {
        let _ = self.shared.sink.set(sink);
    }

    fn is_ready(&self) -> bool {
        self.shared.subscribed.load(Ordering::Acquire)
    }

    async fn subscribe(&self, room: &str) -> Result<(), BrokerError> {
        // The seq before the subscription is live: the first message that
        // arrives after a gap above it makes the node read the gap from the
        // stream, so nothing published meanwhile is lost.
        let (seq_key, _, _) = self.keys(room);
        let mut conn = self.shared.conn.clone();
        let (latest, epoch): (Option<u64>, Option<String>) = self
            .command(
                redis::pipe()
                    .get(&seq_key)
                    .get(self.epoch_key(room))
                    .query_async(&mut conn),
            )
            .await?;
        {
            let mut rooms = lock(&self.shared.rooms);
            let state = rooms.entry(room.to_owned()).or_default();
            if state.last.is_none() {
                state.last = Some(latest.unwrap_or(0));
                state.epoch = epoch;
            }
        }
        let (done, confirmed) = tokio::sync::oneshot::channel();
        self.changes
            .send(Change::Subscribe(room.to_owned(), done))
            .map_err(|_| BrokerError("the subscriber has stopped".into()))?;
        match tokio::time::timeout(self.shared.response_timeout, confirmed).await {
            Ok(Ok(true)) => Ok(()),
            _ => {
                lock(&self.shared.rooms).remove(room);
                Err(BrokerError("could not subscribe to the room".into()))
            }
        }
    }

    fn unsubscribe(&self, room: &str) {
        lock(&self.shared.rooms).remove(room);
        let _ = self.changes.send(Change::Unsubscribe(room.to_owned()));
    }

    async fn publish(
        &self,
        room: &str,
        history: HistoryBound,
        draft: Draft,
    ) -> Result<u64, BrokerError> {
        let id = format!("{:032x}", rand::random::<u128>());
        let ts = crate::protocol::now_rfc3339();
        // Serialized with seq 0 and split around it: Redis puts the real seq in.
        let full = serde_json::to_string(&MessageFrame {
            kind: "message",
            room,
            seq: 0,
            id: &id,
            from: &draft.from,
            payload: &draft.payload,
            ts: &ts,
        })
        .map_err(|e| BrokerError(e.to_string()))?;
        let (_, suffix) = split_frame(room, &full)
            .ok_or_else(|| BrokerError("unexpected frame layout".into()))?;
        let mac = self.shared.mac("m", room, suffix);
        let (seq_key, stream_key, floor_key) = self.keys(room);
        let now_ms = crate::auth::jwt::now_unix() as u64 * 1000;
        let max_age_ms = history.max_age.as_millis() as u64;
        let ttl_ms = max_age_ms.max(60_000) * 2;
        let mut conn = self.shared.conn.clone();
        let mut invocation = self.publish.prepare_invoke();
        invocation
            .key(seq_key)
            .key(stream_key)
            .key(floor_key)
            .key(self.epoch_key(room))
            .arg(frame_prefix(room))
            .arg(suffix)
            .arg(&mac)
            .arg(&draft.from.sub)
            .arg(history.len)
            .arg(now_ms)
            .arg(now_ms.saturating_sub(max_age_ms))
            .arg(self.shared.channel(room))
            .arg(ttl_ms)
            .arg(new_epoch());
        self.command(invocation.invoke_async::<u64>(&mut conn))
            .await
    }

    async fn history(&self, room: &str, since: Option<u64>) -> Result<History, BrokerError> {
        let (seq_key, _, floor_key) = self.keys(room);
        let epoch_key = self.epoch_key(room);
        let mut conn = self.shared.conn.clone();
        // An empty room gets its epoch now, so the epoch a client is told
        // stays the same when the first message arrives.
        let (latest, floor, _, epoch): (Option<u64>, Option<u64>, Option<String>, String) = self
            .command(
                redis::pipe()
                    .get(&seq_key)
                    .get(&floor_key)
                    .cmd("SET")
                    .arg(&epoch_key)
                    .arg(new_epoch())
                    .arg("NX")
                    .arg("PX")
                    .arg(EMPTY_ROOM_EPOCH_TTL_MS)
                    .get(&epoch_key)
                    .query_async(&mut conn),
            )
            .await?;
        let (latest, floor) = (latest.unwrap_or(0), floor.unwrap_or(0));
        let Some(since) = since else {
            return Ok(History {
                latest,
                messages: Vec::new(),
                complete: true,
                epoch,
            });
        };
        let (from, complete) = replay_window(since, latest, floor);
        let messages = read_stream(&self.shared, room, from).await?;
        let latest = messages.last().map_or(latest, |(seq, _)| latest.max(*seq));
        Ok(History {
            latest,
            messages,
            complete,
            epoch,
        })
    }

    async fn delete(
        &self,
        room: &str,
        seq: u64,
        by: &str,
        any_author: bool,
    ) -> Result<DeleteOutcome, BrokerError> {
        let (_, stream_key, _) = self.keys(room);
        let frame = ServerFrame::Deleted { room, seq, by }.to_json();
        let envelope = format!("d\n{}\n{frame}", self.shared.mac("d", room, &frame));
        let mut conn = self.shared.conn.clone();
        let mut invocation = self.delete.prepare_invoke();
        invocation
            .key(stream_key)
            .arg(seq)
            .arg(by)
            .arg(if any_author { "1" } else { "0" })
            .arg(self.shared.channel(room))
            .arg(envelope);
        let outcome: i64 = self.command(invocation.invoke_async(&mut conn)).await?;
        Ok(match outcome {
            1 => DeleteOutcome::Deleted,
            -1 => DeleteOutcome::Forbidden,
            _ => DeleteOutcome::NotFound,
        })
    }

    async fn kick(&self, room: &str, user: &str) -> Result<(), BrokerError> {
        let envelope = format!("k\n{}\n{user}", self.shared.mac("k", room, user));
        let mut conn = self.shared.conn.clone();
        let channel = self.shared.channel(room);
        self.command(conn.publish::<_, _, i64>(channel, envelope))
            .await
            .map(|_| ())
    }
}

/// Keeps one subscription connection, resubscribing and catching up after
/// every reconnect, and delivers what arrives.
async fn subscriber(
    shared: Arc<Shared>,
    mut changes: mpsc::UnboundedReceiver<Change>,
    stop: CancellationToken,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let pubsub = tokio::select! {
            () = stop.cancelled() => return,
            result = tokio::time::timeout(shared.response_timeout, shared.client.get_async_pubsub()) => result,
        };
        let (mut sink, mut stream) = match pubsub {
            Ok(Ok(pubsub)) => pubsub.split(),
            Ok(Err(e)) => {
                warn!(event = "broker.unavailable", error = %e, retry_ms = backoff.as_millis() as u64);
                shared.subscribed.store(false, Ordering::Release);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(shared.max_backoff);
                continue;
            }
            Err(_) => {
                warn!(event = "broker.unavailable", error = "connect timeout");
                shared.subscribed.store(false, Ordering::Release);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(shared.max_backoff);
                continue;
            }
        };
        // Drop queued changes: the room table is the truth, resubscribe it all.
        while changes.try_recv().is_ok() {}
        let rooms: Vec<String> = lock(&shared.rooms).keys().cloned().collect();
        let mut ok = true;
        for room in &rooms {
            if sink.subscribe(shared.channel(room)).await.is_err() {
                ok = false;
                break;
            }
        }
        if !ok {
            continue;
        }
        for room in &rooms {
            catch_up(&shared, room, None).await;
        }
        shared.subscribed.store(true, Ordering::Release);
        backoff = Duration::from_millis(100);
        info!(event = "broker.connected", rooms = rooms.len());
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                change = changes.recv() => {
                    let result = match change {
                        Some(Change::Subscribe(room, done)) => {
                            let result = sink.subscribe(shared.channel(&room)).await;
                            let _ = done.send(result.is_ok());
                            result
                        }
                        Some(Change::Unsubscribe(room)) => sink.unsubscribe(shared.channel(&room)).await,
                        None => return,
                    };
                    if result.is_err() {
                        break;
                    }
                }
                message = stream.next() => {
                    let Some(message) = message else { break };
                    on_bus_message(&shared, message.get_channel_name(), message.get_payload_bytes()).await;
                }
            }
        }
        shared.subscribed.store(false, Ordering::Release);
        warn!(
            event = "broker.disconnected",
            "lost the Redis subscription; reconnecting"
        );
    }
}

/// Delivers the messages of `room` after the last one delivered here, up to
/// (not including) `until` when given.
async fn catch_up(shared: &Shared, room: &str, until: Option<u64>) {
    let Some(last) = lock(&shared.rooms).get(room).and_then(|r| r.last) else {
        return;
    };
    let Ok(missed) = read_stream(shared, room, last).await else {
        return;
    };
    for (seq, frame) in missed {
        if until.is_some_and(|until| seq >= until) {
            break;
        }
        deliver_message(shared, room, seq, frame);
    }
}

/// Records the epoch of a message; true when it differs from the one known
/// (the sequence restarted), in which case the delivery state starts over.
fn restarted(shared: &Shared, room: &str, epoch: &str) -> bool {
    let mut rooms = lock(&shared.rooms);
    let Some(state) = rooms.get_mut(room) else {
        return false;
    };
    match &state.epoch {
        Some(known) if known == epoch => false,
        Some(_) => {
            state.epoch = Some(epoch.to_owned());
            state.last = Some(0);
            true
        }
        None => {
            state.epoch = Some(epoch.to_owned());
            false
        }
    }
}

/// How long the epoch of a room that has seen no message yet is kept.
const EMPTY_ROOM_EPOCH_TTL_MS: u64 = 14 * 86_400 * 1000;

/// A fresh epoch value.
fn new_epoch() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// Delivers one message if it is the next one for this node.
fn deliver_message(shared: &Shared, room: &str, seq: u64, frame: Utf8Bytes) {
    {
        let mut rooms = lock(&shared.rooms);
        let Some(state) = rooms.get_mut(room) else {
            return;
        };
        if state.last.is_some_and(|last| seq <= last) {
            return;
        }
        state.last = Some(seq);
    }
    shared.deliver(room, &RoomEvent::Message { seq, frame });
}

async fn on_bus_message(shared: &Shared, channel: &str, payload: &[u8]) {
    let Some(room) = channel
        .strip_prefix(&format!("{}:{{", shared.prefix))
        .and_then(|rest| rest.strip_suffix('}'))
    else {
        return rejected("channel");
    };
    let Ok(text) = std::str::from_utf8(payload) else {
        return rejected("not_utf8");
    };
    let mut parts = text.splitn(3, '\n');
    let (Some(kind), Some(mac), Some(content)) = (parts.next(), parts.next(), parts.next()) else {
        return rejected("malformed");
    };
    match kind {
        "m" => {
            let Some((epoch, frame)) = content.split_once('\n') else {
                return rejected("malformed");
            };
            let Some((seq, frame)) = verified_message(shared, room, mac, frame) else {
                return rejected("mac");
            };
            if restarted(shared, room, epoch) {
                warn!(
                    event = "broker.room_restarted",
                    room, "the room's sequence restarted in Redis"
                );
                shared.deliver(room, &RoomEvent::Reset);
            }
            let last = lock(&shared.rooms).get(room).and_then(|r| r.last);
            if last.is_some_and(|last| seq > last + 1) {
                catch_up(shared, room, Some(seq)).await;
            }
            deliver_message(shared, room, seq, frame);
        }
        "d" if shared.verify("d", room, content, mac) => {
            let seq = serde_json::from_str::<serde_json::Value>(content)
                .ok()
                .and_then(|v| v["seq"].as_u64())
                .unwrap_or(0);
            shared.deliver(
                room,
                &RoomEvent::Deleted {
                    seq,
                    frame: Utf8Bytes::from(content.to_owned()),
                },
            );
        }
        "k" if shared.verify("k", room, content, mac) => {
            shared.deliver(
                room,
                &RoomEvent::Kick {
                    user: content.to_owned(),
                },
            );
        }
        _ => rejected("mac"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_split_around_their_seq() {
        let frame = r#"{"type":"message","room":"general","seq":42,"id":"x","from":{"sub":"a","name":"A"},"body":"hi","ts":"t"}"#;
        let (seq, suffix) = split_frame("general", frame).unwrap();
        assert_eq!(seq, 42);
        assert!(suffix.starts_with(r#","id":"x""#));
        assert!(split_frame("other", frame).is_none());
        assert!(split_frame("general", r#"{"type":"deleted"}"#).is_none());
    }

    #[test]
    fn hex_round_trip() {
        assert_eq!(
            unhex(&hex(&[0, 1, 254, 255])).unwrap(),
            vec![0, 1, 254, 255]
        );
        assert!(unhex("abc").is_none());
        assert!(unhex("zz").is_none());
    }
}
