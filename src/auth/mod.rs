//! Who is connecting and from where: token verification ([`jwt`]), the Origin
//! allow-list ([`origin`]) and where the credential came from
//! ([`credentials`]). Everything here runs before the WebSocket upgrade.

pub mod credentials;
pub mod jwt;
pub mod origin;

use crate::rooms::RoomPattern;

/// A verified user, from the token's claims. The server stamps every message
/// with this, never with anything the client sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The user id (`sub`).
    pub sub: String,
    /// Display name (`name`, or `sub` when absent).
    pub name: String,
    /// Roles, matched against room permissions.
    pub roles: Vec<String>,
    /// The token's `rooms` claim: when present, the only rooms it may join.
    pub rooms: Option<Vec<RoomPattern>>,
    /// The `amr` claim contains `mfa`.
    pub mfa: bool,
    /// The token's `exp`, in Unix seconds.
    pub expires_at: i64,
}
