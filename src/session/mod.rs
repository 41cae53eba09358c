//! One WebSocket connection after the upgrade: a reader (this task) that
//! handles client frames and a writer (a task of its own) that drains the
//! bounded outbox, so a delivery wakes only the writer and a client frame
//! only the reader. A writer that keeps finding a backlog holds back between
//! writes (`session.write_coalesce_ms`), so a busy connection gets few large
//! writes instead of one per message.
//!
//! Frame handling lives in [`handler`]; the outbound queue in [`outbox`];
//! framing and the split of the connection in [`transport`].

pub mod fragments;
mod handler;
pub mod load;
pub mod outbox;
pub mod transport;

use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::Poll;
use std::time::{Duration, Instant};

use futures_util::future::OptionFuture;
use futures_util::{FutureExt, SinkExt, StreamExt};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use hyper::upgrade::OnUpgrade;
use tokio::io::{AsyncWrite, AsyncWriteExt, ReadHalf};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::{self, Message};
use tracing::instrument::Instrumented;
use tracing::{Instrument, debug, info};

use crate::admission::UserSlot;
use crate::auth::Identity;
use crate::hub::{MemberHandle, Membership};
use crate::protocol::{Disconnect, Sender, ServerFrame, WelcomeLimits, WelcomeUser};
use crate::rooms::RoomPolicy;
use crate::state::AppState;
use fragments::FragmentLimited;
use outbox::{Batch, Outbox, OutboxReceiver, Outgoing};
use transport::{Io, ReplyIo};

/// The reading side of a session's WebSocket.
pub type Ws = WebSocketStream<FragmentLimited<ReplyIo<ReadHalf<Io>>>>;

/// Facts about the connection, from before the upgrade.
#[derive(Debug, Clone)]
pub struct ConnMeta {
    pub peer: SocketAddr,
    /// The client's address: the peer, or what a trusted proxy says.
    pub client: IpAddr,
    /// Verified client certificate subject (mTLS), if any.
    pub client_subject: Option<String>,
    /// Where the token came from.
    pub credential_source: &'static str,
    /// `http/1.1` or `h2`.
    pub http_version: &'static str,
}

/// A room this session has joined.
struct JoinedRoom {
    policy: Arc<RoomPolicy>,
    membership: Arc<Membership>,
}

/// The rooms a session has joined, searched in order: at most
/// `limits.max_rooms_per_connection` of them, and usually one or two, for
/// which a list holds a fraction of what a hash map allocates.
#[derive(Default)]
struct JoinedRooms(Vec<(Box<str>, JoinedRoom)>);

impl JoinedRooms {
    fn get(&self, name: &str) -> Option<&JoinedRoom> {
        self.0.iter().find(|(n, _)| &**n == name).map(|(_, r)| r)
    }

    fn remove(&mut self, name: &str) -> Option<JoinedRoom> {
        let at = self.0.iter().position(|(n, _)| &**n == name)?;
        let (_, room) = self.0.swap_remove(at);
        self.fit();
        Some(room)
    }

    /// Adds `name` (not joined yet).
    fn insert(&mut self, name: String, room: JoinedRoom) {
        self.0.reserve_exact(1);
        self.0.push((name.into_boxed_str(), room));
    }

    fn retain(&mut self, mut keep: impl FnMut(&JoinedRoom) -> bool) {
        self.0.retain(|(_, room)| keep(room));
        self.fit();
    }

    fn len(&self) -> usize {
        self.0.len()
    }

    /// Empties the list; returns the names.
    fn take_names(&mut self) -> impl Iterator<Item = Box<str>> {
        std::mem::take(&mut self.0)
            .into_iter()
            .map(|(name, _)| name)
    }

    /// Gives back room the list no longer needs.
    fn fit(&mut self) {
        if self.0.capacity() > self.0.len() {
            self.0.shrink_to_fit();
        }
    }
}

/// The state of one session, owned by its reader.
struct Session {
    id: u64,
    identity: Identity,
    /// The `from` of this user's messages, shared by all of them.
    sender: Arc<Sender>,
    outbox: Outbox,
    joined: JoinedRooms,
    limiter: DefaultDirectRateLimiter,
    /// Rate-limit violations in the current window. The session ends once
    /// this passes `limits.rate_strikes` (at most 10,000), so 16 bits hold
    /// it: the session state fits a smaller allocation.
    strikes: u16,
    strike_window_start: Instant,
    /// Frames refused as invalid; the session ends at
    /// `limits.max_invalid_frames` (at most 10,000).
    invalid_frames: u16,
    /// `session_expiring` was sent for the current token.
    expiry_warned: bool,
    /// This user's connection slot and shared message-rate bucket.
    user: UserSlot,
    /// When anything (a pong included) last arrived.
    last_received: Instant,
    /// When a frame other than a ping last arrived.
    last_active: Instant,
    /// When the session began; WebSocket pings are due every
    /// `session.ping_interval_secs` from then.
    started: Instant,
    /// Pings sent so far.
    pings: u32,
    /// Set by the reader when a message came in too many fragments.
    too_fragmented: Arc<AtomicBool>,
    state: Arc<AppState>,
}

/// What a session starts from, gathered before the upgrade completes.
pub struct Start {
    pub identity: Identity,
    pub meta: ConnMeta,
    pub user: UserSlot,
    pub state: Arc<AppState>,
    /// Released when the session ends: the connection's permit and the
    /// client address's slot.
    pub hold: SessionHold,
}

/// What a session keeps only to release it when it ends.
pub struct SessionHold {
    pub connection: Arc<crate::http::ConnHold>,
    pub address: Option<crate::admission::AddressSlot>,
}

/// The task of a session: waits for the upgrade to complete, then runs the
/// session to its end. Never panics on peer data.
///
/// The task lives as long as the connection, so its size is memory every
/// idle connection pays. Built from combinators rather than as an async
/// fn, which would keep its arguments (the upgrade and the start) beside
/// the running session for its whole life: here the waiting and the
/// running state share their space, and the task fits a smaller
/// allocation. The setup is synchronous, and the one long-running future
/// ([`Connection::drive`]) holds each piece of state once, borrowing it in
/// place rather than moving it between futures.
pub fn run(on_upgrade: OnUpgrade, start: Box<Start>) -> impl Future<Output = ()> {
    on_upgrade
        .map(move |upgraded| match upgraded {
            Ok(upgraded) => open(Io::from_upgraded(upgraded), start),
            Err(e) => {
                debug!(event = "upgrade.failed", peer = %start.meta.peer, error = %e);
                None
            }
        })
        .then(OptionFuture::from)
        .map(drop)
}

/// Sets the session up on the upgraded connection; the future that runs it.
fn open(io: Io, start: Box<Start>) -> Option<Instrumented<impl Future<Output = ()>>> {
    let span = tracing::info_span!(
        "session",
        session = tracing::field::Empty,
        peer = %start.meta.peer,
        client = %start.meta.client,
        user = %start.identity.sub
    );
    let Some(connection) = span.in_scope(|| Connection::open(io, *start)) else {
        // Not expected: the WebSocket wrapper is ready at its first poll.
        span.in_scope(|| debug!(event = "upgrade.failed", reason = "websocket_setup"));
        return None;
    };
    span.record("session", connection.session.id);
    Some(Box::new(connection).drive().instrument(span))
}

/// A session with its connection split for the reader and the writer.
struct Connection {
    session: Session,
    stream: Ws,
    writer: tokio::task::JoinHandle<()>,
    _hold: SessionHold,
}

impl Connection {
    /// Splits the connection, starts the writer and queues the welcome.
    fn open(io: Io, start: Start) -> Option<Self> {
        let Start {
            identity,
            meta,
            user,
            state,
            hold,
        } = start;
        let limits = &state.config.limits;
        let (outbox, outbox_rx) =
            outbox::outbox(limits.outbound_queue_messages, limits.outbound_queue_bytes);
        let stream_kind = io.kind();
        let (read, write) = tokio::io::split(io);
        let too_fragmented = Arc::new(AtomicBool::new(false));
        let read = FragmentLimited::new(
            ReplyIo::new(read, outbox.clone()),
            limits.max_fragments_per_message,
            too_fragmented.clone(),
        );
        // Completes at its first poll (there is no handshake to do).
        let stream = WebSocketStream::from_raw_socket(read, Role::Server, Some(state.ws_config))
            .now_or_never()?;
        let timing = WriterTiming::new(&state.config.session, &state.load);
        let writer = tokio::spawn(write_loop(write, outbox_rx, timing));
        let id = state.next_session_id();
        let mut session = Session::new(id, identity, outbox, user, state);
        session.too_fragmented = too_fragmented;
        info!(
            event = "conn.open",
            client_cert = meta.client_subject.as_deref().unwrap_or(""),
            credential = meta.credential_source,
            http = meta.http_version,
            stream = stream_kind,
            "connection open"
        );
        metrics::gauge!("securechat_connections_open").increment(1.0);
        session.welcome();
        Some(Self {
            session,
            stream,
            writer,
            _hold: hold,
        })
    }

    /// Boxed: an async fn keeps its arguments apart from its locals, so a
    /// `Connection` passed by value would be held twice.
    async fn drive(mut self: Box<Self>) {
        let close_timeout =
            Duration::from_millis(self.session.state.config.session.close_timeout_ms);
        let reason = self.session.read_loop(&mut self.stream).await;
        if reason == Disconnect::Normal {
            // The client closed: tungstenite holds the echo of its close
            // frame, which this hands to the writer before the queue closes.
            let _ = self.stream.flush().await;
        }
        let outbox = &self.session.outbox;
        outbox.close(reason);
        // The writer sends what is queued and the close frame within
        // `close_timeout`; the margin only covers scheduling.
        let writer = &mut self.writer;
        if tokio::time::timeout(close_timeout + Duration::from_secs(1), &mut *writer)
            .await
            .is_err()
        {
            writer.abort();
        }
        let reason = outbox.close_reason().unwrap_or(Disconnect::Normal);
        if reason != Disconnect::Normal {
            // The close frame is out (or the socket failed): wait briefly for
            // the client's close reply, then drop the connection.
            let _ = tokio::time::timeout(close_timeout, drain(&mut self.stream)).await;
        }
        self.session.leave_all();
        metrics::gauge!("securechat_connections_open").decrement(1.0);
        metrics::counter!("securechat_close_codes_total", "code" => reason.code().to_string())
            .increment(1);
        info!(
            event = "conn.close",
            reason = reason.reason(),
            code = reason.code(),
            duration_ms = self.session.started.elapsed().as_millis() as u64,
            "connection closed"
        );
    }
}

/// Reads and discards until the peer's close (or an error).
async fn drain(stream: &mut Ws) {
    while let Some(Ok(_)) = stream.next().await {}
}

/// Most queue entries a busy writer keeps room for between batches; a
/// larger buffer (after a burst) is given back.
const SPARE_BATCH: usize = 64;

/// A batch this small means a quiet connection: the buffer a burst made is
/// given back, so an idle connection holds none (one entry is inline).
const QUIET_BATCH: usize = 2;

/// Writes what the outbox holds, everything queued in one batch (after a
/// batch of `coalesce_frames` or more, no sooner than `coalesce` after it
/// began), until a close is requested; then
/// writes what is still queued (unless the client is the slow one) and the
/// close frame, within `close_timeout`.
#[allow(clippy::manual_async_fn)] // see the comment in the body
fn write_loop<W: AsyncWrite + Unpin>(
    mut io: W,
    mut rx: OutboxReceiver,
    timing: WriterTiming,
) -> impl Future<Output = ()> {
    // An async block rather than an async fn: an async fn moves its
    // arguments into locals and keeps both for its whole life; a block uses
    // what it captures in place. Every idle connection holds this future.
    async move {
        // `timing`'s fields are read in place, not moved into locals (which
        // would hold them twice).
        let closer = rx.closer();
        let mut batch = Batch::new();
        let mut written = 0;
        loop {
            if let Some(reason) = rx.close_reason() {
                // Boxed, like the slow path below: run once, kept out of the
                // idle writer's size.
                let finish =
                    tokio::time::timeout(timing.close_timeout(), finish(&mut io, &mut rx, reason));
                let _ = Box::pin(finish).await;
                return;
            }
            let bytes = rx.take(&mut batch, std::mem::take(&mut written));
            if bytes == 0 {
                rx.ready().await;
                continue;
            }
            let count = batch.len();
            // A batch this large means messages queue up faster than they are
            // written: the server or this connection is busy. Writing again
            // at once would mean one small write per message, each costing
            // the kernel about as much as a large one; waiting from when this
            // write begins lets the next write carry many. Only while the
            // node is short of CPU (`load`): with CPU to spare a hold would
            // only add latency. The clock is read only for such a batch.
            let hold_from = (timing.coalesce_ms != 0
                && count >= usize::from(timing.coalesce_frames))
            .then(tokio::time::Instant::now)
            .filter(|&now| timing.load.holds(now));
            let delivered = batch
                .iter()
                .filter(|item| matches!(item, Outgoing::Text(_)))
                .count();
            // Usually the socket takes the batch at once; only a write that
            // has to wait takes the slower path that also watches for a close
            // (boxed: inline, its state would double every idle writer's size).
            let mut sent = 0;
            let first = std::future::poll_fn(|cx| {
                Poll::Ready(transport::poll_write_batch(&mut io, &batch, &mut sent, cx))
            })
            .await;
            let written_ok = match first {
                Poll::Ready(result) => result.is_ok(),
                Poll::Pending => {
                    Box::pin(write_or_abandon(
                        &mut io,
                        &batch,
                        sent,
                        &closer,
                        timing.close_timeout(),
                    ))
                    .await
                }
            };
            if !written_ok {
                return;
            }
            written = bytes;
            // A ping (or pong) alone: nothing else was queued, the
            // connection is quiet. The queue gives back a burst's buffer.
            if count == 1 && matches!(batch[0], Outgoing::Framed(_)) {
                rx.release_spare();
            }
            batch.clear();
            if batch.spilled() && (count <= QUIET_BATCH || batch.capacity() > SPARE_BATCH) {
                batch = Batch::new();
            }
            if delivered > 0 {
                crate::tally::count_written(delivered as u64, bytes as u64);
            }
            if let Some(began) = hold_from {
                // Looked up here, not held by every idle writer: a busy
                // connection gets here at most once per `coalesce`. Boxed for
                // the same reason. The batch just written stops counting
                // against the queue's byte bound now.
                metrics::counter!("securechat_write_holds_total").increment(1);
                let settled = std::mem::take(&mut written);
                let until = began + Duration::from_millis(timing.coalesce_ms.into());
                Box::pin(rx.hold(until, settled)).await;
            }
        }
    }
}

/// The writer's timers, from `[session]`, in the few bytes each writer
/// keeps (the config caps every one of them well within its type).
struct WriterTiming {
    close_timeout_ms: u32,
    /// See `session.write_coalesce_ms`: zero when off.
    coalesce_ms: u16,
    coalesce_frames: u16,
    /// Whether the node is busy enough for holds.
    load: Arc<load::NodeLoad>,
}

impl WriterTiming {
    fn new(session: &crate::config::SessionConfig, load: &Arc<load::NodeLoad>) -> Self {
        Self {
            close_timeout_ms: session.close_timeout_ms.try_into().unwrap_or(u32::MAX),
            coalesce_ms: session.write_coalesce_ms.try_into().unwrap_or(u16::MAX),
            coalesce_frames: session.write_coalesce_frames.try_into().unwrap_or(u16::MAX),
            load: load.clone(),
        }
    }

    fn close_timeout(&self) -> Duration {
        Duration::from_millis(self.close_timeout_ms.into())
    }
}

/// Writes the rest of a batch (its first `sent` bytes are out); `false` if
/// the connection is done for. A close requested meanwhile abandons a write
/// to a slow consumer (its socket is full) and otherwise lets the batch
/// finish within `close_timeout`.
async fn write_or_abandon<W: AsyncWrite + Unpin>(
    io: &mut W,
    batch: &[Outgoing],
    mut sent: usize,
    closer: &outbox::Closer,
    close_timeout: Duration,
) -> bool {
    let write =
        std::future::poll_fn(move |cx| transport::poll_write_batch(io, batch, &mut sent, cx));
    tokio::pin!(write);
    let reason = tokio::select! {
        biased;
        result = &mut write => return result.is_ok(),
        reason = closer.closing() => reason,
    };
    if reason == Disconnect::SlowConsumer {
        return false;
    }
    // Boxed: the timer is only needed on this rare path.
    let rest = Box::pin(tokio::time::timeout(close_timeout, write));
    matches!(rest.await, Ok(Ok(())))
}

/// The end of the writer: what is still queued (not for a slow consumer),
/// then the close frame unless the client closed first (its echo was
/// queued), then the end of the sending side.
async fn finish<W: AsyncWrite + Unpin>(io: &mut W, rx: &mut OutboxReceiver, reason: Disconnect) {
    let mut batch = Batch::new();
    if reason != Disconnect::SlowConsumer {
        rx.take(&mut batch, 0);
    }
    if reason != Disconnect::Normal {
        batch.push(Outgoing::Framed(transport::close_frame(
            reason.code(),
            reason.reason(),
        )));
    }
    if !batch.is_empty() {
        // The peer may already be gone; nothing more to do then.
        if transport::write_batch(io, &batch).await.is_err() {
            return;
        }
    }
    // Ends the sending side: TLS close_notify (or the end of the HTTP/2
    // stream), so the client can tell the end from a cut connection.
    let _ = io.shutdown().await;
}

impl Session {
    fn new(
        id: u64,
        identity: Identity,
        outbox: Outbox,
        user: UserSlot,
        state: Arc<AppState>,
    ) -> Self {
        let limits = &state.config.limits;
        // Validation keeps both at least 1.
        let rate = NonZeroU32::new(limits.rate_per_sec).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(limits.burst).unwrap_or(NonZeroU32::MIN);
        Self {
            id,
            sender: Arc::new(Sender {
                sub: identity.sub.clone(),
                name: identity.name.clone(),
            }),
            identity,
            outbox,
            joined: JoinedRooms::default(),
            limiter: RateLimiter::direct_with_clock(
                Quota::per_second(rate).allow_burst(burst),
                crate::sync::rate_clock(),
            ),
            strikes: 0,
            strike_window_start: Instant::now(),
            invalid_frames: 0,
            expiry_warned: false,
            user,
            last_received: Instant::now(),
            last_active: Instant::now(),
            started: Instant::now(),
            pings: 0,
            too_fragmented: Arc::default(),
            state,
        }
    }

    fn member_handle(&self) -> MemberHandle {
        MemberHandle {
            session_id: self.id,
            sub: Arc::from(self.identity.sub.as_str()),
            outbox: self.outbox.clone(),
        }
    }

    fn welcome(&self) {
        let limits = &self.state.config.limits;
        // Random: says nothing about the server's internal session ids.
        let session = format!("{:016x}", rand::random::<u64>());
        self.outbox.push_text(
            ServerFrame::Welcome {
                session: &session,
                user: WelcomeUser {
                    sub: &self.identity.sub,
                    name: &self.identity.name,
                    roles: &self.identity.roles,
                },
                expires_at: crate::protocol::rfc3339(self.identity.expires_at),
                limits: WelcomeLimits {
                    max_message_bytes: limits.max_message_bytes,
                    rate_per_sec: limits.rate_per_sec,
                    burst: limits.burst,
                },
            }
            .to_json(),
        );
    }

    /// Reads frames until the connection should end, and says why.
    async fn read_loop(&mut self, stream: &mut Ws) -> Disconnect {
        let shutdown = self.state.shutdown.clone();
        let outbox = self.outbox.clone();
        loop {
            if let Some(reason) = self.outbox.close_reason() {
                return reason;
            }
            let timer = self.next_timer();
            tokio::select! {
                reason = outbox.closing() => return reason,
                frame = stream.next() => {
                    // Boxed: frame handling (joins, sends, the broker) is the
                    // largest state of the session, and held inline it would
                    // sit in every idle connection's task.
                    if let Some(reason) = Box::pin(self.on_frame(frame)).await {
                        return reason;
                    }
                }
                () = tokio::time::sleep_until(timer) => {
                    if let Some(reason) = self.on_timer() {
                        return reason;
                    }
                }
                () = shutdown.cancelled() => return Disconnect::ShuttingDown,
            }
        }
    }

    async fn on_frame(
        &mut self,
        frame: Option<Result<Message, tungstenite::Error>>,
    ) -> Option<Disconnect> {
        // Anything counts as a sign of life; only application frames other
        // than `ping` count as activity (see `on_text`).
        if let Some(Ok(_)) = &frame {
            self.last_received = Instant::now();
        }
        match frame {
            None => Some(Disconnect::Normal),
            Some(Ok(Message::Text(text))) => {
                metrics::counter!("securechat_messages_received_total").increment(1);
                metrics::counter!("securechat_bytes_in_total").increment(text.len() as u64);
                self.on_text(&text).await
            }
            Some(Ok(Message::Binary(_))) => {
                count_refusal("binary_frame");
                debug!(event = "frame.refused", reason = "binary_frame");
                Some(Disconnect::PolicyViolation)
            }
            Some(Ok(Message::Close(_))) => Some(Disconnect::Normal),
            Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => None,
            Some(Err(tungstenite::Error::Capacity(_))) => {
                count_refusal("too_large");
                debug!(event = "frame.refused", reason = "too_large");
                Some(Disconnect::TooLarge)
            }
            Some(Err(tungstenite::Error::Io(_))) if self.too_fragmented.load(Ordering::Relaxed) => {
                count_refusal("too_fragmented");
                debug!(event = "frame.refused", reason = "too_fragmented");
                Some(Disconnect::TooLarge)
            }
            // A peer that vanishes (a browser leaving the page, a dropped
            // network) is the end of the session, not a protocol violation.
            Some(Err(
                tungstenite::Error::ConnectionClosed
                | tungstenite::Error::AlreadyClosed
                | tungstenite::Error::Io(_)
                | tungstenite::Error::Protocol(
                    tungstenite::error::ProtocolError::ResetWithoutClosingHandshake,
                ),
            )) => Some(Disconnect::Normal),
            // RFC 6455 section 7.4.1: text that is not UTF-8 is 1007.
            Some(Err(tungstenite::Error::Utf8(_))) => {
                count_refusal("invalid_utf8");
                debug!(event = "frame.refused", reason = "invalid_utf8");
                Some(Disconnect::InvalidPayload)
            }
            // Reserved bits (no extension is negotiated), an unmasked or
            // unknown frame, a fragmented control frame: 1002.
            Some(Err(e)) => {
                count_refusal("protocol_error");
                debug!(event = "frame.refused", reason = "protocol_error", error = %e);
                Some(Disconnect::ProtocolError)
            }
        }
    }

    /// When the next timer is due: a ping, the token's expiry warning or
    /// expiry, the read timeout, or the idle timeout.
    fn next_timer(&self) -> tokio::time::Instant {
        let config = &self.state.config;
        let leeway = config.auth.leeway_secs as i64;
        let warning = config.session.expiry_warning_secs as i64;
        let token_at = if self.expiry_warned {
            self.identity.expires_at + leeway
        } else {
            self.identity.expires_at - warning
        };
        let now = crate::auth::jwt::now_unix();
        let token_wait = Duration::from_secs(token_at.saturating_sub(now).max(0) as u64);
        let token_due = Instant::now() + token_wait.min(Duration::from_secs(86_400));
        let read_due = self.last_received + Duration::from_secs(config.session.read_timeout_secs);
        let idle_due = self.last_active + Duration::from_secs(config.session.idle_timeout_secs);
        let ping_due = self.next_ping();
        tokio::time::Instant::from_std(token_due.min(read_due).min(idle_due).min(ping_due))
    }

    /// When the next ping is due.
    fn next_ping(&self) -> Instant {
        let every = Duration::from_secs(self.state.config.session.ping_interval_secs);
        self.started + every.saturating_mul(self.pings.saturating_add(1))
    }

    fn on_timer(&mut self) -> Option<Disconnect> {
        let now = Instant::now();
        if self.next_ping() <= now {
            // Queued like any frame: a client that is sent something all
            // the time still gets its pings. Missed ones (a stalled task)
            // are not made up for.
            self.outbox.push_framed(transport::ping_frame());
            let every = self.state.config.session.ping_interval_secs.max(1);
            let due = now.duration_since(self.started).as_secs() / every;
            self.pings = u32::try_from(due).unwrap_or(u32::MAX);
        }
        let session = &self.state.config.session;
        if self.last_received.elapsed() >= Duration::from_secs(session.read_timeout_secs) {
            info!(
                event = "session.timeout",
                reason = "no_answer",
                "client stopped answering"
            );
            return Some(Disconnect::IdleTimeout);
        }
        if self.last_active.elapsed() >= Duration::from_secs(session.idle_timeout_secs) {
            info!(
                event = "session.timeout",
                reason = "idle",
                "session idle too long"
            );
            return Some(Disconnect::IdleTimeout);
        }
        let now = crate::auth::jwt::now_unix();
        let leeway = self.state.config.auth.leeway_secs as i64;
        if now >= self.identity.expires_at + leeway {
            info!(
                event = "session.expired",
                "token expired on an open session"
            );
            return Some(Disconnect::Expired);
        }
        let warning = session.expiry_warning_secs as i64;
        if !self.expiry_warned && now >= self.identity.expires_at - warning {
            self.expiry_warned = true;
            self.outbox.push_text(
                ServerFrame::SessionExpiring {
                    expires_at: crate::protocol::rfc3339(self.identity.expires_at),
                }
                .to_json(),
            );
        }
        None
    }

    /// Leaves every joined room (the session is ending).
    fn leave_all(&mut self) {
        for room in self.joined.take_names() {
            self.state.hub.leave(&room, self.id);
        }
    }
}

/// Counts a refused frame by reason.
fn count_refusal(reason: &'static str) {
    metrics::counter!("securechat_messages_refused_total", "reason" => reason).increment(1);
}
