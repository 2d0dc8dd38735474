//! The relay faces the internet: these tests attack the real programs the way a stranger (or a
//! tenant holding one site's secret) would, and check each defence by what crosses the wire,
//! what the relay logs, and figures (times to close, resident memory, round trips) held against
//! stated ceilings.

use backhaul_tests::attack::{
    self, closed_after, forward_from, http, secret_hash, still_open, write_file, Latencies, Memory,
    MemorySampler, AGENT_HOST, OTHER_CLIENT,
};
use backhaul_tests::certs::test_certs;
use backhaul_tests::checks::{echo_transfer, refuses_to_start, step};
use backhaul_tests::rawws::{self, header, RawWs, BINARY, CONTINUATION, PING, PONG, TEXT};
use backhaul_tests::{
    agent, backend, bin, data, frontend, relay, s, scratch_dir, services, Program, Stack,
    StackOptions,
};
use serde_json::json;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::RwLock;
use tokio::time::{timeout, Instant};

/// The agent protocol version the relay speaks (docs/protocol.md).
const AGENT_PROTOCOL: u32 = 4;
const MIB: u64 = 1 << 20;

// Secrets of two sites sharing one relay. The relay is only ever given their hashes.
const A_AGENT: &str = "alpha-agent-7f3c9e1d5b2a4c6e8f0a1b3c";
const A_CLIENT: &str = "alpha-client-2d4f6a8c0e1b3d5f7a9c1e3b";
const B_AGENT: &str = "beta-agent-9a8b7c6d5e4f3a2b1c0d9e8f";
/// Alpha's agent secret after a rotation.
const A_AGENT_NEW: &str = "alpha-agent-rotated-5c4b3a29180f7e6d";

/// The flood test measures latency and memory; every other test holds this for reading, the
/// flood test for writing, so nothing else runs on the two cores while it measures.
static QUIET: RwLock<()> = RwLock::const_new(());

fn bearer(secret: &str) -> String {
    format!("Bearer {secret}")
}

/// The credentials file of the two sites: alpha (private: its agents' and clients' secrets)
/// and beta (public), with `alpha_agents` as the secrets of alpha's agents.
fn alpha_beta(alpha_agents: &[&str]) -> String {
    let agents: Vec<String> = alpha_agents
        .iter()
        .map(|a| format!("\"{}\"", secret_hash(a)))
        .collect();
    format!(
        "[backend.alpha]\nagents = [{}]\nclients = [\"{}\"]\n\n[backend.beta]\nagents = [\"{}\"]\npublic = true\n",
        agents.join(", "),
        secret_hash(A_CLIENT),
        secret_hash(B_AGENT)
    )
}

fn credentials_file(text: &str) -> PathBuf {
    let path = scratch_dir("credentials").join("credentials.toml");
    write_file(&path, text);
    path
}

fn creds_args(path: &Path) -> Vec<String> {
    vec![s("--credentials"), s(path.display())]
}

/// The first line of `log` containing `needle`; fails with the log if there is none.
fn log_line<'a>(log: &'a str, needle: &str) -> &'a str {
    log.lines()
        .find(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("no line with {needle:?} in:\n{log}"))
}

/// One long-lived TCP connection through a frontend to an echo service, carrying chunks while
/// other things happen; checks each chunk came back intact.
struct EchoConn {
    stream: TcpStream,
    seed: u64,
}

impl EchoConn {
    async fn open(entry: SocketAddr, seed: u64) -> EchoConn {
        let stream = step("connect", TcpStream::connect(entry)).await.unwrap();
        EchoConn { stream, seed }
    }

    async fn chunk(&mut self, len: usize) {
        self.seed += 1;
        let sent = data::bytes(self.seed, len);
        let mut got = vec![0u8; len];
        let (mut r, mut w) = self.stream.split();
        let (wr, rd) = step("echo a chunk", async {
            tokio::join!(w.write_all(&sent), r.read_exact(&mut got))
        })
        .await;
        wr.expect("write to the echo session");
        rd.expect("read the echo");
        assert_eq!(
            data::hash(&got),
            data::hash(&sent),
            "the echo changed the bytes"
        );
    }
}

/// Sends SIGHUP to a running program.
async fn hangup(p: &Program) {
    let pid = p.pid().expect("the program runs");
    let status = tokio::process::Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()
        .await
        .unwrap();
    assert!(status.success(), "kill -HUP {pid} failed");
}

/// A WebSocket upgrade that must be refused with HTTP `status`; returns the response head.
async fn ws_refused(
    relay: SocketAddr,
    target: &str,
    extra: &[(&str, &str)],
    status: u16,
) -> String {
    match RawWs::connect(relay, target, extra).await {
        Ok(_) => panic!("{target} was accepted; expected HTTP {status}"),
        Err(head) => {
            assert!(
                head.starts_with(&format!("HTTP/1.1 {status} ")),
                "{target}: expected HTTP {status}, got:\n{head}"
            );
            head
        }
    }
}

/// Reads one message from a session to a `services::websocket_echo` backend (it first sends the
/// request path it saw), sends `len` random bytes as one binary message and checks the echo.
async fn ws_echo_check(ws: &mut RawWs, seed: u64, len: usize) {
    let (op, _path) = step("the backend's greeting", ws.recv_message()).await;
    assert_eq!(op, TEXT);
    let payload = data::bytes(seed, len);
    ws.send(true, BINARY, &payload).await;
    let (op, got) = step("the echo", ws.recv_message()).await;
    assert_eq!(op, BINARY);
    assert_eq!(data::hash(&got), data::hash(&payload), "the echo changed");
}

// ----- 1. per-backend credentials --------------------------------------------------------------

/// Attack: a tenant holding alpha's agent secret registers as beta (to receive beta's sessions),
/// a client secret is presented as an agent secret, an agent claims a backend ID nobody
/// configured, and clients reach the private alpha with no token, a guess, or alpha's agent
/// secret. Defence: every one gets 401 (agents say so in their log; the relay logs a WARN line
/// with the address and the reason); the right secrets carry bytes intact (hash of 4 MiB),
/// public beta needs no client secret, and two agents with alpha's secret serve it together:
/// sessions keep working when one of them dies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_secret_opens_only_its_own_backend() {
    let _quiet = QUIET.read().await;
    let file = credentials_file(&alpha_beta(&[A_AGENT]));
    let mut args = creds_args(&file);
    // A dead agent's link is closed 2 s after its last request.
    args.extend([s("--agent-timeout-secs"), s(2)]);
    let relay = relay(&args, &[]).await;
    let url = format!("http://{}", relay.addr());
    let echo = services::echo().await;
    let backend = backend(echo, &[]).await;
    let backend_url = format!("ws://{}", backend.addr());
    let token = |t: &str| vec![s("--agent-token"), s(t)];

    let _beta = agent(&url, "beta", &backend_url, &token(B_AGENT), &[]).await;
    let alpha1 = agent(&url, "alpha", &backend_url, &token(A_AGENT), &[]).await;

    // Clients of the private backend without its client secret: 401 before any upgrade.
    for (what, auth) in [
        ("no token", None),
        ("a guess", Some(bearer("let-me-in"))),
        ("alpha's agent secret", Some(bearer(A_AGENT))),
    ] {
        let extra: Vec<(&str, &str)> = auth.iter().map(|a| ("Authorization", a.as_str())).collect();
        let head = ws_refused(relay.addr(), "/b/alpha", &extra, 401).await;
        assert_eq!(header(&head, "www-authenticate"), Some("Bearer"), "{what}");
    }
    let log = relay
        .wait_stderr("refused a session to backend 'alpha' from 127.0.0.1:")
        .await;
    let line = log_line(&log, "refused a session to backend 'alpha' from 127.0.0.1:");
    assert!(
        line.contains("WARN") && line.contains("no bearer token"),
        "{line}"
    );
    let log = relay
        .wait_stderr("a token that is not a credential for this backend")
        .await;
    assert!(
        log.lines()
            .any(|l| l.contains("refused a session to backend 'alpha'")
                && l.contains("a token that is not a credential for this backend")),
        "{log}"
    );

    // Agents presenting a secret of another backend or role, or an unknown backend ID.
    let thief = |id: &str, secret: &str| {
        Program::spawn(
            "backhaul-agent",
            &[
                s("--relay"),
                s(&url),
                s("--backend-id"),
                s(id),
                s("--backend"),
                s(&backend_url),
                s("--agent-token"),
                s(secret),
            ],
            &[],
        )
    };
    let thieves = [
        (
            "beta",
            thief("beta", A_AGENT),
            "a token that is not a credential for this backend",
        ),
        (
            "alpha",
            thief("alpha", A_CLIENT),
            "a token that is not a credential for this backend",
        ),
        (
            "gamma",
            thief("gamma", A_AGENT),
            "a backend ID that is not in the credentials file",
        ),
    ];
    for (id, thief, reason) in &thieves {
        thief
            .wait_stderr(
                "refused this agent's credential (the relay said: the agent's credential is not valid for this backend ID",
            )
            .await;
        let needle = format!("refused an agent registering for backend '{id}' from 127.0.0.1:");
        let log = relay.wait_stderr(&needle).await;
        let line = log_line(&log, &needle);
        assert!(line.contains("WARN") && line.contains(reason), "{line}");
    }
    drop(thieves);

    // The right secrets: alpha's client reaches alpha; anyone reaches public beta.
    let alpha_fe = frontend(&url, "alpha", &[s("--client-token"), s(A_CLIENT)], &[]).await;
    echo_transfer(alpha_fe.addr(), 11, 4 * MIB).await;
    let beta_fe = frontend(&url, "beta", &[], &[]).await;
    echo_transfer(beta_fe.addr(), 12, 4 * MIB).await;
    let (beta_ws, _) = RawWs::connect(relay.addr(), "/b/beta", &[])
        .await
        .expect("public beta needs no client secret");
    drop(beta_ws);

    // High availability: a second agent with alpha's secret registers beside the first.
    let _alpha2 = agent(&url, "alpha", &backend_url, &token(A_AGENT), &[]).await;
    let log = relay.wait_stderr("agents=2").await;
    assert!(log_line(&log, "agents=2").contains("alpha"), "{log}");
    let transfers: Vec<_> = (0..4)
        .map(|i| tokio::spawn(echo_transfer(alpha_fe.addr(), 20 + i, MIB)))
        .collect();
    for t in transfers {
        t.await.unwrap();
    }
    // One replica dies: once the relay has closed its link, the other takes every new session.
    // (A session handed to the dead one in the moment before the relay noticed would be lost
    // with it: the relay cannot tell a dead agent from a cut connection before its timeout.)
    let mut alpha1 = alpha1;
    alpha1.kill().await;
    let log = relay.wait_stderr("agents_left=1").await;
    assert!(log_line(&log, "agents_left=1").contains("alpha"), "{log}");
    for i in 0..4 {
        echo_transfer(alpha_fe.addr(), 30 + i, MIB).await;
    }
}

// ----- 2. a link is bound to its credential ----------------------------------------------------

/// Attack: someone who learnt an agent link's ID (from a proxy log, say) but not alpha's agent
/// secret polls it (to take alpha's sessions), pushes to it, tears it down, or opens its
/// WebSocket stream, with beta's valid agent secret, alpha's client secret, or no token.
/// Defence: all 12 requests get 401; the link is untouched (a poll with alpha's secret gets
/// 200, its DELETE 204, after which the link is gone: 404); the relay logs the refusal with the
/// link's first 8 characters only: the full link ID and the secrets never appear in its log at
/// the default level.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stolen_link_id_is_useless_without_its_credential() {
    let _quiet = QUIET.read().await;
    let file = credentials_file(&alpha_beta(&[A_AGENT]));
    let mut args = creds_args(&file);
    args.extend([
        s("--poll-hold-secs"),
        s(1),
        s("--agent-timeout-secs"),
        s(60),
    ]);
    // The default log level, as deployed.
    let relay = relay(&args, &[(s("RUST_LOG"), s("info"))]).await;
    let addr = relay.addr();
    let hello = json!({"protocol": AGENT_PROTOCOL, "backend_id": "alpha", "agent": "trust-test"})
        .to_string();
    let a_auth = bearer(A_AGENT);
    let r = http(
        None,
        addr,
        "POST",
        "/agent/v1/links",
        &[
            ("Authorization", &a_auth),
            ("Content-Type", "application/json"),
        ],
        hello.as_bytes(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let info: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    let link = info["link"].as_str().expect("a link ID").to_string();
    assert!(link.len() >= 32, "link ID {link:?}");
    let links = format!("/agent/v1/links/{link}");

    let b_auth = bearer(B_AGENT);
    let c_auth = bearer(A_CLIENT);
    for auth in [Some(b_auth.as_str()), Some(c_auth.as_str()), None] {
        for (method, target, extra) in [
            ("GET", format!("{links}/poll?ack=0&round=1"), vec![]),
            ("POST", format!("{links}/push"), vec![]),
            ("DELETE", links.clone(), vec![]),
            (
                "GET",
                format!("{links}/ws?ack=0"),
                vec![
                    ("Upgrade", "websocket"),
                    ("Connection", "Upgrade"),
                    ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
                    ("Sec-WebSocket-Version", "13"),
                ],
            ),
        ] {
            let mut headers = extra;
            if let Some(a) = auth {
                headers.push(("Authorization", a));
            }
            let r = http(None, addr, method, &target, &headers, b"").await;
            assert_eq!(
                r.status,
                401,
                "{method} {target} with {auth:?}: {}",
                r.text()
            );
        }
    }

    // The link is still alpha's.
    let poll = format!("{links}/poll?ack=0&round=1");
    let r = http(None, addr, "GET", &poll, &[("Authorization", &a_auth)], b"").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        header(&r.head, "content-type"),
        Some("application/x-backhaul-batch")
    );
    let r = http(
        None,
        addr,
        "DELETE",
        &links,
        &[("Authorization", &a_auth)],
        b"",
    )
    .await;
    assert_eq!(r.status, 204, "{}", r.text());
    let r = http(None, addr, "GET", &poll, &[("Authorization", &a_auth)], b"").await;
    assert_eq!(r.status, 404, "a deleted link answered: {}", r.text());

    let needle = format!(
        "a request for link '{}' did not carry the credential the link was registered with",
        &link[..8]
    );
    let log = relay.wait_stderr(&needle).await;
    let line = log_line(&log, &needle);
    assert!(
        line.contains("WARN") && line.contains("refused a request from 127.0.0.1:"),
        "{line}"
    );
    for secret in [link.as_str(), A_AGENT, B_AGENT, A_CLIENT] {
        assert!(
            !log.contains(secret),
            "the relay's log holds {secret:?}:\n{log}"
        );
    }
}

// ----- 3. SIGHUP reload ------------------------------------------------------------------------

/// Attack (or rather incident): alpha's agent secret leaked; the operator rotates it in the
/// credentials file and sends SIGHUP. Defence: the relay logs "credentials reloaded" with one
/// link closed, closes alpha's link (its session ends) and refuses the old secret from then on
/// (401 in the agent's log, and on a raw registration), while a beta session opened before the
/// reload carries bytes after it (hash of 3 x 1 MiB) and the new secret serves alpha. A broken
/// file on a later SIGHUP changes nothing: "NOT reloaded", the rotated credentials stay in
/// force and every session goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_revokes_a_rotated_secret_and_spares_other_sessions() {
    let _quiet = QUIET.read().await;
    let file = credentials_file(&alpha_beta(&[A_AGENT]));
    let relay = relay(&creds_args(&file), &[]).await;
    let url = format!("http://{}", relay.addr());
    let echo = services::echo().await;
    let backend = backend(echo, &[]).await;
    let backend_url = format!("ws://{}", backend.addr());
    let token = |t: &str| vec![s("--agent-token"), s(t)];
    let old_alpha = agent(&url, "alpha", &backend_url, &token(A_AGENT), &[]).await;
    let _beta = agent(&url, "beta", &backend_url, &token(B_AGENT), &[]).await;
    let beta_fe = frontend(&url, "beta", &[], &[]).await;
    let alpha_fe = frontend(&url, "alpha", &[s("--client-token"), s(A_CLIENT)], &[]).await;

    let mut beta_conn = EchoConn::open(beta_fe.addr(), 100).await;
    beta_conn.chunk(MIB as usize).await;
    let mut alpha_conn = EchoConn::open(alpha_fe.addr(), 200).await;
    alpha_conn.chunk(64 * 1024).await;

    write_file(&file, &alpha_beta(&[A_AGENT_NEW]));
    hangup(&relay).await;
    let log = relay.wait_stderr("credentials reloaded").await;
    assert!(
        log_line(&log, "credentials reloaded").contains("links_closed=1"),
        "{log}"
    );
    let log = relay
        .wait_stderr("closing agent link: its credential was removed from the credentials file")
        .await;
    assert!(
        log_line(&log, "its credential was removed").contains("alpha"),
        "{log}"
    );
    // Alpha's session went with its link; the agent's next registration is refused.
    let mut rest = Vec::new();
    // End of stream or reset: either way the session is over, and nothing more came back.
    let _ = step(
        "alpha's session to end",
        alpha_conn.stream.read_to_end(&mut rest),
    )
    .await;
    assert!(
        rest.is_empty(),
        "a revoked session carried {} bytes",
        rest.len()
    );
    old_alpha
        .wait_stderr(
            "refused this agent's credential (the relay said: the agent's credential is not valid",
        )
        .await;
    // Beta never noticed.
    beta_conn.chunk(MIB as usize).await;
    // The rotated secret serves alpha.
    let _new_alpha = agent(&url, "alpha", &backend_url, &token(A_AGENT_NEW), &[]).await;
    echo_transfer(alpha_fe.addr(), 201, MIB).await;

    // A broken file is not taken: the rotated credentials stay.
    write_file(&file, "[backend.alpha\nagents = [");
    hangup(&relay).await;
    let log = relay.wait_stderr("NOT reloaded").await;
    assert!(
        log_line(&log, "NOT reloaded").contains("previous ones stay in force"),
        "{log}"
    );
    beta_conn.chunk(MIB as usize).await;
    echo_transfer(beta_fe.addr(), 101, MIB).await;
    echo_transfer(alpha_fe.addr(), 202, MIB).await;
    let hello =
        json!({"protocol": AGENT_PROTOCOL, "backend_id": "alpha", "agent": "old"}).to_string();
    let r = http(
        None,
        relay.addr(),
        "POST",
        "/agent/v1/links",
        &[("Authorization", &bearer(A_AGENT))],
        hello.as_bytes(),
    )
    .await;
    assert_eq!(r.status, 401, "the revoked secret registered: {}", r.text());
}

// ----- 4. secrets ------------------------------------------------------------------------------

/// Attack: a deployment mistake that would turn authentication off (an empty token from an
/// unset variable, an empty token file) or expose an open relay. Defence: empty secrets exit
/// with code 64 naming the flag; `new-secret` prints a secret and the hash `hash-secret`
/// reproduces from it on stdin (and which is its SHA-256); a relay listening beyond loopback
/// without credentials warns "without credentials", one on loopback or with both tokens does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_secrets_are_refused_and_open_relays_warn() {
    let _quiet = QUIET.read().await;
    let empty = scratch_dir("secrets").join("empty-token");
    std::fs::write(&empty, "\n").unwrap();
    let empty = empty.display().to_string();
    for (args, flag) in [
        (
            vec!["--listen", "127.0.0.1:0", "--agent-token", ""],
            "--agent-token",
        ),
        (
            vec!["--listen", "127.0.0.1:0", "--client-token-file", &empty],
            "--client-token",
        ),
    ] {
        let args: Vec<String> = args.into_iter().map(s).collect();
        let stderr = refuses_to_start("backhaul-relay", &args, &[]).await;
        assert!(
            stderr.contains(flag) && stderr.contains("empty"),
            "{args:?}: {stderr}"
        );
    }

    let out = tokio::process::Command::new(bin("backhaul-relay"))
        .arg("new-secret")
        .output()
        .await
        .unwrap();
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let field = |name: &str| {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_string())
            .unwrap_or_else(|| panic!("no {name} in {stdout}"))
    };
    let (secret, hash) = (field("secret:"), field("hash:"));
    assert!(secret.len() >= 40, "a short secret: {secret}");
    assert_eq!(hash, secret_hash(&secret));
    let mut child = tokio::process::Command::new(bin("backhaul-relay"))
        .arg("hash-secret")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin
        .write_all(format!("{secret}\n").as_bytes())
        .await
        .unwrap();
    drop(stdin);
    let out = child.wait_with_output().await.unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), hash);

    // The warning is logged before the ready line, so the log is complete once it is printed.
    for (listen, extra, warns) in [
        ("0.0.0.0:0", vec![], true),
        ("0.0.0.0:0", vec![s("--agent-token"), s(A_AGENT)], true),
        (
            "0.0.0.0:0",
            vec![
                s("--agent-token"),
                s(A_AGENT),
                s("--client-token"),
                s(A_CLIENT),
            ],
            false,
        ),
        ("127.0.0.1:0", vec![], false),
    ] {
        let mut args = vec![s("--listen"), s(listen)];
        args.extend(extra.iter().cloned());
        let p = Program::listening("backhaul-relay", &args, &[]).await;
        let log = p.stderr();
        assert_eq!(
            log.contains("without credentials"),
            warns,
            "{listen} {extra:?}:\n{log}"
        );
    }
}

// ----- 5. silent connections -------------------------------------------------------------------

/// A connection's deadline, and how much later than it the relay may close it.
const FIRST: Duration = Duration::from_secs(2);
const IDLE: Duration = Duration::from_secs(3);
const MARGIN: Duration = Duration::from_secs(4);
/// How much before its deadline a connection may be seen closed (timer granularity).
const EARLY: Duration = Duration::from_millis(300);

fn secs(t: Option<Duration>) -> String {
    t.map_or("never".into(), |t| format!("{:.2} s", t.as_secs_f64()))
}

/// Attack: slowloris. 50 connections that send nothing, 50 that send half an HTTP/1 request
/// line and 20 that send part of the HTTP/2 preface, all at once; and a connection that makes
/// one request and then idles. Defence (--first-request-timeout-secs 2, --idle-timeout-secs 3):
/// each is closed no sooner than its deadline and within it + 4 s (figures printed per kind),
/// while a long-poll agent (polls held 15 s, longer than both) keeps its link and carries a
/// session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_connections_are_closed_at_their_deadline() {
    let _quiet = QUIET.read().await;
    let relay = relay(
        &[
            s("--first-request-timeout-secs"),
            s(FIRST.as_secs()),
            s("--idle-timeout-secs"),
            s(IDLE.as_secs()),
        ],
        &[],
    )
    .await;
    let addr = relay.addr();
    let url = format!("http://{addr}");
    let echo = services::echo().await;
    let backend = backend(echo, &[]).await;
    let _agent = agent(
        &url,
        "slow",
        &format!("ws://{}", backend.addr()),
        &[s("--transport"), s("longpoll")],
        &[],
    )
    .await;

    let kinds: [(&str, &[u8], usize); 3] = [
        ("silent", b"", 50),
        ("half a request line", b"GET /healthz HT", 50),
        ("part of the HTTP/2 preface", b"PRI * HTTP/2.0\r\n", 20),
    ];
    let mut waits = Vec::new();
    for (kind, hello, n) in kinds {
        for _ in 0..n {
            let t0 = Instant::now();
            let mut c = TcpStream::connect(addr).await.unwrap();
            c.write_all(hello).await.unwrap();
            waits.push(tokio::spawn(async move {
                (kind, closed_after(&mut c, t0, FIRST + MARGIN * 3).await)
            }));
        }
    }
    // One request, then idle.
    let idle = tokio::spawn(async move {
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(b"GET /healthz HTTP/1.1\r\nHost: relay\r\n\r\n")
            .await
            .unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        while !got.windows(3).any(|w| w == b"ok ") {
            let n = step("the health answer", c.read(&mut buf)).await.unwrap();
            assert!(n > 0, "closed before answering");
            got.extend_from_slice(&buf[..n]);
        }
        assert!(got.starts_with(b"HTTP/1.1 200"));
        closed_after(&mut c, Instant::now(), IDLE + MARGIN * 3).await
    });

    // Every figure first, then the verdicts.
    let mut by_kind: Vec<(&str, Duration, Duration, usize)> = Vec::new();
    for w in waits {
        let (kind, closed) = w.await.unwrap();
        if by_kind.last().is_none_or(|k| k.0 != kind) {
            by_kind.push((kind, Duration::MAX, Duration::ZERO, 0));
        }
        let entry = by_kind.last_mut().unwrap();
        match closed {
            Some(t) => {
                entry.1 = entry.1.min(t);
                entry.2 = entry.2.max(t);
            }
            None => entry.3 += 1,
        }
    }
    let idle = idle.await.unwrap();
    for (kind, first, last, open) in &by_kind {
        eprintln!(
            "FIGURES slowloris, {kind}: closed after {:.2}..{:.2} s, {open} still open after {} s (deadline {} s)",
            first.as_secs_f64(),
            last.as_secs_f64(),
            (FIRST + MARGIN * 3).as_secs(),
            FIRST.as_secs()
        );
    }
    eprintln!(
        "FIGURES slowloris, one request then idle: closed {} after its answer (idle timeout {} s)",
        secs(idle),
        IDLE.as_secs()
    );

    // The long-poll agent held polls of 15 s through all this and still carries sessions.
    let fe = frontend(&url, "slow", &[], &[]).await;
    echo_transfer(fe.addr(), 5, MIB).await;

    for (kind, first, last, open) in by_kind {
        assert_eq!(open, 0, "{open} {kind} connections were never closed");
        assert!(
            first >= FIRST - EARLY,
            "a {kind} connection was closed after {first:?}, before its deadline"
        );
        assert!(
            last <= FIRST + MARGIN,
            "a {kind} connection was held {last:?}, over the deadline {FIRST:?} + {MARGIN:?}"
        );
    }
    let idle = idle.expect("the idle connection was never closed");
    assert!(
        idle >= IDLE - EARLY && idle <= IDLE + MARGIN,
        "the idle connection was closed {idle:?} after its answer; the idle timeout is {IDLE:?}"
    );
}

/// Attack: slowloris against a TLS relay: a connection that never starts its TLS handshake,
/// and one that completes it and then sends nothing. Defence (--first-request-timeout-secs 2,
/// which covers the handshake): both are closed no sooner than 2 s and within 2 + 4 s of their
/// connect (figures printed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_over_tls_is_closed_at_the_deadline() {
    let _quiet = QUIET.read().await;
    let certs = test_certs().await;
    let relay = relay(
        &[
            s("--tls-cert"),
            s(certs.cert.display()),
            s("--tls-key"),
            s(certs.key.display()),
            s("--first-request-timeout-secs"),
            s(FIRST.as_secs()),
        ],
        &[],
    )
    .await;
    let addr = relay.addr();
    let t0 = Instant::now();
    let mut raw = TcpStream::connect(addr).await.unwrap();
    let silent = tokio::spawn(async move { closed_after(&mut raw, t0, FIRST + MARGIN * 3).await });
    let connector = attack::tls_connector(&certs.ca);
    let t1 = Instant::now();
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = step("TLS handshake", connector.connect(name, tcp))
        .await
        .expect("the TLS handshake completes");
    let mut buf = [0u8; 256];
    let handshaken = loop {
        match timeout(FIRST + MARGIN * 3, tls.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break Some(t1.elapsed()),
            Ok(Ok(_)) => continue,
            Err(_) => break None,
        }
    };
    let silent = silent.await.unwrap();
    eprintln!(
        "FIGURES slowloris over TLS: silent TCP closed after {}, TLS handshake then silence closed after {} (deadline {} s)",
        secs(silent),
        secs(handshaken),
        FIRST.as_secs()
    );
    for (what, t) in [("silent TCP", silent), ("TLS then silent", handshaken)] {
        let t = t.unwrap_or_else(|| panic!("{what}: the connection was never closed"));
        assert!(
            t >= FIRST - EARLY && t <= FIRST + MARGIN,
            "{what}: closed after {t:?}; the deadline is {FIRST:?} (+ {MARGIN:?})"
        );
    }
}

// ----- 6. connection caps ----------------------------------------------------------------------

/// A relay, an agent whose connections come from [`AGENT_HOST`] (not the attacker's address)
/// and a `websocket_echo` backend for it.
async fn relay_with_distant_agent(args: &[String], id: &str) -> (Program, Program) {
    let relay = relay(args, &[]).await;
    let ws_echo = services::websocket_echo().await;
    let via = forward_from(AGENT_HOST, relay.addr()).await;
    let agent = agent(
        &format!("http://{via}"),
        id,
        &format!("ws://{ws_echo}"),
        &[],
        &[],
    )
    .await;
    (relay, agent)
}

/// Attack: one address opens connections and says nothing, to take every slot the relay has.
/// Defence (--max-connections-per-client 20, first-request deadline 60 s so the held ones stay):
/// the 21st connection from that address is closed at once (within 1 s; figure printed) and the
/// relay logs why, the 20 stay open, and another address still gets /healthz 200 and a session
/// through the agent carrying bytes (hash).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_gets_at_most_its_share_of_connections() {
    let _quiet = QUIET.read().await;
    let (relay, _agent) = relay_with_distant_agent(
        &[
            s("--max-connections-per-client"),
            s(20),
            s("--first-request-timeout-secs"),
            s(60),
        ],
        "capped",
    )
    .await;
    let addr = relay.addr();
    let mut held = Vec::new();
    for _ in 0..20 {
        held.push(TcpStream::connect(addr).await.unwrap());
    }
    let t0 = Instant::now();
    let mut extra = TcpStream::connect(addr).await.unwrap();
    let refused = closed_after(&mut extra, t0, Duration::from_secs(1))
        .await
        .expect("the 21st connection from one address was not closed within 1 s");
    assert!(held.iter().all(still_open), "a held connection was closed");
    let log = relay
        .wait_stderr("this address already holds 20 connections (--max-connections-per-client)")
        .await;
    let line = log_line(&log, "already holds 20 connections");
    assert!(
        line.contains("WARN") && line.contains("refused a connection from 127.0.0.1:"),
        "{line}"
    );

    let r = http(Some(OTHER_CLIENT), addr, "GET", "/healthz", &[], b"").await;
    assert_eq!(r.status, 200);
    let (mut ws, _) = RawWs::connect_from(OTHER_CLIENT, addr, "/b/capped", &[])
        .await
        .expect("another address opens a session");
    ws_echo_check(&mut ws, 61, 256 * 1024).await;
    assert!(held.iter().all(still_open), "a held connection was closed");
    eprintln!(
        "FIGURES connection cap: the 21st connection from one address was closed after {:.1} ms",
        refused.as_secs_f64() * 1e3
    );
}

/// Attack: 1,000 silent connections from one address, against the default caps. Defence: the
/// relay holds 256 of them (--max-connections-per-client's default) and closes the other 744 at
/// once (each within 1 s of its connect completing; figure printed); a new agent registers afterwards and a
/// client from another address gets /healthz 200 and a session carrying bytes (hash).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_silent_connections_do_not_lock_others_out() {
    let _quiet = QUIET.read().await;
    const HELD: usize = 256;
    const TOTAL: usize = 1000;
    let relay = relay(&[s("--first-request-timeout-secs"), s(60)], &[]).await;
    let addr = relay.addr();
    // The relay accepts in the order the connections were made: the first 256 are held, each
    // later one is watched from its connect.
    let mut conns = Vec::with_capacity(HELD);
    let mut refused = Vec::with_capacity(TOTAL - HELD);
    for i in 0..TOTAL {
        let mut c = TcpStream::connect(addr).await.unwrap();
        let t0 = Instant::now();
        if i < HELD {
            conns.push(c);
        } else {
            refused.push(tokio::spawn(async move {
                closed_after(&mut c, t0, Duration::from_secs(1)).await
            }));
        }
    }
    let mut slowest = Duration::ZERO;
    for (i, r) in refused.into_iter().enumerate() {
        let t = r.await.unwrap().unwrap_or_else(|| {
            panic!(
                "connection {} of {TOTAL} from one address was not closed within 1 s",
                HELD + i + 1
            )
        });
        assert!(
            t <= Duration::from_secs(1),
            "connection {} was closed {t:?} after its connect",
            HELD + i + 1
        );
        slowest = slowest.max(t);
    }
    let open = conns.iter().filter(|c| still_open(c)).count();
    assert_eq!(
        open, HELD,
        "the relay should hold exactly {HELD} connections of one address"
    );
    let log = relay
        .wait_stderr("this address already holds 256 connections (--max-connections-per-client)")
        .await;
    log_line(&log, "refused a connection from 127.0.0.1:");

    // Others get in: a new agent, a health check, a session.
    let ws_echo = services::websocket_echo().await;
    let via = forward_from(AGENT_HOST, addr).await;
    let _agent = agent(
        &format!("http://{via}"),
        "busy",
        &format!("ws://{ws_echo}"),
        &[],
        &[],
    )
    .await;
    let r = http(Some(OTHER_CLIENT), addr, "GET", "/healthz", &[], b"").await;
    assert_eq!(r.status, 200);
    let (mut ws, _) = RawWs::connect_from(OTHER_CLIENT, addr, "/b/busy", &[])
        .await
        .expect("another address opens a session");
    ws_echo_check(&mut ws, 62, 256 * 1024).await;
    assert_eq!(
        conns.iter().filter(|c| still_open(c)).count(),
        HELD,
        "held connections were dropped"
    );
    eprintln!(
        "FIGURES 1000 silent connections from one address: {HELD} held, {} closed, the slowest {:.1} ms after its connect",
        TOTAL - HELD,
        slowest.as_secs_f64() * 1e3
    );
}

// ----- 7. session caps -------------------------------------------------------------------------

/// Opens a session from `from` (127.0.0.1 when `None`) and checks it is carried.
async fn open_session(relay: SocketAddr, from: Option<std::net::IpAddr>, target: &str) -> RawWs {
    let r = match from {
        Some(ip) => RawWs::connect_from(ip, relay, target, &[]).await,
        None => RawWs::connect(relay, target, &[]).await,
    };
    let (mut ws, _) = r.unwrap_or_else(|head| panic!("{target} was refused:\n{head}"));
    let (op, _) = step("the backend's greeting", ws.recv_message()).await;
    assert_eq!(op, TEXT);
    ws
}

/// Attack: one client opens sessions until the relay (or one backend) has no more, to starve
/// everyone else. Defence: with --max-sessions-per-client 3 the fourth session from one address
/// gets 429 while another address gets 101; with max_sessions = 2 for one backend in the
/// credentials file (and --max-sessions-per-backend 3 for the others) the third session to it
/// gets 503 while another backend still opens its three, and its fourth gets 503. Each refusal
/// is logged with the address and the limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_caps_per_client_and_per_backend() {
    let _quiet = QUIET.read().await;
    let ws_echo = services::websocket_echo().await;
    let echo_url = format!("ws://{ws_echo}");

    let relay1 = relay(&[s("--max-sessions-per-client"), s(3)], &[]).await;
    let url1 = format!("http://{}", relay1.addr());
    let _agent1 = agent(&url1, "svc", &echo_url, &[], &[]).await;
    let mut mine = Vec::new();
    for _ in 0..3 {
        mine.push(open_session(relay1.addr(), None, "/b/svc").await);
    }
    let head = ws_refused(relay1.addr(), "/b/svc", &[], 429).await;
    assert!(head.contains("429"), "{head}");
    let mut other = open_session(relay1.addr(), Some(OTHER_CLIENT), "/b/svc").await;
    other.send(true, TEXT, b"still here").await;
    assert_eq!(other.recv_message().await, (TEXT, b"still here".to_vec()));
    let log = relay1
        .wait_stderr("this client address already holds 3 sessions (--max-sessions-per-client)")
        .await;
    let line = log_line(&log, "already holds 3 sessions");
    assert!(
        line.contains("refused a session to backend 'svc' from 127.0.0.1:"),
        "{line}"
    );

    let file = credentials_file(&format!(
        "[backend.small]\nagents = [\"{0}\"]\npublic = true\nmax_sessions = 2\n\n[backend.big]\nagents = [\"{0}\"]\npublic = true\n",
        secret_hash(A_AGENT)
    ));
    let mut args = creds_args(&file);
    args.extend([s("--max-sessions-per-backend"), s(3)]);
    let relay2 = relay(&args, &[]).await;
    let url2 = format!("http://{}", relay2.addr());
    let token = [s("--agent-token"), s(A_AGENT)];
    let _small = agent(&url2, "small", &echo_url, &token, &[]).await;
    let _big = agent(&url2, "big", &echo_url, &token, &[]).await;
    let mut held = Vec::new();
    for _ in 0..2 {
        held.push(open_session(relay2.addr(), None, "/b/small").await);
    }
    let head = ws_refused(relay2.addr(), "/b/small", &[], 503).await;
    assert!(head.starts_with("HTTP/1.1 503"));
    for _ in 0..3 {
        held.push(open_session(relay2.addr(), None, "/b/big").await);
    }
    ws_refused(relay2.addr(), "/b/big", &[], 503).await;
    let log = relay2
        .wait_stderr("backend 'small' is at its limit of 2 sessions")
        .await;
    assert!(
        log_line(&log, "backend 'small' is at its limit of 2 sessions")
            .contains("refused a session to backend 'small' from 127.0.0.1:"),
        "{log}"
    );
    relay2
        .wait_stderr("backend 'big' is at its limit of 3 sessions")
        .await;
    // The sessions held are all still carried.
    for (i, ws) in held.iter_mut().enumerate() {
        let msg = format!("session {i}");
        ws.send(true, TEXT, msg.as_bytes()).await;
        assert_eq!(ws.recv_message().await, (TEXT, msg.into_bytes()));
    }
    drop(mine);
}

// ----- 8. memory and fairness under floods -----------------------------------------------------

/// Time between two timed round trips.
const PACE: Duration = Duration::from_millis(10);

/// A quiet session through the stack whose 64-byte round trips are timed.
struct Probe {
    ws: RawWs,
    seed: u64,
}

impl Probe {
    /// `n` round trips, one every `PACE` (so they sample a stretch of time, not a burst).
    async fn round_trips(&mut self, n: usize) -> Latencies {
        let mut times = Vec::with_capacity(n);
        let mut pace = tokio::time::interval(PACE);
        pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        for _ in 0..n {
            pace.tick().await;
            self.seed += 1;
            let msg = data::bytes(self.seed, 64);
            let t0 = Instant::now();
            self.ws.send(true, BINARY, &msg).await;
            let mut got = Vec::new();
            while got.len() < msg.len() {
                let (op, part) = step("an echo", self.ws.recv_message()).await;
                assert_eq!(op, BINARY);
                got.extend_from_slice(&part);
            }
            times.push(t0.elapsed());
            assert_eq!(data::hash(&got), data::hash(&msg), "the echo changed");
        }
        Latencies(times)
    }
}

/// An attack in progress: its tasks, and how many bytes it has written so far.
struct Flood {
    written: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Flood {
    /// Waits until the attack has written `bytes` (so it is in full swing).
    async fn until_written(&self, bytes: u64, what: &str) {
        step(what, async {
            while self.written.load(Ordering::Relaxed) < bytes {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
    }

    fn stop(self) {
        for t in self.tasks {
            t.abort();
        }
    }
}

/// Opens `sessions` sessions and writes `frames` (encoded) again and again on each, `rounds`
/// times (forever with `None`); with `read`, everything the relay sends is read and dropped,
/// without it nothing is ever read.
async fn flood(
    relay: SocketAddr,
    sessions: usize,
    frames: Vec<u8>,
    rounds: Option<u64>,
    read: bool,
) -> Flood {
    let written = Arc::new(AtomicU64::new(0));
    let frames = Arc::new(frames);
    let mut tasks = Vec::new();
    for _ in 0..sessions {
        let (ws, _) = RawWs::connect(relay, "/b/flood", &[])
            .await
            .expect("a flood session");
        let (stream, _) = ws.into_parts();
        let (mut r, mut w) = stream.into_split();
        let (written, frames) = (written.clone(), frames.clone());
        tasks.push(tokio::spawn(async move {
            let mut round = 0;
            while rounds.is_none_or(|n| round < n) {
                if w.write_all(&frames).await.is_err() {
                    return;
                }
                written.fetch_add(frames.len() as u64, Ordering::Relaxed);
                round += 1;
            }
            std::future::pending::<()>().await;
            drop(w);
        }));
        tasks.push(tokio::spawn(async move {
            if read {
                let mut buf = vec![0u8; 64 * 1024];
                while matches!(r.read(&mut buf).await, Ok(n) if n > 0) {}
            } else {
                std::future::pending::<()>().await;
                drop(r);
            }
        }));
    }
    Flood { written, tasks }
}

fn frames(n: usize, fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    rawws::encode(fin, opcode, payload, true).repeat(n)
}

/// Attack: floods that made the relay and agent buffer without bound before (hundreds of MiB to
/// over 1 GiB, seconds of delay for everyone else): (a) WebSocket pings as fast as the client
/// can write them, reading everything back; (b) the same with pongs; (c) data sent as fast as
/// possible by a client that never reads; (d) 50 sessions each sending 1 MiB of a message
/// (fragments without FIN) and stalling. Defence: per-session flow-control windows (default
/// 512 KiB) bound what each session holds. During each attack (2 s of it) another session's
/// 64-byte round trips, one every 10 ms, stay under 1 s at worst and 50 ms at the median, and
/// the relay's and the agent's peak resident memory (VmHWM) stays under 128 MiB. Measured here
/// on loopback (printed as FIGURES): round trips p50 under 1 ms, max under 70 ms; relay and agent
/// under 40 MiB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn floods_stay_within_memory_and_latency_ceilings() {
    let _alone = QUIET.write().await;
    const RTTS: usize = 200;
    const MAX_RSS_MIB: f64 = 128.0;
    const MAX_RTT: Duration = Duration::from_secs(1);
    const MAX_P50: Duration = Duration::from_millis(50);
    let stack = Stack::start(StackOptions {
        backend_id: s("flood"),
        ..Default::default()
    })
    .await;
    let relay = stack.relay.addr();
    let pids = vec![stack.relay.pid().unwrap(), stack.agent.pid().unwrap()];
    let (mut probe_ws, _) = RawWs::connect(relay, "/b/flood", &[]).await.unwrap();
    probe_ws.send(true, BINARY, b"warm up").await;
    let _ = step("warm-up echo", probe_ws.recv_message()).await;
    let mut probe = Probe {
        ws: probe_ws,
        seed: 1000,
    };
    let base = probe.round_trips(RTTS).await;
    let (r0, a0) = (Memory::of(pids[0]), Memory::of(pids[1]));
    eprintln!(
        "FIGURES flood baseline: round trips {}; relay {:.1} MiB, agent {:.1} MiB resident",
        base.summary(),
        r0.rss_mib(),
        a0.rss_mib()
    );

    let fragment = data::bytes(7, 64 * 1024);
    let mut partial = rawws::encode(false, BINARY, &fragment, true);
    for _ in 1..16 {
        partial.extend(rawws::encode(false, CONTINUATION, &fragment, true));
    }
    let all_partial = 50 * partial.len() as u64;
    type Attack = (&'static str, usize, Vec<u8>, Option<u64>, bool, u64);
    let attacks: [Attack; 4] = [
        // name, sessions, frames, rounds, reads, bytes written before measuring
        (
            "(a) ping flood",
            1,
            frames(4096, true, PING, b""),
            None,
            true,
            MIB,
        ),
        (
            "(b) pong flood",
            1,
            frames(4096, true, PONG, b""),
            None,
            true,
            MIB,
        ),
        (
            "(c) data, never read",
            1,
            frames(16, true, BINARY, &data::bytes(8, 16 * 1024)),
            None,
            false,
            2 * MIB,
        ),
        (
            "(d) 50 partial 1 MiB messages",
            50,
            partial,
            Some(1),
            true,
            all_partial,
        ),
    ];
    for (name, sessions, frames, rounds, read, before) in attacks {
        let sampler = MemorySampler::start(pids.clone());
        let t0 = Instant::now();
        let attack = flood(relay, sessions, frames, rounds, read).await;
        attack.until_written(before, name).await;
        let written_at_start = attack.written.load(Ordering::Relaxed);
        let during = probe.round_trips(RTTS).await;
        let total = attack.written.load(Ordering::Relaxed);
        let written = total - written_at_start;
        let secs = t0.elapsed().as_secs_f64();
        let peaks = sampler.finish().await;
        let (relay_mem, agent_mem) = (Memory::of(pids[0]), Memory::of(pids[1]));
        attack.stop();
        eprintln!(
            "FIGURES flood {name}: round trips {}; peak resident relay {:.1} MiB, agent {:.1} MiB (VmHWM {:.1} / {:.1} MiB); the attacker wrote {:.1} MiB in {:.1} s, {:.1} MiB of it while the probe ran",
            during.summary(),
            peaks[0] as f64 / 1024.0,
            peaks[1] as f64 / 1024.0,
            relay_mem.hwm_mib(),
            agent_mem.hwm_mib(),
            total as f64 / MIB as f64,
            secs,
            written as f64 / MIB as f64,
        );
        assert!(
            during.max() < MAX_RTT && during.p50() < MAX_P50,
            "{name}: another session's round trips: {}",
            during.summary()
        );
        for (who, m) in [("relay", relay_mem), ("agent", agent_mem)] {
            assert!(
                m.hwm_mib() < MAX_RSS_MIB,
                "{name}: the {who} reached {:.1} MiB resident",
                m.hwm_mib()
            );
        }
    }
    // After all of it, the probe is still carried intact.
    let after = probe.round_trips(20).await;
    assert!(after.max() < MAX_RTT);
}

// ----- 9. bounded session requests -------------------------------------------------------------

/// Attack: session requests meant to hurt the agent or escape the backend URL: a 64 KiB path,
/// a backend ID smuggling a host ('@'), '..' segments plain and percent-encoded (once and
/// twice), 17 subprotocols, 9 KiB of Cookie. Defence: 414, 400 and 431 at the relay, before
/// anything reaches the agent (its log names none of them and the backend's first connection is
/// the next good session), while a path with '@host' after the backend ID stays a path under
/// --backend's URL, 16 subprotocols pass, and a session on the same agent link carries 1 MiB
/// each way intact (hash).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_and_escaping_session_requests_never_reach_the_agent() {
    let _quiet = QUIET.read().await;
    let backend = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let relay = relay(&[], &[]).await;
    let addr = relay.addr();
    let agent = agent(
        &format!("http://{addr}"),
        "raw",
        &format!("ws://{}/p", backend.local_addr().unwrap()),
        &[],
        &[],
    )
    .await;

    let long = format!("/b/raw/{}", "a".repeat(64 * 1024));
    ws_refused(addr, &long, &[], 414).await;
    for bad in [
        "/b/raw@evil.example/x",
        "/b/raw/../x",
        "/b/raw/%2e%2e/x",
        "/b/raw/%252e%252e/x",
        "/b/raw/a/..%2f..%2fetc",
    ] {
        ws_refused(addr, bad, &[], 400).await;
    }
    let protocols: Vec<String> = (1..=17).map(|i| format!("p{i}")).collect();
    let head = ws_refused(
        addr,
        "/b/raw/protocols",
        &[("Sec-WebSocket-Protocol", &protocols.join(", "))],
        400,
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 400"));
    let cookie = format!("jar={}", "c".repeat(9 * 1024));
    ws_refused(addr, "/b/raw/cookies", &[("Cookie", &cookie)], 431).await;

    // The next session is the first thing the backend sees, and it carries bytes.
    let (client, (mut server, head)) = tokio::join!(
        RawWs::connect(addr, "/b/raw/after", &[]),
        RawWs::accept(&backend)
    );
    let (mut client, _) = client.expect("a good session after the refused ones");
    assert_eq!(head.lines().next(), Some("GET /p/after HTTP/1.1"), "{head}");
    let up = data::bytes(91, MIB as usize);
    let down = data::bytes(92, MIB as usize);
    let (mut got_up, mut got_down) = (Vec::new(), Vec::new());
    step("1 MiB each way", async {
        for (u, d) in up.chunks(64 * 1024).zip(down.chunks(64 * 1024)) {
            client.send(true, BINARY, u).await;
            server.send(true, BINARY, d).await;
            got_up.extend(server.recv_message().await.1);
            got_down.extend(client.recv_message().await.1);
        }
    })
    .await;
    assert_eq!(data::hash(&got_up), data::hash(&up));
    assert_eq!(data::hash(&got_down), data::hash(&down));

    // '@host' after the ID is only a path: the agent dials --backend's host with it.
    let (client, (_server, head)) = tokio::join!(
        RawWs::connect(addr, "/b/raw/@evil.example:80/x", &[]),
        RawWs::accept(&backend)
    );
    client.expect("a path with '@' is a path");
    assert_eq!(
        head.lines().next(),
        Some("GET /p/@evil.example:80/x HTTP/1.1")
    );
    // 16 subprotocols are within the limit.
    let sixteen = protocols[..16].join(", ");
    let offer = [("Sec-WebSocket-Protocol", sixteen.as_str())];
    let (client, (_server, head)) = tokio::join!(
        RawWs::connect(addr, "/b/raw/sixteen", &offer),
        RawWs::accept(&backend)
    );
    client.expect("16 subprotocols pass");
    assert_eq!(
        header(&head, "sec-websocket-protocol"),
        Some(sixteen.as_str())
    );

    let log = agent.stderr();
    for refused in [
        "aaaaaaaa",
        "raw@evil",
        "/../x",
        "%2e%2e",
        "%252e",
        "..%2f",
        "p17",
        "jar=",
        "/cookies",
        "/protocols",
    ] {
        assert!(
            !log.contains(refused),
            "the agent saw a refused request ({refused}):\n{log}"
        );
    }
}
