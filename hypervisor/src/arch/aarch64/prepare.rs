//! Preparing a new image in the brownout (`kho/ABI.md` §5.3): work that
//! does not depend on frozen state, done by the new image's own code while
//! the guests still run, so its entry after the freeze skips it.
//!
//! The running image places the new one in its slot (copied, bss
//! cleared), makes the slot executable in its own EL2 map, and calls the
//! new image's brownout entry (`hv_prepare_entry` in `entry.S`, at
//! [`PREPARE_ENTRY`], named by the image descriptor's entry field). The new
//! image's code then runs on the old image's stack, MMU and vectors: it
//! initialises its heap (in its own bss), turns on its CRC-32 instructions,
//! parses the DTB and builds its EL2 identity map, and keeps the result in
//! [`PREPARED`]. The old image makes the slot non-executable again and
//! cleans and invalidates it to the point of coherency, so the new image,
//! entered with the MMU off, reads what it wrote. At entry it takes the
//! prepared state if it was made for the DTB it is given, and only turns
//! its map on.
//!
//! Nothing here touches a device or a register that outlives the call:
//! the console, the GIC, the timers and PSCI are taken at entry, as
//! before. A panic while preparing returns to the caller with
//! [`Status::Panicked`] (`prepare_abort`). Whatever failed, the old image
//! then places the image afresh (its bss cleared again, so no lock a panic
//! left held survives) and the update goes on with an unprepared image,
//! whose entry does everything itself.

use core::sync::atomic::{AtomicU64, Ordering};

use hypervisor::live_update::rollback;
use loader::dtb::DtbPlatform;
use loader::{BootInfo, PhysRange};

use super::mmu::HostMap;

/// Where the brownout entry is (`linker.ld` puts `.text.prepare` 0x800 into
/// the image): in the slot the image is linked for (`HV_SLOT`). The image
/// descriptor's entry field names it.
pub const PREPARE_ENTRY: u32 = {
    let slot = match option_env!("HV_SLOT") {
        Some(s) if !s.is_empty() && s.as_bytes()[0] == b'1' => 1,
        _ => 0,
    };
    (hypervisor::slots::AARCH64.bases[slot] + 0x800) as u32
};

/// What the brownout entry returns in x0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u64)]
pub enum Status {
    Prepared = 0,
    BadDtb = 1,
    HostMap = 2,
    /// The preparation panicked; nothing of it is kept.
    Panicked = 3,
}

impl Status {
    /// The `prepared=` token of `hv: update-begin`.
    pub fn token(code: u64) -> &'static str {
        match code {
            0 => "yes",
            1 => "bad-dtb",
            2 => "host-map",
            3 => "panicked",
            _ => "unknown-status",
        }
    }
}

/// The preparation's result, for the entry.
pub struct Prepared {
    /// The DTB it was made from: the entry uses it only for the same one.
    pub dtb_phys: u64,
    pub info: BootInfo,
    pub platform: DtbPlatform,
    pub map: HostMap,
    pub crc32_instructions: bool,
}

static PREPARED: spin::Mutex<Option<Prepared>> = spin::Mutex::new(None);

/// The caller's stack while `hv_prepare` runs, for `prepare_abort`; 0
/// otherwise.
#[export_name = "hv_prepare_sp"]
static PREPARE_SP: AtomicU64 = AtomicU64::new(0);

extern "C" {
    /// `entry.S`: unwinds to the brownout entry's caller with x0 = `status`.
    fn prepare_abort(status: u64) -> !;
}

/// Whether this image is inside `hv_prepare` (called from the old image).
pub fn preparing() -> bool {
    PREPARE_SP.load(Ordering::Acquire) != 0
}

/// A panic while preparing: back to the old image, which goes on without
/// a prepared image. Returns if not preparing.
pub fn abort_if_preparing() {
    if preparing() {
        // SAFETY: `hv_prepare_sp` is set, so the brownout entry's frame is
        // live on the caller's stack; prepare_abort restores it and returns
        // to the caller with every callee-saved register it had.
        unsafe { prepare_abort(Status::Panicked as u64) }
    }
}

/// The brownout entry's body (`hv_prepare_entry`): the DTB at `dtb_phys`
/// parsed and the EL2 map built, kept in [`PREPARED`].
#[no_mangle]
extern "C" fn hv_prepare(dtb_phys: u64) -> u64 {
    crate::heap::init();
    assert!(
        rollback::break_mode() != Some(rollback::Break::PreparePanic),
        "test build (HV_TEST_BREAK_RESTORE): panics while prepared"
    );
    let crc32_instructions = super::enable_crc32_instructions();
    let Ok((info, platform, _)) = super::describe(dtb_phys) else { return Status::BadDtb as u64 };
    let Ok(map) = super::build_host_map(&info, &platform) else { return Status::HostMap as u64 };
    *PREPARED.lock() = Some(Prepared { dtb_phys, info, platform, map, crc32_instructions });
    Status::Prepared as u64
}

/// At entry after a live update: what the brownout prepared for this DTB.
pub fn take(dtb_phys: u64) -> Option<Prepared> {
    PREPARED.lock().take().filter(|p| p.dtb_phys == dtb_phys)
}

/// The running image's side: calls the brownout entry `entry` of the image
/// placed in `slot` (its footprint `footprint` bytes), with the slot
/// executable for the call only, then makes what it wrote visible to an
/// entry with the MMU off. Returns the status code.
pub fn call(entry: u64, slot: PhysRange, footprint: u64, dtb_phys: u64) -> u64 {
    if let Err(e) = super::mmu::set_executable(slot.base, slot.size, true) {
        hypervisor::println!("update: the new image's slot cannot be made executable: {e}");
        return Status::HostMap as u64;
    }
    // The brownout entry follows the AAPCS64: `entry.S` saves every
    // callee-saved register, even on a panic, and the new image writes
    // only its own slot, on this CPU's stack with interrupts masked.
    // SAFETY: `entry` is that entry of the image just placed (and checked)
    // in `slot`, which is now executable.
    let f: extern "C" fn(u64) -> u64 = unsafe { core::mem::transmute(entry as usize) };
    let status = f(dtb_phys);
    // The slot goes back to data; if that fails the slot stays executable
    // until the update ends, which only this image's code could use.
    let _ = super::mmu::set_executable(slot.base, slot.size, false);
    super::live_update::clean_invalidate(slot.base, slot.base + footprint);
    status
}
