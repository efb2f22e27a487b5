//! Starting a partition's vCPUs the way an x86 multiprocessor starts its
//! application processors (Intel SDM Vol. 3A §9.4, "Multiple-Processor
//! (MP) Initialization"; §11.6.1 for the ICR's INIT and start-up
//! delivery modes). vCPU 0 is the bootstrap processor and runs from the
//! start; every other vCPU comes up in the wait-for-SIPI state (§11.4.7.3).
//! An INIT IPI sends a vCPU back to that state whatever it was doing; a
//! start-up IPI (SIPI) with vector VV starts a waiting vCPU in
//! real-address mode at VV00:0000, physical address 000VV000H (§9.4.4),
//! with the rest of its state as INIT leaves it (§10.1.1, Table 10-1). A
//! vCPU that is not waiting ignores a SIPI, as a processor does: the MP
//! initialization protocol sends two (§9.4.4), and the second finds the
//! AP already running.
//!
//! [`Startup`] is a vCPU's place in that protocol as the machine lock
//! holds it, so that a vCPU on any physical CPU can send INIT and SIPI;
//! the target's own CPU carries a SIPI out (resets its context, enters
//! real mode) before it next enters it. [`sipi_state`] is the guest state
//! a SIPI gives, in the VMCS's terms.

/// Where a vCPU is in the INIT-SIPI protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Startup {
    /// Started (or the bootstrap processor): running, waiting for an
    /// interrupt, or halted. A SIPI is ignored; an INIT resets it.
    Running,
    /// After reset or INIT, in the wait-for-SIPI state: off, and the next
    /// SIPI starts it.
    WaitForSipi,
    /// A SIPI with this vector arrived while it waited: it is runnable,
    /// and its own physical CPU starts it at VV00:0000 before entering it.
    Sipi(u8),
}

/// Why a recorded start-up state was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StartupError {
    /// A state code no writer uses.
    UnknownState(u8),
    /// A vector beside a state that has none.
    StrayVector,
}

/// The record encoding ([`Startup::encode`]): a state byte, then the SIPI
/// vector (0 unless a SIPI is pending). 0 is "not recorded": a handover
/// from an image before the field.
const CODE_NOT_RECORDED: u8 = 0;
const CODE_RUNNING: u8 = 1;
const CODE_WAIT_FOR_SIPI: u8 = 2;
const CODE_SIPI: u8 = 3;
/// Bytes of one vCPU's encoding.
pub const ENCODED_LEN: usize = 2;

impl Startup {
    /// The state at power-on: vCPU 0 runs, the others wait for a SIPI.
    pub const fn at_reset(index: u32) -> Self {
        if index == 0 {
            Self::Running
        } else {
            Self::WaitForSipi
        }
    }

    /// INIT: back to wait-for-SIPI, whatever the vCPU was doing (a SIPI
    /// not yet carried out is dropped with the rest of its state).
    pub fn init(&mut self) {
        *self = Self::WaitForSipi;
    }

    /// A SIPI with `vector`: taken only in the wait-for-SIPI state
    /// (returns true); a vCPU running, or already started by an earlier
    /// SIPI, ignores it.
    pub fn sipi(&mut self, vector: u8) -> bool {
        if *self != Self::WaitForSipi {
            return false;
        }
        *self = Self::Sipi(vector);
        true
    }

    /// The SIPI to carry out now, once: the vCPU is then running.
    pub fn take_sipi(&mut self) -> Option<u8> {
        let Self::Sipi(vector) = *self else { return None };
        *self = Self::Running;
        Some(vector)
    }

    /// The two bytes of the `lapic` record's `startup` field for this vCPU.
    pub const fn encode(self) -> [u8; ENCODED_LEN] {
        match self {
            Self::Running => [CODE_RUNNING, 0],
            Self::WaitForSipi => [CODE_WAIT_FOR_SIPI, 0],
            Self::Sipi(vector) => [CODE_SIPI, vector],
        }
    }

    /// Reads [`Startup::encode`]'s bytes for vCPU `index`. "Not recorded"
    /// (a handover from an image before the field, all zero) is the state
    /// such an image could have left: vCPU 0 running, the others never
    /// started, so waiting for a SIPI.
    pub fn decode(bytes: [u8; ENCODED_LEN], index: u32) -> Result<Self, StartupError> {
        let [code, vector] = bytes;
        let state = match code {
            CODE_NOT_RECORDED => Self::at_reset(index),
            CODE_RUNNING => Self::Running,
            CODE_WAIT_FOR_SIPI => Self::WaitForSipi,
            CODE_SIPI => return Ok(Self::Sipi(vector)),
            other => return Err(StartupError::UnknownState(other)),
        };
        if vector != 0 {
            return Err(StartupError::StrayVector);
        }
        Ok(state)
    }
}

/// A segment register in the VMCS's terms (SDM Vol. 3C §25.4.1): access
/// rights in the VMCS format (Table 25-2: type 3:0, S 4, DPL 6:5, P 7,
/// L 13, D/B 14, G 15).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub selector: u16,
    pub base: u64,
    pub limit: u32,
    pub rights: u32,
}

/// Real-address-mode segments after INIT (Table 10-1): limit FFFFH,
/// present, read/write (code: execute/read), accessed; byte granular.
const REAL_MODE_LIMIT: u32 = 0xffff;
const AR_CODE: u32 = 0x9b;
const AR_DATA: u32 = 0x93;
/// LDTR: present, type 2 (LDT). TR: present, type 11 (busy TSS), which
/// VM entry requires of a usable TR (SDM Vol. 3C §27.3.1.2).
const AR_LDT: u32 = 0x82;
const AR_TSS_BUSY: u32 = 0x8b;
/// RFLAGS after INIT: only the reserved bit 1.
const RFLAGS_RESET: u64 = 1 << 1;

/// The guest state a SIPI with vector VV starts a vCPU in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SipiState {
    /// CS: selector VV00H, base 000VV000H.
    pub cs: Segment,
    /// SS, DS, ES, FS, GS: selector 0, base 0.
    pub data: Segment,
    pub ldtr: Segment,
    pub tr: Segment,
    /// GDTR and IDTR: base 0, this limit.
    pub table_limit: u32,
    pub rip: u64,
    pub rflags: u64,
    /// EDX: the processor signature (CPUID.01H:EAX), as after reset.
    pub rdx: u64,
}

/// Where a SIPI with `vector` starts a vCPU, with everything else as INIT
/// leaves it: CR0 ET only (real mode, no paging; see
/// `cr::GuestCrPolicy::reset_cr0`), CR3 and CR4 clear, IA32_EFER clear,
/// DR7 `debug::DR7_INIT`, the other general-purpose registers 0.
pub fn sipi_state(vector: u8, signature: u32) -> SipiState {
    let vv = u64::from(vector);
    let segment = |selector: u16, base: u64, rights: u32| Segment { selector, base, limit: REAL_MODE_LIMIT, rights };
    SipiState {
        cs: segment(u16::from(vector) << 8, vv << 12, AR_CODE),
        data: segment(0, 0, AR_DATA),
        ldtr: segment(0, 0, AR_LDT),
        tr: segment(0, 0, AR_TSS_BUSY),
        table_limit: REAL_MODE_LIMIT,
        rip: 0,
        rflags: RFLAGS_RESET,
        rdx: u64::from(signature),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aps_wait_and_the_first_sipi_starts_them() {
        assert_eq!(Startup::at_reset(0), Startup::Running);
        let mut ap = Startup::at_reset(1);
        assert_eq!(ap, Startup::WaitForSipi);
        assert_eq!(ap.take_sipi(), None, "nothing to start yet");
        assert!(ap.sipi(0x08));
        assert!(!ap.sipi(0x09), "the second SIPI of the pair finds it started");
        assert_eq!(ap.take_sipi(), Some(0x08));
        assert_eq!(ap, Startup::Running);
        assert!(!ap.sipi(0x08), "a running vCPU ignores a SIPI");
        assert_eq!(ap.take_sipi(), None);
    }

    #[test]
    fn init_resets_from_any_state() {
        for mut s in [Startup::Running, Startup::WaitForSipi, Startup::Sipi(3)] {
            s.init();
            assert_eq!(s, Startup::WaitForSipi);
            assert!(s.sipi(0x10));
            assert_eq!(s.take_sipi(), Some(0x10));
        }
        // The bootstrap processor too.
        let mut bsp = Startup::at_reset(0);
        assert!(!bsp.sipi(1));
        bsp.init();
        assert!(bsp.sipi(1));
    }

    #[test]
    fn encoding_round_trips_and_refuses_what_no_writer_writes() {
        for s in [Startup::Running, Startup::WaitForSipi, Startup::Sipi(0), Startup::Sipi(0x9f)] {
            assert_eq!(Startup::decode(s.encode(), 1), Ok(s));
        }
        // Not recorded: vCPU 0 ran, the others never did.
        assert_eq!(Startup::decode([0, 0], 0), Ok(Startup::Running));
        assert_eq!(Startup::decode([0, 0], 3), Ok(Startup::WaitForSipi));
        assert_eq!(Startup::decode([4, 0], 1), Err(StartupError::UnknownState(4)));
        assert_eq!(Startup::decode([1, 8], 1), Err(StartupError::StrayVector));
        assert_eq!(Startup::decode([0, 8], 1), Err(StartupError::StrayVector));
    }

    #[test]
    fn a_sipi_starts_real_mode_at_vv00_0000() {
        let s = sipi_state(0x08, 0x0005_0654);
        assert_eq!(s.cs, Segment { selector: 0x0800, base: 0x8000, limit: 0xffff, rights: 0x9b });
        assert_eq!(s.rip, 0);
        assert_eq!(sipi_state(0x9f, 0).cs.base + s.rip, 0x9_f000, "000VV000H");
        assert_eq!(sipi_state(0xff, 0).cs.selector, 0xff00);
        assert_eq!(s.data, Segment { selector: 0, base: 0, limit: 0xffff, rights: 0x93 });
        assert_eq!(s.rflags, 2);
        assert_eq!(s.rdx, 0x0005_0654);
        // What VM entry checks of an unrestricted real-mode guest (SDM
        // Vol. 3C §27.3.1.2): CS an accessed code segment, SS and the data
        // segments accessed read/write, all present with DPL 0 and byte
        // granularity for a 64 KiB limit; TR a busy TSS, LDTR an LDT.
        let kind = |r: u32| r & 0xf;
        let dpl = |r: u32| (r >> 5) & 3;
        let (present, system, granular) = (1 << 7, 1 << 4, 1 << 15);
        assert!(matches!(kind(s.cs.rights), 9 | 11 | 13 | 15));
        assert_eq!(kind(s.data.rights), 3);
        for seg in [s.cs, s.data, s.ldtr, s.tr] {
            assert!(seg.rights & present != 0 && seg.rights & granular == 0 && dpl(seg.rights) == 0);
            assert_eq!(seg.rights & 0xfffe_0f00, 0, "reserved bits clear");
        }
        assert!(s.cs.rights & system != 0 && s.data.rights & system != 0);
        assert!(s.tr.rights & system == 0 && kind(s.tr.rights) == 11);
        assert!(s.ldtr.rights & system == 0 && kind(s.ldtr.rights) == 2);
    }
}
