//! Network namespaces for the network tests: a bridge in one namespace, a
//! veth to a client namespace, TAPs of refvmm processes put on the bridge.
//! Everything is removed on drop, also after a panic.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use livemig_suite::harness::Vmm;

/// Runs a command; its stdout, or an error with its stderr.
pub fn sh(args: &[&str]) -> Result<String, String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("{args:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Root, iproute2 (`ip`, `bridge`), python3 and `/dev/net/tun`: true if all
/// are there; otherwise a loud skip, or a panic under `LIVEMIG_REQUIRE_NETNS`.
pub fn prerequisites(test: &str) -> bool {
    let root = std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false);
    let tools = sh(&["ip", "-V"]).is_ok()
        && sh(&["bridge", "-V"]).is_ok()
        && sh(&["python3", "-V"]).is_ok();
    let ok = root && tools && Path::new("/dev/net/tun").exists();
    if !ok {
        if std::env::var_os("LIVEMIG_REQUIRE_NETNS").is_some() {
            panic!("{test}: needs root, iproute2, python3 and /dev/net/tun");
        }
        eprintln!("\n*** SKIPPED {test}: needs root, iproute2, python3 and /dev/net/tun ***\n");
    }
    ok
}

/// A bridge `br0` in namespace `ns` with a veth (`vA` on the bridge, `vC`
/// in namespace `client`, optionally addressed).
pub struct Bridge {
    /// The bridge's namespace (the VMMs run here).
    pub ns: String,
    /// The client's namespace.
    pub client: String,
}

impl Bridge {
    /// Creates the namespaces `<prefix>N<tag><pid>` and `<prefix>C<tag><pid>`.
    pub fn new(prefix: &str, tag: &str, client_addr: Option<&str>) -> Result<Bridge, String> {
        let id = std::process::id() % 100_000;
        let n = Bridge {
            ns: format!("{prefix}N{tag}{id}"),
            client: format!("{prefix}C{tag}{id}"),
        };
        sh(&["ip", "netns", "add", &n.ns])?;
        sh(&["ip", "netns", "add", &n.client])?;
        sh(&["ip", "-n", &n.ns, "link", "set", "lo", "up"])?;
        sh(&["ip", "-n", &n.ns, "link", "add", "br0", "type", "bridge"])?;
        sh(&["ip", "-n", &n.ns, "link", "set", "br0", "up"])?;
        sh(&[
            "ip", "-n", &n.ns, "link", "add", "vA", "type", "veth", "peer", "name", "vC", "netns",
            &n.client,
        ])?;
        sh(&[
            "ip", "-n", &n.ns, "link", "set", "vA", "master", "br0", "up",
        ])?;
        sh(&["ip", "-n", &n.client, "link", "set", "lo", "up"])?;
        if let Some(a) = client_addr {
            sh(&["ip", "-n", &n.client, "addr", "add", a, "dev", "vC"])?;
        }
        sh(&["ip", "-n", &n.client, "link", "set", "vC", "up"])?;
        Ok(n)
    }

    /// Waits for the TAP a VMM creates, then puts it on the bridge.
    pub fn enslave(&self, tap: &str) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while sh(&["ip", "-n", &self.ns, "link", "show", tap]).is_err() {
            if Instant::now() > deadline {
                return Err(format!("TAP {tap} never appeared"));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        sh(&[
            "ip", "-n", &self.ns, "link", "set", tap, "master", "br0", "up",
        ])
        .map(|_| ())
    }

    /// `ip netns exec <ns>`.
    pub fn exec_prefix(&self) -> Vec<String> {
        vec!["ip".into(), "netns".into(), "exec".into(), self.ns.clone()]
    }

    /// Spawns refvmm with `args` (plus `--api-socket`) inside the namespace.
    pub fn vmm(&self, dir: &Path, name: &str, args: &[&str]) -> Vmm {
        let api = dir.join(format!("{name}.sock"));
        let mut a: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        a.extend([
            "--api-socket".to_string(),
            api.to_string_lossy().into_owned(),
        ]);
        Vmm::spawn_prefixed(name, &self.exec_prefix(), &a, api).unwrap()
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        let _ = sh(&["ip", "netns", "del", &self.ns]);
        let _ = sh(&["ip", "netns", "del", &self.client]);
    }
}

/// A [`livemig_suite::link::ShapedLink`] (two namespaces, `rate_bps`,
/// `rtt`), or None after a loud skip when this machine cannot make one
/// (a panic instead under `LIVEMIG_REQUIRE_NETNS`). Other set-up errors
/// fail the test.
pub fn shaped_link_or_skip(
    test: &str,
    rate_bps: u64,
    rtt: Duration,
) -> Option<livemig_suite::link::ShapedLink> {
    use livemig_suite::link::{LinkError, ShapedLink};
    match ShapedLink::new("t", rate_bps, rtt) {
        Ok(l) => Some(l),
        Err(LinkError::Unavailable(why)) => {
            if std::env::var_os("LIVEMIG_REQUIRE_NETNS").is_some() {
                panic!("{test}: shaped links need {why}");
            }
            eprintln!("\n*** SKIPPED {test}: shaped links need {why} ***\n");
            None
        }
        Err(e) => panic!("{test}: setting up the shaped link: {e}"),
    }
}
