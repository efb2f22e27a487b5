//! The hostile workload's attacks on x86_64 (`crate::hostile`): each runs
//! as one inline-assembly block that records where to resume first, so an
//! exception it raises (#GP, #UD, #PF, #BP, ...) is caught by
//! `exception_common` in `entry.S` (vector into `probe_fault` with bit 63
//! set, RIP set to the resume point) instead of stopping the guest.

use core::arch::asm;
use core::sync::atomic::{AtomicU64, Ordering};

use super::runtime::VmxGuest;
use crate::hostile::{Attack, Hostile, Isa, SCRATCH_BYTES};

/// Where an exception during an attack resumes (0: none; cleared by the
/// handler), and the vector taken there with bit 63 set (0: none).
#[export_name = "probe_resume"]
static PROBE_RESUME: AtomicU64 = AtomicU64::new(0);
#[export_name = "probe_fault"]
static PROBE_FAULT: AtomicU64 = AtomicU64::new(0);
const PROBE_TAKEN: u64 = 1 << 63;

#[repr(C, align(4096))]
struct Scratch([u8; SCRATCH_BYTES]);
static mut SCRATCH: Scratch = Scratch([0; SCRATCH_BYTES]);

/// DR7 bits a hostile write keeps clear (SDM Vol. 3B §18.2.4): the
/// breakpoint enables L0-G3 (0-7) and general detect (13), which would
/// fire in this guest's own code outside an attack.
const DR7_KEPT_CLEAR: u64 = 0xff | (1 << 13);
/// CR4 bits flipped (SDM Vol. 3A §2.5): UMIP, VMXE, SMXE, FSGSBASE,
/// OSXSAVE, PKE, CET, PKS and reserved bits; CR0 bits: MP, EM, TS, ET,
/// NE, WP, AM, NW, CD. Each flip is written back at once.
const CR4_FLIPS: [u64; 11] = [11, 13, 14, 16, 18, 22, 23, 24, 25, 28, 31];
const CR0_FLIPS: [u64; 9] = [1, 2, 3, 4, 5, 16, 18, 29, 30];

/// Runs the instructions with the resume point set: `r10` holds
/// `PROBE_RESUME`'s address, `r11` is scratch; the operands given must
/// not use either.
macro_rules! probed {
    ([$($insn:literal),+ $(,)?] $(, $($operands:tt)*)?) => {
        asm!(
            "lea r11, [rip + 2f]",
            "mov [r10], r11",
            $($insn,)+
            "2:",
            "mov qword ptr [r10], 0",
            $($($operands)*,)?
            in("r10") PROBE_RESUME.as_ptr(),
            out("r11") _,
        )
    };
}

impl Hostile for VmxGuest {
    fn isa(&self) -> Isa {
        Isa::X86_64
    }

    fn scratch(&mut self) -> &mut [u8] {
        let buffer = (&raw mut SCRATCH).cast::<u8>();
        // SAFETY: the buffer is SCRATCH_BYTES long; only the hostile
        // workload, on this guest's one vCPU, uses it, and only through
        // this borrow of the guest.
        unsafe { core::slice::from_raw_parts_mut(buffer, SCRATCH_BYTES) }
    }

    fn attack(&mut self, attack: &Attack) -> Option<u64> {
        PROBE_FAULT.store(0, Ordering::Relaxed);
        // hostile::generate keeps out what would end or wedge this guest (a
        // store into its own RAM outside the scratch buffer, an EFER write,
        // armed DR7 breakpoints or general detect; CR0/CR4 flips are
        // written back).
        // SAFETY: as above; each block declares what it changes.
        unsafe { run(attack, (&raw mut SCRATCH).cast::<u8>() as u64) };
        let fault = PROBE_FAULT.load(Ordering::Relaxed);
        (fault & PROBE_TAKEN != 0).then_some(fault & !PROBE_TAKEN)
    }
}

/// Makes `attack`; `scratch` is the scratch buffer's address.
///
/// # Safety
/// As [`Hostile::attack`] says: `attack` comes from `hostile::generate`.
#[allow(clippy::too_many_lines)]
unsafe fn run(attack: &Attack, scratch: u64) {
    // SAFETY: the caller's contract, for every block below; each declares
    // what it changes.
    unsafe {
        match *attack {
            Attack::Vmcall { rax, control, input, output } => probed!(
                ["vmcall"],
                inout("rax") rax => _, inout("rcx") control => _, inout("rdx") input => _, inout("r8") output => _
            ),
            Attack::Msr { index, write: false, .. } => {
                probed!(["rdmsr"], in("ecx") index, out("eax") _, out("edx") _);
            }
            Attack::Msr { index, write: true, value } => {
                probed!(["wrmsr"], in("ecx") index, in("eax") value as u32, in("edx") (value >> 32) as u32);
            }
            Attack::Port { port, width, write, value } => match (width, write) {
                (1, false) => probed!(["in al, dx"], in("dx") port, out("al") _),
                (2, false) => probed!(["in ax, dx"], in("dx") port, out("ax") _),
                (_, false) => probed!(["in eax, dx"], in("dx") port, out("eax") _),
                (1, true) => probed!(["out dx, al"], in("dx") port, in("al") value as u8),
                (2, true) => probed!(["out dx, ax"], in("dx") port, in("ax") value as u16),
                (_, true) => probed!(["out dx, eax"], in("dx") port, in("eax") value),
            },
            Attack::Memory { addr, width, write, value } => match (width, write) {
                (1, false) => probed!(["mov al, byte ptr [rsi]"], in("rsi") addr, out("al") _),
                (2, false) => probed!(["mov ax, word ptr [rsi]"], in("rsi") addr, out("ax") _),
                (4, false) => probed!(["mov eax, dword ptr [rsi]"], in("rsi") addr, out("eax") _),
                (_, false) => probed!(["mov rax, qword ptr [rsi]"], in("rsi") addr, out("rax") _),
                (1, true) => probed!(["mov byte ptr [rsi], al"], in("rsi") addr, in("al") value as u8),
                (2, true) => probed!(["mov word ptr [rsi], ax"], in("rsi") addr, in("ax") value as u16),
                (4, true) => probed!(["mov dword ptr [rsi], eax"], in("rsi") addr, in("eax") value as u32),
                (_, true) => probed!(["mov qword ptr [rsi], rax"], in("rsi") addr, in("rax") value),
            },
            Attack::Special { which, a, b } => special(which, a, b, scratch),
            Attack::Word { .. } => {}
        }
    }
}

/// [`crate::hostile::X86_SPECIALS`]`[which]`.
///
/// # Safety
/// As [`run`].
#[allow(clippy::too_many_lines)]
unsafe fn special(which: u8, a: u64, b: u64, scratch: u64) {
    let pick = |list: &[u64]| list[(a % list.len() as u64) as usize];
    // SAFETY: the caller's contract, for every block below; each declares
    // what it changes. RBX is LLVM's: CPUID's EBX goes through R9.
    unsafe {
        match which {
            0 => probed!(["ud2"]),
            1 => probed!(["int3"]),
            2 => probed!(
                ["mov r9, rbx", "cpuid", "mov rbx, r9"],
                inout("eax") a as u32 => _, inout("ecx") b as u32 => _, out("edx") _, out("r9") _
            ),
            3 => probed!(["rdpmc"], in("ecx") a as u32, out("eax") _, out("edx") _),
            4 => probed!(["rdtscp"], out("eax") _, out("edx") _, out("ecx") _),
            5 => probed!(["xsetbv"], in("ecx") (a & 1) as u32, in("eax") b as u32, in("edx") (b >> 32) as u32),
            6 => probed!(["vmxon qword ptr [rsi]"], in("rsi") scratch),
            7 => probed!(["vmclear qword ptr [rsi]"], in("rsi") scratch),
            8 => probed!(["vmptrld qword ptr [rsi]"], in("rsi") scratch),
            9 => probed!(["vmptrst qword ptr [rsi]"], in("rsi") scratch),
            10 => probed!(["vmread rax, rcx"], in("rcx") a, out("rax") _),
            11 => probed!(["vmwrite rcx, rax"], in("rcx") a, in("rax") b),
            12 => probed!(["vmlaunch"]),
            13 => probed!(["vmresume"]),
            14 => probed!(["vmxoff"]),
            15 => probed!(["invept rax, [rsi]"], in("rax") a & 3, in("rsi") scratch),
            16 => probed!(["invvpid rax, [rsi]"], in("rax") a & 3, in("rsi") scratch),
            // VMFUNC (0f 01 d4).
            17 => probed!([".byte 0x0f, 0x01, 0xd4"], in("eax") a as u32, in("ecx") b as u32),
            18 => probed!(["invd"]),
            19 => probed!(["wbinvd"]),
            20 => probed!(["getsec"], inout("eax") a as u32 => _),
            // MONITOR (0f 01 c8): RAX the address, ECX/EDX extensions.
            21 => probed!([".byte 0x0f, 0x01, 0xc8"], in("rax") scratch, in("ecx") 0u32, in("edx") 0u32),
            22 => probed!(["invlpg [rsi]"], in("rsi") a),
            23 => match a % 6 {
                0 => probed!(["mov dr0, rax"], in("rax") b),
                1 => probed!(["mov dr1, rax"], in("rax") b),
                2 => probed!(["mov dr2, rax"], in("rax") b),
                3 => probed!(["mov dr3, rax"], in("rax") b),
                4 => probed!(["mov dr6, rax"], in("rax") b),
                _ => probed!(["mov dr7, rax"], in("rax") b & !DR7_KEPT_CLEAR),
            },
            24 => probed!(["mov cr8, rax"], in("rax") if a & 1 == 0 { b & 0xf } else { b }),
            25 => probed!(
                ["mov rax, cr4", "mov r9, rax", "xor rax, rcx", "mov cr4, rax", "mov cr4, r9"],
                in("rcx") 1u64 << pick(&CR4_FLIPS), out("rax") _, out("r9") _
            ),
            26 => probed!(
                ["mov rax, cr0", "mov r9, rax", "xor rax, rcx", "mov cr0, rax", "mov cr0, r9"],
                in("rcx") 1u64 << pick(&CR0_FLIPS), out("rax") _, out("r9") _
            ),
            27 => probed!(["xsave [rsi]"], in("rsi") scratch, in("eax") a as u32, in("edx") b as u32),
            _ => probed!(["xrstor [rsi]"], in("rsi") scratch, in("eax") a as u32, in("edx") b as u32),
        }
    }
}
