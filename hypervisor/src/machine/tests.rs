//! The machine on the fake arch: scheduling, stopping and faulting a
//! partition, posting interrupts, hypercall routing, and the handover
//! records written and adopted again, all without an emulator.

extern crate std;

use alloc::boxed::Box;
use alloc::string::{String, ToString};
use alloc::vec;
use alloc::vec::Vec;

use hvcall::{call, Control, PartitionState, UpdateRequest};
use kho::{HandoverError, HandoverIdentity, HandoverReader, HandoverWriter, RecordError, StateRecord, SubsystemWriter};
use loader::PhysRange;
use sparse_bitmap::testing::Arena;

use super::fake::{FakeArch, FakeMemory, FakePartition, FakeVcpu, FAKE_CONTEXT_FORMAT};
use super::*;
use crate::frames::{self, FrameAllocator};
use crate::guest_console::{PendingLineError, LINE_MAX};
use crate::live_update;
use crate::partition::{GuestRam, PartitionInfo, GUEST_RAM_BASE};
use crate::preserved::PreservedMap;
use crate::records::{ConsoleRecord, HvRecord, PartitionRecord, VcpuRecord, CONSOLE_LINE_BYTES, CONTEXT_BYTES};
use crate::sched::VcpuState;
use crate::stage2::FrameSource as _;

const RAM_BASE: u64 = 0x4000_0000;
const RAM_BYTES: u64 = 64 << 20;
/// What the "image" occupies at the bottom of RAM.
const IMAGE: PhysRange = PhysRange { base: RAM_BASE, size: 1 << 20 };
const GUEST_MEM: u64 = 2 << 20;

struct Rig {
    arena: &'static Arena,
    ram: Vec<PhysRange>,
}

impl Rig {
    fn new() -> Self {
        let arena: &'static Arena = Box::leak(Box::new(Arena::new(RAM_BASE, (RAM_BYTES / 4096) as usize)));
        Self { arena, ram: vec![PhysRange::new(RAM_BASE, RAM_BYTES)] }
    }

    fn machine(&self, online: &[usize]) -> Machine<FakeArch> {
        let scratch = live_update::plan_scratch(&self.ram, &[IMAGE], 4 << 20).expect("scratch");
        let mut reserved = vec![IMAGE];
        reserved.extend(scratch.regions().iter().map(|r| PhysRange::new(r.range.base(), r.range.size())));
        let memory = MachineMemory {
            frames: FrameAllocator::new(&frames::subtract(&self.ram, &reserved)),
            preserved: PreservedMap::new(self.arena),
            scratch,
            ram: self.ram.clone(),
        };
        Machine::new(FakeArch::default(), memory, online)
    }
}

fn add_guest(m: &mut Machine<FakeArch>, id: u32, vcpus: u32, privileged: bool) -> usize {
    let block = m.alloc_guest_ram(GUEST_MEM).expect("guest RAM");
    let root = m.preserving_frames().alloc_frame().expect("table page");
    let info = PartitionInfo {
        id,
        name: alloc::format!("guest{id}"),
        privileged,
        ram: GuestRam { host_base: block.base, size: GUEST_MEM },
        vcpus,
    };
    let contexts = (0..vcpus).map(|i| FakeVcpu::at(GUEST_RAM_BASE + u64::from(i) * 0x100)).collect();
    m.add_partition(info, id as u16, FakePartition { stage2_root: root }, contexts).expect("partition")
}

fn ctl(code: u16, fast: bool, reps: u16) -> u64 {
    Control { code, fast, rep_count: reps, rep_start: 0 }.encode()
}

#[test]
fn vcpus_are_spread_round_robin_over_the_online_cpus() {
    let rig = Rig::new();
    let mut m = rig.machine(&[0, 1]);
    add_guest(&mut m, 1, 2, false);
    add_guest(&mut m, 2, 1, false);
    let pcpus: Vec<usize> = m.vcpus.iter().map(|s| s.pcpu).collect();
    assert_eq!(pcpus, [0, 1, 0]);
    assert_eq!(m.queues[0], [0, 2]);
    assert_eq!(m.queues[1], [1]);
    // Only each partition's boot vCPU starts.
    let states: Vec<VcpuState> = m.vcpus.iter().map(|s| s.state).collect();
    assert_eq!(states, [VcpuState::Runnable, VcpuState::Off, VcpuState::Runnable]);
    assert!(!m.cpu_has_work(2));
    // CPUs that are not contiguous (one failed to start) still get work.
    let mut m = rig.machine(&[0, 3]);
    add_guest(&mut m, 1, 2, false);
    assert_eq!(m.vcpus.iter().map(|s| s.pcpu).collect::<Vec<_>>(), [0, 3]);
}

#[test]
fn the_scheduler_keeps_the_loaded_vcpu_until_it_yields() {
    let rig = Rig::new();
    let mut m = rig.machine(&[0]);
    add_guest(&mut m, 1, 1, false);
    add_guest(&mut m, 2, 1, false);
    assert_eq!(m.pick(0, false), Some(0));
    m.loaded[0] = Some(0);
    assert_eq!(m.pick(0, false), Some(0), "no yield: stays");
    assert_eq!(m.pick(0, true), Some(1), "yield: the next one");
    m.vcpus[1].state = VcpuState::Waiting;
    assert_eq!(m.pick(0, true), Some(0), "a waiting vCPU without interrupts is skipped");
    m.vcpus[0].state = VcpuState::Waiting;
    assert_eq!(m.pick(0, true), None, "nothing to run: the CPU idles");
    m.arch.cpu.set(0);
    m.post(1, 1 << 3);
    assert_eq!(m.vcpus[1].state, VcpuState::Runnable);
    assert_eq!(m.vcpus[1].pending, 1 << 3);
    assert!(m.arch.kicks.borrow().is_empty(), "same CPU: no kick");
    assert_eq!(m.pick(0, true), Some(1));
}

#[test]
fn posting_to_a_vcpu_on_another_cpu_kicks_it() {
    let rig = Rig::new();
    let mut m = rig.machine(&[0, 1]);
    add_guest(&mut m, 1, 2, false);
    m.vcpus[1].state = VcpuState::Waiting;
    m.arch.cpu.set(0);
    m.post(1, 1);
    assert_eq!(*m.arch.kicks.borrow(), [1]);
    assert!(m.runnable(1));
}

#[test]
fn a_freeze_applies_the_pending_starts_of_this_cpus_vcpus_only() {
    let rig = Rig::new();
    let mut m = rig.machine(&[0, 1]);
    add_guest(&mut m, 1, 2, false);
    // vCPU 1 (on CPU 1) was turned on and has not run yet; so was vCPU 0
    // (on CPU 0).
    m.vcpus[1].start = Some((0x4000_1000, 0x5a5a));
    m.vcpus[0].start = Some((0x4000_2000, 7));
    let mut applied = Vec::new();
    m.freeze_cpu_with_starts(1, |ctx, pc, x0| {
        ctx.pc = pc;
        ctx.x[0] = x0;
        applied.push((pc, x0));
    });
    assert_eq!(applied, [(0x4000_1000, 0x5a5a)]);
    assert_eq!(m.vcpus[1].start, None, "taken: the context holds it now");
    // SAFETY: host test; nothing runs the vCPUs.
    let ctx = unsafe { m.ctx_mut(1) };
    assert_eq!((ctx.pc, ctx.x[0]), (0x4000_1000, 0x5a5a));
    assert_eq!(m.vcpus[0].start, Some((0x4000_2000, 7)), "another CPU's vCPU is its own CPU's to freeze");
}

#[test]
fn put_loaded_saves_only_this_cpus_loaded_vcpu() {
    let rig = Rig::new();
    let mut m = rig.machine(&[0, 1]);
    add_guest(&mut m, 1, 2, false);
    m.loaded[0] = Some(0);
    m.put_loaded(0);
    m.put_loaded(0);
    assert_eq!(m.loaded[0], None);
    // SAFETY: host test; nothing runs the vCPUs.
    let (a, b) = unsafe { (m.ctx_mut(0).puts, m.ctx_mut(1).puts) };
    assert_eq!((a, b), (1, 0));
    m.loaded[1] = Some(1);
    m.vcpus[1].state = VcpuState::Off;
    m.put_if_idle(1);
    assert_eq!(m.loaded[1], None);
}

#[test]
fn stopping_a_partition_kicks_its_cpus_and_spares_the_others() {
    let rig = Rig::new();
    let mut m = rig.machine(&[0, 1]);
    add_guest(&mut m, 1, 2, false);
    add_guest(&mut m, 2, 1, false);
    m.vcpus[1].state = VcpuState::Runnable;
    m.arch.cpu.set(0);
    m.stop_partition(0, PartitionState::Stopped, "shutdown");
    assert_eq!(m.partitions[0].state, PartitionState::Stopped);
    assert!(m.partitions[0].vcpus.iter().all(|&v| m.vcpus[v].state == VcpuState::Stopped));
    assert_eq!(*m.arch.kicks.borrow(), [1], "vCPU 1 runs on CPU 1: kicked");
    assert_eq!(m.partitions[1].state, PartitionState::Running);
    assert!(m.runnable(2));
    assert_eq!(m.arch.powered_off, None);
    assert!(m.cpu_has_work(0) && !m.cpu_has_work(1));
    // Stopping twice changes nothing.
    m.stop_partition(0, PartitionState::Faulted, "again");
    assert_eq!(m.partitions[0].state, PartitionState::Stopped);
    // The last one powers the machine off, once.
    m.fault(2, "stage2", 0x4800_0000, ("esr", 0x8200_0006));
    assert_eq!(m.partitions[1].state, PartitionState::Faulted);
    assert_eq!(m.arch.powered_off, Some(true));
    assert!(m.shutting_down);
}

#[test]
fn a_fault_stops_only_the_faulting_partition() {
    let rig = Rig::new();
    let mut m = rig.machine(&[0]);
    add_guest(&mut m, 1, 1, false);
    add_guest(&mut m, 2, 1, false);
    m.fault(1, "ept", 0xdead_0000, ("rip", 0x1000));
    assert_eq!(m.partitions[1].state, PartitionState::Faulted);
    assert_eq!(m.partitions[0].state, PartitionState::Running);
    assert_eq!(m.pick(0, true), Some(0));
    assert_eq!(m.pick(0, false), Some(0));
}

#[test]
fn hypercalls_route_console_shutdown_updates_and_the_freeze_hook() {
    let rig = Rig::new();
    let mut m = rig.machine(&[0]);
    add_guest(&mut m, 1, 1, true);
    add_guest(&mut m, 2, 1, false);
    let host = m.partitions[0].info.ram.host_base;
    let mut mem = FakeMemory { base: host, bytes: vec![0; GUEST_MEM as usize] };
    mem.bytes[0x100..0x10c].copy_from_slice(b"hello\nworld\n");
    let r = m.hypercall(0, ctl(call::CONSOLE_WRITE, false, 12), GUEST_RAM_BASE + 0x100, 0, &mut mem);
    assert_eq!((r.result, r.next), (12 << 32, Next::Resume));
    assert_eq!(m.take_output(), [String::from("guest1: hello"), String::from("guest1: world")]);
    assert!(m.take_output().is_empty());

    mem.bytes[0x300..0x310]
        .copy_from_slice(&UpdateRequest { image_gpa: GUEST_RAM_BASE + 0x1000, image_size: 0x800 }.to_bytes());
    let r = m.hypercall(0, ctl(call::LIVE_UPDATE, false, 0), GUEST_RAM_BASE + 0x300, 0, &mut mem);
    assert_eq!(r.next, Next::LiveUpdate { image_pa: host + 0x1000, size: 0x800 });

    let r = m.hypercall(0, ctl(call::TEST_FAIL_NEXT_FREEZE, true, 0), 0, 0, &mut mem);
    assert_eq!((r.result, r.next), (0, Next::Resume));
    assert!(m.fail_next_freeze);

    let r = m.hypercall(0, ctl(call::GET_PARTITION_STATE, true, 0), 2, 0, &mut mem);
    assert_eq!(r.fast_output, Some(0), "partition 2 is running");

    // An unprivileged partition is refused the update, and its bad input
    // is a status, not a stop.
    let r = m.hypercall(1, ctl(call::LIVE_UPDATE, false, 0), GUEST_RAM_BASE + 0x300, 0, &mut mem);
    assert_eq!(r.next, Next::Resume);
    assert_ne!(r.result & 0xffff, 0);
    let r = m.hypercall(1, 0xffff_ffff_ffff_ffff, 0, 0, &mut mem);
    assert_eq!(r.next, Next::Resume);
    assert_eq!(m.partitions[1].state, PartitionState::Running);

    let r = m.hypercall(1, ctl(call::SHUTDOWN_SELF, true, 0), 0, 0, &mut mem);
    assert_eq!(r.next, Next::Reschedule);
    assert_eq!(m.partitions[1].state, PartitionState::Stopped);
    assert_eq!(m.partitions[0].state, PartitionState::Running);
}

/// Writes the machine's records into a handover blob placed in the
/// machine's own (arena) RAM, as the outgoing image does.
fn handover_of(m: &mut Machine<FakeArch>) -> (Vec<u8>, u64) {
    handover_in(m, None).0
}

/// The same; with `table` (the arena), the partitions and vCPUs go into a
/// state table in a block of the arena, whose range is returned too.
fn handover_in(m: &mut Machine<FakeArch>, table: Option<&Arena>) -> ((Vec<u8>, u64), Option<PhysRange>) {
    let identity = HandoverIdentity { version: "test", build_id: "t", update_count: 1 };
    let ram_map = live_update::ram_map(&m.ram).expect("ram map");
    let mut w = HandoverWriter::new(&identity, ram_map, &m.scratch).expect("writer");
    let bytes = m.table_geometry().and_then(|g| g.bytes()).expect("geometry") as u64;
    let at = table.map(|_| m.frames.alloc_block(bytes).expect("table block"));
    let block = table.zip(at).map(|(arena, at)| {
        let first = sparse_bitmap::PhysToVirt::phys_to_virt(arena, at.base);
        // SAFETY: a block of the arena just allocated, its pages one run
        // (the arena is one allocation); nothing else uses it.
        TableBlock { bytes: unsafe { core::slice::from_raw_parts_mut(first, at.size as usize) }, at }
    });
    let form = m.save_state(&mut w, 1234, 1_000_000, block).expect("save");
    assert_eq!(form, if table.is_some() { StateForm::Table } else { StateForm::Records });
    let block = m.frames.alloc_block(live_update::HANDOVER_BYTES).expect("handover block");
    let mut blob = vec![0u8; block.size as usize];
    let n = w.write_to(&mut blob, block.base).expect("write");
    blob.truncate(n);
    ((blob, block.base), at)
}

#[test]
fn the_machine_survives_its_own_handover() {
    survives_its_own_handover(false);
}

#[test]
fn the_machine_survives_its_own_handover_through_the_state_table() {
    survives_its_own_handover(true);
}

fn survives_its_own_handover(table: bool) {
    let rig = Rig::new();
    let mut m = rig.machine(&[0, 1]);
    add_guest(&mut m, 1, 2, true);
    add_guest(&mut m, 2, 1, false);
    add_guest(&mut m, 3, 1, false);
    m.vcpus[1].state = VcpuState::Waiting;
    m.vcpus[1].pending = 1 << 16;
    // SAFETY: host test; nothing runs the vCPUs.
    unsafe { m.ctx_mut(2).x = [1, 2, 3, 4] };
    m.fault(3, "stage2", 0, ("esr", 0));
    m.update_count = 6;
    let ((blob, blob_pa), table_at) = handover_in(&mut m, table.then_some(rig.arena));
    let preserved_before = m.preserved.bitmap.frame_count();

    let ram_map = live_update::ram_map(&rig.ram).expect("ram map");
    let reader = HandoverReader::new(&blob, blob_pa, &ram_map).expect("valid handover");
    // SAFETY: the arena holds the bitmap; nothing else uses it.
    let (n, figures) =
        unsafe { live_update::restore(&reader, &rig.ram, vec![IMAGE], rig.arena, FakeArch::default(), &[0, 1], || 0) }
            .expect("restore");
    assert_eq!(figures.freeze_counter, 1234);
    assert_eq!(figures.preserved_pages, preserved_before);
    assert_eq!(figures.table, table_at, "the table is found where it was written");
    let reader_nodes = reader.subsystems().iter().filter(|n| n.path().starts_with("partitions")).count();
    assert_eq!(reader_nodes == 0, table, "a node per partition only without the table");
    assert_eq!(n.update_count, 1, "the handover's count");
    assert_eq!(n.partitions.len(), 3);
    for (a, b) in m.partitions.iter().zip(&n.partitions) {
        assert_eq!(a.info, b.info);
        assert_eq!((a.state, a.vmid, &a.vcpus), (b.state, b.vmid, &b.vcpus));
        assert_eq!(a.arch, b.arch, "the second-stage root is adopted in place");
    }
    for (v, (a, b)) in m.vcpus.iter().zip(&n.vcpus).enumerate() {
        assert_eq!(
            (a.partition, a.index, a.pcpu, a.state, a.pending),
            (b.partition, b.index, b.pcpu, b.state, b.pending)
        );
        // SAFETY: host test; nothing runs the vCPUs.
        let (x, y) = unsafe { (m.ctx_mut(v).clone(), n.ctx_mut(v).clone()) };
        assert_eq!((x.pc, x.x), (y.pc, y.x));
    }
    assert_eq!(n.queues[0], m.queues[0]);
    // Nothing preserved is free in the new allocator: guest RAM and
    // table pages are never handed out again.
    let mut n = n;
    for p in &m.partitions {
        let ram = p.info.ram;
        while let Some(b) = n.frames.alloc_block(1 << 20) {
            assert!(b.base >= ram.host_base + ram.size || b.base + b.size <= ram.host_base, "preserved RAM reused");
            assert_ne!(b.base, p.arch.stage2_root & !0xf_ffff);
            if let Some(t) = table_at {
                assert!(b.base >= t.base + t.size || b.base + b.size <= t.base, "the state table handed out");
            }
        }
    }

    // On fewer CPUs, the vCPUs are folded onto the ones there are.
    let reader = HandoverReader::new(&blob, blob_pa, &ram_map).expect("valid handover");
    // SAFETY: as above.
    let (one, _) =
        unsafe { live_update::restore(&reader, &rig.ram, vec![IMAGE], rig.arena, FakeArch::default(), &[0], || 0) }
            .expect("restore on one CPU");
    assert!(one.vcpus.iter().all(|s| s.pcpu == 0));
    assert_eq!(one.queues[0].len(), 4);
}

/// A fault between the freeze of one CPU and another's (the requester has
/// put its vCPUs away; CPU 1 takes a guest exit before it reaches its exit
/// boundary): the partition is stopped before it is recorded, so the new
/// image adopts it stopped and never runs it, and the others as they were.
#[test]
fn a_partition_stopped_while_the_cpus_freeze_stays_stopped_in_the_new_image() {
    let rig = Rig::new();
    let mut m = rig.machine(&[0, 1]);
    add_guest(&mut m, 1, 1, true); // vCPU 0, CPU 0: the requester
    add_guest(&mut m, 2, 1, false); // vCPU 1, CPU 1: faults
    add_guest(&mut m, 3, 1, false); // vCPU 2, CPU 0
    add_guest(&mut m, 4, 1, false); // vCPU 3, CPU 1
    m.loaded[0] = Some(0);
    m.freeze_cpu_with_starts(0, |_, _, _| {});
    m.arch.cpu.set(1);
    m.loaded[1] = Some(1);
    m.fault(1, "undecodable-mmio", 0x0900_0000, ("esr", 0x9200_0005));
    m.freeze_cpu_with_starts(1, |_, _, _| {});
    assert!(m.loaded.iter().all(Option::is_none), "both CPUs put their vCPUs away");
    let (blob, blob_pa) = handover_of(&mut m);

    let ram_map = live_update::ram_map(&rig.ram).expect("ram map");
    let reader = HandoverReader::new(&blob, blob_pa, &ram_map).expect("valid handover");
    // SAFETY: the arena holds the bitmap; nothing else uses it.
    let (n, _) =
        unsafe { live_update::restore(&reader, &rig.ram, vec![IMAGE], rig.arena, FakeArch::default(), &[0, 1], || 0) }
            .expect("restore");
    let states: Vec<PartitionState> = n.partitions.iter().map(|p| p.state).collect();
    assert_eq!(
        states,
        [PartitionState::Running, PartitionState::Faulted, PartitionState::Running, PartitionState::Running]
    );
    assert_eq!(n.vcpus[1].state, VcpuState::Stopped);
    assert_eq!(n.pick(1, false), Some(3), "CPU 1 runs the partition beside, never the stopped one");
    assert_eq!(n.pick(1, true), Some(3));
    assert!(!n.runnable(1));
    assert!(n.runnable(0) && n.runnable(2));
}

#[test]
fn restore_refuses_records_it_cannot_trust() {
    let rig = Rig::new();
    let mut m = rig.machine(&[0]);
    add_guest(&mut m, 1, 1, false);
    let ram_map = live_update::ram_map(&rig.ram).expect("ram map");
    let identity = HandoverIdentity { version: "test", build_id: "t", update_count: 1 };
    let restore_with = |w: &HandoverWriter, m: &mut Machine<FakeArch>| {
        let block = m.frames.alloc_block(live_update::HANDOVER_BYTES).expect("block");
        let mut blob = vec![0u8; block.size as usize];
        let len = w.write_to(&mut blob, block.base).expect("write");
        blob.truncate(len);
        let reader = HandoverReader::new(&blob, block.base, &ram_map).expect("reader");
        // SAFETY: the arena holds the bitmap.
        unsafe { live_update::restore(&reader, &rig.ram, vec![IMAGE], rig.arena, FakeArch::default(), &[0], || 0) }
            .map(|_| ())
    };

    // A vCPU context of another arch or version.
    let mut w = HandoverWriter::new(&identity, ram_map.clone(), &m.scratch).expect("writer");
    m.save_state(&mut w, 1, 1, None).expect("save");
    let bad = VcpuRecord {
        partition: 1,
        index: 1,
        pcpu: 0,
        state: 1,
        pending: 0,
        context_format: 0x8664_0001,
        context_len: 8,
        context: [0; CONTEXT_BYTES],
        pending_private: 0,
    };
    w.subsystem("vcpus/9").and_then(|mut s| s.add_record(&bad)).expect("record");
    assert_eq!(
        restore_with(&w, &mut m),
        Err(live_update::AdoptFailure::Machine(RestoreError::ContextFormat(0x8664_0001)))
    );

    // A vCPU of a partition that is not there.
    let mut w = HandoverWriter::new(&identity, ram_map.clone(), &m.scratch).expect("writer");
    m.save_state(&mut w, 1, 1, None).expect("save");
    let orphan = VcpuRecord { partition: 7, context_format: FAKE_CONTEXT_FORMAT, context_len: 40, ..bad };
    w.subsystem("vcpus/9").and_then(|mut s| s.add_record(&orphan)).expect("record");
    assert_eq!(
        restore_with(&w, &mut m),
        Err(live_update::AdoptFailure::Machine(RestoreError::VcpuPartition { partition: 7 }))
    );

    // A partition whose RAM was never preserved.
    let mut w = HandoverWriter::new(&identity, ram_map.clone(), &m.scratch).expect("writer");
    m.partitions[0].info.ram.host_base = RAM_BASE + RAM_BYTES - GUEST_MEM;
    m.save_state(&mut w, 1, 1, None).expect("save");
    assert_eq!(
        restore_with(&w, &mut m),
        Err(live_update::AdoptFailure::Machine(RestoreError::RamNotPreserved { id: 1 }))
    );
}

/// Adopts a machine from a handover blob at `blob_pa` in the rig's RAM.
fn restore_blob(rig: &Rig, blob: &[u8], blob_pa: u64) -> Result<Machine<FakeArch>, live_update::AdoptFailure> {
    let ram_map = live_update::ram_map(&rig.ram).expect("ram map");
    let reader = HandoverReader::new(blob, blob_pa, &ram_map).expect("valid handover");
    // SAFETY: the arena holds the bitmap; nothing else uses it.
    unsafe { live_update::restore(&reader, &rig.ram, vec![IMAGE], rig.arena, FakeArch::default(), &[0], || 0) }
        .map(|(m, _)| m)
}

/// The machine's handover written again record by record, each
/// partition's `console` record replaced by what `console` adds in its
/// place (nothing: as an image from before the record wrote it).
fn rewritten(
    m: &mut Machine<FakeArch>,
    blob: &[u8],
    blob_pa: u64,
    console: impl Fn(&mut SubsystemWriter<'_>, ConsoleRecord) -> Result<(), HandoverError>,
) -> (Vec<u8>, u64) {
    let ram_map = live_update::ram_map(&m.ram).expect("ram map");
    let reader = HandoverReader::new(blob, blob_pa, &ram_map).expect("valid handover");
    let identity = HandoverIdentity {
        version: reader.previous_version(),
        build_id: reader.previous_build_id(),
        update_count: reader.update_count(),
    };
    let mut w = HandoverWriter::new(&identity, ram_map.clone(), reader.scratch()).expect("writer");
    for root in reader.bitmap_roots() {
        w.add_bitmap_root(*root).expect("root");
    }
    let hv: HvRecord = reader.subsystem("hv").and_then(|n| n.record().ok().flatten()).expect("hv");
    w.subsystem("hv").and_then(|mut s| s.add_record(&hv)).expect("hv");
    for node in reader.children("partitions") {
        let rec: PartitionRecord = node.record().ok().flatten().expect("partition");
        let line: ConsoleRecord = node.record().ok().flatten().expect("console");
        let mut s = w.subsystem(node.path()).expect("node");
        s.add_record(&rec).expect("partition");
        console(&mut s, line).expect("console");
    }
    for node in reader.children("vcpus") {
        let rec: VcpuRecord = node.record().ok().flatten().expect("vcpu");
        w.subsystem(node.path()).and_then(|mut s| s.add_record(&rec)).expect("vcpu");
    }
    let block = m.frames.alloc_block(live_update::HANDOVER_BYTES).expect("handover block");
    let mut out = vec![0u8; block.size as usize];
    let n = w.write_to(&mut out, block.base).expect("write");
    out.truncate(n);
    (out, block.base)
}

#[test]
fn an_unfinished_console_line_crosses_updates_and_ends_as_one_line() {
    let rig = Rig::new();
    let mut m = rig.machine(&[0]);
    for id in 1..=3 {
        add_guest(&mut m, id, 1, false);
    }
    m.console_bytes(0, b"whole\nINFO: vtimer-busy-loop: Expected   : 0x00");
    m.console_bytes(2, &[b'z'; LINE_MAX]);
    assert_eq!(m.take_output(), ["guest1: whole"]);

    let (blob, pa) = handover_of(&mut m);
    let mut n = restore_blob(&rig, &blob, pa).expect("restore");
    assert_eq!(n.partitions[0].console.pending(), b"INFO: vtimer-busy-loop: Expected   : 0x00");
    assert!(n.partitions[1].console.pending().is_empty(), "nothing pending: an empty record");
    assert_eq!(n.partitions[2].console.pending(), [b'z'; LINE_MAX], "a full line");
    n.console_bytes(0, b"00002a");
    n.console_bytes(1, b"fresh\n");
    n.console_bytes(2, b"!\n");
    n.console_bytes(0, b"\nnext ");
    let z = "z".repeat(LINE_MAX);
    assert_eq!(
        n.take_output(),
        [
            "guest1: INFO: vtimer-busy-loop: Expected   : 0x0000002a".to_string(),
            "guest2: fresh".to_string(),
            std::format!("guest3: {z}"),
            "guest3: !".to_string(),
        ]
    );

    // The next update carries the next unfinished line.
    let (blob, pa) = handover_of(&mut n);
    let mut o = restore_blob(&rig, &blob, pa).expect("restore again");
    o.console_bytes(0, b"line\n");
    assert_eq!(o.take_output(), ["guest1: next line"]);
}

#[test]
fn a_handover_without_console_records_restores_with_empty_lines() {
    let rig = Rig::new();
    let mut m = rig.machine(&[0]);
    add_guest(&mut m, 1, 1, false);
    add_guest(&mut m, 2, 2, true);
    m.console_bytes(0, b"lost with an older image");
    let (blob, pa) = handover_of(&mut m);
    let (old, old_pa) = rewritten(&mut m, &blob, pa, |_, _| Ok(()));
    let ram_map = live_update::ram_map(&rig.ram).expect("ram map");
    let reader = HandoverReader::new(&old, old_pa, &ram_map).expect("valid handover");
    assert!(reader.children("partitions").all(|n| n.records().all(|(name, _)| name == "partition")));

    let mut n = restore_blob(&rig, &old, old_pa).expect("an older handover restores");
    assert_eq!(n.partitions.len(), 2);
    assert!(n.partitions.iter().all(|p| p.console.pending().is_empty()));
    assert_eq!(n.vcpus.len(), 3);
    n.console_bytes(0, b"new line\n");
    assert_eq!(n.take_output(), ["guest1: new line"]);
}

mod console_v2 {
    kho::state_record! {
        /// A later version of the console record that older readers must
        /// refuse.
        pub struct ConsoleRecord {
            const ID = 0x0001_0006;
            const NAME = "console";
            const VERSION = 2;
            const MIN_READER_VERSION = 2;
            pub len: u32 [since 1],
            pub line: [u8; 256] [since 1],
            pub colour: u32 [since 2],
        }
    }
}

#[test]
fn a_console_record_that_does_not_fit_is_refused() {
    let rig = Rig::new();
    let mut m = rig.machine(&[0]);
    add_guest(&mut m, 1, 1, false);
    m.console_bytes(0, b"half");
    let (blob, pa) = handover_of(&mut m);
    let refused = |m: &mut Machine<FakeArch>, edit: &dyn Fn(ConsoleRecord) -> ConsoleRecord| {
        let (bad, bad_pa) = rewritten(m, &blob, pa, |s, rec| s.add_record(&edit(rec)));
        match restore_blob(&rig, &bad, bad_pa) {
            Err(live_update::AdoptFailure::Machine(e)) => e,
            other => panic!("restored: {other:?}"),
        }
    };

    let len = CONSOLE_LINE_BYTES as u32 + 1;
    assert_eq!(
        refused(&mut m, &|r| ConsoleRecord { len, ..r }),
        RestoreError::ConsoleLine { id: 1, error: PendingLineError::TooLong { len: len as usize } }
    );
    assert_eq!(
        refused(&mut m, &|r| ConsoleRecord { len: u32::MAX, ..r }),
        RestoreError::ConsoleLine { id: 1, error: PendingLineError::TooLong { len: u32::MAX as usize } }
    );
    let e = refused(&mut m, &|mut r| {
        r.line[1] = b'\n';
        r
    });
    assert_eq!(e, RestoreError::ConsoleLine { id: 1, error: PendingLineError::Byte { at: 1, byte: b'\n' } });
    assert_eq!(e.to_string(), "console-line");

    let (newer, newer_pa) = rewritten(&mut m, &blob, pa, |s, r| {
        s.add_record(&console_v2::ConsoleRecord { len: r.len, line: r.line, colour: 3 })
    });
    assert_eq!(
        restore_blob(&rig, &newer, newer_pa).map(|_| ()),
        Err(live_update::AdoptFailure::Machine(RestoreError::Record {
            what: "console",
            error: Some(RecordError::TooNew {
                id: ConsoleRecord::ID,
                version: 2,
                min_reader_version: 2,
                reader_version: 1
            })
        }))
    );
}

mod fuzz {
    use super::*;
    use proptest::prelude::*;

    /// Arbitrary field values for the records the machine restores.
    fn vcpu_fields() -> impl Strategy<Value = (u32, u32, u32, u32, u32, u32, u32)> {
        (
            0..4u32,
            0..4u32,
            any::<u32>(),
            0..6u32,
            any::<u32>(),
            prop_oneof![Just(FAKE_CONTEXT_FORMAT), any::<u32>()],
            0..3000u32,
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

        /// A handover whose machine records hold arbitrary values (ids,
        /// states, CPUs, context formats and lengths, RAM and table
        /// addresses) restores or is refused with a typed error; it never
        /// panics, and a machine it restores is consistent.
        #[test]
        fn arbitrary_machine_records_restore_or_are_refused(
            part in (0..4u32, 0..5u32, any::<u64>(), prop_oneof![Just(0u64), any::<u64>()], any::<u64>(), 0..4u32),
            vcpus in proptest::collection::vec(vcpu_fields(), 0..4),
        ) {
            let rig = Rig::new();
            let mut m = rig.machine(&[0]);
            add_guest(&mut m, 1, 1, false);
            let identity = HandoverIdentity { version: "t", build_id: "t", update_count: 1 };
            let ram_map = live_update::ram_map(&rig.ram).expect("ram map");
            let mut w = HandoverWriter::new(&identity, ram_map.clone(), &m.scratch).expect("writer");
            m.save_state(&mut w, 1, 1, None).expect("save");
            // One more partition and its vCPUs, with arbitrary fields.
            let (id, state, ram_base, ram_size, root, nvcpus) = part;
            let rec = PartitionRecord {
                id,
                name: crate::records::text_field("x"),
                privileged: false,
                state,
                ram_host_base: ram_base,
                ram_size,
                stage2_root: root,
                vmid: id,
                vcpus: nvcpus,
                image_format: 0,
                image_base: 0,
                image_size: 0,
                initrd_base: 0,
                initrd_size: 0,
                cmdline_len: 0,
                cmdline: [0; crate::records::CMDLINE_BYTES],
            };
            w.subsystem("partitions/99").and_then(|mut s| s.add_record(&rec)).expect("partition");
            for (k, (partition, index, pcpu, state, pending, format, len)) in vcpus.into_iter().enumerate() {
                let rec = VcpuRecord {
                    partition,
                    index,
                    pcpu,
                    state,
                    pending,
                    context_format: format,
                    context_len: len,
                    context: [0; CONTEXT_BYTES],
                    pending_private: pending,
                };
                w.subsystem(&alloc::format!("vcpus/{}", 90 + k)).and_then(|mut s| s.add_record(&rec)).expect("vcpu");
            }
            let block = m.frames.alloc_block(live_update::HANDOVER_BYTES).expect("block");
            let mut blob = vec![0u8; block.size as usize];
            let n = w.write_to(&mut blob, block.base).expect("write");
            blob.truncate(n);
            if let Ok(restored) = restore_blob(&rig, &blob, block.base) {
                for slot in &restored.vcpus {
                    prop_assert!(slot.partition < restored.partitions.len());
                    prop_assert!(restored.online.contains(&slot.pcpu));
                }
                for (p, part) in restored.partitions.iter().enumerate() {
                    prop_assert!(part.vcpus.iter().all(|&v| restored.vcpus[v].partition == p));
                }
            }
        }
    }
}

mod vcpu_v1 {
    kho::state_record! {
        /// The `vcpu` record as version 1 wrote it (no `pending_private`).
        pub struct VcpuRecord {
            const ID = 0x0001_0003;
            const NAME = "vcpu";
            const VERSION = 1;
            const MIN_READER_VERSION = 1;
            pub partition: u32 [since 1],
            pub index: u32 [since 1],
            pub pcpu: u32 [since 1],
            pub state: u32 [since 1],
            pub pending: u32 [since 1],
            pub context_format: u32 [since 1],
            pub context_len: u32 [since 1],
            pub context: [u8; 2048] [since 1],
        }
    }
}

/// A `vcpu` record from a version-1 writer is read through the arch's
/// version-1 meaning of `pending`; a version-2 one through
/// `pending_private`; and a version-1 reader still reads what version 2
/// writes.
#[test]
fn vcpu_records_of_both_versions_restore() {
    let rig = Rig::new();
    let mut m = rig.machine(&[0]);
    add_guest(&mut m, 1, 1, false);
    m.vcpus[0].pending = 0b101;
    let (blob, pa) = handover_of(&mut m);
    let restored = restore_blob(&rig, &blob, pa).expect("restore");
    assert_eq!(restored.vcpus[0].pending, 0b101, "version 2: pending_private");

    let ram_map = live_update::ram_map(&rig.ram).expect("ram map");
    let reader = HandoverReader::new(&blob, pa, &ram_map).expect("reader");
    let v2: VcpuRecord = reader.subsystem("vcpus/0").and_then(|n| n.record().ok().flatten()).expect("vcpu");
    let node = reader.subsystem("vcpus/0").expect("node");
    assert_eq!(node.record::<vcpu_v1::VcpuRecord>().expect("a v1 reader reads v2").map(|r| r.pending), Some(0b101));

    // Written again with a version-1 record whose pending says 0b11.
    let identity = HandoverIdentity { version: "t", build_id: "t", update_count: 1 };
    let mut w = HandoverWriter::new(&identity, ram_map.clone(), reader.scratch()).expect("writer");
    for root in reader.bitmap_roots() {
        w.add_bitmap_root(*root).expect("root");
    }
    for node in reader.subsystems().iter().filter(|n| !n.path().starts_with("vcpus")) {
        let mut s = w.subsystem(node.path()).expect("node");
        for (name, _) in node.records() {
            if name == "hv" {
                s.add_record(&node.record::<HvRecord>().ok().flatten().expect("hv")).expect("hv");
            } else if name == "partition" {
                s.add_record(&node.record::<PartitionRecord>().ok().flatten().expect("p")).expect("p");
            } else if name == "console" {
                s.add_record(&node.record::<ConsoleRecord>().ok().flatten().expect("c")).expect("c");
            }
        }
    }
    let old = vcpu_v1::VcpuRecord {
        partition: v2.partition,
        index: v2.index,
        pcpu: v2.pcpu,
        state: v2.state,
        pending: 0b11,
        context_format: v2.context_format,
        context_len: v2.context_len,
        context: v2.context,
    };
    w.subsystem("vcpus/0").and_then(|mut s| s.add_record(&old)).expect("vcpu");
    let block = m.frames.alloc_block(live_update::HANDOVER_BYTES).expect("block");
    let mut out = vec![0u8; block.size as usize];
    let n = w.write_to(&mut out, block.base).expect("write");
    out.truncate(n);
    let restored = restore_blob(&rig, &out, block.base).expect("restore from version 1");
    assert_eq!(restored.vcpus[0].pending, FakeArch::pending_from_v1(0b11));
}

/// A partition the arch refuses is skipped; the others are built.
#[test]
fn a_refused_partition_does_not_stop_the_others() {
    #[derive(Debug)]
    struct NoRoom;
    impl core::fmt::Display for NoRoom {
        fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
            f.write_str("no-room")
        }
    }
    impl Refusal for NoRoom {}
    let rig = Rig::new();
    let mut m = rig.machine(&[0, 1]);
    let specs: Vec<loader::manifest::GuestSpec> =
        loader::manifest::parse(b"hvmanifest 1\nguest name=a image=0x40000000 image_size=0x1000 format=flat mem_mib=2 vcpus=1 privileged=0\nguest name=b image=0x40000000 image_size=0x1000 format=flat mem_mib=2 vcpus=1 privileged=0\nguest name=c image=0x40000000 image_size=0x1000 format=flat mem_mib=2 vcpus=1 privileged=0\n\0")
            .expect("manifest");
    let n = m.build_partitions(&specs, |m, id, _| {
        if id == 2 {
            return Err(NoRoom);
        }
        add_guest(m, id, 1, false);
        Ok(())
    });
    assert_eq!(n, 2);
    let ids: Vec<u32> = m.partitions.iter().map(|p| p.info.id).collect();
    assert_eq!(ids, [1, 3]);
}

#[test]
fn a_table_block_too_small_for_the_machine_falls_back_to_a_node_each() {
    let rig = Rig::new();
    let mut m = rig.machine(&[0]);
    add_guest(&mut m, 1, 2, true);
    let identity = HandoverIdentity { version: "test", build_id: "t", update_count: 1 };
    let ram_map = live_update::ram_map(&m.ram).expect("ram map");
    let mut w = HandoverWriter::new(&identity, ram_map, &m.scratch).expect("writer");
    // Set aside for one partition and one vCPU (the brownout's count); a
    // vCPU more by the freeze.
    let small = crate::state_table::Geometry::new(1, 1, 0, CONTEXT_BYTES).and_then(|g| g.bytes()).expect("size");
    let mut bytes = vec![0u8; small];
    let block = TableBlock { bytes: &mut bytes, at: PhysRange::new(RAM_BASE, 4096) };
    assert_eq!(m.save_state(&mut w, 1, 1, Some(block)), Ok(StateForm::Records));
    assert!(bytes.iter().all(|&b| b == 0), "nothing written into a block too small");
}

#[test]
fn a_state_table_that_does_not_check_is_refused_whole() {
    let rig = Rig::new();
    let mut m = rig.machine(&[0]);
    add_guest(&mut m, 1, 1, true);
    add_guest(&mut m, 2, 1, false);
    let ((blob, blob_pa), at) = handover_in(&mut m, Some(rig.arena));
    let at = at.expect("table");
    let byte = sparse_bitmap::PhysToVirt::phys_to_virt(rig.arena, at.base).wrapping_add(40);
    // SAFETY: host test: a byte of the table's block in the arena.
    unsafe { *byte ^= 0x10 };
    assert!(matches!(
        restore_blob(&rig, &blob, blob_pa),
        Err(live_update::AdoptFailure::Machine(RestoreError::Table(crate::state_table::TableError::Checksum { .. })))
    ));
    // SAFETY: as above.
    unsafe { *byte ^= 0x10 };
    let n = restore_blob(&rig, &blob, blob_pa).expect("restores once mended");
    assert_eq!(n.partitions.len(), 2);
}
