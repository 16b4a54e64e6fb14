//! The `docker` back end: PostgreSQL and the Django server as containers on a private bridge
//! network, through the engine's API (bollard, API version negotiated, so that an older engine
//! such as Debian's 20.10 works). The server's port is published on 127.0.0.1 only. Images are
//! checked, not built: `cargo xtask images` builds `awaitlab/postgres:15` and
//! `awaitlab/server:{study,current}`.
//!
//! PostgreSQL's data lives in the named volume `NAME-pgdata`, so `switch` can recreate the
//! database container with another `max_connections` and keep the seed. As in the study's
//! official image, other hosts (the server) authenticate with SCRAM-SHA-256 and a password (or
//! `trust`, `Options::db_auth`) and the container's own loopback, where psql runs, is trusted.
//!
//! Every object carries the label `awaitlab.sut=NAME` and the name prefix `NAME-`; `down` removes
//! the containers (with their anonymous volumes), the data volume and the network found by that
//! label, so it also clears what a killed run left. It never removes images or anything without
//! that label.

use std::{collections::HashMap, future::Future, time::Duration};

use bollard::{
    exec::{CreateExecOptions, StartExecResults},
    models::{
        ContainerCreateBody, EndpointSettings, HostConfig, HostConfigLogConfig,
        NetworkCreateRequest, NetworkingConfig, PortBinding, VolumeCreateRequest,
    },
    query_parameters::{
        CreateContainerOptionsBuilder, InspectContainerOptions, ListContainersOptionsBuilder,
        ListNetworksOptionsBuilder, ListVolumesOptionsBuilder, LogsOptionsBuilder,
        RemoveContainerOptionsBuilder, RemoveVolumeOptions,
    },
};
use futures_util::StreamExt as _;

use super::{
    block, children, tail, wait_http, Backend, BackendKind, Options, State, SutError, DB_PASSWORD,
    DB_PORT, SERVER_PORT, STATE_VERSION,
};

pub(crate) const POSTGRES_IMAGE: &str = "awaitlab/postgres:15";
pub const LABEL: &str = "awaitlab.sut";
const START_LIMIT: Duration = Duration::from_secs(90);
/// PostgreSQL's /dev/shm in its container (1 GiB, as the postgres image's documentation advises).
const DB_SHM_BYTES: i64 = 1 << 30;
/// Size at which the server's log file is rotated (two files are kept).
const SERVER_LOG_MAX: &str = "20m";

pub fn server_image(stack: super::Stack) -> String {
    format!("awaitlab/server:{}", stack.name())
}

pub struct Docker;

async fn connect() -> Result<bollard::Docker, SutError> {
    Ok(bollard::Docker::connect_with_local_defaults()?
        .negotiate_version()
        .await?)
}

fn is_404(e: &bollard::errors::Error) -> bool {
    matches!(
        e,
        bollard::errors::Error::DockerResponseServerError {
            status_code: 404,
            ..
        }
    )
}

/// The last `lines` lines of a container's output (None: all of it).
async fn logs_of(d: &bollard::Docker, container: &str, lines: Option<usize>) -> String {
    let opts = LogsOptionsBuilder::default()
        .stdout(true)
        .stderr(true)
        .tail(&lines.map_or("all".to_string(), |n| n.to_string()))
        .build();
    let mut s = d.logs(container, Some(opts));
    let mut out = String::new();
    while let Some(Ok(chunk)) = s.next().await {
        out.push_str(&chunk.to_string());
    }
    out
}

async fn running(d: &bollard::Docker, container: &str) -> Option<(bool, Option<String>, i64)> {
    let i = d
        .inspect_container(container, None::<InspectContainerOptions>)
        .await
        .ok()?;
    let st = i.state?;
    let health = st.health.and_then(|h| h.status).map(|s| s.to_string());
    Some((st.running.unwrap_or(false), health, st.pid.unwrap_or(0)))
}

async fn start_error(d: &bollard::Docker, what: &str, container: &str, reason: String) -> SutError {
    SutError::Start {
        what: what.into(),
        reason,
        log: tail(&logs_of(d, container, Some(20)).await, 10),
    }
}

async fn down_async(name: &str) -> Result<bool, SutError> {
    let d = connect().await?;
    let filter = HashMap::from([("label".to_string(), vec![format!("{LABEL}={name}")])]);
    let mut found = false;
    let list = ListContainersOptionsBuilder::default()
        .all(true)
        .filters(&filter)
        .build();
    for c in d.list_containers(Some(list)).await? {
        if let Some(id) = c.id {
            found = true;
            let rm = RemoveContainerOptionsBuilder::default()
                .force(true)
                .v(true)
                .build();
            match d.remove_container(&id, Some(rm)).await {
                Ok(()) => {}
                Err(e) if is_404(&e) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    let vols = ListVolumesOptionsBuilder::default()
        .filters(&filter)
        .build();
    for v in d
        .list_volumes(Some(vols))
        .await?
        .volumes
        .unwrap_or_default()
    {
        found = true;
        match d.remove_volume(&v.name, None::<RemoveVolumeOptions>).await {
            Ok(()) => {}
            Err(e) if is_404(&e) => {}
            Err(e) => return Err(e.into()),
        }
    }
    let nets = ListNetworksOptionsBuilder::default()
        .filters(&filter)
        .build();
    for n in d.list_networks(Some(nets)).await? {
        if let Some(id) = n.id {
            found = true;
            match d.remove_network(&id).await {
                Ok(()) => {}
                Err(e) if is_404(&e) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(found)
}

async fn check_images(d: &bollard::Docker, opts: &Options) -> Result<String, SutError> {
    let server_image = opts
        .server_image
        .clone()
        .unwrap_or_else(|| server_image(opts.stack));
    for image in [POSTGRES_IMAGE, server_image.as_str()] {
        match d.inspect_image(image).await {
            Ok(_) => {}
            Err(e) if is_404(&e) => return Err(SutError::ImageMissing(image.into())),
            Err(e) => return Err(e.into()),
        }
    }
    Ok(server_image)
}

fn labels(name: &str) -> HashMap<String, String> {
    HashMap::from([(LABEL.to_string(), name.to_string())])
}

fn on_net(name: &str, alias: &str) -> NetworkingConfig {
    NetworkingConfig {
        endpoints_config: Some(HashMap::from([(
            format!("{name}-net"),
            EndpointSettings {
                aliases: Some(vec![alias.to_string()]),
                ..Default::default()
            },
        )])),
    }
}

async fn up_async(opts: &Options) -> Result<State, SutError> {
    let d = connect().await?;
    let name = &opts.name;
    let server_image = check_images(&d, opts).await?;
    d.create_network(NetworkCreateRequest {
        name: format!("{name}-net"),
        driver: Some("bridge".into()),
        labels: Some(labels(name)),
        ..Default::default()
    })
    .await?;
    // The data lives in a named volume, so PostgreSQL can be restarted with other settings
    // (`switch`) without seeding again.
    d.create_volume(VolumeCreateRequest {
        name: Some(format!("{name}-pgdata")),
        labels: Some(labels(name)),
        ..Default::default()
    })
    .await?;
    let db_pid = start_db(&d, opts).await?;
    start_server(&d, opts, &server_image, db_pid).await
}

/// Creates and starts `NAME-db` and waits until it is healthy; returns its pid.
async fn start_db(d: &bollard::Docker, opts: &Options) -> Result<i64, SutError> {
    let name = &opts.name;
    // PostgreSQL: its image's entrypoint passes extra arguments on to postgres.
    let db = format!("{name}-db");
    let mut db_args = vec![
        "-c".to_string(),
        format!("log_line_prefix={}", super::LOG_LINE_PREFIX),
    ];
    for kv in &opts.postgres_args {
        db_args.extend(["-c".to_string(), kv.clone()]);
    }
    d.create_container(
        Some(CreateContainerOptionsBuilder::default().name(&db).build()),
        ContainerCreateBody {
            image: Some(POSTGRES_IMAGE.into()),
            // The official image's variables: a password, and how other hosts authenticate
            // (both read only when the data volume is new; `switch` keeps the database's).
            env: Some(vec![
                format!("MAX_CONNECTIONS={}", opts.setup.max_connections()),
                format!("POSTGRES_PASSWORD={DB_PASSWORD}"),
                format!("POSTGRES_HOST_AUTH_METHOD={}", opts.db_auth.hba_method()),
            ]),
            cmd: Some(db_args),
            labels: Some(labels(name)),
            host_config: Some(HostConfig {
                network_mode: Some(format!("{name}-net")),
                binds: Some(vec![format!("{name}-pgdata:/var/lib/postgresql/data")]),
                // Docker's default /dev/shm is 64 MiB; parallel `count(*)` scans take dynamic
                // shared memory there, and 300 of them at once ran out of it ("could not resize
                // shared memory segment"), failing requests for a reason the study is not about.
                shm_size: Some(DB_SHM_BYTES),
                ..Default::default()
            }),
            networking_config: Some(on_net(name, "db")),
            ..Default::default()
        },
    )
    .await?;
    d.start_container(&db, None).await?;
    let t0 = std::time::Instant::now();
    loop {
        match running(d, &db).await {
            Some((true, Some(h), pid)) if h == "healthy" => return Ok(pid),
            Some((true, _, _)) if t0.elapsed() < START_LIMIT => {}
            Some((true, _, _)) => {
                return Err(start_error(
                    d,
                    "PostgreSQL",
                    &db,
                    format!("not healthy within {START_LIMIT:?}"),
                )
                .await)
            }
            _ => {
                return Err(start_error(d, "PostgreSQL", &db, "its container exited".into()).await)
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Creates and starts `NAME-server`, published on 127.0.0.1 only, and waits until it answers.
async fn start_server(
    d: &bollard::Docker,
    opts: &Options,
    server_image: &str,
    db_pid: i64,
) -> Result<State, SutError> {
    let name = &opts.name;
    let server = format!("{name}-server");
    let port_key = format!("{SERVER_PORT}/tcp");
    let binding = PortBinding {
        host_ip: Some("127.0.0.1".into()),
        host_port: Some(opts.host_port.map(|p| p.to_string()).unwrap_or_default()),
    };
    d.create_container(
        Some(
            CreateContainerOptionsBuilder::default()
                .name(&server)
                .build(),
        ),
        ContainerCreateBody {
            image: Some(server_image.to_string()),
            env: Some(
                super::server_env(opts.setup, opts.stack, "db")
                    .into_iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect(),
            ),
            exposed_ports: Some(vec![port_key.clone()]),
            labels: Some(labels(name)),
            host_config: Some(HostConfig {
                network_mode: Some(format!("{name}-net")),
                port_bindings: Some(HashMap::from([(port_key.clone(), Some(vec![binding]))])),
                // The study's settings print every SQL statement: the engine's default json-file
                // log would grow without bound under load, so it is rotated.
                log_config: Some(HostConfigLogConfig {
                    typ: Some("json-file".into()),
                    config: Some(HashMap::from([
                        ("max-size".to_string(), SERVER_LOG_MAX.to_string()),
                        ("max-file".to_string(), "2".to_string()),
                    ])),
                }),
                ..Default::default()
            }),
            networking_config: Some(on_net(name, "server")),
            ..Default::default()
        },
    )
    .await?;
    if let Err(e) = d.start_container(&server, None).await {
        // A taken host port fails here; the engine's message names it.
        return Err(SutError::Start {
            what: "the Django server".into(),
            reason: e.to_string(),
            log: String::new(),
        });
    }
    let inspect = d
        .inspect_container(&server, None::<InspectContainerOptions>)
        .await?;
    let host_port = inspect
        .network_settings
        .and_then(|n| n.ports)
        .and_then(|p| p.get(&port_key).cloned().flatten())
        .and_then(|b| b.into_iter().find_map(|b| b.host_port))
        .and_then(|p| p.parse::<u16>().ok())
        .ok_or_else(|| SutError::Other(format!("{server}: no published port for {port_key}")))?;
    let server_pid = inspect.state.and_then(|s| s.pid).unwrap_or(0) as u32;
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], host_port));
    // wait_http blocks; the engine is asked on this thread's own runtime in between.
    let check = tokio::task::block_in_place(|| {
        wait_http(addr, START_LIMIT, || {
            tokio::runtime::Handle::current()
                .block_on(running(d, &server))
                .is_some_and(|(r, _, _)| r)
        })
    });
    if let Err(reason) = check {
        return Err(start_error(d, "the Django server", &server, reason).await);
    }
    let mut server_pids = vec![server_pid];
    server_pids.extend(children(server_pid));
    Ok(State {
        version: STATE_VERSION,
        backend: BackendKind::Docker,
        setup: opts.setup,
        stack: opts.stack,
        name: name.clone(),
        url: format!("http://{addr}"),
        db_port: DB_PORT,
        netns: format!("/proc/{server_pid}/ns/net"),
        server_pids,
        db_pid: db_pid as u32,
    })
}

async fn remove(d: &bollard::Docker, container: &str) -> Result<(), SutError> {
    let rm = RemoveContainerOptionsBuilder::default().force(true).build();
    match d.remove_container(container, Some(rm)).await {
        Ok(()) => Ok(()),
        Err(e) if is_404(&e) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

async fn switch_async(state: &State, opts: &Options) -> Result<State, SutError> {
    let d = connect().await?;
    let server_image = check_images(&d, opts).await?;
    remove(&d, &format!("{}-server", opts.name)).await?;
    let db_pid = if state.setup.max_connections() != opts.setup.max_connections() {
        remove(&d, &format!("{}-db", opts.name)).await?;
        start_db(&d, opts).await?
    } else {
        i64::from(state.db_pid)
    };
    start_server(&d, opts, &server_image, db_pid).await
}

/// Runs `cmd` in `container` and returns its stdout; an error with its stderr's last lines when
/// it exits non-zero.
async fn exec_async(container: &str, cmd: Vec<String>) -> Result<String, SutError> {
    let d = connect().await?;
    let exec = d
        .create_exec(
            container,
            CreateExecOptions {
                cmd: Some(cmd.clone()),
                attach_stdout: Some(true),
                attach_stderr: Some(true),
                ..Default::default()
            },
        )
        .await?;
    let (mut out, mut err) = (String::new(), String::new());
    if let StartExecResults::Attached { mut output, .. } = d.start_exec(&exec.id, None).await? {
        while let Some(chunk) = output.next().await {
            match chunk? {
                bollard::container::LogOutput::StdErr { message } => {
                    err.push_str(&String::from_utf8_lossy(&message))
                }
                other => out.push_str(&other.to_string()),
            }
        }
    }
    let code = d.inspect_exec(&exec.id).await?.exit_code.unwrap_or(-1);
    if code != 0 {
        return Err(SutError::Other(format!(
            "{} exited with {code}: {}",
            cmd.first().map_or("", String::as_str),
            tail(&err, 5)
        )));
    }
    Ok(out)
}

async fn psql_async(name: &str, statements: &[&str]) -> Result<String, SutError> {
    let mut cmd: Vec<String> = [
        "psql",
        "-X",
        "-q",
        "-At",
        "-v",
        "ON_ERROR_STOP=1",
        "-h",
        "127.0.0.1",
        "-U",
        "postgres",
        "-d",
        "study",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for s in statements {
        cmd.extend(["-c".to_string(), s.to_string()]);
    }
    exec_async(&format!("{name}-db"), cmd).await
}

/// Runs `f` on a multi-thread runtime (the readiness wait blocks in place while it asks the
/// engine), on a fresh thread when the caller is itself inside a runtime.
fn block_multi<T: Send>(
    f: impl Future<Output = Result<T, SutError>> + Send,
) -> Result<T, SutError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(SutError::io("starting a runtime"))?;
    if tokio::runtime::Handle::try_current().is_ok() {
        std::thread::scope(|s| {
            s.spawn(|| rt.block_on(f))
                .join()
                .expect("docker call panicked")
        })
    } else {
        rt.block_on(f)
    }
}

impl Backend for Docker {
    fn up(&self, opts: &Options) -> Result<State, SutError> {
        block_multi(up_async(opts))
    }

    fn switch(&self, state: &State, opts: &Options) -> Result<State, SutError> {
        block_multi(switch_async(state, opts))
    }

    fn psql(&self, state: &State, statements: &[&str]) -> Result<String, SutError> {
        block(psql_async(&state.name, statements))
    }

    fn logs(&self, state: &State, lines: usize) -> String {
        let name = state.name.clone();
        block(async move {
            let Ok(d) = connect().await else {
                return "(docker unreachable)".into();
            };
            format!(
                "server: {}\npostgres: {}",
                tail(
                    &logs_of(&d, &format!("{name}-server"), Some(lines)).await,
                    lines
                ),
                tail(
                    &logs_of(&d, &format!("{name}-db"), Some(lines)).await,
                    lines
                )
            )
        })
    }

    fn refresh(&self, state: &State) -> State {
        let mut s = state.clone();
        block(async move {
            let Ok(d) = connect().await else { return s };
            let inspect = |c: String| {
                let d = d.clone();
                async move {
                    d.inspect_container(&c, None::<InspectContainerOptions>)
                        .await
                        .ok()
                }
            };
            if let Some(i) = inspect(format!("{}-server", s.name)).await {
                let pid = i.state.as_ref().and_then(|st| st.pid).unwrap_or(0);
                if let Ok(pid) = u32::try_from(pid) {
                    if pid > 0 {
                        s.netns = format!("/proc/{pid}/ns/net");
                        s.server_pids = std::iter::once(pid).chain(children(pid)).collect();
                    }
                }
                let port_key = format!("{SERVER_PORT}/tcp");
                let port = i
                    .network_settings
                    .and_then(|n| n.ports)
                    .and_then(|p| p.get(&port_key).cloned().flatten())
                    .and_then(|b| b.into_iter().find_map(|b| b.host_port))
                    .and_then(|p| p.parse::<u16>().ok());
                if let Some(port) = port {
                    s.url = format!(
                        "http://{}",
                        std::net::SocketAddr::from(([127, 0, 0, 1], port))
                    );
                }
            }
            if let Some(i) = inspect(format!("{}-db", s.name)).await {
                if let Some(pid) = i
                    .state
                    .and_then(|st| st.pid)
                    .and_then(|p| u32::try_from(p).ok())
                {
                    if pid > 0 {
                        s.db_pid = pid;
                    }
                }
            }
            s
        })
    }

    fn alive(&self, state: &State) -> bool {
        let name = state.name.clone();
        block(async move {
            let Ok(d) = connect().await else { return false };
            let server = running(&d, &format!("{name}-server"))
                .await
                .is_some_and(|(r, _, _)| r);
            let db = running(&d, &format!("{name}-db"))
                .await
                .is_some_and(|(r, _, _)| r);
            server && db
        })
    }

    fn manage(&self, state: &State, args: &[&str]) -> Result<String, SutError> {
        // The image's WORKDIR is the app and its environment the server's.
        let mut cmd = vec!["python".to_string(), "manage.py".to_string()];
        cmd.extend(args.iter().map(|a| a.to_string()));
        block(exec_async(&format!("{}-server", state.name), cmd))
    }

    fn db_log(&self, state: &State) -> Result<String, SutError> {
        // PostgreSQL logs to the container's output, kept whole (not rotated) since the container
        // started: `switch` makes a new container when PostgreSQL restarts.
        let name = state.name.clone();
        block(async move {
            let d = connect().await?;
            Ok::<_, SutError>(logs_of(&d, &format!("{name}-db"), None).await)
        })
    }

    fn down(&self, name: &str) -> Result<bool, SutError> {
        let _one_at_a_time = super::down_lock();
        block(down_async(name))
    }
}
