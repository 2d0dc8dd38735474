//! Trust at the edges of the stack, with the real programs: tokens and secrets refused when
//! empty, taken from files and never logged; the backend's secret and Origin checks; and what
//! the agent tells clients when it cannot reach the backend.

use backhaul_tests::checks::{
    backend_with, echo_transfer, expect_closed_promptly, private_file, refuses_to_start, step,
};
use backhaul_tests::rawws::{RawWs, BINARY};
use backhaul_tests::{agent, closed_port, frontend, relay, s, services, Program};
use std::net::SocketAddr;

const MIB: u64 = 1 << 20;

/// A raw WebSocket handshake to `addr` with `headers` must be refused with `status`.
async fn expect_refused(addr: SocketAddr, target: &str, headers: &[(&str, &str)], status: u16) {
    match RawWs::connect(addr, target, headers).await {
        Ok((_, head)) => panic!("handshake with {headers:?} was accepted: {head}"),
        Err(head) => assert!(
            head.starts_with(&format!("HTTP/1.1 {status} ")),
            "handshake with {headers:?} got {head}"
        ),
    }
}

/// A raw WebSocket handshake to `addr` with `headers` must be accepted.
async fn expect_accepted(addr: SocketAddr, target: &str, headers: &[(&str, &str)]) -> RawWs {
    match RawWs::connect(addr, target, headers).await {
        Ok((ws, _)) => ws,
        Err(head) => panic!("handshake with {headers:?} was refused: {head}"),
    }
}

/// The close code and reason a client of `relay` gets for a session to `target`.
async fn session_close(relay: &Program, target: &str, headers: &[(&str, &str)]) -> (u16, String) {
    let mut ws = expect_accepted(relay.addr(), target, headers).await;
    step("the session's close", ws.next_close())
        .await
        .expect("a Close before the connection ends")
}

/// `--<flag>` (or its environment variable, or `--<flag>-file`) must never be empty: each
/// program says which option and exits with 64 before doing anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_tokens_are_refused_at_start_up() {
    let nowhere = "http://127.0.0.1:1";
    let agent_args = [
        "--relay",
        nowhere,
        "--backend-id",
        "a",
        "--backend",
        "ws://127.0.0.1:1",
    ];
    let frontend_args = [
        "--listen",
        "127.0.0.1:0",
        "--relay",
        nowhere,
        "--backend-id",
        "a",
    ];
    let backend_args = ["--listen", "127.0.0.1:0", "--target", "127.0.0.1:1"];
    let empty = private_file("empty", "\n");
    for (program, base, flag, var) in [
        (
            "backhaul-agent",
            &agent_args[..],
            "agent-token",
            "BACKHAUL_AGENT_TOKEN",
        ),
        (
            "backhaul-agent",
            &agent_args[..],
            "backend-secret",
            "BACKHAUL_BACKEND_SECRET",
        ),
        (
            "backhaul-frontend",
            &frontend_args[..],
            "client-token",
            "BACKHAUL_CLIENT_TOKEN",
        ),
        (
            "backhaul-backend",
            &backend_args[..],
            "backend-secret",
            "BACKHAUL_BACKEND_SECRET",
        ),
    ] {
        let base: Vec<String> = base.iter().map(s).collect();
        let said = format!("--{flag} (or {var}) is empty");
        let by_flag = [&base[..], &[format!("--{flag}"), s("")]].concat();
        let stderr = refuses_to_start(program, &by_flag, &[]).await;
        assert!(stderr.contains(&said), "{program} --{flag} '': {stderr}");
        let stderr = refuses_to_start(program, &base, &[(s(var), s(""))]).await;
        assert!(stderr.contains(&said), "{program} {var}='': {stderr}");
        let by_file = [&base[..], &[format!("--{flag}-file"), s(empty.display())]].concat();
        let stderr = refuses_to_start(program, &by_file, &[]).await;
        assert!(
            stderr.contains(&format!("--{flag}-file {} is empty", empty.display())),
            "{program} --{flag}-file: {stderr}"
        );
    }
}

/// Tokens from files open sessions that carry bytes intact, and neither the agent nor the
/// frontend writes a token to its log, even with every library logging at trace level.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_files_work_and_tokens_never_reach_the_logs() {
    let agent_token = "agent-7f3c9a1e-token";
    let client_token = "client-42d8b6f0-token";
    let echo = services::echo().await;
    let relay = relay(
        &[
            s("--agent-token"),
            s(agent_token),
            s("--client-token"),
            s(client_token),
        ],
        &[],
    )
    .await;
    let relay_url = format!("http://{}", relay.addr());
    let backend = backend_with(echo, &[], &[]).await;
    let trace = [(s("RUST_LOG"), s("trace"))];
    let agent_file = private_file("agent-token", &format!("{agent_token}\n"));
    let client_file = private_file("client-token", client_token);
    let mut programs = Vec::new();
    // The websocket transport goes through common::dial; http2 through reqwest and h2.
    for transport in ["websocket", "http2"] {
        let registered = agent(
            &relay_url,
            transport,
            &format!("ws://{}", backend.addr()),
            &[
                s("--agent-token-file"),
                s(agent_file.display()),
                s("--transport"),
                s(transport),
            ],
            &trace,
        )
        .await;
        let front = frontend(
            &relay_url,
            transport,
            &[s("--client-token-file"), s(client_file.display())],
            &trace,
        )
        .await;
        echo_transfer(front.addr(), 7, MIB).await;
        // The agent's libraries (reqwest, hyper-util, h2) do log at trace level.
        assert!(registered.stderr().contains("TRACE"), "no trace lines");
        programs.push(registered);
        programs.push(front);
    }
    for program in &programs {
        let log = program.stderr();
        for token in [agent_token, client_token] {
            assert!(
                !log.contains(token),
                "{} logged a token:\n{}",
                program.name,
                log.lines()
                    .filter(|l| l.contains(token))
                    .take(5)
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        }
    }
}

/// With --backend-secret, the backend serves only handshakes that carry it: a raw handshake
/// without it gets 401, an agent without it cannot open sessions, an agent with it carries
/// bytes intact, and a client cannot supply it through the relay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_refuses_sessions_without_its_secret() {
    let secret = "backend-5e1d-secret";
    let echo = services::echo().await;
    let backend = backend_with(
        echo,
        &[
            s("--backend-secret-file"),
            s(private_file("backend-secret", secret).display()),
        ],
        &[],
    )
    .await;
    expect_refused(backend.addr(), "/", &[], 401).await;
    expect_refused(
        backend.addr(),
        "/",
        &[("X-Backhaul-Secret", "a-guess")],
        401,
    )
    .await;
    drop(expect_accepted(backend.addr(), "/", &[("X-Backhaul-Secret", secret)]).await);
    let log = backend
        .wait_stderr("refused a WebSocket handshake from 127.0.0.1:")
        .await;
    assert!(log.contains("no X-Backhaul-Secret header"), "{log}");
    assert!(log.contains("wrong X-Backhaul-Secret"), "{log}");
    assert!(!log.contains(secret) && !log.contains("a-guess"), "{log}");

    let relay = relay(&[], &[]).await;
    let relay_url = format!("http://{}", relay.addr());
    let backend_url = format!("ws://{}", backend.addr());
    let without = agent(&relay_url, "without", &backend_url, &[], &[]).await;
    let _with = agent(
        &relay_url,
        "with",
        &backend_url,
        &[],
        &[(s("BACKHAUL_BACKEND_SECRET"), s(secret))],
    )
    .await;
    let refused = frontend(&relay_url, "without", &[], &[]).await;
    expect_closed_promptly(
        refused.addr(),
        b"hello?",
        "a session went on although the backend refused the agent",
    )
    .await;
    let log = without.wait_stderr("answered HTTP 401").await;
    assert!(log.contains("could not reach backend"), "{log}");
    let admitted = frontend(&relay_url, "with", &[], &[]).await;
    echo_transfer(admitted.addr(), 11, 2 * MIB).await;

    // A client that knows the secret cannot hand it to the backend through relay and agent.
    let forged = [("X-Backhaul-Secret", secret)];
    assert_eq!(
        session_close(&relay, "/b/without", &forged).await,
        (1014, s("backend unavailable"))
    );
}

/// A flood of refused handshakes is logged ten lines at a time, then counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_refusals_are_logged_at_a_bounded_rate() {
    let backend = backend_with(
        services::echo().await,
        &[s("--backend-secret"), s("s3cret")],
        &[],
    )
    .await;
    for _ in 0..25 {
        expect_refused(backend.addr(), "/", &[], 401).await;
    }
    // The count comes when the 10 s window of the first refusal ends.
    let log = backend
        .wait_stderr("15 more refused WebSocket handshakes were not logged")
        .await;
    let lines = log.matches("refused a WebSocket handshake from").count();
    assert_eq!(lines, 10, "{log}");
}

/// Handshakes carrying an Origin are served only when --allow-origin allows it, directly and
/// through the whole stack.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_refuses_foreign_origins() {
    let echo = services::echo().await;
    let strict = backend_with(echo, &[], &[]).await;
    expect_refused(
        strict.addr(),
        "/",
        &[("Origin", "https://app.example")],
        403,
    )
    .await;
    drop(expect_accepted(strict.addr(), "/", &[]).await);
    let log = strict
        .wait_stderr("Origin \"https://app.example\" is not allowed")
        .await;
    assert!(log.contains("with 403 Forbidden"), "{log}");

    let open = backend_with(echo, &[s("--allow-origin"), s("https://app.example")], &[]).await;
    for allowed in ["https://app.example", "https://APP.example:443"] {
        drop(expect_accepted(open.addr(), "/", &[("Origin", allowed)]).await);
    }
    for foreign in ["https://evil.example", "http://app.example", "null"] {
        expect_refused(open.addr(), "/", &[("Origin", foreign)], 403).await;
    }

    // Through relay and agent, which pass the browser's Origin on.
    let relay = relay(&[], &[]).await;
    let relay_url = format!("http://{}", relay.addr());
    let _agent = agent(
        &relay_url,
        "app",
        &format!("ws://{}", open.addr()),
        &[],
        &[],
    )
    .await;
    let mut ws =
        expect_accepted(relay.addr(), "/b/app", &[("Origin", "https://app.example")]).await;
    ws.send(true, BINARY, b"from the browser").await;
    assert_eq!(
        step("echo", ws.recv_message()).await,
        (BINARY, b"from the browser".to_vec())
    );
    assert_eq!(
        session_close(&relay, "/b/app", &[("Origin", "https://evil.example")]).await,
        (1014, s("backend unavailable"))
    );

    let stderr = refuses_to_start(
        "backhaul-backend",
        &[
            s("--listen"),
            s("127.0.0.1:0"),
            s("--target"),
            s(echo),
            s("--allow-origin"),
            s("https://app.example/path"),
        ],
        &[],
    )
    .await;
    assert!(stderr.contains("--allow-origin"), "{stderr}");
}

/// An agent that cannot reach its backend tells the client only "backend unavailable" (code
/// 1014) and logs the details, unless --report-backend-errors lets it say why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_errors_reach_clients_only_when_allowed() {
    let closed = closed_port();
    let backend_url = format!("ws://{closed}");
    let relay = relay(&[], &[]).await;
    let relay_url = format!("http://{}", relay.addr());
    let quiet = agent(&relay_url, "quiet", &backend_url, &[], &[]).await;
    let _loud = agent(
        &relay_url,
        "loud",
        &backend_url,
        &[s("--report-backend-errors")],
        &[],
    )
    .await;

    assert_eq!(
        session_close(&relay, "/b/quiet", &[]).await,
        (1014, s("backend unavailable"))
    );
    let log = quiet
        .wait_stderr(&format!("agent could not reach backend {backend_url}/"))
        .await;
    let line = log
        .lines()
        .find(|l| l.contains("could not reach backend"))
        .unwrap();
    assert!(line.contains("WARN"), "{line}");
    assert!(line.contains("session.id="), "{line}");
    assert!(line.contains(&closed.to_string()), "{line}");

    let (code, reason) = session_close(&relay, "/b/loud", &[]).await;
    assert_eq!(code, 1014);
    assert!(
        reason.starts_with("agent could not reach backend: ")
            && reason.contains(&closed.to_string()),
        "{reason}"
    );
}
