//! vCPU and VM-wide KVM state as livemig [`Section`]s.
//!
//! [`VcpuState`] saves and restores one vCPU (a [`VcpuFd`] the caller
//! owns) and converts it to and from its section; [`save_vm`] and
//! [`restore_vm_section`] do the VM-wide state of a [`VmFd`];
//! [`save_all`] and [`restore_all`] a whole VM in KVM's order (irqchip and
//! PIT before the vCPUs, devices, the clock last), with
//! [`check_sections`] refusing unknown and missing sections.
//!
//! Each KVM structure is stored as its raw bytes (they are plain C structs;
//! zerocopy checks that they are), tagged and length-prefixed, so a receiver
//! checks every size before it converts bytes back into a structure.
//!
//! * `vcpu.<n>` (version 1): records `tag u16, len u32, bytes` for REGS,
//!   SREGS, FPU, XSAVE, XCRS, LAPIC, MP_STATE, VCPU_EVENTS, DEBUGREGS and MSRS
//!   (count u32, then `index u32, value u64` pairs); each exactly once.
//!   Version 2 (written since): `len u32` (little endian, at most
//!   [`MAX_VCPU_RECORDS`]) then the same records LZ4-compressed (one
//!   block) — 7.1 KB per vCPU, mostly zeros (XSAVE, LAPIC), shrink to
//!   about 0.5 KB for an idle vCPU, and the switchover transfers them. Both
//!   versions are restored. FPU stays although XSAVE's legacy area should
//!   hold the same x87/SSE state: a vCPU whose registers were set with
//!   KVM_SET_FPU and restored from XSAVE alone lost its FCW and XMM
//!   registers on this project's KVM (PVM).
//! * `vm.irqchip` (version 1): PIC master, PIC slave, IOAPIC (`kvm_irqchip` each).
//! * `vm.pit` (version 1): `kvm_pit_state2`.
//! * `vm.clock` (version 1): `kvm_clock_data`.

use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_fpu, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs,
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::{VcpuFd, VmFd};
use livemig::state::{DeviceState, Section, StateError, StateReader, StateWriter};
use zerocopy::{FromBytes, Immutable, IntoBytes};

/// Version of the `vcpu.<n>` section this side writes: 1, the records as
/// they are, because release v0.1.0 (the previous release, which a guest
/// must be able to migrate back to) reads only version 1.
pub const VCPU_VERSION: u32 = 1;
/// Newest version of the `vcpu.<n>` section this side restores: 2, the
/// records LZ4-compressed (about 0.5 KB instead of 7 KB per idle vCPU),
/// to be written once v0.1.0 is no longer the previous release.
pub const VCPU_VERSION_MAX: u32 = 2;
/// Oldest version of the `vcpu.<n>` section this side restores.
pub const VCPU_VERSION_MIN: u32 = 1;
/// Largest uncompressed records of one vCPU accepted (every structure plus
/// [`MAX_MSRS`] MSRs is about 19 KiB): a decoder never allocates more.
pub const MAX_VCPU_RECORDS: usize = 64 << 10;
/// Version of the `vm.*` sections.
pub const VM_VERSION: u32 = 1;
/// Most MSRs accepted in one vCPU section.
pub const MAX_MSRS: u32 = 1024;

const TAG_REGS: u16 = 1;
const TAG_SREGS: u16 = 2;
const TAG_FPU: u16 = 3;
const TAG_XSAVE: u16 = 4;
const TAG_XCRS: u16 = 5;
const TAG_LAPIC: u16 = 6;
const TAG_MP_STATE: u16 = 7;
const TAG_EVENTS: u16 = 8;
const TAG_DEBUGREGS: u16 = 9;
const TAG_MSRS: u16 = 10;
const TAG_NAMES: [&str; 11] = [
    "",
    "regs",
    "sregs",
    "fpu",
    "xsave",
    "xcrs",
    "lapic",
    "mp_state",
    "vcpu_events",
    "debugregs",
    "msrs",
];

fn hv(name: &str, op: &'static str, e: kvm_ioctls::Error) -> StateError {
    StateError::Hypervisor {
        name: name.to_string(),
        op,
        source: std::io::Error::from_raw_os_error(e.errno()),
    }
}

fn put<T: IntoBytes + Immutable>(w: &mut StateWriter, tag: u16, v: &T) {
    let b = v.as_bytes();
    w.u16(tag).u32(b.len() as u32).bytes(b);
}

fn get<T: FromBytes>(name: &str, tag: u16, data: &[u8]) -> Result<T, StateError> {
    T::read_from_bytes(data).map_err(|_| StateError::Malformed {
        name: name.to_string(),
        reason: format!(
            "{} is {} bytes, expected {}",
            TAG_NAMES[tag as usize],
            data.len(),
            std::mem::size_of::<T>()
        ),
    })
}

const FPU_LEN: usize = 8 * 16 + 2 + 2 + 1 + 1 + 2 + 8 + 8 + 16 * 16 + 4;

// kvm_fpu has no zerocopy derives: encode its fields explicitly.
fn encode_fpu(f: &kvm_fpu) -> Vec<u8> {
    let mut w = StateWriter::new();
    for r in &f.fpr {
        w.bytes(r);
    }
    w.u16(f.fcw)
        .u16(f.fsw)
        .u8(f.ftwx)
        .u8(f.pad1)
        .u16(f.last_opcode);
    w.u64(f.last_ip).u64(f.last_dp);
    for x in &f.xmm {
        w.bytes(x);
    }
    w.u32(f.mxcsr);
    w.finish()
}

fn decode_fpu(name: &str, data: &[u8]) -> Result<kvm_fpu, StateError> {
    if data.len() != FPU_LEN {
        return Err(StateError::Malformed {
            name: name.to_string(),
            reason: format!("fpu is {} bytes, expected {FPU_LEN}", data.len()),
        });
    }
    let mut r = StateReader::new(name, data);
    let mut f = kvm_fpu::default();
    for reg in f.fpr.iter_mut() {
        *reg = r.array()?;
    }
    f.fcw = r.u16()?;
    f.fsw = r.u16()?;
    f.ftwx = r.u8()?;
    f.pad1 = r.u8()?;
    f.last_opcode = r.u16()?;
    f.last_ip = r.u64()?;
    f.last_dp = r.u64()?;
    for x in f.xmm.iter_mut() {
        *x = r.array()?;
    }
    f.mxcsr = r.u32()?;
    r.finish()?;
    Ok(f)
}

/// Section name of vCPU `index`.
pub fn vcpu_section_name(index: usize) -> String {
    format!("vcpu.{index}")
}

/// The state of one vCPU, as KVM's structures: what a `vcpu.<n>` section
/// carries. [`VcpuState::save`] and [`VcpuState::restore`] are the ioctls
/// (for a [`VcpuFd`] the caller owns, on any thread, while the vCPU is not
/// in `KVM_RUN`); [`VcpuState::to_section`] and
/// [`VcpuState::from_section`] the encoding. A VMM whose vCPU fds stay on
/// their own threads can save there and send the `VcpuState` (or its
/// section) to the migration thread.
///
/// ```no_run
/// use kvm_ioctls::Kvm;
/// use livemig_kvm::state::VcpuState;
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let kvm = Kvm::new()?;
/// let msrs = kvm.get_msr_index_list()?.as_slice().to_vec();
/// let vm = kvm.create_vm()?;
/// vm.create_irq_chip()?;
/// let vcpu = vm.create_vcpu(0)?;
/// // … the vCPU ran and is parked now:
/// let section = VcpuState::save(&vcpu, &msrs)?.to_section(0);
/// // on the destination, into its own vCPU 0:
/// VcpuState::from_section(&section)?.restore(&vcpu)?;
/// # Ok(()) }
/// ```
pub struct VcpuState {
    /// `KVM_GET_REGS`.
    pub regs: kvm_regs,
    /// `KVM_GET_SREGS`.
    pub sregs: kvm_sregs,
    /// `KVM_GET_FPU` (kept beside XSAVE: see the module documentation).
    pub fpu: kvm_fpu,
    /// `KVM_GET_XSAVE`.
    pub xsave: kvm_xsave,
    /// `KVM_GET_XCRS`.
    pub xcrs: kvm_xcrs,
    /// `KVM_GET_LAPIC`.
    pub lapic: kvm_lapic_state,
    /// `KVM_GET_MP_STATE`.
    pub mp_state: kvm_mp_state,
    /// `KVM_GET_VCPU_EVENTS`.
    pub events: kvm_vcpu_events,
    /// `KVM_GET_DEBUGREGS`.
    pub debugregs: kvm_debugregs,
    /// `(index, value)` of every MSR read (at most [`MAX_MSRS`]).
    pub msrs: Vec<(u32, u64)>,
}

impl VcpuState {
    /// Reads the state of `fd` (which must not be in `KVM_RUN`: pause it
    /// first, see [`crate::pause`]). `msr_indices` are the MSRs to save,
    /// usually `Kvm::get_msr_index_list()`; any the vCPU refuses to read
    /// are skipped.
    pub fn save(fd: &VcpuFd, msr_indices: &[u32]) -> Result<VcpuState, StateError> {
        Self::save_named("vcpu", fd, msr_indices)
    }

    /// [`VcpuState::save`], naming the section `name` in errors.
    fn save_named(n: &str, fd: &VcpuFd, msr_indices: &[u32]) -> Result<VcpuState, StateError> {
        Ok(VcpuState {
            regs: fd.get_regs().map_err(|e| hv(n, "KVM_GET_REGS", e))?,
            sregs: fd.get_sregs().map_err(|e| hv(n, "KVM_GET_SREGS", e))?,
            fpu: fd.get_fpu().map_err(|e| hv(n, "KVM_GET_FPU", e))?,
            xsave: fd.get_xsave().map_err(|e| hv(n, "KVM_GET_XSAVE", e))?,
            xcrs: fd.get_xcrs().map_err(|e| hv(n, "KVM_GET_XCRS", e))?,
            lapic: fd.get_lapic().map_err(|e| hv(n, "KVM_GET_LAPIC", e))?,
            mp_state: fd
                .get_mp_state()
                .map_err(|e| hv(n, "KVM_GET_MP_STATE", e))?,
            events: fd
                .get_vcpu_events()
                .map_err(|e| hv(n, "KVM_GET_VCPU_EVENTS", e))?,
            debugregs: fd
                .get_debug_regs()
                .map_err(|e| hv(n, "KVM_GET_DEBUGREGS", e))?,
            msrs: read_msrs(n, fd, msr_indices)?,
        })
    }

    /// The `vcpu.<index>` section (version [`VCPU_VERSION`]).
    pub fn to_section(&self, index: usize) -> Section {
        let mut w = StateWriter::new();
        put(&mut w, TAG_REGS, &self.regs);
        put(&mut w, TAG_SREGS, &self.sregs);
        let fpu = encode_fpu(&self.fpu);
        w.u16(TAG_FPU).u32(fpu.len() as u32).bytes(&fpu);
        put(&mut w, TAG_XSAVE, &self.xsave);
        put(&mut w, TAG_XCRS, &self.xcrs);
        put(&mut w, TAG_LAPIC, &self.lapic);
        put(&mut w, TAG_MP_STATE, &self.mp_state);
        put(&mut w, TAG_EVENTS, &self.events);
        put(&mut w, TAG_DEBUGREGS, &self.debugregs);
        let mut m = StateWriter::new();
        m.u32(self.msrs.len() as u32);
        for (i, v) in &self.msrs {
            m.u32(*i).u64(*v);
        }
        let mb = m.finish();
        w.u16(TAG_MSRS).u32(mb.len() as u32).bytes(&mb);
        Section::new(
            vcpu_section_name(index),
            VCPU_VERSION,
            encode_records(VCPU_VERSION, w.finish()),
        )
    }
}

/// Saves one vCPU (which must not be running) as its `vcpu.<index>`
/// section: [`VcpuState::save`] then [`VcpuState::to_section`].
pub fn save_vcpu(index: usize, fd: &VcpuFd, msr_indices: &[u32]) -> Result<Section, StateError> {
    let name = vcpu_section_name(index);
    Ok(VcpuState::save_named(&name, fd, msr_indices)?.to_section(index))
}

/// A section body of `version`: version 1 is the records as they are,
/// version 2 the records' length, then the records LZ4-compressed.
fn encode_records(version: u32, records: Vec<u8>) -> Vec<u8> {
    if version < 2 {
        return records;
    }
    let mut out = (records.len() as u32).to_le_bytes().to_vec();
    out.extend(lz4_flex::block::compress(&records));
    out
}

/// The records of a version-2 body, refusing a declared length over
/// [`MAX_VCPU_RECORDS`] and a block that does not decompress to exactly it.
fn decompress_records(name: &str, body: &[u8]) -> Result<Vec<u8>, StateError> {
    let bad = |reason: String| StateError::Malformed {
        name: name.to_string(),
        reason,
    };
    let (len, block) = match body.split_first_chunk::<4>() {
        Some((len, block)) => (u32::from_le_bytes(*len) as usize, block),
        None => return Err(bad(format!("{} bytes, no length", body.len()))),
    };
    if len > MAX_VCPU_RECORDS {
        return Err(bad(format!(
            "records of {len} bytes exceed the limit of {MAX_VCPU_RECORDS}"
        )));
    }
    let mut out = vec![0u8; len];
    match lz4_flex::block::decompress_into(block, &mut out) {
        Ok(n) if n == len => Ok(out),
        Ok(n) => Err(bad(format!(
            "records decompress to {n} bytes, {len} declared"
        ))),
        Err(e) => Err(bad(format!("records do not decompress: {e}"))),
    }
}

/// Reads the MSRs in `indices`, skipping any the vCPU refuses to read.
fn read_msrs(name: &str, fd: &VcpuFd, indices: &[u32]) -> Result<Vec<(u32, u64)>, StateError> {
    let mut want: Vec<u32> = indices.to_vec();
    let mut out = Vec::with_capacity(want.len());
    while !want.is_empty() {
        let entries: Vec<kvm_msr_entry> = want
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|e| StateError::Malformed {
            name: name.to_string(),
            reason: format!("MSR list: {e:?}"),
        })?;
        let n = fd
            .get_msrs(&mut msrs)
            .map_err(|e| hv(name, "KVM_GET_MSRS", e))?;
        out.extend(msrs.as_slice()[..n].iter().map(|e| (e.index, e.data)));
        if n < want.len() {
            log::debug!("{name}: MSR 0x{:x} cannot be read, skipped", want[n]);
            want.drain(..=n);
        } else {
            want.clear();
        }
    }
    Ok(out)
}

impl VcpuState {
    /// Decodes a `vcpu.<n>` section (versions [`VCPU_VERSION_MIN`] to
    /// [`VCPU_VERSION_MAX`]), checking every record's size; touches no
    /// vCPU.
    pub fn from_section(section: &Section) -> Result<VcpuState, StateError> {
        let n = section.name.as_str();
        let records = match section.version {
            1 => std::borrow::Cow::Borrowed(section.data.as_slice()),
            2 => std::borrow::Cow::Owned(decompress_records(n, &section.data)?),
            got => {
                return Err(StateError::UnsupportedVersion {
                    name: n.to_string(),
                    got,
                    min: VCPU_VERSION_MIN,
                    max: VCPU_VERSION_MAX,
                })
            }
        };
        let mut r = StateReader::new(n, &records);
        let mut seen = [false; 11];
        let mut regs = None;
        let mut sregs = None;
        let mut fpu = None;
        let mut xsave = None;
        let mut xcrs = None;
        let mut lapic = None;
        let mut mp = None;
        let mut events = None;
        let mut dregs = None;
        let mut msrs: Vec<(u32, u64)> = Vec::new();
        while let Ok(tag) = r.u16() {
            let len = r.u32()? as usize;
            let data = r.bytes(len)?;
            let t = tag as usize;
            if t == 0 || t >= seen.len() {
                return Err(StateError::Malformed {
                    name: n.to_string(),
                    reason: format!("unknown record tag {tag}"),
                });
            }
            if seen[t] {
                return Err(StateError::Malformed {
                    name: n.to_string(),
                    reason: format!("record {} appears twice", TAG_NAMES[t]),
                });
            }
            seen[t] = true;
            match tag {
                TAG_REGS => regs = Some(get::<kvm_regs>(n, tag, data)?),
                TAG_SREGS => sregs = Some(get::<kvm_sregs>(n, tag, data)?),
                TAG_FPU => fpu = Some(decode_fpu(n, data)?),
                TAG_XSAVE => xsave = Some(get::<kvm_xsave>(n, tag, data)?),
                TAG_XCRS => xcrs = Some(get::<kvm_xcrs>(n, tag, data)?),
                TAG_LAPIC => lapic = Some(get::<kvm_lapic_state>(n, tag, data)?),
                TAG_MP_STATE => mp = Some(get::<kvm_mp_state>(n, tag, data)?),
                TAG_EVENTS => events = Some(get::<kvm_vcpu_events>(n, tag, data)?),
                TAG_DEBUGREGS => dregs = Some(get::<kvm_debugregs>(n, tag, data)?),
                _ => {
                    let mut m = StateReader::new(n, data);
                    let count = m.u32()?;
                    if count > MAX_MSRS {
                        return Err(StateError::Malformed {
                            name: n.to_string(),
                            reason: format!("{count} MSRs exceeds the limit of {MAX_MSRS}"),
                        });
                    }
                    for _ in 0..count {
                        let index = m.u32()?;
                        let data = m.u64()?;
                        msrs.push((index, data));
                    }
                    m.finish()?;
                }
            }
        }
        r.finish()?;
        let missing = |what: &str| StateError::Malformed {
            name: n.to_string(),
            reason: format!("record {what} is missing"),
        };
        Ok(VcpuState {
            regs: regs.ok_or_else(|| missing("regs"))?,
            sregs: sregs.ok_or_else(|| missing("sregs"))?,
            fpu: fpu.ok_or_else(|| missing("fpu"))?,
            xsave: xsave.ok_or_else(|| missing("xsave"))?,
            xcrs: xcrs.ok_or_else(|| missing("xcrs"))?,
            lapic: lapic.ok_or_else(|| missing("lapic"))?,
            mp_state: mp.ok_or_else(|| missing("mp_state"))?,
            events: events.ok_or_else(|| missing("vcpu_events"))?,
            debugregs: dregs.ok_or_else(|| missing("debugregs"))?,
            msrs: if seen[TAG_MSRS as usize] {
                msrs
            } else {
                return Err(missing("msrs"));
            },
        })
    }

    /// Writes this state into `fd` (a vCPU of a VM whose irqchip is already
    /// restored — the LAPIC needs it — and that is not in `KVM_RUN`).
    /// Errors name the vCPU section `vcpu`.
    pub fn restore(&self, fd: &VcpuFd) -> Result<(), StateError> {
        self.restore_named("vcpu", fd)
    }

    fn restore_named(&self, n: &str, fd: &VcpuFd) -> Result<(), StateError> {
        // Order as QEMU: sregs before regs (mode), xsave/xcrs, MSRs, then the
        // APIC, MP state and pending events.
        fd.set_sregs(&self.sregs)
            .map_err(|e| hv(n, "KVM_SET_SREGS", e))?;
        fd.set_regs(&self.regs)
            .map_err(|e| hv(n, "KVM_SET_REGS", e))?;
        fd.set_fpu(&self.fpu).map_err(|e| hv(n, "KVM_SET_FPU", e))?;
        // SAFETY: `xsave` is a complete kvm_xsave read back from a same-sized
        // structure of the source; KVM validates its contents.
        unsafe { fd.set_xsave(&self.xsave) }.map_err(|e| hv(n, "KVM_SET_XSAVE", e))?;
        fd.set_xcrs(&self.xcrs)
            .map_err(|e| hv(n, "KVM_SET_XCRS", e))?;
        let msrs: Vec<kvm_msr_entry> = self
            .msrs
            .iter()
            .map(|&(index, data)| kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect();
        if !msrs.is_empty() {
            let m = Msrs::from_entries(&msrs).map_err(|e| StateError::Malformed {
                name: n.to_string(),
                reason: format!("MSR list: {e:?}"),
            })?;
            let set = fd.set_msrs(&m).map_err(|e| hv(n, "KVM_SET_MSRS", e))?;
            if set < msrs.len() {
                return Err(StateError::Malformed {
                    name: n.to_string(),
                    reason: format!(
                        "KVM_SET_MSRS refused MSR 0x{:x} = 0x{:x}",
                        msrs[set].index, msrs[set].data
                    ),
                });
            }
        }
        fd.set_lapic(&self.lapic)
            .map_err(|e| hv(n, "KVM_SET_LAPIC", e))?;
        fd.set_mp_state(self.mp_state)
            .map_err(|e| hv(n, "KVM_SET_MP_STATE", e))?;
        fd.set_vcpu_events(&self.events)
            .map_err(|e| hv(n, "KVM_SET_VCPU_EVENTS", e))?;
        fd.set_debug_regs(&self.debugregs)
            .map_err(|e| hv(n, "KVM_SET_DEBUGREGS", e))?;
        Ok(())
    }
}

/// Restores one vCPU from its section: [`VcpuState::from_section`] then
/// [`VcpuState::restore`].
pub fn restore_vcpu(fd: &VcpuFd, section: &Section) -> Result<(), StateError> {
    VcpuState::from_section(section)?.restore_named(&section.name, fd)
}

/// Saves the VM-wide state: irqchip, PIT and kvmclock.
pub fn save_vm(vm: &VmFd) -> Result<Vec<Section>, StateError> {
    let mut w = StateWriter::new();
    for (chip, what) in [
        (KVM_IRQCHIP_PIC_MASTER, "PIC master"),
        (KVM_IRQCHIP_PIC_SLAVE, "PIC slave"),
        (KVM_IRQCHIP_IOAPIC, "IOAPIC"),
    ] {
        let mut c = kvm_irqchip {
            chip_id: chip,
            ..Default::default()
        };
        vm.get_irqchip(&mut c).map_err(|e| {
            log::error!("KVM_GET_IRQCHIP {what}: {e}");
            hv("vm.irqchip", "KVM_GET_IRQCHIP", e)
        })?;
        w.bytes(c.as_bytes());
    }
    let pit = vm.get_pit2().map_err(|e| hv("vm.pit", "KVM_GET_PIT2", e))?;
    let clock = vm
        .get_clock()
        .map_err(|e| hv("vm.clock", "KVM_GET_CLOCK", e))?;
    Ok(vec![
        Section::new("vm.irqchip", VM_VERSION, w.finish()),
        Section::new("vm.pit", VM_VERSION, pit.as_bytes().to_vec()),
        Section::new("vm.clock", VM_VERSION, clock.as_bytes().to_vec()),
    ])
}

/// Names of the VM-wide sections.
pub const VM_SECTIONS: [&str; 3] = ["vm.irqchip", "vm.pit", "vm.clock"];

/// Restores one VM-wide section.
pub fn restore_vm_section(vm: &VmFd, s: &Section) -> Result<(), StateError> {
    if s.version != VM_VERSION {
        return Err(StateError::UnsupportedVersion {
            name: s.name.clone(),
            got: s.version,
            min: VM_VERSION,
            max: VM_VERSION,
        });
    }
    let n = s.name.as_str();
    let bad = |reason: String| StateError::Malformed {
        name: n.to_string(),
        reason,
    };
    match n {
        "vm.irqchip" => {
            let sz = std::mem::size_of::<kvm_irqchip>();
            if s.data.len() != 3 * sz {
                return Err(bad(format!("{} bytes, expected {}", s.data.len(), 3 * sz)));
            }
            for (i, chunk) in s.data.chunks_exact(sz).enumerate() {
                let c = kvm_irqchip::read_from_bytes(chunk)
                    .map_err(|_| bad("irqchip record size".into()))?;
                if c.chip_id != i as u32 {
                    return Err(bad(format!("record {i} has chip id {}", c.chip_id)));
                }
                vm.set_irqchip(&c)
                    .map_err(|e| hv("vm.irqchip", "KVM_SET_IRQCHIP", e))?;
            }
        }
        "vm.pit" => {
            let p = kvm_pit_state2::read_from_bytes(&s.data).map_err(|_| {
                bad(format!(
                    "{} bytes, expected {}",
                    s.data.len(),
                    std::mem::size_of::<kvm_pit_state2>()
                ))
            })?;
            vm.set_pit2(&p)
                .map_err(|e| hv("vm.pit", "KVM_SET_PIT2", e))?;
        }
        "vm.clock" => {
            let mut c = kvm_clock_data::read_from_bytes(&s.data).map_err(|_| {
                bad(format!(
                    "{} bytes, expected {}",
                    s.data.len(),
                    std::mem::size_of::<kvm_clock_data>()
                ))
            })?;
            // Only flags KVM_SET_CLOCK understands; KVM_CLOCK_REALTIME makes
            // the clock advance by the real time that passed since the save.
            c.flags &= kvm_bindings::KVM_CLOCK_REALTIME;
            vm.set_clock(&c)
                .map_err(|e| hv("vm.clock", "KVM_SET_CLOCK", e))?;
        }
        other => return Err(StateError::Unknown(other.to_string())),
    }
    Ok(())
}

/// Names of every section a KVM VM of `vcpus` vCPUs (in-kernel irqchip
/// and PIT) writes besides its devices': `vcpu.0` … `vcpu.<vcpus-1>`, then
/// [`VM_SECTIONS`].
pub fn kvm_section_names(vcpus: usize) -> Vec<String> {
    let mut names: Vec<String> = (0..vcpus).map(vcpu_section_name).collect();
    names.extend(VM_SECTIONS.iter().map(|s| s.to_string()));
    names
}

/// Checks that `sections` are exactly the `expected` ones: a section no
/// one here restores is [`StateError::Unknown`], an expected one that is
/// not there [`StateError::Missing`]. Run it before restoring anything.
pub fn check_sections(sections: &[Section], expected: &[String]) -> Result<(), StateError> {
    if let Some(s) = sections.iter().find(|s| !expected.contains(&s.name)) {
        return Err(StateError::Unknown(s.name.clone()));
    }
    match expected
        .iter()
        .find(|name| !sections.iter().any(|s| s.name == **name))
    {
        Some(name) => Err(StateError::Missing(name.clone())),
        None => Ok(()),
    }
}

/// The section called `name`, or [`StateError::Missing`].
pub fn find_section<'a>(sections: &'a [Section], name: &str) -> Result<&'a Section, StateError> {
    sections
        .iter()
        .find(|s| s.name == name)
        .ok_or_else(|| StateError::Missing(name.to_string()))
}

/// Restores the VM-wide sections that go before the vCPUs: `vm.irqchip`
/// (the LAPICs restored with the vCPUs need it) and `vm.pit`.
pub fn restore_vm_before_vcpus(vm: &VmFd, sections: &[Section]) -> Result<(), StateError> {
    restore_vm_section(vm, find_section(sections, "vm.irqchip")?)?;
    restore_vm_section(vm, find_section(sections, "vm.pit")?)
}

/// Restores `vm.clock`: last, after the vCPUs and devices, so that the
/// kvmclock continues from the moment closest to the guest's resumption.
pub fn restore_vm_last(vm: &VmFd, sections: &[Section]) -> Result<(), StateError> {
    restore_vm_section(vm, find_section(sections, "vm.clock")?)
}

/// Saves a whole KVM VM whose vCPUs are all parked: each vCPU
/// (`vcpus[i]` as `vcpu.<i>`), the VM-wide sections, then each device's
/// section. What [`crate::KvmVm`]'s `save_state` writes, for a VMM that
/// owns its VM and vCPU fds.
pub fn save_all(
    vm: &VmFd,
    vcpus: &[&VcpuFd],
    msr_indices: &[u32],
    devices: &[&dyn DeviceState],
) -> Result<Vec<Section>, StateError> {
    let mut sections = Vec::with_capacity(vcpus.len() + VM_SECTIONS.len() + devices.len());
    for (i, fd) in vcpus.iter().enumerate() {
        sections.push(save_vcpu(i, fd, msr_indices)?);
    }
    sections.extend(save_vm(vm)?);
    for d in devices {
        sections.push(d.save_section()?);
    }
    Ok(sections)
}

/// Restores what [`save_all`] saved into a fresh VM (vCPUs not running),
/// in KVM's order: checks that every section is claimed and none missing
/// ([`check_sections`]), then irqchip and PIT, the vCPUs, the devices, and
/// the clock last.
pub fn restore_all(
    vm: &VmFd,
    vcpus: &[&VcpuFd],
    devices: &mut [&mut dyn DeviceState],
    sections: &[Section],
) -> Result<(), StateError> {
    let mut expected = kvm_section_names(vcpus.len());
    expected.extend(devices.iter().map(|d| d.section_name()));
    check_sections(sections, &expected)?;
    restore_vm_before_vcpus(vm, sections)?;
    for (i, fd) in vcpus.iter().enumerate() {
        restore_vcpu(fd, find_section(sections, &vcpu_section_name(i))?)?;
    }
    for d in devices.iter_mut() {
        d.restore_section(find_section(sections, &d.section_name())?)?;
    }
    restore_vm_last(vm, sections)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_compressed() {
        let mut records = vec![0u8; 7000];
        records[100..110].copy_from_slice(b"0123456789");
        let body = encode_records(2, records.clone());
        assert!(body.len() < records.len() / 4, "{} bytes", body.len());
        assert_eq!(decompress_records("vcpu.0", &body).unwrap(), records);
    }

    #[test]
    fn hostile_compressed_records_are_refused() {
        let body = encode_records(2, vec![7u8; 1000]);
        let mut huge = body.clone();
        huge[..4].copy_from_slice(&(MAX_VCPU_RECORDS as u32 + 1).to_le_bytes());
        let e = decompress_records("vcpu.0", &huge).unwrap_err();
        assert!(e.to_string().contains("exceed the limit"), "{e}");
        let mut short = body.clone();
        short[..4].copy_from_slice(&999u32.to_le_bytes());
        assert!(decompress_records("vcpu.0", &short).is_err());
        let mut long = body.clone();
        long[..4].copy_from_slice(&1001u32.to_le_bytes());
        assert!(decompress_records("vcpu.0", &long).is_err());
        assert!(decompress_records("vcpu.0", &body[..body.len() - 1]).is_err());
        assert!(decompress_records("vcpu.0", &body[..3]).is_err());
    }

    #[test]
    fn unknown_vcpu_versions_are_refused() {
        let fd_free = Section::new("vcpu.0", 3, vec![]);
        // The version is checked before any ioctl: no vCPU is needed.
        if !crate::kvm_or_skip("unknown_vcpu_versions_are_refused") {
            return;
        }
        let Ok(kvm) = kvm_ioctls::Kvm::new() else {
            return;
        };
        let vm = kvm.create_vm().unwrap();
        let fd = vm.create_vcpu(0).unwrap();
        let e = restore_vcpu(&fd, &fd_free).unwrap_err();
        assert!(
            matches!(
                e,
                StateError::UnsupportedVersion {
                    got: 3,
                    min: 1,
                    max: 2,
                    ..
                }
            ),
            "{e}"
        );
    }

    /// A vCPU saved (version 1) restores into a fresh vCPU byte for byte;
    /// and compressed as version 2 (what the next release will write) too.
    #[test]
    fn a_vcpu_round_trips_in_both_versions() {
        if !crate::kvm_or_skip("a_vcpu_round_trips_in_both_versions") {
            return;
        }
        let Ok(kvm) = kvm_ioctls::Kvm::new() else {
            return;
        };
        let msrs = kvm.get_msr_index_list().unwrap().as_slice().to_vec();
        let new_vcpu = || {
            let vm = kvm.create_vm().unwrap();
            vm.create_irq_chip().unwrap();
            let fd = vm.create_vcpu(0).unwrap();
            let cpuid = kvm
                .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
                .unwrap();
            fd.set_cpuid2(&cpuid).unwrap();
            (vm, fd)
        };
        let (_a, src) = new_vcpu();
        let mut regs = src.get_regs().unwrap();
        regs.rax = 0x1234_5678;
        regs.rip = 0x1000;
        src.set_regs(&regs).unwrap();
        let saved = save_vcpu(0, &src, &msrs).unwrap();
        assert_eq!(saved.version, VCPU_VERSION);
        let v1 = Section::new("vcpu.0", 1, saved.data.clone());
        let v2 = Section::new("vcpu.0", 2, encode_records(2, saved.data.clone()));
        for s in [&v1, &v2] {
            let (_b, dst) = new_vcpu();
            restore_vcpu(&dst, s).unwrap();
            assert_eq!(dst.get_regs().unwrap().rax, 0x1234_5678);
            let again = save_vcpu(0, &dst, &msrs).unwrap();
            // The TSC MSR moves on by itself; everything else is equal.
            assert_eq!(again.data.len(), saved.data.len());
            assert_eq!(dst.get_sregs().unwrap().cs, src.get_sregs().unwrap().cs);
        }
    }

    /// The x87/SSE registers come across in both versions. (Leaving
    /// KVM_GET_FPU out and relying on XSAVE alone lost FCW and XMM here.)
    #[test]
    fn fpu_registers_survive_in_both_versions() {
        if !crate::kvm_or_skip("fpu_registers_survive_in_both_versions") {
            return;
        }
        let Ok(kvm) = kvm_ioctls::Kvm::new() else {
            return;
        };
        let msrs = kvm.get_msr_index_list().unwrap().as_slice().to_vec();
        let vm = kvm.create_vm().unwrap();
        vm.create_irq_chip().unwrap();
        let cpuid = kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .unwrap();
        let vcpu = |id| {
            let fd = vm.create_vcpu(id).unwrap();
            fd.set_cpuid2(&cpuid).unwrap();
            fd
        };
        let (src, dst, old) = (vcpu(0), vcpu(1), vcpu(2));
        let mut fpu = src.get_fpu().unwrap();
        fpu.fcw = 0x27f;
        fpu.xmm[3] = [0xab; 16];
        // (MXCSR is left alone: KVM_SET_FPU on a vCPU that never ran does
        // not mark the SSE component in use, so the XSAVE restored after it
        // resets MXCSR here — seen on PVM; a running guest's XSAVE carries
        // it.)
        src.set_fpu(&fpu).unwrap();
        let saved = save_vcpu(0, &src, &msrs).unwrap();
        restore_vcpu(&dst, &saved).unwrap();
        let got = dst.get_fpu().unwrap();
        assert_eq!((got.fcw, got.xmm[3]), (fpu.fcw, fpu.xmm[3]));

        // Version 2: the same records, compressed.
        let v2 = encode_records(2, saved.data.clone());
        restore_vcpu(&old, &Section::new("vcpu.0", 2, v2)).unwrap();
        let got = old.get_fpu().unwrap();
        assert_eq!((got.fcw, got.xmm[3]), (fpu.fcw, fpu.xmm[3]));
    }

    fn names(n: &[&str]) -> Vec<String> {
        n.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn sections_must_be_exactly_the_expected_ones() {
        let expected = kvm_section_names(1);
        assert_eq!(
            expected,
            names(&["vcpu.0", "vm.irqchip", "vm.pit", "vm.clock"])
        );
        let all: Vec<Section> = expected
            .iter()
            .map(|n| Section::new(n.clone(), 1, vec![]))
            .collect();
        check_sections(&all, &expected).expect("exactly the expected ones");
        let mut extra = all.clone();
        extra.push(Section::new("dev.uart", 1, vec![]));
        let e = check_sections(&extra, &expected).unwrap_err();
        assert!(
            matches!(&e, StateError::Unknown(n) if n == "dev.uart"),
            "{e}"
        );
        let e = check_sections(&all[1..], &expected).unwrap_err();
        assert!(matches!(&e, StateError::Missing(n) if n == "vcpu.0"), "{e}");
    }

    /// `save_all` of one VM restores with `restore_all` into another, and
    /// the second VM saves the same vCPU registers back.
    #[test]
    fn a_whole_vm_round_trips() {
        if !crate::kvm_or_skip("a_whole_vm_round_trips") {
            return;
        }
        let Ok(kvm) = kvm_ioctls::Kvm::new() else {
            return;
        };
        let msrs = kvm.get_msr_index_list().unwrap().as_slice().to_vec();
        let cpuid = kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .unwrap();
        let new_vm = || {
            let vm = kvm.create_vm().unwrap();
            vm.create_irq_chip().unwrap();
            vm.create_pit2(kvm_bindings::kvm_pit_config::default())
                .unwrap();
            let fds: Vec<VcpuFd> = (0..2)
                .map(|i| {
                    let fd = vm.create_vcpu(i).unwrap();
                    fd.set_cpuid2(&cpuid).unwrap();
                    fd
                })
                .collect();
            (vm, fds)
        };
        let (vm_a, a) = new_vm();
        let mut regs = a[1].get_regs().unwrap();
        regs.rbx = 0xfeed;
        a[1].set_regs(&regs).unwrap();
        let saved = save_all(&vm_a, &[&a[0], &a[1]], &msrs, &[]).unwrap();
        let (vm_b, b) = new_vm();
        restore_all(&vm_b, &[&b[0], &b[1]], &mut [], &saved).unwrap();
        assert_eq!(b[1].get_regs().unwrap().rbx, 0xfeed);
        let e = restore_all(&vm_b, &[&b[0]], &mut [], &saved).unwrap_err();
        assert!(matches!(&e, StateError::Unknown(n) if n == "vcpu.1"), "{e}");
    }
}
