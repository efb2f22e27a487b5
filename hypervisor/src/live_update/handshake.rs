//! The freeze handshake between physical CPUs (`shared/DESIGN.md` §5,
//! step 3): the CPU that runs an update asks the others to stop at an
//! exit boundary, waits until each has said so, and then either thaws them
//! (cancel) or sends them off for the kexec.
//!
//! Every request carries a generation, and each CPU acknowledges in its
//! own word with the generation it is frozen for. A CPU that was frozen
//! for an earlier, cancelled request and has not yet left its freeze loop
//! re-acknowledges the new generation without ever returning to a guest;
//! one that has left must reach an exit boundary again. An acknowledgement
//! left over from an earlier request therefore never counts: the requester
//! waits for exactly this generation, so it never proceeds while a CPU may
//! still run guest code. A CPU that misses the deadline cancels the update.
//!
//! # Ownership
//! One [`Handshake`] exists in the image (`live_update::HANDSHAKE`). The
//! request word is written only by the CPU that holds the update
//! ([`Handshake::begin`]); each acknowledgement word only by its own CPU.

use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::machine::MAX_CPUS;

const PHASE_MASK: u64 = 0b11;
const PHASE_NONE: u64 = 0;
const PHASE_FREEZE: u64 = 1;
const PHASE_KEXEC: u64 = 2;
/// Acknowledgement of a CPU that has nothing left to run, for good.
const ACK_PARKED: u64 = u64::MAX;
/// Acknowledgement of a CPU running guests.
const ACK_RUNNING: u64 = 0;

/// A freeze request in flight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Generation(u64);

/// A CPU did not reach the freeze before the deadline.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FreezeTimeout {
    pub cpu: usize,
}

/// What a frozen CPU does when its freeze ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Thawed {
    /// The update was cancelled: back to the guests.
    Resume,
    /// The update goes ahead: leave for the kexec, and say so with
    /// [`Handshake::left`] once nothing of this CPU's state matters.
    Kexec(Generation),
}

/// The freeze handshake's shared state.
#[derive(Debug)]
pub struct Handshake {
    /// Generation << 2 | phase.
    request: AtomicU64,
    /// Per CPU: [`ACK_RUNNING`], the request word it is frozen for (or
    /// left for the kexec on), or [`ACK_PARKED`].
    ack: [AtomicU64; MAX_CPUS],
    in_progress: AtomicBool,
}

impl Default for Handshake {
    fn default() -> Self {
        Self::new()
    }
}

impl Handshake {
    pub const fn new() -> Self {
        Self {
            request: AtomicU64::new(PHASE_NONE),
            ack: [const { AtomicU64::new(ACK_RUNNING) }; MAX_CPUS],
            in_progress: AtomicBool::new(false),
        }
    }

    /// Claims the update: false if one is already running.
    pub fn begin(&self) -> bool {
        !self.in_progress.swap(true, Ordering::AcqRel)
    }

    /// Whether an update has been claimed and not ended: for the guests
    /// that run meanwhile, it is being staged (`GET_UPDATE_PHASE`).
    pub fn in_progress(&self) -> bool {
        self.in_progress.load(Ordering::Acquire)
    }

    /// Ends a refused or cancelled update.
    pub fn end(&self) {
        self.in_progress.store(false, Ordering::Release);
    }

    /// Whether the CPUs have been asked to stop at an exit boundary.
    pub fn freeze_requested(&self) -> bool {
        self.request.load(Ordering::Acquire) & PHASE_MASK == PHASE_FREEZE
    }

    /// Asks every CPU to freeze; returns the request's generation.
    pub fn request_freeze(&self) -> Generation {
        let generation = (self.request.load(Ordering::Acquire) >> 2) + 1;
        let word = (generation << 2) | PHASE_FREEZE;
        self.request.store(word, Ordering::Release);
        Generation(word)
    }

    /// Waits until every CPU in `cpus` but `me` has acknowledged `gen` (or
    /// is parked for good). `expired` says when the deadline has passed,
    /// `relax` is one turn of the wait.
    pub fn wait_frozen(
        &self,
        generation: Generation,
        me: usize,
        cpus: &[usize],
        expired: impl Fn() -> bool,
        relax: impl Fn(),
    ) -> Result<(), FreezeTimeout> {
        for &cpu in cpus.iter().filter(|&&c| c != me && c < MAX_CPUS) {
            loop {
                let ack = self.ack[cpu].load(Ordering::Acquire);
                if ack == generation.0 || ack == ACK_PARKED {
                    break;
                }
                if expired() {
                    return Err(FreezeTimeout { cpu });
                }
                relax();
            }
        }
        Ok(())
    }

    /// Thaws the frozen CPUs: the update is cancelled.
    pub fn thaw(&self, generation: Generation) {
        self.request.store(generation.0 & !PHASE_MASK, Ordering::Release);
    }

    /// Sends the frozen CPUs off for the kexec.
    pub fn release_for_kexec(&self, generation: Generation) {
        self.request.store((generation.0 & !PHASE_MASK) | PHASE_KEXEC, Ordering::Release);
    }

    /// Waits until every CPU in `cpus` but `me` has left for the kexec of
    /// `generation` (or is parked for good).
    pub fn wait_left(
        &self,
        generation: Generation,
        me: usize,
        cpus: &[usize],
        expired: impl Fn() -> bool,
        relax: impl Fn(),
    ) -> Result<(), FreezeTimeout> {
        let left = (generation.0 & !PHASE_MASK) | PHASE_KEXEC;
        for &cpu in cpus.iter().filter(|&&c| c != me && c < MAX_CPUS) {
            loop {
                let ack = self.ack[cpu].load(Ordering::Acquire);
                if ack == left || ack == ACK_PARKED {
                    break;
                }
                if expired() {
                    return Err(FreezeTimeout { cpu });
                }
                relax();
            }
        }
        Ok(())
    }

    /// CPU `me`, at an exit boundary with its vCPU put away: acknowledges
    /// the freeze and waits (`wait`) until it is thawed or released for
    /// the kexec. Never returns to a guest while a freeze is requested.
    pub fn freeze_here(&self, me: usize, wait: impl Fn()) -> Thawed {
        loop {
            let word = self.request.load(Ordering::Acquire);
            match word & PHASE_MASK {
                PHASE_FREEZE => {
                    if self.ack[me].load(Ordering::Relaxed) != word {
                        self.ack[me].store(word, Ordering::Release);
                    }
                    wait();
                }
                PHASE_KEXEC => return Thawed::Kexec(Generation((word & !PHASE_MASK) | PHASE_FREEZE)),
                _ => {
                    self.ack[me].store(ACK_RUNNING, Ordering::Release);
                    return Thawed::Resume;
                }
            }
        }
    }

    /// CPU `me` has left for the kexec of `generation`: it runs nothing of
    /// this image's any more but the last steps to switch itself off.
    pub fn left(&self, me: usize, generation: Generation) {
        if let Some(ack) = self.ack.get(me) {
            ack.store((generation.0 & !PHASE_MASK) | PHASE_KEXEC, Ordering::Release);
        }
    }

    /// Whether CPU `cpu` has nothing left to run, for good ([`Self::park`]).
    pub fn parked_for_good(&self, cpu: usize) -> bool {
        self.ack.get(cpu).is_some_and(|a| a.load(Ordering::Acquire) == ACK_PARKED)
    }

    /// CPU `me` has nothing left to run, for good: freezes no longer wait
    /// for it.
    pub fn park(&self, me: usize) {
        if let Some(ack) = self.ack.get(me) {
            ack.store(ACK_PARKED, Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::thread;
    use std::time::{Duration, Instant};

    fn deadline(ms: u64) -> impl Fn() -> bool {
        let t0 = Instant::now();
        move || t0.elapsed() > Duration::from_millis(ms)
    }

    #[test]
    fn a_cpu_that_never_reaches_the_freeze_times_it_out() {
        let h = Handshake::new();
        let generation = h.request_freeze();
        assert_eq!(
            h.wait_frozen(generation, 0, &[0, 1], deadline(20), thread::yield_now),
            Err(FreezeTimeout { cpu: 1 })
        );
    }

    #[test]
    fn freeze_then_thaw_then_kexec_across_threads() {
        let h = Handshake::new();
        let resumed = AtomicUsize::new(0);
        thread::scope(|s| {
            let cpu1 = s.spawn(|| {
                // CPU 1's scheduler: freeze whenever asked, until sent off.
                loop {
                    if h.freeze_requested() {
                        match h.freeze_here(1, thread::yield_now) {
                            Thawed::Resume => {
                                resumed.fetch_add(1, Ordering::SeqCst);
                            }
                            Thawed::Kexec(g) => {
                                h.left(1, g);
                                return;
                            }
                        }
                    }
                    thread::yield_now();
                }
            });
            let g1 = h.request_freeze();
            assert_eq!(h.wait_frozen(g1, 0, &[0, 1], deadline(10_000), thread::yield_now), Ok(()));
            h.thaw(g1);
            let g2 = h.request_freeze();
            assert_ne!(g1, g2);
            assert_eq!(h.wait_frozen(g2, 0, &[0, 1], deadline(10_000), thread::yield_now), Ok(()));
            h.release_for_kexec(g2);
            assert_eq!(h.wait_left(g2, 0, &[0, 1], deadline(10_000), thread::yield_now), Ok(()));
            cpu1.join().expect("cpu1");
        });
        assert!(resumed.load(Ordering::SeqCst) <= 1);
    }

    /// The bug the generations fix: CPU 1 was frozen for a request that
    /// was cancelled, has seen the thaw and is on its way back to its guest
    /// but has not yet withdrawn its acknowledgement, when the next request
    /// comes. With one shared "frozen" counter or flag that stale
    /// acknowledgement counted and the update went ahead while CPU 1
    /// entered its guest.
    #[test]
    fn a_stale_acknowledgement_never_counts_for_the_next_request() {
        let h = Handshake::new();
        let g1 = h.request_freeze();
        h.ack[1].store(g1.0, Ordering::Release);
        assert_eq!(h.wait_frozen(g1, 0, &[0, 1], deadline(1000), thread::yield_now), Ok(()));
        h.thaw(g1);
        let g2 = h.request_freeze();
        assert_eq!(h.wait_frozen(g2, 0, &[0, 1], deadline(20), thread::yield_now), Err(FreezeTimeout { cpu: 1 }));
        // Had CPU 1 still been in its freeze loop, it re-acknowledges the
        // new request without leaving.
        let thawed = h.freeze_here(1, || {
            if h.ack[1].load(Ordering::Acquire) == g2.0 {
                h.release_for_kexec(g2);
            }
        });
        assert!(matches!(thawed, Thawed::Kexec(g) if g == g2));
    }

    #[test]
    fn parked_cpus_are_not_waited_for() {
        let h = Handshake::new();
        assert!(!h.parked_for_good(1));
        h.park(1);
        assert!(h.parked_for_good(1) && !h.parked_for_good(0) && !h.parked_for_good(MAX_CPUS));
        let generation = h.request_freeze();
        assert_eq!(h.wait_frozen(generation, 0, &[0, 1], deadline(1000), thread::yield_now), Ok(()));
        h.release_for_kexec(generation);
        assert_eq!(h.wait_left(generation, 0, &[0, 1], deadline(1000), thread::yield_now), Ok(()));
    }

    #[test]
    fn one_update_at_a_time() {
        let h = Handshake::new();
        assert!(h.begin());
        assert!(!h.begin());
        h.end();
        assert!(h.begin());
    }
}
