//! The daemon's control endpoint (JSON over HTTP): list the attached targets, show one target's
//! current summary, and — once delay injection and the load generator are merged — set or clear
//! a delay and start a load run. Those two actions validate their requests fully and then answer
//! 501 with a message saying they are not in this build.
//!
//! With a token configured every request must carry `Authorization: Bearer TOKEN` (compared in
//! constant time); the daemon refuses to start a control endpoint beyond loopback without one.
//! Bad requests get a 4xx and `{"error": "..."}`; nothing here may panic on input.

use std::sync::{Arc, Mutex};

use serde::Deserialize;
use serde_json::json;

use super::State;
use crate::metrics::server::{Request, Response};

/// Version of the control API's JSON documents.
pub const CONTROL_VERSION: u32 = 1;

pub struct Control {
    pub token: Option<String>,
    pub state: Arc<Mutex<State>>,
}

/// `PUT /v1/targets/NAME/delay`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DelayRequest {
    /// Added to every packet the target sends, in milliseconds (0-10000).
    pub delay_ms: u32,
    /// `auto` (default), `netem` or `nfqueue`.
    #[serde(default)]
    pub backend: Option<String>,
}

/// `POST /v1/load`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoadRequest {
    /// An attached target (container name) whose server to load.
    pub target: String,
    /// Path on the target's server, e.g. `/posts/io_read/`.
    pub path: String,
    /// Closed-loop users at the end of the ramp (1-10000).
    pub users: u32,
    /// Users added per second (default: all at once).
    #[serde(default)]
    pub spawn_rate: Option<f64>,
    /// Run time in seconds (1-86400).
    pub duration_s: f64,
}

const ENDPOINTS: &str =
    "GET /v1/targets, GET /v1/targets/NAME/summary, PUT|DELETE /v1/targets/NAME/delay, POST /v1/load";

impl Control {
    pub fn handle(&self, req: Request) -> Response {
        if let Some(token) = &self.token {
            let given = req.header("authorization").and_then(|v| v.strip_prefix("Bearer ")).unwrap_or("");
            if !constant_time_eq(given.trim().as_bytes(), token.as_bytes()) {
                return Response::error(401, "missing or wrong token: send Authorization: Bearer TOKEN");
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
                if d.delay_ms > 10_000 {
                    return Response::error(422, format!("delay_ms must be 0-10000, got {}", d.delay_ms));
                }
                if let Some(b) = &d.backend {
                    if !["auto", "netem", "nfqueue"].contains(&b.as_str()) {
                        return Response::error(422, format!("backend must be auto, netem or nfqueue, got {b:?}"));
                    }
                }
                not_yet("setting a delay needs the delay-injection module (netem/NFQUEUE), which this build does not include yet")
            }
            ("DELETE", ["v1", "targets", name, "delay"]) => {
                if let Err(r) = check_name(name).and_then(|_| self.known(name)) {
                    return r;
                }
                not_yet("clearing a delay needs the delay-injection module (netem/NFQUEUE), which this build does not include yet")
            }
            ("POST", ["v1", "load"]) => {
                let l: LoadRequest = match parse_json(&req) {
                    Ok(l) => l,
                    Err(r) => return r,
                };
                if let Err(r) = check_name(&l.target).and_then(|_| self.known(&l.target)) {
                    return r;
                }
                if !l.path.starts_with('/')
                    || l.path.len() > 1024
                    || l.path.chars().any(|c| c.is_whitespace() || c.is_control())
                {
                    return Response::error(422, "path must start with / and hold no spaces (at most 1024 bytes)");
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
                not_yet("starting a load run needs the load-generator module, which this build does not include yet")
            }
            (_, ["v1", "targets"])
            | (_, ["v1", "targets", _, "summary"])
            | (_, ["v1", "targets", _, "delay"])
            | (_, ["v1", "load"]) => {
                Response::error(405, format!("method {} not allowed here; endpoints: {ENDPOINTS}", req.method))
            }
            _ => Response::error(404, format!("no such endpoint {:?}; endpoints: {ENDPOINTS}", req.path)),
        }
    }

    fn targets(&self) -> Response {
        let Ok(state) = self.state.lock() else { return Response::error(500, "daemon state unavailable") };
        let list: Vec<_> = state.followers.values().map(|f| &f.info).collect();
        Response::json(200, &json!({ "version": CONTROL_VERSION, "targets": list }))
    }

    fn summary(&self, name: &str) -> Response {
        let Ok(state) = self.state.lock() else { return Response::error(500, "daemon state unavailable") };
        let Some(f) = state.followers.values().find(|f| f.info.container == name) else {
            return Response::error(404, format!("no attached target named {name:?}"));
        };
        let summary = f.summary.lock().ok().and_then(|s| s.clone());
        match summary {
            Some(s) => Response::json(200, &json!({ "version": CONTROL_VERSION, "target": f.info, "summary": s })),
            None => Response::error(503, format!("{name:?} was attached less than one interval ago; no summary yet")),
        }
    }

    fn known(&self, name: &str) -> Result<(), Response> {
        let Ok(state) = self.state.lock() else { return Err(Response::error(500, "daemon state unavailable")) };
        if state.followers.values().any(|f| f.info.container == name) {
            Ok(())
        } else {
            Err(Response::error(404, format!("no attached target named {name:?}")))
        }
    }
}

fn not_yet(what: &str) -> Response {
    Response::error(501, format!("not implemented: {what}; the request itself was valid"))
}

/// Container names: Docker's own rule (`[a-zA-Z0-9][a-zA-Z0-9_.-]*`), at most 128 bytes.
fn check_name(name: &str) -> Result<(), Response> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(Response::error(400, "a target name is a container name: letters, digits, _ . - (at most 128)"))
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
    serde_json::from_slice(&req.body).map_err(|e| Response::error(400, format!("bad JSON body: {e}")))
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
        let c = Control { token: Some("0123456789abcdef".into()), state: Default::default() };
        for auth in [None, Some("Bearer wrong"), Some("0123456789abcdef"), Some("Bearer 0123456789abcdeX")] {
            let r = c.handle(req("GET", "/v1/targets", auth, ""));
            assert_eq!(r.status, 401, "{auth:?}");
            assert!(body(&r)["error"].as_str().unwrap().contains("token"));
        }
        let r = c.handle(req("GET", "/v1/targets", Some("Bearer 0123456789abcdef"), ""));
        assert_eq!(r.status, 200);
        assert_eq!(body(&r)["version"], 1);
        assert_eq!(body(&r)["targets"], json!([]));
    }

    #[test]
    fn bad_requests_get_4xx_with_a_message() {
        let c = Control { token: None, state: Default::default() };
        let cases = [
            ("GET", "/nope", "", 404),
            ("POST", "/v1/targets", "", 405),
            ("GET", "/v1/targets/..%2f/summary", "", 400),
            ("GET", "/v1/targets/web/summary", "", 404),
            ("PUT", "/v1/targets/web/delay", "{\"delay_ms\": 100}", 404),
            ("POST", "/v1/load", "", 400),
            ("POST", "/v1/load", "{not json", 400),
            ("POST", "/v1/load", "{\"target\":\"web\",\"path\":\"/\",\"users\":1,\"duration_s\":5,\"extra\":1}", 400),
            ("POST", "/v1/load", "{\"target\":\"web\",\"path\":\"/\",\"users\":1,\"duration_s\":5}", 404),
        ];
        for (m, p, b, code) in cases {
            let r = c.handle(req(m, p, None, b));
            assert_eq!(r.status, code, "{m} {p} {b}: {:?}", String::from_utf8_lossy(&r.body));
            assert!(!body(&r)["error"].as_str().unwrap().is_empty());
        }
    }
}
