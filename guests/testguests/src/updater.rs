//! updater: the privileged guest that drives live updates. It carries a
//! bundle of hypervisor images right after its own image (the launcher
//! appends it) and hands them to `LIVE_UPDATE` in turn, so successive
//! updates alternate A -> B -> A ...
//!
//! Bootargs: `updates=<n>` (default 10), `delay_ms=<ms>` before each
//! update (default 250), `expect_status=<s>` (default 0; 5 for an image
//! that must be refused), `fail_freeze=1` (arm the freeze-failure test
//! hook first: that update must come back cancelled, status 8),
//! `rollbacks=1` (the bundle's 1st, 3rd, ... images are broken builds: an
//! update to one must come back rolled back, status 8 with the version
//! and update count unchanged).
//!
//! Lines: `updater bundle=<images> updates=<n>`, per update
//! `updater update=<k> status=<s> expected=<e> ok=<0|1> from=<version>
//! to=<version> update_count=<n> rolled_back=<0|1>`, then `updater done=1 ok=<0|1>
//! updates=<n> failed=<n>`.

use hvcall::{call, HvInfo, Status, UpdateRequest, HV_INFO_SIZE, UPDATE_REQUEST_SIZE};

use crate::hypercall::Request;
use crate::{Env, Guest, Line};

/// Magic of the bundle (`tests/src/guests.rs`, `updater_guest`).
pub const BUNDLE_MAGIC: &[u8; 8] = b"HVUPDBND";
const HEADER_LEN: u64 = 4096;
const MAX_IMAGES: usize = 16;
const DEFAULT_UPDATES: u64 = 10;
const DEFAULT_DELAY_MS: u64 = 250;

/// The images in the bundle: (GPA, size) pairs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bundle {
    images: [(u64, u64); MAX_IMAGES],
    count: usize,
}

impl Bundle {
    /// Parses the header at `base` (its bytes in `header`), checking every
    /// image lies below `ram_end`.
    pub fn parse(base: u64, header: &[u8], ram_end: u64) -> Option<Self> {
        if header.get(..8)? != BUNDLE_MAGIC {
            return None;
        }
        let word = |at: usize| -> Option<u64> {
            let b = header.get(at..at + 8)?;
            let mut w = [0u8; 8];
            w.copy_from_slice(b);
            Some(u64::from_le_bytes(w))
        };
        let count = usize::try_from(word(8)? & 0xffff_ffff).ok()?;
        if count == 0 || count > MAX_IMAGES {
            return None;
        }
        let mut images = [(0, 0); MAX_IMAGES];
        for (i, slot) in images.iter_mut().enumerate().take(count) {
            let (offset, size) = (word(16 + 16 * i)?, word(24 + 16 * i)?);
            let gpa = base.checked_add(offset)?;
            if offset < HEADER_LEN || size == 0 || gpa.checked_add(size)? > ram_end {
                return None;
            }
            *slot = (gpa, size);
        }
        Some(Self { images, count })
    }

    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The image for update `k` (0-based): they alternate.
    pub fn image(&self, k: u64) -> (u64, u64) {
        self.images[(k % self.count as u64) as usize]
    }
}

#[repr(C, align(8))]
struct Aligned<const N: usize>([u8; N]);

/// The hypervisor's identity and update count (`GET_HV_INFO`).
pub(crate) fn hv_info<G: Guest>(g: &mut G) -> Option<HvInfo> {
    let buf = Aligned([0u8; HV_INFO_SIZE]);
    let out = g.hypercall(Request::memory(call::GET_HV_INFO, 0, g.gpa_of(buf.0.as_ptr())));
    (out.status() == Some(Status::Success)).then(|| HvInfo::from_bytes(&buf.0))
}

/// Busy-waits `ms` milliseconds of guest time.
pub(crate) fn wait_ms<G: Guest>(g: &mut G, ms: u64) {
    let deadline = g.counter().saturating_add(g.counter_frequency() / 1000 * ms);
    while g.counter() < deadline {
        core::hint::spin_loop();
    }
}

/// What an update must come back with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    /// This status (0: the update went through).
    Status(u64),
    /// Rolled back: OPERATION_DENIED, and the same version and update
    /// count as before.
    RolledBack,
}

/// Requests one update of the image at `image` and reports it.
fn update<G: Guest>(g: &mut G, k: u64, image: (u64, u64), expect: Expect) -> bool {
    let expected = match expect {
        Expect::Status(s) => s,
        Expect::RolledBack => Status::OperationDenied as u64,
    };
    let before = hv_info(g);
    let mut req = Aligned([0u8; UPDATE_REQUEST_SIZE]);
    req.0 = UpdateRequest { image_gpa: image.0, image_size: image.1 }.to_bytes();
    let out = g.hypercall(Request::memory(call::LIVE_UPDATE, g.gpa_of(req.0.as_ptr()), 0));
    let after = hv_info(g);
    let status = u64::from(out.status_code());
    let unchanged =
        before.is_some() && before.map(|i| (i.version, i.update_count)) == after.map(|i| (i.version, i.update_count));
    let ok = status == expected && (expect != Expect::RolledBack || unchanged);
    let text = |i: &Option<HvInfo>| i.map(|i| i.version);
    let from = text(&before);
    let to = text(&after);
    g.write_line(
        Line::event("updater")
            .field("update", k + 1)
            .field("status", status)
            .field("expected", expected)
            .flag("ok", ok)
            .field("from", from.as_ref().map_or("?", HvInfo::text))
            .field("to", to.as_ref().map_or("?", HvInfo::text))
            .field("update_count", after.map_or(0, |i| i.update_count))
            .flag("rolled_back", expect == Expect::RolledBack),
    );
    ok
}

/// The updater workload.
pub fn run<G: Guest>(g: &mut G, env: &Env) {
    let args = env.args();
    let bundle_base = env.image().end.next_multiple_of(HEADER_LEN);
    let ram_end = env.ram().end;
    if bundle_base + HEADER_LEN > ram_end {
        g.write_line(Line::event("updater").field("error", "no-bundle"));
        return;
    }
    // SAFETY: the header page lies inside this guest's RAM (checked above),
    // is identity-mapped, and nothing else writes it.
    let header = unsafe { core::slice::from_raw_parts(bundle_base as *const u8, HEADER_LEN as usize) };
    let Some(bundle) = Bundle::parse(bundle_base, header, ram_end) else {
        g.write_line(Line::event("updater").field("error", "bad-bundle"));
        return;
    };
    let updates = args.updates.unwrap_or(DEFAULT_UPDATES);
    let delay = args.delay_ms.unwrap_or(DEFAULT_DELAY_MS);
    let expected = args.expect_status.unwrap_or(0);
    g.write_line(Line::event("updater").field("bundle", bundle.len()).field("updates", updates));
    let mut failed = 0;
    if args.fail_freeze {
        wait_ms(g, delay);
        let armed = g.hypercall(Request::fast(call::TEST_FAIL_NEXT_FREEZE, 0));
        let ok = armed.status() == Some(Status::Success)
            && update(g, 0, bundle.image(0), Expect::Status(Status::OperationDenied as u64));
        g.write_line(Line::event("updater").field("cancel_check", 1).flag("ok", ok));
        if !ok {
            failed += 1;
        }
    }
    for k in 0..updates {
        wait_ms(g, delay);
        // With `rollbacks=1` the bundle's 1st, 3rd, ... images are broken
        // builds: the update must be rolled back.
        let expect = if args.rollbacks && (k % bundle.len() as u64).is_multiple_of(2) {
            Expect::RolledBack
        } else {
            Expect::Status(expected)
        };
        if !update(g, k, bundle.image(k), expect) {
            failed += 1;
        }
    }
    g.write_line(
        Line::event("updater")
            .flag("done", true)
            .flag("ok", failed == 0)
            .field("updates", updates)
            .field("failed", failed),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(entries: &[(u64, u64)]) -> [u8; 4096] {
        let mut h = [0u8; 4096];
        h[..8].copy_from_slice(BUNDLE_MAGIC);
        h[8..12].copy_from_slice(&(entries.len() as u32).to_le_bytes());
        for (i, (o, s)) in entries.iter().enumerate() {
            h[16 + 16 * i..24 + 16 * i].copy_from_slice(&o.to_le_bytes());
            h[24 + 16 * i..32 + 16 * i].copy_from_slice(&s.to_le_bytes());
        }
        h
    }

    #[test]
    fn bundle_alternates_and_checks_bounds() {
        let base = 0x4010_0000;
        let b = Bundle::parse(base, &header(&[(4096, 100), (8192, 200)]), 0x4100_0000).unwrap();
        assert_eq!(b.len(), 2);
        assert_eq!(b.image(0), (base + 4096, 100));
        assert_eq!(b.image(1), (base + 8192, 200));
        assert_eq!(b.image(2), (base + 4096, 100));
        assert!(Bundle::parse(base, &header(&[(4096, 0x100_0000)]), 0x4100_0000).is_none());
        assert!(Bundle::parse(base, &header(&[(0, 100)]), 0x4100_0000).is_none());
        assert!(Bundle::parse(base, &header(&[]), 0x4100_0000).is_none());
        assert!(Bundle::parse(base, &[0u8; 4096], 0x4100_0000).is_none());
        assert!(Bundle::parse(base, &header(&[(u64::MAX, 1)]), 0x4100_0000).is_none());
    }
}
