//! Container stdout/stderr to a log file in the Kubernetes CRI format, with size-based rotation.
//!
//! Each line is written as `<RFC3339Nano> <stdout|stderr> <F|P> <text>\n`: `F` ends a line, `P`
//! is a chunk of a line longer than [`MAX_LINE`]. The file is opened on the first write, so pods
//! that print nothing cost no file, and rotated to `<path>.1`, `<path>.2`, ... past `max_bytes`.
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::SystemTime;

use bytes::Bytes;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};

use super::time::rfc3339_nanos;

/// Lines longer than this are split into `P` chunks, as containerd does.
pub(crate) const MAX_LINE: usize = 16 * 1024;

/// Where and how much to log.
#[derive(Debug, Clone)]
pub(crate) struct LogPolicy {
    /// Rotate when the current file would grow past this.
    pub(crate) max_bytes: u64,
    /// Files kept, the current one included.
    pub(crate) max_files: u32,
}

struct SinkState {
    file: Option<File>,
    size: u64,
    partial: [Vec<u8>; 2],
    write_errors: u64,
}

/// The log of one container; shared by its stdout and stderr streams.
pub(crate) struct LogSink {
    path: PathBuf,
    policy: LogPolicy,
    state: Mutex<SinkState>,
    /// Raw output as written, `(0 stdout | 1 stderr, bytes)`, for `kubectl attach` sessions.
    tap: tokio::sync::broadcast::Sender<(u8, Bytes)>,
}

#[derive(Clone, Copy)]
enum Stream {
    Stdout = 0,
    Stderr = 1,
}

impl Stream {
    fn name(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

impl LogSink {
    pub(crate) fn new(path: PathBuf, policy: LogPolicy) -> Arc<Self> {
        Arc::new(LogSink {
            path,
            policy,
            state: Mutex::new(SinkState {
                file: None,
                size: 0,
                partial: [Vec::new(), Vec::new()],
                write_errors: 0,
            }),
            tap: tokio::sync::broadcast::channel(256).0,
        })
    }

    /// The container's output from now on, as written (attach).
    pub(crate) fn subscribe(&self) -> tokio::sync::broadcast::Receiver<(u8, Bytes)> {
        self.tap.subscribe()
    }

    pub(crate) fn stdout(self: &Arc<Self>) -> CriStream {
        CriStream {
            sink: self.clone(),
            stream: Stream::Stdout,
        }
    }

    pub(crate) fn stderr(self: &Arc<Self>) -> CriStream {
        CriStream {
            sink: self.clone(),
            stream: Stream::Stderr,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SinkState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(&self, stream: Stream, bytes: &[u8]) {
        if self.tap.receiver_count() > 0 {
            let _ = self.tap.send((stream as u8, Bytes::copy_from_slice(bytes)));
        }
        let mut st = self.lock();
        let ts = rfc3339_nanos(SystemTime::now());
        let mut out = Vec::new();
        let buf = &mut st.partial[stream as usize];
        buf.extend_from_slice(bytes);
        let mut start = 0;
        while let Some(nl) = buf[start..].iter().position(|&b| b == b'\n') {
            push_line(&mut out, &ts, stream, &buf[start..start + nl], 'F');
            start += nl + 1;
        }
        while buf.len() - start >= MAX_LINE {
            push_line(&mut out, &ts, stream, &buf[start..start + MAX_LINE], 'P');
            start += MAX_LINE;
        }
        buf.drain(..start);
        if !out.is_empty() {
            self.append(&mut st, &out);
        }
    }

    /// Writes out unterminated lines; called when the container ends.
    pub(crate) fn close(&self) {
        let mut st = self.lock();
        let ts = rfc3339_nanos(SystemTime::now());
        let mut out = Vec::new();
        for stream in [Stream::Stdout, Stream::Stderr] {
            let buf = std::mem::take(&mut st.partial[stream as usize]);
            if !buf.is_empty() {
                push_line(&mut out, &ts, stream, &buf, 'F');
            }
        }
        if !out.is_empty() {
            self.append(&mut st, &out);
        }
        st.file = None;
    }

    fn append(&self, st: &mut SinkState, data: &[u8]) {
        if st.file.is_none() && !self.open(st) {
            return;
        }
        if st.size > 0 && st.size + data.len() as u64 > self.policy.max_bytes {
            st.file = None;
            if let Err(e) = rotate(&self.path, self.policy.max_files) {
                tracing::warn!(path = %self.path.display(), error = %e, "log rotation failed");
            }
            if !self.open(st) {
                return;
            }
        }
        if let Some(f) = st.file.as_mut() {
            match f.write_all(data) {
                Ok(()) => st.size += data.len() as u64,
                Err(_) => st.write_errors += 1,
            }
        }
    }

    fn open(&self, st: &mut SinkState) -> bool {
        match open_log(&self.path) {
            Ok(f) => {
                st.size = f.metadata().map(|m| m.len()).unwrap_or(0);
                st.file = Some(f);
                true
            }
            Err(e) => {
                st.write_errors += 1;
                if st.write_errors == 1 {
                    tracing::warn!(path = %self.path.display(), error = %e, "cannot open log");
                }
                false
            }
        }
    }
}

fn push_line(out: &mut Vec<u8>, ts: &str, stream: Stream, line: &[u8], tag: char) {
    out.extend_from_slice(ts.as_bytes());
    out.push(b' ');
    out.extend_from_slice(stream.name().as_bytes());
    out.push(b' ');
    out.push(tag as u8);
    out.push(b' ');
    out.extend_from_slice(line);
    out.push(b'\n');
}

fn open_log(path: &Path) -> std::io::Result<File> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    OpenOptions::new().create(true).append(true).open(path)
}

fn rotated(path: &Path, n: u32) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(format!(".{n}"));
    PathBuf::from(s)
}

fn rotate(path: &Path, max_files: u32) -> std::io::Result<()> {
    let keep = max_files.max(1) - 1;
    if keep == 0 {
        return std::fs::remove_file(path);
    }
    let _ = std::fs::remove_file(rotated(path, keep));
    for n in (1..keep).rev() {
        let from = rotated(path, n);
        if from.exists() {
            std::fs::rename(&from, rotated(path, n + 1))?;
        }
    }
    std::fs::rename(path, rotated(path, 1))
}

/// Reads the rotated files (oldest first) then the current one.
pub(crate) fn read_all(path: &Path, max_files: u32) -> std::io::Result<String> {
    let mut out = String::new();
    for n in (1..max_files.max(1)).rev() {
        if let Ok(s) = std::fs::read(rotated(path, n)) {
            out.push_str(&String::from_utf8_lossy(&s));
        }
    }
    match std::fs::read(path) {
        Ok(s) => out.push_str(&String::from_utf8_lossy(&s)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    Ok(out)
}

/// One of a container's output streams, handed to WASI.
#[derive(Clone)]
pub(crate) struct CriStream {
    sink: Arc<LogSink>,
    stream: Stream,
}

impl IsTerminal for CriStream {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for CriStream {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }
    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for CriStream {
    async fn ready(&mut self) {}
}

impl OutputStream for CriStream {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.sink.write(self.stream, &bytes);
        Ok(())
    }
    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }
    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(64 * 1024)
    }
}

impl tokio::io::AsyncWrite for CriStream {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.sink.write(self.stream, buf);
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_cri_lines_and_rotates() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("c/0.log");
        let sink = LogSink::new(
            path.clone(),
            LogPolicy {
                max_bytes: 400,
                max_files: 3,
            },
        );
        assert!(!path.exists(), "log file is created lazily");
        sink.write(Stream::Stdout, b"hello ");
        sink.write(Stream::Stderr, b"oops\n");
        sink.write(Stream::Stdout, b"world\nnext");
        sink.close();
        let text = read_all(&path, 3).expect("read");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(lines[0].ends_with(" stderr F oops"), "{}", lines[0]);
        assert!(lines[1].ends_with(" stdout F hello world"), "{}", lines[1]);
        assert!(lines[2].ends_with(" stdout F next"), "{}", lines[2]);

        let long = vec![b'x'; MAX_LINE + 10];
        let sink = LogSink::new(
            dir.path().join("long.log"),
            LogPolicy {
                max_bytes: 1 << 20,
                max_files: 2,
            },
        );
        sink.write(Stream::Stdout, &long);
        sink.write(Stream::Stdout, b"\n");
        let text = read_all(&dir.path().join("long.log"), 2).expect("read");
        let tags: Vec<&str> = text
            .lines()
            .map(|l| l.split(' ').nth(2).unwrap_or(""))
            .collect();
        assert_eq!(tags, ["P", "F"]);

        for i in 0..100 {
            sink_line(&path, i);
        }
        let text = read_all(&path, 3).expect("read");
        assert!(text.contains("line 99"));
        assert!(!text.contains("line 0\n"), "oldest lines rotated away");
        assert!(rotated(&path, 2).exists());
        assert!(
            !rotated(&path, 3).exists(),
            "max_files bounds the rotated set"
        );
        let total: u64 = [path.clone(), rotated(&path, 1), rotated(&path, 2)]
            .iter()
            .map(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
            .sum();
        assert!(total <= 3 * 400, "rotation bounds disk use: {total}");
    }

    fn sink_line(path: &Path, i: u32) {
        let sink = LogSink::new(
            path.to_owned(),
            LogPolicy {
                max_bytes: 400,
                max_files: 3,
            },
        );
        sink.write(Stream::Stdout, format!("line {i}\n").as_bytes());
    }
}
