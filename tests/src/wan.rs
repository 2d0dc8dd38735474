//! An emulated wide-area path: a TCP forwarder that delays every byte by a one-way latency and
//! caps each direction's bandwidth, so that tests and the benchmark see the round trips and the
//! bandwidth-delay product that agents behind WAN links and proxies see. No root, no kernel
//! module (netem is not available here): the delay line is in user space.
//!
//! Each direction is one bottleneck link shared by every connection through the path: bytes are
//! serialised at `bits_per_sec` one after the other, then arrive `one_way` later. The line holds at most [`WanProfile::queue_bytes`]
//! (twice the bandwidth-delay product, at least 1 MiB); when it is full the forwarder stops
//! reading, so the sender feels back-pressure as it would from a full router queue, and a plain
//! TCP connection can fill the path.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, Semaphore};
use tokio::time::Instant;

/// Largest piece read at once; also the granularity of the serialisation schedule.
const PIECE: usize = 64 * 1024;

/// A path's shape, the same in both directions.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WanProfile {
    /// One-way delay; the round trip is twice this.
    pub one_way: Duration,
    /// Bandwidth cap of each direction, in bits per second.
    pub bits_per_sec: u64,
}

impl WanProfile {
    pub fn new(rtt_ms: u64, mbit_per_sec: u64) -> Self {
        Self {
            one_way: Duration::from_micros(rtt_ms * 500),
            bits_per_sec: mbit_per_sec * 1_000_000,
        }
    }

    pub fn rtt(&self) -> Duration {
        self.one_way * 2
    }

    /// Bytes in flight when the path is full: bandwidth times round trip.
    pub fn bdp_bytes(&self) -> usize {
        (self.bits_per_sec as f64 / 8.0 * self.rtt().as_secs_f64()) as usize
    }

    /// What one direction's delay line holds before it stops reading.
    pub fn queue_bytes(&self) -> usize {
        (2 * self.bdp_bytes()).max(1 << 20)
    }

    /// How long `bytes` take to serialise at the cap.
    fn serialisation(&self, bytes: usize) -> Duration {
        Duration::from_secs_f64(bytes as f64 * 8.0 / self.bits_per_sec as f64)
    }

    /// "50ms/200Mbit" style label.
    pub fn label(&self) -> String {
        format!(
            "{}ms/{}Mbit",
            self.rtt().as_millis(),
            self.bits_per_sec / 1_000_000
        )
    }

    /// Parses `RTT_MS:MBIT` (as the benchmark's `--wan` takes it).
    pub fn parse(s: &str) -> Option<Self> {
        let (rtt, mbit) = s.split_once(':')?;
        let rtt = rtt.trim_end_matches("ms").parse().ok()?;
        let mbit: u64 = mbit.trim_end_matches("mbit").parse().ok()?;
        (mbit > 0).then(|| Self::new(rtt, mbit))
    }
}

/// A running emulated path in front of `upstream`: connect to `addr` instead.
pub struct WanPath {
    pub addr: SocketAddr,
    pub profile: WanProfile,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for WanPath {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl WanPath {
    pub async fn start(upstream: SocketAddr, profile: WanProfile) -> WanPath {
        let l = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind WAN path");
        let addr = l.local_addr().expect("addr");
        // When each direction's bottleneck finishes sending what it has been given so far.
        let up = Arc::new(std::sync::Mutex::new(Instant::now()));
        let down = Arc::new(std::sync::Mutex::new(Instant::now()));
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = l.accept().await {
                let (up, down) = (up.clone(), down.clone());
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    tokio::join!(line(cr, sw, profile, up), line(sr, cw, profile, down));
                });
            }
        });
        WanPath {
            addr,
            profile,
            task,
        }
    }

    /// `http://<addr>` for use as a relay URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// What a delay line holds: pieces with the instant they arrive at the far end.
struct Line {
    pieces: std::sync::Mutex<VecDeque<(Instant, Vec<u8>)>>,
    /// Bytes the line can still take.
    room: Semaphore,
    /// Wakes the writer when a piece is queued or the reader ends.
    queued: Notify,
}

/// Carries one direction: reads from `r` as the line has room, writes each piece to `w` when it
/// arrives. End of stream is carried in order, after the last piece.
async fn line(
    mut r: tokio::net::tcp::OwnedReadHalf,
    mut w: tokio::net::tcp::OwnedWriteHalf,
    profile: WanProfile,
    bottleneck: Arc<std::sync::Mutex<Instant>>,
) {
    let line = Arc::new(Line {
        pieces: std::sync::Mutex::new(VecDeque::new()),
        room: Semaphore::new(profile.queue_bytes()),
        queued: Notify::new(),
    });
    let reader = {
        let line = line.clone();
        async move {
            let mut last_arrival = Instant::now();
            let mut buf = vec![0u8; PIECE];
            loop {
                let Ok(permit) = line.room.acquire_many(PIECE as u32).await else {
                    break;
                };
                let n = match r.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                // Keep only the room the piece takes.
                permit.forget();
                line.room.add_permits(PIECE - n);
                let sent = {
                    let mut busy_until = lock(&bottleneck);
                    *busy_until = (*busy_until).max(Instant::now()) + profile.serialisation(n);
                    *busy_until
                };
                let arrive = sent + profile.one_way;
                last_arrival = arrive;
                lock(&line.pieces).push_back((arrive, buf[..n].to_vec()));
                line.queued.notify_one();
            }
            // End of stream: an empty piece, after everything read.
            let arrive = last_arrival.max(Instant::now() + profile.one_way);
            lock(&line.pieces).push_back((arrive, Vec::new()));
            line.queued.notify_one();
        }
    };
    let writer = async move {
        loop {
            let next = lock(&line.pieces).front().map(|(t, _)| *t);
            let Some(arrive) = next else {
                line.queued.notified().await;
                continue;
            };
            tokio::time::sleep_until(arrive).await;
            let Some((_, piece)) = lock(&line.pieces).pop_front() else {
                continue;
            };
            if piece.is_empty() {
                let _ = w.shutdown().await;
                return;
            }
            if w.write_all(&piece).await.is_err() {
                line.room.close();
                return;
            }
            line.room.add_permits(piece.len());
        }
    };
    tokio::join!(reader, writer);
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
