//! The agent API's URLs, its JSON messages, and the rules for backend IDs.
//!
//! | request                                      | body                | answer                         |
//! |----------------------------------------------|---------------------|--------------------------------|
//! | `POST {LINKS_PATH}`                          | JSON [`Hello`]      | JSON [`LinkInfo`]              |
//! | `GET  {LINKS_PATH}/{link}/poll?ack=N&round=R` | -                  | batch, relay -> agent          |
//! | `POST {LINKS_PATH}/{link}/push`              | batch, agent -> relay | batch header (the ack)       |
//! | `GET  {LINKS_PATH}/{link}/ws?ack=N` (Upgrade) | batches, one per binary message, both ways | 101 |
//! | `POST {LINKS_PATH}/{link}/stream?ack=N` (HTTP/2) | length-prefixed batches | length-prefixed batches |
//! | `DELETE {LINKS_PATH}/{link}`                 | -                   | 204                            |
//!
//! Frontends open WebSockets at `{SESSION_PREFIX}{backend-id}[/rest][?query]`.

use serde::{Deserialize, Serialize};

/// Version of the agent protocol spoken by this build. Sent in [`Hello`].
pub const PROTOCOL_VERSION: u32 = 4;
/// Where agents register links; link URLs live below it.
pub const LINKS_PATH: &str = "/agent/v1/links";
/// Frontends' WebSocket URLs start with this, followed by the backend ID.
pub const SESSION_PREFIX: &str = "/b/";
/// Content type of batch bodies.
pub const BATCH_CONTENT_TYPE: &str = "application/x-backhaul-batch";
/// Content type of HTTP/2 stream bodies (length-prefixed batches).
pub const BATCH_STREAM_CONTENT_TYPE: &str = "application/x-backhaul-batch-stream";
/// Longest session path (with its query) the relay accepts; longer ones get 414.
pub const MAX_SESSION_PATH: usize = 4096;
/// Most bytes of headers (names and values) an OPEN may carry; more gets 431.
pub const MAX_OPEN_HEADER_BYTES: usize = 8 * 1024;
/// Most subprotocols a client may offer, and their total length; more gets 400.
pub const MAX_PROTOCOLS: usize = 16;
pub const MAX_PROTOCOL_BYTES: usize = 1024;

/// The client handshake headers the relay passes to the backend, beside the subprotocols. The
/// relay's own credential never goes further: `authorization` is passed only by a relay without
/// `--client-token`. The relay adds `x-forwarded-for`, `-proto` and `-host`.
pub const FORWARDED_HEADERS: &[&str] = &[
    "origin",
    "user-agent",
    "cookie",
    "accept-language",
    "authorization",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
];

/// The handshake header in which the agent presents `--backend-secret` to the backend. It is
/// the agent's own: never one of [`FORWARDED_HEADERS`], so a client cannot supply it.
pub const BACKEND_SECRET_HEADER: &str = "x-backhaul-secret";

/// The handshake header in which the agent tells the backend the part of the path the client
/// added after `/b/<id>` (path only, as it appears at the end of the dialed path), so that the
/// backend's `--route`s match only the part the agent's own settings chose. The agent's own:
/// never one of [`FORWARDED_HEADERS`].
pub const CLIENT_PATH_HEADER: &str = "x-backhaul-client-path";

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
    /// Asks the relay to expose the backend on a public TCP port (see [`Exposed`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expose: Option<ExposeRequest>,
}

/// An agent's request for an exposed port: plain TCP clients connect to it, no frontend needed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExposeRequest {
    /// This port; `None`: any free one of the relay's `--expose-ports`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Client addresses the port admits (`10.0.0.0/8`, `203.0.113.7`); empty: any. See
    /// [`parse_allow`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<String>,
}

/// Most entries an exposed port's allowlist may have.
pub const MAX_ALLOW: usize = 64;

/// Parses an allowlist of client addresses: networks (`10.0.0.0/8`, `2001:db8::/32`) or single
/// addresses.
pub fn parse_allow(list: &[String]) -> Result<Vec<ipnet::IpNet>, String> {
    if list.len() > MAX_ALLOW {
        return Err(format!(
            "{} allowlist entries; at most {MAX_ALLOW}",
            list.len()
        ));
    }
    list.iter()
        .map(|s| {
            s.parse::<ipnet::IpNet>()
                .or_else(|_| s.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                .map_err(|_| {
                    format!("{s:?} is not an address or a network (e.g. 10.0.0.0/8, 203.0.113.7)")
                })
        })
        .collect()
}

/// Where the relay exposes a backend: its TCP port, and the tunnel's ID (stable while the
/// port stays with the backend).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Exposed {
    pub port: u16,
    pub tunnel: String,
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
    /// How far a session's window may grow, each way, while its sender is held back by it
    /// (see `window.rs`). 0: not said (a relay older than this field): windows stay fixed.
    #[serde(default)]
    pub max_window: u32,
    /// Largest batch body either side should send, in bytes (one frame may exceed it).
    pub max_batch_bytes: u32,
    /// How long the relay keeps a link whose agent has no request open; the agent gives up on
    /// a hung poll or stream set-up well within it, so its retry comes in time. 0: not said
    /// (a relay older than this field).
    #[serde(default)]
    pub agent_timeout_ms: u64,
    /// The exposed port, when the agent asked for one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exposed: Option<Exposed>,
}

/// Payload of an OPEN frame: what the frontend asked for.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct OpenRequest {
    /// The part of the client's request target after `/b/<id>`: a path that is empty or starts
    /// with `/`, then `?query` if the client sent one. See [`backend_url`] for how the agent
    /// joins it to its `--backend` URL.
    pub path: String,
    /// The client's handshake headers that reach the backend ([`FORWARDED_HEADERS`]), and the
    /// `X-Forwarded-*` headers the relay adds, as (lower-case name, value).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<(String, String)>,
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

/// Why a session path was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BadSessionPath {
    #[error("session path is {0} bytes long; at most {MAX_SESSION_PATH} are allowed")]
    TooLong(usize),
    #[error("session path {0:?} does not start with '/'")]
    NoSlash(String),
    #[error("session path {0:?} has a '..' or '.' segment, plain or percent-encoded, or an encoded '/' or '\\' in a segment")]
    DotSegment(String),
    #[error("session path {0:?} has a character a path may not carry ('\\', '#', or a control character)")]
    BadChar(String),
}

/// Checks the part of a session request after `/b/<id>` (path, then `?query`): the path is
/// empty or starts with `/`; no segment is `.` or `..`, even percent-encoded, or hides an encoded
/// `/` or `\`; no `\`, `#` or control characters anywhere.
pub fn validate_session_path(rest: &str) -> Result<(), BadSessionPath> {
    if rest.len() > MAX_SESSION_PATH {
        return Err(BadSessionPath::TooLong(rest.len()));
    }
    if rest
        .bytes()
        .any(|b| b == b'\\' || b == b'#' || b < 0x20 || b == 0x7f)
    {
        return Err(BadSessionPath::BadChar(rest.to_string()));
    }
    let path = rest.split_once('?').map_or(rest, |(p, _)| p);
    if !path.is_empty() && !path.starts_with('/') {
        return Err(BadSessionPath::NoSlash(rest.to_string()));
    }
    for segment in path.split('/') {
        let decoded = percent_decode(segment);
        if decoded == b"."
            || decoded == b".."
            || decoded.contains(&b'/')
            || decoded.contains(&b'\\')
        {
            return Err(BadSessionPath::DotSegment(rest.to_string()));
        }
    }
    Ok(())
}

/// Decodes `%XX` escapes repeatedly, so `%252e` cannot hide a dot from a backend that decodes
/// twice.
fn percent_decode(s: &str) -> Vec<u8> {
    let mut cur: Vec<u8> = s.as_bytes().to_vec();
    loop {
        let next: Vec<u8> = percent_encoding::percent_decode(&cur).collect();
        if next == cur {
            return cur;
        }
        cur = next;
    }
}

/// The URL the agent dials for a session: `base` (its `--backend`) with the session's path
/// appended to its path, built with the URL API so the scheme, host and port are always the
/// configured ones. An empty path reaches exactly `base`'s path. Queries merge: the client's
/// parameters first, then `base`'s, and where both set a parameter, `base`'s wins (the client's
/// is dropped).
pub fn backend_url(base: &url::Url, rest: &str) -> Result<url::Url, BadSessionPath> {
    validate_session_path(rest)?;
    let (path, query) = match rest.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (rest, None),
    };
    let mut url = base.clone();
    if !path.is_empty() {
        url.set_path(&format!("{}{path}", base.path().trim_end_matches('/')));
    }
    let base_keys: Vec<String> = base.query_pairs().map(|(k, _)| k.into_owned()).collect();
    let mut parts: Vec<&str> = query
        .unwrap_or("")
        .split('&')
        .filter(|kv| !kv.is_empty())
        .filter(|kv| {
            let key = kv.split_once('=').map_or(*kv, |(k, _)| k);
            let key = url::form_urlencoded::parse(key.as_bytes())
                .next()
                .map(|(k, _)| k.into_owned())
                .unwrap_or_default();
            !base_keys.contains(&key)
        })
        .collect();
    parts.extend(
        base.query()
            .unwrap_or("")
            .split('&')
            .filter(|kv| !kv.is_empty()),
    );
    url.set_query((!parts.is_empty()).then(|| parts.join("&")).as_deref());
    Ok(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allowlists_take_networks_and_addresses_and_say_what_is_wrong() {
        let list: Vec<String> = ["10.0.0.0/8", "203.0.113.7", "2001:db8::/32"]
            .map(String::from)
            .to_vec();
        let nets = parse_allow(&list).unwrap();
        let admits = |ip: &str| {
            nets.iter()
                .any(|n| n.contains(&ip.parse::<std::net::IpAddr>().unwrap()))
        };
        assert!(admits("10.1.2.3") && admits("203.0.113.7") && admits("2001:db8::1"));
        assert!(!admits("203.0.113.8") && !admits("192.168.0.1"));
        let err = parse_allow(&["10.0.0.0/33".to_string()]).unwrap_err();
        assert!(err.contains("10.0.0.0/33"), "{err}");
        assert!(parse_allow(&vec!["1.2.3.4".to_string(); MAX_ALLOW + 1]).is_err());
    }

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
    fn clients_cannot_forward_the_backend_secret() {
        assert!(!FORWARDED_HEADERS
            .iter()
            .any(|h| h.eq_ignore_ascii_case(BACKEND_SECRET_HEADER)));
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

#[cfg(test)]
mod path_tests {
    use super::*;

    fn join(base: &str, rest: &str) -> Result<String, BadSessionPath> {
        backend_url(&url::Url::parse(base).unwrap(), rest).map(|u| u.to_string())
    }

    #[test]
    fn session_paths_extend_the_backend_path_only() {
        assert_eq!(join("ws://b:9/p", "").unwrap(), "ws://b:9/p");
        assert_eq!(join("ws://b:9/p", "/").unwrap(), "ws://b:9/p/");
        assert_eq!(join("ws://b:9/p", "/x/y").unwrap(), "ws://b:9/p/x/y");
        assert_eq!(join("ws://b:9/p/", "/x").unwrap(), "ws://b:9/p/x");
        assert_eq!(join("ws://b:9", "").unwrap(), "ws://b:9/");
        assert_eq!(join("ws://b:9", "/x?y=1").unwrap(), "ws://b:9/x?y=1");
        assert_eq!(join("ws://b:9/p", "?y=1").unwrap(), "ws://b:9/p?y=1");
        // '@' and '//' cannot move the request to another host: the URL API keeps ours.
        assert_eq!(
            join("ws://b:9/p", "/@evil:1/x").unwrap(),
            "ws://b:9/p/@evil:1/x"
        );
        assert_eq!(join("ws://b:9", "//evil/x").unwrap(), "ws://b:9//evil/x");
        for bad in [
            "@evil/x",
            "x",
            "/..",
            "/a/../b",
            "/%2e%2e/x",
            "/%2E%2e",
            "/.%2e/x",
            "/%252e%252e/x",
            "/.",
            "/a/%2fb",
            "/a%5cb",
            "/a\\b",
            "/a#b",
            "/a\u{1}b",
        ] {
            assert!(join("ws://b:9/p", bad).is_err(), "{bad:?} was accepted");
        }
        assert!(matches!(
            join("ws://b:9/p", &format!("/{}", "a".repeat(MAX_SESSION_PATH))),
            Err(BadSessionPath::TooLong(_))
        ));
    }

    #[test]
    fn the_backend_urls_query_parameters_win() {
        assert_eq!(
            join("ws://b:9/p?k=v&t=1", "/x?y=1&k=client&z").unwrap(),
            "ws://b:9/p/x?y=1&z&k=v&t=1"
        );
        assert_eq!(join("ws://b:9/?k=v", "/x").unwrap(), "ws://b:9/x?k=v");
        assert_eq!(join("ws://b:9/?k=v", "/x?k=w").unwrap(), "ws://b:9/x?k=v");
    }
}
