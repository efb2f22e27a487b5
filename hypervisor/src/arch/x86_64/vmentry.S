// Entering a guest and coming back (Intel SDM Vol. 3C §27 "VM Entries",
// §28.5 "Loading Host State"). VM entry loads the guest's RSP, RIP and
// RFLAGS from the VMCS; the other general-purpose registers are ours to
// load, and to save again at the exit, when the processor resumes at the
// VMCS host RIP (`vmx_exit_stub`) with the host RSP the entry wrote.
//
// GuestRegs layout: 16 quadwords in the exit-qualification order of SDM
// Table 28-3 (RAX, RCX, RDX, RBX, RSP (unused: it is in the VMCS), RBP,
// RSI, RDI, R8-R15).

.equ VMCS_HOST_RSP, 0x6c14
.equ R_RAX, 0x00
.equ R_RCX, 0x08
.equ R_RDX, 0x10
.equ R_RBX, 0x18
.equ R_RBP, 0x28
.equ R_RSI, 0x30
.equ R_RDI, 0x38
.equ R_R8,  0x40
.equ R_R9,  0x48
.equ R_R10, 0x50
.equ R_R11, 0x58
.equ R_R12, 0x60
.equ R_R13, 0x68
.equ R_R14, 0x70
.equ R_R15, 0x78
// vmx_run results: the guest exited, or the entry instruction failed
// (VMfailInvalid, VMfailValid), or the host RSP could not be written.
.equ RUN_EXITED, 0
.equ RUN_FAIL_INVALID, 1
.equ RUN_FAIL_VALID, 2
.equ RUN_NO_HOST_RSP, 3

.section .text.vmx, "ax"
.code64

// u64 vmx_run(GuestRegs *regs /* rdi */, u64 launched /* rsi */)
.global vmx_run
vmx_run:
    push    %rbp
    push    %rbx
    push    %r12
    push    %r13
    push    %r14
    push    %r15
    push    %rdi                    // the frame, found again at the exit
    movq    $VMCS_HOST_RSP, %rax
    vmwrite %rsp, %rax
    jbe     3f                      // CF or ZF: VMWRITE failed
    testq   %rsi, %rsi              // ZF = !launched; MOVs keep it
    movq    R_RAX(%rdi), %rax
    movq    R_RCX(%rdi), %rcx
    movq    R_RDX(%rdi), %rdx
    movq    R_RBX(%rdi), %rbx
    movq    R_RBP(%rdi), %rbp
    movq    R_RSI(%rdi), %rsi
    movq    R_R8(%rdi), %r8
    movq    R_R9(%rdi), %r9
    movq    R_R10(%rdi), %r10
    movq    R_R11(%rdi), %r11
    movq    R_R12(%rdi), %r12
    movq    R_R13(%rdi), %r13
    movq    R_R14(%rdi), %r14
    movq    R_R15(%rdi), %r15
    movq    R_RDI(%rdi), %rdi
    jnz     1f
    vmlaunch
    jmp     2f
1:  vmresume
2:  // Still here: the entry failed before loading guest state. CF set is
    // VMfailInvalid, ZF set VMfailValid (SDM §31.2).
    movl    $RUN_FAIL_VALID, %eax
    jz      4f
    movl    $RUN_FAIL_INVALID, %eax
    jmp     4f
3:  movl    $RUN_NO_HOST_RSP, %eax
4:  addq    $8, %rsp
    jmp     5f

// The host RIP of every VMCS. RSP is the host RSP written above, so the
// frame pointer is on top of the stack.
.global vmx_exit_stub
vmx_exit_stub:
    push    %rdi                    // the guest's RDI
    movq    8(%rsp), %rdi
    movq    %rax, R_RAX(%rdi)
    movq    %rcx, R_RCX(%rdi)
    movq    %rdx, R_RDX(%rdi)
    movq    %rbx, R_RBX(%rdi)
    movq    %rbp, R_RBP(%rdi)
    movq    %rsi, R_RSI(%rdi)
    movq    %r8, R_R8(%rdi)
    movq    %r9, R_R9(%rdi)
    movq    %r10, R_R10(%rdi)
    movq    %r11, R_R11(%rdi)
    movq    %r12, R_R12(%rdi)
    movq    %r13, R_R13(%rdi)
    movq    %r14, R_R14(%rdi)
    movq    %r15, R_R15(%rdi)
    pop     %rax
    movq    %rax, R_RDI(%rdi)
    addq    $8, %rsp                // the frame
    movl    $RUN_EXITED, %eax
5:  pop     %r15
    pop     %r14
    pop     %r13
    pop     %r12
    pop     %rbx
    pop     %rbp
    ret
