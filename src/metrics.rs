//! Prometheus metrics: the process-wide recorder, the description of every
//! metric, and the `/metrics` listener, which runs on its own address
//! (loopback by default), never on the public port.
//!
//! The code records with the `metrics` macros wherever things happen;
//! gauges that describe the state of the node (rooms, members, bans) and
//! the counters of writes to clients (kept per thread, see
//! [`crate::tally`]) are set when a scrape arrives.

use std::convert::Infallible;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tracing::{debug, warn};

use crate::state::AppState;

/// Buckets for the fan-out latency histogram, in seconds.
const FANOUT_BUCKETS: [f64; 14] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0,
];

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the Prometheus recorder once per process and returns its handle;
/// `None` if another recorder was installed first (an embedding program's).
pub fn install() -> Option<&'static PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Full("securechat_fanout_seconds".into()),
                    &FANOUT_BUCKETS,
                )
                .ok()?;
            let handle = builder.install_recorder().ok()?;
            describe();
            Some(handle)
        })
        .as_ref()
}

fn describe() {
    describe_gauge!("securechat_connections_open", "Open WebSocket sessions.");
    describe_gauge!(
        "securechat_connections_max",
        "The node's connection cap (limits.max_connections)."
    );
    describe_counter!(
        "securechat_handshakes_total",
        "Handshakes by outcome (accepted, refused) and refusal reason."
    );
    describe_counter!(
        "securechat_auth_failures_total",
        "Refused credentials by reason (invalid_token, token_expired, missing_token)."
    );
    describe_counter!(
        "securechat_messages_received_total",
        "Text frames received from clients."
    );
    describe_counter!(
        "securechat_messages_delivered_total",
        "Frames written to clients."
    );
    describe_counter!(
        "securechat_messages_refused_total",
        "Client frames refused, by reason (error code or close reason)."
    );
    describe_counter!(
        "securechat_bytes_in_total",
        Unit::Bytes,
        "Bytes of text frames received."
    );
    describe_counter!(
        "securechat_bytes_out_total",
        Unit::Bytes,
        "Bytes of frames written."
    );
    describe_counter!(
        "securechat_write_holds_total",
        "Writes to busy connections held back to coalesce the next ones (session.write_coalesce_ms)."
    );
    describe_gauge!(
        "securechat_write_coalescing",
        "1 while the node is busy enough for writes to busy connections to be held back (session.write_coalesce_busy_percent), else 0."
    );
    describe_counter!(
        "securechat_rate_limited_total",
        "Frames refused for exceeding a message rate."
    );
    describe_counter!(
        "securechat_slow_consumer_closes_total",
        "Sessions closed with 4009 because their outbound queue was full."
    );
    describe_counter!(
        "securechat_close_codes_total",
        "Sessions ended, by the close code the server sent."
    );
    describe_gauge!("securechat_bans_active", "Addresses banned right now.");
    describe_counter!("securechat_bans_total", "Bans imposed.");
    describe_gauge!("securechat_rooms", "Rooms with members on this node.");
    describe_gauge!("securechat_room_members", "Room memberships on this node.");
    describe_histogram!(
        "securechat_fanout_seconds",
        Unit::Seconds,
        "From a message accepted into its room to queued for its last recipient on this node."
    );
    describe_gauge!(
        "securechat_certificate_expiry_timestamp_seconds",
        Unit::Seconds,
        "When the serving certificate expires (Unix time)."
    );
    describe_counter!(
        "securechat_tls_reloads_total",
        "Certificate and key reloads, by result (ok, error)."
    );
    describe_counter!(
        "securechat_bus_rejected_total",
        "Messages between nodes dropped because they failed their signature check, by reason."
    );
    describe_gauge!("securechat_build_info", "Build information; always 1.");
}

/// Records the facts that do not change while the process runs.
pub fn record_static(state: &AppState) {
    metrics::gauge!("securechat_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    metrics::gauge!("securechat_connections_max").set(state.config.limits.max_connections as f64);
}

/// Sets the gauges that are read off the node's state.
fn sample(state: &AppState) {
    metrics::gauge!("securechat_rooms").set(state.hub.room_count() as f64);
    metrics::gauge!("securechat_room_members").set(state.hub.member_count() as f64);
    metrics::gauge!("securechat_bans_active").set(state.addresses.active_bans() as f64);
    // A scrape samples the load too: with no busy connection left to ask,
    // the gauge would keep showing the last busy spell.
    let engaged = state.load.holds(tokio::time::Instant::now());
    metrics::gauge!("securechat_write_coalescing").set(if engaged { 1.0 } else { 0.0 });
    // Counted per thread on the write path (see `tally`), summed here.
    let written = crate::tally::totals();
    metrics::counter!("securechat_messages_delivered_total").absolute(written.delivered);
    metrics::counter!("securechat_bytes_out_total").absolute(written.bytes);
}

/// Serves `/metrics` on `listener` until the node shuts down.
pub async fn serve(listener: TcpListener, state: Arc<AppState>, handle: &'static PrometheusHandle) {
    let shutdown = state.shutdown.clone();
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let (tcp, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                warn!(event = "metrics.accept_failed", error = %e);
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let state = state.clone();
        let service = service_fn(move |req| scrape(req, state.clone(), handle));
        tokio::spawn(async move {
            let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            builder.http1().keep_alive(false);
            let serve = builder.serve_connection(TokioIo::new(tcp), service);
            if tokio::time::timeout(std::time::Duration::from_secs(10), serve)
                .await
                .is_err()
            {
                debug!(event = "metrics.timeout", peer = %peer);
            }
        });
    }
}

async fn scrape(
    req: Request<Incoming>,
    state: Arc<AppState>,
    handle: &'static PrometheusHandle,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if req.uri().path() != "/metrics" {
        let mut response = Response::new(Full::new(Bytes::from_static(b"not found\n")));
        *response.status_mut() = StatusCode::NOT_FOUND;
        return Ok(response);
    }
    sample(&state);
    handle.run_upkeep();
    let mut response = Response::new(Full::new(Bytes::from(handle.render())));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    Ok(response)
}
