//! Rotation without downtime: the certificate chain, its key, the client CA
//! (with `tls.client_auth` on) and the token verification keys are read
//! again on SIGHUP and when their files change.
//! Renewal tools replace files by rename or symlink swap, so the folders
//! holding them are watched, not the files. A reload that fails keeps what
//! is being served and logs why.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tracing::{error, info, warn};

use crate::auth::jwt::KeyRing;
use crate::state::AppState;
use crate::tls::{CertStore, ServingConfig};

/// How long file events are gathered before one reload.
const SETTLE: Duration = Duration::from_millis(300);

/// Reloads certificates and keys into a running server.
pub struct Reloader {
    state: Arc<AppState>,
    /// The serving certificate, when it comes from files.
    certs: Option<Arc<CertStore>>,
    /// The TLS configuration in service: swapped for one with the client CA
    /// read again.
    serving: Option<Arc<ServingConfig>>,
    /// Whether the key files named in the configuration exist (not `--dev`).
    from_files: bool,
}

/// What one reload did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReloadOutcome {
    pub tls_ok: bool,
    pub keys_ok: bool,
}

/// Whether a file event at `path` concerns one of the watched file `names`.
fn concerns(path: &std::path::Path, names: &[std::ffi::OsString]) -> bool {
    path.file_name().is_some_and(|name| {
        names.iter().any(|n| n == name) || name.to_string_lossy().starts_with("..data")
    })
}

/// Keeps the file watcher alive; dropping it stops watching.
pub struct WatchGuard {
    _watcher: notify::RecommendedWatcher,
}

impl Reloader {
    pub fn new(
        state: Arc<AppState>,
        certs: Option<Arc<CertStore>>,
        serving: Option<Arc<ServingConfig>>,
        from_files: bool,
    ) -> Self {
        Self {
            state,
            certs,
            serving,
            from_files,
        }
    }

    /// Reads the certificate, its key, the client CA and the token keys
    /// again. Each that fails to load keeps what is in service.
    pub fn reload(&self) -> ReloadOutcome {
        let config = &self.state.config;
        let cert_ok = match (&self.certs, self.from_files) {
            (Some(store), true) => match store.reload(&config.tls) {
                Ok(info) => {
                    metrics::counter!("securechat_tls_reloads_total", "result" => "ok")
                        .increment(1);
                    metrics::gauge!("securechat_certificate_expiry_timestamp_seconds")
                        .set(info.not_after as f64);
                    info!(
                        target: crate::telemetry::AUDIT_TARGET,
                        event = "tls.reloaded",
                        subject = %info.subject,
                        serial = %info.serial,
                        days_left = info.days_left(),
                        "serving a reloaded certificate"
                    );
                    true
                }
                Err(e) => {
                    metrics::counter!("securechat_tls_reloads_total", "result" => "error")
                        .increment(1);
                    error!(
                        event = "tls.reload_failed",
                        error = %e,
                        "certificate reload failed; still serving the previous certificate"
                    );
                    false
                }
            },
            _ => true,
        };
        let tls_ok = cert_ok & self.reload_client_ca();
        let keys_ok = if self.from_files {
            match KeyRing::load(&config.auth) {
                Ok(keys) => {
                    self.state.keys.store(Arc::new(keys));
                    info!(target: crate::telemetry::AUDIT_TARGET, event = "keys.reloaded", kids = ?config.auth.keys.iter().map(|k| &k.kid).collect::<Vec<_>>());
                    true
                }
                Err(e) => {
                    error!(event = "keys.reload_failed", error = %e, "token key reload failed; the previous keys stay");
                    false
                }
            }
        } else {
            true
        };
        ReloadOutcome { tls_ok, keys_ok }
    }

    /// Reads `tls.client_ca` again (when client certificates are asked
    /// for) and serves a configuration that verifies against it from the
    /// next handshake on; open connections keep the verdict they had.
    fn reload_client_ca(&self) -> bool {
        let tls = &self.state.config.tls;
        let (Some(serving), Some(store), true) = (&self.serving, &self.certs, self.from_files)
        else {
            return true;
        };
        if tls.client_auth == crate::config::ClientAuth::Off {
            return true;
        }
        match crate::tls::reload_client_ca(tls, store) {
            Ok((config, count)) => {
                serving.store(config);
                metrics::counter!("securechat_client_ca_reloads_total", "result" => "ok")
                    .increment(1);
                info!(
                    target: crate::telemetry::AUDIT_TARGET,
                    event = "tls.client_ca_reloaded",
                    certificates = count,
                    "verifying client certificates against the reloaded client CA"
                );
                true
            }
            Err(e) => {
                metrics::counter!("securechat_client_ca_reloads_total", "result" => "error")
                    .increment(1);
                error!(
                    event = "tls.client_ca_reload_failed",
                    error = %e,
                    "client CA reload failed; still verifying against the previous one"
                );
                false
            }
        }
    }

    /// The certificate, its key, the client CA and the key files.
    fn watched_files(&self) -> Vec<PathBuf> {
        let config = &self.state.config;
        let client_ca = (config.tls.client_auth != crate::config::ClientAuth::Off)
            .then_some(&config.tls.client_ca);
        [&config.tls.cert, &config.tls.key]
            .into_iter()
            .chain(client_ca)
            .chain(
                config
                    .auth
                    .keys
                    .iter()
                    .flat_map(|k| [&k.secret_file, &k.public_key_file]),
            )
            .flatten()
            .cloned()
            .collect()
    }

    /// Starts watching the files; every burst of changes triggers one reload.
    pub fn watch(self: &Arc<Self>) -> Option<WatchGuard> {
        if !self.from_files {
            return None;
        }
        let files = self.watched_files();
        let folders: BTreeSet<PathBuf> = files
            .iter()
            .filter_map(|file| {
                let parent = file.parent()?;
                Some(if parent.as_os_str().is_empty() {
                    PathBuf::from(".")
                } else {
                    parent.to_path_buf()
                })
            })
            .collect();
        // Only events about the watched names count (a rename onto them, a
        // symlink swap of Kubernetes' `..data`), so other files in the same
        // folders (an audit log written on every reload) never trigger one.
        let names: Vec<std::ffi::OsString> = files
            .iter()
            .filter_map(|f| f.file_name().map(ToOwned::to_owned))
            .collect();
        let relevant = move |path: &std::path::Path| concerns(path, &names);
        let (tx, mut rx) = mpsc::channel::<()>(16);
        let handler = move |event: notify::Result<notify::Event>| {
            let Ok(event) = event else { return };
            if !event.kind.is_access() && event.paths.iter().any(|p| relevant(p)) {
                // A full channel already holds a pending reload.
                let _ = tx.try_send(());
            }
        };
        let mut watcher = match notify::recommended_watcher(handler) {
            Ok(watcher) => watcher,
            Err(e) => {
                warn!(event = "reload.watch_failed", error = %e, "cannot watch certificate files; reload with SIGHUP");
                return None;
            }
        };
        for folder in &folders {
            if let Err(e) = watcher.watch(folder, RecursiveMode::NonRecursive) {
                warn!(event = "reload.watch_failed", folder = %folder.display(), error = %e);
            }
        }
        let reloader = self.clone();
        let shutdown = self.state.shutdown.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    event = rx.recv() => if event.is_none() { return },
                }
                tokio::time::sleep(SETTLE).await;
                while rx.try_recv().is_ok() {}
                reloader.reload();
            }
        });
        Some(WatchGuard { _watcher: watcher })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn only_events_about_watched_names_count() {
        let names = vec!["server.crt".into(), "server.key".into()];
        assert!(concerns(
            Path::new("/etc/securechat/certs/server.crt"),
            &names
        ));
        assert!(concerns(Path::new("/etc/securechat/certs/..data"), &names));
        assert!(concerns(
            Path::new("/etc/securechat/certs/..data_tmp"),
            &names
        ));
        assert!(!concerns(
            Path::new("/etc/securechat/certs/audit.log"),
            &names
        ));
        assert!(!concerns(
            Path::new("/etc/securechat/certs/.server.crt.swp"),
            &names
        ));
    }
}
