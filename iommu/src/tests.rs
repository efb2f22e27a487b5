//! Host tests: encodings against values computed by hand from IHI 0070,
//! queue arithmetic, and the driver against the fake register file.

use alloc::vec;
use alloc::vec::Vec;

use proptest::prelude::*;

use crate::regs::{
    SmmuRegs, CMDQ_BASE, CMDQ_CONS, CMDQ_PROD, CR0, CR0ACK, CR0_CMDQEN, CR0_EVENTQEN, CR0_SMMUEN, CR1, CR2,
    EVENTQ_BASE, EVENTQ_CONS, EVENTQ_OVERFLOW, EVENTQ_PROD, GBPA, GBPA_ABORT, GERROR, GERRORN, GERROR_SFM_ERR,
    IDR0_VMID16, STRTAB_BASE, STRTAB_BASE_CFG,
};
use crate::testing::{FakeIdrs, FakeSmmu, FakeSte, TestMemory};
use crate::{
    probe, AddressSize, AdoptError, Assignment, Command, CommandDecodeError, CommandError, Direction, Error, Event,
    EventKind, FaultClass, Features, PageRun, ProbeError, QueueKind, Region, Register, Ring, Smmu, SmmuConfig,
    SmmuState, Stage2Geometry, SteConfig, StreamTableFormat, Wait, PAGE_SIZE,
};

const RAM_BASE: u64 = 0x4000_0000;
/// 8 MiB: room for a 4 MiB linear table of 2^16 STEs.
const RAM_PAGES: usize = 2048;
/// Page-aligned stage-2 roots inside RAM, away from the driver's pages
/// (which the test memory hands out from its start).
const ROOT_A: u64 = RAM_BASE + 0x70_0000;
const ROOT_B: u64 = RAM_BASE + 0x71_0000;
const ABORT: [u64; 8] = [0x1, 0, 0, 0, 0, 0, 0, 0];

type TestSmmu<'m> = Smmu<FakeSmmu<'m>, &'m TestMemory>;

fn qemu_features() -> Features {
    Features {
        stream_table: StreamTableFormat::TwoLevel,
        vmid_bits: 16,
        sid_bits: 16,
        oas: AddressSize::Bits44,
        ias_bits: 44,
        cmdq_max_log2: 19,
        evtq_max_log2: 19,
    }
}

fn linear_idrs() -> FakeIdrs {
    // IDR0.ST_LEVEL (bits [28:27]) = 0b00: linear only.
    FakeIdrs { idr0: FakeIdrs::QEMU.idr0 & !(0b11 << 27), ..FakeIdrs::QEMU }
}

fn with_oas(oas: AddressSize) -> FakeIdrs {
    FakeIdrs { idr5: (FakeIdrs::QEMU.idr5 & !0b111) | oas.encoding() as u32, ..FakeIdrs::QEMU }
}

fn init_with(mem: &TestMemory, idrs: FakeIdrs, config: SmmuConfig) -> (FakeSmmu<'_>, TestSmmu<'_>) {
    let fake = FakeSmmu::new(mem, idrs);
    let smmu = Smmu::init(fake.clone(), mem, &mut &*mem, config).expect("init");
    fake.take_commands();
    fake.take_invalidations();
    fake.take_writes();
    (fake, smmu)
}

fn init(mem: &TestMemory) -> (FakeSmmu<'_>, TestSmmu<'_>) {
    init_with(mem, FakeIdrs::QEMU, SmmuConfig::default())
}

fn ram() -> TestMemory {
    TestMemory::new(RAM_BASE, RAM_PAGES)
}

fn stage2(vmid: u16, s2_root: u64) -> [u64; 8] {
    SteConfig::Stage2 { vmid, s2_root }.encode(Stage2Geometry::new(qemu_features()))
}

fn cfgi(stream_id: u32, leaf: bool) -> Command {
    Command::CfgiSte { stream_id, leaf }
}

// ---------------------------------------------------------------- encodings

#[test]
fn abort_ste_is_v_with_config_abort() {
    // V (bit 0) = 1, Config (bits [3:1]) = 0b000, everything else 0 (§5.2).
    assert_eq!(SteConfig::Abort.encode(Stage2Geometry::new(qemu_features())), ABORT);
}

#[test]
fn stage2_ste_matches_the_spec_on_qemu() {
    // QEMU: OAS = IAS = 44 bits, so S2T0SZ = 20 and S2PS = 0b100.
    let words = stage2(5, 0x4012_3000);
    // Word 0: V = 1, Config = 0b110 at [3:1] -> 0b1101.
    assert_eq!(words[0], 0xd);
    // Word 1: SHCFG (bits [45:44]) = 0b01, use incoming.
    assert_eq!(words[1], 0x0000_1000_0000_0000);
    // Word 2: S2VMID [15:0] = 5; [47:32] = T0SZ 20 (0x14) | SL0 0b10 << 6
    // (0x80) | IR0 0b01 << 8 | OR0 0b01 << 10 | SH0 0b11 << 12 | TG 0 =
    // 0x3594; [63:48] = PS 0b100 | AA64 (bit 51) | S2R (bit 58) = 0x40c.
    assert_eq!(words[2], 0x040c_3594_0000_0005);
    // Word 3: S2TTB [51:4].
    assert_eq!(words[3], 0x4012_3000);
    assert_eq!(words[4..], [0; 4]);
}

#[test]
fn stage2_ste_uses_the_cpu_geometry_with_a_48_bit_smmu() {
    // With a 48-bit OAS the VTCR fields are exactly ArmStage2::VTCR_GEOMETRY
    // (0x3590: T0SZ 16, SL0 level 0, WBWA, inner shareable, 4 KiB) and
    // S2PS = 0b101; a 52-bit OAS is capped at the table's 48 bits.
    for oas in [AddressSize::Bits48, AddressSize::Bits52] {
        let geometry = Stage2Geometry::new(Features { oas, ias_bits: oas.bits(), ..qemu_features() });
        assert_eq!(geometry.ipa_bits(), 48);
        let words = SteConfig::Stage2 { vmid: 7, s2_root: 0x1_2345_6000 }.encode(geometry);
        assert_eq!(words[2], 0x040d_3590_0000_0007);
        assert_eq!(words[3], 0x1_2345_6000);
    }
}

#[test]
fn ste_decode_accepts_only_what_the_driver_writes() {
    let geometry = Stage2Geometry::new(qemu_features());
    let config = SteConfig::Stage2 { vmid: 9, s2_root: ROOT_A };
    assert_eq!(SteConfig::decode(&config.encode(geometry), geometry), Some(config));
    assert_eq!(SteConfig::decode(&ABORT, geometry), Some(SteConfig::Abort));
    // Abort ignores the other words, as the SMMU does.
    assert_eq!(SteConfig::decode(&[0x1, 5, 6, 7, 0, 0, 0, 0], geometry), Some(SteConfig::Abort));
    // V = 0; bypass (Config 0b100); stage 1 (0b101); S2S (bit 58 - 1) set.
    let mut stall = config.encode(geometry);
    stall[2] |= 1 << 57;
    for bad in [[0; 8], [0x9, 0, 0, 0, 0, 0, 0, 0], [0xb, 0, 0, 0, 0, 0, 0, 0], stall] {
        assert_eq!(SteConfig::decode(&bad, geometry), None, "{bad:x?}");
    }
}

#[test]
fn command_encodings_match_the_spec() {
    // CMD_CFGI_STE (0x03): StreamID in [63:32]; Leaf in word 1 bit 0.
    assert_eq!(cfgi(0x10, true).encode(), [0x0000_0010_0000_0003, 0x1]);
    assert_eq!(cfgi(0xffff, false).encode(), [0x0000_ffff_0000_0003, 0x0]);
    // CMD_CFGI_ALL = CMD_CFGI_STE_RANGE (0x04) with Range = 31.
    assert_eq!(Command::CfgiAll.encode(), [0x04, 0x1f]);
    // CMD_TLBI_S12_VMALL (0x28): VMID in [47:32].
    assert_eq!(Command::TlbiS12Vmall { vmid: 0x1234 }.encode(), [0x0000_1234_0000_0028, 0]);
    assert_eq!(Command::TlbiNsnhAll.encode(), [0x30, 0]);
    // CMD_SYNC (0x46), CS = SIG_NONE (0b00 at [13:12]).
    assert_eq!(Command::Sync.encode(), [0x46, 0]);
}

#[test]
fn command_decode_rejects_what_the_driver_never_writes() {
    assert_eq!(Command::decode([0x12, 0]), Err(CommandDecodeError::UnknownOpcode(0x12)));
    // CFGI_STE_RANGE with Range = 5 is not CFGI_ALL.
    assert_eq!(Command::decode([0x04, 0x05]), Err(CommandDecodeError::UnexpectedFields));
    // CMD_SYNC with CS = SIG_IRQ.
    assert_eq!(Command::decode([0x46 | 1 << 12, 0]), Err(CommandDecodeError::UnexpectedFields));
    // TLBI_NSNH_ALL with a stray bit.
    assert_eq!(Command::decode([0x30, 1]), Err(CommandDecodeError::UnexpectedFields));
}

#[test]
fn ring_wrap_full_and_empty() {
    let ring = Ring::new(3).expect("8 entries");
    assert_eq!((ring.entries(), ring.wrap_bit(), ring.pointer_mask()), (8, 0x8, 0xf));
    assert!(ring.is_empty(0, 0) && !ring.is_full(0, 0));
    // Eight entries on: index 0 again, wrap flag set: full.
    let prod = ring.advance(0, 8);
    assert_eq!(prod, 0x8);
    assert!(ring.is_full(prod, 0) && !ring.is_empty(prod, 0));
    assert_eq!((ring.used(prod, 0), ring.free(prod, 0)), (8, 0));
    // Past the end of the second lap both index and wrap flag roll over.
    assert_eq!(ring.advance(0xf, 1), 0);
    assert_eq!(ring.used(0x1, 0xf), 2);
    assert!(ring.is_consistent(0x1, 0xf));
    // CONS ahead of PROD is corrupt.
    assert!(!ring.is_consistent(0x0, 0x1));
    assert!(!ring.is_pointer(0x10));
    assert_eq!(Ring::new(32), None);
    let one = Ring::new(0).expect("1 entry");
    assert!(one.is_full(1, 0) && one.is_empty(1, 1));
}

// ------------------------------------------------------------------- probe

#[test]
fn probe_reads_qemu_features() {
    let mem = TestMemory::new(RAM_BASE, 1);
    assert_eq!(probe(&FakeSmmu::new(&mem, FakeIdrs::QEMU)), Ok(qemu_features()));
    let linear = probe(&FakeSmmu::new(&mem, linear_idrs())).expect("linear");
    assert_eq!(linear.stream_table, StreamTableFormat::Linear);
    let vmid8 = FakeIdrs { idr0: FakeIdrs::QEMU.idr0 & !IDR0_VMID16, ..FakeIdrs::QEMU };
    assert_eq!(probe(&FakeSmmu::new(&mem, vmid8)).map(|f| f.vmid_bits), Ok(8));
}

#[test]
fn probe_rejects_what_the_driver_cannot_use() {
    let mem = TestMemory::new(RAM_BASE, 1);
    let q = FakeIdrs::QEMU;
    let cases = [
        (FakeIdrs { idr0: q.idr0 & !1, ..q }, ProbeError::NoStage2),
        (FakeIdrs { idr0: q.idr0 & !(0b10 << 2), ..q }, ProbeError::NoAArch64Tables),
        (FakeIdrs { idr0: q.idr0 | 0b11 << 21, ..q }, ProbeError::BigEndianWalksOnly),
        (FakeIdrs { idr0: q.idr0 & !(1 << 4), ..q }, ProbeError::NotCoherent),
        (FakeIdrs { idr0: (q.idr0 & !(0b11 << 24)) | 0b10 << 24, ..q }, ProbeError::StallForced),
        (FakeIdrs { idr0: q.idr0 | 0b11 << 27, ..q }, ProbeError::ReservedStreamTableLevel(0b11)),
        (FakeIdrs { idr1: q.idr1 | 1 << 30, ..q }, ProbeError::PresetBases),
        (FakeIdrs { idr1: (q.idr1 & !0x3f) | 0x21, ..q }, ProbeError::StreamIdTooWide(33)),
        (FakeIdrs { idr1: q.idr1 & !(0x1f << 21) | 1 << 21, ..q }, ProbeError::CommandQueueTooSmall(1)),
        (FakeIdrs { idr5: q.idr5 | 0b111, ..q }, ProbeError::ReservedOas(0b111)),
        (FakeIdrs { idr5: q.idr5 & !(1 << 4), ..q }, ProbeError::NoGranule4K),
        (with_oas(AddressSize::Bits36), ProbeError::IpaTooSmall(36)),
    ];
    for (idrs, error) in cases {
        assert_eq!(probe(&FakeSmmu::new(&mem, idrs)), Err(error), "{idrs:x?}");
    }
}

// ------------------------------------------------------------------ enable

#[test]
fn init_runs_the_enable_sequence_in_order() {
    let mem = ram();
    let fake = FakeSmmu::new(&mem, FakeIdrs::QEMU);
    let smmu = Smmu::init(fake.clone(), &mem, &mut &mem, SmmuConfig::default()).expect("init");
    let writes = fake.take_writes();
    let offsets: Vec<usize> = writes.iter().map(|&(offset, _)| offset).collect();
    let first = |offset: usize| offsets.iter().position(|&o| o == offset).expect("written");
    let cr0: Vec<u64> = writes.iter().filter(|&&(o, _)| o == CR0.offset()).map(|&(_, v)| v).collect();

    // GBPA.ABORT before anything else, then disable, then program.
    assert_eq!(writes[0], (GBPA.offset(), u64::from(GBPA_ABORT | 1 << 31)));
    assert_eq!(writes[1], (CR0.offset(), 0));
    let enables = [CR0_CMDQEN, CR0_CMDQEN | CR0_EVENTQEN, CR0_CMDQEN | CR0_EVENTQEN | CR0_SMMUEN];
    assert_eq!(cr0, [0, u64::from(enables[0]), u64::from(enables[1]), u64::from(enables[2])]);
    let cmdq_enable = writes.iter().position(|&w| w == (CR0.offset(), u64::from(CR0_CMDQEN))).expect("CMDQEN");
    for reg in [STRTAB_BASE.offset(), STRTAB_BASE_CFG.offset(), CMDQ_BASE.offset(), EVENTQ_BASE.offset()] {
        assert!(first(reg) > 1 && first(reg) < cmdq_enable, "{reg:#x}");
    }
    assert!(fake.violations().is_empty(), "{:?}", fake.violations());
    assert_eq!(fake.commands(), [Command::CfgiAll, Command::TlbiNsnhAll, Command::Sync]);

    let state = smmu.state();
    assert_eq!(fake.read32(CR0ACK), CR0_SMMUEN | CR0_EVENTQEN | CR0_CMDQEN);
    assert_ne!(fake.read32(GBPA) & GBPA_ABORT, 0);
    // CR1: queue and table IC/OC = WB (0b01), SH = inner (0b11) -> 0xd75.
    assert_eq!(fake.read32(CR1), 0xd75);
    assert_eq!(fake.read32(CR2), 0x2, "RECINVSID");
    // STRTAB_BASE: RA (bit 62) | base; CFG: LOG2SIZE 16 | SPLIT 8 << 6 | FMT 1 << 16.
    assert_eq!(fake.read64(STRTAB_BASE), 1 << 62 | state.strtab_base);
    assert_eq!(fake.read32(STRTAB_BASE_CFG), 0x0001_0210);
    // CMDQ_BASE: RA | base | LOG2SIZE 8; EVENTQ_BASE: WA | base | 7.
    assert_eq!(fake.read64(CMDQ_BASE), 1 << 62 | state.cmdq_base | 8);
    assert_eq!(fake.read64(EVENTQ_BASE), 1 << 62 | state.evtq_base | 7);
    assert_eq!((state.cmdq_prod, state.cmdq_cons), (3, 3));
}

#[test]
fn every_stream_aborts_after_init() {
    let mem = ram();
    let (fake, _smmu) = init(&mem);
    for sid in [0, 0x10, 0x1234, 0xffff] {
        assert_eq!(fake.lookup(sid), FakeSte::NoL2);
    }
    assert_eq!(fake.lookup(0x1_0000), FakeSte::OutOfRange);

    let mem = ram();
    let (fake, smmu) = init_with(&mem, linear_idrs(), SmmuConfig::default());
    assert_eq!(smmu.state().strtab_format, 0);
    for sid in [0, 0x10, 0x1234, 0xffff] {
        assert_eq!(fake.lookup(sid), FakeSte::Entry(ABORT));
    }
}

#[test]
fn init_waits_for_slow_acknowledgements() {
    let mem = ram();
    let fake = FakeSmmu::new(&mem, FakeIdrs::QEMU);
    fake.set_ack_delay(5);
    assert!(Smmu::init(fake.clone(), &mem, &mut &mem, SmmuConfig::default()).is_ok());
    assert!(fake.violations().is_empty());
}

#[test]
fn init_times_out_with_a_typed_error() {
    let mem = ram();
    let fake = FakeSmmu::new(&mem, FakeIdrs::QEMU);
    fake.set_ack_delay(u32::MAX);
    let config = SmmuConfig { spin_budget: 100, ..SmmuConfig::default() };
    let error = Smmu::init(fake, &mem, &mut &mem, config).map(|_| ());
    // CR0ACK already reads 0 out of reset; enabling the command queue is
    // the first change that needs an acknowledgement.
    assert_eq!(error, Err(Error::Timeout(Wait::Cr0Ack { want: CR0_CMDQEN })));
}

#[test]
fn init_gives_memory_back_when_allocation_fails() {
    for budget in 0..3 {
        let mem = ram();
        mem.set_budget(Some(budget));
        let fake = FakeSmmu::new(&mem, FakeIdrs::QEMU);
        let result = Smmu::init(fake.clone(), &mem, &mut &mem, SmmuConfig::default()).map(|_| ());
        assert!(matches!(result, Err(Error::OutOfMemory { .. })), "{result:?}");
        assert_eq!(mem.pages_in_use(), 0);
        assert!(fake.take_writes().is_empty());
    }
}

#[test]
fn init_rejects_unsupported_hardware_and_sizes() {
    let mem = ram();
    let no_s2 = FakeIdrs { idr0: FakeIdrs::QEMU.idr0 & !1, ..FakeIdrs::QEMU };
    let result = Smmu::init(FakeSmmu::new(&mem, no_s2), &mem, &mut &mem, SmmuConfig::default()).map(|_| ());
    assert_eq!(result, Err(Error::Probe(ProbeError::NoStage2)));
    let config = SmmuConfig { cmdq_log2_entries: 1, ..SmmuConfig::default() };
    let result = Smmu::init(FakeSmmu::new(&mem, FakeIdrs::QEMU), &mem, &mut &mem, config).map(|_| ());
    assert_eq!(result, Err(Error::QueueSize { queue: QueueKind::Command, log2: 1, min: 2, max: 19 }));
    assert_eq!(mem.pages_in_use(), 0);
}

// ------------------------------------------------------------- assignment

#[test]
fn assign_writes_the_ste_then_invalidates_in_order() {
    let mem = ram();
    let (fake, mut smmu) = init(&mem);
    smmu.assign(&mut &mem, 0x10, 3, ROOT_A).expect("assign");
    assert_eq!(
        fake.take_commands(),
        [cfgi(0x10, false), Command::TlbiS12Vmall { vmid: 3 }, Command::Sync, cfgi(0x10, true), Command::Sync]
    );
    let ste = stage2(3, ROOT_A);
    let mut while_abort = ste;
    while_abort[0] = ABORT[0];
    // First CFGI: new words behind an abort word 0. Second: the full STE.
    assert_eq!(fake.take_invalidations(), [(0x10, FakeSte::Entry(while_abort)), (0x10, FakeSte::Entry(ste))]);
    assert_eq!(fake.lookup(0x10), FakeSte::Entry(ste));
    // The rest of the new L2 array aborts; other arrays do not exist.
    assert_eq!(fake.lookup(0x11), FakeSte::Entry(ABORT));
    assert_eq!(fake.lookup(0x110), FakeSte::NoL2);
    assert_eq!(smmu.assignment(0x10), Some(Assignment { stream_id: 0x10, vmid: 3, s2_root: ROOT_A }));
    assert!(fake.violations().is_empty());
}

#[test]
fn l1_descriptor_points_at_the_l2_array_with_span_9() {
    let mem = ram();
    let (_fake, mut smmu) = init(&mem);
    smmu.assign(&mut &mem, 0x310, 1, ROOT_A).expect("assign");
    let state = smmu.state();
    let l2 = smmu.pages()[1];
    assert_eq!(l2.count, 4, "2^8 STEs of 64 bytes");
    // L1 index 3: L2Ptr [51:6] | Span (SPLIT + 1 = 9).
    assert_eq!(mem.read(state.strtab_base + 3 * 8), Some(l2.base | 9));
    assert_eq!(mem.read(l2.base + 0x10 * 64), Some(0xd));
}

#[test]
fn more_streams_of_a_vmid_skip_the_tlbi() {
    let mem = ram();
    let (fake, mut smmu) = init(&mem);
    smmu.assign(&mut &mem, 0x10, 3, ROOT_A).expect("assign");
    fake.take_commands();
    smmu.assign(&mut &mem, 0x11, 3, ROOT_A).expect("assign");
    assert_eq!(fake.take_commands(), [cfgi(0x11, true), Command::Sync, cfgi(0x11, true), Command::Sync]);
    // Assigning the same again changes nothing.
    smmu.assign(&mut &mem, 0x11, 3, ROOT_A).expect("assign");
    assert!(fake.take_commands().is_empty());
}

#[test]
fn reassigning_a_stream_goes_through_abort() {
    let mem = ram();
    let (fake, mut smmu) = init(&mem);
    smmu.assign(&mut &mem, 0x10, 3, ROOT_A).expect("assign");
    fake.take_commands();
    fake.take_invalidations();
    smmu.assign(&mut &mem, 0x10, 4, ROOT_B).expect("reassign");
    assert_eq!(
        fake.take_commands(),
        [cfgi(0x10, true), Command::TlbiS12Vmall { vmid: 4 }, Command::Sync, cfgi(0x10, true), Command::Sync]
    );
    let invalidations = fake.take_invalidations();
    let FakeSte::Entry(first) = invalidations[0].1 else { panic!("{invalidations:?}") };
    assert_eq!(first[0], ABORT[0], "never a mix of VMID 3 and VMID 4 words");
    assert_eq!(invalidations[1].1, FakeSte::Entry(stage2(4, ROOT_B)));
}

#[test]
fn unassign_aborts_then_clears() {
    let mem = ram();
    let (fake, mut smmu) = init(&mem);
    smmu.assign(&mut &mem, 0x10, 3, ROOT_A).expect("assign");
    fake.take_commands();
    fake.take_invalidations();
    smmu.unassign(0x10).expect("unassign");
    assert_eq!(fake.take_commands(), [cfgi(0x10, true), Command::Sync]);
    let invalidations = fake.take_invalidations();
    assert!(matches!(invalidations[..], [(0x10, FakeSte::Entry(words))] if words[0] == ABORT[0]));
    assert_eq!(fake.lookup(0x10), FakeSte::Entry(ABORT));
    assert_eq!(smmu.assignment(0x10), None);
    smmu.unassign(0x10).expect("again");
    smmu.unassign(0x4000).expect("never assigned");
    assert!(fake.take_commands().is_empty());
}

#[test]
fn assign_rejects_bad_arguments_without_touching_the_smmu() {
    let mem = ram();
    let (fake, mut smmu) = init(&mem);
    let cases = [
        (0x1_0000, 1, ROOT_A, Error::StreamIdOutOfRange { stream_id: 0x1_0000, bits: 16 }),
        (0x10, 1, ROOT_A + 0x800, Error::BadStage2Root { s2_root: ROOT_A + 0x800 }),
        (0x10, 1, 1 << 44, Error::BadStage2Root { s2_root: 1 << 44 }),
    ];
    for (sid, vmid, root, error) in cases {
        assert_eq!(smmu.assign(&mut &mem, sid, vmid, root), Err(error));
    }
    mem.set_budget(Some(0));
    assert_eq!(smmu.assign(&mut &mem, 0x10, 1, ROOT_A), Err(Error::OutOfMemory { pages: 4 }));
    assert_eq!(fake.lookup(0x10), FakeSte::NoL2);
    assert!(fake.take_commands().is_empty());

    let mem = ram();
    let vmid8 = FakeIdrs { idr0: FakeIdrs::QEMU.idr0 & !IDR0_VMID16, ..FakeIdrs::QEMU };
    let (_fake, mut smmu) = init_with(&mem, vmid8, SmmuConfig::default());
    assert_eq!(smmu.assign(&mut &mem, 0x10, 256, ROOT_A), Err(Error::VmidOutOfRange { vmid: 256, bits: 8 }));
    assert_eq!(smmu.invalidate_vmid(300), Err(Error::VmidOutOfRange { vmid: 300, bits: 8 }));
}

#[test]
fn linear_table_assign_and_unassign() {
    let mem = ram();
    let (fake, mut smmu) = init_with(&mem, linear_idrs(), SmmuConfig::default());
    smmu.assign(&mut &mem, 0xfffe, 2, ROOT_A).expect("assign");
    assert_eq!(
        fake.take_commands(),
        [cfgi(0xfffe, true), Command::TlbiS12Vmall { vmid: 2 }, Command::Sync, cfgi(0xfffe, true), Command::Sync]
    );
    assert_eq!(fake.lookup(0xfffe), FakeSte::Entry(stage2(2, ROOT_A)));
    smmu.unassign(0xfffe).expect("unassign");
    assert_eq!(fake.lookup(0xfffe), FakeSte::Entry(ABORT));
}

#[test]
fn invalidate_vmid_issues_tlbi_and_sync() {
    let mem = ram();
    let (fake, mut smmu) = init(&mem);
    smmu.invalidate_vmid(7).expect("tlbi");
    assert_eq!(fake.take_commands(), [Command::TlbiS12Vmall { vmid: 7 }, Command::Sync]);
}

// ----------------------------------------------------------- command queue

#[test]
fn command_queue_wraps() {
    let mem = ram();
    let config = SmmuConfig { cmdq_log2_entries: 2, ..SmmuConfig::default() };
    let (fake, mut smmu) = init_with(&mem, FakeIdrs::QEMU, config);
    for vmid in 0..10 {
        smmu.invalidate_vmid(vmid).expect("tlbi");
    }
    assert_eq!(fake.take_commands().len(), 20);
    // 3 entries at init + 20: pointer 23 mod 8 = 0b111, index 3 with wrap.
    let state = smmu.state();
    assert_eq!((state.cmdq_prod, state.cmdq_cons), (0b111, 0b111));
    assert_eq!(fake.read32(CMDQ_PROD), 0b111);
}

#[test]
fn rejected_command_is_reported_skipped_and_acknowledged() {
    let mem = ram();
    let (fake, mut smmu) = init(&mem);
    fake.reject_next_command(0x01);
    let index = smmu.state().cmdq_prod % 256;
    assert_eq!(smmu.invalidate_vmid(2), Err(Error::CommandRejected { error: CommandError::Illegal, index }));
    assert_eq!(fake.read32(GERROR) ^ fake.read32(GERRORN), 0, "acknowledged");
    // The rejected entry became a CMD_SYNC and the queue ran on.
    let entry = smmu.state().cmdq_base + u64::from(index) * 16;
    assert_eq!((mem.read(entry), mem.read(entry + 8)), (Some(0x46), Some(0)));
    assert_eq!(fake.take_commands(), [Command::Sync, Command::Sync]);
    smmu.invalidate_vmid(2).expect("queue works again");
    assert_eq!(fake.take_commands(), [Command::TlbiS12Vmall { vmid: 2 }, Command::Sync]);
}

#[test]
fn stalled_queue_times_out_and_recovers() {
    let mem = ram();
    let config = SmmuConfig { spin_budget: 1000, ..SmmuConfig::default() };
    let (fake, mut smmu) = init_with(&mem, FakeIdrs::QEMU, config);
    fake.set_stalled(true);
    assert_eq!(smmu.invalidate_vmid(1), Err(Error::Timeout(Wait::CommandSync)));
    fake.set_stalled(false);
    smmu.invalidate_vmid(1).expect("runs again");
    assert_eq!(fake.take_commands().len(), 4);
}

#[test]
fn service_failure_is_reported() {
    let mem = ram();
    let (fake, mut smmu) = init(&mem);
    fake.force32(GERROR, GERROR_SFM_ERR);
    assert_eq!(smmu.invalidate_vmid(1), Err(Error::ServiceFailure));
}

// ------------------------------------------------------------------ events

fn record(id: u64, sid: u32, word1: u64, word2: u64, word3: u64) -> [u64; 4] {
    [id | u64::from(sid) << 32, word1, word2, word3]
}

#[test]
fn translation_fault_decodes() {
    // F_TRANSLATION, StreamID 0x10, a stage-2 (bit 39) write (RnW = 0) of
    // the input address itself (CLASS = 0b10 at [41:40]).
    let raw = record(0x10, 0x10, 1 << 39 | 0b10 << 40, 0x8000_1234, 0x8000_1000);
    let event = Event::decode(raw);
    assert_eq!(event.kind, EventKind::Translation);
    assert_eq!(event.kind.name(), "F_TRANSLATION");
    assert_eq!((event.stream_id, event.substream_id), (0x10, None));
    assert_eq!((event.input_addr, event.ipa, event.fetch_addr), (Some(0x8000_1234), Some(0x8000_1000), None));
    let access = event.access.expect("translation class");
    assert_eq!(access.direction, Direction::Write);
    assert!(access.stage2 && !access.instruction && !access.privileged);
    assert_eq!(access.class, FaultClass::Input);
    assert_eq!(event.address(), 0x8000_1234);
    assert_eq!(alloc::format!("{event}"), "event=F_TRANSLATION sid=0x10 addr=0x80001234");
}

#[test]
fn every_fault_kind_decodes() {
    let read = 1 << 35;
    for (id, kind) in [(0x11, EventKind::AddressSize), (0x12, EventKind::Access), (0x13, EventKind::Permission)] {
        let event = Event::decode(record(id, 3, read, 0x1000, 0));
        assert_eq!((event.kind, event.input_addr), (kind, Some(0x1000)));
        assert_eq!(event.access.map(|a| a.direction), Some(Direction::Read));
        assert_eq!(event.ipa, None, "stage-1 fault");
    }
    let bad_ste = Event::decode(record(0x04, 0x20, 0, 0xdead, 0xbeef));
    assert_eq!(
        (bad_ste.kind, bad_ste.stream_id, bad_ste.input_addr, bad_ste.access),
        (EventKind::BadSte, 0x20, None, None)
    );
    // F_STE_FETCH: FetchAddr in word 3 bits [51:3].
    let fetch = Event::decode(record(0x03, 0x21, 0, 0, 0xfff0_0000_4000_1047));
    assert_eq!((fetch.kind, fetch.fetch_addr), (EventKind::SteFetch, Some(0x0000_0000_4000_1040)));
    assert_eq!(fetch.address(), 0x4000_1040);
    // C_BAD_STREAMID with SSV (bit 11) and SubstreamID 5 at [31:12].
    let bad_sid = Event::decode(record(0x02 | 1 << 11 | 5 << 12, 0x1_0000, 0, 0, 0));
    assert_eq!((bad_sid.kind, bad_sid.stream_id, bad_sid.substream_id), (EventKind::BadStreamId, 0x1_0000, Some(5)));
    assert_eq!(Event::decode(record(0xe0, 1, 0, 0, 0)).kind, EventKind::Other(0xe0));
}

#[test]
fn poll_events_drains_wraps_and_reports_overflow() {
    let mem = ram();
    let config = SmmuConfig { evtq_log2_entries: 2, ..SmmuConfig::default() };
    let (fake, mut smmu) = init_with(&mem, FakeIdrs::QEMU, config);
    let mut seen = Vec::new();
    for round in 0..3u32 {
        for i in 0..3 {
            assert!(fake.inject_event(record(0x10, round * 10 + i, 0, u64::from(i), 0)));
        }
        let summary = smmu.poll_events(|e| seen.push(e.stream_id)).expect("poll");
        assert_eq!(summary.events, 3);
        assert!(!summary.overflowed);
    }
    assert_eq!(seen, [0, 1, 2, 10, 11, 12, 20, 21, 22]);

    // Four fit, the fifth overflows.
    for i in 0..5 {
        assert_eq!(fake.inject_event(record(0x13, i, 0, 0, 0)), i < 4);
    }
    let summary = smmu.poll_events(|_| ()).expect("poll");
    assert_eq!((summary.events, summary.overflowed), (4, true));
    // CONS acknowledged the overflow: OVACKFLG = OVFLG.
    assert_eq!(fake.read32(EVENTQ_CONS) & EVENTQ_OVERFLOW, fake.read32(EVENTQ_PROD) & EVENTQ_OVERFLOW);
    let summary = smmu.poll_events(|_| ()).expect("poll");
    assert_eq!(summary, crate::EventSummary { events: 0, overflowed: false });
}

#[test]
fn poll_events_rejects_a_corrupt_producer() {
    let mem = ram();
    let (fake, mut smmu) = init(&mem);
    fake.force32(EVENTQ_PROD, 0x7fff_ffff);
    let result = smmu.poll_events(|_| panic!("no event from a corrupt queue"));
    assert!(matches!(result, Err(Error::QueueInconsistent { queue: QueueKind::Event, .. })), "{result:?}");
}

// ------------------------------------------------------------------- adopt

/// A running SMMU with streams in two L2 arrays and two VMIDs.
fn running(mem: &TestMemory, idrs: FakeIdrs) -> (FakeSmmu<'_>, TestSmmu<'_>, SmmuState) {
    let (fake, mut smmu) = init_with(mem, idrs, SmmuConfig::default());
    smmu.assign(&mut &*mem, 0x10, 1, ROOT_A).expect("assign");
    smmu.assign(&mut &*mem, 0x11, 1, ROOT_A).expect("assign");
    smmu.assign(&mut &*mem, 0x310, 2, ROOT_B).expect("assign");
    fake.inject_event(record(0x10, 0x10, 0, 0, 0));
    smmu.poll_events(|_| ()).expect("poll");
    fake.take_commands();
    fake.take_writes();
    let state = smmu.state();
    (fake, smmu, state)
}

fn adopt<'m>(fake: &FakeSmmu<'m>, mem: &'m TestMemory, state: &SmmuState) -> Result<TestSmmu<'m>, AdoptError> {
    let adopted = Smmu::adopt(fake.clone(), mem, state, &mem.ram(), SmmuConfig::DEFAULT_SPIN_BUDGET);
    assert!(fake.take_writes().is_empty(), "adopt must not touch the registers");
    adopted
}

/// Faults the SMMU records after the old image's last poll (in its
/// blackout) wait in the queue for the new image: counted at adopt, each
/// taken once by its first poll.
#[test]
fn events_recorded_across_an_adopt_are_taken_once_by_the_new_image() {
    let mem = ram();
    let (fake, old, state) = running(&mem, FakeIdrs::QEMU);
    assert_eq!(old.events_waiting(), Some(0));
    drop(old);
    for stream in [0x10, 0x11] {
        assert!(fake.inject_event(record(0x10, stream, 0, 0, 0)));
    }
    let mut new = adopt(&fake, &mem, &state).expect("adopt");
    assert_eq!(new.events_waiting(), Some(2));
    let mut seen = Vec::new();
    let summary = new.poll_events(|e| seen.push(e.stream_id)).expect("poll");
    assert_eq!((summary.events, seen), (2, vec![0x10, 0x11]));
    assert_eq!(new.events_waiting(), Some(0));
    fake.force32(EVENTQ_PROD, 0xffff_0000);
    assert_eq!(new.events_waiting(), None, "a corrupt PROD is not a count");
}

#[test]
fn adopt_round_trip_keeps_translation_running() {
    for idrs in [FakeIdrs::QEMU, linear_idrs()] {
        let mem = ram();
        let (fake, old, state) = running(&mem, idrs);
        let pages = old.pages();
        assert_eq!(state.assignments.len(), 3);
        let mut new = adopt(&fake, &mem, &state).expect("adopt");
        assert_eq!(new.state(), state);
        assert_eq!(new.pages(), pages);
        assert_eq!(fake.read32(CR0ACK), CR0_SMMUEN | CR0_EVENTQEN | CR0_CMDQEN, "still translating");
        assert_eq!(fake.lookup(0x310), FakeSte::Entry(stage2(2, ROOT_B)));
        // The adopted driver carries on where the old one stopped.
        new.unassign(0x11).expect("unassign");
        new.assign(&mut &mem, 0x12, 2, ROOT_B).expect("assign");
        assert_eq!(fake.take_commands().len(), 2 + 4);
        assert!(fake.violations().is_empty());
        fake.inject_event(record(0x10, 0x12, 0, 0x42, 0));
        let mut seen = Vec::new();
        new.poll_events(|e| seen.push((e.stream_id, e.address()))).expect("poll");
        assert_eq!(seen, [(0x12, 0x42)]);
    }
}

#[test]
fn pages_cover_tables_and_queues_disjointly() {
    let mem = ram();
    let (_fake, smmu, state) = running(&mem, FakeIdrs::QEMU);
    let pages = smmu.pages();
    // L1 array, two L2 arrays, command queue, event queue.
    assert_eq!(pages.len(), 5);
    assert_eq!(pages[0], PageRun { base: state.strtab_base, count: 1 });
    assert!(pages.contains(&PageRun { base: state.cmdq_base, count: 1 }));
    assert!(pages.contains(&PageRun { base: state.evtq_base, count: 1 }));
    for (i, a) in pages.iter().enumerate() {
        assert!(pages[i + 1..].iter().all(|b| !a.overlaps(b)));
    }
    assert_eq!(pages.iter().map(|run| run.count).sum::<usize>(), mem.pages_in_use());
}

#[test]
fn adopt_refuses_a_misaligned_table() {
    let mem = ram();
    let (fake, _smmu, mut state) = running(&mem, FakeIdrs::QEMU);
    state.strtab_base += 0x40;
    fake.force64(STRTAB_BASE, 1 << 62 | state.strtab_base);
    let error = adopt(&fake, &mem, &state).map(|_| ());
    assert_eq!(
        error,
        Err(AdoptError::Misaligned { region: Region::StreamTable, pa: state.strtab_base, align: PAGE_SIZE })
    );
}

#[test]
fn adopt_refuses_structures_outside_ram() {
    let mem = ram();
    let (fake, _smmu, state) = running(&mem, FakeIdrs::QEMU);
    let elsewhere = [(0x1_0000_0000, 0x1000_0000)];
    let error = Smmu::adopt(fake.clone(), &mem, &state, &elsewhere, 1).map(|_| ());
    assert!(matches!(error, Err(AdoptError::OutsideRam { region: Region::StreamTable, .. })), "{error:?}");
    // Half of the RAM: the L1 array is in, the stage-2 roots are not.
    let half = [(RAM_BASE, 0x40_0000)];
    let error = Smmu::adopt(fake.clone(), &mem, &state, &half, 1).map(|_| ());
    assert!(matches!(error, Err(AdoptError::OutsideRam { region: Region::Stage2Root { .. }, .. })), "{error:?}");
    assert!(fake.take_writes().is_empty());
}

#[test]
fn adopt_refuses_a_disabled_or_bypassing_smmu() {
    let mem = ram();
    let (fake, _smmu, state) = running(&mem, FakeIdrs::QEMU);
    fake.force32(CR0ACK, CR0_CMDQEN | CR0_EVENTQEN);
    assert_eq!(adopt(&fake, &mem, &state).map(|_| ()), Err(AdoptError::Disabled { cr0ack: 0xc }));
    fake.force32(CR0ACK, CR0_SMMUEN | CR0_CMDQEN | CR0_EVENTQEN);
    fake.force32(CR0, 0);
    assert!(matches!(adopt(&fake, &mem, &state), Err(AdoptError::Disabled { .. })));
    fake.force32(CR0, CR0_SMMUEN | CR0_CMDQEN | CR0_EVENTQEN);
    fake.force32(GBPA, 0);
    assert_eq!(adopt(&fake, &mem, &state).map(|_| ()), Err(AdoptError::GlobalBypass { gbpa: 0 }));
}

#[test]
fn adopt_refuses_mismatching_registers() {
    let mem = ram();
    let (fake, _smmu, state) = running(&mem, FakeIdrs::QEMU);
    let moved = SmmuState { strtab_base: state.strtab_base + 0x10_0000, ..state.clone() };
    assert_eq!(
        adopt(&fake, &mem, &moved).map(|_| ()),
        Err(AdoptError::RegisterMismatch {
            register: Register::StrtabBase,
            expected: moved.strtab_base,
            found: state.strtab_base
        })
    );
    let resized = SmmuState { strtab_log2size: 12, ..state.clone() };
    assert!(matches!(
        adopt(&fake, &mem, &resized),
        Err(AdoptError::RegisterMismatch { register: Register::StrtabBaseCfg, .. })
    ));
    let queue = SmmuState { cmdq_base: state.evtq_base, ..state.clone() };
    assert!(matches!(
        adopt(&fake, &mem, &queue),
        Err(AdoptError::RegisterMismatch { register: Register::CmdqBase, .. })
    ));
    let cons = SmmuState { evtq_cons: state.evtq_cons + 1, ..state.clone() };
    assert!(matches!(
        adopt(&fake, &mem, &cons),
        Err(AdoptError::RegisterMismatch { register: Register::EventqCons, .. })
    ));
    let busy = SmmuState { cmdq_cons: state.cmdq_prod - 1, ..state.clone() };
    assert!(matches!(adopt(&fake, &mem, &busy), Err(AdoptError::CommandQueueBusy { .. })));
    fake.force32(CMDQ_CONS, state.cmdq_cons - 1);
    assert!(matches!(
        adopt(&fake, &mem, &state),
        Err(AdoptError::RegisterMismatch { register: Register::CmdqCons, .. })
    ));
}

#[test]
fn adopt_refuses_overlapping_structures() {
    let mem = ram();
    let (fake, _smmu, state) = running(&mem, FakeIdrs::QEMU);
    let shared = SmmuState { evtq_base: state.cmdq_base, ..state.clone() };
    fake.force64(EVENTQ_BASE, 1 << 62 | state.cmdq_base | 7);
    assert_eq!(
        adopt(&fake, &mem, &shared).map(|_| ()),
        Err(AdoptError::Overlap { first: Region::CommandQueue, second: Region::EventQueue })
    );
    fake.force64(EVENTQ_BASE, 1 << 62 | state.evtq_base | 7);
    let mut root_in_table = state.clone();
    root_in_table.assignments[0].s2_root = state.strtab_base;
    let stream_id = root_in_table.assignments[0].stream_id;
    assert_eq!(
        adopt(&fake, &mem, &root_in_table).map(|_| ()),
        Err(AdoptError::Overlap { first: Region::StreamTable, second: Region::Stage2Root { stream_id } })
    );
}

#[test]
fn adopt_refuses_corrupt_tables_and_assignments() {
    let mem = ram();
    let (fake, smmu, state) = running(&mem, FakeIdrs::QEMU);
    let l2 = smmu.pages()[1].base;

    let mut missing = state.clone();
    missing.assignments.push(Assignment { stream_id: 0x20, vmid: 1, s2_root: ROOT_A });
    assert_eq!(adopt(&fake, &mem, &missing).map(|_| ()), Err(AdoptError::MissingSte { stream_id: 0x20 }));
    let mut extra = state.clone();
    extra.assignments.remove(0);
    assert_eq!(adopt(&fake, &mem, &extra).map(|_| ()), Err(AdoptError::UnexpectedSte { stream_id: 0x10 }));
    let mut twice = state.clone();
    twice.assignments.push(twice.assignments[0]);
    assert_eq!(adopt(&fake, &mem, &twice).map(|_| ()), Err(AdoptError::DuplicateAssignment { stream_id: 0x10 }));
    let mut wide = state.clone();
    wide.assignments[0].stream_id = 0x1_0000;
    assert_eq!(adopt(&fake, &mem, &wide).map(|_| ()), Err(AdoptError::StreamIdOutOfRange { stream_id: 0x1_0000 }));
    let queue = SmmuState { cmdq_log2size: 25, ..state.clone() };
    assert_eq!(
        adopt(&fake, &mem, &queue).map(|_| ()),
        Err(AdoptError::QueueSize { queue: QueueKind::Command, log2: 25 })
    );
    let format = SmmuState { strtab_split: 6, ..state.clone() };
    assert!(matches!(adopt(&fake, &mem, &format), Err(AdoptError::StreamTableFormat { .. })));

    // An STE turned into bypass (Config 0b100).
    mem.write(l2 + 0x20 * 64, 0x9);
    assert_eq!(adopt(&fake, &mem, &state).map(|_| ()), Err(AdoptError::BadSte { stream_id: 0x20 }));
    mem.write(l2 + 0x20 * 64, ABORT[0]);
    // An L1 descriptor with the wrong span.
    mem.write(state.strtab_base + 5 * 8, l2 | 3);
    assert_eq!(adopt(&fake, &mem, &state).map(|_| ()), Err(AdoptError::BadL1Descriptor { index: 5, value: l2 | 3 }));
    mem.write(state.strtab_base + 5 * 8, 0);
    assert!(adopt(&fake, &mem, &state).is_ok());
}

#[test]
fn adopt_refuses_an_smmu_with_pending_errors_or_missing_features() {
    let mem = ram();
    let (fake, _smmu, state) = running(&mem, FakeIdrs::QEMU);
    fake.force32(GERROR, GERROR_SFM_ERR);
    assert_eq!(adopt(&fake, &mem, &state).map(|_| ()), Err(AdoptError::GlobalError { active: GERROR_SFM_ERR }));
}

// --------------------------------------------------------------- proptests

/// A small running SMMU for property tests: 2-level table, 8-entry queues.
fn small_rig(mem: &TestMemory) -> (FakeSmmu<'_>, TestSmmu<'_>) {
    let config = SmmuConfig { evtq_log2_entries: 3, cmdq_log2_entries: 3, spin_budget: 64, ..SmmuConfig::default() };
    init_with(mem, FakeIdrs::QEMU, config)
}

fn any_command() -> impl Strategy<Value = Command> {
    prop_oneof![
        (any::<u32>(), any::<bool>()).prop_map(|(stream_id, leaf)| Command::CfgiSte { stream_id, leaf }),
        Just(Command::CfgiAll),
        any::<u16>().prop_map(|vmid| Command::TlbiS12Vmall { vmid }),
        Just(Command::TlbiNsnhAll),
        Just(Command::Sync),
    ]
}

proptest! {
    #[test]
    fn commands_round_trip(command in any_command(), words in any::<[u64; 2]>()) {
        prop_assert_eq!(Command::decode(command.encode()), Ok(command));
        if let Ok(decoded) = Command::decode(words) {
            prop_assert_eq!(decoded.encode(), words);
        }
    }

    #[test]
    fn any_event_record_decodes(raw in any::<[u64; 4]>()) {
        let event = Event::decode(raw);
        prop_assert_eq!(event.raw, raw);
        prop_assert_eq!(u64::from(event.stream_id), raw[0] >> 32);
        let _ = alloc::format!("{event}");
    }

    #[test]
    fn ring_counts_stay_consistent(log2 in 0u8..8, steps in proptest::collection::vec(0u32..4, 1..64)) {
        let ring = Ring::new(log2).expect("small ring");
        let (mut prod, mut cons) = (0u32, 0u32);
        for (i, step) in steps.into_iter().enumerate() {
            if i % 2 == 0 {
                let n = step.min(ring.free(prod, cons));
                prod = ring.advance(prod, n);
            } else {
                let n = step.min(ring.used(prod, cons));
                cons = ring.advance(cons, n);
            }
            prop_assert!(ring.is_consistent(prod, cons));
            prop_assert_eq!(ring.used(prod, cons) + ring.free(prod, cons), ring.entries());
            prop_assert_eq!(ring.is_empty(prod, cons), ring.used(prod, cons) == 0);
            prop_assert_eq!(ring.is_full(prod, cons), ring.used(prod, cons) == ring.entries());
        }
    }

    #[test]
    fn polling_random_queue_contents_never_panics(
        records in proptest::collection::vec(any::<[u64; 4]>(), 8),
        prod in any::<u32>(),
    ) {
        let mem = TestMemory::new(RAM_BASE, 16);
        let (fake, mut smmu) = small_rig(&mem);
        let base = smmu.state().evtq_base;
        for (i, record) in records.iter().enumerate() {
            for (w, word) in record.iter().enumerate() {
                mem.write(base + i as u64 * 32 + w as u64 * 8, *word);
            }
        }
        fake.force32(EVENTQ_PROD, prod);
        let mut seen = 0;
        match smmu.poll_events(|_| seen += 1) {
            Ok(summary) => {
                prop_assert!(summary.events <= 8);
                prop_assert_eq!(summary.events, seen);
            }
            Err(error) => {
                let inconsistent = matches!(error, Error::QueueInconsistent { .. });
                prop_assert!(inconsistent, "{:?}", error);
            }
        }
    }

    #[test]
    fn adopting_random_state_never_panics(
        offsets in any::<[u16; 3]>(),
        logs in any::<[u8; 4]>(),
        pointers in any::<[u32; 3]>(),
        format in 0u8..3,
        assignments in proptest::collection::vec((any::<u32>(), any::<u16>(), any::<u64>()), 0..4),
        corrupt in proptest::collection::vec((0u64..16 * 512, any::<u64>()), 0..4),
    ) {
        let mem = TestMemory::new(RAM_BASE, 16);
        let (fake, mut smmu) = small_rig(&mem);
        smmu.assign(&mut &mem, 0x10, 1, RAM_BASE + 15 * PAGE_SIZE).expect("assign");
        let valid = smmu.state();
        fake.take_writes();
        let near = |base: u64, offset: u16| base.wrapping_add(u64::from(offset) << 3);
        let state = SmmuState {
            strtab_base: near(valid.strtab_base, offsets[0]),
            strtab_format: format,
            strtab_split: logs[0] % 12,
            strtab_log2size: logs[1] % 40,
            cmdq_base: near(valid.cmdq_base, offsets[1]),
            cmdq_log2size: logs[2] % 33,
            cmdq_prod: pointers[0] % 64,
            cmdq_cons: pointers[1] % 64,
            evtq_base: near(valid.evtq_base, offsets[2]),
            evtq_log2size: logs[3] % 33,
            evtq_cons: pointers[2],
            assignments: assignments
                .into_iter()
                .map(|(stream_id, vmid, s2_root)| Assignment { stream_id, vmid, s2_root })
                .collect(),
        };
        for (word, value) in corrupt {
            mem.write(RAM_BASE + word * 8, value);
        }
        for candidate in [state, valid] {
            let _ = Smmu::adopt(fake.clone(), &mem, &candidate, &mem.ram(), 8).map(|_| ());
        }
        prop_assert!(fake.take_writes().is_empty());
    }
}

#[test]
fn display_strings_name_the_problem() {
    let cases: Vec<alloc::string::String> = vec![
        alloc::format!("{}", Error::Timeout(Wait::CommandSync)),
        alloc::format!("{}", AdoptError::Disabled { cr0ack: 0 }),
        alloc::format!("{}", ProbeError::NoStage2),
        alloc::format!("{}", CommandDecodeError::UnknownOpcode(0x99)),
    ];
    assert!(cases.iter().all(|s| !s.is_empty()));
    assert!(cases[2].contains("S2P"));
}

/// The committed corpus and crash reproducers of the `adopt` fuzz target
/// (`iommu/fuzz`) replayed on stable through the same body.
#[test]
fn every_adopt_fuzz_corpus_input_is_handled() {
    extern crate std;
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut replayed = 0;
    let setups = crate::testing::AdoptSetups::new();
    for dir in ["corpus", "regressions"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir).join("adopt")) else { continue };
        for entry in entries.flatten() {
            let data = std::fs::read(entry.path()).unwrap_or_else(|e| panic!("{}: {e}", entry.path().display()));
            crate::testing::adopt_arbitrary(&setups, &data);
            replayed += 1;
        }
    }
    assert!(replayed > 0, "the committed corpus went missing from {}", root.display());
}

/// Every input of the `vtd_adopt` fuzz corpus (`iommu/fuzz`), replayed on
/// stable through the same body.
#[test]
fn every_vtd_adopt_fuzz_corpus_input_is_handled() {
    extern crate std;
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut replayed = 0;
    for dir in ["corpus", "regressions"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir).join("vtd_adopt")) else { continue };
        for entry in entries.flatten() {
            let data = std::fs::read(entry.path()).unwrap_or_else(|e| panic!("{}: {e}", entry.path().display()));
            crate::testing::vtd_adopt_arbitrary(&data);
            replayed += 1;
        }
    }
    assert!(replayed > 0, "the committed corpus went missing from {}", root.display());
}
