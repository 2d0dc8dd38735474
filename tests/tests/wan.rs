//! The stack over an emulated wide-area path between agent and relay (tests/src/wan.rs): every
//! transport carries bytes intact when round trips cost tens of milliseconds, directly and
//! through a forward proxy. Speed over these paths is measured by the benchmark
//! (`scripts/bench.sh --wan ...`), not asserted here.

use backhaul_tests::checks::echo_transfer;
use backhaul_tests::forward_proxy::ForwardProxy;
use backhaul_tests::wan::{WanPath, WanProfile};
use backhaul_tests::{s, services, Stack, StackOptions};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const MIB: u64 = 1 << 20;

/// The emulator itself: a round trip through it takes at least the profile's round trip, and
/// a bulk transfer at least its bytes over the bandwidth cap (lower bounds: what makes it an
/// emulator; it cannot be faster than the path it stands for). Bytes arrive intact, and end of
/// stream is carried after them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wan_path_delays_and_caps_each_direction() {
    let echo = services::echo().await;
    let profile = WanProfile::new(40, 80);
    let path = WanPath::start(echo, profile).await;
    let mut c = tokio::net::TcpStream::connect(path.addr).await.unwrap();
    c.set_nodelay(true).unwrap();
    let mut back = [0u8; 64];
    for _ in 0..3 {
        let t = Instant::now();
        c.write_all(&[9u8; 64]).await.unwrap();
        c.read_exact(&mut back).await.unwrap();
        assert!(
            t.elapsed() >= profile.rtt(),
            "a round trip took {:?}, less than the path's {:?}",
            t.elapsed(),
            profile.rtt()
        );
    }
    drop(c);
    // 4 MiB echoed: each direction carries it at 80 Mbit/s, at least 0.42 s.
    let t = Instant::now();
    echo_transfer(path.addr, 11, 4 * MIB).await;
    let floor = Duration::from_secs_f64((4 * MIB * 8) as f64 / profile.bits_per_sec as f64);
    assert!(
        t.elapsed() >= floor,
        "4 MiB crossed an 80 Mbit/s path in {:?}",
        t.elapsed()
    );
}

async fn over_wan(transport: &str, profile: WanProfile, via_proxy: bool) {
    // The path sits between agent and relay: started after the relay, so the stack is started
    // with the agent's URL pointing at a path built for the relay the stack is about to start.
    let proxy = if via_proxy {
        Some(ForwardProxy::start().await)
    } else {
        None
    };
    let relay = backhaul_tests::relay(&[], &[]).await;
    let path = WanPath::start(relay.addr(), profile).await;
    let mut agent_env = Vec::new();
    if let Some(p) = &proxy {
        agent_env.push((s("HTTP_PROXY"), p.url()));
    }
    let stack = Stack::start_with_relay(
        StackOptions {
            agent_relay_url: Some(path.url()),
            agent_args: vec![s("--transport"), s(transport)],
            agent_env,
            ..Default::default()
        },
        relay,
    )
    .await;
    echo_transfer(stack.entry(), 40, 2 * MIB).await;
    // Several sessions at once share the path.
    let tasks: Vec<_> = (0..4)
        .map(|i| tokio::spawn(echo_transfer(stack.entry(), 50 + i, 256 * 1024)))
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    if let Some(p) = proxy {
        assert!(
            p.log().contains("/agent/v1/links"),
            "the agent did not go through the proxy"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_over_a_50ms_path() {
    over_wan("websocket", WanProfile::new(50, 200), false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_over_a_50ms_path() {
    over_wan("http2", WanProfile::new(50, 200), false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn longpoll_over_a_100ms_path_through_a_forward_proxy() {
    over_wan("longpoll", WanProfile::new(100, 100), true).await;
}
