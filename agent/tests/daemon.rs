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
    let published = || {
        docker(&["port", &name, "8000/tcp"])
            .lines()
            .next()
            .unwrap()
            .rsplit(':')
            .next()
            .unwrap()
            .to_string()
    };
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
        || metric(m, "awaitlab_http_server_requests_total", &name) == warmup,
    );
    for _ in 0..20 {
        assert!(hit(&port));
    }
    wait_for(
        &daemon,
        "20 requests in the metrics",
        Duration::from_secs(5),
        || metric(m, "awaitlab_http_server_requests_total", &name) == warmup + 20.0,
    );

    // Restart: the daemon detaches, re-attaches to the new process and namespace, and the same
    // series keep counting within 5 s.
    let before = metric(m, "awaitlab_http_server_requests_total", &name);
    docker(&["restart", "-t", "1", &name]);
    // An ephemeral published port may change with the restart.
    let port = published();
    let resumed = wait_for(
        &daemon,
        "metrics to resume after the restart",
        Duration::from_secs(5),
        || {
            hit(&port);
            metric(m, "awaitlab_http_server_requests_total", &name) > before
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
    let c1 = metric(m, "awaitlab_http_server_requests_total", &name);
    for _ in 0..10 {
        assert!(hit(&port));
    }
    wait_for(
        &daemon,
        "10 more requests in the metrics",
        Duration::from_secs(5),
        || metric(m, "awaitlab_http_server_requests_total", &name) == c1 + 10.0,
    );
    // The summary counts this attach only: everything since the restart.
    let since_restart = metric(m, "awaitlab_http_server_requests_total", &name) - before;
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
            "[[watch]]\ncontainer = \"x\"\nlabel = \"y\"\n",
            "exactly one of container or label",
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
    let port = docker(&["port", &name, "8000/tcp"])
        .lines()
        .next()
        .unwrap()
        .rsplit(':')
        .next()
        .unwrap()
        .to_string();
    let config = format!(
        "metrics_addr = \"127.0.0.1:0\"\ninterval_s = 0.25\n[control]\naddr = \"127.0.0.1:0\"\n[[watch]]\ncontainer = \"{name}\"\nhttp_ports = [8000]\n"
    );
    let daemon = Daemon::start(&config, None, &[]);
    let (ctl, m) = (daemon.control.unwrap(), daemon.metrics.unwrap());
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
    let served_before = metric(m, "awaitlab_http_server_requests_total", &name);
    let req = format!(
        "{{\"url\": \"http://127.0.0.1:{port}/index.html\", \"users\": 2, \"duration_s\": 2}}"
    );
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
            served = metric(m, "awaitlab_http_server_requests_total", &name) - served_before;
            served >= requests as f64
        },
    );
    assert!(
        served <= (requests + in_flight) as f64,
        "probes {served} vs client {requests} (+{in_flight} in flight)"
    );
    let (code, stderr) = daemon.stop();
    assert_eq!(code, Some(0), "{stderr}");
}
