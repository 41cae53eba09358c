//! `securechat check`: validate a configuration, load its keys and
//! certificates, and report what an operator should know before starting.

use std::path::{Path, PathBuf};

use crate::Prepared;
use crate::config::Config;

/// What `check` found. Any error means the configuration must not be used.
#[derive(Debug, Default)]
pub struct Report {
    /// Facts (keys loaded, certificate expiry).
    pub info: Vec<String>,
    pub warnings: Vec<String>,
    pub errors: Vec<String>,
}

impl Report {
    pub fn is_ok(&self) -> bool {
        self.errors.is_empty()
    }
}

/// Checks the configuration at `path`.
pub fn check(path: &Path) -> Report {
    let mut report = Report::default();
    let config = match Config::load(path) {
        Ok(config) => config,
        Err(e) => {
            report.errors.push(e.to_string());
            return report;
        }
    };
    report
        .info
        .push(format!("config {}: valid", path.display()));
    report.warnings.extend(config.warnings());
    for (file, what) in private_files(&config) {
        if let Some(problem) = exposure(&file) {
            report
                .errors
                .push(format!("{what} {}: {problem}", file.display()));
        }
    }
    let prepared = match Prepared::load(config) {
        Ok(prepared) => prepared,
        Err(e) => {
            report.errors.push(e.to_string());
            return report;
        }
    };
    report.info.push(format!(
        "auth: {} verification key(s) loaded",
        prepared.config.auth.keys.len()
    ));
    match &prepared.tls {
        Some(tls) => {
            let days = tls.leaf.days_left();
            report.info.push(format!(
                "tls: certificate {} (serial {}) expires {} ({days} days left)",
                tls.leaf.subject,
                tls.leaf.serial,
                crate::protocol::rfc3339(tls.leaf.not_after)
            ));
            if days < 14 {
                report.warnings.push(format!(
                    "tls.cert: the certificate expires in {days} days; renew it"
                ));
            }
        }
        None => report
            .info
            .push("tls: off (a proxy in front must terminate TLS)".into()),
    }
    report.info.push(format!(
        "rooms: {} configured{}",
        prepared.config.rooms.len(),
        if prepared.config.dm.enabled {
            ", direct messages on"
        } else {
            ""
        }
    ));
    report
}

/// Files holding private keys or secrets, with the key that names them.
fn private_files(config: &Config) -> Vec<(PathBuf, String)> {
    let mut files = Vec::new();
    if let Some(key) = &config.tls.key {
        files.push((key.clone(), "tls.key".to_string()));
    }
    if let Some(file) = &config.broker.secret_file {
        files.push((file.clone(), "broker.secret_file".to_string()));
    }
    if let Some(file) = &config.broker.password_file {
        files.push((file.clone(), "broker.password_file".to_string()));
    }
    for (i, key) in config.auth.keys.iter().enumerate() {
        if let Some(file) = &key.secret_file {
            files.push((file.clone(), format!("auth.keys[{i}].secret_file")));
        }
        if let Some(file) = &key.private_key_file {
            files.push((file.clone(), format!("auth.keys[{i}].private_key_file")));
        }
    }
    files
}

/// Why a private file is exposed, if it is: readable or writable by its
/// group or by everyone.
#[cfg(unix)]
fn exposure(file: &Path) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(file).ok()?.permissions().mode() & 0o777;
    (mode & 0o077 != 0).then(|| {
        format!(
            "mode {mode:04o} lets other users read it; run `chmod 600 {}`",
            file.display()
        )
    })
}

#[cfg(not(unix))]
fn exposure(_: &Path) -> Option<String> {
    None
}
