//! Shared pieces of backhaul. A map of the modules:
//!
//! | module      | owns                                                                          |
//! |-------------|-------------------------------------------------------------------------------|
//! | [`wire`]    | the agent link's binary frames and batches: encode/decode, no IO               |
//! | [`reliable`]| per-direction sequence numbers, acknowledgements and the retransmit buffer     |
//! | [`session`] | one session between a WebSocket and the link, with per-session flow control |
//! | [`api`]     | the agent API's paths, hello messages and backend-id rules                     |
//! | [`bridge`]  | one TCP connection <-> one WebSocket, with the half-close convention          |
//! | [`dial`]    | opening a WebSocket to a `ws://`/`wss://` URL, optionally via an HTTP proxy   |
//! | [`listen`]  | accepting TCP connections, with back-off when accept fails                   |
//! | [`tls`]     | loading certificates and keys into rustls configurations                      |
//! | [`backoff`] | jittered exponential backoff for reconnect loops                              |
//! | [`telemetry`] | tracing set-up, the stdout "ready" lines, shutdown signals                   |
//!
//! The async code in the programs is a thin shell around the IO-free logic in `wire` and
//! `reliable`, which the unit tests drive with byte literals.
#![forbid(unsafe_code)]

pub mod api;
pub mod backoff;
pub mod bridge;
pub mod dial;
pub mod lazy_read;
pub mod listen;
pub mod reliable;
pub mod runtime;
pub mod session;
pub mod telemetry;
pub mod tls;
pub mod transport;
pub mod wire;

/// Exit code for a configuration the program refuses to start with (BSD `EX_USAGE`).
pub const EXIT_CONFIG: i32 = 64;

/// Largest WebSocket message any backhaul program accepts or produces. Messages are carried
/// whole across the agent link, so this also bounds per-session reassembly memory.
pub const MAX_MESSAGE_SIZE: usize = 16 << 20;

/// Read buffer of each session's WebSocket. tungstenite holds it for the life of the connection,
/// in every process, so it stays small; [`lazy_read::LazyRead`] under it reads in large chunks
/// while data flows and holds nothing while the session is idle (measured with backhaul-bench).
pub const WS_READ_BUFFER: usize = 2 * 1024;

/// The WebSocket configuration all four programs use, so limits agree end to end.
pub fn ws_config() -> tokio_tungstenite::tungstenite::protocol::WebSocketConfig {
    tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .read_buffer_size(WS_READ_BUFFER)
        .max_message_size(Some(MAX_MESSAGE_SIZE))
        .max_frame_size(Some(MAX_MESSAGE_SIZE))
}
