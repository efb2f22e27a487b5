//! The x86_64 side of the machine (`hypervisor::machine::Arch`) under
//! VT-x or AMD SVM: vCPU contexts with their VMCS or VMCB, each
//! partition's nested table (EPT or NPT, built by the one stage-2 engine)
//! and emulated COM1, what the backend offers and the controls every VMCS
//! is built from, and the EPT adopted in place after an update.

use alloc::vec::Vec;
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use hypervisor::arch::x86_64::cr::GuestCrPolicy;
use hypervisor::arch::x86_64::lapic::{self, Lapic, VectorSet};
use hypervisor::arch::x86_64::startup::{self, Startup};
use hypervisor::arch::x86_64::svm_caps::SvmCaps;
use hypervisor::arch::x86_64::vmx_caps::{VmcsControls, VmxCaps};
use hypervisor::frames::PAGE_SIZE;
use hypervisor::machine::{Arch, Handover, MachineLock, Partition, RestoreError, SaveError};
use hypervisor::preserved::IdentityPages;
use hypervisor::records::{
    format_code, LapicRecord, PartitionRecord, SvmRecord, VtdRecord, LAPIC_STARTUP_BYTES, LAPIC_STATE_BYTES,
};
use hypervisor::stage2::{Ept, LinearMap, MemType, Npt, Stage2Table};
use kho::HandoverWriter;
use loader::manifest::ImageFormat;
use loader::PhysRange;
use sparse_bitmap::MultiOrderBitmap;

use super::vcpu::{Vcpu, CONTEXT_FORMAT, CONTEXT_LEN};
use super::{smp, MAX_CPUS};

/// The virtualisation extension the machine runs its guests with, picked
/// at boot from CPUID: VT-x where the CPU has it, else AMD SVM.
#[derive(Clone, Copy, Debug)]
pub enum Backend {
    Vmx {
        caps: VmxCaps,
        controls: VmcsControls,
    },
    /// `iopm` and `msrpm`: the I/O and MSR permission maps every VMCB
    /// points at (all ones: every port and MSR access is intercepted).
    Svm {
        caps: SvmCaps,
        iopm: u64,
        msrpm: u64,
    },
}

/// Machine-wide backend state.
pub struct X86 {
    pub backend: Backend,
    /// The VT-d unit, translating with every unassigned device blocked.
    pub vtd: Option<super::vtd::Unit>,
    pub cr_policy: GuestCrPolicy,
    pub tsc_hz: u64,
    /// The preserved copy of the multiboot2 information, handed to each
    /// new image (it names RAM, the reserved ranges and the ACPI RSDP).
    pub mbi: PhysRange,
    /// When each CPU's time slice ends (TSC).
    pub slice_end: [u64; MAX_CPUS],
    /// A live update requested by the vCPU that just exited on each CPU
    /// (that vCPU, the image's address and size), run once the machine
    /// lock is released.
    pub update_request: [Option<(usize, u64, u64)>; MAX_CPUS],
}

impl X86 {
    pub fn is_svm(&self) -> bool {
        matches!(self.backend, Backend::Svm { .. })
    }
}

/// A partition's nested table: EPT under VT-x (SDM Vol. 3C §29.3), NPT
/// under SVM (the legacy x86-64 format, APM Vol. 2 §15.25).
pub enum NestedTable {
    Ept(Stage2Table<Ept, LinearMap>),
    Npt(Stage2Table<Npt, LinearMap>),
}

impl NestedTable {
    pub fn root(&self) -> u64 {
        match self {
            Self::Ept(t) => t.root(),
            Self::Npt(t) => t.root(),
        }
    }

    /// The host-physical address of `len` bytes at guest-physical `gpa`,
    /// if the table maps them all within one leaf: RAM of this partition
    /// (its RAM block, or the conventional memory only the table names).
    pub fn translate(&self, gpa: u64, len: u64) -> Option<u64> {
        let t = match self {
            Self::Ept(t) => t.translate(gpa),
            Self::Npt(t) => t.translate(gpa),
        }?;
        // Only RAM: a device's BAR mapped into the guest is not read as
        // memory (reads there have side effects).
        if t.attrs.mem != MemType::Normal {
            return None;
        }
        let offset = gpa & (t.size.bytes() - 1);
        (offset.checked_add(len)? <= t.size.bytes()).then_some(t.pa)
    }
}

/// The x86_64 part of a partition.
pub struct X86Partition {
    pub nested: NestedTable,
    /// The second-level table its assigned devices' DMA is translated by
    /// (VT-d §9.8, the EPT format), kept in step with `nested`.
    pub dma_table: Option<Stage2Table<Ept, LinearMap>>,
    /// The emulated COM1's line control register (for DLAB).
    pub uart_lcr: u8,
    /// #GP faults injected so far.
    pub gp_injected: u64,
    /// Accesses to guest-physical addresses with nothing behind them,
    /// completed as a PC would (reads all ones, writes dropped).
    pub unbacked: u64,
    /// Fixed IPIs sent to each vCPU (by index) by the others, not yet
    /// taken into its local APIC: vCPU contexts belong to their own
    /// physical CPU (`hypervisor::machine`), so senders on another one
    /// leave the vectors here, under the machine lock.
    inbox: Vec<VectorSet>,
    /// Each vCPU's local APIC for a live update (by index): copied by the
    /// owning CPU at the freeze for the `lapic` record, or read from it by
    /// the next image and taken up by the owning CPU before the vCPU is
    /// scheduled.
    apic_handover: Vec<Option<Lapic>>,
    /// Where each vCPU (by index) is in the INIT-SIPI protocol: kept here,
    /// under the machine lock, so that a vCPU on any CPU can send INIT and
    /// SIPI, and recorded from here at the freeze (after every CPU has
    /// stopped, so a SIPI sent after its target's CPU froze is not lost).
    startup: Vec<Startup>,
}

impl X86Partition {
    /// A partition of `vcpus` vCPUs at power-on: vCPU 0 running, the
    /// others waiting for a SIPI.
    pub fn new(nested: NestedTable, vcpus: u32) -> Self {
        Self {
            nested,
            dma_table: None,
            uart_lcr: 0,
            gp_injected: 0,
            unbacked: 0,
            inbox: Vec::new(),
            apic_handover: Vec::new(),
            startup: (0..vcpus).map(Startup::at_reset).collect(),
        }
    }

    /// Where vCPU `index` is in the INIT-SIPI protocol.
    pub fn startup(&self, index: u32) -> Startup {
        self.startup.get(index as usize).copied().unwrap_or(Startup::at_reset(index))
    }

    /// An INIT for vCPU `index`: it waits for a SIPI.
    pub fn init_vcpu(&mut self, index: u32) {
        if let Some(s) = self.startup.get_mut(index as usize) {
            s.init();
        }
    }

    /// A SIPI with `vector` for vCPU `index`: whether it was waiting for
    /// one (it then starts; otherwise the SIPI is ignored).
    pub fn sipi_vcpu(&mut self, index: u32, vector: u8) -> bool {
        self.startup.get_mut(index as usize).is_some_and(|s| s.sipi(vector))
    }

    /// The SIPI vCPU `index`'s own CPU must carry out before entering it.
    pub fn take_sipi(&mut self, index: u32) -> Option<u8> {
        self.startup.get_mut(index as usize).and_then(Startup::take_sipi)
    }

    /// Keeps a copy of vCPU `index`'s APIC for the handover.
    pub fn stash_apic(&mut self, index: usize, apic: &Lapic) {
        if self.apic_handover.len() <= index {
            self.apic_handover.resize(index + 1, None);
        }
        self.apic_handover[index] = Some(apic.clone());
    }

    /// The APIC vCPU `index` had in the previous image, once.
    pub fn take_apic(&mut self, index: usize) -> Option<Lapic> {
        self.apic_handover.get_mut(index).and_then(Option::take)
    }

    /// Leaves `vector` for vCPU `index`.
    pub fn post_vector(&mut self, index: usize, vector: u8) {
        if self.inbox.len() <= index {
            self.inbox.resize(index + 1, VectorSet::default());
        }
        self.inbox[index].set(vector);
    }

    /// Takes the vectors left for vCPU `index`.
    pub fn take_inbox(&mut self, index: usize) -> VectorSet {
        self.inbox.get_mut(index).map(core::mem::take).unwrap_or_default()
    }

    /// The EPT pointer of the partition's table (under VT-x).
    pub fn eptp(&self) -> u64 {
        Ept::eptp(self.nested.root())
    }
}

/// The one machine of this image (the access rule: `hypervisor::machine`).
pub static MACHINE: MachineLock<X86> = MachineLock::new();

/// The calibrated TSC frequency, for timeouts outside the machine lock.
static TSC_HZ: AtomicU64 = AtomicU64::new(0);

pub fn set_tsc_hz(hz: u64) {
    TSC_HZ.store(hz, Ordering::Relaxed);
}

/// The calibrated TSC frequency in Hz.
pub fn tsc_hz() -> u64 {
    TSC_HZ.load(Ordering::Relaxed)
}

/// The local APIC id of each CPU index that runs guests.
static CPU_APIC: [AtomicU32; MAX_CPUS] = [const { AtomicU32::new(u32::MAX) }; MAX_CPUS];
const _: () = assert!(MAX_CPUS == hypervisor::machine::MAX_CPUS);

/// Records that this CPU is CPU index `cpu`, and lets kicks reach it.
pub fn register_cpu(cpu: usize) {
    smp::enable_local_apic();
    if let Some(slot) = CPU_APIC.get(cpu) {
        slot.store(smp::my_apic_id(), Ordering::Relaxed);
    }
}

impl Arch for X86 {
    type Vcpu = Vcpu;
    type Partition = X86Partition;
    type Pages = IdentityPages;
    const CONTEXT_FORMAT: u32 = CONTEXT_FORMAT;
    const CONTEXT_MAX: usize = CONTEXT_LEN;

    fn this_cpu(&self) -> usize {
        let me = smp::my_apic_id();
        CPU_APIC.iter().position(|a| a.load(Ordering::Relaxed) == me).unwrap_or(0)
    }

    /// An IPI to the CPU: in a guest, it exits at once (external-interrupt
    /// exiting) and reschedules; in the hypervisor, it sees the change at
    /// its next scheduling decision anyway, and the IPI stays pending until
    /// its next entry, which then exits at once.
    fn kick(&self, cpu: usize) {
        if let Some(apic) = CPU_APIC.get(cpu).map(|a| a.load(Ordering::Relaxed)).filter(|&a| a != u32::MAX) {
            smp::send_kick(apic);
        }
    }

    fn put(&mut self, vcpu: &mut Vcpu) {
        vcpu.put();
    }

    fn power_off(&mut self, ok: bool) {
        super::shutdown(ok)
    }

    fn stage2_root(p: &X86Partition) -> u64 {
        p.nested.root()
    }

    fn save_context(vcpu: &Vcpu, out: &mut [u8]) -> Option<usize> {
        vcpu.to_context(out)
    }
}

impl Handover for X86 {
    const IMAGES_PRESERVED: bool = false;

    fn record_partition(p: &Partition<Self>, rec: &mut PartitionRecord) {
        rec.stage2_root = p.arch.nested.root();
        rec.image_format = format_code(ImageFormat::Flat);
    }

    /// The `lapic` record: every vCPU's APIC as its owning CPU copied it
    /// at the freeze (a vCPU never scheduled has its reset APIC) with the
    /// IPIs other vCPUs left for it since (a sender on another CPU may
    /// have frozen after it), and where each is in the INIT-SIPI protocol.
    type PartitionState = LapicRecord;

    fn partition_state(p: &Partition<Self>) -> Result<Option<LapicRecord>, SaveError> {
        let mut rec = LapicRecord {
            vcpus: p.info.vcpus,
            len: 0,
            state: [0; LAPIC_STATE_BYTES],
            startup: [0; LAPIC_STARTUP_BYTES],
        };
        let mut at = 0;
        for index in 0..p.info.vcpus {
            let mut apic =
                p.arch.apic_handover.get(index as usize).cloned().flatten().unwrap_or_else(|| Lapic::new(index));
            if let Some(inbox) = p.arch.inbox.get(index as usize) {
                apic.accept_all(inbox);
            }
            let out = rec.state.get_mut(at..).ok_or(SaveError::Device("lapic-state-too-large"))?;
            at += apic.encode(out).ok_or(SaveError::Device("lapic-state-too-large"))?;
            let k = index as usize * startup::ENCODED_LEN;
            let slot = rec.startup.get_mut(k..k + startup::ENCODED_LEN).ok_or(SaveError::Device("too-many-vcpus"))?;
            slot.copy_from_slice(&p.arch.startup(index).encode());
        }
        rec.len = at as u32;
        Ok(Some(rec))
    }

    /// The `lapic` record's `state[..len]` (`vcpus` × 160 bytes), then
    /// `startup[..2 × vcpus]`.
    const TABLE_STATE_LAYOUT: u32 = 2;

    fn table_state_len(p: &Partition<Self>) -> usize {
        p.info.vcpus as usize * (lapic::STATE_LEN + startup::ENCODED_LEN)
    }

    fn write_table_state(p: &Partition<Self>, out: &mut [u8]) -> Result<usize, SaveError> {
        let Some(rec) = Self::partition_state(p)? else { return Ok(0) };
        let (len, starts) = (rec.len as usize, p.info.vcpus as usize * startup::ENCODED_LEN);
        let too_large = SaveError::Device("lapic-state-too-large");
        let (state, rest) = out.split_at_mut_checked(len).ok_or(too_large.clone())?;
        state.copy_from_slice(&rec.state[..len]);
        let startups = rec.startup.get(..starts).ok_or(SaveError::Device("too-many-vcpus"))?;
        rest.get_mut(..starts).ok_or(too_large)?.copy_from_slice(startups);
        Ok(len + starts)
    }

    fn read_table_state(rec: &PartitionRecord, layout: u32, bytes: &[u8]) -> Result<LapicRecord, RestoreError> {
        if layout != Self::TABLE_STATE_LAYOUT {
            return Err(RestoreError::BadField("lapic-layout"));
        }
        let vcpus = rec.vcpus as usize;
        let len = vcpus * lapic::STATE_LEN;
        let starts = vcpus * startup::ENCODED_LEN;
        let bad = RestoreError::BadField("lapic-vcpus");
        if bytes.len() != len + starts || len > LAPIC_STATE_BYTES || starts > LAPIC_STARTUP_BYTES {
            return Err(bad);
        }
        let mut l = LapicRecord {
            vcpus: rec.vcpus,
            len: len as u32,
            state: [0; LAPIC_STATE_BYTES],
            startup: [0; LAPIC_STARTUP_BYTES],
        };
        l.state[..len].copy_from_slice(&bytes[..len]);
        l.startup[..starts].copy_from_slice(&bytes[len..]);
        Ok(l)
    }

    /// Under SVM, the `svm` record: it marks the contexts' control pages
    /// as VMCBs and carries the slice timer's rate.
    fn record_devices(&self, w: &mut HandoverWriter) -> Result<(), SaveError> {
        if self.is_svm() {
            let rec = SvmRecord { apic_timer_hz: super::svm::slice_timer_rate() };
            w.subsystem("svm")
                .and_then(|mut s| s.add_record(&rec))
                .map_err(|error| SaveError::Handover { what: "svm", error })?;
        }
        if let Some(unit) = &self.vtd {
            let rec = VtdRecord::encode(unit.base, &unit.vtd.state(), &unit.assigned)
                .ok_or(SaveError::Device("too-many-vtd-assignments"))?;
            w.subsystem("vtd")
                .and_then(|mut s| s.add_record(&rec))
                .map_err(|error| SaveError::Handover { what: "vtd", error })?;
        }
        Ok(())
    }

    /// Adopts the EPT or NPT in place and reads the `lapic` record (without one,
    /// from an image before it, the guests get reset APICs: what that
    /// image's guests had; without its `startup` field, vCPU 0 running and
    /// the others waiting for a SIPI: the only state such an image knew).
    fn adopt_partition(
        &mut self,
        rec: &PartitionRecord,
        state: Option<LapicRecord>,
        ram: &[PhysRange],
    ) -> Result<X86Partition, RestoreError> {
        let (apics, startups) = match state {
            Some(l) => {
                if l.vcpus != rec.vcpus || l.len as usize != rec.vcpus as usize * lapic::STATE_LEN {
                    return Err(RestoreError::BadField("lapic-vcpus"));
                }
                let mut apics = Vec::new();
                for (index, bytes) in (0..rec.vcpus).zip(l.state.chunks_exact(lapic::STATE_LEN)) {
                    apics.push(Lapic::decode(bytes, index).map_err(|_| RestoreError::BadField("lapic-state"))?);
                }
                let mut startups = Vec::new();
                let mut pairs = l.startup.chunks_exact(startup::ENCODED_LEN).map(|b| [b[0], b[1]]);
                for index in 0..rec.vcpus {
                    let bytes = pairs.next().ok_or(RestoreError::BadField("lapic-vcpus"))?;
                    startups.push(Startup::decode(bytes, index).map_err(|_| RestoreError::BadField("lapic-startup"))?);
                }
                if pairs.any(|b| b != [0, 0]) {
                    return Err(RestoreError::BadField("lapic-startup"));
                }
                (apics, Some(startups))
            }
            None => (Vec::new(), None),
        };
        let adopt_ram: alloc::vec::Vec<(u64, u64)> = ram.iter().map(|r| (r.base, r.size)).collect();
        // SAFETY: RAM is identity-mapped, so physical = virtual.
        let phys = unsafe { LinearMap::new(0) };
        let stage2 = |error| RestoreError::Stage2 { id: rec.id, error };
        // The partition's devices (the `vtd` record, adopted before the
        // partitions): their BARs are in its nested table, and their DMA
        // goes through its second-level table.
        let assigned: Vec<_> =
            self.vtd.iter().flat_map(|u| u.assigned.iter()).filter(|a| a.partition == rec.id).copied().collect();
        let bars: Vec<(u64, u64)> = assigned.iter().map(|a| (a.bar_base, a.bar_size)).collect();
        let nested = if self.is_svm() {
            NestedTable::Npt(
                Stage2Table::<Npt, LinearMap>::adopt(rec.stage2_root, &adopt_ram, &bars, phys).map_err(stage2)?,
            )
        } else {
            NestedTable::Ept(
                Stage2Table::<Ept, LinearMap>::adopt(rec.stage2_root, &adopt_ram, &bars, phys).map_err(stage2)?,
            )
        };
        let mut part = X86Partition::new(nested, rec.vcpus);
        if let Some(first) = assigned.first() {
            if assigned.iter().any(|a| a.table != first.table) {
                return Err(RestoreError::BadField("vtd-tables"));
            }
            // SAFETY: RAM is identity-mapped, so physical = virtual.
            let phys = unsafe { LinearMap::new(0) };
            part.dma_table =
                Some(Stage2Table::<Ept, LinearMap>::adopt(first.table, &adopt_ram, &[], phys).map_err(stage2)?);
        }
        for (index, apic) in apics.iter().enumerate() {
            part.stash_apic(index, apic);
        }
        if let Some(startups) = startups {
            part.startup = startups;
        }
        Ok(part)
    }

    fn restore_context(
        &self,
        _: u32,
        bytes: &[u8],
        preserved: &MultiOrderBitmap<IdentityPages>,
    ) -> Result<Vcpu, RestoreError> {
        if bytes.len() != CONTEXT_LEN {
            return Err(RestoreError::Arch("vcpu-context-length"));
        }
        let ctx = Vcpu::from_context(bytes).ok_or(RestoreError::Arch("vcpu-context"))?;
        if !preserved.contains_range(ctx.vmcs..ctx.vmcs + PAGE_SIZE) {
            return Err(RestoreError::Arch("vmcs-not-preserved"));
        }
        Ok(ctx)
    }
}
