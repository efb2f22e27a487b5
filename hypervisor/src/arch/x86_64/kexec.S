// The x86_64 kexec trampoline (update.rs): copied into scratch right after
// the staged image and entered there with interrupts off and VMX off, RDI =
// its parameter page:
//   0: CR3 of its own identity map (in scratch)   8: handover entry
//  16: handover address   24: multiboot2 information   32: TSC at the jump
//  40: the old image's rollback entry, or 0 (kho/ABI.md §5.2)
//  48: segment count      56: segments, 4 words each: src, dst, filesz, memsz
// It switches to its page tables (the old image's, in the old image's
// data, are about to be overwritten), copies every PT_LOAD segment to its
// physical address, zeroes the rest of each (bss), and jumps to the new
// image's handover entry with RDI = handover, RSI = multiboot2
// information, RDX = TSC, and RCX = the rollback entry with R9 =
// HVLU_ROLLBACK ("HVLUROLB") when there is one. It uses no stack and no
// memory of the old image, and is position-independent.
.section .text.kexec, "ax"
.code64
.global kexec_trampoline_start
kexec_trampoline_start:
    cli
    cld
    movq    %rdi, %r8
    movq    0(%r8), %rax
    movq    %rax, %cr3
    movq    48(%r8), %r9
    leaq    56(%r8), %r10
1:  testq   %r9, %r9
    jz      2f
    movq    0(%r10), %rsi
    movq    8(%r10), %rdi
    movq    16(%r10), %rcx
    rep movsb
    movq    24(%r10), %rcx
    subq    16(%r10), %rcx
    xorl    %eax, %eax
    rep stosb
    addq    $32, %r10
    decq    %r9
    jmp     1b
2:  movq    8(%r8), %r11
    movq    16(%r8), %rdi
    movq    24(%r8), %rsi
    movq    32(%r8), %rdx
    movq    40(%r8), %rcx
    xorl    %r9d, %r9d
    testq   %rcx, %rcx
    jz      3f
    movabsq $0x48564c55524f4c42, %r9
3:  jmp     *%r11
.global kexec_trampoline_end
kexec_trampoline_end:

// A frozen CPU's wait for the new image (direct CPU handover, kho/ABI.md
// §4.6): park_in_mailbox(RDI = its mailbox word, RSI = its CPU index,
// RDX = the rollback watch: [deadline TSC or 0, the BSP's APIC ID, the
// local APIC's base]), entered with VMX off. It waits with interrupts
// off, still on this image's page tables, GDT and stack, until the new
// image writes an entry address into the word, and jumps there with RDI =
// its index. Everything it uses is this image's, which stays intact until
// the new image reports the guests resumed. If the deadline passes first
// (the new image has not committed: it would have released this CPU), it
// sends the BSP one NMI (ICR: delivery mode NMI, SDM Vol. 3A §11.6.1),
// which makes the new image give the machine back (kho/ABI.md §5.2).
.section .text.park, "ax"
.global park_in_mailbox
park_in_mailbox:
    cli
    movq    %rdx, %r8
1:  movq    (%rdi), %rax
    testq   %rax, %rax
    jnz     2f
    movq    0(%r8), %r9
    testq   %r9, %r9
    jz      3f
    rdtsc
    shlq    $32, %rdx
    orq     %rdx, %rax
    cmpq    %r9, %rax
    jb      3f
    movq    $0, 0(%r8)
    movq    16(%r8), %r10
    movl    8(%r8), %eax
    shll    $24, %eax
    movl    %eax, 0x310(%r10)
    movl    $0x4400, 0x300(%r10)
3:  pause
    jmp     1b
2:  movq    %rsi, %rdi
    jmp     *%rax
