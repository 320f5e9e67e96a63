//! Errors: bad input, and "no host can take this VM".

use std::fmt;
use std::path::PathBuf;

use crate::model::Excluded;

/// A semantic problem with otherwise well-formed input, naming the object
/// and the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{subject}: field `{field}`: {problem}")]
pub struct ValidationError {
    /// What is wrong, e.g. ``host `alpha` (hosts[0])``, `vm` or `config`.
    pub subject: String,
    /// The offending field, e.g. `memory_free_mib`.
    pub field: String,
    /// What is wrong with it.
    pub problem: String,
}

/// Why a placement request failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PlacementError {
    /// The host list is empty.
    #[error("no destination for {vm}: the host list is empty")]
    NoHosts {
        /// The VM, as ``VM `name` `` or `the unnamed VM`.
        vm: String,
    },
    /// Every host failed at least one filter. `excluded` lists every host,
    /// in name order, with all the filters it failed.
    #[error("no eligible destination for {vm}: all {} hosts excluded: {}", excluded.len(), ExclusionList(excluded))]
    NoEligibleHost {
        /// The VM, as ``VM `name` `` or `the unnamed VM`.
        vm: String,
        /// Every host, with why it was excluded.
        excluded: Vec<Excluded>,
    },
    /// The hosts, the VM or the configuration are inconsistent.
    #[error(transparent)]
    Invalid(#[from] ValidationError),
}

/// Formats exclusions as `name (reason; reason), name (reason)`.
struct ExclusionList<'a>(&'a [Excluded]);

impl fmt::Display for ExclusionList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{} (", e.name)?;
            for (j, r) in e.reasons.iter().enumerate() {
                if j > 0 {
                    f.write_str("; ")?;
                }
                write!(f, "{r}")?;
            }
            f.write_str(")")?;
        }
        Ok(())
    }
}

/// Why a hosts or VM file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    /// The file could not be read.
    #[error("{}: cannot read: {source}", file.display())]
    Read {
        /// The file.
        file: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The text is not valid JSON for the expected shape: a syntax error, a
    /// missing field, a wrong type (e.g. a negative number where an unsigned
    /// one is expected) or an unknown key.
    #[error("{origin}: {}{message}", FieldPrefix(path, host.as_deref()))]
    Parse {
        /// Where the text came from (a file name, or a description).
        origin: String,
        /// The path of the offending field, e.g. `hosts[2].memory_free_mib`
        /// or `vm.cpus`; empty when the problem is with the document as a
        /// whole (e.g. a JSON syntax error).
        path: String,
        /// The `name` of the host the field belongs to, when it has one.
        host: Option<String>,
        /// serde_json's message, with line and column.
        message: String,
    },
    /// The values parse but are inconsistent (e.g. free memory above total).
    #[error("{origin}: {source}")]
    Invalid {
        /// Where the text came from.
        origin: String,
        /// The problem.
        source: ValidationError,
    },
}

struct FieldPrefix<'a>(&'a str, Option<&'a str>);

impl fmt::Display for FieldPrefix<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return Ok(());
        }
        write!(f, "field `{}`", self.0)?;
        if let Some(h) = self.1 {
            write!(f, " (host `{h}`)")?;
        }
        f.write_str(": ")
    }
}

impl InputError {
    /// The field path this error is about, if any (for `Parse`: the path;
    /// for `Invalid`: the field name).
    pub fn field(&self) -> Option<&str> {
        match self {
            InputError::Read { .. } => None,
            InputError::Parse { path, .. } if path.is_empty() => None,
            InputError::Parse { path, .. } => Some(path),
            InputError::Invalid { source, .. } => Some(&source.field),
        }
    }
}
