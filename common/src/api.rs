//! The agent API's URLs, its JSON messages, and the rules for backend IDs.
//!
//! | request                                      | body                | answer                         |
//! |----------------------------------------------|---------------------|--------------------------------|
//! | `POST {LINKS_PATH}`                          | JSON [`Hello`]      | JSON [`LinkInfo`]              |
//! | `GET  {LINKS_PATH}/{link}/poll?ack=N`        | -                   | batch, relay -> agent          |
//! | `POST {LINKS_PATH}/{link}/push`              | batch, agent -> relay | batch header (the ack)       |
//! | `GET  {LINKS_PATH}/{link}/ws?ack=N` (Upgrade) | batches, one per binary message, both ways | 101 |
//! | `POST {LINKS_PATH}/{link}/stream?ack=N` (HTTP/2) | length-prefixed batches | length-prefixed batches |
//! | `DELETE {LINKS_PATH}/{link}`                 | -                   | 204                            |
//!
//! Frontends open WebSockets at `{SESSION_PREFIX}{backend-id}[/rest][?query]`.

use serde::{Deserialize, Serialize};

/// Version of the agent protocol spoken by this build. Sent in [`Hello`].
pub const PROTOCOL_VERSION: u32 = 1;
/// Where agents register links; link URLs live below it.
pub const LINKS_PATH: &str = "/agent/v1/links";
/// Frontends' WebSocket URLs start with this, followed by the backend ID.
pub const SESSION_PREFIX: &str = "/b/";
/// Content type of batch bodies.
pub const BATCH_CONTENT_TYPE: &str = "application/x-backhaul-batch";
/// Content type of HTTP/2 stream bodies (length-prefixed batches).
pub const BATCH_STREAM_CONTENT_TYPE: &str = "application/x-backhaul-batch-stream";
/// Longest backend ID accepted.
pub const MAX_BACKEND_ID_LEN: usize = 64;

/// The agent's registration request.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Hello {
    /// [`PROTOCOL_VERSION`] of the agent.
    pub protocol: u32,
    /// Which backend this agent serves.
    pub backend_id: String,
    /// Free text for the relay's logs, e.g. `backhaul-agent/0.1.0 on host-17`.
    #[serde(default)]
    pub agent: String,
}

/// The relay's answer to [`Hello`]: the link's identity and the parameters of this relay.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LinkInfo {
    /// The link's ID, used in the poll and push URLs.
    pub link: String,
    /// How long the relay holds a poll open when it has nothing to send.
    pub poll_hold_ms: u64,
    /// Initial per-session flow-control window, in bytes of DATA, for both directions.
    pub window: u32,
    /// Largest batch body either side should send, in bytes (one frame may exceed it).
    pub max_batch_bytes: u32,
    /// How long the relay keeps a link whose agent has no request open; the agent gives up on
    /// a hung poll or stream set-up well within it, so its retry comes in time. 0: not said
    /// (a relay older than this field).
    #[serde(default)]
    pub agent_timeout_ms: u64,
}

/// Payload of an OPEN frame: what the frontend asked for.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct OpenRequest {
    /// Path and query to request from the backend (the part after `/b/<id>`), starting with `/`.
    pub path: String,
    /// WebSocket subprotocols the client offered, in its order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub protocols: Vec<String>,
    /// The client's address as the relay saw it, for the backend's logs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_addr: Option<String>,
}

/// Payload of an OPENED frame.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Opened {
    /// The subprotocol the backend chose, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
}

/// Why a backend ID was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BadBackendId {
    #[error("backend ID is empty")]
    Empty,
    #[error("backend ID is {0} bytes long; at most {MAX_BACKEND_ID_LEN} are allowed")]
    TooLong(usize),
    #[error("backend ID {0:?} has characters other than letters, digits, '.', '_' and '-'")]
    BadChar(String),
}

/// Checks a backend ID: 1 to 64 characters of `[A-Za-z0-9._-]`.
pub fn validate_backend_id(id: &str) -> Result<(), BadBackendId> {
    if id.is_empty() {
        return Err(BadBackendId::Empty);
    }
    if id.len() > MAX_BACKEND_ID_LEN {
        return Err(BadBackendId::TooLong(id.len()));
    }
    if !id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err(BadBackendId::BadChar(id.to_string()));
    }
    Ok(())
}

/// Splits a frontend's request path `/b/<id>[/rest]` into the backend ID and the rest (which
/// starts with `/`, or is empty). `None` when the path is not a session path.
pub fn split_session_path(path: &str) -> Option<(&str, &str)> {
    let tail = path.strip_prefix(SESSION_PREFIX)?;
    Some(match tail.find('/') {
        Some(i) => (&tail[..i], &tail[i..]),
        None => (tail, ""),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_ids() {
        assert_eq!(validate_backend_id("db-1.prod_eu"), Ok(()));
        assert_eq!(validate_backend_id(""), Err(BadBackendId::Empty));
        assert!(matches!(
            validate_backend_id(&"a".repeat(65)),
            Err(BadBackendId::TooLong(65))
        ));
        assert!(validate_backend_id("a/b").is_err());
        assert!(validate_backend_id("a b").is_err());
        assert!(validate_backend_id("caf\u{e9}").is_err());
    }

    #[test]
    fn session_paths() {
        assert_eq!(split_session_path("/b/x"), Some(("x", "")));
        assert_eq!(split_session_path("/b/x/"), Some(("x", "/")));
        assert_eq!(split_session_path("/b/x/a/b"), Some(("x", "/a/b")));
        assert_eq!(split_session_path("/b/"), Some(("", "")));
        assert_eq!(split_session_path("/agent/v1"), None);
    }

    #[test]
    fn json_tolerates_missing_optional_fields() {
        let o: OpenRequest = serde_json::from_str(r#"{"path":"/x"}"#).unwrap();
        assert_eq!(o.path, "/x");
        assert!(o.protocols.is_empty());
        let h: Hello = serde_json::from_str(r#"{"protocol":1,"backend_id":"a"}"#).unwrap();
        assert_eq!(h.agent, "");
    }
}
