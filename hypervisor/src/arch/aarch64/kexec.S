// Kexec into a new image (shared/DESIGN.md §5, step 4).
//
// kexec_jump(x0 = DTB, x1 = handover, x2 = src, x3 = dst, x4 = len,
//            x5 = entry, x6 = trampoline copy, x7 = counter at the jump)
// turns the EL2 MMU and caches
// off (SCTLR_EL2.M/C/I, Arm ARM D19.2.118) while running from the
// identity-mapped image, then branches to the trampoline, which was copied
// into scratch: it copies the new image over the old one (which is why it
// cannot run from the old image), synchronizes the instruction stream and
// enters the new image with x0/x1 unchanged and x2 = the counter value
// taken just before the jump (the new image reports the kexec's cost).

.section .text.kexec, "ax"

// EL2's MMU and caches off (SCTLR_EL2.M, C, I; Arm ARM D19.2.118) on
// identity-mapped code, and its translations dropped; \tmp is clobbered.
.macro el2_mmu_off tmp
    mrs     \tmp, sctlr_el2
    bic     \tmp, \tmp, #(1 << 0)
    bic     \tmp, \tmp, #(1 << 2)
    bic     \tmp, \tmp, #(1 << 12)
    dsb     sy
    msr     sctlr_el2, \tmp
    isb
    tlbi    alle2
    dsb     sy
    isb
.endm
.global kexec_jump
kexec_jump:
    msr     daifset, #0xf
    el2_mmu_off x9
    br      x6

// Position-independent: copied to a scratch page before use.
.global kexec_trampoline_start
kexec_trampoline_start:
1:  cbz     x4, 2f
    ldr     x9, [x2], #8
    str     x9, [x3], #8
    sub     x4, x4, #8
    b       1b
2:  dsb     sy
    ic      iallu
    dsb     sy
    isb
    mov     x2, x7
    br      x5
.global kexec_trampoline_end
kexec_trampoline_end:

// The staged update's jump (the new image is already in its own slot,
// bss cleared, caches clean): kexec_enter(x0 = DTB, x1 = handover,
// x2 = counter at the jump, x3 = entry, x4 = where the machine goes back
// if the new image fails before the guests resume, or 0) turns the EL2
// MMU and caches off and enters the new image with x0-x2 and x4
// unchanged, x3 = HVLU_STAGED (the new image's bss is already zero) and
// x5 = HVLU_ROLLBACK ("HVLUROLB") when x4 is not 0 (kho/ABI.md §5.2).
// Nothing is copied. A new image that gives the machine back enters the
// old image's rollback_entry the same way, with x0 = the reason.
.global kexec_enter
kexec_enter:
    msr     daifset, #0xf
    mov     x10, x3
    el2_mmu_off x9
    ic      iallu
    dsb     sy
    isb
    movz    x3, #0x4744
    movk    x3, #0x5453, lsl #16
    movk    x3, #0x4c55, lsl #32
    movk    x3, #0x4856, lsl #48
    mov     x5, xzr
    cbz     x4, 1f
    movz    x5, #0x4c42
    movk    x5, #0x524f, lsl #16
    movk    x5, #0x4c55, lsl #32
    movk    x5, #0x4856, lsl #48
1:  br      x10

// A frozen CPU's wait for the new image (direct CPU handover):
// park_in_mailbox(x0 = its mailbox word, x1 = its CPU index) stops its
// hypervisor timer, turns its MMU and caches off, and waits (WFE) until
// the new image writes an entry address into the word (cleaned to the
// point of coherency, then SEV); it enters there with x0 = its index, as
// PSCI CPU_ON would. It runs from the old image, which stays intact until
// the new image reports the guests resumed.
.global park_in_mailbox
park_in_mailbox:
    msr     daifset, #0xf
    msr     cnthp_ctl_el2, xzr
    msr     ich_hcr_el2, xzr
    dc      civac, x0
    dsb     sy
    el2_mmu_off x9
1:  ldr     x2, [x0]
    cbnz    x2, 2f
    wfe
    b       1b
2:  ic      iallu
    dsb     sy
    isb
    mov     x0, x1
    br      x2

// After ExitBootServices (efi.rs, at the link address, interrupts masked,
// everything this image reads with its MMU off cleaned to the point of
// coherency): the MMU and caches off, the firmware's translations and
// instruction cache dropped, then the boot path of the arm64 boot protocol
// (the image's first instruction) with x0 = the UEFI boot record instead
// of a DTB.
.global efi_leave_firmware
efi_leave_firmware:
    el2_mmu_off x9
    ic      iallu
    dsb     sy
    isb
    mov     x1, xzr
    mov     x2, xzr
    mov     x3, xzr
    mov     x4, xzr
    mov     x5, xzr
    b       _start
