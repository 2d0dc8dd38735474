//! Measures the stack next to direct TCP, in the same run, on loopback, for each agent transport:
//!
//! - bulk throughput each way, over one connection and over 8 at once;
//! - round-trip time of 64-byte messages (p50, p99, p99.9);
//! - connection set-up (connect to first echoed byte, p50 and p99) and new sessions per second,
//!   one after another and 32 at a time;
//! - CPU seconds each backhaul process spends per GiB carried;
//! - resident memory of every process with 1,000 and 10,000 idle sessions open;
//! - over emulated WAN paths between agent and relay (`--wan`, tests/src/wan.rs), each beside
//!   one plain TCP connection over the same path: throughput of one session and of `--conns`
//!   at once, 64-byte round trips and session set-up; long-poll also through tinyproxy;
//! - beside them, when installed, two peer tunnels from crates.io: bore and rathole.
//!
//! Run with `scripts/bench.sh` (builds the release binaries, runs this, draws the chart), or
//! `target/release/backhaul-bench --help`. Benchmarks measure; nothing here is asserted, and CI
//! does not run it. The target service runs in a child process (`--serve`), so the benchmark's
//! own sockets and the service's do not share one file-descriptor limit.

use backhaul_tests::forward_proxy::ForwardProxy;
use backhaul_tests::wan::{WanPath, WanProfile};
use backhaul_tests::{agent, backend, frontend, relay, s, Program, Stack, StackOptions};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const CHUNK: usize = 256 * 1024;
const GIB: f64 = (1u64 << 30) as f64;
/// Sessions one frontend or backend process holds in the idle test: each holds two sockets
/// per session, and the machine's descriptor limit is 20,000 per process.
const SESSIONS_PER_PROCESS: usize = 5000;
/// Processes in the plain forwarding chain: as many as the stack has, so both make five hops.
const FORWARDERS: usize = 4;

const USAGE: &str =
    "backhaul-bench: throughput, round trips, set-up and memory of backhaul next to direct TCP

options:
  --gib N             GiB per direction for the bulk transfers (default 1)
  --conns N           connections for the parallel bulk transfers (default 8)
  --rounds N          rounds of bulk transfers, every path in turn; medians reported (default 3)
  --rtts N            64-byte round trips (default 5000)
  --setups N          connections opened for the set-up figures (default 1000)
  --idle N[,N..]      idle session counts to hold open (default 1000,10000)
  --transports LIST   agent transports to measure (default websocket,http2,longpoll)
  --threads N         worker threads of each backhaul program (default 0: one per CPU, as shipped)
  --wan LIST          emulated paths between agent and relay, RTT_MS:MBIT each
                      (default 20:500,50:200,100:100,300:20; none to skip)
  --wan-secs N        seconds each WAN bulk transfer should take at the path's cap (default 3)
  --wan-only          measure only the WAN profiles (no loopback figures, no idle memory)
  --json PATH         write the results as JSON
  --chart JSON SVG    only draw the chart of a JSON result file
  --serve             (internal) run the target service and print its address
  --forward ADDR      (internal) forward every TCP connection to ADDR, for the plain chain

bore and rathole, when installed (cargo install bore-cli rathole), are measured beside the stack
on loopback.";

/// The target service, with three modes chosen by the client's first byte: `u` (upload: count
/// bytes until EOF, answer with the count), `d` (download: send the 8-byte-announced count, then
/// close) and `e` (echo).
async fn serve() {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    println!("backhaul-bench service: listening on {addr}");
    while let Ok((mut s, _)) = l.accept().await {
        let _ = s.set_nodelay(true);
        tokio::spawn(async move {
            let mut mode = [0u8; 1];
            if s.read_exact(&mut mode).await.is_err() {
                return;
            }
            match mode[0] {
                b'u' => {
                    let mut buf = vec![0u8; CHUNK];
                    let mut n = 0u64;
                    loop {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(k) => n += k as u64,
                        }
                    }
                    let _ = s.write_all(&n.to_be_bytes()).await;
                    let _ = s.shutdown().await;
                }
                b'd' => {
                    let buf = vec![0x5au8; CHUNK];
                    let mut len = [0u8; 8];
                    if s.read_exact(&mut len).await.is_err() {
                        return;
                    }
                    let mut left = u64::from_be_bytes(len);
                    while left > 0 {
                        let k = left.min(CHUNK as u64) as usize;
                        if s.write_all(&buf[..k]).await.is_err() {
                            return;
                        }
                        left -= k as u64;
                    }
                    let _ = s.shutdown().await;
                }
                _ => {
                    // A small buffer: idle echo sessions should cost the service little.
                    let mut buf = [0u8; 4096];
                    loop {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(k) => {
                                if s.write_all(&buf[..k]).await.is_err() {
                                    break;
                                }
                            }
                        }
                    }
                }
            }
        });
    }
}

/// One link of the plain forwarding chain: copies bytes between each accepted connection and a
/// new connection to `next`, with nothing added. Four of these in a row make the same five TCP
/// hops as the stack, so the chain shows what the machine allows for five hops before any
/// framing, acks or flow control.
async fn forward(next: SocketAddr) {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    println!(
        "backhaul-bench forwarder: listening on {}",
        l.local_addr().expect("addr")
    );
    while let Ok((mut a, _)) = l.accept().await {
        tokio::spawn(async move {
            let Ok(mut b) = TcpStream::connect(next).await else {
                return;
            };
            let _ = a.set_nodelay(true);
            let _ = b.set_nodelay(true);
            let _ = tokio::io::copy_bidirectional_with_sizes(&mut a, &mut b, CHUNK, CHUNK).await;
        });
    }
}

async fn upload(addr: SocketAddr, bytes: u64) {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let _ = s.set_nodelay(true);
    let buf = vec![0x5au8; CHUNK];
    s.write_all(b"u").await.expect("write");
    let mut left = bytes;
    while left > 0 {
        let k = left.min(CHUNK as u64) as usize;
        s.write_all(&buf[..k]).await.expect("upload write");
        left -= k as u64;
    }
    s.shutdown().await.expect("shutdown");
    let mut n = [0u8; 8];
    s.read_exact(&mut n).await.expect("upload count");
    assert_eq!(
        u64::from_be_bytes(n),
        bytes,
        "service counted a different number of bytes"
    );
}

async fn download(addr: SocketAddr, bytes: u64) {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let _ = s.set_nodelay(true);
    let mut buf = vec![0u8; CHUNK];
    s.write_all(b"d").await.expect("write");
    s.write_all(&bytes.to_be_bytes()).await.expect("write");
    let mut n = 0u64;
    loop {
        match s.read(&mut buf).await.expect("download read") {
            0 => break,
            k => n += k as u64,
        }
    }
    assert_eq!(n, bytes, "download returned a different number of bytes");
}

/// Moves `bytes` in total over `conns` connections at once; returns MB/s (10^6 bytes).
async fn bulk(addr: SocketAddr, bytes: u64, conns: usize, up: bool) -> f64 {
    let each = bytes / conns as u64;
    let start = Instant::now();
    let tasks: Vec<_> = (0..conns)
        .map(|_| {
            tokio::spawn(async move {
                if up {
                    upload(addr, each).await
                } else {
                    download(addr, each).await
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("transfer task");
    }
    (each * conns as u64) as f64 / start.elapsed().as_secs_f64() / 1e6
}

/// Round trips of 64-byte messages; returns sorted durations in microseconds.
async fn rtts(addr: SocketAddr, count: usize, warmup: usize) -> Vec<f64> {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let _ = s.set_nodelay(true);
    s.write_all(b"e").await.expect("write");
    let msg = [7u8; 64];
    let mut back = [0u8; 64];
    // Warm up the path (connection set-up, first session frames).
    for _ in 0..warmup {
        s.write_all(&msg).await.expect("write");
        s.read_exact(&mut back).await.expect("read");
    }
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        let t = Instant::now();
        s.write_all(&msg).await.expect("write");
        s.read_exact(&mut back).await.expect("read");
        out.push(t.elapsed().as_secs_f64() * 1e6);
    }
    out.sort_by(|a, b| a.total_cmp(b));
    out
}

/// One session: connect, send, wait for the first echoed byte. Returns the stream and how long
/// that took in microseconds.
async fn open_session(addr: SocketAddr) -> (TcpStream, f64) {
    let t = Instant::now();
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let _ = s.set_nodelay(true);
    s.write_all(b"e!").await.expect("write");
    let mut b = [0u8; 1];
    s.read_exact(&mut b).await.expect("first echoed byte");
    (s, t.elapsed().as_secs_f64() * 1e6)
}

/// Opens `count` sessions (rounded down to a multiple of `parallel`), `parallel` at a time,
/// spread over `entries`, and keeps what `keep` takes of each (the stream, to hold it open, or
/// its set-up time, closing it at once).
async fn open_many<T, K>(entries: &[SocketAddr], count: usize, parallel: usize, keep: K) -> Vec<T>
where
    T: Send + 'static,
    K: Fn((TcpStream, f64)) -> T + Copy + Send + Sync + 'static,
{
    let per = count / parallel;
    let entries: Arc<[SocketAddr]> = entries.into();
    let tasks: Vec<_> = (0..parallel)
        .map(|t| {
            let entries = entries.clone();
            tokio::spawn(async move {
                let mut out = Vec::with_capacity(per);
                for i in 0..per {
                    let addr = entries[(t * per + i) % entries.len()];
                    out.push(keep(open_session(addr).await));
                }
                out
            })
        })
        .collect();
    let mut all = Vec::with_capacity(count);
    for t in tasks {
        all.extend(t.await.expect("session-opening task"));
    }
    all
}

/// Opens `count` sessions, `parallel` at a time, each closed after its first echoed byte.
/// Returns sorted set-up times in microseconds and sessions per second.
async fn setups(addr: SocketAddr, count: usize, parallel: usize) -> (Vec<f64>, f64) {
    let start = Instant::now();
    let mut all = open_many(&[addr], count, parallel, |(_, t)| t).await;
    let rate = all.len() as f64 / start.elapsed().as_secs_f64();
    all.sort_by(|a, b| a.total_cmp(b));
    (all, rate)
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// CPU seconds a process has spent: `[user, user + system]`. The kernel's share (system) is
/// mostly socket reads and writes, the same for any design that carries bytes through user
/// space; the user share is where designs differ.
fn cpu_seconds(pid: u32) -> [f64; 2] {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // Fields after the command: state is 0, utime is 11, stime is 12.
    [ticks(11) / 100.0, (ticks(11) + ticks(12)) / 100.0]
}

fn rss_kib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

struct Opts {
    bytes: u64,
    /// Rounds of bulk transfers; each round measures every path once, in turn.
    rounds: usize,
    conns: usize,
    rtts: usize,
    setups: usize,
    idle: Vec<usize>,
    transports: Vec<String>,
    wan: Vec<WanProfile>,
    wan_secs: f64,
    /// Environment of the backhaul programs: quiet logs, `BACKHAUL_THREADS`.
    env: Vec<(String, String)>,
}

/// One path under test: direct TCP, the plain forwarding chain, or the stack on one transport.
struct Path {
    name: String,
    /// Where clients connect.
    addr: SocketAddr,
    /// The processes whose CPU time is counted (none for direct TCP).
    procs: Vec<(String, u32)>,
    /// MB/s of each bulk transfer kind ([`BULK`]), one entry per round.
    bulk: [Vec<f64>; 4],
    /// CPU seconds each process spent over all rounds of bulk transfers: `[user, all]`.
    cpu: Vec<[f64; 2]>,
}

/// The bulk transfers of a round: JSON key, connections (1 or `--conns`), upload or download.
const BULK: [(&str, bool, bool); 4] = [
    ("upload_1_MBps", false, true),
    ("download_1_MBps", false, false),
    ("upload_n_MBps", true, true),
    ("download_n_MBps", true, false),
];

/// The column title of a bulk transfer kind, e.g. `upload x8`.
fn bulk_label(many: bool, up: bool, conns: u64) -> String {
    let dir = if up { "upload" } else { "download" };
    format!("{dir} x{}", if many { conns } else { 1 })
}

impl Path {
    fn new(name: &str, addr: SocketAddr, procs: Vec<(String, u32)>) -> Path {
        let cpu = vec![[0.0; 2]; procs.len()];
        Path {
            name: name.to_string(),
            addr,
            procs,
            bulk: Default::default(),
            cpu,
        }
    }

    /// One round of the four bulk transfers, adding to the CPU counts.
    async fn bulk_round(&mut self, o: &Opts) {
        let before: Vec<[f64; 2]> = self.procs.iter().map(|(_, p)| cpu_seconds(*p)).collect();
        for (i, (_, many, up)) in BULK.iter().enumerate() {
            let conns = if *many { o.conns } else { 1 };
            self.bulk[i].push(bulk(self.addr, o.bytes, conns, *up).await);
        }
        for (i, (_, p)) in self.procs.iter().enumerate() {
            let now = cpu_seconds(*p);
            for k in 0..2 {
                self.cpu[i][k] += now[k] - before[i][k];
            }
        }
    }

    /// The bulk figures (medians over the rounds, and every round), then round trips and
    /// set-ups, measured now.
    async fn finish(&self, o: &Opts) -> Value {
        eprintln!("measuring round trips and set-ups over {} ...", self.name);
        let r = rtts(self.addr, o.rtts, 50).await;
        let (seq, seq_rate) = setups(self.addr, o.setups, 1).await;
        let (_, par_rate) = setups(self.addr, o.setups, 32).await;
        let moved_gib = (4 * o.rounds) as f64 * o.bytes as f64 / GIB;
        let per_gib = |k: usize| -> serde_json::Map<String, Value> {
            self.procs
                .iter()
                .zip(&self.cpu)
                .map(|((name, _), c)| (name.clone(), json!(c[k] / moved_gib)))
                .collect()
        };
        let (cpu, cpu_user) = (per_gib(1), per_gib(0));
        let mut v = json!({
            "rtt_p50_us": pct(&r, 0.5),
            "rtt_p99_us": pct(&r, 0.99),
            "rtt_p999_us": pct(&r, 0.999),
            "setup_p50_us": pct(&seq, 0.5),
            "setup_p99_us": pct(&seq, 0.99),
            "sessions_per_s_sequential": seq_rate,
            "sessions_per_s_32_parallel": par_rate,
            "cpu_s_per_gib": cpu,
            "cpu_user_s_per_gib": cpu_user,
        });
        for (i, (key, _, _)) in BULK.iter().enumerate() {
            let mut runs = self.bulk[i].clone();
            v[*key] = json!(median(&mut runs));
            v[format!("{key}_rounds")] = json!(self.bulk[i]);
        }
        v
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    pct(v, 0.5)
}

/// Holds `count` idle sessions through a stack sized for them (one frontend, agent and backend
/// per [`SESSIONS_PER_PROCESS`]) and reports every process's resident memory.
async fn idle_memory(service: SocketAddr, count: usize, o: &Opts) -> Value {
    eprintln!("holding {count} idle sessions ...");
    let quiet = &o.env;
    let n = count.div_ceil(SESSIONS_PER_PROCESS).max(1);
    // Every session comes from one address to one backend: lift the fair-share caps, keep the
    // relay's total.
    let caps = [
        s("--max-sessions-per-client"),
        s("20000"),
        s("--max-sessions-per-backend"),
        s("20000"),
    ];
    let relay = relay(&caps, quiet).await;
    let relay_url = format!("http://{}", relay.addr());
    let mut backends = Vec::new();
    let mut agents = Vec::new();
    let mut frontends = Vec::new();
    for _ in 0..n {
        let b = backend(service, quiet).await;
        let a = agent(
            &relay_url,
            "idle",
            &format!("ws://{}", b.addr()),
            &[],
            quiet,
        )
        .await;
        backends.push(b);
        agents.push(a);
        frontends.push(frontend(&relay_url, "idle", &[], quiet).await);
    }
    let roles: Vec<(&str, Vec<&Program>)> = vec![
        ("frontend", frontends.iter().collect()),
        ("relay", vec![&relay]),
        ("agent", agents.iter().collect()),
        ("backend", backends.iter().collect()),
    ];
    let rss = |procs: &[&Program]| -> f64 {
        procs
            .iter()
            .filter_map(|p| p.pid())
            .map(rss_kib)
            .sum::<f64>()
    };
    let before: Vec<f64> = roles.iter().map(|(_, p)| rss(p)).collect();
    let entries: Vec<SocketAddr> = frontends.iter().map(|f| f.addr()).collect();
    let held = open_many(&entries, count, 32, |(stream, _)| stream).await;
    let sessions = held.len();
    let after: Vec<f64> = roles.iter().map(|(_, p)| rss(p)).collect();
    let mut per_role = serde_json::Map::new();
    let mut total = 0.0;
    for (i, (name, procs)) in roles.iter().enumerate() {
        let per = (after[i] - before[i]) / sessions as f64;
        total += per;
        per_role.insert(
            name.to_string(),
            json!({"processes": procs.len(), "rss_kib_before": before[i], "rss_kib_after": after[i], "kib_per_session": per}),
        );
    }
    drop(held);
    json!({"sessions": sessions, "kib_per_session_total": total, "roles": per_role})
}

/// Sessions held open through each tunnel for [`idle_tunnels`].
const TUNNEL_IDLE_SESSIONS: usize = 2000;

/// Idle memory per session through one tunnel, three hops each: an exposed port (relay and
/// agent) and, when installed, bore and rathole, each with [`TUNNEL_IDLE_SESSIONS`] sessions
/// held open. Resident memory of the tunnel's processes, before and after.
async fn idle_tunnels(service: SocketAddr, o: &Opts) -> Value {
    let mut out = serde_json::Map::new();
    let port = free_port().expect("a free port");
    let caps = [
        s("--max-sessions-per-client"),
        s("20000"),
        s("--max-sessions-per-backend"),
        s("20000"),
        s("--expose-ports"),
        s(port),
    ];
    let relay = relay(&caps, &o.env).await;
    let url = format!("http://{}", relay.addr());
    let mut agent = agent(
        &url,
        "idle-exposed",
        &format!("tcp://{service}"),
        &[s("--expose")],
        &o.env,
    )
    .await;
    agent.wait_line("exposed backend").await;
    let pids: Vec<u32> = [&relay, &agent].iter().filter_map(|p| p.pid()).collect();
    eprintln!("holding {TUNNEL_IDLE_SESSIONS} idle sessions through an exposed port ...");
    out.insert(
        "exposed".into(),
        idle_through(([127, 0, 0, 1], port).into(), &pids).await,
    );
    drop((relay, agent));
    for peer in start_peers(service).await {
        eprintln!(
            "holding {TUNNEL_IDLE_SESSIONS} idle sessions through {} ...",
            peer.name
        );
        let pids: Vec<u32> = peer.pids().into_iter().map(|(_, p)| p).collect();
        out.insert(peer.name.into(), idle_through(peer.addr, &pids).await);
    }
    Value::Object(out)
}

/// Resident memory `pids` add per session while [`TUNNEL_IDLE_SESSIONS`] sessions to `entry`
/// are held open.
async fn idle_through(entry: SocketAddr, pids: &[u32]) -> Value {
    let rss = || pids.iter().map(|p| rss_kib(*p)).sum::<f64>();
    let before = rss();
    let held = open_many(&[entry], TUNNEL_IDLE_SESSIONS, 32, |(stream, _)| stream).await;
    let per = (rss() - before) / held.len().max(1) as f64;
    json!({"sessions": held.len(), "kib_per_session": per})
}

/// One path over an emulated WAN profile, in Mbit/s (10^6 bits) and milliseconds.
async fn wan_measure(addr: SocketAddr, profile: WanProfile, o: &Opts) -> Value {
    let bytes = ((profile.bits_per_sec as f64 / 8.0 * o.wan_secs) as u64).max(1 << 20);
    let mbit = |mb_per_s: f64| mb_per_s * 8.0;
    let up_1 = mbit(bulk(addr, bytes, 1, true).await);
    let down_1 = mbit(bulk(addr, bytes, 1, false).await);
    let up_n = mbit(bulk(addr, bytes, o.conns, true).await);
    let down_n = mbit(bulk(addr, bytes, o.conns, false).await);
    // About five seconds of round trips, at least 20.
    let count = ((5.0 / profile.rtt().as_secs_f64()) as usize).clamp(20, 500);
    let r = rtts(addr, count, 5).await;
    let (su, _) = setups(addr, 20, 1).await;
    json!({
        "bytes": bytes,
        "upload_1_mbit": up_1,
        "download_1_mbit": down_1,
        "upload_n_mbit": up_n,
        "download_n_mbit": down_n,
        "rtt_p50_ms": pct(&r, 0.5) / 1e3,
        "rtt_p99_ms": pct(&r, 0.99) / 1e3,
        "setup_p50_ms": pct(&su, 0.5) / 1e3,
        "setup_p99_ms": pct(&su, 0.99) / 1e3,
    })
}

/// Every WAN profile: plain TCP over the path (client -> path -> service) and the stack with
/// the path between agent and relay, on each transport (and long-poll through tinyproxy).
async fn wan_profiles(target: SocketAddr, o: &Opts) -> Vec<Value> {
    let mut out = Vec::new();
    for &profile in &o.wan {
        let label = profile.label();
        let mut paths = serde_json::Map::new();
        eprintln!("WAN {label}: plain TCP ...");
        let plain = WanPath::start(target, profile).await;
        paths.insert("tcp".into(), wan_measure(plain.addr, profile, o).await);
        drop(plain);
        let mut runs: Vec<(String, String, bool)> = o
            .transports
            .iter()
            .map(|t| (t.clone(), t.clone(), false))
            .collect();
        if o.transports.iter().any(|t| t == "longpoll") {
            runs.push(("longpoll+tinyproxy".into(), "longpoll".into(), true));
        }
        for (name, transport, via_proxy) in runs {
            eprintln!("WAN {label}: {name} ...");
            let proxy = if via_proxy {
                Some(ForwardProxy::start().await)
            } else {
                None
            };
            let relay = relay(&[], &o.env).await;
            let path = WanPath::start(relay.addr(), profile).await;
            let mut agent_env = o.env.clone();
            if let Some(p) = &proxy {
                agent_env.push((s("HTTP_PROXY"), p.url()));
            }
            let stack = Stack::start_with_relay(
                StackOptions {
                    target: Some(target),
                    agent_relay_url: Some(path.url()),
                    agent_args: vec![s("--transport"), transport],
                    agent_env,
                    ..Default::default()
                },
                relay,
            )
            .await;
            paths.insert(name, wan_measure(stack.entry(), profile, o).await);
        }
        out.push(json!({
            "profile": label,
            "rtt_ms": profile.rtt().as_secs_f64() * 1e3,
            "mbit": profile.bits_per_sec / 1_000_000,
            "paths": paths,
        }));
    }
    out
}

/// The loopback figures: every path's bulk rounds, round trips, set-up and CPU, then idle
/// memory.
async fn loopback(target: SocketAddr, o: &Opts) -> (serde_json::Map<String, Value>, Vec<Value>) {
    // Every path stays up for the whole run and the rounds take them in turn, so that a change
    // in the machine's speed during the run (common on shared VMs) touches all of them alike.
    let mut paths = vec![Path::new("direct", target, Vec::new())];
    let mut chain: Vec<Program> = Vec::new();
    let mut next = target;
    for _ in 0..FORWARDERS {
        let p = Program::listening("backhaul-bench", &[s("--forward"), s(next)], &[]).await;
        next = p.addr();
        chain.push(p);
    }
    paths.push(Path::new(
        "tcp-chain",
        next,
        chain
            .iter()
            .enumerate()
            .filter_map(|(i, p)| p.pid().map(|pid| (format!("fwd{}", i + 1), pid)))
            .collect(),
    ));
    let peers = start_peers(target).await;
    for peer in &peers {
        paths.push(Path::new(peer.name, peer.addr, peer.pids()));
    }
    let mut stacks = Vec::new();
    for t in &o.transports {
        let stack = Stack::start_with_env(
            StackOptions {
                target: Some(target),
                agent_args: vec![s("--transport"), t.clone()],
                ..Default::default()
            },
            &o.env,
        )
        .await;
        let procs: Vec<(String, u32)> = [
            ("frontend", &stack.frontend),
            ("relay", &stack.relay),
            ("agent", &stack.agent),
            ("backend", &stack.backend),
        ]
        .iter()
        .filter_map(|(n, p)| p.pid().map(|pid| (n.to_string(), pid)))
        .collect();
        paths.push(Path::new(t, stack.entry(), procs));
        stacks.push(stack);
    }
    // The agent reaching the service itself (`--backend tcp://`), without a backend process:
    // four hops, on the fastest transport.
    let direct_relay = relay(&[], &o.env).await;
    let url = format!("http://{}", direct_relay.addr());
    let direct_agent = agent(
        &url,
        "direct",
        &format!("tcp://{target}"),
        &[s("--transport"), s("websocket")],
        &o.env,
    )
    .await;
    let direct_frontend = frontend(&url, "direct", &[], &o.env).await;
    let procs: Vec<(String, u32)> = [
        ("frontend", &direct_frontend),
        ("relay", &direct_relay),
        ("agent", &direct_agent),
    ]
    .iter()
    .filter_map(|(n, p)| p.pid().map(|pid| (n.to_string(), pid)))
    .collect();
    paths.push(Path::new("agent-tcp", direct_frontend.addr(), procs));
    // An exposed port: client -> relay -> agent -> service, three hops like bore and rathole.
    let exposed_port = free_port().expect("a free port");
    let exposing_relay = relay(&[s("--expose-ports"), s(exposed_port)], &o.env).await;
    let url = format!("http://{}", exposing_relay.addr());
    let mut exposing_agent = agent(
        &url,
        "exposed",
        &format!("tcp://{target}"),
        &[s("--transport"), s("websocket"), s("--expose")],
        &o.env,
    )
    .await;
    exposing_agent.wait_line("exposed backend").await;
    let procs: Vec<(String, u32)> = [("relay", &exposing_relay), ("agent", &exposing_agent)]
        .iter()
        .filter_map(|(n, p)| p.pid().map(|pid| (n.to_string(), pid)))
        .collect();
    let exposed_addr: SocketAddr = ([127, 0, 0, 1], exposed_port).into();
    paths.push(Path::new("exposed", exposed_addr, procs));
    for round in 1..=o.rounds {
        for p in &mut paths {
            eprintln!(
                "round {round} of {}: bulk transfers over {} ...",
                o.rounds, p.name
            );
            p.bulk_round(o).await;
        }
    }
    let mut results = serde_json::Map::new();
    for p in &paths {
        results.insert(p.name.clone(), p.finish(o).await);
    }
    drop(stacks);
    drop((direct_relay, direct_agent, direct_frontend));
    drop((exposing_relay, exposing_agent));
    drop(peers);
    for mut p in chain {
        p.kill().await;
    }
    let mut idle = Vec::new();
    for n in &o.idle {
        idle.push(idle_memory(target, *n, o).await);
    }
    (results, idle)
}

/// A peer tunnel from crates.io measured beside the stack when installed (`cargo install
/// bore-cli rathole`): client -> server -> tunnel client -> service, the shape of backhaul's
/// exposed ports without a frontend. Its processes end with it.
struct Peer {
    name: &'static str,
    addr: SocketAddr,
    children: Vec<(&'static str, tokio::process::Child)>,
    /// Its generated configuration, removed with it.
    dir: Option<PathBuf>,
}

impl Drop for Peer {
    fn drop(&mut self) {
        for (_, c) in &mut self.children {
            let _ = c.start_kill();
        }
        if let Some(d) = &self.dir {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

impl Peer {
    fn pids(&self) -> Vec<(String, u32)> {
        self.children
            .iter()
            .filter_map(|(n, c)| c.id().map(|pid| (n.to_string(), pid)))
            .collect()
    }
}

/// Where `name` is installed: on PATH, or in cargo's bin directory.
fn find_exe(name: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Some(home) = std::env::var_os("HOME") {
        dirs.push(PathBuf::from(home).join(".cargo/bin"));
    }
    dirs.into_iter().map(|d| d.join(name)).find(|p| p.is_file())
}

fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn quiet_child(exe: &std::path::Path, args: &[&str]) -> std::io::Result<tokio::process::Child> {
    tokio::process::Command::new(exe)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
}

/// Waits until a session through `addr` echoes its first byte (the tunnel is up), for 10 s.
async fn wait_for_echo(addr: SocketAddr) -> Result<(), String> {
    let deadline = Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let attempt = async {
            let mut c = TcpStream::connect(addr).await.ok()?;
            c.write_all(b"ex").await.ok()?;
            let mut b = [0u8; 1];
            c.read_exact(&mut b).await.ok()?;
            (b[0] == b'x').then_some(())
        };
        if tokio::time::timeout(std::time::Duration::from_secs(1), attempt)
            .await
            .ok()
            .flatten()
            .is_some()
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("no echo through {addr} within 10 s"));
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// bore: `bore server` (its control port is fixed at 7835) and `bore local`.
async fn start_bore(exe: &std::path::Path, target: SocketAddr) -> Result<Peer, String> {
    let io = |e: std::io::Error| e.to_string();
    if TcpStream::connect("127.0.0.1:7835").await.is_ok() {
        return Err("port 7835, bore's fixed control port, is taken".into());
    }
    let port = free_port().map_err(io)?.to_string();
    let server =
        quiet_child(exe, &["server", "--min-port", &port, "--max-port", &port]).map_err(io)?;
    let mut peer = Peer {
        name: "bore",
        addr: SocketAddr::from(([127, 0, 0, 1], port.parse().unwrap_or(0))),
        children: vec![("server", server)],
        dir: None,
    };
    // The server must listen before the client dials it.
    let deadline = Instant::now() + std::time::Duration::from_secs(10);
    while TcpStream::connect("127.0.0.1:7835").await.is_err() {
        if Instant::now() > deadline {
            return Err("bore server did not listen on 7835 within 10 s".into());
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let local = target.port().to_string();
    let client = quiet_child(
        exe,
        &[
            "local",
            &local,
            "--local-host",
            "127.0.0.1",
            "--to",
            "127.0.0.1",
            "--port",
            &port,
        ],
    )
    .map_err(io)?;
    peer.children.push(("client", client));
    wait_for_echo(peer.addr).await?;
    Ok(peer)
}

/// rathole: a server and a client, each with a generated TOML file.
async fn start_rathole(exe: &std::path::Path, target: SocketAddr) -> Result<Peer, String> {
    let io = |e: std::io::Error| e.to_string();
    let dir = std::env::temp_dir().join(format!("backhaul-bench-rathole-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(io)?;
    let (control, public) = (free_port().map_err(io)?, free_port().map_err(io)?);
    let server = dir.join("server.toml");
    let client = dir.join("client.toml");
    std::fs::write(
        &server,
        format!("[server]\nbind_addr = \"127.0.0.1:{control}\"\n\n[server.services.bench]\ntoken = \"bench\"\nbind_addr = \"127.0.0.1:{public}\"\nnodelay = true\n"),
    )
    .map_err(io)?;
    std::fs::write(
        &client,
        format!("[client]\nremote_addr = \"127.0.0.1:{control}\"\n\n[client.services.bench]\ntoken = \"bench\"\nlocal_addr = \"{target}\"\nnodelay = true\n"),
    )
    .map_err(io)?;
    let mut peer = Peer {
        name: "rathole",
        addr: SocketAddr::from(([127, 0, 0, 1], public)),
        children: Vec::new(),
        dir: Some(dir),
    };
    let path = |p: &PathBuf| p.to_string_lossy().into_owned();
    peer.children.push((
        "server",
        quiet_child(exe, &["--server", &path(&server)]).map_err(io)?,
    ));
    peer.children.push((
        "client",
        quiet_child(exe, &["--client", &path(&client)]).map_err(io)?,
    ));
    wait_for_echo(peer.addr).await?;
    Ok(peer)
}

/// The peers that are installed and start; each one missing or failing is said on stderr.
async fn start_peers(target: SocketAddr) -> Vec<Peer> {
    let mut peers = Vec::new();
    for name in ["bore", "rathole"] {
        let Some(exe) = find_exe(name) else {
            eprintln!("backhaul-bench: {name} is not installed, so not measured (cargo install bore-cli rathole)");
            continue;
        };
        let started = match name {
            "bore" => start_bore(&exe, target).await,
            _ => start_rathole(&exe, target).await,
        };
        match started {
            Ok(p) => peers.push(p),
            Err(e) => eprintln!("backhaul-bench: {name} not measured: {e}"),
        }
    }
    peers
}

fn print_wan(wan: &[Value], conns: u64) {
    for w in wan {
        let plain = &w["paths"]["tcp"];
        let f = |p: &Value, k: &str| p[k].as_f64().unwrap_or(0.0);
        println!(
            "
WAN {} between agent and relay: Mbit/s (share of plain TCP over the same path)",
            w["profile"].as_str().unwrap_or("?")
        );
        println!(
            "{:<19} | {:>13} | {:>13} | {:>13} | {:>13} | {:>8} | {:>8} | {:>9}",
            "path",
            "up, 1",
            "down, 1",
            format!("up, {conns}"),
            format!("down, {conns}"),
            "rtt p50",
            "rtt p99",
            "setup p50"
        );
        for (name, p) in w["paths"].as_object().into_iter().flatten() {
            let cell = |k: &str| format!("{:.0} ({:.2})", f(p, k), f(p, k) / f(plain, k).max(1e-9));
            println!(
                "{:<19} | {:>13} | {:>13} | {:>13} | {:>13} | {:>8.1} | {:>8.1} | {:>9.1}",
                name,
                cell("upload_1_mbit"),
                cell("download_1_mbit"),
                cell("upload_n_mbit"),
                cell("download_n_mbit"),
                f(p, "rtt_p50_ms"),
                f(p, "rtt_p99_ms"),
                f(p, "setup_p50_ms")
            );
        }
    }
}

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn parse<T: std::str::FromStr>(args: &[String], name: &str, default: T) -> T {
    match arg(args, name) {
        None => default,
        Some(v) => v.parse().unwrap_or_else(|_| {
            eprintln!("backhaul-bench: {name} {v:?} is not valid\n\n{USAGE}");
            std::process::exit(64)
        }),
    }
}

fn machine() -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    json!({
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "cpu_model": cpu,
        "kernel": kernel.trim(),
    })
}

fn print_tables(v: &Value) {
    let paths = v["paths"].as_object().cloned().unwrap_or_default();
    let direct = &v["paths"]["direct"];
    let f = |p: &Value, k: &str| p[k].as_f64().unwrap_or(0.0);
    let ratio = |p: &Value, k: &str| {
        let d = f(direct, k);
        if d > 0.0 {
            f(p, k) / d
        } else {
            0.0
        }
    };
    let conns = v["options"]["conns"].as_u64().unwrap_or(8);
    println!(
        "\nthroughput, MB/s (ratio to direct TCP), {} GiB per direction, median of {} rounds",
        v["options"]["gib"], v["options"]["rounds"]
    );
    // A row of cells, one per bulk transfer kind in BULK's order.
    let row = |name: &str, cell: &dyn Fn(&str, bool, bool) -> String| {
        let cells: Vec<String> = BULK
            .iter()
            .map(|(k, many, up)| format!("{:>16}", cell(k, *many, *up)))
            .collect();
        println!("{name:<10} | {}", cells.join(" | "));
    };
    row("path", &|_, many, up| bulk_label(many, up, conns));
    for (name, p) in &paths {
        row(name, &|k, _, _| {
            format!("{:.0} ({:.2}x)", f(p, k), ratio(p, k))
        });
    }
    let chain = &v["paths"]["tcp-chain"];
    if chain.is_object() {
        println!(
            "\nthroughput as a share of plain TCP through four forwarders (the same five hops)"
        );
        for (name, p) in paths
            .iter()
            .filter(|(n, _)| *n != "direct" && *n != "tcp-chain")
        {
            row(name, &|k, _, _| {
                format!("{:.2}x", f(p, k) / f(chain, k).max(1e-9))
            });
        }
    }
    println!("\nround trips of 64 bytes (µs) and session set-up");
    println!(
        "{:<10} | {:>8} | {:>8} | {:>8} | {:>10} | {:>10} | {:>9} | {:>11}",
        "path", "rtt p50", "rtt p99", "p99.9", "setup p50", "setup p99", "seq /s", "32-par /s"
    );
    for (name, p) in &paths {
        println!(
            "{name:<10} | {:>8.0} | {:>8.0} | {:>8.0} | {:>10.0} | {:>10.0} | {:>9.0} | {:>11.0}",
            f(p, "rtt_p50_us"),
            f(p, "rtt_p99_us"),
            f(p, "rtt_p999_us"),
            f(p, "setup_p50_us"),
            f(p, "setup_p99_us"),
            f(p, "sessions_per_s_sequential"),
            f(p, "sessions_per_s_32_parallel")
        );
    }
    println!("\nCPU seconds per GiB carried (of which in user space)");
    for (name, p) in &paths {
        if let Some(cpu) = p["cpu_s_per_gib"].as_object() {
            let cells: Vec<String> = cpu
                .iter()
                .map(|(k, v)| {
                    let user = p["cpu_user_s_per_gib"][k].as_f64().unwrap_or(0.0);
                    format!("{k} {:.2} ({user:.2})", v.as_f64().unwrap_or(0.0))
                })
                .collect();
            println!("{name:<10} | {}", cells.join(" | "));
        }
    }
    if let Some(idle) = v["idle"].as_array() {
        println!("\nidle sessions: resident memory added per session (KiB)");
        for i in idle {
            let r = &i["roles"];
            let per = |role: &str| r[role]["kib_per_session"].as_f64().unwrap_or(0.0);
            println!(
                "{:>6} sessions | frontend {:.1} | relay {:.1} | agent {:.1} | backend {:.1} | all four {:.1}",
                i["sessions"],
                per("frontend"),
                per("relay"),
                per("agent"),
                per("backend"),
                i["kib_per_session_total"].as_f64().unwrap_or(0.0)
            );
        }
    }
    if let Some(t) = v["idle_tunnels"].as_object() {
        let cells: Vec<String> = t
            .iter()
            .map(|(name, x)| format!("{name} {:.1}", x["kib_per_session"].as_f64().unwrap_or(0.0)))
            .collect();
        println!(
            "\nidle sessions through one tunnel, {TUNNEL_IDLE_SESSIONS} held (KiB per session)\n{}",
            cells.join(" | ")
        );
    }
}

/// Draws the throughput ratios, round trips and idle memory of a result file as one SVG.
fn chart(v: &Value) -> String {
    let paths: Vec<(String, Value)> = v["paths"]
        .as_object()
        .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
        .unwrap_or_default();
    let colors = [
        "#888888", "#1f77b4", "#2ca02c", "#ff7f0e", "#9467bd", "#d62728", "#8c564b", "#17becf",
    ];
    let conns = v["options"]["conns"].as_u64().unwrap_or(8);
    let metrics: Vec<(&str, String)> = BULK
        .iter()
        .map(|(k, many, up)| (*k, bulk_label(*many, *up, conns)))
        .collect();
    let (w, bar_h, gap) = (760.0, 12.0, 10.0);
    let label_w = 110.0;
    let plot_w = w - label_w - 90.0;
    let mut out = String::new();
    let mut y = 40.0;
    let mut body = String::new();
    let max_tp = paths
        .iter()
        .flat_map(|(_, p)| {
            metrics
                .iter()
                .map(move |(k, _)| p[*k].as_f64().unwrap_or(0.0))
        })
        .fold(1.0, f64::max);
    body.push_str(&format!(
        "<text x=\"10\" y=\"{y}\" font-weight=\"bold\">Throughput, MB/s (ratio to direct TCP)</text>\n"
    ));
    y += 12.0;
    for (k, title) in &metrics {
        y += gap;
        body.push_str(&format!(
            "<text x=\"10\" y=\"{}\">{title}</text>\n",
            y + bar_h * paths.len() as f64 / 2.0 + 4.0
        ));
        let direct = v["paths"]["direct"][*k].as_f64().unwrap_or(0.0);
        for (i, (_, p)) in paths.iter().enumerate() {
            let val = p[*k].as_f64().unwrap_or(0.0);
            let bw = plot_w * val / max_tp;
            let ratio = if direct > 0.0 { val / direct } else { 0.0 };
            body.push_str(&format!(
                "<rect x=\"{label_w}\" y=\"{y}\" width=\"{bw:.1}\" height=\"{}\" fill=\"{}\"/>\n<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"10\">{val:.0} ({ratio:.2}x)</text>\n",
                bar_h - 2.0,
                colors[i % colors.len()],
                label_w + bw + 4.0,
                y + bar_h - 3.0
            ));
            y += bar_h;
        }
    }
    y += 30.0;
    body.push_str(&format!(
        "<text x=\"10\" y=\"{y}\" font-weight=\"bold\">64-byte round trip, p50 and p99 (µs)</text>\n"
    ));
    y += 12.0;
    let max_rtt = paths
        .iter()
        .map(|(_, p)| p["rtt_p99_us"].as_f64().unwrap_or(0.0))
        .fold(1.0, f64::max);
    for (i, (name, p)) in paths.iter().enumerate() {
        y += 4.0;
        let p50 = p["rtt_p50_us"].as_f64().unwrap_or(0.0);
        let p99 = p["rtt_p99_us"].as_f64().unwrap_or(0.0);
        body.push_str(&format!(
            "<text x=\"10\" y=\"{:.1}\">{name}</text>\n<rect x=\"{label_w}\" y=\"{y}\" width=\"{:.1}\" height=\"{}\" fill=\"{}\" opacity=\"0.35\"/>\n<rect x=\"{label_w}\" y=\"{y}\" width=\"{:.1}\" height=\"{}\" fill=\"{}\"/>\n<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"10\">{p50:.0} / {p99:.0}</text>\n",
            y + bar_h - 2.0,
            plot_w * p99 / max_rtt,
            bar_h,
            colors[i % colors.len()],
            plot_w * p50 / max_rtt,
            bar_h,
            colors[i % colors.len()],
            label_w + plot_w * p99 / max_rtt + 4.0,
            y + bar_h - 2.0
        ));
        y += bar_h;
    }
    if let Some(idle) = v["idle"].as_array() {
        y += 30.0;
        body.push_str(&format!(
            "<text x=\"10\" y=\"{y}\" font-weight=\"bold\">Resident memory per idle session, KiB (four programs stacked)</text>\n"
        ));
        y += 12.0;
        let roles = ["frontend", "relay", "agent", "backend"];
        let max_mem = idle
            .iter()
            .map(|i| i["kib_per_session_total"].as_f64().unwrap_or(0.0))
            .fold(46.0, f64::max);
        let idle_top = y;
        for i in idle {
            y += 4.0;
            body.push_str(&format!(
                "<text x=\"10\" y=\"{:.1}\">{} sessions</text>\n",
                y + bar_h - 2.0,
                i["sessions"]
            ));
            let mut x = label_w;
            for (j, role) in roles.iter().enumerate() {
                let kib = i["roles"][*role]["kib_per_session"]
                    .as_f64()
                    .unwrap_or(0.0)
                    .max(0.0);
                let bw = plot_w * kib / max_mem;
                body.push_str(&format!(
                    "<rect x=\"{x:.1}\" y=\"{y}\" width=\"{bw:.1}\" height=\"{bar_h}\" fill=\"{}\"><title>{role}: {kib:.1} KiB</title></rect>\n",
                    colors[(j + 1) % colors.len()]
                ));
                x += bw;
            }
            body.push_str(&format!(
                "<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"10\">{:.1}</text>\n",
                x + 4.0,
                y + bar_h - 2.0,
                i["kib_per_session_total"].as_f64().unwrap_or(0.0)
            ));
            y += bar_h;
        }
        let idle_bottom = y + 4.0;
        y += 16.0;
        let mut x = label_w;
        for (j, role) in roles.iter().enumerate() {
            body.push_str(&format!(
                "<rect x=\"{x}\" y=\"{y}\" width=\"10\" height=\"10\" fill=\"{}\"/><text x=\"{}\" y=\"{}\" font-size=\"10\">{role}</text>\n",
                colors[(j + 1) % colors.len()],
                x + 14.0,
                y + 9.0
            ));
            x += 90.0;
        }
        let line_x = label_w + plot_w * 40.0 / max_mem;
        body.push_str(&format!(
            "<line x1=\"{line_x:.1}\" x2=\"{line_x:.1}\" y1=\"{idle_top:.1}\" y2=\"{idle_bottom:.1}\" stroke=\"red\" stroke-dasharray=\"3,3\"/><text x=\"{:.1}\" y=\"{:.1}\" font-size=\"10\" fill=\"red\">40 KiB floor</text>\n",
            line_x + 3.0,
            idle_top + 2.0
        ));
    }
    y += 20.0;
    let mut legend = String::new();
    let mut x = label_w;
    for (i, (name, _)) in paths.iter().enumerate() {
        legend.push_str(&format!(
            "<rect x=\"{x}\" y=\"16\" width=\"10\" height=\"10\" fill=\"{}\"/><text x=\"{}\" y=\"25\" font-size=\"11\">{name}</text>\n",
            colors[i % colors.len()],
            x + 14.0
        ));
        x += 110.0;
    }
    out.push_str(&format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{y}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n{legend}{body}</svg>\n"
    ));
    out
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("{USAGE}");
        return;
    }
    if args.iter().any(|a| a == "--serve") {
        serve().await;
        return;
    }
    if let Some(next) = arg(&args, "--forward") {
        let next = next.parse().unwrap_or_else(|_| {
            eprintln!("backhaul-bench: --forward {next:?} is not an address");
            std::process::exit(64)
        });
        forward(next).await;
        return;
    }
    if let Some(i) = args.iter().position(|a| a == "--chart") {
        let (Some(input), Some(output)) = (args.get(i + 1), args.get(i + 2)) else {
            eprintln!("backhaul-bench: --chart needs a JSON input and an SVG output\n\n{USAGE}");
            std::process::exit(64);
        };
        let text = std::fs::read_to_string(input).unwrap_or_else(|e| {
            eprintln!("backhaul-bench: cannot read {input}: {e}");
            std::process::exit(66)
        });
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| {
            eprintln!("backhaul-bench: {input} is not a result file: {e}");
            std::process::exit(65)
        });
        std::fs::write(output, chart(&v)).expect("write SVG");
        return;
    }
    let gib: f64 = parse(&args, "--gib", 1.0);
    let list = |name: &str, default: &str| -> Vec<String> {
        arg(&args, name)
            .unwrap_or_else(|| default.to_string())
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect()
    };
    let o = Opts {
        bytes: (gib * GIB) as u64,
        rounds: parse(&args, "--rounds", 3usize).max(1),
        conns: parse(&args, "--conns", 8usize).max(1),
        rtts: parse(&args, "--rtts", 5000usize).max(1),
        setups: parse(&args, "--setups", 1000usize).max(32),
        idle: list("--idle", "1000,10000")
            .iter()
            .map(|v| {
                v.parse().unwrap_or_else(|_| {
                    eprintln!("backhaul-bench: --idle {v:?} is not a number");
                    std::process::exit(64)
                })
            })
            .collect(),
        transports: list("--transports", "websocket,http2,longpoll"),
        wan: list("--wan", "20:500,50:200,100:100,300:20")
            .iter()
            .filter(|v| *v != "none")
            .map(|v| {
                WanProfile::parse(v).unwrap_or_else(|| {
                    eprintln!("backhaul-bench: --wan {v:?} is not RTT_MS:MBIT");
                    std::process::exit(64)
                })
            })
            .collect(),
        wan_secs: parse(&args, "--wan-secs", 3.0f64).max(0.1),
        env: vec![
            (s("RUST_LOG"), s("warn")),
            (s("BACKHAUL_THREADS"), s(parse(&args, "--threads", 0usize))),
        ],
    };

    let mut service = Program::listening("backhaul-bench", &[s("--serve")], &[]).await;
    let target = service.addr();
    let wan_only = args.iter().any(|a| a == "--wan-only");
    let (results, idle) = if wan_only {
        (serde_json::Map::new(), Vec::new())
    } else {
        loopback(target, &o).await
    };
    let idle_tunnels = if wan_only || o.idle.is_empty() {
        Value::Null
    } else {
        idle_tunnels(target, &o).await
    };
    let wan = wan_profiles(target, &o).await;
    let result = json!({
        "command": args.join(" "),
        "date": std::process::Command::new("date").arg("-u").arg("+%Y-%m-%dT%H:%MZ").output().ok().map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string()),
        "machine": machine(),
        "options": {"gib": gib, "rounds": o.rounds, "conns": o.conns, "rtts": o.rtts, "setups": o.setups, "threads": o.env[1].1},
        "paths": results,
        "idle": idle,
        "idle_tunnels": idle_tunnels,
        "wan": wan,
    });
    if !wan_only {
        print_tables(&result);
    }
    print_wan(&wan, o.conns as u64);
    if let Some(p) = arg(&args, "--json") {
        let text = serde_json::to_string_pretty(&result).expect("JSON");
        std::fs::write(&p, text + "\n").expect("write JSON");
        println!("\nresults written to {p}");
    }
    service.kill().await;
}
