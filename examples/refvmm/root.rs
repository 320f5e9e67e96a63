// The refvmm crate: its modules and `main`. Included by main.rs (the
// example) and by units.rs (its unit tests, a separate test target).

mod agent;
mod api;
mod api_state;
mod auto;
mod carry;
mod cli;
mod console;
mod console_client;
mod console_proto;
mod console_server;
mod dirty_rate;
mod evacuate;
mod live;
mod local;
mod migrate_client;
mod migration;
mod monitor;
mod multiboot;
mod net;
mod pidfile;
mod place;
mod postcopy;
mod postcopy_recovery;
mod postcopy_resume;
mod run;
mod socket_path;
mod upgrade;
mod vmm;

use std::process::ExitCode;

use clap::Parser;

use crate::cli::{runtime, Cli, Cmd, Fail};
use crate::migration::cmd_receive;
use crate::run::cmd_run;

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Run(args) => cmd_run(args),
        Cmd::Receive(args) => cmd_receive(args),
        Cmd::Migrate {
            api_socket,
            auto: _,
            opts,
        } if opts.resume => migrate_client::cmd_resume(&api_socket, &opts),
        Cmd::Migrate {
            api_socket,
            auto,
            opts,
        } => auto::cmd_migrate(&api_socket, auto, opts).map_err(|(c, m)| Fail(c, m)),
        Cmd::Agent(args) => agent::cmd_agent(args),
        Cmd::Evacuate(args) => evacuate::cmd_evacuate(args).map_err(|(c, m)| Fail(c, m)),
        Cmd::MigrateStatus { api_socket } => {
            migrate_client::status(&api_socket).map_err(|f| Fail(f.0, f.1))
        }
        Cmd::MigrateCancel { api_socket } => {
            migrate_client::cancel(&api_socket).map_err(|f| Fail(f.0, f.1))
        }
        Cmd::Place {
            hosts,
            vm,
            explain,
            json,
        } => place::cmd_place(&hosts, &vm, explain, json).map_err(|(code, msg)| Fail(code, msg)),
        Cmd::Demo(args) => livemig_suite::demo::run(&args).map_err(runtime),
        Cmd::Console { path, from_start } => console_client::run(path, from_start).map_err(runtime),
        Cmd::Upgrade { api_socket, binary } => upgrade::cmd_upgrade(&api_socket, &binary),
        Cmd::GuestImage { out } => livemig_testguest::image()
            .map_err(|e| runtime(format!("building the test guest: {e}")))
            .and_then(|img| {
                std::fs::write(&out, img)
                    .map_err(|e| runtime(format!("writing {}: {e}", out.display())))
            }),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(Fail(code, msg)) => {
            eprintln!("refvmm: error: {msg}");
            ExitCode::from(code)
        }
    }
}
