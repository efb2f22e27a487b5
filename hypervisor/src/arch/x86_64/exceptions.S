// The hypervisor's own exception vectors (SDM Vol. 3A §7.3, Table 7-1):
// the hypervisor takes no exceptions by design, so any is a bug to report
// before powering off (rather than a silent triple fault and reset).
// Vectors 8, 10-14, 17, 21, 29 and 30 push an error code; the others get
// a 0 pushed so every frame is alike. Stubs are 16 bytes apart.

.macro host_stub vector, has_error
    .balign 16
    .if \has_error == 0
    pushq   $0
    .endif
    pushq   $\vector
    jmp     host_exception_common
.endm

.section .text.host_exceptions, "ax"
.code64
.balign 16
.global host_exception_stubs
host_exception_stubs:
    host_stub 0, 0
    host_stub 1, 0
    .balign 16
    jmp     host_nmi
    host_stub 3, 0
    host_stub 4, 0
    host_stub 5, 0
    host_stub 6, 0
    host_stub 7, 0
    host_stub 8, 1
    host_stub 9, 0
    host_stub 10, 1
    host_stub 11, 1
    host_stub 12, 1
    host_stub 13, 1
    host_stub 14, 1
    host_stub 15, 0
    host_stub 16, 0
    host_stub 17, 1
    host_stub 18, 0
    host_stub 19, 0
    host_stub 20, 0
    host_stub 21, 1
    host_stub 22, 0
    host_stub 23, 0
    host_stub 24, 0
    host_stub 25, 0
    host_stub 26, 0
    host_stub 27, 0
    host_stub 28, 0
    host_stub 29, 1
    host_stub 30, 1
    host_stub 31, 0

// Every vector from 32 up: an interrupt the host takes only under SVM,
// between STGI and CLI after a guest exit (`svmentry.S`): the slice
// timer or a kick. Saves the registers the C ABI lets a callee clobber,
// has the local APIC's in-service bit cleared, and returns.
.balign 16
.global host_interrupt
host_interrupt:
    pushq   %rax
    pushq   %rcx
    pushq   %rdx
    pushq   %rsi
    pushq   %rdi
    pushq   %r8
    pushq   %r9
    pushq   %r10
    pushq   %r11
    movq    %rsp, %rax
    andq    $-16, %rsp
    pushq   %rax
    pushq   %rax
    call    hv_host_interrupt
    popq    %rax
    movq    %rax, %rsp
    popq    %r11
    popq    %r10
    popq    %r9
    popq    %r8
    popq    %rdi
    popq    %rsi
    popq    %rdx
    popq    %rcx
    popq    %rax
    iretq

// Frame: vector, error code, then RIP, CS, RFLAGS, RSP, SS.
host_exception_common:
    movq    0(%rsp), %rdi
    movq    8(%rsp), %rsi
    movq    16(%rsp), %rdx
    movq    %cr2, %rcx
    andq    $-16, %rsp
    call    hv_host_exception
1:  cli
    hlt
    jmp     1b

// An NMI (vector 2): the old image's rollback deadline while a new image
// has not committed (hv_host_nmi gives the machine back and does not
// return), else nothing this image asked for: ignored, and the
// interrupted code resumes. Saves the registers the C ABI lets a callee
// change.
host_nmi:
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
    andq    $-16, %rsp
    call    hv_host_nmi
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
    iretq
