//! The `tc netem` back end: a netem root qdisc on each chosen interface of the target namespace,
//! installed by the host's `tc` entered into that namespace (nothing is needed inside a
//! container).
//!
//! Every qdisc it installs has handle `a7a1:` (awaitlab's marker), and it only ever deletes a
//! root qdisc that carries that handle and is a netem: a qdisc someone else installed is never
//! replaced or removed (`tc qdisc add` refuses to replace an existing root qdisc).

use std::time::Duration;

/// The qdisc handle that marks our netem qdiscs.
pub(crate) const HANDLE: &str = "a7a1:";

/// Packets per second the queue must absorb without dropping at the requested delay.
pub(crate) const PEAK_PPS: u64 = 100_000;

/// The netem `limit` (packets held at once): twice what `PEAK_PPS` fills during the longest hold,
/// and never below netem's default of 1000.
pub fn limit(delay: Duration, jitter: Duration) -> u64 {
    let held = PEAK_PPS as f64 * (delay + jitter).as_secs_f64();
    ((2.0 * held).ceil() as u64).max(1000)
}

fn us(d: Duration) -> String {
    format!("{}us", d.as_micros())
}

/// `tc` arguments that install the delay on `dev`.
pub(crate) fn add_args(dev: &str, delay: Duration, jitter: Duration) -> Vec<String> {
    let mut a: Vec<String> = [
        "qdisc", "add", "dev", dev, "root", "handle", HANDLE, "netem", "delay",
    ]
    .map(String::from)
    .to_vec();
    a.push(us(delay));
    if !jitter.is_zero() {
        a.push(us(jitter));
    }
    a.push("limit".into());
    a.push(limit(delay, jitter).to_string());
    a
}

/// `tc` arguments that remove our qdisc from `dev` (only run after `is_ours` said so).
pub(crate) fn del_args(dev: &str) -> Vec<String> {
    ["qdisc", "del", "dev", dev, "root", "handle", HANDLE]
        .map(String::from)
        .to_vec()
}

/// `tc` arguments that list the qdiscs of the namespace.
pub(crate) fn show_args() -> Vec<String> {
    ["qdisc", "show"].map(String::from).to_vec()
}

/// Devices whose root qdisc in `tc qdisc show` output is our netem, with the rest of its line.
pub fn ours(show_output: &str) -> Vec<(String, String)> {
    show_output
        .lines()
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            // "qdisc netem a7a1: dev eth0 root refcnt 2 limit 40000 delay 100ms"
            (w.len() >= 6
                && w[0] == "qdisc"
                && w[1] == "netem"
                && w[2] == HANDLE
                && w[3] == "dev"
                && w[5] == "root")
                .then(|| (w[4].to_string(), l.trim().to_string()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn installs_a_marked_netem_with_a_limit_sized_for_the_delay() {
        let a = add_args("eth0", Duration::from_millis(100), Duration::ZERO);
        assert_eq!(
            a.join(" "),
            "qdisc add dev eth0 root handle a7a1: netem delay 100000us limit 20000"
        );
        let a = add_args(
            "veth1",
            Duration::from_millis(200),
            Duration::from_millis(10),
        );
        // 2 x 100k pps x 0.21 s
        assert_eq!(
            a.join(" "),
            "qdisc add dev veth1 root handle a7a1: netem delay 200000us 10000us limit 42000"
        );
        let a = add_args("lo", Duration::ZERO, Duration::ZERO);
        assert_eq!(
            a.join(" "),
            "qdisc add dev lo root handle a7a1: netem delay 0us limit 1000"
        );
        assert_eq!(
            del_args("eth0").join(" "),
            "qdisc del dev eth0 root handle a7a1:"
        );
    }

    #[test]
    fn recognises_only_our_root_netem() {
        let out = "qdisc noqueue 0: dev lo root refcnt 2\n\
                   qdisc netem a7a1: dev eth0 root refcnt 2 limit 20000 delay 100ms\n\
                   qdisc netem 8001: dev eth1 root refcnt 2 limit 1000 delay 5ms\n\
                   qdisc netem a7a1: dev eth2 parent 1:1 limit 1000 delay 5ms\n\
                   qdisc htb a7a1: dev eth3 root refcnt 2\n";
        let got: Vec<String> = ours(out).into_iter().map(|(d, _)| d).collect();
        assert_eq!(got, vec!["eth0"]);
    }
}
