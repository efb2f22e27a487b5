// x86_64 test guest entry. The hypervisor starts the guest the way a
// multiboot2 boot loader would (Multiboot2 spec §3.3): 32-bit protected
// mode, paging off, flat segments, interrupts off, EAX = the boot loader
// magic, EBX = the boot information's address, GDTR and IDTR undefined.
// Before any Rust runs: our own GDT, a stack, zeroed bss, identity page
// tables for the low 4 GiB (2 MiB pages, SDM Vol. 3A §5.5), long mode
// (SDM Vol. 3A §10.8.5), then `testguest_main(magic, info)`.
//
// Other vCPUs start from a SIPI in real-address mode at VV00:0000 (SDM
// Vol. 3A §9.4.4), in conventional memory where vCPU 0 copied
// `ap_trampoline`: see there.

.equ CR0_PG, 1 << 31
.equ CR4_PAE, 1 << 5
.equ EFER_MSR, 0xc0000080
.equ EFER_LME, 1 << 8
// Page-table entry bits: present, writable; PS (2 MiB page) in a PDE.
.equ PTE_P_RW, 0x3
.equ PDE_2M, 0x83
.equ PD_ENTRIES, 2048
.equ STACK_SIZE, 0x10000
.equ SEL_CODE64, 0x08
.equ SEL_DATA, 0x10
.equ SEL_CODE32, 0x18
// CR0 for protected mode without paging: PE | ET.
.equ CR0_PE_ET, 0x11
// The x2APIC ID register (SDM Vol. 3A §11.12.1.2) and vCPU 1's ID.
.equ X2APIC_ID_MSR, 0x802
.equ SECONDARY_APIC_ID, 1

.section .text.head, "ax"
.code32
.global _start
_start:
    cli
    cld
    movl    %eax, %esi                  // magic, kept in ESI/EBP (not
    movl    %ebx, %ebp                  // touched by rep stos)
    lgdt    gdt_ptr
    ljmpl   $SEL_CODE32, $1f
1:  movw    $SEL_DATA, %ax
    movw    %ax, %ds
    movw    %ax, %es
    movw    %ax, %ss
    movw    %ax, %fs
    movw    %ax, %gs
    movl    $__bss_start, %edi
    movl    $__bss_end, %ecx
    subl    %edi, %ecx
    xorl    %eax, %eax
    rep stosb
    movl    $__stack_top, %esp
    // PD entry i maps 2 MiB page i: [0, 4 GiB).
    movl    $guest_pd, %edi
    xorl    %ecx, %ecx
2:  movl    %ecx, %eax
    shll    $21, %eax
    orl     $PDE_2M, %eax
    movl    %eax, (%edi,%ecx,8)
    incl    %ecx
    cmpl    $PD_ENTRIES, %ecx
    jb      2b
    // PDPT entries 0-3 point at the four page directories; PML4 entry 0
    // at the PDPT.
    movl    $guest_pdpt, %edi
    movl    $guest_pd + PTE_P_RW, %eax
    movl    %eax, 0(%edi)
    addl    $0x1000, %eax
    movl    %eax, 8(%edi)
    addl    $0x1000, %eax
    movl    %eax, 16(%edi)
    addl    $0x1000, %eax
    movl    %eax, 24(%edi)
    movl    $guest_pdpt + PTE_P_RW, %eax
    movl    %eax, guest_pml4
    movl    %cr4, %eax
    orl     $CR4_PAE, %eax
    movl    %eax, %cr4
    movl    $guest_pml4, %eax
    movl    %eax, %cr3
    movl    $EFER_MSR, %ecx
    rdmsr
    orl     $EFER_LME, %eax
    wrmsr
    movl    %cr0, %eax
    orl     $CR0_PG, %eax
    movl    %eax, %cr0
    ljmpl   $SEL_CODE64, $long_mode

.code64
long_mode:
    movw    $SEL_DATA, %ax
    movw    %ax, %ds
    movw    %ax, %es
    movw    %ax, %ss
    movq    $__stack_top, %rsp
    movl    %esi, %edi                  // magic
    movl    %ebp, %esi                  // boot information
    call    testguest_main
3:  cli
    hlt
    jmp     3b

// The start-up code of the other vCPUs: vCPU 0 copies the bytes from
// `ap_trampoline` to `ap_trampoline_end` to the page a SIPI vector names
// (below 1 MiB) before it sends INIT-SIPI-SIPI. A SIPI starts a vCPU
// there in real-address mode, CS = VV00h (base 000VV000H), IP = 0, with
// interrupts off (SDM Vol. 3A §9.4.4, Table 10-1): only CS-relative
// addresses work until the guest's GDT is loaded. It loads that GDT (its
// 32-bit base, in the copied `ap_gdt_ptr`), enters protected mode and
// jumps into the image at `ap_start32`.
.code16
.balign 16
.global ap_trampoline
ap_trampoline:
    cli
    cld
    lgdtl   %cs:(ap_gdt_ptr - ap_trampoline)
    movl    $CR0_PE_ET, %eax
    movl    %eax, %cr0
    ljmpl   $SEL_CODE32, $ap_start32
.balign 8
ap_gdt_ptr:
    .short  gdt_end - gdt - 1
    .long   gdt
.global ap_trampoline_end
ap_trampoline_end:

// In the image, 32-bit protected mode: the flat data segments, vCPU 0's
// page tables (already built: it started this vCPU from long mode), long
// mode, then 64-bit code. Every entry is counted (`ap_startups`, which
// the workload reads); vCPU 1 then takes the secondary stack and calls
// `testguest_secondary(ap_context)`, whose return halts it with
// interrupts off.
.code32
ap_start32:
    movw    $SEL_DATA, %ax
    movw    %ax, %ds
    movw    %ax, %es
    movw    %ax, %ss
    movw    %ax, %fs
    movw    %ax, %gs
    movl    %cr4, %eax
    orl     $CR4_PAE, %eax
    movl    %eax, %cr4
    movl    $guest_pml4, %eax
    movl    %eax, %cr3
    movl    $EFER_MSR, %ecx
    rdmsr
    orl     $EFER_LME, %eax
    wrmsr
    movl    %cr0, %eax
    orl     $CR0_PG, %eax
    movl    %eax, %cr0
    ljmpl   $SEL_CODE64, $ap_long_mode

.code64
ap_long_mode:
    movw    $SEL_DATA, %ax
    movw    %ax, %ds
    movw    %ax, %es
    movw    %ax, %ss
    lock incq ap_startups(%rip)
    // One secondary stack, for vCPU 1 (x2APIC ID 1): any other halts.
    movl    $X2APIC_ID_MSR, %ecx
    rdmsr
    cmpl    $SECONDARY_APIC_ID, %eax
    jne     5f
    movq    $__ap_stack_top, %rsp
    movq    ap_context(%rip), %rdi
    call    testguest_secondary
5:  cli
    hlt
    jmp     5b

// Exception stubs (SDM Vol. 3A §7.3, Table 7-1): vectors 8, 10-14, 17,
// 21, 29 and 30 push an error code; the others get a 0 pushed so every
// frame is alike. Each stub is 16 bytes apart; `idt_setup` in Rust
// points IDT entry N at exception_stubs + 16 * N.
.macro stub vector, has_error
    .balign 16
    .if \has_error == 0
    pushq   $0
    .endif
    pushq   $\vector
    jmp     exception_common
.endm

.section .text.exceptions, "ax"
.balign 16
.global exception_stubs
exception_stubs:
    stub 0, 0
    stub 1, 0
    stub 2, 0
    stub 3, 0
    stub 4, 0
    stub 5, 0
    stub 6, 0
    stub 7, 0
    stub 8, 1
    stub 9, 0
    stub 10, 1
    stub 11, 1
    stub 12, 1
    stub 13, 1
    stub 14, 1
    stub 15, 0
    stub 16, 0
    stub 17, 1
    stub 18, 0
    stub 19, 0
    stub 20, 0
    stub 21, 1
    stub 22, 0
    stub 23, 0
    stub 24, 0
    stub 25, 0
    stub 26, 0
    stub 27, 0
    stub 28, 0
    stub 29, 1
    stub 30, 1
    stub 31, 0

// Interrupt stubs, 16 bytes apart, for the vectors after the exceptions
// (TIMER_VECTOR, IPI_VECTOR in runtime.rs).
.macro irq_stub vector
    .balign 16
    pushq   $\vector
    jmp     interrupt_common
.endm

.balign 16
.global interrupt_stubs
interrupt_stubs:
    irq_stub 0x20
    irq_stub 0x21

// A #DB that returns (debugpriv counts its own watchpoint's traps):
// vector 1, then the common interrupt path.
.balign 16
.global debug_trap_stub
debug_trap_stub:
    pushq   $1
    jmp     interrupt_common

// Frame: vector, then what the processor pushed (RIP, CS, RFLAGS, RSP,
// SS). Saves the registers the C ABI lets a callee change (the runtime
// is built without SSE), calls `testguest_interrupt(vector)` on an
// aligned stack, and returns to the interrupted code.
interrupt_common:
    pushq   %rax
    pushq   %rcx
    pushq   %rdx
    pushq   %rsi
    pushq   %rdi
    pushq   %r8
    pushq   %r9
    pushq   %r10
    pushq   %r11
    pushq   %rbp
    movq    %rsp, %rbp
    movq    80(%rsp), %rdi
    andq    $-16, %rsp
    call    testguest_interrupt
    movq    %rbp, %rsp
    popq    %rbp
    popq    %r11
    popq    %r10
    popq    %r9
    popq    %r8
    popq    %rdi
    popq    %rsi
    popq    %rdx
    popq    %rcx
    popq    %rax
    addq    $8, %rsp
    iretq

// Frame: vector, error code, then what the processor pushed (RIP, CS,
// RFLAGS, RSP, SS). During a hostile attack (`probe_resume` non-zero)
// the exception is caught: the vector goes to `probe_fault` with bit 63
// set, and the attack resumes at `probe_resume` (cleared). Otherwise it
// is reported, and the report never returns.
exception_common:
    pushq   %rax
    movq    probe_resume(%rip), %rax
    testq   %rax, %rax
    jz      1f
    movq    %rax, 24(%rsp)
    movq    $0, probe_resume(%rip)
    movq    8(%rsp), %rax
    btsq    $63, %rax
    movq    %rax, probe_fault(%rip)
    popq    %rax
    addq    $16, %rsp
    iretq
1:  popq    %rax
    movq    0(%rsp), %rdi
    movq    8(%rsp), %rsi
    movq    16(%rsp), %rdx
    movq    %cr2, %rcx
    andq    $-16, %rsp
    call    testguest_exception
4:  cli
    hlt
    jmp     4b

.section .data.gdt, "aw"
.balign 16
gdt:
    .quad   0
    .quad   0x00af9a000000ffff          // 0x08: 64-bit code
    .quad   0x00cf92000000ffff          // 0x10: flat data
    .quad   0x00cf9a000000ffff          // 0x18: flat 32-bit code
gdt_end:
gdt_ptr:
    .short  gdt_end - gdt - 1
    .quad   gdt

.section .bss.paging, "aw", @nobits
.balign 4096
guest_pml4:
    .space  4096
guest_pdpt:
    .space  4096
guest_pd:
    .space  4 * 4096

.section .bss.stack, "aw", @nobits
.balign 16
__stack_bottom:
    .space  STACK_SIZE
__stack_top:
__ap_stack_bottom:
    .space  STACK_SIZE
__ap_stack_top:
