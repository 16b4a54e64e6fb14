//! `awaitlab daemon`: follows containers and keeps them measured. It finds the containers that
//! the configuration's rules select (by name, label or cgroup) through the Docker Engine API
//! (bollard, with API version negotiation: its events) or, with `discovery = "cgroup"`, through
//! the host's cgroups whatever the runtime (`discover`), attaches one set of probes per
//! container network namespace when a container starts, re-attaches after a restart, and
//! detaches when it stops.
//! Metrics for every container go to one registry (label `target` = container name), served on
//! loopback by default; an optional control endpoint lists targets and their summaries.
//!
//! It must leave nothing attached: stopping the daemon (SIGINT/SIGTERM) drops every follower,
//! which detaches and unloads its programs. Docker is only read, never changed.

pub mod config;
pub mod control;
mod discover;
pub mod follower;

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
    time::Duration,
};

use bollard::{
    query_parameters::{EventsOptions, ListContainersOptions},
    Docker,
};
use futures_util::StreamExt as _;
use tracing::{info, warn};

use self::{
    config::{DaemonConfig, Discovery},
    follower::Follower,
};
use crate::{
    metrics::{server, ProbeMetrics},
    probe::namespace::Target,
    probe::ProbeSpec,
};

#[derive(Debug, thiserror::Error)]
pub(crate) enum DaemonError {
    #[error("Docker Engine at {socket}: {source}")]
    Docker {
        socket: String,
        source: bollard::errors::Error,
    },
}

/// What the daemon has attached, by container id.
#[derive(Default)]
pub struct Followed {
    pub followers: BTreeMap<String, Follower>,
}

/// A container as inspected: what the rules and the attach need.
struct Seen {
    id: String,
    name: String,
    labels: HashMap<String, String>,
    pid: Option<u32>,
    /// Its addresses on its networks (from Docker; none from cgroups alone).
    addrs: Vec<std::net::IpAddr>,
}

fn docker_socket(cfg: &DaemonConfig) -> String {
    if let Some(p) = &cfg.docker_socket {
        return p.display().to_string();
    }
    match std::env::var("DOCKER_HOST") {
        Ok(h) if h.starts_with("unix://") => h,
        _ => "/var/run/docker.sock".into(),
    }
}

/// Runs until SIGINT/SIGTERM. `cfg` has been validated.
pub async fn run(cfg: DaemonConfig, token: Option<String>) -> anyhow::Result<()> {
    let mut stop = crate::signals::Stop::install()?;
    // A daemon killed while it held delays left their rules; it is dead, so its locks are gone.
    for r in tokio::task::spawn_blocking(crate::delay::cleanup_leftovers).await? {
        eprintln!("awaitlab: removed a delay left by a killed agent: {r}");
    }
    let docker = match (connect(&cfg).await, cfg.discovery) {
        (Ok(d), _) => Some(d),
        // The cgroups find the containers; without Docker they are named by their ids.
        (Err(e), Discovery::Cgroup) => {
            eprintln!("awaitlab: {e}; containers are named by their ids");
            None
        }
        (Err(e), Discovery::Docker) => return Err(e.into()),
    };

    let registry = crate::metrics::registry()?;
    let metrics = ProbeMetrics::new(&registry)?;
    let _metrics_server =
        server::serve_metrics_at(server::MetricsAt::Asked(cfg.metrics_addr), registry.clone())
            .await?;

    let state = Arc::new(Mutex::new(Followed::default()));
    let delay_metrics = crate::metrics::DelayMetrics::new(&registry)?;
    let _control_server = match &cfg.control {
        Some(c) => {
            let allow = c.load_allow.clone();
            let ctl = control::Control::new(token.clone(), state.clone())
                .with_metrics(
                    delay_metrics.clone(),
                    crate::metrics::LoadMetrics::new(&registry)?,
                )
                .with_load_allow(allow);
            let s = server::bind(c.addr, move |req| ctl.handle(req)).await?;
            eprintln!(
                "awaitlab: control on http://{}/v1/targets ({})",
                s.addr,
                if token.is_some() {
                    "token required"
                } else {
                    "no token, loopback only"
                }
            );
            Some(s)
        }
        None => None,
    };
    let d = Daemon {
        cfg: Arc::new(cfg),
        docker,
        metrics,
        delay_metrics,
        state: state.clone(),
    };

    let stop_reason = match (d.cfg.discovery, &d.docker) {
        (Discovery::Docker, Some(docker)) => d.follow_events(docker, &mut stop).await,
        _ => d.follow_cgroups(&mut stop).await,
    };
    let all: Vec<String> = state
        .lock()
        .map(|s| s.followers.keys().cloned().collect())
        .unwrap_or_default();
    for id in all {
        d.detach(&id, stop_reason).await;
    }
    eprintln!("awaitlab: daemon stopped ({stop_reason})");
    Ok(())
}

/// The Docker Engine at the configured socket, with the API version negotiated.
async fn connect(cfg: &DaemonConfig) -> Result<Docker, DaemonError> {
    let socket = docker_socket(cfg);
    let err = |source| DaemonError::Docker {
        socket: socket.clone(),
        source,
    };
    Docker::connect_with_unix(&socket, 120, bollard::API_DEFAULT_VERSION)
        .map_err(err)?
        .negotiate_version()
        .await
        .map_err(err)
}

struct Daemon {
    cfg: Arc<DaemonConfig>,
    /// None under cgroup discovery when Docker does not answer.
    docker: Option<Docker>,
    metrics: ProbeMetrics,
    /// The delays set through the control API; a container's expire with its probe series.
    delay_metrics: crate::metrics::DelayMetrics,
    state: Arc<Mutex<Followed>>,
}

impl Daemon {
    /// Docker discovery: the running containers, then the `start` and `die` events, until a
    /// signal; returns what stopped it.
    async fn follow_events(
        &self,
        docker: &Docker,
        stop: &mut crate::signals::Stop,
    ) -> &'static str {
        loop {
            // Subscribe first, then list: a container starting in between is seen by one or both.
            let mut filters = HashMap::new();
            filters.insert("type".to_string(), vec!["container".to_string()]);
            filters.insert(
                "event".to_string(),
                vec!["start".to_string(), "die".to_string()],
            );
            let mut events = docker.events(Some(EventsOptions {
                filters: Some(filters),
                ..Default::default()
            }));
            if let Err(e) = self.attach_running(docker).await {
                warn!("listing containers: {e}");
            }
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            loop {
                tokio::select! {
                    ev = events.next() => match ev {
                        Some(Ok(ev)) => {
                            let id = ev.actor.as_ref().and_then(|a| a.id.clone()).unwrap_or_default();
                            match ev.action.as_deref() {
                                Some("start") => self.consider(&id).await,
                                Some("die") => self.detach(&id, "container stopped").await,
                                _ => {}
                            }
                        }
                        Some(Err(e)) => {
                            warn!("Docker events stream: {e}; resubscribing");
                            tokio::time::sleep(Duration::from_secs(1)).await;
                            break;
                        }
                        None => {
                            warn!("Docker events stream ended; resubscribing");
                            tokio::time::sleep(Duration::from_secs(1)).await;
                            break;
                        }
                    },
                    _ = tick.tick() => self.reap().await,
                    sig = stop.recv() => return sig.verb(),
                }
            }
        }
    }

    /// Cgroup discovery: every `interval_s`, the containers that have processes on the host
    /// (`discover::scan`); a new one (or a new first process: a restart) is considered, one
    /// that is gone is detached. Docker, when it answers, names them.
    async fn follow_cgroups(&self, stop: &mut crate::signals::Stop) -> &'static str {
        let mut tick = tokio::time::interval(Duration::from_secs_f64(self.cfg.interval_s));
        // What the last scan saw, by id: its first process, so that only changes are looked at.
        let mut known: HashMap<String, u32> = HashMap::new();
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                sig = stop.recv() => return sig.verb(),
            }
            let found =
                tokio::task::spawn_blocking(|| discover::scan(std::path::Path::new("/proc")))
                    .await
                    .unwrap_or_default();
            let followed: Vec<String> = self
                .state
                .lock()
                .map(|s| s.followers.keys().cloned().collect())
                .unwrap_or_default();
            for id in followed.iter().filter(|id| !found.contains_key(*id)) {
                self.detach(id, "container gone").await;
            }
            known.retain(|id, _| found.contains_key(id));
            for (id, c) in &found {
                if known.insert(id.clone(), c.pid) == Some(c.pid) {
                    continue;
                }
                let named = match &self.docker {
                    Some(_) => self.inspect(id).await,
                    None => None,
                };
                let seen = named.unwrap_or_else(|| Seen {
                    id: id.clone(),
                    name: c.short_id().to_string(),
                    labels: HashMap::new(),
                    pid: Some(c.pid),
                    addrs: Vec::new(),
                });
                self.attach_seen(seen, Some(&c.cgroup)).await;
            }
            self.reap().await;
        }
    }

    async fn attach_running(&self, docker: &Docker) -> Result<(), bollard::errors::Error> {
        let list = docker
            .list_containers(Some(ListContainersOptions {
                all: false,
                ..Default::default()
            }))
            .await?;
        for c in list {
            if let Some(id) = c.id {
                self.consider(&id).await;
            }
        }
        Ok(())
    }

    async fn inspect(&self, id: &str) -> Option<Seen> {
        let c = match self.docker.as_ref()?.inspect_container(id, None).await {
            Ok(c) => c,
            // Gone already (a short-lived container): nothing to do.
            Err(e) => {
                tracing::debug!("inspecting {id}: {e}");
                return None;
            }
        };
        let state = c.state.as_ref();
        let running = state.and_then(|s| s.running).unwrap_or(false);
        let pid = state
            .and_then(|s| s.pid)
            .filter(|&p| p > 0 && running)
            .and_then(|p| u32::try_from(p).ok());
        Some(Seen {
            id: c.id.unwrap_or_else(|| id.to_string()),
            name: c
                .name
                .unwrap_or_default()
                .trim_start_matches('/')
                .to_string(),
            labels: c.config.and_then(|c| c.labels).unwrap_or_default(),
            pid,
            addrs: c
                .network_settings
                .and_then(|n| n.networks)
                .into_iter()
                .flat_map(|nets| nets.into_values())
                .flat_map(|n| [n.ip_address, n.global_ipv6_address])
                .filter_map(|a| a?.parse().ok())
                .collect(),
        })
    }

    /// Attaches to a container Docker names, if a rule selects it and it is not attached in its
    /// current life.
    async fn consider(&self, id: &str) {
        if let Some(c) = self.inspect(id).await {
            self.attach_seen(c, None).await;
        }
    }

    /// Attaches to `c` (found in `cgroup` under cgroup discovery) if a rule selects it and it
    /// is not attached in its current life.
    async fn attach_seen(&self, c: Seen, cgroup: Option<&str>) {
        let view = config::ContainerView {
            name: &c.name,
            labels: &c.labels,
            cgroup,
        };
        let Some(rule) = self.cfg.rule_for(&view).cloned() else {
            return;
        };
        let Some(pid) = c.pid else { return };
        let same_life = self
            .state
            .lock()
            .map(|s| s.followers.get(&c.id).is_some_and(|f| f.info.pid == pid))
            .unwrap_or(false);
        if same_life {
            return;
        }
        self.detach(&c.id, "container restarted").await;
        let target = match Target::resolve(&format!("pid:{pid}")) {
            Ok(t) => t,
            Err(e) => {
                warn!(container = %c.name, "not attached: {e}");
                return;
            }
        };
        // Containers can share a namespace (`--network container:NAME`); probes scope by
        // namespace, so a second attach would count the same traffic twice under two names.
        let shared = self.state.lock().ok().and_then(|s| {
            s.followers
                .values()
                .find(|f| f.info.netns_inum == target.netns_inum && !f.finished())
                .map(|f| f.info.container.clone())
        });
        if let Some(other) = shared {
            warn!(container = %c.name, "not attached: it shares its network namespace with {other}, which is measured already");
            return;
        }
        let spec = ProbeSpec {
            netns_inum: target.netns_inum,
            http_ports: dedup(&rule.http_ports),
            db_ports: dedup(&rule.db_ports),
            capture_payload: rule.capture_payload,
            aggregate: true,
            floor: false,
            sizes: self.cfg.maps,
        };
        let (name, cid, metrics) = (c.name.clone(), c.id.clone(), self.metrics.clone());
        let interval = Duration::from_secs_f64(self.cfg.interval_s);
        // Loading the programs takes a moment; keep it off the event loop.
        let started = tokio::task::spawn_blocking(move || {
            Follower::start(&name, &cid, pid, target, spec, metrics, interval)
        })
        .await;
        match started {
            Ok(Ok(mut f)) => {
                f.info.addrs = c.addrs.clone();
                let i = &f.info;
                eprintln!(
                    "awaitlab: attached to container {} ({}) pid {} netns {}; http ports {:?}, db ports {:?}; live: {}{}; program ids {}",
                    i.container,
                    &i.id[..i.id.len().min(12)],
                    i.pid,
                    i.netns_inum,
                    i.http_ports,
                    i.db_ports,
                    i.live.join(", "),
                    if i.skipped.is_empty() { String::new() } else { format!("; skipped: {}", i.skipped.join(", ")) },
                    i.program_ids.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
                );
                if let Ok(mut s) = self.state.lock() {
                    s.followers.insert(c.id.clone(), f);
                }
            }
            Ok(Err(e)) => warn!(container = %c.name, "not attached: {e}"),
            Err(e) => warn!(container = %c.name, "not attached: {e}"),
        }
    }

    async fn detach(&self, id: &str, why: &str) {
        let f = self
            .state
            .lock()
            .ok()
            .and_then(|mut s| s.followers.remove(id));
        if let Some(f) = f {
            let name = f.info.container.clone();
            // Dropping joins the probe thread, which unloads the programs.
            let _ = tokio::task::spawn_blocking(move || drop(f)).await;
            eprintln!("awaitlab: detached from container {name} ({why})");
            info!(container = %name, "detached: {why}");
        }
    }

    /// Followers whose thread ended by itself (namespace gone before the event arrived).
    async fn reap(&self) {
        let done: Vec<String> = self
            .state
            .lock()
            .map(|s| {
                s.followers
                    .iter()
                    .filter(|(_, f)| f.finished())
                    .map(|(k, _)| k.clone())
                    .collect()
            })
            .unwrap_or_default();
        for id in done {
            self.detach(&id, "container's namespace is gone").await;
        }
        let gone = self
            .metrics
            .expire(Duration::from_secs_f64(self.cfg.series_grace_s));
        for t in &gone {
            self.delay_metrics.remove(t);
        }
        if !gone.is_empty() {
            tracing::debug!(
                "removed the series of {} container(s) gone for good",
                gone.len()
            );
        }
    }
}

fn dedup(v: &[u16]) -> Vec<u16> {
    let mut v = v.to_vec();
    v.sort_unstable();
    v.dedup();
    v
}
