//! Kernel-side cost of the agent's eBPF programs, from the kernel's own BPF run-time statistics.
//!
//! `kernel.bpf_stats_enabled=1` makes the kernel count `run_time_ns`/`run_cnt` per program, which
//! `bpftool prog show --json` reports. The sysctl costs two clock reads per program run for every
//! BPF program on the host, so it is on only while the agent runs and is restored by a guard. This
//! module must only read programs, never detach or unload anything.

use std::collections::HashMap;
use std::fs;
use std::process::Command;

use anyhow::{Context, Result};

use crate::cmd;

const SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";

/// The agent names all its programs with this prefix (kernel program names are cut at 15 bytes).
const PROG_PREFIX: &str = "awl_";

/// Enables BPF run-time statistics until dropped, then restores the previous value.
pub struct StatsEnabled {
    old: String,
}

impl StatsEnabled {
    pub fn enable() -> Result<Self> {
        let old = fs::read_to_string(SYSCTL).with_context(|| format!("reading {SYSCTL}"))?;
        fs::write(SYSCTL, "1").with_context(|| format!("writing 1 to {SYSCTL}"))?;
        Ok(Self {
            old: old.trim().to_owned(),
        })
    }
}

impl Drop for StatsEnabled {
    fn drop(&mut self) {
        if let Err(e) = fs::write(SYSCTL, &self.old) {
            eprintln!("warning: could not restore {SYSCTL} to {}: {e}", self.old);
        }
    }
}

/// Per program id: (run_time_ns, run_cnt, name) of the agent's programs.
pub type Snapshot = HashMap<u64, (u64, u64, String)>;

pub fn snapshot() -> Result<Snapshot> {
    let out = cmd::output(Command::new("bpftool").args(["prog", "show", "--json"]))?;
    parse(&out)
}

fn parse(json: &str) -> Result<Snapshot> {
    let progs: Vec<serde_json::Value> =
        serde_json::from_str(json).context("parsing bpftool's JSON")?;
    let mut snap = Snapshot::new();
    for p in progs {
        let name = p.get("name").and_then(|v| v.as_str()).unwrap_or("");
        if !name.starts_with(PROG_PREFIX) {
            continue;
        }
        let Some(id) = p.get("id").and_then(|v| v.as_u64()) else {
            continue;
        };
        // bpftool leaves both fields out while a program has not run yet.
        let field = |k: &str| p.get(k).and_then(|v| v.as_u64()).unwrap_or(0);
        snap.insert(
            id,
            (field("run_time_ns"), field("run_cnt"), name.to_string()),
        );
    }
    Ok(snap)
}

/// Kernel time and runs of the agent's programs between two snapshots.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Delta {
    pub programs: usize,
    pub run_time_ns: u64,
    pub run_cnt: u64,
    /// (name, run_time_ns, run_cnt) per program, largest time first.
    pub per_program: Vec<(String, u64, u64)>,
}

pub fn delta(before: &Snapshot, after: &Snapshot) -> Delta {
    let mut d = Delta {
        programs: after.len(),
        ..Delta::default()
    };
    for (id, (ns, cnt, name)) in after {
        // A program loaded after the first snapshot counts from zero.
        let (ns0, cnt0) = before.get(id).map(|b| (b.0, b.1)).unwrap_or((0, 0));
        let (dn, dc) = (ns.saturating_sub(ns0), cnt.saturating_sub(cnt0));
        d.run_time_ns += dn;
        d.run_cnt += dc;
        d.per_program.push((name.clone(), dn, dc));
    }
    d.per_program.sort_by_key(|p| std::cmp::Reverse(p.1));
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_only_agent_programs_between_snapshots() {
        let before = parse(
            r#"[{"id":7,"type":"tracing","name":"awl_sock_send","run_time_ns":1000,"run_cnt":10},
                {"id":8,"type":"cgroup_skb","name":"sd_fw_ingress","run_time_ns":5,"run_cnt":1}]"#,
        )
        .expect("parse");
        let after = parse(
            r#"[{"id":7,"type":"tracing","name":"awl_sock_send","run_time_ns":4000,"run_cnt":40},
                {"id":8,"type":"cgroup_skb","name":"sd_fw_ingress","run_time_ns":99,"run_cnt":9},
                {"id":9,"type":"tracing","name":"awl_sched_switc"}]"#,
        )
        .expect("parse");
        let d = delta(&before, &after);
        assert_eq!(
            d,
            Delta {
                programs: 2,
                run_time_ns: 3000,
                run_cnt: 30,
                per_program: vec![
                    ("awl_sock_send".into(), 3000, 30),
                    ("awl_sched_switc".into(), 0, 0)
                ],
            }
        );
    }
}
