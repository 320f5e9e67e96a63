//! What a socket tells about its link: the bytes still unacknowledged in
//! its send queue and (TCP) the kernel's round-trip time. See
//! [`Transport::unacked_bytes`](super::Transport::unacked_bytes) and
//! [`Transport::round_trip`](super::Transport::round_trip).

use std::os::fd::RawFd;
use std::time::Duration;

/// The bytes in `fd`'s send queue that the peer has not acknowledged
/// (`SIOCOUTQ`: for TCP, unsent plus unacknowledged; for a Unix stream
/// socket, written but not yet read), or `None` if the ioctl fails.
pub(crate) fn unacked_bytes(fd: RawFd) -> Option<u64> {
    let mut n: libc::c_int = 0;
    // SAFETY: SIOCOUTQ (= TIOCOUTQ) stores one int through the pointer,
    // which points to `n`, alive for the call; a bad or closed `fd` makes
    // the ioctl fail, nothing else.
    let r = unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut n as *mut libc::c_int) };
    if r == 0 {
        u64::try_from(n).ok()
    } else {
        None
    }
}

/// The smoothed round-trip time of the TCP socket `fd` (`TCP_INFO`'s
/// `tcpi_rtt`), or `None` if it is not known (not TCP, or no sample yet).
pub(crate) fn tcp_round_trip(fd: RawFd) -> Option<Duration> {
    // SAFETY: tcp_info is plain integers, for which all-zero is a value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `info`, which is
    // that large and alive for the call, and the length back into `len`.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    (r == 0 && info.tcpi_rtt > 0).then(|| Duration::from_micros(u64::from(info.tcpi_rtt)))
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::AsRawFd;

    #[test]
    fn a_tcp_socket_reports_its_queue_and_round_trip() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (_b, _) = l.accept().unwrap();
        assert_eq!(super::unacked_bytes(a.as_raw_fd()), Some(0));
        assert!(super::tcp_round_trip(a.as_raw_fd()).is_some());
        // The peer never reads: what does not fit its receive buffer stays
        // unacknowledged here.
        a.set_nonblocking(true).unwrap();
        let chunk = vec![1u8; 1 << 16];
        let mut written = 0u64;
        while let Ok(n) = a.write(&chunk) {
            written += n as u64;
        }
        let q = super::unacked_bytes(a.as_raw_fd()).unwrap();
        assert!(q > 0 && q <= written, "{q} of {written}");
    }

    #[test]
    fn not_a_socket_is_none() {
        let f = std::fs::File::open("/proc/self/stat").unwrap();
        assert_eq!(super::tcp_round_trip(f.as_raw_fd()), None);
    }
}
