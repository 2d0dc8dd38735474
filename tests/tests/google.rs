//! Each half of Google's tcp-bridge replaced by backhaul's, one at a time, with the other half
//! Google's (see tests/src/google_tcpbridge.rs for which implementation of it runs).

use backhaul_tests::google_tcpbridge::{self, using_real_programs};
use backhaul_tests::{agent, backend, data, frontend, relay, s, services, STEP_TIMEOUT};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

const LEN: usize = 3 * 1024 * 1024 + 11;

/// Sends `LEN` bytes through `entry` to an echo service and checks, by hash, that the same
/// bytes come back. Google's framing cannot carry a half-close, so the test reads exactly as
/// many bytes as it sent instead of waiting for the end of the stream.
async fn echo_exactly(entry: std::net::SocketAddr, seed: u64) -> TcpStream {
    let stream = timeout(STEP_TIMEOUT, TcpStream::connect(entry))
        .await
        .expect("connect in time")
        .expect("connect");
    let (mut r, mut w) = stream.into_split();
    let sent = data::bytes(seed, LEN);
    let want = data::hash(&sent);
    let writer = tokio::spawn(async move {
        w.write_all(&sent).await.expect("send");
        w
    });
    let mut got = vec![0u8; LEN];
    timeout(STEP_TIMEOUT, r.read_exact(&mut got))
        .await
        .expect("the echo within the step limit")
        .expect("read the echo");
    assert_eq!(data::hash(&got), want, "bytes changed on the way");
    let w = writer.await.unwrap();
    r.reunite(w).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn googles_frontend_reaches_a_backhaul_backend() {
    eprintln!("Google's own programs: {}", using_real_programs());
    let service = services::echo().await;
    let backend = backend(service, &[]).await;
    let relay = relay(&[], &[]).await;
    let _agent = agent(
        &format!("http://{}", relay.addr()),
        "legacy",
        &format!("ws://{}", backend.addr()),
        &[],
        &[],
    )
    .await;
    // Google's frontend, pointed at the relay's session URL for the backend.
    let google = google_tcpbridge::frontend(&format!("ws://{}/b/legacy", relay.addr())).await;
    for seed in 1..=3 {
        echo_exactly(google.addr, seed).await;
    }
    // backhaul-backend answered in Google's framing: it said so in its log.
    let log = backend.stderr();
    assert!(log.contains(google_tcpbridge::PATH), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backhaul_frontend_reaches_googles_backend() {
    eprintln!("Google's own programs: {}", using_real_programs());
    let service = services::echo().await;
    let google = google_tcpbridge::backend(service).await;
    let relay = relay(&[], &[]).await;
    let _agent = agent(
        &format!("http://{}", relay.addr()),
        "legacy",
        &format!("ws://{}", google.addr),
        &[],
        &[],
    )
    .await;
    let front = frontend(
        &format!("http://{}", relay.addr()),
        "legacy",
        &[s("--wire"), s("google-tcpbridge")],
        &[],
    )
    .await;
    for seed in 1..=3 {
        let mut stream = echo_exactly(front.addr(), seed).await;
        // The client's end of stream becomes Close 1000; Google's backend answers it, and the
        // frontend then closes the client's connection.
        stream.shutdown().await.unwrap();
        let mut rest = Vec::new();
        timeout(STEP_TIMEOUT, stream.read_to_end(&mut rest))
            .await
            .expect("the frontend closes the connection after the close handshake")
            .expect("read to the end");
        assert!(rest.is_empty(), "{} stray bytes", rest.len());
    }
    // Without --wire, the same frontend speaks backhaul's framing, which Google's backend does
    // not serve: the session is refused, not garbled.
    let plain = frontend(&format!("http://{}", relay.addr()), "legacy", &[], &[]).await;
    let mut stream = TcpStream::connect(plain.addr()).await.unwrap();
    let _ = stream.write_all(b"hello").await;
    let mut rest = Vec::new();
    let _ = timeout(STEP_TIMEOUT, stream.read_to_end(&mut rest))
        .await
        .expect("the frontend closes the refused connection");
    assert!(rest.is_empty());
}
