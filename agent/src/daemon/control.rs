//! The daemon's control endpoint (JSON over HTTP): list the attached targets, show one target's
//! current summary, set or clear a delay on a target (the delay stays until cleared or the daemon
//! stops, which removes it), and start a load run and read its report.
//!
//! With a token configured every request must carry `Authorization: Bearer TOKEN` (compared in
//! constant time); the daemon refuses to start a control endpoint beyond loopback without one.
//! Bad requests get a 4xx and `{"error": "..."}`; nothing here may panic on input.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use serde::Deserialize;
use serde_json::json;

use super::Followed;
use crate::{
    delay, load,
    metrics::server::{Request, Response},
    probe::namespace::Target,
};

/// Version of the control API's JSON documents.
pub(crate) const CONTROL_VERSION: u32 = 1;

pub struct Control {
    pub token: Option<String>,
    pub state: Arc<Mutex<Followed>>,
    /// Delays set through this endpoint, by container name; dropping one removes it.
    delays: Mutex<HashMap<String, Slot>>,
    /// Load runs started through this endpoint, by id (1-based index).
    loads: Arc<Mutex<Vec<LoadJob>>>,
    /// The delays and load runs, as the daemon's /metrics shows them.
    metrics: Option<(crate::metrics::DelayMetrics, crate::metrics::LoadMetrics)>,
    /// Where a load run may go besides the watched containers' addresses.
    load_allow: Vec<super::config::Net>,
}

/// A target's delay, or a change of it under way (set or clear, outside the lock).
enum Slot {
    Changing,
    Held(Box<delay::DelayGuard>),
}

/// A load run started by `POST /v1/load`.
#[derive(Clone, serde::Serialize)]
struct LoadJob {
    id: usize,
    url: String,
    /// "running", "done" or "failed".
    state: &'static str,
    error: Option<String>,
    report: Option<load::LoadReport>,
}

/// `PUT /v1/targets/NAME/delay`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct DelayRequest {
    /// Added to each round trip through the target, in milliseconds (0-60000): to the packets
    /// it sends (netem) or to those it receives (nfqueue).
    pub delay_ms: u32,
    /// `auto` (default), `netem` or `nfqueue`.
    #[serde(default)]
    pub backend: Option<String>,
}

/// `POST /v1/load`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct LoadRequest {
    /// The server to load, `http://HOST:PORT/PATH` (for a container: its published port on
    /// 127.0.0.1, or its address on a network you made).
    pub url: String,
    /// Closed-loop users at the end of the ramp (1-10000).
    pub users: u32,
    /// Users added per second (default: all at once).
    #[serde(default)]
    pub spawn_rate: Option<f64>,
    /// Run time in seconds (1-86400).
    pub duration_s: f64,
}

const ENDPOINTS: &str = "GET /v1/targets, GET /v1/targets/NAME/summary, PUT|DELETE /v1/targets/NAME/delay, POST /v1/load, GET /v1/load/ID";

impl Control {
    pub fn new(token: Option<String>, state: Arc<Mutex<Followed>>) -> Control {
        Control {
            token,
            state,
            delays: Mutex::default(),
            loads: Arc::default(),
            metrics: None,
            load_allow: super::config::default_load_allow(),
        }
    }

    /// Where load runs may go besides the watched containers (the configuration's
    /// `load_allow`; loopback by default).
    pub fn with_load_allow(mut self, nets: Vec<super::config::Net>) -> Control {
        self.load_allow = nets;
        self
    }

    /// Ok when every address `url`'s host resolves to is a watched container's or in
    /// `load_allow`: a token holder must not be able to make a root daemon load anything else.
    fn load_allowed(&self, url: &str) -> Result<(), Response> {
        use std::net::ToSocketAddrs as _;
        let ep = load::parse_url(url).map_err(|e| Response::error(422, e.to_string()))?;
        let addrs: Vec<std::net::IpAddr> = (ep.host.as_str(), ep.port)
            .to_socket_addrs()
            .map_err(|e| Response::error(422, format!("{}: {e}", ep.host)))?
            .map(|a| a.ip())
            .collect();
        let watched: Vec<std::net::IpAddr> = self
            .state
            .lock()
            .map(|s| {
                s.followers
                    .values()
                    .flat_map(|f| f.info.addrs.clone())
                    .collect()
            })
            .unwrap_or_default();
        match addrs
            .iter()
            .find(|ip| !watched.contains(ip) && !self.load_allow.iter().any(|n| n.contains(**ip)))
        {
            Some(ip) => Err(Response::error(
                403,
                format!(
                    "{url}: {ip} is neither a watched container's address nor in [control] load_allow"
                ),
            )),
            None if addrs.is_empty() => Err(Response::error(422, format!("{url}: no address"))),
            None => Ok(()),
        }
    }

    /// Also exports the delays set and the load runs started through this endpoint.
    pub fn with_metrics(
        mut self,
        delay: crate::metrics::DelayMetrics,
        load: crate::metrics::LoadMetrics,
    ) -> Control {
        self.metrics = Some((delay, load));
        self
    }

    fn delay_metric(&self, name: &str, set: Option<(Duration, &str)>, cleared: Option<&str>) {
        if let Some((m, _)) = &self.metrics {
            if let Some((d, backend)) = set {
                m.set(name, d, None, backend);
            }
            if let Some(backend) = cleared {
                m.clear(name, backend);
            }
        }
    }

    pub fn handle(&self, req: Request) -> Response {
        if let Some(token) = &self.token {
            let given = req
                .header("authorization")
                .and_then(|v| v.strip_prefix("Bearer "))
                .unwrap_or("");
            if !constant_time_eq(given.trim().as_bytes(), token.as_bytes()) {
                return Response::error(
                    401,
                    "missing or wrong token: send Authorization: Bearer TOKEN",
                );
            }
        }
        let segs: Vec<&str> = req.path.trim_end_matches('/').split('/').skip(1).collect();
        match (req.method.as_str(), segs.as_slice()) {
            ("GET", ["v1", "targets"]) => self.targets(),
            ("GET", ["v1", "targets", name, "summary"]) => match check_name(name) {
                Err(r) => r,
                Ok(()) => self.summary(name),
            },
            ("PUT", ["v1", "targets", name, "delay"]) => {
                if let Err(r) = check_name(name).and_then(|_| self.known(name)) {
                    return r;
                }
                let d: DelayRequest = match parse_json(&req) {
                    Ok(d) => d,
                    Err(r) => return r,
                };
                if d.delay_ms > delay::MAX_DELAY_MS {
                    return Response::error(
                        422,
                        format!(
                            "delay_ms must be 0-{}, got {}",
                            delay::MAX_DELAY_MS,
                            d.delay_ms
                        ),
                    );
                }
                let choice = match d.backend.as_deref().unwrap_or("auto") {
                    "auto" => delay::BackendChoice::Auto,
                    "netem" => delay::BackendChoice::Netem,
                    "nfqueue" => delay::BackendChoice::Nfqueue,
                    b => {
                        return Response::error(
                            422,
                            format!("backend must be auto, netem or nfqueue, got {b:?}"),
                        )
                    }
                };
                self.set_delay(name, d.delay_ms, choice)
            }
            ("DELETE", ["v1", "targets", name, "delay"]) => {
                if let Err(r) = check_name(name) {
                    return r;
                }
                self.clear_delay(name)
            }
            ("GET", ["v1", "load", id]) => self.load_status(id),
            ("POST", ["v1", "load"]) => {
                let l: LoadRequest = match parse_json(&req) {
                    Ok(l) => l,
                    Err(r) => return r,
                };
                if let Err(e) = load::parse_url(&l.url) {
                    return Response::error(422, e.to_string());
                }
                if !(1..=10_000).contains(&l.users) {
                    return Response::error(422, format!("users must be 1-10000, got {}", l.users));
                }
                if !(1.0..=86_400.0).contains(&l.duration_s) {
                    return Response::error(422, "duration_s must be 1-86400");
                }
                if l.spawn_rate.is_some_and(|r| !(r > 0.0 && r.is_finite())) {
                    return Response::error(422, "spawn_rate must be a positive number");
                }
                self.start_load(l)
            }
            (_, ["v1", "targets"])
            | (_, ["v1", "targets", _, "summary"])
            | (_, ["v1", "targets", _, "delay"])
            | (_, ["v1", "load"])
            | (_, ["v1", "load", _]) => Response::error(
                405,
                format!(
                    "method {} not allowed here; endpoints: {ENDPOINTS}",
                    req.method
                ),
            ),
            _ => Response::error(
                404,
                format!("no such endpoint {:?}; endpoints: {ENDPOINTS}", req.path),
            ),
        }
    }

    fn targets(&self) -> Response {
        let Ok(state) = self.state.lock() else {
            return Response::error(500, "daemon state unavailable");
        };
        let list: Vec<_> = state.followers.values().map(|f| &f.info).collect();
        Response::json(200, &json!({ "version": CONTROL_VERSION, "targets": list }))
    }

    fn summary(&self, name: &str) -> Response {
        let Ok(state) = self.state.lock() else {
            return Response::error(500, "daemon state unavailable");
        };
        let Some(f) = state.followers.values().find(|f| f.info.container == name) else {
            return Response::error(404, format!("no attached target named {name:?}"));
        };
        let summary = f.summary.lock().ok().and_then(|s| s.clone());
        match summary {
            Some(s) => Response::json(
                200,
                &json!({ "version": CONTROL_VERSION, "target": f.info, "summary": s }),
            ),
            None => Response::error(
                503,
                format!("{name:?} was attached less than one interval ago; no summary yet"),
            ),
        }
    }

    fn pid_of(&self, name: &str) -> Result<u32, Response> {
        let Ok(state) = self.state.lock() else {
            return Err(Response::error(500, "daemon state unavailable"));
        };
        state
            .followers
            .values()
            .find(|f| f.info.container == name)
            .map(|f| f.info.pid)
            .ok_or_else(|| Response::error(404, format!("no attached target named {name:?}")))
    }

    /// Takes `name`'s delay slot for a change: its current guard, if any, and a mark that a
    /// change is under way (a second change of the same target meanwhile gets 409). The lock
    /// is held only for that: the change itself (tc, iptables, waiting) runs without it.
    fn take_slot(&self, name: &str) -> Result<Option<delay::DelayGuard>, Response> {
        let Ok(mut delays) = self.delays.lock() else {
            return Err(Response::error(500, "daemon state unavailable"));
        };
        if matches!(delays.get(name), Some(Slot::Changing)) {
            return Err(Response::error(
                409,
                format!("a delay change on {name:?} is in progress"),
            ));
        }
        Ok(match delays.insert(name.to_string(), Slot::Changing) {
            Some(Slot::Held(g)) => Some(*g),
            _ => None,
        })
    }

    /// Ends a change of `name`'s slot: it now holds `g`, or nothing.
    fn put_slot(&self, name: &str, g: Option<delay::DelayGuard>) {
        if let Ok(mut delays) = self.delays.lock() {
            match g {
                Some(g) => delays.insert(name.to_string(), Slot::Held(Box::new(g))),
                None => delays.remove(name),
            };
        }
    }

    /// Removes `old` and exports that no delay is in force.
    fn remove_delay(&self, name: &str, old: delay::DelayGuard) -> delay::Achieved {
        let a = old.remove();
        self.delay_metric(name, None, Some(&format!("{:?}", a.backend).to_lowercase()));
        a
    }

    fn set_delay(&self, name: &str, delay_ms: u32, choice: delay::BackendChoice) -> Response {
        let pid = match self.pid_of(name) {
            Ok(p) => p,
            Err(r) => return r,
        };
        let old = match self.take_slot(name) {
            Ok(old) => old,
            Err(r) => return r,
        };
        // A new delay replaces the old one; 0 ms is a clear.
        if let Some(old) = old {
            self.remove_delay(name, old);
        }
        if delay_ms == 0 {
            self.put_slot(name, None);
            return Response::json(
                200,
                &json!({ "version": CONTROL_VERSION, "target": name, "delay_ms": 0 }),
            );
        }
        let spec = delay::DelaySpec {
            delay: Duration::from_millis(u64::from(delay_ms)),
            jitter: Duration::ZERO,
            ..Default::default()
        };
        let set = Target::resolve(&format!("pid:{pid}"))
            .map_err(|e| Response::error(409, format!("{name}: {e}")))
            .and_then(|target| {
                delay::set(&target, &spec, choice).map_err(|e| {
                    Response::error(if e.is_usage() { 422 } else { 500 }, e.to_string())
                })
            });
        match set {
            Ok(g) => {
                let backend = format!("{:?}", g.backend()).to_lowercase();
                self.delay_metric(name, Some((spec.delay, &backend)), None);
                let body = json!({
                    "version": CONTROL_VERSION,
                    "target": name,
                    "delay_ms": delay_ms,
                    "backend": backend,
                    "devs": g.devs(),
                });
                self.put_slot(name, Some(g));
                Response::json(200, &body)
            }
            Err(r) => {
                self.put_slot(name, None);
                r
            }
        }
    }

    fn clear_delay(&self, name: &str) -> Response {
        let old = match self.take_slot(name) {
            Ok(old) => old,
            Err(r) => return r,
        };
        let Some(old) = old else {
            self.put_slot(name, None);
            return Response::error(404, format!("no delay set on {name:?} through this daemon"));
        };
        let achieved = self.remove_delay(name, old);
        self.put_slot(name, None);
        Response::json(
            200,
            &json!({ "version": CONTROL_VERSION, "target": name, "achieved": achieved }),
        )
    }

    fn start_load(&self, l: LoadRequest) -> Response {
        if let Err(r) = self.load_allowed(&l.url) {
            return r;
        }
        let users = l.users;
        let rate = l.spawn_rate.unwrap_or(f64::from(users) * 1000.0);
        let schedule = match load::ClosedSchedule::ramp(users, rate, l.duration_s) {
            Ok(s) => s,
            Err(e) => return Response::error(422, e.to_string()),
        };
        let spec = load::LoadSpec {
            url: l.url.clone(),
            request: load::RequestSpec::default(),
            model: load::Model::Closed {
                schedule,
                wait: load::Wait::None,
            },
            timeout: None,
            keep_alive: true,
            threads: None,
        };
        let Ok(mut jobs) = self.loads.lock() else {
            return Response::error(500, "daemon state unavailable");
        };
        // One load at a time: a second would share the host's cores with the first and measure
        // neither.
        if let Some(running) = jobs.iter().find(|j| j.state == "running") {
            return Response::json(
                409,
                &json!({
                    "version": CONTROL_VERSION,
                    "error": format!("load run {} is still running", running.id),
                    "running": running.id,
                    "status": format!("/v1/load/{}", running.id),
                }),
            );
        }
        let id = jobs.len() + 1;
        jobs.push(LoadJob {
            id,
            url: l.url,
            state: "running",
            error: None,
            report: None,
        });
        drop(jobs);
        let jobs = self.loads.clone();
        let metrics = self.metrics.as_ref().map(|(_, l)| l.clone());
        tokio::spawn(async move {
            let result = load::run_with_metrics(
                &spec,
                &mut |_| {},
                tokio_util::sync::CancellationToken::new(),
                metrics,
            )
            .await;
            if let Ok(mut jobs) = jobs.lock() {
                let job = &mut jobs[id - 1];
                match result {
                    Ok(r) => {
                        job.state = "done";
                        job.report = Some(r);
                    }
                    Err(e) => {
                        job.state = "failed";
                        job.error = Some(e.to_string());
                    }
                }
            }
        });
        Response::json(
            202,
            &json!({ "version": CONTROL_VERSION, "id": id, "status": format!("/v1/load/{id}") }),
        )
    }

    fn load_status(&self, id: &str) -> Response {
        let Ok(id) = id.parse::<usize>() else {
            return Response::error(400, "a load id is a number");
        };
        let Ok(jobs) = self.loads.lock() else {
            return Response::error(500, "daemon state unavailable");
        };
        match id.checked_sub(1).and_then(|i| jobs.get(i)) {
            Some(job) => Response::json(200, &json!({ "version": CONTROL_VERSION, "load": job })),
            None => Response::error(404, format!("no load run {id}")),
        }
    }

    fn known(&self, name: &str) -> Result<(), Response> {
        let Ok(state) = self.state.lock() else {
            return Err(Response::error(500, "daemon state unavailable"));
        };
        if state.followers.values().any(|f| f.info.container == name) {
            Ok(())
        } else {
            Err(Response::error(
                404,
                format!("no attached target named {name:?}"),
            ))
        }
    }
}

/// Container names: Docker's own rule (`[a-zA-Z0-9][a-zA-Z0-9_.-]*`), at most 128 bytes.
fn check_name(name: &str) -> Result<(), Response> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(Response::error(
            400,
            "a target name is a container name: letters, digits, _ . - (at most 128)",
        ))
    }
}

fn parse_json<T: serde::de::DeserializeOwned>(req: &Request) -> Result<T, Response> {
    if let Some(ct) = req.header("content-type") {
        if !ct.starts_with("application/json") {
            return Err(Response::error(415, "send the body as application/json"));
        }
    }
    if req.body.is_empty() {
        return Err(Response::error(400, "a JSON body is required"));
    }
    serde_json::from_slice(&req.body)
        .map_err(|e| Response::error(400, format!("bad JSON body: {e}")))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    // The length is not secret (tokens have a known minimum); the content is.
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Hostile control requests (any method, a path under /v1, any body): a status and a
        /// message, never a panic.
        #[test]
        fn hostile_requests_get_a_status_not_a_panic(
            method in "(GET|PUT|POST|DELETE|HEAD|PATCH|X)",
            path in "/v1/[a-z0-9/%._-]{0,30}",
            body in proptest::collection::vec(any::<u8>(), 0..200),
        ) {
            let c = Control::new(None, Default::default());
            let mut r = req(&method, &path, None, "");
            r.body = body;
            let resp = c.handle(r);
            prop_assert!((200..600).contains(&resp.status));
        }
    }

    fn req(method: &str, path: &str, auth: Option<&str>, body: &str) -> Request {
        let mut headers = vec![("content-type".to_string(), "application/json".to_string())];
        if let Some(a) = auth {
            headers.push(("authorization".into(), a.into()));
        }
        Request {
            method: method.into(),
            path: path.into(),
            query: None,
            headers,
            body: body.as_bytes().to_vec(),
            peer: "127.0.0.1:1".parse().unwrap(),
        }
    }

    fn body(r: &Response) -> serde_json::Value {
        serde_json::from_slice(&r.body).unwrap()
    }

    #[test]
    fn token_is_required_when_configured() {
        let c = Control::new(Some("0123456789abcdef".into()), Default::default());
        for auth in [
            None,
            Some("Bearer wrong"),
            Some("0123456789abcdef"),
            Some("Bearer 0123456789abcdeX"),
        ] {
            let r = c.handle(req("GET", "/v1/targets", auth, ""));
            assert_eq!(r.status, 401, "{auth:?}");
            assert!(body(&r)["error"].as_str().unwrap().contains("token"));
        }
        let r = c.handle(req(
            "GET",
            "/v1/targets",
            Some("Bearer 0123456789abcdef"),
            "",
        ));
        assert_eq!(r.status, 200);
        assert_eq!(body(&r)["version"], 1);
        assert_eq!(body(&r)["targets"], json!([]));
    }

    /// One load run at a time: while one runs (against a server that accepts and never
    /// answers, so it cannot finish early), a second is refused with 409 and the running one's
    /// id; the first is still listed as running.
    #[test]
    fn a_second_load_while_one_runs_gets_409_with_its_id() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let _in_runtime = rt.enter();
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/", silent.local_addr().unwrap());
        let c = Control::new(None, Default::default());
        let load = format!("{{\"url\":\"{url}\",\"users\":1,\"duration_s\":30}}");
        let first = c.handle(req("POST", "/v1/load", None, &load));
        assert_eq!(first.status, 202, "{:?}", body(&first));
        let id = body(&first)["id"].as_u64().unwrap();
        let second = c.handle(req("POST", "/v1/load", None, &load));
        assert_eq!(second.status, 409, "{:?}", body(&second));
        assert_eq!(body(&second)["running"], id);
        let status = c.handle(req("GET", &format!("/v1/load/{id}"), None, ""));
        assert_eq!(body(&status)["load"]["state"], "running");
    }

    #[test]
    fn bad_requests_get_4xx_with_a_message() {
        let c = Control::new(None, Default::default());
        let cases = [
            ("GET", "/nope", "", 404),
            ("POST", "/v1/targets", "", 405),
            ("GET", "/v1/targets/..%2f/summary", "", 400),
            ("GET", "/v1/targets/web/summary", "", 404),
            ("PUT", "/v1/targets/web/delay", "{\"delay_ms\": 100}", 404),
            ("POST", "/v1/load", "", 400),
            ("POST", "/v1/load", "{not json", 400),
            (
                "POST",
                "/v1/load",
                "{\"url\":\"http://127.0.0.1:1/\",\"users\":1,\"duration_s\":5,\"extra\":1}",
                400,
            ),
            (
                "POST",
                "/v1/load",
                "{\"url\":\"ftp://127.0.0.1/\",\"users\":1,\"duration_s\":5}",
                422,
            ),
            (
                "POST",
                "/v1/load",
                "{\"url\":\"http://127.0.0.1:1/\",\"users\":0,\"duration_s\":5}",
                422,
            ),
            ("DELETE", "/v1/targets/web/delay", "", 404),
            // Not a watched container's address, not in load_allow (loopback by default): no
            // traffic is sent (192.0.2.0/24 is TEST-NET-1, which nothing answers anyway).
            (
                "POST",
                "/v1/load",
                "{\"url\":\"http://192.0.2.1:80/\",\"users\":1,\"duration_s\":5}",
                403,
            ),
            (
                "PUT",
                "/v1/targets/web/delay",
                "{\"delay_ms\": 100, \"backend\": \"warp\"}",
                404,
            ),
            ("GET", "/v1/load/7", "", 404),
            ("GET", "/v1/load/x", "", 400),
        ];
        for (m, p, b, code) in cases {
            let r = c.handle(req(m, p, None, b));
            assert_eq!(
                r.status,
                code,
                "{m} {p} {b}: {:?}",
                String::from_utf8_lossy(&r.body)
            );
            assert!(!body(&r)["error"].as_str().unwrap().is_empty());
        }
    }
}
