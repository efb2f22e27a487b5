// memcpy for the hypervisor at EL2 (AAPCS64: x0 dest, x1 src, x2 len;
// returns dest). compiler_builtins' generic memcpy avoids unaligned
// accesses, so a copy whose source and destination disagree in alignment
// (most record fields in a handover: big-endian fields at any offset)
// goes a byte at a time and reassembles words: some 22 instructions per
// 8 bytes. Once the MMU is on, RAM is Normal memory and SCTLR_EL2.A is 0
// (`mmu.rs`), so unaligned LDP/STP are architecturally allowed (Arm ARM
// B2.5.2, "Alignment of data accesses"): 16 bytes per 2 instructions.
// With the MMU off every access is Device-nGnRnE, where an unaligned
// access faults (Arm ARM D8.2.11, the "Device memory" alignment rule):
// then the generic memmove (correct for non-overlapping copies) does it.
// No MMIO region is ever copied with memcpy: device registers are read
// and written with volatile accesses of their own width.
    .section .text.memcpy, "ax"
    .global memcpy
    .type memcpy, %function
    .balign 16
memcpy:
    mrs     x4, sctlr_el2
    tbz     x4, #0, 7f              // SCTLR_EL2.M == 0: the MMU is off
    mov     x3, x0
    cmp     x2, #16
    b.lo    2f
1:  ldp     x4, x5, [x1], #16
    stp     x4, x5, [x3], #16
    sub     x2, x2, #16
    cmp     x2, #16
    b.hs    1b
    // Fewer than 16 bytes are left: bits 3..0 of the length say which.
2:  tbz     x2, #3, 3f
    ldr     x4, [x1], #8
    str     x4, [x3], #8
3:  tbz     x2, #2, 4f
    ldr     w4, [x1], #4
    str     w4, [x3], #4
4:  tbz     x2, #1, 5f
    ldrh    w4, [x1], #2
    strh    w4, [x3], #2
5:  tbz     x2, #0, 6f
    ldrb    w4, [x1]
    strb    w4, [x3]
6:  ret
7:  b       memmove
    .size memcpy, . - memcpy
