//! A read buffer that exists only while data flows.
//!
//! Every open session has a socket in each of the four programs, so a read buffer held for the
//! life of a connection makes idle sessions expensive, and a small one makes bulk transfers cost a
//! system call per few KiB. [`LazyRead`] reads up to [`LAZY_READ_CHUNK`] bytes per system call
//! into a buffer it allocates on demand and frees as soon as it is drained: an idle session holds
//! no read buffer at all. The TCP side of a bridge takes chunks from it ([`LazyRead::read_chunk`]);
//! a session's WebSocket reader decodes frames in its buffer ([`LazyRead::fill`]).

use bytes::{Bytes, BytesMut};
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::AsyncRead;

/// Bytes read from the socket per system call while data flows.
pub const LAZY_READ_CHUNK: usize = 256 * 1024;

/// See the module documentation.
#[derive(Debug)]
pub struct LazyRead<S> {
    inner: S,
    buf: BytesMut,
}

impl<S> LazyRead<S> {
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            buf: BytesMut::new(),
        }
    }

    /// The bytes read and not yet taken, for a reader that parses them in place.
    pub fn buffer(&mut self) -> &mut BytesMut {
        &mut self.buf
    }
}

impl<S: AsyncRead + Unpin> LazyRead<S> {
    /// One read of up to `size` more bytes into the buffer. Whenever the buffer is empty after
    /// it (the socket had nothing, an error, or the end of the stream), no buffer is held.
    fn poll_fill(&mut self, cx: &mut Context<'_>, size: usize) -> Poll<io::Result<usize>> {
        self.buf.reserve(size);
        let r = tokio_util::io::poll_read_buf(Pin::new(&mut self.inner), cx, &mut self.buf);
        if self.buf.is_empty() {
            self.buf = BytesMut::new();
        }
        r
    }

    /// Reads more bytes onto the end of [`LazyRead::buffer`]; 0 at the end of the stream.
    /// Cancel-safe: bytes read stay in the buffer.
    pub async fn fill(&mut self) -> io::Result<usize> {
        std::future::poll_fn(|cx| self.poll_fill(cx, LAZY_READ_CHUNK)).await
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn hands_out_everything_in_small_reads_and_frees_when_idle() {
        let (mut a, b) = tokio::io::duplex(256 * 1024);
        let mut r = LazyRead::new(b);
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        a.write_all(&data).await.unwrap();
        drop(a);
        let mut got = Vec::new();
        loop {
            let c = r.read_chunk(1000).await.unwrap();
            if c.is_empty() {
                break;
            }
            got.extend_from_slice(&c);
        }
        assert_eq!(got, data);
        assert_eq!(r.buf.capacity(), 0, "the drained buffer must be freed");
    }

    #[tokio::test]
    async fn fill_appends_to_what_is_left_and_frees_only_an_empty_buffer() {
        let (mut a, b) = tokio::io::duplex(1024);
        let mut r = LazyRead::new(b);
        a.write_all(b"ab").await.unwrap();
        assert_eq!(r.fill().await.unwrap(), 2);
        a.write_all(b"cd").await.unwrap();
        drop(a);
        assert_eq!(r.fill().await.unwrap(), 2);
        assert_eq!(
            &r.buffer()[..],
            b"abcd",
            "a fill must keep the unparsed bytes"
        );
        r.buffer().clear();
        assert_eq!(r.fill().await.unwrap(), 0);
        assert_eq!(r.buf.capacity(), 0, "an empty buffer must be freed");
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
