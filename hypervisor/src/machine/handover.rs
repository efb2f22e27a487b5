//! The machine's records in the handover (`kho/ABI.md`): the `hv`
//! record, one `partitions/<id>` node (its `partition` and `console`
//! records) per partition and one `vcpus/<n>` record each, the arch's
//! device records, and the preserved map's roots; and the reverse,
//! adopting a machine from them in the new image. The arch fills in and
//! adopts what only it knows ([`Handover`]).

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

use kho::{HandoverError, HandoverReader, HandoverWriter, RecordError, SubsystemNode, SubsystemWriter};
use sparse_bitmap::MultiOrderBitmap;

use super::{Arch, Machine, MachineMemory, Partition, VcpuSlot};
use crate::guest_console::{LineBuffer, PendingLineError, LINE_MAX};
use crate::partition::{GuestRam, PartitionInfo};
use crate::records::{
    field_text, partition_state_code, partition_state_of, text_field, vcpu_state_code, vcpu_state_of, ConsoleRecord,
    HvRecord, PartitionRecord, VcpuRecord, CONSOLE_LINE_BYTES, CONTEXT_BYTES,
};

// A partition's unfinished console line always fits its record.
const _: () = assert!(LINE_MAX <= CONSOLE_LINE_BYTES);

/// The arch's part of the machine's records.
pub trait Handover: Arch {
    /// Whether partition records name guest images the next image must keep
    /// (SYSTEM_RESET reloads them).
    const IMAGES_PRESERVED: bool;

    /// Fills in the arch's fields of a partition's record: second-stage
    /// root, and the image, initrd and command line if it keeps them.
    fn record_partition(p: &Partition<Self>, rec: &mut PartitionRecord);
    /// Writes the arch's own records of a partition (its virtual interrupt
    /// controller) into its node, beside the partition record.
    fn write_partition_records(p: &Partition<Self>, node: &mut SubsystemWriter<'_>) -> Result<(), SaveError>;
    /// Writes the arch's own subsystems (the IOMMU).
    fn record_devices(&self, w: &mut HandoverWriter) -> Result<(), SaveError>;
    /// Adopts a partition's arch state from its record (its second-stage
    /// table in place, checked) and the arch's own records in its node.
    fn adopt_partition(
        &mut self,
        rec: &PartitionRecord,
        node: &SubsystemNode<'_>,
        ram: &[loader::PhysRange],
    ) -> Result<Self::Partition, RestoreError>;
    /// Rebuilds a vCPU context from its record's bytes, checking what it
    /// points at (a VMCS region) against the preserved map.
    fn restore_context(
        &self,
        format: u32,
        bytes: &[u8],
        preserved: &MultiOrderBitmap<Self::Pages>,
    ) -> Result<Self::Vcpu, RestoreError>;
}

/// Why the machine's state could not be written into the handover.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SaveError {
    /// The handover writer refused a record or node.
    Handover { what: &'static str, error: HandoverError },
    /// A vCPU context does not fit its record.
    ContextTooLarge { vcpu: usize },
    /// The arch's device state cannot be recorded.
    Device(&'static str),
}

impl fmt::Display for SaveError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Handover { what, .. } => write!(f, "{what}-record"),
            Self::ContextTooLarge { .. } => f.write_str("context-too-large"),
            Self::Device(reason) => f.write_str(reason),
        }
    }
}

/// Why the new image could not adopt the machine from the handover.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RestoreError {
    /// A record is missing or does not decode.
    Record { what: &'static str, error: Option<RecordError> },
    /// A partition's RAM is not in the preserved map.
    RamNotPreserved { id: u32 },
    /// A field holds a value no image writes.
    BadField(&'static str),
    /// A vCPU names a partition the handover does not have.
    VcpuPartition { partition: u32 },
    /// The vCPU context has another arch's or version's layout.
    ContextFormat(u32),
    /// A partition's second-stage table did not validate.
    Stage2 { id: u32, error: crate::stage2::AdoptError },
    /// The arch refused something else it adopts.
    Arch(&'static str),
    /// A partition's unfinished console line is not one this hypervisor
    /// could have kept.
    ConsoleLine { id: u32, error: PendingLineError },
}

impl fmt::Display for RestoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Record { what, .. } => write!(f, "{what}-record"),
            Self::RamNotPreserved { .. } => f.write_str("partition-ram-not-preserved"),
            Self::BadField(what) => f.write_str(what),
            Self::VcpuPartition { .. } => f.write_str("vcpu-partition"),
            Self::ContextFormat(_) => f.write_str("vcpu-context-format"),
            Self::Stage2 { .. } => f.write_str("stage2-adopt"),
            Self::Arch(reason) => f.write_str(reason),
            Self::ConsoleLine { .. } => f.write_str("console-line"),
        }
    }
}

/// The version the record `name` in `node` was written with (0 if absent).
fn record_version(node: &SubsystemNode<'_>, name: &str) -> u16 {
    node.records().find(|(n, _)| *n == name).map_or(0, |(_, header)| header.version)
}

fn handover(what: &'static str) -> impl Fn(HandoverError) -> SaveError {
    move |error| SaveError::Handover { what, error }
}

fn record<R: kho::StateRecord>(node: Option<&kho::SubsystemNode<'_>>, what: &'static str) -> Result<R, RestoreError> {
    let node = node.ok_or(RestoreError::Record { what, error: None })?;
    match node.record::<R>() {
        Ok(Some(r)) => Ok(r),
        Ok(None) => Err(RestoreError::Record { what, error: None }),
        Err(e) => Err(RestoreError::Record { what, error: Some(e) }),
    }
}

/// The `console` record of a partition's unfinished line.
fn console_record(console: &LineBuffer) -> ConsoleRecord {
    let pending = console.pending();
    let mut line = [0u8; CONSOLE_LINE_BYTES];
    line[..pending.len()].copy_from_slice(pending);
    ConsoleRecord { len: pending.len() as u32, line }
}

/// A partition's console from its node: the unfinished line it had, or
/// none if the handover predates the `console` record.
fn console_of(node: &kho::SubsystemNode<'_>, id: u32) -> Result<LineBuffer, RestoreError> {
    let rec = match node.record::<ConsoleRecord>() {
        Ok(Some(rec)) => rec,
        Ok(None) => return Ok(LineBuffer::default()),
        Err(e) => return Err(RestoreError::Record { what: "console", error: Some(e) }),
    };
    let len = rec.len as usize;
    let bytes =
        rec.line.get(..len).ok_or(RestoreError::ConsoleLine { id, error: PendingLineError::TooLong { len } })?;
    LineBuffer::with_pending(bytes).map_err(|error| RestoreError::ConsoleLine { id, error })
}

impl<A: Handover> Machine<A> {
    /// Writes the machine's records: every CPU is frozen, so no vCPU
    /// context is loaded or changing.
    pub fn save_state(&self, w: &mut HandoverWriter, freeze_counter: u64, counter_hz: u64) -> Result<(), SaveError> {
        let hv = HvRecord {
            freeze_counter,
            counter_hz,
            cpus: self.online.len() as u32,
            partitions: self.partitions.len() as u32,
            vcpus: self.vcpus.len() as u32,
            images_preserved: A::IMAGES_PRESERVED,
        };
        w.subsystem("hv").and_then(|mut s| s.add_record(&hv)).map_err(handover("hv"))?;
        for p in &self.partitions {
            let mut rec = PartitionRecord {
                id: p.info.id,
                name: text_field(&p.info.name),
                privileged: p.info.privileged,
                state: partition_state_code(p.state),
                ram_host_base: p.info.ram.host_base,
                ram_size: p.info.ram.size,
                stage2_root: 0,
                vmid: u32::from(p.vmid),
                vcpus: p.info.vcpus,
                image_format: 0,
                image_base: 0,
                image_size: 0,
                initrd_base: 0,
                initrd_size: 0,
                cmdline_len: 0,
                cmdline: [0; crate::records::CMDLINE_BYTES],
            };
            A::record_partition(p, &mut rec);
            let mut node = w.subsystem(&alloc::format!("partitions/{}", rec.id)).map_err(handover("partition"))?;
            node.add_record(&rec).map_err(handover("partition"))?;
            node.add_record(&console_record(&p.console)).map_err(handover("console"))?;
            A::write_partition_records(p, &mut node)?;
        }
        for (n, slot) in self.vcpus.iter().enumerate() {
            let mut context = [0u8; CONTEXT_BYTES];
            // SAFETY: every CPU has put its vCPU away (all are frozen), so
            // no context is loaded or changing; this is a shared read.
            let len = A::save_context(unsafe { slot.ctx.as_ref() }, &mut context)
                .ok_or(SaveError::ContextTooLarge { vcpu: n })?;
            let rec = VcpuRecord {
                partition: self.partitions[slot.partition].info.id,
                index: slot.index,
                pcpu: slot.pcpu as u32,
                state: vcpu_state_code(slot.state),
                pending: A::pending_to_v1(slot.pending),
                pending_private: slot.pending,
                context_format: A::CONTEXT_FORMAT,
                context_len: len as u32,
                context,
            };
            w.subsystem(&alloc::format!("vcpus/{n}")).and_then(|mut s| s.add_record(&rec)).map_err(handover("vcpu"))?;
        }
        self.arch.record_devices(w)?;
        for (size, root) in sparse_bitmap::PageSize::ALL.iter().zip(self.preserved.bitmap.roots()) {
            if root != 0 {
                w.add_bitmap_root(kho::BitmapRoot { order: size.order(), root }).map_err(handover("bitmap-root"))?;
            }
        }
        Ok(())
    }
}

/// A machine adopted from a handover, and what the blackout report needs.
#[derive(Debug)]
pub struct Restored<A: Arch> {
    pub machine: Machine<A>,
    /// The outgoing image's counter when it froze the first vCPU.
    pub freeze_counter: u64,
    pub counter_hz: u64,
}

/// Adopts the machine from the handover: each partition (its RAM checked
/// against the preserved map, its second-stage table adopted in place by
/// the arch, its unfinished console line taken up) and each vCPU (its
/// context rebuilt, pinned to the CPU of the same index among `online`, or
/// spread over them if there are fewer).
pub fn restore<A: Handover>(
    reader: &HandoverReader<'_>,
    arch: A,
    memory: MachineMemory<A::Pages>,
    online: &[usize],
) -> Result<Restored<A>, RestoreError> {
    let hv: HvRecord = record(reader.subsystem("hv"), "hv")?;
    let mut m = Machine::new(arch, memory, online);
    let mut partitions = Vec::new();
    for node in reader.children("partitions") {
        let rec: PartitionRecord = record(Some(node), "partition")?;
        let end = rec.ram_host_base.checked_add(rec.ram_size).ok_or(RestoreError::BadField("partition-ram"))?;
        if rec.ram_size == 0 || !m.preserved.bitmap.contains_range(rec.ram_host_base..end) {
            return Err(RestoreError::RamNotPreserved { id: rec.id });
        }
        let part = m.arch.adopt_partition(&rec, node, &m.ram)?;
        partitions.push(Partition {
            info: PartitionInfo {
                id: rec.id,
                name: String::from(field_text(&rec.name)),
                privileged: rec.privileged,
                ram: GuestRam { host_base: rec.ram_host_base, size: rec.ram_size },
                vcpus: rec.vcpus,
            },
            state: partition_state_of(rec.state).ok_or(RestoreError::BadField("partition-state"))?,
            vmid: u16::try_from(rec.vmid).map_err(|_| RestoreError::BadField("vmid"))?,
            vcpus: Vec::new(),
            console: console_of(node, rec.id)?,
            output: Vec::new(),
            arch: part,
        });
    }
    let mut slots = Vec::new();
    for node in reader.children("vcpus") {
        let rec: VcpuRecord = record(Some(node), "vcpu")?;
        if !A::reads_context_format(rec.context_format) {
            return Err(RestoreError::ContextFormat(rec.context_format));
        }
        let p = partitions
            .iter()
            .position(|p| p.info.id == rec.partition)
            .ok_or(RestoreError::VcpuPartition { partition: rec.partition })?;
        let len = (rec.context_len as usize).min(CONTEXT_BYTES);
        let ctx = m.arch.restore_context(rec.context_format, &rec.context[..len], &m.preserved.bitmap)?;
        let want = rec.pcpu as usize;
        let pcpu = if m.online.contains(&want) { want } else { m.online[want % m.online.len()] };
        let n = slots.len();
        partitions[p].vcpus.push(n);
        m.queues[pcpu].push(n);
        slots.push(VcpuSlot::<A> {
            ctx: core::ptr::NonNull::from(alloc::boxed::Box::leak(alloc::boxed::Box::new(ctx))),
            partition: p,
            index: rec.index,
            pcpu,
            state: vcpu_state_of(rec.state).ok_or(RestoreError::BadField("vcpu-state"))?,
            pending: if record_version(node, "vcpu") >= 2 {
                rec.pending_private
            } else {
                A::pending_from_v1(rec.pending)
            },
            start: None,
        });
    }
    m.partitions = partitions;
    m.vcpus = slots;
    m.update_count = reader.update_count();
    Ok(Restored { machine: m, freeze_counter: hv.freeze_counter, counter_hz: hv.counter_hz })
}
