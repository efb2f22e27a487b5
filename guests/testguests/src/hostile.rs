//! hostile (issue 15 item 2): a seeded random attacker of the hypervisor.
//!
//! Each of `ops=` rounds (default [`DEFAULT_OPS`]) generates one attack
//! from the seed (`seed=`, default: the counter at start; always printed,
//! so a failing run is replayed with `seed=<s>`) and has the runtime make
//! it ([`Hostile::attack`]):
//! - hypercalls with random function ids, control words (every call code,
//!   the fast and rep fields, reserved bits), rep counts and input/output
//!   addresses inside and outside this guest's RAM, misaligned and
//!   straddling its end; `LIVE_UPDATE` with a request and an image of
//!   random bytes (the guest is started privileged for that);
//! - aarch64: `MRS`/`MSR` to random system-register encodings, `SYS`/`SYSL`
//!   (cache, TLB and address-translation operations) on random addresses,
//!   `HVC`/`SMC` with random immediates, PSTATE writes, hints and
//!   barriers, `UDF` and words from the unallocated encoding space, and
//!   loads and stores of every width to the emulated GIC and PL011, to
//!   addresses with nothing behind them and to other guests' RAM;
//! - x86_64: `RDMSR`/`WRMSR` of random and well-known MSR indices
//!   (x2APIC, PMU, debug, VMX capability, the hypervisor range), `IN`/
//!   `OUT` of every width to random and well-known ports (the reset,
//!   power-off and debug ports of PC emulators), loads and stores to the
//!   APIC, I/O APIC, HPET and unbacked addresses, and instructions a VMM
//!   must intercept or refuse ([`X86_SPECIALS`]: the VMX instructions,
//!   `INVD`, `GETSEC`, `XSETBV`, `RDPMC`, `MOV` to debug and control
//!   registers, ...).
//!
//! An exception an attack raises in this guest (the UNDEFINED or #GP the
//! hypervisor injects, the abort for an address with nothing behind it) is
//! caught by the runtime and counted; the next attack follows.
//!
//! Left out, because they end or wedge this guest by design rather than
//! test the hypervisor: `SHUTDOWN_SELF` (it ends the run), the
//! `TEST_FAIL_NEXT_FREEZE` hook (it cancels another guest's next update),
//! PSCI calls that turn off, reset or suspend, WFI/WFE/WFxT and HLT with
//! nothing to wake them, x86 string I/O (not emulated: the guest is
//! stopped), stores into this guest's own RAM outside its
//! scratch buffer, and writes to the registers the runtime stands on
//! ([`a64_allowed`], [`msr_write_allowed`]).
//!
//! Lines: `hostile start=1 seed=0x.. ops=<n> isa=<aarch64|x86_64>`; every
//! [`PROGRESS_EVERY`] rounds `hostile progress ops=<k> exceptions=<e>`;
//! at the end `hostile done=1 seed=0x.. ops=<n> exceptions=<e>` with the
//! attacks made of each kind.

use hvcall::{call, UpdateRequest, SMCCC_VENDOR_HYP_CALL, UPDATE_REQUEST_SIZE};

use crate::{Env, Guest, Line, Region, Request};

/// Attacks made when `ops=` is not given.
pub const DEFAULT_OPS: u64 = 20_000;
/// A progress line every this many attacks.
pub const PROGRESS_EVERY: u64 = 2_000;
/// Bytes of the scratch buffer attacks may overwrite (4 KiB aligned).
pub const SCRATCH_BYTES: usize = 16 * 1024;

/// The guest's emulated devices (the addresses its DTB gives; hypervisor
/// `GUEST_GICD`, `GUEST_GICR`, `GUEST_UART`).
const A64_GICD: u64 = 0x0800_0000;
const A64_GICR: u64 = 0x080a_0000;
const A64_UART: u64 = 0x0900_0000;

/// xorshift64* (Vigna, "An experimental exploration of Marsaglia's
/// xorshift generators, scrambled", 2016): small, and the same sequence
/// on every machine for a seed.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        // Any seed, 0 included, gives a non-zero state.
        Self(seed ^ 0x9e37_79b9_7f4a_7c15)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A value below `n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next_u64() % n
        }
    }

    /// One of `items`, which must not be empty.
    pub fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }

    pub fn one_in(&mut self, n: u64) -> bool {
        self.below(n) == 0
    }
}

/// The instruction set attacked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    Aarch64,
    X86_64,
}

/// What the generator may aim at.
#[derive(Clone, Copy, Debug)]
pub struct Target {
    pub isa: Isa,
    /// This guest's RAM: stores land in it only inside `scratch`.
    pub ram: Region,
    /// The buffer attacks may overwrite (hypercall outputs, `DC ZVA`,
    /// `INS`, stores).
    pub scratch: Region,
}

/// One attack, as the runtime makes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attack {
    /// aarch64: run instruction `word` with x0-x3 = `x` (an exception it
    /// raises resumes after it).
    Word { word: u32, x: [u64; 4] },
    /// x86_64: `vmcall` with RAX, RCX (control), RDX (input), R8 (output).
    Vmcall { rax: u64, control: u64, input: u64, output: u64 },
    /// x86_64: `RDMSR`/`WRMSR`.
    Msr { index: u32, write: bool, value: u64 },
    /// x86_64: `IN`/`OUT` of `width` bytes.
    Port { port: u16, width: u8, write: bool, value: u32 },
    /// x86_64: a load or store of `width` bytes.
    Memory { addr: u64, width: u8, write: bool, value: u64 },
    /// x86_64: [`X86_SPECIALS`]`[which]` with operands `a`, `b`.
    Special { which: u8, a: u64, b: u64 },
}

/// The kinds of attack, counted separately.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Hypercall,
    Sysreg,
    Sys,
    CallImm,
    Pstate,
    Undefined,
    Memory,
    Msr,
    Port,
    Special,
}

const KINDS: [(Kind, &str); 10] = [
    (Kind::Hypercall, "hypercall"),
    (Kind::Sysreg, "sysreg"),
    (Kind::Sys, "sys"),
    (Kind::CallImm, "call_imm"),
    (Kind::Pstate, "pstate"),
    (Kind::Undefined, "undefined"),
    (Kind::Memory, "memory"),
    (Kind::Msr, "msr"),
    (Kind::Port, "port"),
    (Kind::Special, "special"),
];

/// The instructions [`Attack::Special`] names on x86_64, in order.
/// (String I/O is left out: this machine does not emulate it and stops
/// the guest, `unsupported-io` in `hypervisor/GUEST-MACHINE.md`.)
pub const X86_SPECIALS: [&str; 29] = [
    "ud2", "int3", "cpuid", "rdpmc", "rdtscp", "xsetbv", "vmxon", "vmclear", "vmptrld", "vmptrst", "vmread", "vmwrite",
    "vmlaunch", "vmresume", "vmxoff", "invept", "invvpid", "vmfunc", "invd", "wbinvd", "getsec", "monitor", "invlpg",
    "mov-dr", "mov-cr8", "cr4-flip", "cr0-flip", "xsave", "xrstor",
];

/// A runtime that can make attacks and gives the workload a scratch
/// buffer of [`SCRATCH_BYTES`].
pub trait Hostile: Guest {
    /// The instruction set this runtime attacks with.
    fn isa(&self) -> Isa;

    /// The scratch buffer (4 KiB aligned, identity-mapped).
    fn scratch(&mut self) -> &mut [u8];

    /// Makes `attack`; returns the syndrome of the exception it raised in
    /// this guest (aarch64 ESR_EL1, x86_64 vector), if any.
    fn attack(&mut self, attack: &Attack) -> Option<u64>;
}

/// PSCI and SMCCC function ids (DEN0022E §5, DEN0028) a hostile call may
/// use, besides random ones: the queries, and CPU_ON (of itself: already
/// on; of anything else: no such CPU).
const FUNCTION_IDS: [u64; 10] = [
    0x8400_0000, // PSCI_VERSION
    0x8400_000a, // PSCI_FEATURES
    0xc400_0004, // AFFINITY_INFO
    0xc400_0003, // CPU_ON
    0x8400_0006, // MIGRATE_INFO_TYPE
    0xc400_0005, // MIGRATE
    0x8000_0000, // SMCCC_VERSION
    0x8000_0001, // SMCCC_ARCH_FEATURES
    0x8000_8000, // SMCCC_ARCH_WORKAROUND_1
    0x8600_ff01, // vendor hypervisor service: call UID
];

/// PSCI functions that turn off, reset or suspend the caller (DEN0022E
/// Table 5): never called. SMCCC takes the function id from W0, so only
/// the low 32 bits are compared.
const FUNCTIONS_LEFT_OUT: [u32; 13] = [
    0x8400_0001, // CPU_SUSPEND (SMC32)
    0xc400_0001, // CPU_SUSPEND (SMC64)
    0x8400_0002, // CPU_OFF
    0x8400_0008, // SYSTEM_OFF
    0x8400_0009, // SYSTEM_RESET
    0x8400_0012, // SYSTEM_RESET2 (SMC32)
    0xc400_0012, // SYSTEM_RESET2 (SMC64)
    0x8400_000c, // CPU_DEFAULT_SUSPEND (SMC32)
    0xc400_000c, // CPU_DEFAULT_SUSPEND (SMC64)
    0x8400_000b, // CPU_FREEZE
    0x8400_000e, // SYSTEM_SUSPEND (SMC32)
    0xc400_000e, // SYSTEM_SUSPEND (SMC64)
    0x8400_0015, // SYSTEM_OFF2
];

/// Whether a call with function id `function` and control word `control`
/// may be made: not one of [`FUNCTIONS_LEFT_OUT`], and, for our own
/// service (or on x86_64, where there is no function id), neither
/// `SHUTDOWN_SELF` nor `TEST_FAIL_NEXT_FREEZE`.
pub fn call_allowed(function: Option<u64>, control: u64) -> bool {
    let ours = match function {
        None => true,
        Some(f) => {
            if FUNCTIONS_LEFT_OUT.contains(&(f as u32)) {
                return false;
            }
            f as u32 == SMCCC_VENDOR_HYP_CALL as u32
        }
    };
    let code = control as u16;
    !(ours && (code == call::SHUTDOWN_SELF || code == call::TEST_FAIL_NEXT_FREEZE))
}

/// System registers (op0, op1, CRn, CRm, op2) this guest must not write:
/// SCTLR_EL1 (the MMU), CPACR_EL1 (FP/SIMD, which the code uses),
/// VBAR_EL1 (its vectors), MDSCR_EL1 (debug exceptions at EL1), DAIF and
/// SPSel (its interrupt mask and stack).
const A64_WRITES_LEFT_OUT: [(u32, u32, u32, u32, u32); 6] =
    [(3, 0, 1, 0, 0), (3, 0, 1, 0, 2), (3, 0, 12, 0, 0), (2, 0, 0, 2, 2), (3, 3, 4, 2, 1), (3, 0, 4, 2, 0)];

/// Whether the aarch64 instruction `word` may be run: not WFE, WFI, WFET
/// or WFIT (nothing would wake this guest), not an `MSR` (immediate) to
/// SPSel, DAIFSet or DAIFClr, and not an `MSR` (register) to
/// [`A64_WRITES_LEFT_OUT`]. (Arm ARM C6.2: HINT, WFET/WFIT, MSR.)
pub fn a64_allowed(word: u32) -> bool {
    const HINT_MASK: u32 = 0xffff_f01f;
    const HINT: u32 = 0xd503_201f;
    const WFXT_MASK: u32 = 0xffff_ffe0;
    const WFET: u32 = 0xd503_1000;
    const WFIT: u32 = 0xd503_1020;
    const MSR_IMM_MASK: u32 = 0xfff8_f01f;
    const MSR_IMM: u32 = 0xd500_401f;
    const MSR_REG_MASK: u32 = 0xfff0_0000;
    const MSR_REG: u32 = 0xd510_0000;
    if word & HINT_MASK == HINT {
        let crm_op2 = (word >> 5) & 0x7f;
        // WFE (CRm 0, op2 2) and WFI (CRm 0, op2 3).
        return crm_op2 != 2 && crm_op2 != 3;
    }
    if word & WFXT_MASK == WFET || word & WFXT_MASK == WFIT {
        return false;
    }
    if word & MSR_IMM_MASK == MSR_IMM {
        let (op1, op2) = ((word >> 16) & 7, (word >> 5) & 7);
        return !matches!((op1, op2), (0, 5) | (3, 6 | 7));
    }
    if word & MSR_REG_MASK == MSR_REG {
        let o0 = (word >> 19) & 1;
        let key = (2 + o0, (word >> 16) & 7, (word >> 12) & 0xf, (word >> 8) & 0xf, (word >> 5) & 7);
        return !A64_WRITES_LEFT_OUT.contains(&key);
    }
    true
}

/// EFER (SDM Vol. 4 Table 2-2): clearing LME or NXE under this guest's
/// own feet ends it, so it is never written.
const IA32_EFER: u32 = 0xc000_0080;

/// Whether MSR `index` may be written.
pub fn msr_write_allowed(index: u32) -> bool {
    index != IA32_EFER
}

/// x2APIC ICR (SDM Vol. 3A §11.12.9): delivery modes other than fixed
/// (INIT, SIPI, NMI, SMI) are cleared from hostile writes; misprogrammed
/// IPIs are the `bad-apic` fault test's.
const X2APIC_ICR: u32 = 0x830;
const ICR_DELIVERY_MODE: u64 = 0x700;

/// Fills `scratch` with random bytes and, one time in two, puts a
/// `LIVE_UPDATE` request at its start that points at an image of random
/// bytes inside it.
pub fn refresh_scratch(rng: &mut Rng, scratch: &mut [u8], scratch_gpa: u64) {
    for chunk in scratch.chunks_mut(8) {
        let bytes = rng.next_u64().to_le_bytes();
        chunk.copy_from_slice(&bytes[..chunk.len()]);
    }
    if rng.one_in(2) && scratch.len() >= UPDATE_REQUEST_SIZE {
        let image_gpa = scratch_gpa + 64 + rng.below(64) * 8;
        let image_size = match rng.below(4) {
            0 => rng.next_u64(),
            1 => 0,
            _ => rng.below(scratch.len() as u64),
        };
        let request = UpdateRequest { image_gpa, image_size }.to_bytes();
        scratch[..UPDATE_REQUEST_SIZE].copy_from_slice(&request);
    }
}

/// An address: in the scratch buffer (for outputs and stores; `room`
/// bytes fit after it), just inside or past the end of RAM, below it,
/// random, or extreme.
fn address(rng: &mut Rng, t: &Target, room: u64) -> u64 {
    let scratch_len = t.scratch.end - t.scratch.start;
    match rng.below(8) {
        0..=2 => t.scratch.start + rng.below(scratch_len.saturating_sub(room).max(1)),
        3 => t.ram.end.wrapping_sub(rng.below(16)),
        4 => t.ram.end + rng.below(64 << 20),
        5 => t.ram.start.wrapping_sub(1 + rng.below(512 << 20)),
        6 => rng.pick(&[0, u64::MAX, u64::MAX - 7, 1 << 40, 1 << 48, 0x8000_0000_0000_0000]),
        _ => rng.next_u64() & ((1 << 40) - 1),
    }
}

/// A hypercall control word: mostly known call codes, sometimes with the
/// fast flag, reserved bits, rep counts and start indices set at random.
fn control_word(rng: &mut Rng) -> u64 {
    let code = match rng.below(4) {
        0 | 1 => rng.pick(&[
            call::CONSOLE_WRITE,
            call::GET_PARTITION_ID,
            call::GET_HV_INFO,
            call::YIELD,
            call::GET_PARTITION_STATE,
            call::GET_UPDATE_PHASE,
            call::LIVE_UPDATE,
        ]),
        2 => rng.below(0x20) as u16,
        _ => rng.next_u64() as u16,
    };
    let mut word = u64::from(code);
    if rng.one_in(2) {
        word |= 1 << 16;
    }
    if rng.one_in(8) {
        word |= rng.next_u64() & 0xf000_f000_fffe_0000;
    }
    if rng.one_in(3) {
        // Console writes of in-RAM bytes stay short: the log is the
        // test's to read.
        let count = if code == call::CONSOLE_WRITE { rng.below(80) } else { rng.below(0x1000) };
        let start = if rng.one_in(4) { rng.below(0x1000) } else { rng.below(count + 1) };
        word |= (count << 32) | (start << 48);
    }
    word
}

/// The function id (x0) of an aarch64 call: mostly our service, else
/// PSCI/SMCCC queries or random, never [`FUNCTIONS_LEFT_OUT`].
fn function_id(rng: &mut Rng) -> u64 {
    loop {
        let f = match rng.below(8) {
            0..=3 => SMCCC_VENDOR_HYP_CALL,
            4 | 5 => rng.pick(&FUNCTION_IDS),
            6 => 0x8400_0000 | rng.below(0x20) | (rng.below(2) << 30),
            _ => rng.next_u64(),
        };
        if !FUNCTIONS_LEFT_OUT.contains(&(f as u32)) {
            return f;
        }
    }
}

/// Generates the next attack for `t`.
pub fn generate(rng: &mut Rng, t: &Target) -> (Kind, Attack) {
    loop {
        let (kind, attack) = match t.isa {
            Isa::Aarch64 => generate_a64(rng, t),
            Isa::X86_64 => generate_x86(rng, t),
        };
        let allowed = match attack {
            Attack::Word { word, x } => a64_allowed(word) && (!is_a64_call(word) || call_allowed(Some(x[0]), x[1])),
            Attack::Vmcall { control, .. } => call_allowed(None, control),
            Attack::Msr { index, write, .. } => !write || msr_write_allowed(index),
            Attack::Memory { addr, width, write, .. } => !write || !touches_own_ram(t, addr, u64::from(width)),
            _ => true,
        };
        if allowed {
            return (kind, attack);
        }
    }
}

/// Whether `[addr, addr + len)` reaches this guest's RAM outside its
/// scratch buffer.
fn touches_own_ram(t: &Target, addr: u64, len: u64) -> bool {
    let end = addr.saturating_add(len);
    let in_ram = addr < t.ram.end && end > t.ram.start;
    in_ram && !(addr >= t.scratch.start && end <= t.scratch.end)
}

/// A `DC` operation whose stage-2 fault comes without an instruction
/// syndrome and without the cache-maintenance flag (Arm ARM C5.3: SYS #3,
/// C7, C4/C12/C13, any op2 and Rt): `DC ZVA`, `DC GVA`, `DC GZVA` (block
/// stores), and `DC CVAP`/`CVADP` and their tag variants, which QEMU
/// checks with a read. On an emulated device the hypervisor stops the
/// guest (undecodable-mmio, as it should), so these aim at scratch only.
fn a64_dc_without_syndrome(word: u32) -> bool {
    word & 0xffff_f000 == 0xd50b_7000 && matches!((word >> 8) & 0xf, 4 | 12 | 13)
}

/// `HVC #imm` or `SMC #imm` (Arm ARM C6.2.106, C6.2.286).
fn is_a64_call(word: u32) -> bool {
    word & 0xffe0_001f == 0xd400_0002 || word & 0xffe0_001f == 0xd400_0003
}

/// The `MRS`/`MSR`/`SYS`/`SYSL` encoding (Arm ARM C5.1.2): bit 21 L,
/// op0 [20:19], op1 [18:16], CRn [15:12], CRm [11:8], op2 [7:5], Rt x0.
fn a64_system(l: bool, op0: u32, op1: u32, crn: u32, crm: u32, op2: u32) -> u32 {
    0xd500_0000
        | (u32::from(l) << 21)
        | ((op0 & 3) << 19)
        | ((op1 & 7) << 16)
        | ((crn & 0xf) << 12)
        | ((crm & 0xf) << 8)
        | ((op2 & 7) << 5)
}

fn generate_a64(rng: &mut Rng, t: &Target) -> (Kind, Attack) {
    let mut x = [rng.next_u64(), rng.next_u64(), rng.next_u64(), rng.next_u64()];
    let (kind, word) = match rng.below(16) {
        0..=2 => {
            // HVC #0: our hypercalls, PSCI and SMCCC.
            x = [function_id(rng), control_word(rng), address(rng, t, 4096), address(rng, t, 4096)];
            if x[1] as u16 == call::LIVE_UPDATE && rng.one_in(2) {
                x[2] = t.scratch.start;
            }
            (Kind::Hypercall, 0xd400_0002)
        }
        3..=6 => {
            let op0 = 2 + rng.below(2) as u32;
            let op1 = if rng.one_in(2) { rng.pick(&[0, 3]) } else { rng.below(8) as u32 };
            let word =
                a64_system(rng.one_in(2), op0, op1, rng.below(16) as u32, rng.below(16) as u32, rng.below(8) as u32);
            (Kind::Sysreg, word)
        }
        7 => {
            // Cache, TLB and address-translation operations, and the rest
            // of the SYS space, on this guest's scratch, a device or
            // nothing.
            x[0] = match rng.below(4) {
                0 => t.scratch.start + rng.below(t.scratch.end - t.scratch.start),
                1 => rng.pick(&[A64_GICD, A64_GICR, A64_UART]) + rng.below(0x1000),
                _ => address(rng, t, 64),
            };
            if touches_own_ram(t, x[0], 4096) {
                x[0] = t.scratch.start;
            }
            let crn = if rng.one_in(4) { rng.below(16) as u32 } else { rng.pick(&[7, 8, 9]) };
            let word =
                a64_system(rng.one_in(8), 1, rng.below(8) as u32, crn, rng.below(16) as u32, rng.below(8) as u32);
            if a64_dc_without_syndrome(word) && !t.scratch.contains(x[0]) {
                x[0] = t.scratch.start;
            }
            (Kind::Sys, word)
        }
        8 => {
            x[0] = function_id(rng);
            x[1] = control_word(rng);
            let imm = if rng.one_in(4) { 0 } else { rng.below(0x1_0000) as u32 };
            (Kind::CallImm, 0xd400_0000 | (imm << 5) | rng.pick(&[2, 3]))
        }
        9 => {
            // PSTATE writes (CRn 4), hints (CRn 2) and barriers (CRn 3).
            let crn = rng.pick(&[2, 3, 4]);
            let op1 = if crn == 4 { rng.below(8) as u32 } else { 3 };
            let word = a64_system(false, 0, op1, crn, rng.below(16) as u32, rng.below(8) as u32) | 0x1f;
            (Kind::Pstate, word)
        }
        10 => {
            // UDF #imm16, or op0 [28:25] = 0b0001: unallocated (C4.1).
            let word = if rng.one_in(2) {
                rng.below(0x1_0000) as u32
            } else {
                (rng.next_u64() as u32 & 0xe1ff_ffff) | 0x0200_0000
            };
            (Kind::Undefined, word)
        }
        _ => {
            // LDR/STR (unsigned offset 0) of 1, 2, 4 or 8 bytes, x1 at [x0]
            // (C6.2.*: size [31:30], opc [23:22]).
            let size = rng.below(4) as u32;
            let load = rng.one_in(2);
            x[0] = match rng.below(6) {
                0 => A64_GICD + rng.below(0x1_0000),
                1 => A64_GICR + rng.below(0x4_0000),
                2 => A64_UART + rng.below(0x1000),
                _ => address(rng, t, 8),
            };
            if !rng.one_in(8) {
                x[0] &= !((1u64 << size) - 1);
            }
            let word = 0x3900_0001 | (size << 30) | (u32::from(load) << 22);
            if !load && touches_own_ram(t, x[0], 1 << size) {
                x[0] = t.scratch.start;
            }
            (Kind::Memory, word)
        }
    };
    (kind, Attack::Word { word, x })
}

/// Well-known MSR indices (SDM Vol. 4 Table 2-2, and the Hyper-V range).
const MSRS: [u32; 26] = [
    0x10,
    0x1b,
    0x3a,
    0x48,
    0x8b,
    0xc1,
    0x174,
    0x175,
    0x176,
    0x186,
    0x1a0,
    0x1d9,
    0x277,
    0x2ff,
    0x38f,
    0x480,
    0x48b,
    0x6e0,
    0xc000_0081,
    0xc000_0082,
    0xc000_0084,
    0xc000_0100,
    0xc000_0102,
    0xc000_0103,
    0xda0,
    0x4000_0000,
];

/// I/O ports of PC emulators: COM1/COM2, the keyboard controller (0x64
/// 0xfe resets), CMOS, POST, fast A20 and reset (0x92), PCI configuration
/// and reset control (0xcf9), QEMU/Bochs debug and power-off ports,
/// fw_cfg, the PICs and the PIT.
const PORTS: [u16; 24] = [
    0x3f8, 0x3f9, 0x3fd, 0x2f8, 0x60, 0x64, 0x70, 0x71, 0x80, 0x92, 0xcf8, 0xcfc, 0xcf9, 0x402, 0x8900, 0xe9, 0x510,
    0x511, 0x604, 0xb004, 0x20, 0xa1, 0x43, 0x61,
];

fn generate_x86(rng: &mut Rng, t: &Target) -> (Kind, Attack) {
    match rng.below(16) {
        0..=2 => {
            let control = control_word(rng);
            let mut input = address(rng, t, 4096);
            if control as u16 == call::LIVE_UPDATE && rng.one_in(2) {
                input = t.scratch.start;
            }
            let attack = Attack::Vmcall { rax: rng.next_u64(), control, input, output: address(rng, t, 4096) };
            (Kind::Hypercall, attack)
        }
        3..=6 => {
            let index = match rng.below(5) {
                0 | 1 => rng.pick(&MSRS),
                2 => 0x800 + rng.below(0x100) as u32,
                3 => rng.pick(&[0, 0xc000_0000, 0x4000_0000]) + rng.below(0x2000) as u32,
                _ => rng.next_u64() as u32,
            };
            let write = rng.one_in(2);
            let mut value = match rng.below(3) {
                0 => rng.below(0x100),
                1 => 1 << rng.below(64),
                _ => rng.next_u64(),
            };
            if index == X2APIC_ICR {
                value &= !ICR_DELIVERY_MODE;
            }
            (Kind::Msr, Attack::Msr { index, write, value })
        }
        7..=9 => {
            let port = if rng.one_in(2) { rng.pick(&PORTS) } else { rng.next_u64() as u16 };
            let attack =
                Attack::Port { port, width: rng.pick(&[1, 2, 4]), write: rng.one_in(2), value: rng.next_u64() as u32 };
            (Kind::Port, attack)
        }
        10..=12 => {
            let width = rng.pick(&[1u8, 2, 4, 8]);
            let addr = match rng.below(6) {
                0 => 0xfee0_0000 + rng.below(0x1000),
                1 => 0xfec0_0000 + rng.below(0x1000),
                2 => rng.pick(&[0xfed0_0000, 0xe000_0000, 0x000b_8000, 0xffff_fff0]) + rng.below(0x100),
                _ => address(rng, t, 8),
            };
            let addr = if rng.one_in(8) { addr } else { addr & !(u64::from(width) - 1) };
            let write = rng.one_in(2);
            let addr = if write && touches_own_ram(t, addr, u64::from(width)) { t.scratch.start } else { addr };
            (Kind::Memory, Attack::Memory { addr, width, write, value: rng.next_u64() })
        }
        _ => {
            let which = rng.below(X86_SPECIALS.len() as u64) as u8;
            (Kind::Special, Attack::Special { which, a: rng.next_u64(), b: rng.next_u64() })
        }
    }
}

/// Attacks made and exceptions taken, per kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    pub made: [u64; KINDS.len()],
    pub exceptions: u64,
}

impl Tally {
    fn count(&mut self, kind: Kind, exception: bool) {
        if let Some(i) = KINDS.iter().position(|&(k, _)| k == kind) {
            self.made[i] += 1;
        }
        self.exceptions += u64::from(exception);
    }

    pub fn total(&self) -> u64 {
        self.made.iter().sum()
    }
}

/// The hostile workload.
pub fn run<G: Hostile>(g: &mut G, env: &Env) {
    let seed = env.args().seed.unwrap_or_else(|| g.counter());
    let ops = env.args().ops.unwrap_or(DEFAULT_OPS);
    let isa = g.isa();
    let scratch = {
        let buf = g.scratch();
        let start = buf.as_ptr();
        let len = buf.len() as u64;
        let gpa = g.gpa_of(start);
        Region::new(gpa, gpa + len)
    };
    let target = Target { isa, ram: env.ram(), scratch };
    let isa_name = match isa {
        Isa::Aarch64 => "aarch64",
        Isa::X86_64 => "x86_64",
    };
    g.write_line(Line::event("hostile").flag("start", true).hex("seed", seed).field("ops", ops).field("isa", isa_name));
    let mut rng = Rng::new(seed);
    let mut tally = Tally::default();
    for k in 0..ops {
        if k % 64 == 0 {
            refresh_scratch(&mut rng, g.scratch(), scratch.start);
        }
        let (kind, attack) = generate(&mut rng, &target);
        let exception = g.attack(&attack);
        tally.count(kind, exception.is_some());
        if (k + 1) % PROGRESS_EVERY == 0 && k + 1 < ops {
            g.write_line(Line::event("hostile").field("progress", k + 1).field("exceptions", tally.exceptions));
        }
    }
    // End whatever partial line the attacks left on the console (random
    // bytes through CONSOLE_WRITE and the UART), so the verdict starts a
    // line of its own.
    let newline = b"\n";
    g.hypercall(Request::console_write(g.gpa_of(newline.as_ptr()), newline.len()));
    let mut line = Line::event("hostile");
    line.flag("done", true).hex("seed", seed).field("ops", tally.total()).field("exceptions", tally.exceptions);
    for (i, &(_, name)) in KINDS.iter().enumerate() {
        if tally.made[i] > 0 {
            line.field(name, tally.made[i]);
        }
    }
    g.write_line(&line);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::args::Args;
    use crate::fake::FakeGuest;
    use std::format;
    use std::string::String;
    use std::vec::Vec;

    const RAM: Region = Region::new(0x4000_0000, 0x4100_0000);
    const SCRATCH: Region = Region::new(0x4008_0000, 0x4008_4000);

    fn target(isa: Isa) -> Target {
        Target { isa, ram: RAM, scratch: SCRATCH }
    }

    #[test]
    fn the_same_seed_gives_the_same_attacks() {
        for isa in [Isa::Aarch64, Isa::X86_64] {
            let run = |seed| {
                let mut rng = Rng::new(seed);
                (0..1000).map(|_| generate(&mut rng, &target(isa))).collect::<Vec<_>>()
            };
            assert_eq!(run(7), run(7));
            assert_ne!(run(7), run(8));
        }
    }

    #[test]
    fn nothing_left_out_is_ever_generated() {
        for isa in [Isa::Aarch64, Isa::X86_64] {
            let t = target(isa);
            let mut rng = Rng::new(0x5eed);
            let mut kinds = std::collections::BTreeSet::new();
            for _ in 0..200_000 {
                let (kind, attack) = generate(&mut rng, &t);
                kinds.insert(format!("{kind:?}"));
                match attack {
                    Attack::Word { word, x } => {
                        assert!(a64_allowed(word), "{word:#x}");
                        if is_a64_call(word) {
                            assert!(!FUNCTIONS_LEFT_OUT.contains(&(x[0] as u32)), "{:#x}", x[0]);
                            assert!(call_allowed(Some(x[0]), x[1]));
                        }
                        if a64_dc_without_syndrome(word) {
                            assert!(SCRATCH.contains(x[0]), "{word:#x} at {:#x}", x[0]);
                        }
                        let store = word & 0x3fc0_0000 == 0x3900_0000;
                        if store {
                            let size = 1u64 << (word >> 30);
                            assert!(!touches_own_ram(&t, x[0], size), "store at {:#x}", x[0]);
                        }
                    }
                    Attack::Vmcall { control, .. } => {
                        let code = control as u16;
                        assert!(code != call::SHUTDOWN_SELF && code != call::TEST_FAIL_NEXT_FREEZE);
                    }
                    Attack::Msr { index, write, value } => {
                        assert!(!(write && index == IA32_EFER));
                        if index == X2APIC_ICR {
                            assert_eq!(value & ICR_DELIVERY_MODE, 0);
                        }
                    }
                    Attack::Memory { addr, width, write, .. } => {
                        assert!(!(write && touches_own_ram(&t, addr, u64::from(width))));
                    }
                    Attack::Port { width, .. } => assert!([1, 2, 4].contains(&width)),
                    Attack::Special { which, .. } => assert!(usize::from(which) < X86_SPECIALS.len()),
                }
            }
            let want = match isa {
                Isa::Aarch64 => 7,
                Isa::X86_64 => 5,
            };
            assert_eq!(kinds.len(), want, "{isa:?}: {kinds:?}");
        }
    }

    #[test]
    fn the_filters_refuse_what_would_wedge_the_guest() {
        // WFE, WFI, WFET x0, WFIT x0.
        for word in [0xd503_205f, 0xd503_207f, 0xd503_1000, 0xd503_1020] {
            assert!(!a64_allowed(word), "{word:#x}");
        }
        // MSR SPSel, #0; MSR DAIFSet, #0xf; MSR DAIFClr, #2.
        for word in [0xd500_40bf, 0xd503_4fdf, 0xd503_42ff] {
            assert!(!a64_allowed(word), "{word:#x}");
        }
        // MSR SCTLR_EL1, x0; MSR VBAR_EL1, x0; MSR DAIF, x0; MSR MDSCR_EL1, x0.
        for word in [0xd518_1000, 0xd518_c000, 0xd51b_4220, 0xd510_0240] {
            assert!(!a64_allowed(word), "{word:#x}");
        }
        // MRS x0, SCTLR_EL1 reads are fine; so are NOP, YIELD and ISB.
        for word in [0xd538_1000, 0xd503_201f, 0xd503_203f, 0xd503_3fdf] {
            assert!(a64_allowed(word), "{word:#x}");
        }
        assert!(!call_allowed(Some(0x8400_0008), 0));
        assert!(!call_allowed(Some(0xdead_0000_8400_0009), 0));
        assert!(!call_allowed(Some(SMCCC_VENDOR_HYP_CALL), u64::from(call::SHUTDOWN_SELF) | (1 << 16)));
        assert!(call_allowed(Some(0x1234), u64::from(call::SHUTDOWN_SELF)));
        assert!(!call_allowed(None, u64::from(call::TEST_FAIL_NEXT_FREEZE)));
    }

    #[test]
    fn the_workload_prints_its_seed_and_what_it_made() {
        let args = Args { seed: Some(42), ops: Some(300), ..Args::default() };
        let env = Env::new(RAM, [Region::default(); 2], args);
        let mut g = FakeGuest::new();
        run(&mut g, &env);
        assert_eq!(g.lines.first().map(String::as_str), Some("hostile start=1 seed=0x2a ops=300 isa=aarch64"));
        assert_eq!(g.lines.len(), 3, "start, an empty line ending the attacks' bytes, done");
        let done = g.lines.last().cloned().unwrap_or_default();
        assert!(done.starts_with("hostile done=1 seed=0x2a ops=300 exceptions="), "{done}");
        assert_eq!(g.attacks.len(), 300);
        // The same seed again: the same attacks of each kind (the scratch
        // buffer, and so some addresses, differs between fakes).
        let mut h = FakeGuest::new();
        run(&mut h, &env);
        assert_eq!(g.lines, h.lines);
    }
}
