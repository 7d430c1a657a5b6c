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

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

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

/// Accepts client connections and hands tonic one rewritten in-memory stream per connection.
pub(crate) fn incoming(
    listener: TcpListener,
    cancel: CancellationToken,
    tracker: &TaskTracker,
) -> tokio_stream::wrappers::ReceiverStream<io::Result<DuplexStream>> {
    let (tx, rx) = mpsc::channel(64);
    let t = tracker.clone();
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
            let (server_side, proxy_side) = tokio::io::duplex(256 * 1024);
            t.spawn(pump(tcp, proxy_side, cancel.clone()));
            if tx.send(Ok(server_side)).await.is_err() {
                return;
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

async fn pump(tcp: TcpStream, proxy: DuplexStream, cancel: CancellationToken) {
    let _ = tcp.set_nodelay(true);
    let (tcp_r, mut tcp_w) = tcp.into_split();
    let (px_r, px_w) = tokio::io::split(proxy);
    let mut px_r = px_r;
    // Buffered: a frame header and its payload were two `read` syscalls (and two hand-offs
    // to tonic) each; now every frame already received goes in one.
    let tcp_r = tokio::io::BufReader::with_capacity(64 * 1024, tcp_r);
    tokio::select! {
        _ = cancel.cancelled() => {}
        _ = client_to_server(tcp_r, px_w) => {}
        _ = tokio::io::copy(&mut px_r, &mut tcp_w) => {}
    }
}

/// Whether `buf` holds a whole HTTP/2 frame (so reading it cannot wait on the client).
fn holds_frame(buf: &[u8]) -> bool {
    buf.len() >= 9 && {
        let len = (usize::from(buf[0]) << 16) | (usize::from(buf[1]) << 8) | usize::from(buf[2]);
        buf.len() >= 9 + len
    }
}

async fn client_to_server<R: AsyncRead + Unpin>(
    mut r: tokio::io::BufReader<R>,
    mut w: impl AsyncWrite + Unpin,
) -> io::Result<()> {
    let mut preface = [0u8; 24];
    r.read_exact(&mut preface).await?;
    w.write_all(&preface).await?;
    if &preface != PREFACE {
        // Not HTTP/2 prior knowledge: pass through untouched and let the server answer.
        tokio::io::copy(&mut r, &mut w).await?;
        return Ok(());
    }
    // Frames go to tonic in one write per batch the client sent: flushed whenever the next
    // frame is not already buffered (the read for it may wait).
    let mut w = tokio::io::BufWriter::with_capacity(64 * 1024, w);
    let mut block: Vec<u8> = Vec::new();
    let mut block_flags = 0u8;
    let mut block_prio: Option<[u8; 5]> = None;
    let mut block_stream = 0u32;
    let mut in_block = false;
    loop {
        let mut head = [0u8; 9];
        if let Err(e) = r.read_exact(&mut head).await {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                return Ok(());
            }
            return Err(e);
        }
        let len = (usize::from(head[0]) << 16) | (usize::from(head[1]) << 8) | usize::from(head[2]);
        let ty = head[3];
        let flags = head[4];
        let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        let mut payload = vec![0u8; len];
        r.read_exact(&mut payload).await?;
        let starts_block = ty == HEADERS && !in_block;
        if !(starts_block || (ty == CONTINUATION && in_block)) {
            w.write_all(&head).await?;
            w.write_all(&payload).await?;
            if !holds_frame(r.buffer()) {
                w.flush().await?;
            }
            continue;
        }
        if starts_block {
            let mut data: &[u8] = &payload;
            if flags & PADDED != 0 {
                let pad = usize::from(*data.first().ok_or_else(bad)?);
                data = data
                    .get(1..data.len().checked_sub(pad).ok_or_else(bad)?)
                    .ok_or_else(bad)?;
            }
            block_prio = None;
            if flags & PRIORITY != 0 {
                let p: [u8; 5] = data
                    .get(..5)
                    .ok_or_else(bad)?
                    .try_into()
                    .map_err(|_| bad())?;
                block_prio = Some(p);
                data = &data[5..];
            }
            block.clear();
            block.extend_from_slice(data);
            block_flags = flags & END_STREAM;
            block_stream = stream;
            in_block = true;
        } else {
            block.extend_from_slice(&payload);
        }
        if block.len() > MAX_BLOCK {
            return Err(bad());
        }
        if flags & END_HEADERS == 0 {
            if !holds_frame(r.buffer()) {
                w.flush().await?;
            }
            continue;
        }
        in_block = false;
        let rewritten = rewrite_block(&block).unwrap_or_else(|| block.clone());
        write_headers(&mut w, block_stream, block_flags, block_prio, &rewritten).await?;
        if !holds_frame(r.buffer()) {
            w.flush().await?;
        }
    }
}

fn bad() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, "malformed HTTP/2 frame")
}

async fn write_headers(
    w: &mut (impl AsyncWrite + Unpin),
    stream: u32,
    end_stream: u8,
    prio: Option<[u8; 5]>,
    block: &[u8],
) -> io::Result<()> {
    let prio_len = if prio.is_some() { 5 } else { 0 };
    let first_len = block.len().min(MAX_FRAME - prio_len);
    let (first, mut rest) = block.split_at(first_len);
    let mut flags = end_stream | if prio.is_some() { PRIORITY } else { 0 };
    if rest.is_empty() {
        flags |= END_HEADERS;
    }
    let mut frame = frame_head(first_len + prio_len, HEADERS, flags, stream).to_vec();
    if let Some(p) = prio {
        frame.extend_from_slice(&p);
    }
    frame.extend_from_slice(first);
    w.write_all(&frame).await?;
    while !rest.is_empty() {
        let n = rest.len().min(MAX_FRAME);
        let (chunk, r) = rest.split_at(n);
        rest = r;
        let f = if rest.is_empty() { END_HEADERS } else { 0 };
        w.write_all(&frame_head(n, CONTINUATION, f, stream)).await?;
        w.write_all(chunk).await?;
    }
    Ok(())
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

    #[test]
    fn multi_byte_integers() {
        assert_eq!(hpack_int(&[0x1f, 0x9a, 0x0a], 0, 5), Some((1337, 3)));
        assert_eq!(hpack_int(&[0x0a], 0, 5), Some((10, 1)));
    }
}
