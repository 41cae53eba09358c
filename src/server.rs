//! The accept loop: connection cap, TLS, HTTP (1.1 and 2), the handshake
//! deadline, and graceful shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::http::{self, ConnHold, ConnInfo};
use crate::prefixed::{self, Version};
use crate::refusal::Refusal;
use crate::reload::Reloader;
use crate::state::AppState;
use crate::tls_stream;

/// Connections over the cap that still get a proper 503 answer at once; past
/// this many, further ones are closed without an answer.
const MAX_REFUSALS_IN_FLIGHT: usize = 64;
/// How long an over-capacity refusal may take.
const REFUSAL_DEADLINE: Duration = Duration::from_secs(3);

/// A bound listener with everything needed to serve.
pub struct Server {
    listener: TcpListener,
    /// The `/metrics` listener, when enabled.
    metrics: Option<TcpListener>,
    state: Arc<AppState>,
    /// The TLS configuration in service (swapped by a reload of the client CA).
    tls: Option<Arc<crate::tls::ServingConfig>>,
    /// One permit per open connection, up to `limits.max_connections`.
    connections: Arc<Semaphore>,
    /// Permits for answering connections over the cap.
    refusals: Arc<Semaphore>,
    /// Certificate and key rotation.
    reloader: Arc<Reloader>,
}

impl Server {
    pub fn new(
        listener: TcpListener,
        metrics: Option<TcpListener>,
        state: Arc<AppState>,
        tls: Option<Arc<crate::tls::ServingConfig>>,
        reloader: Arc<Reloader>,
    ) -> Self {
        let max = state.config.limits.max_connections;
        Self {
            listener,
            metrics,
            tls,
            connections: Arc::new(Semaphore::new(max)),
            refusals: Arc::new(Semaphore::new(MAX_REFUSALS_IN_FLIGHT)),
            reloader,
            state,
        }
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The address `/metrics` is served on, when enabled.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// Reloads certificates and keys (for SIGHUP).
    pub fn reloader(&self) -> Arc<Reloader> {
        self.reloader.clone()
    }

    /// The shared state, for tests and embedding.
    pub fn state(&self) -> Arc<AppState> {
        self.state.clone()
    }

    /// Serves until `shutdown` completes, then drains: `/readyz` turns 503,
    /// every session is closed with 1001, and the tasks get
    /// `server.shutdown_grace_ms` to finish.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        crate::metrics::record_static(&self.state);
        let _watch = self.reloader.watch();
        if let (Some(listener), Some(handle)) = (self.metrics.take(), crate::metrics::install()) {
            let state = self.state.clone();
            self.state
                .tasks
                .spawn(crate::metrics::serve(listener, state, handle));
        }
        let mut backoff = Duration::from_millis(10);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                accepted = self.listener.accept() => match accepted {
                    Ok((tcp, peer)) => {
                        backoff = Duration::from_millis(10);
                        self.accept(tcp, peer);
                    }
                    Err(e) => {
                        // Out of descriptors or a transient error: back off
                        // instead of spinning, keep serving the open sessions.
                        warn!(event = "accept.failed", error = %e, backoff_ms = backoff.as_millis() as u64);
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(1));
                    }
                },
            }
        }
        self.drain().await;
    }

    /// Stops new upgrades (503 `shutting_down`, `/readyz` 503), closes every
    /// session with 1001 and waits for the tasks, at most
    /// `server.shutdown_grace_ms`. The listener keeps answering meanwhile, so
    /// load balancers see the node go unready instead of refusing connections.
    async fn drain(self) {
        let state = &self.state;
        info!(event = "server.draining", "shutting down: closing sessions");
        state.draining.store(true, Ordering::Release);
        state.shutdown.cancel();
        state.tasks.close();
        let wait = tokio::time::timeout(state.config.shutdown_grace(), state.tasks.wait());
        tokio::pin!(wait);
        let finished = loop {
            tokio::select! {
                result = &mut wait => break result.is_ok(),
                accepted = self.listener.accept() => {
                    if let Ok((tcp, peer)) = accepted {
                        self.accept(tcp, peer);
                    }
                }
            }
        };
        drop(self.listener);
        if !finished {
            warn!(
                event = "server.drain_timeout",
                open_tasks = state.tasks.len(),
                "tasks still open after the shutdown grace period; stopping anyway"
            );
        }
        info!(event = "server.stopped", "server stopped");
    }
}

/// Socket options for an accepted client connection: no Nagle delay, and
/// a bounded kernel send buffer (`limits.socket_send_buffer_bytes`), so a
/// client that stops reading holds at most that much of the machine's
/// memory in the kernel besides its outbound queue. Failures are not fatal:
/// the connection works with the kernel's defaults.
fn tune_socket(tcp: &TcpStream, limits: &crate::config::LimitsConfig) {
    let _ = tcp.set_nodelay(true);
    if limits.socket_send_buffer_bytes != 0
        && let Err(e) =
            socket2::SockRef::from(tcp).set_send_buffer_size(limits.socket_send_buffer_bytes)
    {
        tracing::debug!(event = "socket.send_buffer", error = %e, "cannot set SO_SNDBUF");
    }
}

impl Server {
    fn accept(&self, tcp: TcpStream, peer: SocketAddr) {
        tune_socket(&tcp, &self.state.config.limits);
        let Ok(permit) = self.connections.clone().try_acquire_owned() else {
            count_refusal(peer, Refusal::OverCapacity, "accept");
            // Over the cap, only a bounded number of refusals get an answer.
            let Ok(slot) = self.refusals.clone().try_acquire_owned() else {
                return;
            };
            let tls = self.tls.as_ref().map(|tls| tls.load_full());
            self.state.tasks.spawn(async move {
                let _slot = slot;
                refuse_connection(tcp, tls, Refusal::OverCapacity).await;
            });
            return;
        };
        let state = self.state.clone();
        self.state.tasks.spawn(connection(
            tcp,
            peer,
            state,
            self.tls.as_ref().map(|tls| tls.load_full()),
            permit,
        ));
    }
}

fn count_refusal(peer: SocketAddr, refusal: Refusal, stage: &'static str) {
    metrics::counter!("securechat_handshakes_total", "outcome" => "refused", "reason" => refusal.code())
        .increment(1);
    debug!(event = "handshake.refused", peer = %peer, reason = refusal.code(), stage);
}

/// One connection: the PROXY header (from trusted proxies, when enabled),
/// admission of the client's address, TLS, HTTP; all within the handshake
/// deadline.
async fn connection(
    mut tcp: TcpStream,
    peer: SocketAddr,
    state: Arc<AppState>,
    tls: Option<Arc<rustls::ServerConfig>>,
    permit: OwnedSemaphorePermit,
) {
    let deadline = Instant::now() + state.config.handshake_timeout();
    let Some(client) = proxied_client(&mut tcp, peer, &state, deadline).await else {
        return;
    };
    // A direct client is admitted by its address now; one whose requests come
    // through an HTTP proxy once a request names it (see `http::upgrade`).
    let address = if state.is_trusted_proxy(client.ip()) {
        None
    } else {
        match state.addresses.admit(client.ip()) {
            Ok(slot) => Some(slot),
            Err(refusal) => {
                count_refusal(client, refusal, "accept");
                return refuse_connection(tcp, tls, refusal).await;
            }
        }
    };
    let hold = ConnHold::new(permit, address);
    serve_connection(tcp, client, state, tls, hold, deadline).await
}

/// The client's address: the peer, or what a trusted proxy's PROXY header
/// says. `None` when a trusted proxy fails to send a valid header in time.
async fn proxied_client(
    tcp: &mut TcpStream,
    peer: SocketAddr,
    state: &AppState,
    deadline: Instant,
) -> Option<SocketAddr> {
    if !(state.config.server.proxy_protocol && state.is_trusted_proxy(peer.ip())) {
        return Some(peer);
    }
    match tokio::time::timeout_at(deadline, crate::proxy::read_header(tcp)).await {
        Ok(Ok(client)) => Some(client.unwrap_or(peer)),
        Ok(Err(e)) => {
            metrics::counter!("securechat_handshakes_total", "outcome" => "refused", "reason" => "proxy_protocol")
                .increment(1);
            warn!(event = "handshake.refused", peer = %peer, reason = "proxy_protocol", error = %e);
            None
        }
        Err(_) => {
            metrics::counter!("securechat_handshakes_total", "outcome" => "refused", "reason" => "timeout")
                .increment(1);
            debug!(event = "handshake.refused", peer = %peer, reason = "timeout", stage = "proxy_protocol");
            None
        }
    }
}

/// TLS (when on) then HTTP, within the handshake deadline.
async fn serve_connection(
    tcp: TcpStream,
    peer: SocketAddr,
    state: Arc<AppState>,
    tls: Option<Arc<rustls::ServerConfig>>,
    hold: ConnHold,
    deadline: Instant,
) {
    let Some(tls) = tls else {
        return serve_http(tcp, peer, None, state, hold, deadline).await;
    };
    match tokio::time::timeout_at(deadline, tls_stream::accept(tls, tcp)).await {
        Ok(Ok(accepted)) => {
            let subject = accepted.client_subject;
            serve_http(accepted.stream, peer, subject, state, hold, deadline).await
        }
        Ok(Err(e)) => {
            metrics::counter!("securechat_handshakes_total", "outcome" => "refused", "reason" => "tls")
                .increment(1);
            if is_certificate_error(&e) {
                state
                    .addresses
                    .record_failure(peer.ip(), "client_certificate");
            }
            debug!(event = "handshake.refused", peer = %peer, reason = "tls", error = %e);
        }
        Err(_) => {
            metrics::counter!("securechat_handshakes_total", "outcome" => "refused", "reason" => "timeout")
                .increment(1);
            debug!(event = "handshake.refused", peer = %peer, reason = "timeout", stage = "tls");
        }
    }
}

fn http1_builder(state: &AppState, remaining: Duration) -> http1::Builder {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        // While draining, answer one request per connection and close.
        .keep_alive(!state.is_draining())
        .header_read_timeout(remaining)
        .max_buf_size(16 * 1024)
        .max_headers(64);
    builder
}

fn http2_builder(state: &AppState) -> http2::Builder<TokioExecutor> {
    let mut builder = http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .enable_connect_protocol()
        .max_concurrent_streams(state.config.limits.h2_max_streams)
        .max_header_list_size(16 * 1024)
        .keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(20));
    builder
}

fn count_http_timeout(peer: SocketAddr) {
    metrics::counter!("securechat_handshakes_total", "outcome" => "refused", "reason" => "timeout")
        .increment(1);
    debug!(event = "handshake.refused", peer = %peer, reason = "timeout", stage = "http");
}

/// HTTP/1.1 or HTTP/2 (told apart by the preface, whatever ALPN said, as
/// clients with prior knowledge skip it), until the connection ends or, short
/// of an upgrade, the handshake deadline passes.
async fn serve_http<IO>(
    io: IO,
    peer: SocketAddr,
    client_subject: Option<String>,
    state: Arc<AppState>,
    hold: ConnHold,
    deadline: Instant,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let info = Arc::new(ConnInfo {
        peer,
        client_subject,
        upgraded: AtomicBool::new(false),
        hold: Arc::new(hold),
        upgrades: AtomicU32::new(0),
    });
    let service = {
        let state = state.clone();
        let info = info.clone();
        service_fn(move |req| http::handle(req, state.clone(), info.clone()))
    };
    // A connection accepted while draining gets its one answer (`/readyz`
    // 503, an upgrade refused with `shutting_down`) instead of being cut off;
    // one that has sent nothing yet when draining begins is closed.
    let shutting_down = state.shutdown.is_cancelled();
    let read = tokio::time::timeout_at(deadline, prefixed::read_version(io));
    let read = tokio::select! {
        read = read => read,
        () = state.shutdown.cancelled(), if !shutting_down => return,
    };
    let (version, io) = match read {
        Ok(Ok(read)) => read,
        // The peer reset or broke TLS before a request: nothing to answer.
        Ok(Err(_)) => return,
        Err(_) => return count_http_timeout(peer),
    };
    let io = TokioIo::new(io);
    let watch = Watch {
        state: &state,
        info: &info,
        peer,
        deadline,
        shutting_down,
    };
    // This task lives until the upgrade, and its size is allocated and
    // copied for every handshake. So each connection is pinned here and lent
    // to `run` (passed by value it would be held twice: an async fn keeps
    // its arguments apart from its locals), the builders are dropped before
    // it runs, and the HTTP/2 connection, the larger and rarer one, is boxed.
    match version {
        Version::Http1 => {
            let remaining = deadline.saturating_duration_since(Instant::now());
            let conn = pin!(
                http1_builder(&state, remaining.max(Duration::from_millis(1)))
                    .serve_connection(io, service)
                    .with_upgrades()
            );
            watch.run(conn, |conn| conn.graceful_shutdown()).await;
        }
        Version::Http2 => {
            let mut conn = Box::pin(http2_builder(&state).serve_connection(io, service));
            watch
                .run(conn.as_mut(), |conn| conn.graceful_shutdown())
                .await;
        }
    }
}

/// What an HTTP connection is watched for while it runs.
struct Watch<'a> {
    state: &'a AppState,
    info: &'a ConnInfo,
    peer: SocketAddr,
    deadline: Instant,
    shutting_down: bool,
}

impl Watch<'_> {
    /// Runs `conn` to its end: at the handshake deadline, unless a session
    /// was upgraded from it, it is dropped; when a shutdown begins, it is
    /// asked to finish gracefully (`graceful`).
    async fn run<C: Future>(mut self, mut conn: Pin<&mut C>, graceful: fn(Pin<&mut C>)) {
        let mut deadline_passed = false;
        loop {
            tokio::select! {
                _ = conn.as_mut() => break,
                () = tokio::time::sleep_until(self.deadline), if !deadline_passed => {
                    deadline_passed = true;
                    if !self.info.upgraded.load(Ordering::Acquire) {
                        count_http_timeout(self.peer);
                        break;
                    }
                }
                () = self.state.shutdown.cancelled(), if !self.shutting_down => {
                    self.shutting_down = true;
                    graceful(conn.as_mut());
                }
            }
        }
    }
}

/// Whether a failed TLS handshake was about the client's certificate
/// (missing where required, or not trusted).
fn is_certificate_error(e: &std::io::Error) -> bool {
    matches!(
        e.get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>()),
        Some(rustls::Error::NoCertificatesPresented | rustls::Error::InvalidCertificate(_))
    )
}

/// Answers every request on a connection refused at accept, within
/// [`REFUSAL_DEADLINE`].
async fn refuse_connection(
    tcp: TcpStream,
    tls: Option<Arc<rustls::ServerConfig>>,
    refusal: Refusal,
) {
    let _ = tokio::time::timeout(REFUSAL_DEADLINE, answer_refusal(tcp, tls, refusal)).await;
}

async fn answer_refusal(tcp: TcpStream, tls: Option<Arc<rustls::ServerConfig>>, refusal: Refusal) {
    let over_tls = tls.is_some();
    let service = service_fn(move |_req| async move {
        let mut response = refusal.response();
        if over_tls {
            crate::refusal::strict_transport(&mut response);
        }
        Ok::<_, std::convert::Infallible>(response)
    });
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().keep_alive(false);
    match tls {
        Some(tls) => {
            if let Ok(accepted) = tls_stream::accept(tls, tcp).await {
                let _ = builder
                    .serve_connection(TokioIo::new(accepted.stream), service)
                    .await;
            }
        }
        None => {
            let _ = builder.serve_connection(TokioIo::new(tcp), service).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The send buffer the kernel reports for `n` requested: Linux doubles
    /// the request (for its bookkeeping) after capping it at
    /// `net.core.wmem_max`.
    fn reported(n: usize) -> usize {
        let max: usize = std::fs::read_to_string("/proc/sys/net/core/wmem_max")
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(usize::MAX);
        2 * n.min(max)
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn accepted_sockets_get_the_configured_send_buffer() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        for n in [16 * 1024, 64 * 1024] {
            let _client = TcpStream::connect(address).await.unwrap();
            let (tcp, _) = listener.accept().await.unwrap();
            let limits = crate::config::LimitsConfig {
                socket_send_buffer_bytes: n,
                ..Default::default()
            };
            tune_socket(&tcp, &limits);
            let size = socket2::SockRef::from(&tcp).send_buffer_size().unwrap();
            assert_eq!(size, reported(n), "requested {n}");
            assert!(tcp.nodelay().unwrap());
        }
        // 0 leaves the kernel's default alone.
        let _client = TcpStream::connect(address).await.unwrap();
        let (tcp, _) = listener.accept().await.unwrap();
        let before = socket2::SockRef::from(&tcp).send_buffer_size().unwrap();
        let limits = crate::config::LimitsConfig {
            socket_send_buffer_bytes: 0,
            ..Default::default()
        };
        tune_socket(&tcp, &limits);
        assert_eq!(
            socket2::SockRef::from(&tcp).send_buffer_size().unwrap(),
            before
        );
    }
}
