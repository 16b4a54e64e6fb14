//! The one probe session: one attach of the probes with its ring buffer and aggregator, which
//! `awaitlab watch`, the daemon (one per followed container) and the experiment runner all use.
//! `summary` covers everything since the attach; the runner measures intervals instead: it
//! marks the start of a cell and takes the cell's summary at its end, while the probes stay
//! attached across cells. Dropping the session detaches and unloads the programs.
//!
//! The session must be drained regularly (`drain`, or `pump` in a loop): the programs wake the
//! agent only when half a megabyte of records waits. In aggregation mode (`ProbeSpec::aggregate`)
//! there are no records: the programs keep histograms in maps, and every reading of the session
//! (`snapshot`, `mark`, `summary_since`) first reads the maps (`absorb`).

use std::time::{Duration, Instant};

use agent_common::COUNTERS;
use aya::maps::{MapData, RingBuf};
use tokio::io::{unix::AsyncFd, Interest};

use super::{ProbeError, ProbeSpec, Probes};
use crate::probe::aggregate::{
    summary::{Summary, SummaryInput},
    Aggregator, CpuTotals, Reading, Record, Stats,
};

pub struct Session {
    probes: Probes,
    ring: AsyncFd<RingBuf<MapData>>,
    pub agg: Aggregator,
    target: String,
    netns_inum: u32,
    aggregate: bool,
    attached: Mark,
}

/// The start of a measured interval.
#[derive(Clone)]
pub struct Mark {
    at: Instant,
    counters: [u64; COUNTERS as usize],
    reading: Reading,
}

impl Session {
    /// Attaches the probes; must run inside a tokio runtime (the ring buffer is polled by it).
    /// `target` names the target in summaries and metrics.
    pub fn attach(spec: &ProbeSpec, target: &str) -> Result<Session, ProbeError> {
        let mut probes = Probes::attach(spec)?;
        let ring = probes.take_events()?;
        // SAFETY: the ring buffer owns its fd and AsyncFd owns the ring buffer, so the fd stays
        // open for as long as it is registered.
        let ring = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
            .map_err(|e| ProbeError::Poll(e.into_parts().1))?;
        let counters = probes.counters()?;
        let reading = Reading::at(crate::clock::monotonic_ns(), &probes.threads()?, &counters);
        Ok(Session {
            probes,
            ring,
            agg: Aggregator::new(),
            target: target.into(),
            netns_inum: spec.netns_inum,
            aggregate: spec.aggregate,
            attached: Mark {
                at: Instant::now(),
                counters,
                reading,
            },
        })
    }

    pub fn probes(&self) -> &Probes {
        &self.probes
    }

    /// When the probes were attached.
    pub(crate) fn attached_at(&self) -> Instant {
        self.attached.at
    }

    /// The counters and the threads' CPU totals read at the attach.
    pub(crate) fn attached_reading(&self) -> &Reading {
        &self.attached.reading
    }

    /// Takes every record waiting in the ring buffer; calls `each` on the decoded ones.
    pub fn drain(&mut self, mut each: impl FnMut(&Record)) -> usize {
        let mut n = 0;
        let ring = self.ring.get_mut();
        while let Some(item) = ring.next() {
            if let Some(r) = self.agg.push(&item) {
                each(&r);
            }
            n += 1;
        }
        n
    }

    /// Waits until the kernel signals a batch, or `max` passes; then drains.
    pub(crate) async fn pump(&mut self, max: Duration, each: impl FnMut(&Record)) -> usize {
        if let Ok(Ok(mut guard)) = tokio::time::timeout(max, self.ring.readable_mut()).await {
            guard.clear_ready();
        }
        self.drain(each)
    }

    /// Aggregation mode: adds what the maps gained to the aggregator (a no-op otherwise).
    fn absorb(&mut self, counters: &[u64; COUNTERS as usize]) -> Result<(), ProbeError> {
        if !self.aggregate {
            return Ok(());
        }
        let k = self.probes.aggregates()?;
        let probes = &self.probes;
        self.agg.absorb(&k, counters, |hash| probes.head(hash));
        Ok(())
    }

    fn read_now(&self, counters: &[u64; COUNTERS as usize]) -> Result<Reading, ProbeError> {
        Ok(Reading::at(
            crate::clock::monotonic_ns(),
            &self.probes.threads()?,
            counters,
        ))
    }

    /// Hands the kernel counters and CPU totals to the aggregator's observers (metrics), and
    /// returns them.
    pub(crate) fn snapshot(&mut self) -> Result<([u64; COUNTERS as usize], CpuTotals), ProbeError> {
        let counters = self.probes.counters()?;
        self.absorb(&counters)?;
        let reading = self.read_now(&counters)?;
        self.agg.snapshot(&counters, &reading);
        Ok((counters, reading.cpu))
    }

    /// The summary of everything since the probes were attached.
    pub fn summary(&mut self) -> Result<Summary, ProbeError> {
        let attached = self.attached.clone();
        self.summary_since(&attached)
    }

    /// Starts a measured interval: drains, forgets what came before, remembers the counters.
    pub fn mark(&mut self) -> Result<Mark, ProbeError> {
        self.drain(|_| {});
        let counters = self.probes.counters()?;
        self.absorb(&counters)?;
        let reading = self.read_now(&counters)?;
        self.agg.total = Stats {
            since_ns: reading.at_ns,
            ..Stats::default()
        };
        Ok(Mark {
            at: Instant::now(),
            counters,
            reading,
        })
    }

    /// The summary of everything since `mark`. The same reading of the maps goes to the
    /// observers (as `snapshot`), so a caller that wants both reads them once.
    pub fn summary_since(&mut self, mark: &Mark) -> Result<Summary, ProbeError> {
        self.drain(|_| {});
        let now = self.probes.counters()?;
        self.absorb(&now)?;
        let end = self.read_now(&now)?;
        self.agg.snapshot(&now, &end);
        let mut delta = [0u64; COUNTERS as usize];
        for (i, d) in delta.iter_mut().enumerate() {
            *d = now[i].saturating_sub(mark.counters[i]);
        }
        Ok(Summary::build(SummaryInput {
            target: &self.target,
            netns_inum: self.netns_inum,
            duration_s: mark.at.elapsed().as_secs_f64(),
            stats: &self.agg.total,
            labels: &self.agg.labels,
            counters: &delta,
            start: &mark.reading,
            end: &end,
            malformed: self.agg.malformed,
            probes: self.probes.status(),
        }))
    }
}
