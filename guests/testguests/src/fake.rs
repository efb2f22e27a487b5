//! A fake guest for host tests: a counter that advances per read, a tick
//! and self-interrupts simulated at `wait_for_interrupt`, and a fake
//! hypervisor answering hypercalls as `hypervisor/HYPERCALLS.md` says.
//! GPAs are host addresses.

use core::cell::Cell;
use std::string::String;
use std::vec::Vec;

use hvcall::{call, Control, HvInfo, PartitionState, Status, ABI_VERSION, HV_INFO_ALIGN, HV_INFO_SIZE};

use crate::{Guest, InterruptCounts, Outcome, Region, Request};

#[derive(Debug)]
pub struct FakeGuest {
    /// Console lines written, without their newlines.
    pub lines: Vec<String>,
    /// Console bytes written since the last newline.
    pub partial: String,
    /// Every hypercall made.
    pub requests: Vec<Request>,
    /// The hypervisor's update count when each of `requests` was made.
    pub update_counts: Vec<u64>,
    /// A live update every this many counts (none: the count stays 1).
    pub update_period: Option<u64>,
    /// What the fake hypervisor treats as this guest's RAM: the host's
    /// user address space, so stack buffers are inside.
    pub ram: Region,
    pub privileged: bool,
    pub partition_id: u64,
    pub own_state: PartitionState,
    /// Answer this call code with this status instead.
    pub override_status: Option<(u16, u16)>,
    pub yields: u64,
    pub frequency: u64,
    /// Counts added per counter read.
    pub counter_step: u64,
    /// (read index, extra counts): the vCPU was away before that read.
    pub counter_jumps: Vec<(u64, u64)>,
    now: Cell<u64>,
    reads: Cell<u64>,
    pub has_timer: bool,
    pub tick_period: Option<u64>,
    pub ticks_per_wakeup: u64,
    /// Self-interrupts past this many are lost.
    pub drop_ipis_after: Option<u64>,
    pub waits: u64,
    counts: InterruptCounts,
    pub probes: Vec<u64>,
    /// `GET_UPDATE_PHASE` answers staging from this call on (counting
    /// from 1); idle before, and always if `None`.
    pub staging_from_call: Option<u64>,
    pub phase_calls: u64,
    pub unemulated_accesses: u64,
    /// Every hostile attack made, and the scratch buffer it may write.
    pub attacks: Vec<crate::hostile::Attack>,
    pub scratch: Vec<u8>,
}

impl FakeGuest {
    pub fn new() -> Self {
        Self {
            lines: Vec::new(),
            partial: String::new(),
            requests: Vec::new(),
            update_counts: Vec::new(),
            update_period: None,
            ram: Region::new(0x1000, 1 << 47),
            privileged: false,
            partition_id: 3,
            own_state: PartitionState::Running,
            override_status: None,
            yields: 0,
            frequency: 1_000_000,
            counter_step: 1,
            counter_jumps: Vec::new(),
            now: Cell::new(0),
            reads: Cell::new(0),
            has_timer: true,
            tick_period: None,
            ticks_per_wakeup: 1,
            drop_ipis_after: None,
            waits: 0,
            counts: InterruptCounts::default(),
            probes: Vec::new(),
            staging_from_call: None,
            phase_calls: 0,
            unemulated_accesses: 0,
            attacks: Vec::new(),
            scratch: std::vec![0; crate::hostile::SCRATCH_BYTES],
        }
    }

    /// Live updates so far: 1, or one more every `update_period`.
    fn update_count(&self) -> u64 {
        1 + self.update_period.map_or(0, |p| self.now.get() / p)
    }

    fn in_ram(&self, gpa: u64, len: u64) -> bool {
        gpa.checked_add(len).is_some_and(|end| self.ram.start <= gpa && end <= self.ram.end)
    }

    /// The fake hypervisor: (status, reps, output).
    fn answer(&mut self, r: Request) -> (Status, u16, u64) {
        let Ok(c) = Control::decode(r.control) else { return (Status::InvalidHypercallInput, 0, 0) };
        match c.code {
            call::CONSOLE_WRITE => {
                let len = u64::from(c.rep_count - c.rep_start);
                if c.fast {
                    return (Status::InvalidHypercallInput, 0, 0);
                }
                if !self.in_ram(r.input, len) {
                    return (Status::InvalidParameter, 0, 0);
                }
                // SAFETY: tests pass GPAs of live host buffers of that length.
                let bytes = unsafe { core::slice::from_raw_parts(r.input as *const u8, len as usize) };
                self.partial.push_str(core::str::from_utf8(bytes).unwrap());
                while let Some((line, rest)) = self.partial.split_once('\n') {
                    let (line, rest) = (line.into(), rest.into());
                    self.lines.push(line);
                    self.partial = rest;
                }
                (Status::Success, c.rep_count, 0)
            }
            call::GET_PARTITION_ID if c.fast => (Status::Success, 0, self.partition_id),
            call::GET_HV_INFO if !c.fast => {
                if !r.output.is_multiple_of(HV_INFO_ALIGN) {
                    return (Status::InvalidAlignment, 0, 0);
                }
                if !self.in_ram(r.output, HV_INFO_SIZE as u64) {
                    return (Status::InvalidParameter, 0, 0);
                }
                let info = HvInfo {
                    version: HvInfo::field("0.2.0"),
                    build: HvInfo::field("test-build"),
                    update_count: self.update_count(),
                    abi_version: ABI_VERSION,
                    cpus: 2,
                };
                // SAFETY: tests pass the GPA of a live 8-aligned buffer of
                // at least HV_INFO_SIZE bytes.
                unsafe { (r.output as *mut [u8; HV_INFO_SIZE]).write(info.to_bytes()) };
                (Status::Success, 0, 0)
            }
            call::YIELD if c.fast => {
                self.yields += 1;
                (Status::Success, 0, 0)
            }
            call::GET_UPDATE_PHASE if c.fast => {
                self.phase_calls += 1;
                let staging = self.staging_from_call.is_some_and(|from| self.phase_calls >= from);
                (Status::Success, 0, if staging { hvcall::UPDATE_PHASE_STAGING } else { hvcall::UPDATE_PHASE_IDLE })
            }
            call::GET_PARTITION_STATE if c.fast => match (self.privileged, r.input == self.partition_id) {
                (false, _) => (Status::AccessDenied, 0, 0),
                (true, true) => (Status::Success, 0, self.own_state as u64),
                (true, false) => (Status::InvalidParameter, 0, 0),
            },
            call::GET_PARTITION_ID
            | call::GET_HV_INFO
            | call::YIELD
            | call::SHUTDOWN_SELF
            | call::GET_PARTITION_STATE
            | call::GET_UPDATE_PHASE => (Status::InvalidHypercallInput, 0, 0),
            _ => (Status::InvalidHypercallCode, 0, 0),
        }
    }
}

impl Guest for FakeGuest {
    fn hypercall(&mut self, request: Request) -> Outcome {
        self.requests.push(request);
        self.update_counts.push(self.update_count());
        let (status, reps, output) = self.answer(request);
        let code = (request.control & 0xffff) as u16;
        let status = match self.override_status {
            Some((c, s)) if c == code => s,
            _ => status as u16,
        };
        Outcome::from_status(status, reps, output)
    }

    fn gpa_of(&self, ptr: *const u8) -> u64 {
        ptr as u64
    }

    fn counter(&self) -> u64 {
        let read = self.reads.get();
        self.reads.set(read + 1);
        let jump: u64 = self.counter_jumps.iter().filter(|(at, _)| *at == read).map(|(_, j)| j).sum();
        let now = self.now.get() + self.counter_step + jump;
        self.now.set(now);
        now
    }

    fn counter_frequency(&self) -> u64 {
        self.frequency
    }

    fn start_ticks(&mut self, period: u64) -> bool {
        if self.has_timer {
            self.tick_period = Some(period);
        }
        self.has_timer
    }

    fn stop_ticks(&mut self) {
        self.tick_period = None;
    }

    fn send_self_ipi(&mut self) -> bool {
        if self.drop_ipis_after.is_none_or(|n| self.counts.ipis < n) {
            self.counts.ipis += 1;
        }
        true
    }

    fn wait_for_interrupt(&mut self) {
        self.waits += 1;
        let period = self.tick_period.expect("wfi with no interrupt source would hang");
        self.now.set(self.now.get() + period * self.ticks_per_wakeup);
        self.counts.ticks += self.ticks_per_wakeup;
    }

    fn interrupt_counts(&self) -> InterruptCounts {
        self.counts
    }

    fn probe(&mut self, gpa: u64) -> [u64; 2] {
        self.probes.push(gpa);
        [u64::MAX; 2]
    }

    fn unemulated_access(&mut self) {
        self.unemulated_accesses += 1;
    }
}

impl crate::hostile::Hostile for FakeGuest {
    fn isa(&self) -> crate::hostile::Isa {
        crate::hostile::Isa::Aarch64
    }

    fn scratch(&mut self) -> &mut [u8] {
        &mut self.scratch
    }

    fn attack(&mut self, attack: &crate::hostile::Attack) -> Option<u64> {
        self.attacks.push(*attack);
        None
    }
}
