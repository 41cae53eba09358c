//! HS256 tokens for securechat, minted in-process with aws-lc-rs HMAC, so
//! 20,000 connections do not need 20,000 `securechat token` processes.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// Signs tokens with one HS256 key.
pub struct Minter {
    key: aws_lc_rs::hmac::Key,
    kid: String,
}

impl Minter {
    /// Reads the secret as the server does: the file's bytes, trailing
    /// whitespace removed.
    pub fn from_file(path: &Path, kid: &str) -> Result<Self, String> {
        let mut secret =
            std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        while secret.last().is_some_and(|b| b.is_ascii_whitespace()) {
            secret.pop();
        }
        Ok(Self {
            key: aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, &secret),
            kid: kid.to_owned(),
        })
    }

    /// A token for user `sub`, valid for `ttl_secs`.
    pub fn mint(&self, sub: &str, ttl_secs: u64) -> String {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let header = URL_SAFE_NO_PAD.encode(format!(
            r#"{{"alg":"HS256","typ":"JWT","kid":"{}"}}"#,
            self.kid
        ));
        let claims = URL_SAFE_NO_PAD.encode(format!(
            r#"{{"sub":"{sub}","iat":{now},"exp":{}}}"#,
            now + ttl_secs
        ));
        let input = format!("{header}.{claims}");
        let tag = aws_lc_rs::hmac::sign(&self.key, input.as_bytes());
        format!("{input}.{}", URL_SAFE_NO_PAD.encode(tag.as_ref()))
    }
}
