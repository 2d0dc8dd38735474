//! Exposed ports: plain TCP clients reach a backend on a port of the relay, with no frontend
//! (client -> relay -> agent -> service, the agent with `--expose` and a `tcp://` backend).
//! Real programs on ephemeral ports, bytes checked by hash.

use backhaul_tests::checks::{echo_transfer, step};
use backhaul_tests::{agent, closed_port, relay, s, services, Program};
use std::net::SocketAddr;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// A relay offering one port (free a moment ago) for exposure, with `extra` arguments.
async fn relay_exposing(extra: &[String]) -> (Program, u16) {
    let port = closed_port().port();
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
    let (mut a_in, mut a_out) = connect().await;
    let (mut b_in, mut b_out) = connect().await;
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
