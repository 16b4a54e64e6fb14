//! The report header's account of the system under test: what ran, from the record each cell
//! carries (`sut::SystemRecord`, measured from the system after it started), and every way that
//! differs from the study's system (`published::STUDY_SYSTEM`) or from its delay (tc netem).
//!
//! It reads the cells only, and says nothing about a setting that no cell recorded.

use std::collections::{BTreeMap, BTreeSet};

use super::published::STUDY_SYSTEM;
use crate::{study::results::CellResult, study::sut::SystemRecord};

/// The last part of a dotted Python path (`django.middleware.common.CommonMiddleware` ->
/// `CommonMiddleware`).
fn short(path: &str) -> &str {
    path.rsplit('.').next().unwrap_or(path)
}

fn shorts(paths: &[impl AsRef<str>]) -> String {
    if paths.is_empty() {
        return "none".into();
    }
    paths
        .iter()
        .map(|p| short(p.as_ref()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// PostgreSQL's major version from `SHOW server_version` ("15.14 (Debian 15.14-0+deb12u1)").
fn major(version: &str) -> Option<u32> {
    version
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// Every way `r` differs from the system the study ran, one phrase each.
pub fn deviations(r: &SystemRecord) -> Vec<String> {
    let s = &STUDY_SYSTEM;
    let differs = |ours: &str, theirs: &str, what: &str| {
        (ours != theirs).then(|| format!("{what} {ours} (the study: {theirs})"))
    };
    let mut out = Vec::new();
    out.extend(differs(&r.django, s.django, "Django"));
    out.extend(differs(&r.db_driver, s.db_driver, "database driver"));
    out.extend(differs(
        r.gunicorn.as_deref().unwrap_or("missing"),
        s.gunicorn,
        "gunicorn",
    ));
    if r.setup != "sync" {
        out.extend(differs(
            r.uvicorn.as_deref().unwrap_or("missing"),
            s.uvicorn,
            "uvicorn",
        ));
    }
    if r.debug != s.debug {
        out.push(format!(
            "DEBUG {} (the study: {})",
            on_off(r.debug),
            on_off(s.debug)
        ));
    }
    if r.middleware
        .iter()
        .map(String::as_str)
        .ne(s.middleware.iter().copied())
    {
        out.push(format!(
            "middleware: {} (the study: Django's default minus CSRF: {})",
            shorts(r.middleware.as_slice()),
            shorts(s.middleware)
        ));
    }
    if r.conn_max_age != Some(s.conn_max_age) {
        let ours = r
            .conn_max_age
            .map_or("None (kept forever)".to_string(), |v| v.to_string());
        out.push(format!(
            "CONN_MAX_AGE {ours} (the study: {}, a new connection per request)",
            s.conn_max_age
        ));
    }
    if r.db_pool {
        out.push("a database connection pool (the study: a new connection per request)".into());
    }
    if r.root_log_level != s.root_log_level || r.sql_logged != s.sql_logged {
        out.push(format!(
            "root logger at {}, SQL statements {} (the study: {}, every SQL statement printed)",
            r.root_log_level,
            if r.sql_logged {
                "printed"
            } else {
                "not printed"
            },
            s.root_log_level
        ));
    }
    match major(&r.postgres_version) {
        Some(m) if m == s.postgres_major => {}
        _ => out.push(format!(
            "PostgreSQL {} (the study: {})",
            r.postgres_version, s.postgres_major
        )),
    }
    out.extend(differs(
        &r.password_encryption,
        s.password_encryption,
        "password_encryption",
    ));
    let auth = r
        .db_auth_method()
        .unwrap_or("unknown (no pg_hba.conf rule matched)");
    if auth != s.db_auth_method {
        out.push(format!(
            "database authentication {auth} (the study: {}, two more round trips on every new connection)",
            s.db_auth_method
        ));
    }
    // The study's setups fix max_connections; Async Pooled is not one of them.
    if let Ok(setup) = <crate::study::sut::Setup as clap::ValueEnum>::from_str(&r.setup, true) {
        if setup != crate::study::sut::Setup::AsyncPooled
            && r.max_connections != setup.max_connections()
        {
            out.push(format!(
                "max_connections {} (the study: {})",
                r.max_connections,
                setup.max_connections()
            ));
        }
    }
    if !r.server_command.is_empty() {
        let missing: Vec<&str> = s
            .server_args
            .iter()
            .copied()
            .filter(|a| !r.server_command.contains(a))
            .collect();
        if !missing.is_empty() {
            out.push(format!(
                "server command `{}` lacks {} (the study: {})",
                r.server_command,
                missing.join(", "),
                s.server_args.join(" ")
            ));
        }
        if r.server_workers != s.server_workers {
            out.push(format!(
                "{} server workers (the study: {})",
                r.server_workers, s.server_workers
            ));
        }
    }
    out
}

fn on_off(b: bool) -> &'static str {
    if b {
        "on"
    } else {
        "off"
    }
}

/// What a record says about the stack (the same for every setup of a stack).
fn describe(r: &SystemRecord) -> String {
    let mut versions = format!("Python {}, Django {}, {}", r.python, r.django, r.db_driver);
    if let Some(g) = &r.gunicorn {
        versions.push_str(&format!(", gunicorn {g}"));
    }
    format!(
        "{} stack: {versions}; DEBUG {}; middleware: {}; CONN_MAX_AGE {}{}; root logger at {}{}; PostgreSQL {}, password_encryption {}, the server's connections authenticated by {}{}.",
        r.stack,
        on_off(r.debug),
        shorts(r.middleware.as_slice()),
        r.conn_max_age.map_or("None".to_string(), |v| v.to_string()),
        if r.db_pool { " with a pool" } else { "" },
        r.root_log_level,
        if r.sql_logged { " (every SQL statement printed)" } else { "" },
        r.postgres_version,
        r.password_encryption,
        r.db_auth_rule.as_ref().map_or("no matching pg_hba.conf rule".to_string(), |h| format!("{} (pg_hba.conf line {})", h.method, h.line)),
        match r.db_used_password {
            Some(true) => ", PostgreSQL asking for the password",
            Some(false) => ", no password asked",
            None => "",
        },
    )
}

/// The header's lines about the system: what each stack ran, each setup's server and limits, and
/// every deviation from the study (with the setups it concerns, when not all of them).
pub(crate) fn header_lines(cells: &[CellResult]) -> Vec<String> {
    let records: Vec<&SystemRecord> = cells.iter().filter_map(|c| c.system.as_ref()).collect();
    let mut out: Vec<String> = Vec::new();
    for d in records.iter().map(|r| describe(r)).collect::<BTreeSet<_>>() {
        out.push(d);
    }
    // In the study's column order.
    let order = |setup: &str| {
        super::setups()
            .position(|(k, _)| k == setup)
            .unwrap_or(usize::MAX)
    };
    let mut servers: BTreeMap<(&str, usize, &str), BTreeSet<String>> = BTreeMap::new();
    for r in &records {
        servers
            .entry((r.stack.as_str(), order(&r.setup), r.setup.as_str()))
            .or_default()
            .insert(format!(
                "`{}` ({} worker{}){}, max_connections {}",
                r.server_command,
                r.server_workers,
                if r.server_workers == 1 { "" } else { "s" },
                r.uvicorn
                    .as_ref()
                    .filter(|_| r.setup != "sync")
                    .map_or(String::new(), |u| format!(", uvicorn {u}")),
                r.max_connections
            ));
    }
    for ((stack, _, setup), v) in &servers {
        out.push(format!(
            "{} ({stack} stack): {}.",
            super::setup_name(setup),
            v.iter().cloned().collect::<Vec<_>>().join("; ")
        ));
    }

    // Each deviation once, with the setups it concerns.
    let all_setups: BTreeSet<&str> = records.iter().map(|r| r.setup.as_str()).collect();
    let mut devs: BTreeMap<String, BTreeSet<&str>> = BTreeMap::new();
    for r in &records {
        for d in deviations(r) {
            devs.entry(d).or_default().insert(r.setup.as_str());
        }
    }
    let nfqueue: BTreeSet<&str> = cells
        .iter()
        .filter(|c| c.delay.backend == "nfqueue")
        .map(|c| c.key.setup.as_str())
        .collect();
    if !nfqueue.is_empty() {
        devs.insert(
            "added delay held by an NFQUEUE delay line (the study: tc netem)".into(),
            nfqueue,
        );
    }
    let every: BTreeSet<&str> = all_setups
        .union(&cells.iter().map(|c| c.key.setup.as_str()).collect())
        .copied()
        .collect();
    if !devs.is_empty() {
        let list: Vec<String> = devs
            .iter()
            .map(|(d, setups)| {
                if *setups == every {
                    d.clone()
                } else {
                    let mut setups: Vec<&str> = setups.iter().copied().collect();
                    setups.sort_by_key(|s| order(s));
                    format!(
                        "{d} [{}]",
                        setups
                            .iter()
                            .map(|s| super::setup_name(s))
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                }
            })
            .collect();
        out.push(format!(
            "Deviations from the study's system: {}.",
            list.join("; ")
        ));
    } else if !records.is_empty() {
        out.push("No recorded deviation from the study's system.".into());
    }
    let unrecorded = cells.len() - records.len();
    if unrecorded > 0 {
        out.push(format!(
            "{unrecorded} of {} cells carry no record of the system under test: what they ran with is not known.",
            cells.len()
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::study::sut::HbaRule;

    /// The study's system, as a record of it would read.
    pub(crate) fn study_record(setup: &str) -> SystemRecord {
        let s = &STUDY_SYSTEM;
        SystemRecord {
            backend: "docker".into(),
            setup: setup.into(),
            stack: "study".into(),
            python: "3.11.2".into(),
            django: s.django.into(),
            db_driver: s.db_driver.into(),
            gunicorn: Some(s.gunicorn.into()),
            uvicorn: Some(s.uvicorn.into()),
            debug: true,
            middleware: s.middleware.iter().map(|m| m.to_string()).collect(),
            installed_apps: vec![],
            conn_max_age: Some(0),
            db_pool: false,
            root_log_level: "DEBUG".into(),
            sql_logged: true,
            postgres_version: "15.14 (Debian 15.14-0+deb12u1)".into(),
            max_connections: if setup == "async-unlimited" { 1000 } else { 100 },
            password_encryption: "scram-sha-256".into(),
            db_auth_rule: Some(HbaRule { line: 100, method: "scram-sha-256".into() }),
            db_password_stored_as: Some("SCRAM-SHA-256".into()),
            db_used_password: Some(true),
            db_ssl: false,
            server_command: "/venv/bin/python /venv/bin/gunicorn studysite.wsgi:application --workers 1 --threads 1 --timeout 180 --bind 0.0.0.0:8000".into(),
            server_workers: 1,
        }
    }

    #[test]
    fn the_studys_own_system_deviates_in_nothing() {
        for setup in ["sync", "async-limited", "async-unlimited"] {
            assert_eq!(
                deviations(&study_record(setup)),
                Vec::<String>::new(),
                "{setup}"
            );
        }
    }

    #[test]
    fn each_difference_is_listed_once_with_the_studys_value() {
        let mut r = study_record("async-limited");
        r.django = "5.2.8".into();
        r.db_driver = "psycopg 3.2.12".into();
        r.uvicorn = Some("0.38.0".into());
        r.debug = false;
        r.middleware = vec!["django.middleware.common.CommonMiddleware".into()];
        r.root_log_level = "WARNING".into();
        r.sql_logged = false;
        r.db_auth_rule = Some(HbaRule {
            line: 100,
            method: "trust".into(),
        });
        r.db_used_password = Some(false);
        r.max_connections = 1000;
        r.server_command = "gunicorn x --workers 2 --timeout 30".into();
        r.server_workers = 2;
        let d = deviations(&r);
        let expect = [
            "Django 5.2.8 (the study: 4.1.3)",
            "database driver psycopg 3.2.12 (the study: psycopg2 2.9.5)",
            "uvicorn 0.38.0 (the study: 0.20.0)",
            "DEBUG off (the study: on)",
            "middleware: CommonMiddleware (the study: Django's default minus CSRF: SecurityMiddleware, SessionMiddleware, CommonMiddleware, AuthenticationMiddleware, MessageMiddleware, XFrameOptionsMiddleware)",
            "root logger at WARNING, SQL statements not printed (the study: DEBUG, every SQL statement printed)",
            "database authentication trust (the study: scram-sha-256, two more round trips on every new connection)",
            "max_connections 1000 (the study: 100)",
            "server command `gunicorn x --workers 2 --timeout 30` lacks --workers 1, --threads 1, --timeout 180 (the study: --workers 1 --threads 1 --timeout 180)",
            "2 server workers (the study: 1)",
        ];
        assert_eq!(d, expect);
        // uvicorn is the async setups' worker only: Sync's record is not held to it.
        let mut sync = study_record("sync");
        sync.uvicorn = None;
        assert!(deviations(&sync).is_empty());
        // Async Pooled is not a study setup: its pool is a deviation, its limit is not judged.
        let mut pooled = study_record("async-pooled");
        pooled.db_pool = true;
        pooled.max_connections = 100;
        assert_eq!(
            deviations(&pooled),
            vec!["a database connection pool (the study: a new connection per request)"]
        );
    }

    #[test]
    fn the_header_names_each_deviation_once_with_its_setups_and_unrecorded_cells() {
        use crate::study::results::tests::cell;
        let mut cells = Vec::new();
        for (setup, auth) in [("sync", "trust"), ("async-limited", "scram-sha-256")] {
            let mut c = cell(setup, "io_read", 100, 1, 100);
            let mut r = study_record(setup);
            r.db_auth_rule = Some(HbaRule {
                line: 100,
                method: auth.into(),
            });
            r.debug = false;
            c.system = Some(r);
            c.delay.backend = "netem".into();
            cells.push(c);
        }
        cells.push(cell("async-unlimited", "io_read", 100, 1, 100));
        let h = header_lines(&cells);
        let dev = h
            .iter()
            .find(|l| l.starts_with("Deviations"))
            .unwrap_or_else(|| panic!("{h:#?}"));
        assert_eq!(dev.matches("DEBUG off").count(), 1, "{dev}");
        assert!(dev.contains("database authentication trust (the study: scram-sha-256, two more round trips on every new connection) [Sync]"), "{dev}");
        // The third cell's delay ran through the NFQUEUE line (the test cell's default).
        assert!(
            dev.contains("NFQUEUE delay line (the study: tc netem) [Async Unlimited]"),
            "{dev}"
        );
        assert!(h.iter().any(|l| l == "1 of 3 cells carry no record of the system under test: what they ran with is not known."), "{h:#?}");
        assert!(
            h.iter().any(|l| l.starts_with(
                "study stack: Python 3.11.2, Django 4.1.3, psycopg2 2.9.5, gunicorn 20.1.0;"
            )),
            "{h:#?}"
        );
        assert!(
            h.iter()
                .any(|l| l.starts_with("Sync (study stack): `/venv/bin/python")),
            "{h:#?}"
        );
        // Setups in the study's column order.
        assert!(
            dev.contains("DEBUG off (the study: on) [Sync, Async Limited]"),
            "{dev}"
        );
        let sync_line = h.iter().position(|l| l.starts_with("Sync (")).unwrap();
        assert!(h[sync_line + 1].starts_with("Async Limited ("), "{h:#?}");
    }
}
