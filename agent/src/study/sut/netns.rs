//! The `netns` back end: the system under test as plain processes, no Docker. PostgreSQL from
//! Debian's binaries (`/usr/lib/postgresql/15/bin`), with its own data directory, runs as the
//! `postgres` user in namespace `NAMEd`; the Django server, from the virtual environment that
//! `cargo xtask setup` made (`/var/lib/awaitlab/venv-STACK`, or `$AWAITLAB_VENV_DIR`), runs as
//! `nobody` in namespace `NAMEs`. A veth pair joins them (10.77.0.1 = database, 10.77.0.2 =
//! server), and a second one joins the host to the server (a free /30 in 10.231.0.0/16), so the
//! load generator on the host reaches the server and nothing else. The server's link
//! authenticates with SCRAM-SHA-256 and a password (or `trust`, `Options::db_auth`); the local
//! socket, which the agent's psql uses, is trusted.
//!
//! Files live in `/var/lib/awaitlab/sut/NAME` (data directory, sockets, logs, the app). It must
//! only ever signal processes found inside its own namespaces, and `down` removes namespaces,
//! veths (they go with the namespaces), processes and files, whatever state a killed run left.

use std::{
    ffi::CString,
    fs::{self, File},
    io::Write as _,
    os::{
        fd::AsRawFd,
        unix::{fs::PermissionsExt, process::CommandExt},
    },
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use super::{
    assets, children, tail, wait_http, Backend, Options, Setup, Stack, State, SutError, DB_PORT,
    SERVER_PORT, STATE_VERSION,
};

/// PostgreSQL's binaries (Debian's postgresql-15).
const PG_BIN: &str = "/usr/lib/postgresql/15/bin";
const DB_IP: &str = "10.77.0.1";
const SERVER_INNER_IP: &str = "10.77.0.2";
/// Passwords are stored as SCRAM-SHA-256 verifiers (PostgreSQL >= 14's default, said outright so
/// that `SHOW password_encryption` records it).
const PASSWORD_ENCRYPTION: &str = "password_encryption=scram-sha-256";
/// How long PostgreSQL and the server may take to come up (migrate included).
const START_LIMIT: Duration = Duration::from_secs(90);

pub struct Netns;

fn db_ns(name: &str) -> String {
    format!("{name}d")
}
fn srv_ns(name: &str) -> String {
    format!("{name}s")
}
fn run_dir(name: &str) -> PathBuf {
    let base = std::env::var_os("AWAITLAB_SUT_DIR")
        .map_or_else(|| PathBuf::from("/var/lib/awaitlab/sut"), PathBuf::from);
    base.join(name)
}

/// The virtual environment of a stack; the same place `cargo xtask setup` fills.
pub(crate) fn venv_dir(stack: Stack) -> PathBuf {
    let base = std::env::var_os("AWAITLAB_VENV_DIR")
        .map_or_else(|| PathBuf::from("/var/lib/awaitlab"), PathBuf::from);
    base.join(format!("venv-{}", stack.name()))
}

fn run(cmd: &mut Command) -> Result<String, SutError> {
    let line = format!("{:?}", cmd).replace('"', "");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(SutError::io(format!("starting {line}")))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(SutError::Command {
            cmd: line,
            detail: format!("{}: {}", out.status, tail(&err, 5)),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ip(args: &[&str]) -> Result<String, SutError> {
    run(Command::new("ip").args(args))
}

struct User {
    uid: u32,
    gid: u32,
}

fn user(name: &str) -> Result<User, SutError> {
    let c = CString::new(name).expect("no NUL in a user name");
    // SAFETY: getpwnam returns a pointer into static storage or NULL; we copy the ids at once
    // and no other thread of ours calls getpw* concurrently.
    let pw = unsafe { libc::getpwnam(c.as_ptr()) };
    if pw.is_null() {
        return Err(SutError::Other(format!(
            "no user {name:?} (Debian's postgresql package creates `postgres`)"
        )));
    }
    // SAFETY: pw is non-null and points to a valid passwd.
    Ok(unsafe {
        User {
            uid: (*pw).pw_uid,
            gid: (*pw).pw_gid,
        }
    })
}

/// True while `pid` runs. Reaps it when it is our child and has exited.
fn alive(pid: u32) -> bool {
    let mut status = 0;
    // SAFETY: waitpid with WNOHANG on one pid; no memory is shared.
    let r = unsafe { libc::waitpid(pid as libc::pid_t, &mut status, libc::WNOHANG) };
    if r == pid as libc::pid_t {
        return false;
    }
    if r == 0 {
        return true;
    }
    // Not our child (the CLI's `up` exited since): a zombie counts as gone.
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z')),
        Err(_) => false,
    }
}

/// Makes `cmd` enter the namespace open as `ns` and run as `user` (in a new session when
/// `detach`); `ns` must stay open until the command is spawned.
fn enter(cmd: &mut Command, ns: &File, user: &User, detach: bool) {
    let fd = ns.as_raw_fd();
    let (uid, gid) = (user.uid, user.gid);
    // SAFETY: only async-signal-safe calls between fork and exec; the caller keeps `ns` open.
    unsafe {
        cmd.pre_exec(move || {
            // setns before dropping root: it needs CAP_SYS_ADMIN.
            if libc::setns(fd, libc::CLONE_NEWNET) != 0
                || (detach && libc::setsid() < 0)
                || libc::setgroups(0, std::ptr::null()) != 0
                || libc::setgid(gid) != 0
                || libc::setuid(uid) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Starts `cmd` inside the namespace at `ns_path`, as `user`, in a new session (so that it
/// outlives a CLI that exits, and a terminal's Ctrl-C does not reach it), output to `log`.
fn spawn_in(ns_path: &str, user: &User, cmd: &mut Command, log: &Path) -> Result<u32, SutError> {
    let ns = File::open(ns_path).map_err(SutError::io(format!("opening {ns_path}")))?;
    let out = File::create(log).map_err(SutError::io(format!("creating {}", log.display())))?;
    let err = out
        .try_clone()
        .map_err(SutError::io(format!("opening {}", log.display())))?;
    cmd.stdin(Stdio::null()).stdout(out).stderr(err);
    enter(cmd, &ns, user, true);
    let child = cmd
        .spawn()
        .map_err(SutError::io(format!("starting {:?}", cmd.get_program())))?;
    drop(ns);
    // Not waited on here: `alive` reaps it, and when this process exits init does.
    Ok(child.id())
}

/// A /30 in 10.231.0.0/16 that no address or route on the host uses yet, derived from the name
/// so the same name tends to get the same subnet.
fn host_subnet(name: &str) -> Result<(String, String), SutError> {
    let used = format!(
        "{}\n{}",
        ip(&["-4", "-o", "addr", "show"])?,
        ip(&["-4", "route", "show", "table", "all"])?
    );
    let h = name
        .bytes()
        .fold(2166136261u32, |h, b| (h ^ b as u32).wrapping_mul(16777619));
    for attempt in 0..16384u32 {
        let idx = (h.wrapping_add(attempt.wrapping_mul(7919))) % 16384;
        let (a, b) = (idx / 64, (idx % 64) * 4);
        let net = format!("10.231.{a}.{b}/30");
        let host = format!("10.231.{a}.{}", b + 1);
        let server = format!("10.231.{a}.{}", b + 2);
        if !used.contains(&net)
            && !used.contains(&format!("{host}/"))
            && !used.contains(&format!("{server}/"))
        {
            return Ok((host, server));
        }
    }
    Err(SutError::Other("no free /30 in 10.231.0.0/16".into()))
}

fn psql_cmd(sock: &Path) -> Command {
    let mut c = Command::new(Path::new(PG_BIN).join("psql"));
    c.args([
        "-X",
        "-q",
        "-At",
        "-v",
        "ON_ERROR_STOP=1",
        "-p",
        &DB_PORT.to_string(),
        "-U",
        "postgres",
        "-d",
        "study",
        "-h",
    ])
    .arg(sock)
    .env("PGCONNECT_TIMEOUT", "10");
    c
}

fn read_log(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_default()
}

impl Netns {
    fn up_inner(&self, opts: &Options) -> Result<State, SutError> {
        let name = &opts.name;
        check_prerequisites(opts)?;
        let pg = user("postgres")?;
        let nobody = user("nobody")?;

        // Files: the app (read-only for the server), the data directory and sockets (postgres).
        let dir = run_dir(name);
        let app = dir.join("app");
        let pgdata = dir.join("pgdata");
        let sock = dir.join("sock");
        for (rel, text) in assets::APP_FILES {
            let p = app.join(rel);
            let parent = p.parent().expect("app files have a parent");
            fs::create_dir_all(parent)
                .map_err(SutError::io(format!("creating {}", app.display())))?;
            fs::write(&p, text).map_err(SutError::io(format!("writing {}", p.display())))?;
            // Readable by the server's user whatever our umask is.
            for (path, mode) in [(parent, 0o755), (p.as_path(), 0o644)] {
                fs::set_permissions(path, fs::Permissions::from_mode(mode))
                    .map_err(SutError::io(format!("chmod {}", path.display())))?;
            }
        }
        for d in [&pgdata, &sock] {
            fs::create_dir_all(d).map_err(SutError::io(format!("creating {}", d.display())))?;
            std::os::unix::fs::chown(d, Some(pg.uid), Some(pg.gid))
                .map_err(SutError::io(format!("chown {}", d.display())))?;
            fs::set_permissions(d, fs::Permissions::from_mode(0o700))
                .map_err(SutError::io(format!("chmod {}", d.display())))?;
        }
        // postgres and nobody must be able to reach the app and the data directory: our own
        // directories are opened up, the host's are only checked (never chmod'ed).
        for d in [&dir, &app] {
            fs::set_permissions(d, fs::Permissions::from_mode(0o755))
                .map_err(SutError::io(format!("chmod {}", d.display())))?;
        }
        let mut p = dir.clone();
        while p.pop() {
            let mode = fs::metadata(&p)
                .map(|m| m.permissions().mode())
                .unwrap_or(0);
            if mode & 0o001 == 0 {
                return Err(SutError::Other(format!(
                    "{} is not searchable by other users; postgres and nobody cannot reach {} \
                     (set AWAITLAB_SUT_DIR elsewhere)",
                    p.display(),
                    dir.display()
                )));
            }
        }

        // Namespaces and links.
        let (dns, sns) = (db_ns(name), srv_ns(name));
        for ns in [&dns, &sns] {
            ip(&["netns", "add", ns])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        let (va, vb, vh, vc) = (
            format!("{name}a"),
            format!("{name}b"),
            format!("{name}h"),
            format!("{name}c"),
        );
        ip(&[
            "link", "add", &va, "netns", &dns, "type", "veth", "peer", "name", &vb, "netns", &sns,
        ])?;
        ip(&[
            "-n",
            &dns,
            "addr",
            "add",
            &format!("{DB_IP}/30"),
            "dev",
            &va,
        ])?;
        ip(&["-n", &dns, "link", "set", &va, "up"])?;
        ip(&[
            "-n",
            &sns,
            "addr",
            "add",
            &format!("{SERVER_INNER_IP}/30"),
            "dev",
            &vb,
        ])?;
        ip(&["-n", &sns, "link", "set", &vb, "up"])?;
        let (host_ip, server_ip) = host_subnet(name)?;
        ip(&[
            "link", "add", &vh, "type", "veth", "peer", "name", &vc, "netns", &sns,
        ])?;
        ip(&["addr", "add", &format!("{host_ip}/30"), "dev", &vh])?;
        ip(&["link", "set", &vh, "up"])?;
        ip(&[
            "-n",
            &sns,
            "addr",
            "add",
            &format!("{server_ip}/30"),
            "dev",
            &vc,
        ])?;
        ip(&["-n", &sns, "link", "set", &vc, "up"])?;

        // PostgreSQL: initdb, database `study`, trust from the server's link only.
        let initdb = Command::new(Path::new(PG_BIN).join("initdb"))
            .arg("-D")
            .arg(&pgdata)
            .args([
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C.UTF-8",
            ])
            .current_dir(&dir)
            .uid(pg.uid)
            .gid(pg.gid)
            .output()
            .map_err(SutError::io("starting initdb"))?;
        if !initdb.status.success() {
            return Err(SutError::Start {
                what: "PostgreSQL".into(),
                reason: format!("initdb failed ({})", initdb.status),
                log: tail(&String::from_utf8_lossy(&initdb.stderr), 8),
            });
        }
        // The server's link authenticates as chosen (SCRAM by default, as in the study's image);
        // the local socket, which the runner's psql uses, stays trusted as initdb made it.
        let hba = pgdata.join("pg_hba.conf");
        fs::OpenOptions::new()
            .append(true)
            .open(&hba)
            .and_then(|mut f| {
                writeln!(f, "host all all 10.77.0.0/30 {}", opts.db_auth.hba_method())
            })
            .map_err(SutError::io(format!("writing {}", hba.display())))?;
        let mut single = Command::new(Path::new(PG_BIN).join("postgres"))
            .args(["--single", "-D"])
            .arg(&pgdata)
            .args(["-c", PASSWORD_ENCRYPTION])
            .arg("postgres")
            .current_dir(&dir)
            .uid(pg.uid)
            .gid(pg.gid)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(SutError::io("starting postgres --single"))?;
        single
            .stdin
            .take()
            .expect("piped")
            // One statement per line in single-user mode.
            .write_all(
                format!(
                    "CREATE DATABASE study\nALTER ROLE postgres PASSWORD '{}'\n",
                    super::DB_PASSWORD.replace('\'', "''")
                )
                .as_bytes(),
            )
            .map_err(SutError::io("postgres --single"))?;
        let out = single
            .wait_with_output()
            .map_err(SutError::io("postgres --single"))?;
        if !out.status.success() {
            return Err(SutError::Start {
                what: "PostgreSQL".into(),
                reason: "creating database study and the password failed".into(),
                log: tail(&String::from_utf8_lossy(&out.stderr), 8),
            });
        }

        let db_pid = start_postgres(opts, &pg)?;
        start_server(opts, &nobody, &server_ip, db_pid)
    }
}

fn check_prerequisites(opts: &Options) -> Result<(), SutError> {
    let venv = venv_dir(opts.stack);
    let stamp = venv.join("awaitlab-requirements.txt");
    if fs::read_to_string(&stamp).ok().as_deref() != Some(opts.stack.requirements()) {
        return Err(SutError::Other(format!(
            "{} is missing or out of date; make it with `cargo xtask setup`",
            venv.display()
        )));
    }
    if !Path::new(PG_BIN).join("postgres").exists() {
        return Err(SutError::Other(format!(
            "{PG_BIN}/postgres is missing; install postgresql-15 (`cargo xtask setup`)"
        )));
    }
    Ok(())
}

/// Starts the postmaster on the initialised data directory and waits until it accepts
/// connections; returns its pid.
fn start_postgres(opts: &Options, pg: &User) -> Result<u32, SutError> {
    let dir = run_dir(&opts.name);
    let (pgdata, sock, pg_log) = (
        dir.join("pgdata"),
        dir.join("sock"),
        dir.join("postgres.log"),
    );
    let mut pg_cmd = Command::new(Path::new(PG_BIN).join("postgres"));
    pg_cmd
        .arg("-D")
        .arg(&pgdata)
        .args([
            "-c",
            &format!("listen_addresses={DB_IP}"),
            "-c",
            &format!("port={DB_PORT}"),
        ])
        .args([
            "-c",
            &format!("max_connections={}", opts.setup.max_connections()),
            "-c",
            PASSWORD_ENCRYPTION,
            "-c",
            &format!("log_line_prefix={}", super::LOG_LINE_PREFIX),
        ])
        .arg("-c")
        .arg(format!("unix_socket_directories={}", sock.display()))
        .current_dir(&dir)
        .env_clear()
        .env("LANG", "C.UTF-8");
    for kv in &opts.postgres_args {
        pg_cmd.args(["-c", kv]);
    }
    let ns = format!("/run/netns/{}", db_ns(&opts.name));
    let db_pid = spawn_in(&ns, pg, &mut pg_cmd, &pg_log)?;
    let t0 = Instant::now();
    loop {
        let ready = Command::new(Path::new(PG_BIN).join("pg_isready"))
            .arg("-h")
            .arg(&sock)
            .args(["-p", &DB_PORT.to_string(), "-q"])
            .status()
            .is_ok_and(|s| s.success());
        if ready {
            return Ok(db_pid);
        }
        if !alive(db_pid) || t0.elapsed() > START_LIMIT {
            let reason = if alive(db_pid) {
                format!("not ready within {START_LIMIT:?}")
            } else {
                "postgres exited".into()
            };
            return Err(SutError::Start {
                what: "PostgreSQL".into(),
                reason,
                log: tail(&read_log(&pg_log), 8),
            });
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Starts the Django server and waits until it answers HTTP. serve.sh migrates, then execs
/// gunicorn, so the pid is gunicorn's master.
fn start_server(
    opts: &Options,
    nobody: &User,
    server_ip: &str,
    db_pid: u32,
) -> Result<State, SutError> {
    let name = &opts.name;
    let dir = run_dir(name);
    let app = dir.join("app");
    // A fresh log with every server: the study's settings print every SQL statement, so this
    // file grows with the load, and a server (re)started for each cell bounds it by one cell.
    let srv_log = dir.join("server.log");
    let mut srv = Command::new("/bin/sh");
    srv.arg(app.join("serve.sh"));
    server_env(&mut srv, opts.setup, opts.stack, &app);
    srv.env("AWL_BIND", format!("0.0.0.0:{SERVER_PORT}"));
    let sns = srv_ns(name);
    let server_pid = spawn_in(&format!("/run/netns/{sns}"), nobody, &mut srv, &srv_log)?;
    let addr = format!("{server_ip}:{SERVER_PORT}")
        .parse()
        .map_err(|_| SutError::Other(format!("bad server address {server_ip}")))?;
    if let Err(reason) = wait_http(addr, START_LIMIT, || alive(server_pid)) {
        return Err(SutError::Start {
            what: "the Django server".into(),
            reason,
            log: tail(&read_log(&srv_log), 12),
        });
    }
    let mut server_pids = vec![server_pid];
    server_pids.extend(children(server_pid));
    Ok(State {
        version: STATE_VERSION,
        backend: super::BackendKind::Netns,
        setup: opts.setup,
        stack: opts.stack,
        name: name.clone(),
        url: format!("http://{addr}"),
        db_port: DB_PORT,
        netns: format!("/run/netns/{sns}"),
        server_pids,
        db_pid,
    })
}

/// The server's environment (its venv first on PATH, `super::server_env`), in the app directory.
fn server_env(cmd: &mut Command, setup: Setup, stack: Stack, app: &Path) {
    let venv = venv_dir(stack);
    cmd.current_dir(app)
        .env_clear()
        .env(
            "PATH",
            format!("{}:/usr/bin:/bin", venv.join("bin").display()),
        )
        .env("HOME", "/nonexistent")
        .env("LANG", "C.UTF-8")
        .env("PYTHONUNBUFFERED", "1")
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("DJANGO_SETTINGS_MODULE", "studysite.settings")
        .envs(super::server_env(setup, stack, DB_IP));
}

/// Stops every process inside namespace `ns`: `sig` first, SIGKILL after `grace`.
fn stop_all_in(ns: &str, sig: libc::c_int, grace: Duration) -> bool {
    let pids = |ns: &str| -> Vec<u32> {
        ip(&["netns", "pids", ns])
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect()
    };
    let first = pids(ns);
    if first.is_empty() {
        return false;
    }
    for &p in &first {
        // SAFETY: kill has no memory-safety preconditions; these pids were just found inside a
        // namespace this back end made.
        unsafe { libc::kill(p as libc::pid_t, sig) };
    }
    let t0 = Instant::now();
    while first.iter().any(|&p| alive(p)) && t0.elapsed() < grace {
        std::thread::sleep(Duration::from_millis(50));
    }
    for p in pids(ns) {
        // SAFETY: as above.
        unsafe { libc::kill(p as libc::pid_t, libc::SIGKILL) };
    }
    let t0 = Instant::now();
    while first.iter().any(|&p| alive(p)) && t0.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

impl Backend for Netns {
    fn up(&self, opts: &Options) -> Result<State, SutError> {
        self.up_inner(opts)
    }

    fn switch(&self, state: &State, opts: &Options) -> Result<State, SutError> {
        check_prerequisites(opts)?;
        let server_ip = state.server_addr()?.ip().to_string();
        stop_all_in(&srv_ns(&opts.name), libc::SIGINT, Duration::from_secs(5));
        let db_pid = if state.setup.max_connections() != opts.setup.max_connections() {
            // SIGINT: PostgreSQL's fast shutdown; the data directory (and the seed) stays.
            stop_all_in(&db_ns(&opts.name), libc::SIGINT, Duration::from_secs(30));
            start_postgres(opts, &user("postgres")?)?
        } else {
            state.db_pid
        };
        start_server(opts, &user("nobody")?, &server_ip, db_pid)
    }

    fn psql(&self, state: &State, statements: &[&str]) -> Result<String, SutError> {
        let mut c = psql_cmd(&run_dir(&state.name).join("sock"));
        for s in statements {
            c.args(["-c", s]);
        }
        run(&mut c).map_err(|e| match e {
            SutError::Command { detail, .. } => SutError::Other(format!("psql: {detail}")),
            e => e,
        })
    }

    fn logs(&self, state: &State, lines: usize) -> String {
        let dir = run_dir(&state.name);
        format!(
            "server: {}\npostgres: {}",
            tail(&read_log(&dir.join("server.log")), lines),
            tail(&read_log(&dir.join("postgres.log")), lines)
        )
    }

    fn alive(&self, state: &State) -> bool {
        alive(state.db_pid) && state.server_pids.first().is_some_and(|&p| alive(p))
    }

    fn manage(&self, state: &State, args: &[&str]) -> Result<String, SutError> {
        let app = run_dir(&state.name).join("app");
        let ns_path = format!("/run/netns/{}", srv_ns(&state.name));
        let ns = File::open(&ns_path).map_err(SutError::io(format!("opening {ns_path}")))?;
        // The venv's interpreter by path: Command looks a bare name up in our PATH, not the child's.
        let mut cmd = Command::new(venv_dir(state.stack).join("bin").join("python"));
        cmd.arg("manage.py").args(args);
        server_env(&mut cmd, state.setup, state.stack, &app);
        enter(&mut cmd, &ns, &user("nobody")?, false);
        run(&mut cmd)
    }

    fn db_log(&self, state: &State) -> Result<String, SutError> {
        let path = run_dir(&state.name).join("postgres.log");
        fs::read_to_string(&path).map_err(SutError::io(format!("reading {}", path.display())))
    }

    fn down(&self, name: &str) -> Result<bool, SutError> {
        let _one_at_a_time = super::down_lock();
        let mut found = false;
        let listed = ip(&["netns", "list"])?;
        let exists = |ns: &str| {
            listed
                .lines()
                .any(|l| l.split_whitespace().next() == Some(ns))
        };
        // Server first (gunicorn: SIGINT = quick shutdown), then PostgreSQL (SIGINT = fast
        // shutdown: no waiting for clients).
        for ns in [srv_ns(name), db_ns(name)] {
            if exists(&ns) {
                found = true;
                stop_all_in(&ns, libc::SIGINT, Duration::from_secs(5));
                if let Err(e) = ip(&["netns", "del", &ns]) {
                    // Gone meanwhile (another process's down) is what we wanted.
                    if Path::new("/run/netns").join(&ns).exists() {
                        return Err(e);
                    }
                }
            }
        }
        // The host end normally goes with the server namespace; a half-made run may have left it.
        let host_end = format!("{name}h");
        if Path::new("/sys/class/net").join(&host_end).exists() {
            found = true;
            let _ = ip(&["link", "del", &host_end]);
        }
        let dir = run_dir(name);
        if dir.exists() {
            found = true;
            // A PostgreSQL backend that is still exiting (or a concurrent down) can add a file
            // while the tree is removed ("directory not empty"): try again briefly.
            let mut tries = 0;
            loop {
                match fs::remove_dir_all(&dir) {
                    Ok(()) => break,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                    Err(_) if tries < 20 => {
                        tries += 1;
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    Err(e) => return Err(SutError::io(format!("removing {}", dir.display()))(e)),
                }
            }
        }
        Ok(found)
    }
}
