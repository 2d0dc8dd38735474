//! Exposed ports: plain TCP clients reach a backend on a port of the relay, with no frontend
//! (client -> relay -> agent -> service, the agent with `--expose` and a `tcp://` backend).
//! Real programs on ephemeral ports, bytes checked by hash.

use backhaul_tests::checks::{echo_transfer, expect_closed_promptly, refuses_to_start, step};
use backhaul_tests::{agent, relay, s, services, Program};
use std::net::SocketAddr;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// A port that is free now, below Linux's ephemeral range (32768 and up), so no outgoing
/// connection of a test running beside this one takes it before the relay binds it.
fn free_low_port() -> u16 {
    loop {
        let port = 20_000 + rand::random::<u16>() % 12_000;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// A relay offering one free port for exposure, with `extra` arguments.
async fn relay_exposing(extra: &[String]) -> (Program, u16) {
    let port = free_low_port();
    let mut args = vec![s("--expose-ports"), s(port)];
    args.extend(extra.iter().cloned());
    (relay(&args, &[]).await, port)
}

/// An agent for `svc` asking for an exposed port, reaching `target` itself; waits for the
/// line that names the port and returns it with the agent.
async fn exposing_agent(relay: &Program, target: SocketAddr) -> (Program, String) {
    let url = format!("http://{}", relay.addr());
    let mut a = agent(
        &url,
        "svc",
        &format!("tcp://{target}"),
        &[s("--expose")],
        &[],
    )
    .await;
    let line = a.wait_line("exposed backend svc at").await;
    (a, line)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_tcp_clients_reach_an_exposed_backend() {
    let (relay, port) = relay_exposing(&[]).await;
    let (_agent, line) = exposing_agent(&relay, services::echo().await).await;
    assert!(
        line.contains(&format!("127.0.0.1:{port} (tunnel ")),
        "{line}"
    );
    let exposed: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    echo_transfer(exposed, 1, 16 << 20).await;
    let tasks: Vec<_> = (0..20u64)
        .map(|i| tokio::spawn(echo_transfer(exposed, 10 + i, 100_000 + i * 77)))
        .collect();
    for t in tasks {
        t.await.expect("a connection failed");
    }
}

/// sockets-rust's demo: a broker behind the exposed port, two clients talking through it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_clients_talk_through_a_broker_behind_an_exposed_port() {
    let (relay, port) = relay_exposing(&[]).await;
    let (_agent, _) = exposing_agent(&relay, services::broker().await).await;
    let connect = || async move {
        let c = step("connect", TcpStream::connect(("127.0.0.1", port)))
            .await
            .unwrap();
        let (r, w) = c.into_split();
        (BufReader::new(r).lines(), w)
    };
    // Each waits to be welcomed: its session reached the broker.
    let (mut a_in, mut a_out) = connect().await;
    let line = step("a is welcomed", a_in.next_line()).await.unwrap();
    assert_eq!(line.as_deref(), Some("welcome"));
    let (mut b_in, mut b_out) = connect().await;
    let line = step("b is welcomed", b_in.next_line()).await.unwrap();
    assert_eq!(line.as_deref(), Some("welcome"));
    let line = step("a hears b join", a_in.next_line()).await.unwrap();
    assert_eq!(line.as_deref(), Some("joined"));
    a_out.write_all(b"hello from a\n").await.unwrap();
    let line = step("b hears a", b_in.next_line()).await.unwrap();
    assert_eq!(line.as_deref(), Some("hello from a"));
    b_out.write_all(b"hi a, b here\n").await.unwrap();
    let line = step("a hears b", a_in.next_line()).await.unwrap();
    assert_eq!(line.as_deref(), Some("hi a, b here"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_agent_gets_its_port_back_and_an_abandoned_port_is_released() {
    let (relay, port) = relay_exposing(&[s("--expose-grace-secs"), s(2)]).await;
    let echo = services::echo().await;
    let (mut first, line) = exposing_agent(&relay, echo).await;
    let tunnel = line.split("(tunnel ").nth(1).unwrap().to_string();
    first.kill().await;
    let (_second, line) = exposing_agent(&relay, echo).await;
    assert!(
        line.contains(&format!(":{port} (tunnel {tunnel}")),
        "same port and tunnel: {line}"
    );
    echo_transfer(format!("127.0.0.1:{port}").parse().unwrap(), 2, 1 << 20).await;
    drop(_second);
    // With no agent for the grace period, the port closes.
    step("the port is released", async {
        while TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    })
    .await;
    relay.wait_stderr("releasing the port").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ports_the_relay_does_not_offer_are_refused_with_the_reason() {
    let plain = relay(&[], &[]).await;
    let (offering, port) = relay_exposing(&[]).await;
    let other = if port == u16::MAX { port - 1 } else { port + 1 };
    for (relay, args, reason) in [
        (&plain, vec![s("--expose")], "this relay exposes no ports"),
        (
            &offering,
            vec![s("--expose-port"), s(other)],
            "is outside this relay's --expose-ports",
        ),
    ] {
        let mut all = vec![
            s("--relay"),
            format!("http://{}", relay.addr()),
            s("--backend-id"),
            s("svc"),
            s("--backend"),
            s("tcp://127.0.0.1:9"),
        ];
        all.extend(args);
        let a = Program::spawn("backhaul-agent", &all, &[]);
        a.wait_stderr(reason).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exposed_port_admits_only_the_clients_its_allowlist_names() {
    let (relay, port) = relay_exposing(&[]).await;
    let url = format!("http://{}", relay.addr());
    let echo = services::echo().await;
    let extra = [s("--expose"), s("--expose-allow"), s("127.0.0.2/32")];
    let mut a = agent(&url, "svc", &format!("tcp://{echo}"), &extra, &[]).await;
    a.wait_line("exposed backend svc at").await;
    let exposed: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    // From 127.0.0.1, not listed: closed at once, nothing carried.
    expect_closed_promptly(
        exposed,
        b"let me in",
        "a client outside the allowlist got in",
    )
    .await;
    relay
        .wait_stderr("not in the exposed port's allowlist")
        .await;
    // From 127.0.0.2 (any 127.x address works on Linux's loopback): carried.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let mut c = step("connect from 127.0.0.2", sock.connect(exposed))
        .await
        .unwrap();
    c.write_all(b"listed").await.unwrap();
    let mut buf = [0u8; 6];
    step(
        "echo",
        tokio::io::AsyncReadExt::read_exact(&mut c, &mut buf),
    )
    .await
    .unwrap();
    assert_eq!(&buf, b"listed");
    // A malformed allowlist is refused at start.
    let args = [
        s("--relay"),
        url.clone(),
        s("--backend-id"),
        s("svc"),
        s("--backend"),
        s("tcp://127.0.0.1:9"),
        s("--expose"),
        s("--expose-allow"),
        s("10.0.0.0/33"),
    ];
    let err = refuses_to_start("backhaul-agent", &args, &[]).await;
    assert!(err.contains("10.0.0.0/33"), "{err}");
}

/// The latest registration decides: an agent of the backend that does not ask for a port
/// closes it (how an operator withdraws one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_registering_without_expose_withdraws_the_port() {
    let (relay, port) = relay_exposing(&[]).await;
    let echo = services::echo().await;
    let (_first, _) = exposing_agent(&relay, echo).await;
    echo_transfer(format!("127.0.0.1:{port}").parse().unwrap(), 3, 64 * 1024).await;
    let url = format!("http://{}", relay.addr());
    let _second = agent(&url, "svc", &format!("tcp://{echo}"), &[], &[]).await;
    step("the port is withdrawn", async {
        while TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    })
    .await;
    relay
        .wait_stderr("an agent registered without asking for it")
        .await;
}
