//! The wire contract (docs/protocol.md): client frames, server frames, error
//! codes and close codes. Pure: no I/O, so every rule here is unit-tested.

use base64::Engine as _;
use serde::{Deserialize, Serialize};

/// The subprotocol a client offers and the server answers.
pub const SUBPROTOCOL: &str = "securechat.v1";
/// Subprotocol entry that carries a token from a browser.
pub const BEARER_SUBPROTOCOL_PREFIX: &str = "securechat.bearer.";
/// Longest client message id.
pub const MAX_CLIENT_ID_CHARS: usize = 64;
/// Longest room name.
pub const MAX_ROOM_BYTES: usize = 128;
/// The only end-to-end payload algorithm.
pub const ENC_ALG: &str = "A256GCM";

/// A frame from the client, after JSON parsing and validation.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientFrame {
    Join(Join),
    Leave(Leave),
    Send(Send),
    Delete(Delete),
    Kick(Kick),
    Refresh(Refresh),
    Ping(Ping),
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Join {
    pub room: String,
    /// The last seq the client has seen; messages after it are replayed.
    #[serde(default)]
    pub since: Option<u64>,
    /// The room epoch `since` belongs to (from `joined`); when the room's
    /// sequence has restarted since, nothing is assumed and all held history
    /// is replayed.
    #[serde(default)]
    pub epoch: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Leave {
    pub room: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Send {
    pub room: String,
    /// The client's id for this message, echoed in `ack` and `error.ref`.
    pub id: String,
    #[serde(default)]
    pub body: Option<String>,
    #[serde(default, deserialize_with = "object")]
    pub enc: Option<Encrypted>,
}

/// An `enc` that is a JSON object: serde's derive would also take the
/// fields as an array in order, a form the contract does not have.
fn object<'de, D>(deserializer: D) -> Result<Option<Encrypted>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    use serde::de::Error as _;
    match Option::<serde_json::Value>::deserialize(deserializer)? {
        None => Ok(None),
        Some(value @ serde_json::Value::Object(_)) => Encrypted::deserialize(value)
            .map(Some)
            .map_err(D::Error::custom),
        Some(_) => Err(D::Error::custom("\"enc\" must be a JSON object")),
    }
}

/// An end-to-end encrypted payload; the server relays it unread.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Encrypted {
    pub alg: String,
    pub kid: String,
    pub iv: String,
    pub ct: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Delete {
    pub room: String,
    pub seq: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Kick {
    pub room: String,
    pub user: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Refresh {
    pub token: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ping {
    #[serde(default)]
    pub id: Option<String>,
}

/// The contract's error codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    InvalidMessage,
    UnknownType,
    TooLarge,
    RateLimited,
    Forbidden,
    UnknownRoom,
    NotJoined,
    EncryptedRoom,
    Conflict,
    Internal,
}

impl ErrorCode {
    /// The code as it appears on the wire and in metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidMessage => "invalid_message",
            Self::UnknownType => "unknown_type",
            Self::TooLarge => "too_large",
            Self::RateLimited => "rate_limited",
            Self::Forbidden => "forbidden",
            Self::UnknownRoom => "unknown_room",
            Self::NotJoined => "not_joined",
            Self::EncryptedRoom => "encrypted_room",
            Self::Conflict => "conflict",
            Self::Internal => "internal",
        }
    }
}

/// A refusal of one client frame, sent back as an `error` frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameError {
    pub code: ErrorCode,
    pub message: String,
    /// The client id the error answers, when the frame had one.
    pub reference: Option<String>,
}

impl FrameError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            reference: None,
        }
    }
    pub fn with_ref(mut self, reference: Option<&str>) -> Self {
        self.reference = reference.map(str::to_owned);
        self
    }
}

/// Why the server closes a connection: one value per close code of the contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disconnect {
    Normal,
    ShuttingDown,
    ProtocolError,
    InvalidPayload,
    PolicyViolation,
    TooLarge,
    Internal,
    OverCapacity,
    Expired,
    Kicked,
    RateLimited,
    SlowConsumer,
    IdleTimeout,
}

impl Disconnect {
    /// The WebSocket close code.
    pub fn code(self) -> u16 {
        match self {
            Self::Normal => 1000,
            Self::ShuttingDown => 1001,
            Self::ProtocolError => 1002,
            Self::InvalidPayload => 1007,
            Self::PolicyViolation => 1008,
            Self::TooLarge => 1009,
            Self::Internal => 1011,
            Self::OverCapacity => 1013,
            Self::Expired => 4001,
            Self::Kicked => 4003,
            Self::RateLimited => 4008,
            Self::SlowConsumer => 4009,
            Self::IdleTimeout => 4010,
        }
    }

    /// The close reason sent with the code, also the `reason` in logs.
    pub fn reason(self) -> &'static str {
        match self {
            Self::Normal => "normal",
            Self::ShuttingDown => "shutting_down",
            Self::ProtocolError => "protocol_error",
            Self::InvalidPayload => "invalid_payload",
            Self::PolicyViolation => "policy_violation",
            Self::TooLarge => "too_large",
            Self::Internal => "internal",
            Self::OverCapacity => "over_capacity",
            Self::Expired => "token_expired",
            Self::Kicked => "kicked",
            Self::RateLimited => "rate_limited",
            Self::SlowConsumer => "slow_consumer",
            Self::IdleTimeout => "idle_timeout",
        }
    }
}

/// Only used on the error path, to learn the type and id of a frame that failed
/// strict parsing.
#[derive(Deserialize)]
struct Lenient {
    #[serde(rename = "type")]
    kind: Option<serde_json::Value>,
    id: Option<serde_json::Value>,
}

/// What JSON (RFC 8259) allows around a value.
const JSON_WHITESPACE: [char; 4] = [' ', '\t', '\n', '\r'];

const NOT_AN_OBJECT: &str = "a frame must be one JSON object with a \"type\"";

const KNOWN_TYPES: [&str; 7] = ["join", "leave", "send", "delete", "kick", "refresh", "ping"];

impl ClientFrame {
    /// Parses and validates one text frame.
    pub fn parse(text: &str) -> Result<Self, FrameError> {
        // serde's derive takes a struct's fields as an array in order too
        // (`["send","general","c1","hello"]`): only an object is a frame.
        if !text.trim_start_matches(JSON_WHITESPACE).starts_with('{') {
            return Err(FrameError::new(ErrorCode::InvalidMessage, NOT_AN_OBJECT));
        }
        let frame: ClientFrame = match serde_json::from_str(text) {
            Ok(frame) => frame,
            Err(err) => return Err(Self::explain(text, &err)),
        };
        frame.validate()?;
        Ok(frame)
    }

    fn explain(text: &str, err: &serde_json::Error) -> FrameError {
        let Ok(lenient) = serde_json::from_str::<Lenient>(text) else {
            return FrameError::new(ErrorCode::InvalidMessage, NOT_AN_OBJECT);
        };
        let reference = match &lenient.id {
            Some(serde_json::Value::String(id)) if id.chars().count() <= MAX_CLIENT_ID_CHARS => {
                Some(id.as_str())
            }
            _ => None,
        };
        match &lenient.kind {
            Some(serde_json::Value::String(kind)) if KNOWN_TYPES.contains(&kind.as_str()) => {
                FrameError::new(ErrorCode::InvalidMessage, clean_serde_message(err))
                    .with_ref(reference)
            }
            Some(serde_json::Value::String(_)) => {
                FrameError::new(ErrorCode::UnknownType, "unknown frame type").with_ref(reference)
            }
            _ => FrameError::new(ErrorCode::InvalidMessage, "missing or non-string \"type\"")
                .with_ref(reference),
        }
    }

    /// The client id this frame carries, for `error.ref`.
    pub fn client_ref(&self) -> Option<&str> {
        match self {
            Self::Send(s) => Some(&s.id),
            Self::Ping(p) => p.id.as_deref(),
            _ => None,
        }
    }

    fn validate(&self) -> Result<(), FrameError> {
        let reference = self.client_ref();
        let fail =
            |msg: &str| Err(FrameError::new(ErrorCode::InvalidMessage, msg).with_ref(reference));
        match self {
            Self::Join(Join { room, epoch, .. }) => {
                if epoch.as_ref().is_some_and(|e| e.is_empty() || e.len() > 64) {
                    return fail("\"epoch\" must be 1 to 64 characters");
                }
                validate_room_name(room)
            }
            Self::Leave(Leave { room }) | Self::Delete(Delete { room, .. }) => {
                validate_room_name(room)
            }
            Self::Kick(k) => {
                validate_room_name(&k.room)?;
                if k.user.is_empty() || k.user.len() > 256 {
                    return fail("\"user\" must be 1 to 256 bytes");
                }
                Ok(())
            }
            Self::Send(s) => {
                validate_room_name(&s.room).map_err(|e| e.with_ref(reference))?;
                if s.id.is_empty() || s.id.chars().count() > MAX_CLIENT_ID_CHARS {
                    return Err(FrameError::new(
                        ErrorCode::InvalidMessage,
                        "\"id\" must be 1 to 64 characters",
                    ));
                }
                match (&s.body, &s.enc) {
                    (Some(body), None) => validate_body(body).map_err(|e| e.with_ref(reference)),
                    (None, Some(enc)) => validate_enc(enc).map_err(|e| e.with_ref(reference)),
                    _ => fail("a send carries exactly one of \"body\" or \"enc\""),
                }
            }
            Self::Refresh(r) => {
                if r.token.is_empty() {
                    return fail("\"token\" is empty");
                }
                Ok(())
            }
            Self::Ping(p) => match &p.id {
                Some(id) if id.chars().count() > MAX_CLIENT_ID_CHARS => Err(FrameError::new(
                    ErrorCode::InvalidMessage,
                    "\"id\" must be at most 64 characters",
                )),
                _ => Ok(()),
            },
        }
    }
}

/// serde's messages name the Rust side at times; keep the part about the field.
fn clean_serde_message(err: &serde_json::Error) -> String {
    let text = err.to_string();
    let text = match text.find(" at line ") {
        Some(i) => &text[..i],
        None => &text,
    };
    text.chars().take(200).collect()
}

/// Room names: 1 to 128 bytes of letters, digits and `._-:@+`.
pub fn validate_room_name(room: &str) -> Result<(), FrameError> {
    let ok = !room.is_empty()
        && room.len() <= MAX_ROOM_BYTES
        && room
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-:@+".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(FrameError::new(
            ErrorCode::InvalidMessage,
            "\"room\" must be 1 to 128 characters of letters, digits and ._-:@+",
        ))
    }
}

/// Message text: not empty, no control characters but newline and tab.
fn validate_body(body: &str) -> Result<(), FrameError> {
    if body.trim().is_empty() {
        return Err(FrameError::new(
            ErrorCode::InvalidMessage,
            "\"body\" is empty",
        ));
    }
    if body
        .chars()
        .any(|c| c.is_control() && c != '\n' && c != '\t')
    {
        return Err(FrameError::new(
            ErrorCode::InvalidMessage,
            "\"body\" contains control characters",
        ));
    }
    Ok(())
}

fn validate_enc(enc: &Encrypted) -> Result<(), FrameError> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let bad = |msg: &str| Err(FrameError::new(ErrorCode::InvalidMessage, msg));
    if enc.alg != ENC_ALG {
        return bad("\"enc.alg\" must be \"A256GCM\"");
    }
    if enc.kid.is_empty() || enc.kid.len() > 64 {
        return bad("\"enc.kid\" must be 1 to 64 characters");
    }
    match b64.decode(&enc.iv) {
        Ok(iv) if iv.len() == 12 => {}
        _ => return bad("\"enc.iv\" must be 12 bytes in base64"),
    }
    match b64.decode(&enc.ct) {
        // AES-GCM appends a 16-byte tag, so real ciphertext is never shorter.
        Ok(ct) if ct.len() >= 16 => Ok(()),
        _ => bad("\"enc.ct\" must be base64 ciphertext with its 16-byte tag"),
    }
}

/// The sender of a message, stamped by the server from the token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sender {
    pub sub: String,
    pub name: String,
}

/// The payload of a message: plain text or end-to-end ciphertext.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Payload {
    Body(String),
    Enc(Encrypted),
}

/// A `message` frame. Serialized once per broadcast; the bytes are shared.
#[derive(Debug, Serialize)]
pub struct MessageFrame<'a> {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub room: &'a str,
    pub seq: u64,
    pub id: &'a str,
    pub from: &'a Sender,
    #[serde(flatten)]
    pub payload: &'a Payload,
    pub ts: &'a str,
}

/// The limits announced in `welcome`.
#[derive(Debug, Clone, Serialize)]
pub struct WelcomeLimits {
    pub max_message_bytes: usize,
    pub rate_per_sec: u32,
    pub burst: u32,
}

/// The user as `welcome` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct WelcomeUser<'a> {
    pub sub: &'a str,
    pub name: &'a str,
    pub roles: &'a [String],
}

/// Frames the server sends to one client (everything but broadcasts).
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame<'a> {
    Welcome {
        session: &'a str,
        user: WelcomeUser<'a>,
        expires_at: String,
        limits: WelcomeLimits,
    },
    Joined {
        room: &'a str,
        seq: u64,
        recovered: bool,
        /// Identifies this run of the room's sequence; it changes when the
        /// sequence restarts (history lost), so a client's old seqs no
        /// longer apply.
        epoch: &'a str,
        /// The room accepts only end-to-end encrypted payloads.
        e2e: bool,
    },
    Left {
        room: &'a str,
        reason: &'a str,
    },
    Ack {
        id: &'a str,
        room: &'a str,
        seq: u64,
    },
    Deleted {
        room: &'a str,
        seq: u64,
        by: &'a str,
    },
    Refreshed {
        expires_at: String,
    },
    SessionExpiring {
        expires_at: String,
    },
    Pong {
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<&'a str>,
    },
    Error {
        code: ErrorCode,
        message: &'a str,
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<&'a str>,
    },
}

impl ServerFrame<'_> {
    /// The JSON text of this frame.
    pub fn to_json(&self) -> String {
        // Serializing these plain structs cannot fail: no maps with non-string
        // keys, no custom serializers that error.
        serde_json::to_string(self).unwrap_or_else(|_| {
            r#"{"type":"error","code":"internal","message":"serialization failed"}"#.into()
        })
    }
}

/// Formats a Unix time (seconds) as RFC 3339.
pub fn rfc3339(unix_secs: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix_secs)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| "1970-01-01T00:00:00Z".into())
}

/// The current time as RFC 3339 with milliseconds.
pub fn now_rfc3339() -> String {
    let now = time::OffsetDateTime::now_utc();
    let now = now
        .replace_nanosecond(now.millisecond() as u32 * 1_000_000)
        .unwrap_or(now);
    now.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| "1970-01-01T00:00:00Z".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> FrameError {
        ClientFrame::parse(text).unwrap_err()
    }

    #[test]
    fn parses_every_client_frame() {
        assert_eq!(
            ClientFrame::parse(r#"{"type":"join","room":"general","since":4}"#).unwrap(),
            ClientFrame::Join(Join {
                room: "general".into(),
                since: Some(4),
                epoch: None,
            })
        );
        assert!(matches!(
            ClientFrame::parse(r#"{"type":"send","room":"g","id":"c1","body":"hi"}"#),
            Ok(ClientFrame::Send(_))
        ));
        for text in [
            r#"{"type":"leave","room":"g"}"#,
            r#"{"type":"delete","room":"g","seq":3}"#,
            r#"{"type":"kick","room":"g","user":"bob"}"#,
            r#"{"type":"refresh","token":"abc"}"#,
            r#"{"type":"ping"}"#,
            r#"{"type":"ping","id":"p1"}"#,
        ] {
            ClientFrame::parse(text).unwrap_or_else(|e| panic!("{text}: {e:?}"));
        }
    }

    #[test]
    fn only_objects_are_frames() {
        for text in [
            r#"["send","general","c1","hello"]"#,
            r#"["join","general"]"#,
            r#" ["ping"]"#,
            r#""ping""#,
            "null",
            "42",
            "",
            r#"{"type":"send","room":"g","id":"c1","enc":["A256GCM","k","AAAAAAAAAAAAAAAA","AAAAAAAAAAAAAAAAAAAAAA=="]}"#,
            r#"{"type":"send","room":"g","id":"c1","enc":"A256GCM"}"#,
        ] {
            let e = err(text);
            assert_eq!(e.code, ErrorCode::InvalidMessage, "{text}");
        }
        // Whitespace before the object is JSON's, and still a frame.
        assert!(ClientFrame::parse(" \r\n\t{\"type\":\"ping\"}").is_ok());
        let enc = r#"{"type":"send","room":"g","id":"c1","enc":{"alg":"A256GCM","kid":"k","iv":"AAAAAAAAAAAAAAAA","ct":"AAAAAAAAAAAAAAAAAAAAAA=="}}"#;
        assert!(matches!(
            ClientFrame::parse(enc),
            Ok(ClientFrame::Send(Send { enc: Some(_), .. }))
        ));
    }

    #[test]
    fn unknown_field_is_refused_with_ref() {
        let e = err(r#"{"type":"send","room":"g","id":"c1","body":"hi","from":{"sub":"admin"}}"#);
        assert_eq!(e.code, ErrorCode::InvalidMessage);
        assert_eq!(e.reference.as_deref(), Some("c1"));
        assert!(e.message.contains("from"), "{}", e.message);
    }

    #[test]
    fn unknown_type_and_garbage() {
        assert_eq!(
            err(r#"{"type":"shout","id":"x"}"#).code,
            ErrorCode::UnknownType
        );
        assert_eq!(
            err(r#"{"type":"shout","id":"x"}"#).reference.as_deref(),
            Some("x")
        );
        assert_eq!(err("not json").code, ErrorCode::InvalidMessage);
        assert_eq!(err("[1,2]").code, ErrorCode::InvalidMessage);
        assert_eq!(err(r#"{"room":"g"}"#).code, ErrorCode::InvalidMessage);
        assert_eq!(err(r#"{"type":7}"#).code, ErrorCode::InvalidMessage);
    }

    #[test]
    fn send_rules() {
        let long_id = "x".repeat(65);
        let cases = [
            r#"{"type":"send","room":"g","id":"c","body":"a","enc":{"alg":"A256GCM","kid":"k","iv":"AAAAAAAAAAAAAAAA","ct":"AAAAAAAAAAAAAAAAAAAAAA=="}}"#.to_string(),
            r#"{"type":"send","room":"g","id":"c"}"#.to_string(),
            r#"{"type":"send","room":"g","id":"c","body":"   "}"#.to_string(),
            r#"{"type":"send","room":"g","id":"c","body":"a\u0000b"}"#.to_string(),
            r#"{"type":"send","room":"bad room","id":"c","body":"a"}"#.to_string(),
            format!(r#"{{"type":"send","room":"g","id":"{long_id}","body":"a"}}"#),
            r#"{"type":"send","room":"g","id":"c","enc":{"alg":"none","kid":"k","iv":"AAAAAAAAAAAAAAAA","ct":"AAAAAAAAAAAAAAAAAAAAAA=="}}"#.to_string(),
            r#"{"type":"send","room":"g","id":"c","enc":{"alg":"A256GCM","kid":"k","iv":"AAAA","ct":"AAAAAAAAAAAAAAAAAAAAAA=="}}"#.to_string(),
        ];
        for text in &cases {
            assert_eq!(err(text).code, ErrorCode::InvalidMessage, "{text}");
        }
        assert!(ClientFrame::parse(r#"{"type":"send","room":"g","id":"c","enc":{"alg":"A256GCM","kid":"k","iv":"AAAAAAAAAAAAAAAA","ct":"AAAAAAAAAAAAAAAAAAAAAA=="}}"#).is_ok());
        assert!(ClientFrame::parse("{\"type\":\"send\",\"room\":\"g\",\"id\":\"c\",\"body\":\"<img src=x onerror=alert(1)>\\nline\"}").is_ok());
    }

    #[test]
    fn message_frame_shape() {
        let from = Sender {
            sub: "alice".into(),
            name: "Alice".into(),
        };
        let payload = Payload::Body("hi".into());
        let json = serde_json::to_value(MessageFrame {
            kind: "message",
            room: "g",
            seq: 7,
            id: "m1",
            from: &from,
            payload: &payload,
            ts: "2026-01-01T00:00:00Z",
        })
        .unwrap();
        assert_eq!(json["type"], "message");
        assert_eq!(json["body"], "hi");
        assert_eq!(json["from"]["sub"], "alice");
        assert_eq!(json["seq"], 7);
    }

    #[test]
    fn error_frame_shape() {
        let json = ServerFrame::Error {
            code: ErrorCode::NotJoined,
            message: "join first",
            reference: Some("c1"),
        }
        .to_json();
        assert_eq!(
            json,
            r#"{"type":"error","code":"not_joined","message":"join first","ref":"c1"}"#
        );
    }

    #[test]
    fn close_codes_match_contract() {
        assert_eq!(Disconnect::ShuttingDown.code(), 1001);
        assert_eq!(Disconnect::SlowConsumer.code(), 4009);
        assert_eq!(Disconnect::Expired.code(), 4001);
    }
}
