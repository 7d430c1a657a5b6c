//! CPU governance of a container's future: exact per-poll CPU accounting, a CFS-like quota per
//! period for `limits.cpu`, and weighted fair sharing by `requests.cpu` among the runnable
//! containers of one executor thread.
//!
//! A guest yields to its executor at every epoch tick (≈1 ms), so each `poll` is at most one
//! slice. Around each poll the thread's CPU clock is read: that is the container's CPU use,
//! host calls included. The quota is `limit × period`; when it is spent the future is not polled
//! again until the next period, and an overrun is carried as debt into it. Fair sharing is
//! stride-like: each container's virtual runtime advances by CPU time divided by its weight, and
//! a container more than [`SLACK_NS`] ahead of the least-served runnable one waits its turn.
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::time::Sleep;

use super::container::ContainerShared;
use super::time::thread_cpu_ns;

/// The CFS default period.
pub(crate) const PERIOD: Duration = Duration::from_millis(100);
/// How far (in weighted nanoseconds) a container may run ahead of the least-served one.
const SLACK_NS: u128 = 3_000_000;
/// Weight of one full core, like cgroup v1 `cpu.shares`.
pub(crate) const SHARES_PER_CORE: u64 = 1024;

/// Turns a CPU request in millicores into shares, as the kubelet does (minimum 2).
pub(crate) fn shares(request_millis: Option<u64>) -> u64 {
    match request_millis {
        Some(m) => (m * SHARES_PER_CORE / 1000).max(2),
        None => 2,
    }
}

/// CPU quota state for one container.
#[derive(Debug)]
pub(crate) struct Quota {
    quota_ns: i64,
    budget_ns: i64,
    period_end: Instant,
}

impl Quota {
    pub(crate) fn new(limit_millis: u64, now: Instant) -> Self {
        let quota_ns = (PERIOD.as_nanos() as u64).saturating_mul(limit_millis) / 1000;
        let quota_ns = i64::try_from(quota_ns).unwrap_or(i64::MAX);
        Quota {
            quota_ns,
            budget_ns: quota_ns,
            period_end: now + PERIOD,
        }
    }

    fn refill(&mut self, now: Instant) {
        if now < self.period_end {
            return;
        }
        let periods = (now - self.period_end).as_nanos() / PERIOD.as_nanos() + 1;
        let periods = u32::try_from(periods).unwrap_or(u32::MAX);
        let add = self.quota_ns.saturating_mul(i64::from(periods));
        // Unused quota does not accumulate past one period; debt is paid back first.
        self.budget_ns = self.budget_ns.saturating_add(add).min(self.quota_ns);
        self.period_end += PERIOD * periods;
    }
}

/// Runnable containers of one executor thread and their virtual runtimes.
#[derive(Default)]
pub(crate) struct Sched {
    runnable: Mutex<HashMap<u64, u128>>,
}

impl Sched {
    /// No container of this executor is runnable: the thread is idle or about to be.
    pub(crate) fn is_idle(&self) -> bool {
        self.lock().is_empty()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, u128>> {
        self.runnable
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A container future under CPU governance.
pub(crate) struct Governed<F> {
    inner: Pin<Box<F>>,
    shared: Arc<ContainerShared>,
    quota: Option<Quota>,
    throttle: Option<Pin<Box<Sleep>>>,
    sched: Arc<Sched>,
    key: u64,
    shares: u64,
    vruntime: u128,
    runnable: bool,
}

impl<F: Future> Governed<F> {
    pub(crate) fn new(
        inner: F,
        shared: Arc<ContainerShared>,
        quota: Option<Quota>,
        sched: Arc<Sched>,
        key: u64,
        shares: u64,
    ) -> Self {
        Governed {
            inner: Box::pin(inner),
            shared,
            quota,
            throttle: None,
            sched,
            key,
            shares: shares.max(1),
            vruntime: 0,
            runnable: false,
        }
    }

    /// Marks this container runnable and says whether it may run now.
    fn may_run(&mut self) -> bool {
        let mut runnable = self.sched.lock();
        let key = self.key;
        let min = runnable
            .iter()
            .filter(|(k, _)| **k != key)
            .map(|(_, v)| *v)
            .min();
        if !self.runnable
            && let Some(min) = min
        {
            // Waking up: do not let time spent blocked count as credit against busy pods.
            self.vruntime = self.vruntime.max(min.saturating_sub(SLACK_NS));
        }
        self.runnable = true;
        runnable.insert(key, self.vruntime);
        match min {
            Some(min) => self.vruntime <= min + SLACK_NS,
            None => true,
        }
    }

    fn leave_runnable(&mut self) {
        if self.runnable {
            self.sched.lock().remove(&self.key);
            self.runnable = false;
        }
    }
}

impl<F> Drop for Governed<F> {
    fn drop(&mut self) {
        if self.runnable {
            self.sched.lock().remove(&self.key);
        }
    }
}

impl<F: Future> Future for Governed<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        // All fields are boxed or Unpin, so Governed is Unpin.
        let this = self.get_mut();
        if let Some(q) = this.quota.as_mut() {
            q.refill(Instant::now());
            if q.budget_ns <= 0 {
                let wake_at = tokio::time::Instant::from_std(q.period_end);
                let sleep = this
                    .throttle
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(wake_at)));
                if sleep.deadline() != wake_at {
                    sleep.as_mut().reset(wake_at);
                }
                if sleep.as_mut().poll(cx).is_pending() {
                    this.leave_runnable();
                    return Poll::Pending;
                }
                q.refill(Instant::now());
            }
        }
        if !this.may_run() {
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        let t0 = thread_cpu_ns();
        let out = this.inner.as_mut().poll(cx);
        let used = thread_cpu_ns().saturating_sub(t0);
        this.shared.cpu_ns.fetch_add(used, Ordering::Relaxed);
        if let Some(q) = this.quota.as_mut() {
            q.budget_ns = q
                .budget_ns
                .saturating_sub(i64::try_from(used).unwrap_or(i64::MAX));
        }
        this.vruntime += u128::from(used) * u128::from(SHARES_PER_CORE) / u128::from(this.shares);
        let yielded = this.shared.yielded.swap(false, Ordering::Relaxed);
        if out.is_pending() && yielded {
            this.sched.lock().insert(this.key, this.vruntime);
        } else {
            this.leave_runnable();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quota_refills_once_per_period_and_carries_debt() {
        let t0 = Instant::now();
        let mut q = Quota::new(500, t0);
        assert_eq!(q.quota_ns, 50_000_000);
        q.budget_ns -= 60_000_000; // overran by 10 ms
        q.refill(t0 + Duration::from_millis(50));
        assert_eq!(q.budget_ns, -10_000_000, "no refill inside the period");
        q.refill(t0 + Duration::from_millis(101));
        assert_eq!(q.budget_ns, 40_000_000, "debt carried into the next period");
        q.refill(t0 + Duration::from_millis(1000));
        assert_eq!(
            q.budget_ns, 50_000_000,
            "idle periods do not accumulate credit"
        );
        assert!(q.period_end > t0 + Duration::from_millis(1000));
    }

    #[test]
    fn shares_follow_kubelet() {
        assert_eq!(shares(None), 2);
        assert_eq!(shares(Some(1)), 2);
        assert_eq!(shares(Some(500)), 512);
        assert_eq!(shares(Some(2000)), 2048);
    }
}
