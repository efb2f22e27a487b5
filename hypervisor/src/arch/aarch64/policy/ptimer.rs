//! The EL1 physical timer of a vCPU (Arm ARM D12, "The Generic Timer"),
//! emulated: CNTHCTL_EL2.EL1PCEN = 0 traps every access to CNTP_CTL_EL0,
//! CNTP_CVAL_EL0 and CNTP_TVAL_EL0, so each vCPU has its own timer that
//! no other partition can see or stop. It counts on the physical counter
//! (CNTPCT_EL0, which the guest reads directly) and raises PPI 30, the
//! non-secure EL1 physical timer interrupt, through the virtual GIC while
//! it is enabled, unmasked and expired (a level). The hypervisor programs
//! its own timer for the earliest deadline of the vCPUs on a CPU and
//! checks expiry at every scheduling decision, so the interrupt arrives on
//! time.

/// The PPI the timer raises (Arm BSA: PPI 14, INTID 30).
pub const PPI_EL1_PHYS_TIMER: usize = 30;

/// CNTP_CTL_EL0 (D19.12.10): ENABLE (0), IMASK (1), ISTATUS (2, read-only).
pub const CTL_ENABLE: u64 = 1 << 0;
pub const CTL_IMASK: u64 = 1 << 1;
pub const CTL_ISTATUS: u64 = 1 << 2;

/// Which register a trapped access names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimerReg {
    /// CNTP_TVAL_EL0: S3_3_C14_C2_0.
    Tval,
    /// CNTP_CTL_EL0: S3_3_C14_C2_1.
    Ctl,
    /// CNTP_CVAL_EL0: S3_3_C14_C2_2.
    Cval,
}

/// ISS of a trapped MSR/MRS (ESR_EL2, EC 0x18, D19.2.40) without Rt and
/// Dir: Op0 [21:20], Op2 [19:17], Op1 [16:14], CRn [13:10], CRm [4:1].
const ISS_REGISTER_MASK: u64 = 0x3f_fc1e;

const fn iss(op0: u64, op1: u64, crn: u64, crm: u64, op2: u64) -> u64 {
    (op0 << 20) | (op2 << 17) | (op1 << 14) | (crn << 10) | (crm << 1)
}

/// The timer register a trapped access names, if it names one.
pub fn decode(iss_value: u64) -> Option<TimerReg> {
    match iss_value & ISS_REGISTER_MASK {
        x if x == iss(3, 3, 14, 2, 0) => Some(TimerReg::Tval),
        x if x == iss(3, 3, 14, 2, 1) => Some(TimerReg::Ctl),
        x if x == iss(3, 3, 14, 2, 2) => Some(TimerReg::Cval),
        _ => None,
    }
}

/// One vCPU's EL1 physical timer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PhysTimer {
    /// ENABLE and IMASK as the guest wrote them.
    pub ctl: u64,
    pub cval: u64,
}

impl PhysTimer {
    fn enabled(self) -> bool {
        self.ctl & CTL_ENABLE != 0
    }

    /// The timer condition (ISTATUS): enabled and the counter at or past
    /// the compare value.
    pub fn expired(self, now: u64) -> bool {
        self.enabled() && now >= self.cval
    }

    /// Whether the interrupt is asserted: expired and not masked.
    pub fn asserted(self, now: u64) -> bool {
        self.expired(now) && self.ctl & CTL_IMASK == 0
    }

    /// A guest read, with the counter at `now`.
    pub fn read(self, reg: TimerReg, now: u64) -> u64 {
        match reg {
            TimerReg::Ctl => self.ctl | if self.expired(now) { CTL_ISTATUS } else { 0 },
            TimerReg::Cval => self.cval,
            // TVAL is CVAL - counter as a signed 32-bit value (D12.2.4);
            // bits 63:32 read as zero.
            TimerReg::Tval => u64::from(self.cval.wrapping_sub(now) as u32),
        }
    }

    /// A guest write, with the counter at `now`.
    pub fn write(&mut self, reg: TimerReg, value: u64, now: u64) {
        match reg {
            TimerReg::Ctl => self.ctl = value & (CTL_ENABLE | CTL_IMASK),
            TimerReg::Cval => self.cval = value,
            // CVAL = counter + sign-extended TVAL[31:0].
            TimerReg::Tval => self.cval = now.wrapping_add_signed(i64::from((value as u32).cast_signed())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// ISS of an access to S3_3_C14_C2_<op2> through x3.
    fn access(op2: u64, read: bool) -> u64 {
        iss(3, 3, 14, 2, op2) | (3 << 5) | u64::from(read)
    }

    #[test]
    fn the_three_registers_decode_and_nothing_else() {
        assert_eq!(decode(access(0, true)), Some(TimerReg::Tval));
        assert_eq!(decode(access(1, false)), Some(TimerReg::Ctl));
        assert_eq!(decode(access(2, true)), Some(TimerReg::Cval));
        assert_eq!(decode(iss(3, 3, 14, 3, 1)), None, "CNTV_CTL_EL0 is not trapped");
        assert_eq!(decode(iss(3, 3, 14, 0, 1)), None, "CNTPCT_EL0 is the guest's to read");
    }

    #[test]
    fn a_timer_fires_at_its_deadline_when_enabled_and_unmasked() {
        let mut t = PhysTimer::default();
        t.write(TimerReg::Cval, 1000, 0);
        assert!(!t.expired(2000), "disabled");
        t.write(TimerReg::Ctl, CTL_ENABLE | CTL_ISTATUS, 0);
        assert_eq!(t.read(TimerReg::Ctl, 999), CTL_ENABLE, "ISTATUS is read-only and clear before the deadline");
        assert_eq!(t.read(TimerReg::Ctl, 1000), CTL_ENABLE | CTL_ISTATUS);
        assert!(t.asserted(1000) && !t.asserted(999));
        t.write(TimerReg::Ctl, CTL_ENABLE | CTL_IMASK, 0);
        assert!(t.expired(1000) && !t.asserted(1000), "masked: the condition without the interrupt");
    }

    #[test]
    fn tval_is_a_signed_32_bit_view_of_the_deadline() {
        let mut t = PhysTimer::default();
        t.write(TimerReg::Tval, 500, 10_000);
        assert_eq!(t.cval, 10_500);
        assert_eq!(t.read(TimerReg::Tval, 10_000), 500);
        assert_eq!(t.read(TimerReg::Tval, 10_600), u64::from((-100i32).cast_unsigned()), "past the deadline: negative");
        t.write(TimerReg::Tval, 0xffff_ff9c, 10_000);
        assert_eq!(t.cval, 9_900, "a negative TVAL sets a deadline in the past");
        t.write(TimerReg::Tval, u64::MAX, 0);
        assert_eq!(t.cval, u64::MAX, "0 - 1 wraps like the hardware's 64-bit compare value");
    }
}
