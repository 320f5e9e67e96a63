//! A TCP proxy for tests that break a migration's link: it forwards every
//! connection to a target, `cut` breaks them all and drops new ones until
//! `heal`.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// A TCP proxy that forwards every connection to `to`; `cut` breaks them
/// all and drops new ones until `heal`.
pub struct Proxy {
    /// Where to connect instead of the target (`tcp:HOST:PORT`).
    pub endpoint: String,
    conns: Arc<Mutex<Vec<TcpStream>>>,
    cut: Arc<AtomicBool>,
}

impl Proxy {
    /// Listens on a free loopback port and forwards to `to` (`tcp:HOST:PORT`).
    pub fn start(to: &str) -> Proxy {
        let to = to.strip_prefix("tcp:").unwrap().to_string();
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("tcp:{}", l.local_addr().unwrap());
        let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let cut = Arc::new(AtomicBool::new(false));
        let (c, k) = (conns.clone(), cut.clone());
        std::thread::spawn(move || {
            for a in l.incoming() {
                let Ok(a) = a else { return };
                if k.load(Ordering::SeqCst) {
                    continue;
                }
                let Ok(b) = TcpStream::connect(&to) else {
                    continue;
                };
                let _ = (a.set_nodelay(true), b.set_nodelay(true));
                c.lock()
                    .unwrap()
                    .extend([a.try_clone().unwrap(), b.try_clone().unwrap()]);
                pipe(a.try_clone().unwrap(), b.try_clone().unwrap());
                pipe(b, a);
            }
        });
        Proxy {
            endpoint,
            conns,
            cut,
        }
    }

    /// Breaks every connection (both directions, both ends); new ones are
    /// dropped at once.
    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for s in self.conns.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    /// Forwards new connections again.
    pub fn heal(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

fn pipe(mut from: TcpStream, mut to: TcpStream) {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 << 10];
        while let Ok(n) = from.read(&mut buf) {
            if n == 0 || to.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = to.shutdown(Shutdown::Both);
    });
}
