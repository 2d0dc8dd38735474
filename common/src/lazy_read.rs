//! A read buffer that exists only while data flows.
//!
//! tungstenite reads from its stream at most `read_buffer_size` bytes per call and keeps a buffer
//! of that size for the life of the connection. Every open session holds such a buffer in each of
//! the four programs, so a large one makes idle sessions expensive and a small one makes bulk
//! transfers cost a system call per few KiB. [`LazyRead`] sits between the socket and tungstenite
//! (which keeps a small buffer): it reads up to [`LAZY_READ_CHUNK`] bytes per system call into a
//! buffer it allocates on demand, hands them out in whatever pieces the reader asks for, and frees
//! the buffer as soon as it is drained. An idle session holds no read buffer at all.

use bytes::{Buf, Bytes, BytesMut};
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Bytes read from the socket per system call while data flows.
pub const LAZY_READ_CHUNK: usize = 256 * 1024;

/// See the module documentation. Writes pass straight through.
#[derive(Debug)]
pub struct LazyRead<S> {
    inner: S,
    buf: BytesMut,
    /// Reads asking for at least this much go straight to the socket.
    direct_from: usize,
}

impl<S> LazyRead<S> {
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            buf: BytesMut::new(),
            direct_from: LAZY_READ_CHUNK,
        }
    }

    /// Every read goes straight to the socket, into the reader's own buffer: for a connection
    /// whose reader keeps a large buffer anyway (an agent link), where copying through ours would
    /// only cost time.
    pub fn direct(inner: S) -> Self {
        Self {
            direct_from: 0,
            ..Self::new(inner)
        }
    }
}

impl<S: AsyncRead + Unpin> LazyRead<S> {
    /// Refills the empty buffer with one read of up to `size` bytes. While the socket has nothing,
    /// and after an error or the end of the stream, no buffer is held.
    fn poll_fill(&mut self, cx: &mut Context<'_>, size: usize) -> Poll<io::Result<()>> {
        self.buf.reserve(size);
        let r = tokio_util::io::poll_read_buf(Pin::new(&mut self.inner), cx, &mut self.buf);
        if !matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.buf = BytesMut::new();
        }
        r.map_ok(|_| ())
    }

    /// The next chunk of at most `max` bytes, without copying; empty at the end of the stream.
    /// While it waits, no buffer is held.
    pub async fn read_chunk(&mut self, max: usize) -> io::Result<Bytes> {
        std::future::poll_fn(|cx| {
            if self.buf.is_empty() {
                std::task::ready!(self.poll_fill(cx, max))?;
            }
            let n = self.buf.len().min(max);
            Poll::Ready(Ok(self.buf.split_to(n).freeze()))
        })
        .await
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for LazyRead<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.buf.is_empty() {
            if out.remaining() >= this.direct_from {
                return Pin::new(&mut this.inner).poll_read(cx, out);
            }
            std::task::ready!(this.poll_fill(cx, LAZY_READ_CHUNK))?;
        }
        let n = this.buf.len().min(out.remaining());
        out.put_slice(&this.buf[..n]);
        this.buf.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for LazyRead<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, data)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn hands_out_everything_in_small_reads_and_frees_when_idle() {
        let (mut a, b) = tokio::io::duplex(256 * 1024);
        let mut r = LazyRead::new(b);
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        a.write_all(&data).await.unwrap();
        drop(a);
        let mut got = Vec::new();
        let mut small = [0u8; 1000];
        loop {
            let n = r.read(&mut small).await.unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&small[..n]);
        }
        assert_eq!(got, data);
        assert_eq!(r.buf.capacity(), 0, "the drained buffer must be freed");
    }

    #[tokio::test]
    async fn chunks_carry_everything_then_end() {
        let (mut a, b) = tokio::io::duplex(256 * 1024);
        let mut r = LazyRead::new(b);
        let data: Vec<u8> = (0..150_000u32).map(|i| (i % 253) as u8).collect();
        a.write_all(&data).await.unwrap();
        drop(a);
        let mut got = Vec::new();
        loop {
            let c = r.read_chunk(10_000).await.unwrap();
            if c.is_empty() {
                break;
            }
            assert!(c.len() <= 10_000);
            got.extend_from_slice(&c);
        }
        assert_eq!(got, data);
    }
}
