//! The `securechat` command: serve, mint tokens, make dev certificates, check
//! a configuration.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use securechat::auth::jwt::{MintClaims, Minter, now_unix};
use securechat::config::{Config, KeyAlgorithm, KeyConfig};

/// mimalloc: glibc malloc and free take about 7 % of a handshake's CPU;
/// with mimalloc handshakes cost less and idle connections hold slightly
/// less memory (docs/benchmarks.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

// mimalloc's own API, linked in with the allocator (the bindings of
// `libmimalloc-sys` lack the option used here).
unsafe extern "C" {
    fn mi_option_set(option: std::ffi::c_int, value: std::ffi::c_long);
}

/// `mi_option_purge_delay` in mimalloc.h (the same in mimalloc v2 and v3).
const MI_OPTION_PURGE_DELAY: std::ffi::c_int = 15;

/// Memory mimalloc frees is given back to the system at once rather than
/// after 10 ms of further activity: a burst of handshakes leaves pages
/// that a server going quiet afterwards would otherwise keep resident
/// (about 0.45 KiB per idle connection at 10,000, docs/benchmarks.md; no
/// CPU cost measurable in handshakes or fan-out). An operator's
/// `MIMALLOC_PURGE_DELAY` takes precedence.
fn purge_freed_memory_at_once() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: sets a documented runtime option of the linked mimalloc;
        // no memory is passed.
        unsafe { mi_option_set(MI_OPTION_PURGE_DELAY, 0) };
    }
}

#[derive(Parser)]
#[command(name = "securechat", version, about = "A secure real-time chat server")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server.
    Serve(ServeArgs),
    /// Mint a token with a configured key (for operators and tests).
    Token(TokenArgs),
    /// Write a development CA, a server certificate and a client certificate.
    GenCert(GenCertArgs),
    /// Validate a configuration, load its keys and certificates, report expiry.
    Check(CheckArgs),
}

#[derive(Args)]
struct ServeArgs {
    /// The configuration file.
    #[arg(long, short, conflicts_with = "dev", required_unless_present = "dev")]
    config: Option<PathBuf>,
    /// Zero set-up: in-memory certificate, random secret, room `general`, loopback only.
    #[arg(long)]
    dev: bool,
    /// With --dev: the loopback address to listen on.
    #[arg(long, requires = "dev", default_value = "127.0.0.1:8443")]
    listen: SocketAddr,
}

#[derive(Args)]
struct TokenArgs {
    /// The configuration whose key signs the token.
    #[arg(
        long,
        short,
        default_value = "config/securechat.toml",
        conflicts_with = "secret_file"
    )]
    config: PathBuf,
    /// Sign with the HS256 secret in this file instead (as `serve --dev` prints).
    #[arg(long)]
    secret_file: Option<PathBuf>,
    /// The key to sign with (default: the first configured key).
    #[arg(long)]
    kid: Option<String>,
    /// User id.
    #[arg(long)]
    sub: String,
    /// Display name.
    #[arg(long)]
    name: Option<String>,
    /// A role (repeat for several).
    #[arg(long = "role")]
    roles: Vec<String>,
    /// Limit the token to a room or `prefix-*` pattern (repeat for several).
    #[arg(long = "room")]
    rooms: Vec<String>,
    /// Mark the token as multi-factor (`amr: ["mfa"]`).
    #[arg(long)]
    mfa: bool,
    /// Lifetime, such as 90s, 30m, 1h or 7d.
    #[arg(long, default_value = "1h", value_parser = parse_ttl)]
    ttl: Duration,
}

#[derive(Args)]
struct GenCertArgs {
    /// Host names and IP addresses for the server certificate, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "localhost,127.0.0.1")]
    hosts: Vec<String>,
    /// Output folder.
    #[arg(long, default_value = "certs")]
    out: PathBuf,
    /// Replace existing files.
    #[arg(long)]
    force: bool,
}

#[derive(Args)]
struct CheckArgs {
    /// The configuration file.
    #[arg(long, short, default_value = "config/securechat.toml")]
    config: PathBuf,
}

fn parse_ttl(text: &str) -> Result<Duration, String> {
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?}: expected a number and a unit, such as 30m or 1h"))?;
    let secs = match unit {
        "s" | "" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86_400,
        _ => return Err(format!("{text:?}: the unit is one of s, m, h, d")),
    };
    if secs == 0 || secs > 366 * 86_400 {
        return Err(format!("{text:?}: must be between 1s and 366d"));
    }
    Ok(Duration::from_secs(secs))
}

fn main() -> ExitCode {
    purge_freed_memory_at_once();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => serve(args),
        Command::Token(args) => token(args),
        Command::GenCert(args) => gen_cert(args),
        Command::Check(args) => check(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("securechat: {message}");
            ExitCode::FAILURE
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))
}

/// Completes on SIGTERM or SIGINT.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

/// Reloads certificates and keys on every SIGHUP.
fn reload_on_sighup(reloader: std::sync::Arc<securechat::reload::Reloader>) {
    #[cfg(unix)]
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let Ok(mut hangup) = signal(SignalKind::hangup()) else {
            tracing::warn!(event = "reload.no_sighup", "cannot listen for SIGHUP");
            return;
        };
        while hangup.recv().await.is_some() {
            tracing::info!(event = "reload.requested", source = "SIGHUP");
            reloader.reload();
        }
    });
    #[cfg(not(unix))]
    let _ = reloader;
}

fn serve(args: ServeArgs) -> Result<(), String> {
    let rt = runtime()?;
    if args.dev {
        return rt.block_on(serve_dev(args.listen));
    }
    let path = args.config.ok_or("--config FILE or --dev is required")?;
    let config = Config::load(&path).map_err(|e| e.to_string())?;
    securechat::telemetry::init(&config.log)?;
    let prepared = securechat::Prepared::load(config).map_err(|e| e.to_string())?;
    if let Some(tls) = &prepared.tls {
        tracing::info!(
            event = "tls.loaded",
            subject = %tls.leaf.subject,
            serial = %tls.leaf.serial,
            days_left = tls.leaf.days_left(),
        );
    }
    rt.block_on(async {
        let server = securechat::start(prepared)
            .await
            .map_err(|e| e.to_string())?;
        let addr = server.local_addr().map_err(|e| e.to_string())?;
        tracing::info!(
            event = "server.listening",
            addr = %addr,
            metrics = ?server.metrics_addr(),
            "listening"
        );
        reload_on_sighup(server.reloader());
        server.run(shutdown_signal()).await;
        Ok(())
    })
}

async fn serve_dev(listen: SocketAddr) -> Result<(), String> {
    let dev = securechat::dev::setup(listen)?;
    securechat::telemetry::init(&dev.prepared.config.log)?;
    let ws_path = dev.prepared.config.server.ws_path.clone();
    let dir = std::env::temp_dir().join(format!("securechat-dev-{}", listen.port()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let ca_path = dir.join("ca.crt");
    let secret_path = dir.join("jwt.secret");
    securechat::certs::write_file(&ca_path, dev.ca_pem.as_bytes(), false)
        .map_err(|e| format!("cannot write {}: {e}", ca_path.display()))?;
    securechat::certs::write_file(&secret_path, dev.secret.expose(), true)
        .map_err(|e| format!("cannot write {}: {e}", secret_path.display()))?;
    let minter = dev.minter;
    let prepared = dev.prepared;
    let server = securechat::start(prepared)
        .await
        .map_err(|e| e.to_string())?;
    let addr = server.local_addr().map_err(|e| e.to_string())?;
    let now = now_unix();
    let token = minter.mint(&MintClaims {
        sub: "alice".into(),
        name: Some("Alice".into()),
        roles: vec!["admin".into()],
        iat: now,
        exp: now + 12 * 3600,
        ..Default::default()
    })?;
    let host = if addr.ip().is_ipv6() {
        format!("[{}]", addr.ip())
    } else {
        "localhost".to_string()
    };
    println!("securechat dev server (not for production)");
    println!("  websocket: wss://{host}:{}{ws_path}", addr.port());
    println!("  trust:     {} (the in-memory dev CA)", ca_path.display());
    if let Some(metrics) = server.metrics_addr() {
        println!("  metrics:   http://{metrics}/metrics");
    }
    println!(
        "  more:      securechat token --secret-file {} --sub bob --name Bob",
        secret_path.display()
    );
    println!("  token for alice (admin, 12 hours):");
    println!("{token}");
    println!("  open the chat as alice:");
    println!("https://{host}:{}/#token={token}", addr.port());
    server.run(shutdown_signal()).await;
    Ok(())
}

fn find_key<'a>(config: &'a Config, kid: Option<&str>) -> Result<&'a KeyConfig, String> {
    match kid {
        Some(kid) => config
            .auth
            .keys
            .iter()
            .find(|k| k.kid == kid)
            .ok_or_else(|| format!("no key with kid {kid:?} in {}", config.source.display())),
        None => config
            .auth
            .keys
            .first()
            .ok_or_else(|| "no keys configured".into()),
    }
}

fn token(args: TokenArgs) -> Result<(), String> {
    securechat::install_crypto_providers();
    let (minter, issuer, audience) = match &args.secret_file {
        Some(path) => {
            let key = KeyConfig {
                kid: args.kid.clone().unwrap_or_else(|| "dev".into()),
                algorithm: KeyAlgorithm::HS256,
                secret_file: Some(path.clone()),
                secret_env: None,
                public_key_file: None,
                private_key_file: None,
            };
            (Minter::from_config(&key)?, None, None)
        }
        None => {
            let config = Config::load(&args.config).map_err(|e| e.to_string())?;
            let key = find_key(&config, args.kid.as_deref())?;
            (
                Minter::from_config(key)?,
                config.auth.issuer.clone(),
                config.auth.audience.first().cloned(),
            )
        }
    };
    for room in &args.rooms {
        securechat::rooms::RoomPattern::parse(room).map_err(|e| format!("--room: {e}"))?;
    }
    let now = now_unix();
    let claims = MintClaims {
        sub: args.sub,
        name: args.name,
        roles: args.roles,
        rooms: (!args.rooms.is_empty()).then_some(args.rooms),
        amr: if args.mfa {
            vec!["pwd".into(), "mfa".into()]
        } else {
            Vec::new()
        },
        iat: now,
        exp: now + args.ttl.as_secs() as i64,
        nbf: None,
        iss: issuer,
        aud: audience,
    };
    println!("{}", minter.mint(&claims)?);
    Ok(())
}

fn gen_cert(args: GenCertArgs) -> Result<(), String> {
    securechat::install_crypto_providers();
    let hosts: Vec<String> = args
        .hosts
        .into_iter()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .collect();
    if hosts.is_empty() {
        return Err("--hosts: name at least one host".into());
    }
    let written = securechat::certs::write_dev_pki(&args.out, &hosts, args.force)?;
    for file in written.files {
        println!("wrote {}", file.display());
    }
    println!(
        "server certificate for: {} (trust {} in clients)",
        hosts.join(", "),
        args.out.join("ca.crt").display()
    );
    Ok(())
}

fn check(args: CheckArgs) -> Result<(), String> {
    let report = securechat::check::check(&args.config);
    for line in &report.info {
        println!("{line}");
    }
    for warning in &report.warnings {
        println!("warning: {warning}");
    }
    for error in &report.errors {
        eprintln!("error: {error}");
    }
    if report.is_ok() {
        println!("ok");
        Ok(())
    } else {
        Err(format!(
            "{} problem(s) in {}",
            report.errors.len(),
            display(&args.config)
        ))
    }
}

fn display(path: &Path) -> String {
    path.display().to_string()
}
