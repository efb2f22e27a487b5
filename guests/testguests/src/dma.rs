//! dma: drives QEMU's `edu` PCI device (docs/specs/edu.rst in QEMU)
//! assigned to this guest. Its BAR is mapped in the guest's stage 2 and its
//! DMA goes through the SMMU, translated by the same stage-2 table. Each
//! transfer copies a 4 KiB pattern from guest RAM into the device's buffer
//! and back to another place in guest RAM, and verifies it.
//!
//! Bootargs: `dev0=<BAR GPA>` (the hypervisor appends it), `transfers=<n>`
//! (default 20), `updates=<n>`: transfer until the hypervisor was updated
//! n times, then two more (at most `transfers=`), `dma_addr=<GPA>`:
//! instead, DMA into that address (outside this guest's RAM) — the SMMU
//! must block it; with `updates=` too, one such DMA after another, one
//! always in flight, until the hypervisor was updated n times (then two
//! more), so that some complete while an update is in its blackout.
//!
//! Lines: `dma device=edu id=0x..` then `dma transfers=<n> ok=<n> bad=<n>`
//! every 5 transfers and `dma done=1 ...` at the end (with `updates=`:
//! `updates_seen=<n> stalled=<0|1>` too); with `dma_addr=`:
//! `dma probe=1 addr=0x.. completed=<n> probes=<n>` (and with `updates=`,
//! `updates_seen=<n> stalled=<0|1>`).

use crate::updater::hv_info;
use crate::{Env, Guest, Line};

/// edu registers (byte offsets in BAR0).
const EDU_ID: u64 = 0x00;
const EDU_DMA_SRC: u64 = 0x80;
const EDU_DMA_DST: u64 = 0x88;
const EDU_DMA_COUNT: u64 = 0x90;
const EDU_DMA_CMD: u64 = 0x98;
/// DMA command bits: start, direction (1 = device to RAM).
const CMD_START: u64 = 1 << 0;
const CMD_TO_RAM: u64 = 1 << 1;
/// The device's internal buffer, in its own DMA address space.
const EDU_BUFFER: u64 = 0x4_0000;
const CHUNK: usize = 4096;
/// edu identification register: 0x010000ed (major 1, minor 0).
const EDU_ID_MASK: u64 = 0xff;
const EDU_ID_VALUE: u64 = 0xed;
const DEFAULT_TRANSFERS: u64 = 20;
/// How long one DMA may take (edu completes after ~100 ms of virtual time).
const DMA_TIMEOUT_MS: u64 = 2000;
/// With `updates=`: guest seconds without a live update that end the run.
const STALL_SECONDS: u64 = 60;

#[repr(C, align(4096))]
struct Page([u8; CHUNK]);

static mut SRC: Page = Page([0; CHUNK]);
static mut DST: Page = Page([0; CHUNK]);

fn read(bar: u64, reg: u64) -> u64 {
    // SAFETY: `bar` is the edu BAR the hypervisor mapped into this guest
    // (`dev0=`); its registers are 64-bit MMIO.
    unsafe { core::ptr::read_volatile((bar + reg) as *const u64) }
}

/// Registers below 0x80 only take 32-bit accesses (edu.rst).
fn read32(bar: u64, reg: u64) -> u64 {
    // SAFETY: as in `read`.
    u64::from(unsafe { core::ptr::read_volatile((bar + reg) as *const u32) })
}

fn write(bar: u64, reg: u64, value: u64) {
    // SAFETY: as in `read`.
    unsafe { core::ptr::write_volatile((bar + reg) as *mut u64, value) }
}

/// Bytes of each blocked DMA (`dma_addr=`): one. QEMU's SMMU reports a
/// blocked DMA once per byte (the translation it answers a fault with
/// covers one byte), so a 4 KiB one would overflow the event queue.
const PROBE_BYTES: u64 = 1;

/// Runs one DMA of `bytes` and waits for it; false on timeout.
fn dma<G: Guest>(g: &G, bar: u64, (src, dst, bytes): (u64, u64, u64), to_ram: bool) -> bool {
    write(bar, EDU_DMA_SRC, src);
    write(bar, EDU_DMA_DST, dst);
    write(bar, EDU_DMA_COUNT, bytes);
    write(bar, EDU_DMA_CMD, CMD_START | if to_ram { CMD_TO_RAM } else { 0 });
    let deadline = g.counter().saturating_add(g.counter_frequency() / 1000 * DMA_TIMEOUT_MS);
    while read(bar, EDU_DMA_CMD) & CMD_START != 0 {
        if g.counter() > deadline {
            return false;
        }
        core::hint::spin_loop();
    }
    true
}

/// The pattern of transfer `k`, byte `i`.
pub fn pattern(k: u64, i: usize) -> u8 {
    (k as u8).wrapping_mul(31) ^ (i as u8).wrapping_add((i >> 8) as u8)
}

/// The dma workload.
pub fn run<G: Guest>(g: &mut G, env: &Env) {
    let args = env.args();
    let Some(bar) = args.dev0 else {
        g.write_line(Line::event("dma").field("error", "no-device"));
        return;
    };
    let id = read32(bar, EDU_ID);
    g.write_line(Line::event("dma").field("device", "edu").hex("id", id));
    if id & EDU_ID_MASK != EDU_ID_VALUE {
        g.write_line(Line::event("dma").field("error", "not-edu"));
        return;
    }
    let src = core::ptr::addr_of_mut!(SRC);
    let dst = core::ptr::addr_of_mut!(DST);
    let (src_gpa, dst_gpa) = (g.gpa_of(src.cast::<u8>()), g.gpa_of(dst.cast::<u8>()));
    let mut watch = args.updates.map(|wanted| UpdateWatch::new(g, wanted));
    if let Some(addr) = args.dma_addr {
        // Device to RAM, at an address outside this guest: the SMMU must
        // stop it (the device still completes, the write goes nowhere).
        let (mut probes, mut completed) = (0u64, 0u64);
        loop {
            probes += 1;
            completed += u64::from(dma(g, bar, (EDU_BUFFER, addr, PROBE_BYTES), true));
            if watch.as_mut().is_none_or(|w| w.done(g)) {
                break;
            }
        }
        let mut line = Line::event("dma");
        line.field("probe", 1).hex("addr", addr).field("completed", completed).field("probes", probes);
        if let Some(w) = &watch {
            line.field("updates_seen", w.seen()).flag("stalled", w.stalled);
        }
        g.write_line(&line);
        return;
    }
    let transfers = args.transfers.unwrap_or(DEFAULT_TRANSFERS);
    // With `updates=n`: transfer until the hypervisor has been live-updated
    // n times since this guest started, then two more (the DMA spans every
    // update); `transfers=` still caps the run.
    let (mut ok, mut bad) = (0u64, 0u64);
    let mut k = 0;
    while k < transfers {
        if transfer(g, bar, k, (src, src_gpa), (dst, dst_gpa)) {
            ok += 1;
        } else {
            bad += 1;
        }
        k += 1;
        if k % 5 == 0 {
            g.write_line(Line::event("dma").field("transfers", k).field("ok", ok).field("bad", bad));
        }
        if watch.as_mut().is_some_and(|w| w.done(g)) {
            break;
        }
    }
    let mut line = Line::event("dma");
    line.flag("done", true).field("transfers", k).field("ok", ok).field("bad", bad);
    if let Some(w) = &watch {
        line.field("updates_seen", w.seen()).flag("stalled", w.stalled);
    }
    g.write_line(&line);
}

/// `updates=n`: counts the hypervisor's live updates (GET_HV_INFO) after
/// each DMA; done two DMAs after the n-th, or after [`STALL_SECONDS`] of
/// guest time without an update (`stalled`).
struct UpdateWatch {
    wanted: u64,
    first: u64,
    last: u64,
    last_change: u64,
    after_last: u64,
    stalled: bool,
}

impl UpdateWatch {
    fn new<G: Guest>(g: &mut G, wanted: u64) -> Self {
        let first = hv_info(g).map_or(0, |i| i.update_count);
        Self { wanted, first, last: first, last_change: g.counter(), after_last: 0, stalled: false }
    }

    /// Updates seen since the start.
    fn seen(&self) -> u64 {
        self.last.saturating_sub(self.first)
    }

    /// Called after each DMA: whether to stop.
    fn done<G: Guest>(&mut self, g: &mut G) -> bool {
        let count = hv_info(g).map_or(self.last, |i| i.update_count);
        if count != self.last {
            (self.last, self.last_change) = (count, g.counter());
        } else if g.counter().saturating_sub(self.last_change) > g.counter_frequency().saturating_mul(STALL_SECONDS) {
            self.stalled = true;
            return true;
        }
        if self.seen() >= self.wanted {
            self.after_last += 1;
        }
        self.after_last > 2
    }
}

/// Transfer `k`: the pattern from `src` to the device and back into
/// `dst`, checked; whether every byte came back.
fn transfer<G: Guest>(g: &G, bar: u64, k: u64, src: (*mut Page, u64), dst: (*mut Page, u64)) -> bool {
    let (src, src_gpa) = src;
    let (dst, dst_gpa) = dst;
    for i in 0..CHUNK {
        // SAFETY: this workload is the only user of SRC/DST, and the
        // device only touches them during the DMAs below.
        unsafe {
            core::ptr::write_volatile(src.cast::<u8>().add(i), pattern(k, i));
            core::ptr::write_volatile(dst.cast::<u8>().add(i), 0);
        }
    }
    let chunk = CHUNK as u64;
    let moved = dma(g, bar, (src_gpa, EDU_BUFFER, chunk), false) && dma(g, bar, (EDU_BUFFER, dst_gpa, chunk), true);
    // SAFETY: as above; the DMA has completed.
    moved && (0..CHUNK).all(|i| unsafe { core::ptr::read_volatile(dst.cast::<u8>().add(i)) } == pattern(k, i))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_differ_between_transfers_and_bytes() {
        assert_ne!(pattern(0, 1), pattern(1, 1));
        assert_ne!(pattern(3, 0), pattern(3, 1));
        assert_ne!(pattern(0, 0), pattern(0, 256));
    }
}
