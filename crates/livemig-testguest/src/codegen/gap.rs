//! The guest's own stall meter (`gap=<µs>`): the boot processor reads the TSC at the top of
//! every main-loop iteration and after every byte it writes to the serial port, and when more
//! than `gap=` microseconds passed between two such reads it prints `GAP <µs>` at the top of
//! the next iteration. A migration's switchover is one such stall (it starts on the source
//! and ends on the destination), so the destination's first `GAP` line is the blackout the
//! guest itself saw, free of the delay with which a host tool reads the serial port. See the
//! crate docs ("Stall meter").
//!
//! Reading the TSC around every port write means a stall inside a print (a `T` line, a `GAP`
//! line, a heartbeat) is measured like any other, while the prints themselves (a few tens of
//! µs per byte, each an exit to the VMM) never add up to a false stall.

use iced_x86::code_asm::*;

use super::{clamp_param, print_str, print_var, rdtsc64, string, v, var, Labels};
use crate::Error;

/// Labels of the stall meter's subroutine and strings.
#[derive(Clone, Copy)]
pub(super) struct GapLabels {
    pub tick: CodeLabel,
    pub k_gap: CodeLabel,
    pub s_gap: CodeLabel,
}

impl GapLabels {
    pub(super) fn new(a: &mut CodeAssembler) -> Self {
        GapLabels {
            tick: a.create_label(),
            k_gap: a.create_label(),
            s_gap: a.create_label(),
        }
    }
}

/// The stall meter's strings.
pub(super) fn strings(a: &mut CodeAssembler, g: &mut GapLabels) -> Result<(), Error> {
    string(a, &mut g.k_gap, b"gap=")?;
    string(a, &mut g.s_gap, b"\nGAP ")?;
    Ok(())
}

/// Clamps `gap=` and turns it into TSC ticks (0 = the meter is off). Needs `TSC_KHZ`. The
/// meter is armed by [`arm`], right before the main loop. Clobbers rax, rcx, rdx.
pub(super) fn setup(a: &mut CodeAssembler) -> Result<(), Error> {
    clamp_param(a, var::GAP_US)?;
    a.mov(rax, v(var::GAP_US))?;
    a.mul(v(var::TSC_KHZ))?;
    a.mov(ecx, 1000u32)?;
    a.div(rcx)?;
    a.mov(v(var::GAP_TICKS), rax)?;
    Ok(())
}

/// Arms the meter from now (before, [`tick`](GapLabels::tick) does nothing: the boot's
/// prints are not measured). Clobbers rax, rdx.
pub(super) fn arm(a: &mut CodeAssembler) -> Result<(), Error> {
    rdtsc64(a)?;
    a.mov(v(var::GAP_PREV), rax)?;
    Ok(())
}

/// The `tick` subroutine: reads the TSC and, if the armed meter sees more than `gap=` since
/// the previous tick, keeps the stall (in ticks) as pending unless a longer one already waits
/// to be printed (so a stall seen just before a switchover, not printed yet, cannot hide the
/// switchover's, which is then printed instead). Preserves every register but the flags.
pub(super) fn subroutine(a: &mut CodeAssembler, l: &mut Labels) -> Result<(), Error> {
    let mut off = a.create_label();
    let mut done = a.create_label();
    a.set_label(&mut l.g.tick)?;
    a.cmp(v(var::GAP_TICKS), 0)?;
    a.je(off)?;
    a.cmp(v(var::GAP_PREV), 0)?;
    a.je(off)?;
    a.push(rax)?;
    a.push(rcx)?;
    a.push(rdx)?;
    rdtsc64(a)?;
    a.mov(rcx, rax)?;
    a.sub(rcx, v(var::GAP_PREV))?;
    a.mov(v(var::GAP_PREV), rax)?;
    a.cmp(rcx, v(var::GAP_TICKS))?;
    a.jbe(done)?;
    a.cmp(rcx, v(var::GAP_PENDING))?;
    a.jbe(done)?;
    a.mov(v(var::GAP_PENDING), rcx)?;
    a.set_label(&mut done)?;
    a.pop(rdx)?;
    a.pop(rcx)?;
    a.pop(rax)?;
    a.set_label(&mut off)?;
    a.ret()?;
    Ok(())
}

/// At the top of the main loop, with this iteration's TSC in rax: ticks the meter, and prints
/// `GAP <µs>` for a pending stall. Leaves the TSC to compare with in rax (re-read after a
/// print). Clobbers rcx, rdx, rsi (what the print routines clobber).
pub(super) fn check(a: &mut CodeAssembler, l: &Labels) -> Result<(), Error> {
    let mut quiet = a.create_label();
    a.call(l.g.tick)?;
    a.cmp(v(var::GAP_PENDING), 0)?;
    a.je(quiet)?;
    // µs = ticks * 1000 / tsc_khz (a stall stays far below 2^54 ticks).
    a.mov(rax, v(var::GAP_PENDING))?;
    a.mov(ecx, 1000u32)?;
    a.mul(rcx)?;
    a.div(v(var::TSC_KHZ))?;
    a.mov(v(var::GAP_LAST), rax)?;
    a.mov(v(var::GAP_PENDING), 0)?;
    print_str(a, l, l.g.s_gap)?;
    print_var(a, l, var::GAP_LAST)?;
    a.mov(al, i32::from(b'\n'))?;
    a.call(l.putc)?;
    rdtsc64(a)?;
    a.set_label(&mut quiet)?;
    Ok(())
}
