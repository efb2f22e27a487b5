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
.global kexec_jump
kexec_jump:
    msr     daifset, #0xf
    mrs     x9, sctlr_el2
    bic     x9, x9, #(1 << 0)
    bic     x9, x9, #(1 << 2)
    bic     x9, x9, #(1 << 12)
    dsb     sy
    msr     sctlr_el2, x9
    isb
    tlbi    alle2
    dsb     sy
    isb
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
