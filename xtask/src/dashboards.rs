//! `cargo xtask dashboards`: the checks of `dashboards/` that need no root: the dashboard JSON
//! rules (valid, unique panel ids, a unit and a description on every panel, the datasource
//! variable, no hard-coded instance), `promtool check config` on prometheus.yml, and the compose
//! file against the Compose schema. The checks themselves live in `agent/tests/metrics.rs` (one
//! place); this only runs them. That every panel query returns data needs a scraped agent and
//! root: `cargo xtask test` runs that too.

use anyhow::Result;

use crate::cmd;

pub fn run() -> Result<()> {
    cmd::run(cmd::cargo().args([
        "test",
        "-p",
        "agent",
        "--test",
        "metrics",
        "--",
        "--test-threads=1",
        "dashboards_follow_the_rules",
        "prometheus_config_and_compose_file_are_valid",
        "the_driver_exposition_passes_promtool",
    ]))
}
