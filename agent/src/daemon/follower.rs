//! One attached container: a thread that owns that container's probe [`Session`] (the probes
//! loaded for its network namespace), whose aggregator's observer feeds the Prometheus
//! metrics, and keeps a current [`Summary`] for the control endpoint.
//!
//! Dropping a [`Follower`] stops the thread and drops the probes, which detaches and unloads
//! them; the thread also ends by itself when the container's process (and so its namespace) is
//! gone. It must never block the daemon's event loop: attach happens on the thread, and the
//! caller waits only for its outcome.

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc, Arc, Mutex,
    },
    thread::JoinHandle,
    time::{Duration, Instant, SystemTime},
};

use serde::Serialize;

use crate::{
    metrics::ProbeMetrics,
    probe::aggregate::summary::Summary,
    probe::namespace::Target,
    probe::{session::Session, ProbeSpec, ProbeStatus},
};

/// What the control endpoint lists about an attached container.
#[derive(Debug, Clone, Serialize)]
pub struct FollowerInfo {
    pub container: String,
    pub id: String,
    pub pid: u32,
    pub netns_inum: u32,
    pub http_ports: Vec<u16>,
    pub db_ports: Vec<u16>,
    /// Kernel ids of the attached programs (`bpftool prog show id N`).
    pub program_ids: Vec<u32>,
    pub live: Vec<String>,
    pub skipped: Vec<String>,
    pub attached_at_unix_s: f64,
    /// The container's addresses on its networks, as its runtime reports them (empty when no
    /// runtime answers): `POST /v1/load` may send traffic to these.
    pub addrs: Vec<std::net::IpAddr>,
}

pub struct Follower {
    pub info: FollowerInfo,
    pub summary: Arc<Mutex<Option<Summary>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Follower {
    /// Attaches probes to `target` on a new thread and waits for the outcome.
    pub fn start(
        container: &str,
        id: &str,
        pid: u32,
        target: Target,
        spec: ProbeSpec,
        metrics: ProbeMetrics,
        interval: Duration,
    ) -> Result<Follower, String> {
        let (netns_inum, http_ports, db_ports) = (
            target.netns_inum,
            spec.http_ports.clone(),
            spec.db_ports.clone(),
        );
        let stop = Arc::new(AtomicBool::new(false));
        let summary = Arc::new(Mutex::new(None));
        let (tx, rx) = mpsc::channel::<Result<Vec<ProbeStatus>, String>>();
        let (name, s2, sum2) = (container.to_string(), stop.clone(), summary.clone());
        let thread = std::thread::Builder::new()
            .name(format!("awl-{}", &id[..id.len().min(12)]))
            .spawn(move || run(name, target, spec, metrics, interval, s2, sum2, tx))
            .map_err(|e| format!("starting the probe thread: {e}"))?;
        let status = match rx.recv() {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                let _ = thread.join();
                return Err(e);
            }
            Err(_) => {
                let _ = thread.join();
                return Err("the probe thread ended before attaching".into());
            }
        };
        let info = FollowerInfo {
            container: container.to_string(),
            id: id.to_string(),
            pid,
            netns_inum,
            http_ports,
            db_ports,
            program_ids: status.iter().filter_map(|s| s.id).collect(),
            live: status
                .iter()
                .filter(|s| s.live)
                .map(|s| s.hook.clone())
                .collect(),
            skipped: status
                .iter()
                .filter(|s| !s.live)
                .map(|s| s.hook.clone())
                .collect(),
            attached_at_unix_s: SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64()),
            addrs: Vec::new(),
        };
        Ok(Follower {
            info,
            summary,
            stop,
            thread: Some(thread),
        })
    }

    /// Whether the thread has ended by itself (the container's namespace is gone, or a map
    /// read failed).
    pub fn finished(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn run(
    name: String,
    target: Target,
    spec: ProbeSpec,
    metrics: ProbeMetrics,
    interval: Duration,
    stop: Arc<AtomicBool>,
    summary: Arc<Mutex<Option<Summary>>>,
    tx: mpsc::Sender<Result<Vec<ProbeStatus>, String>>,
) {
    // The session polls its ring buffer on a runtime; this thread's own, so that a busy
    // container never holds the daemon's event loop.
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let _ = tx.send(Err(format!("starting the probe thread's runtime: {e}")));
            return;
        }
    };
    rt.block_on(async {
        let mut session = match Session::attach(&spec, &name) {
            Ok(s) => s,
            Err(e) => {
                let _ = tx.send(Err(e.to_string()));
                return;
            }
        };
        let status = session.probes().status().to_vec();
        session.agg.add_observer(Box::new(
            metrics.observer(&name, spec.db_ports.first().copied()),
        ));
        metrics.set_attached(&name, &status);
        let _ = tx.send(Ok(status));

        let mut next = Instant::now() + interval;
        loop {
            // The programs wake user space only when much is waiting; the 20 ms bound collects
            // the rest promptly.
            session.pump(Duration::from_millis(20), |_| {}).await;
            let stopping = stop.load(Ordering::Relaxed) || !target.alive();
            if stopping || Instant::now() >= next {
                next += interval;
                // The summary's reading also feeds the metrics (one read of the maps).
                let Ok(s) = session.summary() else {
                    tracing::warn!(container = %name, "reading the probe maps failed; detaching");
                    break;
                };
                if let Ok(mut slot) = summary.lock() {
                    *slot = Some(s);
                }
            }
            if stopping {
                break;
            }
        }
    });
    // The session is gone (detached) once block_on returns.
    metrics.set_detached(&name);
}
