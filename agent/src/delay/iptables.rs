//! The NFQUEUE rules of the nfqueue back end, as `iptables` arguments, and the parsing of what
//! `iptables` lists back.
//!
//! Each rule holds *ingress* packets (mangle PREROUTING, `-i DEV`): holding a local sender's
//! egress packets keeps them charged to its socket and collapses TCP throughput, while holding
//! them on the way in gives the same round-trip delay without that. Each rule carries the
//! comment `awaitlab:<pid>:<id>`; this module never produces a delete for a rule without it.

/// Prefix of every marker comment.
pub(crate) const MARKER_PREFIX: &str = "awaitlab:";

/// `awaitlab:<pid>:<id>`.
pub fn marker(pid: u32, id: u32) -> String {
    format!("{MARKER_PREFIX}{pid}:{id}")
}

/// The owner pid of a marker, if it is one of ours.
pub(crate) fn marker_pid(comment: &str) -> Option<u32> {
    let rest = comment.strip_prefix(MARKER_PREFIX)?;
    let (pid, id) = rest.split_once(':')?;
    id.parse::<u32>().ok()?;
    pid.parse().ok()
}

/// The rule body shared by insert and delete.
fn rule(dev: &str, marker: &str, queue: u16) -> Vec<String> {
    let q = queue.to_string();
    [
        "-i",
        dev,
        "-m",
        "comment",
        "--comment",
        marker,
        "-j",
        "NFQUEUE",
        "--queue-num",
        &q,
        "--queue-bypass",
    ]
    .map(String::from)
    .to_vec()
}

/// Inserts the rule first in mangle PREROUTING, so that no earlier ACCEPT lets packets skip it.
/// `--queue-bypass` lets packets through while no delay line is bound (before the agent binds,
/// or if it was killed) instead of black-holing the namespace.
pub(crate) fn insert_args(dev: &str, marker: &str, queue: u16) -> Vec<String> {
    let mut a: Vec<String> = ["-w", "-t", "mangle", "-I", "PREROUTING", "1"]
        .map(String::from)
        .to_vec();
    a.extend(rule(dev, marker, queue));
    a
}

pub(crate) fn list_args() -> Vec<String> {
    ["-w", "-t", "mangle", "-S", "PREROUTING"]
        .map(String::from)
        .to_vec()
}

pub(crate) fn counters_args() -> Vec<String> {
    ["-w", "-t", "mangle", "-L", "PREROUTING", "-v", "-x", "-n"]
        .map(String::from)
        .to_vec()
}

/// One of our rules as listed by `iptables -S`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Rule {
    pub marker: String,
    pub owner_pid: u32,
    pub dev: String,
    pub queue: u16,
    /// The `-S` line, for `show`.
    pub spec: String,
    /// Arguments that delete exactly this rule.
    #[serde(skip)]
    pub delete: Vec<String>,
}

/// Our rules in `iptables -t mangle -S PREROUTING` output; other rules are ignored.
pub(crate) fn parse_rules(listing: &str) -> Vec<Rule> {
    listing
        .lines()
        .filter_map(|line| {
            let w: Vec<String> = line
                .split_whitespace()
                .map(|t| t.trim_matches('"').to_string())
                .collect();
            if w.first().map(String::as_str) != Some("-A")
                || w.get(1).map(String::as_str) != Some("PREROUTING")
            {
                return None;
            }
            let after = |flag: &str| {
                w.iter()
                    .position(|t| t == flag)
                    .and_then(|i| w.get(i + 1))
                    .cloned()
            };
            let marker = after("--comment")?;
            let owner_pid = marker_pid(&marker)?;
            let mut delete: Vec<String> = ["-w", "-t", "mangle", "-D"].map(String::from).to_vec();
            delete.extend(w[1..].iter().cloned());
            Some(Rule {
                owner_pid,
                dev: after("-i").unwrap_or_default(),
                queue: after("--queue-num")
                    .and_then(|q| q.parse().ok())
                    .unwrap_or(0),
                spec: line.trim().to_string(),
                marker,
                delete,
            })
        })
        .collect()
}

/// Packets that matched the rule with `marker`, from `iptables -L -v -x -n` output.
pub fn packets(listing: &str, marker: &str) -> Option<u64> {
    let needle = format!("/* {marker} */");
    listing
        .lines()
        .find(|l| l.contains(&needle))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_holds_ingress_first_in_prerouting() {
        assert_eq!(
            insert_args("veth0", "awaitlab:12:3", 47001).join(" "),
            "-w -t mangle -I PREROUTING 1 -i veth0 -m comment --comment awaitlab:12:3 -j NFQUEUE --queue-num 47001 --queue-bypass"
        );
    }

    #[test]
    fn lists_only_marked_rules_and_deletes_them_exactly() {
        let out = "-P PREROUTING ACCEPT\n\
                   -A PREROUTING -i veth0 -m comment --comment \"awaitlab:12:3\" -j NFQUEUE --queue-num 47001 --queue-bypass\n\
                   -A PREROUTING -i veth0 -m comment --comment \"someone:else\" -j NFQUEUE --queue-num 1\n\
                   -A PREROUTING -i eth0 -m comment --comment awaitlab:notapid:3 -j ACCEPT\n\
                   -A PREROUTING -i eth0 -j MARK --set-xmark 0x1/0xffffffff\n";
        let r = parse_rules(out);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].owner_pid, 12);
        assert_eq!(r[0].dev, "veth0");
        assert_eq!(r[0].queue, 47001);
        assert_eq!(
            r[0].delete.join(" "),
            "-w -t mangle -D PREROUTING -i veth0 -m comment --comment awaitlab:12:3 -j NFQUEUE --queue-num 47001 --queue-bypass"
        );
    }

    #[test]
    fn reads_the_rule_counter() {
        let out = "Chain PREROUTING (policy ACCEPT 10 packets, 840 bytes)\n\
                   \x20   pkts      bytes target     prot opt in     out     source               destination\n\
                   \x20  52113  3291140 NFQUEUE    0    --  veth0  *       0.0.0.0/0            0.0.0.0/0            /* awaitlab:12:3 */ NFQUEUE num 47001 bypass\n";
        assert_eq!(packets(out, "awaitlab:12:3"), Some(52113));
        assert_eq!(packets(out, "awaitlab:12:4"), None);
    }
}
