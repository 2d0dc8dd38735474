//! The WebSocket-to-HTTP bridge (`backhaul-backend --http-bridge`): WebSocket clients (websocat,
//! and a raw client where the test must see frames) reach a real HTTP application
//! (tests/apps/bridge_app.py) through relay -> agent -> backend; the application answers by
//! POSTing to callback URLs. Real programs on ephemeral ports, bytes checked by hash.

use backhaul_tests::bridge_app::{http, of, websocat_client, BridgeApp};

/// The backend's bound on callbacks waiting for one session (http_bridge::MAX_WAITING_CALLBACKS).
const MAX_WAITING: usize = 16;
use backhaul_tests::certs::test_certs;
use backhaul_tests::checks::refuses_to_start;
use backhaul_tests::data;
use backhaul_tests::rawws::{RawWs, BINARY, TEXT};
use backhaul_tests::{agent, relay, s, Program, STEP_TIMEOUT};
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::net::SocketAddr;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

/// App, backend in bridge mode allowing only the app's URLs, relay and agent.
struct Bridge {
    app: BridgeApp,
    backend: Program,
    relay: Program,
    _agent: Program,
}

async fn bridge(backend_extra: &[String]) -> Bridge {
    let app = BridgeApp::start(None).await;
    let allow = format!(r"http://127\.0\.0\.1:{}/.*", app.addr().port());
    let mut args = vec![
        s("--listen"),
        s("127.0.0.1:0"),
        s("--http-bridge"),
        s("--allowlist"),
        allow,
    ];
    args.extend(backend_extra.iter().cloned());
    let backend = Program::listening("backhaul-backend", &args, &[]).await;
    let relay = relay(&[], &[]).await;
    let url = format!("http://{}", relay.addr());
    let agent = agent(&url, "app", &format!("ws://{}", backend.addr()), &[], &[]).await;
    Bridge {
        app,
        backend,
        relay,
        _agent: agent,
    }
}

impl Bridge {
    /// The session path asking for `room`'s frame and disconnect URLs.
    fn connect_path(&self, room: &str) -> String {
        format!(
            "/b/app/connect?f={}&d={}",
            self.app.url(&format!("{room}/frame")),
            self.app.url(&format!("{room}/disconnect"))
        )
    }

    async fn client(&self, room: &str) -> RawWs {
        let (ws, head) = RawWs::connect(self.relay.addr(), &self.connect_path(room), &[])
            .await
            .expect("the relay accepts the WebSocket");
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        ws
    }
}

fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// POSTs `body` to a callback URL as a third party would; the status and the answer.
async fn post_callback(url: &str, content_type: Option<&str>, body: &[u8]) -> (u16, String) {
    let (addr, path) = callback_target(url);
    let headers: Vec<(&str, &str)> = content_type
        .map(|t| vec![("content-type", t)])
        .unwrap_or_default();
    http(addr, "POST", &path, &headers, body).await
}

/// The address and path of a callback URL the app was given.
fn callback_target(url: &str) -> (SocketAddr, String) {
    let rest = url.strip_prefix("http://").expect("an http:// callback");
    let (host, path) = rest.split_once('/').expect("a path");
    (host.parse().expect("host:port"), format!("/{path}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocat_messages_reach_the_app_in_order_and_callbacks_come_back() {
    let b = bridge(&[]).await;
    let url = format!("ws://{}{}", b.relay.addr(), b.connect_path("echo"));
    let (_websocat, mut stdin, stdout) = websocat_client(&url);
    let mut lines = BufReader::new(stdout).lines();
    const N: usize = 200;
    let sent: Vec<String> = (0..N)
        .map(|i| format!("message {i} ünïcode {}", "x".repeat(i)))
        .collect();
    let writer = async {
        for line in &sent {
            stdin
                .write_all(format!("{line}\n").as_bytes())
                .await
                .expect("write");
        }
        stdin.flush().await.expect("flush");
        stdin
    };
    let reader = async {
        let mut got = Vec::new();
        while got.len() < N {
            let line = lines
                .next_line()
                .await
                .expect("read")
                .expect("websocat ended early");
            got.push(line);
        }
        got
    };
    let (stdin, got) = tokio::time::timeout(STEP_TIMEOUT, async { tokio::join!(writer, reader) })
        .await
        .expect("the echoes came back in time");
    assert_eq!(got, sent, "echoed messages differ or came out of order");

    let events = b.app.events().await;
    let frames = of(&events, "echo", "frame");
    assert_eq!(frames.len(), N);
    let callback = frames[0]["callback"]
        .as_str()
        .expect("a callback URL")
        .to_string();
    for (i, (f, line)) in frames.iter().zip(&sent).enumerate() {
        assert_eq!(f["seq"], (i + 1) as u64, "{f}");
        // websocat sends each line with its newline.
        assert_eq!(f["text"], format!("{line}\n"), "{f}");
        assert_eq!(f["type"], "text/plain; charset=utf-8");
        assert_eq!(f["callback"], callback.as_str());
    }
    let id = callback.rsplit('/').next().unwrap();
    assert!(uuid_like(id), "the callback URL ends in a UUID: {callback}");
    assert!(
        callback.starts_with(&format!("http://{}/", b.backend.addr())),
        "by default callbacks name the backend's listen address: {callback}"
    );

    // websocat closes when its input ends; the app hears of it, and the URL stops working.
    drop(stdin);
    let events = b.app.wait_for("echo", "disconnect").await;
    let bye = of(&events, "echo", "disconnect")[0];
    assert_eq!(bye["callback"], callback.as_str());
    let (status, body) = post_callback(&callback, Some("text/plain"), b"late").await;
    assert_eq!(status, 404, "{body}");
    b.backend
        .wait_stderr("bridge session ended: client closed")
        .await;
}

/// websocat's next stdout line: the next message it received.
async fn next_line(lines: &mut tokio::io::Lines<BufReader<tokio::process::ChildStdout>>) -> String {
    tokio::time::timeout(STEP_TIMEOUT, lines.next_line())
        .await
        .expect("websocat got a message in time")
        .expect("read")
        .expect("websocat ended early")
}

fn uuid_like(s: &str) -> bool {
    s.len() == 36 && s.chars().filter(|c| *c == '-').count() == 4
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_and_text_keep_their_type_order_and_bytes() {
    let b = bridge(&[]).await;
    let mut ws = b.client("echo").await;
    let mut sent = Vec::new();
    for i in 0..40u64 {
        let len = (i * 7919 % 20_000) as usize;
        let (op, data) = if i % 3 == 0 {
            (
                TEXT,
                format!("text {i} {}", "é".repeat(len / 4)).into_bytes(),
            )
        } else {
            // Bytes that are not UTF-8, so a text/binary mix-up cannot pass.
            let mut d = data::bytes(i, len);
            d.push(0xff);
            (BINARY, d)
        };
        ws.send(true, op, &data).await;
        sent.push((op, data));
    }
    // A 700 KiB message in three fragments arrives whole, as one POST.
    let big = data::bytes(99, 700 * 1024);
    ws.send(false, BINARY, &big[..300_000]).await;
    ws.send(false, 0, &big[300_000..600_000]).await;
    ws.send(true, 0, &big[600_000..]).await;
    sent.push((BINARY, big));
    for (i, (op, data)) in sent.iter().enumerate() {
        let (got_op, got) = ws.recv_message().await;
        assert_eq!(got_op, *op, "message {i} changed type");
        assert_eq!(sha256_hex(&got), sha256_hex(data), "message {i} changed");
    }
    let events = b.app.events().await;
    let frames = of(&events, "echo", "frame");
    assert_eq!(frames.len(), sent.len());
    for (f, (op, data)) in frames.iter().zip(&sent) {
        let want = if *op == TEXT {
            "text/plain; charset=utf-8"
        } else {
            "application/octet-stream"
        };
        assert_eq!(f["type"], want);
        assert_eq!(f["sha256"], sha256_hex(data).as_str());
    }
    ws.close(1000, "done").await;
    let events = b.app.wait_for("echo", "disconnect").await;
    let bye = of(&events, "echo", "disconnect")[0];
    assert_eq!(bye["close_code"], "1000", "{bye}");
    assert_eq!(
        bye["text"], "done",
        "the close reason is the disconnect POST's body"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callback_url_shared_with_another_party_reaches_its_client() {
    let b = bridge(&[]).await;
    // A (websocat) and B (raw) in the chat room: the app sends each message to everyone who
    // has spoken there, through the callback URLs the bridge gave it.
    let url = format!("ws://{}{}", b.relay.addr(), b.connect_path("chat"));
    let (_a, mut a_in, a_out) = websocat_client(&url);
    let mut a_lines = BufReader::new(a_out).lines();
    a_in.write_all(b"A joins\n").await.unwrap();
    assert_eq!(next_line(&mut a_lines).await, "A joins");
    let mut bws = b.client("chat").await;
    bws.send(true, TEXT, b"B joins").await;
    assert_eq!(bws.recv_message().await, (TEXT, b"B joins".to_vec()));
    assert_eq!(
        next_line(&mut a_lines).await,
        "B joins",
        "B's message reached A through A's callback"
    );
    a_in.write_all(b"hello B\n").await.unwrap();
    assert_eq!(next_line(&mut a_lines).await, "hello B");
    assert_eq!(bws.recv_message().await, (TEXT, b"hello B\n".to_vec()));

    // A third party that was given A's callback URL (here: the test) sends A a message.
    let events = b.app.events().await;
    let a_callback = of(&events, "chat", "frame")[0]["callback"]
        .as_str()
        .unwrap()
        .to_string();
    let (status, body) = post_callback(&a_callback, Some("text/plain"), b"from outside").await;
    assert_eq!(status, 204, "{body}");
    assert_eq!(next_line(&mut a_lines).await, "from outside");
    // Binary callbacks are binary messages.
    let (status, _) = post_callback(&a_callback, None, b"\x00\x01raw").await;
    assert_eq!(status, 204);

    // B leaves: its callback stops working, A's goes on.
    bws.close(1001, "going away").await;
    let events = b.app.wait_for("chat", "disconnect").await;
    let bye = of(&events, "chat", "disconnect")[0];
    assert_eq!(bye["close_code"], "1001");
    let (b_addr, b_path) = callback_target(bye["callback"].as_str().unwrap());
    assert_eq!(http(b_addr, "POST", &b_path, &[], b"x").await.0, 404);
    a_in.write_all(b"still here\n").await.unwrap();
    let line = next_line(&mut a_lines).await;
    // websocat prints a binary message's bytes as they are.
    assert!(line.ends_with("raw"), "{line:?}");
    assert_eq!(next_line(&mut a_lines).await, "still here");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn urls_the_allowlist_does_not_match_are_refused() {
    let b = bridge(&[]).await;
    let other = BridgeApp::start(None).await;
    for path in [
        // Another server than the allowed one.
        format!("/b/app/connect?f={}", other.url("echo/frame")),
        // An allowed frame URL with a disconnect URL elsewhere.
        format!(
            "/b/app/connect?f={}&d={}",
            b.app.url("echo/frame"),
            other.url("echo/disconnect")
        ),
        // Percent-encoded, the allowed host inside another URL's query.
        format!(
            "/b/app/connect?f=http%3A%2F%2F{}%2F%3Fx%3D{}",
            other.addr(),
            b.app.url("echo/frame")
        ),
        s("/b/app/connect"),
    ] {
        let (mut ws, _) = RawWs::connect(b.relay.addr(), &path, &[])
            .await
            .expect("handshake");
        ws.send(true, TEXT, b"let me in").await;
        let (code, reason) = ws.next_close().await.expect("a Close");
        assert_eq!(code, 1008, "{path}: {reason}");
        assert!(
            reason.contains("not allowed") || reason.contains("no f="),
            "{path}: {reason}"
        );
    }
    assert!(b.app.events().await.is_empty(), "the app was reached");
    assert!(
        other.events().await.is_empty(),
        "the other server was reached"
    );
    b.backend.wait_stderr("refused a bridge session").await;

    // With no --allowlist, nothing passes, and the backend says so at start.
    let open = Program::listening(
        "backhaul-backend",
        &[s("--listen"), s("127.0.0.1:0"), s("--http-bridge")],
        &[],
    )
    .await;
    open.wait_stderr("no --allowlist").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_app_gets_bounded_retries_then_the_session_closes_with_1014() {
    let b = bridge(&[
        s("--post-timeout-secs"),
        s("1"),
        s("--post-attempts"),
        s("3"),
    ])
    .await;
    // Recovers on the third try of each message: every message once, in order.
    let mut ws = b.client("flaky").await;
    for i in 0..5 {
        ws.send(true, TEXT, format!("flaky {i}").as_bytes()).await;
    }
    for i in 0..5 {
        assert_eq!(
            ws.recv_message().await,
            (TEXT, format!("flaky {i}").into_bytes())
        );
    }
    let events = b.app.events().await;
    let seqs: Vec<_> = of(&events, "flaky", "frame")
        .iter()
        .map(|e| e["seq"].clone())
        .collect();
    assert_eq!(seqs, (1..=5).map(Value::from).collect::<Vec<_>>());

    // Always 500: three tries, then close 1014 naming the failure, and the disconnect POST.
    let mut ws = b.client("broken").await;
    ws.send(true, TEXT, b"anyone?").await;
    let (code, reason) = ws.next_close().await.expect("a Close");
    assert_eq!(code, 1014, "{reason}");
    // The client learns that the application failed, not how (that is for the operator).
    assert!(reason.contains("did not take the message"), "{reason}");
    b.backend
        .wait_stderr("failed 3 times; last: answered 500")
        .await;
    let events = b.app.wait_for("broken", "disconnect").await;
    assert_eq!(
        of(&events, "broken", "failed-try").len(),
        3,
        "tries are bounded"
    );
    assert_eq!(of(&events, "broken", "disconnect")[0]["close_code"], "1014");

    // A refusal (403) is not tried again.
    let mut ws = b.client("refuse").await;
    ws.send(true, BINARY, b"x").await;
    let (code, reason) = ws.next_close().await.expect("a Close");
    assert_eq!(code, 1014, "{reason}");
    b.backend.wait_stderr("refused the message: 403").await;

    // Too slow: each try times out after 1 s.
    let mut ws = b.client("slow").await;
    ws.send(true, TEXT, b"hurry").await;
    let (code, reason) = ws.next_close().await.expect("a Close");
    assert_eq!(code, 1014, "{reason}");
    b.backend
        .wait_stderr("failed 3 times; last: no answer within 1s")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callback_urls_turn_away_forged_oversized_and_flooding_posts() {
    let b = bridge(&[s("--max-message-kib"), s("64")]).await;
    let backend = b.backend.addr();
    let forged = format!("/{}", "0f1c2d3e-4b5a-4c6d-8e7f-001122334455");
    assert_eq!(http(backend, "POST", &forged, &[], b"x").await.0, 404);
    assert_eq!(http(backend, "POST", "/connect", &[], b"x").await.0, 404);
    assert_eq!(http(backend, "GET", "/", &[], b"").await.0, 404);

    // A live session whose client reads nothing.
    let mut ws = b.client("echo").await;
    ws.send(true, TEXT, b"hello").await;
    assert_eq!(ws.recv_message().await, (TEXT, b"hello".to_vec()));
    let events = b.app.events().await;
    let callback = of(&events, "echo", "frame")[0]["callback"]
        .as_str()
        .unwrap()
        .to_string();
    let (addr, path) = callback_target(&callback);
    assert_eq!(http(addr, "GET", &path, &[], b"").await.0, 405);
    let (status, body) = http(addr, "POST", &path, &[], &vec![7u8; 65 * 1024]).await;
    assert_eq!(status, 413, "{body}");
    let (status, _) = http(
        addr,
        "POST",
        &path,
        &[("content-type", "text/plain")],
        b"\xff\xfe",
    )
    .await;
    assert_eq!(status, 400, "a text body must be UTF-8");

    // Flood it with 64 KiB messages while it reads nothing: once the socket buffers and
    // windows are full, at most 16 callbacks wait and the rest are told to come back later.
    const FLOOD: usize = 200;
    let (done_tx, mut done) = tokio::sync::mpsc::unbounded_channel();
    for _ in 0..FLOOD {
        let (path, done_tx) = (path.clone(), done_tx.clone());
        tokio::spawn(async move {
            let status = http(addr, "POST", &path, &[], &vec![1u8; 64 * 1024])
                .await
                .0;
            let _ = done_tx.send(status);
        });
    }
    let (mut delivered, mut busy) = (0, 0);
    // Ends only if no more than 16 wait: the test fails here if callbacks pile up.
    while delivered + busy < FLOOD - MAX_WAITING {
        match tokio::time::timeout(STEP_TIMEOUT, done.recv()).await {
            Ok(Some(204)) => delivered += 1,
            Ok(Some(503)) => busy += 1,
            other => panic!("a callback got {other:?}"),
        }
    }
    assert!(busy > 0, "a flood got no 503");
    // Now the client reads: the waiting callbacks go through, and every message that got 204
    // arrives whole and uncorrupted.
    let (read_tx, mut read) = tokio::sync::mpsc::unbounded_channel();
    let reader = tokio::spawn(async move {
        loop {
            let (op, data) = ws.recv_message().await;
            let intact = op == BINARY && data.len() == 64 * 1024 && data.iter().all(|b| *b == 1);
            if read_tx.send(intact).is_err() {
                break;
            }
        }
    });
    while delivered + busy < FLOOD {
        match tokio::time::timeout(STEP_TIMEOUT, done.recv()).await {
            Ok(Some(204)) => delivered += 1,
            Ok(Some(503)) => busy += 1,
            other => panic!("a callback got {other:?}"),
        }
    }
    for _ in 0..delivered {
        let intact = tokio::time::timeout(STEP_TIMEOUT, read.recv())
            .await
            .expect("every message that got 204 reaches the client");
        assert_eq!(intact, Some(true), "a corrupt message");
    }
    reader.abort();

    // A client's message over the limit closes its session with 1009, and the app never sees it.
    let mut ws = b.client("echo").await;
    ws.send(true, BINARY, &vec![2u8; 65 * 1024]).await;
    let (code, reason) = ws.next_close().await.expect("a Close");
    assert_eq!(code, 1009, "{reason}");
    let events = b.app.events().await;
    assert!(of(&events, "echo", "frame")
        .iter()
        .all(|f| f["len"] != 65 * 1024));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callbacks_over_tls() {
    let certs = test_certs().await;
    let app = BridgeApp::start(Some(&certs.ca)).await;
    let allow = format!(r"http://127\.0\.0\.1:{}/.*", app.addr().port());
    let backend = Program::listening(
        "backhaul-backend",
        &[
            s("--listen"),
            s("127.0.0.1:0"),
            s("--http-bridge"),
            s("--allowlist"),
            allow,
            s("--tls-cert"),
            s(certs.cert.display()),
            s("--tls-key"),
            s(certs.key.display()),
        ],
        &[],
    )
    .await;
    let relay = relay(&[], &[]).await;
    let _agent = agent(
        &format!("http://{}", relay.addr()),
        "app",
        &format!("wss://127.0.0.1:{}", backend.addr().port()),
        &[s("--ca-cert"), s(certs.ca.display())],
        &[],
    )
    .await;
    let path = format!("/b/app/connect?f={}", app.url("echo/frame"));
    let (mut ws, _) = RawWs::connect(relay.addr(), &path, &[])
        .await
        .expect("handshake");
    ws.send(true, TEXT, b"over TLS").await;
    assert_eq!(ws.recv_message().await, (TEXT, b"over TLS".to_vec()));
    let events = app.events().await;
    let callback = of(&events, "echo", "frame")[0]["callback"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(callback.starts_with("https://"), "{callback}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_bridge_flags_are_refused_at_start() {
    let err = refuses_to_start(
        "backhaul-backend",
        &[
            s("--listen"),
            s("127.0.0.1:0"),
            s("--http-bridge"),
            s("--allowlist"),
            s("("),
        ],
        &[],
    )
    .await;
    assert!(err.contains("not a regular expression"), "{err}");
    let err = refuses_to_start(
        "backhaul-backend",
        &[s("--listen"), s("0.0.0.0:0"), s("--http-bridge")],
        &[],
    )
    .await;
    assert!(err.contains("--base-url"), "{err}");
    let err = refuses_to_start(
        "backhaul-backend",
        &[
            s("--listen"),
            s("127.0.0.1:0"),
            s("--http-bridge"),
            s("--base-url"),
            s("ftp://x"),
        ],
        &[],
    )
    .await;
    assert!(err.contains("http:// or https://"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_close_is_answered_while_a_post_is_in_flight() {
    let b = bridge(&[]).await;
    let mut ws = b.client("hold").await;
    ws.send(true, TEXT, b"wait for me").await;
    ws.close(1000, "bye").await;
    // The app holds the POST until released, so this Close cannot wait for it.
    let (code, _) = ws.next_close().await.expect("the Close answered");
    assert_eq!(code, 1000);
    assert!(of(&b.app.events().await, "hold", "disconnect").is_empty());
    let (status, _) = http(b.app.addr(), "POST", "/hold/release", &[], b"").await;
    assert_eq!(status, 204);
    // The message sent before the Close still reaches the app, then the disconnect.
    let events = b.app.wait_for("hold", "disconnect").await;
    let kinds: Vec<_> = events
        .iter()
        .filter(|e| e["room"] == "hold")
        .map(|e| e["kind"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(kinds, ["frame", "disconnect"]);
    assert_eq!(of(&events, "hold", "frame")[0]["text"], "wait for me");
}
