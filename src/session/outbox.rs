//! A session's outbound queue, bounded in messages and bytes. Producers (the
//! hub's fan-out, the session's own replies) never wait: a full queue closes
//! the session as a slow consumer (4009) instead of slowing anyone else.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use tokio::sync::{Notify, mpsc};
use tokio_tungstenite::tungstenite::Utf8Bytes;

use crate::protocol::Disconnect;

struct Shared {
    /// Bytes queued and not yet written.
    queued_bytes: AtomicUsize,
    max_bytes: usize,
    /// The first close reason wins.
    close: OnceLock<Disconnect>,
    closed: Notify,
}

/// The sending side, cloned into the hub for every joined room.
#[derive(Clone)]
pub struct Outbox {
    tx: mpsc::Sender<Utf8Bytes>,
    shared: Arc<Shared>,
}

/// The writer's side.
pub struct OutboxReceiver {
    rx: mpsc::Receiver<Utf8Bytes>,
    shared: Arc<Shared>,
}

/// A new queue holding at most `max_messages` frames and `max_bytes` bytes.
pub fn outbox(max_messages: usize, max_bytes: usize) -> (Outbox, OutboxReceiver) {
    let (tx, rx) = mpsc::channel(max_messages);
    let shared = Arc::new(Shared {
        queued_bytes: AtomicUsize::new(0),
        max_bytes,
        close: OnceLock::new(),
        closed: Notify::new(),
    });
    (
        Outbox {
            tx,
            shared: shared.clone(),
        },
        OutboxReceiver { rx, shared },
    )
}

impl Outbox {
    /// Queues a frame. On a full queue the session is closed with 4009 and
    /// `false` returned.
    pub fn push(&self, frame: Utf8Bytes) -> bool {
        if self.is_closing() {
            return false;
        }
        let len = frame.len();
        let before = self.shared.queued_bytes.fetch_add(len, Ordering::Relaxed);
        if before + len > self.shared.max_bytes {
            self.shared.queued_bytes.fetch_sub(len, Ordering::Relaxed);
            self.close(Disconnect::SlowConsumer);
            return false;
        }
        match self.tx.try_send(frame) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.shared.queued_bytes.fetch_sub(len, Ordering::Relaxed);
                self.close(Disconnect::SlowConsumer);
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                self.shared.queued_bytes.fetch_sub(len, Ordering::Relaxed);
                false
            }
        }
    }

    /// Queues a frame given as text.
    pub fn push_text(&self, text: String) -> bool {
        self.push(Utf8Bytes::from(text))
    }

    /// Asks the writer to close the connection with `reason` (first reason wins).
    pub fn close(&self, reason: Disconnect) {
        if self.shared.close.set(reason).is_ok() {
            if reason == Disconnect::SlowConsumer {
                metrics::counter!("securechat_slow_consumer_closes_total").increment(1);
            }
            self.shared.closed.notify_one();
        }
    }

    pub fn is_closing(&self) -> bool {
        self.shared.close.get().is_some()
    }

    /// The reason given to [`Outbox::close`], if any.
    pub fn close_reason(&self) -> Option<Disconnect> {
        self.shared.close.get().copied()
    }
}

/// Waits for a close request; held by the writer beside its receiver.
#[derive(Clone)]
pub struct Closer {
    shared: Arc<Shared>,
}

impl Closer {
    /// Waits until a close is requested and returns its reason.
    pub async fn closing(&self) -> Disconnect {
        loop {
            if let Some(reason) = self.shared.close.get() {
                return *reason;
            }
            self.shared.closed.notified().await;
        }
    }
}

impl OutboxReceiver {
    pub fn closer(&self) -> Closer {
        Closer {
            shared: self.shared.clone(),
        }
    }

    /// The next frame, or `None` when every sender is gone.
    pub async fn recv(&mut self) -> Option<Utf8Bytes> {
        self.rx.recv().await
    }

    /// A frame that is ready now, for batching writes.
    pub fn try_recv(&mut self) -> Option<Utf8Bytes> {
        self.rx.try_recv().ok()
    }

    /// Marks `len` bytes as written.
    pub fn written(&self, len: usize) {
        self.shared.queued_bytes.fetch_sub(len, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn full_queue_closes_as_slow_consumer() {
        let (tx, mut rx) = outbox(2, 1024);
        assert!(tx.push_text("a".into()));
        assert!(tx.push_text("b".into()));
        assert!(!tx.push_text("c".into()));
        assert_eq!(tx.close_reason(), Some(Disconnect::SlowConsumer));
        assert_eq!(rx.closer().closing().await, Disconnect::SlowConsumer);
        assert_eq!(rx.recv().await.as_deref(), Some("a"));
    }

    #[tokio::test]
    async fn byte_bound_closes_too() {
        let (tx, rx) = outbox(100, 10);
        assert!(tx.push_text("12345678".into()));
        assert!(!tx.push_text("123".into()));
        assert_eq!(rx.closer().closing().await, Disconnect::SlowConsumer);
    }

    #[tokio::test]
    async fn first_reason_wins() {
        let (tx, rx) = outbox(2, 10);
        tx.close(Disconnect::ShuttingDown);
        tx.close(Disconnect::SlowConsumer);
        assert_eq!(rx.closer().closing().await, Disconnect::ShuttingDown);
    }
}
