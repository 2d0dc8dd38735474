//! The agent API's JSON messages and the session-path rules that decide which backend URL an
//! agent dials for a frontend's request.
//!
//! Input: `b | text`. `b` picks the backend base URL; `text` is parsed as each JSON message and,
//! when it is UTF-8, also taken as a frontend's request path (`/b/<id>[/rest][?query]`).
//!
//! Invariants checked:
//! - no panic;
//! - every message that parses serializes and parses back to the same value;
//! - `validate_backend_id` accepts exactly 1 to 64 bytes of `[A-Za-z0-9._-]`;
//! - `split_session_path` splits without losing or adding a byte;
//! - `validate_session_path` accepts nothing that holds `\`, `#` or a control character, or is
//!   over `MAX_SESSION_PATH`, and `backend_url` accepts exactly what it accepts;
//! - the security property: a URL `backend_url` returns has the base's scheme, credentials,
//!   host and port, no fragment, a path that extends the base's path (never leaves it: no `.`
//!   or `..` segment, even percent-encoded), keeps every query parameter of the base, and reads
//!   back the same when its text is parsed again (what the dialer does).
#![no_main]

use backhaul_common::api::{
    backend_url, split_session_path, validate_backend_id, validate_session_path, Hello, LinkInfo,
    OpenRequest, Opened, MAX_BACKEND_ID_LEN, MAX_SESSION_PATH, SESSION_PREFIX,
};
use libfuzzer_sys::fuzz_target;
use serde::{de::DeserializeOwned, Serialize};
use url::Url;

const BASES: &[&str] = &[
    "ws://10.0.0.1:9000/app/",
    "ws://10.0.0.1:9000/app",
    "wss://backend.internal/app/v1?token=s3cret&k=v",
    "ws://10.0.0.1:9000",
];

/// Parses `text` as `T`; if it parses, checks that it reads back the same after serializing.
fn round_trip<T: Serialize + DeserializeOwned>(text: &[u8]) -> Option<T> {
    let v: T = serde_json::from_slice(text).ok()?;
    let json = serde_json::to_string(&v).expect("a parsed message serializes");
    let back: T = serde_json::from_str(&json).expect("a serialized message parses");
    assert_eq!(
        serde_json::to_value(&v).unwrap(),
        serde_json::to_value(&back).unwrap(),
        "round trip changed the message"
    );
    Some(v)
}

fn check_backend_id(id: &str) {
    let ok = !id.is_empty()
        && id.len() <= MAX_BACKEND_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    assert_eq!(validate_backend_id(id).is_ok(), ok, "backend ID {id:?}");
}

/// Decodes `%XX` until nothing changes, as a backend that decodes more than once might.
fn decode_fully(s: &str) -> Vec<u8> {
    let mut cur = s.as_bytes().to_vec();
    loop {
        let next: Vec<u8> = percent_encoding::percent_decode(&cur).collect();
        if next == cur {
            return cur;
        }
        cur = next;
    }
}

fn check_session_path(base: &Url, rest: &str) {
    let valid = validate_session_path(rest);
    if valid.is_ok() {
        assert!(rest.len() <= MAX_SESSION_PATH);
        assert!(
            !rest
                .bytes()
                .any(|b| b == b'\\' || b == b'#' || b < 0x20 || b == 0x7f),
            "{rest:?} accepted with a forbidden character"
        );
    }
    let joined = backend_url(base, rest);
    assert_eq!(
        joined.is_ok(),
        valid.is_ok(),
        "backend_url and validate disagree"
    );
    let Ok(url) = joined else {
        return;
    };

    // Same server, same credentials: a session path can never send the agent elsewhere.
    assert_eq!(url.scheme(), base.scheme(), "{rest:?}");
    assert_eq!(url.username(), base.username(), "{rest:?}");
    assert_eq!(url.password(), base.password(), "{rest:?}");
    assert_eq!(url.host_str(), base.host_str(), "{rest:?}");
    assert_eq!(url.port_or_known_default(), base.port_or_known_default());
    assert_eq!(url.fragment(), None, "{rest:?}");

    // The path only extends the base's path.
    let rest_path = rest.split_once('?').map_or(rest, |(p, _)| p);
    if rest_path.is_empty() {
        assert_eq!(url.path(), base.path(), "{rest:?}");
    } else {
        let prefix = format!("{}/", base.path().trim_end_matches('/'));
        assert!(
            url.path().starts_with(&prefix),
            "{rest:?} gave path {:?}, outside {prefix:?}",
            url.path()
        );
        for segment in url.path()[prefix.len()..].split('/') {
            let d = decode_fully(segment);
            assert!(
                d != b"." && d != b"..",
                "{rest:?} gave path {:?} with a dot segment",
                url.path()
            );
        }
    }

    // The base's query parameters all survive, with the base's values.
    let got: Vec<(String, String)> = url.query_pairs().into_owned().collect();
    for (k, v) in base.query_pairs() {
        assert!(
            got.iter().any(|(gk, gv)| *gk == k && *gv == v),
            "{rest:?} lost the base's {k}={v}: {:?}",
            url.query()
        );
        assert!(
            got.iter()
                .filter(|(gk, _)| *gk == k)
                .all(|(_, gv)| *gv == v),
            "{rest:?} overrode the base's {k}: {:?}",
            url.query()
        );
    }

    // The dialer gets the URL as text: it must read back the same.
    let again = Url::parse(url.as_str()).expect("backend_url gave an unparsable URL");
    assert_eq!(
        again, url,
        "{rest:?}: the URL's text reads back differently"
    );
}

fuzz_target!(|data: &[u8]| {
    let Some((&b, text)) = data.split_first() else {
        return;
    };
    let base = Url::parse(BASES[usize::from(b) % BASES.len()]).unwrap();

    if let Some(hello) = round_trip::<Hello>(text) {
        check_backend_id(&hello.backend_id);
    }
    round_trip::<LinkInfo>(text);
    round_trip::<Opened>(text);
    if let Some(open) = round_trip::<OpenRequest>(text) {
        check_session_path(&base, &open.path);
    }

    // The text as a frontend's request path, as the relay and then the agent see it.
    let Ok(path) = std::str::from_utf8(text) else {
        return;
    };
    if let Some((id, rest)) = split_session_path(path) {
        assert_eq!(format!("{SESSION_PREFIX}{id}{rest}"), path);
        assert!(!id.contains('/'));
        assert!(rest.is_empty() || rest.starts_with('/'));
        check_backend_id(id);
        check_session_path(&base, rest);
    } else {
        assert!(!path.starts_with(SESSION_PREFIX));
    }
    check_session_path(&base, path);
});
