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
//!
//! Flow control (SPDY/3.1 §2.6.8): every stream and the session start with a 64 KiB send
//! window, which `SETTINGS` (`INITIAL_WINDOW_SIZE`, streams only) and `WINDOW_UPDATE` (stream id
//! 0 = the session) move; [`SendWindows`] holds data back while either is spent. Going the
//! other way, data taken from the peer is handed back with `WINDOW_UPDATE`s as it is consumed.
//! The peers that matter do not take part, though: moby/spdystream (kubectl, the kubelet's
//! and containerd's streaming servers) never sends `WINDOW_UPDATE` and ignores them (its issue
//! #2, open since 2014). Waiting for credit that never comes would stall every transfer past
//! 64 KiB, so a peer that has sent neither `SETTINGS` nor `WINDOW_UPDATE` when a window first
//! runs out gets [`NO_FLOW_CONTROL_GRACE`] to do so and is then treated as not flow
//! controlling (until it sends one).
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
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
const TYPE_SETTINGS: u16 = 4;
const TYPE_PING: u16 = 6;
const TYPE_GOAWAY: u16 = 7;
const TYPE_WINDOW_UPDATE: u16 = 9;
/// How long a streaming client keeps reading after the server's GOAWAY (see `stream_client`).
const GOAWAY_DRAIN: Duration = Duration::from_secs(5);
const FLAG_FIN: u8 = 0x01;

/// `SETTINGS` id of the initial stream send window.
const SETTINGS_INITIAL_WINDOW_SIZE: u32 = 7;

/// Initial stream and session windows (SPDY/3.1).
pub(crate) const INITIAL_WINDOW: u32 = 64 * 1024;

/// How long a peer that has never sent a flow-control frame may take to send one once a window
/// is spent, before it is taken for one that does not flow-control (moby/spdystream).
pub(crate) const NO_FLOW_CONTROL_GRACE: Duration = Duration::from_millis(500);

/// Consumed bytes handed back to the peer in one `WINDOW_UPDATE` (half a window, so it never
/// waits on us while data is moving).
const RETURN_CREDIT_AT: u32 = INITIAL_WINDOW / 2;

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
    /// Credit for stream `id` (0: the session).
    WindowUpdate {
        id: u32,
        delta: u32,
    },
    /// `SETTINGS`; only the initial stream window matters here.
    Settings {
        initial_window: Option<u32>,
    },
    Data {
        id: u32,
        fin: bool,
        data: Vec<u8>,
    },
    /// HEADERS, SYN_REPLY and the rest: nothing to do for these sessions.
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
            TYPE_WINDOW_UPDATE if body.len() >= 8 => Frame::WindowUpdate {
                id: word(body),
                delta: word(&body[4..]),
            },
            TYPE_SETTINGS if body.len() >= 4 => {
                let n = u32::from_be_bytes([body[0], body[1], body[2], body[3]]) as usize;
                let entries = body[4..].chunks_exact(8).take(n);
                let initial_window = entries
                    .filter(|e| {
                        u32::from_be_bytes([0, e[1], e[2], e[3]]) == SETTINGS_INITIAL_WINDOW_SIZE
                    })
                    .map(|e| u32::from_be_bytes([e[4], e[5], e[6], e[7]]))
                    .next_back();
                Frame::Settings { initial_window }
            }
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

/// `WINDOW_UPDATE` giving the peer `delta` more bytes on stream `id` (0: the session).
pub(crate) fn window_update_frame(id: u32, delta: u32) -> Vec<u8> {
    let mut body = (id & 0x7FFF_FFFF).to_be_bytes().to_vec();
    body.extend_from_slice(&(delta & 0x7FFF_FFFF).to_be_bytes());
    control(TYPE_WINDOW_UPDATE, 0, &body)
}

/// Whether the peer has shown that it flow-controls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PeerMode {
    /// No `SETTINGS` or `WINDOW_UPDATE` seen yet.
    Unknown,
    /// It sent one: its windows are honoured.
    FlowControls,
    /// A window ran out and no credit came within the grace: it does not flow-control.
    Ignores,
}

#[derive(Debug)]
struct WindowState {
    session: i64,
    initial: i64,
    streams: HashMap<u32, i64>,
    mode: PeerMode,
    closed: bool,
}

/// The send windows of one session: senders [`acquire`](SendWindows::acquire) credit before
/// each `DATA` frame; the reader applies the peer's `WINDOW_UPDATE`s and `SETTINGS`.
pub(crate) struct SendWindows {
    state: Mutex<WindowState>,
    changed: tokio::sync::Notify,
    grace: Duration,
}

impl SendWindows {
    pub(crate) fn new(grace: Duration) -> Self {
        SendWindows {
            state: Mutex::new(WindowState {
                session: i64::from(INITIAL_WINDOW),
                initial: i64::from(INITIAL_WINDOW),
                streams: HashMap::new(),
                mode: PeerMode::Unknown,
                closed: false,
            }),
            changed: tokio::sync::Notify::new(),
            grace,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, WindowState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A `WINDOW_UPDATE` from the peer.
    pub(crate) fn update(&self, id: u32, delta: u32) {
        {
            let mut s = self.lock();
            s.mode = PeerMode::FlowControls;
            if id == 0 {
                s.session += i64::from(delta);
            } else {
                let initial = s.initial;
                *s.streams.entry(id).or_insert(initial) += i64::from(delta);
            }
        }
        self.changed.notify_waiters();
    }

    /// The peer's `SETTINGS_INITIAL_WINDOW_SIZE`: every stream window moves by the change
    /// (possibly below zero), as SPDY/3 says.
    pub(crate) fn set_initial(&self, window: u32) {
        {
            let mut s = self.lock();
            s.mode = PeerMode::FlowControls;
            let diff = i64::from(window) - s.initial;
            s.initial = i64::from(window);
            for w in s.streams.values_mut() {
                *w += diff;
            }
        }
        self.changed.notify_waiters();
    }

    /// Forgets a finished stream.
    pub(crate) fn forget(&self, id: u32) {
        self.lock().streams.remove(&id);
    }

    /// Ends the session: waiting senders give up.
    pub(crate) fn close(&self) {
        self.lock().closed = true;
        self.changed.notify_waiters();
    }

    /// Waits for credit to send up to `want` bytes on stream `id` and takes it: how many bytes
    /// may go now (at least one), or `None` once the session is closed.
    pub(crate) async fn acquire(&self, id: u32, want: usize) -> Option<usize> {
        let want_i = i64::try_from(want).unwrap_or(i64::MAX);
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            // Registered before the check, so an update between check and wait is not lost.
            notified.as_mut().enable();
            let mode = {
                let mut s = self.lock();
                if s.closed {
                    return None;
                }
                let initial = s.initial;
                let stream = *s.streams.entry(id).or_insert(initial);
                let avail = stream.min(s.session);
                let n = match s.mode {
                    // Counted anyway, so the windows are right should it start flow control.
                    PeerMode::Ignores => want_i,
                    _ if avail > 0 => avail.min(want_i),
                    _ => 0,
                };
                if n > 0 {
                    s.session -= n;
                    if let Some(w) = s.streams.get_mut(&id) {
                        *w -= n;
                    }
                    return Some(usize::try_from(n).unwrap_or(want));
                }
                s.mode
            };
            if mode == PeerMode::Unknown {
                if tokio::time::timeout(self.grace, notified).await.is_err() {
                    let mut s = self.lock();
                    if s.mode == PeerMode::Unknown {
                        tracing::debug!(
                            "SPDY peer sent no WINDOW_UPDATE with its window spent: not flow controlled"
                        );
                        s.mode = PeerMode::Ignores;
                    }
                }
            } else {
                notified.await;
            }
        }
    }
}

/// Counts what was consumed of the peer's data on one stream; says when to return it.
#[derive(Debug, Default)]
struct Consumed(u32);

impl Consumed {
    /// Adds `n` consumed bytes; the `WINDOW_UPDATE`s (stream, then session) once enough
    /// accumulated.
    fn add(&mut self, id: u32, n: usize) -> Option<[Vec<u8>; 2]> {
        self.0 = self.0.saturating_add(u32::try_from(n).unwrap_or(u32::MAX));
        if self.0 < RETURN_CREDIT_AT {
            return None;
        }
        let delta = std::mem::take(&mut self.0).min(0x7FFF_FFFF);
        Some([
            window_update_frame(id, delta),
            window_update_frame(0, delta),
        ])
    }
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
    serve_tunnel_with(io, host, NO_FLOW_CONTROL_GRACE).await
}

/// [`serve_tunnel`] with the flow-control grace as a parameter (tests).
async fn serve_tunnel_with<IO>(io: IO, host: String, grace: Duration) -> std::io::Result<()>
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
    let windows = Arc::new(SendWindows::new(grace));
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
                            (err_id, data_id),
                            rx,
                            out_tx.clone(),
                            windows.clone(),
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
                Frame::WindowUpdate { id, delta } => windows.update(id, delta),
                Frame::Settings {
                    initial_window: Some(w),
                } => windows.set_initial(w),
                Frame::GoAway => break 'session,
                Frame::Settings { .. } | Frame::Other => {}
            }
        }
    }
    windows.close();
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
    (err_id, data_id): (u32, u32),
    mut from_client: mpsc::Receiver<Vec<u8>>,
    out: mpsc::Sender<(u8, Vec<u8>)>,
    windows: Arc<SendWindows>,
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
    let upload = {
        let out = out.clone();
        async move {
            let mut consumed = Consumed::default();
            while let Some(chunk) = from_client.recv().await {
                if tw.write_all(&chunk).await.is_err() {
                    return;
                }
                // Written to the target: the client may send that much more.
                for f in consumed.add(data_id, chunk.len()).into_iter().flatten() {
                    let _ = out.send((OP_BINARY, f)).await;
                }
            }
            // The client closed its side: so do we, towards the target.
            let _ = tw.shutdown().await;
        }
    };
    let download = {
        let out = out.clone();
        let windows = windows.clone();
        async move {
            let mut b = vec![0u8; CHUNK];
            loop {
                match tr.read(&mut b).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        let mut sent = 0;
                        while sent < n {
                            let Some(k) = windows.acquire(data_id, n - sent).await else {
                                return;
                            };
                            let frame = data_frame(data_id, false, &b[sent..sent + k]);
                            if out.send((OP_BINARY, frame)).await.is_err() {
                                return;
                            }
                            sent += k;
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
    windows.forget(data_id);
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
    let windows = Arc::new(SendWindows::new(NO_FLOW_CONTROL_GRACE));
    let mut tasks = tokio::task::JoinSet::new();
    if let (Some(id), Some(mut input)) = (stdin_id, stdin) {
        let out = out_tx.clone();
        let windows = windows.clone();
        tasks.spawn(async move {
            let mut b = vec![0u8; CHUNK];
            loop {
                match input.read(&mut b).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        let mut sent = 0;
                        while sent < n {
                            let Some(k) = windows.acquire(id, n - sent).await else {
                                return;
                            };
                            if out
                                .send(data_frame(id, false, &b[sent..sent + k]))
                                .await
                                .is_err()
                            {
                                return;
                            }
                            sent += k;
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
    let mut consumed: HashMap<u32, Consumed> = HashMap::new();
    // After GOAWAY the server opens no new streams, but the open ones still deliver: the
    // tail of stdout can follow it. Read on until the server closes, bounded in case it
    // keeps the connection open.
    let mut going_away = false;
    let mut peer_flow_controls = false;
    // Server streams that have not ended (FIN or reset) yet.
    let mut open: std::collections::HashSet<u32> = [Some(error_id), stdout_id, stderr_id]
        .into_iter()
        .flatten()
        .collect();
    loop {
        if going_away && open.is_empty() {
            break;
        }
        let read = if going_away {
            match tokio::time::timeout(GOAWAY_DRAIN, rd.read(&mut chunk)).await {
                Ok(r) => r,
                Err(_) => break,
            }
        } else {
            rd.read(&mut chunk).await
        };
        let n = match read {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        buf.extend_from_slice(&chunk[..n]);
        loop {
            match codec.parse(&mut buf) {
                Ok(Some(Frame::Data { id, data, fin })) => {
                    if fin {
                        open.remove(&id);
                    }
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
                    // Passed on: the server may send that much more. Only to a server that
                    // shows it does flow control: containerd's (spdystream) does not, and
                    // credit it had not read when it closed made its kernel reset the
                    // connection, which threw away the tail of stdout still unread here.
                    if peer_flow_controls {
                        for f in consumed
                            .entry(id)
                            .or_default()
                            .add(id, data.len())
                            .into_iter()
                            .flatten()
                        {
                            let _ = out_tx.send(f).await;
                        }
                    }
                }
                Ok(Some(Frame::Ping(n))) => {
                    let _ = out_tx.send(ping_frame(n)).await;
                }
                Ok(Some(Frame::WindowUpdate { id, delta })) => {
                    peer_flow_controls = true;
                    windows.update(id, delta);
                }
                Ok(Some(Frame::Settings {
                    initial_window: Some(w),
                })) => {
                    peer_flow_controls = true;
                    windows.set_initial(w);
                }
                Ok(Some(Frame::RstStream { id })) => {
                    open.remove(&id);
                }
                Ok(Some(Frame::GoAway)) => going_away = true,
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(e) => return Err(err(e.to_string())),
            }
        }
    }
    windows.close();
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

    /// `SETTINGS` with `INITIAL_WINDOW_SIZE` = `window` (and another entry before it).
    fn settings_frame(window: u32) -> Vec<u8> {
        let mut body = 2u32.to_be_bytes().to_vec();
        // MAX_CONCURRENT_STREAMS (4) = 100, then INITIAL_WINDOW_SIZE.
        body.extend_from_slice(&[0, 0, 0, 4]);
        body.extend_from_slice(&100u32.to_be_bytes());
        body.extend_from_slice(&[0, 0, 0, 7]);
        body.extend_from_slice(&window.to_be_bytes());
        control(TYPE_SETTINGS, 0, &body)
    }

    #[test]
    fn flow_control_frames_parse() {
        let mut c = Codec::new();
        let mut buf = window_update_frame(5, 40_000);
        buf.extend_from_slice(&window_update_frame(0, 0x7FFF_FFFF));
        buf.extend_from_slice(&settings_frame(16 * 1024));
        assert_eq!(
            c.parse(&mut buf).expect("update"),
            Some(Frame::WindowUpdate {
                id: 5,
                delta: 40_000
            })
        );
        assert_eq!(
            c.parse(&mut buf).expect("session update"),
            Some(Frame::WindowUpdate {
                id: 0,
                delta: 0x7FFF_FFFF
            })
        );
        assert_eq!(
            c.parse(&mut buf).expect("settings"),
            Some(Frame::Settings {
                initial_window: Some(16 * 1024)
            })
        );
        assert!(buf.is_empty());
    }

    /// Whether `acquire` is still waiting after `wait`.
    async fn blocked(w: &SendWindows, id: u32, wait: Duration) -> bool {
        tokio::time::timeout(wait, w.acquire(id, 1)).await.is_err()
    }

    /// Longer than the grace used in these tests: a wait this long is not the fallback.
    const LONG: Duration = Duration::from_millis(300);

    #[tokio::test]
    async fn send_windows_honour_stream_and_session_credit() {
        let w = SendWindows::new(Duration::from_millis(50));
        w.set_initial(16 * 1024);
        assert_eq!(w.acquire(1, 100_000).await, Some(16 * 1024));
        // A peer that flow-controls is waited for, however long.
        assert!(blocked(&w, 1, LONG).await);
        w.update(1, 1000);
        assert_eq!(w.acquire(1, 5000).await, Some(1000));
        // The session window (64 KiB, less what stream 1 took) bounds every stream.
        w.update(3, 1 << 20);
        let session_left = 64 * 1024 - 16 * 1024 - 1000;
        assert_eq!(w.acquire(3, 1 << 20).await, Some(session_left));
        assert!(blocked(&w, 3, LONG).await);
        w.update(0, 10);
        assert_eq!(w.acquire(3, 100).await, Some(10));
        // A smaller initial window takes stream windows below zero.
        w.update(0, 1 << 20);
        w.set_initial(1024);
        assert!(blocked(&w, 1, LONG).await);
        w.update(1, 15 * 1024 + 5);
        assert_eq!(w.acquire(1, 100).await, Some(5));
        // A stream opened now starts with the new initial window.
        assert_eq!(w.acquire(7, 1 << 20).await, Some(1024));
        // A waiting sender is woken by the update it waits for.
        let waiter = async { w.acquire(1, 50).await };
        let grant = async {
            tokio::time::sleep(LONG).await;
            w.update(1, 20);
        };
        let (got, ()) = tokio::join!(waiter, grant);
        assert_eq!(got, Some(20));
        w.close();
        assert_eq!(w.acquire(1, 1).await, None);
    }

    #[tokio::test]
    async fn a_peer_that_never_sends_credit_is_not_flow_controlled() {
        let grace = Duration::from_millis(100);
        let w = SendWindows::new(grace);
        assert_eq!(w.acquire(1, 1 << 20).await, Some(64 * 1024));
        let t = tokio::time::Instant::now();
        assert_eq!(w.acquire(1, 1000).await, Some(1000));
        assert!(t.elapsed() >= grace, "{:?}", t.elapsed());
        // From then on nothing waits.
        let t = tokio::time::Instant::now();
        assert_eq!(w.acquire(3, 1 << 20).await, Some(1 << 20));
        assert!(t.elapsed() < grace, "{:?}", t.elapsed());
        // Should it start sending credit, its windows count again (all that was sent).
        w.update(1, 1);
        assert!(blocked(&w, 1, LONG).await);
    }

    /// A target that writes `n` pattern bytes and closes: its port.
    async fn target(n: usize) -> u16 {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = l.local_addr().expect("addr").port();
        tokio::spawn(async move {
            if let Ok((mut s, _)) = l.accept().await {
                let data: Vec<u8> = (0..n).map(|i| (i % 251) as u8).collect();
                let _ = s.write_all(&data).await;
                let _ = s.shutdown().await;
            }
        });
        port
    }

    /// The tunnel sends a flow-controlling client no byte beyond the credit it granted, and
    /// waits for more rather than giving up.
    #[tokio::test]
    async fn tunnel_sends_no_more_than_the_window_a_flow_controlling_client_grants() {
        const TOTAL: usize = 200 * 1024;
        const WINDOW: u32 = 16 * 1024;
        let port = target(TOTAL).await.to_string();
        let (client, server) = tokio::io::duplex(1 << 20);
        let tunnel = tokio::spawn(serve_tunnel_with(
            server,
            "127.0.0.1".into(),
            Duration::from_millis(100),
        ));
        let (rd, mut wr) = tokio::io::split(client);
        let mut rd = MessageReader::new(rd);
        let mut codec = Codec::new();
        let send = |frame: Vec<u8>| encode_frame(OP_BINARY, &frame, Some([1, 2, 3, 4]));
        let mut hello = send(settings_frame(WINDOW));
        for (id, kind) in [(1, "error"), (3, "data")] {
            let f = codec.syn_stream(
                id,
                &[("streamtype", kind), ("port", &port), ("requestid", "0")],
            );
            hello.extend_from_slice(&send(f));
        }
        wr.write_all(&hello).await.expect("hello");
        let mut buf = Vec::new();
        let mut got = Vec::new();
        let mut granted = u64::from(WINDOW);
        let mut checked_stall = false;
        loop {
            let frame = loop {
                if let Some(f) = codec.parse(&mut buf).expect("frame") {
                    break f;
                }
                let wait = if got.len() as u64 == granted && !checked_stall {
                    // Spent: nothing more may come until we grant it.
                    Duration::from_millis(400)
                } else {
                    Duration::from_secs(20)
                };
                match tokio::time::timeout(wait, rd.next()).await {
                    Ok(Ok((_, msg))) => buf.extend_from_slice(&msg),
                    Ok(Err(e)) => panic!("tunnel closed: {e}"),
                    Err(_) if wait < Duration::from_secs(1) => {
                        checked_stall = true;
                        let mut more = send(window_update_frame(3, WINDOW));
                        more.extend_from_slice(&send(window_update_frame(0, WINDOW)));
                        wr.write_all(&more).await.expect("credit");
                        granted += u64::from(WINDOW);
                    }
                    Err(_) => panic!("stalled at {} of {TOTAL} bytes", got.len()),
                }
            };
            if let Frame::Data { id: 3, fin, data } = frame {
                got.extend_from_slice(&data);
                assert!(
                    got.len() as u64 <= granted,
                    "sent {} bytes with {granted} granted",
                    got.len()
                );
                if fin {
                    break;
                }
                if got.len() as u64 == granted && checked_stall {
                    // Stream and session credit as a client that consumed it would give.
                    let mut more = send(window_update_frame(3, WINDOW));
                    more.extend_from_slice(&send(window_update_frame(0, WINDOW)));
                    wr.write_all(&more).await.expect("credit");
                    granted += u64::from(WINDOW);
                }
            }
        }
        assert!(checked_stall, "the window was never spent");
        assert_eq!(got.len(), TOTAL);
        assert!(got.iter().enumerate().all(|(i, b)| *b == (i % 251) as u8));
        // The client goes: the session ends.
        drop((rd, wr));
        tokio::time::timeout(Duration::from_secs(10), tunnel)
            .await
            .expect("session ends with its connection")
            .expect("tunnel task")
            .expect("tunnel");
    }
}
