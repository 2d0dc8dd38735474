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
        ("udp://127.0.0.1:53", "must be ws://, wss:// or tcp://"),
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

/// One agent, several backends (`--serve ID=URL` or a config file's `serve` list), each reaching
/// its own service; SIGHUP after the file changed starts and stops backends and leaves the
/// others' sessions alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_agent_serves_several_backends_and_a_reload_changes_them_without_dropping_others() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let relay = relay(&[], &[]).await;
    let url = format!("http://{}", relay.addr());
    let echo = services::echo().await;
    let (b, c) = (
        services::reply_after_eof(7, 5000).await,
        services::reply_after_eof(8, 6000).await,
    );
    let dir = backhaul_tests::scratch_dir("serve");
    let config = dir.join("agent.toml");
    std::fs::write(
        &config,
        format!("relay = \"{url}\"\nserve = [\"a=tcp://{echo}\", \"b=tcp://{b}\"]\n"),
    )
    .unwrap();
    let mut agent = Program::spawn("backhaul-agent", &[s("--config"), s(config.display())], &[]);
    registered(&mut agent, &["a", "b"]).await;
    let fa = frontend(&url, "a", &[], &[]).await;
    let fb = frontend(&url, "b", &[], &[]).await;
    let fc = frontend(&url, "c", &[], &[]).await;
    echo_transfer(fa.addr(), 1, 1 << 20).await;
    half_close_then_reply(fb.addr(), 2, 1000, 7, 5000).await;

    // A session of backend a stays open across the reload.
    let mut live = tokio::net::TcpStream::connect(fa.addr()).await.unwrap();
    let mut buf = [0u8; 5];
    live.write_all(b"first").await.unwrap();
    live.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"first");

    std::fs::write(
        &config,
        format!("relay = \"{url}\"\nserve = [\"a=tcp://{echo}\", \"c=tcp://{c}\"]\n"),
    )
    .unwrap();
    let pid = agent.pid().expect("the agent runs").to_string();
    let status = std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap();
    assert!(status.success());
    agent.wait_line("for backend c").await;
    half_close_then_reply(fc.addr(), 3, 1000, 8, 6000).await;
    agent.wait_stderr("no longer serving backend b").await;
    expect_closed_promptly(
        fb.addr(),
        b"anyone?",
        "backend b is still served after the reload",
    )
    .await;
    live.write_all(b"again").await.unwrap();
    live.read_exact(&mut buf).await.unwrap();
    assert_eq!(
        &buf, b"again",
        "backend a's session broke across the reload"
    );

    // --serve on the command line, and its mistakes.
    let agent2 = agent_cmd(
        &url,
        &[
            s("--serve"),
            format!("x=tcp://{echo}"),
            s("--serve"),
            format!("y=tcp://{b}"),
        ],
    );
    let mut agent2 = Program::spawn("backhaul-agent", &agent2, &[]);
    registered(&mut agent2, &["x", "y"]).await;
    for (args, says) in [
        (vec![s("--serve"), s("x")], "must be ID=URL"),
        (
            vec![
                s("--serve"),
                format!("x=tcp://{echo}"),
                s("--serve"),
                format!("x=tcp://{b}"),
            ],
            "served twice",
        ),
        (vec![], "nothing to serve"),
        (
            vec![s("--serve"), s("x=http://h")],
            "ws://, wss:// or tcp://",
        ),
    ] {
        let err = refuses_to_start("backhaul-agent", &agent_cmd(&url, &args), &[]).await;
        assert!(err.contains(says), "{args:?}: {err}");
    }
}

/// Waits until the agent has announced a link for every one of `ids`, in any order.
async fn registered(agent: &mut Program, ids: &[&str]) {
    let mut left: Vec<&str> = ids.to_vec();
    while !left.is_empty() {
        let line = agent.wait_line("connected to relay").await;
        left.retain(|id| !line.ends_with(&format!("for backend {id}")));
    }
}

fn agent_cmd(relay: &str, extra: &[String]) -> Vec<String> {
    let mut args = vec![s("--relay"), s(relay)];
    args.extend(extra.iter().cloned());
    args
}
