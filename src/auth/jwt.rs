//! Token verification: a fixed map of keys selected by `kid`, each pinned to one
//! algorithm, so an HMAC key never verifies an RS/ES/EdDSA token or the reverse.
//! `none` is not an algorithm jsonwebtoken knows, so it never verifies.

use std::collections::HashMap;
use std::path::Path;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use super::Identity;
use crate::config::{AuthConfig, KeyAlgorithm, KeyConfig, Secret};
use crate::rooms::RoomPattern;

/// Shortest HMAC secret accepted: 256 bits.
pub const MIN_SECRET_BYTES: usize = 32;

/// Makes aws-lc-rs jsonwebtoken's provider for this process (idempotent).
pub fn install_crypto_provider() {
    let _ = jsonwebtoken::crypto::aws_lc::DEFAULT_PROVIDER.install_default();
}

/// Why a key could not be loaded at start.
#[derive(Debug, thiserror::Error)]
#[error("auth.keys[{index}] (kid {kid:?}): {message}")]
pub struct KeyError {
    pub index: usize,
    pub kid: String,
    pub message: String,
}

/// Why a token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenError {
    /// Longer than `auth.max_token_bytes`; not parsed.
    TooLarge,
    /// `exp` (plus leeway) has passed.
    Expired,
    /// Anything else: bad signature, unknown `kid`, wrong algorithm, issuer,
    /// audience, `nbf` in the future, malformed claims.
    Invalid(&'static str),
}

impl TokenError {
    /// The contract's refusal code.
    pub fn code(self) -> &'static str {
        match self {
            Self::Expired => "token_expired",
            Self::TooLarge | Self::Invalid(_) => "invalid_token",
        }
    }
    /// A short reason for logs and metrics (never the token).
    pub fn reason(self) -> &'static str {
        match self {
            Self::TooLarge => "too_large",
            Self::Expired => "expired",
            Self::Invalid(reason) => reason,
        }
    }
}

struct VerifyKey {
    key: DecodingKey,
    validation: Validation,
}

/// The verification keys, by `kid`.
pub struct KeyRing {
    keys: HashMap<String, VerifyKey>,
    /// With exactly one key, a token without `kid` uses it.
    only_kid: Option<String>,
    max_token_bytes: usize,
    leeway: u64,
}

impl std::fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyRing")
            .field("kids", &self.keys.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// The claims securechat reads.
#[derive(Debug, Deserialize)]
struct Claims {
    sub: String,
    exp: i64,
    #[serde(default)]
    iat: Option<i64>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    roles: Vec<String>,
    #[serde(default)]
    rooms: Option<Vec<String>>,
    #[serde(default)]
    amr: Vec<String>,
}

fn algorithm(alg: KeyAlgorithm) -> Algorithm {
    match alg {
        KeyAlgorithm::HS256 => Algorithm::HS256,
        KeyAlgorithm::HS384 => Algorithm::HS384,
        KeyAlgorithm::HS512 => Algorithm::HS512,
        KeyAlgorithm::RS256 => Algorithm::RS256,
        KeyAlgorithm::RS384 => Algorithm::RS384,
        KeyAlgorithm::RS512 => Algorithm::RS512,
        KeyAlgorithm::PS256 => Algorithm::PS256,
        KeyAlgorithm::PS384 => Algorithm::PS384,
        KeyAlgorithm::PS512 => Algorithm::PS512,
        KeyAlgorithm::ES256 => Algorithm::ES256,
        KeyAlgorithm::ES384 => Algorithm::ES384,
        KeyAlgorithm::EdDSA => Algorithm::EdDSA,
    }
}

/// Reads an HMAC secret from the file or environment variable the key names.
pub fn load_secret(key: &KeyConfig) -> Result<Secret, String> {
    let bytes = if let Some(path) = &key.secret_file {
        let mut bytes = std::fs::read(path).map_err(|e| {
            format!(
                "cannot read secret_file {}: {e} (create it with 32+ random bytes)",
                path.display()
            )
        })?;
        while bytes.last().is_some_and(|b| b.is_ascii_whitespace()) {
            bytes.pop();
        }
        bytes
    } else if let Some(var) = &key.secret_env {
        std::env::var(var)
            .map_err(|_| {
                format!("environment variable {var} (secret_env) is not set or not UTF-8")
            })?
            .into_bytes()
    } else {
        return Err("no secret_file or secret_env".into());
    };
    if let Some(weakness) = secret_weakness(&bytes) {
        return Err(weakness);
    }
    Ok(Secret::new(bytes))
}

/// Fewest distinct bytes a secret may hold. What `openssl rand -hex 32`
/// prints has fewer than this with a chance of about one in 10^12, what
/// `openssl rand -base64 32` prints far less often.
pub const MIN_DISTINCT_SECRET_BYTES: usize = 10;

/// Why `secret` is too weak to sign with, if it is: too short, a short
/// pattern repeated (`aaaa…`, a word over and over), or too few distinct
/// bytes. The reason names the fix and never the secret's bytes.
pub fn secret_weakness(secret: &[u8]) -> Option<String> {
    const FIX: &str = "use random bytes (for example `openssl rand -hex 32`)";
    if secret.len() < MIN_SECRET_BYTES {
        return Some(format!(
            "the secret is {} bytes; use at least {MIN_SECRET_BYTES} random bytes (for example `openssl rand -hex 32`)",
            secret.len()
        ));
    }
    let period = smallest_period(secret);
    if period * 2 <= secret.len() {
        return Some(format!(
            "the secret is a pattern of {period} bytes repeated; {FIX}"
        ));
    }
    let mut seen = [false; 256];
    for &b in secret {
        seen[usize::from(b)] = true;
    }
    let distinct = seen.iter().filter(|&&s| s).count();
    if distinct < MIN_DISTINCT_SECRET_BYTES {
        return Some(format!(
            "the secret has only {distinct} distinct bytes (at least {MIN_DISTINCT_SECRET_BYTES}); {FIX}"
        ));
    }
    None
}

/// The length of the shortest prefix that `bytes` repeats (the last
/// repetition may be cut short): `bytes.len()` when there is none.
fn smallest_period(bytes: &[u8]) -> usize {
    // Knuth-Morris-Pratt's failure function: the longest proper prefix that
    // is also a suffix; what is left of the length is the period.
    let mut border = vec![0usize; bytes.len()];
    let mut k = 0;
    for i in 1..bytes.len() {
        while k > 0 && bytes[i] != bytes[k] {
            k = border[k - 1];
        }
        if bytes[i] == bytes[k] {
            k += 1;
        }
        border[i] = k;
    }
    bytes.len() - border.last().copied().unwrap_or(0)
}

fn read_pem(path: &Path, what: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read {what} {}: {e}", path.display()))
}

fn decoding_key(key: &KeyConfig) -> Result<DecodingKey, String> {
    if key.algorithm.is_hmac() {
        let secret = load_secret(key)?;
        return Ok(DecodingKey::from_secret(secret.expose()));
    }
    let path = key
        .public_key_file
        .as_deref()
        .ok_or("missing public_key_file")?;
    let pem = read_pem(path, "public_key_file")?;
    let parsed = match key.algorithm {
        KeyAlgorithm::ES256 | KeyAlgorithm::ES384 => DecodingKey::from_ec_pem(&pem),
        KeyAlgorithm::EdDSA => DecodingKey::from_ed_pem(&pem),
        _ => DecodingKey::from_rsa_pem(&pem),
    };
    parsed.map_err(|e| {
        format!(
            "public_key_file {} is not a PEM {:?} public key: {e}",
            path.display(),
            key.algorithm
        )
    })
}

impl KeyRing {
    /// Loads every configured key; fails on the first that cannot be used.
    pub fn load(auth: &AuthConfig) -> Result<Self, KeyError> {
        let mut keys = HashMap::new();
        for (index, k) in auth.keys.iter().enumerate() {
            let key = decoding_key(k).map_err(|message| KeyError {
                index,
                kid: k.kid.clone(),
                message,
            })?;
            keys.insert(
                k.kid.clone(),
                VerifyKey {
                    key,
                    validation: validation(auth, algorithm(k.algorithm)),
                },
            );
        }
        let only_kid = (auth.keys.len() == 1).then(|| auth.keys[0].kid.clone());
        Ok(Self {
            keys,
            only_kid,
            max_token_bytes: auth.max_token_bytes,
            leeway: auth.leeway_secs,
        })
    }

    /// A ring of one HMAC key given directly (for `serve --dev` and tests).
    pub fn with_secret(auth: &AuthConfig, kid: &str, alg: KeyAlgorithm, secret: &Secret) -> Self {
        let mut keys = HashMap::new();
        keys.insert(
            kid.to_owned(),
            VerifyKey {
                key: DecodingKey::from_secret(secret.expose()),
                validation: validation(auth, algorithm(alg)),
            },
        );
        Self {
            keys,
            only_kid: Some(kid.to_owned()),
            max_token_bytes: auth.max_token_bytes,
            leeway: auth.leeway_secs,
        }
    }

    /// Verifies a token and returns who it names.
    pub fn verify(&self, token: &str) -> Result<Identity, TokenError> {
        if token.len() > self.max_token_bytes {
            return Err(TokenError::TooLarge);
        }
        let header =
            jsonwebtoken::decode_header(token).map_err(|_| TokenError::Invalid("malformed"))?;
        let kid = header
            .kid
            .as_deref()
            .or(self.only_kid.as_deref())
            .ok_or(TokenError::Invalid("missing_kid"))?;
        let key = self
            .keys
            .get(kid)
            .ok_or(TokenError::Invalid("unknown_kid"))?;
        let data =
            jsonwebtoken::decode::<Claims>(token, &key.key, &key.validation).map_err(|e| {
                use jsonwebtoken::errors::ErrorKind as K;
                match e.kind() {
                    K::ExpiredSignature => TokenError::Expired,
                    K::ImmatureSignature => TokenError::Invalid("not_yet_valid"),
                    K::InvalidAlgorithm => TokenError::Invalid("wrong_algorithm"),
                    K::InvalidSignature => TokenError::Invalid("bad_signature"),
                    K::InvalidIssuer => TokenError::Invalid("wrong_issuer"),
                    K::InvalidAudience => TokenError::Invalid("wrong_audience"),
                    K::MissingRequiredClaim(_) => TokenError::Invalid("missing_claim"),
                    _ => TokenError::Invalid("malformed"),
                }
            })?;
        let claims = data.claims;
        let now = now_unix();
        if claims
            .iat
            .is_some_and(|iat| iat > now.saturating_add(self.leeway as i64))
        {
            return Err(TokenError::Invalid("issued_in_future"));
        }
        identity(claims)
    }
}

fn validation(auth: &AuthConfig, alg: Algorithm) -> Validation {
    let mut v = Validation::new(alg);
    v.algorithms = vec![alg];
    v.leeway = auth.leeway_secs;
    v.validate_exp = true;
    v.validate_nbf = true;
    // jsonwebtoken checks `iss` and `aud` only when present unless they are
    // required, so a configured issuer or audience is also a required claim.
    let mut required = vec!["exp", "sub"];
    if let Some(iss) = &auth.issuer {
        v.set_issuer(&[iss]);
        required.push("iss");
    }
    if auth.audience.is_empty() {
        v.validate_aud = false;
    } else {
        v.set_audience(&auth.audience);
        required.push("aud");
    }
    v.set_required_spec_claims(&required);
    v
}

fn identity(claims: Claims) -> Result<Identity, TokenError> {
    let printable =
        |s: &str, max: usize| !s.is_empty() && s.len() <= max && !s.chars().any(char::is_control);
    if !printable(&claims.sub, 256) {
        return Err(TokenError::Invalid("bad_sub"));
    }
    let name = match claims.name {
        Some(name) if printable(&name, 256) => name,
        Some(_) => return Err(TokenError::Invalid("bad_name")),
        None => claims.sub.clone(),
    };
    if claims.roles.len() > 64 || !claims.roles.iter().all(|r| printable(r, 64)) {
        return Err(TokenError::Invalid("bad_roles"));
    }
    let rooms = match claims.rooms {
        Some(rooms) if rooms.len() <= 256 => Some(
            rooms
                .iter()
                .map(|r| RoomPattern::parse(r))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|_| TokenError::Invalid("bad_rooms"))?,
        ),
        Some(_) => return Err(TokenError::Invalid("bad_rooms")),
        None => None,
    };
    Ok(Identity {
        sub: claims.sub,
        name,
        roles: claims.roles,
        rooms,
        mfa: claims.amr.iter().any(|m| m == "mfa"),
        expires_at: claims.exp,
    })
}

/// Seconds since the Unix epoch.
pub fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// What a minted token says.
#[derive(Debug, Clone, Default, Serialize)]
pub struct MintClaims {
    pub sub: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub roles: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rooms: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub amr: Vec<String>,
    pub iat: i64,
    pub exp: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nbf: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub aud: Option<String>,
}

/// Signs tokens with one configured key (for `securechat token`, `--dev` and tests).
pub struct Minter {
    kid: String,
    alg: Algorithm,
    key: EncodingKey,
}

impl std::fmt::Debug for Minter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Minter")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .finish_non_exhaustive()
    }
}

impl Minter {
    /// A minter for an HMAC secret.
    pub fn hmac(kid: &str, alg: KeyAlgorithm, secret: &Secret) -> Self {
        Self {
            kid: kid.to_owned(),
            alg: algorithm(alg),
            key: EncodingKey::from_secret(secret.expose()),
        }
    }

    /// A minter for a configured key: its secret, or its `private_key_file`.
    pub fn from_config(key: &KeyConfig) -> Result<Self, String> {
        if key.algorithm.is_hmac() {
            return Ok(Self::hmac(&key.kid, key.algorithm, &load_secret(key)?));
        }
        let path = key.private_key_file.as_deref().ok_or_else(|| {
            format!(
                "kid {:?} is a {:?} key: minting needs its private_key_file",
                key.kid, key.algorithm
            )
        })?;
        let pem = read_pem(path, "private_key_file")?;
        let parsed = match key.algorithm {
            KeyAlgorithm::ES256 | KeyAlgorithm::ES384 => EncodingKey::from_ec_pem(&pem),
            KeyAlgorithm::EdDSA => EncodingKey::from_ed_pem(&pem),
            _ => EncodingKey::from_rsa_pem(&pem),
        };
        let encoding = parsed.map_err(|e| {
            format!(
                "private_key_file {} is not a PEM {:?} private key: {e}",
                path.display(),
                key.algorithm
            )
        })?;
        Ok(Self {
            kid: key.kid.clone(),
            alg: algorithm(key.algorithm),
            key: encoding,
        })
    }

    pub fn mint(&self, claims: &MintClaims) -> Result<String, String> {
        let mut header = Header::new(self.alg);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &self.key).map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weak_secrets_are_refused_and_random_ones_pass() {
        for (secret, why) in [
            (vec![b'a'; 32], "repeated"),
            (vec![0; 64], "repeated"),
            (b"password".repeat(5), "repeated"),
            (b"0123456789abcdef".repeat(3), "repeated"),
            (b"abcabcabcabcabcabcabcabcabcabcabcab".to_vec(), "repeated"),
            (b"aabbaabbababbbaaabababbbbaaababaabab".to_vec(), "distinct"),
            (b"short".to_vec(), "at least 32"),
        ] {
            let weakness = secret_weakness(&secret)
                .unwrap_or_else(|| panic!("{:?} passed", String::from_utf8_lossy(&secret)));
            assert!(weakness.contains(why), "{weakness}");
            assert!(weakness.contains("openssl rand"), "{weakness}");
        }
        // What `openssl rand -hex 32` and `openssl rand -base64 32` print.
        let b64 = base64::engine::general_purpose::STANDARD;
        for _ in 0..1000 {
            let bytes: [u8; 32] = rand::random();
            let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
            assert_eq!(secret_weakness(hex.as_bytes()), None, "{hex}");
            let text = base64::Engine::encode(&b64, bytes);
            assert_eq!(secret_weakness(text.as_bytes()), None, "{text}");
            assert_eq!(secret_weakness(&bytes), None);
        }
        assert_eq!(
            secret_weakness(b"correct-horse-battery-staple-0123456789"),
            None
        );
    }

    #[test]
    fn the_period_is_the_shortest_repeated_prefix() {
        assert_eq!(smallest_period(b"abcabcab"), 3);
        assert_eq!(smallest_period(b"aaaa"), 1);
        assert_eq!(smallest_period(b"abcd"), 4);
        assert_eq!(smallest_period(b"abab"), 2);
        assert_eq!(smallest_period(b"aabaab"), 3);
        assert_eq!(smallest_period(b""), 0);
    }
}
