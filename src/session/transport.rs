//! The two directions of a session's connection.
//!
//! Server frames are written by the session's writer straight to the TLS
//! stream: a 2–10 byte WebSocket header per message in front of the message
//! bytes that every recipient shares, everything queued gathered into one
//! vectored write (one pass through rustls, so as few TLS records and system
//! calls as the batch allows) and one flush. Server frames are never masked
//! or fragmented, so there is nothing more to framing them.
//!
//! Client frames are parsed by tungstenite on the read half. What it writes
//! back on its own (the pong to a ping, the echo of a close) goes to the
//! writer through the outbox, so only the writer ever writes to the stream.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::prefixed::Prefixed;
use crate::tls_stream::TlsStream;

use super::outbox::{Outbox, Outgoing};

const OPCODE_TEXT: u8 = 0x1;
const OPCODE_CLOSE: u8 = 0x8;
const OPCODE_PING: u8 = 0x9;

/// The header of a final, unmasked server frame.
#[derive(Debug, Clone, Copy)]
pub struct Header {
    bytes: [u8; 10],
    len: u8,
}

impl Header {
    pub fn new(opcode: u8, payload_len: usize) -> Self {
        let mut bytes = [0u8; 10];
        bytes[0] = 0x80 | opcode;
        let len = if payload_len < 126 {
            bytes[1] = payload_len as u8;
            2
        } else if let Ok(short) = u16::try_from(payload_len) {
            bytes[1] = 126;
            bytes[2..4].copy_from_slice(&short.to_be_bytes());
            4
        } else {
            bytes[1] = 127;
            bytes[2..10].copy_from_slice(&(payload_len as u64).to_be_bytes());
            10
        };
        Self { bytes, len }
    }

    pub fn as_slice(&self) -> &[u8] {
        &self.bytes[..self.len as usize]
    }
}

/// A ping with no payload.
pub fn ping_frame() -> Bytes {
    Bytes::copy_from_slice(Header::new(OPCODE_PING, 0).as_slice())
}

/// A close frame with `code` and `reason` (cut to the 123 bytes a control
/// frame has room for, at a character boundary).
pub fn close_frame(code: u16, reason: &str) -> Bytes {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let reason = &reason.as_bytes()[..end];
    let mut frame = Vec::with_capacity(4 + reason.len());
    frame.extend_from_slice(Header::new(OPCODE_CLOSE, 2 + reason.len()).as_slice());
    frame.extend_from_slice(&code.to_be_bytes());
    frame.extend_from_slice(reason);
    Bytes::from(frame)
}

/// A session's connection. After an HTTP/1.1 upgrade, the TLS (or plain
/// TCP) stream itself, taken back from hyper with the bytes hyper had read
/// past the request: no boxed stream to go through on every write. A
/// WebSocket over HTTP/2 is one stream of a shared connection, so it stays
/// hyper's upgraded stream.
// The TLS stream is held in place: it is what nearly every session is, and
// a box of its own is the pointer this type exists to remove.
#[allow(clippy::large_enum_variant)]
pub enum Io {
    Tls(Prefixed<TlsStream>),
    Plain(Prefixed<TcpStream>),
    Http2(TokioIo<Upgraded>),
}

impl Io {
    /// The connection hyper hands over after the upgrade.
    pub fn from_upgraded(upgraded: Upgraded) -> Self {
        fn take<T>(parts: hyper::upgrade::Parts<TokioIo<Prefixed<T>>>) -> Prefixed<T> {
            let mut io = parts.io.into_inner();
            io.unread(parts.read_buf);
            io
        }
        let upgraded = match upgraded.downcast::<TokioIo<Prefixed<TlsStream>>>() {
            Ok(parts) => return Self::Tls(take(parts)),
            Err(upgraded) => upgraded,
        };
        match upgraded.downcast::<TokioIo<Prefixed<TcpStream>>>() {
            Ok(parts) => Self::Plain(take(parts)),
            Err(upgraded) => Self::Http2(TokioIo::new(upgraded)),
        }
    }

    /// Which of the three it is (the `stream` of the `conn.open` log line).
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Tls(_) => "tls",
            Self::Plain(_) => "tcp",
            Self::Http2(_) => "h2-stream",
        }
    }
}

/// Forwards to the stream inside `$of` (an `Io`, by reference).
macro_rules! each {
    ($of:expr, $io:ident => $call:expr) => {
        match $of {
            Io::Tls($io) => $call,
            Io::Plain($io) => $call,
            Io::Http2($io) => $call,
        }
    };
}

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        each!(self.get_mut(), io => Pin::new(io).poll_read(cx, buf))
    }
}

impl AsyncWrite for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        each!(self.get_mut(), io => Pin::new(io).poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        each!(self.get_mut(), io => Pin::new(io).poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        each!(self, io => io.is_write_vectored())
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each!(self.get_mut(), io => Pin::new(io).poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each!(self.get_mut(), io => Pin::new(io).poll_shutdown(cx))
    }
}

/// Batches up to this size are framed on the stack; larger ones in vectors.
const INLINE_BATCH: usize = 16;

/// Writes `batch` (as few writes as the stream allows) and flushes once.
pub async fn write_batch<W>(io: &mut W, batch: &[Outgoing]) -> io::Result<()>
where
    W: AsyncWrite + Unpin + ?Sized,
{
    let mut sent = 0;
    std::future::poll_fn(|cx| poll_write_batch(io, batch, &mut sent, cx)).await
}

/// Writes what is left of `batch` after its first `sent` bytes, then
/// flushes. The framing is redone on each call, on the stack, so a write
/// in progress is only this count: nothing is held between polls.
pub fn poll_write_batch<W>(
    io: &mut W,
    batch: &[Outgoing],
    sent: &mut usize,
    cx: &mut Context<'_>,
) -> Poll<io::Result<()>>
where
    W: AsyncWrite + Unpin + ?Sized,
{
    let total: usize = batch.iter().map(framed_len).sum();
    while *sent < total {
        let n = ready!(poll_write_from(io, batch, *sent, cx))?;
        if n == 0 {
            return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
        }
        *sent += n;
    }
    Pin::new(io).poll_flush(cx)
}

/// The size of an item on the wire.
fn framed_len(item: &Outgoing) -> usize {
    match item {
        Outgoing::Text(text) => Header::new(OPCODE_TEXT, text.len()).len as usize + text.len(),
        Outgoing::Framed(bytes) => bytes.len(),
    }
}

/// One write of the batch from byte `skip` on.
fn poll_write_from<W>(
    io: &mut W,
    batch: &[Outgoing],
    skip: usize,
    cx: &mut Context<'_>,
) -> Poll<io::Result<usize>>
where
    W: AsyncWrite + Unpin + ?Sized,
{
    let blank = Header::new(OPCODE_TEXT, 0);
    if batch.len() <= INLINE_BATCH {
        // The common case (a message or a few per wake-up) allocates nothing.
        let mut headers = [blank; INLINE_BATCH];
        let mut slices = [IoSlice::new(&[]); 2 * INLINE_BATCH];
        poll_write_framed(io, batch, skip, &mut headers, &mut slices, cx)
    } else {
        let mut headers = vec![blank; batch.len()];
        let mut slices = vec![IoSlice::new(&[]); 2 * batch.len()];
        poll_write_framed(io, batch, skip, &mut headers, &mut slices, cx)
    }
}

/// Frames `batch` into `headers` and `slices` (room for a header each and
/// two slices each) and writes it from byte `skip` on.
fn poll_write_framed<'a, W>(
    io: &mut W,
    batch: &'a [Outgoing],
    skip: usize,
    headers: &'a mut [Header],
    slices: &mut [IoSlice<'a>],
    cx: &mut Context<'_>,
) -> Poll<io::Result<usize>>
where
    W: AsyncWrite + Unpin + ?Sized,
{
    frame_headers(batch, headers);
    let count = fill_slices(batch, headers, slices);
    let mut rest = &mut slices[..count];
    IoSlice::advance_slices(&mut rest, skip);
    if !io.is_write_vectored() {
        // A stream without vectored writes (WebSocket over HTTP/2) would
        // take one slice per write, each its own DATA frame: gather first.
        let mut bytes = Vec::with_capacity(rest.iter().map(|s| s.len()).sum());
        for slice in rest.iter() {
            bytes.extend_from_slice(slice);
        }
        return Pin::new(io).poll_write(cx, &bytes);
    }
    Pin::new(io).poll_write_vectored(cx, rest)
}

/// The header of each text item, at its index in the batch.
fn frame_headers(batch: &[Outgoing], headers: &mut [Header]) {
    for (item, header) in batch.iter().zip(headers.iter_mut()) {
        if let Outgoing::Text(text) = item {
            *header = Header::new(OPCODE_TEXT, text.len());
        }
    }
}

/// The batch as slices: header and body of each text, framed bytes as they
/// are. Returns how many slices were filled.
fn fill_slices<'a>(
    batch: &'a [Outgoing],
    headers: &'a [Header],
    slices: &mut [IoSlice<'a>],
) -> usize {
    let mut count = 0;
    for (item, header) in batch.iter().zip(headers) {
        match item {
            Outgoing::Text(text) => {
                slices[count] = IoSlice::new(header.as_slice());
                slices[count + 1] = IoSlice::new(text.as_bytes());
                count += 2;
            }
            Outgoing::Framed(bytes) => {
                slices[count] = IoSlice::new(bytes);
                count += 1;
            }
        }
    }
    count
}

/// The read half as tungstenite sees it: reads pass through, writes (its
/// control replies) are queued for the writer and never block.
pub struct ReplyIo<R> {
    read: R,
    replies: Outbox,
}

impl<R> ReplyIo<R> {
    pub fn new(read: R, replies: Outbox) -> Self {
        Self { read, replies }
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for ReplyIo<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.read).poll_read(cx, buf)
    }
}

impl<R: Unpin> AsyncWrite for ReplyIo<R> {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        // tungstenite hands over whole frames in one write. A refused push
        // (the session is closing, or its queue is full and it is being
        // closed for that) needs no reply written.
        self.replies.push_framed(Bytes::copy_from_slice(buf));
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_tungstenite::tungstenite::protocol::frame::FrameHeader;

    /// Parses `frame` with tungstenite: (header, payload).
    fn parse(frame: &[u8]) -> (FrameHeader, Vec<u8>) {
        let mut cursor = io::Cursor::new(frame);
        let (header, len) = FrameHeader::parse(&mut cursor)
            .expect("valid header")
            .expect("complete header");
        let start = cursor.position() as usize;
        assert_eq!(frame.len() - start, len as usize, "payload length");
        (header, frame[start..].to_vec())
    }

    #[test]
    fn headers_use_the_shortest_length_form() {
        for len in [0, 1, 125, 126, 127, 65_535, 65_536, 1 << 20] {
            let payload = vec![b'x'; len];
            let mut frame = Header::new(OPCODE_TEXT, len).as_slice().to_vec();
            let expected_header = match len {
                0..=125 => 2,
                126..=65_535 => 4,
                _ => 10,
            };
            assert_eq!(frame.len(), expected_header, "header for {len}");
            frame.extend_from_slice(&payload);
            let (header, body) = parse(&frame);
            assert!(header.is_final);
            assert!(header.mask.is_none());
            assert_eq!(body.len(), len);
        }
    }

    #[test]
    fn close_frames_carry_code_and_a_bounded_reason() {
        let (header, body) = parse(&close_frame(4009, "slow_consumer"));
        assert_eq!(u8::from(header.opcode), OPCODE_CLOSE);
        assert_eq!(&body[..2], &4009u16.to_be_bytes());
        assert_eq!(&body[2..], b"slow_consumer");
        // 200 bytes of two-byte characters: cut at a boundary within 123.
        let long = "é".repeat(100);
        let (_, body) = parse(&close_frame(1000, &long));
        assert!(body.len() <= 125);
        assert!(std::str::from_utf8(&body[2..]).is_ok());
    }

    #[tokio::test]
    async fn a_batch_is_written_as_frames_in_order() {
        let batch: Vec<Outgoing> = [
            Outgoing::Text("first".into()),
            Outgoing::Framed(ping_frame()),
            Outgoing::Text("x".repeat(300).into()),
        ]
        .into_iter()
        .collect();
        let mut out = Vec::new();
        write_batch(&mut out, &batch).await.expect("written");
        let mut expected = vec![0x81, 5];
        expected.extend_from_slice(b"first");
        expected.extend_from_slice(&[0x89, 0]);
        expected.extend_from_slice(&[0x81, 126, 1, 44]);
        expected.extend_from_slice("x".repeat(300).as_bytes());
        assert_eq!(out, expected);
    }

    /// A stream without vectored writes that records each write.
    #[derive(Default)]
    struct PlainWrites(Vec<Vec<u8>>);

    impl AsyncWrite for PlainWrites {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.0.push(buf.to_vec());
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn without_vectored_writes_a_batch_is_one_write() {
        let batch: Vec<Outgoing> = [
            Outgoing::Text("a".into()),
            Outgoing::Framed(ping_frame()),
            Outgoing::Text("b".into()),
        ]
        .into_iter()
        .collect();
        let mut io = PlainWrites::default();
        write_batch(&mut io, &batch).await.expect("written");
        assert_eq!(io.0, [vec![0x81, 1, b'a', 0x89, 0, 0x81, 1, b'b']]);
    }

    /// A stream that takes at most 3 bytes per write and is not ready on
    /// every other call.
    #[derive(Default)]
    struct Dribble {
        out: Vec<u8>,
        calls: usize,
    }

    impl AsyncWrite for Dribble {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.calls += 1;
            if self.calls.is_multiple_of(2) {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            let n = buf.len().min(3);
            self.out.extend_from_slice(&buf[..n]);
            Poll::Ready(Ok(n))
        }
        fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn a_batch_written_in_pieces_resumes_where_it_stopped() {
        let batch: Vec<Outgoing> = (0..INLINE_BATCH + 4)
            .map(|i| {
                if i % 5 == 0 {
                    Outgoing::Framed(ping_frame())
                } else {
                    Outgoing::Text(format!("message {i}").into())
                }
            })
            .collect();
        let mut whole = Vec::new();
        write_batch(&mut whole, &batch).await.expect("written");
        let mut dribble = Dribble::default();
        write_batch(&mut dribble, &batch).await.expect("written");
        assert_eq!(dribble.out, whole);
        assert!(dribble.calls > whole.len() / 3, "written in pieces");
    }

    #[tokio::test]
    async fn large_batches_are_framed_like_small_ones() {
        let batch: Vec<Outgoing> = (0..INLINE_BATCH * 3)
            .map(|i| Outgoing::Text(format!("m{i}").into()))
            .collect();
        let mut out = Vec::new();
        write_batch(&mut out, &batch).await.expect("written");
        let mut expected = Vec::new();
        for i in 0..INLINE_BATCH * 3 {
            let body = format!("m{i}");
            expected.extend_from_slice(&[0x81, body.len() as u8]);
            expected.extend_from_slice(body.as_bytes());
        }
        assert_eq!(out, expected);
    }
}
