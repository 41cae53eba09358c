//! Room rules and permission decisions. Pure: a decision depends only on the
//! configuration and the identity, so every rule is unit-tested here.

use std::sync::Arc;

use crate::auth::Identity;
use crate::config::{DmConfig, RoomConfig};
use crate::protocol::{ErrorCode, FrameError};

/// A room name as configured: exact, or a prefix ending in `*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RoomPattern {
    Exact(String),
    Prefix(String),
}

impl RoomPattern {
    /// Parses `general` or `team-*`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let (body, prefix) = match text.strip_suffix('*') {
            Some(body) => (body, true),
            None => (text, false),
        };
        let valid_chars = body
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-:@+".contains(&b));
        if !valid_chars || body.len() > crate::protocol::MAX_ROOM_BYTES {
            return Err(format!(
                "{text:?} is not a room name: use up to 128 letters, digits and ._-:@+, optionally ending in *"
            ));
        }
        if prefix {
            Ok(Self::Prefix(body.to_owned()))
        } else if body.is_empty() {
            Err("a room name is empty".into())
        } else {
            Ok(Self::Exact(body.to_owned()))
        }
    }

    pub fn matches(&self, room: &str) -> bool {
        match self {
            Self::Exact(name) => name == room,
            Self::Prefix(prefix) => room.starts_with(prefix.as_str()),
        }
    }
}

/// A set of roles, where `*` stands for every authenticated user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoleSet {
    anyone: bool,
    roles: Vec<String>,
}

impl RoleSet {
    pub fn new(roles: &[String]) -> Self {
        Self {
            anyone: roles.iter().any(|r| r == "*"),
            roles: roles.iter().filter(|r| *r != "*").cloned().collect(),
        }
    }
    pub fn nobody() -> Self {
        Self {
            anyone: false,
            roles: Vec::new(),
        }
    }
    pub fn admits(&self, identity: &Identity) -> bool {
        self.anyone || identity.roles.iter().any(|r| self.roles.contains(r))
    }
}

/// How much history a room keeps: at most `len` messages, none older than
/// `max_age`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryBound {
    pub len: usize,
    pub max_age: std::time::Duration,
}

/// What one room allows.
#[derive(Debug, Clone)]
pub struct RoomPolicy {
    pub join: RoleSet,
    pub post: RoleSet,
    pub moderate: RoleSet,
    /// How much history the room keeps for `since` recovery.
    pub history: HistoryBound,
    /// Only `enc` payloads are accepted.
    pub e2e: bool,
    /// Only tokens proving multi-factor sign-in may join.
    pub require_mfa: bool,
    /// For `dm:<a>:<b>` rooms: the two members.
    pub dm_pair: Option<(String, String)>,
}

impl RoomPolicy {
    fn from_config(room: &RoomConfig) -> Self {
        Self {
            join: RoleSet::new(&room.join),
            post: RoleSet::new(&room.post),
            moderate: RoleSet::new(&room.moderate),
            history: HistoryBound {
                len: room.history,
                max_age: std::time::Duration::from_secs(room.history_max_age_secs),
            },
            e2e: room.e2e,
            require_mfa: room.require_mfa,
            dm_pair: None,
        }
    }

    pub fn can_post(&self, identity: &Identity) -> bool {
        match &self.dm_pair {
            Some((a, b)) => identity.sub == *a || identity.sub == *b,
            None => self.post.admits(identity),
        }
    }

    pub fn can_moderate(&self, identity: &Identity) -> bool {
        self.dm_pair.is_none() && self.moderate.admits(identity)
    }
}

/// The room rules of the configuration.
#[derive(Debug, Clone)]
pub struct Rooms {
    exact: std::collections::HashMap<String, Arc<RoomPolicy>>,
    /// Prefix patterns, longest first so the most specific wins.
    prefixes: Vec<(String, Arc<RoomPolicy>)>,
    dm: Option<Arc<RoomPolicy>>,
}

impl Rooms {
    pub fn new(rooms: &[RoomConfig], dm: &DmConfig) -> Self {
        let mut exact = std::collections::HashMap::new();
        let mut prefixes = Vec::new();
        for room in rooms {
            let policy = Arc::new(RoomPolicy::from_config(room));
            // Validation has run; an unparsable name cannot reach here.
            match RoomPattern::parse(&room.name) {
                Ok(RoomPattern::Exact(name)) => {
                    exact.insert(name, policy);
                }
                Ok(RoomPattern::Prefix(prefix)) => prefixes.push((prefix, policy)),
                Err(_) => {}
            }
        }
        prefixes.sort_by_key(|p| std::cmp::Reverse(p.0.len()));
        let dm = dm.enabled.then(|| {
            Arc::new(RoomPolicy {
                join: RoleSet::nobody(),
                post: RoleSet::nobody(),
                moderate: RoleSet::nobody(),
                history: HistoryBound {
                    len: dm.history,
                    max_age: std::time::Duration::from_secs(dm.history_max_age_secs),
                },
                e2e: false,
                require_mfa: false,
                dm_pair: None,
            })
        });
        Self {
            exact,
            prefixes,
            dm,
        }
    }

    /// The policy of a room, if the configuration has one for it.
    pub fn resolve(&self, room: &str) -> Result<Arc<RoomPolicy>, FrameError> {
        if let Some(rest) = room.strip_prefix("dm:") {
            let unknown = || FrameError::new(ErrorCode::UnknownRoom, "no such room");
            let dm = self.dm.as_ref().ok_or_else(unknown)?;
            let (a, b) = rest.split_once(':').ok_or_else(unknown)?;
            if a.is_empty() || b.is_empty() || b.contains(':') || a >= b {
                return Err(FrameError::new(
                    ErrorCode::UnknownRoom,
                    "direct-message rooms are named dm:<a>:<b> with the two user ids in sorted order",
                ));
            }
            let mut policy = RoomPolicy::clone(dm);
            policy.dm_pair = Some((a.to_owned(), b.to_owned()));
            return Ok(Arc::new(policy));
        }
        if let Some(policy) = self.exact.get(room) {
            return Ok(policy.clone());
        }
        self.prefixes
            .iter()
            .find(|(prefix, _)| room.starts_with(prefix.as_str()))
            .map(|(_, policy)| policy.clone())
            .ok_or_else(|| FrameError::new(ErrorCode::UnknownRoom, "no such room"))
    }

    /// Decides whether `identity` may join `room`; returns the room's policy.
    pub fn authorize_join(
        &self,
        identity: &Identity,
        room: &str,
    ) -> Result<Arc<RoomPolicy>, FrameError> {
        let policy = self.resolve(room)?;
        let forbidden = |msg: &str| Err(FrameError::new(ErrorCode::Forbidden, msg));
        if let Some(allowed) = &identity.rooms
            && !allowed.iter().any(|p| p.matches(room))
        {
            return forbidden("your token does not grant this room");
        }
        if let Some((a, b)) = &policy.dm_pair {
            if identity.sub != *a && identity.sub != *b {
                return forbidden("this direct-message room belongs to two other users");
            }
            return Ok(policy);
        }
        if policy.require_mfa && !identity.mfa {
            return forbidden("this room requires multi-factor sign-in");
        }
        if !policy.join.admits(identity) {
            return forbidden("your roles do not allow joining this room");
        }
        Ok(policy)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(sub: &str, roles: &[&str]) -> Identity {
        Identity {
            sub: sub.into(),
            name: sub.into(),
            roles: roles.iter().map(|r| r.to_string()).collect(),
            rooms: None,
            mfa: false,
            expires_at: 0,
        }
    }

    fn room(name: &str, join: &[&str], post: &[&str]) -> RoomConfig {
        RoomConfig {
            name: name.into(),
            join: join.iter().map(|r| r.to_string()).collect(),
            post: post.iter().map(|r| r.to_string()).collect(),
            moderate: vec!["admin".into()],
            history: 10,
            history_max_age_secs: 3600,
            e2e: false,
            require_mfa: false,
        }
    }

    fn rooms() -> Rooms {
        let mut secure = room("vault", &["*"], &["*"]);
        secure.require_mfa = true;
        Rooms::new(
            &[
                room("general", &["*"], &["*"]),
                room("team-*", &["staff"], &["staff"]),
                room("team-ops-*", &["ops"], &["ops"]),
                room("news", &["*"], &["editor"]),
                secure,
            ],
            &DmConfig {
                enabled: true,
                history: 5,
                history_max_age_secs: 3600,
            },
        )
    }

    #[test]
    fn join_by_role() {
        let r = rooms();
        let alice = identity("alice", &[]);
        let staff = identity("bob", &["staff"]);
        assert!(r.authorize_join(&alice, "general").is_ok());
        assert_eq!(
            r.authorize_join(&alice, "team-x").unwrap_err().code,
            ErrorCode::Forbidden
        );
        assert!(r.authorize_join(&staff, "team-x").is_ok());
        // The longest prefix wins: team-ops-* is for ops only.
        assert!(r.authorize_join(&staff, "team-ops-1").is_err());
        assert_eq!(
            r.authorize_join(&alice, "nowhere").unwrap_err().code,
            ErrorCode::UnknownRoom
        );
    }

    #[test]
    fn post_and_moderate() {
        let r = rooms();
        let news = r.resolve("news").unwrap();
        assert!(!news.can_post(&identity("alice", &[])));
        assert!(news.can_post(&identity("ed", &["editor"])));
        assert!(news.can_moderate(&identity("root", &["admin"])));
        assert!(!news.can_moderate(&identity("ed", &["editor"])));
    }

    #[test]
    fn token_rooms_claim_narrows() {
        let r = rooms();
        let mut alice = identity("alice", &["staff"]);
        alice.rooms = Some(vec![RoomPattern::parse("team-*").unwrap()]);
        assert!(r.authorize_join(&alice, "team-a").is_ok());
        assert_eq!(
            r.authorize_join(&alice, "general").unwrap_err().code,
            ErrorCode::Forbidden
        );
    }

    #[test]
    fn dm_rooms_are_private() {
        let r = rooms();
        let alice = identity("alice", &["admin"]);
        let bob = identity("bob", &[]);
        let eve = identity("eve", &["admin"]);
        assert!(r.authorize_join(&alice, "dm:alice:bob").is_ok());
        assert!(r.authorize_join(&bob, "dm:alice:bob").is_ok());
        assert_eq!(
            r.authorize_join(&eve, "dm:alice:bob").unwrap_err().code,
            ErrorCode::Forbidden
        );
        assert_eq!(
            r.authorize_join(&alice, "dm:bob:alice").unwrap_err().code,
            ErrorCode::UnknownRoom
        );
        let dm = r.resolve("dm:alice:bob").unwrap();
        assert!(!dm.can_moderate(&alice));
        assert!(!dm.can_post(&eve));
        let off = Rooms::new(&[], &DmConfig::default());
        assert!(off.resolve("dm:alice:bob").is_err());
    }

    #[test]
    fn mfa_rooms() {
        let r = rooms();
        let mut alice = identity("alice", &[]);
        assert!(r.authorize_join(&alice, "vault").is_err());
        alice.mfa = true;
        assert!(r.authorize_join(&alice, "vault").is_ok());
    }

    #[test]
    fn patterns() {
        assert!(RoomPattern::parse("").is_err());
        assert!(RoomPattern::parse("a b").is_err());
        assert_eq!(
            RoomPattern::parse("*").unwrap(),
            RoomPattern::Prefix(String::new())
        );
        assert!(RoomPattern::parse("team-*").unwrap().matches("team-1"));
        assert!(!RoomPattern::parse("team").unwrap().matches("team-1"));
    }
}
