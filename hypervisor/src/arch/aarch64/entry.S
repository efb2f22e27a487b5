// arm64 Image header and EL2 entry points.
// Header layout: Linux Documentation/arch/arm64/booting.rst, "Call the
// kernel image". Register conventions: x0 = DTB physical address.

.equ STACK_SIZE, 0x10000
.equ MAX_CPUS, 8
// CPTR_EL2 with TFP (bit 10) clear, RES1 bits 13:12 and 9:0 set
// (Arm ARM D19.2.31, non-VHE layout): FP/SIMD untrapped at EL2.
.equ CPTR_EL2_VALUE, 0x33ff

.section .text.head, "ax"
.global _start
_start:
    b       primary_entry           // code0
    .long   0                       // code1
    .quad   0                       // text_offset
    .quad   __image_size            // image_size, including bss
    .quad   0xa                     // flags: LE, 4K pages, anywhere in RAM
    .quad   0                       // res2
    .quad   0                       // res3
    .quad   0                       // res4
    .ascii  "ARM\x64"               // magic
    .long   0                       // res5

primary_entry:
    mov     x19, x0                 // DTB
    mrs     x1, CurrentEL
    cmp     x1, #(2 << 2)
    b.ne    wrong_el
    adrp    x1, __stacks_bottom
    add     x1, x1, :lo12:__stacks_bottom
    add     x1, x1, #STACK_SIZE
    mov     sp, x1
    // Zero bss (the loader does not).
    adrp    x1, __bss_start
    add     x1, x1, :lo12:__bss_start
    adrp    x2, __bss_end
    add     x2, x2, :lo12:__bss_end
1:  cmp     x1, x2
    b.hs    2f
    stp     xzr, xzr, [x1], #16
    b       1b
2:  bl      el2_common_setup
    mov     x0, x19
    bl      hv_primary_main
    b       park

// PSCI CPU_ON enters here at EL2 with the MMU off; x0 = context id = CPU index.
.global secondary_entry
secondary_entry:
    mov     x19, x0
    cmp     x19, #MAX_CPUS
    b.hs    park
    adrp    x1, __stacks_bottom
    add     x1, x1, :lo12:__stacks_bottom
    add     x2, x19, #1
    mov     x3, #STACK_SIZE
    madd    x1, x2, x3, x1
    mov     sp, x1
    bl      el2_common_setup
    mov     x0, x19
    bl      hv_secondary_main
    b       park

el2_common_setup:
    adrp    x1, el2_vectors
    add     x1, x1, :lo12:el2_vectors
    msr     vbar_el2, x1
    mov     x1, #CPTR_EL2_VALUE
    msr     cptr_el2, x1
    isb
    ret

wrong_el:
park:
    wfe
    b       park

// EL2 exception vectors (Arm ARM D1.10.2): 16 entries of 0x80 bytes.
// The hypervisor takes no exceptions of its own yet, so every entry
// reports what happened and stops the machine.
.macro vector kind
    .balign 0x80
    mov     x0, #\kind
    mrs     x1, esr_el2
    mrs     x2, elr_el2
    mrs     x3, far_el2
    b       el2_exception
.endm

.section .text.vectors, "ax"
.balign 0x800
el2_vectors:
    vector 0
    vector 1
    vector 2
    vector 3
    vector 4
    vector 5
    vector 6
    vector 7
    vector 8
    vector 9
    vector 10
    vector 11
    vector 12
    vector 13
    vector 14
    vector 15

.section .bss.stacks, "aw", %nobits
.balign 16
.global __stacks_bottom
__stacks_bottom:
    .space STACK_SIZE * (MAX_CPUS + 1)
