//! Client histories: every operation with its invocation and response time, written as JSON
//! lines (one operation per line, porcupine-like: `client`, `call`, `return`, `input`,
//! `output`) so other checkers can re-check them.
use std::io::{BufRead, Write};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

/// What a client asked for. Values written are unique per history, so a value read names the
/// write that produced it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Input {
    /// `Put(key, value)`.
    Put {
        /// Key.
        key: String,
        /// Value (unique).
        value: String,
    },
    /// Single-key `Range`.
    Get {
        /// Key.
        key: String,
        /// Serializable (member-local) rather than linearizable.
        serializable: bool,
    },
    /// `Txn(if value(key) == expect (or key absent when None) then put(key, value))`.
    Cas {
        /// Key.
        key: String,
        /// Expected current value; `None` = create-if-absent (`version == 0`).
        expect: Option<String>,
        /// New value (unique).
        value: String,
    },
}

impl Input {
    /// The key the operation touches.
    pub fn key(&self) -> &str {
        match self {
            Input::Put { key, .. } | Input::Get { key, .. } | Input::Cas { key, .. } => key,
        }
    }

    /// The value this operation writes, if any.
    pub fn written(&self) -> Option<&str> {
        match self {
            Input::Put { value, .. } | Input::Cas { value, .. } => Some(value),
            Input::Get { .. } => None,
        }
    }
}

/// What the store answered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Output {
    /// Put acknowledged at `revision`.
    Put {
        /// Header revision (= the key's new mod revision).
        revision: i64,
    },
    /// Read result.
    Get {
        /// Value, `None` if absent.
        value: Option<String>,
        /// The key's mod revision (0 if absent).
        mod_revision: i64,
        /// Header revision of the response.
        revision: i64,
    },
    /// Txn result.
    Cas {
        /// Whether the compare held (and the put happened).
        succeeded: bool,
        /// Header revision.
        revision: i64,
    },
    /// The request failed or timed out: a write may or may not have happened; a failed read is
    /// dropped by the checkers.
    Unknown {
        /// Error text.
        error: String,
    },
}

impl Output {
    /// Header revision of a definite response.
    pub fn revision(&self) -> Option<i64> {
        match self {
            Output::Put { revision }
            | Output::Get { revision, .. }
            | Output::Cas { revision, .. } => Some(*revision),
            Output::Unknown { .. } => None,
        }
    }
}

/// One completed operation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Operation {
    /// Client (session) id.
    pub client: u64,
    /// Member the client sent the request to.
    #[serde(default)]
    pub member: usize,
    /// Invocation time, ns since the history's start.
    pub call: u64,
    /// Response time, ns since the history's start.
    #[serde(rename = "return")]
    pub ret: u64,
    /// Request.
    pub input: Input,
    /// Response.
    pub output: Output,
}

/// A thread-safe history recorder.
#[derive(Debug, Clone)]
pub struct Recorder {
    start: tokio::time::Instant,
    ops: Arc<Mutex<Vec<Operation>>>,
}

impl Default for Recorder {
    fn default() -> Self {
        Self::new()
    }
}

impl Recorder {
    /// A recorder whose time 0 is now.
    pub fn new() -> Self {
        Self {
            start: tokio::time::Instant::now(),
            ops: Arc::default(),
        }
    }

    /// Nanoseconds since the start.
    pub fn now(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// Records a completed operation.
    pub fn record(&self, op: Operation) {
        self.ops.lock().unwrap_or_else(|p| p.into_inner()).push(op);
    }

    /// A copy of everything recorded so far, in response order.
    pub fn snapshot(&self) -> Vec<Operation> {
        self.ops.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Writes the history to `path` as JSON lines.
pub fn write_file(ops: &[Operation], path: &std::path::Path) -> std::io::Result<()> {
    let f = std::fs::File::create(path)?;
    write_jsonl(ops, std::io::BufWriter::new(f))
}

/// Writes a history as JSON lines.
pub fn write_jsonl(ops: &[Operation], mut w: impl Write) -> std::io::Result<()> {
    for op in ops {
        serde_json::to_writer(&mut w, op)?;
        w.write_all(b"\n")?;
    }
    w.flush()
}

/// Reads a history written by [`write_jsonl`]; blank lines are skipped.
pub fn read_jsonl(r: impl BufRead) -> anyhow::Result<Vec<Operation>> {
    let mut ops = Vec::new();
    for (i, line) in r.lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        ops.push(
            serde_json::from_str(&line)
                .map_err(|e| anyhow::anyhow!("history line {}: {e}", i + 1))?,
        );
    }
    Ok(ops)
}
