//! report.md.

use super::*;

impl Report {
    pub(crate) fn markdown(&self) -> String {
        let mut s = String::from("# awaitlab report: sync vs async Django under added latency\n\n");
        for h in &self.header {
            let _ = writeln!(s, "- {h}");
        }
        s.push_str("\n## The study's tables\n\nCells: total successes / max sRPS (mean ± 95 % CI half-width with three or more repetitions).\n\n");
        for t in &self.study_tables {
            md_table(&mut s, t);
        }
        s.push_str("## Beside the published numbers\n\n");
        for t in &self.beside {
            md_table(&mut s, t);
        }
        s.push_str("## Why: what the probes saw\n\n");
        for t in &self.explain {
            md_table(&mut s, t);
        }
        md_lists(&mut s, "Findings", &self.findings);
        md_lists(&mut s, "The study's open questions", &self.questions);
        s.push_str("## Statistics\n\n");
        for l in &self.statistics {
            let _ = writeln!(s, "- {l}");
        }
        s
    }
}

pub(super) fn md_table(s: &mut String, t: &Table) {
    let _ = writeln!(s, "**{}**\n", t.caption);
    let _ = writeln!(s, "| {} |", t.head.join(" | "));
    let _ = writeln!(
        s,
        "|{}|",
        t.head.iter().map(|_| "---").collect::<Vec<_>>().join("|")
    );
    for r in &t.rows {
        let _ = writeln!(s, "| {} |", r.join(" | "));
    }
    s.push('\n');
}

/// A section of headed lists (the findings per route, the answers per question).
pub(super) fn md_lists(s: &mut String, title: &str, lists: &[(String, Vec<String>)]) {
    let _ = writeln!(s, "## {title}\n");
    for (head, lines) in lists {
        let _ = writeln!(s, "### {head}\n");
        for l in lines {
            let _ = writeln!(s, "- {l}");
        }
        s.push('\n');
    }
}
