//! Which transport carries the link to the relay, and the order `auto` tries them in.
//!
//! | transport   | how                                                   | needs on the path          |
//! |-------------|-------------------------------------------------------|----------------------------|
//! | `websocket` | one WebSocket, a batch per binary message each way    | Upgrade, or CONNECT at a proxy |
//! | `http2`     | one HTTP/2 POST whose request and response bodies stream | HTTP/2 end to end (TLS ALPN `h2`, or cleartext prior knowledge) |
//! | `longpoll`  | held GETs for relay -> agent, a POST per batch for agent -> relay | plain HTTP/1.1 requests |
//!
//! [`Ladder`] decides which one carries the link next from how the last spell on one ended; it
//! does no IO (`Link::run` carries out what it says), so its rules are tested here alone.

use std::str::FromStr;
use std::time::Duration;

pub use backhaul_common::transport::Transport;

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

/// How a spell of the link on one transport ended, as far as the choice of transport goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ended {
    /// The transport could not be set up (a proxy refused it, or the relay does not offer it).
    Refused(String),
    /// It carried the link for `lasted`, then broke; `progressed` if it carried anything.
    Broken {
        why: String,
        lasted: Duration,
        progressed: bool,
    },
    /// A slower transport has carried the link for [`RETRY_FASTER_AFTER`].
    TryFaster,
}

/// What to do after a spell ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// Try the same transport again after the usual pause; `reset_backoff` when it had worked
    /// (reconnect at once).
    Retry { reset_backoff: bool },
    /// Move down to the next transport at once; `warning` says why, for the log. `expected`:
    /// the path refused the faster transport (a proxy without CONNECT or HTTP/2), which is what
    /// the ladder is for (INFO); otherwise it kept breaking (WARN).
    FallBack { warning: String, expected: bool },
    /// Start again from the fastest transport.
    BackToTop,
}

/// The transports the link may use, fastest first, and where it stands on them.
#[derive(Debug, Clone)]
pub struct Ladder {
    rungs: Vec<Transport>,
    rung: usize,
    /// Spells on this rung that broke within [`STABLE_AFTER`], in a row.
    quick_breaks: u32,
    /// Why the link is not on the fastest transport.
    fell_back: Option<String>,
}

impl Ladder {
    pub fn new(choice: TransportChoice) -> Self {
        Self {
            rungs: choice.ladder(),
            rung: 0,
            quick_breaks: 0,
            fell_back: None,
        }
    }

    /// The transport to carry the link now.
    pub fn current(&self) -> Transport {
        self.rungs[self.rung]
    }

    /// After how long on the current transport to try the faster ones again (none on the top).
    pub fn retry_faster_after(&self) -> Option<Duration> {
        (self.rung > 0).then_some(RETRY_FASTER_AFTER)
    }

    /// Why the current transport carries the link, for the log.
    pub fn note(&self) -> String {
        match (&self.fell_back, self.rungs.len()) {
            (Some(why), _) => format!("fallback: {why}"),
            (None, 1) => "forced by --transport".to_string(),
            (None, _) => "the fastest transport".to_string(),
        }
    }

    /// Takes in how the last spell ended and says what to do next. A refused transport is left
    /// at once; one that breaks [`QUICK_BREAKS_BEFORE_FALLBACK`] times in a row within
    /// [`STABLE_AFTER`] of connecting is left too; the slowest is never left.
    pub fn ended(&mut self, how: Ended) -> Next {
        let transport = self.current();
        let next = self.rungs.get(self.rung + 1).copied();
        let (fall_back, reset_backoff) = match how {
            Ended::TryFaster => {
                self.rung = 0;
                self.quick_breaks = 0;
                self.fell_back = None;
                return Next::BackToTop;
            }
            Ended::Refused(why) => {
                let fall_back = next.map(|next| {
                    (
                        format!("{transport} transport to the relay is not available ({why}); falling back to {next}"),
                        format!("{transport} not available: {why}"),
                        true,
                    )
                });
                (fall_back, false)
            }
            Ended::Broken {
                why,
                lasted,
                progressed,
            } => {
                if lasted >= STABLE_AFTER {
                    self.quick_breaks = 0;
                } else {
                    self.quick_breaks += 1;
                }
                let quick_breaks = self.quick_breaks;
                let fall_back = next
                    .filter(|_| quick_breaks >= QUICK_BREAKS_BEFORE_FALLBACK)
                    .map(|next| {
                        (
                            format!("{transport} transport to the relay broke {quick_breaks} times within {STABLE_AFTER:?} of connecting (last: {why}); falling back to {next}"),
                            format!("{transport} kept breaking: {why}"),
                            false,
                        )
                    });
                (fall_back, progressed)
            }
        };
        match fall_back {
            Some((warning, reason, expected)) => {
                self.fell_back = Some(reason);
                self.rung += 1;
                self.quick_breaks = 0;
                Next::FallBack { warning, expected }
            }
            None => Next::Retry { reset_backoff },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn broke(secs: u64) -> Ended {
        Ended::Broken {
            why: "reset".into(),
            lasted: Duration::from_secs(secs),
            progressed: true,
        }
    }

    #[test]
    fn a_refused_transport_is_left_at_once_down_to_the_slowest() {
        let mut l = Ladder::new(TransportChoice::Auto);
        assert_eq!(l.current(), Transport::WebSocket);
        assert_eq!(l.note(), "the fastest transport");
        assert_eq!(l.retry_faster_after(), None);
        let Next::FallBack { warning, expected } =
            l.ended(Ended::Refused("403 from the proxy".into()))
        else {
            panic!("a refused websocket must fall back")
        };
        assert!(
            expected,
            "a path refusing a transport is what the ladder is for"
        );
        assert!(warning.contains("websocket transport to the relay is not available (403 from the proxy); falling back to http2"), "{warning}");
        assert_eq!(l.current(), Transport::Http2);
        assert_eq!(
            l.note(),
            "fallback: websocket not available: 403 from the proxy"
        );
        assert_eq!(l.retry_faster_after(), Some(RETRY_FASTER_AFTER));
        assert!(matches!(
            l.ended(Ended::Refused("no h2".into())),
            Next::FallBack { .. }
        ));
        assert_eq!(l.current(), Transport::LongPoll);
        // The slowest is never left: it is retried.
        assert_eq!(
            l.ended(Ended::Refused("502".into())),
            Next::Retry {
                reset_backoff: false
            }
        );
        assert_eq!(l.current(), Transport::LongPoll);
    }

    #[test]
    fn quick_breaks_in_a_row_fall_back_and_a_stable_spell_clears_them() {
        let mut l = Ladder::new(TransportChoice::Auto);
        assert_eq!(
            l.ended(broke(1)),
            Next::Retry {
                reset_backoff: true
            }
        );
        assert!(matches!(l.ended(broke(2)), Next::Retry { .. }));
        // A spell that lasted clears the count.
        assert!(matches!(l.ended(broke(60)), Next::Retry { .. }));
        assert!(matches!(l.ended(broke(1)), Next::Retry { .. }));
        assert!(matches!(l.ended(broke(1)), Next::Retry { .. }));
        let Next::FallBack { warning, expected } = l.ended(broke(1)) else {
            panic!("three quick breaks in a row must fall back")
        };
        assert!(
            !expected,
            "a transport that keeps breaking is worth a warning"
        );
        assert!(warning.contains("broke 3 times"), "{warning}");
        assert_eq!(l.current(), Transport::Http2);
        // Counting starts again on the new rung.
        assert!(matches!(l.ended(broke(1)), Next::Retry { .. }));
        // A spell that carried nothing does not reset the backoff.
        assert_eq!(
            l.ended(Ended::Broken {
                why: "reset".into(),
                lasted: Duration::from_secs(1),
                progressed: false
            }),
            Next::Retry {
                reset_backoff: false
            }
        );
    }

    #[test]
    fn trying_faster_goes_back_to_the_top_and_a_forced_transport_stays() {
        let mut l = Ladder::new(TransportChoice::Auto);
        l.ended(Ended::Refused("x".into()));
        l.ended(Ended::Refused("y".into()));
        assert_eq!(l.current(), Transport::LongPoll);
        assert_eq!(l.ended(Ended::TryFaster), Next::BackToTop);
        assert_eq!(l.current(), Transport::WebSocket);
        assert_eq!(l.note(), "the fastest transport");

        let mut forced = Ladder::new(TransportChoice::Only(Transport::Http2));
        assert_eq!(forced.note(), "forced by --transport");
        for _ in 0..5 {
            assert!(matches!(forced.ended(broke(0)), Next::Retry { .. }));
            assert!(matches!(
                forced.ended(Ended::Refused("no".into())),
                Next::Retry { .. }
            ));
        }
        assert_eq!(forced.current(), Transport::Http2);
        assert_eq!(forced.retry_faster_after(), None);
    }

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
