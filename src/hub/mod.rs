//! The hub: who is in which room on this node, and delivery of room events
//! to their queues. Sequence, history and cross-node fan-out belong to the
//! [`broker::Broker`] underneath.
//!
//! Joining is ordered so that a member sees every message exactly once and in
//! seq order: the member is registered as *pending* (live events are buffered),
//! history after `since` is fetched, then `joined`, the replay and the buffered
//! events newer than the replay are queued, and the member goes live.

pub mod broker;
pub mod memory;
pub mod redis;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use tokio::sync::OnceCell;
use tokio_tungstenite::tungstenite::Utf8Bytes;

use broker::{Broker, BrokerError, EventSink, RoomEvent};

use crate::protocol::ServerFrame;
use crate::session::outbox::Outbox;
use crate::sync::{lock, read, write};

/// A session's membership of one room, shared by the session and the hub:
/// the hub clears `active` when the member is kicked.
#[derive(Debug)]
pub struct Membership {
    active: AtomicBool,
}

impl Membership {
    pub fn is_active(&self) -> bool {
        self.active.load(Ordering::Acquire)
    }
}

/// A session as the hub sees it.
#[derive(Clone)]
pub struct MemberHandle {
    pub session_id: u64,
    pub sub: Arc<str>,
    pub outbox: Outbox,
}

enum MemberState {
    /// Joining: live events are held until the history replay is queued.
    Pending(Vec<RoomEvent>),
    /// Live: message events with seq above `min_seq` are queued.
    Live { min_seq: u64 },
}

struct Member {
    handle: MemberHandle,
    membership: Arc<Membership>,
    state: MemberState,
}

#[derive(Default)]
struct LocalRoom {
    /// By session id, which grows with every connection accepted: a fan-out
    /// visits the members (and wakes their writers, which tokio runs in
    /// about that order) in the order their connections were set up, which
    /// is by and large the order their memory was allocated in, in this
    /// process and in the kernel. Consecutive deliveries then touch
    /// neighbouring memory; in a hash map's order every delivery started
    /// somewhere else.
    members: Mutex<BTreeMap<u64, Member>>,
    /// Set once the broker delivers this room's events to this node.
    subscribed: OnceCell<()>,
}

/// What a client asks for when it joins.
#[derive(Debug, Clone, Copy, Default)]
pub struct JoinRequest<'a> {
    /// The last seq it has seen.
    pub since: Option<u64>,
    /// The epoch that seq belongs to.
    pub epoch: Option<&'a str>,
    /// Whether the room is end-to-end encrypted (announced in `joined`).
    pub e2e: bool,
}

/// What a successful join reports.
#[derive(Debug, Clone, Copy)]
pub struct Joined {
    pub latest: u64,
    pub recovered: bool,
}

/// Why a join did not happen.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    /// The room has `limits.max_members_per_room` members on this node.
    #[error("the room is full")]
    Full,
    /// The member was kicked or left while joining.
    #[error("membership ended while joining")]
    Ended,
    #[error(transparent)]
    Broker(#[from] BrokerError),
}

/// Rooms with members on this node.
pub struct Hub {
    rooms: RwLock<HashMap<String, Arc<LocalRoom>>>,
    broker: Arc<dyn Broker>,
    /// Most messages replayed on one join: half the outbound queue, so the
    /// replay itself cannot make the member a slow consumer.
    max_replay: usize,
    /// Members one room may have on this node.
    max_members: usize,
}

impl Hub {
    pub fn new(
        broker: Arc<dyn Broker>,
        outbound_queue_messages: usize,
        max_members: usize,
    ) -> Arc<Self> {
        let hub = Arc::new(Self {
            rooms: RwLock::new(HashMap::new()),
            broker: broker.clone(),
            max_replay: (outbound_queue_messages / 2).max(1),
            max_members,
        });
        let sink: Arc<dyn EventSink> = hub.clone();
        broker.attach(Arc::downgrade(&sink));
        hub
    }

    pub fn broker(&self) -> &Arc<dyn Broker> {
        &self.broker
    }

    /// Number of rooms with members on this node.
    pub fn room_count(&self) -> usize {
        read(&self.rooms).len()
    }

    /// Room memberships on this node.
    pub fn member_count(&self) -> usize {
        read(&self.rooms)
            .values()
            .map(|room| lock(&room.members).len())
            .sum()
    }

    /// Adds a member to `room`, replaying what it missed after `since` (of
    /// `epoch`, when the client says). The `joined` frame and the replay are
    /// queued on the member's outbox.
    pub async fn join(
        &self,
        room: &str,
        member: MemberHandle,
        request: JoinRequest<'_>,
    ) -> Result<(Joined, Arc<Membership>), JoinError> {
        let since = request.since;
        let membership = Arc::new(Membership {
            active: AtomicBool::new(true),
        });
        let session_id = member.session_id;
        let local = {
            let mut rooms = write(&self.rooms);
            let local = rooms.entry(room.to_owned()).or_default().clone();
            let mut members = lock(&local.members);
            if members.len() >= self.max_members {
                return Err(JoinError::Full);
            }
            members.insert(
                session_id,
                Member {
                    handle: member.clone(),
                    membership: membership.clone(),
                    state: MemberState::Pending(Vec::new()),
                },
            );
            drop(members);
            local
        };
        let history = async {
            local
                .subscribed
                .get_or_try_init(|| self.broker.subscribe(room))
                .await?;
            let history = self.broker.history(room, since).await?;
            match request.epoch {
                // The client's seqs belong to an earlier run of the sequence:
                // replay all that is held, and say it may not be everything.
                Some(epoch) if since.is_some() && epoch != history.epoch => {
                    let mut all = self.broker.history(room, Some(0)).await?;
                    all.complete = false;
                    Ok::<_, BrokerError>(all)
                }
                _ => Ok(history),
            }
        }
        .await;
        let history = match history {
            Ok(history) => history,
            Err(e) => {
                self.leave(room, session_id);
                return Err(e.into());
            }
        };

        let mut members = lock(&local.members);
        let Some(entry) = members.get_mut(&session_id) else {
            // Kicked while joining.
            return Err(JoinError::Ended);
        };
        let skip = history.messages.len().saturating_sub(self.max_replay);
        let recovered = since.is_none() || (history.complete && skip == 0);
        let mut last = history.latest;
        let outbox = &entry.handle.outbox;
        outbox.push_text(
            ServerFrame::Joined {
                room,
                seq: history.latest,
                recovered,
                epoch: &history.epoch,
                e2e: request.e2e,
            }
            .to_json(),
        );
        for (seq, frame) in history.messages.into_iter().skip(skip) {
            outbox.push(frame);
            last = last.max(seq);
        }
        if let MemberState::Pending(buffered) =
            std::mem::replace(&mut entry.state, MemberState::Live { min_seq: 0 })
        {
            for event in buffered {
                match event {
                    RoomEvent::Message { seq, frame } if seq > last => {
                        outbox.push(frame);
                        last = seq;
                    }
                    RoomEvent::Message { .. } => {}
                    RoomEvent::Deleted { frame, .. } => {
                        outbox.push(frame);
                    }
                    RoomEvent::Reset => last = 0,
                    RoomEvent::Kick { .. } => {}
                }
            }
        }
        entry.state = MemberState::Live { min_seq: last };
        Ok((
            Joined {
                latest: history.latest,
                recovered,
            },
            membership,
        ))
    }

    /// Removes a member; the last one out unsubscribes the node from the room.
    pub fn leave(&self, room: &str, session_id: u64) {
        let mut rooms = write(&self.rooms);
        let Some(local) = rooms.get(room) else {
            return;
        };
        let empty = {
            let mut members = lock(&local.members);
            if let Some(member) = members.remove(&session_id) {
                member.membership.active.store(false, Ordering::Release);
            }
            members.is_empty()
        };
        if empty {
            rooms.remove(room);
            self.broker.unsubscribe(room);
        }
    }

    fn kick(&self, local: &LocalRoom, room: &str, user: &str) {
        let mut members = lock(&local.members);
        let frame = Utf8Bytes::from(
            ServerFrame::Left {
                room,
                reason: "kicked",
            }
            .to_json(),
        );
        members.retain(|_, member| {
            if &*member.handle.sub != user {
                return true;
            }
            member.membership.active.store(false, Ordering::Release);
            member.handle.outbox.push(frame.clone());
            false
        });
    }
}

impl EventSink for Hub {
    fn deliver(&self, room: &str, event: &RoomEvent) {
        let started = std::time::Instant::now();
        let Some(local) = read(&self.rooms).get(room).cloned() else {
            return;
        };
        if let RoomEvent::Kick { user } = event {
            self.kick(&local, room, user);
            return;
        }
        let mut members = lock(&local.members);
        for member in members.values_mut() {
            match (&mut member.state, event) {
                (MemberState::Pending(buffer), _) => {
                    if buffer.len() >= self.max_replay {
                        member
                            .handle
                            .outbox
                            .close(crate::protocol::Disconnect::SlowConsumer);
                    } else {
                        buffer.push(event.clone());
                    }
                }
                (MemberState::Live { min_seq }, RoomEvent::Message { seq, frame }) => {
                    if *seq > *min_seq {
                        member.handle.outbox.push(frame.clone());
                    }
                }
                (MemberState::Live { .. }, RoomEvent::Deleted { frame, .. }) => {
                    member.handle.outbox.push(frame.clone());
                }
                (MemberState::Live { min_seq }, RoomEvent::Reset) => *min_seq = 0,
                (MemberState::Live { .. }, RoomEvent::Kick { .. }) => {}
            }
        }
        if matches!(event, RoomEvent::Message { .. }) {
            metrics::histogram!("securechat_fanout_seconds")
                .record(started.elapsed().as_secs_f64());
        }
    }
}
