//! The users: a closed-loop user sends its next request when the previous one ends; an open
//! worker sends requests at their due times. They run on `Lanes`, one current-thread runtime
//! per generator thread, and share one `Shared` state.

use super::*;

/// What every user shares.
pub(super) struct Shared {
    pub(super) addr: SocketAddr,
    pub(super) template: Template,
    pub(super) rec: Recorder,
    pub(super) timeout: Option<Duration>,
    pub(super) wait: Wait,
    /// Closed model: users with an index at or above this stop after their current request.
    pub(super) target_users: AtomicU32,
    /// Closed model: the generation of the user holding each index. When the target falls and
    /// rises again, a new user takes over the index and the old one, should it still be
    /// finishing a request, leaves instead of continuing beside it.
    pub(super) slots: Vec<AtomicU32>,
    /// Users running (closed) or requests in flight (open).
    pub(super) active: AtomicU32,
    /// Requests cut off by the end of the run.
    pub(super) aborted: AtomicU64,
    /// Open model: next arrival to serve.
    pub(super) next_ticket: AtomicU64,
    /// Open model: the free worker holding the gate is the one that takes the next arrival
    /// (when it is due); the other free workers queue behind it.
    pub(super) gate: tokio::sync::Mutex<()>,
    /// Open model: free workers queued at the gate.
    pub(super) waiting: AtomicU32,
    /// Open model: workers started so far (at most `max_in_flight`).
    pub(super) workers: AtomicU32,
    /// Open model: the last arrival left no free worker queued and none could be started, so
    /// the next one waits for a busy worker.
    pub(super) starved: AtomicBool,
    pub(super) max_in_flight: u32,
    /// The user threads' runtimes (workers start more workers on them).
    pub(super) lanes: Vec<tokio::runtime::Handle>,
    pub(super) open: Option<OpenSchedule>,
    pub(super) start: Instant,
    pub(super) planned_s: f64,
    pub(super) seed: u64,
}

/// Counts a request as in flight until it is recorded; counts it as aborted if its task is
/// cancelled before that (the end of the run drops the future mid-request).
pub(super) struct InFlight<'a> {
    sh: &'a Shared,
    done: bool,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.sh.aborted.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// One request of a user: build, send (with the optional timeout), record.
pub(super) async fn one_request(
    sh: &Shared,
    conn: &mut client::UserConn,
    rng: &mut Rng,
    buf: &mut Vec<u8>,
    started: Instant,
) {
    let mut guard = InFlight { sh, done: false };
    sh.template.render(rng, buf);
    let send = conn.send(sh.addr, buf, &sh.template, &sh.rec);
    let ex = client::with_timeout(sh.timeout, send).await;
    let ex = ex.unwrap_or_else(|| {
        conn.reset();
        client::Exchange {
            outcome: Outcome::Error(ErrorKind::Timeout),
            bytes: 0,
        }
    });
    let done = Instant::now();
    sh.rec.request(
        done,
        done.saturating_duration_since(started),
        ex.outcome,
        ex.bytes,
    );
    guard.done = true;
}

pub(super) async fn closed_user(sh: Arc<Shared>, index: u32, generation: u32) {
    sh.active.fetch_add(1, Ordering::Relaxed);
    struct Leave<'a>(&'a AtomicU32);
    impl Drop for Leave<'_> {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::Relaxed);
        }
    }
    let _leave = Leave(&sh.active);
    let mut rng = Rng::new(
        sh.seed
            .wrapping_add(u64::from(index).wrapping_mul(0x2545_F491_4F6C_DD1D)),
    );
    let mut conn = client::UserConn::default();
    let mut buf = Vec::new();
    while index < sh.target_users.load(Ordering::Relaxed)
        && sh.slots[index as usize].load(Ordering::Relaxed) == generation
    {
        one_request(&sh, &mut conn, &mut rng, &mut buf, Instant::now()).await;
        if let Some(w) = sh.wait.sample(&mut rng) {
            tokio::time::sleep(w).await;
        }
    }
}

/// Starts open-model worker `index` on the next user thread.
pub(super) fn spawn_open_worker(sh: &Arc<Shared>, index: u32) {
    let lane = &sh.lanes[index as usize % sh.lanes.len()];
    // Not tracked by `Lanes`: the end of the run drops these with their thread's runtime.
    drop(lane.spawn(open_worker(sh.clone(), index)));
}

/// One connection serving arrivals. Workers start on demand: when a worker takes an arrival
/// and no other free worker is queued for the next one, it starts one more (up to
/// `max_in_flight`). So there are about as many workers, and connections, as requests in
/// flight, and each connection is reused; an arrival that finds every worker busy and the
/// limit reached starts late.
pub(super) async fn open_worker(sh: Arc<Shared>, index: u32) {
    let schedule = sh.open.as_ref().expect("open model");
    let mut rng = Rng::new(
        sh.seed
            .wrapping_add(u64::from(index).wrapping_mul(0x2545_F491_4F6C_DD1D)),
    );
    let mut conn = client::UserConn::default();
    let mut buf = Vec::new();
    loop {
        sh.waiting.fetch_add(1, Ordering::SeqCst);
        let gate = sh.gate.lock().await;
        sh.waiting.fetch_sub(1, Ordering::SeqCst);
        let i = sh.next_ticket.fetch_add(1, Ordering::Relaxed);
        let Some(t) = schedule.arrival(i) else { break };
        if t >= sh.planned_s {
            break;
        }
        let due = sh.start + Duration::from_secs_f64(t);
        let now = Instant::now();
        // Late: no worker was free for it and it is past its due time. (Being a timer tick
        // past due with a worker ready is not late; the latency counts that lag either way.)
        let late = sh.starved.swap(false, Ordering::SeqCst) && now > due;
        if now < due {
            tokio::time::sleep_until(due.into()).await;
        }
        drop(gate);
        if sh.waiting.load(Ordering::SeqCst) == 0 {
            let n = sh.workers.fetch_add(1, Ordering::SeqCst);
            if n < sh.max_in_flight {
                spawn_open_worker(&sh, n);
            } else {
                sh.workers.fetch_sub(1, Ordering::SeqCst);
                sh.starved.store(true, Ordering::SeqCst);
            }
        }
        sh.active.fetch_add(1, Ordering::Relaxed);
        sh.rec
            .start_lag(Instant::now().saturating_duration_since(due), late);
        // Latency from the due time, not from when the request could start: no coordinated
        // omission.
        one_request(&sh, &mut conn, &mut rng, &mut buf, due).await;
        sh.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The threads that run the users: one current-thread runtime each, users dealt round-robin.
/// A user's request, its connection and its recording then never leave one thread (no work
/// stealing, no cross-thread wakeups), as in wrk's design; the caller's runtime only runs the
/// schedule and the collector.
pub(super) struct Lanes {
    pub(super) handles: Vec<tokio::runtime::Handle>,
    pub(super) stops: Vec<tokio::sync::oneshot::Sender<()>>,
    pub(super) threads: Vec<std::thread::JoinHandle<()>>,
    pub(super) tasks: Vec<tokio::task::JoinHandle<()>>,
    pub(super) next: usize,
}

impl Lanes {
    pub(super) fn new(n: usize) -> Result<Lanes, LoadError> {
        let mut lanes = Lanes {
            handles: Vec::new(),
            stops: Vec::new(),
            threads: Vec::new(),
            tasks: Vec::new(),
            next: 0,
        };
        for i in 0..n {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|source| LoadError::Thread { index: i, source })?;
            let (tx, rx) = tokio::sync::oneshot::channel::<()>();
            lanes.handles.push(rt.handle().clone());
            let th = std::thread::Builder::new()
                .name(format!("awl-load-{i}"))
                .spawn(move || {
                    rt.block_on(async {
                        let _ = rx.await;
                    });
                })
                .map_err(|source| LoadError::Thread { index: i, source })?;
            lanes.stops.push(tx);
            lanes.threads.push(th);
        }
        Ok(lanes)
    }

    pub(super) fn spawn(&mut self, f: impl std::future::Future<Output = ()> + Send + 'static) {
        let h = &self.handles[self.next % self.handles.len()];
        self.next += 1;
        self.tasks.push(h.spawn(f));
    }

    /// Cuts every user off, waits until each has dropped its connection, stops the threads.
    pub(super) async fn shutdown(mut self) {
        for t in &self.tasks {
            t.abort();
        }
        let mut panic = None;
        for t in self.tasks.drain(..) {
            if let Err(e) = t.await {
                if e.is_panic() && panic.is_none() {
                    panic = Some(e.into_panic());
                }
            }
        }
        for s in self.stops.drain(..) {
            let _ = s.send(());
        }
        let threads = std::mem::take(&mut self.threads);
        let _ = tokio::task::spawn_blocking(move || {
            for t in threads {
                let _ = t.join();
            }
        })
        .await;
        // A user task that panicked is a bug: surface it rather than report a short count.
        if let Some(p) = panic {
            std::panic::resume_unwind(p);
        }
    }
}

impl Drop for Lanes {
    /// Reached only when `run` is dropped mid-way (its caller gave up): stop everything.
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        for s in self.stops.drain(..) {
            let _ = s.send(());
        }
    }
}
