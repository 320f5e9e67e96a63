//! [`Migration`]: the one entry point of the source side.

use crate::error::{MigrationError, Phase};
use crate::guard::MigrationGuard;
use crate::policy::MigrationConfig;
use crate::report::{Progress, Report};
use crate::transport::{StreamOpener, Transport};
use crate::vm::SourceVm;

use super::cancel::CancelToken;

/// A progress callback.
type Callback<'a> = Box<dyn FnMut(&Progress) + 'a>;

/// One outgoing migration of a source VM: the settings, then [`run`].
///
/// ```text
/// Migration::new(&vm)              // the VM (its own threads keep running the guest)
///     .config(cfg)                 // MigrationConfig (default: MigrationConfig::default())
///     .streams(4, opener)          // optional: 4 page streams, opened through `opener`
///     .cancel(token.clone())       // optional: cancel from another thread
///     .progress(|p| log(p))        // optional: events (see below)
///     .guard(&guard)               // optional: under the VM's MigrationGuard
///     .postcopy(fault, pc)         // optional: offer post-copy (or .local(): same-host hand-over)
///     .run(transport)?             // blocks until done; Report
/// ```
///
/// [`run`] checks every setting before it touches the VM or the
/// transport: a bad setting fails with [`crate::ErrorKind::Config`] naming
/// the field. More than one page stream needs an opener, so the only way
/// to ask for several is [`Migration::streams`] with one; a
/// [`MigrationConfig::streams`] above 1 given through
/// [`Migration::config`] without an opener is refused there, before
/// anything else happens.
///
/// On success the guest runs on the destination and the source VM is left
/// paused (the caller tears it down). On any error before the switchover
/// the source VM runs again (unless its operator had paused it) and dirty
/// logging is off; the error names the phase. If the error
/// [`MigrationError::is_ambiguous`], the destination may be running the
/// guest: the source stays paused.
///
/// # Progress and the blackout
///
/// The callback runs on the thread that called [`run`], between the
/// engine's steps (never concurrently with itself). Events, in order:
/// [`Progress::Accepted`] once after the handshake, one
/// [`Progress::Round`] per pre-copy round, [`Progress::Paused`] and, on
/// success, [`Progress::Completed`].
///
/// Exactly one event arrives while the guest is paused (runs nowhere):
/// [`Progress::Paused`], once, after the vCPUs were paused, the state
/// saved and the final dirty sync done, and before the last pages are
/// sent. The time the callback takes then adds to the downtime and counts
/// against [`MigrationConfig::max_pause`]: keep it short (store the
/// numbers, do not do I/O). [`Progress::Completed`] arrives after the
/// destination confirmed that the guest runs there; every other event
/// arrives while the guest runs on the source.
///
/// [`run`]: Migration::run
#[cfg_attr(feature = "test-util", doc = include_str!("../doc/migrate.md"))]
#[must_use = "a Migration does nothing until run"]
pub struct Migration<'a, V: SourceVm + ?Sized> {
    vm: &'a V,
    config: MigrationConfig,
    streams: Option<(u32, Box<dyn StreamOpener + 'a>)>,
    cancel: CancelToken,
    progress: Option<Callback<'a>>,
    guard: Option<&'a MigrationGuard>,
    postcopy: Option<super::postcopy::Plan>,
    local: bool,
}

impl<'a, V: SourceVm + ?Sized> Migration<'a, V> {
    /// A migration of `vm` with the default settings, one stream, no
    /// cancel token, no progress callback and no guard.
    pub fn new(vm: &'a V) -> Self {
        Migration {
            vm,
            config: MigrationConfig::default(),
            streams: None,
            cancel: CancelToken::new(),
            progress: None,
            guard: None,
            postcopy: None,
            local: false,
        }
    }

    /// The settings. [`MigrationConfig::streams`] is overridden by
    /// [`Migration::streams`] when that is set too (in either order).
    pub fn config(mut self, config: MigrationConfig) -> Self {
        self.config = config;
        self
    }

    /// Asks for `n` page streams (1..=[`crate::protocol::MAX_STREAMS`]);
    /// the extra ones are opened through `opener` (a
    /// `transport::Dialer` (feature `net`), `livemig_tls::TlsDialer`, or your
    /// own), the control exchange stays on the transport given to
    /// [`Migration::run`]. The destination may grant fewer (one when it
    /// runs without an acceptor); with one, `opener` is not used.
    pub fn streams(mut self, n: u32, opener: impl StreamOpener + 'a) -> Self {
        self.streams = Some((n, Box::new(opener)));
        self
    }

    /// Cancels the migration when `token` (or a clone of it) is cancelled
    /// from another thread. See [`CancelToken`].
    pub fn cancel(mut self, token: CancelToken) -> Self {
        self.cancel = token;
        self
    }

    /// Calls `progress` with each event (see "Progress and the blackout"
    /// in the type's documentation).
    pub fn progress(mut self, progress: impl FnMut(&Progress) + 'a) -> Self {
        self.progress = Some(Box::new(progress));
        self
    }

    /// Runs the migration under `guard` (the VM's one
    /// [`MigrationGuard`]): refused with [`crate::ErrorKind::Guard`] (before
    /// anything else) unless the guard is
    /// [`crate::GuardState::Idle`]; [`crate::GuardState::Migrating`] while it
    /// runs; afterwards `Migrated`, `Ambiguous` or `Idle` again.
    pub fn guard(mut self, guard: &'a MigrationGuard) -> Self {
        self.guard = Some(guard);
        self
    }

    /// Offers post-copy (`docs/postcopy.md`): `fault` is a second
    /// connection to the same destination, for page requests and their
    /// answers only; `config` says when to switch. A destination that does
    /// not grant post-copy gets a pre-copy migration. Post-copy uses one
    /// page stream (more are refused with a `Config` error).
    pub fn postcopy(
        mut self,
        fault: Box<dyn Transport>,
        config: super::postcopy::PostcopyConfig,
    ) -> Self {
        self.postcopy = Some(super::postcopy::Plan::new(fault, config));
        self
    }

    /// With [`Migration::postcopy`]: when a connection breaks after `Go`,
    /// `reconnect` gives a new (control, fault) pair and the copy
    /// continues (the destination names the pages it still misses); `None`
    /// from it gives up. The source stays paused throughout. Without
    /// `postcopy` this does nothing.
    pub fn postcopy_reconnect(mut self, reconnect: super::postcopy::Reconnect) -> Self {
        if let Some(plan) = self.postcopy.as_mut() {
            plan.set_reconnect(reconnect);
        }
        self
    }

    /// Hands the VM over to a destination on the same host that maps the
    /// same guest memory ([`crate::Reception::local`] there) instead of
    /// copying it: no page is sent and no dirty tracking runs; the source
    /// pauses the VM, saves its state, sends it, and commits with `Go` as
    /// in a migration. See `docs/protocol.md`, "Local hand-over".
    ///
    /// Every region of the VM's memory must be
    /// [`Backing::SharedFile`](crate::memory::Backing::SharedFile) memory
    /// the destination maps too (the embedder passes the descriptors, for
    /// example with `SCM_RIGHTS`); otherwise [`run`](Migration::run)
    /// refuses before anything is sent. A destination that does not grant
    /// the hand-over, runs on another host or maps other memory is refused
    /// in the handshake; any failure before `Go` leaves the VM running
    /// here. [`MigrationConfig::downtime_limit`] is not used (nothing
    /// converges); `max_pause` and `io_timeout` are. Page streams (more
    /// than one) and [`Migration::postcopy`] are refused with a `Config`
    /// error. Progress: [`Progress::Accepted`], [`Progress::Paused`] (with
    /// no page left) and [`Progress::Completed`].
    pub fn local(mut self) -> Self {
        self.local = true;
        self
    }

    /// The settings as [`Migration::run`] will use them, checked: the
    /// streams override applied, every field in range, and an opener for
    /// more than one stream.
    pub fn checked_config(&self) -> Result<MigrationConfig, MigrationError> {
        let mut config = self.config.clone();
        if let Some((n, _)) = &self.streams {
            config.streams = *n;
        }
        let hs = Phase::Handshake;
        config.validate().map_err(|e| MigrationError::new(hs, e))?;
        if config.streams > 1 && self.streams.is_none() {
            return Err(MigrationError::new(hs, super::needs_opener(config.streams)));
        }
        if self.postcopy.is_some() {
            super::postcopy::check_streams(config.streams)?;
        }
        if self.local {
            super::local::check_config(&config)?;
            if self.postcopy.is_some() {
                let e = crate::policy::ConfigError {
                    field: "mode",
                    value: "postcopy and local".into(),
                    rule: "a local hand-over copies no memory: choose one of \
                           Migration::postcopy and Migration::local"
                        .into(),
                };
                return Err(MigrationError::new(hs, e));
            }
        }
        Ok(config)
    }

    /// Migrates the VM over `transport` (the control connection, and the
    /// pages with one stream). Blocks until done.
    pub fn run(mut self, transport: Box<dyn Transport>) -> Result<Report, MigrationError> {
        if let Some(guard) = self.guard {
            guard.enter()?;
            let r = self.checked_run(transport);
            guard.leave(&r);
            return r;
        }
        self.checked_run(transport)
    }

    fn checked_run(&mut self, transport: Box<dyn Transport>) -> Result<Report, MigrationError> {
        let config = self.checked_config()?;
        let opener = self
            .streams
            .as_mut()
            .map(|(_, o)| &mut **o as &mut dyn StreamOpener);
        let mut no_progress = |_: &Progress| {};
        let progress: &mut dyn FnMut(&Progress) = match self.progress.as_mut() {
            Some(p) => &mut **p,
            None => &mut no_progress,
        };
        if self.local {
            return super::local::migrate_local_checked(
                self.vm,
                transport,
                &config,
                &self.cancel,
                progress,
            );
        }
        let postcopy = self.postcopy.take();
        super::migrate_checked(
            self.vm,
            transport,
            opener,
            postcopy,
            &config,
            &self.cancel,
            progress,
        )
    }
}
