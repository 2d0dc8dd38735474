//! The link over a stream: a WebSocket, or an HTTP/2 request and response whose bodies stay
//! open. One task half reads the relay's batches and hands their frames on, the other sends
//! ours, each frame once, without waiting for acks; after a break the next stream resumes from
//! the acks (see `common::reliable::StreamCursor`).

use crate::body;
use crate::link::{describe, link_gone, lock, Link, RelayStream, Spell, LINK_GONE};
use crate::longpoll::MIN_PUSH_BATCH;
use crate::metrics::metrics;
use crate::transport::{Ended, Transport};
use backhaul_common::dial::{bearer_headers, dial, DialOptions, Dialed};
use backhaul_common::reliable::{RecvState, StreamCursor};
use backhaul_common::transport::{
    recv_within, write_batches, BatchRx, BatchTx, ChannelTx, ChunkRx, ChunkSource,
};
use backhaul_common::wire::{BatchHeader, BatchReader};
use backhaul_common::ws::Role;
use bytes::Bytes;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{ReadHalf, WriteHalf};
use tokio::sync::oneshot;
use tokio::time::Instant;
use tokio_util::task::TaskTracker;

impl Link {
    /// Opens a stream on `transport` and carries the link over it until it breaks.
    pub(crate) async fn stream(
        self: &Arc<Self>,
        transport: Transport,
        recv: &mut RecvState,
        tracker: &TaskTracker,
        note: &str,
    ) -> Spell {
        let ack = recv.ack();
        let spell = async {
            match transport {
                Transport::WebSocket => match self.connect_ws(ack).await {
                    Ok((tx, rx)) => self.drive(transport, tx, rx, recv, tracker, note).await,
                    Err(spell) => spell,
                },
                Transport::Http2 | Transport::LongPoll => match self.connect_h2(ack).await {
                    Ok((tx, rx)) => self.drive(transport, tx, rx, recv, tracker, note).await,
                    Err(spell) => spell,
                },
            }
        };
        tokio::select! {
            spell = spell => spell,
            _ = self.done.cancelled() => Spell::Shutdown,
        }
    }

    fn stream_url(&self, scheme_for_ws: bool, what: &str, ack: u64) -> String {
        let batch = self.down_batch.load(Ordering::Relaxed);
        let mut url = format!("{}/{what}?ack={ack}&batch={batch}", self.url);
        if scheme_for_ws {
            if let Some(rest) = url.strip_prefix("http") {
                url = format!("ws{rest}");
            }
        }
        url
    }

    async fn connect_ws(
        &self,
        ack: u64,
    ) -> Result<
        (
            backhaul_common::transport::WsTx<WriteHalf<RelayStream>>,
            backhaul_common::transport::WsRx<ReadHalf<RelayStream>>,
        ),
        Spell,
    > {
        let url = self.stream_url(true, "ws", ack);
        let url =
            url::Url::parse(&url).map_err(|e| Spell::refused(format!("bad URL {url}: {e}")))?;
        let opts = DialOptions {
            timeout: self.setup_limit(),
            tls: self.cfg.tls.clone(),
            use_env_proxy: true,
            headers: bearer_headers(self.cfg.agent_token.as_ref()),
            ..DialOptions::default()
        };
        match dial(&url, &opts).await {
            Ok(Dialed { io, .. }) => Ok(backhaul_common::transport::ws_halves(
                io,
                Role::Client,
                self.info.max_batch_bytes as usize,
            )),
            Err(backhaul_common::dial::DialError::Http { status: 404, .. }) => {
                Err(Spell::LinkGone(LINK_GONE.into()))
            }
            Err(e) => Err(Spell::refused(e.to_string())),
        }
    }

    async fn connect_h2(&self, ack: u64) -> Result<(ChannelTx, ChunkRx<ResponseChunks>), Spell> {
        let (tx, chunks) = ChannelTx::new();
        let body = futures_util::StreamExt::map(chunks, Ok::<_, std::io::Error>);
        let req = self.request(
            self.client_h2
                .post(self.stream_url(false, "stream", ack))
                .header(
                    reqwest::header::CONTENT_TYPE,
                    backhaul_common::api::BATCH_STREAM_CONTENT_TYPE,
                )
                .body(reqwest::Body::wrap_stream(body)),
        );
        let limit = self.setup_limit();
        let resp = match tokio::time::timeout(limit, req.send()).await {
            Err(_) => return Err(Spell::refused(format!("no answer within {limit:?}"))),
            Ok(Err(e)) => return Err(Spell::refused(describe(&e))),
            Ok(Ok(r)) => r,
        };
        if link_gone(&resp) {
            return Err(Spell::LinkGone(LINK_GONE.into()));
        }
        if !resp.status().is_success() {
            let status = resp.status();
            let body = body::error_text(resp).await;
            return Err(Spell::refused(format!("relay answered {status}: {body}")));
        }
        let max_batch = self.info.max_batch_bytes as usize;
        Ok((tx, ChunkRx::new(ResponseChunks(resp), max_batch)))
    }

    /// Carries the link over an open stream: one task half reads the relay's batches and hands
    /// their frames on, the other sends ours, each frame once, until the stream breaks.
    async fn drive<T: BatchTx, R: BatchRx>(
        self: &Arc<Self>,
        transport: Transport,
        mut tx: T,
        mut rx: R,
        recv: &mut RecvState,
        tracker: &TaskTracker,
        note: &str,
    ) -> Spell {
        let started = Instant::now();
        self.announce_transport(transport, note);
        let mut progressed = false;
        let hold = Duration::from_millis(self.info.poll_hold_ms);
        let (start_tx, start_rx) = oneshot::channel::<u64>();
        let reader = async {
            let mut start_tx = Some(start_tx);
            loop {
                let batch = recv_within(&mut rx, hold + self.grace(), "relay").await?;
                let header = match self.absorb(batch, recv, tracker) {
                    Ok(h) => h,
                    Err(why) => return Ok(Spell::LinkGone(why)),
                };
                if let Some(start) = start_tx.take() {
                    // The relay's first batch says where its receiving stands: resume from there.
                    let _ = start.send(header.ack);
                    progressed = true;
                }
                if header.first_seq < recv.ack() {
                    let max = self.info.max_batch_bytes as usize;
                    let _ =
                        self.down_batch
                            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                                Some((b * 2).min(max))
                            });
                }
                self.down_ack.store(recv.ack(), Ordering::Release);
                self.out_notify.notify_one();
            }
        };
        let writer = async {
            let Ok(from) = start_rx.await else {
                return std::future::pending::<String>().await;
            };
            let mut cursor = StreamCursor::new(
                from,
                self.up_batch.load(Ordering::Relaxed),
                self.info.max_batch_bytes as usize,
            );
            let woken = || self.out_notify.notified();
            write_batches(&mut tx, hold, false, woken, |force| {
                let ack = self.down_ack.load(Ordering::Acquire);
                let mut out = lock(&self.out);
                let next = cursor.next_batch(&mut out, ack, force);
                metrics().frames_resent.inc_by(out.take_resent());
                drop(out);
                self.up_batch.store(cursor.limit(), Ordering::Relaxed);
                Ok(next)
            })
            .await
        };
        let why = tokio::select! {
            r = reader => match r {
                Ok(spell) => return spell,
                Err(why) => why,
            },
            why = writer => why,
        };
        for batch in [&self.up_batch, &self.down_batch] {
            let _ = batch.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                Some((b / 2).max(MIN_PUSH_BATCH))
            });
        }
        Spell::Ended(Ended::Broken {
            why,
            lasted: started.elapsed(),
            progressed,
        })
    }

    /// Takes in one whole batch from a stream. `Err` when the relay broke the protocol.
    fn absorb(
        self: &Arc<Self>,
        batch: Bytes,
        recv: &mut RecvState,
        tracker: &TaskTracker,
    ) -> Result<BatchHeader, String> {
        let mut reader = BatchReader::from_message(batch);
        let header = match reader.header() {
            Ok(Some(h)) => h,
            Ok(None) => return Err("relay sent a batch without a header".into()),
            Err(e) => return Err(format!("relay sent a bad batch: {e}")),
        };
        lock(&self.out)
            .ack(header.ack)
            .map_err(|e| format!("relay sent a bad ack: {e}"))?;
        self.take_frames(&mut reader, recv, tracker)?;
        reader
            .finish()
            .map_err(|e| format!("relay sent a bad batch: {e}"))
    }
}

/// A streaming response body as a source of chunks for [`ChunkRx`].
struct ResponseChunks(reqwest::Response);

impl ChunkSource for ResponseChunks {
    async fn chunk(&mut self) -> Result<Option<Bytes>, String> {
        self.0.chunk().await.map_err(|e| describe(&e))
    }
}
