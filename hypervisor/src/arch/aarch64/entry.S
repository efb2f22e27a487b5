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
    // code0 reads "MZ" (a PE/COFF image, for UEFI firmware) and, as an
    // instruction, is `ccmp x18, #0, #0xd, pl`: it changes only the flags
    // (Linux's arm64 Image does the same).
    .long   0xfa405a4d              // code0
    b       primary_entry           // code1
    .quad   __text_offset           // text_offset: 0 in slot 0, 16 MiB in slot 1
    .quad   __image_size            // image_size, including bss
    .quad   0xa                     // flags: LE, 4K pages, anywhere in RAM
    .quad   0                       // res2
    .quad   0                       // res3
    .quad   0                       // res4
    .ascii  "ARM\x64"               // magic
    .long   pe_header - _start      // res5: the PE header (PE/COFF e_lfanew)

// The PE32+ header (Microsoft PE/COFF specification, rev. 12, §3-4) that
// makes the same image an EFI application (UEFI 2.10 §2.1.1): one .text
// and one .data section laid out as in memory, so the firmware's loader
// puts every byte where the flat image has it. ImageBase is 0 and there
// are no relocations: the firmware loads the image anywhere and
// efi_pe_entry moves it to the address it is linked at. The sizes are
// the linker script's (__pe_*).
.balign 8
pe_header:
    .ascii  "PE\0\0"
    .short  0xaa64                  // Machine: ARM64
    .short  2                       // NumberOfSections
    .long   0                       // TimeDateStamp
    .long   0                       // PointerToSymbolTable
    .long   0                       // NumberOfSymbols
    .short  pe_sections - pe_optional // SizeOfOptionalHeader
    .short  0x0206                  // Characteristics: executable, no line numbers, no debug
pe_optional:
    .short  0x20b                   // Magic: PE32+
    .byte   0, 0                    // linker version
    .long   __pe_text_size          // SizeOfCode
    .long   __pe_data_size          // SizeOfInitializedData
    .long   0                       // SizeOfUninitializedData
    .long   __pe_entry              // AddressOfEntryPoint
    .long   0x1000                  // BaseOfCode
    .quad   0                       // ImageBase
    .long   0x1000                  // SectionAlignment
    .long   0x1000                  // FileAlignment
    .short  0, 0                    // operating system version
    .short  0, 0                    // image version
    .short  0, 0                    // subsystem version
    .long   0                       // Win32VersionValue
    .long   __pe_image_size         // SizeOfImage
    .long   0x1000                  // SizeOfHeaders: the first page
    .long   0                       // CheckSum
    .short  10                      // Subsystem: EFI application
    .short  0                       // DllCharacteristics
    .quad   0, 0, 0, 0              // stack and heap reserve and commit
    .long   0                       // LoaderFlags
    .long   6                       // NumberOfRvaAndSizes
    .quad   0, 0, 0, 0, 0, 0        // export ... base relocation: none
pe_sections:
    .ascii  ".text\0\0\0"
    .long   __pe_text_size          // VirtualSize
    .long   0x1000                  // VirtualAddress
    .long   __pe_text_size          // SizeOfRawData
    .long   0x1000                  // PointerToRawData
    .long   0, 0                    // relocations, line numbers
    .short  0, 0
    .long   0x60000020              // code, read, execute
    .ascii  ".data\0\0\0"
    .long   __pe_data_size          // VirtualSize: rodata, data and bss
    .long   __pe_data_start         // VirtualAddress
    .long   __pe_data_file_size     // SizeOfRawData
    .long   __pe_data_start         // PointerToRawData
    .long   0, 0
    .short  0, 0
    .long   0xc0000040              // initialised data, read, write

primary_entry:
    mov     x19, x0                 // DTB
    mov     x20, x1                 // handover (live update), or 0
    mov     x21, x2                 // counter at the kexec jump, or 0
    mov     x22, x3                 // HVLU_STAGED: bss already clear
    mov     x23, x4                 // the old image's rollback entry ...
    mov     x24, x5                 // ... if HVLU_ROLLBACK
    mrs     x1, CurrentEL
    cmp     x1, #(2 << 2)
    b.ne    wrong_el
    adrp    x1, __stacks_bottom
    add     x1, x1, :lo12:__stacks_bottom
    add     x1, x1, #STACK_SIZE
    mov     sp, x1
    // Zero bss (the loader does not), unless the previous image staged
    // this one in its slot and cleared it before the freeze (x3 =
    // "HVLUSTGD", kexec_enter). The arm64 boot protocol has x3 = 0.
    movz    x1, #0x4744
    movk    x1, #0x5453, lsl #16
    movk    x1, #0x4c55, lsl #32
    movk    x1, #0x4856, lsl #48
    cmp     x22, x1
    b.eq    2f
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
    mov     x1, x20
    mov     x2, x21
    // x3 = the old image's rollback entry, if the jump carried one
    // ("HVLUROLB" in x5, kexec_enter), else 0.
    mov     x3, xzr
    movz    x1, #0x4c42
    movk    x1, #0x524f, lsl #16
    movk    x1, #0x4c55, lsl #32
    movk    x1, #0x4856, lsl #48
    cmp     x24, x1
    csel    x3, x23, xzr, eq
    mov     x1, x20
    bl      hv_primary_main
    b       park

// A new image that failed before the guests resumed gives the machine
// back here (kexec_enter, MMU off): x0 = why. The CPU that left for the
// new image takes its own stack back (hv_rollback_sp, written and
// cleaned before the jump) and resumes this image (hv_rollback).
.global rollback_entry
rollback_entry:
    mov     x19, x0
    adrp    x1, hv_rollback_sp
    ldr     x1, [x1, :lo12:hv_rollback_sp]
    cbz     x1, park
    mov     sp, x1
    bl      el2_common_setup
    mov     x0, x19
    bl      hv_rollback
    b       park

// A CPU parked for an update that was rolled back rejoins this image
// here (its mailbox, MMU off): x0 = its index; its own stack, then
// hv_secondary_rejoin.
.global rejoin_entry
rejoin_entry:
    mov     x19, x0
    cmp     x19, #MAX_CPUS
    b.hs    park
    adrp    x1, __stacks_bottom
    add     x1, x1, :lo12:__stacks_bottom
    add     x2, x19, #2
    mov     x3, #STACK_SIZE
    madd    x1, x2, x3, x1
    mov     sp, x1
    bl      el2_common_setup
    mov     x0, x19
    bl      hv_secondary_rejoin
    b       park

// PSCI CPU_ON enters here at EL2 with the MMU off; x0 = context id = CPU index.
.global secondary_entry
secondary_entry:
    mov     x19, x0
    cmp     x19, #MAX_CPUS
    b.hs    park
    adrp    x1, __stacks_bottom
    add     x1, x1, :lo12:__stacks_bottom
    // Stack slot 0 is the boot CPU's; DTB CPU i uses slot i + 1.
    add     x2, x19, #2
    mov     x3, #STACK_SIZE
    madd    x1, x2, x3, x1
    mov     sp, x1
    bl      el2_common_setup
    mov     x0, x19
    bl      hv_secondary_main
    b       park

// The brownout entry (kho/ABI.md §5.3): the running image calls it, once
// it has placed this image in its slot, while the guests still run: its
// own MMU on (an identity map with this slot executable), interrupts
// masked, on its own stack; x0 = the DTB. hv_prepare parses the DTB and
// builds this image's EL2 map, kept for hv_primary_main; x0 = 0 when it
// did. The callee-saved registers (x19-x30, d8-d15) are saved here, so a
// panic in hv_prepare comes back through prepare_abort with x0 = its
// status instead of stopping the machine.
.pushsection .text.prepare, "ax"
.global hv_prepare_entry
hv_prepare_entry:
    stp     x29, x30, [sp, #-160]!
    stp     x19, x20, [sp, #16]
    stp     x21, x22, [sp, #32]
    stp     x23, x24, [sp, #48]
    stp     x25, x26, [sp, #64]
    stp     x27, x28, [sp, #80]
    stp     d8, d9, [sp, #96]
    stp     d10, d11, [sp, #112]
    stp     d12, d13, [sp, #128]
    stp     d14, d15, [sp, #144]
    mov     x29, sp
    adrp    x1, hv_prepare_sp
    str     x29, [x1, :lo12:hv_prepare_sp]
    bl      hv_prepare
prepare_return:
    adrp    x1, hv_prepare_sp
    str     xzr, [x1, :lo12:hv_prepare_sp]
    ldp     x19, x20, [sp, #16]
    ldp     x21, x22, [sp, #32]
    ldp     x23, x24, [sp, #48]
    ldp     x25, x26, [sp, #64]
    ldp     x27, x28, [sp, #80]
    ldp     d8, d9, [sp, #96]
    ldp     d10, d11, [sp, #112]
    ldp     d12, d13, [sp, #128]
    ldp     d14, d15, [sp, #144]
    ldp     x29, x30, [sp], #160
    ret

// Leaves hv_prepare from anywhere inside it (a panic): x0 = the status
// the caller gets. Only while hv_prepare_sp is set.
.global prepare_abort
prepare_abort:
    adrp    x1, hv_prepare_sp
    ldr     x1, [x1, :lo12:hv_prepare_sp]
    cbz     x1, park
    mov     sp, x1
    b       prepare_return
.popsection

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

// EL2 exception vectors (Arm ARM D1.3.1, Table D1-7): 16 entries of 0x80
// bytes. Synchronous exceptions and IRQs from a guest (lower EL, AArch64)
// save the guest's registers and call the exit handler; anything taken
// from EL2 itself is a hypervisor fault.
.macro fault_vector kind
    .balign 0x80
    mov     x0, #\kind
    mrs     x1, esr_el2
    mrs     x2, elr_el2
    mrs     x3, far_el2
    b       el2_exception
.endm

.macro guest_vector kind
    .balign 0x80
    stp     x0, x1, [sp, #-16]!
    mov     x1, #\kind
    b       guest_exit
.endm

.section .text.vectors, "ax"
.balign 0x800
el2_vectors:
    fault_vector 0          // current EL, SP_EL0
    fault_vector 1
    fault_vector 2
    fault_vector 3
    fault_vector 4          // current EL, SP_ELx
    fault_vector 5
    fault_vector 6
    fault_vector 7
    guest_vector 0          // lower EL AArch64: synchronous
    guest_vector 1          //                   IRQ
    guest_vector 2          //                   FIQ
    guest_vector 3          //                   SError
    fault_vector 12         // lower EL AArch32: not supported (HCR_EL2.RW = 1)
    fault_vector 13
    fault_vector 14
    fault_vector 15

// Guest register frame (struct GuestRegs in vcpu.rs): x0-x30 at 0,
// ELR_EL2 at 248, SPSR_EL2 at 256, q0-q31 at 272, FPCR/FPSR at 784.
.equ REGS_ELR, 248
.equ REGS_Q, 272
.equ REGS_FPCR, 784

// x1 = exit kind; the guest's x0/x1 are on the stack; TPIDR_EL2 = frame.
guest_exit:
    mrs     x0, tpidr_el2
    stp     x2, x3, [x0, #16]
    stp     x4, x5, [x0, #32]
    stp     x6, x7, [x0, #48]
    stp     x8, x9, [x0, #64]
    stp     x10, x11, [x0, #80]
    stp     x12, x13, [x0, #96]
    stp     x14, x15, [x0, #112]
    stp     x16, x17, [x0, #128]
    stp     x18, x19, [x0, #144]
    stp     x20, x21, [x0, #160]
    stp     x22, x23, [x0, #176]
    stp     x24, x25, [x0, #192]
    stp     x26, x27, [x0, #208]
    stp     x28, x29, [x0, #224]
    str     x30, [x0, #240]
    ldp     x2, x3, [sp], #16
    stp     x2, x3, [x0, #0]
    mrs     x2, elr_el2
    mrs     x3, spsr_el2
    stp     x2, x3, [x0, #REGS_ELR]
    add     x2, x0, #REGS_Q
    stp     q0, q1, [x2, #0]
    stp     q2, q3, [x2, #32]
    stp     q4, q5, [x2, #64]
    stp     q6, q7, [x2, #96]
    stp     q8, q9, [x2, #128]
    stp     q10, q11, [x2, #160]
    stp     q12, q13, [x2, #192]
    stp     q14, q15, [x2, #224]
    stp     q16, q17, [x2, #256]
    stp     q18, q19, [x2, #288]
    stp     q20, q21, [x2, #320]
    stp     q22, q23, [x2, #352]
    stp     q24, q25, [x2, #384]
    stp     q26, q27, [x2, #416]
    stp     q28, q29, [x2, #448]
    stp     q30, q31, [x2, #480]
    mrs     x3, fpcr
    mrs     x4, fpsr
    add     x5, x0, #REGS_FPCR
    stp     x3, x4, [x5]
    bl      hv_guest_exit           // x0 = the frame to run next
    b       restore_guest

// guest_enter(frame, stack_top): first entry into guests on this CPU.
.global guest_enter
guest_enter:
    mov     sp, x1
restore_guest:
    msr     tpidr_el2, x0
    add     x5, x0, #REGS_FPCR
    ldp     x3, x4, [x5]
    msr     fpcr, x3
    msr     fpsr, x4
    add     x2, x0, #REGS_Q
    ldp     q0, q1, [x2, #0]
    ldp     q2, q3, [x2, #32]
    ldp     q4, q5, [x2, #64]
    ldp     q6, q7, [x2, #96]
    ldp     q8, q9, [x2, #128]
    ldp     q10, q11, [x2, #160]
    ldp     q12, q13, [x2, #192]
    ldp     q14, q15, [x2, #224]
    ldp     q16, q17, [x2, #256]
    ldp     q18, q19, [x2, #288]
    ldp     q20, q21, [x2, #320]
    ldp     q22, q23, [x2, #352]
    ldp     q24, q25, [x2, #384]
    ldp     q26, q27, [x2, #416]
    ldp     q28, q29, [x2, #448]
    ldp     q30, q31, [x2, #480]
    ldp     x2, x3, [x0, #REGS_ELR]
    msr     elr_el2, x2
    msr     spsr_el2, x3
    ldp     x2, x3, [x0, #16]
    ldp     x4, x5, [x0, #32]
    ldp     x6, x7, [x0, #48]
    ldp     x8, x9, [x0, #64]
    ldp     x10, x11, [x0, #80]
    ldp     x12, x13, [x0, #96]
    ldp     x14, x15, [x0, #112]
    ldp     x16, x17, [x0, #128]
    ldp     x18, x19, [x0, #144]
    ldp     x20, x21, [x0, #160]
    ldp     x22, x23, [x0, #176]
    ldp     x24, x25, [x0, #192]
    ldp     x26, x27, [x0, #208]
    ldp     x28, x29, [x0, #224]
    ldr     x30, [x0, #240]
    ldp     x0, x1, [x0, #0]
    eret

// The EFI entry (UEFI 2.10 §4.1: x0 = image handle, x1 = system table,
// at EL2 with the firmware's MMU on, an identity map). The firmware put
// the image wherever it chose; until it runs at its link address, only
// position-independent code runs here. It allocates the image's link
// address from the firmware (AllocatePages, AllocateAddress,
// EfiLoaderCode), copies the image's file there, clears its bss, makes
// the copy visible to instruction fetch (Arm ARM D7.5.9: DC CVAU, then
// IC IALLU), and calls hv_efi_main there. A status the firmware can read
// comes back in x0 if the image cannot be moved or hv_efi_main returns
// (x2 = where the firmware had loaded the image, for its report).
.equ EFI_ST_BOOT_SERVICES, 0x60     // checked in efi.rs
.equ EFI_BS_ALLOCATE_PAGES, 0x28    // checked in efi.rs
.section .text.efi, "ax"
.global efi_pe_entry
efi_pe_entry:
    stp     x29, x30, [sp, #-48]!
    mov     x29, sp
    stp     x19, x20, [sp, #16]
    stp     x21, x22, [sp, #32]
    mov     x19, x0
    mov     x20, x1
    adr     x21, _start             // where the firmware loaded the image
    ldr     x22, =__image_start     // where it is linked
    cmp     x21, x22
    b.eq    3f
    sub     sp, sp, #16
    str     x22, [sp]
    ldr     x9, [x20, #EFI_ST_BOOT_SERVICES]
    ldr     x9, [x9, #EFI_BS_ALLOCATE_PAGES]
    mov     x0, #2                  // AllocateAddress
    mov     x1, #1                  // EfiLoaderCode
    ldr     x2, =__pe_image_pages
    mov     x3, sp
    blr     x9
    add     sp, sp, #16
    cbnz    x0, 9f
    // The file, 16 bytes at a time (its size is a multiple of 4 KiB).
    mov     x0, x21
    mov     x1, x22
    ldr     x2, =__pe_file_size
    add     x2, x1, x2
1:  ldp     x3, x4, [x0], #16
    stp     x3, x4, [x1], #16
    cmp     x1, x2
    b.lo    1b
    // The rest of the footprint (bss, stacks) zeroed.
    ldr     x3, =__image_end
2:  cmp     x1, x3
    b.hs    4f
    stp     xzr, xzr, [x1], #16
    b       2b
4:  mrs     x3, ctr_el0             // DminLine, bits [19:16]: log2(words)
    ubfx    x3, x3, #16, #4
    mov     x4, #4
    lsl     x3, x4, x3
    mov     x0, x22
5:  dc      cvau, x0
    add     x0, x0, x3
    cmp     x0, x2
    b.lo    5b
    dsb     ish
    ic      iallu
    dsb     ish
    isb
3:  mov     x0, x19
    mov     x1, x20
    mov     x2, x21
    ldr     x9, =hv_efi_main
    blr     x9
9:  ldp     x21, x22, [sp, #32]
    ldp     x19, x20, [sp, #16]
    ldp     x29, x30, [sp], #48
    ret
.ltorg


.section .bss.stacks, "aw", %nobits
.balign 16
.global __stacks_bottom
__stacks_bottom:
    .space STACK_SIZE * (MAX_CPUS + 1)
.global __stacks_top
__stacks_top:
