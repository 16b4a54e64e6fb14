//! The probes: `namespace` resolves what to watch (a network namespace), this module loads the
//! eBPF programs, scopes them to that namespace, attaches them, and gives access to what they
//! produce (the ring buffer of records, the loss counters and the per-thread CPU map);
//! `session` is the one attach/drain/summarise loop every user of the probes runs, and
//! `aggregate` turns the records into figures.
//!
//! Each program that the running kernel cannot load is skipped with a warning naming the program
//! and the reason; [`Probes::status`] says which measurements are live. Dropping [`Probes`]
//! detaches and unloads everything (aya owns the links); nothing is pinned, so a killed agent
//! leaves nothing behind either.

pub mod aggregate;
pub mod btf;
pub mod namespace;
pub mod session;

use std::collections::BTreeMap;
use std::path::Path;

use agent_common::{
    AggKey, Config, Counter, Hist, Kernel, ThreadCpu, CONFIG_AGGREGATE, CONFIG_CAPTURE_PAYLOAD,
    CONFIG_FLOOR, CONFIG_KEY_HASH, COUNTERS, HEAD_LEN, MAX_PORTS,
};
use aya::{
    maps::{Array, HashMap as BpfHashMap, Map, MapData, PerCpuArray, PerCpuHashMap, RingBuf},
    programs::BtfTracePoint,
    Ebpf,
};
use tracing::{info, warn};

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error(transparent)]
    NotPermitted(#[from] crate::privilege::NotPermitted),
    #[error("this awaitlab was built without its eBPF programs (AYA_BUILD_SKIP); rebuild with `cargo xtask setup` done")]
    NoObject,
    #[error("kernel BTF: {0}")]
    Btf(#[from] btf::BtfError),
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("eBPF map {name}: {source}")]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
    #[error("no probe could be attached: {0}")]
    NothingAttached(String),
    #[error("polling the ring buffer: {0}")]
    Poll(std::io::Error),
    #[error("{0}")]
    Sizes(String),
    #[error("at most {max} {role} ports, got {got}")]
    TooManyPorts {
        role: &'static str,
        max: usize,
        got: usize,
    },
}

/// What to measure and where.
#[derive(Debug, Clone)]
pub struct ProbeSpec {
    pub netns_inum: u32,
    pub http_ports: Vec<u16>,
    pub db_ports: Vec<u16>,
    /// Copy request heads and response status lines (method, path, status).
    pub capture_payload: bool,
    /// Aggregation mode: the programs keep histograms in maps and write no record per request
    /// (`Session` reads the maps); per-request records only when false.
    pub aggregate: bool,
    /// A measuring aid (`CONFIG_FLOOR`): the socket I/O programs only check the namespace, so
    /// requests are not measured. False everywhere but `watch --probe-floor`.
    pub floor: bool,
    pub sizes: MapSizes,
}

/// How many entries the probes' per-connection, per-thread and per-request-key maps hold. A
/// connection or a thread that finds its map full is not measured and is counted
/// (`conn_map_full`, `thread_map_full`); a request whose key finds the aggregation map full is
/// measured under `OTHER /other` and counted (`agg_map_full`). Kernel memory (`bpftool map
/// show`, kernel 6.18): each connection about 290 bytes and each thread about 200 (two maps),
/// from the start; each request key about 2.3 KB per CPU and 145 bytes for the head that names
/// it, from the start for the first 32 (`REQ_SLOTS`, an array), once used for the rest (a
/// hash). The defaults take about 13 MB, 74 KB of it per CPU, before use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MapSizes {
    /// Connections followed at once (the server's and its database connections).
    pub connections: u32,
    /// Threads followed at once (CPU time and the request each is serving).
    pub threads: u32,
    /// Aggregation mode: histograms kept at once, one per method and path, serving process,
    /// status and exclusive-thread bit.
    pub request_keys: u32,
}

impl Default for MapSizes {
    fn default() -> MapSizes {
        MapSizes {
            connections: 32_768,
            threads: 16_384,
            request_keys: 1_024,
        }
    }
}

impl MapSizes {
    /// Largest size accepted for either map.
    pub const MAX: u32 = 1 << 22;

    /// Request keys with a slot of their own in the per-CPU array (`REQ_SLOTS` at most).
    fn request_slots(&self) -> u32 {
        self.request_keys.min(agent_common::REQ_SLOTS)
    }

    /// Request keys past the slots, kept in the per-CPU hash.
    fn hashed_request_keys(&self) -> u32 {
        self.request_keys - self.request_slots()
    }

    pub fn check(&self) -> Result<(), String> {
        for (what, n) in [
            ("connections", self.connections),
            ("threads", self.threads),
            ("request_keys", self.request_keys),
        ] {
            if !(1..=Self::MAX).contains(&n) {
                return Err(format!("map size {what} must be 1-{}, got {n}", Self::MAX));
            }
        }
        Ok(())
    }
}

/// One program: where it hooks, what it measures, and whether it is live.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ProbeStatus {
    pub program: String,
    pub hook: String,
    pub measures: String,
    pub live: bool,
    pub reason: Option<String>,
    /// Kernel program id while attached (`bpftool prog show id N`).
    pub id: Option<u32>,
}

/// (program, tp_btf hook, what it measures). Order matters: connection state first, so the data
/// path finds new connections already classified.
const PROGRAMS: &[(&str, &str, &str)] = &[
    (
        "awl_sock_state",
        "inet_sock_set_state",
        "connections opened/closed, database connect time",
    ),
    (
        "awl_sock_recv",
        "sock_recv_length",
        "request start, database round-trip end",
    ),
    (
        "awl_sock_send",
        "sock_send_length",
        "response end, database round-trip start",
    ),
    (
        "awl_sched_switch",
        "sched_switch",
        "on-CPU and off-CPU time",
    ),
    (
        "awl_sched_exit",
        "sched_process_exit",
        "CPU time of exited threads",
    ),
];

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/awaitlab"));

pub struct Probes {
    ebpf: Ebpf,
    status: Vec<ProbeStatus>,
}

impl Probes {
    /// Loads, configures and attaches every program the kernel supports.
    pub fn attach(spec: &ProbeSpec) -> Result<Probes, ProbeError> {
        let probes = Probes::load_and_attach(spec);
        // The kernel's BTF, parsed twice above (several MB each), is freed by now, but the
        // allocator keeps the pages: an idle agent held 20 MB of heap where 7 MB were live.
        // Give them back, once per attach.
        #[cfg(target_env = "gnu")]
        // SAFETY: malloc_trim has no preconditions; it only returns free memory to the kernel.
        unsafe {
            libc::malloc_trim(0);
        }
        probes
    }

    fn load_and_attach(spec: &ProbeSpec) -> Result<Probes, ProbeError> {
        use crate::privilege::{require, Need, PROBES};
        require(
            "loading the probes",
            "maps and tracing programs",
            Need::Caps(PROBES),
        )?;
        if OBJECT.is_empty() {
            return Err(ProbeError::NoObject);
        }
        ensure_tracefs();
        raise_memlock();
        // One parse of /sys/kernel/btf/vmlinux (several MB) serves the offsets and the checks.
        let own = btf::Btf::from_sys_fs()?;
        let config = build_config(spec)?;
        let kernel = Kernel {
            offsets: own.offsets()?,
            syscalls: btf::syscall_nrs(),
        };
        let kernel_btf = aya::Btf::from_sys_fs().map_err(|e| ProbeError::Load(e.into()))?;
        spec.sizes.check().map_err(ProbeError::Sizes)?;
        let mut ebpf = aya::EbpfLoader::new()
            // Read-only: the verifier takes its fields as constants (see `Kernel`).
            .override_global("KERNEL", &kernel, true)
            // Aggregation mode writes no record: one page instead of 8 MiB, which the agent
            // would map twice (16 MiB of its resident memory).
            .map_max_entries(
                "EVENTS",
                if spec.aggregate {
                    4096
                } else {
                    agent_common::EVENTS_BYTES
                },
            )
            .map_max_entries("CONNS", spec.sizes.connections)
            .map_max_entries("THREADS", spec.sizes.threads)
            .map_max_entries("THREAD_REQ", spec.sizes.threads)
            .map_max_entries("REQ_SLOT_HIST", spec.sizes.request_slots())
            .map_max_entries("REQ_SLOT_OF", spec.sizes.request_slots())
            .map_max_entries("REQ_SLOT_OWNER", spec.sizes.request_slots())
            // At least one entry (a map cannot have none): unused without `CONFIG_KEY_HASH`.
            .map_max_entries("REQ_AGG", spec.sizes.hashed_request_keys().max(1))
            .map_max_entries("HEADS", spec.sizes.request_keys)
            .load(OBJECT)?;
        {
            let mut cfg: Array<&mut MapData, Config> =
                Array::try_from(ebpf.map_mut("CONFIG").ok_or(ProbeError::Map {
                    name: "CONFIG",
                    source: aya::maps::MapError::InvalidName {
                        name: "CONFIG".into(),
                    },
                })?)
                .map_err(|source| ProbeError::Map {
                    name: "CONFIG",
                    source,
                })?;
            cfg.set(0, config, 0).map_err(|source| ProbeError::Map {
                name: "CONFIG",
                source,
            })?;
        }
        let mut status = Vec::new();
        for &(program, hook, measures) in PROGRAMS {
            let result = if own.has_tracepoint(hook) {
                attach_one(&mut ebpf, program, hook, &kernel_btf)
            } else {
                Err(format!("kernel has no tracepoint {hook}"))
            };
            let (live, reason, id) = match result {
                Ok(id) => (true, None, Some(id)),
                Err(e) => {
                    warn!(
                        program,
                        hook, "probe skipped: {e}; not measured: {measures}"
                    );
                    (false, Some(e), None)
                }
            };
            status.push(ProbeStatus {
                program: program.into(),
                hook: hook.into(),
                measures: measures.into(),
                live,
                reason,
                id,
            });
        }
        if !status.iter().any(|s| s.live) {
            let why = status
                .iter()
                .filter_map(|s| s.reason.clone())
                .collect::<Vec<_>>()
                .join("; ");
            return Err(ProbeError::NothingAttached(why));
        }
        info!(netns = spec.netns_inum, "probes attached");
        Ok(Probes { ebpf, status })
    }

    pub fn status(&self) -> &[ProbeStatus] {
        &self.status
    }

    /// Takes the ring buffer of records (once).
    pub(crate) fn take_events(&mut self) -> Result<RingBuf<MapData>, ProbeError> {
        let map = self.ebpf.take_map("EVENTS").ok_or(ProbeError::Map {
            name: "EVENTS",
            source: aya::maps::MapError::InvalidName {
                name: "EVENTS".into(),
            },
        })?;
        RingBuf::try_from(map).map_err(|source| ProbeError::Map {
            name: "EVENTS",
            source,
        })
    }

    fn map(&self, name: &'static str) -> Result<&Map, ProbeError> {
        self.ebpf.map(name).ok_or(ProbeError::Map {
            name,
            source: aya::maps::MapError::InvalidName { name: name.into() },
        })
    }

    /// Sums of the per-CPU counters, indexed by `agent_common::Counter` (wrapping sums).
    pub fn counters(&self) -> Result<[u64; COUNTERS as usize], ProbeError> {
        let name = "COUNTERS_MAP";
        let arr: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(self.map(name)?)
            .map_err(|source| ProbeError::Map { name, source })?;
        let mut out = [0u64; COUNTERS as usize];
        for (i, slot) in out.iter_mut().enumerate() {
            let v = arr
                .get(&(i as u32), 0)
                .map_err(|source| ProbeError::Map { name, source })?;
            // Wrapping: the in-server counters go up on one CPU and down on another.
            *slot = v.iter().fold(0u64, |a, x| a.wrapping_add(*x));
        }
        Ok(out)
    }

    /// Every tracked thread's CPU totals.
    pub fn threads(&self) -> Result<Vec<(u32, ThreadCpu)>, ProbeError> {
        let name = "THREADS";
        let h: BpfHashMap<&MapData, u32, ThreadCpu> = BpfHashMap::try_from(self.map(name)?)
            .map_err(|source| ProbeError::Map { name, source })?;
        // Entries may vanish while we iterate (threads exiting): skip those, keep the rest.
        Ok(h.iter().filter_map(Result::ok).collect())
    }

    /// Aggregation mode: what the maps hold now, cumulative since the attach.
    pub(crate) fn aggregates(&self) -> Result<aggregate::KernelAggregates, ProbeError> {
        let sum = |values: &[Hist]| {
            let mut h = aggregate::HistSum::default();
            for v in values {
                h.add(v);
            }
            h
        };
        let per_cpu_array =
            |name: &'static str, i: u32| -> Result<aggregate::HistSum, ProbeError> {
                let a: PerCpuArray<&MapData, Hist> = PerCpuArray::try_from(self.map(name)?)
                    .map_err(|source| ProbeError::Map { name, source })?;
                let v = a
                    .get(&i, 0)
                    .map_err(|source| ProbeError::Map { name, source })?;
                Ok(sum(&v))
            };
        // By key: two CPUs racing on a new key when the slots ran out can leave it a slot and
        // a hash entry.
        let mut requests: BTreeMap<AggKey, aggregate::HistSum> = BTreeMap::new();
        let mut add = |key: AggKey, per_cpu: &[Hist]| {
            let h = requests.entry(key).or_default();
            per_cpu.iter().for_each(|v| h.add(v));
        };
        let name = "REQ_SLOT_OF";
        let slot_of: BpfHashMap<&MapData, AggKey, u32> = BpfHashMap::try_from(self.map(name)?)
            .map_err(|source| ProbeError::Map { name, source })?;
        let name = "REQ_SLOT_HIST";
        let slots: PerCpuArray<&MapData, Hist> = PerCpuArray::try_from(self.map(name)?)
            .map_err(|source| ProbeError::Map { name, source })?;
        for (key, slot) in slot_of.iter().filter_map(Result::ok) {
            let v = slots
                .get(&slot, 0)
                .map_err(|source| ProbeError::Map { name, source })?;
            add(key, &v);
        }
        let name = "REQ_AGG";
        let hashed: PerCpuHashMap<&MapData, AggKey, Hist> =
            PerCpuHashMap::try_from(self.map(name)?)
                .map_err(|source| ProbeError::Map { name, source })?;
        for (key, v) in hashed.iter().filter_map(Result::ok) {
            add(key, &v);
        }
        let mut requests: Vec<(AggKey, aggregate::HistSum)> = requests.into_iter().collect();
        requests.push((AggKey::OVERFLOW, per_cpu_array("REQ_AGG_OVERFLOW", 0)?));
        let name = "THREAD_REQ";
        let serving: BpfHashMap<&MapData, u32, [u8; 16]> = BpfHashMap::try_from(self.map(name)?)
            .map_err(|source| ProbeError::Map { name, source })?;
        Ok(aggregate::KernelAggregates {
            requests,
            db_round_trip: per_cpu_array("DB_AGG", agent_common::DB_AGG_ROUND_TRIP)?,
            db_connect: per_cpu_array("DB_AGG", agent_common::DB_AGG_CONNECT)?,
            serving_tids: serving.keys().filter_map(Result::ok).collect(),
        })
    }

    /// Aggregation mode: the first request head the programs saw for a `AggKey::head`.
    pub(crate) fn head(&self, hash: u64) -> Option<Vec<u8>> {
        let h: BpfHashMap<&MapData, u64, [u8; 4 + HEAD_LEN]> =
            BpfHashMap::try_from(self.map("HEADS").ok()?).ok()?;
        let v = h.get(&hash, 0).ok()?;
        let len = (u32::from_ne_bytes([v[0], v[1], v[2], v[3]]) as usize).min(HEAD_LEN);
        Some(v[4..4 + len].to_vec())
    }
}

/// Shorthand for one counter of a snapshot.
pub fn counter(c: &[u64; COUNTERS as usize], which: Counter) -> u64 {
    c[which as usize]
}

fn attach_one(ebpf: &mut Ebpf, program: &str, hook: &str, btf: &aya::Btf) -> Result<u32, String> {
    let prog: &mut BtfTracePoint = ebpf
        .program_mut(program)
        .ok_or_else(|| format!("program {program} missing from the object"))?
        .try_into()
        .map_err(|e| format!("{e}"))?;
    prog.load(hook, btf)
        .map_err(|e| format!("load: {}", error_chain(&e)))?;
    prog.attach()
        .map_err(|e| format!("attach: {}", error_chain(&e)))?;
    prog.info()
        .map(|i| i.id())
        .map_err(|e| format!("program info: {}", error_chain(&e)))
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

fn build_config(spec: &ProbeSpec) -> Result<Config, ProbeError> {
    let ports = |v: &[u16], role: &'static str| -> Result<[u16; MAX_PORTS], ProbeError> {
        if v.len() > MAX_PORTS {
            return Err(ProbeError::TooManyPorts {
                role,
                max: MAX_PORTS,
                got: v.len(),
            });
        }
        let mut out = [0u16; MAX_PORTS];
        out[..v.len()].copy_from_slice(v);
        Ok(out)
    };
    let mut flags = 0;
    if spec.capture_payload {
        flags |= CONFIG_CAPTURE_PAYLOAD;
    }
    if spec.aggregate {
        flags |= CONFIG_AGGREGATE;
    }
    if spec.floor {
        flags |= CONFIG_FLOOR;
    }
    if spec.sizes.hashed_request_keys() > 0 {
        flags |= CONFIG_KEY_HASH;
    }
    Ok(Config {
        netns_inum: spec.netns_inum,
        flags,
        http_ports: ports(&spec.http_ports, "HTTP")?,
        db_ports: ports(&spec.db_ports, "database")?,
    })
}

/// tracefs is not mounted at boot on some hosts; tracepoint-based tooling (and `bpftool prog
/// tracelog`) needs it, so mount it when it is missing. The probes are BTF tracepoints, which
/// attach without it, so a failure (no CAP_SYS_ADMIN, a read-only /sys in a container) is only
/// worth a note.
fn ensure_tracefs() {
    const PATH: &str = "/sys/kernel/tracing";
    if Path::new(PATH).join("events").exists() {
        return;
    }
    let c = |s: &str| std::ffi::CString::new(s).expect("no NUL");
    let (src, dst, fs) = (c("tracefs"), c(PATH), c("tracefs"));
    // SAFETY: valid NUL-terminated strings, no data argument.
    let r = unsafe { libc::mount(src.as_ptr(), dst.as_ptr(), fs.as_ptr(), 0, std::ptr::null()) };
    if r == 0 {
        info!("mounted tracefs at {PATH}");
    } else {
        tracing::debug!(
            "tracefs is not at {PATH} and mounting it failed ({}); the probes do not need it",
            std::io::Error::last_os_error()
        );
    }
}

/// Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK; newer ones do not, and some hosts
/// forbid raising it. A failure is only worth a warning.
fn raise_memlock() {
    let rlim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: valid pointer to a local rlimit.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rlim) } != 0 {
        tracing::debug!(
            "could not raise RLIMIT_MEMLOCK ({}); fine on 5.11+",
            std::io::Error::last_os_error()
        );
    }
}
