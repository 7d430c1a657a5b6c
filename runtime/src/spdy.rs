//! The SPDY/3.1 subset `kubectl port-forward` needs, server side, and the port-forward
//! protocol (`portforward.k8s.io`) on top of it.
//!
//! kubectl 1.37 tunnels SPDY through a WebSocket (subprotocol `SPDY/3.1+portforward.k8s.io`,
//! each binary message a slice of the SPDY byte stream). For every local connection it opens
//! two streams, `streamtype: error` then `streamtype: data`, both with `port` and a shared
//! `requestid`, and waits for a `SYN_REPLY` to each. Bytes then flow as `DATA` frames on the
//! data stream; text written to the error stream is shown as the forwarding error.
//!
//! Frames (all big-endian): control frames start with bit 1, version 3, a 16-bit type, then
//! 8 bits of flags and a 24-bit length; data frames with bit 0 and a 31-bit stream id, then
//! flags and length. Header blocks are zlib streams (one per direction for the whole
//! connection) primed with the dictionary of the SPDY/3 draft: a count, then length-prefixed
//! names and NUL-separated values.
use std::collections::HashMap;
use std::sync::OnceLock;
use std::time::Duration;

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::sync::mpsc;

use crate::websocket::{MessageReader, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG, encode_frame};

/// The WebSocket subprotocol of the tunnel.
pub(crate) const TUNNEL_PROTOCOL: &str = "SPDY/3.1+portforward.k8s.io";

const TYPE_SYN_STREAM: u16 = 1;
const TYPE_SYN_REPLY: u16 = 2;
const TYPE_RST_STREAM: u16 = 3;
const TYPE_PING: u16 = 6;
const TYPE_GOAWAY: u16 = 7;
const FLAG_FIN: u8 = 0x01;

/// Largest frame accepted (kubectl's are at most 32 KiB of data).
const MAX_FRAME: usize = 1 << 20;

/// Data read from a forwarded connection per frame.
const CHUNK: usize = 32 * 1024;

/// The SPDY/3 header compression dictionary (draft-mbelshe-httpbis-spdy-00 §2.6.10.1):
/// length-prefixed header names and words, then a run of common values.
fn dictionary() -> &'static [u8] {
    static DICT: OnceLock<Vec<u8>> = OnceLock::new();
    DICT.get_or_init(|| {
        const WORDS: &[&str] = &[
            "options",
            "head",
            "post",
            "put",
            "delete",
            "trace",
            "accept",
            "accept-charset",
            "accept-encoding",
            "accept-language",
            "accept-ranges",
            "age",
            "allow",
            "authorization",
            "cache-control",
            "connection",
            "content-base",
            "content-encoding",
            "content-language",
            "content-length",
            "content-location",
            "content-md5",
            "content-range",
            "content-type",
            "date",
            "etag",
            "expect",
            "expires",
            "from",
            "host",
            "if-match",
            "if-modified-since",
            "if-none-match",
            "if-range",
            "if-unmodified-since",
            "last-modified",
            "location",
            "max-forwards",
            "pragma",
            "proxy-authenticate",
            "proxy-authorization",
            "range",
            "referer",
            "retry-after",
            "server",
            "te",
            "trailer",
            "transfer-encoding",
            "upgrade",
            "user-agent",
            "vary",
            "via",
            "warning",
            "www-authenticate",
            "method",
            "get",
            "status",
            "200 OK",
            "version",
            "HTTP/1.1",
            "url",
            "public",
            "set-cookie",
            "keep-alive",
            "origin",
        ];
        const TAIL: &str = "100101201202205206300302303304305306307402405406407408409410411412\
            413414415416417502504505203 Non-Authoritative Information204 No Content301 Moved \
            Permanently400 Bad Request401 Unauthorized403 Forbidden404 Not Found500 Internal \
            Server Error501 Not Implemented503 Service UnavailableJan Feb Mar Apr May Jun Jul \
            Aug Sept Oct Nov Dec 00:00:00 Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMTchunked,\
            text/html,image/png,image/jpg,image/gif,application/xml,application/xhtml+xml,\
            text/plain,text/javascript,publicprivatemax-age=gzip,deflate,sdchcharset=utf-8\
            charset=iso-8859-1,utf-,*,enq=0.";
        let mut d = Vec::with_capacity(1424);
        for w in WORDS {
            d.extend_from_slice(&u32::try_from(w.len()).unwrap_or(0).to_be_bytes());
            d.extend_from_slice(w.as_bytes());
        }
        d.extend_from_slice(TAIL.as_bytes());
        d
    })
}

/// One parsed frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Frame {
    SynStream {
        id: u32,
        fin: bool,
        headers: Vec<(String, String)>,
    },
    RstStream {
        id: u32,
    },
    Ping(u32),
    GoAway,
    Data {
        id: u32,
        fin: bool,
        data: Vec<u8>,
    },
    /// SETTINGS, WINDOW_UPDATE, HEADERS, SYN_REPLY: nothing to do for a port-forward server.
    Other,
}

/// Header (de)compression state of one connection, plus frame parsing and building.
pub(crate) struct Codec {
    inflate: Decompress,
    deflate: Compress,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum SpdyError {
    #[error("malformed SPDY frame: {0}")]
    Malformed(&'static str),
    #[error("header block: {0}")]
    Headers(String),
}

impl Codec {
    pub(crate) fn new() -> Self {
        let mut deflate = Compress::new(Compression::default(), true);
        // Our header blocks are primed with the dictionary too, as the peer expects.
        let _ = deflate.set_dictionary(dictionary());
        Codec {
            inflate: Decompress::new(true),
            deflate,
        }
    }

    /// Takes one whole frame off the front of `buf`, if there is one.
    pub(crate) fn parse(&mut self, buf: &mut Vec<u8>) -> Result<Option<Frame>, SpdyError> {
        if buf.len() < 8 {
            return Ok(None);
        }
        let len = usize::from(buf[5]) << 16 | usize::from(buf[6]) << 8 | usize::from(buf[7]);
        if len > MAX_FRAME {
            return Err(SpdyError::Malformed("frame too large"));
        }
        if buf.len() < 8 + len {
            return Ok(None);
        }
        let frame: Vec<u8> = buf.drain(..8 + len).collect();
        let flags = frame[4];
        let body = &frame[8..];
        let word = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) & 0x7FFF_FFFF;
        if frame[0] & 0x80 == 0 {
            return Ok(Some(Frame::Data {
                id: word(&frame[..4]),
                fin: flags & FLAG_FIN != 0,
                data: body.to_vec(),
            }));
        }
        let ty = u16::from_be_bytes([frame[2], frame[3]]);
        Ok(Some(match ty {
            TYPE_SYN_STREAM => {
                if body.len() < 10 {
                    return Err(SpdyError::Malformed("short SYN_STREAM"));
                }
                let headers = self.decode_headers(&body[10..])?;
                Frame::SynStream {
                    id: word(body),
                    fin: flags & FLAG_FIN != 0,
                    headers,
                }
            }
            TYPE_RST_STREAM if body.len() >= 4 => Frame::RstStream { id: word(body) },
            TYPE_PING if body.len() >= 4 => {
                Frame::Ping(u32::from_be_bytes([body[0], body[1], body[2], body[3]]))
            }
            TYPE_GOAWAY => Frame::GoAway,
            // SYN_REPLY and HEADERS carry header blocks: inflate them to keep the shared
            // zlib stream in step, then ignore them.
            TYPE_SYN_REPLY | 8 if body.len() >= 4 => {
                self.decode_headers(&body[4..])?;
                Frame::Other
            }
            _ => Frame::Other,
        }))
    }

    fn decode_headers(&mut self, block: &[u8]) -> Result<Vec<(String, String)>, SpdyError> {
        let mut out = Vec::with_capacity(block.len() * 4 + 64);
        let mut input = block;
        loop {
            let before_in = self.inflate.total_in();
            let r = self
                .inflate
                .decompress_vec(input, &mut out, FlushDecompress::Sync);
            let used = usize::try_from(self.inflate.total_in() - before_in).unwrap_or(0);
            input = &input[used.min(input.len())..];
            match r {
                Ok(Status::BufError | Status::Ok | Status::StreamEnd)
                    if input.is_empty() && out.len() < out.capacity() =>
                {
                    break;
                }
                Ok(_) => {
                    if out.len() > MAX_FRAME {
                        return Err(SpdyError::Headers("header block too large".into()));
                    }
                    out.reserve(out.capacity().max(256));
                }
                Err(e) if e.needs_dictionary().is_some() => {
                    self.inflate
                        .set_dictionary(dictionary())
                        .map_err(|e| SpdyError::Headers(e.to_string()))?;
                }
                Err(e) => return Err(SpdyError::Headers(e.to_string())),
            }
        }
        parse_header_block(&out)
    }

    fn encode_headers(&mut self, headers: &[(&str, &str)]) -> Vec<u8> {
        let mut raw = Vec::new();
        raw.extend_from_slice(&u32::try_from(headers.len()).unwrap_or(0).to_be_bytes());
        for (k, v) in headers {
            for s in [k, v] {
                raw.extend_from_slice(&u32::try_from(s.len()).unwrap_or(0).to_be_bytes());
                raw.extend_from_slice(s.as_bytes());
            }
        }
        let mut out = Vec::with_capacity(raw.len() + 64);
        let mut input = raw.as_slice();
        loop {
            let before = self.deflate.total_in();
            let _ = self
                .deflate
                .compress_vec(input, &mut out, FlushCompress::Sync);
            let used = usize::try_from(self.deflate.total_in() - before).unwrap_or(0);
            input = &input[used.min(input.len())..];
            if input.is_empty() && out.len() < out.capacity() {
                break;
            }
            out.reserve(out.capacity().max(64));
        }
        out
    }

    /// A `SYN_REPLY` for stream `id` with no headers.
    pub(crate) fn syn_reply(&mut self, id: u32) -> Vec<u8> {
        let block = self.encode_headers(&[]);
        let mut body = id.to_be_bytes().to_vec();
        body.extend_from_slice(&block);
        control(TYPE_SYN_REPLY, 0, &body)
    }
}

fn parse_header_block(raw: &[u8]) -> Result<Vec<(String, String)>, SpdyError> {
    let bad = || SpdyError::Headers("truncated header block".into());
    let mut pos = 0usize;
    let take_u32 = |pos: &mut usize| -> Result<usize, SpdyError> {
        let b = raw.get(*pos..*pos + 4).ok_or_else(bad)?;
        *pos += 4;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
    };
    let n = take_u32(&mut pos)?;
    let mut headers = Vec::with_capacity(n.min(64));
    for _ in 0..n {
        let kl = take_u32(&mut pos)?;
        let k = raw.get(pos..pos + kl).ok_or_else(bad)?;
        pos += kl;
        let vl = take_u32(&mut pos)?;
        let v = raw.get(pos..pos + vl).ok_or_else(bad)?;
        pos += vl;
        headers.push((
            String::from_utf8_lossy(k).to_ascii_lowercase(),
            String::from_utf8_lossy(v).into_owned(),
        ));
    }
    Ok(headers)
}

fn control(ty: u16, flags: u8, body: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(8 + body.len());
    f.extend_from_slice(&[0x80, 0x03]);
    f.extend_from_slice(&ty.to_be_bytes());
    f.push(flags);
    let len = u32::try_from(body.len()).unwrap_or(0).to_be_bytes();
    f.extend_from_slice(&len[1..]);
    f.extend_from_slice(body);
    f
}

pub(crate) fn data_frame(id: u32, fin: bool, data: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(8 + data.len());
    f.extend_from_slice(&(id & 0x7FFF_FFFF).to_be_bytes());
    f.push(if fin { FLAG_FIN } else { 0 });
    let len = u32::try_from(data.len()).unwrap_or(0).to_be_bytes();
    f.extend_from_slice(&len[1..]);
    f.extend_from_slice(data);
    f
}

pub(crate) fn ping_frame(id: u32) -> Vec<u8> {
    control(TYPE_PING, 0, &id.to_be_bytes())
}

/// What a forwarded connection's streams are.
#[derive(Default)]
struct Pair {
    port: u16,
    error: Option<u32>,
    data: Option<u32>,
    /// Bytes for the target connection; `None` once the client closed its side.
    to_target: Option<mpsc::Sender<Vec<u8>>>,
    started: bool,
}

/// Serves a port-forward session tunnelled in a WebSocket (`io` is the upgraded connection):
/// every stream pair is connected to `host:port` (the pod's address).
pub(crate) async fn serve_tunnel<IO>(io: IO, host: String) -> std::io::Result<()>
where
    IO: AsyncRead + AsyncWrite + Send + 'static,
{
    let (rd, mut wr) = tokio::io::split(io);
    let mut rd = MessageReader::new(rd);
    // Everything the session sends is a SPDY frame in one binary message, except pongs.
    let (out_tx, mut out_rx) = mpsc::channel::<(u8, Vec<u8>)>(64);
    let writer = tokio::spawn(async move {
        while let Some((op, payload)) = out_rx.recv().await {
            if wr
                .write_all(&encode_frame(op, &payload, None))
                .await
                .is_err()
            {
                return;
            }
            let _ = wr.flush().await;
            if op == OP_CLOSE {
                return;
            }
        }
    });
    let mut codec = Codec::new();
    let mut buf = Vec::new();
    let mut pairs: HashMap<String, Pair> = HashMap::new();
    let mut by_stream: HashMap<u32, String> = HashMap::new();
    let mut tasks = tokio::task::JoinSet::new();
    'session: loop {
        let (op, msg) = match rd.next().await {
            Ok(m) => m,
            Err(_) => break,
        };
        match op {
            OP_PING => {
                let _ = out_tx.send((OP_PONG, msg)).await;
                continue;
            }
            OP_CLOSE => break,
            OP_BINARY | crate::websocket::OP_TEXT => buf.extend_from_slice(&msg),
            _ => continue,
        }
        loop {
            let frame = match codec.parse(&mut buf) {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => {
                    tracing::debug!(error = %e, "port-forward session ended");
                    break 'session;
                }
            };
            match frame {
                Frame::SynStream { id, fin, headers } => {
                    let get = |k: &str| {
                        headers
                            .iter()
                            .find(|(n, _)| n == k)
                            .map(|(_, v)| v.clone())
                            .unwrap_or_default()
                    };
                    let (kind, port, request) = (get("streamtype"), get("port"), get("requestid"));
                    if out_tx.send((OP_BINARY, codec.syn_reply(id))).await.is_err() {
                        break 'session;
                    }
                    let pair = pairs.entry(request.clone()).or_default();
                    pair.port = port.parse().unwrap_or(0);
                    by_stream.insert(id, request.clone());
                    match kind.as_str() {
                        "error" => pair.error = Some(id),
                        "data" => pair.data = Some(id),
                        _ => {}
                    }
                    if let (Some(err_id), Some(data_id), false) =
                        (pair.error, pair.data, pair.started)
                    {
                        pair.started = true;
                        let (tx, rx) = mpsc::channel::<Vec<u8>>(16);
                        pair.to_target = (!fin).then_some(tx);
                        tasks.spawn(forward(
                            host.clone(),
                            pair.port,
                            err_id,
                            data_id,
                            rx,
                            out_tx.clone(),
                        ));
                    }
                }
                Frame::Data { id, fin, data } => {
                    let Some(pair) = by_stream.get(&id).and_then(|r| pairs.get_mut(r)) else {
                        continue;
                    };
                    if pair.data != Some(id) {
                        continue;
                    }
                    if !data.is_empty()
                        && let Some(tx) = &pair.to_target
                        && tx.send(data).await.is_err()
                    {
                        pair.to_target = None;
                    }
                    if fin {
                        pair.to_target = None;
                    }
                }
                Frame::RstStream { id } => {
                    if let Some(r) = by_stream.get(&id)
                        && let Some(pair) = pairs.get_mut(r)
                    {
                        pair.to_target = None;
                    }
                }
                Frame::Ping(n) => {
                    let _ = out_tx.send((OP_BINARY, ping_frame(n))).await;
                }
                Frame::GoAway => break 'session,
                Frame::Other => {}
            }
        }
    }
    tasks.abort_all();
    let _ = out_tx
        .send((OP_CLOSE, 1000u16.to_be_bytes().to_vec()))
        .await;
    drop(out_tx);
    let _ = tokio::time::timeout(Duration::from_secs(2), writer).await;
    Ok(())
}

/// One forwarded connection: dials `host:port`, copies both ways, and reports a dial failure
/// on the error stream as kubectl expects. Both streams end with an empty `FIN`.
async fn forward(
    host: String,
    port: u16,
    err_id: u32,
    data_id: u32,
    mut from_client: mpsc::Receiver<Vec<u8>>,
    out: mpsc::Sender<(u8, Vec<u8>)>,
) {
    let addr = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    let dial = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::net::TcpStream::connect(&addr),
    )
    .await;
    let tcp = match dial {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => {
            let msg = format!("failed to connect to {addr}: {e}");
            let _ = out
                .send((OP_BINARY, data_frame(err_id, false, msg.as_bytes())))
                .await;
            let _ = out.send((OP_BINARY, data_frame(err_id, true, &[]))).await;
            let _ = out.send((OP_BINARY, data_frame(data_id, true, &[]))).await;
            return;
        }
        Err(_) => {
            let msg = format!("failed to connect to {addr}: timed out");
            let _ = out
                .send((OP_BINARY, data_frame(err_id, false, msg.as_bytes())))
                .await;
            let _ = out.send((OP_BINARY, data_frame(err_id, true, &[]))).await;
            let _ = out.send((OP_BINARY, data_frame(data_id, true, &[]))).await;
            return;
        }
    };
    let _ = tcp.set_nodelay(true);
    let (mut tr, mut tw) = tcp.into_split();
    let upload = async move {
        while let Some(chunk) = from_client.recv().await {
            if tw.write_all(&chunk).await.is_err() {
                return;
            }
        }
        // The client closed its side: so do we, towards the target.
        let _ = tw.shutdown().await;
    };
    let download = {
        let out = out.clone();
        async move {
            let mut b = vec![0u8; CHUNK];
            loop {
                match tr.read(&mut b).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if out
                            .send((OP_BINARY, data_frame(data_id, false, &b[..n])))
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                }
            }
            let _ = out.send((OP_BINARY, data_frame(data_id, true, &[]))).await;
        }
    };
    let upload = tokio::spawn(upload);
    download.await;
    // The target ended: give the other direction a moment, as containerd's forwarder does.
    let _ = tokio::time::timeout(Duration::from_secs(1), upload).await;
    let _ = out.send((OP_BINARY, data_frame(err_id, true, &[]))).await;
}

impl Codec {
    /// A `SYN_STREAM` opening stream `id` with `headers`.
    pub(crate) fn syn_stream(&mut self, id: u32, headers: &[(&str, &str)]) -> Vec<u8> {
        let block = self.encode_headers(headers);
        let mut body = id.to_be_bytes().to_vec();
        // No associated stream, priority 0, slot 0.
        body.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
        body.extend_from_slice(&block);
        control(TYPE_SYN_STREAM, 0, &body)
    }
}

/// Client side of a CRI streaming server's exec or attach over SPDY/3.1 (containerd 1.6's
/// server speaks `v4.channel.k8s.io` over SPDY as well as WebSocket; only SPDY can carry the
/// end of stdin, as a `FIN` on the stdin stream). Gives `io` back if the server refuses the
/// SPDY upgrade (the caller falls back to the WebSocket).
pub(crate) async fn stream_client(
    url: &str,
    io: crate::pod_runtime::SessionIo,
) -> Result<Result<i32, crate::pod_runtime::SessionIo>, crate::pod_runtime::RuntimeError> {
    use crate::pod_runtime::RuntimeError;
    let err = |why: String| RuntimeError::Transient(format!("streaming server {url}: {why}"));
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| err("only http:// streaming URLs are supported".into()))?;
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let tcp = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::net::TcpStream::connect(authority),
    )
    .await
    .map_err(|_| err("connect timed out".into()))?
    .map_err(|e| err(e.to_string()))?;
    let _ = tcp.set_nodelay(true);
    let mut s = tokio::io::BufReader::new(tcp);
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\nX-Stream-Protocol-Version: v4.channel.k8s.io\r\nContent-Length: 0\r\n\r\n"
    );
    s.get_mut()
        .write_all(req.as_bytes())
        .await
        .map_err(|e| err(e.to_string()))?;
    let head = crate::websocket::read_upgrade_answer(&mut s)
        .await
        .map_err(err)?;
    if head.split_whitespace().nth(1) != Some("101") {
        return Ok(Err(io));
    }
    let crate::pod_runtime::SessionIo {
        stdin,
        mut stdout,
        mut stderr,
        tty,
        resize,
    } = io;
    let mut codec = Codec::new();
    let (mut rd, wr) = tokio::io::split(s);
    let (out_tx, mut out_rx) = mpsc::channel::<Vec<u8>>(64);
    let writer = tokio::spawn(async move {
        let mut wr = wr;
        while let Some(f) = out_rx.recv().await {
            if wr.write_all(&f).await.is_err() {
                return;
            }
            let _ = wr.flush().await;
        }
    });
    // Streams as client-go opens them: error first, then the ones asked for.
    let mut next = 1u32;
    let mut open = |codec: &mut Codec, kind: &str| {
        let id = next;
        next += 2;
        (id, codec.syn_stream(id, &[("streamtype", kind)]))
    };
    let (error_id, f) = open(&mut codec, "error");
    let mut frames = vec![f];
    let stdin_id = stdin.is_some().then(|| {
        let (id, f) = open(&mut codec, "stdin");
        frames.push(f);
        id
    });
    let stdout_id = stdout.is_some().then(|| {
        let (id, f) = open(&mut codec, "stdout");
        frames.push(f);
        id
    });
    let stderr_id = (stderr.is_some() && !tty).then(|| {
        let (id, f) = open(&mut codec, "stderr");
        frames.push(f);
        id
    });
    let resize_id = tty.then(|| {
        let (id, f) = open(&mut codec, "resize");
        frames.push(f);
        id
    });
    for f in frames {
        let _ = out_tx.send(f).await;
    }
    let mut tasks = tokio::task::JoinSet::new();
    if let (Some(id), Some(mut input)) = (stdin_id, stdin) {
        let out = out_tx.clone();
        tasks.spawn(async move {
            let mut b = vec![0u8; CHUNK];
            loop {
                match input.read(&mut b).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if out.send(data_frame(id, false, &b[..n])).await.is_err() {
                            return;
                        }
                    }
                }
            }
            // The end of the client's stdin, passed on.
            let _ = out.send(data_frame(id, true, &[])).await;
        });
    }
    if let (Some(id), Some(mut resize)) = (resize_id, resize) {
        let out = out_tx.clone();
        tasks.spawn(async move {
            while let Some(sz) = resize.recv().await {
                let body = serde_json::json!({"Width": sz.width, "Height": sz.height}).to_string();
                if out
                    .send(data_frame(id, false, body.as_bytes()))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        });
    }
    let mut buf = Vec::new();
    let mut status = Vec::new();
    let mut chunk = vec![0u8; CHUNK];
    'read: loop {
        let n = match rd.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        buf.extend_from_slice(&chunk[..n]);
        loop {
            match codec.parse(&mut buf) {
                Ok(Some(Frame::Data { id, data, .. })) => {
                    let w = if Some(id) == stdout_id {
                        stdout.as_mut()
                    } else if Some(id) == stderr_id {
                        stderr.as_mut()
                    } else {
                        if id == error_id {
                            status.extend_from_slice(&data);
                        }
                        None
                    };
                    if let Some(w) = w {
                        let _ = w.write_all(&data).await;
                        let _ = w.flush().await;
                    }
                }
                Ok(Some(Frame::Ping(n))) => {
                    let _ = out_tx.send(ping_frame(n)).await;
                }
                Ok(Some(Frame::GoAway)) => break 'read,
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(e) => return Err(err(e.to_string())),
            }
        }
    }
    tasks.abort_all();
    drop(out_tx);
    writer.abort();
    if status.iter().all(u8::is_ascii_whitespace) {
        return Ok(Ok(0));
    }
    let st: serde_json::Value = serde_json::from_slice(&status)
        .map_err(|_| err(String::from_utf8_lossy(&status).into_owned()))?;
    crate::websocket::code_of_status(&st).map(Ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dictionary_has_the_draft_size() {
        // 1423 bytes in the SPDY/3 draft.
        assert_eq!(dictionary().len(), 1423);
        assert!(dictionary().starts_with(b"\0\0\0\x07options\0\0\0\x04head"));
        assert!(dictionary().ends_with(b",*,enq=0."));
    }

    #[test]
    fn header_blocks_round_trip_through_the_shared_zlib_streams() {
        // One side's deflate feeds the other's inflate, frame after frame.
        let mut client = Codec::new();
        let mut server = Codec::new();
        for (i, port) in ["80", "8080", "443"].iter().enumerate() {
            let block = client.encode_headers(&[
                ("streamType", "data"),
                ("port", port),
                ("requestID", &i.to_string()),
            ]);
            let id = 2 * i as u32 + 1;
            let mut body = id.to_be_bytes().to_vec();
            body.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
            body.extend_from_slice(&block);
            let mut buf = control(TYPE_SYN_STREAM, 0, &body);
            buf.extend_from_slice(&data_frame(id, true, b"payload"));
            let f = server
                .parse(&mut buf)
                .expect("parses")
                .expect("whole frame");
            assert_eq!(
                f,
                Frame::SynStream {
                    id,
                    fin: false,
                    headers: vec![
                        ("streamtype".into(), "data".into()),
                        ("port".into(), (*port).into()),
                        ("requestid".into(), i.to_string()),
                    ],
                }
            );
            let d = server.parse(&mut buf).expect("parses").expect("data");
            assert_eq!(
                d,
                Frame::Data {
                    id,
                    fin: true,
                    data: b"payload".to_vec()
                }
            );
            assert!(buf.is_empty());
            // A reply decodes on the client side.
            let mut reply = server.syn_reply(id);
            assert_eq!(client.parse(&mut reply).expect("reply"), Some(Frame::Other));
        }
        // A partial frame waits for more bytes.
        let mut partial = data_frame(1, false, b"abc");
        partial.pop();
        assert_eq!(server.parse(&mut partial).expect("partial"), None);
    }
}
