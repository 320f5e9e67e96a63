//! A 16550A UART on COM1 for the VMM, with migratable state.
//!
//! [`SerialDevice`] wraps vm-superio's [`Serial`] emulation. The guest's
//! output goes, unbuffered, to the [`SerialOutput`] chosen at creation: every
//! byte the guest writes to the transmit register is one `write(2)` (or one
//! flushed write for a caller-supplied writer), so tools watching the output
//! see each byte as soon as the guest sends it.
//!
//! The interrupt line is an [`EventFd`] the VMM registers with KVM as an
//! irqfd for [`COM1_IRQ`].
//!
//! The device state (every UART register, the baud divisor, the scratch
//! register and the pending receive FIFO) migrates as the section
//! `serial.com1` through [`DeviceState`].

use std::fmt;
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};

use vm_superio::serial::NoEvents;
use vm_superio::{Serial, SerialState, Trigger};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use livemig::state::{DeviceState, StateError, StateReader, StateWriter};

/// First I/O port of COM1.
pub const COM1_PORT: u16 = 0x3f8;
/// Number of I/O ports the UART decodes, starting at [`COM1_PORT`].
pub const COM1_PORT_COUNT: u16 = 8;
/// Legacy interrupt line (GSI) of COM1.
pub const COM1_IRQ: u32 = 4;

/// Name of the state section.
const SECTION_NAME: &str = "serial.com1";
/// Version of the state section [`SerialDevice`] writes.
const SECTION_VERSION: u32 = 1;
/// Oldest version of the state section [`SerialDevice`] reads.
const MIN_SECTION_VERSION: u32 = 1;
/// Depth of the 16550A receive FIFO (vm-superio's `FIFO_SIZE`).
const FIFO_SIZE: usize = 64;
/// Interrupt Enable Register bits a 16550A has.
const IER_VALID_BITS: u8 = 0x0f;
/// Interrupt Identification bits vm-superio keeps (the FIFO bits are added on read).
const IIR_VALID_BITS: u8 = 0x07;

/// Where the guest's serial output goes.
pub enum SerialOutput {
    /// The VMM's standard output (file descriptor 1), unbuffered.
    Stdout,
    /// A file, created or truncated, written through without buffering.
    File(PathBuf),
    /// Discarded.
    None,
    /// A caller-supplied writer (for example a capture buffer in tests);
    /// flushed after every byte.
    Writer(Box<dyn Write + Send>),
}

impl fmt::Debug for SerialOutput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SerialOutput::Stdout => f.write_str("Stdout"),
            SerialOutput::File(p) => f.debug_tuple("File").field(p).finish(),
            SerialOutput::None => f.write_str("None"),
            SerialOutput::Writer(_) => f.write_str("Writer(..)"),
        }
    }
}

/// The interrupt line: a shared eventfd, so the UART can be rebuilt on
/// restore without duplicating file descriptors.
struct IrqTrigger(Arc<EventFd>);

impl Trigger for IrqTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// The output sink, shared so that a restore can rebuild the UART without
/// giving up (or losing, on failure) the writer.
#[derive(Clone)]
struct Output(Arc<Mutex<Box<dyn Write + Send>>>);

impl Write for Output {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .flush()
    }
}

/// The vm-superio UART as this device instantiates it.
type Uart = Serial<IrqTrigger, NoEvents, Output>;

/// A 16550A UART at [`COM1_PORT`], raising [`COM1_IRQ`] through an eventfd.
pub struct SerialDevice {
    uart: Uart,
    irq: Arc<EventFd>,
    out: Output,
}

impl fmt::Debug for SerialDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SerialDevice")
            .field("state", &self.uart.state())
            .finish_non_exhaustive()
    }
}

impl SerialDevice {
    /// Creates the UART in its reset state, writing the guest's output to `output`.
    ///
    /// Fails if the output file cannot be created, standard output cannot be
    /// duplicated, or the interrupt eventfd cannot be created.
    pub fn new(output: SerialOutput) -> io::Result<Self> {
        let writer: Box<dyn Write + Send> = match output {
            // A `File` on a duplicate of fd 1: each write is one write(2),
            // bypassing the line buffer of `std::io::Stdout`.
            SerialOutput::Stdout => {
                Box::new(File::from(io::stdout().as_fd().try_clone_to_owned()?))
            }
            SerialOutput::File(path) => Box::new(File::create(path)?),
            SerialOutput::None => Box::new(io::sink()),
            SerialOutput::Writer(w) => w,
        };
        let irq = Arc::new(EventFd::new(EFD_NONBLOCK)?);
        let out = Output(Arc::new(Mutex::new(writer)));
        let uart = Serial::new(IrqTrigger(Arc::clone(&irq)), out.clone());
        Ok(SerialDevice { uart, irq, out })
    }

    /// The interrupt eventfd, to be registered as an irqfd for [`COM1_IRQ`].
    ///
    /// It stays the same object across [`DeviceState::restore`].
    pub fn irq_evt(&self) -> &EventFd {
        &self.irq
    }

    /// Handles a guest read of port `COM1_PORT + offset` (`offset` in `0..=7`).
    ///
    /// An offset outside the UART reads as `0xff` (an undriven bus).
    pub fn pio_read(&mut self, offset: u8) -> u8 {
        if u16::from(offset) >= COM1_PORT_COUNT {
            log::debug!("serial: read of offset {offset} outside the UART");
            return 0xff;
        }
        self.uart.read(offset)
    }

    /// Handles a guest write of `value` to port `COM1_PORT + offset`
    /// (`offset` in `0..=7`).
    ///
    /// Output and interrupt errors are logged at debug level: the guest
    /// cannot be made to wait, so a byte that cannot be written is dropped.
    pub fn pio_write(&mut self, offset: u8, value: u8) {
        if u16::from(offset) >= COM1_PORT_COUNT {
            log::debug!("serial: write of {value:#04x} to offset {offset} outside the UART");
            return;
        }
        if let Err(e) = self.uart.write(offset, value) {
            log::debug!("serial: write of {value:#04x} to offset {offset}: {e}");
        }
    }

    /// Free space in the receive FIFO, in bytes.
    pub fn fifo_capacity(&self) -> usize {
        self.uart.fifo_capacity()
    }

    /// Queues console input (host to guest) in the receive FIFO and raises
    /// the receive interrupt if the guest enabled it.
    ///
    /// All or nothing: if `bytes` does not fit in the free FIFO space
    /// ([`SerialDevice::fifo_capacity`]) nothing is queued and the error is of
    /// kind [`io::ErrorKind::WouldBlock`]. In loopback mode the input is
    /// dropped, as on real hardware.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> io::Result<()> {
        if bytes.is_empty() {
            return Ok(());
        }
        let room = self.uart.fifo_capacity();
        if bytes.len() > room {
            return Err(io::Error::new(
                io::ErrorKind::WouldBlock,
                format!(
                    "serial receive FIFO has room for {room} of {} bytes",
                    bytes.len()
                ),
            ));
        }
        self.uart
            .enqueue_raw_bytes(bytes)
            .map(|_| ())
            .map_err(|e| io::Error::other(format!("serial input: {e}")))
    }

    /// Decodes a version-1 section into a vm-superio state, validating it.
    fn decode(data: &[u8]) -> Result<SerialState, StateError> {
        let malformed = |reason: String| StateError::Malformed {
            name: SECTION_NAME.to_string(),
            reason,
        };
        let mut r = StateReader::new(SECTION_NAME, data);
        let mut state = SerialState {
            baud_divisor_low: r.u8()?,
            baud_divisor_high: r.u8()?,
            interrupt_enable: r.u8()?,
            interrupt_identification: r.u8()?,
            line_control: r.u8()?,
            line_status: r.u8()?,
            modem_control: r.u8()?,
            modem_status: r.u8()?,
            scratch: r.u8()?,
            in_buffer: Vec::new(),
        };
        let fifo_len = usize::from(r.u8()?);
        if fifo_len > FIFO_SIZE {
            return Err(malformed(format!(
                "receive FIFO holds {fifo_len} bytes, more than the UART's {FIFO_SIZE}"
            )));
        }
        state.in_buffer = r.bytes(fifo_len)?.to_vec();
        r.finish()?;
        if state.interrupt_enable & !IER_VALID_BITS != 0 {
            return Err(malformed(format!(
                "interrupt enable register {:#04x} has bits a 16550A lacks",
                state.interrupt_enable
            )));
        }
        if state.interrupt_identification & !IIR_VALID_BITS != 0 {
            return Err(malformed(format!(
                "interrupt identification register {:#04x} has unknown bits",
                state.interrupt_identification
            )));
        }
        Ok(state)
    }
}

impl DeviceState for SerialDevice {
    fn section_name(&self) -> String {
        SECTION_NAME.to_string()
    }

    fn section_version(&self) -> u32 {
        SECTION_VERSION
    }

    fn min_section_version(&self) -> u32 {
        MIN_SECTION_VERSION
    }

    /// Version 1: nine register bytes (divisor low, divisor high, IER, IIR,
    /// LCR, LSR, MCR, MSR, SCR), the receive FIFO length (one byte, at most
    /// 64), then the FIFO bytes, oldest first.
    fn save(&self) -> Result<Vec<u8>, StateError> {
        let s = self.uart.state();
        let fifo_len = u8::try_from(s.in_buffer.len())
            .ok()
            .filter(|&n| usize::from(n) <= FIFO_SIZE)
            .ok_or_else(|| StateError::Malformed {
                name: SECTION_NAME.to_string(),
                reason: format!("receive FIFO holds {} bytes", s.in_buffer.len()),
            })?;
        let mut w = StateWriter::new();
        w.u8(s.baud_divisor_low)
            .u8(s.baud_divisor_high)
            .u8(s.interrupt_enable)
            .u8(s.interrupt_identification)
            .u8(s.line_control)
            .u8(s.line_status)
            .u8(s.modem_control)
            .u8(s.modem_status)
            .u8(s.scratch)
            .u8(fifo_len)
            .bytes(&s.in_buffer);
        Ok(w.finish())
    }

    /// Rebuilds the UART from the section. On error the device is unchanged.
    /// A pending, enabled interrupt is raised again on the eventfd.
    fn restore(&mut self, version: u32, data: &[u8]) -> Result<(), StateError> {
        if !(MIN_SECTION_VERSION..=SECTION_VERSION).contains(&version) {
            return Err(StateError::UnsupportedVersion {
                name: SECTION_NAME.to_string(),
                got: version,
                min: MIN_SECTION_VERSION,
                max: SECTION_VERSION,
            });
        }
        let state = Self::decode(data)?;
        let uart = Serial::from_state(
            &state,
            IrqTrigger(Arc::clone(&self.irq)),
            NoEvents,
            self.out.clone(),
        )
        .map_err(|e| StateError::Malformed {
            name: SECTION_NAME.to_string(),
            reason: format!("cannot rebuild the UART: {e}"),
        })?;
        self.uart = uart;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use livemig::state::Section;

    const THR: u8 = 0;
    const RBR: u8 = 0;
    const DLL: u8 = 0;
    const DLM: u8 = 1;
    const IER: u8 = 1;
    const IIR: u8 = 2;
    const LCR: u8 = 3;
    const MCR: u8 = 4;
    const LSR: u8 = 5;
    const SCR: u8 = 7;

    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);
    impl Write for Capture {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    impl Capture {
        fn bytes(&self) -> Vec<u8> {
            self.0.lock().unwrap().clone()
        }
    }

    fn captured() -> (SerialDevice, Capture) {
        let cap = Capture::default();
        let dev = SerialDevice::new(SerialOutput::Writer(Box::new(cap.clone()))).unwrap();
        (dev, cap)
    }

    fn irq_count(dev: &SerialDevice) -> u64 {
        dev.irq_evt().read().unwrap_or(0)
    }

    #[test]
    fn device_is_send() {
        fn is_send<T: Send>() {}
        is_send::<SerialDevice>();
    }

    #[test]
    fn thr_write_reaches_writer_at_once() {
        let (mut dev, cap) = captured();
        assert_eq!(dev.pio_read(LSR) & 0x60, 0x60, "THR empty and idle");
        dev.pio_write(THR, b'h');
        assert_eq!(cap.bytes(), b"h");
        dev.pio_write(THR, b'i');
        assert_eq!(cap.bytes(), b"hi");
        assert_eq!(dev.pio_read(LSR) & 0x60, 0x60, "THR empty after a write");
    }

    #[test]
    fn file_output_is_unbuffered() {
        let path = std::env::temp_dir().join(format!("livemig-serial-test-{}", std::process::id()));
        std::fs::write(&path, b"old contents").unwrap();
        let mut dev = SerialDevice::new(SerialOutput::File(path.clone())).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"", "truncated");
        dev.pio_write(THR, b'.');
        assert_eq!(std::fs::read(&path).unwrap(), b".");
        dev.pio_write(THR, b'!');
        assert_eq!(std::fs::read(&path).unwrap(), b".!");
        drop(dev);
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn stdout_and_none_outputs_build() {
        let mut dev = SerialDevice::new(SerialOutput::None).unwrap();
        dev.pio_write(THR, b'x');
        assert!(SerialDevice::new(SerialOutput::Stdout).is_ok());
    }

    #[test]
    fn dlab_divisor_round_trip() {
        let (mut dev, cap) = captured();
        dev.pio_write(LCR, 0x83);
        dev.pio_write(DLL, 0x01);
        dev.pio_write(DLM, 0x02);
        assert_eq!(dev.pio_read(DLL), 0x01);
        assert_eq!(dev.pio_read(DLM), 0x02);
        dev.pio_write(LCR, 0x03);
        assert_eq!(dev.pio_read(LCR), 0x03);
        assert_eq!(dev.pio_read(IER), 0x00, "IER visible again without DLAB");
        assert!(cap.bytes().is_empty(), "divisor writes are not output");
        dev.pio_write(LCR, 0x80);
        assert_eq!((dev.pio_read(DLL), dev.pio_read(DLM)), (0x01, 0x02));
    }

    #[test]
    fn out_of_range_offsets_do_not_panic() {
        let (mut dev, cap) = captured();
        dev.pio_write(8, b'x');
        dev.pio_write(255, b'x');
        assert_eq!(dev.pio_read(8), 0xff);
        assert!(cap.bytes().is_empty());
    }

    #[test]
    fn input_raises_irq_and_reads_back() {
        let (mut dev, _cap) = captured();
        dev.pio_write(IER, 0x01);
        assert_eq!(irq_count(&dev), 0);
        dev.enqueue_input(b"ab").unwrap();
        assert_eq!(irq_count(&dev), 1);
        assert_eq!(dev.pio_read(IIR) & 0x0f, 0x04, "RDA pending");
        assert_eq!(dev.pio_read(LSR) & 1, 1);
        assert_eq!(dev.pio_read(RBR), b'a');
        assert_eq!(dev.pio_read(RBR), b'b');
        assert_eq!(dev.pio_read(LSR) & 1, 0);

        let e = dev.enqueue_input(&[0; 65]).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        assert_eq!(dev.fifo_capacity(), 64, "all or nothing");
        dev.enqueue_input(&[7; 64]).unwrap();
        assert_eq!(dev.fifo_capacity(), 0);
        assert!(dev.enqueue_input(b"x").is_err());
    }

    #[test]
    fn save_restore_save_is_identical() {
        let (mut dev, _cap) = captured();
        dev.pio_write(LCR, 0x80);
        dev.pio_write(DLL, 0x03);
        dev.pio_write(DLM, 0x00);
        dev.pio_write(LCR, 0x1b);
        dev.pio_write(MCR, 0x0b);
        dev.pio_write(SCR, 0x5a);
        dev.pio_write(IER, 0x03);
        dev.enqueue_input(b"hello").unwrap();
        let s1 = dev.save_section().unwrap();
        assert_eq!(s1.name, "serial.com1");
        assert_eq!(s1.version, 1);
        assert_eq!(s1.data.len(), 10 + 5);

        let (mut dst, dst_cap) = captured();
        dst.restore_section(&s1).unwrap();
        let s2 = dst.save_section().unwrap();
        assert_eq!(s1, s2);
        // The pending interrupts are raised again on the destination.
        assert!(irq_count(&dst) >= 1);

        assert_eq!(dst.pio_read(SCR), 0x5a);
        assert_eq!(dst.pio_read(MCR), 0x0b);
        assert_eq!(dst.pio_read(LCR), 0x1b);
        assert_eq!(dst.pio_read(IER), 0x03);
        let got: Vec<u8> = (0..5).map(|_| dst.pio_read(RBR)).collect();
        assert_eq!(got, b"hello");
        assert_eq!(dst.pio_read(LSR) & 1, 0, "FIFO drained");
        // The output still goes to the destination's writer after restore.
        dst.pio_write(THR, b'z');
        assert_eq!(dst_cap.bytes(), b"z");
    }

    #[test]
    fn other_versions_are_refused() {
        let (dev, _) = captured();
        let s = dev.save_section().unwrap();
        let (mut dst, _) = captured();
        for v in [0, 2] {
            let bad = Section::new("serial.com1", v, s.data.clone());
            let e = dst.restore_section(&bad).unwrap_err();
            assert!(
                matches!(e, StateError::UnsupportedVersion { got, .. } if got == v),
                "{e}"
            );
        }
        assert!(matches!(
            dst.restore(2, &s.data).unwrap_err(),
            StateError::UnsupportedVersion { .. }
        ));
    }

    #[test]
    fn malformed_sections_are_refused_and_leave_device_unchanged() {
        let (mut dev, _) = captured();
        dev.pio_write(SCR, 0x11);
        dev.enqueue_input(b"abc").unwrap();
        let good = dev.save_section().unwrap();

        let (mut dst, _) = captured();
        dst.pio_write(SCR, 0x22);
        let before = dst.save().unwrap();
        let check = |dst: &mut SerialDevice, data: Vec<u8>| {
            let e = dst
                .restore_section(&Section::new("serial.com1", 1, data))
                .unwrap_err();
            assert!(matches!(e, StateError::Malformed { .. }), "{e}");
        };
        for len in 0..good.data.len() {
            check(&mut dst, good.data[..len].to_vec());
        }
        let mut trailing = good.data.clone();
        trailing.push(0);
        check(&mut dst, trailing);
        // A FIFO longer than the UART's.
        let mut long = good.data[..9].to_vec();
        long.push(65);
        long.extend_from_slice(&[0; 65]);
        check(&mut dst, long);
        let mut huge = good.data[..9].to_vec();
        huge.push(255);
        check(&mut dst, huge);
        // Impossible register values.
        let mut bad_ier = good.data.clone();
        bad_ier[2] = 0xf0;
        check(&mut dst, bad_ier);
        let mut bad_iir = good.data.clone();
        bad_iir[3] = 0xc1;
        check(&mut dst, bad_iir);
        assert_eq!(dst.save().unwrap(), before);

        // Arbitrary bytes never panic.
        for len in 0..80usize {
            let data: Vec<u8> = (0..len).map(|i| (i * 37 + len) as u8).collect();
            let _ = dst.restore(1, &data);
        }

        dst.restore_section(&good).unwrap();
        assert_eq!(dst.pio_read(SCR), 0x11);
    }

    #[test]
    fn full_fifo_round_trips() {
        let (mut dev, _) = captured();
        let input: Vec<u8> = (0..64).collect();
        dev.enqueue_input(&input).unwrap();
        let s = dev.save_section().unwrap();
        let (mut dst, _) = captured();
        dst.restore_section(&s).unwrap();
        let got: Vec<u8> = (0..64).map(|_| dst.pio_read(RBR)).collect();
        assert_eq!(got, input);
    }
}
