//! What a VMM started by `upgrade` repeats of the old one: its settings
//! ([`Settings`]: the `run`/`receive` options in [`Common`] and
//! [`ReceiveSettings`]), given to the new binary as the same command-line
//! options, and shown by the API's `status` (`"settings"`).
//!
//! One place: a field added to [`Common`] or [`ReceiveSettings`] is carried
//! by [`Settings::receive_args`] without more code (a field that must not
//! be is `#[serde(skip)]` there); the tests check that every carried field
//! is an option of `refvmm receive` and comes back equal.

use std::path::PathBuf;
use std::sync::OnceLock;

use serde::Serialize;
use serde_json::Value;

use crate::cli::{Common, ReceiveSettings};

/// How this VMM was started, as far as a new VMM taking over from it must
/// repeat it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Settings {
    #[serde(flatten)]
    pub(crate) common: Common,
    #[serde(flatten)]
    pub(crate) receive: ReceiveSettings,
}

static SETTINGS: OnceLock<Settings> = OnceLock::new();

/// Records how this VMM was started (once, by `run` or `receive`).
pub fn record(common: &Common, receive: &ReceiveSettings) {
    let _ = SETTINGS.set(Settings {
        common: common.clone(),
        receive: receive.clone(),
    });
}

/// How this VMM was started, if `run` or `receive` recorded it.
pub fn recorded() -> Option<&'static Settings> {
    SETTINGS.get()
}

impl Settings {
    /// The settings as JSON (the API's `status`).
    pub fn to_json(&self) -> Value {
        serde_json::to_value(self).unwrap_or(Value::Null)
    }

    /// The pid file (`--pid-file`), if any.
    pub fn pid_file(&self) -> Option<&PathBuf> {
        self.common.pid_file.as_ref()
    }

    /// The settings a new VMM is given: these, with a `file:` serial target
    /// appended to (`append:`) instead of truncated.
    pub fn for_successor(&self) -> Settings {
        let mut s = self.clone();
        if let Some(p) = s.common.serial.strip_prefix("file:") {
            s.common.serial = format!("append:{p}");
        }
        s
    }

    /// The `refvmm receive` options that start a VMM with
    /// [`Settings::for_successor`]: each field `a_b` as `--a-b VALUE`
    /// (`true` as the bare flag; `false` and unset fields are left out; a
    /// list repeats the option).
    pub fn receive_args(&self) -> Result<Vec<String>, String> {
        let v = serde_json::to_value(self.for_successor()).map_err(|e| e.to_string())?;
        let Value::Object(fields) = v else {
            return Err("the settings are not a JSON object".into());
        };
        let mut args = Vec::new();
        for (name, value) in fields {
            let flag = format!("--{}", name.replace('_', "-"));
            let values = match value {
                Value::Array(a) => a,
                other => vec![other],
            };
            for v in values {
                match v {
                    Value::Null | Value::Bool(false) => {}
                    Value::Bool(true) => args.push(flag.clone()),
                    Value::String(s) => args.extend([flag.clone(), s]),
                    Value::Number(n) => args.extend([flag.clone(), n.to_string()]),
                    other => {
                        return Err(format!("setting {name}: cannot pass {other} as an option"))
                    }
                }
            }
        }
        Ok(args)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Cmd};
    use clap::{CommandFactory, Parser};

    /// `refvmm receive --listen unix:/x ARGS` as parsed settings.
    fn receive(args: &[String]) -> Settings {
        let argv = ["refvmm", "receive", "--listen", "unix:/x"]
            .into_iter()
            .map(String::from)
            .chain(args.iter().cloned());
        match Cli::try_parse_from(argv).map(|c| c.cmd) {
            Ok(Cmd::Receive(r)) => Settings {
                common: r.common,
                receive: r.settings,
            },
            Ok(_) => panic!("not receive"),
            Err(e) => panic!("{args:?}: {e}"),
        }
    }

    fn unusual() -> Settings {
        let mut s = receive(&[]);
        s.common.serial = "file:/var/log/vm.serial".into();
        s.common.console = Some("unix:/run/vm.console".into());
        s.common.api_socket = Some("/run/vm.sock".into());
        s.common.dirty_log = "ring:1024".into();
        s.common.memory_backend = "memfd,hugetlb".into();
        s.common.thp = "off".into();
        s.common.pid_file = Some("/run/vm.pid".into());
        s.receive.io_timeout = 33;
        s.receive.no_announce = true;
        s
    }

    #[test]
    fn every_setting_comes_back_equal_from_the_new_vmms_options() {
        for s in [unusual(), receive(&[])] {
            let args = s.receive_args().unwrap();
            assert_eq!(receive(&args), s.for_successor(), "{args:?}");
        }
        let args = unusual().receive_args().unwrap();
        assert!(
            args.windows(2)
                .any(|w| w == ["--serial", "append:/var/log/vm.serial"]),
            "a file console is appended to, not truncated: {args:?}"
        );
        assert!(args.iter().any(|a| a == "--no-announce"), "{args:?}");
    }

    /// Every carried field is an option of `receive` (also the ones whose
    /// value here is the default, which the round trip above cannot see).
    #[test]
    fn every_carried_field_is_a_receive_option() {
        let cmd = Cli::command();
        let receive = cmd.find_subcommand("receive").unwrap();
        let longs: Vec<&str> = receive
            .get_arguments()
            .filter_map(|a| a.get_long())
            .collect();
        let Value::Object(fields) = unusual().to_json() else {
            panic!("not an object")
        };
        assert!(fields.len() >= 8, "{fields:?}");
        for name in fields.keys() {
            let long = name.replace('_', "-");
            assert!(
                longs.contains(&long.as_str()),
                "--{long} is not a receive option"
            );
        }
        assert!(
            !fields.contains_key("net"),
            "the NICs travel as descriptors"
        );
    }

    #[test]
    fn receive_settings_default_to_the_clap_defaults() {
        assert_eq!(receive(&[]).receive, ReceiveSettings::default());
    }
}
