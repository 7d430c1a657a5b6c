//! WebSocket (RFC 6455) framing and the Kubernetes channel protocol (`v5.channel.k8s.io`,
//! `v4.channel.k8s.io`) for streaming exec and attach.
//!
//! Each binary message carries one channel byte, then data: 0 stdin (client to server), 1
//! stdout, 2 stderr, 3 the final `Status` (JSON), 4 terminal resize (`{"Width":w,"Height":h}`),
//! and in v5 only 255, the close signal: `[255, n]` says the client closed channel `n` (its
//! stdin). The agent serves it ([`serve_session`]) and, towards containerd's streaming
//! server, speaks its client side ([`ChannelClient`]).
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

use crate::pod_runtime::{RuntimeError, SessionIo, TerminalSize};

pub(crate) const OP_CONT: u8 = 0x0;
pub(crate) const OP_TEXT: u8 = 0x1;
pub(crate) const OP_BINARY: u8 = 0x2;
pub(crate) const OP_CLOSE: u8 = 0x8;
pub(crate) const OP_PING: u8 = 0x9;
pub(crate) const OP_PONG: u8 = 0xA;

/// Largest message accepted from the peer (stdin chunks, statuses, resize events).
const MAX_MESSAGE: usize = 1 << 20;

/// Chunk size of output messages, so no single message gets large.
const CHUNK: usize = 32 * 1024;

/// Subprotocols served, most preferred first (same framing; v5 adds the close signal).
pub(crate) const PROTOCOLS: &[&str] = &["v5.channel.k8s.io", "v4.channel.k8s.io"];

/// The channel-protocol version agreed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Version {
    V4,
    V5,
}

/// The subprotocol to answer with, if the client offers one we serve.
pub(crate) fn choose_protocol(offered: &str) -> Option<(&'static str, Version)> {
    let offered: Vec<&str> = offered.split(',').map(str::trim).collect();
    PROTOCOLS
        .iter()
        .copied()
        .find(|p| offered.contains(p))
        .map(|p| {
            let v = if p.starts_with("v5") {
                Version::V5
            } else {
                Version::V4
            };
            (p, v)
        })
}

/// The WebSocket `Sec-WebSocket-Accept` for a client key.
pub(crate) fn accept_key(key: &str) -> String {
    use base64::Engine as _;
    use sha1::Digest as _;
    let mut h = sha1::Sha1::new();
    h.update(key.trim().as_bytes());
    h.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    base64::engine::general_purpose::STANDARD.encode(h.finalize())
}

/// One frame with FIN set; masked with `mask` (clients must mask, servers must not).
pub(crate) fn encode_frame(opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut f = Vec::with_capacity(payload.len() + 14);
    f.push(0x80 | opcode);
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => f.push(mask_bit | u8::try_from(n).unwrap_or(0)),
        n if n <= 0xFFFF => {
            f.push(mask_bit | 126);
            f.extend_from_slice(&u16::try_from(n).unwrap_or(0).to_be_bytes());
        }
        n => {
            f.push(mask_bit | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    match mask {
        Some(m) => {
            f.extend_from_slice(&m);
            f.extend(payload.iter().enumerate().map(|(i, b)| b ^ m[i % 4]));
        }
        None => f.extend_from_slice(payload),
    }
    f
}

/// Reads one frame: `(fin, opcode, payload)` with any mask removed.
pub(crate) async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
) -> std::io::Result<(bool, u8, Vec<u8>)> {
    let mut head = [0u8; 2];
    r.read_exact(&mut head).await?;
    let fin = head[0] & 0x80 != 0;
    let opcode = head[0] & 0x0F;
    let masked = head[1] & 0x80 != 0;
    let len = match head[1] & 0x7F {
        126 => {
            let mut b = [0u8; 2];
            r.read_exact(&mut b).await?;
            u64::from(u16::from_be_bytes(b))
        }
        127 => {
            let mut b = [0u8; 8];
            r.read_exact(&mut b).await?;
            u64::from_be_bytes(b)
        }
        n => u64::from(n),
    };
    let len = usize::try_from(len)
        .ok()
        .filter(|l| *l <= MAX_MESSAGE)
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, "frame too large"))?;
    let mut mask = [0u8; 4];
    if masked {
        r.read_exact(&mut mask).await?;
    }
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).await?;
    if masked {
        for (i, b) in payload.iter_mut().enumerate() {
            *b ^= mask[i % 4];
        }
    }
    Ok((fin, opcode, payload))
}

/// Reads whole messages (continuation frames joined) and control frames, which may arrive
/// between the fragments of a message.
pub(crate) struct MessageReader<R> {
    inner: R,
    partial: Option<(u8, Vec<u8>)>,
}

impl<R: AsyncRead + Unpin> MessageReader<R> {
    pub(crate) fn new(inner: R) -> Self {
        MessageReader {
            inner,
            partial: None,
        }
    }

    /// The next message or control frame: `(opcode, payload)`.
    pub(crate) async fn next(&mut self) -> std::io::Result<(u8, Vec<u8>)> {
        loop {
            let (fin, op, data) = read_frame(&mut self.inner).await?;
            if op >= 0x8 {
                return Ok((op, data));
            }
            let (op, mut buf) = match (self.partial.take(), op) {
                (Some((first, mut buf)), OP_CONT) => {
                    buf.extend_from_slice(&data);
                    (first, buf)
                }
                (_, op) => (op, data),
            };
            if buf.len() > MAX_MESSAGE {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "message too large",
                ));
            }
            if fin {
                return Ok((op, std::mem::take(&mut buf)));
            }
            self.partial = Some((op, buf));
        }
    }
}

fn channel_message(channel: u8, data: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(data.len() + 1);
    m.push(channel);
    m.extend_from_slice(data);
    m
}

/// The final `Status` of an exec or attach: `Success`, `NonZeroExitCode` with an `ExitCode`
/// cause (kubectl exits with it), or the failure that kept the command from running.
pub(crate) fn exit_status(command: &[String], outcome: &Result<i32, RuntimeError>) -> Value {
    match outcome {
        Ok(0) => json!({"metadata": {}, "status": "Success"}),
        Ok(code) => json!({
            "metadata": {},
            "status": "Failure",
            "message": format!(
                "command terminated with non-zero exit code: error executing command [{}], exit code {code}",
                command.join(" ")
            ),
            "reason": "NonZeroExitCode",
            "details": {"causes": [{"reason": "ExitCode", "message": code.to_string()}]},
        }),
        Err(e) => json!({
            "metadata": {}, "status": "Failure", "message": e.to_string(),
            "reason": "InternalError", "code": 500,
        }),
    }
}

/// The exit code a `Status` from the channel protocol stands for.
pub(crate) fn code_of_status(st: &Value) -> Result<i32, RuntimeError> {
    if st["status"] == "Success" {
        return Ok(0);
    }
    if st["reason"] == "NonZeroExitCode"
        && let Some(code) = st
            .pointer("/details/causes")
            .and_then(Value::as_array)
            .and_then(|cs| cs.iter().find(|c| c["reason"] == "ExitCode"))
            .and_then(|c| c["message"].as_str())
            .and_then(|m| m.parse().ok())
    {
        return Ok(code);
    }
    Err(RuntimeError::Transient(
        st["message"]
            .as_str()
            .unwrap_or("the streaming server reported a failure")
            .to_owned(),
    ))
}

/// What the client asked for.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Wanted {
    pub stdin: bool,
    pub stdout: bool,
    pub stderr: bool,
    pub tty: bool,
}

type Shared<W> = Arc<tokio::sync::Mutex<W>>;

async fn send<W: AsyncWrite + Unpin>(w: &Shared<W>, frame: &[u8]) -> std::io::Result<()> {
    let mut w = w.lock().await;
    w.write_all(frame).await?;
    w.flush().await
}

/// Copies `r` to channel `ch` until end of file.
async fn pump<R, W>(mut r: R, ch: u8, w: Shared<W>)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; CHUNK + 1];
    loop {
        buf[0] = ch;
        match r.read(&mut buf[1..]).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if send(&w, &encode_frame(OP_BINARY, &buf[..=n], None))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        }
    }
}

/// Serves one exec or attach session over an upgraded connection: builds the [`SessionIo`]
/// the client asked for, runs `run` with it while relaying stdin, resize and output, then
/// sends the final status on channel 3 and closes. If the client goes away first, `run`'s
/// future is dropped (which ends what it started). Pings are answered throughout (client-go
/// drops a connection whose pings go unanswered).
pub(crate) async fn serve_session<IO, F, Fut>(
    io: IO,
    version: Version,
    want: Wanted,
    command: Vec<String>,
    run: F,
) -> std::io::Result<()>
where
    IO: AsyncRead + AsyncWrite + Send + 'static,
    F: FnOnce(SessionIo) -> Fut,
    Fut: Future<Output = Result<i32, RuntimeError>>,
{
    let (rd, wr) = tokio::io::split(io);
    let mut rd = MessageReader::new(rd);
    let wr = Arc::new(tokio::sync::Mutex::new(wr));
    let mut session = SessionIo {
        tty: want.tty,
        ..SessionIo::default()
    };
    let mut stdin_tx = None;
    if want.stdin {
        let (tx, rx) = tokio::io::duplex(64 * 1024);
        stdin_tx = Some(tx);
        session.stdin = Some(Box::pin(rx));
    }
    let mut resize_tx = None;
    if want.tty {
        let (tx, rx) = tokio::sync::mpsc::channel::<TerminalSize>(8);
        resize_tx = Some(tx);
        session.resize = Some(rx);
    }
    let mut pumps = tokio::task::JoinSet::new();
    for (ch, wanted) in [(1u8, want.stdout), (2u8, want.stderr && !want.tty)] {
        if wanted {
            let (w, r) = tokio::io::duplex(64 * 1024);
            if ch == 1 {
                session.stdout = Some(Box::pin(w));
            } else {
                session.stderr = Some(Box::pin(w));
            }
            pumps.spawn(pump(r, ch, wr.clone()));
        }
    }
    let gone = tokio_util::sync::CancellationToken::new();
    let reader = {
        let wr = wr.clone();
        let gone = gone.clone();
        tokio::spawn(async move {
            loop {
                match rd.next().await {
                    Ok((OP_PING, data)) => {
                        if send(&wr, &encode_frame(OP_PONG, &data, None))
                            .await
                            .is_err()
                        {
                            break;
                        }
                    }
                    Ok((OP_CLOSE, _)) | Err(_) => break,
                    Ok((OP_BINARY | OP_TEXT, data)) => match data.split_first() {
                        Some((0, rest)) => {
                            if let Some(tx) = stdin_tx.as_mut()
                                && tx.write_all(rest).await.is_err()
                            {
                                stdin_tx = None;
                            }
                        }
                        Some((4, rest)) => {
                            let v: Value = serde_json::from_slice(rest).unwrap_or(Value::Null);
                            let dim = |k: &str| {
                                v[k].as_u64()
                                    .and_then(|n| u16::try_from(n).ok())
                                    .unwrap_or(0)
                            };
                            if let Some(tx) = &resize_tx {
                                let _ = tx.try_send(TerminalSize {
                                    width: dim("Width"),
                                    height: dim("Height"),
                                });
                            }
                        }
                        Some((255, [0])) if version == Version::V5 => {
                            // The client closed its stdin: end of file for the process.
                            if let Some(mut tx) = stdin_tx.take() {
                                let _ = tx.shutdown().await;
                            }
                        }
                        _ => {}
                    },
                    Ok(_) => {}
                }
            }
            drop(stdin_tx);
            gone.cancel();
        })
    };
    let outcome = tokio::select! {
        r = run(session) => Some(r),
        () = gone.cancelled() => None,
    };
    let Some(outcome) = outcome else {
        pumps.abort_all();
        let _ = wr.lock().await.shutdown().await;
        return Ok(());
    };
    // Output the process wrote is still on its way: let the pumps drain (their writers are
    // gone with the process), bounded in case something kept one alive.
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while pumps.join_next().await.is_some() {}
    })
    .await;
    pumps.abort_all();
    let status = exit_status(&command, &outcome);
    send(
        &wr,
        &encode_frame(
            OP_BINARY,
            &channel_message(3, status.to_string().as_bytes()),
            None,
        ),
    )
    .await?;
    // kubectl closes the connection itself once it has the status; closing first races its
    // last terminal-size write ("Encoding terminal size failed"). So wait a little for that,
    // then close 1000 (normal closure) and give the client a moment to answer.
    let mut reader = reader;
    if tokio::time::timeout(Duration::from_millis(500), &mut reader)
        .await
        .is_err()
    {
        send(&wr, &encode_frame(OP_CLOSE, &1000u16.to_be_bytes(), None)).await?;
        let _ = tokio::time::timeout(Duration::from_secs(5), reader).await;
    }
    let _ = wr.lock().await.shutdown().await;
    Ok(())
}

/// Client side of the channel protocol (`v4.channel.k8s.io`) towards a CRI streaming server
/// (containerd's `Exec`/`Attach` URL), relaying a [`SessionIo`].
pub(crate) struct ChannelClient;

impl ChannelClient {
    /// Connects to `url` (`http://host:port/path`), relays `io` and returns the exit code from
    /// the server's final status.
    ///
    /// v4 has no close signal: the end of the client's stdin cannot be passed on (containerd's
    /// streaming server predates v5), so a command waiting for end of input keeps waiting.
    pub(crate) async fn relay(url: &str, io: SessionIo) -> Result<i32, RuntimeError> {
        let stream = connect(url).await?;
        let (rd, wr) = tokio::io::split(stream);
        let mut rd = MessageReader::new(rd);
        let wr = Arc::new(tokio::sync::Mutex::new(wr));
        let SessionIo {
            stdin,
            mut stdout,
            mut stderr,
            tty: _,
            resize,
        } = io;
        let mut tasks = tokio::task::JoinSet::new();
        if let Some(mut stdin) = stdin {
            let wr = wr.clone();
            tasks.spawn(async move {
                let mut buf = vec![0u8; CHUNK + 1];
                loop {
                    buf[0] = 0;
                    match stdin.read(&mut buf[1..]).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            let f = encode_frame(OP_BINARY, &buf[..=n], Some(new_mask()));
                            if send(&wr, &f).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
        if let Some(mut resize) = resize {
            let wr = wr.clone();
            tasks.spawn(async move {
                while let Some(sz) = resize.recv().await {
                    let body = json!({"Width": sz.width, "Height": sz.height}).to_string();
                    let f = encode_frame(
                        OP_BINARY,
                        &channel_message(4, body.as_bytes()),
                        Some(new_mask()),
                    );
                    if send(&wr, &f).await.is_err() {
                        return;
                    }
                }
            });
        }
        let mut status: Option<Value> = None;
        loop {
            match rd.next().await {
                Ok((OP_PING, data)) => {
                    let _ = send(&wr, &encode_frame(OP_PONG, &data, Some(new_mask()))).await;
                }
                Ok((OP_CLOSE, _)) | Err(_) => break,
                Ok((OP_BINARY | OP_TEXT, data)) => match data.split_first() {
                    Some((1, rest)) => {
                        if let Some(w) = stdout.as_mut() {
                            let _ = w.write_all(rest).await;
                            let _ = w.flush().await;
                        }
                    }
                    Some((2, rest)) => {
                        if let Some(w) = stderr.as_mut().or(stdout.as_mut()) {
                            let _ = w.write_all(rest).await;
                            let _ = w.flush().await;
                        }
                    }
                    Some((3, rest)) if !rest.is_empty() => {
                        status = serde_json::from_slice(rest).ok();
                    }
                    _ => {}
                },
                Ok(_) => {}
            }
        }
        tasks.abort_all();
        let _ = send(
            &wr,
            &encode_frame(OP_CLOSE, &1000u16.to_be_bytes(), Some(new_mask())),
        )
        .await;
        match status {
            Some(st) => code_of_status(&st),
            // The v4 server closes without a status when the command succeeded.
            None => Ok(0),
        }
    }
}

fn new_mask() -> [u8; 4] {
    use std::sync::atomic::{AtomicU32, Ordering};
    // Masking only keeps intermediaries from misreading the stream; it needs no secrecy.
    static NEXT: AtomicU32 = AtomicU32::new(0x9E37_79B9);
    NEXT.fetch_add(0x6D2B_79F5, Ordering::Relaxed).to_be_bytes()
}

/// Opens a WebSocket to `url` offering `v4.channel.k8s.io`.
async fn connect(url: &str) -> Result<tokio::io::BufReader<tokio::net::TcpStream>, RuntimeError> {
    let err = |why: String| RuntimeError::Transient(format!("streaming server {url}: {why}"));
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| err("only http:// streaming URLs are supported".into()))?;
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let path = if path.is_empty() { "/" } else { path };
    let tcp = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::net::TcpStream::connect(authority),
    )
    .await
    .map_err(|_| err("connect timed out".into()))?
    .map_err(|e| err(e.to_string()))?;
    let _ = tcp.set_nodelay(true);
    let mut s = tokio::io::BufReader::new(tcp);
    let key = {
        use base64::Engine as _;
        let mut k = [0u8; 16];
        for (i, chunk) in k.chunks_mut(4).enumerate() {
            let m = new_mask();
            chunk.copy_from_slice(&m);
            chunk[0] ^= i as u8;
        }
        base64::engine::general_purpose::STANDARD.encode(k)
    };
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Protocol: v4.channel.k8s.io\r\n\r\n"
    );
    s.get_mut()
        .write_all(req.as_bytes())
        .await
        .map_err(|e| err(e.to_string()))?;
    let head = read_upgrade_answer(&mut s).await.map_err(err)?;
    let code = head.split_whitespace().nth(1).unwrap_or_default();
    if code != "101" {
        return Err(err(format!(
            "upgrade refused: {}",
            head.lines().next().unwrap_or_default()
        )));
    }
    let accepted = head.lines().any(|l| {
        l.split_once(':').is_some_and(|(k, v)| {
            k.trim().eq_ignore_ascii_case("sec-websocket-accept") && v.trim() == accept_key(&key)
        })
    });
    if !accepted {
        return Err(err("bad Sec-WebSocket-Accept".into()));
    }
    Ok(s)
}

/// Reads an upgrade's answer (status line and headers) byte by byte through the buffer, since
/// frames may follow at once; errors are messages for the caller's error type.
pub(crate) async fn read_upgrade_answer<R>(s: &mut R) -> Result<String, String>
where
    R: tokio::io::AsyncRead + Unpin,
{
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() > 16 * 1024 {
            return Err("response headers too large".into());
        }
        let b = tokio::time::timeout(Duration::from_secs(10), s.read_u8())
            .await
            .map_err(|_| "no answer to the upgrade".to_string())?
            .map_err(|e| e.to_string())?;
        head.push(b);
    }
    Ok(String::from_utf8_lossy(&head).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn websocket_accept_key_matches_rfc6455_example() {
        // RFC 6455 §1.3.
        assert_eq!(
            accept_key("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
        assert_eq!(
            choose_protocol("v4.channel.k8s.io, v5.channel.k8s.io"),
            Some(("v5.channel.k8s.io", Version::V5))
        );
        assert_eq!(
            choose_protocol("v4.channel.k8s.io"),
            Some(("v4.channel.k8s.io", Version::V4))
        );
        assert_eq!(choose_protocol("channel.k8s.io"), None);
    }

    #[tokio::test]
    async fn frames_round_trip_masked_and_unmasked() {
        for len in [0usize, 5, 125, 126, 300, 70_000] {
            let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            for mask in [None, Some([0x12, 0x34, 0x56, 0x78])] {
                let f = encode_frame(OP_BINARY, &payload, mask);
                let (fin, op, got) = read_frame(&mut f.as_slice()).await.expect("frame");
                assert!(fin);
                assert_eq!((op, got), (OP_BINARY, payload.clone()), "len {len}");
            }
        }
        // Fragments are joined; a ping between them comes out first.
        let mut wire = vec![OP_BINARY, 2, 1, b'a'];
        wire.extend(encode_frame(OP_PING, b"p", None));
        wire.extend([0x80 | OP_CONT, 1, b'b']);
        let mut r = MessageReader::new(wire.as_slice());
        assert_eq!(r.next().await.expect("ping"), (OP_PING, b"p".to_vec()));
        assert_eq!(
            r.next().await.expect("message"),
            (OP_BINARY, vec![1, b'a', b'b'])
        );
    }

    #[test]
    fn statuses_carry_exit_codes_both_ways() {
        let cmd = vec!["sh".to_string(), "-c".into(), "exit 3".into()];
        let st = exit_status(&cmd, &Ok(3));
        assert_eq!(st["reason"], "NonZeroExitCode");
        assert_eq!(st["details"]["causes"][0]["message"], "3");
        assert_eq!(code_of_status(&st).expect("code"), 3);
        let ok = exit_status(&cmd, &Ok(0));
        assert_eq!(ok, json!({"metadata": {}, "status": "Success"}));
        assert_eq!(code_of_status(&ok).expect("code"), 0);
        let failed = exit_status(&cmd, &Err(RuntimeError::Internal("boom".into())));
        assert_eq!(failed["status"], "Failure");
        assert!(code_of_status(&failed).is_err());
    }

    /// A client side of a session over an in-memory pipe.
    async fn next_data<R: AsyncRead + Unpin>(r: &mut MessageReader<R>) -> (u8, Vec<u8>) {
        loop {
            let (op, data) = r.next().await.expect("message");
            if op == OP_BINARY {
                return (data[0], data[1..].to_vec());
            }
            if op == OP_CLOSE {
                return (0xFF, data);
            }
        }
    }

    #[tokio::test]
    async fn session_streams_stdin_to_stdout_before_the_end_and_closes_on_v5_signal() {
        let (server_io, client) = tokio::io::duplex(1 << 16);
        let (crd, mut cwr) = tokio::io::split(client);
        let mut crd = MessageReader::new(crd);
        let want = Wanted {
            stdin: true,
            stdout: true,
            stderr: true,
            tty: false,
        };
        let task = tokio::spawn(serve_session(
            server_io,
            Version::V5,
            want,
            vec!["cat".into()],
            |mut io: SessionIo| async move {
                // `cat`: copy stdin to stdout until end of file, then say goodbye on stderr.
                let mut input = io.stdin.take().expect("stdin");
                let mut out = io.stdout.take().expect("stdout");
                tokio::io::copy(&mut input, &mut out).await.expect("copy");
                let mut err = io.stderr.take().expect("stderr");
                err.write_all(b"bye").await.expect("stderr");
                Ok(7)
            },
        ));
        let mask = Some([1, 2, 3, 4]);
        cwr.write_all(&encode_frame(OP_BINARY, b"\x00hello", mask))
            .await
            .expect("stdin");
        // The echo arrives while the process still runs (stdin is open).
        assert_eq!(next_data(&mut crd).await, (1, b"hello".to_vec()));
        // A ping is answered meanwhile.
        cwr.write_all(&encode_frame(OP_PING, b"p!", mask))
            .await
            .expect("ping");
        assert_eq!(crd.next().await.expect("pong"), (OP_PONG, b"p!".to_vec()));
        // Close signal for stdin: end of file, the process ends.
        cwr.write_all(&encode_frame(OP_BINARY, &[255, 0], mask))
            .await
            .expect("close signal");
        assert_eq!(next_data(&mut crd).await, (2, b"bye".to_vec()));
        let (ch, st) = next_data(&mut crd).await;
        assert_eq!(ch, 3);
        let st: Value = serde_json::from_slice(&st).expect("status");
        assert_eq!(st["details"]["causes"][0]["message"], "7");
        assert_eq!(next_data(&mut crd).await.0, 0xFF, "close frame");
        cwr.write_all(&encode_frame(OP_CLOSE, &[], mask))
            .await
            .expect("close");
        task.await.expect("join").expect("session");
    }
}
