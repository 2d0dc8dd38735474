//! What the adversarial tests (tests/tests/trust.rs) attack the relay with, and what they measure
//! it by: raw HTTP/1.1 requests written byte by byte (so nothing on the client side fixes up a
//! forged one), connections from other loopback addresses (Linux answers on all of 127/8), a
//! forwarder that makes a program's connections come from such an address, how long a
//! connection takes to be closed, resident memory from `/proc`, and round-trip statistics.

use crate::STEP_TIMEOUT;
use sha2::{Digest, Sha256};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::time::Instant;

/// A second client machine, as far as the relay can tell.
pub const OTHER_CLIENT: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
/// A third one, for agents that must stay apart from the attacking address.
pub const AGENT_HOST: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3));

/// `sha256:<hex>` of a secret, as a credentials file holds it (computed here, not by the relay).
pub fn secret_hash(secret: &str) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(secret.as_bytes())))
}

/// Writes `text` to `path` whole: a reader never sees half a file (write, then rename).
pub fn write_file(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).expect("write scratch file");
    std::fs::rename(&tmp, path).expect("rename scratch file");
}

/// Connects to `addr` from the local address `from`.
pub async fn connect_from(from: IpAddr, addr: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(from, 0))?;
    socket.connect(addr).await
}

/// A TCP forwarder on 127.0.0.1:0 whose connections to `target` come from `from`: a program
/// pointed at it (an agent) reaches `target` as a client at that address would.
pub async fn forward_from(from: IpAddr, target: SocketAddr) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind forwarder");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = l.accept().await {
            tokio::spawn(async move {
                let Ok(mut outbound) = connect_from(from, target).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
            });
        }
    });
    addr
}

/// An HTTP response as it arrived.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub head: String,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).to_string()
    }
}

/// One HTTP/1.1 request on a fresh connection (`Connection: close`), from `from` if given,
/// written as bytes; the whole response is read to the end of the stream.
pub async fn http(
    from: Option<IpAddr>,
    addr: SocketAddr,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Reply {
    let mut stream = match from {
        Some(ip) => connect_from(ip, addr).await,
        None => TcpStream::connect(addr).await,
    }
    .expect("connect for an HTTP request");
    let mut req = format!("{method} {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (n, v) in headers {
        req.push_str(&format!("{n}: {v}\r\n"));
    }
    if !body.is_empty() || method == "POST" {
        req.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    req.push_str("\r\n");
    let mut bytes = req.into_bytes();
    bytes.extend_from_slice(body);
    stream.write_all(&bytes).await.expect("send request");
    let mut all = Vec::new();
    tokio::time::timeout(STEP_TIMEOUT, stream.read_to_end(&mut all))
        .await
        .unwrap_or_else(|_| {
            panic!("no complete answer to {method} {target} within {STEP_TIMEOUT:?}")
        })
        .expect("read the answer");
    let end = all
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| {
            panic!(
                "{method} {target}: not an HTTP response: {:?}",
                String::from_utf8_lossy(&all)
            )
        });
    let head = String::from_utf8_lossy(&all[..end]).to_string();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"));
    let raw = &all[end + 4..];
    let chunked = head
        .lines()
        .any(|l| l.to_ascii_lowercase().starts_with("transfer-encoding:") && l.contains("chunked"));
    let body = if chunked { dechunk(raw) } else { raw.to_vec() };
    Reply { status, head, body }
}

/// The data of a chunked body.
fn dechunk(mut raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(eol) = raw.windows(2).position(|w| w == b"\r\n") else {
            panic!(
                "a chunked body cut short: {:?}",
                String::from_utf8_lossy(raw)
            );
        };
        let size = std::str::from_utf8(&raw[..eol])
            .ok()
            .and_then(|l| usize::from_str_radix(l.split(';').next()?.trim(), 16).ok())
            .unwrap_or_else(|| panic!("bad chunk size line {:?}", &raw[..eol]));
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&raw[eol + 2..eol + 2 + size]);
        raw = &raw[eol + 2 + size + 2..];
    }
}

/// How long after `since` the peer closed `stream` (end of stream or reset), reading and
/// discarding anything it sends; `None` if it was still open after `limit`.
pub async fn closed_after(
    stream: &mut TcpStream,
    since: Instant,
    limit: Duration,
) -> Option<Duration> {
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(since + limit, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return Some(since.elapsed()),
            Ok(Ok(_)) => continue,
            Err(_) => return None,
        }
    }
}

/// Whether the peer has not closed `stream` (checked without waiting).
pub fn still_open(stream: &TcpStream) -> bool {
    let mut buf = [0u8; 1];
    matches!(stream.try_read(&mut buf), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

/// Resident memory of a process, from `/proc/<pid>/status`, in KiB: now (VmRSS) and its peak
/// over the process's life (VmHWM).
#[derive(Debug, Clone, Copy, Default)]
pub struct Memory {
    pub rss_kib: u64,
    pub hwm_kib: u64,
}

impl Memory {
    pub fn of(pid: u32) -> Memory {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap_or_else(|e| panic!("cannot read /proc/{pid}/status: {e}"));
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
        };
        Memory {
            rss_kib: field("VmRSS:"),
            hwm_kib: field("VmHWM:"),
        }
    }

    pub fn rss_mib(&self) -> f64 {
        self.rss_kib as f64 / 1024.0
    }

    pub fn hwm_mib(&self) -> f64 {
        self.hwm_kib as f64 / 1024.0
    }
}

/// Samples the resident memory of some processes every 20 ms until stopped; keeps the largest.
pub struct MemorySampler {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Vec<u64>>,
}

impl MemorySampler {
    pub fn start(pids: Vec<u32>) -> MemorySampler {
        let (stop, mut stopped) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            let mut peak = vec![0u64; pids.len()];
            let mut tick = tokio::time::interval(Duration::from_millis(20));
            loop {
                for (p, pid) in peak.iter_mut().zip(&pids) {
                    *p = (*p).max(Memory::of(*pid).rss_kib);
                }
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = &mut stopped => return peak,
                }
            }
        });
        MemorySampler { stop, task }
    }

    /// The largest VmRSS seen for each process, in KiB, in the order given.
    pub async fn finish(self) -> Vec<u64> {
        let _ = self.stop.send(());
        self.task.await.expect("sampler")
    }
}

/// Round-trip times.
pub struct Latencies(pub Vec<Duration>);

impl Latencies {
    pub fn p50(&self) -> Duration {
        let mut v = self.0.clone();
        v.sort();
        v[v.len() / 2]
    }

    pub fn max(&self) -> Duration {
        self.0.iter().copied().max().unwrap_or_default()
    }

    pub fn summary(&self) -> String {
        format!(
            "p50 {:.2} ms, max {:.2} ms over {}",
            self.p50().as_secs_f64() * 1e3,
            self.max().as_secs_f64() * 1e3,
            self.0.len()
        )
    }
}

/// A TLS client trusting only `ca`, offering no ALPN: it completes a handshake and nothing more.
pub fn tls_connector(ca: &Path) -> tokio_rustls::TlsConnector {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).expect("read the CA") {
        roots
            .add(cert.expect("a CA certificate"))
            .expect("add the CA");
    }
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("TLS versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
}

/// How many times `needle` occurs in a program's log, waiting until it is at least `n`.
pub async fn wait_stderr_count(p: &crate::Program, needle: &str, n: usize) -> String {
    let deadline = Instant::now() + crate::READY_TIMEOUT;
    loop {
        let log = p.stderr();
        if log.matches(needle).count() >= n {
            return log;
        }
        assert!(
            Instant::now() < deadline,
            "{} did not log {needle:?} {n} times within {:?}; stderr:\n{log}",
            p.name,
            crate::READY_TIMEOUT
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
