//! What a load run is asked to do: the URL (`Endpoint`), the model (closed users or an open
//! arrival rate), the wait between requests, and the checks that refuse a bad spec before
//! anything is sent.

use super::*;

/// Think time between a user's requests (closed model).
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Wait {
    /// Send the next request as soon as the previous one ends (the study).
    #[default]
    None,
    Constant {
        seconds: f64,
    },
    Uniform {
        min_s: f64,
        max_s: f64,
    },
}

impl Wait {
    /// Parses `2`, `500ms`, `1s-3s` or `0.5-2` (seconds).
    pub fn parse(s: &str) -> Result<Wait, schedule::ScheduleError> {
        let bad = || {
            schedule::ScheduleError::Invalid(format!(
                "malformed wait {s:?}: expected e.g. 1s or 0.5s-2s"
            ))
        };
        match s.split_once('-') {
            Some((a, b)) => {
                let a = schedule::parse_duration(a)
                    .map_err(|_| bad())?
                    .as_secs_f64();
                let b = schedule::parse_duration(b)
                    .map_err(|_| bad())?
                    .as_secs_f64();
                if a > b {
                    return Err(bad());
                }
                Ok(Wait::Uniform { min_s: a, max_s: b })
            }
            None => Ok(Wait::Constant {
                seconds: schedule::parse_duration(s)
                    .map_err(|_| bad())?
                    .as_secs_f64(),
            }),
        }
    }

    pub(crate) fn sample(self, rng: &mut Rng) -> Option<Duration> {
        let s = match self {
            Wait::None => return None,
            Wait::Constant { seconds } => seconds,
            Wait::Uniform { min_s, max_s } => min_s + (max_s - min_s) * rng.unit(),
        };
        (s > 0.0).then(|| Duration::from_secs_f64(s))
    }
}

/// Closed or open model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Model {
    Closed {
        schedule: ClosedSchedule,
        wait: Wait,
    },
    /// `max_in_flight` connections (workers) serve the arrivals; an arrival that finds none
    /// free starts late and is counted in `late_starts`.
    Open {
        schedule: OpenSchedule,
        max_in_flight: u32,
    },
}

/// Everything a run needs; build it in code or from the CLI.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoadSpec {
    /// `http://host[:port]/path[?query]`.
    pub url: String,
    pub request: RequestSpec,
    pub model: Model,
    /// Per-request limit (connect included); none by default, as in the study.
    pub timeout: Option<Duration>,
    /// Reuse connections the server keeps open (default); false sends `Connection: close`.
    pub keep_alive: bool,
    /// Threads that run the users (each one event loop); None: `default_threads()`.
    #[serde(default)]
    pub threads: Option<usize>,
}

/// Most generator threads `--threads` accepts.
pub const MAX_THREADS: usize = 256;

/// The generator's threads when none are asked for: half the host's cores, at least one. The
/// servers it loads here run on the same host (the system under test shares its cores with the
/// load, as in the study), and a generator on every core takes CPU the server needs: against
/// one nginx worker on 2 cores, one thread drove more requests than two (`cargo xtask bench
/// load`, docs/benchmarks.md).
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1))
}

impl LoadSpec {
    /// The study's run on `route` of the server at `base` (e.g. `http://127.0.0.1:8000`).
    pub fn study(base: &str, route: Route) -> LoadSpec {
        LoadSpec {
            url: join_url(base, route.path()),
            request: route.request(),
            model: Model::Closed {
                schedule: ClosedSchedule::study(),
                wait: Wait::None,
            },
            timeout: None,
            keep_alive: true,
            threads: None,
        }
    }

    /// The threads this run uses.
    pub fn threads(&self) -> usize {
        self.threads.unwrap_or_else(default_threads)
    }

    pub fn planned(&self) -> Duration {
        match &self.model {
            Model::Closed { schedule, .. } => schedule.duration(),
            Model::Open { schedule, .. } => schedule.duration(),
        }
    }
}

/// `base` with its path replaced by `path`.
pub(crate) fn join_url(base: &str, path: &str) -> String {
    let b = base.trim_end_matches('/');
    match b.find("://") {
        Some(i) => match b[i + 3..].find('/') {
            Some(j) => format!("{}{path}", &b[..i + 3 + j]),
            None => format!("{b}{path}"),
        },
        None => format!("{b}{path}"),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("invalid URL {url:?}: {why}")]
    Url { url: String, why: String },
    #[error("unsupported scheme {0:?} (only http:// is supported)")]
    Scheme(String),
    #[error(transparent)]
    Schedule(#[from] schedule::ScheduleError),
    #[error(transparent)]
    Template(#[from] template::TemplateError),
    #[error("{0}")]
    Invalid(String),
    #[error("cannot resolve {host}: {source}")]
    Resolve {
        host: String,
        source: std::io::Error,
    },
    #[error("{host} resolves to no address")]
    NoAddress { host: String },
    #[error("starting load thread {index}: {source}")]
    Thread {
        index: usize,
        source: std::io::Error,
    },
}

impl LoadError {
    /// Errors in what the caller asked for (exit 64), as opposed to the environment.
    pub(crate) fn is_usage(&self) -> bool {
        match self {
            LoadError::Url { .. }
            | LoadError::Scheme(_)
            | LoadError::Schedule(_)
            | LoadError::Template(_)
            | LoadError::Invalid(_) => true,
            LoadError::Resolve { .. } | LoadError::NoAddress { .. } | LoadError::Thread { .. } => {
                false
            }
        }
    }
}

/// Where the load goes: the URL, parsed.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
    /// Host header value.
    pub authority: String,
    pub path_and_query: String,
}

/// Checks the URL (scheme http, a host, a port that fits).
pub(crate) fn parse_url(url: &str) -> Result<Endpoint, LoadError> {
    let bad = |why: &str| LoadError::Url {
        url: url.to_owned(),
        why: why.to_owned(),
    };
    let uri: Uri = url
        .parse()
        .map_err(|e: hyper::http::uri::InvalidUri| bad(&e.to_string()))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some(other) => return Err(LoadError::Scheme(other.to_owned())),
        None => return Err(bad("expected http://HOST[:PORT]/PATH")),
    }
    let auth = uri.authority().ok_or_else(|| bad("no host"))?;
    if auth.as_str().contains('@') {
        return Err(bad("user info is not supported"));
    }
    let host = auth
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    if host.is_empty() {
        return Err(bad("no host"));
    }
    // `Authority` accepts any digits as a port; only 1..=65535 can be connected to.
    let port = match auth.as_str().rsplit_once(':') {
        Some((_, p)) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => {
            p.parse::<u16>().map_err(|_| bad("port out of range"))?
        }
        _ => 80,
    };
    if port == 0 {
        return Err(bad("port 0"));
    }
    let pq = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let pq = if pq.is_empty() { "/" } else { pq };
    Ok(Endpoint {
        host,
        port,
        authority: auth.as_str().to_owned(),
        path_and_query: pq.to_owned(),
    })
}

/// Checks everything that does not need the network.
pub(crate) fn validate(spec: &LoadSpec) -> Result<(Endpoint, Template), LoadError> {
    let target = parse_url(&spec.url)?;
    let template = Template::new(
        &spec.request,
        &target.path_and_query,
        &target.authority,
        spec.keep_alive,
    )?;
    match &spec.model {
        Model::Closed { schedule, wait } => {
            ClosedSchedule::new(schedule.stages.clone())?;
            match *wait {
                Wait::Constant { seconds } if !(seconds.is_finite() && seconds >= 0.0) => {
                    return Err(LoadError::Invalid("wait must be >= 0".into()))
                }
                Wait::Uniform { min_s, max_s }
                    if !(min_s.is_finite()
                        && max_s.is_finite()
                        && 0.0 <= min_s
                        && min_s <= max_s) =>
                {
                    return Err(LoadError::Invalid(
                        "wait range must be 0 <= MIN <= MAX".into(),
                    ))
                }
                _ => {}
            }
        }
        Model::Open {
            schedule,
            max_in_flight,
        } => {
            OpenSchedule::new(schedule.stages.clone())?;
            if *max_in_flight == 0 {
                return Err(LoadError::Invalid(
                    "max in flight must be greater than 0".into(),
                ));
            }
        }
    }
    if let Some(t) = spec.timeout {
        if t.is_zero() {
            return Err(LoadError::Invalid("timeout must be greater than 0".into()));
        }
    }
    if let Some(n) = spec.threads {
        if !(1..=MAX_THREADS).contains(&n) {
            return Err(LoadError::Invalid(format!(
                "threads must be 1-{MAX_THREADS}, got {n}"
            )));
        }
    }
    Ok((target, template))
}

/// Resolves the target's host to the one address every user connects to (IPv4 first).
pub async fn resolve(target: &Endpoint) -> Result<SocketAddr, LoadError> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((target.host.as_str(), target.port))
        .await
        .map_err(|source| LoadError::Resolve {
            host: target.host.clone(),
            source,
        })?
        .collect();
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or_else(|| addrs.first())
        .copied()
        .ok_or_else(|| LoadError::NoAddress {
            host: target.host.clone(),
        })
}
