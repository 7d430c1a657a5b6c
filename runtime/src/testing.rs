//! Test doubles and the conformance suite every [`PodRuntime`] implementation passes.
//!
//! Compiled for this crate's unit tests and, for other crates, with feature `test-util`.
use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use api::pod::{ContainerState, ContainerStateRunning, ContainerStateTerminated};

use crate::pod_runtime::{
    ContainerStats, ContainerStatus, ExecOutput, PodConfig, PodId, PodRuntime, PodStats, PodStatus,
    RuntimeError, SandboxState, SessionIo,
};

pub mod conformance;

/// What a fake container does, chosen by its image name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FakeBehavior {
    /// Runs until stopped.
    RunForever,
    /// Prints `stdout` (one CRI log line per line) and exits with `code` after `after`.
    Exit {
        /// Exit code.
        code: i32,
        /// Time from start to exit.
        after: Duration,
        /// Text the container writes to stdout.
        stdout: String,
    },
}

/// A call the fake received, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FakeCall {
    /// `run_pod` of a pod with this name.
    Run(String),
    /// `stop_pod`.
    Stop(PodId, Duration),
    /// `remove_pod`.
    Remove(PodId),
    /// `pod_status`.
    Status(PodId),
    /// `list_pods`.
    List,
    /// `logs`.
    Logs(PodId, String),
    /// `stats`.
    Stats(PodId),
    /// `exec` into a container with this command.
    Exec(PodId, String, Vec<String>),
}

struct FakeContainer {
    name: String,
    image: String,
    behavior: FakeBehavior,
    stopped: Option<Instant>,
}

struct FakePod {
    config: PodConfig,
    started: Instant,
    containers: Vec<FakeContainer>,
}

/// A scripted [`PodRuntime`]: images map to behaviours, calls are recorded, nothing runs.
#[derive(Default)]
pub struct FakeRuntime {
    scripts: Mutex<HashMap<String, FakeBehavior>>,
    pods: Mutex<BTreeMap<PodId, FakePod>>,
    calls: Mutex<Vec<FakeCall>>,
    next_id: AtomicU64,
    exec_scripts: Mutex<HashMap<String, ExecOutput>>,
    /// Working set each container of a pod reports, by pod name (boxed: keeps
    /// `AnyRuntime::Fake` small).
    memory: Box<Mutex<HashMap<String, u64>>>,
}

impl FakeRuntime {
    /// An empty fake: every image is unknown until scripted.
    pub fn new() -> Self {
        Self::default()
    }

    /// Containers with image `image` behave as `behavior`.
    pub fn script(&self, image: impl Into<String>, behavior: FakeBehavior) {
        lock(&self.scripts).insert(image.into(), behavior);
    }

    /// `exec` of a command whose first word is `program` answers `output` (overrides the
    /// built-in commands `echo`, `true`, `false`, `exit N`, `stderr TEXT` and `sleep SECS`).
    pub fn script_exec(&self, program: impl Into<String>, output: ExecOutput) {
        lock(&self.exec_scripts).insert(program.into(), output);
    }

    /// Every container of the pods named `pod_name` reports `bytes` of memory in `stats`.
    pub fn set_memory_usage(&self, pod_name: impl Into<String>, bytes: u64) {
        lock(&self.memory).insert(pod_name.into(), bytes);
    }

    /// Calls received so far.
    pub fn calls(&self) -> Vec<FakeCall> {
        lock(&self.calls).clone()
    }

    fn record(&self, call: FakeCall) {
        lock(&self.calls).push(call);
    }

    fn status_of(id: &PodId, pod: &FakePod, now: Instant) -> PodStatus {
        let started_at = Some(crate::wasm::time::rfc3339_nanos(
            std::time::SystemTime::now(),
        ));
        let containers: Vec<ContainerStatus> = pod
            .containers
            .iter()
            .map(|c| {
                let natural_end = match &c.behavior {
                    FakeBehavior::RunForever => None,
                    FakeBehavior::Exit { code, after, .. } => Some((pod.started + *after, *code)),
                };
                let state = match (natural_end, c.stopped) {
                    (Some((end, code)), stopped)
                        if end <= now && stopped.is_none_or(|s| end <= s) =>
                    {
                        terminated(code, if code == 0 { "Completed" } else { "Error" })
                    }
                    (_, Some(_)) => terminated(143, "Error"),
                    _ => ContainerState::Running(ContainerStateRunning {
                        started_at: started_at.clone(),
                    }),
                };
                ContainerStatus {
                    name: c.name.clone(),
                    image: c.image.clone(),
                    state,
                }
            })
            .collect();
        let all_done = containers.iter().all(|c| c.state.is_terminated());
        PodStatus {
            id: id.clone(),
            name: pod.config.name.clone(),
            namespace: pod.config.namespace.clone(),
            state: if all_done {
                SandboxState::NotReady
            } else {
                SandboxState::Ready
            },
            containers,
        }
    }
}

fn terminated(code: i32, reason: &str) -> ContainerState {
    ContainerState::Terminated(ContainerStateTerminated {
        exit_code: code,
        reason: Some(reason.to_owned()),
        ..ContainerStateTerminated::default()
    })
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding a fake's lock already failed the test; keep going for its report.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl PodRuntime for FakeRuntime {
    fn name(&self) -> &'static str {
        "fake"
    }

    async fn run_pod(&self, pod: &PodConfig) -> Result<PodId, RuntimeError> {
        self.record(FakeCall::Run(pod.name.clone()));
        if pod.spec.containers.is_empty() {
            return Err(RuntimeError::InvalidSpec("pod has no containers".into()));
        }
        let scripts = lock(&self.scripts).clone();
        let mut containers = Vec::new();
        for c in &pod.spec.containers {
            let behavior =
                scripts
                    .get(&c.image)
                    .cloned()
                    .ok_or_else(|| RuntimeError::ImageNotFound {
                        image: c.image.clone(),
                        reason: "not scripted".into(),
                    })?;
            containers.push(FakeContainer {
                name: c.name.clone(),
                image: c.image.clone(),
                behavior,
                stopped: None,
            });
        }
        let id = PodId(format!(
            "fake-{}",
            self.next_id.fetch_add(1, Ordering::Relaxed)
        ));
        lock(&self.pods).insert(
            id.clone(),
            FakePod {
                config: pod.clone(),
                started: Instant::now(),
                containers,
            },
        );
        Ok(id)
    }

    async fn stop_pod(&self, id: &PodId, grace: Duration) -> Result<(), RuntimeError> {
        self.record(FakeCall::Stop(id.clone(), grace));
        let now = Instant::now();
        if let Some(pod) = lock(&self.pods).get_mut(id) {
            for c in &mut pod.containers {
                c.stopped.get_or_insert(now);
            }
        }
        Ok(())
    }

    async fn remove_pod(&self, id: &PodId) -> Result<(), RuntimeError> {
        self.record(FakeCall::Remove(id.clone()));
        lock(&self.pods).remove(id);
        Ok(())
    }

    async fn pod_status(&self, id: &PodId) -> Result<PodStatus, RuntimeError> {
        self.record(FakeCall::Status(id.clone()));
        let pods = lock(&self.pods);
        let pod = pods
            .get(id)
            .ok_or_else(|| RuntimeError::NotFound(id.clone()))?;
        Ok(Self::status_of(id, pod, Instant::now()))
    }

    async fn list_pods(&self) -> Result<Vec<PodStatus>, RuntimeError> {
        self.record(FakeCall::List);
        let now = Instant::now();
        Ok(lock(&self.pods)
            .iter()
            .map(|(id, p)| Self::status_of(id, p, now))
            .collect())
    }

    async fn logs(&self, id: &PodId, container: &str) -> Result<String, RuntimeError> {
        self.record(FakeCall::Logs(id.clone(), container.to_owned()));
        let pods = lock(&self.pods);
        let pod = pods
            .get(id)
            .ok_or_else(|| RuntimeError::NotFound(id.clone()))?;
        let c = pod
            .containers
            .iter()
            .find(|c| c.name == container)
            .ok_or_else(|| RuntimeError::ContainerNotFound {
                pod: id.clone(),
                container: container.to_owned(),
            })?;
        let status = Self::status_of(id, pod, Instant::now());
        let done = status
            .containers
            .iter()
            .any(|s| s.name == container && s.state.is_terminated());
        let mut out = String::new();
        if let (FakeBehavior::Exit { stdout, .. }, true) = (&c.behavior, done) {
            let ts = crate::wasm::time::rfc3339_nanos(std::time::SystemTime::now());
            for line in stdout.lines() {
                out.push_str(&format!("{ts} stdout F {line}\n"));
            }
        }
        Ok(out)
    }

    async fn stats(&self, id: &PodId) -> Result<PodStats, RuntimeError> {
        self.record(FakeCall::Stats(id.clone()));
        let pods = lock(&self.pods);
        let pod = pods
            .get(id)
            .ok_or_else(|| RuntimeError::NotFound(id.clone()))?;
        let memory_bytes = lock(&self.memory)
            .get(&pod.config.name)
            .copied()
            .unwrap_or(0);
        Ok(PodStats {
            containers: pod
                .containers
                .iter()
                .map(|c| ContainerStats {
                    name: c.name.clone(),
                    memory_bytes,
                    ..ContainerStats::default()
                })
                .collect(),
        })
    }

    async fn exec(
        &self,
        id: &PodId,
        container: &str,
        command: Vec<String>,
        _timeout: Duration,
    ) -> Result<ExecOutput, RuntimeError> {
        self.record(FakeCall::Exec(
            id.clone(),
            container.to_owned(),
            command.clone(),
        ));
        {
            let pods = lock(&self.pods);
            let pod = pods
                .get(id)
                .ok_or_else(|| RuntimeError::NotFound(id.clone()))?;
            let status = Self::status_of(id, pod, Instant::now());
            let running = status
                .containers
                .iter()
                .find(|c| c.name == container)
                .ok_or_else(|| RuntimeError::ContainerNotFound {
                    pod: id.clone(),
                    container: container.to_owned(),
                })?
                .state
                .is_running();
            if !running {
                return Err(RuntimeError::InvalidSpec(format!(
                    "container {container:?} is not running"
                )));
            }
        }
        let program = command.first().cloned().unwrap_or_default();
        if let Some(out) = lock(&self.exec_scripts).get(&program) {
            return Ok(out.clone());
        }
        let rest = command.get(1..).unwrap_or_default().join(" ");
        let out = |exit_code: i32, stdout: String, stderr: String| ExecOutput {
            exit_code,
            stdout: stdout.into_bytes(),
            stderr: stderr.into_bytes(),
        };
        Ok(match program.as_str() {
            "echo" => out(0, format!("{rest}\n"), String::new()),
            "true" => out(0, String::new(), String::new()),
            "false" => out(1, String::new(), String::new()),
            "exit" => out(
                rest.trim().parse().unwrap_or(2),
                String::new(),
                String::new(),
            ),
            "stderr" => out(0, String::new(), format!("{rest}\n")),
            "sleep" => {
                let secs: f64 = rest.trim().parse().unwrap_or(1.0);
                tokio::time::sleep(Duration::from_secs_f64(secs.clamp(0.0, 3600.0))).await;
                out(0, String::new(), String::new())
            }
            other => out(
                127,
                String::new(),
                format!("fake: {other}: command not found\n"),
            ),
        })
    }

    /// Streaming commands on top of [`PodRuntime::exec`]'s: `cat` copies stdin to stdout until
    /// end of file; `count N` prints `1`..`N`, one line every 300 ms; `size` prints the first
    /// terminal size it is sent (`WxH`). Everything else runs as in `exec`, output at the end.
    async fn exec_stream(
        &self,
        id: &PodId,
        container: &str,
        command: Vec<String>,
        io: SessionIo,
    ) -> Result<i32, RuntimeError> {
        use tokio::io::AsyncWriteExt as _;
        let mut io = io;
        let program = command.first().cloned().unwrap_or_default();
        let streaming = matches!(program.as_str(), "cat" | "count" | "size");
        // The same checks (and the recorded call) as a plain exec.
        let probe = if streaming {
            vec!["true".to_string()]
        } else {
            command.clone()
        };
        let out = self.exec(id, container, probe, Duration::ZERO).await?;
        let mut stdout = io.stdout.take();
        match program.as_str() {
            "cat" => {
                if let (Some(mut r), Some(w)) = (io.stdin.take(), stdout.as_mut()) {
                    let _ = tokio::io::copy(&mut r, w).await;
                }
                Ok(0)
            }
            "count" => {
                let n: u32 = command.get(1).and_then(|n| n.parse().ok()).unwrap_or(3);
                for i in 1..=n {
                    if let Some(w) = stdout.as_mut() {
                        let _ = w.write_all(format!("{i}\n").as_bytes()).await;
                        let _ = w.flush().await;
                    }
                    if i < n {
                        tokio::time::sleep(Duration::from_millis(300)).await;
                    }
                }
                Ok(0)
            }
            "size" => {
                let size = match io.resize.as_mut() {
                    Some(rx) => rx.recv().await,
                    None => None,
                };
                let text = size.map_or("no terminal\n".to_string(), |s| {
                    format!("{}x{}\n", s.width, s.height)
                });
                if let Some(w) = stdout.as_mut() {
                    let _ = w.write_all(text.as_bytes()).await;
                }
                Ok(0)
            }
            _ => {
                let tty = io.tty;
                if let Some(w) = stdout.as_mut() {
                    let _ = w.write_all(&out.stdout).await;
                    if tty {
                        let _ = w.write_all(&out.stderr).await;
                    }
                }
                if let Some(w) = io.stderr.as_mut() {
                    let _ = w.write_all(&out.stderr).await;
                }
                Ok(out.exit_code)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn fake_passes_conformance_and_records_calls() {
        let fake = FakeRuntime::new();
        let fixtures = conformance::Fixtures::for_fake(&fake);
        conformance::run_all(&fake, &fixtures).await;
        let calls = fake.calls();
        assert!(calls.iter().any(|c| matches!(c, FakeCall::Run(_))));
        assert!(calls.iter().any(|c| matches!(c, FakeCall::Stop(_, _))));
        assert!(calls.iter().any(|c| matches!(c, FakeCall::Remove(_))));
    }

    #[tokio::test]
    async fn fake_exec_echoes_and_reports_exit_codes() {
        use api::pod::{Container, PodSpec};
        let fake = FakeRuntime::new();
        fake.script("forever", FakeBehavior::RunForever);
        let spec = PodSpec {
            containers: vec![Container {
                name: "c".into(),
                image: "forever".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        let id = fake.run_pod(&PodConfig::new("p", spec)).await.expect("run");
        let t = Duration::from_secs(1);
        let cmd = |w: &[&str]| w.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        let o = fake
            .exec(&id, "c", cmd(&["echo", "hi", "there"]), t)
            .await
            .expect("exec");
        assert_eq!((o.exit_code, o.stdout.as_slice()), (0, &b"hi there\n"[..]));
        let o = fake
            .exec(&id, "c", cmd(&["exit", "3"]), t)
            .await
            .expect("exec");
        assert_eq!(o.exit_code, 3);
        let o = fake
            .exec(&id, "c", cmd(&["stderr", "oops"]), t)
            .await
            .expect("exec");
        assert_eq!(o.stderr, b"oops\n");
        assert!(matches!(
            fake.exec(&id, "nope", cmd(&["true"]), t).await,
            Err(RuntimeError::ContainerNotFound { .. })
        ));
        fake.script_exec(
            "check",
            ExecOutput {
                exit_code: 1,
                stdout: Vec::new(),
                stderr: Vec::new(),
            },
        );
        assert_eq!(
            fake.exec(&id, "c", cmd(&["check"]), t)
                .await
                .expect("exec")
                .exit_code,
            1
        );
        fake.stop_pod(&id, t).await.expect("stop");
        assert!(
            fake.exec(&id, "c", cmd(&["true"]), t).await.is_err(),
            "not running"
        );
    }
}
