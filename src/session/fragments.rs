//! A limit on fragments per message. tungstenite reassembles fragmented
//! messages itself and bounds only their total size, so a client could send a
//! 16 KiB message as 16,384 one-byte frames. This reader watches the frame
//! headers of the client's byte stream as they pass and fails the read once
//! a message has more than `limit` fragments.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A message arrived in more fragments than allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooFragmented;

/// Where the parser is in the client's frame stream.
#[derive(Debug, Clone, Copy)]
enum State {
    /// Collecting a header of `need` bytes (it grows as the length and mask
    /// fields are discovered); `have` are in `header`.
    Header { have: usize, need: usize },
    /// Skipping payload bytes.
    Payload { remaining: u64 },
}

/// Counts fragments of client frames; see the module docs.
#[derive(Debug)]
pub struct FragmentCounter {
    state: State,
    header: [u8; 14],
    /// Fragments of the message in progress (0: none in progress).
    fragments: u32,
    limit: u32,
}

impl FragmentCounter {
    pub fn new(limit: u32) -> Self {
        Self {
            state: State::Header { have: 0, need: 2 },
            header: [0; 14],
            fragments: 0,
            limit,
        }
    }

    /// Feeds bytes read from the client; `Err` once a message has too many
    /// fragments.
    pub fn feed(&mut self, mut data: &[u8]) -> Result<(), TooFragmented> {
        while !data.is_empty() {
            match self.state {
                State::Payload { remaining } => {
                    let take = remaining.min(data.len() as u64);
                    data = &data[take as usize..];
                    let remaining = remaining - take;
                    self.state = if remaining == 0 {
                        State::Header { have: 0, need: 2 }
                    } else {
                        State::Payload { remaining }
                    };
                }
                State::Header { have, need } => {
                    let take = (need - have).min(data.len());
                    self.header[have..have + take].copy_from_slice(&data[..take]);
                    data = &data[take..];
                    let have = have + take;
                    self.state = State::Header { have, need };
                    if have == need {
                        self.header_progress(have)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Called when `have` header bytes are in: either asks for more (length
    /// and mask fields) or finishes the header.
    fn header_progress(&mut self, have: usize) -> Result<(), TooFragmented> {
        let masked = self.header[1] & 0x80 != 0;
        let len7 = self.header[1] & 0x7f;
        let ext = match len7 {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        let full = 2 + ext + if masked { 4 } else { 0 };
        if have < full {
            self.state = State::Header { have, need: full };
            return Ok(());
        }
        let payload = match ext {
            2 => u16::from_be_bytes([self.header[2], self.header[3]]) as u64,
            8 => {
                let mut bytes = [0u8; 8];
                bytes.copy_from_slice(&self.header[2..10]);
                u64::from_be_bytes(bytes)
            }
            _ => len7 as u64,
        };
        self.count(self.header[0] & 0x80 != 0, self.header[0] & 0x0f)?;
        self.state = if payload == 0 {
            State::Header { have: 0, need: 2 }
        } else {
            State::Payload { remaining: payload }
        };
        Ok(())
    }

    fn count(&mut self, fin: bool, opcode: u8) -> Result<(), TooFragmented> {
        match opcode {
            // A data frame starts a message.
            1 | 2 => self.fragments = 1,
            // A continuation adds a fragment.
            0 => self.fragments = self.fragments.saturating_add(1),
            // Control frames may sit between fragments; they do not count.
            _ => return Ok(()),
        }
        if self.fragments > self.limit {
            return Err(TooFragmented);
        }
        if fin {
            self.fragments = 0;
        }
        Ok(())
    }
}

/// An I/O stream whose reads pass through a [`FragmentCounter`].
pub struct FragmentLimited<S> {
    inner: S,
    counter: FragmentCounter,
    /// Set when the limit was exceeded, so the session can say why it closes.
    tripped: Arc<AtomicBool>,
}

impl<S> FragmentLimited<S> {
    pub fn new(inner: S, limit: u32, tripped: Arc<AtomicBool>) -> Self {
        Self {
            inner,
            counter: FragmentCounter::new(limit),
            tripped,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for FragmentLimited<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.tripped.load(Ordering::Relaxed) {
            return Poll::Ready(Err(too_fragmented()));
        }
        let before = buf.filled().len();
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if this.counter.feed(&buf.filled()[before..]).is_err() {
                    this.tripped.store(true, Ordering::Relaxed);
                    return Poll::Ready(Err(too_fragmented()));
                }
                Poll::Ready(Ok(()))
            }
            other => other,
        }
    }
}

fn too_fragmented() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        "too many fragments in one message",
    )
}

impl<S: AsyncWrite + Unpin> AsyncWrite for FragmentLimited<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A masked client frame header and payload.
    fn frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![(if fin { 0x80 } else { 0 }) | opcode];
        match payload.len() {
            n if n < 126 => out.push(0x80 | n as u8),
            n if n < 65_536 => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(0x80 | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(&[1, 2, 3, 4]);
        out.extend_from_slice(payload);
        out
    }

    fn message(fragments: usize, payload: &[u8]) -> Vec<u8> {
        let mut out = frame(fragments == 1, 1, payload);
        for i in 1..fragments {
            out.extend(frame(i + 1 == fragments, 0, payload));
        }
        out
    }

    #[test]
    fn counts_fragments_across_any_split() {
        let mut stream = message(3, b"abc");
        stream.extend(frame(true, 9, b"ping")); // control frame
        stream.extend(message(4, &[7u8; 300]));
        stream.extend(message(1, &vec![0u8; 70_000]));
        for chunk in [1, 2, 5, 13, 4096, stream.len()] {
            let mut counter = FragmentCounter::new(4);
            for piece in stream.chunks(chunk) {
                counter.feed(piece).unwrap();
            }
        }
        let mut counter = FragmentCounter::new(3);
        assert!(counter.feed(&message(4, b"x")).is_err());
    }

    #[test]
    fn control_frames_between_fragments_do_not_count() {
        let mut stream = frame(false, 1, b"a");
        stream.extend(frame(true, 9, b""));
        stream.extend(frame(true, 10, b""));
        stream.extend(frame(true, 0, b"b"));
        let mut counter = FragmentCounter::new(2);
        counter.feed(&stream).unwrap();
    }
}
