//! Shared pieces of backhaul. A map of the modules:
//!
//! | module      | owns                                                                          |
//! |-------------|-------------------------------------------------------------------------------|
//! | [`wire`]    | the agent link's binary frames and batches: encode/decode, no IO               |
//! | [`reliable`]| per-direction sequence numbers, acknowledgements and the retransmit buffer     |
//! | [`session`] | one session between a WebSocket and the link, with per-session flow control |
//! | [`tcp_peer`] | a TCP connection as a session's peer, for an agent that reaches a TCP service itself |
//! | [`window`]  | per-session flow control as one IO-free state machine: credit, windows that grow to the path's bandwidth-delay product within a budget and shrink when idle |
//! | [`ws`]      | a session's WebSocket at the level of frames, as a tunnel must carry it: IO-free decoder, thin reader/writer |
//! | [`api`]     | the agent API's paths, hello messages and backend-id rules                     |
//! | [`bridge`]  | one TCP connection <-> one WebSocket, with the half-close convention          |
//! | [`dial`]    | opening a WebSocket to a `ws://`/`wss://` URL, optionally via an HTTP proxy   |
//! | [`listen`]  | accepting TCP connections, with back-off when accept fails                   |
//! | [`secret`]  | tokens from flags or files, never empty, never printed; their SHA-256       |
//! | [`refusal_log`] | WARN lines for refusals at a bounded rate, the rest counted            |
//! | [`tls`]     | loading certificates and keys into rustls configurations                      |
//! | [`backoff`] | jittered exponential backoff for reconnect loops                              |
//! | [`telemetry`] | tracing set-up, the stdout "ready" lines, shutdown signals                   |
//!
//! The async code in the programs is a thin shell around the IO-free logic in `wire`,
//! `reliable` and `ws` (its `Decoder`), which the unit tests drive with byte literals.
#![forbid(unsafe_code)]

/// The version every program reports (`--version`, the status page, the agent's
/// registration): the package version and the git commit it was built from.
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("BACKHAUL_GIT_COMMIT"),
    ")"
);

pub mod api;
pub mod backoff;
pub mod bridge;
pub mod config;
pub mod dial;
pub mod lazy_read;
pub mod listen;
pub mod metrics;
pub mod refusal_log;
pub mod reliable;
pub mod runtime;
pub mod secret;
pub mod session;
pub mod tcp_peer;
pub mod telemetry;
pub mod tls;
pub mod transport;
pub mod window;
pub mod wire;
pub mod ws;

/// An error with its causes, as one line (`error: cause: cause`): reqwest and hyper otherwise
/// hide the part that says what went wrong.
pub fn describe_error(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        source = cause.source();
    }
    s
}

/// Exit code for a configuration the program refuses to start with (BSD `EX_USAGE`).
pub const EXIT_CONFIG: i32 = 64;

/// Default for the largest data message a session's WebSocket peer may send (`--max-message-kib`
/// of relay and agent). Messages are carried in pieces, so this is a policy, not a buffer: no
/// program ever holds a message whole.
pub const DEFAULT_MAX_MESSAGE_KIB: u64 = 16 * 1024;
