//! Server-side TLS over TCP with rustls's unbuffered API.
//!
//! rustls's buffered connection (what `tokio-rustls` drives) keeps a 4 KiB
//! receive buffer for the whole life of every connection, sized before each
//! read and never given back: for an idle chat connection that is most of
//! what it holds. Here received bytes are read into one buffer per worker
//! thread and processed there; a connection keeps only the part of a record
//! that has not fully arrived. Outgoing records are encrypted into a
//! per-thread buffer and sent from it; a connection keeps only what the
//! kernel did not take. An idle connection holds no buffer at all.
//!
//! Every buffer is bounded: an incomplete record (or handshake flight) by
//! [`MAX_INCOMING`], plaintext waiting for a reader by one read's worth of
//! records, unsent records by one write's worth ([`MAX_PLAINTEXT_PER_WRITE`]
//! plus record overhead): a write is taken only once the previous one is out.

use std::cell::RefCell;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use rustls::ServerConfig;
use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::unbuffered::{
    ConnectionState, EncodeError, EncryptError, InsufficientSizeError, UnbufferedStatus,
    WriteTraffic,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// The largest TLS record on the wire: header, 16 KiB of plaintext and the
/// most expansion TLS 1.2 allows. One read of this size always completes a
/// record.
const READ_SIZE: usize = 5 + 16 * 1024 + 2048;

/// Most bytes of incomplete records a connection keeps: a handshake message
/// (a client certificate chain) may span several records, which rustls
/// joins in place. rustls refuses handshake messages over 64 KiB and
/// records over their maximum size itself; this bound backs that up.
pub const MAX_INCOMING: usize = 64 * 1024 + READ_SIZE;

/// Most plaintext encrypted and sent by one write: one full record.
const MAX_PLAINTEXT_PER_WRITE: usize = 16 * 1024;

/// Room for one write's records (and a queued alert or key update).
const TLS_SCRATCH: usize = MAX_PLAINTEXT_PER_WRITE + 1024;

/// Buffers shared by every connection a worker thread serves; only used
/// within one poll, never across an await.
struct Scratch {
    read: Box<[u8]>,
    plain: Vec<u8>,
    tls: Vec<u8>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch {
        read: vec![0; READ_SIZE].into_boxed_slice(),
        plain: Vec::with_capacity(MAX_PLAINTEXT_PER_WRITE),
        tls: vec![0; TLS_SCRATCH],
    });
}

/// A server TLS connection over TCP.
pub struct TlsStream {
    tcp: TcpStream,
    conn: UnbufferedServerConnection,
    /// Received bytes not yet processed: an incomplete record (or, during
    /// the handshake, records rustls has not finished joining).
    incoming: Vec<u8>,
    /// Decrypted bytes the reader has not taken yet, from `plain_pos`.
    plain: Vec<u8>,
    plain_pos: usize,
    /// Records not yet taken by the kernel.
    outgoing: Vec<u8>,
    /// The peer closed (close_notify or end of stream).
    eof: bool,
    /// A TLS error ended the connection.
    failed: bool,
    close_notify_sent: bool,
}

impl std::fmt::Debug for TlsStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsStream")
            .field("peer", &self.tcp.peer_addr().ok())
            .field("handshaking", &self.conn.is_handshaking())
            .field("eof", &self.eof)
            .field("failed", &self.failed)
            .finish_non_exhaustive()
    }
}

/// Runs the server side of the TLS handshake on `tcp`.
pub async fn accept(config: Arc<ServerConfig>, tcp: TcpStream) -> io::Result<TlsStream> {
    let conn = UnbufferedServerConnection::new(config).map_err(tls_error)?;
    let mut stream = TlsStream {
        tcp,
        conn,
        incoming: Vec::new(),
        plain: Vec::new(),
        plain_pos: 0,
        outgoing: Vec::new(),
        eof: false,
        failed: false,
        close_notify_sent: false,
    };
    std::future::poll_fn(|cx| stream.poll_handshake(cx)).await?;
    Ok(stream)
}

fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

fn failed_error() -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionAborted,
        "the TLS connection failed",
    )
}

impl TlsStream {
    /// The TLS state: negotiated protocol, ALPN, the client's certificates.
    pub fn connection(&self) -> &rustls::CommonState {
        &self.conn
    }

    fn poll_handshake(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            ready!(self.poll_flush_outgoing(cx))?;
            if !self.conn.is_handshaking() {
                return Poll::Ready(Ok(()));
            }
            if self.eof {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the client closed the connection during the TLS handshake",
                )));
            }
            ready!(self.poll_fill(cx, None))?;
        }
    }

    /// Reads from the socket and processes what arrived: decrypted bytes go
    /// to `out` as far as it has room, then to `self.plain`; handshake
    /// records to `self.outgoing`. Ready after one read.
    fn poll_fill(
        &mut self,
        cx: &mut Context<'_>,
        out: Option<&mut ReadBuf<'_>>,
    ) -> Poll<io::Result<()>> {
        SCRATCH.with_borrow_mut(|scratch| {
            let mut read = ReadBuf::new(&mut scratch.read);
            ready!(Pin::new(&mut self.tcp).poll_read(cx, &mut read))?;
            let n = read.filled().len();
            if n == 0 {
                if !self.incoming.is_empty() {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the connection ended inside a TLS record",
                    )));
                }
                self.eof = true;
                return Poll::Ready(Ok(()));
            }
            if self.incoming.is_empty() {
                // The usual case: whole records, processed where they were read.
                let data = &mut scratch.read[..n];
                let used = self.process(data, out, None)?;
                if used < n {
                    self.incoming.extend_from_slice(&data[used..]);
                }
            } else {
                if self.incoming.len() + n > MAX_INCOMING {
                    self.failed = true;
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "too many bytes of incomplete TLS records",
                    )));
                }
                self.incoming.extend_from_slice(&scratch.read[..n]);
                let mut incoming = std::mem::take(&mut self.incoming);
                let used = self.process(&mut incoming, out, None);
                let used = match used {
                    Ok(used) => used,
                    Err(e) => {
                        self.incoming = incoming;
                        return Poll::Ready(Err(e));
                    }
                };
                incoming.drain(..used);
                if !incoming.is_empty() {
                    // Given back once mostly unused; not on every read, so
                    // a record trickled in a byte at a time costs no copy
                    // of itself per byte.
                    if incoming.capacity() > 2 * incoming.len().max(1024) {
                        incoming.shrink_to_fit();
                    }
                    self.incoming = incoming;
                }
            }
            Poll::Ready(Ok(()))
        })
    }

    /// Processes the records in `data` and returns how many bytes were
    /// consumed (the rest is an incomplete record). Stops where rustls needs
    /// more input or is ready for application data, which `on_write`, if
    /// given, is then run with.
    fn process(
        &mut self,
        data: &mut [u8],
        mut out: Option<&mut ReadBuf<'_>>,
        mut on_write: Option<&mut OnWrite<'_>>,
    ) -> io::Result<usize> {
        let mut offset = 0;
        loop {
            let UnbufferedStatus { mut discard, state } =
                self.conn.process_tls_records(&mut data[offset..]);
            let state = match state {
                Ok(state) => state,
                Err(e) => {
                    self.failed = true;
                    let rest = (offset + discard).min(data.len());
                    self.send_alert(&mut data[rest..]);
                    return Err(tls_error(e));
                }
            };
            let more = match state {
                ConnectionState::ReadTraffic(mut traffic) => {
                    while let Some(record) = traffic.next_record() {
                        let record = record.map_err(tls_error)?;
                        discard += record.discard;
                        let mut payload = record.payload;
                        if let Some(out) = out.as_deref_mut() {
                            let now = payload.len().min(out.remaining());
                            out.put_slice(&payload[..now]);
                            payload = &payload[now..];
                        }
                        self.plain.extend_from_slice(payload);
                    }
                    true
                }
                ConnectionState::EncodeTlsData(mut encode) => {
                    encode_into(&mut self.outgoing, |buf| encode.encode(buf))?;
                    true
                }
                ConnectionState::TransmitTlsData(transmit) => {
                    // The records are in `outgoing`, which is sent in order
                    // before anything written after them.
                    transmit.done();
                    true
                }
                ConnectionState::PeerClosed => {
                    // Sending stays possible: the next state says so.
                    self.eof = true;
                    true
                }
                ConnectionState::Closed => {
                    self.eof = true;
                    false
                }
                ConnectionState::WriteTraffic(mut traffic) => {
                    if let Some(on_write) = on_write.as_mut() {
                        on_write(&mut traffic);
                    }
                    false
                }
                ConnectionState::BlockedHandshake => false,
                // Early data is not enabled (rustls's default); anything
                // else is a state this version does not know.
                _ => {
                    self.failed = true;
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "unexpected TLS connection state",
                    ));
                }
            };
            offset += discard;
            if !more {
                return Ok(offset);
            }
        }
    }

    /// After a TLS error: queues the alert rustls prepared and tries once to
    /// send it (the connection is closed after). `rest` is the unprocessed
    /// input, the buffer rustls expects.
    fn send_alert(&mut self, rest: &mut [u8]) {
        loop {
            match self.conn.process_tls_records(rest).state {
                Ok(ConnectionState::EncodeTlsData(mut encode)) => {
                    if encode_into(&mut self.outgoing, |buf| encode.encode(buf)).is_err() {
                        break;
                    }
                }
                Ok(ConnectionState::TransmitTlsData(transmit)) => transmit.done(),
                _ => break,
            }
        }
        if !self.outgoing.is_empty() {
            let _ = self.tcp.try_write(&self.outgoing);
            self.outgoing = Vec::new();
        }
    }

    /// Sends `outgoing` (waiting for the socket as needed).
    fn poll_flush_outgoing(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.outgoing.is_empty() {
            let n = ready!(Pin::new(&mut self.tcp).poll_write(cx, &self.outgoing))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.outgoing.drain(..n);
        }
        if self.outgoing.capacity() > 0 {
            self.outgoing = Vec::new();
        }
        Poll::Ready(Ok(()))
    }

    /// Sends what the read side queued (a key update, say) if the socket
    /// takes it now. Only the writer waits for write readiness: a reader
    /// registering for it would take the writer's wake-up.
    fn try_flush_outgoing(&mut self) -> io::Result<()> {
        while !self.outgoing.is_empty() {
            match self.tcp.try_write(&self.outgoing) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.outgoing.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Brings rustls to its writing state and runs `f` on it. rustls is
    /// given the bytes the reader kept as its buffer, as its API requires
    /// (a handshake message it is joining across records lives there).
    fn with_write_traffic<R>(
        &mut self,
        f: impl FnOnce(&mut WriteTraffic<'_, ServerConnectionData>) -> R,
    ) -> io::Result<R> {
        let mut f = Some(f);
        let mut result = None;
        let mut run = |traffic: &mut WriteTraffic<'_, ServerConnectionData>| {
            if let Some(f) = f.take() {
                result = Some(f(traffic));
            }
        };
        let mut incoming = std::mem::take(&mut self.incoming);
        let processed = self.process(&mut incoming, None, Some(&mut run));
        if let Ok(used) = processed {
            incoming.drain(..used);
        }
        self.incoming = incoming;
        processed?;
        match result {
            Some(result) => Ok(result),
            None if self.eof => Err(io::ErrorKind::BrokenPipe.into()),
            None => Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "the TLS handshake is not complete",
            )),
        }
    }

    /// Encrypts `plain` into `tls` (grown if too small); returns the length
    /// of the records. Records rustls queued itself (a key update) are in
    /// `outgoing`, ahead of these.
    fn encrypt(&mut self, plain: &[u8], tls: &mut Vec<u8>) -> io::Result<usize> {
        self.with_write_traffic(|traffic| encrypt_into(tls, |out| traffic.encrypt(plain, out)))?
    }

    /// Hands over plaintext already decrypted; `true` if any was.
    fn take_plain(&mut self, buf: &mut ReadBuf<'_>) -> bool {
        let pending = &self.plain[self.plain_pos..];
        if pending.is_empty() || buf.remaining() == 0 {
            return false;
        }
        let n = pending.len().min(buf.remaining());
        buf.put_slice(&pending[..n]);
        self.plain_pos += n;
        if self.plain_pos == self.plain.len() {
            // Given back: an idle connection holds no buffer.
            self.plain = Vec::new();
            self.plain_pos = 0;
        }
        true
    }
}

/// What a write does once rustls is ready for application data.
type OnWrite<'a> = dyn FnMut(&mut WriteTraffic<'_, ServerConnectionData>) + 'a;

/// Runs one of rustls's encrypting calls into `buf`, growing it as asked;
/// the length written.
fn encrypt_into(
    buf: &mut Vec<u8>,
    mut encrypt: impl FnMut(&mut [u8]) -> Result<usize, EncryptError>,
) -> io::Result<usize> {
    loop {
        match encrypt(buf) {
            Ok(n) => return Ok(n),
            Err(EncryptError::InsufficientSize(InsufficientSizeError { required_size })) => {
                buf.resize(required_size, 0)
            }
            Err(e) => return Err(io::Error::other(e.to_string())),
        }
    }
}

/// Runs rustls's `encode` into the end of `out`, growing it as asked.
fn encode_into(
    out: &mut Vec<u8>,
    mut encode: impl FnMut(&mut [u8]) -> Result<usize, EncodeError>,
) -> io::Result<()> {
    let start = out.len();
    let mut room = 512;
    loop {
        out.resize(start + room, 0);
        match encode(&mut out[start..]) {
            Ok(n) => {
                out.truncate(start + n);
                return Ok(());
            }
            Err(EncodeError::InsufficientSize(InsufficientSizeError { required_size })) => {
                room = required_size;
            }
            Err(e) => {
                out.truncate(start);
                return Err(io::Error::other(e.to_string()));
            }
        }
    }
}

impl AsyncRead for TlsStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.take_plain(buf) || buf.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            if this.failed {
                return Poll::Ready(Err(failed_error()));
            }
            let before = buf.filled().len();
            ready!(this.poll_fill(cx, Some(buf)))?;
            // The writer sends it otherwise, before its next records.
            let _ = this.try_flush_outgoing();
            if buf.filled().len() > before {
                return Poll::Ready(Ok(()));
            }
        }
    }
}

impl AsyncWrite for TlsStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(buf)])
    }

    /// Encrypts up to one record of `bufs` and sends it with one `send(2)`;
    /// what the kernel does not take is kept and sent before the next write.
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.failed {
            return Poll::Ready(Err(failed_error()));
        }
        ready!(this.poll_flush_outgoing(cx))?;
        let total = bufs.iter().map(|b| b.len()).sum::<usize>();
        if total == 0 {
            return Poll::Ready(Ok(0));
        }
        let take = total.min(MAX_PLAINTEXT_PER_WRITE);
        SCRATCH.with_borrow_mut(|scratch| {
            let Scratch { plain, tls, .. } = scratch;
            let first = bufs
                .iter()
                .find(|b| !b.is_empty())
                .map_or(&[][..], |b| &b[..]);
            let data: &[u8] = if first.len() >= take {
                &first[..take]
            } else {
                plain.clear();
                for b in bufs {
                    let room = take - plain.len();
                    plain.extend_from_slice(&b[..b.len().min(room)]);
                    if plain.len() == take {
                        break;
                    }
                }
                plain
            };
            let n = this.encrypt(data, tls)?;
            let records = &tls[..n];
            if !this.outgoing.is_empty() {
                // Records rustls queued itself go first.
                this.outgoing.extend_from_slice(records);
                let _ = this.poll_flush_outgoing(cx)?;
                return Poll::Ready(Ok(take));
            }
            match Pin::new(&mut this.tcp).poll_write(cx, records) {
                Poll::Ready(Ok(sent)) => {
                    if sent < n {
                        this.outgoing.extend_from_slice(&records[sent..]);
                    }
                }
                Poll::Pending => this.outgoing.extend_from_slice(records),
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            }
            Poll::Ready(Ok(take))
        })
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().poll_flush_outgoing(cx)
    }

    /// Sends close_notify, then ends the TCP stream's sending side.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.close_notify_sent && !this.failed {
            this.close_notify_sent = true;
            let mut alert = vec![0u8; 64];
            let queued = this.with_write_traffic(|traffic| {
                encrypt_into(&mut alert, |out| traffic.queue_close_notify(out))
            });
            // A connection that cannot send it (never completed, already
            // closed) just ends.
            if let Ok(Ok(n)) = queued {
                this.outgoing.extend_from_slice(&alert[..n]);
            }
        }
        ready!(this.poll_flush_outgoing(cx))?;
        Pin::new(&mut this.tcp).poll_shutdown(cx)
    }
}
