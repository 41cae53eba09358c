//! A session's outbound queue, bounded in messages and bytes. Producers (the
//! hub's fan-out, the session's own replies) never wait: a full queue closes
//! the session as a slow consumer (4009) instead of slowing anyone else.
//!
//! The writer takes everything queued at once and writes it as one batch, so
//! a member that falls behind catches up in few large writes rather than
//! many small ones. Only a push onto an empty queue wakes the writer; pushes
//! behind it ride along. A writer holding back to coalesce its writes is
//! woken only when the queue reaches half its bound (or on a close). An
//! idle queue holds no allocation beyond its shared header.
//!
//! The writer's waker is kept under the queue's own lock: a push that has
//! to wake the writer does so in the same critical section that queued the
//! message, with no second lock or waker clone per message.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use smallvec::SmallVec;
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::Utf8Bytes;

use crate::protocol::Disconnect;
use crate::sync::lock;

/// One queued write.
#[derive(Debug, Clone)]
pub enum Outgoing {
    /// A text message: the writer frames it.
    Text(Utf8Bytes),
    /// Bytes that are already WebSocket frames (the reader's pong and close
    /// replies).
    Framed(Bytes),
}

impl Outgoing {
    pub fn len(&self) -> usize {
        match self {
            Self::Text(text) => text.len(),
            Self::Framed(bytes) => bytes.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Queued writes. One is held inline: the usual queue (a message, taken by
/// the writer before the next arrives) needs no allocation at all.
pub type Batch = SmallVec<[Outgoing; 1]>;

#[derive(Default)]
struct Queue {
    items: Batch,
    /// Bytes queued plus bytes taken by the writer and not yet written.
    bytes: usize,
    /// The writer is holding back to coalesce writes: a push onto the empty
    /// queue does not wake it, a queue at half its bound does.
    holding: bool,
    /// The writer waits for a push (or a close) and `waker` wakes it.
    waiting: bool,
    /// The writer task's waker, kept between waits (it rarely changes).
    waker: Option<Waker>,
}

impl Queue {
    /// The writer will wait: wake it with `cx`'s waker.
    fn wait(&mut self, cx: &Context<'_>) {
        match &self.waker {
            Some(waker) if waker.will_wake(cx.waker()) => {}
            _ => self.waker = Some(cx.waker().clone()),
        }
        self.waiting = true;
    }

    /// Wakes the writer if it waits.
    fn wake(&mut self) {
        if std::mem::take(&mut self.waiting)
            && let Some(waker) = &self.waker
        {
            waker.wake_by_ref();
        }
    }
}

struct Shared {
    queue: Mutex<Queue>,
    max_messages: usize,
    max_bytes: usize,
    /// The first close reason wins.
    close: OnceLock<Disconnect>,
    /// Wakes everyone waiting in [`Closer::closing`].
    closed: Notify,
    /// The writer is gone: pushes are dropped.
    writer_gone: AtomicBool,
}

/// The sending side, cloned into the hub for every joined room.
#[derive(Clone)]
pub struct Outbox {
    shared: Arc<Shared>,
}

/// The writer's side.
pub struct OutboxReceiver {
    shared: Arc<Shared>,
}

/// A new queue holding at most `max_messages` frames and `max_bytes` bytes.
pub fn outbox(max_messages: usize, max_bytes: usize) -> (Outbox, OutboxReceiver) {
    let shared = Arc::new(Shared {
        queue: Mutex::default(),
        max_messages,
        max_bytes,
        close: OnceLock::new(),
        closed: Notify::new(),
        writer_gone: AtomicBool::new(false),
    });
    (
        Outbox {
            shared: shared.clone(),
        },
        OutboxReceiver { shared },
    )
}

impl Outbox {
    /// Queues a text frame. On a full queue the session is closed with 4009
    /// and `false` returned.
    pub fn push(&self, frame: Utf8Bytes) -> bool {
        self.push_item(Outgoing::Text(frame))
    }

    /// Queues a frame given as text.
    pub fn push_text(&self, text: String) -> bool {
        self.push(Utf8Bytes::from(text))
    }

    /// Queues bytes that are already WebSocket frames.
    pub fn push_framed(&self, frames: Bytes) -> bool {
        self.push_item(Outgoing::Framed(frames))
    }

    fn push_item(&self, item: Outgoing) -> bool {
        let shared = &*self.shared;
        if self.is_closing() || shared.writer_gone.load(Ordering::Relaxed) {
            return false;
        }
        let len = item.len();
        let mut queue = lock(&shared.queue);
        if queue.items.len() >= shared.max_messages || queue.bytes + len > shared.max_bytes {
            drop(queue);
            self.close(Disconnect::SlowConsumer);
            return false;
        }
        let was_empty = queue.items.is_empty();
        queue.items.push(item);
        queue.bytes += len;
        let wake = if queue.holding {
            shared.half_full(&queue)
        } else {
            was_empty
        };
        if wake {
            queue.wake();
        }
        true
    }

    /// Asks the writer to close the connection with `reason` (first reason wins).
    pub fn close(&self, reason: Disconnect) {
        if self.shared.set_close(reason) && reason == Disconnect::SlowConsumer {
            metrics::counter!("securechat_slow_consumer_closes_total").increment(1);
        }
    }

    pub fn is_closing(&self) -> bool {
        self.shared.close.get().is_some()
    }

    /// The reason given to [`Outbox::close`], if any.
    pub fn close_reason(&self) -> Option<Disconnect> {
        self.shared.close.get().copied()
    }

    /// Waits for a close request, like [`Closer::closing`].
    pub async fn closing(&self) -> Disconnect {
        self.shared.closing().await
    }
}

impl Shared {
    /// The queue holds half its message or byte bound.
    fn half_full(&self, queue: &Queue) -> bool {
        queue.items.len() * 2 >= self.max_messages || queue.bytes * 2 >= self.max_bytes
    }

    /// Ready once `done` holds for the queue or a close is requested;
    /// otherwise the writer waits for a push (or the close) to wake it.
    fn poll_until(&self, cx: &Context<'_>, done: impl Fn(&Queue) -> bool) -> Poll<()> {
        let mut queue = lock(&self.queue);
        if done(&queue) || self.close.get().is_some() {
            queue.waiting = false;
            return Poll::Ready(());
        }
        queue.wait(cx);
        Poll::Pending
    }

    /// Sets the close reason if none is set; `true` if this call set it.
    fn set_close(&self, reason: Disconnect) -> bool {
        if self.close.set(reason).is_ok() {
            self.closed.notify_waiters();
            // The writer may wait for a push rather than on `closed`.
            lock(&self.queue).wake();
            true
        } else {
            false
        }
    }

    async fn closing(&self) -> Disconnect {
        loop {
            // Created before the check: `notify_waiters` reaches a
            // `Notified` from the moment it exists, so no close is missed.
            let notified = self.closed.notified();
            if let Some(reason) = self.close.get() {
                return *reason;
            }
            notified.await;
        }
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
        self.shared.closing().await
    }
}

impl OutboxReceiver {
    pub fn closer(&self) -> Closer {
        Closer {
            shared: self.shared.clone(),
        }
    }

    /// The reason a close was requested for, if it was.
    pub fn close_reason(&self) -> Option<Disconnect> {
        self.shared.close.get().copied()
    }

    /// Waits until something is queued or a close is requested.
    pub async fn ready(&self) {
        let shared = &*self.shared;
        std::future::poll_fn(|cx| shared.poll_until(cx, |queue| !queue.items.is_empty())).await;
    }

    /// Moves everything queued into `batch` (which must be empty) and
    /// returns its size in bytes; 0 when nothing was queued. The bytes stay
    /// counted against the bound until they are reported written with the
    /// next take (`written`: the size of the batch taken before).
    pub fn take(&mut self, batch: &mut Batch, written: usize) -> usize {
        debug_assert!(batch.is_empty());
        let mut queue = lock(&self.shared.queue);
        queue.bytes = queue.bytes.saturating_sub(written);
        if queue.items.is_empty() {
            return 0;
        }
        // Swap rather than drain: the queue keeps the batch buffer's
        // capacity, the batch gets the queue's, no allocation either way.
        std::mem::swap(&mut queue.items, batch);
        queue.bytes
    }

    /// Holds back until `until` to coalesce writes: returns then, or sooner
    /// when the queue reaches half its bound or a close is requested.
    /// `written`: the size of the batch taken before, now written (as for
    /// [`OutboxReceiver::take`]; the next take is then told 0).
    pub async fn hold(&self, until: tokio::time::Instant, written: usize) {
        let shared = &*self.shared;
        {
            let mut queue = lock(&shared.queue);
            queue.bytes = queue.bytes.saturating_sub(written);
            if shared.half_full(&queue) {
                return;
            }
            queue.holding = true;
        }
        let woken =
            std::future::poll_fn(|cx| shared.poll_until(cx, |queue| shared.half_full(queue)));
        tokio::select! {
            biased;
            () = tokio::time::sleep_until(until) => {}
            () = woken => {}
        }
        let mut queue = lock(&shared.queue);
        queue.holding = false;
        queue.waiting = false;
    }

    /// Gives back the queue's buffer if a burst made one and it is empty.
    pub fn release_spare(&self) {
        let mut queue = lock(&self.shared.queue);
        if queue.items.is_empty() && queue.items.spilled() {
            queue.items = Batch::new();
        }
    }
}

impl Drop for OutboxReceiver {
    fn drop(&mut self) {
        // The writer has ended: nothing queued from now on will be written.
        self.shared.writer_gone.store(true, Ordering::Relaxed);
        self.shared.set_close(Disconnect::Normal);
        let mut queue = lock(&self.shared.queue);
        queue.items = Batch::new();
        // A waker keeps its task's memory allocated: the ended writer's goes
        // now, not when the last sender (a room's member entry) lets go.
        queue.waker = None;
        queue.waiting = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;
    use std::time::Duration;

    fn texts(batch: &[Outgoing]) -> Vec<String> {
        batch
            .iter()
            .map(|item| match item {
                Outgoing::Text(text) => text.to_string(),
                Outgoing::Framed(bytes) => format!("{bytes:?}"),
            })
            .collect()
    }

    #[tokio::test]
    async fn full_queue_closes_as_slow_consumer() {
        let (tx, mut rx) = outbox(2, 1024);
        assert!(tx.push_text("a".into()));
        assert!(tx.push_text("b".into()));
        assert!(!tx.push_text("c".into()));
        assert_eq!(tx.close_reason(), Some(Disconnect::SlowConsumer));
        assert_eq!(rx.closer().closing().await, Disconnect::SlowConsumer);
        let mut batch = Batch::new();
        assert_eq!(rx.take(&mut batch, 0), 2);
        assert_eq!(texts(&batch), ["a", "b"]);
    }

    #[tokio::test]
    async fn byte_bound_counts_until_written() {
        let (tx, mut rx) = outbox(100, 10);
        assert!(tx.push_text("12345678".into()));
        let mut batch = Batch::new();
        assert_eq!(rx.take(&mut batch, 0), 8);
        // Taken but not written: still counted.
        assert!(!tx.push_text("123".into()));
        assert_eq!(rx.closer().closing().await, Disconnect::SlowConsumer);

        let (tx, mut rx) = outbox(100, 10);
        assert!(tx.push_text("12345678".into()));
        let mut batch = Batch::new();
        rx.take(&mut batch, 0);
        batch.clear();
        // Reported written with the next take.
        assert_eq!(rx.take(&mut batch, 8), 0);
        assert!(tx.push_text("123".into()));
        assert_eq!(tx.close_reason(), None);
    }

    #[test]
    fn one_queued_message_needs_no_buffer_and_a_burst_gives_its_back() {
        let (tx, rx) = outbox(100, 1000);
        assert!(tx.push_text("a".into()));
        assert!(!lock(&rx.shared.queue).items.spilled());
        assert!(tx.push_text("b".into()));
        assert!(tx.push_text("c".into()));
        assert!(lock(&rx.shared.queue).items.spilled());
        // Not while something is queued.
        rx.release_spare();
        assert_eq!(lock(&rx.shared.queue).items.len(), 3);
        let mut rx = rx;
        let mut batch = Batch::new();
        assert_eq!(rx.take(&mut batch, 0), 3);
        // The queue now holds the writer's old (inline) buffer.
        assert!(!lock(&rx.shared.queue).items.spilled());
        assert!(batch.spilled());
        assert!(tx.push_text("d".into()));
        assert!(tx.push_text("e".into()));
        batch.clear();
        rx.take(&mut batch, 3);
        batch.clear();
        // The writer's spilled (now empty) buffer goes back to the queue
        // with the next take; stand in for that here.
        std::mem::swap(&mut batch, &mut lock(&rx.shared.queue).items);
        rx.release_spare();
        assert!(!lock(&rx.shared.queue).items.spilled());
    }

    /// A hold that has not ended by itself after a pause (it waits a minute).
    async fn still_holding(hold: &tokio::task::JoinHandle<()>) -> bool {
        tokio::time::sleep(Duration::from_millis(50)).await;
        !hold.is_finished()
    }

    fn spawn_hold(rx: OutboxReceiver) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            rx.hold(tokio::time::Instant::now() + Duration::from_secs(60), 0)
                .await
        })
    }

    async fn ends(hold: tokio::task::JoinHandle<()>) {
        tokio::time::timeout(Duration::from_secs(10), hold)
            .await
            .expect("the hold ended")
            .unwrap();
    }

    #[tokio::test]
    async fn a_hold_lasts_through_pushes_below_half_the_bound() {
        let (tx, mut rx) = outbox(8, 1000);
        // A push onto the queue the last take emptied, before the hold began.
        let mut batch = Batch::new();
        rx.take(&mut batch, 0);
        assert!(tx.push_text("a".into()));
        let hold = spawn_hold(rx);
        assert!(still_holding(&hold).await);
        for text in ["b", "c"] {
            assert!(tx.push_text(text.into()));
        }
        assert!(still_holding(&hold).await, "3 of 8 is below half");
        assert!(tx.push_text("d".into()));
        ends(hold).await;
    }

    #[tokio::test]
    async fn a_hold_ends_at_half_the_byte_bound_and_on_close() {
        let (tx, rx) = outbox(100, 100);
        let hold = spawn_hold(rx);
        assert!(tx.push_text("x".repeat(40)));
        assert!(still_holding(&hold).await);
        assert!(tx.push_text("x".repeat(10)));
        ends(hold).await;

        let (tx, rx) = outbox(100, 100);
        let hold = spawn_hold(rx);
        assert!(still_holding(&hold).await);
        tx.close(Disconnect::ShuttingDown);
        ends(hold).await;
    }

    #[tokio::test]
    async fn the_batch_written_before_a_hold_no_longer_counts() {
        let (tx, mut rx) = outbox(100, 100);
        assert!(tx.push_text("x".repeat(60)));
        let mut batch = Batch::new();
        assert_eq!(rx.take(&mut batch, 0), 60);
        // Written: 60 of 100 bytes would be past half the bound if still counted.
        let hold = tokio::spawn(async move {
            rx.hold(tokio::time::Instant::now() + Duration::from_secs(60), 60)
                .await
        });
        assert!(still_holding(&hold).await);
        assert!(tx.push_text("x".repeat(50)));
        ends(hold).await;
    }

    #[tokio::test]
    async fn a_hold_on_a_half_full_queue_ends_at_once_and_pushes_wake_again_after_it() {
        let (tx, mut rx) = outbox(4, 1000);
        assert!(tx.push_text("a".into()));
        assert!(tx.push_text("b".into()));
        tokio::time::timeout(
            Duration::from_secs(10),
            rx.hold(tokio::time::Instant::now() + Duration::from_secs(60), 0),
        )
        .await
        .expect("no hold on a half-full queue");
        let mut batch = Batch::new();
        assert_eq!(rx.take(&mut batch, 0), 2);
        // Not holding any more: a push onto the empty queue wakes the writer.
        let waiting = tokio::spawn(async move {
            loop {
                rx.ready().await;
                batch.clear();
                if rx.take(&mut batch, 0) > 0 {
                    return;
                }
            }
        });
        tokio::task::yield_now().await;
        assert!(tx.push_text("c".into()));
        ends(waiting).await;
    }

    #[tokio::test]
    async fn first_reason_wins() {
        let (tx, rx) = outbox(2, 10);
        tx.close(Disconnect::ShuttingDown);
        tx.close(Disconnect::SlowConsumer);
        assert_eq!(rx.closer().closing().await, Disconnect::ShuttingDown);
    }

    #[tokio::test]
    async fn push_onto_an_empty_queue_wakes_the_writer() {
        let (tx, mut rx) = outbox(10, 100);
        let mut batch = Batch::new();
        assert_eq!(rx.take(&mut batch, 0), 0);
        let waiting = tokio::spawn(async move {
            rx.ready().await;
            let mut batch = Batch::new();
            rx.take(&mut batch, 0);
            texts(&batch)
        });
        tokio::task::yield_now().await;
        assert!(tx.push_text("x".into()));
        assert!(tx.push_framed(Bytes::from_static(b"\x8a\x00")));
        let got = tokio::time::timeout(std::time::Duration::from_secs(5), waiting)
            .await
            .expect("the writer was woken")
            .expect("no panic");
        assert_eq!(got.len(), 2);
        assert_eq!(got[0], "x");
    }

    #[tokio::test]
    async fn close_reaches_every_waiter() {
        let (tx, rx) = outbox(10, 100);
        let closer = rx.closer();
        let a = tokio::spawn({
            let closer = closer.clone();
            async move { closer.closing().await }
        });
        let b = tokio::spawn({
            let tx = tx.clone();
            async move { tx.closing().await }
        });
        tokio::task::yield_now().await;
        tx.close(Disconnect::Expired);
        assert_eq!(a.await.ok(), Some(Disconnect::Expired));
        assert_eq!(b.await.ok(), Some(Disconnect::Expired));
    }

    #[test]
    fn the_ended_writers_waker_is_let_go() {
        struct Noop;
        impl std::task::Wake for Noop {
            fn wake(self: Arc<Self>) {}
        }
        let count = Arc::new(Noop);
        let waker = Waker::from(count.clone());
        let (tx, rx) = outbox(4, 100);
        {
            let ready = std::pin::pin!(rx.ready());
            assert!(ready.poll(&mut Context::from_waker(&waker)).is_pending());
        }
        // The queue keeps the waker between waits...
        assert_eq!(Arc::strong_count(&count), 3);
        drop(rx);
        // ...until the writer ends, though `tx` still holds the queue.
        assert_eq!(Arc::strong_count(&count), 2);
        drop(tx);
    }

    #[tokio::test]
    async fn pushes_after_the_writer_ended_are_dropped() {
        let (tx, rx) = outbox(1, 100);
        drop(rx);
        assert!(!tx.push_text("late".into()));
        // Not a slow consumer: the writer ended for another reason.
        assert_eq!(tx.close_reason(), Some(Disconnect::Normal));
    }
}
