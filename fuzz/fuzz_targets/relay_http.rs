//! The relay's whole HTTP surface, as a stranger on the internet reaches it: bytes on a TCP
//! connection to a real relay (`backhaul_relay::run`, in this process so that its code is
//! covered), answered and closed.
//!
//! Input: the bytes a client sends, then end of stream. The relay runs with a shared agent token
//! and client token, so the input reaches the authentication paths and, when it carries
//! `Bearer fuzz-agent-token` (seeds and the dictionary hold it), the agent API behind them.
//!
//! Invariants checked:
//! - no panic (a panic in a relay task aborts the process: libFuzzer sees it);
//! - the relay answers and closes every connection within its deadlines: reading the answer to
//!   end of stream never takes longer than the first-request deadline plus the longest poll hold;
//! - after every input the relay still serves `/healthz`.
#![no_main]

use backhaul_common::secret::Secret;
use backhaul_relay::auth::Policy;
use backhaul_relay::conn::ConnConfig;
use backhaul_relay::hub::HubConfig;
use backhaul_relay::Config;
use libfuzzer_sys::fuzz_target;
use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::runtime::Runtime;

/// The longest a connection may stay open after its client stopped sending.
const ANSWER_DEADLINE: Duration = Duration::from_secs(5);

struct Relay {
    rt: Runtime,
    addr: SocketAddr,
}

fn relay() -> &'static Relay {
    static RELAY: OnceLock<Relay> = OnceLock::new();
    RELAY.get_or_init(|| {
        // A panic in any relay task must end the run, not just the task.
        let hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            hook(info);
            std::process::abort();
        }));
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let agent =
            backhaul_common::secret::load("agent-token", Some("fuzz-agent-token".into()), None)
                .expect("token")
                .expect("token");
        let client: Secret =
            backhaul_common::secret::load("client-token", Some("fuzz-client-token".into()), None)
                .expect("token")
                .expect("token");
        let config = Config {
            hub: HubConfig {
                poll_hold: Duration::from_secs(1),
                agent_timeout: Duration::from_secs(1),
                open_timeout: Duration::from_secs(1),
                window: 64 * 1024,
                max_window: 1 << 20,
                window_budget: 16 << 20,
                max_batch_bytes: 64 * 1024,
                max_sessions: 1000,
                max_sessions_per_backend: 1000,
                max_sessions_per_client: 1000,
                max_pending_per_backend: 64,
                max_message: 1 << 20,
            },
            policy: Policy::shared(Some(&agent), Some(&client)),
            conn: ConnConfig {
                max_connections: 1000,
                max_connections_per_client: 1000,
                first_request_timeout: Duration::from_secs(1),
                idle_timeout: Duration::from_secs(1),
            },
            tls: None,
            expose: None,
            // The fuzzer's requests come from loopback: /metrics and /status get fuzzed too.
            admin: backhaul_relay::AdminAccess::Loopback,
        };
        let shutdown = tokio_util::sync::CancellationToken::new();
        rt.spawn(async move {
            let _ = backhaul_relay::run(config, listener, shutdown).await;
        });
        Relay { rt, addr }
    })
}

async fn exchange(addr: SocketAddr, input: &[u8]) -> Vec<u8> {
    let mut conn = TcpStream::connect(addr).await.expect("the relay accepts");
    // The relay may answer and close before reading everything: a failed write is fine.
    let _ = conn.write_all(input).await;
    let _ = conn.shutdown().await;
    let mut answer = Vec::new();
    let read = tokio::time::timeout(ANSWER_DEADLINE, async {
        let mut buf = [0u8; 16 * 1024];
        loop {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) if answer.len() < 1 << 20 => answer.extend_from_slice(&buf[..n]),
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(
        read.is_ok(),
        "the relay held a connection open for {ANSWER_DEADLINE:?} after its client finished"
    );
    // Reset rather than linger in TIME_WAIT: thousands of runs a second would use up the
    // ephemeral ports. (Deprecated because a non-zero linger blocks on drop; zero never does.)
    #[allow(deprecated)]
    let _ = conn.set_linger(Some(Duration::ZERO));
    answer
}

fuzz_target!(|input: &[u8]| {
    let relay = relay();
    relay.rt.block_on(async {
        exchange(relay.addr, input).await;
        let health = exchange(relay.addr, b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n").await;
        assert!(
            health.starts_with(b"HTTP/1.1 200"),
            "the relay stopped serving /healthz: {:?}",
            String::from_utf8_lossy(&health)
        );
    });
});
