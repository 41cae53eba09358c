//! The PROXY protocol (v1 text, v2 binary) that TCP proxies in front of the
//! server (TLS passthrough) put before the client's bytes, naming the
//! client's address. Read only from peers in `server.trusted_proxies` and
//! only with `server.proxy_protocol = true`; parsed with `ppp`.

use std::net::SocketAddr;

use tokio::io::{AsyncRead, AsyncReadExt};

/// Longest v1 header (the specification's bound).
const MAX_V1: usize = 107;
/// The v2 signature.
const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// Longest v2 address-and-extensions block accepted: addresses need at most
/// 216 bytes (UNIX); the rest leaves room for a few TLVs.
const MAX_V2_PAYLOAD: usize = 512;

/// A header that is missing, malformed or too large.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("the connection does not start with a PROXY protocol header")]
    Missing,
    #[error("malformed PROXY protocol header: {0}")]
    Malformed(String),
    #[error("PROXY protocol header too large")]
    TooLarge,
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Reads the header and returns the client's address: `None` when the
/// proxy speaks for itself (v2 `LOCAL`, v1 `UNKNOWN`, such as health checks).
/// Reads exactly the header's bytes, so what follows (the TLS handshake) is
/// left in the stream.
pub async fn read_header(
    stream: &mut (impl AsyncRead + Unpin),
) -> Result<Option<SocketAddr>, ProxyError> {
    let mut buf = vec![0u8; 5];
    stream.read_exact(&mut buf).await?;
    if buf == b"PROXY" {
        // v1: text up to CRLF, read a byte at a time so nothing after it is taken.
        while !buf.ends_with(b"\r\n") {
            if buf.len() >= MAX_V1 {
                return Err(ProxyError::TooLarge);
            }
            buf.push(stream.read_u8().await?);
        }
    } else if buf[..] == V2_SIGNATURE[..5] {
        buf.resize(16, 0);
        stream.read_exact(&mut buf[5..]).await?;
        if buf[..12] != V2_SIGNATURE {
            return Err(ProxyError::Missing);
        }
        let len = u16::from_be_bytes([buf[14], buf[15]]) as usize;
        if len > MAX_V2_PAYLOAD {
            return Err(ProxyError::TooLarge);
        }
        buf.resize(16 + len, 0);
        stream.read_exact(&mut buf[16..]).await?;
    } else {
        return Err(ProxyError::Missing);
    }
    parse(&buf)
}

fn parse(bytes: &[u8]) -> Result<Option<SocketAddr>, ProxyError> {
    match ppp::HeaderResult::parse(bytes) {
        ppp::HeaderResult::V1(Ok(header)) => Ok(match header.addresses {
            ppp::v1::Addresses::Tcp4(a) => Some((a.source_address, a.source_port).into()),
            ppp::v1::Addresses::Tcp6(a) => Some((a.source_address, a.source_port).into()),
            ppp::v1::Addresses::Unknown => None,
        }),
        ppp::HeaderResult::V2(Ok(header)) => Ok(match (header.command, header.addresses) {
            (ppp::v2::Command::Local, _) => None,
            (_, ppp::v2::Addresses::IPv4(a)) => Some((a.source_address, a.source_port).into()),
            (_, ppp::v2::Addresses::IPv6(a)) => Some((a.source_address, a.source_port).into()),
            (_, ppp::v2::Addresses::Unspecified | ppp::v2::Addresses::Unix(_)) => None,
        }),
        ppp::HeaderResult::V1(Err(e)) => Err(ProxyError::Malformed(e.to_string())),
        ppp::HeaderResult::V2(Err(e)) => Err(ProxyError::Malformed(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn read(bytes: &[u8]) -> (Result<Option<SocketAddr>, ProxyError>, Vec<u8>) {
        let mut stream = bytes;
        let result = read_header(&mut stream).await;
        (result, stream.to_vec())
    }

    #[tokio::test]
    async fn v1_tcp4_and_the_rest_is_left() {
        let (addr, rest) = read(b"PROXY TCP4 203.0.113.9 10.0.0.1 51234 443\r\n\x16\x03\x01").await;
        assert_eq!(addr.unwrap(), Some("203.0.113.9:51234".parse().unwrap()));
        assert_eq!(rest, b"\x16\x03\x01");
    }

    #[tokio::test]
    async fn v1_unknown_is_the_proxy_itself() {
        let (addr, rest) = read(b"PROXY UNKNOWN\r\nX").await;
        assert_eq!(addr.unwrap(), None);
        assert_eq!(rest, b"X");
    }

    #[tokio::test]
    async fn v2_tcp6() {
        let header = ppp::v2::Builder::with_addresses(
            ppp::v2::Version::Two | ppp::v2::Command::Proxy,
            ppp::v2::Protocol::Stream,
            (
                "[2001:db8::7]:4000".parse::<SocketAddr>().unwrap(),
                "[2001:db8::1]:443".parse::<SocketAddr>().unwrap(),
            ),
        )
        .build()
        .unwrap();
        let mut bytes = header.clone();
        bytes.extend_from_slice(b"tls");
        let (addr, rest) = read(&bytes).await;
        assert_eq!(addr.unwrap(), Some("[2001:db8::7]:4000".parse().unwrap()));
        assert_eq!(rest, b"tls");
    }

    #[tokio::test]
    async fn garbage_and_oversize_are_refused() {
        assert!(matches!(
            read(b"\x16\x03\x01\x02\x00hello").await.0,
            Err(ProxyError::Missing)
        ));
        assert!(read(b"PROXY TCP4 nonsense\r\n").await.0.is_err());
        let long = format!("PROXY {}\r\n", "1".repeat(200));
        assert!(matches!(
            read(long.as_bytes()).await.0,
            Err(ProxyError::TooLarge)
        ));
        let mut v2 = V2_SIGNATURE.to_vec();
        v2.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
        assert!(matches!(read(&v2).await.0, Err(ProxyError::TooLarge)));
    }
}
