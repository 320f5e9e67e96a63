//! The guest's own stall meter (`gap=<µs>`): the boot processor compares the TSC it reads at
//! the top of every main-loop iteration with the previous one, and prints `GAP <µs>` when more
//! than `gap=` microseconds passed between the two. A migration's switchover is one such stall
//! (the iteration that straddles it starts on the source and ends on the destination), so the
//! destination's first `GAP` line is the blackout the guest itself saw, free of the delay with
//! which a host tool reads the serial port. See the crate docs ("Stall meter").
//!
//! The time the guest spends printing a `T` line (tens of port writes, each an exit to the
//! VMM) and a `GAP` line is not counted: the meter restarts after them. A stall that falls in
//! such a print is therefore not reported.

use iced_x86::code_asm::*;

use super::{clamp_param, print_char, print_str, print_var, rdtsc64, string, v, var, Labels};
use crate::Error;

/// Labels of the stall meter's strings.
#[derive(Clone, Copy)]
pub(super) struct GapLabels {
    pub k_gap: CodeLabel,
    pub s_gap: CodeLabel,
}

impl GapLabels {
    pub(super) fn new(a: &mut CodeAssembler) -> Self {
        GapLabels {
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

/// Clamps `gap=` and turns it into TSC ticks (0 = the meter is off). Needs `TSC_KHZ`; the
/// meter starts at the last [`restart`] of the set-up, right before the main loop.
/// Clobbers rax, rcx, rdx.
pub(super) fn setup(a: &mut CodeAssembler) -> Result<(), Error> {
    clamp_param(a, var::GAP_US)?;
    a.mov(rax, v(var::GAP_US))?;
    a.mul(v(var::TSC_KHZ))?;
    a.mov(ecx, 1000u32)?;
    a.div(rcx)?;
    a.mov(v(var::GAP_TICKS), rax)?;
    Ok(())
}

/// Restarts the meter from now (after time that must not count). Clobbers rax, rdx.
pub(super) fn restart(a: &mut CodeAssembler) -> Result<(), Error> {
    rdtsc64(a)?;
    a.mov(v(var::GAP_PREV), rax)?;
    Ok(())
}

/// At the top of the main loop, with this iteration's TSC in rax: prints `GAP <µs>` if the
/// meter is on and more than `gap=` passed since the previous iteration. Leaves the TSC to
/// compare with in rax (re-read after a print, so the print itself is not a stall).
/// Clobbers rcx, rdx (and what the print routines clobber).
pub(super) fn check(a: &mut CodeAssembler, l: &Labels) -> Result<(), Error> {
    let mut quiet = a.create_label();
    a.mov(rcx, rax)?;
    a.sub(rcx, v(var::GAP_PREV))?;
    a.mov(v(var::GAP_PREV), rax)?;
    a.cmp(v(var::GAP_TICKS), 0)?;
    a.je(quiet)?;
    a.cmp(rcx, v(var::GAP_TICKS))?;
    a.jbe(quiet)?;
    // µs = ticks * 1000 / tsc_khz (ticks stay far below 2^54 between two iterations).
    a.mov(rax, rcx)?;
    a.mov(ecx, 1000u32)?;
    a.mul(rcx)?;
    a.div(v(var::TSC_KHZ))?;
    a.mov(v(var::GAP_LAST), rax)?;
    print_str(a, l, l.g.s_gap)?;
    print_var(a, l, var::GAP_LAST)?;
    print_char(a, l, b'\n')?;
    restart(a)?;
    a.set_label(&mut quiet)?;
    Ok(())
}
