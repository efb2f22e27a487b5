//! A fake architecture for host tests of the machine (the model is
//! Hafnium's `src/arch/fake`): vCPU contexts are plain structs, kicks and
//! power-off are recorded, and the preserved map lives in a
//! `sparse_bitmap` arena, so partitions, scheduling, exits and the
//! handover records run on the host exactly as in the image.

extern crate std;

use alloc::vec::Vec;
use core::cell::{Cell, RefCell};

use kho::HandoverWriter;
use loader::PhysRange;
use sparse_bitmap::testing::Arena;
use sparse_bitmap::MultiOrderBitmap;

use super::{Arch, Handover, Partition, RestoreError, SaveError};
use crate::records::PartitionRecord;

/// A vCPU's "registers".
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FakeVcpu {
    pub pc: u64,
    pub x: [u64; 4],
    /// Whether its state is in a (fake) CPU's registers.
    pub loaded: bool,
    /// Times it was put away.
    pub puts: u32,
}

impl FakeVcpu {
    pub fn at(pc: u64) -> Self {
        Self { pc, ..Self::default() }
    }
}

/// The fake's part of a partition: where its second-stage table would be.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FakePartition {
    pub stage2_root: u64,
}

/// The fake architecture: which CPU "runs" the code under test, and what
/// the machine asked of the hardware.
#[derive(Debug, Default)]
pub struct FakeArch {
    pub cpu: Cell<usize>,
    pub kicks: RefCell<Vec<usize>>,
    pub powered_off: Option<bool>,
    /// A record the fake writes as its "device" (like the SMMU's).
    pub device_note: Option<u64>,
}

pub const FAKE_CONTEXT_FORMAT: u32 = 0xfa4e_0001;
const CONTEXT_WORDS: usize = 5;

impl Arch for FakeArch {
    type Vcpu = FakeVcpu;
    type Partition = FakePartition;
    type Pages = &'static Arena;
    const CONTEXT_FORMAT: u32 = FAKE_CONTEXT_FORMAT;

    fn this_cpu(&self) -> usize {
        self.cpu.get()
    }

    fn kick(&self, cpu: usize) {
        self.kicks.borrow_mut().push(cpu);
    }

    fn put(&mut self, vcpu: &mut FakeVcpu) {
        vcpu.loaded = false;
        vcpu.puts += 1;
    }

    fn power_off(&mut self, ok: bool) {
        assert!(self.powered_off.is_none(), "powered off twice");
        self.powered_off = Some(ok);
    }

    fn stage2_root(p: &FakePartition) -> u64 {
        p.stage2_root
    }

    fn save_context(vcpu: &FakeVcpu, out: &mut [u8]) -> Option<usize> {
        let words = [vcpu.pc, vcpu.x[0], vcpu.x[1], vcpu.x[2], vcpu.x[3]];
        let out = out.get_mut(..CONTEXT_WORDS * 8)?;
        for (chunk, w) in out.chunks_exact_mut(8).zip(words) {
            chunk.copy_from_slice(&w.to_le_bytes());
        }
        Some(CONTEXT_WORDS * 8)
    }
}

impl Handover for FakeArch {
    const IMAGES_PRESERVED: bool = false;

    fn record_partition(p: &Partition<Self>, rec: &mut PartitionRecord) {
        rec.stage2_root = p.arch.stage2_root;
    }

    /// The fake has no arch record of its own.
    type PartitionState = crate::records::ConsoleRecord;

    fn partition_state(_: &Partition<Self>) -> Result<Option<Self::PartitionState>, SaveError> {
        Ok(None)
    }

    const TABLE_STATE_LAYOUT: u32 = 0;

    fn table_state_len(_: &Partition<Self>) -> usize {
        0
    }

    fn write_table_state(_: &Partition<Self>, _: &mut [u8]) -> Result<usize, SaveError> {
        Ok(0)
    }

    fn read_table_state(_: &PartitionRecord, _: u32, _: &[u8]) -> Result<Self::PartitionState, RestoreError> {
        Err(RestoreError::Arch("fake-has-no-table-state"))
    }

    fn record_devices(&self, w: &mut HandoverWriter) -> Result<(), SaveError> {
        if let Some(note) = self.device_note {
            let rec = crate::records::HvRecord {
                freeze_counter: note,
                counter_hz: 0,
                cpus: 0,
                partitions: 0,
                vcpus: 0,
                images_preserved: false,
            };
            w.subsystem("fake-device")
                .and_then(|mut s| s.add_record(&rec))
                .map_err(|error| SaveError::Handover { what: "fake-device", error })?;
        }
        Ok(())
    }

    fn adopt_partition(
        &mut self,
        rec: &PartitionRecord,
        _: Option<Self::PartitionState>,
        ram: &[PhysRange],
    ) -> Result<FakePartition, RestoreError> {
        if !ram.iter().any(|r| r.contains(&PhysRange::new(rec.stage2_root, 4096))) {
            return Err(RestoreError::Arch("stage2-root-outside-ram"));
        }
        Ok(FakePartition { stage2_root: rec.stage2_root })
    }

    fn restore_context(
        &self,
        _: u32,
        bytes: &[u8],
        _: &MultiOrderBitmap<&'static Arena>,
    ) -> Result<FakeVcpu, RestoreError> {
        if bytes.len() != CONTEXT_WORDS * 8 {
            return Err(RestoreError::Arch("context-length"));
        }
        let mut w = [0u64; CONTEXT_WORDS];
        for (word, chunk) in w.iter_mut().zip(bytes.chunks_exact(8)) {
            let mut b = [0u8; 8];
            b.copy_from_slice(chunk);
            *word = u64::from_le_bytes(b);
        }
        Ok(FakeVcpu { pc: w[0], x: [w[1], w[2], w[3], w[4]], loaded: false, puts: 0 })
    }
}

/// Guest memory for hypercalls: a byte vector standing for host-physical
/// memory from `base`.
#[derive(Debug)]
pub struct FakeMemory {
    pub base: u64,
    pub bytes: Vec<u8>,
}

impl crate::hypercall::HostMemory for FakeMemory {
    fn read(&self, pa: u64, out: &mut [u8]) {
        let at = (pa - self.base) as usize;
        out.copy_from_slice(&self.bytes[at..at + out.len()]);
    }

    fn write(&mut self, pa: u64, data: &[u8]) {
        let at = (pa - self.base) as usize;
        self.bytes[at..at + data.len()].copy_from_slice(data);
    }
}
