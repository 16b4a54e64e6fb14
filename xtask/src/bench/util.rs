//! What the benchmarks share: the nginx they load, a one-shot HTTP check, Ctrl-C handling that
//! lets their guards run, and small figures.

use std::fs;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{bail, Context, Result};

pub const NGINX: &str = "/usr/sbin/nginx";

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_interrupt(_: libc::c_int) {
    // Only an atomic store: the one thing that is async-signal-safe here.
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Ctrl-C would otherwise kill the xtask before its guards run and leave the namespace behind.
/// With this handler the current step returns (the children get the same SIGINT from the
/// terminal), `check_interrupted` turns that into an error, and the guards clean up.
pub fn catch_interrupts() {
    let handler = on_interrupt as extern "C" fn(libc::c_int);
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { libc::signal(sig, handler as libc::sighandler_t) };
    }
}

pub fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

/// nginx modules whose temp-path directive must be set (so nginx never writes to
/// /var/lib/nginx), unless this build left the module out (`nginx -V` says `--without-...`).
const TEMP_PATHS: [(&str, &str); 5] = [
    ("client_body_temp_path", ""),
    ("proxy_temp_path", "http_proxy_module"),
    ("fastcgi_temp_path", "http_fastcgi_module"),
    ("uwsgi_temp_path", "http_uwsgi_module"),
    ("scgi_temp_path", "http_scgi_module"),
];

/// nginx's temp path directives pointed into `dir` (so that it runs as root without touching
/// /var/lib/nginx), leaving out the modules this nginx was built without.
pub fn temp_path_directives(dir: &Path, nginx_v: &str) -> String {
    let t = dir.display();
    let mut temp_paths = String::new();
    for (directive, module) in TEMP_PATHS {
        if module.is_empty() || !nginx_v.contains(&format!("--without-{module}")) {
            temp_paths.push_str(&format!("    {directive} {t}/{directive};\n"));
        }
    }
    temp_paths
}

/// A blocking HTTP client that goes straight to the address it is given (no proxy from the
/// environment), with short timeouts.
pub fn http_client() -> Result<reqwest::blocking::Client> {
    reqwest::blocking::Client::builder()
        .no_proxy()
        .connect_timeout(Duration::from_millis(500))
        .timeout(Duration::from_secs(2))
        .build()
        .context("building the HTTP client")
}

/// One GET of `path` at `addr`; returns the status and the body.
pub fn http_get(
    client: &reqwest::blocking::Client,
    addr: SocketAddr,
    path: &str,
) -> Result<(u16, String)> {
    let url = format!("http://{addr}{path}");
    let resp = client
        .get(&url)
        .send()
        .with_context(|| format!("GET {url}"))?;
    let status = resp.status().as_u16();
    let body = resp
        .text()
        .with_context(|| format!("reading the body of GET {url}"))?;
    Ok((status, body))
}

/// One GET / straight to `addr`; returns the status.
pub fn http_get_status(addr: SocketAddr) -> Result<u16> {
    Ok(http_get(&http_client()?, addr, "/")?.0)
}

pub fn tail(path: &Path) -> String {
    match fs::read_to_string(path) {
        Ok(text) => {
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(30)..].join("\n")
        }
        Err(e) => format!("({}: {e})", path.display()),
    }
}

pub fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Ranks (1-based, in ascending order) of a distribution-free 95 % confidence interval for the
/// median of `n` values: the k-th smallest and the k-th largest, for the largest k with
/// P(Binomial(n, 1/2) < k) <= 0.025 (the sign test's interval). None for fewer than 6 values,
/// where even the smallest and the largest leave more than 5 % outside.
pub fn median_ci_ranks(n: usize) -> Option<(usize, usize)> {
    if n == 0 || n > 1000 {
        return None;
    }
    let mut pmf = 0.5f64.powi(n as i32);
    let mut cdf = 0.0;
    let mut k = 0;
    for j in 0..n {
        cdf += pmf;
        if cdf > 0.025 {
            break;
        }
        k = j + 1;
        pmf *= (n - j) as f64 / (j + 1) as f64;
    }
    (k > 0).then_some((k, n + 1 - k))
}

/// The 95 % confidence interval of [`median_ci_ranks`] over `v`.
pub fn median_ci(mut v: Vec<f64>) -> Option<(f64, f64)> {
    let (lo, hi) = median_ci_ranks(v.len())?;
    v.sort_by(f64::total_cmp);
    Some((v[lo - 1], v[hi - 1]))
}

/// A ratio estimated from paired measurements (each pair's own ratio): their median, and the
/// median's 95 % confidence interval ([`median_ci`]; None below 6 pairs).
pub struct Estimate {
    pub median: f64,
    pub ci: Option<(f64, f64)>,
}

impl Estimate {
    pub fn of(ratios: Vec<f64>) -> Estimate {
        Estimate {
            median: median(ratios.clone()),
            ci: median_ci(ratios),
        }
    }

    /// `", 95 % CI LO to HI"` with `digits` decimals, or nothing without an interval.
    pub fn ci_text(&self, digits: usize) -> String {
        self.ci.map_or(String::new(), |(lo, hi)| {
            format!(", 95 % CI {lo:.digits$} to {hi:.digits$}")
        })
    }

    /// Whether the median meets `target` (at least), and whether the interval settles it.
    pub fn verdict(&self, target: f64) -> String {
        let at_median = if self.median >= target {
            "meets"
        } else {
            "BELOW"
        };
        match self.ci {
            Some((lo, hi)) if lo < target && target <= hi => format!(
                "{at_median} target >= {target} at the median; its 95 % CI holds the target"
            ),
            Some(_) => format!("{at_median} target >= {target}, outside its 95 % CI"),
            None => format!("{at_median} target >= {target}; too few pairs for a 95 % CI"),
        }
    }

    /// The interval as `[lo, hi]` (null without one).
    pub fn ci_json(&self) -> serde_json::Value {
        serde_json::json!(self.ci.map(|(lo, hi)| [lo, hi]))
    }
}

/// A memory figure of `/proc/PID/status` in KiB: `VmRSS` (resident now) or `VmHWM` (its peak).
pub fn proc_status_kib(pid: u32, field: &str) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("no {field} in /proc/{pid}/status"))
}

/// Kernel memory of the BPF maps process `pid` holds open, in bytes: the sum of `memlock` over
/// its map descriptors (`/proc/PID/fdinfo`; maps are charged to the memory cgroup, not RSS).
pub fn bpf_maps_bytes(pid: u32) -> u64 {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return 0;
    };
    fds.filter_map(Result::ok)
        .filter(|fd| {
            std::fs::read_link(fd.path()).is_ok_and(|l| l.to_string_lossy() == "anon_inode:bpf-map")
        })
        .filter_map(|fd| {
            let info = std::fs::read_to_string(format!(
                "/proc/{pid}/fdinfo/{}",
                fd.file_name().to_string_lossy()
            ))
            .ok()?;
            info.lines()
                .find_map(|l| l.strip_prefix("memlock:"))
                .and_then(|v| v.trim().parse::<u64>().ok())
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against a server on 127.0.0.1 that answers every request with 204 and counts them.
    #[test]
    fn http_get_status_reads_the_status_of_a_real_server() {
        use std::io::{Read, Write};
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (mut c, _) = l.accept().unwrap();
            let mut buf = [0u8; 1024];
            let n = c.read(&mut buf).unwrap();
            c.write_all(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n")
                .unwrap();
            String::from_utf8_lossy(&buf[..n]).into_owned()
        });
        assert_eq!(http_get_status(addr).unwrap(), 204);
        let request = server.join().unwrap();
        assert!(request.starts_with("GET / HTTP/1.1\r\n"), "{request}");
    }

    /// Against the published table of the sign test's confidence intervals for the median
    /// (Conover, Practical Nonparametric Statistics, table A3; also Altman et al., Statistics
    /// with Confidence, table 18.4): ranks 1..6 for n = 6, 2..9 for 10, 3..10 for 12, 6..15 for
    /// 20, 10..21 for 30.
    #[test]
    fn median_ci_ranks_match_the_published_table() {
        assert_eq!(median_ci_ranks(5), None);
        assert_eq!(median_ci_ranks(6), Some((1, 6)));
        assert_eq!(median_ci_ranks(10), Some((2, 9)));
        assert_eq!(median_ci_ranks(12), Some((3, 10)));
        assert_eq!(median_ci_ranks(20), Some((6, 15)));
        assert_eq!(median_ci_ranks(30), Some((10, 21)));
        let v: Vec<f64> = (1..=12).rev().map(f64::from).collect();
        assert_eq!(median_ci(v), Some((3.0, 10.0)));
    }

    /// The verdict says where the median lies and whether the interval includes the target.
    #[test]
    fn estimate_verdicts() {
        let e = Estimate::of(vec![0.90, 0.93, 0.95, 0.96, 0.97, 0.99, 1.02, 0.94]);
        assert_eq!(e.median, 0.955);
        assert_eq!(e.ci, Some((0.90, 1.02)));
        assert_eq!(e.ci_text(2), ", 95 % CI 0.90 to 1.02");
        assert!(e.verdict(1.0).starts_with("BELOW") && e.verdict(1.0).contains("holds"));
        assert!(e.verdict(0.8).starts_with("meets") && e.verdict(0.8).contains("outside"));
        assert!(e.verdict(1.1).starts_with("BELOW") && e.verdict(1.1).contains("outside"));
        let few = Estimate::of(vec![1.0, 2.0]);
        assert_eq!((few.ci, few.ci_text(2)), (None, String::new()));
        assert!(few.verdict(1.0).contains("too few pairs"));
    }

    #[test]
    fn median_of_odd_and_even() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), 2.5);
        assert!(median(vec![]).is_nan());
    }
}
