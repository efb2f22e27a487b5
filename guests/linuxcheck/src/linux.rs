//! The program: entry, Linux system calls, the check.

use core::arch::{asm, global_asm};
use core::fmt::{self, Write};

/// aarch64 Linux system call numbers (`include/uapi/asm-generic/unistd.h`).
const SYS_WRITE: u64 = 64;
const SYS_EXIT_GROUP: u64 = 94;
const SYS_CLOCK_GETTIME: u64 = 113;
const CLOCK_MONOTONIC: u64 = 1;
const STDOUT: u64 = 1;
/// The buffer checked each pass.
const BUFFER_BYTES: usize = 16 << 20;
/// A clock read every this many bytes written or verified.
const CLOCK_EVERY: usize = 4096;
const DEFAULT_SECONDS: u64 = 20;

#[repr(C, align(4096))]
struct Buffer([u64; BUFFER_BYTES / 8]);

static mut BUFFER: Buffer = Buffer([0; BUFFER_BYTES / 8]);

// The kernel starts the program with sp at argc, then argv[] (ELF ABI for
// Linux, "Process Initialization").
global_asm!(
    ".section .text._start, \"ax\"",
    ".global _start",
    "_start:",
    "    mov x0, sp",
    "    and sp, x0, #~15",
    "    bl linuxcheck_main",
    "    b .",
);

/// # Safety
/// `a0`..`a2` are the call's arguments; the caller keeps any memory they
/// name valid for the call.
unsafe fn syscall(nr: u64, a0: u64, a1: u64, a2: u64) -> i64 {
    let ret: i64;
    // SAFETY: `svc #0` enters the kernel with the number in x8 and the
    // arguments in x0-x2 (the Linux aarch64 system call convention); the
    // caller's contract covers the memory the arguments name.
    unsafe {
        asm!("svc #0", in("x8") nr, inlateout("x0") a0.cast_signed() => ret, in("x1") a1, in("x2") a2, options(nostack));
    }
    ret
}

fn exit(code: u64) -> ! {
    // SAFETY: exit_group takes no memory.
    unsafe { syscall(SYS_EXIT_GROUP, code, 0, 0) };
    loop {
        core::hint::spin_loop();
    }
}

/// CLOCK_MONOTONIC in nanoseconds.
fn now_ns() -> u64 {
    let mut ts = [0u64; 2];
    // SAFETY: `ts` is a writable `struct timespec` (two 64-bit fields).
    unsafe { syscall(SYS_CLOCK_GETTIME, CLOCK_MONOTONIC, ts.as_mut_ptr() as u64, 0) };
    ts[0] * 1_000_000_000 + ts[1]
}

/// Standard output, one line at a time.
struct Line {
    buf: [u8; 160],
    len: usize,
}

impl Write for Line {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let n = s.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

fn say(args: fmt::Arguments<'_>) {
    let mut line = Line { buf: [0; 160], len: 0 };
    let _ = line.write_fmt(args);
    let _ = line.write_str("\n");
    // SAFETY: writes `len` bytes of `buf`, which lives across the call.
    unsafe { syscall(SYS_WRITE, STDOUT, line.buf.as_ptr() as u64, line.len as u64) };
}

/// The largest gap between two clock reads, and the last read.
struct Meter {
    last: u64,
    max_gap: u64,
}

impl Meter {
    fn tick(&mut self) {
        let t = now_ns();
        self.max_gap = self.max_gap.max(t.saturating_sub(self.last));
        self.last = t;
    }
}

fn word(pass: u64, i: usize) -> u64 {
    (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ pass.wrapping_mul(0xd6e8_feb8_6659_fd93)
}

/// Seconds to run: the first argument, if it is a number.
///
/// # Safety
/// `sp` is the initial stack pointer the kernel gave the program.
unsafe fn seconds(sp: *const u64) -> u64 {
    // SAFETY: the kernel's initial stack: argc, then argc pointers to
    // NUL-terminated strings.
    unsafe {
        if *sp < 2 {
            return DEFAULT_SECONDS;
        }
        let arg = *sp.add(2) as *const u8;
        let mut n = 0u64;
        let mut i = 0;
        while *arg.add(i) != 0 {
            let c = *arg.add(i);
            if !c.is_ascii_digit() {
                return DEFAULT_SECONDS;
            }
            n = n * 10 + u64::from(c - b'0');
            i += 1;
        }
        if n == 0 {
            DEFAULT_SECONDS
        } else {
            n
        }
    }
}

#[no_mangle]
extern "C" fn linuxcheck_main(sp: *const u64) -> ! {
    // SAFETY: `_start` passes the initial stack pointer.
    let seconds = unsafe { seconds(sp) };
    // SAFETY: the program is single-threaded; BUFFER is only used here.
    let buf = unsafe { &mut *core::ptr::addr_of_mut!(BUFFER.0) };
    let start = now_ns();
    let mut meter = Meter { last: start, max_gap: 0 };
    // After the first clock read: a pause while this line is written is
    // in the first gap measured, so every update whose blackout ends
    // after this line is seen by the check.
    say(format_args!("linux: memcheck start seconds={seconds}"));
    let mut pass = 0u64;
    let mut all_ok = true;
    let mut last_report = start;
    let per_tick = CLOCK_EVERY / 8;
    while now_ns() - start < seconds * 1_000_000_000 {
        pass += 1;
        for (i, w) in buf.iter_mut().enumerate() {
            // SAFETY: a write the compiler must not elide: the check is of
            // memory, not of registers.
            unsafe { core::ptr::write_volatile(w, word(pass, i)) };
            if i % per_tick == 0 {
                meter.tick();
            }
        }
        let mut ok = true;
        for (i, w) in buf.iter().enumerate() {
            // SAFETY: reads back what the loop above wrote.
            ok &= unsafe { core::ptr::read_volatile(w) } == word(pass, i);
            if i % per_tick == 0 {
                meter.tick();
            }
        }
        all_ok &= ok;
        // One line a second at most, and at once on a failure.
        if !ok || meter.last - last_report >= 1_000_000_000 {
            last_report = meter.last;
            say(format_args!("linux: memcheck pass={pass} ok={} max_gap_us={}", u8::from(ok), meter.max_gap / 1000));
        }
    }
    say(format_args!("linux: memcheck done ok={} passes={pass} max_gap_us={}", u8::from(all_ok), meter.max_gap / 1000));
    exit(u64::from(!all_ok))
}

#[panic_handler]
fn panic(_: &core::panic::PanicInfo<'_>) -> ! {
    exit(101)
}
