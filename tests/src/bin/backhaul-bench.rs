//! Measures the stack next to direct TCP, in the same run, on loopback:
//! bulk throughput each way over one connection, round-trip time of 64-byte messages, and the
//! CPU time each backhaul process spends per GiB carried.
//!
//! Run with: `cargo build --release --workspace --bins && target/release/backhaul-bench`
//! (options: `--gib N` per direction, `--rtts N`, `--json PATH`). Benchmarks measure; nothing here
//! is asserted, and CI does not run it.

use backhaul_tests::{Program, Stack, StackOptions};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const CHUNK: usize = 256 * 1024;

/// A service with three modes chosen by the client's first byte: `u` (upload: count bytes until
/// EOF, answer with the count), `d` (download: send the 8-byte-announced count, then close) and
/// `e` (echo).
async fn bench_service() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let mut mode = [0u8; 1];
                if s.read_exact(&mut mode).await.is_err() {
                    return;
                }
                let mut buf = vec![0u8; CHUNK];
                match mode[0] {
                    b'u' => {
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
                        let (mut r, mut w) = s.into_split();
                        let _ = tokio::io::copy(&mut r, &mut w).await;
                    }
                }
            });
        }
    });
    addr
}

async fn upload(addr: SocketAddr, bytes: u64) -> f64 {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let _ = s.set_nodelay(true);
    let buf = vec![0x5au8; CHUNK];
    let start = Instant::now();
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
    start.elapsed().as_secs_f64()
}

async fn download(addr: SocketAddr, bytes: u64) -> f64 {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let _ = s.set_nodelay(true);
    let mut buf = vec![0u8; CHUNK];
    let start = Instant::now();
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
    start.elapsed().as_secs_f64()
}

/// Round trips of 64-byte messages; returns sorted durations in microseconds.
async fn rtts(addr: SocketAddr, count: usize) -> Vec<f64> {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let _ = s.set_nodelay(true);
    s.write_all(b"e").await.expect("write");
    let msg = [7u8; 64];
    let mut back = [0u8; 64];
    // Warm up the path (connection set-up, first session frames).
    for _ in 0..50 {
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

/// Opens `count` connections one after another, each timed from connect to its first echoed
/// byte; returns sorted durations in microseconds and the sessions per second achieved.
async fn setups(addr: SocketAddr, count: usize) -> (Vec<f64>, f64) {
    let start = Instant::now();
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        let t = Instant::now();
        let mut s = TcpStream::connect(addr).await.expect("connect");
        let _ = s.set_nodelay(true);
        s.write_all(b"e!").await.expect("write");
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await.expect("first echoed byte");
        out.push(t.elapsed().as_secs_f64() * 1e6);
    }
    let rate = count as f64 / start.elapsed().as_secs_f64();
    out.sort_by(|a, b| a.total_cmp(b));
    (out, rate)
}

/// Opens `count` sessions and keeps them open and idle (each proven live by one echo).
async fn idle_sessions(addr: SocketAddr, count: usize) -> Vec<TcpStream> {
    let mut open = Vec::with_capacity(count);
    for _ in 0..count {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(b"e!").await.expect("write");
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await.expect("echo");
        open.push(s);
    }
    open
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// utime + stime of a process, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // Fields after the command: state is 0, utime is 11, stime is 12.
    (ticks(11) + ticks(12)) / 100.0
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

#[tokio::main]
async fn main() {
    let gib: f64 = arg("--gib").and_then(|v| v.parse().ok()).unwrap_or(1.0);
    let count: usize = arg("--rtts").and_then(|v| v.parse().ok()).unwrap_or(5000);
    let json_path = arg("--json");
    let idle: usize = arg("--idle").and_then(|v| v.parse().ok()).unwrap_or(1000);
    let setup_count: usize = arg("--setups").and_then(|v| v.parse().ok()).unwrap_or(500);
    let bytes = (gib * (1u64 << 30) as f64) as u64;

    let service = bench_service().await;
    let quiet = vec![("RUST_LOG".to_string(), "warn".to_string())];
    let stack = Stack::start_with_env(
        StackOptions {
            target: Some(service),
            ..Default::default()
        },
        &quiet,
    )
    .await;
    let procs: Vec<&Program> = vec![&stack.frontend, &stack.relay, &stack.agent, &stack.backend];
    let pids: Vec<u32> = procs.iter().filter_map(|p| p.pid()).collect();
    let entry = stack.entry();

    let mut rows = Vec::new();
    let mut setup_rows = Vec::new();
    let mut json = serde_like::Obj::default();
    for (label, addr) in [("direct TCP", service), ("backhaul", entry)] {
        let cpu0: Vec<f64> = pids.iter().map(|p| cpu_seconds(*p)).collect();
        let up = upload(addr, bytes).await;
        let down = download(addr, bytes).await;
        let cpu1: Vec<f64> = pids.iter().map(|p| cpu_seconds(*p)).collect();
        let r = rtts(addr, count).await;
        let up_mb = bytes as f64 / up / 1e6;
        let down_mb = bytes as f64 / down / 1e6;
        let (p50, p99, p999) = (pct(&r, 0.5), pct(&r, 0.99), pct(&r, 0.999));
        rows.push(format!(
            "{label:<11} | {up_mb:>9.0} MB/s | {down_mb:>9.0} MB/s | {p50:>7.1} us | {p99:>7.1} us | {p999:>7.1} us"
        ));
        let (setup, rate) = setups(addr, setup_count).await;
        let (s50, s99) = (pct(&setup, 0.5), pct(&setup, 0.99));
        setup_rows.push(format!(
            "{label:<11} | {s50:>9.0} us | {s99:>9.0} us | {rate:>8.0} /s"
        ));
        let mut o = serde_like::Obj::default();
        o.num("setup_p50_us", s50);
        o.num("setup_p99_us", s99);
        o.num("sessions_per_s_sequential", rate);
        o.num("upload_MBps", up_mb);
        o.num("download_MBps", down_mb);
        o.num("rtt_p50_us", p50);
        o.num("rtt_p99_us", p99);
        o.num("rtt_p999_us", p999);
        if label == "backhaul" {
            let gib_moved = 2.0 * bytes as f64 / (1u64 << 30) as f64;
            for (i, name) in ["frontend", "relay", "agent", "backend"].iter().enumerate() {
                o.num(
                    &format!("cpu_s_per_gib_{name}"),
                    (cpu1[i] - cpu0[i]) / gib_moved,
                );
                o.num(&format!("rss_kib_{name}"), rss_kib(pids[i]) as f64);
            }
        }
        json.obj(label, o);
    }
    println!("\n{gib} GiB each way over one connection, {count} round trips of 64 bytes, loopback, {} CPUs", std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0));
    println!("path        |    upload      |   download     |  rtt p50   |  rtt p99   | rtt p99.9");
    for r in &rows {
        println!("{r}");
    }
    println!(
        "\nconnection set-up (connect to first echoed byte), {setup_count} sequential connections"
    );
    println!("path        |   set-up p50 |   set-up p99 |  sessions");
    for r in &setup_rows {
        println!("{r}");
    }

    // Idle sessions: resident memory of each process before and after opening them.
    let names = ["frontend", "relay", "agent", "backend"];
    let before: Vec<u64> = pids.iter().map(|p| rss_kib(*p)).collect();
    let held = idle_sessions(entry, idle).await;
    let after: Vec<u64> = pids.iter().map(|p| rss_kib(*p)).collect();
    let mut idle_obj = serde_like::Obj::default();
    let mut total = 0.0;
    println!("\n{idle} idle sessions held open: resident memory");
    for (i, name) in names.iter().enumerate() {
        let per = (after[i] as f64 - before[i] as f64) / idle as f64;
        total += per;
        println!(
            "{name:<9} {:>8} KiB -> {:>8} KiB  ({per:.1} KiB per session)",
            before[i], after[i]
        );
        idle_obj.num(&format!("rss_kib_{name}"), after[i] as f64);
        idle_obj.num(&format!("kib_per_session_{name}"), per);
    }
    println!("all four: {total:.1} KiB per session");
    idle_obj.num("kib_per_session_total", total);
    idle_obj.num("sessions", idle as f64);
    json.obj("idle_sessions", idle_obj);
    drop(held);

    println!("\nJSON: {}", json.render());
    if let Some(p) = json_path {
        std::fs::write(&p, json.render() + "\n").expect("write JSON");
    }
    drop(procs);
    drop(stack);
    tokio::time::sleep(Duration::from_millis(50)).await;
}

/// A tiny JSON writer, so the benchmark needs no serde derive in this crate.
mod serde_like {
    #[derive(Default)]
    pub struct Obj(Vec<(String, String)>);
    impl Obj {
        pub fn num(&mut self, k: &str, v: f64) {
            self.0.push((k.to_string(), format!("{:.3}", v)));
        }
        pub fn obj(&mut self, k: &str, o: Obj) {
            self.0.push((k.to_string(), o.render()));
        }
        pub fn render(&self) -> String {
            let body: Vec<String> = self
                .0
                .iter()
                .map(|(k, v)| format!("\"{k}\": {v}"))
                .collect();
            format!("{{{}}}", body.join(", "))
        }
    }
}
