//! Receivers read from one poll loop on a thread of their own.
//!
//! A receiver does nothing but read, and at fan-out loads the load
//! generator reads as many messages as the server writes: with a tokio task
//! per receiver over tokio-tungstenite and tokio-rustls, each delivery cost
//! it a task wake-up and poll, tokio-tungstenite's waker proxy, and the
//! async adapters' layers on top of the kernel's receive path and the
//! decryption (`bench/notes.md` has the profile). A load generator that
//! spends as much per delivery as the server under test measures its own
//! queue as much as the server's latency.
//!
//! Here a receiver is set up as any member is (TCP, TLS, upgrade, join;
//! awaited on tokio), then its socket is handed over to [`Readers`]: one
//! thread, one `mio` poll, and per connection tungstenite's own WebSocket
//! over rustls's own stream, read until the socket is drained. A read that
//! returned less than asked for drained the socket, so the next read is
//! answered "would block" without a system call until the poll reports new
//! data (edge-triggered, as tokio does for short reads).

use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use mio::{Events, Interest, Poll, Token, Waker};
use rustls::{ClientConnection, StreamOwned};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::tungstenite::handshake::HandshakeError;
use tokio_tungstenite::tungstenite::handshake::client::Request;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message, WebSocket};

/// A client connection read without waiting: tungstenite over rustls over
/// a non-blocking socket.
pub type PolledWs = WebSocket<StreamOwned<ClientConnection, Socket>>;

/// A non-blocking TCP socket: tokio's while the connection is set up (so
/// the set-up can be awaited), `mio`'s once it is read from the poll loop.
pub enum Socket {
    Tokio {
        tcp: TcpStream,
        /// The last write was refused: wait until the socket is writable.
        blocked_write: bool,
    },
    Polled {
        tcp: mio::net::TcpStream,
        /// A read since the last readiness event returned less than asked:
        /// the kernel had no more.
        drained: bool,
    },
    /// Between the two, only while being handed over.
    Moving,
}

fn would_block() -> io::Error {
    io::ErrorKind::WouldBlock.into()
}

impl Socket {
    /// Waits until the operation that was refused can go on: a read, or,
    /// while a write is pending, either (rustls retries the write first,
    /// and the peer may be waiting for it before it sends anything).
    async fn ready(&mut self) -> io::Result<()> {
        match self {
            Socket::Tokio {
                tcp,
                blocked_write: true,
            } => tcp
                .ready(tokio::io::Interest::READABLE | tokio::io::Interest::WRITABLE)
                .await
                .map(drop),
            Socket::Tokio { tcp, .. } => tcp.readable().await,
            _ => Err(io::Error::other("the socket is not tokio's")),
        }
    }

    /// Takes the socket from tokio's reactor to a `mio` one.
    fn into_polled(self) -> io::Result<Self> {
        match self {
            Socket::Tokio { tcp, .. } => Ok(Socket::Polled {
                tcp: mio::net::TcpStream::from_std(tcp.into_std()?),
                drained: false,
            }),
            other => Ok(other),
        }
    }
}

impl Read for Socket {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Socket::Tokio { tcp, .. } => tcp.try_read(buf),
            Socket::Polled { drained: true, .. } => Err(would_block()),
            Socket::Polled { tcp, drained } => match tcp.read(buf) {
                Ok(n) => {
                    *drained = n < buf.len();
                    Ok(n)
                }
                Err(e) => {
                    *drained = e.kind() == io::ErrorKind::WouldBlock;
                    Err(e)
                }
            },
            Socket::Moving => Err(io::ErrorKind::NotConnected.into()),
        }
    }
}

impl Write for Socket {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Socket::Tokio { tcp, blocked_write } => {
                let written = tcp.try_write(buf);
                *blocked_write =
                    matches!(&written, Err(e) if e.kind() == io::ErrorKind::WouldBlock);
                written
            }
            Socket::Polled { tcp, .. } => tcp.write(buf),
            Socket::Moving => Err(io::ErrorKind::NotConnected.into()),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn is_would_block(e: &tungstenite::Error) -> bool {
    matches!(e, tungstenite::Error::Io(e) if e.kind() == io::ErrorKind::WouldBlock)
}

/// The WebSocket upgrade over an established TLS connection, awaited.
pub async fn upgrade(
    tls: TlsStream<TcpStream>,
    request: Request,
    config: WebSocketConfig,
) -> Result<PolledWs, String> {
    let (tcp, conn) = tls.into_inner();
    let socket = Socket::Tokio {
        tcp,
        blocked_write: false,
    };
    let mut attempt = tungstenite::client::client_with_config(
        request,
        StreamOwned::new(conn, socket),
        Some(config),
    );
    loop {
        match attempt {
            Ok((ws, _response)) => return Ok(ws),
            Err(HandshakeError::Interrupted(mut mid)) => {
                mid.get_mut()
                    .get_mut()
                    .sock
                    .ready()
                    .await
                    .map_err(|e| format!("upgrade: {e}"))?;
                attempt = mid.handshake();
            }
            Err(HandshakeError::Failure(e)) => return Err(format!("upgrade: {e}")),
        }
    }
}

/// Sends `message` while the connection is being set up, awaited.
pub async fn send(ws: &mut PolledWs, message: Message) -> Result<(), tungstenite::Error> {
    let mut result = ws.send(message);
    loop {
        match result {
            Err(e) if is_would_block(&e) => {
                ws.get_mut().sock.ready().await?;
                result = ws.flush();
            }
            other => return other,
        }
    }
}

/// Reads the next message while the connection is being set up, awaited.
pub async fn read(ws: &mut PolledWs) -> Result<Message, tungstenite::Error> {
    loop {
        match ws.read() {
            Err(e) if is_would_block(&e) => ws.get_mut().sock.ready().await?,
            other => return other,
        }
    }
}

/// What a reader does with its connection after a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Go on reading.
    Read,
    /// Stop reading, keep the connection open until the readers stop.
    Hold,
    /// Drop the connection.
    End,
}

/// One connection's reader.
pub trait Reader: Send + 'static {
    /// A message arrived.
    fn message(&mut self, message: Message) -> Next;
    /// The connection failed or ended without a close frame.
    fn failed(&mut self);
}

const WAKER: Token = Token(usize::MAX);

/// The poll loop's thread and how to reach it.
pub struct Readers<R: Reader> {
    /// Connections handed over: at most the room's members, each taken at
    /// the next wake-up.
    add: mpsc::Sender<(PolledWs, R)>,
    waker: Arc<Waker>,
    stop: Arc<AtomicBool>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl<R: Reader> Readers<R> {
    /// Starts the thread.
    pub fn start() -> io::Result<Self> {
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let stop = Arc::new(AtomicBool::new(false));
        let (add, added) = mpsc::channel();
        let thread = std::thread::Builder::new().name("readers".into()).spawn({
            let stop = stop.clone();
            move || run(poll, added, &stop)
        })?;
        Ok(Self {
            add,
            waker,
            stop,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Hands a connection set up on tokio to the poll loop.
    pub fn add(&self, mut ws: PolledWs, reader: R) -> Result<(), String> {
        let socket = std::mem::replace(&mut ws.get_mut().sock, Socket::Moving);
        ws.get_mut().sock = socket
            .into_polled()
            .map_err(|e| format!("to the poll loop: {e}"))?;
        self.add
            .send((ws, reader))
            .map_err(|_| "the readers have stopped".to_string())?;
        self.waker
            .wake()
            .map_err(|e| format!("waking the readers: {e}"))
    }

    /// Stops reading and drops every connection; returns once the thread
    /// has.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        let _ = self.waker.wake();
        let thread = self.thread.lock().map(|mut t| t.take());
        // The last connection dropped on the thread itself may drop this.
        if let Ok(Some(thread)) = thread
            && thread.thread().id() != std::thread::current().id()
        {
            let _ = thread.join();
        }
    }
}

impl<R: Reader> Drop for Readers<R> {
    fn drop(&mut self) {
        self.stop();
    }
}

struct Conn<R> {
    ws: PolledWs,
    reader: R,
    /// Reading stopped ([`Next::Hold`]).
    held: bool,
}

fn run<R: Reader>(mut poll: Poll, added: mpsc::Receiver<(PolledWs, R)>, stop: &AtomicBool) {
    let mut events = Events::with_capacity(1024);
    let mut conns: Vec<Option<Conn<R>>> = Vec::new();
    while !stop.load(Ordering::Acquire) {
        // The timeout only bounds how long a missed wake-up could go unseen.
        if let Err(e) = poll.poll(&mut events, Some(Duration::from_millis(200))) {
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            eprintln!("securechat-bench: readers' poll failed: {e}");
            // Not a stop: every connection still open has failed.
            for conn in conns.iter_mut().flatten() {
                conn.reader.failed();
            }
            break;
        }
        for event in events.iter() {
            let token = event.token();
            if token == WAKER {
                while let Ok((mut ws, reader)) = added.try_recv() {
                    let slot = conns.len();
                    let registered = match &mut ws.get_mut().sock {
                        Socket::Polled { tcp, .. } => poll
                            .registry()
                            .register(tcp, Token(slot), Interest::READABLE)
                            .is_ok(),
                        _ => false,
                    };
                    let mut conn = Conn {
                        ws,
                        reader,
                        held: false,
                    };
                    if !registered {
                        conn.reader.failed();
                        conns.push(None);
                        continue;
                    }
                    // What arrived with the set-up's last read is buffered
                    // already: no readiness event will tell of it.
                    let open = read_all(&mut conn);
                    conns.push(open.then_some(conn));
                }
                continue;
            }
            let Some(slot) = conns.get_mut(token.0) else {
                continue;
            };
            let Some(conn) = slot else { continue };
            if conn.held {
                continue;
            }
            if let Socket::Polled { drained, .. } = &mut conn.ws.get_mut().sock {
                *drained = false;
            }
            if !read_all(conn) {
                *slot = None;
            }
        }
    }
}

/// Reads every message the connection has; `false` once it has ended.
fn read_all<R: Reader>(conn: &mut Conn<R>) -> bool {
    loop {
        match conn.ws.read() {
            Ok(message) => match conn.reader.message(message) {
                Next::Read => {}
                Next::Hold => {
                    conn.held = true;
                    return true;
                }
                Next::End => return false,
            },
            Err(e) if is_would_block(&e) => return true,
            Err(_) => {
                conn.reader.failed();
                return false;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A polled socket reads from the kernel only until a read comes back
    /// short, then answers "would block" itself until told of new data.
    #[test]
    fn a_short_read_drains_the_socket_until_the_next_event() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let client =
            std::net::TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let (mut server, _) = listener.accept().expect("accept");
        client.set_nonblocking(true).expect("non-blocking");
        let mut socket = Socket::Polled {
            tcp: mio::net::TcpStream::from_std(client),
            drained: false,
        };
        let mut buf = [0u8; 16];

        // Nothing yet: the kernel says so, and that drains it too.
        let e = socket.read(&mut buf).expect_err("nothing to read");
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        assert!(matches!(socket, Socket::Polled { drained: true, .. }));

        server.write_all(b"hello").expect("write");
        std::thread::sleep(Duration::from_millis(50));
        // Drained until an event says otherwise: the data waits.
        assert_eq!(
            socket.read(&mut buf).expect_err("drained").kind(),
            io::ErrorKind::WouldBlock
        );
        if let Socket::Polled { drained, .. } = &mut socket {
            *drained = false;
        }
        assert_eq!(socket.read(&mut buf).expect("data"), 5);
        assert_eq!(&buf[..5], b"hello");
        assert!(matches!(socket, Socket::Polled { drained: true, .. }));

        // A read that fills the buffer may have left more behind.
        server.write_all(&[7u8; 20]).expect("write");
        std::thread::sleep(Duration::from_millis(50));
        if let Socket::Polled { drained, .. } = &mut socket {
            *drained = false;
        }
        assert_eq!(socket.read(&mut buf).expect("full"), 16);
        assert!(matches!(socket, Socket::Polled { drained: false, .. }));
        assert_eq!(socket.read(&mut buf).expect("rest"), 4);
        assert!(matches!(socket, Socket::Polled { drained: true, .. }));
    }
}
