//! Which HTTP version a connection speaks, and the stream that hands back
//! the bytes read to find out.
//!
//! HTTP/2 with prior knowledge (h2c, or TLS without ALPN) is told from
//! HTTP/1.1 by its 24-byte preface. The bytes read to look for it are kept
//! in a [`Prefixed`] stream that returns them before reading on. The same
//! type carries what hyper had read past an HTTP/1.1 upgrade request into
//! the WebSocket session, so the session owns the TLS (or TCP) stream
//! itself, not hyper's boxed upgraded connection: one indirection fewer on
//! every write.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// What the client opens with on an HTTP/2 connection (RFC 9113, 3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The HTTP version a connection opens with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    Http1,
    Http2,
}

/// A stream that returns `prefix` before reading from `io`.
#[derive(Debug)]
pub struct Prefixed<IO> {
    prefix: Bytes,
    io: IO,
}

impl<IO> Prefixed<IO> {
    pub fn new(prefix: Bytes, io: IO) -> Self {
        Self { prefix, io }
    }

    /// Puts `bytes` in front of whatever is still to be returned: what a
    /// reader took from this stream ahead of its own consumer (hyper's
    /// read buffer after an upgrade) goes back first.
    pub fn unread(&mut self, bytes: Bytes) {
        if bytes.is_empty() {
            return;
        }
        self.prefix = if self.prefix.is_empty() {
            bytes
        } else {
            let mut joined = BytesMut::with_capacity(bytes.len() + self.prefix.len());
            joined.extend_from_slice(&bytes);
            joined.extend_from_slice(&self.prefix);
            joined.freeze()
        };
    }
}

/// Reads until the bytes read either differ from the HTTP/2 preface (or the
/// peer stops sending: HTTP/1.1 then, whose parser answers what it gets) or
/// are all of it. Bound by the caller's deadline.
pub async fn read_version<IO: AsyncRead + Unpin>(
    mut io: IO,
) -> io::Result<(Version, Prefixed<IO>)> {
    let mut buf = [0u8; H2_PREFACE.len()];
    let mut filled = 0;
    let version = loop {
        if filled == buf.len() {
            break Version::Http2;
        }
        let mut read = ReadBuf::new(&mut buf[filled..]);
        std::future::poll_fn(|cx| Pin::new(&mut io).poll_read(cx, &mut read)).await?;
        let n = read.filled().len();
        if n == 0 || buf[filled..filled + n] != H2_PREFACE[filled..filled + n] {
            filled += n;
            break Version::Http1;
        }
        filled += n;
    };
    Ok((
        version,
        Prefixed::new(Bytes::copy_from_slice(&buf[..filled]), io),
    ))
}

impl<IO: AsyncRead + Unpin> AsyncRead for Prefixed<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            if self.prefix.is_empty() {
                // The buffer it came from goes now, not with the stream.
                self.prefix = Bytes::new();
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Prefixed<IO> {
    #[inline]
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    #[inline]
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    #[inline]
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    #[inline]
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn version_of(chunks: &[&[u8]]) -> (Version, Vec<u8>) {
        let (mut client, server) = tokio::io::duplex(64);
        for chunk in chunks {
            client.write_all(chunk).await.unwrap();
        }
        client.write_all(b"|rest").await.unwrap();
        drop(client);
        let (version, mut stream) = read_version(server).await.unwrap();
        let mut all = Vec::new();
        stream.read_to_end(&mut all).await.unwrap();
        (version, all)
    }

    #[tokio::test]
    async fn the_preface_means_http2_and_every_byte_is_read_back() {
        let (version, bytes) = version_of(&[H2_PREFACE]).await;
        assert_eq!(version, Version::Http2);
        assert_eq!(bytes, [H2_PREFACE, b"|rest"].concat());
    }

    #[tokio::test]
    async fn anything_else_means_http1_and_every_byte_is_read_back() {
        let (version, bytes) = version_of(&[b"GET / HTTP/1.1\r\n"]).await;
        assert_eq!(version, Version::Http1);
        assert_eq!(bytes, b"GET / HTTP/1.1\r\n|rest");
        // A request that starts like the preface and then differs.
        let (version, bytes) = version_of(&[b"PRI * HTTP/1.1"]).await;
        assert_eq!(version, Version::Http1);
        assert_eq!(bytes, b"PRI * HTTP/1.1|rest");
    }

    #[tokio::test]
    async fn a_preface_in_pieces_is_still_http2() {
        let (mut client, server) = tokio::io::duplex(64);
        let reading = tokio::spawn(read_version(server));
        for piece in H2_PREFACE.chunks(5) {
            client.write_all(piece).await.unwrap();
            tokio::task::yield_now().await;
        }
        let (version, mut stream) = reading.await.unwrap().unwrap();
        assert_eq!(version, Version::Http2);
        drop(client);
        let mut all = Vec::new();
        stream.read_to_end(&mut all).await.unwrap();
        assert_eq!(all, H2_PREFACE);
    }

    #[tokio::test]
    async fn a_peer_that_closes_at_once_reads_as_http1_with_nothing() {
        let (client, server) = tokio::io::duplex(64);
        drop(client);
        let (version, mut stream) = read_version(server).await.unwrap();
        assert_eq!(version, Version::Http1);
        let mut all = Vec::new();
        stream.read_to_end(&mut all).await.unwrap();
        assert!(all.is_empty());
    }

    #[tokio::test]
    async fn unread_bytes_come_before_what_is_left_of_the_prefix() {
        let (client, server) = tokio::io::duplex(64);
        drop(client);
        let mut stream = Prefixed::new(Bytes::from_static(b"cd"), server);
        stream.unread(Bytes::from_static(b"ab"));
        stream.unread(Bytes::new());
        let mut all = Vec::new();
        stream.read_to_end(&mut all).await.unwrap();
        assert_eq!(all, b"abcd");
    }
}
