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
    if bytes.len() < MIN_SECRET_BYTES {
        return Err(format!(
            "the secret is {} bytes; use at least {MIN_SECRET_BYTES} random bytes (for example `openssl rand -hex 32`)",
            bytes.len()
        ));
    }
    Ok(Secret::new(bytes))
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
