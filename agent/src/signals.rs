//! The one way the agent takes the signals that stop it.
//!
//! - Async commands (`watch`, `load`, `daemon`) `install` a `Stop` on their tokio runtime and
//!   select on `Stop::recv` beside their work.
//! - Synchronous commands (`delay set`, `run`, `sut up`) call `block` first, before any thread
//!   starts, so every thread inherits the mask and none dies of the signal; then they `wait`
//!   with a timeout in their own loop, or hand the signal to a thread (`on_stop`). Children get
//!   an empty mask back: the standard library resets it when it spawns a process.

use std::time::Duration;

use tokio::signal::unix::{signal, SignalKind};

/// A signal that asks the agent to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    Interrupt,
    Terminate,
    /// Only for the synchronous commands: a closed terminal must remove a delay, too.
    Hangup,
}

impl Signal {
    /// How a log line says it stopped.
    pub(crate) fn verb(self) -> &'static str {
        match self {
            Signal::Interrupt => "interrupted",
            Signal::Terminate => "terminated",
            Signal::Hangup => "hung up",
        }
    }

    fn from_raw(sig: libc::c_int) -> Option<Signal> {
        match sig {
            libc::SIGINT => Some(Signal::Interrupt),
            libc::SIGTERM => Some(Signal::Terminate),
            libc::SIGHUP => Some(Signal::Hangup),
            _ => None,
        }
    }
}

/// SIGINT and SIGTERM on the current tokio runtime.
pub struct Stop {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
}

impl Stop {
    /// Installs the handlers; from then on neither signal kills the process.
    pub(crate) fn install() -> anyhow::Result<Stop> {
        use anyhow::Context as _;
        Ok(Stop {
            int: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
            term: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
        })
    }

    /// The next signal.
    pub(crate) async fn recv(&mut self) -> Signal {
        tokio::select! {
            _ = self.int.recv() => Signal::Interrupt,
            _ = self.term.recv() => Signal::Terminate,
        }
    }
}

/// SIGINT, SIGTERM and SIGHUP.
fn stop_set() -> libc::sigset_t {
    // SAFETY: sigset manipulation on a local, zero-initialised set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGHUP);
        set
    }
}

/// Blocks SIGINT, SIGTERM and SIGHUP in the calling thread and every thread it starts after.
pub fn block() {
    let set = stop_set();
    // SAFETY: pthread_sigmask on the calling thread with a valid set.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
}

/// Waits up to `timeout` (for ever with `None`) for a blocked stop signal.
pub fn wait(timeout: Option<Duration>) -> Option<Signal> {
    let set = stop_set();
    loop {
        // SAFETY: sigtimedwait/sigwaitinfo with a valid set and timeout; a null info is allowed.
        let sig = unsafe {
            match timeout {
                Some(d) => {
                    let ts = libc::timespec {
                        tv_sec: d.as_secs() as _,
                        tv_nsec: d.subsec_nanos() as _,
                    };
                    libc::sigtimedwait(&set, std::ptr::null_mut(), &ts)
                }
                None => libc::sigwaitinfo(&set, std::ptr::null_mut()),
            }
        };
        if sig > 0 {
            return Signal::from_raw(sig);
        }
        // EINTR (another signal's handler ran) waits again; a timeout returns.
        if std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return None;
        }
    }
}

/// After `block`: calls `f` on a thread of its own when a stop signal arrives.
pub(crate) fn on_stop(f: impl FnOnce(Signal) + Send + 'static) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("awl-signals".into())
        .spawn(move || {
            if let Some(sig) = wait(None) {
                f(sig);
            }
        })
        .map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A blocked signal sent to this thread is taken by `wait`, not delivered; without one,
    /// `wait` returns after its timeout. The mask is restored after.
    #[test]
    fn wait_takes_a_blocked_signal_and_times_out_without_one() {
        let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
        let set = stop_set();
        // SAFETY: pthread_sigmask/pthread_kill on this thread with valid arguments.
        unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut old) };
        assert_eq!(wait(Some(Duration::from_millis(20))), None);
        unsafe { libc::pthread_kill(libc::pthread_self(), libc::SIGHUP) };
        assert_eq!(wait(Some(Duration::from_secs(5))), Some(Signal::Hangup));
        unsafe { libc::pthread_kill(libc::pthread_self(), libc::SIGTERM) };
        assert_eq!(wait(None), Some(Signal::Terminate));
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut()) };
    }
}
