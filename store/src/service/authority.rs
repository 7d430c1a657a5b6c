//! Accepts Go etcd clients that send a URL as the HTTP/2 `:authority`.
//!
//! clientv3 3.4 dials single endpoints (for `Status`, i.e. `etcdctl endpoint status`) with the
//! target `passthrough:///http://host:port`, so its requests carry `:authority:
//! http://host:port`. The h2 crate rejects that as a malformed header (stream reset with
//! PROTOCOL_ERROR); etcd's Go server ignores the authority. This shim sits between each client
//! TCP connection and tonic and rewrites every literal `:authority` value in the client's
//! header blocks to a fixed valid one. Indexed references stay consistent: the server's HPACK
//! table holds the rewritten entries, which are never larger than the originals, so it evicts
//! no earlier than the client's encoder assumes.
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::server::{Connected, TcpConnectInfo};

const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// HTTP/2's minimum (and default) SETTINGS_MAX_FRAME_SIZE.
const MAX_FRAME: usize = 16_384;
/// A header block larger than this is refused (tonic limits headers far below it anyway).
const MAX_BLOCK: usize = 1 << 20;
/// Replacement authority; tonic does not route on it.
const AUTHORITY: &[u8] = b"etcd";
/// Bytes read from the socket at a time.
const READ_CHUNK: usize = 64 * 1024;

/// Accepts client connections and hands each to tonic wrapped in an [`AuthorityShim`], or, if
/// the client speaks HTTP/1 (`/health`, `/metrics`, `/version`), to a task running `http1`.
pub(crate) fn incoming<F, Fut>(
    listener: TcpListener,
    cancel: CancellationToken,
    tracker: &TaskTracker,
    http1: F,
) -> tokio_stream::wrappers::ReceiverStream<io::Result<AuthorityShim<TcpStream>>>
where
    F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(64);
    let conns = tracker.clone();
    let http1 = std::sync::Arc::new(http1);
    tracker.spawn(async move {
        loop {
            let conn = tokio::select! {
                _ = cancel.cancelled() => return,
                c = listener.accept() => c,
            };
            let (tcp, _) = match conn {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!(error = %e, "accept failed");
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            // Told apart off the accept loop: a client that connects and stays silent must
            // not hold up the next one.
            let (tx, http1, cancel) = (tx.clone(), http1.clone(), cancel.clone());
            conns.spawn(async move {
                let is_http1 = tokio::select! {
                    _ = cancel.cancelled() => return,
                    h = super::http::is_http1(&tcp) => h,
                };
                if is_http1 {
                    http1(tcp).await;
                } else {
                    let _ = tx.send(Ok(AuthorityShim::new(tcp))).await;
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// A client connection as tonic reads it: header blocks rewritten on the way in, everything
/// else passed through; writes go straight to the socket. A poll-level adapter rather than a
/// proxy task and an in-memory pipe, so a request costs no extra task wake-ups or copies
/// through a pipe.
pub(crate) struct AuthorityShim<S> {
    inner: S,
    /// Bytes read from the client and not yet looked at.
    raw: BytesMut,
    /// Bytes ready for tonic.
    out: BytesMut,
    preface_seen: bool,
    /// Not HTTP/2 with prior knowledge: bytes pass untouched and the server answers.
    passthrough: bool,
    /// A header block being gathered from HEADERS and CONTINUATION frames.
    block: Option<Block>,
    eof: bool,
}

struct Block {
    stream: u32,
    end_stream: u8,
    prio: Option<[u8; 5]>,
    fields: Vec<u8>,
}

impl<S> AuthorityShim<S> {
    pub(crate) fn new(inner: S) -> Self {
        Self {
            inner,
            raw: BytesMut::with_capacity(READ_CHUNK),
            out: BytesMut::new(),
            preface_seen: false,
            passthrough: false,
            block: None,
            eof: false,
        }
    }

    /// Moves every whole frame in `raw` to `out`, rewriting header blocks.
    fn process(&mut self) -> io::Result<()> {
        if !self.preface_seen {
            if self.raw.len() < PREFACE.len() {
                if self.eof || !PREFACE.starts_with(&self.raw) {
                    self.passthrough = true;
                    self.preface_seen = true;
                }
                if !self.passthrough {
                    return Ok(());
                }
            } else {
                self.preface_seen = true;
                self.passthrough = &self.raw[..PREFACE.len()] != PREFACE;
                if !self.passthrough {
                    self.out
                        .extend_from_slice(&self.raw.split_to(PREFACE.len()));
                }
            }
        }
        if self.passthrough {
            self.out.extend_from_slice(&self.raw.split());
            return Ok(());
        }
        while self.raw.len() >= 9 {
            let len = (usize::from(self.raw[0]) << 16)
                | (usize::from(self.raw[1]) << 8)
                | usize::from(self.raw[2]);
            if self.raw.len() < 9 + len {
                break;
            }
            let ty = self.raw[3];
            let flags = self.raw[4];
            let stream = u32::from_be_bytes([self.raw[5], self.raw[6], self.raw[7], self.raw[8]])
                & 0x7fff_ffff;
            let starts_block = ty == HEADERS && self.block.is_none();
            if !(starts_block || (ty == CONTINUATION && self.block.is_some())) {
                self.out.extend_from_slice(&self.raw.split_to(9 + len));
                continue;
            }
            self.raw.advance(9);
            let payload = self.raw.split_to(len);
            if starts_block {
                let mut data: &[u8] = &payload;
                if flags & PADDED != 0 {
                    let pad = usize::from(*data.first().ok_or_else(bad)?);
                    data = data
                        .get(1..data.len().checked_sub(pad).ok_or_else(bad)?)
                        .ok_or_else(bad)?;
                }
                let mut prio = None;
                if flags & PRIORITY != 0 {
                    let p: [u8; 5] = data
                        .get(..5)
                        .ok_or_else(bad)?
                        .try_into()
                        .map_err(|_| bad())?;
                    prio = Some(p);
                    data = &data[5..];
                }
                self.block = Some(Block {
                    stream,
                    end_stream: flags & END_STREAM,
                    prio,
                    fields: data.to_vec(),
                });
            } else if let Some(b) = &mut self.block {
                b.fields.extend_from_slice(&payload);
            }
            let Some(b) = &self.block else {
                continue;
            };
            if b.fields.len() > MAX_BLOCK {
                return Err(bad());
            }
            if flags & END_HEADERS == 0 {
                continue;
            }
            if let Some(b) = self.block.take() {
                let rewritten = rewrite_block(&b.fields).unwrap_or(b.fields);
                put_headers(&mut self.out, b.stream, b.end_stream, b.prio, &rewritten);
            }
        }
        Ok(())
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for AuthorityShim<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if !this.out.is_empty() {
                let n = this.out.len().min(buf.remaining());
                buf.put_slice(&this.out.split_to(n));
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                // A frame cut off by the client's close goes on as it is; tonic reports it.
                this.out.extend_from_slice(&this.raw.split());
                if this.out.is_empty() {
                    return Poll::Ready(Ok(()));
                }
                continue;
            }
            this.raw.reserve(READ_CHUNK);
            let n = ready!(tokio_util::io::poll_read_buf(
                Pin::new(&mut this.inner),
                cx,
                &mut this.raw
            ))?;
            if n == 0 {
                this.eof = true;
            }
            this.process()?;
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for AuthorityShim<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl Connected for AuthorityShim<TcpStream> {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

fn bad() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, "malformed HTTP/2 frame")
}

/// Appends a header block as a HEADERS frame and as many CONTINUATION frames as it needs.
fn put_headers(
    out: &mut BytesMut,
    stream: u32,
    end_stream: u8,
    prio: Option<[u8; 5]>,
    block: &[u8],
) {
    let prio_len = if prio.is_some() { 5 } else { 0 };
    let first_len = block.len().min(MAX_FRAME - prio_len);
    let (first, mut rest) = block.split_at(first_len);
    let mut flags = end_stream | if prio.is_some() { PRIORITY } else { 0 };
    if rest.is_empty() {
        flags |= END_HEADERS;
    }
    out.extend_from_slice(&frame_head(first_len + prio_len, HEADERS, flags, stream));
    if let Some(p) = prio {
        out.extend_from_slice(&p);
    }
    out.extend_from_slice(first);
    while !rest.is_empty() {
        let n = rest.len().min(MAX_FRAME);
        let (chunk, r) = rest.split_at(n);
        rest = r;
        let f = if rest.is_empty() { END_HEADERS } else { 0 };
        out.extend_from_slice(&frame_head(n, CONTINUATION, f, stream));
        out.extend_from_slice(chunk);
    }
}

fn frame_head(len: usize, ty: u8, flags: u8, stream: u32) -> [u8; 9] {
    let s = stream.to_be_bytes();
    [
        (len >> 16) as u8,
        (len >> 8) as u8,
        len as u8,
        ty,
        flags,
        s[0],
        s[1],
        s[2],
        s[3],
    ]
}

/// HPACK integer with an `n`-bit prefix at `i`; returns (value, next index).
fn hpack_int(b: &[u8], i: usize, n: u32) -> Option<(u64, usize)> {
    let mask = (1u64 << n) - 1;
    let mut v = u64::from(*b.get(i)?) & mask;
    let mut k = i + 1;
    if v < mask {
        return Some((v, k));
    }
    let mut m = 0u32;
    loop {
        let byte = *b.get(k)?;
        k += 1;
        v = v.checked_add((u64::from(byte) & 0x7f).checked_shl(m)?)?;
        m += 7;
        if byte & 0x80 == 0 {
            return Some((v, k));
        }
        if m > 56 {
            return None;
        }
    }
}

/// HPACK string at `i`; returns (huffman, bytes range, next index).
fn hpack_str(b: &[u8], i: usize) -> Option<(bool, std::ops::Range<usize>, usize)> {
    let huffman = *b.get(i)? & 0x80 != 0;
    let (len, start) = hpack_int(b, i, 7)?;
    let end = start.checked_add(usize::try_from(len).ok()?)?;
    if end > b.len() {
        return None;
    }
    Some((huffman, start..end, end))
}

/// Rewrites the value of every literal `:authority` field; `None` if the block does not parse.
pub(crate) fn rewrite_block(b: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(b.len() + 16);
    let mut i = 0;
    while i < b.len() {
        let first = b[i];
        let prefix = if first & 0x80 != 0 {
            let (_, n) = hpack_int(b, i, 7)?; // indexed field
            out.extend_from_slice(&b[i..n]);
            i = n;
            continue;
        } else if first & 0xc0 == 0x40 {
            6 // literal with incremental indexing
        } else if first & 0xe0 == 0x20 {
            let (_, n) = hpack_int(b, i, 5)?; // dynamic table size update
            out.extend_from_slice(&b[i..n]);
            i = n;
            continue;
        } else {
            4 // literal without / never indexed
        };
        let (name_idx, mut j) = hpack_int(b, i, prefix)?;
        let mut is_authority = name_idx == 1;
        if name_idx == 0 {
            let (huff, range, next) = hpack_str(b, j)?;
            is_authority = !huff && &b[range] == b":authority";
            j = next;
        }
        let (_, _, end) = hpack_str(b, j)?;
        if is_authority {
            out.extend_from_slice(&b[i..j]);
            out.push(AUTHORITY.len() as u8);
            out.extend_from_slice(AUTHORITY);
        } else {
            out.extend_from_slice(&b[i..end]);
        }
        i = end;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rewrites_literal_authority_and_keeps_other_fields() {
        // :method GET (indexed 2), :authority literal-incremental with raw value, then a
        // literal-without-indexing custom header with a literal name.
        let mut block = vec![0x82, 0x41, 22];
        block.extend_from_slice(b"http://127.0.0.1:33781");
        block.extend_from_slice(&[0x00, 3]);
        block.extend_from_slice(b"x-a");
        block.extend_from_slice(&[1, b'v']);
        let out = rewrite_block(&block).unwrap();
        let mut want = vec![0x82, 0x41, 4];
        want.extend_from_slice(b"etcd");
        want.extend_from_slice(&[0x00, 3]);
        want.extend_from_slice(b"x-a");
        want.extend_from_slice(&[1, b'v']);
        assert_eq!(out, want);
        assert!(rewrite_block(&[0x41, 30, b'x']).is_none());
    }

    #[tokio::test]
    async fn the_shim_rewrites_header_blocks_split_across_reads_and_passes_other_frames() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut block = vec![0x82, 0x41, 22];
        block.extend_from_slice(b"http://127.0.0.1:33781");
        let mut input = PREFACE.to_vec();
        input.extend_from_slice(&frame_head(0, 0x4, 0, 0)); // SETTINGS
        // HEADERS without END_HEADERS, then a CONTINUATION that ends the block.
        input.extend_from_slice(&frame_head(3, HEADERS, END_STREAM, 1));
        input.extend_from_slice(&block[..3]);
        input.extend_from_slice(&frame_head(block.len() - 3, CONTINUATION, END_HEADERS, 1));
        input.extend_from_slice(&block[3..]);
        input.extend_from_slice(&frame_head(2, 0x0, 0, 1)); // DATA
        input.extend_from_slice(b"hi");

        let mut want = PREFACE.to_vec();
        want.extend_from_slice(&frame_head(0, 0x4, 0, 0));
        let rewritten = [0x82, 0x41, 4, b'e', b't', b'c', b'd'];
        want.extend_from_slice(&frame_head(
            rewritten.len(),
            HEADERS,
            END_STREAM | END_HEADERS,
            1,
        ));
        want.extend_from_slice(&rewritten);
        want.extend_from_slice(&frame_head(2, 0x0, 0, 1));
        want.extend_from_slice(b"hi");

        let (mut client, server) = tokio::io::duplex(1024);
        let mut shim = AuthorityShim::new(server);
        let writer = tokio::spawn(async move {
            // Byte by byte: every frame boundary falls between reads somewhere.
            for b in input {
                client.write_all(&[b]).await.unwrap();
            }
            client
        });
        let mut got = vec![0u8; want.len()];
        shim.read_exact(&mut got).await.unwrap();
        assert_eq!(got, want);
        // Writes reach the peer untouched.
        shim.write_all(b"answer").await.unwrap();
        let mut client = writer.await.unwrap();
        let mut back = [0u8; 6];
        client.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"answer");
    }

    #[tokio::test]
    async fn a_client_that_is_not_http2_passes_through() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut client, server) = tokio::io::duplex(1024);
        let mut shim = AuthorityShim::new(server);
        client.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        drop(client);
        let mut got = Vec::new();
        shim.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"GET / HTTP/1.1\r\n\r\n");
    }

    #[test]
    fn multi_byte_integers() {
        assert_eq!(hpack_int(&[0x1f, 0x9a, 0x0a], 0, 5), Some((1337, 3)));
        assert_eq!(hpack_int(&[0x0a], 0, 5), Some((10, 1)));
    }
}
