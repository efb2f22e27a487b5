//! Completing a guest's access to a guest-physical address with nothing
//! behind it, as a PC does: reads return all ones, writes are dropped.
//!
//! An EPT violation carries no decoded instruction (unlike the Arm ISV
//! syndrome) and no instruction length (SDM Vol. 3C §28.2.5 lists the
//! exits that have one; EPT violations are not among them), so the
//! hypervisor finds the instruction itself: it walks the guest's page
//! tables for RIP ([`translate`], SDM Vol. 3A ch. 4), fetches up to 15
//! bytes, and decodes the few forms compilers emit for a load or store
//! ([`decode`]: MOV, MOVZX, MOVSX, MOVSXD and the moffs forms, Vol. 2
//! ch. 3-4). Anything else is [`DecodeError`]: the arch code stops the
//! partition with a reason rather than guess.

use super::vmx_exit::Gpr;

/// The longest x86 instruction (SDM Vol. 2A §2.3.11).
pub const MAX_INSTRUCTION: usize = 15;

/// The code size the guest runs with: CS.L in IA-32e mode, else CS.D
/// (SDM Vol. 3A §3.4.5); real mode is 16-bit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CodeSize {
    Bits16,
    Bits32,
    Bits64,
}

/// Segment access-rights bits (SDM Vol. 3C §25.4.1, Table 25-2): L (13),
/// D/B (14).
const AR_L: u64 = 1 << 13;
const AR_DB: u64 = 1 << 14;

impl CodeSize {
    /// From CR0.PE, IA32_EFER.LMA and CS's access rights.
    pub fn of(protected: bool, long_mode_active: bool, cs_access_rights: u64) -> Self {
        if long_mode_active && cs_access_rights & AR_L != 0 {
            Self::Bits64
        } else if protected && cs_access_rights & AR_DB != 0 {
            Self::Bits32
        } else {
            Self::Bits16
        }
    }
}

/// How a loaded value reaches its destination register.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Extend {
    /// As wide as the destination (MOV).
    None,
    /// MOVZX.
    Zero,
    /// MOVSX, MOVSXD.
    Sign,
}

/// A decoded access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// `size` bytes read into `dst`.
    Load { dst: RegOperand, size: u8, extend: Extend },
    /// `size` bytes written (what is written does not matter here).
    Store { size: u8 },
}

/// A register destination: `size` bytes of `gpr`, or bits 15:8 of it (AH,
/// CH, DH, BH: byte registers 4-7 without a REX prefix).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegOperand {
    pub gpr: Gpr,
    pub size: u8,
    pub high_byte: bool,
}

/// A decoded instruction: its length and what it accesses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decoded {
    pub len: usize,
    pub access: Access,
}

/// Why an instruction was not decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// The bytes ended (or 15 were read) before the instruction did.
    Truncated,
    /// Not one of the load/store forms this module completes.
    Unsupported,
    /// A register operand (ModRM.mod = 3): it cannot access memory.
    NotMemory,
}

impl DecodeError {
    pub fn reason(self) -> &'static str {
        match self {
            Self::Truncated => "truncated",
            Self::Unsupported => "unsupported",
            Self::NotMemory => "not-memory",
        }
    }
}

struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Cursor<'_> {
    fn next(&mut self) -> Result<u8, DecodeError> {
        if self.at >= MAX_INSTRUCTION {
            return Err(DecodeError::Truncated);
        }
        let b = *self.bytes.get(self.at).ok_or(DecodeError::Truncated)?;
        self.at += 1;
        Ok(b)
    }

    fn skip(&mut self, n: usize) -> Result<(), DecodeError> {
        for _ in 0..n {
            self.next()?;
        }
        Ok(())
    }
}

/// REX prefix bits (Vol. 2A §2.2.1): W (3), R (2).
const REX_W: u8 = 1 << 3;
const REX_R: u8 = 1 << 2;

/// Skips a ModRM operand's SIB and displacement (Vol. 2A §2.1.5, Tables
/// 2-1 to 2-3) and returns ModRM.reg (without REX.R).
fn modrm(c: &mut Cursor<'_>, address_bits: u32) -> Result<u8, DecodeError> {
    let m = c.next()?;
    let (md, reg, rm) = (m >> 6, (m >> 3) & 7, m & 7);
    if md == 3 {
        return Err(DecodeError::NotMemory);
    }
    if address_bits == 16 {
        let disp = match (md, rm) {
            (0, 6) | (2, _) => 2,
            (1, _) => 1,
            _ => 0,
        };
        c.skip(disp)?;
        return Ok(reg);
    }
    let mut base = rm;
    if rm == 4 {
        base = c.next()? & 7;
    }
    let disp = match md {
        0 if base == 5 => 4,
        0 => 0,
        1 => 1,
        _ => 4,
    };
    c.skip(disp)?;
    Ok(reg)
}

/// Decodes the load or store at the start of `bytes`.
pub fn decode(bytes: &[u8], code: CodeSize) -> Result<Decoded, DecodeError> {
    let mut c = Cursor { bytes, at: 0 };
    let (mut operand16, mut address_override, mut rex) = (false, false, 0u8);
    let opcode = loop {
        let b = c.next()?;
        match b {
            0x66 => operand16 = true,
            0x67 => address_override = true,
            // Segment overrides: the EPT violation already names the
            // guest-physical address, so only their length matters.
            0x26 | 0x2e | 0x36 | 0x3e | 0x64 | 0x65 => {}
            // LOCK, REP: not on a plain load or store.
            0xf0 | 0xf2 | 0xf3 => return Err(DecodeError::Unsupported),
            // A REX prefix counts only right before the opcode: a legacy
            // prefix after it cancels it (Vol. 2A §2.2.1).
            0x40..=0x4f if code == CodeSize::Bits64 => {
                rex = b;
                continue;
            }
            _ => break b,
        }
        rex = 0;
    };
    let default16 = code == CodeSize::Bits16;
    let operand_size: u8 = if rex & REX_W != 0 {
        8
    } else if operand16 != default16 {
        2
    } else {
        4
    };
    let address_bits = match (code, address_override) {
        (CodeSize::Bits64, false) => 64,
        (CodeSize::Bits64 | CodeSize::Bits16, true) | (CodeSize::Bits32, false) => 32,
        (CodeSize::Bits32, true) | (CodeSize::Bits16, false) => 16,
    };
    let reg_of = |field: u8, size: u8| {
        let n = field | if rex & REX_R != 0 { 8 } else { 0 };
        RegOperand { gpr: Gpr::from_number(n), size, high_byte: size == 1 && rex == 0 && (4..8).contains(&n) }
    };
    let access = match opcode {
        0x88 | 0x89 => {
            modrm(&mut c, address_bits)?;
            Access::Store { size: if opcode == 0x88 { 1 } else { operand_size } }
        }
        0x8a | 0x8b => {
            let size = if opcode == 0x8a { 1 } else { operand_size };
            let reg = modrm(&mut c, address_bits)?;
            Access::Load { dst: reg_of(reg, size), size, extend: Extend::None }
        }
        0xc6 | 0xc7 => {
            if modrm(&mut c, address_bits)? != 0 {
                return Err(DecodeError::Unsupported);
            }
            let size = if opcode == 0xc6 { 1 } else { operand_size };
            // The immediate: 1, 2 or 4 bytes (sign-extended to 8).
            c.skip(usize::from(size.min(4)))?;
            Access::Store { size }
        }
        // MOV AL/rAX <-> moffs: the offset is address-size wide.
        0xa0..=0xa3 => {
            c.skip((address_bits / 8) as usize)?;
            let size = if opcode & 1 == 0 { 1 } else { operand_size };
            if opcode < 0xa2 {
                let dst = RegOperand { gpr: Gpr::RAX, size, high_byte: false };
                Access::Load { dst, size, extend: Extend::None }
            } else {
                Access::Store { size }
            }
        }
        // MOVSXD r64, r/m32 (with REX.W; without it a 32-bit move).
        0x63 if code == CodeSize::Bits64 => {
            let reg = modrm(&mut c, address_bits)?;
            let extend = if operand_size == 8 { Extend::Sign } else { Extend::None };
            let size = operand_size.min(4);
            Access::Load { dst: reg_of(reg, operand_size), size, extend }
        }
        0x0f => {
            let op2 = c.next()?;
            let (size, extend) = match op2 {
                0xb6 => (1, Extend::Zero),
                0xb7 => (2, Extend::Zero),
                0xbe => (1, Extend::Sign),
                0xbf => (2, Extend::Sign),
                _ => return Err(DecodeError::Unsupported),
            };
            let reg = modrm(&mut c, address_bits)?;
            Access::Load { dst: reg_of(reg, operand_size), size, extend }
        }
        _ => return Err(DecodeError::Unsupported),
    };
    Ok(Decoded { len: c.at, access })
}

const fn low_mask(bytes: u8) -> u64 {
    if bytes >= 8 {
        u64::MAX
    } else {
        (1u64 << (bytes * 8)) - 1
    }
}

/// The register after a load of `size` bytes of `value` into `dst` whose
/// old contents are `old` (Vol. 1 §3.4.1.1: a 32-bit destination
/// zero-extends into 64 bits, 8- and 16-bit ones leave the rest).
pub fn apply_load(old: u64, dst: RegOperand, size: u8, extend: Extend, value: u64) -> u64 {
    let value = value & low_mask(size);
    let widened = match extend {
        Extend::Sign if size < 8 && value >> (size * 8 - 1) & 1 != 0 => value | !low_mask(size),
        _ => value,
    } & low_mask(dst.size);
    if dst.high_byte {
        return (old & !0xff00) | ((widened & 0xff) << 8);
    }
    match dst.size {
        4 | 8 => widened,
        _ => (old & !low_mask(dst.size)) | widened,
    }
}

/// What [`translate`] needs of the guest's paging state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Paging {
    pub cr0: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub efer: u64,
}

/// Why a linear address did not translate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WalkError {
    /// An entry on the way is not present.
    NotPresent,
    /// A paging structure lies outside the guest's RAM.
    Unreadable,
    /// 5-level paging, which guests are not offered (CR4.LA57).
    Unsupported,
}

const CR0_PG: u64 = 1 << 31;
const CR4_PSE: u64 = 1 << 4;
const CR4_PAE: u64 = 1 << 5;
const CR4_LA57: u64 = 1 << 12;
const EFER_LMA: u64 = 1 << 10;
const PRESENT: u64 = 1;
const PAGE_SIZE_BIT: u64 = 1 << 7;
/// Physical-address bits of a 64-bit paging entry (51:12).
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

/// The guest-physical address of `linear` under the guest's own paging
/// (SDM Vol. 3A §4.3 32-bit, §4.4 PAE, §4.5 4-level). `read` returns the
/// 8 bytes at an 8-aligned guest-physical address, `None` outside RAM.
/// Permissions are not checked: the processor already fetched through
/// this walk (the walk is only used to find the instruction it ran).
pub fn translate(linear: u64, p: &Paging, read: impl Fn(u64) -> Option<u64>) -> Result<u64, WalkError> {
    if p.cr0 & CR0_PG == 0 {
        return Ok(linear & 0xffff_ffff);
    }
    let read64 = |gpa: u64| read(gpa).ok_or(WalkError::Unreadable);
    let read32 = |gpa: u64| read(gpa & !7).map(|v| (v >> ((gpa & 4) * 8)) & 0xffff_ffff).ok_or(WalkError::Unreadable);
    let present = |e: u64| if e & PRESENT != 0 { Ok(e) } else { Err(WalkError::NotPresent) };
    if p.efer & EFER_LMA != 0 || p.cr4 & CR4_PAE != 0 {
        let mut table;
        let levels: &[u32] = if p.efer & EFER_LMA != 0 {
            if p.cr4 & CR4_LA57 != 0 {
                return Err(WalkError::Unsupported);
            }
            table = p.cr3 & ADDR_MASK;
            &[39, 30, 21, 12]
        } else {
            // PAE: CR3 bits 31:5 locate four PDPTEs; bits 31:30 pick one.
            let pdpte = present(read64((p.cr3 & 0xffff_ffe0) + ((linear >> 30) & 3) * 8)?)?;
            table = pdpte & ADDR_MASK;
            &[21, 12]
        };
        for &shift in levels {
            let entry = present(read64(table + ((linear >> shift) & 0x1ff) * 8)?)?;
            // 1 GiB (PDPTE, 4-level) and 2 MiB (PDE) pages.
            if shift != 12 && shift <= 30 && entry & PAGE_SIZE_BIT != 0 {
                let page = (1u64 << shift) - 1;
                return Ok((entry & ADDR_MASK & !page) | (linear & page));
            }
            table = entry & ADDR_MASK;
        }
        return Ok(table | (linear & 0xfff));
    }
    // 32-bit paging: 4-byte entries, 4 MiB pages with CR4.PSE (PSE-36
    // bits 20:13 give physical bits 39:32).
    let linear = linear & 0xffff_ffff;
    let pde = present(read32((p.cr3 & 0xffff_f000) + (linear >> 22) * 4)?)?;
    if p.cr4 & CR4_PSE != 0 && pde & PAGE_SIZE_BIT != 0 {
        let high = ((pde >> 13) & 0xff) << 32;
        return Ok(high | (pde & 0xffc0_0000) | (linear & 0x3f_ffff));
    }
    let pte = present(read32((pde & 0xffff_f000) + ((linear >> 12) & 0x3ff) * 4)?)?;
    Ok((pte & 0xffff_f000) | (linear & 0xfff))
}

#[cfg(test)]
mod tests {
    use super::*;
    extern crate std;
    use std::collections::BTreeMap;

    fn load(bytes: &[u8], code: CodeSize) -> (usize, RegOperand, u8, Extend) {
        match decode(bytes, code) {
            Ok(Decoded { len, access: Access::Load { dst, size, extend } }) => (len, dst, size, extend),
            other => panic!("{bytes:x?}: {other:?}"),
        }
    }

    fn store(bytes: &[u8], code: CodeSize) -> (usize, u8) {
        match decode(bytes, code) {
            Ok(Decoded { len, access: Access::Store { size } }) => (len, size),
            other => panic!("{bytes:x?}: {other:?}"),
        }
    }

    fn reg(n: u8, size: u8) -> RegOperand {
        RegOperand { gpr: Gpr::from_number(n), size, high_byte: false }
    }

    #[test]
    fn loads_in_64_bit_code() {
        use CodeSize::Bits64 as B64;
        // mov rax, [rdi]
        assert_eq!(load(&[0x48, 0x8b, 0x07], B64), (3, reg(0, 8), 8, Extend::None));
        // mov eax, [rdi + 0x10]
        assert_eq!(load(&[0x8b, 0x47, 0x10], B64), (3, reg(0, 4), 4, Extend::None));
        // mov r9, [rsp + rcx*8 + 0x12345678] (SIB, disp32, REX.WRX)
        assert_eq!(load(&[0x4e, 0x8b, 0x8c, 0xcc, 0x78, 0x56, 0x34, 0x12], B64), (8, reg(9, 8), 8, Extend::None));
        // mov ax, [rip + disp32]
        assert_eq!(load(&[0x66, 0x8b, 0x05, 1, 2, 3, 4], B64), (7, reg(0, 2), 2, Extend::None));
        // mov bh, [rsi] (no REX: byte register 7 is BH)
        let (len, dst, size, _) = load(&[0x8a, 0x3e], B64);
        assert_eq!((len, size), (2, 1));
        assert_eq!(dst, RegOperand { gpr: Gpr::from_number(7), size: 1, high_byte: true });
        // mov dil, [rsi] (REX: DIL)
        assert_eq!(load(&[0x40, 0x8a, 0x3e], B64).1, reg(7, 1));
        // movzx ecx, byte [rax]; movsx rdx, word [rbx]; movsxd rax, [rbx]
        assert_eq!(load(&[0x0f, 0xb6, 0x08], B64), (3, reg(1, 4), 1, Extend::Zero));
        assert_eq!(load(&[0x48, 0x0f, 0xbf, 0x13], B64), (4, reg(2, 8), 2, Extend::Sign));
        assert_eq!(load(&[0x48, 0x63, 0x03], B64), (3, reg(0, 8), 4, Extend::Sign));
        // mov rax, [moffs64]
        assert_eq!(load(&[0x48, 0xa1, 0, 0, 0, 0x45, 0, 0, 0, 0], B64), (10, reg(0, 8), 8, Extend::None));
        // A segment override and a REX that a later prefix cancels.
        assert_eq!(load(&[0x65, 0x48, 0x8b, 0x00], B64), (4, reg(0, 8), 8, Extend::None));
        assert_eq!(load(&[0x48, 0x66, 0x8b, 0x00], B64), (4, reg(0, 2), 2, Extend::None));
    }

    #[test]
    fn stores_and_their_immediates() {
        use CodeSize::{Bits32 as B32, Bits64 as B64};
        assert_eq!(store(&[0x48, 0x89, 0x07], B64), (3, 8)); // mov [rdi], rax
        assert_eq!(store(&[0x88, 0x47, 0x01], B64), (3, 1)); // mov [rdi+1], al
        assert_eq!(store(&[0xc6, 0x00, 0xaa], B64), (3, 1)); // mov byte [rax], 0xaa
        assert_eq!(store(&[0x66, 0xc7, 0x00, 1, 2], B64), (5, 2)); // mov word [rax], imm16
        assert_eq!(store(&[0x48, 0xc7, 0x40, 0x08, 1, 2, 3, 4], B64), (8, 8)); // mov qword [rax+8], imm32
        assert_eq!(store(&[0xa3, 1, 2, 3, 4], B32), (5, 4)); // mov [moffs32], eax
        assert_eq!(store(&[0x89, 0x05, 1, 2, 3, 4], B32), (6, 4)); // mov [disp32], eax
    }

    #[test]
    fn sixteen_bit_addressing() {
        use CodeSize::{Bits16 as B16, Bits32 as B32};
        // mov ax, [bx+si] in 16-bit code; mov eax, [disp16] with 66.
        assert_eq!(load(&[0x8b, 0x00], B16), (2, reg(0, 2), 2, Extend::None));
        assert_eq!(load(&[0x66, 0x8b, 0x06, 0x34, 0x12], B16), (5, reg(0, 4), 4, Extend::None));
        // 67 in 32-bit code: 16-bit addressing, disp16.
        assert_eq!(load(&[0x67, 0x8b, 0x86, 1, 2], B32), (5, reg(0, 4), 4, Extend::None));
        // REX bytes are INC/DEC outside 64-bit mode: not a load.
        assert_eq!(decode(&[0x48, 0x8b, 0x00], B32), Err(DecodeError::Unsupported));
    }

    #[test]
    fn what_is_not_completed() {
        use CodeSize::Bits64 as B64;
        assert_eq!(decode(&[0x8b, 0xc0], B64), Err(DecodeError::NotMemory)); // mov eax, eax
        assert_eq!(decode(&[0x01, 0x00], B64), Err(DecodeError::Unsupported)); // add [rax], eax
        assert_eq!(decode(&[0xf3, 0xa5], B64), Err(DecodeError::Unsupported)); // rep movsd
        assert_eq!(decode(&[0xc7, 0x08, 0, 0, 0, 0], B64), Err(DecodeError::Unsupported)); // C7 /1
        assert_eq!(decode(&[0x0f, 0x10, 0x00], B64), Err(DecodeError::Unsupported)); // movups
        assert_eq!(decode(&[0x48, 0x8b], B64), Err(DecodeError::Truncated));
        assert_eq!(decode(&[], B64), Err(DecodeError::Truncated));
        assert_eq!(decode(&[0x66; 20], B64), Err(DecodeError::Truncated), "15 bytes at most");
        assert_eq!(decode(&[0x40; 20], B64), Err(DecodeError::Truncated));
        assert_eq!(DecodeError::NotMemory.reason(), "not-memory");
    }

    #[test]
    fn loads_of_all_ones_land_as_the_architecture_says() {
        let old = 0x1122_3344_5566_7788;
        let ones = u64::MAX;
        assert_eq!(apply_load(old, reg(0, 8), 8, Extend::None, ones), ones);
        assert_eq!(apply_load(old, reg(0, 4), 4, Extend::None, ones), 0xffff_ffff, "32-bit zero-extends");
        assert_eq!(apply_load(old, reg(0, 2), 2, Extend::None, ones), 0x1122_3344_5566_ffff);
        assert_eq!(apply_load(old, reg(0, 1), 1, Extend::None, ones), 0x1122_3344_5566_77ff);
        let bh = RegOperand { gpr: Gpr::RBX, size: 1, high_byte: true };
        assert_eq!(apply_load(old, bh, 1, Extend::None, ones), 0x1122_3344_5566_ff88);
        assert_eq!(apply_load(old, reg(0, 4), 1, Extend::Zero, ones), 0xff);
        assert_eq!(apply_load(old, reg(0, 8), 2, Extend::Sign, ones), ones);
        assert_eq!(apply_load(old, reg(0, 2), 1, Extend::Sign, ones), 0x1122_3344_5566_ffff);
        assert_eq!(apply_load(old, reg(0, 8), 4, Extend::Sign, 0x7fff_ffff), 0x7fff_ffff);
    }

    fn memory(entries: &[(u64, u64)]) -> impl Fn(u64) -> Option<u64> + '_ {
        let map: BTreeMap<u64, u64> = entries.iter().copied().collect();
        move |gpa| if gpa % 8 == 0 && gpa < 0x1_0000_0000 { Some(*map.get(&gpa).unwrap_or(&0)) } else { None }
    }

    #[test]
    fn four_level_walks_with_2m_and_4k_pages() {
        let p = Paging { cr0: CR0_PG | 1, cr3: 0x1000, cr4: CR4_PAE, efer: EFER_LMA };
        // PML4[0] -> PDPT 0x2000; PDPT[1] -> PD 0x3000; PD[0] 2 MiB page at
        // 0x4020_0000; PD[1] -> PT 0x4000; PT[3] -> 0x5000.
        let mem = [(0x1000, 0x2003), (0x2008, 0x3003), (0x3000, 0x4020_0083), (0x3008, 0x4003), (0x4018, 0x5003)];
        let read = memory(&mem);
        assert_eq!(translate(0x4001_2345, &p, &read), Ok(0x4021_2345));
        assert_eq!(translate(0x4020_3abc, &p, &read), Ok(0x5abc));
        assert_eq!(translate(0x4020_4000, &p, &read), Err(WalkError::NotPresent));
        assert_eq!(translate(0x8000_0000, &p, &read), Err(WalkError::NotPresent));
        let la57 = Paging { cr4: CR4_PAE | CR4_LA57, ..p };
        assert_eq!(translate(0, &la57, &read), Err(WalkError::Unsupported));
        let outside = Paging { cr3: 0x2_0000_0000, ..p };
        assert_eq!(translate(0, &outside, &read), Err(WalkError::Unreadable));
    }

    #[test]
    fn one_gib_pages_pae_32_bit_and_no_paging() {
        let read = memory(&[(0x1000, 0x2003), (0x2008, 0x4000_0083)]);
        let p = Paging { cr0: CR0_PG | 1, cr3: 0x1000, cr4: CR4_PAE, efer: EFER_LMA };
        assert_eq!(translate(0x4123_4567, &p, &read), Ok(0x4123_4567));
        // PAE: PDPTE[1] at cr3 + 8 -> PD 0x3000; PD[0] 2 MiB page.
        let read = memory(&[(0x1008, 0x3001), (0x3000, 0x0060_0083)]);
        let pae = Paging { cr0: CR0_PG | 1, cr3: 0x1000, cr4: CR4_PAE, efer: 0 };
        assert_eq!(translate(0x4001_0000, &pae, &read), Ok(0x0061_0000));
        // 32-bit: PDE[1] (4 bytes at 0x1004) a 4 MiB page; PDE[0] (0x1000)
        // -> PT 0x2000 whose entry 2 (0x2008) maps 0x7000.
        let read = memory(&[(0x1000, 0x0080_0083_0000_2003), (0x2008, 0x7003)]);
        let p32 = Paging { cr0: CR0_PG | 1, cr3: 0x1000, cr4: CR4_PSE, efer: 0 };
        assert_eq!(translate(0x0040_1234, &p32, &read), Ok(0x0080_1234));
        assert_eq!(translate(0x0000_2abc, &p32, &read), Ok(0x7abc));
        let off = Paging { cr0: 1, cr3: 0, cr4: 0, efer: 0 };
        assert_eq!(translate(0x1_2345_6789, &off, &read), Ok(0x2345_6789));
    }

    #[test]
    fn code_size_from_cs() {
        assert_eq!(CodeSize::of(true, true, AR_L), CodeSize::Bits64);
        assert_eq!(CodeSize::of(true, true, AR_DB), CodeSize::Bits32, "compatibility mode");
        assert_eq!(CodeSize::of(true, false, AR_DB), CodeSize::Bits32);
        assert_eq!(CodeSize::of(true, false, 0), CodeSize::Bits16);
        assert_eq!(CodeSize::of(false, false, AR_DB), CodeSize::Bits16, "real mode");
    }
}
