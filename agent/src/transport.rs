//! Which transport carries the link to the relay, and the order `auto` tries them in.
//!
//! | transport   | how                                                   | needs on the path          |
//! |-------------|-------------------------------------------------------|----------------------------|
//! | `websocket` | one WebSocket, a batch per binary message each way    | Upgrade, or CONNECT at a proxy |
//! | `http2`     | one HTTP/2 POST whose request and response bodies stream | HTTP/2 end to end (TLS ALPN `h2`, or cleartext prior knowledge) |
//! | `longpoll`  | a held GET for relay -> agent, a POST per batch for agent -> relay | plain HTTP/1.1 requests |

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// A concrete transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    WebSocket,
    Http2,
    LongPoll,
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Transport::WebSocket => "websocket",
            Transport::Http2 => "http2",
            Transport::LongPoll => "longpoll",
        })
    }
}

/// What the operator asked for: one transport, or the fastest that works.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransportChoice {
    Auto,
    Only(Transport),
}

impl FromStr for TransportChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "auto" => TransportChoice::Auto,
            "websocket" | "ws" => TransportChoice::Only(Transport::WebSocket),
            "http2" | "h2" => TransportChoice::Only(Transport::Http2),
            "longpoll" | "long-poll" | "http1" => TransportChoice::Only(Transport::LongPoll),
            other => {
                return Err(format!(
                    "unknown transport {other:?}; use auto, websocket, http2 or longpoll"
                ))
            }
        })
    }
}

impl TransportChoice {
    /// The transports to try, fastest first.
    pub fn ladder(self) -> Vec<Transport> {
        match self {
            TransportChoice::Auto => {
                vec![Transport::WebSocket, Transport::Http2, Transport::LongPoll]
            }
            TransportChoice::Only(t) => vec![t],
        }
    }
}

/// A stream that breaks sooner than this after connecting counts against its transport.
pub const STABLE_AFTER: Duration = Duration::from_secs(10);
/// Quick breaks in a row after which `auto` moves down to the next transport.
pub const QUICK_BREAKS_BEFORE_FALLBACK: u32 = 3;
/// How long `auto` stays on a slower transport before trying the faster ones again.
pub const RETRY_FASTER_AFTER: Duration = Duration::from_secs(300);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choices_parse_and_order() {
        assert_eq!(
            "auto".parse::<TransportChoice>().unwrap().ladder(),
            vec![Transport::WebSocket, Transport::Http2, Transport::LongPoll]
        );
        assert_eq!(
            "HTTP2".parse::<TransportChoice>().unwrap().ladder(),
            vec![Transport::Http2]
        );
        assert!("carrier-pigeon".parse::<TransportChoice>().is_err());
    }
}
