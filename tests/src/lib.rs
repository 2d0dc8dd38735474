//! End-to-end test harness: starts the real backhaul programs on ephemeral ports, waits for their
//! ready lines (never sleeps), and provides the services, traffic generators and faults the tests
//! need. A failing test prints the stderr of every program it started.
//!
//! - [`Program`]: one spawned binary, killed on drop;
//! - [`checks`]: echo transfers checked by hash, refused clients, refused command lines;
//! - [`certs`]: a private CA and a certificate for `localhost`, made with `openssl`;
//! - [`Stack`]: service + backend + relay + agent + frontend, wired together;
//! - [`services`]: echo and other TCP services the tests run in-process;
//! - [`fault`]: a TCP proxy that cuts every connection after a byte budget;
//! - [`wan`]: an emulated WAN path (one-way delay, bandwidth cap per direction);
//! - [`data`]: deterministic pseudo-random streams and their hashes;
//! - [`forward_proxy`]: tinyproxy refusing CONNECT, for the agent to go through;
//! - [`bridge_app`]: the HTTP application behind the backend's `--http-bridge`, and websocat;
//! - [`sshd`]: a real OpenSSH server with its own keys, for ssh and scp through `--stdio`;
//! - [`attack`]: raw requests, other client addresses, close timings and memory figures for
//!   the adversarial tests of the relay's defences.

pub mod attack;
pub mod bridge_app;
pub mod certs;
pub mod checks;
pub mod data;
pub mod fault;
pub mod forward_proxy;
pub mod google_tcpbridge;
pub mod metrics;
pub mod rawws;
pub mod services;
pub mod sshd;
pub mod wan;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::sync::mpsc;

/// The environment variables that would send a program's connections through a proxy; the
/// harness clears them unless a test sets them.
pub const PROXY_VARS: &[&str] = &[
    "HTTP_PROXY",
    "http_proxy",
    "HTTPS_PROXY",
    "https_proxy",
    "ALL_PROXY",
    "all_proxy",
    "NO_PROXY",
    "no_proxy",
];

/// Longest wait for a program's ready line.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest wait for any single network step in a test.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(60);

/// The directory holding the workspace's binaries: `target/<profile>/`, where a test executable
/// sits one level down in `deps/` and a binary of this crate (the benchmark) sits directly.
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("executable path");
    let dir = exe.parent().expect("executable has a directory");
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.parent().unwrap_or(dir).to_path_buf()
    } else {
        dir.to_path_buf()
    }
}

/// Path of one of the four programs; fails with instructions if it was not built.
pub fn bin(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace --bins` before `cargo test` (scripts/test.sh does both)",
        path.display()
    );
    path
}

/// Where the tests' scratch directories go: `target/e2e-scratch/`, beside the binaries, not
/// /tmp. Each run of scripts/test.sh empties it first, so it holds the last run's logs,
/// configurations and keys (for looking into a failure) and nothing piles up.
pub fn scratch_root() -> PathBuf {
    let target = bin_dir()
        .parent()
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    target.join("e2e-scratch")
}

/// A new scratch directory under [`scratch_root`], named after the test process and `tag`.
pub fn scratch_dir(tag: &str) -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    let dir = scratch_root().join(format!(
        "{}-{}-{tag}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).expect("create scratch dir");
    dir
}

/// One running program. Killed when dropped; its stderr is printed if the test is failing.
pub struct Program {
    pub name: String,
    child: Child,
    stderr_path: PathBuf,
    lines: mpsc::UnboundedReceiver<String>,
    /// The stdout lines [`Program::wait_line`] has read so far.
    read: Vec<String>,
    /// The address from its `listening on` line, if it printed one.
    pub addr: Option<SocketAddr>,
}

impl Program {
    /// Starts `name` with `args` and extra environment. Proxy variables are cleared unless given.
    pub fn spawn(name: &str, args: &[String], env: &[(String, String)]) -> Program {
        let (child, stderr_path) = Self::start(name, args, env, Stdio::null());
        Self::watched(name, child, stderr_path)
    }

    /// A started program whose stdout lines [`Program::wait_line`] watches.
    fn watched(name: &str, mut child: Child, stderr_path: PathBuf) -> Program {
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, lines) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut reader = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Program {
            name: name.to_string(),
            child,
            stderr_path,
            lines,
            read: Vec::new(),
            addr: None,
        }
    }

    /// Starts `name` with its stdin and stdout handed to the test, for `backhaul-frontend
    /// --stdio`; [`Program::wait_line`] has nothing to watch then.
    pub fn spawn_piped(
        name: &str,
        args: &[String],
        env: &[(String, String)],
    ) -> (Program, ChildStdin, ChildStdout) {
        let (child, stderr_path) = Self::start(name, args, env, Stdio::piped());
        Self::piped(name, child, stderr_path)
    }

    fn piped(
        name: &str,
        mut child: Child,
        stderr_path: PathBuf,
    ) -> (Program, ChildStdin, ChildStdout) {
        let stdin = child.stdin.take().expect("piped stdin");
        let stdout = child.stdout.take().expect("piped stdout");
        let (_, lines) = mpsc::unbounded_channel();
        let program = Program {
            name: name.to_string(),
            child,
            stderr_path,
            lines,
            read: Vec::new(),
            addr: None,
        };
        (program, stdin, stdout)
    }

    fn start(
        name: &str,
        args: &[String],
        env: &[(String, String)],
        stdin: Stdio,
    ) -> (Child, PathBuf) {
        Self::start_exe(name, bin(name), args, env, stdin)
    }

    fn start_exe(
        name: &str,
        exe: PathBuf,
        args: &[String],
        env: &[(String, String)],
        stdin: Stdio,
    ) -> (Child, PathBuf) {
        let dir = scratch_dir(name);
        let stderr_path = dir.join("stderr.log");
        let stderr = std::fs::File::create(&stderr_path).expect("stderr log");
        let mut cmd = Command::new(exe);
        cmd.args(args)
            .stdin(stdin)
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr))
            .env(
                "RUST_LOG",
                "info,backhaul_common=debug,backhaul_relay=debug,backhaul_agent=debug,backhaul_frontend=debug,backhaul_backend=debug",
            )
            .kill_on_drop(true);
        for var in PROXY_VARS {
            cmd.env_remove(var);
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("could not start {name}: {e}"));
        (child, stderr_path)
    }

    /// Starts a program that is not one of ours (`exe`, a path or a name on `PATH`), with its
    /// stdin and stdout handed to the test.
    pub fn spawn_external_piped(
        name: &str,
        exe: &str,
        args: &[String],
    ) -> (Program, ChildStdin, ChildStdout) {
        let (child, stderr_path) =
            Self::start_exe(name, PathBuf::from(exe), args, &[], Stdio::piped());
        Self::piped(name, child, stderr_path)
    }

    /// Starts a program that is not one of ours and waits for its `listening on` line.
    pub async fn listening_external(name: &str, exe: &str, args: &[String]) -> Program {
        let (child, stderr_path) =
            Self::start_exe(name, PathBuf::from(exe), args, &[], Stdio::null());
        Self::with_ready_line(name, child, stderr_path).await
    }

    /// Starts a program and waits for its `listening on` line.
    pub async fn listening(name: &str, args: &[String], env: &[(String, String)]) -> Program {
        let (child, stderr_path) = Self::start(name, args, env, Stdio::null());
        Self::with_ready_line(name, child, stderr_path).await
    }

    async fn with_ready_line(name: &str, child: Child, stderr_path: PathBuf) -> Program {
        let mut p = Self::watched(name, child, stderr_path);
        let line = p.wait_line("listening on ").await;
        let addr = line
            .rsplit("listening on ")
            .next()
            .and_then(|a| a.trim().parse().ok())
            .unwrap_or_else(|| panic!("{name} printed an unparsable ready line: {line:?}"));
        p.addr = Some(addr);
        p
    }

    /// Waits for a stdout line containing `needle`.
    pub async fn wait_line(&mut self, needle: &str) -> String {
        let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
        loop {
            match tokio::time::timeout_at(deadline, self.lines.recv()).await {
                Ok(Some(line)) => {
                    self.read.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Ok(None) => panic!(
                    "{} exited before printing {needle:?}; stderr:\n{}",
                    self.name,
                    self.stderr()
                ),
                Err(_) => panic!(
                    "{} did not print {needle:?} within {READY_TIMEOUT:?}; stderr:\n{}",
                    self.name,
                    self.stderr()
                ),
            }
        }
    }

    /// The first stdout line with `needle`, whether [`Program::wait_line`] read past it before
    /// or it is still to come.
    pub async fn said(&mut self, needle: &str) -> String {
        match self.read.iter().find(|l| l.contains(needle)) {
            Some(line) => line.clone(),
            None => self.wait_line(needle).await,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr.expect("program has a listening address")
    }

    /// Waits until its log (stderr) contains `needle`; returns the log. The log is a file, so
    /// this looks again every 20 ms until [`READY_TIMEOUT`].
    pub async fn wait_stderr(&self, needle: &str) -> String {
        let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
        loop {
            let log = self.stderr();
            if log.contains(needle) {
                return log;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{} did not log {needle:?} within {READY_TIMEOUT:?}; stderr:\n{log}",
                self.name
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Everything the program wrote to stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// Kills the program at once (SIGKILL) and waits for it.
    pub async fn kill(&mut self) {
        let _ = tokio::time::timeout(STEP_TIMEOUT, self.child.kill()).await;
    }

    /// The process ID, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Waits for the program to exit and returns its exit code.
    pub async fn wait(&mut self) -> Option<i32> {
        tokio::time::timeout(STEP_TIMEOUT, self.child.wait())
            .await
            .expect("program did not exit in time")
            .ok()
            .and_then(|s| s.code())
    }
}

impl Drop for Program {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = self.stderr();
            let tail: String = log
                .lines()
                .rev()
                .take(60)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("\n");
            eprintln!(
                "----- stderr of {} (last 60 lines) -----\n{tail}",
                self.name
            );
        }
        let _ = self.child.start_kill();
    }
}

/// Options for [`Stack::start`].
#[derive(Default, Clone)]
pub struct StackOptions {
    /// The TCP service the backend connects to; an echo service when `None`.
    pub target: Option<SocketAddr>,
    /// The URL the agent uses for the relay (e.g. through a fault injector); the relay itself
    /// when `None`.
    pub agent_relay_url: Option<String>,
    /// Extra environment for the agent (e.g. HTTP_PROXY).
    pub agent_env: Vec<(String, String)>,
    /// Extra relay arguments.
    pub relay_args: Vec<String>,
    /// Extra agent arguments (e.g. `--transport websocket`).
    pub agent_args: Vec<String>,
    /// The backend ID; `test` when empty.
    pub backend_id: String,
}

/// The whole stack on loopback.
pub struct Stack {
    pub target: SocketAddr,
    pub backend: Program,
    pub relay: Program,
    pub agent: Program,
    pub frontend: Program,
    pub backend_id: String,
    pub opts: StackOptions,
}

pub fn s(v: impl ToString) -> String {
    v.to_string()
}

impl Stack {
    pub async fn start(opts: StackOptions) -> Stack {
        Self::start_with_env(opts, &[]).await
    }

    /// Like [`Stack::start`], with extra environment for every program (e.g. `RUST_LOG`).
    pub async fn start_with_env(opts: StackOptions, env: &[(String, String)]) -> Stack {
        Self::assemble(opts, env, None).await
    }

    /// Like [`Stack::start`] around a relay already running (so that something can be put
    /// between it and the agent first, with [`StackOptions::agent_relay_url`]).
    pub async fn start_with_relay(opts: StackOptions, relay: Program) -> Stack {
        Self::assemble(opts, &[], Some(relay)).await
    }

    async fn assemble(
        opts: StackOptions,
        env: &[(String, String)],
        relay: Option<Program>,
    ) -> Stack {
        let target = match opts.target {
            Some(t) => t,
            None => services::echo().await,
        };
        let backend_id = if opts.backend_id.is_empty() {
            "test".to_string()
        } else {
            opts.backend_id.clone()
        };
        let backend = backend(target, env).await;
        let relay = match relay {
            Some(r) => r,
            None => self::relay(&opts.relay_args, env).await,
        };
        let mut agent_opts = opts.clone();
        agent_opts.agent_env.extend(env.iter().cloned());
        let agent = start_agent(&agent_opts, &relay, &backend, &backend_id).await;
        let frontend = frontend(&format!("http://{}", relay.addr()), &backend_id, &[], env).await;
        Stack {
            target,
            backend,
            relay,
            agent,
            frontend,
            backend_id,
            opts,
        }
    }

    /// Replaces the agent with a fresh process (the old one is killed first).
    pub async fn restart_agent(&mut self) {
        self.agent.kill().await;
        self.agent = start_agent(&self.opts, &self.relay, &self.backend, &self.backend_id).await;
    }

    /// The frontend's address: where clients connect.
    pub fn entry(&self) -> SocketAddr {
        self.frontend.addr()
    }

    pub fn relay_url(&self) -> String {
        format!("http://{}", self.relay.addr())
    }
}

async fn start_agent(
    opts: &StackOptions,
    relay: &Program,
    backend: &Program,
    backend_id: &str,
) -> Program {
    let relay_url = opts
        .agent_relay_url
        .clone()
        .unwrap_or_else(|| format!("http://{}", relay.addr()));
    agent(
        &relay_url,
        backend_id,
        &format!("ws://{}", backend.addr()),
        &opts.agent_args,
        &opts.agent_env,
    )
    .await
}

/// Starts a relay on 127.0.0.1:0 with extra arguments.
pub async fn relay(extra: &[String], env: &[(String, String)]) -> Program {
    let mut args = vec![s("--listen"), s("127.0.0.1:0")];
    args.extend(extra.iter().cloned());
    Program::listening("backhaul-relay", &args, env).await
}

/// Starts a backend on 127.0.0.1:0 in front of `target`.
pub async fn backend(target: SocketAddr, env: &[(String, String)]) -> Program {
    Program::listening(
        "backhaul-backend",
        &[s("--listen"), s("127.0.0.1:0"), s("--target"), s(target)],
        env,
    )
    .await
}

/// Starts an agent for `backend_id` and waits until it has registered with the relay.
pub async fn agent(
    relay_url: &str,
    backend_id: &str,
    backend_url: &str,
    extra: &[String],
    env: &[(String, String)],
) -> Program {
    let mut args = vec![
        s("--relay"),
        s(relay_url),
        s("--backend-id"),
        s(backend_id),
        s("--backend"),
        s(backend_url),
    ];
    args.extend(extra.iter().cloned());
    let mut agent = Program::spawn("backhaul-agent", &args, env);
    agent.wait_line("connected to relay").await;
    agent
}

/// Starts a frontend on 127.0.0.1:0 for `backend_id` at `relay_url`.
pub async fn frontend(
    relay_url: &str,
    backend_id: &str,
    extra: &[String],
    env: &[(String, String)],
) -> Program {
    let mut args = vec![
        s("--listen"),
        s("127.0.0.1:0"),
        s("--relay"),
        s(relay_url),
        s("--backend-id"),
        s(backend_id),
    ];
    args.extend(extra.iter().cloned());
    Program::listening("backhaul-frontend", &args, env).await
}

/// A port on 127.0.0.1 that nothing listens on (bound, then released).
pub fn closed_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    drop(l);
    addr
}
