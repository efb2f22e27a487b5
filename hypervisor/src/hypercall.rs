//! Hypercall decoding and the arch-neutral calls (`hypervisor/HYPERCALLS.md`).
//!
//! The arch code extracts (control, input, output) from the guest's
//! registers, calls [`dispatch`], writes the result back and carries out
//! the returned [`Action`]. Everything a guest passes is validated here.

use hvcall::{
    call, Control, HvInfo, PartitionState, Status, UpdateRequest, HV_INFO_ALIGN, HV_INFO_SIZE, UPDATE_REQUEST_SIZE,
};

use crate::partition::{state_code, PartitionInfo};

/// Access to guest memory by host-physical address. In the hypervisor RAM
/// is identity-mapped; host tests use an arena.
pub trait HostMemory {
    /// Copies `out.len()` bytes from host-physical `pa`.
    fn read(&self, pa: u64, out: &mut [u8]);
    /// Copies `data` to host-physical `pa`.
    fn write(&mut self, pa: u64, data: &[u8]);
}

/// Host memory as the hypervisor image sees it: RAM identity-mapped
/// (physical address = virtual address), on both architectures.
#[derive(Debug)]
pub struct IdentityMemory(());

impl IdentityMemory {
    /// # Safety
    /// RAM must be identity-mapped read-write for as long as the value is
    /// used, and every address handed to it must have been translated
    /// through the calling partition's `GuestRam` (so it is that partition's
    /// RAM). Never true in host tests.
    pub const unsafe fn new() -> Self {
        Self(())
    }
}

impl HostMemory for IdentityMemory {
    fn read(&self, pa: u64, out: &mut [u8]) {
        // SAFETY: `new`'s contract: `pa..pa + len` is the caller's own RAM,
        // identity-mapped.
        unsafe { core::ptr::copy_nonoverlapping(pa as *const u8, out.as_mut_ptr(), out.len()) };
    }

    fn write(&mut self, pa: u64, data: &[u8]) {
        // SAFETY: as in `read`.
        unsafe { core::ptr::copy_nonoverlapping(data.as_ptr(), pa as *mut u8, data.len()) };
    }
}

/// What the hypervisor knows that calls report.
pub trait HvContext {
    fn version(&self) -> &str;
    fn build(&self) -> &str;
    fn update_count(&self) -> u64;
    fn cpus(&self) -> u64;
    fn partition_state(&self, id: u64) -> Option<PartitionState>;
    /// Whether a live update is being staged (`GET_UPDATE_PHASE`).
    fn update_staging(&self) -> bool;
}

/// The [`HvContext`] of the running image: its version and build, plus
/// what the arch code knows (updates so far, CPUs, partition states).
#[derive(Debug)]
pub struct RunningHv<F: Fn(u64) -> Option<PartitionState>> {
    pub update_count: u64,
    pub cpus: u64,
    /// The state of partition `id`, if it exists.
    pub partition_state: F,
    /// A live update is being staged.
    pub update_staging: bool,
}

impl<F: Fn(u64) -> Option<PartitionState>> HvContext for RunningHv<F> {
    fn version(&self) -> &str {
        crate::VERSION
    }
    fn build(&self) -> &str {
        crate::BUILD_ID
    }
    fn update_count(&self) -> u64 {
        self.update_count
    }
    fn cpus(&self) -> u64 {
        self.cpus
    }
    fn partition_state(&self, id: u64) -> Option<PartitionState> {
        (self.partition_state)(id)
    }
    fn update_staging(&self) -> bool {
        self.update_staging
    }
}

/// What the arch code must do after the call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Resume,
    /// Reschedule: another vCPU may run.
    Yield,
    /// Stop every vCPU of the calling partition.
    ShutdownSelf,
    /// Live-update to the image at host-physical `image_pa` (`size`
    /// bytes, inside the caller's RAM). The arch code validates the image
    /// and writes the final status.
    LiveUpdate {
        image_pa: u64,
        size: u64,
    },
    /// Make the next live update's freeze fail (test hook).
    FailNextFreeze,
}

/// The result of one hypercall.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub status: Status,
    pub reps_done: u16,
    /// Value for the output register (fast calls).
    pub fast_output: Option<u64>,
    pub action: Action,
}

impl Outcome {
    fn status(status: Status) -> Self {
        Self { status, reps_done: 0, fast_output: None, action: Action::Resume }
    }

    fn ok() -> Self {
        Self::status(Status::Success)
    }

    /// The value for the result register: status in bits 15:0, reps
    /// completed in bits 43:32.
    pub fn result_word(&self) -> u64 {
        (self.status as u64) | (u64::from(self.reps_done) << 32)
    }
}

/// Decodes and performs one hypercall for `caller`. Console output goes
/// to `console` (bytes, possibly a partial line).
pub fn dispatch(
    caller: &PartitionInfo,
    control: u64,
    input: u64,
    output: u64,
    hv: &dyn HvContext,
    mem: &mut dyn HostMemory,
    console: &mut dyn FnMut(&[u8]),
) -> Outcome {
    let c = match Control::decode(control) {
        Ok(c) => c,
        Err(s) => return Outcome::status(s),
    };
    let want_fast = |fast: bool| c.fast == fast && c.rep_count == 0;
    match c.code {
        call::CONSOLE_WRITE => {
            if c.fast {
                return Outcome::status(Status::InvalidHypercallInput);
            }
            let start = u64::from(c.rep_start);
            let len = u64::from(c.rep_count) - start;
            let Some(pa) = caller.ram.translate(input.wrapping_add(start), len) else {
                return Outcome::status(Status::InvalidParameter);
            };
            let mut buf = [0u8; 256];
            let mut done = 0u64;
            while done < len {
                let n = (len - done).min(buf.len() as u64) as usize;
                mem.read(pa + done, &mut buf[..n]);
                console(&buf[..n]);
                done += n as u64;
            }
            Outcome { reps_done: c.rep_count, ..Outcome::ok() }
        }
        call::GET_PARTITION_ID if want_fast(true) => {
            Outcome { fast_output: Some(u64::from(caller.id)), ..Outcome::ok() }
        }
        call::GET_HV_INFO if want_fast(false) => {
            if !output.is_multiple_of(HV_INFO_ALIGN) {
                return Outcome::status(Status::InvalidAlignment);
            }
            let Some(pa) = caller.ram.translate(output, HV_INFO_SIZE as u64) else {
                return Outcome::status(Status::InvalidParameter);
            };
            let info = HvInfo {
                version: HvInfo::field(hv.version()),
                build: HvInfo::field(hv.build()),
                update_count: hv.update_count(),
                abi_version: hvcall::ABI_VERSION,
                cpus: hv.cpus(),
            };
            mem.write(pa, &info.to_bytes());
            Outcome::ok()
        }
        call::YIELD if want_fast(true) => Outcome { action: Action::Yield, ..Outcome::ok() },
        call::SHUTDOWN_SELF if want_fast(true) => Outcome { action: Action::ShutdownSelf, ..Outcome::ok() },
        call::GET_UPDATE_PHASE if want_fast(true) => {
            let phase = if hv.update_staging() { hvcall::UPDATE_PHASE_STAGING } else { hvcall::UPDATE_PHASE_IDLE };
            Outcome { fast_output: Some(phase), ..Outcome::ok() }
        }
        call::GET_PARTITION_STATE if want_fast(true) => {
            if !caller.privileged {
                return Outcome::status(Status::AccessDenied);
            }
            match hv.partition_state(input) {
                Some(s) => Outcome { fast_output: Some(state_code(s)), ..Outcome::ok() },
                None => Outcome::status(Status::InvalidParameter),
            }
        }
        call::LIVE_UPDATE if want_fast(false) => {
            if !caller.privileged {
                return Outcome::status(Status::AccessDenied);
            }
            if !input.is_multiple_of(8) {
                return Outcome::status(Status::InvalidAlignment);
            }
            let Some(pa) = caller.ram.translate(input, UPDATE_REQUEST_SIZE as u64) else {
                return Outcome::status(Status::InvalidParameter);
            };
            let mut raw = [0u8; UPDATE_REQUEST_SIZE];
            mem.read(pa, &mut raw);
            let req = UpdateRequest::from_bytes(&raw);
            match caller.ram.translate(req.image_gpa, req.image_size) {
                Some(image_pa) if req.image_size > 0 => {
                    Outcome { action: Action::LiveUpdate { image_pa, size: req.image_size }, ..Outcome::ok() }
                }
                _ => Outcome::status(Status::InvalidParameter),
            }
        }
        call::TEST_FAIL_NEXT_FREEZE if want_fast(true) => {
            if !caller.privileged {
                return Outcome::status(Status::AccessDenied);
            }
            Outcome { action: Action::FailNextFreeze, ..Outcome::ok() }
        }
        call::GET_PARTITION_ID
        | call::GET_HV_INFO
        | call::YIELD
        | call::SHUTDOWN_SELF
        | call::GET_PARTITION_STATE
        | call::GET_UPDATE_PHASE
        | call::LIVE_UPDATE
        | call::TEST_FAIL_NEXT_FREEZE => Outcome::status(Status::InvalidHypercallInput),
        _ => Outcome::status(Status::InvalidHypercallCode),
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::vec;
    use std::vec::Vec;

    use super::*;
    use crate::partition::{GuestRam, GUEST_RAM_BASE};

    const HOST: u64 = 0x9000_0000;

    struct Arena(Vec<u8>);

    impl HostMemory for Arena {
        fn read(&self, pa: u64, out: &mut [u8]) {
            let at = (pa - HOST) as usize;
            out.copy_from_slice(&self.0[at..at + out.len()]);
        }
        fn write(&mut self, pa: u64, data: &[u8]) {
            let at = (pa - HOST) as usize;
            self.0[at..at + data.len()].copy_from_slice(data);
        }
    }

    struct Hv;
    impl HvContext for Hv {
        fn version(&self) -> &'static str {
            "1.2.3"
        }
        fn build(&self) -> &'static str {
            "b"
        }
        fn update_count(&self) -> u64 {
            4
        }
        fn cpus(&self) -> u64 {
            2
        }
        fn partition_state(&self, id: u64) -> Option<PartitionState> {
            (id < 2).then_some(PartitionState::Running)
        }
        fn update_staging(&self) -> bool {
            true
        }
    }

    fn guest(privileged: bool) -> PartitionInfo {
        PartitionInfo {
            id: 1,
            name: "t".into(),
            privileged,
            ram: GuestRam { host_base: HOST, size: 0x1_0000 },
            vcpus: 1,
        }
    }

    fn run(p: &PartitionInfo, control: u64, input: u64, output: u64) -> (Outcome, Vec<u8>, Arena) {
        let mut mem = Arena(vec![0; 0x1_0000]);
        mem.0[0x100..0x106].copy_from_slice(b"hello\n");
        let mut printed = Vec::new();
        let o = dispatch(p, control, input, output, &Hv, &mut mem, &mut |b| printed.extend_from_slice(b));
        (o, printed, mem)
    }

    fn ctl(code: u16, fast: bool, reps: u16) -> u64 {
        Control { code, fast, rep_count: reps, rep_start: 0 }.encode()
    }

    #[test]
    fn console_write_prints_and_counts_reps() {
        let (o, printed, _) = run(&guest(false), ctl(call::CONSOLE_WRITE, false, 6), GUEST_RAM_BASE + 0x100, 0);
        assert_eq!(o.status, Status::Success);
        assert_eq!(o.result_word(), 6 << 32);
        assert_eq!(printed, b"hello\n");
    }

    #[test]
    fn console_write_outside_ram_is_invalid_parameter() {
        let (o, printed, _) = run(&guest(false), ctl(call::CONSOLE_WRITE, false, 16), GUEST_RAM_BASE + 0xfff8, 0);
        assert_eq!(o.status, Status::InvalidParameter);
        assert!(printed.is_empty());
        let (o, ..) = run(&guest(false), ctl(call::CONSOLE_WRITE, false, 1), 0x1000, 0);
        assert_eq!(o.status, Status::InvalidParameter);
    }

    #[test]
    fn info_checks_alignment_and_bounds() {
        let p = guest(false);
        let (o, _, mem) = run(&p, ctl(call::GET_HV_INFO, false, 0), 0, GUEST_RAM_BASE + 0x200);
        assert_eq!(o.status, Status::Success);
        let mut b = [0u8; HV_INFO_SIZE];
        b.copy_from_slice(&mem.0[0x200..0x200 + HV_INFO_SIZE]);
        let info = HvInfo::from_bytes(&b);
        assert_eq!(HvInfo::text(&info.version), "1.2.3");
        assert_eq!((info.update_count, info.cpus), (4, 2));
        let (o, ..) = run(&p, ctl(call::GET_HV_INFO, false, 0), 0, GUEST_RAM_BASE + 0x204);
        assert_eq!(o.status, Status::InvalidAlignment);
        let (o, ..) = run(&p, ctl(call::GET_HV_INFO, false, 0), 0, GUEST_RAM_BASE + 0xfff8);
        assert_eq!(o.status, Status::InvalidParameter);
        let (o, ..) = run(&p, ctl(call::GET_HV_INFO, true, 0), 0, GUEST_RAM_BASE);
        assert_eq!(o.status, Status::InvalidHypercallInput);
    }

    #[test]
    fn fast_calls_and_privilege() {
        let (o, ..) = run(&guest(false), ctl(call::GET_PARTITION_ID, true, 0), 0, 0);
        assert_eq!((o.status, o.fast_output), (Status::Success, Some(1)));
        let (o, ..) = run(&guest(false), ctl(call::GET_PARTITION_ID, false, 0), 0, 0);
        assert_eq!(o.status, Status::InvalidHypercallInput);
        let (o, ..) = run(&guest(false), ctl(call::GET_PARTITION_STATE, true, 0), 0, 0);
        assert_eq!(o.status, Status::AccessDenied);
        let (o, ..) = run(&guest(true), ctl(call::GET_PARTITION_STATE, true, 0), 1, 0);
        assert_eq!((o.status, o.fast_output), (Status::Success, Some(0)));
        let (o, ..) = run(&guest(true), ctl(call::GET_PARTITION_STATE, true, 0), 9, 0);
        assert_eq!(o.status, Status::InvalidParameter);
        let (o, ..) = run(&guest(false), ctl(call::GET_UPDATE_PHASE, true, 0), 0, 0);
        assert_eq!((o.status, o.fast_output), (Status::Success, Some(hvcall::UPDATE_PHASE_STAGING)));
        let (o, ..) = run(&guest(false), ctl(call::GET_UPDATE_PHASE, false, 0), 0, 0);
        assert_eq!(o.status, Status::InvalidHypercallInput);
        let (o, ..) = run(&guest(false), ctl(call::YIELD, true, 0), 0, 0);
        assert_eq!(o.action, Action::Yield);
        let (o, ..) = run(&guest(false), ctl(call::SHUTDOWN_SELF, true, 0), 0, 0);
        assert_eq!(o.action, Action::ShutdownSelf);
    }

    #[test]
    fn live_update_checks_privilege_and_bounds() {
        let request = |gpa: u64, size: u64| {
            let mut mem = Arena(vec![0; 0x1_0000]);
            mem.0[0x300..0x310].copy_from_slice(&UpdateRequest { image_gpa: gpa, image_size: size }.to_bytes());
            mem
        };
        let go = |p: &PartitionInfo, mut mem: Arena, input: u64| {
            dispatch(p, ctl(call::LIVE_UPDATE, false, 0), input, 0, &Hv, &mut mem, &mut |_| {})
        };
        let o = go(&guest(true), request(GUEST_RAM_BASE + 0x1000, 0x2000), GUEST_RAM_BASE + 0x300);
        assert_eq!(o.action, Action::LiveUpdate { image_pa: HOST + 0x1000, size: 0x2000 });
        let o = go(&guest(false), request(GUEST_RAM_BASE + 0x1000, 0x2000), GUEST_RAM_BASE + 0x300);
        assert_eq!(o.status, Status::AccessDenied);
        let o = go(&guest(true), request(GUEST_RAM_BASE + 0xf000, 0x2000), GUEST_RAM_BASE + 0x300);
        assert_eq!(o.status, Status::InvalidParameter);
        let o = go(&guest(true), request(GUEST_RAM_BASE, 0), GUEST_RAM_BASE + 0x300);
        assert_eq!(o.status, Status::InvalidParameter);
        let o = go(&guest(true), request(GUEST_RAM_BASE, 16), GUEST_RAM_BASE + 0x301);
        assert_eq!(o.status, Status::InvalidAlignment);
        let o = go(&guest(true), request(GUEST_RAM_BASE, 16), 0x10);
        assert_eq!(o.status, Status::InvalidParameter);
        let (o, ..) = run(&guest(false), ctl(call::TEST_FAIL_NEXT_FREEZE, true, 0), 0, 0);
        assert_eq!(o.status, Status::AccessDenied);
        let (o, ..) = run(&guest(true), ctl(call::TEST_FAIL_NEXT_FREEZE, true, 0), 0, 0);
        assert_eq!(o.action, Action::FailNextFreeze);
    }

    #[test]
    fn unknown_and_malformed() {
        let (o, ..) = run(&guest(false), ctl(0x7777, true, 0), 0, 0);
        assert_eq!(o.status, Status::InvalidHypercallCode);
        let (o, ..) = run(&guest(false), ctl(call::YIELD, true, 0) | (1 << 20), 0, 0);
        assert_eq!(o.status, Status::InvalidHypercallInput);
    }
}
