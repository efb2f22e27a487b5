//! memcheck: writes a pattern over all free RAM, then verifies it, once
//! per pass. The pattern depends on the address (catches aliasing and
//! misrouted writes) and on the pass (catches stale data), and is written
//! in 64-bit words with volatile accesses so the compiler cannot elide the
//! round trip through memory.
//!
//! Lines: `memcheck ok=<0|1> pages=<n> pass=<k>` (plus `bad_addr=0x..` on a
//! mismatch) per pass, then `memcheck done=1 passes=<n> failed=<n>`.

use core::marker::PhantomData;

use crate::boot::PAGE_SIZE;
use crate::{Env, Guest, Line};

pub const DEFAULT_PASSES: u64 = 3;

/// The word expected at `addr` in `pass`: a 64-bit mix (the SplitMix64
/// finalizer) of both, so neighbouring words and passes all differ.
pub const fn pattern(addr: u64, pass: u64) -> u64 {
    let mut x = addr ^ pass.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The first word that did not read back as written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mismatch {
    pub addr: u64,
    pub expected: u64,
    pub found: u64,
}

/// A run of 64-bit words tested in place. Addresses fed to [`pattern`] are
/// the words' own addresses (guest-physical in a guest, as the guest runs
/// identity-mapped).
#[derive(Debug)]
pub struct WordSpan<'a> {
    base: *mut u64,
    words: usize,
    _memory: PhantomData<&'a mut [u64]>,
}

impl<'a> WordSpan<'a> {
    pub fn new(words: &'a mut [u64]) -> Self {
        Self { base: words.as_mut_ptr(), words: words.len(), _memory: PhantomData }
    }

    /// # Safety
    ///
    /// `base` must be 8-byte aligned and `words` words from it must be
    /// readable and writable and used by nothing else while the span lives.
    pub unsafe fn from_raw(base: *mut u64, words: usize) -> Self {
        Self { base, words, _memory: PhantomData }
    }

    pub fn fill(&mut self, pass: u64) {
        for i in 0..self.words {
            // SAFETY: i < words, inside the span (constructor contract).
            let word = unsafe { self.base.add(i) };
            // SAFETY: `word` is aligned and writable (constructor contract).
            unsafe { word.write_volatile(pattern(word as u64, pass)) };
        }
    }

    pub fn verify(&self, pass: u64) -> Option<Mismatch> {
        (0..self.words).find_map(|i| {
            // SAFETY: i < words, inside the span (constructor contract).
            let word = unsafe { self.base.add(i) };
            // SAFETY: `word` is aligned and readable (constructor contract).
            let found = unsafe { word.read_volatile() };
            let expected = pattern(word as u64, pass);
            (found != expected).then_some(Mismatch { addr: word as u64, expected, found })
        })
    }
}

/// The memcheck workload (`passes=`, default 3).
pub fn run<G: Guest>(g: &mut G, env: &Env) {
    let Some(free) = env.free_ram() else {
        g.write_line(Line::event("memcheck").field("error", "no-free-ram"));
        return;
    };
    let pages = free.bytes() / PAGE_SIZE;
    let passes = env.args().passes.unwrap_or(DEFAULT_PASSES);
    let mut failed = 0_u64;
    for pass in 1..=passes {
        let mut first_bad = None;
        for region in free.as_slice() {
            let words = (region.len() / 8) as usize;
            // SAFETY: Env::with_free_ram guarantees free RAM is identity-mapped
            // and ours alone; regions are whole pages, so aligned.
            let mut span = unsafe { WordSpan::from_raw(region.start as *mut u64, words) };
            span.fill(pass);
        }
        for region in free.as_slice() {
            let words = (region.len() / 8) as usize;
            // SAFETY: as above.
            let span = unsafe { WordSpan::from_raw(region.start as *mut u64, words) };
            if let Some(bad) = span.verify(pass) {
                first_bad = Some(bad);
                break;
            }
        }
        let mut line = Line::event("memcheck");
        line.flag("ok", first_bad.is_none()).field("pages", pages).field("pass", pass);
        if let Some(bad) = first_bad {
            failed += 1;
            line.hex("bad_addr", bad.addr).hex("expected", bad.expected).hex("found", bad.found);
        }
        g.write_line(&line);
    }
    g.write_line(Line::event("memcheck").flag("done", true).field("passes", passes).field("failed", failed));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::args::Args;
    use crate::fake::FakeGuest;
    use crate::Region;
    use std::vec;

    #[test]
    fn pattern_differs_between_passes_and_neighbours() {
        for addr in (0x4000_0000_u64..0x4000_0000 + 64 * 8).step_by(8) {
            assert_ne!(pattern(addr, 1), pattern(addr, 2));
            assert_ne!(pattern(addr, 1), pattern(addr + 8, 1));
            assert_ne!(pattern(addr, 1), 0);
        }
    }

    #[test]
    fn verify_finds_the_first_bad_word() {
        let mut words = vec![0_u64; 512];
        let mut span = WordSpan::new(&mut words);
        span.fill(7);
        assert_eq!(span.verify(7), None);
        let second_pass = span.verify(8).unwrap();
        assert_eq!(second_pass.addr, words.as_ptr() as u64);

        words[300] ^= 1 << 17;
        words[400] = 0;
        let bad_addr = core::ptr::from_ref(&words[300]) as u64;
        let span = WordSpan::new(&mut words);
        let bad = span.verify(7).unwrap();
        assert_eq!(bad.addr, bad_addr);
        assert_eq!(bad.found ^ bad.expected, 1 << 17);
    }

    /// A page-aligned window of a host buffer standing in for guest RAM.
    fn ram(words: &mut [u64], pages: u64) -> Region {
        let start = (words.as_mut_ptr() as u64 + PAGE_SIZE - 1) & !(PAGE_SIZE - 1);
        Region::new(start, start + pages * PAGE_SIZE)
    }

    #[test]
    fn run_tests_all_free_pages_each_pass() {
        let mut buf = vec![0_u64; 9 * 512];
        let ram = ram(&mut buf, 8);
        let image = Region::new(ram.start, ram.start + 0x1800);
        let dtb = Region::new(ram.end - 0x200, ram.end);
        let args = Args { passes: Some(2), ..Args::default() };
        // SAFETY: `ram` lies inside `buf`, which nothing else uses while
        // the workload runs.
        let env = unsafe { Env::with_free_ram(ram, [image, dtb], args) };
        let mut g = FakeGuest::new();
        run(&mut g, &env);
        assert_eq!(
            g.lines,
            ["memcheck ok=1 pages=5 pass=1", "memcheck ok=1 pages=5 pass=2", "memcheck done=1 passes=2 failed=0"]
        );
        let first_free = ((ram.start + 2 * PAGE_SIZE - buf.as_ptr() as u64) / 8) as usize;
        assert_eq!(buf[first_free], pattern(ram.start + 2 * PAGE_SIZE, 2));
        assert_eq!(buf[first_free - 1], 0, "the image pages are left alone");
    }

    #[test]
    fn run_refuses_ram_it_does_not_own() {
        let env = Env::new(Region::new(0x4000_0000, 0x4100_0000), [Region::default(); 2], Args::default());
        let mut g = FakeGuest::new();
        run(&mut g, &env);
        assert_eq!(g.lines, ["memcheck error=no-free-ram"]);
    }
}
