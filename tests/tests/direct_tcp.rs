//! An agent that reaches a TCP service itself (`--backend tcp://HOST:PORT`), without a
//! backhaul-backend: client -> frontend -> relay -> agent -> service, real programs on
//! ephemeral ports, bytes checked by hash.

use backhaul_tests::checks::{
    echo_transfer, expect_closed_promptly, half_close_then_reply, refuses_to_start,
};
use backhaul_tests::rawws::{close_parts, RawWs, BINARY, CLOSE, PING, PONG};
use backhaul_tests::{agent, closed_port, frontend, relay, s, services, Program};
use std::net::SocketAddr;

const MIB: u64 = 1 << 20;

/// Relay, an agent with `--backend tcp://target` and a frontend.
struct Direct {
    relay: Program,
    agent: Program,
    frontend: Program,
}

async fn direct(target: SocketAddr, agent_args: &[String]) -> Direct {
    let relay = relay(&[], &[]).await;
    let url = format!("http://{}", relay.addr());
    let agent = agent(&url, "svc", &format!("tcp://{target}"), agent_args, &[]).await;
    let frontend = frontend(&url, "svc", &[], &[]).await;
    Direct {
        relay,
        agent,
        frontend,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_and_concurrent_connections_reach_a_tcp_service_directly() {
    let d = direct(services::echo().await, &[]).await;
    let entry = d.frontend.addr();
    echo_transfer(entry, 1, 32 * MIB).await;
    let tasks: Vec<_> = (0..50u64)
        .map(|i| tokio::spawn(echo_transfer(entry, 100 + i, 256 * 1024 + i * 101)))
        .collect();
    for t in tasks {
        t.await.expect("a connection failed");
    }
    // The same over long-poll, where frames cross in pushes and polls.
    let d = direct(services::echo().await, &[s("--transport"), s("longpoll")]).await;
    echo_transfer(d.frontend.addr(), 2, 8 * MIB).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_crosses_to_the_service_and_the_reply_comes_back() {
    let d = direct(services::reply_after_eof(9, 2 * MIB).await, &[]).await;
    half_close_then_reply(d.frontend.addr(), 4, 300_000, 9, 2 * MIB).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_that_refuses_closes_the_client_and_the_agent_says_why() {
    let target = closed_port();
    let d = direct(target, &[]).await;
    expect_closed_promptly(
        d.frontend.addr(),
        b"anyone there?",
        "client connection stayed open although the service refuses",
    )
    .await;
    let line = d.agent.wait_stderr("could not reach backend").await;
    assert!(line.contains(&format!("tcp://{target}")), "{line}");
}

/// A WebSocket client straight at the relay: the agent, standing in for the TCP service,
/// answers pings, carries end-of-stream both ways, and closes with 1000 once both directions
/// have ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_speaks_the_tcp_convention_for_the_service() {
    let d = direct(services::echo().await, &[]).await;
    let (mut ws, _) = RawWs::connect(d.relay.addr(), "/b/svc", &[])
        .await
        .expect("the relay accepts the WebSocket");
    ws.send(true, PING, b"are you there").await;
    assert_eq!(
        ws.recv().await,
        Some((true, PONG, b"are you there".to_vec()))
    );
    ws.send(true, BINARY, b"hello").await;
    assert_eq!(ws.recv_message().await, (BINARY, b"hello".to_vec()));
    // End-of-stream: the echo service finishes, and its own end-of-stream comes back.
    ws.send(true, BINARY, b"").await;
    assert_eq!(ws.recv_message().await, (BINARY, Vec::new()));
    let (fin, op, payload) = ws.recv().await.expect("a Close once both directions ended");
    assert!(fin && op == CLOSE, "opcode {op}");
    assert_eq!(close_parts(&payload).0, 1000);
    ws.close(1000, "").await;
    assert!(ws.closes_connection().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_backends_without_a_port_or_with_a_path_are_refused_at_start() {
    for (backend, needle) in [
        ("tcp://127.0.0.1", "needs a port"),
        ("tcp://127.0.0.1:22/ssh", "without a path or query"),
        ("udp://127.0.0.1:53", "must start with"),
    ] {
        let args = [
            s("--relay"),
            s("http://127.0.0.1:9"),
            s("--backend-id"),
            s("svc"),
            s("--backend"),
            s(backend),
        ];
        let err = refuses_to_start("backhaul-agent", &args, &[]).await;
        assert!(err.contains(needle), "{backend}: {err}");
    }
}
