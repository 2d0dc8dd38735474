//! What an operator sees: the relay's `/metrics` (read with a Prometheus text-format parser),
//! its `/status` page (rendered by headless Chromium, as a browser shows it), `/readyz`, and
//! the admin credential in front of them.

use backhaul_tests::checks::{
    echo_transfer, half_close_then_reply, private_file, refuses_to_start,
};
use backhaul_tests::metrics::{get, scrape};
use backhaul_tests::rawws::RawWs;
use backhaul_tests::{s, services, Stack, StackOptions, STEP_TIMEOUT};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const ADMIN: &str = "admin-token-for-the-tests-0123456789";

/// A WebSocket for a backend no agent serves: refused with 503.
async fn refused_for_no_agent(relay: SocketAddr, path: &str) {
    let head = RawWs::connect(relay, path, &[])
        .await
        .err()
        .expect("refused");
    assert!(head.starts_with("HTTP/1.1 503"), "{head}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_links_sessions_bytes_and_refusals() {
    let token = private_file("admin.token", ADMIN);
    // A service that answers 200,000 bytes to whatever it got, so each direction has its own
    // count.
    const UP: u64 = 1 << 20;
    const DOWN: u64 = 200_000;
    let stack = Stack::start(StackOptions {
        relay_args: vec![s("--admin-token-file"), s(token.display())],
        backend_id: s("metered"),
        target: Some(services::reply_after_eof(9, DOWN).await),
        ..Default::default()
    })
    .await;
    let relay = stack.relay.addr();
    half_close_then_reply(stack.entry(), 1, UP, 9, DOWN).await;
    half_close_then_reply(stack.entry(), 2, UP, 9, DOWN).await;
    // A session for a backend nobody serves: refused, and counted.
    refused_for_no_agent(relay, "/b/nobody-here").await;

    let (status, body) = get(relay, "/metrics", None).await;
    assert_eq!(status, 401, "{body}");
    let (status, _) = get(relay, "/metrics", Some("wrong")).await;
    assert_eq!(status, 401);
    let (status, body) = get(relay, "/metrics", Some(ADMIN)).await;
    assert_eq!(status, 200, "{body}");
    let m = scrape(&body);
    let value = |key: &str| {
        *m.get(key)
            .unwrap_or_else(|| panic!("no sample {key} in:\n{body}"))
    };
    assert_eq!(
        value(r#"backhaul_relay_agent_links{backend="metered",transport="websocket"}"#),
        1.0
    );
    // The sessions' ends are counted when the relay has closed them, just after the client
    // saw its echo: look again until they are in.
    let mut m = m;
    let deadline = tokio::time::Instant::now() + STEP_TIMEOUT;
    while m
        .get(r#"backhaul_relay_sessions_opened_total{backend="metered"}"#)
        .copied()
        .unwrap_or(0.0)
        < 2.0
        || m.get(r#"backhaul_relay_session_bytes_total{backend="metered",direction="to_client"}"#)
            .copied()
            .unwrap_or(0.0)
            < (2 * (DOWN + 64)) as f64
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "sessions not counted: {m:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        m = scrape(&get(relay, "/metrics", Some(ADMIN)).await.1);
    }
    // Each reply is the service's 64-character hash of the request, then DOWN bytes.
    let bytes = |direction: &str| {
        m[&format!(
            r#"backhaul_relay_session_bytes_total{{backend="metered",direction="{direction}"}}"#
        )]
    };
    assert_eq!(bytes("to_backend"), (2 * UP) as f64);
    assert_eq!(bytes("to_client"), (2 * (DOWN + 64)) as f64);
    assert_eq!(m[r#"backhaul_relay_sessions_open{backend="metered"}"#], 0.0);
    assert_eq!(
        m[r#"backhaul_relay_agent_registrations_total{backend="metered"}"#],
        1.0
    );
    assert!(m[r#"backhaul_relay_refusals_total{reason="no_agent"}"#] >= 1.0);
    assert!(m[r#"backhaul_relay_refusals_total{reason="admin_credential"}"#] >= 2.0);
    // A made-up backend ID makes no series of its own.
    assert!(!m.keys().any(|k| k.contains("nobody-here")), "{m:?}");

    let (status, body) = get(relay, "/readyz", None).await;
    assert_eq!((status, body.trim()), (200, "ready"));

    // A relay with neither --admin-token nor --admin-loopback serves neither page, even to
    // loopback.
    let closed = backhaul_tests::relay(&[], &[]).await;
    for path in ["/metrics", "/status"] {
        let (status, body) = get(closed.addr(), path, None).await;
        assert_eq!(status, 403, "{path}: {body}");
        assert!(body.contains("--admin-token"), "{body}");
    }
}

/// Chromium from Debian's `chromium` package (scripts/test.sh installs it).
fn chromium() -> &'static str {
    for c in ["/usr/bin/chromium", "/usr/bin/chromium-browser"] {
        if Path::new(c).exists() {
            return c;
        }
    }
    panic!("chromium is missing: run `apt-get install -y chromium` (scripts/test.sh does)")
}

async fn headless(args: &[String]) -> String {
    let profile = backhaul_tests::scratch_dir("chromium");
    let mut cmd = tokio::process::Command::new(chromium());
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-dev-shm-usage",
    ])
    .arg(format!("--user-data-dir={}", profile.display()))
    .args(args)
    .kill_on_drop(true);
    let out = tokio::time::timeout(STEP_TIMEOUT, cmd.output())
        .await
        .expect("chromium finished in time")
        .expect("chromium runs");
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_shows_backends_agents_sessions_and_refusals_in_a_browser() {
    // The browser sends no token: --admin-loopback lets it in from this host.
    let stack = Stack::start(StackOptions {
        backend_id: s("office-ssh"),
        relay_args: vec![s("--admin-loopback")],
        ..Default::default()
    })
    .await;
    let relay = stack.relay.addr();
    // One live session held open while the page is read, and one refusal.
    let mut live = tokio::net::TcpStream::connect(stack.entry()).await.unwrap();
    live.write_all(b"hello").await.unwrap();
    let mut echo = [0u8; 5];
    tokio::time::timeout(STEP_TIMEOUT, live.read_exact(&mut echo))
        .await
        .expect("echo in time")
        .unwrap();
    refused_for_no_agent(relay, "/b/ghost").await;

    let url = format!("http://{relay}/status");
    let dom = headless(&[s("--dump-dom"), url.clone()]).await;
    for text in [
        "<h1>backhaul relay",
        "<h2>office-ssh</h2>",
        "1 backend, 1 agent link, 1 session open",
        "websocket",
        "backhaul-agent/",
        "Recent refusals",
        "no_agent",
    ] {
        assert!(dom.contains(text), "the page lacks {text:?}:\n{dom}");
    }

    // A phone-sized screenshot, kept in docs/ when asked for (BACKHAUL_UPDATE_SCREENSHOT=1).
    let shot: PathBuf = if std::env::var_os("BACKHAUL_UPDATE_SCREENSHOT").is_some() {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/status-page.png")
    } else {
        backhaul_tests::scratch_dir("screenshot").join("status-page.png")
    };
    headless(&[
        format!("--screenshot={}", shot.display()),
        s("--window-size=412,915"),
        s("--hide-scrollbars"),
        url,
    ])
    .await;
    let png = std::fs::read(&shot).expect("a screenshot");
    assert!(png.starts_with(b"\x89PNG"), "not a PNG");
    drop(live);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_are_one_object_per_line_and_say_how_each_session_ended() {
    let stack = Stack::start(StackOptions {
        relay_args: vec![s("--log-format"), s("json")],
        backend_id: s("logged"),
        ..Default::default()
    })
    .await;
    echo_transfer(stack.entry(), 3, 100_000).await;
    let log = stack.relay.wait_stderr("session ended").await;
    let mut ended = None;
    for line in log.lines() {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not a JSON object ({e}): {line}"));
        assert!(
            v["timestamp"].is_string() && v["level"].is_string(),
            "{line}"
        );
        if v["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("session ended"))
        {
            ended = Some(v);
        }
    }
    let ended = ended.expect("a session end line");
    assert_eq!(ended["level"], "INFO");
    assert_eq!(ended["bytes.up"], 100_000, "{ended}");
    assert_eq!(ended["bytes.down"], 100_000, "{ended}");
    assert!(ended["duration_ms"].is_u64(), "{ended}");
    let spans = ended["spans"].as_array().expect("the spans it happened in");
    let session = spans
        .iter()
        .find(|s| s["name"] == "session")
        .expect("the session span");
    assert_eq!(session["backend.id"], "logged", "{session}");
    assert!(session["session.id"].is_u64(), "{session}");
    assert!(
        session["client.addr"]
            .as_str()
            .is_some_and(|a| a.starts_with("127.0.0.1")),
        "{session}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_program_names_its_version_and_commit() {
    let commit = std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    for program in [
        "backhaul-relay",
        "backhaul-agent",
        "backhaul-frontend",
        "backhaul-backend",
    ] {
        let out = tokio::process::Command::new(backhaul_tests::bin(program))
            .arg("--version")
            .output()
            .await
            .expect("runs");
        let line = String::from_utf8_lossy(&out.stdout).trim().to_string();
        assert!(out.status.success(), "{program} --version failed");
        assert!(
            line.starts_with(&format!("{program} {} (commit ", env!("CARGO_PKG_VERSION"))),
            "{line}"
        );
        if let Some(c) = &commit {
            assert!(line.contains(c.as_str()), "{line} is not HEAD ({c})");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_command_line_gets_one_line_and_exit_64() {
    for (program, args, says) in [
        (
            "backhaul-relay",
            vec![s("--lsten"), s("x")],
            "similar argument exists: '--listen'",
        ),
        ("backhaul-agent", vec![], "--relay <RELAY>"),
        (
            "backhaul-backend",
            vec![s("--max-sessions"), s("many")],
            "'many'",
        ),
        (
            "backhaul-frontend",
            vec![s("--stdio"), s("--bogus")],
            "'--bogus'",
        ),
    ] {
        let err = refuses_to_start(program, &args, &[]).await;
        assert_eq!(err.trim().lines().count(), 1, "{program}: {err}");
        assert!(err.starts_with(&format!("{program}: ")), "{err}");
        assert!(err.contains(says) && err.contains("see --help"), "{err}");
    }
}

/// Runs `backhaul-agent --check` with `args`; its exit code and stdout.
async fn agent_check(args: &[String]) -> (Option<i32>, String) {
    let mut cmd = tokio::process::Command::new(backhaul_tests::bin("backhaul-agent"));
    cmd.arg("--check").args(args).kill_on_drop(true);
    for var in backhaul_tests::PROXY_VARS {
        cmd.env_remove(var);
    }
    let out = tokio::time::timeout(STEP_TIMEOUT, cmd.output())
        .await
        .expect("--check finished in time")
        .expect("runs");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).to_string(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_check_passes_when_it_can_register_and_says_why_when_not() {
    let token = private_file("agent.token", "agent-token-for-the-check-test-0123");
    let stack = Stack::start(StackOptions {
        relay_args: vec![s("--agent-token-file"), s(token.display())],
        agent_args: vec![s("--agent-token-file"), s(token.display())],
        ..Default::default()
    })
    .await;
    let relay = format!("http://{}", stack.relay.addr());
    let backend = format!("ws://{}", stack.backend.addr());
    // The agent's command line for `relay` and `backend`, with `token` as its token file.
    let args = |relay: &str, backend: &str, token: Option<&Path>| {
        let mut args = vec![
            s("--relay"),
            s(relay),
            s("--backend-id"),
            s("test"),
            s("--backend"),
            s(backend),
        ];
        if let Some(t) = token {
            args.extend([s("--agent-token-file"), s(t.display())]);
        }
        args
    };
    let (code, out) = agent_check(&args(&relay, &backend, Some(&token))).await;
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("check passed"), "{out}");
    // The frontend's ws:// URL for the same relay works too.
    let (code, out) = agent_check(&args(
        &format!("ws://{}", stack.relay.addr()),
        &backend,
        Some(&token),
    ))
    .await;
    assert_eq!(code, Some(0), "{out}");

    // Wrong credential: the relay's 401, said as what to fix.
    let wrong = private_file("wrong.token", "not-the-agent-token-at-all-0123456");
    let (code, out) = agent_check(&args(&relay, &backend, Some(&wrong))).await;
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("--agent-token-file"), "{out}");

    // Something that is not a relay (the Python app answers 404 with no body).
    let app = backhaul_tests::bridge_app::BridgeApp::start(None).await;
    let (code, out) = agent_check(&args(&format!("http://{}", app.addr()), &backend, None)).await;
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("not a backhaul relay"), "{out}");

    // https:// to the plain-HTTP relay.
    let (code, out) = agent_check(&args(
        &format!("https://{}", stack.relay.addr()),
        &backend,
        Some(&token),
    ))
    .await;
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("plain HTTP"), "{out}");

    // A backend nobody listens on.
    let (code, out) = agent_check(&args(
        &relay,
        &format!("ws://{}", backhaul_tests::closed_port()),
        Some(&token),
    ))
    .await;
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("refuses connections"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_file_sets_what_flags_and_environment_do_not() {
    let dir = backhaul_tests::scratch_dir("config");
    let path = dir.join("relay.toml");
    // The file asks for port 1 and loopback admin pages; the flag's port wins, the file's
    // admin setting holds, and the environment's admin token beats both.
    std::fs::write(
        &path,
        "# a relay\nlisten = \"127.0.0.1:1\"\nadmin-loopback = true\nmax-sessions = 50\n",
    )
    .unwrap();
    let relay = backhaul_tests::Program::listening(
        "backhaul-relay",
        &[
            s("--config"),
            s(path.display()),
            s("--listen"),
            s("127.0.0.1:0"),
        ],
        &[],
    )
    .await;
    let (status, body) = get(relay.addr(), "/metrics", None).await;
    assert_eq!(status, 200, "admin-loopback from the file: {body}");

    // The program's own environment name beats the file (and conflicts with its setting).
    let token = private_file("admin.token", ADMIN);
    std::fs::write(&path, "listen = \"127.0.0.1:0\"\n").unwrap();
    let relay = backhaul_tests::Program::listening(
        "backhaul-relay",
        &[s("--config"), s(path.display())],
        &[(s("BACKHAUL_RELAY_ADMIN_TOKEN_FILE"), s(token.display()))],
    )
    .await;
    assert_eq!(get(relay.addr(), "/metrics", None).await.0, 401);
    assert_eq!(get(relay.addr(), "/metrics", Some(ADMIN)).await.0, 200);

    // Settings a program cannot start without may come from the file too.
    let backend_toml = dir.join("backend.toml");
    std::fs::write(
        &backend_toml,
        "listen = \"127.0.0.1:0\"\ntarget = \"127.0.0.1:9\"\n",
    )
    .unwrap();
    backhaul_tests::Program::listening(
        "backhaul-backend",
        &[s("--config"), s(backend_toml.display())],
        &[],
    )
    .await;

    // Mistakes name the file, the line and the key.
    std::fs::write(&path, "listen = \"127.0.0.1:0\"\n\nmax-sesions = 5\n").unwrap();
    let err = refuses_to_start("backhaul-relay", &[s("--config"), s(path.display())], &[]).await;
    assert!(
        err.contains("relay.toml:3: max-sesions: no such setting (did you mean max-sessions?)"),
        "{err}"
    );
    std::fs::write(&path, "max-sessions = \"lots\"\n").unwrap();
    let err = refuses_to_start("backhaul-relay", &[s("--config"), s(path.display())], &[]).await;
    assert!(
        err.contains("relay.toml:1: max-sessions: invalid value 'lots'"),
        "{err}"
    );
    // Settings judged together after parsing name where each came from.
    std::fs::write(
        &path,
        format!("listen = \"127.0.0.1:0\"\n\nadmin-token = \"{ADMIN}\"\n"),
    )
    .unwrap();
    let err = refuses_to_start(
        "backhaul-relay",
        &[s("--config"), s(path.display())],
        &[(s("BACKHAUL_ADMIN_TOKEN_FILE"), s(token.display()))],
    )
    .await;
    assert!(
        err.contains(&format!(
            "[--admin-token from {}:3; --admin-token-file from environment variable BACKHAUL_ADMIN_TOKEN_FILE]",
            path.display()
        )),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_config_files_in_dist_are_what_the_programs_print() {
    for program in ["relay", "agent", "frontend", "backend"] {
        let out = tokio::process::Command::new(backhaul_tests::bin(&format!("backhaul-{program}")))
            .arg("--config-example")
            .output()
            .await
            .expect("runs");
        assert!(out.status.success());
        let printed = String::from_utf8_lossy(&out.stdout);
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../dist/{program}.toml"));
        let kept = std::fs::read_to_string(&path).expect("dist file");
        assert_eq!(
            printed, kept,
            "dist/{program}.toml is out of date: run `backhaul-{program} --config-example > dist/{program}.toml`"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_serves_its_own_metrics_on_request() {
    const UP: u64 = 300_000;
    const DOWN: u64 = 70_000;
    let relay = backhaul_tests::relay(&[], &[]).await;
    let url = format!("http://{}", relay.addr());
    let service = services::reply_after_eof(5, DOWN).await;
    let mut agent = backhaul_tests::Program::spawn(
        "backhaul-agent",
        &[
            s("--relay"),
            s(&url),
            s("--serve"),
            format!("counted=tcp://{service}"),
            s("--metrics-listen"),
            s("127.0.0.1:0"),
        ],
        &[],
    );
    let addr = backhaul_tests::metrics::agent_addr(&mut agent).await;
    agent.wait_line("for backend counted").await;
    let frontend = backhaul_tests::frontend(&url, "counted", &[], &[]).await;
    half_close_then_reply(frontend.addr(), 6, UP, 5, DOWN).await;

    let deadline = tokio::time::Instant::now() + STEP_TIMEOUT;
    let m = loop {
        let (status, body) = get(addr, "/metrics", None).await;
        assert_eq!(status, 200, "{body}");
        let m = scrape(&body);
        let ended = m
            .get(r#"backhaul_agent_session_bytes_total{backend="counted",direction="to_backend"}"#)
            .copied()
            .unwrap_or(0.0);
        if ended > 0.0 {
            break m;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the session's end was not counted: {m:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert_eq!(
        m[r#"backhaul_agent_links{backend="counted",transport="websocket"}"#],
        1.0
    );
    assert_eq!(
        m[r#"backhaul_agent_sessions_opened_total{backend="counted"}"#],
        1.0
    );
    assert_eq!(m[r#"backhaul_agent_sessions_open{backend="counted"}"#], 0.0);
    assert_eq!(
        m[r#"backhaul_agent_session_bytes_total{backend="counted",direction="to_backend"}"#],
        UP as f64
    );
    assert_eq!(
        m[r#"backhaul_agent_session_bytes_total{backend="counted",direction="from_backend"}"#],
        (DOWN + 64) as f64
    );
    assert_eq!(get(addr, "/other", None).await.0, 404);
}
