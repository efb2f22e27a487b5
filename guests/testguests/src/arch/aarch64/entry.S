// Test guest entry and EL1 exception vectors.
//
// The hypervisor enters at IPA 0x4000_0000 in EL1h with the MMU off, DAIF
// masked and x0 = the DTB's IPA (issue 5). Before any Rust code runs: a
// stack, zeroed bss, VBAR_EL1, and FP/SIMD enabled (the target uses NEON).

.equ STACK_SIZE, 0x10000
// The one vCPU started by PSCI CPU_ON runs little: a smaller stack.
.equ SECONDARY_STACK_SIZE, 0x4000
// MPIDR_EL1.Aff0 (bits 7:0) of the vCPU that stack is for: vCPU 1.
.equ MPIDR_AFF0_MASK, 0xff
.equ SECONDARY_AFF0, 1
// CPACR_EL1.FPEN, bits 21:20 = 0b11: FP/SIMD not trapped at EL1 or EL0
// (Arm ARM DDI 0487, CPACR_EL1 register description).
.equ CPACR_EL1_FPEN, (3 << 20)

.section .text.head, "ax"
.global _start
_start:
    mov     x19, x0
    adrp    x1, __stack_top
    add     x1, x1, :lo12:__stack_top
    mov     sp, x1
    // Zero bss (the loader only copies the flat image); both ends are
    // 16-byte aligned by linker.ld.
    adrp    x1, __bss_start
    add     x1, x1, :lo12:__bss_start
    adrp    x2, __bss_end
    add     x2, x2, :lo12:__bss_end
1:  cmp     x1, x2
    b.hs    2f
    stp     xzr, xzr, [x1], #16
    b       1b
2:  adrp    x1, el1_vectors
    add     x1, x1, :lo12:el1_vectors
    msr     vbar_el1, x1
    mrs     x1, cpacr_el1
    orr     x1, x1, #CPACR_EL1_FPEN
    msr     cpacr_el1, x1
    isb
    mov     x0, x19
    bl      testguest_main
3:  wfi
    b       3b

// A vCPU started by PSCI CPU_ON (DEN0022E, CPU_ON): the hypervisor enters
// here in EL1h with the MMU off, DAIF masked and x0 = the context id. bss
// is already zeroed (the boot vCPU did it before CPU_ON). There is one
// secondary stack, for vCPU 1 (whose Aff0 is its index); any other vCPU
// parks. vCPU 1 gets that stack, the same vectors and FP/SIMD, then Rust.
.section .text.secondary, "ax"
.global secondary_start
secondary_start:
    mrs     x1, mpidr_el1
    and     x1, x1, #MPIDR_AFF0_MASK
    cmp     x1, #SECONDARY_AFF0
    b.ne    4f
    adrp    x1, __secondary_stack_top
    add     x1, x1, :lo12:__secondary_stack_top
    mov     sp, x1
    adrp    x1, el1_vectors
    add     x1, x1, :lo12:el1_vectors
    msr     vbar_el1, x1
    mrs     x1, cpacr_el1
    orr     x1, x1, #CPACR_EL1_FPEN
    msr     cpacr_el1, x1
    isb
    bl      testguest_secondary
4:  wfi
    b       4b

// EL1 exception vectors (Arm ARM DDI 0487, "Exception vectors": VBAR_EL1
// 2 KiB aligned, 16 entries of 0x80 bytes: current EL with SP_EL0, current
// EL with SP_ELx, lower EL AArch64, lower EL AArch32; each sync, IRQ, FIQ,
// SError). The guest runs in EL1h, so only "current EL with SP_ELx, IRQ"
// is expected; every other entry reports itself and shuts the guest down.
.macro report index
    .balign 0x80
    mov     x0, #\index
    mrs     x1, esr_el1
    mrs     x2, elr_el1
    mrs     x3, far_el1
    b       testguest_exception
.endm

.section .text.vectors, "ax"
.balign 0x800
el1_vectors:
    report  0
    report  1
    report  2
    report  3
    .balign 0x80
    b       sync_el1h
    .balign 0x80
    b       irq_entry
    report  6
    report  7
    report  8
    report  9
    report  10
    report  11
    report  12
    report  13
    report  14
    report  15

// IRQ from EL1h: save everything the interrupted code may hold live
// (the Rust handler follows AAPCS64, which only preserves x19-x28 and the
// low halves of v8-v15), handle, restore, return.
// Frame: x0-x18, x29, x30, ELR_EL1, SPSR_EL1, FPCR, FPSR at 0x00-0xc8,
// q0-q31 at 0xd0.
.equ FRAME_Q, 0xd0
.equ FRAME_SIZE, FRAME_Q + 32 * 16

.section .text.irq, "ax"
irq_entry:
    sub     sp, sp, #FRAME_SIZE
    stp     x0, x1, [sp, #0x00]
    stp     x2, x3, [sp, #0x10]
    stp     x4, x5, [sp, #0x20]
    stp     x6, x7, [sp, #0x30]
    stp     x8, x9, [sp, #0x40]
    stp     x10, x11, [sp, #0x50]
    stp     x12, x13, [sp, #0x60]
    stp     x14, x15, [sp, #0x70]
    stp     x16, x17, [sp, #0x80]
    stp     x18, x29, [sp, #0x90]
    mrs     x0, elr_el1
    stp     x30, x0, [sp, #0xa0]
    mrs     x1, spsr_el1
    mrs     x2, fpcr
    stp     x1, x2, [sp, #0xb0]
    mrs     x3, fpsr
    str     x3, [sp, #0xc0]
    stp     q0, q1, [sp, #FRAME_Q + 0x000]
    stp     q2, q3, [sp, #FRAME_Q + 0x020]
    stp     q4, q5, [sp, #FRAME_Q + 0x040]
    stp     q6, q7, [sp, #FRAME_Q + 0x060]
    stp     q8, q9, [sp, #FRAME_Q + 0x080]
    stp     q10, q11, [sp, #FRAME_Q + 0x0a0]
    stp     q12, q13, [sp, #FRAME_Q + 0x0c0]
    stp     q14, q15, [sp, #FRAME_Q + 0x0e0]
    stp     q16, q17, [sp, #FRAME_Q + 0x100]
    stp     q18, q19, [sp, #FRAME_Q + 0x120]
    stp     q20, q21, [sp, #FRAME_Q + 0x140]
    stp     q22, q23, [sp, #FRAME_Q + 0x160]
    stp     q24, q25, [sp, #FRAME_Q + 0x180]
    stp     q26, q27, [sp, #FRAME_Q + 0x1a0]
    stp     q28, q29, [sp, #FRAME_Q + 0x1c0]
    stp     q30, q31, [sp, #FRAME_Q + 0x1e0]
    bl      testguest_irq
    ldp     q0, q1, [sp, #FRAME_Q + 0x000]
    ldp     q2, q3, [sp, #FRAME_Q + 0x020]
    ldp     q4, q5, [sp, #FRAME_Q + 0x040]
    ldp     q6, q7, [sp, #FRAME_Q + 0x060]
    ldp     q8, q9, [sp, #FRAME_Q + 0x080]
    ldp     q10, q11, [sp, #FRAME_Q + 0x0a0]
    ldp     q12, q13, [sp, #FRAME_Q + 0x0c0]
    ldp     q14, q15, [sp, #FRAME_Q + 0x0e0]
    ldp     q16, q17, [sp, #FRAME_Q + 0x100]
    ldp     q18, q19, [sp, #FRAME_Q + 0x120]
    ldp     q20, q21, [sp, #FRAME_Q + 0x140]
    ldp     q22, q23, [sp, #FRAME_Q + 0x160]
    ldp     q24, q25, [sp, #FRAME_Q + 0x180]
    ldp     q26, q27, [sp, #FRAME_Q + 0x1a0]
    ldp     q28, q29, [sp, #FRAME_Q + 0x1c0]
    ldp     q30, q31, [sp, #FRAME_Q + 0x1e0]
    ldr     x3, [sp, #0xc0]
    msr     fpsr, x3
    ldp     x1, x2, [sp, #0xb0]
    msr     fpcr, x2
    msr     spsr_el1, x1
    ldp     x30, x0, [sp, #0xa0]
    msr     elr_el1, x0
    ldp     x18, x29, [sp, #0x90]
    ldp     x16, x17, [sp, #0x80]
    ldp     x14, x15, [sp, #0x70]
    ldp     x12, x13, [sp, #0x60]
    ldp     x10, x11, [sp, #0x50]
    ldp     x8, x9, [sp, #0x40]
    ldp     x6, x7, [sp, #0x30]
    ldp     x4, x5, [sp, #0x20]
    ldp     x2, x3, [sp, #0x10]
    ldp     x0, x1, [sp, #0x00]
    add     sp, sp, #FRAME_SIZE
    eret

// A synchronous exception from EL1h. During a hostile attack
// (`probe_resume` non-zero) it is caught: ESR_EL1 goes to `probe_esr`
// with bit 63 set (RES0 in ESR_EL1, so the value is never 0), and the
// attack resumes at `probe_resume` (cleared). Otherwise it is reported.
// Only x16 and x17 are used, saved on the stack.
.section .text.sync, "ax"
sync_el1h:
    stp     x16, x17, [sp, #-16]!
    adrp    x16, probe_resume
    ldr     x17, [x16, :lo12:probe_resume]
    cbz     x17, 1f
    str     xzr, [x16, :lo12:probe_resume]
    msr     elr_el1, x17
    mrs     x17, esr_el1
    orr     x17, x17, #(1 << 63)
    adrp    x16, probe_esr
    str     x17, [x16, :lo12:probe_esr]
    ldp     x16, x17, [sp], #16
    eret
1:  ldp     x16, x17, [sp], #16
    mov     x0, #4
    mrs     x1, esr_el1
    mrs     x2, elr_el1
    mrs     x3, far_el1
    b       testguest_exception

.section .bss.stack, "aw", %nobits
.balign 16
__stack_bottom:
    .space  STACK_SIZE
__stack_top:
.balign 16
__secondary_stack_bottom:
    .space  SECONDARY_STACK_SIZE
__secondary_stack_top:
