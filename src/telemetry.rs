//! Logging: JSON lines when stdout is not a terminal (a daemon, a container),
//! readable text when it is. Events carry stable names in the `event` field.
//! Moderation and security actions are logged under the target
//! `securechat::audit`; with `log.audit_file` they also go to that file.

use std::io::IsTerminal;
use std::sync::Mutex;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer;
use tracing_subscriber::filter::filter_fn;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::{LogConfig, LogFormat};

/// The target of audit events.
pub const AUDIT_TARGET: &str = "securechat::audit";

/// Installs the global subscriber. `SECURECHAT_LOG`, when set, overrides the
/// configured level filter. Fails if the audit file cannot be opened.
pub fn init(log: &LogConfig) -> Result<(), String> {
    let filter = std::env::var("SECURECHAT_LOG")
        .ok()
        .and_then(|f| EnvFilter::try_new(f).ok())
        .or_else(|| EnvFilter::try_new(&log.level).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    let json = match log.format {
        LogFormat::Json => true,
        LogFormat::Text => false,
        LogFormat::Auto => !std::io::stdout().is_terminal(),
    };
    let stdout = if json {
        tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .with_writer(std::io::stdout)
            .boxed()
    } else {
        tracing_subscriber::fmt::layer()
            .with_target(false)
            .with_writer(std::io::stdout)
            .boxed()
    };
    let audit = match &log.audit_file {
        Some(path) => {
            let file = open_private_append(path).map_err(|e| {
                format!(
                    "log.audit_file {}: {e} (make the folder writable or change the path)",
                    path.display()
                )
            })?;
            Some(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(true)
                    .with_span_list(false)
                    .with_writer(Mutex::new(file))
                    .with_filter(filter_fn(|meta| meta.target() == AUDIT_TARGET)),
            )
        }
        None => None,
    };
    // A subscriber already installed (tests, embedding) stays in place.
    let _ = tracing_subscriber::registry()
        .with(stdout.with_filter(filter))
        .with(audit)
        .try_init();
    Ok(())
}

fn open_private_append(path: &std::path::Path) -> std::io::Result<std::fs::File> {
    let mut options = std::fs::OpenOptions::new();
    options.create(true).append(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    options.open(path)
}
