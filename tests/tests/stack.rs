//! The four real programs on ephemeral ports, with real bytes checked by hash.

use backhaul_tests::certs::{test_certs, TestCerts};
use backhaul_tests::checks::{echo_transfer, expect_closed_promptly, half_close_then_reply, step};
use backhaul_tests::fault::FaultInjector;
use backhaul_tests::forward_proxy::ForwardProxy;
use backhaul_tests::metrics;
use backhaul_tests::{
    agent, backend, closed_port, data, frontend, relay, s, services, Stack, StackOptions,
};
use futures_util::{SinkExt, StreamExt};
use std::net::SocketAddr;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

const MIB: u64 = 1 << 20;

/// A WebSocket client of `url` must be refused with HTTP `status` and a body containing `needle`.
async fn expect_ws_refused(url: String, status: u16, needle: &str) {
    match step("ws connect", tokio_tungstenite::connect_async(url)).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status().as_u16(), status);
            if status == 401 {
                assert_eq!(
                    resp.headers().get("www-authenticate").map(|v| v.as_bytes()),
                    Some(&b"Bearer"[..]),
                    "a 401 must say which scheme it wants"
                );
            }
            let body =
                String::from_utf8_lossy(resp.body().as_deref().unwrap_or_default()).to_string();
            assert!(body.contains(needle), "body: {body}");
        }
        other => panic!("expected HTTP {status}, got {:?}", other.map(|_| ())),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_round_trip() {
    let mut stack = Stack::start(StackOptions::default()).await;
    // With nothing in the way, auto settles on the fastest transport.
    let line = stack.agent.wait_line("carried over ").await;
    assert!(line.contains("carried over websocket"), "{line}");
    let mut c = step("connect", TcpStream::connect(stack.entry()))
        .await
        .unwrap();
    c.write_all(b"hello, backhaul").await.unwrap();
    let mut buf = [0u8; 15];
    step("echo", c.read_exact(&mut buf)).await.unwrap();
    assert_eq!(&buf, b"hello, backhaul");
    c.shutdown().await.unwrap();
    let mut rest = Vec::new();
    step("end of stream", c.read_to_end(&mut rest))
        .await
        .unwrap();
    assert!(rest.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_mib_each_way() {
    let stack = Stack::start(StackOptions::default()).await;
    echo_transfer(stack.entry(), 64, 64 * MIB).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_connections() {
    let stack = Stack::start(StackOptions::default()).await;
    let entry = stack.entry();
    let tasks: Vec<_> = (0..200u64)
        .map(|i| tokio::spawn(echo_transfer(entry, 1000 + i, 64 * 1024 + i * 97)))
        .collect();
    for t in tasks {
        t.await.expect("a connection failed");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_still_gets_the_whole_reply() {
    let target = services::reply_after_eof(7, 3 * MIB).await;
    let stack = Stack::start(StackOptions {
        target: Some(target),
        ..Default::default()
    })
    .await;
    half_close_then_reply(stack.entry(), 3, 200_000, 7, 3 * MIB).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_refusing_closes_the_client_promptly() {
    let stack = Stack::start(StackOptions {
        target: Some(closed_port()),
        ..Default::default()
    })
    .await;
    expect_closed_promptly(
        stack.entry(),
        b"anyone there?",
        "client connection stayed open although the target refuses",
    )
    .await;
    let log = stack.backend.stderr();
    assert!(
        log.contains("could not connect to target"),
        "backend log:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_agent_for_the_backend_id() {
    let relay = relay(&[], &[]).await;
    let frontend = frontend(&format!("http://{}", relay.addr()), "nobody", &[], &[]).await;
    // A WebSocket client gets a clear HTTP error, not a hang.
    expect_ws_refused(format!("ws://{}/b/nobody", relay.addr()), 503, "no agent").await;
    // A TCP client of the frontend sees its connection closed promptly.
    expect_closed_promptly(
        frontend.addr(),
        b"",
        "frontend kept the client waiting with no agent",
    )
    .await;
    let log = frontend.stderr();
    assert!(
        log.contains("503"),
        "frontend should log the relay's answer:\n{log}"
    );
}

/// With --agent-token and --client-token, the relay lets in only the agents and frontends that
/// present them, and tells the others why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_keep_strangers_out() {
    let echo = services::echo().await;
    let relay = relay(
        &[
            s("--agent-token"),
            s("agent-secret"),
            s("--client-token"),
            s("client-secret"),
        ],
        &[],
    )
    .await;
    let relay_url = format!("http://{}", relay.addr());
    let backend = backend(echo, &[]).await;
    let backend_url = format!("ws://{}", backend.addr());

    // An agent with the wrong token is refused and says why (it keeps retrying).
    let stranger = backhaul_tests::Program::spawn(
        "backhaul-agent",
        &[
            s("--relay"),
            s(&relay_url),
            s("--backend-id"),
            s("guarded"),
            s("--backend"),
            s(&backend_url),
        ],
        &[(s("BACKHAUL_AGENT_TOKEN"), s("a-guess"))],
    );
    stranger
        .wait_stderr(
            "refused this agent's credential (the relay said: the agent's credential is not valid",
        )
        .await;
    drop(stranger);
    let _agent = agent(
        &relay_url,
        "guarded",
        &backend_url,
        &[s("--agent-token"), s("agent-secret")],
        &[],
    )
    .await;

    // A WebSocket client without the client token gets 401 and the reason.
    expect_ws_refused(
        format!("ws://{}/b/guarded", relay.addr()),
        401,
        "client credential",
    )
    .await;

    // So does a frontend with the wrong token: its client is closed, its log says why.
    let wrong = frontend(
        &relay_url,
        "guarded",
        &[s("--client-token"), s("a-guess")],
        &[],
    )
    .await;
    expect_closed_promptly(
        wrong.addr(),
        b"hello?",
        "frontend kept the client waiting although the relay refused it",
    )
    .await;
    wrong.wait_stderr("client credential is not valid").await;

    // The frontend with the right token (from the environment) carries bytes intact.
    let right = frontend(
        &relay_url,
        "guarded",
        &[],
        &[(s("BACKHAUL_CLIENT_TOKEN"), s("client-secret"))],
    )
    .await;
    echo_transfer(right.addr(), 21, 4 * MIB).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_restarted_while_idle() {
    let mut stack = Stack::start(StackOptions::default()).await;
    echo_transfer(stack.entry(), 1, 100_000).await;
    stack.restart_agent().await;
    // New connections work with the new agent (sessions wait at the relay for it if needed).
    for i in 0..5 {
        echo_transfer(stack.entry(), 10 + i, 100_000).await;
    }
}

/// An echo stack whose agent reaches the relay through an injector that resets every
/// connection after 32-256 KiB, in the middle of polls, pushes and streams.
struct CutStack {
    injector: FaultInjector,
    agent: backhaul_tests::Program,
    frontend: backhaul_tests::Program,
    relay_addr: SocketAddr,
    _others: Vec<backhaul_tests::Program>,
}

async fn cut_stack(agent_args: &[String]) -> CutStack {
    let relay = relay(&[s("--admin-loopback")], &[]).await;
    let injector = FaultInjector::start(relay.addr(), 32 * 1024, 256 * 1024).await;
    faulty_stack(relay, injector, agent_args).await
}

/// An echo stack whose agent reaches `relay` through `injector`.
async fn faulty_stack(
    relay: backhaul_tests::Program,
    injector: FaultInjector,
    agent_args: &[String],
) -> CutStack {
    let echo = services::echo().await;
    let backend = backend(echo, &[]).await;
    let mut args = agent_args.to_vec();
    args.extend([s("--metrics-listen"), s("127.0.0.1:0")]);
    let agent = agent(
        &format!("http://{}", injector.addr),
        "cut",
        &format!("ws://{}", backend.addr()),
        &args,
        &[],
    )
    .await;
    let frontend = frontend(&format!("http://{}", relay.addr()), "cut", &[], &[]).await;
    CutStack {
        injector,
        agent,
        frontend,
        relay_addr: relay.addr(),
        _others: vec![relay, backend],
    }
}

impl CutStack {
    /// Once the agent says it is on `transport` (forced), `len` bytes of stream `seed` must echo
    /// intact through the injector, which must have `struck` (cut or stalled) at least
    /// `min_struck` connections meanwhile, or the test proved nothing. What the faults cost
    /// shows in the metrics as retransmissions: returns the frames the agent and the relay
    /// (with `--admin-loopback`) sent again.
    async fn echoes_through_faults(
        mut self,
        transport: &str,
        seed: u64,
        len: u64,
        min_struck: u64,
        struck: &str,
    ) -> (f64, f64) {
        self.agent
            .wait_line(&format!("carried over {transport} (forced"))
            .await;
        echo_transfer(self.frontend.addr(), seed, len).await;
        let (hit, all) = (self.injector.cuts(), self.injector.connections());
        assert!(
            hit >= min_struck,
            "the injector {struck} only {hit} of {all} connections; the test proved nothing"
        );
        eprintln!("{transport}: the injector {struck} {hit} of {all} connections");
        let at = metrics::agent_addr(&mut self.agent).await;
        let agent_counts = metrics::read(at, None).await;
        // Senders ran out of window (their link was down, or slow to come back), and said so
        // on the frames that reached the agent.
        assert!(
            agent_counts["backhaul_agent_window_stalls_total{}"] > 0.0,
            "{agent_counts:?}"
        );
        let agent = agent_counts["backhaul_agent_frames_resent_total{}"];
        let relay =
            metrics::read(self.relay_addr, None).await["backhaul_relay_frames_resent_total{}"];
        eprintln!("{transport}: frames sent again: {agent} by the agent, {relay} by the relay");
        assert!(
            agent + relay > 0.0,
            "connections {struck} mid-way, yet nothing was sent again: are retransmissions counted?"
        );
        (agent, relay)
    }
}

/// The agent on `transport` behind the injector: 64 MiB must still echo intact.
/// Both ways carry 64 MiB, so every cut catches frames in flight each way, and both sides
/// count what they sent again.
async fn cut_connections_lose_nothing(transport: &str) {
    let (agent, relay) = cut_stack(&[s("--transport"), s(transport)])
        .await
        .echoes_through_faults(transport, 99, 64 * MIB, 11, "cut")
        .await;
    assert!(agent > 0.0 && relay > 0.0, "agent {agent}, relay {relay}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_connections_lose_nothing_longpoll() {
    cut_connections_lose_nothing("longpoll").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_connections_lose_nothing_websocket() {
    cut_connections_lose_nothing("websocket").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_connections_lose_nothing_http2() {
    cut_connections_lose_nothing("http2").await;
}

/// The agent on `transport` reaches a relay that gives up on a quiet agent after 2 s, through
/// connections that go silent (no reset, no close) after 256 KiB-1 MiB. The agent must notice
/// each stall and come back on a new connection before the relay gives up on it, so that no
/// session is lost.
async fn stalled_connections_lose_nothing(transport: &str) {
    let relay = relay(
        &[
            s("--poll-hold-secs"),
            s(1),
            s("--agent-timeout-secs"),
            s(2),
            s("--admin-loopback"),
        ],
        &[],
    )
    .await;
    let injector = FaultInjector::start_stalling(relay.addr(), 256 * 1024, 1024 * 1024).await;
    faulty_stack(relay, injector, &[s("--transport"), s(transport)])
        .await
        .echoes_through_faults(transport, 5, 4 * MIB, 3, "stalled")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_connections_lose_nothing_websocket() {
    stalled_connections_lose_nothing("websocket").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_connections_lose_nothing_longpoll() {
    // Several polls and pushes are in flight: a stalled one must be given up and what it
    // carried sent again, while the others go on.
    stalled_connections_lose_nothing("longpoll").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_connections_lose_nothing_http2() {
    stalled_connections_lose_nothing("http2").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_falls_back_when_streams_keep_breaking() {
    // Every connection is cut after 32-256 KiB: WebSocket and HTTP/2 streams keep breaking
    // within seconds of connecting, so auto moves down to long-poll, says why, and loses nothing.
    // (Bound whole: fields left out of a pattern would be dropped, killing their programs.)
    let mut stack = cut_stack(&[]).await;
    let agent = &mut stack.agent;
    let transfer = tokio::spawn(echo_transfer(stack.frontend.addr(), 7, 16 * MIB));
    let first = agent.wait_line("carried over ").await;
    assert!(first.contains("over websocket"), "{first}");
    let second = agent.wait_line("carried over ").await;
    assert!(
        second.contains("over http2 (fallback: websocket kept breaking"),
        "{second}"
    );
    let third = agent.wait_line("carried over ").await;
    assert!(
        third.contains("over longpoll (fallback: http2 kept breaking"),
        "{third}"
    );
    step("transfer", transfer).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_forced_transport_carries_traffic() {
    let echo = services::echo().await;
    let relay = relay(&[s("--admin-loopback")], &[]).await;
    let backend = backend(echo, &[]).await;
    for (i, transport) in ["websocket", "http2", "longpoll"].into_iter().enumerate() {
        let id = format!("forced-{transport}");
        let mut agent = agent(
            &format!("http://{}", relay.addr()),
            &id,
            &format!("ws://{}", backend.addr()),
            &[
                s("--transport"),
                s(transport),
                s("--metrics-listen"),
                s("127.0.0.1:0"),
            ],
            &[],
        )
        .await;
        agent
            .wait_line(&format!("carried over {transport} (forced"))
            .await;
        let frontend = frontend(&format!("http://{}", relay.addr()), &id, &[], &[]).await;
        echo_transfer(frontend.addr(), 200 + i as u64, 8 * MIB).await;
        // Twenty short sessions in a row: OPEN, data and CLOSE all ride the transport.
        for j in 0..20 {
            echo_transfer(frontend.addr(), 300 + j, 1000).await;
        }
        // A stream that never broke sent every frame once. (Long-poll may send again what a
        // full reorder buffer dropped, so it is not held to this.)
        if transport != "longpoll" {
            let at = metrics::agent_addr(&mut agent).await;
            let agent_resent =
                metrics::read(at, None).await["backhaul_agent_frames_resent_total{}"];
            let relay_resent =
                metrics::read(relay.addr(), None).await["backhaul_relay_frames_resent_total{}"];
            assert_eq!(
                (agent_resent, relay_resent),
                (0.0, 0.0),
                "{transport}: first sends counted as retransmissions?"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_through_a_forward_proxy_that_refuses_connect() {
    let proxy = ForwardProxy::start().await;
    let mut stack = Stack::start(StackOptions {
        agent_env: vec![
            (s("HTTP_PROXY"), proxy.url()),
            (s("HTTPS_PROXY"), proxy.url()),
        ],
        ..Default::default()
    })
    .await;
    // auto: the WebSocket needs CONNECT (refused), HTTP/2 does not pass an HTTP/1.1 proxy, so
    // the agent settles on long-poll and says why.
    let line = stack.agent.wait_line("carried over ").await;
    assert!(
        line.contains("carried over longpoll (fallback: http2 not available"),
        "expected the agent to fall back to longpoll, it said: {line}"
    );
    let log = stack.agent.stderr();
    assert!(
        log.contains("websocket transport to the relay is not available")
            && log.contains("refused to tunnel"),
        "the agent should say why the WebSocket failed:\n{log}"
    );
    echo_transfer(stack.entry(), 5, 4 * MIB).await;
    let log = proxy.log();
    assert!(
        log.contains("/agent/v1/links"),
        "the agent's requests did not go through the proxy; tinyproxy log:\n{log}"
    );
    let status = proxy.try_connect(stack.relay.addr()).await;
    assert!(
        status.contains(" 403") || status.contains(" 4"),
        "the proxy should refuse CONNECT, it answered {status:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generic_websocket_traffic_is_carried_faithfully() {
    let ws_server = services::websocket_echo().await;
    let relay = relay(&[], &[]).await;
    let _agent = agent(
        &format!("http://{}", relay.addr()),
        "ws",
        &format!("ws://{ws_server}/base"),
        &[],
        &[],
    )
    .await;
    let url = format!("ws://{}/b/ws/some/path?x=1&y=2", relay.addr());
    let (mut ws, _) = step("ws connect", tokio_tungstenite::connect_async(url))
        .await
        .unwrap();
    let first = step("first message", ws.next())
        .await
        .expect("a message")
        .unwrap();
    assert_eq!(first, Message::Text("/base/some/path?x=1&y=2".into()));

    ws.send(Message::Text("h\u{e9}llo".into())).await.unwrap();
    let big = bytes::Bytes::from(data::bytes(3, 3 * 1024 * 1024 + 17));
    step("send 3 MiB", ws.send(Message::Binary(big.clone())))
        .await
        .unwrap();
    ws.send(Message::Binary(bytes::Bytes::new())).await.unwrap();
    ws.send(Message::Ping(bytes::Bytes::from_static(b"cli")))
        .await
        .unwrap();
    ws.send(Message::Text("ping-me".into())).await.unwrap();
    ws.send(Message::Text("close-me".into())).await.unwrap();

    let mut seen = Vec::new();
    loop {
        match step("ws message", ws.next()).await {
            Some(Ok(Message::Pong(_))) => {}
            Some(Ok(m)) => {
                let end = matches!(m, Message::Close(_));
                seen.push(m);
                if end {
                    break;
                }
            }
            Some(Err(e)) => panic!("WebSocket failed: {e}"),
            None => break,
        }
    }
    assert_eq!(seen[0], Message::Text("h\u{e9}llo".into()));
    assert!(
        seen[1] == Message::Binary(big),
        "3 MiB binary message changed in transit"
    );
    assert_eq!(seen[2], Message::Binary(bytes::Bytes::new()));
    assert_eq!(seen[3], Message::Text("ping-seen:cli".into()));
    assert_eq!(seen[4], Message::Ping(bytes::Bytes::from_static(b"srv")));
    match &seen[5] {
        Message::Close(Some(cf)) => {
            assert_eq!(u16::from(cf.code), 4000);
            assert_eq!(cf.reason.as_str(), "bye");
        }
        other => panic!("expected the server's close 4000 \"bye\", got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdio_mode_carries_stdin_and_stdout() {
    let stack = Stack::start(StackOptions::default()).await;
    let mut child = tokio::process::Command::new(backhaul_tests::bin("backhaul-frontend"))
        .args([
            "--stdio",
            "--relay",
            &stack.relay_url(),
            "--backend-id",
            &stack.backend_id,
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let writer = tokio::spawn(async move {
        let h = data::send(&mut stdin, 42, 2 * MIB).await.unwrap();
        drop(stdin);
        h
    });
    let (n, hash) = step("stdio echo", data::receive(&mut stdout))
        .await
        .unwrap();
    assert_eq!(n, 2 * MIB);
    assert_eq!(hash, writer.await.unwrap());
    let status = step("frontend exit", child.wait()).await.unwrap();
    assert!(status.success(), "frontend --stdio exited with {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_command_lines_get_a_clear_error_and_exit_64() {
    for (prog, args, needle) in [
        (
            "backhaul-agent",
            vec![
                "--relay",
                "ftp://x",
                "--backend-id",
                "a",
                "--backend",
                "ws://b:1",
            ],
            "--relay",
        ),
        (
            "backhaul-agent",
            vec![
                "--relay",
                "http://x",
                "--backend-id",
                "a/b",
                "--backend",
                "ws://b:1",
            ],
            "--backend-id",
        ),
        (
            "backhaul-frontend",
            vec![
                "--listen",
                "127.0.0.1:0",
                "--relay",
                "nonsense",
                "--backend-id",
                "a",
            ],
            "--relay",
        ),
        (
            "backhaul-backend",
            vec!["--listen", "127.0.0.1:0", "--target", "nohostport"],
            "--target",
        ),
        (
            "backhaul-relay",
            vec!["--listen", "256.0.0.1:1"],
            "could not listen",
        ),
    ] {
        let out = tokio::process::Command::new(backhaul_tests::bin(prog))
            .args(&args)
            .output()
            .await
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{prog} {args:?}: {stderr}");
        assert!(stderr.contains(needle), "{prog} {args:?} said: {stderr}");
        assert!(!stderr.contains("panicked"), "{prog} panicked: {stderr}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subprotocols_are_negotiated_with_the_backend() {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let ws_server = services::websocket_echo().await;
    let relay = relay(&[], &[]).await;
    let mut agents = Vec::new();
    for (id, backend) in [
        ("proto", format!("ws://{ws_server}")),
        ("down", format!("ws://{}", closed_port())),
    ] {
        let registered = agent(&format!("http://{}", relay.addr()), id, &backend, &[], &[]).await;
        agents.push(registered);
    }
    let request = |id: &str| {
        let mut req = format!("ws://{}/b/{id}/p", relay.addr())
            .into_client_request()
            .unwrap();
        req.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            "chat.v1, chat.v2".parse().unwrap(),
        );
        req
    };
    // The backend picks chat.v2; the client must be told so in the upgrade.
    let (mut ws, resp) = step(
        "ws connect",
        tokio_tungstenite::connect_async(request("proto")),
    )
    .await
    .unwrap();
    assert_eq!(
        resp.headers()
            .get("Sec-WebSocket-Protocol")
            .and_then(|v| v.to_str().ok()),
        Some("chat.v2")
    );
    let first = step("first message", ws.next())
        .await
        .expect("a message")
        .unwrap();
    assert_eq!(first, Message::Text("/p".into()));
    // An unreachable backend: the client gets an HTTP error with the reason, not a hang.
    match step(
        "ws connect",
        tokio_tungstenite::connect_async(request("down")),
    )
    .await
    {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status().as_u16(), 502);
            let body =
                String::from_utf8_lossy(resp.body().as_deref().unwrap_or_default()).to_string();
            assert!(body.contains("backend unavailable"), "body: {body}");
        }
        other => panic!("expected HTTP 502, got {:?}", other.map(|_| ())),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_relay_with_a_private_ca() {
    // A private CA and a certificate for localhost signed by it; agent and frontend trust the
    // CA through --ca-cert.
    let TestCerts { ca, cert, key } = test_certs().await;

    let echo = services::echo().await;
    let backend = backend(echo, &[]).await;
    let relay = relay(
        &[
            s("--tls-cert"),
            s(cert.display()),
            s("--tls-key"),
            s(key.display()),
        ],
        &[],
    )
    .await;
    let relay_url = format!("https://localhost:{}", relay.addr().port());
    let _agent = agent(
        &relay_url,
        "tls",
        &format!("ws://{}", backend.addr()),
        &[s("--ca-cert"), s(ca.display())],
        &[],
    )
    .await;
    let trusting = frontend(&relay_url, "tls", &[s("--ca-cert"), s(ca.display())], &[]).await;
    echo_transfer(trusting.addr(), 77, 8 * MIB).await;

    // The streaming transports over TLS: WebSocket (wss) and HTTP/2 negotiated by ALPN.
    for transport in ["websocket", "http2"] {
        let id = format!("tls-{transport}");
        let mut agent = agent(
            &relay_url,
            &id,
            &format!("ws://{}", backend.addr()),
            &[
                s("--ca-cert"),
                s(ca.display()),
                s("--transport"),
                s(transport),
            ],
            &[],
        )
        .await;
        agent.wait_line(&format!("carried over {transport}")).await;
        let fe = frontend(&relay_url, &id, &[s("--ca-cert"), s(ca.display())], &[]).await;
        echo_transfer(fe.addr(), 78, 8 * MIB).await;
    }

    // Without the CA the frontend refuses the relay's certificate and says so.
    let untrusting = frontend(
        &format!("https://localhost:{}", relay.addr().port()),
        "tls",
        &[],
        &[],
    )
    .await;
    expect_closed_promptly(
        untrusting.addr(),
        b"",
        "client kept waiting although TLS with the relay failed",
    )
    .await;
    let log = untrusting.stderr();
    assert!(
        log.contains("TLS"),
        "the frontend should say TLS failed:\n{log}"
    );
}

/// One backend for several services, chosen by the path the agent dials (`--route`), each
/// served by the agent as a backend ID of its own. What a client adds to its path does not
/// choose the route, and an agent that dials a path that is no route reaches none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_backend_routes_sessions_to_services_by_path() {
    let relay = relay(&[], &[]).await;
    let url = format!("http://{}", relay.addr());
    let echo = services::echo().await;
    let reply = services::reply_after_eof(7, 70_000).await;
    let backend = backhaul_tests::Program::listening(
        "backhaul-backend",
        &[
            s("--listen"),
            s("127.0.0.1:0"),
            s("--route"),
            format!("/echo={echo}"),
            s("--route"),
            format!("/reply/={reply}"),
        ],
        &[],
    )
    .await;
    let at = backend.addr();
    let mut agent = backhaul_tests::Program::spawn(
        "backhaul-agent",
        &[
            s("--relay"),
            s(&url),
            s("--serve"),
            format!("e=ws://{at}/echo"),
            s("--serve"),
            format!("r=ws://{at}/reply"),
            s("--serve"),
            format!("n=ws://{at}/nowhere"),
            s("--serve"),
            format!("root=ws://{at}"),
        ],
        &[],
    );
    for _ in 0..4 {
        agent.wait_line("connected to relay").await;
    }
    let (fe, fr, fnowhere) = (
        frontend(&url, "e", &[], &[]).await,
        frontend(&url, "r", &[], &[]).await,
        frontend(&url, "n", &[], &[]).await,
    );
    let sessions = [
        tokio::spawn(echo_transfer(fe.addr(), 1, 4 * MIB)),
        tokio::spawn(half_close_then_reply(fr.addr(), 2, 1000, 7, 70_000)),
        tokio::spawn(echo_transfer(fe.addr(), 3, MIB)),
    ];
    for t in sessions {
        t.await.expect("a routed session failed");
    }
    expect_closed_promptly(
        fnowhere.addr(),
        b"hello?",
        "a path no route takes was carried somewhere",
    )
    .await;
    let log = backend.wait_stderr("no --route takes it").await;
    assert!(
        log.contains("the agent dialed path \"/nowhere\", which is no --route's path"),
        "{log}"
    );
    // Whatever dials the backend without saying what its client added (an agent older than
    // --route, or not an agent) reaches no route, even at a route's path.
    let refused = backhaul_tests::rawws::RawWs::connect(at, "/echo", &[])
        .await
        .err()
        .expect("a handshake without x-backhaul-client-path is refused");
    assert!(refused.starts_with("HTTP/1.1 404"), "{refused}");
    backend.wait_stderr("upgrade the agent").await;

    // Clients adding to their path: e's stays on the echo service whatever it adds, and the
    // agent that dials the backend's root reaches no route, however its clients name one.
    assert!(echoes(relay.addr(), "/b/e").await);
    assert!(echoes(relay.addr(), "/b/e/reply").await);
    assert!(echoes(relay.addr(), "/b/e/echo/x?y=/reply").await);
    for path in [
        "/b/root/echo",
        "/b/root/echo/",
        "/b/root/reply",
        "/b/n/../echo",
    ] {
        assert!(!echoes(relay.addr(), path).await, "{path} reached a route");
    }

    // Mistakes are refused at start and say what is wrong.
    for (args, says) in [
        (
            vec![
                s("--route"),
                s("/a=127.0.0.1:1"),
                s("--route"),
                s("/a/=127.0.0.1:2"),
            ],
            "given twice",
        ),
        (
            vec![
                s("--route"),
                s("/a=127.0.0.1:1"),
                s("--target"),
                s("127.0.0.1:2"),
            ],
            "cannot be used with",
        ),
        (vec![s("--route"), s("a=127.0.0.1:1")], "must start with /"),
        (vec![s("--route"), s("/a%2f=127.0.0.1:1")], "no spaces, %"),
    ] {
        let mut args = args;
        args.extend([s("--listen"), s("127.0.0.1:0")]);
        let err = backhaul_tests::checks::refuses_to_start("backhaul-backend", &args, &[]).await;
        assert!(err.contains(says), "{args:?}: {err}");
    }
}

/// Whether a WebSocket client of the relay at `path` reaches the echo service: what it sends
/// comes back. A refused session (at the relay, or closed once the backend refused it) does not.
async fn echoes(relay: SocketAddr, path: &str) -> bool {
    use backhaul_tests::rawws::{RawWs, BINARY};
    let Ok((mut ws, _)) = RawWs::connect(relay, path, &[]).await else {
        return false;
    };
    ws.send(true, BINARY, b"marco").await;
    match ws.recv().await {
        Some((_, op, payload)) if op == BINARY => {
            assert_eq!(payload, b"marco", "{path}: not the echo service");
            true
        }
        _ => false,
    }
}
