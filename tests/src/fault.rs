//! A TCP proxy that cuts every connection (with a reset) after a pseudo-random byte budget, to
//! stand for proxies and networks that break HTTP exchanges half-way; or, in stalling mode, goes
//! silent there and holds the connection open, like a NAT or proxy that lost its state.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub struct FaultInjector {
    pub addr: SocketAddr,
    cuts: Arc<AtomicU64>,
    connections: Arc<AtomicU64>,
}

impl FaultInjector {
    /// Forwards to `upstream`, cutting each connection after between `min` and `max` bytes
    /// (both directions counted together).
    pub async fn start(upstream: SocketAddr, min: u64, max: u64) -> FaultInjector {
        Self::start_with(upstream, min, max, false).await
    }

    /// Like [`FaultInjector::start`], but instead of cutting a connection it stops forwarding
    /// and keeps both sides open without a word: only the peers' own timeouts end it.
    pub async fn start_stalling(upstream: SocketAddr, min: u64, max: u64) -> FaultInjector {
        Self::start_with(upstream, min, max, true).await
    }

    async fn start_with(upstream: SocketAddr, min: u64, max: u64, stall: bool) -> FaultInjector {
        let l = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind injector");
        let addr = l.local_addr().expect("addr");
        let cuts = Arc::new(AtomicU64::new(0));
        let connections = Arc::new(AtomicU64::new(0));
        let (c, n) = (cuts.clone(), connections.clone());
        tokio::spawn(async move {
            let mut seed = 0x1234_5678_9abc_def1u64;
            while let Ok((client, _)) = l.accept().await {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                let budget = min + seed % (max - min + 1);
                n.fetch_add(1, Ordering::Relaxed);
                let c = c.clone();
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let Some((client, server)) = relay_with_budget(client, server, budget).await
                    else {
                        return;
                    };
                    c.fetch_add(1, Ordering::Relaxed);
                    if stall {
                        let _held = (client, server);
                        return std::future::pending::<()>().await;
                    }
                    // Dropped with linger 0: both peers see a reset, as when a proxy kills a
                    // connection. (The deprecation warns that a non-zero linger blocks on drop;
                    // zero does not.)
                    #[allow(deprecated)]
                    let _ = client.set_linger(Some(std::time::Duration::ZERO));
                    #[allow(deprecated)]
                    let _ = server.set_linger(Some(std::time::Duration::ZERO));
                });
            }
        });
        FaultInjector {
            addr,
            cuts,
            connections,
        }
    }

    /// Connections cut so far.
    pub fn cuts(&self) -> u64 {
        self.cuts.load(Ordering::Relaxed)
    }

    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::Relaxed)
    }
}

/// Copies both ways until `budget` bytes have passed, and then hands both sockets back; `None`
/// if the connection ended first.
async fn relay_with_budget(
    mut client: TcpStream,
    mut server: TcpStream,
    budget: u64,
) -> Option<(TcpStream, TcpStream)> {
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let left = AtomicU64::new(budget);
    let cut = {
        let (mut cr, mut cw) = client.split();
        let (mut sr, mut sw) = server.split();
        let up = pump(&mut cr, &mut sw, &left);
        let down = pump(&mut sr, &mut cw, &left);
        tokio::pin!(up);
        tokio::pin!(down);
        let (mut up_res, mut down_res) = (None, None);
        loop {
            tokio::select! {
                r = &mut up, if up_res.is_none() => up_res = Some(r),
                r = &mut down, if down_res.is_none() => down_res = Some(r),
            }
            if up_res == Some(true) || down_res == Some(true) {
                break true;
            }
            if up_res.is_some() && down_res.is_some() {
                break false;
            }
        }
    };
    cut.then_some((client, server))
}

/// Copies `r` to `w` while the shared budget lasts. True when the budget ran out.
async fn pump<R, W>(r: &mut R, w: &mut W, left: &AtomicU64) -> bool
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => {
                let _ = w.shutdown().await;
                return false;
            }
            Ok(n) => n,
        };
        let mut cur = left.load(Ordering::Relaxed);
        let take = loop {
            let take = cur.min(n as u64);
            match left.compare_exchange(cur, cur - take, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => break take as usize,
                Err(now) => cur = now,
            }
        };
        if take > 0 && w.write_all(&buf[..take]).await.is_err() {
            return false;
        }
        if take < n {
            return true;
        }
    }
}
