// Entering a guest under SVM and coming back (AMD64 APM Vol. 2 §15.5
// "VMRUN Instruction", §15.6 "#VMEXIT", §15.5.2 "VMSAVE and VMLOAD").
// VMRUN loads the guest's RAX, RSP, RIP, RFLAGS, control registers and
// ES/CS/SS/DS from the VMCB and saves the host's in the host save area
// (VM_HSAVE_PA), which #VMEXIT restores: RAX again holds the VMCB's
// address. The other general-purpose registers are ours to load and to
// save again; FS, GS, TR, LDTR and the syscall MSRs are neither saved nor
// loaded by VMRUN, so VMSAVE/VMLOAD switch them between the host's area
// and the guest's VMCB. GIF is clear from before the host's state is
// saved until it is back, so no interrupt is taken half-way. RFLAGS.IF
// is set for the VMRUN: with V_INTR_MASKING the host's IF is what lets a
// physical interrupt (the slice timer, a kick) reach the INTR intercept
// (§15.21.1); the interrupt, still pending at the APIC, is taken through
// the host's IDT (`hv_host_interrupt`) between STGI and CLI.
//
// GuestRegs layout: as `vmentry.S` (RAX and RSP slots unused here: both
// are in the VMCB).

.equ S_RCX, 0x08
.equ S_RDX, 0x10
.equ S_RBX, 0x18
.equ S_RBP, 0x28
.equ S_RSI, 0x30
.equ S_RDI, 0x38
.equ S_R8,  0x40
.equ S_R9,  0x48
.equ S_R10, 0x50
.equ S_R11, 0x58
.equ S_R12, 0x60
.equ S_R13, 0x68
.equ S_R14, 0x70
.equ S_R15, 0x78

.section .text.svm, "ax"
.code64

// void svm_run(GuestRegs *regs /* rdi */, u64 vmcb_pa /* rsi */,
//              u64 host_area_pa /* rdx */)
.global svm_run
svm_run:
    push    %rbp
    push    %rbx
    push    %r12
    push    %r13
    push    %r14
    push    %r15
    push    %rdi                    // 16(%rsp): the registers
    push    %rdx                    //  8(%rsp): the host area
    push    %rsi                    //  0(%rsp): the VMCB
    clgi
    sti
    movq    %rdx, %rax
    vmsave  %rax                    // the host's FS, GS, TR, LDTR, MSRs
    movq    (%rsp), %rax
    vmload  %rax                    // the guest's
    movq    S_RCX(%rdi), %rcx
    movq    S_RDX(%rdi), %rdx
    movq    S_RBX(%rdi), %rbx
    movq    S_RBP(%rdi), %rbp
    movq    S_RSI(%rdi), %rsi
    movq    S_R8(%rdi), %r8
    movq    S_R9(%rdi), %r9
    movq    S_R10(%rdi), %r10
    movq    S_R11(%rdi), %r11
    movq    S_R12(%rdi), %r12
    movq    S_R13(%rdi), %r13
    movq    S_R14(%rdi), %r14
    movq    S_R15(%rdi), %r15
    movq    S_RDI(%rdi), %rdi
    vmrun   %rax
    // #VMEXIT: the host's RSP and RAX (the VMCB) are back.
    vmsave  %rax                    // the guest's FS, GS, TR, ... into its VMCB
    push    %rdi
    movq    24(%rsp), %rdi          // the registers
    movq    %rcx, S_RCX(%rdi)
    movq    %rdx, S_RDX(%rdi)
    movq    %rbx, S_RBX(%rdi)
    movq    %rbp, S_RBP(%rdi)
    movq    %rsi, S_RSI(%rdi)
    movq    %r8, S_R8(%rdi)
    movq    %r9, S_R9(%rdi)
    movq    %r10, S_R10(%rdi)
    movq    %r11, S_R11(%rdi)
    movq    %r12, S_R12(%rdi)
    movq    %r13, S_R13(%rdi)
    movq    %r14, S_R14(%rdi)
    movq    %r15, S_R15(%rdi)
    popq    S_RDI(%rdi)
    movq    8(%rsp), %rax
    vmload  %rax                    // the host's again
    stgi
    cli
    addq    $24, %rsp
    pop     %r15
    pop     %r14
    pop     %r13
    pop     %r12
    pop     %rbx
    pop     %rbp
    ret
