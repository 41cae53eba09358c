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
//! After a TLS 1.3 handshake even rustls's connection goes: it keeps, for
//! the life of the connection, buffers and state it needs only to
//! handshake (about 1.4 KiB), and its key schedule for key updates
//! (another 0.8 KiB). [`Records`] takes over with the keys rustls
//! negotiated, aws-lc's AEAD to protect the records, and the two traffic
//! secrets, caught from rustls during the handshake, to derive the next
//! keys on a key update. TLS 1.2 connections stay with rustls.
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

use aws_lc_rs::aead::{self, LessSafeKey, UnboundKey};
use rustls::Tls13CipherSuite;
use rustls::crypto::cipher::{Iv, NONCE_LEN, Nonce, make_tls13_aad};
use rustls::crypto::tls13::{HkdfExpander, OkmBlock};
use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::unbuffered::{
    ConnectionState, EncodeError, EncryptError, InsufficientSizeError, UnbufferedStatus,
    WriteTraffic,
};
use rustls::{
    AlertDescription, ConnectionTrafficSecrets, ContentType, ProtocolVersion, ServerConfig,
    SupportedCipherSuite,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use zeroize::{Zeroize, Zeroizing};

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
    conn: Conn,
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

/// Who protects the records.
// `Records` is held in place, not boxed: every record sealed or opened
// reads it, and behind a pointer of its own it was one more cache line to
// fetch from memory per write when a message goes to many connections in
// turn. A connection in its handshake carries the unused space briefly.
#[allow(clippy::large_enum_variant)]
enum Conn {
    /// rustls: the handshake, and TLS 1.2 connections throughout; with
    /// the traffic secrets caught during a TLS 1.3 handshake.
    Rustls(Box<UnbufferedServerConnection>, Option<Box<Caught>>),
    /// TLS 1.3 after the handshake (see [`Records`]).
    Records(Records),
    /// Only while one becomes the other.
    Switching,
}

/// A completed handshake.
pub struct Accepted {
    pub stream: TlsStream,
    /// The subject of the client's verified certificate, if it sent one.
    pub client_subject: Option<String>,
}

impl std::fmt::Debug for TlsStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsStream")
            .field("peer", &self.tcp.peer_addr().ok())
            .field("handshaking", &self.handshaking())
            .field("eof", &self.eof)
            .field("failed", &self.failed)
            .finish_non_exhaustive()
    }
}

/// Runs the server side of the TLS handshake on `tcp`. A TLS 1.3
/// connection's records are then protected by [`Records`] (when `config`
/// allows its secrets to be taken from rustls).
pub async fn accept(config: Arc<ServerConfig>, tcp: TcpStream) -> io::Result<Accepted> {
    let take_over = config.enable_secret_extraction;
    let conn = UnbufferedServerConnection::new(config).map_err(tls_error)?;
    let mut stream = TlsStream {
        tcp,
        conn: Conn::Rustls(Box::new(conn), None),
        incoming: Vec::new(),
        plain: Vec::new(),
        plain_pos: 0,
        outgoing: Vec::new(),
        eof: false,
        failed: false,
        close_notify_sent: false,
    };
    std::future::poll_fn(|cx| stream.poll_handshake(cx)).await?;
    let client_subject = match &stream.conn {
        Conn::Rustls(conn, _) => crate::tls::client_subject(conn),
        _ => None,
    };
    if take_over {
        stream.take_over()?;
    }
    Ok(Accepted {
        stream,
        client_subject,
    })
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
    fn handshaking(&self) -> bool {
        matches!(&self.conn, Conn::Rustls(conn, _) if conn.is_handshaking())
    }

    /// After the handshake of a TLS 1.3 connection: its records are
    /// protected by [`Records`] from now on. rustls first takes the records
    /// that already arrived (their plaintext is kept for the reader) and
    /// stands ready to write, as its hand-over requires; an incomplete
    /// record stays in `incoming` for [`Records`].
    fn take_over(&mut self) -> io::Result<()> {
        let tls13 = matches!(
            &self.conn,
            Conn::Rustls(conn, _) if conn.protocol_version() == Some(ProtocolVersion::TLSv1_3)
        );
        if !tls13 {
            return Ok(());
        }
        if let Err(e) = self.with_write_traffic(|_| ()) {
            // A client that closed at once is served by rustls to the end.
            return if self.eof { Ok(()) } else { Err(e) };
        }
        let Conn::Rustls(conn, caught) = std::mem::replace(&mut self.conn, Conn::Switching) else {
            // Checked above; a connection left switching only fails.
            self.failed = true;
            return Err(failed_error());
        };
        let mut caught = caught.unwrap_or_default();
        match Records::new(*conn, &mut caught) {
            Ok(records) => {
                self.conn = Conn::Records(records);
                Ok(())
            }
            Err(e) => {
                self.failed = true;
                Err(tls_error(e))
            }
        }
    }

    fn poll_handshake(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            ready!(self.poll_flush_outgoing(cx))?;
            if !self.handshaking() {
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
        out: Option<&mut ReadBuf<'_>>,
        on_write: Option<&mut OnWrite<'_>>,
    ) -> io::Result<usize> {
        match &self.conn {
            Conn::Records(_) => self.process_records(data, out),
            Conn::Switching => Err(failed_error()),
            Conn::Rustls(conn, _) if conn.is_handshaking() => {
                // The traffic secrets rustls derives in this pass are
                // caught for the take-over (see `CatchSecrets`).
                CAUGHT.set(Some(Box::default()));
                let processed = self.process_rustls(data, out, on_write);
                let caught = CAUGHT.take();
                if let (Conn::Rustls(_, kept), Some(mut caught)) = (&mut self.conn, caught) {
                    match kept {
                        // Both arrive in one pass: the box itself is kept.
                        None if caught.client.is_some() || caught.server.is_some() => {
                            *kept = Some(caught);
                        }
                        None => {}
                        Some(kept) => {
                            if caught.client.is_some() {
                                kept.client = Secret::take(&mut caught.client);
                            }
                            if caught.server.is_some() {
                                kept.server = Secret::take(&mut caught.server);
                            }
                        }
                    }
                }
                processed
            }
            Conn::Rustls(..) => self.process_rustls(data, out, on_write),
        }
    }

    /// [`TlsStream::process`] while rustls protects the records.
    fn process_rustls(
        &mut self,
        data: &mut [u8],
        mut out: Option<&mut ReadBuf<'_>>,
        mut on_write: Option<&mut OnWrite<'_>>,
    ) -> io::Result<usize> {
        let Conn::Rustls(conn, _) = &mut self.conn else {
            return Err(failed_error());
        };
        let mut offset = 0;
        loop {
            let UnbufferedStatus { mut discard, state } =
                conn.process_tls_records(&mut data[offset..]);
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
        let Conn::Rustls(conn, _) = &mut self.conn else {
            return;
        };
        loop {
            match conn.process_tls_records(rest).state {
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
        if let Conn::Records(records) = &mut self.conn {
            tls.clear();
            records
                .seal(ContentType::ApplicationData, plain, tls)
                .map_err(tls_error)?;
            return Ok(tls.len());
        }
        self.with_write_traffic(|traffic| encrypt_into(tls, |out| traffic.encrypt(plain, out)))?
    }

    /// Processes the records in `data` of a connection [`Records`]
    /// protects and returns how many bytes were consumed (the rest is an
    /// incomplete record), like [`TlsStream::process`].
    fn process_records(
        &mut self,
        data: &mut [u8],
        mut out: Option<&mut ReadBuf<'_>>,
    ) -> io::Result<usize> {
        let mut offset = 0;
        // The receiving cipher, for this pass only (see `Records::rx`).
        let mut opener = None;
        while !self.eof {
            let rest = &mut data[offset..];
            let Some(&[typ, major, _, high, low]) = rest.get(..5) else {
                break;
            };
            let len = usize::from(u16::from_be_bytes([high, low]));
            if typ != u8::from(ContentType::ApplicationData) || major != 3 {
                return Err(self.refuse(Refused::new(
                    AlertDescription::UnexpectedMessage,
                    "an unprotected TLS record after the handshake",
                )));
            }
            if len > MAX_CIPHERTEXT {
                return Err(self.refuse(Refused::new(
                    AlertDescription::RecordOverflow,
                    "an oversized TLS record",
                )));
            }
            let Some(body) = rest.get_mut(5..5 + len) else {
                break;
            };
            offset += 5 + len;
            let Conn::Records(records) = &mut self.conn else {
                return Err(failed_error());
            };
            let (typ, mut payload) = match records.open(body, &mut opener) {
                Ok(opened) => opened,
                Err(refused) => return Err(self.refuse(refused)),
            };
            let handled = match typ {
                ContentType::ApplicationData => {
                    if let Some(out) = out.as_deref_mut() {
                        let now = payload.len().min(out.remaining());
                        out.put_slice(&payload[..now]);
                        payload = &payload[now..];
                    }
                    self.plain.extend_from_slice(payload);
                    Ok(())
                }
                ContentType::Alert => records.on_alert(payload).map(|closed| {
                    if closed {
                        self.eof = true;
                    }
                }),
                ContentType::Handshake => {
                    // A key update: the next record opens under a new key.
                    opener = None;
                    records.on_handshake(payload, &mut self.outgoing)
                }
                _ => Err(Refused::new(
                    AlertDescription::UnexpectedMessage,
                    "an unexpected TLS record type after the handshake",
                )),
            };
            if let Err(refused) = handled {
                return Err(self.refuse(refused));
            }
        }
        Ok(offset)
    }

    /// Ends a connection [`Records`] protects over a refused record: the
    /// alert is sent once if the socket takes it (the connection is closed
    /// after), and the error returned.
    fn refuse(&mut self, refused: Refused) -> io::Error {
        self.failed = true;
        if let (Conn::Records(records), Some(alert)) = (&mut self.conn, refused.alert) {
            // Fatal level. A record is appended only once sealed.
            let _ = records.seal(
                ContentType::Alert,
                &[2, u8::from(alert)],
                &mut self.outgoing,
            );
        }
        if !self.outgoing.is_empty() {
            let _ = self.tcp.try_write(&self.outgoing);
            self.outgoing = Vec::new();
        }
        io::Error::new(io::ErrorKind::InvalidData, refused.why)
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

/// A TLS 1.3 connection after its handshake: records are protected here
/// with aws-lc's AEAD for the negotiated suite, under keys derived from the
/// application traffic secrets rustls caught for it ([`CatchSecrets`]), so
/// key updates need nothing of rustls. rustls's connection, with the
/// buffers and key schedule it keeps from the handshake, is dropped.
struct Records {
    suite: &'static Tls13CipherSuite,
    algorithm: &'static aead::Algorithm,
    /// Records one key may protect (the suite's confidentiality limit):
    /// the key is updated before it is reached.
    limit: u64,
    tx: Direction<LessSafeKey>,
    /// The receiving key is kept as its bytes, and the cipher set up for
    /// each pass over received records ([`TlsStream::process_records`]):
    /// aws-lc's cipher state is 640 bytes of the heap, more than anything
    /// else an idle connection holds, and clients send rarely. Setting it
    /// up costs about as much as opening a few small records.
    rx: Direction<KeyBytes>,
    /// Key updates the client may still ask for before it sends data.
    key_updates_allowed: u8,
    /// Warning alerts (`user_canceled`) the client may still send.
    warnings_allowed: u8,
}

/// One direction's protection: its traffic secret (for the next key
/// update), the key (as a cipher, or as its bytes) and IV derived from it,
/// and the next record's sequence number.
struct Direction<K> {
    secret: Secret,
    key: K,
    iv: Iv,
    seq: u64,
}

/// A key as its bytes (the first `algorithm.key_len()`), wiped on drop.
struct KeyBytes(Zeroizing<[u8; 32]>);

/// How a [`Direction`] keeps its key.
trait KeyForm: Sized {
    fn new(algorithm: &'static aead::Algorithm, key: &[u8]) -> Option<Self>;
}

impl KeyForm for LessSafeKey {
    fn new(algorithm: &'static aead::Algorithm, key: &[u8]) -> Option<Self> {
        Some(LessSafeKey::new(UnboundKey::new(algorithm, key).ok()?))
    }
}

impl KeyForm for KeyBytes {
    fn new(_: &'static aead::Algorithm, key: &[u8]) -> Option<Self> {
        let mut bytes = Zeroizing::new([0; 32]);
        bytes.get_mut(..key.len())?.copy_from_slice(key);
        Some(Self(bytes))
    }
}

impl KeyBytes {
    /// The cipher of this key.
    fn cipher(&self, algorithm: &'static aead::Algorithm) -> Option<LessSafeKey> {
        let key = self.0.get(..algorithm.key_len())?;
        <LessSafeKey as KeyForm>::new(algorithm, key)
    }
}

/// A TLS 1.3 traffic secret (as long as the suite's hash), wiped on drop.
struct Secret {
    bytes: [u8; 48],
    len: u8,
}

impl Secret {
    fn new(secret: &[u8]) -> Option<Self> {
        let mut bytes = [0; 48];
        bytes.get_mut(..secret.len())?.copy_from_slice(secret);
        Some(Self {
            bytes,
            len: secret.len() as u8,
        })
    }

    fn as_bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }

    /// A copy of the secret in `slot`, which is emptied and wiped (moving
    /// it out would leave its bytes behind).
    fn take(slot: &mut Option<Self>) -> Option<Self> {
        let copy = slot
            .as_ref()
            .and_then(|secret| Self::new(secret.as_bytes()));
        *slot = None;
        copy
    }
}

impl Drop for Secret {
    fn drop(&mut self) {
        self.bytes.zeroize();
    }
}

/// The application traffic secrets a handshake derived, caught by
/// [`CatchSecrets`] while rustls processes a client's handshake records.
#[derive(Default)]
struct Caught {
    client: Option<Secret>,
    server: Option<Secret>,
}

thread_local! {
    /// Armed (`Some`) only while this thread runs rustls on a connection
    /// still handshaking; taken into the connection right after.
    /// Boxed, so that the secrets stay where they were caught until they
    /// are copied into [`Records`] and wiped.
    static CAUGHT: RefCell<Option<Box<Caught>>> = const { RefCell::new(None) };
}

/// rustls's key-log hook, used to catch the two application traffic
/// secrets of a TLS 1.3 handshake for [`Records`]: rustls derives them
/// while the connection's handshake records are processed, on the thread
/// processing them, and hands them to nothing else. They are kept in the
/// connection's memory only, never written anywhere; every other secret is
/// declined.
#[derive(Debug)]
pub struct CatchSecrets;

const CLIENT_TRAFFIC_SECRET: &str = "CLIENT_TRAFFIC_SECRET_0";
const SERVER_TRAFFIC_SECRET: &str = "SERVER_TRAFFIC_SECRET_0";

impl rustls::KeyLog for CatchSecrets {
    fn will_log(&self, label: &str) -> bool {
        label == CLIENT_TRAFFIC_SECRET || label == SERVER_TRAFFIC_SECRET
    }

    fn log(&self, label: &str, _client_random: &[u8], secret: &[u8]) {
        CAUGHT.with_borrow_mut(|caught| {
            let Some(caught) = caught else {
                return;
            };
            let slot = match label {
                CLIENT_TRAFFIC_SECRET => &mut caught.client,
                SERVER_TRAFFIC_SECRET => &mut caught.server,
                _ => return,
            };
            *slot = Secret::new(secret);
        });
    }
}

/// A refusal of the client's records: the alert to send and why.
struct Refused {
    /// None when the client ended the connection with an alert of its own.
    alert: Option<AlertDescription>,
    why: String,
}

impl Refused {
    fn new(alert: AlertDescription, why: impl Into<String>) -> Self {
        Self {
            alert: Some(alert),
            why: why.into(),
        }
    }
}

/// Key updates in a row without application data between them; as rustls
/// (and BoringSSL) allow.
const KEY_UPDATES_IN_A_ROW: u8 = 32;

/// Warning alerts a connection may receive; as rustls (and BoringSSL).
const WARNING_ALERTS: u8 = 4;

/// The most plaintext a TLS record carries.
const MAX_PLAINTEXT: usize = 16 * 1024;

/// The largest protected record TLS 1.3 allows: 16 KiB of plaintext, its
/// content type and 255 bytes of padding and tag.
const MAX_CIPHERTEXT: usize = MAX_PLAINTEXT + 256;

/// The AEAD tag of every TLS 1.3 suite.
const TAG_LEN: usize = 16;

/// A `key_update` handshake message not asking for the peer's.
const KEY_UPDATE_NOT_REQUESTED: [u8; 5] = [24, 0, 0, 1, 0];

/// RFC 8446 section 7.1, `HKDF-Expand-Label(secret, label, "", out.len())`
/// with `expander` made from the secret.
fn expand_label(expander: &dyn HkdfExpander, label: &[u8], out: &mut [u8]) -> Option<()> {
    let len = u16::try_from(out.len()).ok()?.to_be_bytes();
    let label_len = [u8::try_from(b"tls13 ".len() + label.len()).ok()?];
    let info: [&[u8]; 5] = [&len, &label_len, b"tls13 ", label, &[0]];
    expander.expand_slice(&info, out).ok()
}

/// The key (its first `key_len` bytes) and IV of a traffic secret
/// (RFC 8446 section 7.3).
struct KeyAndIv {
    key: Zeroizing<[u8; 32]>,
    key_len: usize,
    iv: [u8; NONCE_LEN],
}

impl KeyAndIv {
    fn derive(suite: &Tls13CipherSuite, key_len: usize, secret: &Secret) -> Option<Self> {
        let expander = suite
            .hkdf_provider
            .expander_for_okm(&OkmBlock::new(secret.as_bytes()));
        let mut key = Zeroizing::new([0u8; 32]);
        expand_label(expander.as_ref(), b"key", key.get_mut(..key_len)?)?;
        let mut iv = [0; NONCE_LEN];
        expand_label(expander.as_ref(), b"iv", &mut iv)?;
        Some(Self { key, key_len, iv })
    }

    fn key(&self) -> &[u8] {
        &self.key[..self.key_len]
    }

    /// Whether these are the key and IV rustls extracted.
    fn is(&self, secrets: &ConnectionTrafficSecrets) -> bool {
        match secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv }
            | ConnectionTrafficSecrets::Aes256Gcm { key, iv }
            | ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                self.key() == key.as_ref() && self.iv == iv.as_ref()
            }
            _ => false,
        }
    }
}

impl<K: KeyForm> Direction<K> {
    /// Protection under `secret`, whose key and IV are `derived`; records
    /// start at `seq`.
    fn new(
        algorithm: &'static aead::Algorithm,
        secret: Secret,
        derived: &KeyAndIv,
        seq: u64,
    ) -> Option<Self> {
        let key = K::new(algorithm, derived.key())?;
        Some(Self {
            secret,
            key,
            iv: Iv::new(derived.iv),
            seq,
        })
    }

    /// The next traffic secret (RFC 8446 section 7.2) and its protection.
    fn next(&self, suite: &Tls13CipherSuite, algorithm: &'static aead::Algorithm) -> Option<Self> {
        let expander = suite
            .hkdf_provider
            .expander_for_okm(&OkmBlock::new(self.secret.as_bytes()));
        let mut next = Zeroizing::new([0u8; 48]);
        let next = next.get_mut(..usize::from(self.secret.len))?;
        expand_label(expander.as_ref(), b"traffic upd", next)?;
        let secret = Secret::new(next)?;
        let derived = KeyAndIv::derive(suite, algorithm.key_len(), &secret)?;
        Self::new(algorithm, secret, &derived, 0)
    }
}

/// The aws-lc AEAD of a suite's record protection.
fn aead_algorithm(secrets: &ConnectionTrafficSecrets) -> Option<&'static aead::Algorithm> {
    match secrets {
        ConnectionTrafficSecrets::Aes128Gcm { .. } => Some(&aead::AES_128_GCM),
        ConnectionTrafficSecrets::Aes256Gcm { .. } => Some(&aead::AES_256_GCM),
        ConnectionTrafficSecrets::Chacha20Poly1305 { .. } => Some(&aead::CHACHA20_POLY1305),
        _ => None,
    }
}

impl Records {
    /// Takes over from rustls once its handshake is done (TLS 1.3 only),
    /// with the traffic secrets `caught` during it (taken from it and wiped
    /// there). rustls's current keys and sequence numbers must be those of
    /// the secrets: a connection whose keys changed before the take-over (a
    /// client key update in the handshake's last flight) is refused.
    fn new(conn: UnbufferedServerConnection, caught: &mut Caught) -> Result<Self, rustls::Error> {
        let refused = |why: &str| rustls::Error::General(format!("TLS record take-over: {why}"));
        let (extracted, kernel) = conn.dangerous_into_kernel_connection()?;
        let SupportedCipherSuite::Tls13(suite) = kernel.negotiated_cipher_suite() else {
            return Err(refused("not a TLS 1.3 connection"));
        };
        drop(kernel);
        let (tx_seq, tx) = extracted.tx;
        let (rx_seq, rx) = extracted.rx;
        let algorithm = aead_algorithm(&tx).ok_or_else(|| refused("an unknown cipher"))?;
        let server = Secret::take(&mut caught.server);
        let client = Secret::take(&mut caught.client);
        let (Some(server), Some(client)) = (server, client) else {
            return Err(refused("the traffic secrets were not caught"));
        };
        fn direction<K: KeyForm>(
            suite: &Tls13CipherSuite,
            algorithm: &'static aead::Algorithm,
            secret: Secret,
            extracted: &ConnectionTrafficSecrets,
            seq: u64,
        ) -> Result<Direction<K>, &'static str> {
            let derived = KeyAndIv::derive(suite, algorithm.key_len(), &secret)
                .ok_or("a key derivation failed")?;
            if !derived.is(extracted) {
                return Err("the keys changed during the handshake");
            }
            Direction::new(algorithm, secret, &derived, seq).ok_or("the cipher could not be set up")
        }
        Ok(Self {
            suite,
            algorithm,
            limit: suite.common.confidentiality_limit,
            tx: direction(suite, algorithm, server, &tx, tx_seq).map_err(refused)?,
            rx: direction(suite, algorithm, client, &rx, rx_seq).map_err(refused)?,
            key_updates_allowed: KEY_UPDATES_IN_A_ROW,
            warnings_allowed: WARNING_ALERTS,
        })
    }

    /// Appends `payload` as one protected record of type `typ` to `out`
    /// (preceded by a key update when the key has protected its limit).
    fn seal(
        &mut self,
        typ: ContentType,
        payload: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), rustls::Error> {
        if self.tx.seq >= self.limit.saturating_sub(1) {
            self.update_tx(out)?;
        }
        self.seal_now(typ, payload, out)
    }

    /// RFC 8446 section 5.2: the header, then the payload and its content
    /// type (no padding) encrypted, then the tag.
    fn seal_now(
        &mut self,
        typ: ContentType,
        payload: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), rustls::Error> {
        if payload.len() > MAX_PLAINTEXT {
            return Err(rustls::Error::EncryptError);
        }
        let header = make_tls13_aad(payload.len() + 1 + TAG_LEN);
        let nonce = Nonce::new(&self.tx.iv, self.tx.seq).0;
        let start = out.len();
        out.reserve(header.len() + payload.len() + 1 + TAG_LEN);
        out.extend_from_slice(&header);
        out.extend_from_slice(payload);
        out.push(u8::from(typ));
        let sealed = self.tx.key.seal_in_place_separate_tag(
            aead::Nonce::assume_unique_for_key(nonce),
            aead::Aad::from(header),
            &mut out[start + header.len()..],
        );
        let Ok(tag) = sealed else {
            out.truncate(start);
            return Err(rustls::Error::EncryptError);
        };
        out.extend_from_slice(tag.as_ref());
        self.tx.seq = self
            .tx
            .seq
            .checked_add(1)
            .ok_or(rustls::Error::EncryptError)?;
        Ok(())
    }

    /// Sends a key update under the current key, then takes the next one.
    fn update_tx(&mut self, out: &mut Vec<u8>) -> Result<(), rustls::Error> {
        let next = self
            .tx
            .next(self.suite, self.algorithm)
            .ok_or(rustls::Error::EncryptError)?;
        self.seal_now(ContentType::Handshake, &KEY_UPDATE_NOT_REQUESTED, out)?;
        self.tx = next;
        Ok(())
    }

    /// Opens the record whose body is `body` (its header checked by the
    /// caller) in place: its content type and plaintext, without padding.
    /// `opener` is the receiving key's cipher, set up here if it is not yet.
    fn open<'a>(
        &mut self,
        body: &'a mut [u8],
        opener: &mut Option<LessSafeKey>,
    ) -> Result<(ContentType, &'a [u8]), Refused> {
        let key = match opener {
            Some(key) => key,
            None => opener.insert(self.rx.key.cipher(self.algorithm).ok_or_else(|| {
                Refused::new(
                    AlertDescription::InternalError,
                    "the receiving cipher could not be set up",
                )
            })?),
        };
        let nonce = Nonce::new(&self.rx.iv, self.rx.seq).0;
        let aad = make_tls13_aad(body.len());
        let plain = key
            .open_in_place(
                aead::Nonce::assume_unique_for_key(nonce),
                aead::Aad::from(aad),
                body,
            )
            .map_err(|_| {
                Refused::new(
                    AlertDescription::BadRecordMac,
                    "a TLS record failed to decrypt",
                )
            })?;
        self.rx.seq = self.rx.seq.checked_add(1).ok_or_else(|| {
            Refused::new(
                AlertDescription::InternalError,
                "the client sent more records than one key may protect",
            )
        })?;
        // The content type is the last byte that is not padding.
        let Some(end) = plain.iter().rposition(|&b| b != 0) else {
            return Err(Refused::new(
                AlertDescription::UnexpectedMessage,
                "a TLS record without a content type",
            ));
        };
        if end > MAX_PLAINTEXT {
            return Err(Refused::new(
                AlertDescription::RecordOverflow,
                "an oversized TLS record",
            ));
        }
        let typ = ContentType::from(plain[end]);
        if typ == ContentType::ApplicationData {
            self.key_updates_allowed = KEY_UPDATES_IN_A_ROW;
        }
        Ok((typ, &plain[..end]))
    }

    /// A handshake record after the handshake: only a key update is
    /// expected, whole and alone in its record (RFC 8446 section 5.1: a
    /// message before a key change ends its record). The client's next
    /// records use its next key; if it asks for ours to change too, the
    /// answer goes to `out` and our key changes after it.
    fn on_handshake(&mut self, payload: &[u8], out: &mut Vec<u8>) -> Result<(), Refused> {
        let &[24, 0, 0, 1, request] = payload else {
            return Err(Refused::new(
                AlertDescription::UnexpectedMessage,
                "a handshake message other than a key update after the handshake",
            ));
        };
        if request > 1 {
            return Err(Refused::new(
                AlertDescription::IllegalParameter,
                "an invalid key update",
            ));
        }
        self.key_updates_allowed = self.key_updates_allowed.checked_sub(1).ok_or_else(|| {
            Refused::new(
                AlertDescription::UnexpectedMessage,
                "too many key updates without data",
            )
        })?;
        let internal =
            |e: rustls::Error| Refused::new(AlertDescription::InternalError, e.to_string());
        if request == 1 {
            self.update_tx(out).map_err(internal)?;
        }
        self.rx = self.rx.next(self.suite, self.algorithm).ok_or_else(|| {
            Refused::new(
                AlertDescription::InternalError,
                "the client's next key could not be derived",
            )
        })?;
        Ok(())
    }

    /// An alert from the client: `Ok(true)` for close_notify, `Ok(false)`
    /// for a warning to ignore, otherwise the end of the connection.
    fn on_alert(&mut self, payload: &[u8]) -> Result<bool, Refused> {
        let &[level, description] = payload else {
            return Err(Refused::new(
                AlertDescription::DecodeError,
                "a malformed TLS alert",
            ));
        };
        match AlertDescription::from(description) {
            AlertDescription::CloseNotify => Ok(true),
            // RFC 8446 section 6.1: followed by close_notify.
            AlertDescription::UserCanceled if level == 1 => {
                self.warnings_allowed = self.warnings_allowed.checked_sub(1).ok_or_else(|| {
                    Refused::new(AlertDescription::DecodeError, "too many TLS warning alerts")
                })?;
                Ok(false)
            }
            other => Err(Refused {
                alert: None,
                why: format!("the client sent the TLS alert {other:?}"),
            }),
        }
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

/// A peer that has gone is an error from `send`, not a SIGPIPE (as in the
/// standard library's own writes).
#[cfg(any(target_os = "linux", target_os = "android"))]
const SEND_FLAGS: libc::c_int = libc::MSG_NOSIGNAL;
#[cfg(not(any(target_os = "linux", target_os = "android")))]
const SEND_FLAGS: libc::c_int = 0;

/// Sends `buf` with one `send(2)` on the socket itself, as tokio's write
/// would, but without reading the socket's readiness record first: a
/// separate allocation per socket, which a fan-out to many connections finds
/// out of the caches at every connection (1–2 % of the server's time at
/// 100,000 deliveries a second). The kernel's answer says as much: only a
/// send it refuses (a full send buffer) goes through tokio's write, which
/// clears the readiness it had and waits for the socket to become writable.
/// Each send counts against the task's budget as tokio's own writes do.
fn poll_send(tcp: &mut TcpStream, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
    let budget = ready!(tokio::task::coop::poll_proceed(cx));
    match socket2::SockRef::from(&*tcp).send_with_flags(buf, SEND_FLAGS) {
        Ok(sent) => {
            budget.made_progress();
            Poll::Ready(Ok(sent))
        }
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
            ) =>
        {
            drop(budget);
            Pin::new(tcp).poll_write(cx, buf)
        }
        Err(e) => Poll::Ready(Err(e)),
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
            match poll_send(&mut this.tcp, cx, records) {
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
            if let Conn::Records(records) = &mut this.conn {
                // Warning level, close_notify.
                let _ = records.seal(ContentType::Alert, &[1, 0], &mut this.outgoing);
            } else {
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
        }
        ready!(this.poll_flush_outgoing(cx))?;
        Pin::new(&mut this.tcp).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::certs::DevCa;
    use crate::config::ClientAuth;
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName};
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    type Client = tokio_rustls::client::TlsStream<TcpStream>;

    /// A server stream and a rustls client of `version` over loopback TCP.
    async fn pair(version: &'static rustls::SupportedProtocolVersion) -> (TlsStream, Client) {
        pair_with(version, None).await
    }

    /// [`pair`], the client offering only `suite` if given.
    async fn pair_with(
        version: &'static rustls::SupportedProtocolVersion,
        suite: Option<rustls::CipherSuite>,
    ) -> (TlsStream, Client) {
        let ca = DevCa::generate("tls_stream test CA", 1).unwrap();
        let leaf = ca.server_cert(&["localhost".into()], 1).unwrap();
        let setup =
            crate::tls::from_pem(&leaf.cert_pem, &leaf.key_pem, ClientAuth::Off, None).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(ca.pem().cert_pem.as_bytes()).unwrap())
            .unwrap();
        let mut provider = (*crate::tls::provider()).clone();
        if let Some(suite) = suite {
            provider.cipher_suites.retain(|s| s.suite() == suite);
        }
        let client = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
            .with_protocol_versions(&[version])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::join!(
            async {
                let (tcp, _) = listener.accept().await.unwrap();
                accept(setup.config.clone(), tcp).await.unwrap().stream
            },
            async {
                let tcp = TcpStream::connect(addr).await.unwrap();
                let name = ServerName::try_from("localhost").unwrap();
                connector.connect(name, tcp).await.unwrap()
            }
        )
    }

    #[tokio::test]
    async fn tls_1_3_records_are_protected_here_and_tls_1_2_stays_with_rustls() {
        let (server, _client) = pair(&rustls::version::TLS13).await;
        assert!(matches!(server.conn, Conn::Records(_)));
        let (server, _client) = pair(&rustls::version::TLS12).await;
        assert!(matches!(server.conn, Conn::Rustls(..)));
    }

    #[tokio::test]
    async fn a_send_the_socket_refuses_waits_until_the_socket_is_writable() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let mut client = client.unwrap();
        let (mut server, _) = accepted.unwrap();
        // Fill the socket and the client's receive buffer, large writes
        // then single bytes, until a pause frees no room: the kernel
        // refuses the next send. (Sent past tokio, which still takes the
        // socket for writable.)
        let chunk = vec![7u8; 64 << 10];
        let mut filled = 0;
        loop {
            let before = filled;
            for size in [chunk.len(), 1] {
                loop {
                    match socket2::SockRef::from(&server).send(&chunk[..size]) {
                        Ok(n) => filled += n,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) => panic!("filling the socket: {e}"),
                    }
                }
            }
            if filled == before {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let first =
            std::future::poll_fn(|cx| Poll::Ready(poll_send(&mut server, cx, b"last"))).await;
        assert!(
            first.is_pending(),
            "a send to a full socket waits: {first:?}"
        );
        // The client reads on a task of its own: the send is polled again
        // only when the socket's readiness wakes it.
        let reader = tokio::spawn(async move {
            let mut got = vec![0; filled + 4];
            client.read_exact(&mut got).await.unwrap();
            got
        });
        // Only the socket's readiness may wake the send (a deadline that
        // polled it again would find room by then).
        let sent = tokio::select! {
            biased;
            () = tokio::time::sleep(Duration::from_secs(20)) => {
                panic!("the send is not woken once the socket is writable")
            }
            sent = std::future::poll_fn(|cx| poll_send(&mut server, cx, b"last")) => sent,
        };
        assert_eq!(sent.unwrap(), 4);
        let got = reader.await.unwrap();
        assert_eq!(&got[filled..], b"last");
    }

    #[tokio::test]
    async fn the_key_is_updated_before_it_protects_its_limit_of_records() {
        let (mut server, mut client) = pair(&rustls::version::TLS13).await;
        let Conn::Records(records) = &mut server.conn else {
            panic!("a TLS 1.3 connection is protected by Records");
        };
        // Three records per key instead of AES-GCM's 2^24.
        records.limit = 3;
        for i in 0..10u8 {
            server.write_all(&[i; 100]).await.unwrap();
        }
        server.flush().await.unwrap();
        let mut got = vec![0; 1000];
        tokio::time::timeout(Duration::from_secs(10), client.read_exact(&mut got))
            .await
            .expect("the client reads within the wait")
            .expect("every record decrypts under the keys announced");
        for (i, chunk) in got.chunks(100).enumerate() {
            assert!(chunk.iter().all(|&b| usize::from(b) == i), "record {i}");
        }
        let Conn::Records(records) = &server.conn else {
            unreachable!();
        };
        assert!(records.tx.seq < 3, "sequence {}", records.tx.seq);
        // The client's records still open.
        client.write_all(b"still here").await.unwrap();
        let mut back = [0; 10];
        server.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"still here");
    }

    #[tokio::test]
    async fn every_tls_1_3_suite_is_protected_here_with_key_updates_both_ways() {
        use rustls::CipherSuite::*;
        for suite in [
            TLS13_AES_128_GCM_SHA256,
            TLS13_AES_256_GCM_SHA384,
            TLS13_CHACHA20_POLY1305_SHA256,
        ] {
            let (mut server, mut client) = pair_with(&rustls::version::TLS13, Some(suite)).await;
            let negotiated = client.get_ref().1.negotiated_cipher_suite().unwrap();
            assert_eq!(negotiated.suite(), suite);
            let Conn::Records(records) = &mut server.conn else {
                panic!("{suite:?}: a TLS 1.3 connection is protected by Records");
            };
            // The server updates its own key every two records as well.
            records.limit = 3;
            for round in 0..4u8 {
                // Asks the server to update its key too.
                client.get_mut().1.refresh_traffic_keys().unwrap();
                client.write_all(&[round; 50]).await.unwrap();
                client.flush().await.unwrap();
                let mut got = [0; 50];
                tokio::time::timeout(Duration::from_secs(10), server.read_exact(&mut got))
                    .await
                    .expect("the server reads within the wait")
                    .unwrap_or_else(|e| panic!("{suite:?} round {round}: {e}"));
                assert_eq!(got, [round; 50], "{suite:?} round {round}");
                server.write_all(&[round + 100; 70]).await.unwrap();
                server.flush().await.unwrap();
                let mut back = [0; 70];
                tokio::time::timeout(Duration::from_secs(10), client.read_exact(&mut back))
                    .await
                    .expect("the client reads within the wait")
                    .unwrap_or_else(|e| panic!("{suite:?} round {round}: {e}"));
                assert_eq!(back, [round + 100; 70], "{suite:?} round {round}");
            }
            let Conn::Records(records) = &server.conn else {
                unreachable!();
            };
            // One record under the client's latest key: its updates were
            // followed (eight records and four updates arrived).
            assert_eq!(records.rx.seq, 1, "{suite:?}");
        }
    }
}
