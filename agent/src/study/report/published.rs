//! The study's published results (one run each, an M1 laptop, Locust 2.13), as printed in its
//! tables: successes and max sRPS per route, added delay and setup, and the system it ran them
//! on. Data, not code: the report puts our numbers and our system beside these, and says when
//! they cannot sit beside each other.

use crate::study::results::CellResult;

/// The study's three setups, in its column order (Async Pooled is ours, not the study's).
pub(crate) const STUDY_SETUPS: &[&str] = &["sync", "async-limited", "async-unlimited"];

/// (route, delay ms, setup, total successes, max sRPS)
pub(crate) const PUBLISHED: &[(&str, u32, &str, u64, f64)] = &[
    ("cpu", 0, "sync", 255, 1.5),
    ("cpu", 0, "async-limited", 24, 0.1),
    ("cpu", 0, "async-unlimited", 91, 3.3),
    ("cpu", 100, "sync", 255, 1.5),
    ("cpu", 100, "async-limited", 30, 0.2),
    ("cpu", 100, "async-unlimited", 97, 1.3),
    ("cpu", 200, "sync", 200, 1.5),
    ("cpu", 200, "async-limited", 86, 0.5),
    ("cpu", 200, "async-unlimited", 90, 2.7),
    ("io_read", 0, "sync", 3927, 23.0),
    ("io_read", 0, "async-limited", 3053, 28.3),
    ("io_read", 0, "async-unlimited", 4680, 34.1),
    ("io_read", 100, "sync", 200, 1.2),
    ("io_read", 100, "async-limited", 4555, 28.6),
    ("io_read", 100, "async-unlimited", 5313, 36.0),
    ("io_read", 200, "sync", 105, 0.6),
    ("io_read", 200, "async-limited", 4312, 28.4),
    ("io_read", 200, "async-unlimited", 5123, 34.2),
    ("io_create", 0, "sync", 24328, 143.6),
    ("io_create", 0, "async-limited", 11325, 188.8),
    ("io_create", 0, "async-unlimited", 20163, 187.5),
    ("io_create", 100, "sync", 242, 1.4),
    ("io_create", 100, "async-limited", 12963, 129.0),
    ("io_create", 100, "async-unlimited", 26145, 171.4),
    ("io_create", 200, "sync", 124, 0.7),
    ("io_create", 200, "async-limited", 8644, 82.6),
    ("io_create", 200, "async-unlimited", 23030, 185.0),
];

/// The system the study ran, as its repository and documents give it, for the report's list of
/// deviations (`report::system`). `max_connections` per setup is `sut::Setup::max_connections`.
pub(crate) struct StudySystem {
    pub django: &'static str,
    pub db_driver: &'static str,
    pub gunicorn: &'static str,
    /// The async setups' worker.
    pub uvicorn: &'static str,
    pub debug: bool,
    /// Django's default middleware minus CsrfViewMiddleware.
    pub middleware: &'static [&'static str],
    pub conn_max_age: u64,
    pub root_log_level: &'static str,
    pub sql_logged: bool,
    pub postgres_major: u32,
    pub password_encryption: &'static str,
    /// How PostgreSQL authenticated the server's connections (the official image with
    /// POSTGRES_PASSWORD, PostgreSQL >= 14).
    pub db_auth_method: &'static str,
    /// Arguments of both servers' gunicorn command lines.
    pub server_args: &'static [&'static str],
    pub server_workers: u32,
}

pub(crate) const STUDY_SYSTEM: StudySystem = StudySystem {
    django: "4.1.3",
    db_driver: "psycopg2 2.9.5",
    gunicorn: "20.1.0",
    uvicorn: "0.20.0",
    debug: true,
    middleware: &[
        "django.middleware.security.SecurityMiddleware",
        "django.contrib.sessions.middleware.SessionMiddleware",
        "django.middleware.common.CommonMiddleware",
        "django.contrib.auth.middleware.AuthenticationMiddleware",
        "django.contrib.messages.middleware.MessageMiddleware",
        "django.middleware.clickjacking.XFrameOptionsMiddleware",
    ],
    conn_max_age: 0,
    root_log_level: "DEBUG",
    sql_logged: true,
    postgres_major: 15,
    password_encryption: "scram-sha-256",
    db_auth_method: "scram-sha-256",
    server_args: &["--workers 1", "--threads 1", "--timeout 180"],
    server_workers: 1,
};

/// The study's (successes, max sRPS) for a cell, if it published one.
pub fn published(route: &str, delay_ms: u32, setup: &str) -> Option<(u64, f64)> {
    PUBLISHED
        .iter()
        .find(|(r, d, s, _, _)| *r == route && *d == delay_ms && *s == setup)
        .map(|&(_, _, _, ok, srps)| (ok, srps))
}

/// Why the study's absolute numbers cannot sit beside these cells: `None` when every cell ran the
/// study's profile for its 180 s, else "not comparable (30 s vs 180 s)" with our cells' planned
/// durations. Totals grow with the run time and the peak depends on the ramp, so only scale-free
/// ratios (async / sync) compare across profiles.
pub(crate) fn not_comparable<'a>(
    cells: impl IntoIterator<Item = &'a CellResult>,
) -> Option<String> {
    let study_s = crate::load::ClosedSchedule::study()
        .duration()
        .as_secs_f64();
    // Our side of the label: the planned duration, or the profile's name when only that differs.
    let ours: std::collections::BTreeSet<(u64, String)> = cells
        .into_iter()
        .filter(|c| c.profile != "study" || (c.load.planned_s - study_s).abs() >= 0.5)
        .map(|c| {
            let s = c.load.planned_s.round();
            (
                s as u64,
                if s == study_s.round() {
                    format!("{} profile", c.profile)
                } else {
                    format!("{s:.0} s")
                },
            )
        })
        .collect();
    if ours.is_empty() {
        return None;
    }
    let ours: Vec<String> = ours.into_iter().map(|(_, label)| label).collect();
    Some(format!(
        "not comparable ({} vs {study_s:.0} s)",
        ours.join(", ")
    ))
}

#[cfg(test)]
mod tests {
    use crate::study::results::tests::cell;

    #[test]
    fn quick_cells_are_not_comparable_with_the_studys_180_s() {
        let quick = cell("sync", "io_read", 100, 1, 100);
        assert_eq!(
            super::not_comparable([&quick]).as_deref(),
            Some("not comparable (30 s vs 180 s)")
        );
        let mut study = quick.clone();
        study.profile = "study".into();
        study.load.planned_s = 180.0;
        assert_eq!(super::not_comparable([&study]), None);
        // The profile's name alone does not decide: a 180 s cell of another profile, or a
        // "study" cell that planned less, is not the study's run.
        let mut short = study.clone();
        short.load.planned_s = 60.0;
        assert_eq!(
            super::not_comparable([&study, &short]).as_deref(),
            Some("not comparable (60 s vs 180 s)")
        );
        let mut other = study.clone();
        other.profile = "smoke".into();
        assert_eq!(
            super::not_comparable([&other]).as_deref(),
            Some("not comparable (smoke profile vs 180 s)")
        );
        let mut smoke = quick.clone();
        smoke.load.planned_s = 15.0;
        assert_eq!(
            super::not_comparable([&quick, &smoke, &study]).as_deref(),
            Some("not comparable (15 s, 30 s vs 180 s)")
        );
    }

    #[test]
    fn every_cell_of_the_three_tables_is_there_once() {
        for route in ["cpu", "io_read", "io_create"] {
            for delay in [0, 100, 200] {
                for &setup in super::STUDY_SETUPS {
                    let n = super::PUBLISHED
                        .iter()
                        .filter(|p| p.0 == route && p.1 == delay && p.2 == setup)
                        .count();
                    assert_eq!(n, 1, "{route} {delay} {setup}");
                }
            }
        }
        assert_eq!(super::published("io_read", 100, "sync"), Some((200, 1.2)));
        assert_eq!(super::published("io_read", 100, "async-pooled"), None);
    }
}
