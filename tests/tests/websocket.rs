//! WebSocket sessions carried faithfully through relay and agent, checked frame by frame with a
//! byte-level client and server (tests/src/rawws.rs): close codes, oversized messages, pings,
//! handshake headers, the close handshake and the session path.

use backhaul_tests::rawws::{self, close_parts, header, RawWs, BINARY, CLOSE, PING, PONG, TEXT};
use backhaul_tests::{agent, relay, s, Program};
use std::net::SocketAddr;
use tokio::net::TcpListener;

const TOKEN: &str = "client-secret";

/// A relay and an agent whose backend is a raw WebSocket listener the test controls.
struct Rig {
    relay: Program,
    _agent: Program,
    backend: TcpListener,
}

impl Rig {
    /// Relay and agent both refuse messages over 64 KiB from their WebSocket peers.
    async fn start() -> Rig {
        let backend = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let backend_url = format!("ws://{}/p?mode=backend", backend.local_addr().unwrap());
        let limit = [s("--max-message-kib"), s(64)];
        let relay = relay(
            &[&limit[..], &[s("--client-token"), s(TOKEN)]].concat(),
            &[],
        )
        .await;
        let agent = agent(
            &format!("http://{}", relay.addr()),
            "raw",
            &backend_url,
            &limit,
            &[],
        )
        .await;
        Rig {
            relay,
            _agent: agent,
            backend,
        }
    }

    fn relay_addr(&self) -> SocketAddr {
        self.relay.addr()
    }

    /// A session to `target` (under the relay), with extra client headers: the client's end, the
    /// backend's end and the backend's request head.
    async fn session(&self, target: &str, extra: &[(&str, &str)]) -> (RawWs, RawWs, String) {
        let auth = format!("Bearer {TOKEN}");
        let mut headers = vec![("Authorization", auth.as_str())];
        headers.extend_from_slice(extra);
        let (client, (server, head)) = tokio::join!(
            RawWs::connect(self.relay_addr(), target, &headers),
            RawWs::accept(&self.backend)
        );
        let (client, _) = client.expect("the relay accepts the WebSocket");
        (client, server, head)
    }
}

/// One code from every range a peer may send, and the edges of each.
const CODES: &[u16] = &[
    1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014, 3000, 3999, 4000, 4999,
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_codes_arrive_unchanged_both_ways() {
    let rig = Rig::start().await;
    for &code in CODES {
        let reason = format!("reason for {code} \u{e9}");
        // The client closes; the backend sees its code and answers with it.
        let (mut client, mut server, _) = rig.session("/b/raw", &[]).await;
        client.close(code, &reason).await;
        let (_, op, p) = server.recv().await.expect("the client's close");
        assert_eq!(op, CLOSE);
        assert_eq!(close_parts(&p), (code, reason.clone()), "client -> backend");
        server.close(code, &reason).await;
        let (_, op, p) = client.recv().await.expect("the backend's answer");
        assert_eq!(
            (op, close_parts(&p)),
            (CLOSE, (code, reason.clone())),
            "answer to the client"
        );
        assert!(
            client.closes_connection().await,
            "relay kept the connection after the close"
        );

        // The backend closes; the client sees its code.
        let (mut client, mut server, _) = rig.session("/b/raw", &[]).await;
        server.close(code, &reason).await;
        let (_, op, p) = client.recv().await.expect("the backend's close");
        assert_eq!(
            (op, close_parts(&p)),
            (CLOSE, (code, reason.clone())),
            "backend -> client"
        );
        client.close(code, &reason).await;
        let (_, op, p) = server.recv().await.expect("the client's answer");
        assert_eq!(
            (op, close_parts(&p)),
            (CLOSE, (code, reason.clone())),
            "answer to the backend"
        );
    }
    // A code that must never be sent is refused at the first hop with 1002.
    let (mut client, _server, _) = rig.session("/b/raw", &[]).await;
    client.close(1005, "").await;
    let (_, op, p) = client.recv().await.expect("the relay's refusal");
    assert_eq!((op, close_parts(&p).0), (CLOSE, 1002));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_messages_get_1009_from_either_side() {
    let rig = Rig::start().await;
    // A client message of 64 KiB passes; one byte more is refused by the relay.
    let (mut client, mut server, _) = rig.session("/b/raw", &[]).await;
    let fits = vec![7u8; 64 * 1024];
    client.send(true, BINARY, &fits).await;
    assert_eq!(server.recv_message().await, (BINARY, fits.clone()));
    // Sent as fragments: the limit counts the whole message.
    client.send(false, BINARY, &fits[..40_000]).await;
    client.send(true, 0, &fits[..30_000]).await;
    let (_, op, p) = client.recv().await.expect("the relay's close");
    let (code, reason) = close_parts(&p);
    assert_eq!((op, code), (CLOSE, 1009));
    assert!(reason.contains("65536 bytes"), "reason: {reason}");
    // The backend is told too, and why.
    let (code, reason) = server.next_close().await.expect("a close at the backend");
    assert_eq!(code, 1009, "{reason}");

    // The same limit at the agent, for what the backend sends.
    let (mut client, mut server, _) = rig.session("/b/raw", &[]).await;
    server.send(true, TEXT, &vec![b'x'; 64 * 1024 + 1]).await;
    let (_, op, p) = server.recv().await.expect("the agent's close");
    assert_eq!((op, close_parts(&p).0), (CLOSE, 1009));
    assert_eq!(client.next_close().await.map(|c| c.0), Some(1009));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pings_are_answered_only_by_the_far_end() {
    let rig = Rig::start().await;
    let (mut client, mut server, _) = rig.session("/b/raw", &[]).await;
    client.send(true, PING, b"client-ping").await;
    // The backend gets the ping itself; nobody on the way answers it.
    assert_eq!(
        server.recv().await,
        Some((true, PING, b"client-ping".to_vec()))
    );
    client.send(true, TEXT, b"after the ping").await;
    assert_eq!(
        server.recv_message().await,
        (TEXT, b"after the ping".to_vec())
    );
    server.send(true, TEXT, b"no pong yet").await;
    assert_eq!(
        client.recv().await,
        Some((true, TEXT, b"no pong yet".to_vec())),
        "the client got something before the backend's pong (a pong from a hop?)"
    );
    server.send(true, PONG, b"client-ping").await;
    assert_eq!(
        client.recv().await,
        Some((true, PONG, b"client-ping".to_vec()))
    );
    // The same the other way.
    server.send(true, PING, b"server-ping").await;
    assert_eq!(
        client.recv().await,
        Some((true, PING, b"server-ping".to_vec()))
    );
    client.send(true, PONG, b"server-ping").await;
    assert_eq!(
        server.recv().await,
        Some((true, PONG, b"server-ping".to_vec()))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_headers_reach_the_backend() {
    let rig = Rig::start().await;
    let (client, _server, head) = rig
        .session(
            "/b/raw/app?room=1&mode=client",
            &[
                ("Origin", "https://app.example"),
                ("User-Agent", "raw-test/1"),
                ("Cookie", "session=abc; theme=dark"),
                ("X-Forwarded-For", "203.0.113.9"),
                (
                    "Sec-WebSocket-Extensions",
                    "permessage-deflate; client_max_window_bits",
                ),
                ("X-Private", "not for the backend"),
            ],
        )
        .await;
    drop(client);
    // The path extends --backend's; --backend's own query parameter wins over the client's.
    let request_line = head.lines().next().unwrap();
    assert_eq!(request_line, "GET /p/app?room=1&mode=backend HTTP/1.1");
    assert_eq!(header(&head, "origin"), Some("https://app.example"));
    assert_eq!(header(&head, "user-agent"), Some("raw-test/1"));
    assert_eq!(header(&head, "cookie"), Some("session=abc; theme=dark"));
    assert_eq!(
        header(&head, "x-forwarded-for"),
        Some("203.0.113.9, 127.0.0.1")
    );
    assert_eq!(header(&head, "x-forwarded-proto"), Some("http"));
    let relay_host = rig.relay_addr().to_string();
    assert_eq!(header(&head, "x-forwarded-host"), Some(relay_host.as_str()));
    // The relay's credential, extensions and other headers stay behind.
    for absent in ["authorization", "sec-websocket-extensions", "x-private"] {
        assert_eq!(
            header(&head, absent),
            None,
            "{absent} reached the backend:\n{head}"
        );
    }

    // And the client is told no extension was agreed.
    let (_, resp) = RawWs::connect(
        rig.relay_addr(),
        "/b/raw",
        &[
            ("Authorization", &format!("Bearer {TOKEN}")),
            ("Sec-WebSocket-Extensions", "permessage-deflate"),
        ],
    )
    .await
    .expect("accepted");
    assert_eq!(header(&resp, "sec-websocket-extensions"), None, "{resp}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_clients_close_the_backends_last_messages_still_arrive() {
    let rig = Rig::start().await;
    let (mut client, mut server, _) = rig.session("/b/raw", &[]).await;
    // The client sends data and its Close at once.
    client.send(true, TEXT, b"last words").await;
    client.close(1000, "done").await;
    assert_eq!(server.recv_message().await, (TEXT, b"last words".to_vec()));
    assert_eq!(
        server.recv().await.map(|f| (f.1, close_parts(&f.2))),
        Some((CLOSE, (1000, "done".into())))
    );
    // The backend still has things to say before its own Close: all of them arrive, more
    // than a flow-control window's worth (512 KiB), so credit must keep flowing after a Close.
    let big = backhaul_tests::data::bytes(9, 64 * 1024);
    server.send(true, TEXT, b"reply 1").await;
    for _ in 0..12 {
        server.send(true, BINARY, &big).await;
    }
    server.send(true, TEXT, b"reply 2").await;
    server.close(1000, "done too").await;
    assert_eq!(client.recv_message().await, (TEXT, b"reply 1".to_vec()));
    for i in 0..12 {
        assert!(
            client.recv_message().await == (BINARY, big.clone()),
            "64 KiB reply {i} changed in transit"
        );
    }
    assert_eq!(client.recv_message().await, (TEXT, b"reply 2".to_vec()));
    let (_, op, p) = client.recv().await.expect("the backend's close");
    assert_eq!((op, close_parts(&p)), (CLOSE, (1000, "done too".into())));
    assert!(
        server.closes_connection().await,
        "the agent kept the backend connection"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_paths_stay_under_the_backend_url() {
    let rig = Rig::start().await;
    for (target, expect) in [
        ("/b/raw", "/p?mode=backend"),
        ("/b/raw/", "/p/?mode=backend"),
        (
            "/b/raw/@evil.example:80/x",
            "/p/@evil.example:80/x?mode=backend",
        ),
        ("/b/raw//evil.example/x", "/p//evil.example/x?mode=backend"),
    ] {
        let (_c, _s, head) = rig.session(target, &[]).await;
        let line = head.lines().next().unwrap().to_string();
        assert_eq!(line, format!("GET {expect} HTTP/1.1"), "for {target}");
    }
    let auth = format!("Bearer {TOKEN}");
    for bad in [
        "/b/raw/..",
        "/b/raw/a/../../x",
        "/b/raw/%2e%2e/x",
        "/b/raw/.%2E/x",
        "/b/raw/a%2f..%2fb",
    ] {
        let refused = RawWs::connect(rig.relay_addr(), bad, &[("Authorization", &auth)])
            .await
            .err()
            .unwrap_or_else(|| panic!("{bad} was accepted"));
        assert!(refused.starts_with("HTTP/1.1 400"), "{bad}: {refused}");
    }
    let long = format!("/b/raw/{}", "a".repeat(5000));
    let refused = RawWs::connect(rig.relay_addr(), &long, &[("Authorization", &auth)])
        .await
        .err()
        .expect("a 5000-byte path is refused");
    assert!(refused.starts_with("HTTP/1.1 414"), "{refused}");
    let _ = rawws::TEXT;
}
