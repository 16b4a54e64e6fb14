//! `awaitlab daemon`: a real container (an image built here FROM the local base image, running
//! busybox httpd) is started, restarted and stopped while the daemon follows it; its metrics
//! must count exactly the requests the client made, resume within 5 s of the restart, and its
//! programs must be gone after the stop. The control endpoint must refuse requests without the
//! token when bound beyond loopback, and answer bad requests with a 4xx and a message.
//!
//! Needs root, Docker and the base image (`cargo xtask base-image`; `cargo xtask test` builds
//! it). Every image, network, container, namespace and daemon made here is removed by guards.

mod common;

use std::{
    fs::File,
    net::SocketAddr,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use common::{prom::*, tempdir::TempDir, *};

const BASE_IMAGE: &str = "awaitlab/base:bookworm";

fn docker(args: &[&str]) -> String {
    sh("docker", args)
}

/// A docker object removed on drop with `docker <kind> rm -f NAME`.
struct DockerThing {
    kind: &'static str,
    name: String,
}

impl Drop for DockerThing {
    fn drop(&mut self) {
        let args: Vec<&str> = match self.kind {
            "image" => vec!["image", "rm", "-f", &self.name],
            "network" => vec!["network", "rm", &self.name],
            _ => vec!["rm", "-f", &self.name],
        };
        let _ = Command::new("docker")
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// An image FROM the local base image that runs busybox httpd on port 8000 (busybox is copied
/// in from the host's busybox-static: no registry, no network during the build).
fn httpd_image() -> DockerThing {
    let has_base = Command::new("docker")
        .args(["image", "inspect", BASE_IMAGE])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    assert!(
        has_base.is_ok_and(|s| s.success()),
        "{BASE_IMAGE} is missing: run `cargo xtask base-image`"
    );
    let ctx = TempDir::new("awl-img");
    std::fs::copy("/bin/busybox", ctx.path().join("busybox"))
        .expect("/bin/busybox (Debian busybox-static; cargo xtask setup installs it)");
    std::fs::write(
        ctx.path().join("Dockerfile"),
        "ARG BASE=debian:bookworm-slim\nFROM ${BASE}\nCOPY busybox /bin/busybox\nRUN mkdir -p /www && echo ok > /www/index.html\nEXPOSE 8000\nCMD [\"/bin/busybox\", \"httpd\", \"-f\", \"-p\", \"8000\", \"-h\", \"/www\"]\n",
    )
    .unwrap();
    let name = format!("awl-httpd-{}:test", tag());
    let image = DockerThing {
        kind: "image",
        name: name.clone(),
    };
    docker(&[
        "build",
        "-q",
        "--build-arg",
        &format!("BASE={BASE_IMAGE}"),
        "-t",
        &name,
        &ctx.path().display().to_string(),
    ]);
    image
}

/// A container of `image` named `name` (removed on drop), with its id and the host port
/// published for its port 8000 on loopback.
struct Httpd {
    _container: DockerThing,
    id: String,
    port: String,
}

/// The loopback port Docker published for container `name`'s port 8000.
fn published_port(name: &str) -> String {
    docker_port(name, "8000/tcp").port().to_string()
}

fn run_httpd(image: &DockerThing, name: &str, extra: &[&str]) -> Httpd {
    let container = DockerThing {
        kind: "container",
        name: name.to_string(),
    };
    let mut args = vec!["run", "-d", "--name", name, "-p", "127.0.0.1::8000"];
    args.extend_from_slice(extra);
    args.push(&image.name);
    docker(&args);
    let id = docker(&["inspect", "-f", "{{.Id}}", name])
        .trim()
        .to_string();
    let port = published_port(name);
    Httpd {
        _container: container,
        id,
        port,
    }
}

/// `awaitlab daemon` as a child process (optionally inside a network namespace); SIGKILLed on
/// drop if still running.
struct Daemon {
    child: Option<Child>,
    stderr: std::path::PathBuf,
    pub metrics: Option<SocketAddr>,
    pub control: Option<SocketAddr>,
    _dir: TempDir,
}

impl Daemon {
    fn start(config: &str, ns: Option<&Netns>, extra: &[&str]) -> Daemon {
        let dir = TempDir::new("awl-daemon");
        let cfg = dir.path().join("agent.toml");
        std::fs::write(&cfg, config).unwrap();
        let stderr = dir.path().join("stderr");
        let mut cmd = match ns {
            Some(ns) => ns.exec(agent_bin().to_str().unwrap(), &[]),
            None => Command::new(agent_bin()),
        };
        cmd.arg("daemon").arg("--config").arg(&cfg).args(extra);
        let child = cmd
            .stdout(Stdio::null())
            .stderr(File::create(&stderr).unwrap())
            .spawn()
            .unwrap();
        let mut d = Daemon {
            child: Some(child),
            stderr,
            metrics: None,
            control: None,
            _dir: dir,
        };
        let t0 = Instant::now();
        let addr_after = |text: &str, marker: &str| -> Option<SocketAddr> {
            // Only whole lines: stderr is unbuffered, so a line may be read half written.
            let l = text
                .split_inclusive('\n')
                .find(|l| l.ends_with('\n') && l.contains(marker))?;
            l.split("http://").nth(1)?.split('/').next()?.parse().ok()
        };
        loop {
            let text = d.stderr_text();
            d.metrics = addr_after(&text, "metrics on http://");
            d.control = addr_after(&text, "control on http://");
            let want_control = config.contains("[control]") || extra.contains(&"--control-addr");
            if d.metrics.is_some() && (d.control.is_some() || !want_control) {
                return d;
            }
            if let Some(s) = d.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("daemon exited ({s}) before serving: {text}");
            }
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "daemon did not start: {text}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn stderr_text(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// SIGTERM, then the exit code and stderr.
    fn stop(mut self) -> (Option<i32>, String) {
        let mut child = self.child.take().unwrap();
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let t0 = Instant::now();
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            if t0.elapsed() > Duration::from_secs(30) {
                let _ = child.kill();
                panic!("daemon did not stop on SIGTERM: {}", self.stderr_text());
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        (status.code(), self.stderr_text())
    }

    fn targets(&self, auth: &[(&str, &str)]) -> serde_json::Value {
        let (status, body) = http(self.control.unwrap(), "GET", "/v1/targets", auth, b"");
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).unwrap()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Sum of the samples of `name` whose labels include `target="TARGET"`.
fn metric(addr: SocketAddr, name: &str, target: &str) -> f64 {
    let (status, text) = http_get(addr, "/metrics");
    assert_eq!(status, 200);
    let want = format!("target=\"{target}\"");
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && l.contains(&want))
        .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
        .sum()
}

/// Polls `f` until true; on a timeout, panics with the daemon's stderr.
fn wait_for(d: &Daemon, what: &str, limit: Duration, mut f: impl FnMut() -> bool) -> Duration {
    let t0 = Instant::now();
    loop {
        if f() {
            return t0.elapsed();
        }
        assert!(
            t0.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}; daemon said:\n{}",
            d.stderr_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One GET to the container's published port; true on a 200. Never panics: during a restart
/// the port accepts and then closes without an answer.
fn hit(port: &str) -> bool {
    use std::io::{Read, Write};
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let Ok(mut s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    if s.write_all(b"GET /index.html HTTP/1.0\r\nHost: t\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    out.starts_with(b"HTTP/1.") && out.get(9..12) == Some(b"200")
}

/// Requests `port`'s server until it answers (up to 10 s), then `n` more; returns how many it
/// answered, the count the probes must match.
fn hit_once_up_then(port: &str, n: usize) -> f64 {
    let t0 = Instant::now();
    while !hit(port) {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the server on {port} did not answer"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    for _ in 0..n {
        assert!(hit(port));
    }
    1.0 + n as f64
}

fn program_ids(t: &serde_json::Value) -> Vec<u32> {
    t["program_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn a_container_is_followed_through_start_restart_and_stop() {
    let image = httpd_image();
    let t = tag();
    let net = DockerThing {
        kind: "network",
        name: format!("awl{t}n"),
    };
    docker(&["network", "create", &net.name]);
    let name = format!("awl{t}c");

    let config = format!(
        "metrics_addr = \"127.0.0.1:0\"\ninterval_s = 0.25\n[control]\naddr = \"127.0.0.1:0\"\n[[watch]]\ncontainer = \"{name}\"\nhttp_ports = [8000]\ndb_ports = [5432]\n"
    );
    let daemon = Daemon::start(&config, None, &[]);
    let m = daemon.metrics.unwrap();

    // Started after the daemon: found through the events stream.
    let container = DockerThing {
        kind: "container",
        name: name.clone(),
    };
    let label = format!("awaitlab.test={t}");
    docker(&[
        "run",
        "-d",
        "--name",
        &name,
        "--label",
        &label,
        "--network",
        &net.name,
        "-p",
        "127.0.0.1::8000",
        &image.name,
    ]);
    let published = || published_port(&name);
    let port = published();
    let mut first = serde_json::Value::Null;
    wait_for(
        &daemon,
        "the daemon to attach",
        Duration::from_secs(15),
        || {
            first = daemon.targets(&[])["targets"]
                .as_array()
                .unwrap()
                .iter()
                .find(|x| x["container"] == name.as_str())
                .cloned()
                .unwrap_or_default();
            !first.is_null()
        },
    );
    let ids1 = program_ids(&first);
    let loaded = our_bpf_programs();
    assert!(
        !ids1.is_empty() && ids1.iter().all(|i| loaded.contains(i)),
        "{ids1:?} not in {loaded:?}"
    );
    assert_eq!(metric(m, "awaitlab_target_attached", &name), 1.0);

    // The container's server answers only what the client sent: the counter must say exactly that.
    // Only requests that got an answer reach the server's handler; count those.
    let mut warmup = 0.0;
    wait_for(
        &daemon,
        "the server to answer",
        Duration::from_secs(10),
        || {
            let ok = hit(&port);
            warmup += f64::from(u8::from(ok));
            ok
        },
    );
    wait_for(
        &daemon,
        "the first request in the metrics",
        Duration::from_secs(5),
        || metric(m, "http_server_request_duration_seconds_count", &name) == warmup,
    );
    for _ in 0..20 {
        assert!(hit(&port));
    }
    wait_for(
        &daemon,
        "20 requests in the metrics",
        Duration::from_secs(5),
        || metric(m, "http_server_request_duration_seconds_count", &name) == warmup + 20.0,
    );

    // Restart: the daemon detaches, re-attaches to the new process and namespace, and the same
    // series keep counting within 5 s.
    let before = metric(m, "http_server_request_duration_seconds_count", &name);
    docker(&["restart", "-t", "1", &name]);
    // An ephemeral published port may change with the restart.
    let port = published();
    let resumed = wait_for(
        &daemon,
        "metrics to resume after the restart",
        Duration::from_secs(5),
        || {
            hit(&port);
            metric(m, "http_server_request_duration_seconds_count", &name) > before
        },
    );
    eprintln!("metrics resumed {resumed:?} after the restart");
    let second = daemon.targets(&[])["targets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["container"] == name.as_str())
        .cloned()
        .unwrap();
    assert_ne!(
        first["pid"], second["pid"],
        "a new process after the restart"
    );
    let ids2 = program_ids(&second);
    assert!(
        ids2.iter().all(|i| !ids1.contains(i)),
        "new programs after the restart"
    );
    assert_programs_gone(&ids1);

    std::thread::sleep(Duration::from_millis(300));
    let c1 = metric(m, "http_server_request_duration_seconds_count", &name);
    for _ in 0..10 {
        assert!(hit(&port));
    }
    wait_for(
        &daemon,
        "10 more requests in the metrics",
        Duration::from_secs(5),
        || metric(m, "http_server_request_duration_seconds_count", &name) == c1 + 10.0,
    );
    // The summary counts this attach only: everything since the restart.
    let since_restart = metric(m, "http_server_request_duration_seconds_count", &name) - before;
    wait_for(
        &daemon,
        "the summary to catch up",
        Duration::from_secs(5),
        || {
            let (s, body) = http_get(
                daemon.control.unwrap(),
                &format!("/v1/targets/{name}/summary"),
            );
            s == 200
                && serde_json::from_str::<serde_json::Value>(&body).unwrap()["summary"]["requests"]
                    == since_restart
        },
    );

    // Control requests are validated before anything changes (the delay and load actions
    // themselves are exercised in the_control_endpoint_sets_and_clears_a_delay_and_runs_a_load).
    let ctl = daemon.control.unwrap();
    let json = [("Content-Type", "application/json")];
    let (s, body) = http(
        ctl,
        "PUT",
        &format!("/v1/targets/{name}/delay"),
        &json,
        br#"{"delay_ms": 60001}"#,
    );
    // The same limit as `awaitlab delay set` and the runner (delay::MAX_DELAY_MS).
    assert_eq!(s, 422, "{body}");
    assert!(body.contains("0-60000"), "{body}");
    let load = format!(r#"{{"target": "{name}", "path": "/", "users": 5, "duration_s": 10}}"#);
    let (s, body) = http(ctl, "POST", "/v1/load", &json, load.as_bytes());
    assert_eq!(s, 400, "a load names its url: {body}");

    // Stop: detached, programs unloaded, the series say so.
    docker(&["stop", "-t", "1", &name]);
    wait_for(
        &daemon,
        "the daemon to detach",
        Duration::from_secs(5),
        || {
            daemon.targets(&[])["targets"]
                .as_array()
                .unwrap()
                .is_empty()
        },
    );
    assert_programs_gone(&ids2);
    assert_eq!(metric(m, "awaitlab_target_attached", &name), 0.0);

    // Started again, then the daemon stops: its shutdown detaches everything.
    docker(&["start", &name]);
    let attached = |d: &Daemon| -> Vec<u32> {
        let list = d.targets(&[])["targets"].as_array().unwrap().clone();
        list.iter()
            .find(|x| x["container"] == name.as_str())
            .map(program_ids)
            .unwrap_or_default()
    };
    let mut ids3 = Vec::new();
    wait_for(
        &daemon,
        "the daemon to attach after a start",
        Duration::from_secs(10),
        || {
            ids3 = attached(&daemon);
            !ids3.is_empty()
        },
    );
    let (code, err) = daemon.stop();
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("daemon stopped (terminated)"), "{err}");
    assert_programs_gone(&ids3);

    // A daemon started while the container runs finds it by listing (here by its label), and
    // also cleans up.
    let by_label =
        format!("metrics_addr = \"127.0.0.1:0\"\n[control]\naddr = \"127.0.0.1:0\"\n[[watch]]\nlabel = \"{label}\"\n");
    let daemon = Daemon::start(&by_label, None, &[]);
    let mut ids4 = Vec::new();
    wait_for(
        &daemon,
        "a new daemon to attach to the running container",
        Duration::from_secs(10),
        || {
            ids4 = attached(&daemon);
            !ids4.is_empty()
        },
    );
    let (code, err) = daemon.stop();
    assert_eq!(code, Some(0), "{err}");
    assert_programs_gone(&ids4);
    drop(container);
}

#[test]
fn the_control_endpoint_beyond_loopback_requires_the_token() {
    // Beyond loopback = on a veth address, inside a namespace made here (never the host's).
    let ns = Netns::new("c");
    let link = Veth::new(None, &ns, "10.233.7");
    let ctl_addr = format!("{}:9465", link.right_ip);
    let rule = format!("[[watch]]\ncontainer = \"awl-none-{}\"\n", tag());

    // Without a token the daemon does not start at all: a usage error naming the fix.
    let dir = TempDir::new("awl-ctl");
    let bare = dir.path().join("bare.toml");
    std::fs::write(
        &bare,
        format!("metrics_addr = \"127.0.0.1:0\"\n[control]\naddr = \"{ctl_addr}\"\n{rule}"),
    )
    .unwrap();
    let out = agent_once(&["daemon", "--config", bare.to_str().unwrap()]);
    assert_eq!(out.code, Some(64), "{}", out.stderr);
    assert!(
        out.stderr.contains("beyond loopback") && out.stderr.contains("token"),
        "{}",
        out.stderr
    );
    assert_eq!(out.stderr.lines().count(), 1, "one line: {}", out.stderr);
    // The same through the flag.
    let lo = dir.path().join("lo.toml");
    std::fs::write(&lo, format!("metrics_addr = \"127.0.0.1:0\"\n{rule}")).unwrap();
    let out = agent_once(&[
        "daemon",
        "--config",
        lo.to_str().unwrap(),
        "--control-addr",
        "0.0.0.0:9465",
    ]);
    assert_eq!(out.code, Some(64), "{}", out.stderr);

    let token = "t0k3n-0123456789-abcdef";
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("{token}\n")).unwrap();
    let config = format!(
        "metrics_addr = \"127.0.0.1:0\"\n[control]\naddr = \"{ctl_addr}\"\ntoken_file = \"{}\"\n{rule}",
        token_file.display()
    );
    let daemon = Daemon::start(&config, Some(&ns), &[]);
    let ctl = daemon.control.unwrap();
    assert_eq!(ctl.to_string(), ctl_addr);

    let bearer = format!("Bearer {token}");
    let good = [("Authorization", bearer.as_str())];
    for auth in [
        &[][..],
        &[("Authorization", "Bearer wrong-token-0123456789")][..],
        &[("Authorization", token)][..],
    ] {
        let (s, body) = http(ctl, "GET", "/v1/targets", auth, b"");
        assert_eq!(s, 401, "{auth:?}: {body}");
        assert!(body.contains("token"), "{body}");
    }
    assert_eq!(daemon.targets(&good)["targets"], serde_json::json!([]));

    // Bad requests: a 4xx with a message each, and the daemon keeps serving.
    let json_ct = ("Content-Type", "application/json");
    let with_json = [good[0], json_ct];
    type Case<'a> = (&'a str, String, Vec<(&'a str, &'a str)>, Vec<u8>, u16);
    let cases: Vec<Case> = vec![
        ("GET", "/nope".into(), good.to_vec(), vec![], 404),
        ("DELETE", "/v1/targets".into(), good.to_vec(), vec![], 405),
        (
            "GET",
            "/v1/targets/bad%20name/summary".into(),
            good.to_vec(),
            vec![],
            400,
        ),
        (
            "GET",
            "/v1/targets/nosuch/summary".into(),
            good.to_vec(),
            vec![],
            404,
        ),
        (
            "PUT",
            "/v1/targets/nosuch/delay".into(),
            with_json.to_vec(),
            br#"{"delay_ms":1}"#.to_vec(),
            404,
        ),
        (
            "POST",
            "/v1/load".into(),
            with_json.to_vec(),
            b"{oops".to_vec(),
            400,
        ),
        (
            "POST",
            "/v1/load".into(),
            [good[0], ("Content-Type", "text/plain")].to_vec(),
            b"{}".to_vec(),
            415,
        ),
        (
            "POST",
            "/v1/load".into(),
            with_json.to_vec(),
            br#"{"target":"x","path":"/","users":1,"duration_s":5,"x":1}"#.to_vec(),
            400,
        ),
        (
            "POST",
            "/v1/load".into(),
            with_json.to_vec(),
            vec![b'{'; 70 * 1024],
            413,
        ),
    ];
    for (method, path, headers, body, code) in cases {
        let (s, text) = http(ctl, method, &path, &headers, &body);
        assert_eq!(s, code, "{method} {path}: {text}");
        let v: serde_json::Value =
            serde_json::from_str(&text).unwrap_or_else(|_| serde_json::json!({ "error": text }));
        assert!(
            v["error"].as_str().is_some_and(|e| e.len() > 5),
            "{method} {path}: no message: {text}"
        );
    }
    // Raw garbage on the socket.
    for raw in [
        &b"\x16\x03\x01\x02\x00garbage\r\n\r\n"[..],
        b"GET /v1/targets\r\n\r\n",
        b"GET / HTTP/1.1\r\nbad header\r\n\r\n",
    ] {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(ctl).unwrap();
        s.write_all(raw).unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        assert!(out.starts_with("HTTP/1.1 4"), "{raw:?} -> {out}");
    }
    assert_eq!(daemon.targets(&good)["version"], 1, "still serving");
    let (code, err) = daemon.stop();
    assert_eq!(code, Some(0), "{err}");
}

#[test]
fn bad_configurations_are_usage_errors_in_one_line() {
    let dir = TempDir::new("awl-cfg");
    let cases = [
        (
            "[[watch]]\ncontainer = \"x\"\nbogus = 1\n",
            "unknown field `bogus`",
        ),
        (
            "metrics_addr = \"not an address\"\n[[watch]]\ncontainer = \"x\"\n",
            "metrics_addr",
        ),
        ("", "no [[watch]] rule"),
        (
            "[[watch]]\ncgroup = \"kubepods\"\n",
            "a cgroup rule needs discovery = \"cgroup\"",
        ),
        (
            "discovery = \"crio\"\n[[watch]]\ncontainer = \"x\"\n",
            "discovery",
        ),
        (
            "[[watch]]\ncontainer = \"x\"\nlabel = \"y\"\n",
            "exactly one of container, label or cgroup",
        ),
        (
            "[control]\naddr = \"127.0.0.1:1\"\ntoken = \"short\"\n[[watch]]\ncontainer = \"x\"\n",
            "at least 16",
        ),
    ];
    for (i, (text, says)) in cases.iter().enumerate() {
        let p = dir.path().join(format!("{i}.toml"));
        std::fs::write(&p, text).unwrap();
        let out = agent_once(&["daemon", "--config", p.to_str().unwrap()]);
        assert_eq!(out.code, Some(64), "{text}: {}", out.stderr);
        assert_eq!(out.stderr.lines().count(), 1, "{text}: {}", out.stderr);
        assert!(out.stderr.contains(says), "{text}: {}", out.stderr);
    }
    let out = agent_once(&["daemon", "--config", "/nonexistent/agent.toml"]);
    assert_eq!(out.code, Some(64), "{}", out.stderr);
    assert!(
        out.stderr.contains("/nonexistent/agent.toml"),
        "{}",
        out.stderr
    );
}

/// Milliseconds of one HTTP/1.0 GET (a new connection each) to the published port.
fn timed_hit(port: &str) -> f64 {
    let t0 = Instant::now();
    assert!(hit(port), "the container's server did not answer");
    t0.elapsed().as_secs_f64() * 1e3
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The control endpoint sets a delay on a followed container (seen in its namespace and in the
/// round trips into it), clears it, and runs a load whose count the probes confirm.
#[test]
fn the_control_endpoint_sets_and_clears_a_delay_and_runs_a_load() {
    let image = httpd_image();
    let t = tag();
    let net = DockerThing {
        kind: "network",
        name: format!("awl{t}n"),
    };
    docker(&["network", "create", &net.name]);
    let name = format!("awl{t}k");
    let _container = DockerThing {
        kind: "container",
        name: name.clone(),
    };
    docker(&[
        "run",
        "-d",
        "--name",
        &name,
        "--network",
        &net.name,
        "-p",
        "127.0.0.1::8000",
        &image.name,
    ]);
    let port = published_port(&name);
    let config = format!(
        "metrics_addr = \"127.0.0.1:0\"\ninterval_s = 0.25\n[control]\naddr = \"127.0.0.1:0\"\n[[watch]]\ncontainer = \"{name}\"\nhttp_ports = [8000]\n"
    );
    let daemon = Daemon::start(&config, None, &[]);
    let (ctl, m) = (daemon.control.unwrap(), daemon.metrics.unwrap());
    // A real Prometheus scrapes the daemon, for the dashboards' check at the end. Every second
    // (with a 1 s timeout): the load below keeps both cores busy, and a scrape that waits for
    // a core longer than its timeout is lost.
    let prometheus = Prometheus::start(&[m], Duration::from_secs(1));
    let mut pid = 0;
    wait_for(
        &daemon,
        "the daemon to attach",
        Duration::from_secs(15),
        || {
            let t = daemon.targets(&[]);
            pid = t["targets"]
                .as_array()
                .unwrap()
                .iter()
                .find(|x| x["container"] == name.as_str())
                .and_then(|x| x["pid"].as_u64())
                .unwrap_or(0);
            pid != 0
        },
    );
    wait_for(
        &daemon,
        "the server to answer",
        Duration::from_secs(10),
        || hit(&port),
    );
    let rule_in_container = || {
        let out = Command::new("nsenter")
            .args(["-t", &pid.to_string(), "-n", "iptables-save"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).contains("awaitlab:")
    };
    let base = median((0..9).map(|_| timed_hit(&port)).collect());

    let json = [("content-type", "application/json")];
    let (status, body) = http(
        ctl,
        "PUT",
        &format!("/v1/targets/{name}/delay"),
        &json,
        b"{\"delay_ms\": 50}",
    );
    assert_eq!(status, 200, "{body}");
    assert!(
        rule_in_container(),
        "no delay rule in the container's namespace"
    );
    // Every packet the container receives waits 50 ms: the SYN and the request at least, so one
    // GET on a new connection takes 50 ms more at the very least and about 100 ms more in all;
    // 250 ms above the baseline would mean the delay line is far off.
    let delayed = median((0..9).map(|_| timed_hit(&port)).collect());
    assert!(
        delayed >= base + 50.0 && delayed <= base + 250.0,
        "baseline {base:.1} ms, with 50 ms delay {delayed:.1} ms"
    );

    let (status, body) = http(
        ctl,
        "DELETE",
        &format!("/v1/targets/{name}/delay"),
        &[],
        b"",
    );
    assert_eq!(status, 200, "{body}");
    assert!(
        !rule_in_container(),
        "the delay rule is still there after DELETE"
    );
    let after = median((0..9).map(|_| timed_hit(&port)).collect());
    // Back to the baseline: well under the 50 ms a remaining delay would add.
    assert!(
        after < base + 25.0,
        "baseline {base:.1} ms, after clearing {after:.1} ms"
    );
    let (status, _) = http(
        ctl,
        "DELETE",
        &format!("/v1/targets/{name}/delay"),
        &[],
        b"",
    );
    assert_eq!(status, 404, "nothing left to clear");

    std::thread::sleep(Duration::from_millis(600));
    let served_before = metric(m, "http_server_request_duration_seconds_count", &name);
    let req = format!(
        "{{\"url\": \"http://127.0.0.1:{port}/index.html\", \"users\": 2, \"duration_s\": 8}}"
    );
    let load_started = now();
    let (status, body) = http(ctl, "POST", "/v1/load", &json, req.as_bytes());
    assert_eq!(status, 202, "{body}");
    let id = serde_json::from_str::<serde_json::Value>(&body).unwrap()["id"]
        .as_u64()
        .unwrap();
    let mut job = serde_json::Value::Null;
    wait_for(
        &daemon,
        "the load run to finish",
        Duration::from_secs(30),
        || {
            let (_, body) = http(ctl, "GET", &format!("/v1/load/{id}"), &[], b"");
            job = serde_json::from_str::<serde_json::Value>(&body).unwrap()["load"].clone();
            job["state"] != "running"
        },
    );
    assert_eq!(job["state"], "done", "{job}");
    let report = &job["report"];
    let (requests, in_flight) = (
        report["requests"].as_u64().unwrap(),
        report["in_flight_at_end"].as_u64().unwrap(),
    );
    assert!(requests > 0 && report["failures"] == 0, "{report}");
    // The probes count what the server answered: every request the client finished, plus at most
    // the ones still in flight when the run ended.
    let mut served = 0.0;
    wait_for(
        &daemon,
        "the probes to count the load",
        Duration::from_secs(5),
        || {
            served = metric(m, "http_server_request_duration_seconds_count", &name) - served_before;
            served >= requests as f64
        },
    );
    assert!(
        served <= (requests + in_flight) as f64,
        "probes {served} vs client {requests} (+{in_flight} in flight)"
    );
    // Every query of the overview dashboard has data 7 s into the daemon's load run ($__rate_interval
    // is 4 scrapes), but
    // those this daemon cannot fill: the experiment cells (only a run has them), database
    // connect times (busybox httpd has no database), and the serving threads' share (it serves
    // each connection in a child that lives milliseconds, so none is alive at a snapshot).
    let cannot = [
        "experiment_cell_info",
        "db_client_connection_create_time",
        "awaitlab_serving_thread",
    ];
    // The load keeps both cores busy, and once in a full suite no query had data at 7 s, not
    // even the series the load does not touch: the scrapes around it were lost (each has a 1 s
    // timeout), not the daemon's figures. The claim is data during the load, so any of four
    // instants in it will do (each 4 s rate window holds four scrapes); the first instant's
    // gaps are reported when none has all.
    let missing_at = |at: f64| -> Vec<String> {
        dashboards_without_data(&prometheus, load_started + at, "4s", "6s")
            .into_iter()
            .filter(|m| m.starts_with("awaitlab-overview.json"))
            .filter(|m| !cannot.iter().any(|c| m.contains(c)))
            .collect()
    };
    let missing = missing_at(7.0);
    let complete =
        missing.is_empty() || [6.0, 8.0, 5.0].iter().any(|&at| missing_at(at).is_empty());
    assert!(complete, "{}", missing.join("\n"));
    let (_, text) = http_get(m, "/metrics");
    promtool_check(&text).unwrap_or_else(|e| panic!("promtool check metrics:\n{e}\n{text}"));
    drop(prometheus);
    let (code, stderr) = daemon.stop();
    assert_eq!(code, Some(0), "{stderr}");
}

/// The systemd unit in deploy/: systemd accepts every line of it (`systemd-analyze verify`
/// warns on stderr about anything it ignores), and its capability bounding set is exactly the
/// list the daemon's own check asks for, plus CAP_NET_RAW for iptables-legacy: the daemon starts
/// under it and nothing else is granted.
#[test]
fn the_systemd_unit_is_valid_and_grants_exactly_the_daemons_capabilities() {
    let unit = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/awaitlab-daemon.service"),
    )
    .unwrap();
    let dir = TempDir::new("awl-unit");
    let path = dir.path().join("awaitlab-daemon.service");
    let bin = agent_bin();
    std::fs::write(
        &path,
        unit.replace("/usr/local/bin/awaitlab", bin.to_str().unwrap()),
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("systemd-analyze");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && said.trim().is_empty(), "{said}");

    let set = |key: &str| -> Vec<String> {
        let line = unit
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .unwrap_or_else(|| panic!("no {key}="));
        let mut v: Vec<String> = line.split_whitespace().map(str::to_string).collect();
        v.sort();
        v
    };
    let mut want: Vec<String> = awaitlab::privilege::DAEMON
        .iter()
        .map(|c| c.name().to_string())
        .chain(["CAP_NET_RAW".to_string()])
        .collect();
    want.sort();
    assert_eq!(set("CapabilityBoundingSet"), want);
    assert_eq!(set("AmbientCapabilities"), want);
}

/// Containers coming and going do not grow the series without bound: 50 containers, each with
/// its own name, are started, followed (attached, one request counted), and removed; with a
/// grace period of 1 s a removed container's series go, so the number of targets on /metrics
/// stays small throughout and is 0 at the end, and every probe is unloaded.
#[test]
fn containers_removed_and_recreated_50_times_leave_a_bounded_number_of_series() {
    const ROUNDS: usize = 50;
    let image = httpd_image();
    let t = tag();
    let label = format!("awaitlab.churn={t}");
    let config = format!(
        "metrics_addr = \"127.0.0.1:0\"\ninterval_s = 0.25\nseries_grace_s = 1.0\n[[watch]]\nlabel = \"{label}\"\nhttp_ports = [8000]\n"
    );
    let daemon = Daemon::start(&config, None, &[]);
    let m = daemon.metrics.unwrap();
    let targets_on_metrics = || -> usize {
        let (_, text) = http_get(m, "/metrics");
        text.lines()
            .filter(|l| l.starts_with("awaitlab_target_attached{"))
            .filter(|l| l.contains(&format!("target=\"awl{t}k")))
            .count()
    };
    let series_on_metrics = || -> usize {
        let (_, text) = http_get(m, "/metrics");
        text.lines()
            .filter(|l| l.contains(&format!("target=\"awl{t}k")))
            .count()
    };
    let mut most_targets = 0;
    let mut most_series = 0;
    for i in 0..ROUNDS {
        let name = format!("awl{t}k{i}");
        let c = run_httpd(&image, &name, &["--label", &label]);
        let port = c.port.clone();
        wait_for(
            &daemon,
            "the daemon to attach",
            Duration::from_secs(15),
            || metric(m, "awaitlab_target_attached", &name) == 1.0,
        );
        wait_for(
            &daemon,
            "a request counted",
            Duration::from_secs(10),
            || {
                hit(&port);
                metric(m, "http_server_request_duration_seconds_count", &name) >= 1.0
            },
        );
        most_targets = most_targets.max(targets_on_metrics());
        most_series = most_series.max(series_on_metrics());
        drop(c);
    }
    // A container lives about a second here and its series 1 s (the grace) plus up to 0.5 s
    // (the daemon's reaping tick) after it: at most 3 targets overlap; 5 allows for a slow
    // Docker. Without expiry this would reach 50.
    eprintln!("at most {most_targets} targets and {most_series} series on /metrics");
    assert!(most_targets <= 5, "{most_targets} targets at once");
    wait_for(
        &daemon,
        "every churned series to go",
        Duration::from_secs(10),
        || series_on_metrics() == 0,
    );
    let (code, stderr) = daemon.stop();
    assert_eq!(code, Some(0), "{stderr}");
}

/// The text of the daemon configuration in deploy/kubernetes/configmap.yaml.
fn configmap_agent_toml() -> String {
    let cm = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../deploy/kubernetes/configmap.yaml"),
    )
    .unwrap();
    cm.split_once("agent.toml: |\n")
        .unwrap()
        .1
        .lines()
        .map(|l| l.strip_prefix("    ").unwrap_or(l))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The agent's image (`cargo xtask images`), run as the DaemonSet in deploy/kubernetes/ runs it:
/// the host's PID namespace, /sys/kernel/btf mounted, a read-only root, every capability dropped
/// but the daemon's list, not privileged, no Docker socket, and the ConfigMap's configuration
/// (cgroup discovery) with its rule narrowed to one container's id. It finds the container
/// through its cgroup, counts the requests it answered (against the client's count), serves
/// them on its published metrics port, and unloads its programs when stopped.
#[test]
fn the_agent_image_measures_a_container_as_the_daemonset_runs_it() {
    let agent_image = format!("awaitlab/agent:{}", env!("CARGO_PKG_VERSION"));
    let has = Command::new("docker")
        .args(["image", "inspect", &agent_image])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    assert!(
        has.is_ok_and(|s| s.success()),
        "{agent_image} is missing: run `cargo xtask images`"
    );
    let image = httpd_image();
    let t = tag();
    let name = format!("awl{t}w");
    let container = run_httpd(&image, &name, &[]);
    let (id, port) = (container.id.clone(), container.port.clone());
    let short = id[..12].to_string();

    // The ConfigMap's configuration, narrowed to this container, with a control endpoint (to
    // read the program ids) and a short interval.
    let dir = TempDir::new("awl-agentimg");
    let token = "awaitlab-test-token-0123456789";
    let toml = configmap_agent_toml()
        .replace(
            "cgroup = \"kubepods\"",
            &format!("cgroup = \"{}\"", &id[..16]),
        )
        .replace("interval_s = 1.0", "interval_s = 0.25");
    assert!(toml.contains(&id[..16]), "{toml}");
    std::fs::write(
        dir.path().join("agent.toml"),
        format!("{toml}\n[control]\naddr = \"0.0.0.0:9465\"\ntoken = \"{token}\"\n"),
    )
    .unwrap();
    let agent = DockerThing {
        kind: "container",
        name: format!("awl{t}agent"),
    };
    let mut run = vec![
        "run".to_string(),
        "-d".into(),
        "--name".into(),
        agent.name.clone(),
        "--pid=host".into(),
        "--read-only".into(),
        "--cap-drop=ALL".into(),
    ];
    // The DaemonSet's capabilities: the daemon's own list plus NET_RAW. Docker engines before
    // 23 (this host's Debian docker.io is 20.10) do not know CAP_BPF and CAP_PERFMON; there
    // CAP_SYS_ADMIN, which is in the list anyway, grants both (as the kernel and the daemon's
    // check accept it for them).
    let knows_bpf = Command::new("docker")
        .args([
            "run",
            "--rm",
            "--cap-drop=ALL",
            "--cap-add=BPF",
            BASE_IMAGE,
            "true",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    for c in awaitlab::privilege::DAEMON {
        let name = c.name().trim_start_matches("CAP_");
        if knows_bpf || !matches!(name, "BPF" | "PERFMON") {
            run.push(format!("--cap-add={name}"));
        }
    }
    run.push("--cap-add=NET_RAW".into());
    run.extend([
        "-v".into(),
        format!("{}:/etc/awaitlab:ro", dir.path().display()),
        "-v".into(),
        "/sys/kernel/btf:/sys/kernel/btf:ro".into(),
        // The DaemonSet mounts the host's /run/awaitlab; here a tmpfs, so that the test does not
        // share the host's delay state with the other tests.
        "--tmpfs".into(),
        "/run/awaitlab".into(),
        "-p".into(),
        "127.0.0.1::9464".into(),
        "-p".into(),
        "127.0.0.1::9465".into(),
        agent_image.clone(),
    ]);
    let run: Vec<&str> = run.iter().map(String::as_str).collect();
    docker(&run);
    let m = docker_port(&agent.name, "9464/tcp");
    let ctl = docker_port(&agent.name, "9465/tcp");
    let logs = || {
        let out = Command::new("docker")
            .args(["logs", &agent.name])
            .output()
            .unwrap();
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    };
    let poll = |what: &str, limit: Duration, f: &mut dyn FnMut() -> bool| {
        let t0 = Instant::now();
        while !f() {
            assert!(
                t0.elapsed() < limit,
                "timed out waiting for {what}; agent said:\n{}",
                logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    poll("the agent's metrics", Duration::from_secs(30), &mut || {
        try_http(m, "GET", "/metrics", &[], b"").is_ok_and(|(s, _)| s == 200)
    });
    let auth = format!("Bearer {token}");
    let mut ids = Vec::new();
    poll("the agent to attach", Duration::from_secs(15), &mut || {
        let Ok((s, body)) = try_http(ctl, "GET", "/v1/targets", &[("Authorization", &auth)], b"")
        else {
            return false;
        };
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        if let Some(t) = v["targets"]
            .as_array()
            .and_then(|a| a.iter().find(|x| x["container"] == short.as_str()))
        {
            ids = program_ids(t);
        }
        s == 200 && !ids.is_empty()
    });
    let answered = hit_once_up_then(&port, 20);
    poll(
        "the requests on /metrics",
        Duration::from_secs(10),
        &mut || metric(m, "http_server_request_duration_seconds_count", &short) == answered,
    );
    drop(container);
    docker(&["stop", "-t", "20", &agent.name]);
    assert!(logs().contains("daemon stopped"), "{}", logs());
    assert_programs_gone(&ids);
}

/// The Kubernetes manifests in deploy/kubernetes/: valid against the Kubernetes API's schemas
/// (kubernetes-validate, offline; the Prometheus Operator's PodMonitor is a custom resource it
/// has no schema for and is checked for its kind and selector only), the DaemonSet runs this
/// version's image with exactly the daemon's capabilities and the host's PID namespace, and
/// the ConfigMap holds a configuration the daemon accepts (cgroup discovery: no Docker socket).
#[test]
fn the_kubernetes_manifests_validate_and_match_the_daemon() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes");
    let validator = std::env::var_os("AWAITLAB_VENV_DIR")
        .map_or_else(|| std::path::PathBuf::from("/var/lib/awaitlab"), Into::into)
        .join("venv-kubernetes-validate/bin/kubernetes-validate");
    for f in [
        "namespace.yaml",
        "configmap.yaml",
        "daemonset.yaml",
        "service.yaml",
    ] {
        let out = Command::new(&validator)
            .args(["--strict", "--kubernetes-version", "1.31.0"])
            .arg(dir.join(f))
            .output()
            .unwrap_or_else(|e| {
                panic!(
                    "{}: {e} (cargo xtask setup installs it)",
                    validator.display()
                )
            });
        assert!(
            out.status.success(),
            "{f}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap();
    let ds = read("daemonset.yaml");
    assert!(
        ds.contains(&format!(
            "image: awaitlab/agent:{}",
            env!("CARGO_PKG_VERSION")
        )),
        "the DaemonSet runs this version's image"
    );
    assert!(ds.contains("hostPID: true") && ds.contains("privileged: false"));
    let caps_line = ds
        .lines()
        .find_map(|l| l.trim().strip_prefix("add: "))
        .expect("capabilities add");
    let mut caps: Vec<String> = serde_json::from_str(caps_line).unwrap();
    caps.sort();
    let mut want: Vec<String> = awaitlab::privilege::DAEMON
        .iter()
        .map(|c| c.name().trim_start_matches("CAP_").to_string())
        .chain(["NET_RAW".to_string()])
        .collect();
    want.sort();
    assert_eq!(caps, want);
    let cfg = awaitlab::daemon::config::DaemonConfig::parse(&configmap_agent_toml()).unwrap();
    assert_eq!(cfg.metrics_addr.port(), 9464);
    assert_eq!(cfg.discovery, awaitlab::daemon::config::Discovery::Cgroup);
    let pm = read("podmonitor.yaml");
    assert!(
        pm.contains("kind: PodMonitor") && pm.contains("app.kubernetes.io/name: awaitlab-agent")
    );
}

/// Cgroup discovery, as on a containerd or CRI-O node where no Docker Engine answers: the
/// daemon finds a container by its cgroup (the rule names a prefix of its id), names it by its
/// short id, counts the requests it answered against the client's count, and detaches when the
/// container is removed.
#[test]
fn cgroup_discovery_follows_a_container_without_docker() {
    let image = httpd_image();
    let t = tag();
    let name = format!("awl{t}g");
    let container = run_httpd(&image, &name, &[]);
    let (id, port) = (container.id.clone(), container.port.clone());
    let short = &id[..12];
    let config = format!(
        "metrics_addr = \"127.0.0.1:0\"\ninterval_s = 0.25\ndiscovery = \"cgroup\"\ndocker_socket = \"/nonexistent/docker.sock\"\n[[watch]]\ncgroup = \"{}\"\nhttp_ports = [8000]\n",
        &id[..16]
    );
    let daemon = Daemon::start(&config, None, &[]);
    let m = daemon.metrics.unwrap();
    assert!(
        daemon.stderr_text().contains("named by their ids"),
        "{}",
        daemon.stderr_text()
    );
    wait_for(
        &daemon,
        "the daemon to attach",
        Duration::from_secs(15),
        || metric(m, "awaitlab_target_attached", short) == 1.0,
    );
    let answered = hit_once_up_then(&port, 15);
    wait_for(
        &daemon,
        "the requests in the metrics",
        Duration::from_secs(10),
        || metric(m, "http_server_request_duration_seconds_count", short) == answered,
    );
    drop(container);
    // Two paths detach a removed container, whichever comes first: the cgroup scan no longer
    // finds it ("container gone"), or its probe thread sees the namespace go and the daemon
    // reaps it. The probe thread zeroes the gauge before the daemon logs the detach, so the
    // test waits for the log line, not the gauge.
    let detached = format!("detached from container {short} (");
    wait_for(&daemon, "the detach", Duration::from_secs(10), || {
        daemon.stderr_text().contains(&detached)
    });
    assert_eq!(metric(m, "awaitlab_target_attached", short), 0.0);
    let (code, stderr) = daemon.stop();
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stderr.contains(&format!("{detached}container gone)"))
            || stderr.contains(&format!("{detached}container's namespace is gone)")),
        "{stderr}"
    );
}

/// The control plane cannot stall the data plane: with 1,000 control requests left half sent
/// (a head without its end, which the server waits up to 10 s for), every scrape of /metrics
/// and every GET /v1/targets answers within Prometheus's default scrape timeout (10 s), and
/// the half-sent ones are cut off (their connections closed) once their time is up.
#[test]
fn a_thousand_half_sent_control_requests_do_not_stall_scrapes() {
    use std::io::Write as _;
    let config = "metrics_addr = \"127.0.0.1:0\"\n[control]\naddr = \"127.0.0.1:0\"\n[[watch]]\ncontainer = \"awl-nothing-here\"\n";
    let daemon = Daemon::start(config, None, &[]);
    let (m, ctl) = (daemon.metrics.unwrap(), daemon.control.unwrap());
    let mut held = Vec::new();
    for _ in 0..1000 {
        let mut s = std::net::TcpStream::connect(ctl).unwrap();
        s.write_all(b"PUT /v1/targets/x/delay HTTP/1.1\r\nHost: x\r\nContent-Le")
            .unwrap();
        held.push(s);
    }
    let mut slowest = Duration::ZERO;
    for i in 0..20 {
        let t0 = Instant::now();
        let (status, _) = if i % 2 == 0 {
            http_get(m, "/metrics")
        } else {
            http(ctl, "GET", "/v1/targets", &[], b"")
        };
        let took = t0.elapsed();
        assert_eq!(status, 200);
        slowest = slowest.max(took);
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("slowest answer with 1,000 half-sent requests open: {slowest:?}");
    assert!(slowest < Duration::from_secs(10), "{slowest:?}");
    // The server's read timeout (10 s) closes the half-sent ones: reading sees the end.
    let t0 = Instant::now();
    let mut first = held.remove(0);
    first
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut buf = [0u8; 512];
    let n = std::io::Read::read(&mut first, &mut buf).unwrap_or(0);
    let said = String::from_utf8_lossy(&buf[..n]);
    assert!(n == 0 || said.starts_with("HTTP/1.1 4"), "{said}");
    assert!(
        t0.elapsed() < Duration::from_secs(15),
        "cut off after {:?}",
        t0.elapsed()
    );
    drop(held);
    let (code, stderr) = daemon.stop();
    assert_eq!(code, Some(0), "{stderr}");
}

/// An httpd container followed by a daemon with a control endpoint: what the delay tests start
/// from. The container is removed on drop.
struct Followed {
    _image: DockerThing,
    _container: Httpd,
    name: String,
    /// The container's process, whose network namespace holds the delay rules.
    pid: String,
    config: String,
    daemon: Daemon,
}

impl Followed {
    fn start(suffix: &str) -> Followed {
        let image = httpd_image();
        let name = format!("awl{}{suffix}", tag());
        let container = run_httpd(&image, &name, &[]);
        let pid = docker(&["inspect", "-f", "{{.State.Pid}}", &name])
            .trim()
            .to_string();
        let config = format!(
            "metrics_addr = \"127.0.0.1:0\"\ninterval_s = 0.25\n[control]\naddr = \"127.0.0.1:0\"\n[[watch]]\ncontainer = \"{name}\"\nhttp_ports = [8000]\n"
        );
        let daemon = Daemon::start(&config, None, &[]);
        wait_for(
            &daemon,
            "the daemon to attach",
            Duration::from_secs(15),
            || {
                daemon.targets(&[])["targets"]
                    .as_array()
                    .is_some_and(|a| a.iter().any(|x| x["container"] == name.as_str()))
            },
        );
        Followed {
            _image: image,
            _container: container,
            name,
            pid,
            config,
            daemon,
        }
    }

    /// awaitlab's iptables rules in the container's namespace.
    fn rules(&self) -> usize {
        let out = Command::new("nsenter")
            .args(["-t", &self.pid, "-n", "iptables-save"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.contains("awaitlab:"))
            .count()
    }
}

/// `kill -9` of the daemon while it holds a delay on a container leaves the rule (nothing runs
/// its guard); the next daemon's start removes it, and says so.
#[test]
fn a_delay_left_by_a_killed_daemon_is_removed_by_the_next_start() {
    let mut f = Followed::start("d");
    let (name, config) = (f.name.clone(), f.config.clone());
    let ctl = f.daemon.control.unwrap();
    let json = [("content-type", "application/json")];
    let path = format!("/v1/targets/{name}/delay");
    let (status, body) = http(
        ctl,
        "PUT",
        &path,
        &json,
        b"{\"delay_ms\": 50, \"backend\": \"nfqueue\"}",
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(f.rules(), 1, "the delay's rule in the container");
    let mut child = f.daemon.child.take().unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(f.rules(), 1, "kill -9 ran no guard: the rule stays");

    let next = Daemon::start(&config, None, &[]);
    assert_eq!(f.rules(), 0, "the next start removed it");
    assert!(
        next.stderr_text()
            .contains("removed a delay left by a killed agent"),
        "{}",
        next.stderr_text()
    );
    let (code, stderr) = next.stop();
    assert_eq!(code, Some(0), "{stderr}");
}

/// Kills `awaitlab delay set` (after SIGCONT, should it be stopped) on drop, then clears the
/// container's delay, so a failing test leaves no rule behind.
struct Owner {
    child: std::process::Child,
    target: String,
}

impl Drop for Owner {
    fn drop(&mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGCONT) };
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = Command::new(agent_bin())
            .args(["delay", "clear", &self.target])
            .output();
    }
}

/// A delay owner that does not act on SIGTERM (an `awaitlab delay set` stopped with SIGSTOP: it
/// still holds its state file's lock, so it is alive, and a stopped process handles no signal
/// until it is continued) holds a delay on a watched container, and `awaitlab delay clear`
/// waits its 5 s for it. Meanwhile the daemon answers every scrape of /metrics and every GET
/// /v1/targets within Prometheus's default scrape timeout (10 s), and a PUT of a delay on the
/// same container is refused at once with the owner named. Then the clear removes the rule
/// from under the stuck owner.
#[test]
fn a_clear_waiting_on_an_owner_that_ignores_sigterm_does_not_stall_the_daemon() {
    let f = Followed::start("o");
    let name = f.name.clone();
    let (m, ctl) = (f.daemon.metrics.unwrap(), f.daemon.control.unwrap());

    let target = format!("docker:{name}");
    let dir = TempDir::new("awl-owner");
    let mut owner = Owner {
        child: Command::new(agent_bin())
            .args([
                "delay",
                "set",
                &target,
                "--ms",
                "50",
                "--backend",
                "nfqueue",
            ])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("err")).unwrap())
            .spawn()
            .unwrap(),
        target: target.clone(),
    };
    let t0 = Instant::now();
    let said = || std::fs::read_to_string(dir.path().join("err")).unwrap_or_default();
    while !said().contains(" set on ") {
        assert!(
            owner.child.try_wait().unwrap().is_none(),
            "delay set exited: {}",
            said()
        );
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "delay set did not report"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(f.rules(), 1, "the owner's rule");
    // SAFETY: signalling our own child.
    unsafe { libc::kill(owner.child.id() as i32, libc::SIGSTOP) };

    let mut clear = Command::new(agent_bin())
        .args(["delay", "clear", &target])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let cleared_at = Instant::now();
    let json = [("content-type", "application/json")];
    let path = format!("/v1/targets/{name}/delay");
    let mut slowest = Duration::ZERO;
    let mut refused = 0;
    let mut waited = None;
    // Until the clear is done and a second after (the clear waits 5 s on the owner).
    while waited.is_none_or(|w| cleared_at.elapsed() < w + Duration::from_secs(1)) {
        assert!(
            cleared_at.elapsed() < Duration::from_secs(30),
            "the clear did not end"
        );
        if waited.is_none() && clear.try_wait().unwrap().is_some() {
            waited = Some(cleared_at.elapsed());
        }
        for i in 0..3 {
            let t = Instant::now();
            let (status, body) = match i {
                0 => http_get(m, "/metrics"),
                1 => http(ctl, "GET", "/v1/targets", &[], b""),
                _ => http(
                    ctl,
                    "PUT",
                    &path,
                    &json,
                    b"{\"delay_ms\": 20, \"backend\": \"nfqueue\"}",
                ),
            };
            slowest = slowest.max(t.elapsed());
            if i < 2 {
                assert_eq!(status, 200, "{body}");
            } else if status == 200 {
                // Set: the clear had removed the owner's rule, so the only rule is the daemon's
                // own. Take it off again for the count of rules below.
                assert_eq!(f.rules(), 1, "the daemon's delay beside the owner's");
                let (s, b) = http(ctl, "DELETE", &path, &[], b"");
                assert_eq!(s, 200, "{b}");
            } else {
                // The stuck owner's rule is still there: refused, the owner named.
                assert!(body.contains("already has a delay"), "{status}: {body}");
                refused += 1;
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = clear.wait_with_output().unwrap();
    let waited = waited.unwrap();
    eprintln!(
        "slowest daemon answer while the clear waited on a stuck owner: {slowest:?}; {refused} PUTs refused"
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(refused > 0, "no PUT met the stuck owner's delay");
    assert!(slowest < Duration::from_secs(10), "{slowest:?}");
    // It waited its 5 s (the owner never stopped), then removed the rule under the owner.
    assert!(waited >= Duration::from_secs(5), "{waited:?}");
    assert_eq!(f.rules(), 0, "the clear removed the stuck owner's rule");
    drop(owner);
    let (code, stderr) = f.daemon.stop();
    assert_eq!(code, Some(0), "{stderr}");
}
