//! `idle`: open N TLS WebSocket connections (securechat: each joins the
//! room, as each Bun socket subscribes), hold them while the server's pings
//! run, and report the server's resident memory per connection.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;

use super::Endings;
use crate::procfs::{Meters, Proc};
use crate::target::{Target, TargetArgs, Ws, close_code};

#[derive(clap::Args, Clone, Debug)]
// Named: every scenario's struct is `Args`, and `slow` holds `fanout`'s.
#[group(id = "idle")]
pub struct Args {
    #[command(flatten)]
    pub target: TargetArgs,
    /// Connections to open.
    #[arg(long, default_value_t = 10_000)]
    pub connections: usize,
    /// Seconds to wait after the last connection before measuring.
    #[arg(long, default_value_t = 3.0)]
    pub settle: f64,
    /// Seconds to hold the connections after measuring (pings run meanwhile);
    /// memory is measured again at the end.
    #[arg(long, default_value_t = 10.0)]
    pub hold: f64,
}

pub async fn run(mut args: Args) -> Result<Value, String> {
    // Idle sockets need little buffer on the client side either.
    args.target.read_buffer = args.target.read_buffer.min(4096);
    let target = Target::new(&args.target, args.connections)?;
    let server = target
        .server
        .clone()
        .ok_or("idle needs --server-pid to read the server's memory")?;
    let baseline = super::memory_json(&server);
    let base_rss = server.rss().unwrap_or(0);

    let endings = Arc::new(Endings::default());
    let (stop, _) = watch::channel(false);
    let stop = Arc::new(stop);
    let bar = super::bar(args.connections as u64, "idle");
    bar.set_message("connecting");
    let (e, s) = (endings.clone(), stop.clone());
    let connected = super::connect_members(
        &target,
        0..args.connections,
        args.target.connect_concurrency,
        &bar,
        |target, index| async move { target.connect_member(index, super::CONNECT_TIMEOUT).await },
        move |_, ws| hold(ws, e.clone(), s.subscribe()),
    )
    .await;
    let alive = |endings: &Endings| connected.ok - endings.ended.load(Ordering::Relaxed);

    let e = endings.clone();
    let ok = connected.ok;
    super::timed(&bar, args.settle, move || {
        format!("settling, {} open", ok - e.ended.load(Ordering::Relaxed))
    })
    .await;
    let settled = super::memory_json(&server);
    let settled_rss = server.rss().unwrap_or(0);
    let settled_alive = alive(&endings);

    let meters = Meters::start(&server);
    let e = endings.clone();
    super::timed(&bar, args.hold, move || {
        format!("holding, {} open", ok - e.ended.load(Ordering::Relaxed))
    })
    .await;
    let (hold_cpu, _, other_cpu, hold_secs) = meters.read();
    let held = super::memory_json(&server);
    let held_rss = server.rss().unwrap_or(0);
    let held_alive = alive(&endings);
    let _ = stop.send(true);
    bar.finish_and_clear();

    let per = |rss: u64, n: u64| {
        if n == 0 {
            0.0
        } else {
            rss.saturating_sub(base_rss) as f64 / n as f64
        }
    };
    let per_conn = per(held_rss, held_alive);
    let mut m = super::head("idle", &target);
    m.insert("variant".into(), json!(args.connections.to_string()));
    m.insert(
        "params".into(),
        json!({ "connections": args.connections, "settle": args.settle, "hold": args.hold }),
    );
    m.insert("connect".into(), connected.json());
    m.insert("baseline".into(), baseline);
    m.insert("settled".into(), settled);
    m.insert("held".into(), held);
    m.insert(
        "open".into(),
        json!({ "settled": settled_alive, "held": held_alive }),
    );
    m.insert(
        "bytes_per_conn".into(),
        json!({
            "settled": per(settled_rss, settled_alive),
            "held": per_conn,
        }),
    );
    m.insert(
        "million_projection_gib".into(),
        json!(per_conn * 1e6 / (1u64 << 30) as f64),
    );
    m.insert(
        "hold_cpu".into(),
        json!({
            "secs": hold_cpu,
            "utilisation": hold_cpu / hold_secs,
            "us_per_conn_per_sec": if held_alive == 0 { 0.0 } else { hold_cpu * 1e6 / hold_secs / held_alive as f64 },
        }),
    );
    m.insert("other_cores".into(), json!(other_cpu / hold_secs));
    m.insert("endings".into(), endings.json());
    m.insert("load_rss".into(), json!(Proc::me().rss().unwrap_or(0)));
    Ok(Value::Object(m))
}

/// Holds one connection: reads (so pings are answered) until told to stop.
async fn hold(mut ws: Ws, endings: Arc<Endings>, mut stop: watch::Receiver<bool>) {
    if *stop.borrow_and_update() {
        return;
    }
    // The flag only ever goes from false to true: a change is the stop.
    let stopped = stop.changed();
    tokio::pin!(stopped);
    loop {
        tokio::select! {
            _ = &mut stopped => return,
            frame = ws.next() => match frame {
                Some(Ok(message @ Message::Close(_))) => {
                    endings.record(close_code(&message));
                    return;
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => {
                    endings.record(None);
                    return;
                }
            },
        }
    }
}
