//! Choosing the backing file's engine at open: [`EngineChoice`] (`serve --engine`, the
//! config file's `engine` key, [`OpenOptions::engine`](super::OpenOptions)) and the
//! decision between [`StdFileEngine`](super::engine::StdFileEngine) (threads doing
//! pread/pwrite) and [`UringFileEngine`]. `uring` probes once per process that the kernel
//! lets it set up a ring with the opcodes the engine needs, and fails with the reason
//! when it does not. `auto` takes threads: on a buffered backing file io_uring hands
//! every write to its kernel worker threads, and docs/performance.md ("io_uring engine")
//! measured it at 0.61–0.69× the threads engine for 4k random writes with over twice the
//! server CPU per byte; `auto` will take io_uring where it is measured faster.

use std::fmt;
use std::fs::File;
use std::path::Path;
use std::str::FromStr;
use std::sync::{Arc, OnceLock};

use super::engine::{engine_for, FileEngine};
use super::engine_uring::{self, UringFileEngine};

/// Which engine a volume's backing file is driven by.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum EngineChoice {
    /// The engine measured fastest for the backing file: threads today (see the
    /// module's documentation).
    #[default]
    Auto,
    /// pread/pwrite on the server's threads.
    Threads,
    /// io_uring; opening fails when the kernel does not allow it.
    Uring,
}

impl EngineChoice {
    /// The values `--engine` and the config file's `engine` take.
    pub const NAMES: [&'static str; 3] = ["auto", "threads", "uring"];
}

impl fmt::Display for EngineChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            EngineChoice::Auto => "auto",
            EngineChoice::Threads => "threads",
            EngineChoice::Uring => "uring",
        })
    }
}

impl FromStr for EngineChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(EngineChoice::Auto),
            "threads" => Ok(EngineChoice::Threads),
            "uring" | "io_uring" => Ok(EngineChoice::Uring),
            other => Err(format!(
                "unknown engine {other:?}: expected one of auto, threads, uring"
            )),
        }
    }
}

/// The engine a volume gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EngineKind {
    Threads,
    Uring,
}

/// The engine for `choice`, given the io_uring probe (consulted only for `uring`):
/// `uring` without a working io_uring is an error saying why.
pub(crate) fn decide(
    choice: EngineChoice,
    probe: impl FnOnce() -> Result<(), String>,
) -> Result<EngineKind, String> {
    match choice {
        EngineChoice::Threads | EngineChoice::Auto => Ok(EngineKind::Threads),
        EngineChoice::Uring => probe().map(|()| EngineKind::Uring).map_err(|why| {
            format!("the io_uring engine is unavailable ({why}); use --engine threads or auto")
        }),
    }
}

/// The io_uring probe's outcome, computed once per process.
pub(crate) fn cached_probe() -> Result<(), String> {
    static PROBE: OnceLock<Result<(), String>> = OnceLock::new();
    PROBE.get_or_init(engine_uring::probe).clone()
}

/// The log line of a decision for the volume at `path`.
pub(crate) fn describe(kind: EngineKind, choice: EngineChoice, path: &str) -> String {
    let name = match kind {
        EngineKind::Threads => "threads (pread/pwrite)",
        EngineKind::Uring => "io_uring",
    };
    format!("{path}: file engine {name} (--engine {choice})")
}

/// The engine over `file` for `choice`, logging which one was chosen.
pub(crate) fn open_engine(
    file: Arc<File>,
    choice: EngineChoice,
    path: &Path,
) -> Result<Box<dyn FileEngine>, String> {
    open_engine_with(file, choice, path, cached_probe)
}

/// [`open_engine`] with the io_uring probe given (tests force its failure).
pub(crate) fn open_engine_with(
    file: Arc<File>,
    choice: EngineChoice,
    path: &Path,
    probe: impl FnOnce() -> Result<(), String>,
) -> Result<Box<dyn FileEngine>, String> {
    let kind = decide(choice, probe)?;
    // The choice is in `serve`'s "export opened" line; other commands stay quiet.
    tracing::debug!("{}", describe(kind, choice, &path.display().to_string()));
    Ok(match kind {
        EngineKind::Threads => engine_for(file, path),
        EngineKind::Uring => Box::new(UringFileEngine::new(file)),
    })
}
