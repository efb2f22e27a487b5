//! The machine's records in the handover (`kho/ABI.md`): the `hv`
//! record; every partition and vCPU in the state table (§4.7) for an
//! image that reads it, else one `partitions/<id>` node (its `partition`,
//! `console` and arch records) per partition and one `vcpus/<n>` record
//! each; the arch's device records, and the preserved map's roots; and the
//! reverse, adopting a machine from either form in the new image. The arch
//! fills in and adopts what only it knows ([`Handover`]).

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

use kho::{HandoverError, HandoverReader, HandoverWriter, RecordError, SubsystemNode};
use sparse_bitmap::MultiOrderBitmap;
use zerocopy::little_endian::U32;

use super::{Arch, Machine, MachineMemory, Partition, VcpuSlot};
use crate::guest_console::{LineBuffer, PendingLineError, LINE_MAX};
use crate::partition::{GuestRam, PartitionInfo};
use crate::records::{
    field_text, partition_state_code, partition_state_of, text_field, vcpu_state_code, vcpu_state_of, ConsoleRecord,
    HvRecord, PartitionRecord, StateTableRecord, VcpuRecord, CONSOLE_LINE_BYTES, CONTEXT_BYTES,
};
use crate::state_table::{Geometry, Table, TableError, TableWriter};

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
    /// The arch's own record of a partition (its virtual interrupt
    /// controller), written beside the partition record or into its state
    /// table entry.
    type PartitionState: kho::StateRecord;
    /// That record for `p` (`None`: the arch has none).
    fn partition_state(p: &Partition<Self>) -> Result<Option<Self::PartitionState>, SaveError>;
    /// The layout of the arch's state in a state table entry
    /// (`kho/ABI.md` §4.7): the state [`Self::PartitionState`] holds, as
    /// bytes, without the record around it.
    const TABLE_STATE_LAYOUT: u32;
    /// Bytes of `p`'s state in that layout.
    fn table_state_len(p: &Partition<Self>) -> usize;
    /// Writes `p`'s state in that layout into `out` (at least
    /// [`Self::table_state_len`] bytes); the bytes used.
    fn write_table_state(p: &Partition<Self>, out: &mut [u8]) -> Result<usize, SaveError>;
    /// The arch's record of the partition `rec` from its state table bytes
    /// in `layout`.
    fn read_table_state(rec: &PartitionRecord, layout: u32, bytes: &[u8])
        -> Result<Self::PartitionState, RestoreError>;
    /// Writes the arch's own subsystems (the IOMMU).
    fn record_devices(&self, w: &mut HandoverWriter) -> Result<(), SaveError>;
    /// Adopts a partition's arch state from its record (its second-stage
    /// table in place, checked) and the arch's own record, if the handover
    /// had one.
    fn adopt_partition(
        &mut self,
        rec: &PartitionRecord,
        state: Option<Self::PartitionState>,
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
    /// The state table (`pages-table`) is missing, misplaced or does not
    /// check.
    Table(TableError),
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
            Self::Table(e) => write!(f, "{e}"),
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
    match node.record::<ConsoleRecord>() {
        Ok(Some(rec)) => console_line(&rec.line, rec.len, id),
        Ok(None) => Ok(LineBuffer::default()),
        Err(e) => Err(RestoreError::Record { what: "console", error: Some(e) }),
    }
}

/// The unfinished line: the first `len` bytes of `line`.
fn console_line(line: &[u8], len: u32, id: u32) -> Result<LineBuffer, RestoreError> {
    let len = len as usize;
    let bytes = line.get(..len).ok_or(RestoreError::ConsoleLine { id, error: PendingLineError::TooLong { len } })?;
    LineBuffer::with_pending(bytes).map_err(|error| RestoreError::ConsoleLine { id, error })
}

/// The block set aside in the brownout for the state table, and where it
/// is.
#[derive(Debug)]
pub struct TableBlock<'a> {
    pub bytes: &'a mut [u8],
    pub at: loader::PhysRange,
}

/// How the partitions and vCPUs went into the handover.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StateForm {
    /// A node per partition and per vCPU (every image reads these).
    Records,
    /// The state table.
    Table,
}

impl<A: Handover> Machine<A> {
    /// The state table's geometry for the machine as it is.
    pub fn table_geometry(&self) -> Option<Geometry> {
        let arch = self.partitions.iter().map(A::table_state_len).max().unwrap_or(0);
        Geometry::new(self.partitions.len(), self.vcpus.len(), arch, A::CONTEXT_MAX)
    }

    /// A partition's `partition` record.
    fn partition_record(p: &Partition<A>) -> PartitionRecord {
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
        rec
    }

    /// Writes the machine's records: every CPU is frozen, so no vCPU
    /// context is loaded or changing. With `table` (the new image reads
    /// the state table, and the block set aside for it in the brownout
    /// still holds the machine), the partitions and vCPUs go into the
    /// table; otherwise into a node each.
    pub fn save_state(
        &self,
        w: &mut HandoverWriter,
        freeze_counter: u64,
        counter_hz: u64,
        table: Option<TableBlock<'_>>,
    ) -> Result<StateForm, SaveError> {
        let hv = HvRecord {
            freeze_counter,
            counter_hz,
            cpus: self.online.len() as u32,
            partitions: self.partitions.len() as u32,
            vcpus: self.vcpus.len() as u32,
            images_preserved: A::IMAGES_PRESERVED,
        };
        w.subsystem("hv").and_then(|mut s| s.add_record(&hv)).map_err(handover("hv"))?;
        let table = table.and_then(|t| Some((TableWriter::new(t.bytes, self.table_geometry()?)?, t.at)));
        let form = if let Some((writer, at)) = table {
            let rec = self.write_table(writer, at.base)?;
            let range = kho::PhysRange::pages(at.base, at.size).map_err(|error| {
                handover("table")(HandoverError::InvalidRange {
                    node: "hv".into(),
                    property: "pages-table".into(),
                    error,
                })
            })?;
            let mut node = w.subsystem("hv").map_err(handover("hv"))?;
            node.add_record(&rec).map_err(handover("table"))?;
            node.add_pages("table", &[range]).map_err(handover("table"))?;
            StateForm::Table
        } else {
            self.write_nodes(w)?;
            StateForm::Records
        };
        self.arch.record_devices(w)?;
        for (size, root) in sparse_bitmap::PageSize::ALL.iter().zip(self.preserved.bitmap.roots()) {
            if root != 0 {
                w.add_bitmap_root(kho::BitmapRoot { order: size.order(), root }).map_err(handover("bitmap-root"))?;
            }
        }
        Ok(form)
    }

    /// The partitions and vCPUs as entries of the state table.
    fn write_table(&self, mut t: TableWriter<'_>, base: u64) -> Result<StateTableRecord, SaveError> {
        for (i, p) in self.partitions.iter().enumerate() {
            let rec = Self::partition_record(p);
            let (e, arch) = t.partition(i);
            e.set(&rec, p.console.pending(), A::TABLE_STATE_LAYOUT);
            let len = A::write_table_state(p, arch)?;
            e.arch_len = U32::new(len as u32);
        }
        for (n, slot) in self.vcpus.iter().enumerate() {
            let (e, context) = t.vcpu(n);
            e.partition = U32::new(self.partitions[slot.partition].info.id);
            e.index = U32::new(slot.index);
            e.pcpu = U32::new(slot.pcpu as u32);
            e.state = U32::new(vcpu_state_code(slot.state));
            e.pending = U32::new(slot.pending);
            e.context_format = U32::new(A::CONTEXT_FORMAT);
            e.reserved = U32::new(0);
            // SAFETY: every CPU has put its vCPU away (all are frozen), so
            // no context is loaded or changing; this is a shared read.
            let len =
                A::save_context(unsafe { slot.ctx.as_ref() }, context).ok_or(SaveError::ContextTooLarge { vcpu: n })?;
            e.context_len = U32::new(len as u32);
        }
        Ok(t.finish(base))
    }

    /// The partitions and vCPUs as a node each (`partitions/<id>`,
    /// `vcpus/<n>`).
    fn write_nodes(&self, w: &mut HandoverWriter) -> Result<(), SaveError> {
        for p in &self.partitions {
            let rec = Self::partition_record(p);
            let mut node = w.subsystem(&alloc::format!("partitions/{}", rec.id)).map_err(handover("partition"))?;
            node.add_record(&rec).map_err(handover("partition"))?;
            node.add_record(&console_record(&p.console)).map_err(handover("console"))?;
            if let Some(state) = A::partition_state(p)? {
                node.add_record(&state).map_err(|error| SaveError::Handover {
                    what: <A::PartitionState as kho::StateRecord>::NAME,
                    error,
                })?;
            }
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

/// Where the handover's state table is (the `hv` node's `table` record and
/// its one `pages-table` range), if it has one.
pub fn table_of(reader: &HandoverReader<'_>) -> Result<Option<(StateTableRecord, loader::PhysRange)>, RestoreError> {
    let Some(node) = reader.subsystem("hv") else { return Ok(None) };
    let rec = match node.record::<StateTableRecord>() {
        Ok(Some(rec)) => rec,
        Ok(None) => return Ok(None),
        Err(e) => return Err(RestoreError::Record { what: "table", error: Some(e) }),
    };
    let range = match node.pages("table") {
        Some([r]) if r.base() == rec.base => loader::PhysRange::new(r.base(), r.size()),
        _ => return Err(RestoreError::Table(TableError::Length { bytes: rec.bytes, pages: 0 })),
    };
    Ok(Some((rec, range)))
}

/// A partition as the handover had it, from its node or its table entry.
struct PartitionIn<S> {
    rec: PartitionRecord,
    console: LineBuffer,
    state: Option<S>,
}

/// A vCPU as the handover had it.
struct VcpuIn<'a> {
    partition: u32,
    index: u32,
    pcpu: u32,
    state: u32,
    /// In the machine's terms.
    pending: u32,
    context_format: u32,
    context: &'a [u8],
}

fn partitions_from_nodes<A: Handover>(
    reader: &HandoverReader<'_>,
) -> Result<Vec<PartitionIn<A::PartitionState>>, RestoreError> {
    let mut out = Vec::new();
    for node in reader.children("partitions") {
        let rec: PartitionRecord = record(Some(node), "partition")?;
        let console = console_of(node, rec.id)?;
        let state = node.record::<A::PartitionState>().map_err(|e| RestoreError::Record {
            what: <A::PartitionState as kho::StateRecord>::NAME,
            error: Some(e),
        })?;
        out.push(PartitionIn { rec, console, state });
    }
    Ok(out)
}

fn partitions_from_table<A: Handover>(table: &Table<'_>) -> Result<Vec<PartitionIn<A::PartitionState>>, RestoreError> {
    let mut out = Vec::with_capacity(table.geometry().partitions as usize);
    for i in 0..table.geometry().partitions {
        let (e, arch) = table.partition(i).map_err(RestoreError::Table)?;
        let rec = e.record().ok_or(RestoreError::BadField("partition-privileged"))?;
        let console = console_line(&e.console, e.console_len.get(), rec.id)?;
        let state = if arch.is_empty() { None } else { Some(A::read_table_state(&rec, e.arch_layout.get(), arch)?) };
        out.push(PartitionIn { rec, console, state });
    }
    Ok(out)
}

/// Adopts the machine from the handover: each partition (its RAM checked
/// against the preserved map, its second-stage table adopted in place by
/// the arch, its unfinished console line taken up) and each vCPU (its
/// context rebuilt, pinned to the CPU of the same index among `online`, or
/// spread over them if there are fewer). `table` is the bytes of the
/// state table's pages if the handover has one ([`table_of`]), already
/// checked to be preserved. `mark` is called as the partitions and then
/// the vCPUs are adopted (the blackout report's steps).
pub fn restore<A: Handover>(
    reader: &HandoverReader<'_>,
    arch: A,
    memory: MachineMemory<A::Pages>,
    online: &[usize],
    table: Option<(&StateTableRecord, &[u8])>,
    mark: &dyn Fn(&'static str),
) -> Result<Restored<A>, RestoreError> {
    let hv: HvRecord = record(reader.subsystem("hv"), "hv")?;
    let table = table.map(|(rec, pages)| Table::parse(rec, pages)).transpose().map_err(RestoreError::Table)?;
    let mut m = Machine::new(arch, memory, online);
    let inputs = match &table {
        Some(t) => partitions_from_table::<A>(t)?,
        None => partitions_from_nodes::<A>(reader)?,
    };
    let mut partitions = Vec::with_capacity(inputs.len());
    for PartitionIn { rec, console, state } in inputs {
        let end = rec.ram_host_base.checked_add(rec.ram_size).ok_or(RestoreError::BadField("partition-ram"))?;
        if rec.ram_size == 0 || !m.preserved.bitmap.contains_range(rec.ram_host_base..end) {
            return Err(RestoreError::RamNotPreserved { id: rec.id });
        }
        let part = m.arch.adopt_partition(&rec, state, &m.ram)?;
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
            console,
            output: Vec::new(),
            arch: part,
        });
    }
    mark("partitions");
    let mut slots = Vec::new();
    let mut adopt_vcpu = |v: VcpuIn<'_>| -> Result<(), RestoreError> {
        if !A::reads_context_format(v.context_format) {
            return Err(RestoreError::ContextFormat(v.context_format));
        }
        let p = partitions
            .iter()
            .position(|p| p.info.id == v.partition)
            .ok_or(RestoreError::VcpuPartition { partition: v.partition })?;
        let ctx = m.arch.restore_context(v.context_format, v.context, &m.preserved.bitmap)?;
        let want = v.pcpu as usize;
        let pcpu = if m.online.contains(&want) { want } else { m.online[want % m.online.len()] };
        let n = slots.len();
        partitions[p].vcpus.push(n);
        m.queues[pcpu].push(n);
        slots.push(VcpuSlot::<A> {
            ctx: core::ptr::NonNull::from(alloc::boxed::Box::leak(alloc::boxed::Box::new(ctx))),
            partition: p,
            index: v.index,
            pcpu,
            state: vcpu_state_of(v.state).ok_or(RestoreError::BadField("vcpu-state"))?,
            pending: v.pending,
            start: None,
        });
        Ok(())
    };
    match &table {
        Some(t) => {
            for i in 0..t.geometry().vcpus {
                let (e, context) = t.vcpu(i).map_err(RestoreError::Table)?;
                adopt_vcpu(VcpuIn {
                    partition: e.partition.get(),
                    index: e.index.get(),
                    pcpu: e.pcpu.get(),
                    state: e.state.get(),
                    pending: e.pending.get(),
                    context_format: e.context_format.get(),
                    context,
                })?;
            }
        }
        None => {
            for node in reader.children("vcpus") {
                let rec: VcpuRecord = record(Some(node), "vcpu")?;
                let len = (rec.context_len as usize).min(CONTEXT_BYTES);
                adopt_vcpu(VcpuIn {
                    partition: rec.partition,
                    index: rec.index,
                    pcpu: rec.pcpu,
                    state: rec.state,
                    pending: if record_version(node, "vcpu") >= 2 {
                        rec.pending_private
                    } else {
                        A::pending_from_v1(rec.pending)
                    },
                    context_format: rec.context_format,
                    context: &rec.context[..len],
                })?;
            }
        }
    }
    mark("vcpus");
    m.partitions = partitions;
    m.vcpus = slots;
    m.update_count = reader.update_count();
    Ok(Restored { machine: m, freeze_counter: hv.freeze_counter, counter_hz: hv.counter_hz })
}
