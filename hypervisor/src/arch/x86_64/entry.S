// x86_64 entry: Multiboot2 header (Multiboot2 spec §3.1), the 32-bit
// protected-mode entry GRUB jumps to (EAX = magic, EBX = boot information,
// §3.2), the switch to long mode (Intel SDM Vol. 3A §10.8.5), and the
// real-mode trampoline that application processors start in after
// INIT-SIPI-SIPI (SDM Vol. 3A §9.4.4).

.equ MB2_MAGIC, 0xe85250d6
.equ STACK_SIZE, 0x10000
.equ CR4_PAE, 1 << 5
.equ EFER_MSR, 0xc0000080
.equ EFER_LME, 1 << 8
.equ CR0_PE_PG, 0x80000001
// Page-table entry bits (SDM Vol. 3A §4.5): P, RW, PWT, PCD, PS.
.equ PTE_P_RW, 0x3
.equ PDE_2M_WB, 0x83
.equ PDE_2M_UC, 0x9b
.equ AP_TRAMPOLINE, 0x8000

// Data segments from this image's GDT (0x10), FS and GS null.
.macro load_data_segments
    movw    $0x10, %ax
    movw    %ax, %ds
    movw    %ax, %es
    movw    %ax, %ss
    xorw    %ax, %ax
    movw    %ax, %fs
    movw    %ax, %gs
.endm

// This image's page tables and GDT (both initialised data in the image),
// for a CPU arriving from another image.
.macro load_own_tables
    movq    $boot_pml4, %rax
    movq    %rax, %cr3
    lgdt    gdt64_ptr(%rip)
.endm

// CS from this image's GDT (0x08, by a far return), then the data
// segments. Needs a stack.
.macro reload_segments
    pushq   $0x08
    leaq    1f(%rip), %rax
    pushq   %rax
    lretq
1:  load_data_segments
.endm

.section .multiboot2, "a"
.balign 8
mb2_header:
    .long   MB2_MAGIC
    .long   0                                   // architecture: i386
    .long   mb2_header_end - mb2_header
    .long   0x100000000 - (MB2_MAGIC + (mb2_header_end - mb2_header))
    .short  0                                   // end tag
    .short  0
    .long   8
mb2_header_end:

.section .text.boot32, "ax"
.code32
.global _start32
_start32:
    cli
    cld
    movl    %eax, boot_magic
    movl    %ebx, boot_info
    movl    $__bss_start, %edi
    movl    $__bss_end, %ecx
    subl    %edi, %ecx
    xorl    %eax, %eax
    rep stosb
    movl    $boot_stack_top, %esp
    movl    $boot_pml4, %eax
    movl    %eax, %cr3
    movl    %cr4, %eax
    orl     $CR4_PAE, %eax
    movl    %eax, %cr4
    movl    $EFER_MSR, %ecx
    rdmsr
    orl     $EFER_LME, %eax
    wrmsr
    movl    %cr0, %eax
    orl     $CR0_PE_PG, %eax
    movl    %eax, %cr0
    lgdt    gdt64_ptr
    ljmpl   $0x08, $start64

.code64
start64:
    load_data_segments
    movq    $boot_stack_top, %rsp
    movl    boot_magic(%rip), %edi
    movl    boot_info(%rip), %esi
    call    hv_x86_main
1:  cli
    hlt
    jmp     1b

// The live-update handover entry (loader::image_desc, kho/ABI.md §4.6):
// the previous image's kexec trampoline copied this image's PT_LOAD
// segments to their physical addresses (bss zeroed) and jumps here in
// 64-bit mode with interrupts off, on its own identity map of the low
// 4 GiB, with RDI = handover, RSI = multiboot2 information, RDX = the TSC
// at the jump. This image's own page tables and GDT are already in place
// in its data (they are initialised data), so it only loads them.
.section .text.handover, "ax"
.code64
.global hv_handover_entry
hv_handover_entry:
    cli
    cld
    load_own_tables
    movq    $boot_stack_top, %rsp
    reload_segments
    // RCX = the old image's rollback entry if R9 = "HVLUROLB" (the
    // trampoline, kho/ABI.md §5.2), else 0.
    movabsq $0x48564c55524f4c42, %rax
    cmpq    %rax, %r9
    je      3f
    xorl    %ecx, %ecx
3:  call    hv_x86_handover
2:  cli
    hlt
    jmp     2b

// A new image that failed before the guests resumed gives the machine
// back here (kho/ABI.md §5.2), on the BSP, in 64-bit mode with
// interrupts off and VMX off, on its own page tables: RDI = why. This
// image takes its page tables, GDT and boot stack back and resumes
// (hv_x86_rollback).
.global hv_rollback_entry
hv_rollback_entry:
    cli
    cld
    load_own_tables
    movq    $boot_stack_top, %rsp
    reload_segments
    // A deadline NMI may have brought the new image here without an IRET:
    // one now ends the NMI blocking (SDM Vol. 3A §6.7.1).
    movq    %rsp, %rax
    movq    %ss, %rcx
    pushq   %rcx
    pushq   %rax
    pushfq
    pushq   $0x08
    leaq    5f(%rip), %rax
    pushq   %rax
    iretq
5:  call    hv_x86_rollback
4:  cli
    hlt
    jmp     4b

// A CPU the previous image parked in its mailbox (a live update's direct
// handover, kho/ABI.md §4.6) enters here in 64-bit mode with interrupts
// off and VMX off, still on the previous image's page tables, GDT and
// stack, with RDI = its CPU index. It takes this image's page tables, GDT
// and its stack (AP_STACKS[index], smp.rs) and runs hv_ap_main(index) as
// an AP started with INIT-SIPI-SIPI does. An index out of range halts.
.section .text, "ax"
.code64
.global hv_ap_parked_entry
hv_ap_parked_entry:
    cli
    cld
    load_own_tables
    cmpq    ${MAX_CPUS}, %rdi
    jae     2f
    leaq    1(%rdi), %rax
    imulq   ${AP_STACK_SIZE}, %rax
    leaq    {AP_STACKS}(%rip), %rsp
    addq    %rax, %rsp
    reload_segments
    call    hv_ap_main
2:  cli
    hlt
    jmp     2b

// Application processors start here in real mode at AP_TRAMPOLINE (SIPI
// vector 8). The code is copied there, so it addresses itself as
// AP_TRAMPOLINE + (label - ap_trampoline_start).
.section .text.ap_trampoline, "ax"
.code16
.global ap_trampoline_start
ap_trampoline_start:
    cli
    xorw    %ax, %ax
    movw    %ax, %ds
    lgdtl   (ap_gdt_ptr - ap_trampoline_start + AP_TRAMPOLINE)
    movl    %cr0, %eax
    orl     $1, %eax
    movl    %eax, %cr0
    ljmpl   $0x18, $(ap_pm32 - ap_trampoline_start + AP_TRAMPOLINE)
.code32
ap_pm32:
    movw    $0x10, %ax
    movw    %ax, %ds
    movw    %ax, %es
    movw    %ax, %ss
    movl    %cr4, %eax
    orl     $CR4_PAE, %eax
    movl    %eax, %cr4
    movl    (ap_cr3 - ap_trampoline_start + AP_TRAMPOLINE), %eax
    movl    %eax, %cr3
    movl    $EFER_MSR, %ecx
    rdmsr
    orl     $EFER_LME, %eax
    wrmsr
    movl    %cr0, %eax
    orl     $CR0_PE_PG, %eax
    movl    %eax, %cr0
    ljmpl   $0x08, $(ap_lm64 - ap_trampoline_start + AP_TRAMPOLINE)
.code64
ap_lm64:
    movw    $0x10, %ax
    movw    %ax, %ds
    movw    %ax, %es
    movw    %ax, %ss
    movq    (ap_stack - ap_trampoline_start + AP_TRAMPOLINE), %rsp
    movq    (ap_arg - ap_trampoline_start + AP_TRAMPOLINE), %rdi
    movq    (ap_entry - ap_trampoline_start + AP_TRAMPOLINE), %rax
    call    *%rax
2:  cli
    hlt
    jmp     2b
.balign 8
ap_gdt:
    .quad   0
    .quad   0x00af9a000000ffff      // 0x08: 64-bit code
    .quad   0x00cf92000000ffff      // 0x10: data
    .quad   0x00cf9a000000ffff      // 0x18: 32-bit code
ap_gdt_ptr:
    .short  31
    .long   ap_gdt - ap_trampoline_start + AP_TRAMPOLINE
.balign 8
.global ap_cr3, ap_stack, ap_entry, ap_arg
ap_cr3:     .quad 0
ap_stack:   .quad 0
ap_entry:   .quad 0
ap_arg:     .quad 0
.global ap_trampoline_end
ap_trampoline_end:

.section .data.boot, "aw"
.balign 16
gdt64:
    .quad   0
    .quad   0x00af9a000000ffff      // 0x08: 64-bit code
    .quad   0x00cf92000000ffff      // 0x10: data
    .quad   0x00cf9a000000ffff      // 0x18: 32-bit code
gdt64_end:
gdt64_ptr:
    .short  gdt64_end - gdt64 - 1
    .quad   gdt64
boot_magic: .long 0
boot_info:  .long 0

// Boot page tables: identity map of the low 4 GiB with 2 MiB pages; the
// top GiB (MMIO: local APIC, I/O APIC, firmware) is uncached.
.balign 4096
.global boot_pml4
boot_pml4:
    .quad   boot_pdpt + PTE_P_RW
    .fill   511, 8, 0
boot_pdpt:
    .quad   boot_pd + PTE_P_RW
    .quad   boot_pd + 0x1000 + PTE_P_RW
    .quad   boot_pd + 0x2000 + PTE_P_RW
    .quad   boot_pd + 0x3000 + PTE_P_RW
    .fill   508, 8, 0
boot_pd:
    .set    i, 0
    .rept   1536
    .quad   (i << 21) | PDE_2M_WB
    .set    i, i + 1
    .endr
    .rept   512
    .quad   (i << 21) | PDE_2M_UC
    .set    i, i + 1
    .endr

.section .bss.stacks, "aw", @nobits
.balign 16
boot_stack:
    .space  STACK_SIZE
boot_stack_top:
