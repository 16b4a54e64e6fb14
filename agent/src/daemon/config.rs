//! The daemon's configuration file (`agent.toml`): where to serve metrics and the control
//! endpoint, how to reach Docker, and which containers to watch (by name or label) with which
//! ports. `deploy/agent.toml` is the documented example; a test parses it.
//!
//! Parsing is strict (unknown keys are errors, so a typo is not silently ignored) and
//! `DaemonConfig::validate` refuses what would be unsafe, such as a control endpoint reachable
//! beyond loopback without a token.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    #[error("{0}")]
    Invalid(String),
}

/// The whole file. Every field has a default except the watch rules.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DaemonConfig {
    /// Where /metrics is served. Default 127.0.0.1:9464 (loopback only).
    #[serde(default = "default_metrics_addr")]
    pub metrics_addr: SocketAddr,
    /// Seconds between counter snapshots (kernel counters, CPU totals, summaries). Default 1.
    #[serde(default = "default_interval")]
    pub interval_s: f64,
    /// Seconds a detached container's series stay (a restart within them keeps its counters
    /// going); after them every series of a container that did not come back is removed, so
    /// that containers coming and going do not grow the series without bound. Default 300.
    #[serde(default = "default_series_grace")]
    pub series_grace_s: f64,
    /// The probes' map sizes for each container (`[maps]`: `connections`, `threads`,
    /// `request_keys`).
    #[serde(default)]
    pub maps: crate::probe::MapSizes,
    /// How containers are found: `docker` (the Docker Engine's events; default) or `cgroup`
    /// (a scan of the host's cgroups every `interval_s`, for containerd, CRI-O, Podman and
    /// Docker alike; names and labels come from Docker when it answers).
    #[serde(default)]
    pub discovery: Discovery,
    /// The Docker Engine socket. Default: `DOCKER_HOST` if it is a unix:// URL, else
    /// /var/run/docker.sock.
    #[serde(default)]
    pub docker_socket: Option<PathBuf>,
    /// The optional control endpoint.
    #[serde(default)]
    pub control: Option<ControlConfig>,
    /// Which containers to watch. A container matching several rules uses the first.
    #[serde(default, rename = "watch")]
    pub watches: Vec<WatchRule>,
}

/// The control endpoint: list targets, show a target's summary, set or clear a delay, and start
/// a load run.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ControlConfig {
    /// Where to listen. Anything but a loopback address needs a token.
    pub addr: SocketAddr,
    /// Bearer token every request must carry (`Authorization: Bearer TOKEN`), at least 16
    /// characters. Prefer `token_file`, which keeps it out of the config file.
    #[serde(default)]
    pub token: Option<String>,
    /// A file holding the token (surrounding whitespace is ignored).
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// Where `POST /v1/load` may send traffic besides the watched containers' own addresses:
    /// networks as `ADDR/PREFIX` (or one address). Default: loopback (127.0.0.0/8, ::1/128),
    /// where containers' published ports are.
    #[serde(default = "default_load_allow")]
    pub load_allow: Vec<Net>,
}

pub(crate) fn default_load_allow() -> Vec<Net> {
    ["127.0.0.0/8", "::1/128"]
        .iter()
        .map(|n| Net::parse(n).expect("a valid network"))
        .collect()
}

/// A network, `ADDR/PREFIX` (one address without `/PREFIX`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct Net {
    addr: std::net::IpAddr,
    prefix: u8,
}

impl TryFrom<String> for Net {
    type Error = String;
    fn try_from(s: String) -> Result<Net, String> {
        Net::parse(&s)
    }
}

impl Net {
    pub fn parse(s: &str) -> Result<Net, String> {
        let bad = || format!("{s:?} is not ADDR or ADDR/PREFIX");
        let (a, p) = match s.trim().split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s.trim(), None),
        };
        let addr: std::net::IpAddr = a.parse().map_err(|_| bad())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match p {
            Some(p) => p.parse::<u8>().ok().filter(|&p| p <= max).ok_or_else(bad)?,
            None => max,
        };
        Ok(Net { addr, prefix })
    }

    /// Whether `ip` is in this network (an IPv4 address is never in an IPv6 network).
    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        let bits = |a: std::net::IpAddr| -> (u128, u32) {
            match a {
                std::net::IpAddr::V4(v) => (u128::from(u32::from(v)), 32),
                std::net::IpAddr::V6(v) => (u128::from(v), 128),
            }
        };
        let ((net, width), (x, xw)) = (bits(self.addr), bits(ip));
        if width != xw {
            return false;
        }
        let shift = width - u32::from(self.prefix);
        shift >= 128 || (net >> shift) == (x >> shift)
    }
}

/// How the daemon finds containers.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Discovery {
    #[default]
    Docker,
    Cgroup,
}

/// One rule: containers it selects and how to measure them.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct WatchRule {
    /// Exact container name (as `docker ps` shows it).
    #[serde(default)]
    pub container: Option<String>,
    /// A label the container carries: `key` (any value) or `key=value`.
    #[serde(default)]
    pub label: Option<String>,
    /// Text the container's cgroup path contains (`discovery = "cgroup"` only): `kubepods`
    /// for every Kubernetes container, an id prefix for one container.
    #[serde(default)]
    pub cgroup: Option<String>,
    /// Server ports inside the container whose accepted connections carry HTTP. Default: 8000.
    #[serde(default = "default_http_ports")]
    pub http_ports: Vec<u16>,
    /// Database ports the container connects to. Default: 5432.
    #[serde(default = "default_db_ports")]
    pub db_ports: Vec<u16>,
    /// Copy request and response heads (method, path, status). Default true.
    #[serde(default = "default_true")]
    pub capture_payload: bool,
}

fn default_metrics_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9464))
}
fn default_interval() -> f64 {
    1.0
}
fn default_series_grace() -> f64 {
    300.0
}
fn default_http_ports() -> Vec<u16> {
    vec![8000]
}
fn default_db_ports() -> Vec<u16> {
    vec![5432]
}
fn default_true() -> bool {
    true
}

impl Default for DaemonConfig {
    /// Metrics on 127.0.0.1:9464, a snapshot a second, the default Docker socket, no control
    /// endpoint, and no rules (which `validate` refuses: say what to watch).
    fn default() -> Self {
        DaemonConfig {
            metrics_addr: default_metrics_addr(),
            interval_s: default_interval(),
            series_grace_s: default_series_grace(),
            maps: Default::default(),
            docker_socket: None,
            control: None,
            discovery: Discovery::Docker,
            watches: Vec::new(),
        }
    }
}

/// A container as the rules see it.
pub struct ContainerView<'a> {
    pub name: &'a str,
    pub labels: &'a std::collections::HashMap<String, String>,
    /// The cgroup path it was found in (cgroup discovery only).
    pub cgroup: Option<&'a str>,
}

impl WatchRule {
    pub fn matches(&self, c: &ContainerView<'_>) -> bool {
        if let Some(name) = &self.container {
            return c.name.trim_start_matches('/') == name;
        }
        if let Some(part) = &self.cgroup {
            return c.cgroup.is_some_and(|p| p.contains(part.as_str()));
        }
        match self.label.as_deref().map(|l| (l, l.split_once('='))) {
            Some((_, Some((k, v)))) => c.labels.get(k).is_some_and(|x| x == v),
            Some((key, None)) => c.labels.contains_key(key),
            None => false,
        }
    }
}

impl DaemonConfig {
    pub fn load(path: &Path) -> Result<DaemonConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let cfg = Self::parse(&text).map_err(|message| ConfigError::Parse {
            path: path.display().to_string(),
            message,
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Parses without validating; the error is toml's message on one line.
    pub fn parse(text: &str) -> Result<DaemonConfig, String> {
        toml::from_str(text).map_err(|e: toml::de::Error| {
            e.message().replace('\n', " ").to_string() + &span_hint(text, e.span())
        })
    }

    /// Refuses configurations that cannot work or would be unsafe.
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if !(0.05..=3600.0).contains(&self.interval_s) {
            return bad(format!(
                "interval_s must be between 0.05 and 3600, got {}",
                self.interval_s
            ));
        }
        if !(0.0..=86_400.0).contains(&self.series_grace_s) {
            return bad(format!(
                "series_grace_s must be between 0 and 86400, got {}",
                self.series_grace_s
            ));
        }
        if self.watches.is_empty() {
            return bad(
                "no [[watch]] rule: say which containers to watch (container = \"NAME\" or label = \"KEY=VALUE\")"
                    .into(),
            );
        }
        for (i, w) in self.watches.iter().enumerate() {
            let n = i + 1;
            let given = [w.container.is_some(), w.label.is_some(), w.cgroup.is_some()];
            if given.iter().filter(|&&g| g).count() != 1 {
                return bad(format!(
                    "[[watch]] rule {n}: give exactly one of container, label or cgroup"
                ));
            }
            match (&w.container, &w.label, &w.cgroup) {
                (Some(c), _, _) if c.is_empty() => {
                    return bad(format!("[[watch]] rule {n}: empty container name"))
                }
                (_, Some(l), _) if l.is_empty() || l.starts_with('=') => {
                    return bad(format!(
                        "[[watch]] rule {n}: label must be KEY or KEY=VALUE"
                    ))
                }
                (_, _, Some(c)) if c.is_empty() => {
                    return bad(format!("[[watch]] rule {n}: empty cgroup text"))
                }
                (_, _, Some(_)) if self.discovery != Discovery::Cgroup => {
                    return bad(format!(
                        "[[watch]] rule {n}: a cgroup rule needs discovery = \"cgroup\""
                    ))
                }
                _ => {}
            }
            for (role, ports) in [("http_ports", &w.http_ports), ("db_ports", &w.db_ports)] {
                if ports.contains(&0) {
                    return bad(format!("[[watch]] rule {n}: {role} must be 1-65535"));
                }
                if ports.len() > agent_common::MAX_PORTS {
                    return bad(format!(
                        "[[watch]] rule {n}: at most {} {role}",
                        agent_common::MAX_PORTS
                    ));
                }
            }
            if w.http_ports.is_empty() {
                return bad(format!("[[watch]] rule {n}: http_ports is empty"));
            }
        }
        self.maps
            .check()
            .map_err(|e| ConfigError::Invalid(format!("[maps]: {e}")))?;
        if let Some(c) = &self.control {
            if c.token.is_some() && c.token_file.is_some() {
                return bad("[control]: give token or token_file, not both".into());
            }
            if let Some(t) = &c.token {
                check_token(t)?;
            }
            if !c.addr.ip().is_loopback() && c.token.is_none() && c.token_file.is_none() {
                return bad(format!(
                    "[control] addr {} is reachable beyond loopback: set token_file (or token) so that requests must authenticate, or bind 127.0.0.1",
                    c.addr
                ));
            }
        }
        Ok(())
    }

    /// The control token, read from `token_file` when given.
    pub(crate) fn control_token(&self) -> Result<Option<String>, ConfigError> {
        let Some(c) = &self.control else {
            return Ok(None);
        };
        if let Some(p) = &c.token_file {
            let t = std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                path: p.display().to_string(),
                source,
            })?;
            let t = t.trim().to_string();
            check_token(&t)?;
            return Ok(Some(t));
        }
        Ok(c.token.clone())
    }

    /// The first rule that selects the container.
    pub(crate) fn rule_for(&self, c: &ContainerView<'_>) -> Option<&WatchRule> {
        self.watches.iter().find(|w| w.matches(c))
    }
}

fn check_token(t: &str) -> Result<(), ConfigError> {
    if t.len() < 16 || !t.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ConfigError::Invalid(
            "[control] token must be at least 16 printable characters without spaces".into(),
        ));
    }
    Ok(())
}

/// " (line N: TEXT)" for the line an error points at, so that the message names the key.
fn span_hint(text: &str, span: Option<std::ops::Range<usize>>) -> String {
    let Some(s) = span else { return String::new() };
    let start = s.start.min(text.len());
    let line = text[..start].matches('\n').count() + 1;
    let content: String = text
        .lines()
        .nth(line - 1)
        .unwrap_or("")
        .trim()
        .chars()
        .take(80)
        .collect();
    format!(" (line {line}: {content})")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn networks_contain_exactly_their_addresses() {
        let n = |s| Net::parse(s).unwrap();
        let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
        assert!(n("10.1.0.0/16").contains(ip("10.1.255.7")));
        assert!(!n("10.1.0.0/16").contains(ip("10.2.0.1")));
        assert!(n("127.0.0.0/8").contains(ip("127.9.9.9")));
        assert!(n("0.0.0.0/0").contains(ip("8.8.8.8")));
        assert!(n("192.0.2.7").contains(ip("192.0.2.7")));
        assert!(!n("192.0.2.7").contains(ip("192.0.2.8")));
        assert!(n("::1/128").contains(ip("::1")));
        assert!(!n("::/0").contains(ip("127.0.0.1")), "families do not mix");
        assert!(n("fd00::/8").contains(ip("fd12::5")));
        for bad in ["10.0.0.0/33", "::/129", "host/8", "", "10.0.0.0/x"] {
            assert!(Net::parse(bad).is_err(), "{bad}");
        }
    }

    proptest! {
        /// Hostile configuration text (TOML's punctuation, keys, numbers): an error with a
        /// message, never a panic; what parses is validated without one too.
        #[test]
        fn hostile_config_text_is_an_error_not_a_panic(s in "[a-z_=\\[\\]\"0-9.,:{} \n-]{0,120}") {
            match DaemonConfig::parse(&s) {
                Ok(c) => { let _ = c.validate(); }
                Err(e) => prop_assert!(!e.is_empty()),
            }
            let mutated = format!("{s}\n{}", include_str!("../../../deploy/agent.toml"));
            if let Ok(c) = DaemonConfig::parse(&mutated) {
                let _ = c.validate();
            }
        }
    }
    use std::collections::HashMap;

    fn cfg(extra: &str) -> Result<DaemonConfig, String> {
        let c = DaemonConfig::parse(&format!("{extra}\n[[watch]]\ncontainer = \"web\"\n"))?;
        c.validate().map_err(|e| e.to_string())?;
        Ok(c)
    }

    #[test]
    fn the_checked_in_example_parses_and_validates() {
        let c = DaemonConfig::parse(include_str!("../../../deploy/agent.toml")).unwrap();
        c.validate().unwrap();
        assert_eq!(c.metrics_addr, "127.0.0.1:9464".parse().unwrap());
        assert_eq!(
            c.control.as_ref().unwrap().addr,
            "127.0.0.1:9465".parse().unwrap()
        );
        assert_eq!(c.watches.len(), 2);
        assert_eq!(c.watches[1].label.as_deref(), Some("awaitlab.watch=true"));
    }

    #[test]
    fn defaults_are_loopback_and_no_control() {
        let c = cfg("").unwrap();
        assert_eq!(c.metrics_addr, "127.0.0.1:9464".parse().unwrap());
        assert_eq!(c.control, None);
        assert_eq!(c.watches[0].http_ports, vec![8000]);
        assert_eq!(c.watches[0].db_ports, vec![5432]);
        assert!(c.watches[0].capture_payload);
    }

    #[test]
    fn unknown_keys_and_unsafe_control_are_refused() {
        let e = cfg("metrics_adr = \"127.0.0.1:1\"").unwrap_err();
        assert!(
            e.contains("unknown field") && e.contains("metrics_adr"),
            "{e}"
        );
        let e = cfg("[control]\naddr = \"0.0.0.0:9465\"").unwrap_err();
        assert!(e.contains("beyond loopback"), "{e}");
        let e = cfg("[control]\naddr = \"0.0.0.0:9465\"\ntoken = \"short\"").unwrap_err();
        assert!(e.contains("at least 16"), "{e}");
        assert!(cfg("[control]\naddr = \"0.0.0.0:9465\"\ntoken = \"0123456789abcdef\"").is_ok());
        assert!(cfg("[control]\naddr = \"127.0.0.1:9465\"").is_ok());
        assert!(cfg("interval_s = 0").is_err());
        assert!(cfg("series_grace_s = -1").is_err());
        assert!(cfg("[control]\naddr = \"127.0.0.1:1\"\nload_allow = [\"10.0.0.0/33\"]").is_err());
        let e = cfg("[maps]\nconnections = 0").unwrap_err();
        assert!(e.contains("connections must be 1-"), "{e}");
        assert!(cfg("[maps]\nthreads = 4194305").is_err());
        let c = cfg("[maps]\nconnections = 1000").unwrap();
        assert_eq!((c.maps.connections, c.maps.threads), (1000, 16_384));
        assert_eq!(c.maps.request_keys, 1_024);
        let e = cfg("[maps]\nrequest_keys = 0").unwrap_err();
        assert!(e.contains("request_keys must be 1-"), "{e}");
        assert_eq!(
            cfg("[maps]\nrequest_keys = 4096")
                .unwrap()
                .maps
                .request_keys,
            4096
        );
        assert!(cfg(
            "[control]\naddr = \"127.0.0.1:1\"\nload_allow = [\"10.0.0.0/8\", \"fd00::1\"]"
        )
        .is_ok());
        assert!(cfg("series_grace_s = nan").is_err());
        let e = DaemonConfig::parse("[[watch]]\ncontainer = \"a\"\nlabel = \"b\"\n")
            .unwrap()
            .validate()
            .unwrap_err();
        assert!(e.to_string().contains("exactly one"), "{e}");
        assert!(
            DaemonConfig::parse("").unwrap().validate().is_err(),
            "no rules"
        );
        assert!(
            DaemonConfig::parse("[[watch]]\ncontainer = \"a\"\nhttp_ports = [0]\n")
                .unwrap()
                .validate()
                .is_err()
        );
        assert!(
            DaemonConfig::parse("[[watch]]\ncontainer = \"a\"\nhttp_ports = [70000]\n").is_err()
        );
    }

    #[test]
    fn rules_match_names_and_labels() {
        let c = DaemonConfig::parse(
            "[[watch]]\ncontainer = \"web\"\nhttp_ports = [8080]\n[[watch]]\nlabel = \"awaitlab.watch=true\"\n[[watch]]\nlabel = \"team\"\n",
        )
        .unwrap();
        let none = HashMap::new();
        let watch: HashMap<String, String> =
            [("awaitlab.watch".to_string(), "true".to_string())].into();
        let wrong: HashMap<String, String> =
            [("awaitlab.watch".to_string(), "false".to_string())].into();
        let team: HashMap<String, String> = [("team".to_string(), "x".to_string())].into();
        let rule = |name, labels| {
            c.rule_for(&ContainerView {
                name,
                labels,
                cgroup: None,
            })
            .map(|r| r.http_ports[0])
        };
        assert_eq!(rule("/web", &none), Some(8080));
        assert_eq!(rule("web2", &none), None);
        assert_eq!(rule("db", &watch), Some(8000));
        assert_eq!(rule("db", &wrong), None);
        assert_eq!(rule("db", &team), Some(8000));

        // A cgroup rule matches the cgroup path, and only under cgroup discovery.
        let c = DaemonConfig::parse(
            "discovery = \"cgroup\"\n[[watch]]\ncgroup = \"kubepods\"\nhttp_ports = [9000]\n",
        )
        .unwrap();
        c.validate().unwrap();
        let view = |cgroup| ContainerView {
            name: "4f1c2b7d9e8a",
            labels: &none,
            cgroup,
        };
        assert_eq!(
            c.rule_for(&view(Some("/kubepods/burstable/pod1/4f1c")))
                .map(|r| r.http_ports[0]),
            Some(9000)
        );
        assert!(c.rule_for(&view(Some("/docker/4f1c"))).is_none());
        assert!(c.rule_for(&view(None)).is_none());
    }
}
