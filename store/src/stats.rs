//! Cheap counters of where a member's write path spends its time (log flushes, state-machine
//! applies, group-commit proposals). Read through [`crate::NodeMetrics`] and logged at debug
//! level under the `store::stats` target, so a profile of a live member needs no tooling.
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// A phase at least this slow is logged on its own (target `store::stats`, debug), with its
/// time, so stalls can be lined up across members ([`crate::Tunables::slow_phase`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct SlowPhase(pub(crate) Duration);

impl Default for SlowPhase {
    fn default() -> Self {
        SlowPhase(crate::Tunables::default().slow_phase)
    }
}

/// Upper bounds (ms) of the [`Histogram`] buckets; the last bucket is everything above.
const BUCKETS_MS: [u64; 8] = [1, 2, 4, 8, 16, 32, 64, 128];

/// Counts of durations by power-of-two milliseconds: where the tail of a phase is.
#[derive(Debug, Default)]
pub(crate) struct Histogram {
    counts: [AtomicU64; BUCKETS_MS.len() + 1],
}

impl Histogram {
    /// Counts `d`; logs it when at least `slow`.
    pub(crate) fn observe(&self, what: &'static str, d: Duration, slow: SlowPhase) {
        let ms = d.as_millis() as u64;
        let i = BUCKETS_MS
            .iter()
            .position(|b| ms < *b)
            .unwrap_or(BUCKETS_MS.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        if d >= slow.0 {
            tracing::debug!(target: "store::stats", phase = what, ms = d.as_secs_f64() * 1e3, "slow");
        }
    }

    /// `<1ms:N <2ms:N ... >128ms:N`, empty buckets left out.
    fn summary(&self) -> String {
        let mut out = String::new();
        for (i, c) in self.counts.iter().enumerate() {
            let n = c.load(Ordering::Relaxed);
            if n == 0 {
                continue;
            }
            let label = match BUCKETS_MS.get(i) {
                Some(b) => format!("<{b}"),
                None => format!(">={}", BUCKETS_MS[BUCKETS_MS.len() - 1]),
            };
            out.push_str(&format!(" {label}:{n}"));
        }
        out
    }
}

/// Counters shared by the log store, the state machine and the batcher of one member.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    /// Phases at least this slow are logged one by one.
    pub(crate) slow: SlowPhase,
    /// Log appends flushed (one sled flush each).
    pub(crate) log_flushes: AtomicU64,
    /// Total and worst time spent in those flushes.
    pub(crate) log_flush_ns: AtomicU64,
    pub(crate) log_flush_max_ns: AtomicU64,
    /// Raft entries applied to the state machine and the time it took.
    pub(crate) applied_entries: AtomicU64,
    pub(crate) apply_ns: AtomicU64,
    /// Group-commit proposals and their time from proposal to applied reply.
    pub(crate) proposals: AtomicU64,
    pub(crate) proposal_ns: AtomicU64,
    /// Last log index covered by the durable snapshot (the persisted state machine). Not a
    /// counter: the log store waits for it before purging (see `SledLogStore::purge`).
    pub(crate) snapshot_durable: AtomicU64,
    pub(crate) snapshot_durable_changed: tokio::sync::Notify,
    /// The state machine failed (its storage calls error): nothing waits for it any more.
    pub(crate) sm_failed: std::sync::atomic::AtomicBool,
    /// Log flushes: write plus `fdatasync` as the WAL thread saw them (also served as
    /// `etcd_disk_wal_fsync_duration_seconds`).
    pub(crate) h_log_sync: Histogram,
    /// Follower: an AppendEntries request from receipt to answer.
    pub(crate) h_follower_append: Histogram,
    /// Leader: group-commit proposal from `client_write` to its applied reply.
    pub(crate) h_proposal: Histogram,
    /// Leader: a write from its submission to the batcher to its reply.
    pub(crate) h_write: Histogram,
    /// Times the known leader changed to another member (etcd's
    /// `etcd_server_leader_changes_seen_total`).
    pub(crate) leader_changes: AtomicU64,
}

impl Stats {
    /// Records that the state machine failed and wakes whoever waits for it.
    pub(crate) fn sm_failed(&self) {
        self.sm_failed.store(true, Ordering::SeqCst);
        self.snapshot_durable_changed.notify_waiters();
    }

    /// Records that the snapshot up to `index` is durable.
    pub(crate) fn snapshot_durable_at(&self, index: u64) {
        self.snapshot_durable.fetch_max(index, Ordering::SeqCst);
        self.snapshot_durable_changed.notify_waiters();
    }

    /// Adds the time since `start` to `total` (and to `max` when given).
    pub(crate) fn record(total: &AtomicU64, max: Option<&AtomicU64>, start: Instant) {
        let ns = u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX);
        total.fetch_add(ns, Ordering::Relaxed);
        if let Some(m) = max {
            m.fetch_max(ns, Ordering::Relaxed);
        }
    }

    /// The log flushes as a Prometheus histogram named `name` (seconds; the buckets are
    /// [`BUCKETS_MS`], cumulative as Prometheus wants them).
    pub(crate) fn write_flush_histogram(&self, out: &mut String, name: &str) {
        use std::fmt::Write as _;
        let _ = writeln!(
            out,
            "# HELP {name} The latency distributions of the log's fdatasync.\n# TYPE {name} histogram"
        );
        let mut cumulative = 0;
        for (i, c) in self.h_log_sync.counts.iter().enumerate() {
            cumulative += c.load(Ordering::Relaxed);
            let le = BUCKETS_MS.get(i).map_or_else(
                || "+Inf".to_owned(),
                |ms| format!("{}", *ms as f64 / 1000.0),
            );
            let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {cumulative}");
        }
        let sum = self.log_flush_ns.load(Ordering::Relaxed) as f64 / 1e9;
        let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {cumulative}");
    }

    /// One line for the debug log.
    pub(crate) fn summary(&self) -> String {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let avg_us = |total: u64, n: u64| total.checked_div(n).unwrap_or(0) / 1000;
        format!(
            "log flushes {} (avg {} µs, max {} µs); applied entries {} (avg {} µs); proposals {} (avg {} µs)",
            g(&self.log_flushes),
            avg_us(g(&self.log_flush_ns), g(&self.log_flushes)),
            g(&self.log_flush_max_ns) / 1000,
            g(&self.applied_entries),
            avg_us(g(&self.apply_ns), g(&self.applied_entries)),
            g(&self.proposals),
            avg_us(g(&self.proposal_ns), g(&self.proposals)),
        ) + &format!(
            "; ms histograms: log sync{}; follower append{}; proposal{}; write{}",
            self.h_log_sync.summary(),
            self.h_follower_append.summary(),
            self.h_proposal.summary(),
            self.h_write.summary(),
        )
    }
}
