//! The TAP backend on a real TAP device, in a private network namespace
//! (needs root and /dev/net/tun; skipped otherwise): frames are plain
//! Ethernet in both directions (no packet-information header), and an empty
//! TAP does not block.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use livemig_virtio::{FrameBackend, TapBackend};

fn skip(why: &str) -> bool {
    eprintln!("tap_backend_carries_plain_ethernet: skipped: {why}");
    true
}

fn check(r: libc::c_int, what: &str) -> io::Result<libc::c_int> {
    if r < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("{what}: {e}")));
    }
    Ok(r)
}

fn ifreq(name: &str) -> libc::ifreq {
    // SAFETY: `ifreq` is plain old data; all zeroes is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    ifr
}

/// Brings `name` up and returns its interface index (in this thread's
/// network namespace).
fn up(name: &str) -> io::Result<i32> {
    // SAFETY: plain socket(2) call; the result is checked.
    let s = check(
        unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) },
        "socket",
    )?;
    // SAFETY: `s` is a descriptor we just opened and now own.
    let s = unsafe { OwnedFd::from_raw_fd(s) };
    let mut ifr = ifreq(name);
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS/SIOCGIFINDEX read and write a
    // `struct ifreq`, which `ifr` is, for the duration of each call.
    unsafe {
        check(
            libc::ioctl(s.as_raw_fd(), libc::SIOCGIFFLAGS, &mut ifr),
            "SIOCGIFFLAGS",
        )?;
        ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        check(
            libc::ioctl(s.as_raw_fd(), libc::SIOCSIFFLAGS, &mut ifr),
            "SIOCSIFFLAGS",
        )?;
        check(
            libc::ioctl(s.as_raw_fd(), libc::SIOCGIFINDEX, &mut ifr),
            "SIOCGIFINDEX",
        )?;
        Ok(ifr.ifr_ifru.ifru_ifindex)
    }
}

/// An AF_PACKET socket bound to interface `index`, receiving every protocol.
fn packet_socket(index: i32) -> io::Result<OwnedFd> {
    let proto = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: plain socket(2) call; the result is checked.
    let s = check(
        unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, libc::c_int::from(proto)) },
        "socket(AF_PACKET)",
    )?;
    // SAFETY: `s` is a descriptor we just opened and now own.
    let s = unsafe { OwnedFd::from_raw_fd(s) };
    // SAFETY: `sockaddr_ll` is plain old data; all zeroes is valid.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = proto;
    sll.sll_ifindex = index;
    // SAFETY: `sll` is a valid `sockaddr_ll` of the length passed.
    check(
        unsafe {
            libc::bind(
                s.as_raw_fd(),
                &sll as *const libc::sockaddr_ll as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        },
        "bind(AF_PACKET)",
    )?;
    Ok(s)
}

fn frame(src_last: u8, ethertype: [u8; 2], fill: u8) -> Vec<u8> {
    let mut f = vec![fill; 80];
    f[..6].copy_from_slice(&[0x52, 0x54, 0, 0x12, 0x34, 0x56]);
    f[6..12].copy_from_slice(&[2, 0, 0, 0, 0, src_last]);
    f[12..14].copy_from_slice(&ethertype);
    f
}

#[test]
fn tap_backend_carries_plain_ethernet() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 && skip("not root") {
        return;
    }
    if !std::path::Path::new("/dev/net/tun").exists() && skip("no /dev/net/tun") {
        return;
    }
    // A thread of its own: unshare(CLONE_NEWNET) moves only this thread
    // into a new, empty network namespace, which disappears with it.
    let r = std::thread::spawn(|| -> io::Result<()> {
        // SAFETY: unshare with a flag set; affects only this thread.
        check(
            unsafe { libc::unshare(libc::CLONE_NEWNET) },
            "unshare(CLONE_NEWNET)",
        )?;
        let mut tap = TapBackend::open("lmvt0")?;
        let mut buf = [0u8; 2048];
        // Empty (the interface is still down, so nothing is queued): recv
        // returns at once.
        assert!(tap.recv(&mut buf)?.is_none());
        let index = up("lmvt0")?;
        let pkt = packet_socket(index)?;

        // Host -> guest: a frame sent on the interface is read from the TAP
        // byte for byte (no 4-byte packet-information header).
        let f = frame(0x99, [0x88, 0xb5], 0xab);
        // SAFETY: `f` is a valid buffer of the length passed.
        let n = unsafe { libc::send(pkt.as_raw_fd(), f.as_ptr().cast(), f.len(), 0) };
        check(n as libc::c_int, "send(AF_PACKET)")?;
        let t0 = Instant::now();
        let got = loop {
            if let Some(n) = tap.recv(&mut buf)? {
                if buf[12..14] == [0x88, 0xb5] {
                    break buf[..n].to_vec();
                }
                continue; // IPv6 autoconfiguration noise
            }
            assert!(
                t0.elapsed() < Duration::from_secs(5),
                "frame never reached the TAP"
            );
            std::thread::sleep(Duration::from_millis(5));
        };
        assert_eq!(got, f);

        // Guest -> host: a frame written to the TAP arrives on the interface.
        let g = frame(0x77, [0x88, 0xb6], 0xcd);
        tap.send(&g)?;
        let t0 = Instant::now();
        loop {
            // SAFETY: `buf` is a valid writable buffer of the length passed.
            let n = unsafe {
                libc::recv(
                    pkt.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if n > 0 && buf[12..14] == [0x88, 0xb6] {
                assert_eq!(&buf[..n as usize], &g[..]);
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(5),
                "frame never left the TAP"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    })
    .join()
    .unwrap();
    match r {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
            skip(&e.to_string());
        }
        Err(e) => panic!("{e}"),
    }
}
