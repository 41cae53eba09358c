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
//! rustls protects every record, TLS 1.3 and 1.2, for the whole life of
//! the connection: its handshake, record layer, key updates, alerts and
//! limits. This module only moves bytes between the socket, the per-thread
//! buffers and rustls; it never sees a key.
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
    conn: Box<UnbufferedServerConnection>,
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

/// Runs the server side of the TLS handshake on `tcp`.
pub async fn accept(config: Arc<ServerConfig>, tcp: TcpStream) -> io::Result<Accepted> {
    let conn = UnbufferedServerConnection::new(config).map_err(tls_error)?;
    let mut stream = TlsStream {
        tcp,
        conn: Box::new(conn),
        incoming: Vec::new(),
        plain: Vec::new(),
        plain_pos: 0,
        outgoing: Vec::new(),
        eof: false,
        failed: false,
        close_notify_sent: false,
    };
    std::future::poll_fn(|cx| stream.poll_handshake(cx)).await?;
    let client_subject = crate::tls::client_subject(&stream.conn);
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
        self.conn.is_handshaking()
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
        mut out: Option<&mut ReadBuf<'_>>,
        mut on_write: Option<&mut OnWrite<'_>>,
    ) -> io::Result<usize> {
        let conn = &mut self.conn;
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
    ///
    /// rustls is asked once: its next state is the alert, the only record it
    /// queued since the last (every state that queues records is encoded
    /// before rustls reads on). Asked again, rustls would read the record
    /// that failed once more, and fail it with a second alert.
    fn send_alert(&mut self, rest: &mut [u8]) {
        if let Ok(ConnectionState::EncodeTlsData(mut encode)) =
            self.conn.process_tls_records(rest).state
        {
            let _ = encode_into(&mut self.outgoing, |buf| encode.encode(buf));
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

    /// A server stream and a rustls client of `version` over loopback TCP,
    /// the client offering only `suite` if given.
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

    #[test]
    fn no_secret_leaves_rustls() {
        let ca = DevCa::generate("tls_stream test CA", 1).unwrap();
        let leaf = ca.server_cert(&["localhost".into()], 1).unwrap();
        let setup =
            crate::tls::from_pem(&leaf.cert_pem, &leaf.key_pem, ClientAuth::Off, None).unwrap();
        assert!(!setup.config.enable_secret_extraction);
        for label in [
            "CLIENT_HANDSHAKE_TRAFFIC_SECRET",
            "SERVER_HANDSHAKE_TRAFFIC_SECRET",
            "CLIENT_TRAFFIC_SECRET_0",
            "SERVER_TRAFFIC_SECRET_0",
            "EXPORTER_SECRET",
            "CLIENT_RANDOM",
        ] {
            assert!(!setup.config.key_log.will_log(label), "{label}");
        }
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
    async fn every_tls_1_3_suite_follows_key_updates_both_ways() {
        use rustls::CipherSuite::*;
        for suite in [
            TLS13_AES_128_GCM_SHA256,
            TLS13_AES_256_GCM_SHA384,
            TLS13_CHACHA20_POLY1305_SHA256,
        ] {
            let (mut server, mut client) = pair_with(&rustls::version::TLS13, Some(suite)).await;
            let negotiated = client.get_ref().1.negotiated_cipher_suite().unwrap();
            assert_eq!(negotiated.suite(), suite);
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
        }
    }
}
