//! Finding the token in an upgrade request, in the contract's order: the
//! `Authorization` header, the `securechat.bearer.<jwt>` subprotocol entry, the
//! `securechat_token` cookie (when enabled), the `?token=` query (when enabled).

use http::HeaderMap;
use http::header::{AUTHORIZATION, COOKIE, SEC_WEBSOCKET_PROTOCOL};

use crate::protocol::{BEARER_SUBPROTOCOL_PREFIX, SUBPROTOCOL};

/// Where the credential came from. Only header and subprotocol credentials
/// are accepted without an `Origin`: a browser attaches cookies on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Header,
    Subprotocol,
    Cookie,
    Query,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Header => "header",
            Self::Subprotocol => "subprotocol",
            Self::Cookie => "cookie",
            Self::Query => "query",
        }
    }
}

/// A token and where it was found. `Debug` does not show the token.
pub struct Credential {
    pub token: String,
    pub source: Source,
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credential")
            .field("token", &"MASKED")
            .field("source", &self.source)
            .finish()
    }
}

/// Why no usable credential was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CredentialError {
    /// None was offered.
    Missing,
    /// One was offered in a form that is refused (malformed header, query
    /// token while query tokens are off).
    Refused(&'static str),
}

/// What the credential rules allow, from `[auth]`.
#[derive(Debug, Clone, Copy)]
pub struct CredentialRules {
    pub cookie: bool,
    pub query: bool,
}

/// The offered subprotocols, split on commas across all header lines.
pub fn offered_subprotocols(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|v| !v.is_empty())
}

/// Whether the client offered `securechat.v1`.
pub fn offers_protocol(headers: &HeaderMap) -> bool {
    offered_subprotocols(headers).any(|p| p == SUBPROTOCOL)
}

/// Finds the credential, first match wins.
pub fn extract(
    headers: &HeaderMap,
    query: Option<&str>,
    rules: CredentialRules,
) -> Result<Credential, CredentialError> {
    if let Some(value) = headers.get(AUTHORIZATION) {
        let value = value
            .to_str()
            .map_err(|_| CredentialError::Refused("malformed Authorization header"))?;
        let token = value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or(CredentialError::Refused(
                "the Authorization header must be \"Bearer <token>\"",
            ))?;
        return Ok(Credential {
            token: token.to_owned(),
            source: Source::Header,
        });
    }
    if let Some(token) = offered_subprotocols(headers)
        .find_map(|p| p.strip_prefix(BEARER_SUBPROTOCOL_PREFIX))
        .filter(|t| !t.is_empty())
    {
        return Ok(Credential {
            token: token.to_owned(),
            source: Source::Subprotocol,
        });
    }
    if rules.cookie
        && let Some(token) = cookie(headers, "securechat_token")
    {
        return Ok(Credential {
            token: token.to_owned(),
            source: Source::Cookie,
        });
    }
    let query_token = query.and_then(|q| {
        q.split('&')
            .find_map(|pair| pair.strip_prefix("token="))
            .filter(|t| !t.is_empty())
    });
    match query_token {
        Some(token) if rules.query => Ok(Credential {
            token: token.to_owned(),
            source: Source::Query,
        }),
        Some(_) => Err(CredentialError::Refused(
            "tokens in the URL are disabled: send it in the Authorization header or the securechat.bearer subprotocol",
        )),
        None => Err(CredentialError::Missing),
    }
}

fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, v)| *k == name && !v.is_empty())
        .map(|(_, v)| v)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: CredentialRules = CredentialRules {
        cookie: true,
        query: true,
    };

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    #[test]
    fn order_is_header_subprotocol_cookie_query() {
        let h = headers(&[
            ("authorization", "Bearer H"),
            (
                "sec-websocket-protocol",
                "securechat.v1, securechat.bearer.S",
            ),
            ("cookie", "a=b; securechat_token=C"),
        ]);
        let c = extract(&h, Some("token=Q"), ALL).unwrap();
        assert_eq!((c.token.as_str(), c.source), ("H", Source::Header));
        let h = headers(&[
            (
                "sec-websocket-protocol",
                "securechat.v1, securechat.bearer.S",
            ),
            ("cookie", "securechat_token=C"),
        ]);
        let c = extract(&h, Some("token=Q"), ALL).unwrap();
        assert_eq!((c.token.as_str(), c.source), ("S", Source::Subprotocol));
        assert!(offers_protocol(&h));
        let h = headers(&[("cookie", "x=1; securechat_token=C")]);
        let c = extract(&h, Some("token=Q"), ALL).unwrap();
        assert_eq!((c.token.as_str(), c.source), ("C", Source::Cookie));
        let c = extract(&HeaderMap::new(), Some("a=1&token=Q"), ALL).unwrap();
        assert_eq!((c.token.as_str(), c.source), ("Q", Source::Query));
    }

    #[test]
    fn disabled_sources() {
        let off = CredentialRules {
            cookie: false,
            query: false,
        };
        let h = headers(&[("cookie", "securechat_token=C")]);
        assert_eq!(
            extract(&h, None, off).unwrap_err(),
            CredentialError::Missing
        );
        assert!(matches!(
            extract(&HeaderMap::new(), Some("token=Q"), off),
            Err(CredentialError::Refused(_))
        ));
        let h = headers(&[("authorization", "Basic abc")]);
        assert!(matches!(
            extract(&h, None, off),
            Err(CredentialError::Refused(_))
        ));
    }

    #[test]
    fn debug_hides_token() {
        let c = Credential {
            token: "secret.jwt.value".into(),
            source: Source::Header,
        };
        assert!(!format!("{c:?}").contains("secret"));
    }
}
