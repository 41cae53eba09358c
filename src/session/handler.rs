//! What each client frame does. Every refusal is an `error` frame with the
//! contract's code and the client's `ref`; none ends the session except
//! repeated invalid frames (1008) and repeated rate violations (4008).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

use super::{JoinedRoom, Session, count_refusal};
use crate::auth::jwt::TokenError;
use crate::hub::broker::{DeleteOutcome, Draft};
use crate::hub::{JoinError, JoinRequest};
use crate::protocol::{
    ClientFrame, Delete, Disconnect, ErrorCode, FrameError, Join, Kick, Leave, Payload, Refresh,
    Send, Sender, ServerFrame,
};

fn internal(e: impl std::fmt::Display) -> FrameError {
    warn!(event = "broker.error", error = %e);
    FrameError::new(
        ErrorCode::Internal,
        "the server could not complete this request",
    )
}

impl Session {
    /// Handles one text frame; returns a reason when the session must end.
    pub(super) async fn on_text(&mut self, text: &str) -> Option<Disconnect> {
        let frame = match ClientFrame::parse(text) {
            Ok(frame) => frame,
            Err(e) => {
                self.refuse(e);
                self.invalid_frames = self.invalid_frames.saturating_add(1);
                if u32::from(self.invalid_frames) >= self.state.config.limits.max_invalid_frames {
                    return Some(Disconnect::PolicyViolation);
                }
                return None;
            }
        };
        let reference = frame.client_ref().map(str::to_owned);
        // An application ping keeps the connection alive, not the session.
        if !matches!(frame, ClientFrame::Ping(_)) {
            self.last_active = Instant::now();
        }
        if self.limiter.check().is_err() || self.user.limiter.check().is_err() {
            metrics::counter!("securechat_rate_limited_total").increment(1);
            self.refuse(
                FrameError::new(ErrorCode::RateLimited, "slow down: message rate exceeded")
                    .with_ref(reference.as_deref()),
            );
            return self.strike();
        }
        let result = match frame {
            ClientFrame::Join(join) => self.join(join).await,
            ClientFrame::Leave(leave) => self.leave(leave),
            ClientFrame::Send(send) => self.send(send).await,
            ClientFrame::Delete(delete) => self.delete(delete).await,
            ClientFrame::Kick(kick) => self.kick(kick).await,
            ClientFrame::Refresh(refresh) => self.refresh(refresh),
            ClientFrame::Ping(ping) => {
                self.reply(ServerFrame::Pong {
                    id: ping.id.as_deref(),
                });
                Ok(())
            }
        };
        if let Err(e) = result {
            let reference = e.reference.clone().or(reference);
            self.refuse(FrameError { reference, ..e });
        }
        None
    }

    /// Counts a rate-limit violation; too many in one window end the session.
    fn strike(&mut self) -> Option<Disconnect> {
        let limits = &self.state.config.limits;
        let window = Duration::from_secs(limits.rate_strike_window_secs);
        if self.strike_window_start.elapsed() > window {
            self.strike_window_start = Instant::now();
            self.strikes = 0;
        }
        self.strikes = self.strikes.saturating_add(1);
        // Once per window, not once per refused frame: a flood must not
        // flood the logs too.
        if self.strikes == 1 {
            info!(event = "rate.limited", "message rate exceeded");
        }
        (u32::from(self.strikes) > limits.rate_strikes).then_some(Disconnect::RateLimited)
    }

    fn reply(&self, frame: ServerFrame<'_>) {
        self.outbox.push_text(frame.to_json());
    }

    fn refuse(&self, e: FrameError) {
        count_refusal(e.code.as_str());
        debug!(event = "frame.refused", code = e.code.as_str(), message = %e.message);
        self.reply(ServerFrame::Error {
            code: e.code,
            message: &e.message,
            reference: e.reference.as_deref(),
        });
    }

    /// The joined room `name`, forgetting it if the member was kicked.
    fn joined_room(&mut self, name: &str) -> Result<&JoinedRoom, FrameError> {
        let active = self
            .joined
            .get(name)
            .map(|r| r.membership.is_active())
            .ok_or_else(|| FrameError::new(ErrorCode::NotJoined, "join the room first"))?;
        if !active {
            self.joined.remove(name);
            return Err(FrameError::new(ErrorCode::NotJoined, "join the room first"));
        }
        self.joined
            .get(name)
            .ok_or_else(|| FrameError::new(ErrorCode::NotJoined, "join the room first"))
    }

    async fn join(&mut self, join: Join) -> Result<(), FrameError> {
        if self.joined_room(&join.room).is_ok() {
            return Err(FrameError::new(
                ErrorCode::Conflict,
                "already joined: leave first to join again",
            ));
        }
        self.joined.retain(|r| r.membership.is_active());
        if self.joined.len() >= self.state.config.limits.max_rooms_per_connection {
            return Err(FrameError::new(
                ErrorCode::Forbidden,
                "too many rooms on this connection: leave one first",
            ));
        }
        let policy = self
            .state
            .rooms
            .authorize_join(&self.identity, &join.room)?;
        let (joined, membership) = self
            .state
            .hub
            .join(
                &join.room,
                self.member_handle(),
                JoinRequest {
                    since: join.since,
                    epoch: join.epoch.as_deref(),
                    e2e: policy.e2e,
                },
            )
            .await
            .map_err(|e| match e {
                JoinError::Full => FrameError::new(ErrorCode::Forbidden, "the room is full"),
                JoinError::Ended => {
                    FrameError::new(ErrorCode::Conflict, "removed from the room while joining")
                }
                JoinError::Broker(e) => internal(e),
            })?;
        debug!(event = "room.joined", room = %join.room, seq = joined.latest, recovered = joined.recovered);
        self.joined
            .insert(join.room, JoinedRoom { policy, membership });
        Ok(())
    }

    fn leave(&mut self, leave: Leave) -> Result<(), FrameError> {
        self.joined_room(&leave.room)?;
        self.joined.remove(&leave.room);
        self.state.hub.leave(&leave.room, self.id);
        self.reply(ServerFrame::Left {
            room: &leave.room,
            reason: "left",
        });
        Ok(())
    }

    async fn send(&mut self, send: Send) -> Result<(), FrameError> {
        let room = self.joined_room(&send.room)?;
        let policy = room.policy.clone();
        if !policy.can_post(&self.identity) {
            return Err(FrameError::new(
                ErrorCode::Forbidden,
                "your roles do not allow posting in this room",
            ));
        }
        let payload = match (send.body, send.enc) {
            (Some(_), _) if policy.e2e => {
                return Err(FrameError::new(
                    ErrorCode::EncryptedRoom,
                    "this room is end-to-end encrypted: send \"enc\", not \"body\"",
                ));
            }
            (_, Some(_)) if !policy.e2e => {
                return Err(FrameError::new(
                    ErrorCode::InvalidMessage,
                    "\"enc\" is accepted only in end-to-end encrypted rooms",
                ));
            }
            (Some(body), None) => Payload::Body(body),
            (None, Some(enc)) => Payload::Enc(enc),
            // Parsing guarantees exactly one of the two.
            _ => return Err(FrameError::new(ErrorCode::InvalidMessage, "no payload")),
        };
        let seq = self
            .state
            .hub
            .broker()
            .publish(
                &send.room,
                policy.history,
                Draft {
                    from: self.sender.clone(),
                    payload,
                },
            )
            .await
            .map_err(internal)?;
        self.reply(ServerFrame::Ack {
            id: &send.id,
            room: &send.room,
            seq,
        });
        Ok(())
    }

    async fn delete(&mut self, delete: Delete) -> Result<(), FrameError> {
        let policy = self.joined_room(&delete.room)?.policy.clone();
        let moderator = policy.can_moderate(&self.identity);
        let outcome = self
            .state
            .hub
            .broker()
            .delete(&delete.room, delete.seq, &self.identity.sub, moderator)
            .await
            .map_err(internal)?;
        match outcome {
            DeleteOutcome::Deleted => {
                info!(target: crate::telemetry::AUDIT_TARGET, event = "audit.delete", room = %delete.room, seq = delete.seq, by = %self.identity.sub);
                Ok(())
            }
            DeleteOutcome::NotFound => Err(FrameError::new(
                ErrorCode::Conflict,
                "no message with that seq in the room's history",
            )),
            DeleteOutcome::Forbidden => Err(FrameError::new(
                ErrorCode::Forbidden,
                "only the author or a moderator may delete this message",
            )),
        }
    }

    async fn kick(&mut self, kick: Kick) -> Result<(), FrameError> {
        let policy = self.joined_room(&kick.room)?.policy.clone();
        if !policy.can_moderate(&self.identity) {
            return Err(FrameError::new(
                ErrorCode::Forbidden,
                "only moderators may kick",
            ));
        }
        self.state
            .hub
            .broker()
            .kick(&kick.room, &kick.user)
            .await
            .map_err(internal)?;
        info!(target: crate::telemetry::AUDIT_TARGET, event = "audit.kick", room = %kick.room, user = %kick.user, by = %self.identity.sub);
        Ok(())
    }

    fn refresh(&mut self, refresh: Refresh) -> Result<(), FrameError> {
        let identity = self.state.keys.load().verify(&refresh.token).map_err(|e| {
            let message = match e {
                TokenError::TooLarge => {
                    return FrameError::new(ErrorCode::TooLarge, "the token is too large");
                }
                TokenError::Expired => "the new token has expired",
                TokenError::Invalid(_) => "the new token is not valid",
            };
            info!(
                event = "auth.failed",
                reason = e.reason(),
                context = "refresh"
            );
            FrameError::new(ErrorCode::Forbidden, message)
        })?;
        if identity.sub != self.identity.sub {
            info!(
                event = "auth.failed",
                reason = "refresh_other_user",
                context = "refresh"
            );
            return Err(FrameError::new(
                ErrorCode::Forbidden,
                "a refresh must be for the same user",
            ));
        }
        if identity.name != self.identity.name {
            self.sender = Arc::new(Sender {
                sub: identity.sub.clone(),
                name: identity.name.clone(),
            });
        }
        self.identity = identity;
        self.expiry_warned = false;
        info!(target: crate::telemetry::AUDIT_TARGET, event = "audit.token_refreshed", expires_at = self.identity.expires_at);
        self.reply(ServerFrame::Refreshed {
            expires_at: crate::protocol::rfc3339(self.identity.expires_at),
        });
        Ok(())
    }
}
