//! The Origin allow-list, the defence against cross-site WebSocket hijacking.
//!
//! Origins are compared after normalisation: lower-case scheme and host, the
//! default port (443 for https, 80 for http) removed.

/// Why an origin or pattern could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct OriginError(String);

/// A normalised `scheme://host[:port]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    scheme: String,
    host: String,
    port: Option<u16>,
}

impl Origin {
    /// Parses the value of an `Origin` header.
    pub fn parse(text: &str) -> Result<Self, OriginError> {
        let bad = || {
            OriginError(format!(
                "{text:?} is not an origin: expected scheme://host[:port], such as https://chat.example.com"
            ))
        };
        let (scheme, rest) = text.split_once("://").ok_or_else(bad)?;
        let scheme = scheme.to_ascii_lowercase();
        if scheme != "https" && scheme != "http" {
            return Err(bad());
        }
        if rest.is_empty() || rest.contains(['/', '?', '#', '@', ' ']) {
            return Err(bad());
        }
        let (host, port) = split_host_port(rest).ok_or_else(bad)?;
        let host = host.to_ascii_lowercase();
        let valid_host = if let Some(inner) = host.strip_prefix('[') {
            inner.ends_with(']')
        } else {
            !host.is_empty()
                && host
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'*')
        };
        if !valid_host {
            return Err(bad());
        }
        let default_port = if scheme == "https" { 443 } else { 80 };
        let port = port.filter(|p| *p != default_port);
        Ok(Self { scheme, host, port })
    }
}

fn split_host_port(text: &str) -> Option<(&str, Option<u16>)> {
    // IPv6 literal: [::1]:8443
    if text.starts_with('[') {
        let end = text.find(']')?;
        let (host, rest) = text.split_at(end + 1);
        return match rest.strip_prefix(':') {
            Some(port) => Some((host, Some(port.parse().ok()?))),
            None if rest.is_empty() => Some((host, None)),
            None => None,
        };
    }
    match text.rsplit_once(':') {
        Some((host, port)) => Some((host, Some(port.parse().ok()?))),
        None => Some((text, None)),
    }
}

/// An allow-list entry: an exact origin, or `scheme://*.domain[:port]`, which
/// matches every subdomain of `domain` (not `domain` itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OriginPattern {
    origin: Origin,
    /// For `*.` patterns: the suffix a host must end with, `.domain`.
    wildcard_suffix: Option<String>,
}

impl OriginPattern {
    pub fn parse(text: &str) -> Result<Self, OriginError> {
        let origin = Origin::parse(text)?;
        let wildcard_suffix = match origin.host.strip_prefix('*') {
            Some(suffix)
                if suffix.starts_with('.') && suffix.len() > 1 && !suffix[1..].contains('*') =>
            {
                Some(suffix.to_owned())
            }
            Some(_) => {
                return Err(OriginError(format!(
                    "{text:?}: a wildcard must be a whole leading label, as in https://*.example.com"
                )));
            }
            None if origin.host.contains('*') => {
                return Err(OriginError(format!(
                    "{text:?}: a wildcard must be a whole leading label, as in https://*.example.com"
                )));
            }
            None => None,
        };
        Ok(Self {
            origin,
            wildcard_suffix,
        })
    }

    pub fn matches(&self, origin: &Origin) -> bool {
        if self.origin.scheme != origin.scheme || self.origin.port != origin.port {
            return false;
        }
        match &self.wildcard_suffix {
            Some(suffix) => {
                origin.host.len() > suffix.len()
                    && origin.host.ends_with(suffix.as_str())
                    && !origin.host.contains('*')
            }
            None => self.origin.host == origin.host,
        }
    }
}

/// The configured allow-list.
#[derive(Debug, Clone, Default)]
pub struct AllowedOrigins(Vec<OriginPattern>);

impl AllowedOrigins {
    /// Builds the list; configuration validation has already parsed every entry.
    pub fn new(entries: &[String]) -> Result<Self, OriginError> {
        entries
            .iter()
            .map(|e| OriginPattern::parse(e))
            .collect::<Result<_, _>>()
            .map(Self)
    }

    /// Whether an `Origin` header value is allowed. `null` and malformed
    /// values never are.
    pub fn allows(&self, header: &str) -> bool {
        match Origin::parse(header) {
            Ok(origin) => self.0.iter().any(|p| p.matches(&origin)),
            Err(_) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(entries: &[&str]) -> AllowedOrigins {
        AllowedOrigins::new(&entries.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn exact_with_normalisation() {
        let l = list(&["https://chat.example.com", "http://localhost:8080"]);
        assert!(l.allows("https://chat.example.com"));
        assert!(l.allows("HTTPS://Chat.Example.COM"));
        assert!(l.allows("https://chat.example.com:443"));
        assert!(l.allows("http://localhost:8080"));
        assert!(!l.allows("http://chat.example.com"));
        assert!(!l.allows("https://chat.example.com:8443"));
        assert!(!l.allows("https://evil.example.com"));
        assert!(!l.allows("https://chat.example.com.evil.org"));
        assert!(!l.allows("null"));
        assert!(!l.allows("https://chat.example.com/path"));
        assert!(!l.allows(""));
    }

    #[test]
    fn wildcard_subdomains() {
        let l = list(&["https://*.example.com"]);
        assert!(l.allows("https://a.example.com"));
        assert!(l.allows("https://a.b.example.com"));
        assert!(!l.allows("https://example.com"));
        assert!(!l.allows("https://evilexample.com"));
        assert!(!l.allows("http://a.example.com"));
    }

    #[test]
    fn bad_patterns() {
        for p in [
            "example.com",
            "https://",
            "ftp://x",
            "https://a*.example.com",
            "https://x.*.com",
            "https://x/",
            "https://x:99999",
        ] {
            assert!(OriginPattern::parse(p).is_err(), "{p}");
        }
        assert!(OriginPattern::parse("https://[::1]:8443").is_ok());
        assert!(list(&["https://[::1]:8443"]).allows("https://[::1]:8443"));
    }
}
