//! The application behind `backhaul-backend --http-bridge` in the tests: `tests/apps/bridge_app.py`,
//! a Python standard-library HTTP server (its docstring lists the rooms: echo, chat, flaky,
//! broken, refuse, slow). Also [`http`], a one-shot HTTP/1.1 request for the tests' own POSTs
//! to callback URLs, and [`websocat`], the client the bridge's users reach it with.

use crate::{s, Program, STEP_TIMEOUT};
use serde_json::Value;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub struct BridgeApp {
    pub program: Program,
}

impl BridgeApp {
    /// Starts the app on an ephemeral loopback port; `ca` is trusted for https:// callbacks.
    pub async fn start(ca: Option<&Path>) -> BridgeApp {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("apps/bridge_app.py");
        let mut args = vec![script.display().to_string()];
        args.extend(ca.map(|c| c.display().to_string()));
        BridgeApp {
            program: Program::listening_external("bridge_app.py", "python3", &args).await,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.program.addr()
    }

    /// The app's URL for `path` (`room/frame`, `room/disconnect`).
    pub fn url(&self, path: &str) -> String {
        format!("http://{}/{path}", self.addr())
    }

    /// Everything the app recorded so far.
    pub async fn events(&self) -> Vec<Value> {
        let (status, body) = http(self.addr(), "GET", "/events", &[], b"").await;
        assert_eq!(status, 200, "GET /events: {body}");
        serde_json::from_str(&body).expect("events are JSON")
    }

    /// Waits until the app has recorded an event of `kind` in `room`; returns all events.
    pub async fn wait_for(&self, room: &str, kind: &str) -> Vec<Value> {
        self.wait_events(&format!("a {kind} in {room}"), |e| {
            !of(e, room, kind).is_empty()
        })
        .await
    }

    /// Waits until the recorded events satisfy `done` (looking again every 20 ms, at most
    /// [`STEP_TIMEOUT`]); returns them.
    pub async fn wait_events(&self, what: &str, done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        let deadline = tokio::time::Instant::now() + STEP_TIMEOUT;
        loop {
            let events = self.events().await;
            if done(&events) {
                return events;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the app did not record {what} within {STEP_TIMEOUT:?}; it has {events:#?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// The events of `kind` in `room`, in the order the app recorded them.
pub fn of<'a>(events: &'a [Value], room: &str, kind: &str) -> Vec<&'a Value> {
    events
        .iter()
        .filter(|e| e["room"] == room && e["kind"] == kind)
        .collect()
}

/// One HTTP/1.1 request on a new connection; returns the status and the body as text.
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, String) {
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
            body.len()
        );
        for (name, value) in headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str("\r\n");
        stream.write_all(head.as_bytes()).await.expect("send head");
        stream.write_all(body).await.expect("send body");
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await.expect("read answer");
        let answer = String::from_utf8_lossy(&answer).to_string();
        let status = answer
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or_else(|| panic!("not an HTTP answer: {answer:?}"));
        let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
        let chunked = head.lines().any(|l| {
            l.to_ascii_lowercase()
                .starts_with("transfer-encoding: chunked")
        });
        let body = if chunked {
            dechunk(body)
        } else {
            body.to_string()
        };
        (status, body)
    };
    tokio::time::timeout(STEP_TIMEOUT, exchange)
        .await
        .unwrap_or_else(|_| panic!("{method} {path} to {addr} got no answer"))
}

/// The body of a chunked HTTP/1.1 answer.
fn dechunk(mut rest: &str) -> String {
    let mut out = String::new();
    while let Some((size, after)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).expect("a chunk size");
        if n == 0 {
            break;
        }
        out.push_str(&after[..n]);
        rest = after[n..].trim_start_matches("\r\n");
    }
    out
}

/// The websocat binary (crates.io `websocat`; scripts/test.sh installs it).
pub fn websocat() -> String {
    let home = std::env::var("HOME").unwrap_or_default();
    let cargo_bin = Path::new(&home).join(".cargo/bin/websocat");
    if cargo_bin.exists() {
        return cargo_bin.display().to_string();
    }
    let on_path = std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .map(|d| Path::new(d).join("websocat"))
        .find(|p| p.exists());
    on_path.map(|p| p.display().to_string()).unwrap_or_else(|| {
        panic!("websocat is missing: run `cargo install websocat --locked --no-default-features` (scripts/test.sh does)")
    })
}

/// Starts websocat as a text client of `url`: each stdin line is one text message, each
/// message received one stdout line.
pub fn websocat_client(
    url: &str,
) -> (
    Program,
    tokio::process::ChildStdin,
    tokio::process::ChildStdout,
) {
    Program::spawn_external_piped("websocat", &websocat(), &[s("--text"), s(url)])
}
