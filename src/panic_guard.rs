//! Panics turned into errors that say what was in hand. A bug met by one input line must cost
//! that line, not the run; one met by a writer must end the run at once with the table's name,
//! never leave the other threads waiting forever. `catch` (and `Guarded` for futures) runs code
//! so that a panic comes back as an `InternalError`, and the panic hook installed by
//! `install_hook` keeps such caught panics off the console: the catcher reports them, once,
//! with the file and line or the table. Panics nobody catches are printed on one line.
//!
//! Messages carry the code location and the panic's own text, never input data: our panics
//! are assertions about our own state.
//!
//! Tests reach the catch sites through `inject`: `CUMULUS_ETL_TEST_PANIC=SITE:NAME[:LINE]`
//! makes the named site panic (see `Site`). It is read once; unset, `inject` is one load.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::panic::{AssertUnwindSafe, PanicHookInfo};
use std::pin::Pin;
use std::sync::{Once, OnceLock};
use std::task::{Context, Poll};

/// A panic, caught: where it happened and what it said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InternalError {
    pub location: String,
    pub message: String,
}

impl std::fmt::Display for InternalError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "internal error at {}: {}", self.location, self.message)
    }
}

impl std::error::Error for InternalError {}

thread_local! {
    /// How many `catch` calls are running on this thread.
    static CATCHING: Cell<u32> = const { Cell::new(0) };
    /// The last panic on this thread, as the hook saw it.
    static CAUGHT: RefCell<Option<InternalError>> = const { RefCell::new(None) };
}

impl InternalError {
    fn from_hook(info: &PanicHookInfo<'_>) -> InternalError {
        let location = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_else(|| "an unknown place".into());
        InternalError {
            location,
            message: payload_text(info.payload()),
        }
    }
}

fn payload_text(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic without a message".into()
    }
}

/// Installs the hook that keeps caught panics quiet and prints the others on one line.
/// Idempotent.
pub fn install_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        std::panic::set_hook(Box::new(|info| {
            let error = InternalError::from_hook(info);
            let thread = std::thread::current();
            let name = thread.name().unwrap_or("a worker");
            if let Some(lost) = lost_connection(name) {
                let message = format!(
                    "the connection to process {lost} of the cluster run was lost ({}): it \
                     stopped, or the network between them failed",
                    error.message
                );
                CONNECTION_LOST.store(true, std::sync::atomic::Ordering::Release);
                for watcher in CONNECTION_WATCHERS
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .iter()
                {
                    watcher(&message);
                }
            } else if CATCHING.with(Cell::get) == 0
                && !CONNECTION_LOST.load(std::sync::atomic::Ordering::Acquire)
            {
                // Once a connection is lost, timely's other threads panic in turn (poisoned
                // queues): consequences, not news.
                eprintln!("error: {error} (in thread {name})");
            }
            CAUGHT.with(|c| *c.borrow_mut() = Some(error));
        }));
    });
}

/// Told when a thread of timely's network layer ends in a panic: its connection to another
/// process of a cluster run broke (timely's threads panic on a closed or failed socket).
type ConnectionWatcher = Box<dyn Fn(&str) + Send + Sync>;

static CONNECTION_WATCHERS: std::sync::Mutex<Vec<ConnectionWatcher>> =
    std::sync::Mutex::new(Vec::new());

/// A connection to another process was lost.
static CONNECTION_LOST: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Calls `watcher` with a message when a connection to another process of a cluster run is
/// lost, so the run can stop instead of waiting for a process that is gone.
pub fn on_connection_lost(watcher: impl Fn(&str) + Send + Sync + 'static) {
    CONNECTION_WATCHERS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(Box::new(watcher));
}

/// The process whose connection a timely network thread served (`timely:recv-N`,
/// `timely:send-N`), if this is one.
fn lost_connection(thread: &str) -> Option<&str> {
    thread
        .strip_prefix("timely:recv-")
        .or_else(|| thread.strip_prefix("timely:send-"))
}

/// Runs `f`; a panic in it comes back as an `InternalError` (the hook, if installed, records
/// its location and message; without it the message alone is known).
pub fn catch<R>(f: impl FnOnce() -> R) -> Result<R, InternalError> {
    CATCHING.with(|c| c.set(c.get() + 1));
    let result = std::panic::catch_unwind(AssertUnwindSafe(f));
    CATCHING.with(|c| c.set(c.get() - 1));
    result.map_err(|payload| {
        CAUGHT
            .with(|c| c.borrow_mut().take())
            .unwrap_or_else(|| InternalError {
                location: "an unknown place".into(),
                message: payload_text(payload.as_ref()),
            })
    })
}

/// The panic this thread is unwinding from, if it is (for code that runs in `Drop` and must
/// say why its work was not done).
pub fn unwinding() -> Option<InternalError> {
    if !std::thread::panicking() {
        return None;
    }
    CAUGHT.try_with(|c| c.borrow().clone()).ok().flatten()
}

/// A future whose panics, in any poll, end it with an `InternalError`.
pub struct Guarded<F> {
    inner: Pin<Box<F>>,
}

impl<F: Future> Guarded<F> {
    pub fn new(inner: F) -> Guarded<F> {
        Guarded {
            inner: Box::pin(inner),
        }
    }
}

impl<F: Future> Future for Guarded<F> {
    type Output = Result<F::Output, InternalError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let inner = self.inner.as_mut();
        match catch(move || inner.poll(cx)) {
            Ok(Poll::Ready(v)) => Poll::Ready(Ok(v)),
            Ok(Poll::Pending) => Poll::Pending,
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}

/// Where a test may ask for a panic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Site {
    /// De-identifying one input line (NAME: the input file's name, LINE: its line number).
    Line,
    /// The NLP engine on one note, on the worker (NAME: the input file's name, LINE: the
    /// note's line).
    Note,
    /// A source, outside the per-line work (NAME: the input file's name).
    Source,
    /// A table writer on a worker thread (NAME: the table).
    Writer,
    /// A Delta table's committer (NAME: the table).
    Committer,
    /// A worker thread itself, outside every operator (NAME: the worker's index).
    Worker,
}

impl Site {
    fn parse(name: &str) -> Option<Site> {
        Some(match name {
            "line" => Site::Line,
            "note" => Site::Note,
            "source" => Site::Source,
            "writer" => Site::Writer,
            "committer" => Site::Committer,
            "worker" => Site::Worker,
            _ => return None,
        })
    }
}

/// The panic a test asked for.
#[derive(Debug, PartialEq, Eq)]
struct Injection {
    site: Site,
    name: String,
    line: Option<u64>,
}

impl Injection {
    fn parse(spec: &str) -> Option<Injection> {
        let mut parts = spec.splitn(3, ':');
        let site = Site::parse(parts.next()?)?;
        let name = parts.next()?.to_string();
        let line = match parts.next() {
            Some(n) => Some(n.parse().ok()?),
            None => None,
        };
        Some(Injection { site, name, line })
    }
}

fn injection() -> Option<&'static Injection> {
    static INJECTION: OnceLock<Option<Injection>> = OnceLock::new();
    INJECTION
        .get_or_init(|| {
            let spec = std::env::var("CUMULUS_ETL_TEST_PANIC").ok()?;
            let parsed = Injection::parse(&spec);
            if parsed.is_none() {
                crate::say!("warning: CUMULUS_ETL_TEST_PANIC={spec} is not SITE:NAME[:LINE]");
            }
            parsed
        })
        .as_ref()
}

/// Panics if a test asked for a panic at this site, for this name (and line). `name` may be a
/// file's path: its file name is what matches (worked out only when a panic is asked for).
/// `line` too is worked out only then: a bundle's line numbers may not be known yet.
pub fn inject(site: Site, name: &str, line: impl FnOnce() -> u64) {
    if let Some(i) = injection()
        && i.site == site
        && (i.name == name
            || std::path::Path::new(name)
                .file_name()
                .is_some_and(|n| n == i.name.as_str()))
        && i.line.is_none_or(|l| l == line())
    {
        panic!("injected for a test at {site:?} {name}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_caught_panic_names_where_it_happened() {
        install_hook();
        let caught = catch(|| -> u32 { panic!("the state was {}", "odd") }).unwrap_err();
        assert!(caught.location.contains("panic_guard.rs"), "{caught}");
        assert_eq!(caught.message, "the state was odd");
        assert_eq!(catch(|| 7).unwrap(), 7);
        // Nested catches each get their own panic.
        let outer = catch(|| {
            let inner = catch(|| panic!("inner")).unwrap_err();
            assert_eq!(inner.message, "inner");
            panic!("outer")
        });
        assert_eq!(outer.unwrap_err().message, "outer");
    }

    #[test]
    fn a_guarded_future_ends_with_the_panic() {
        install_hook();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let ok = runtime.block_on(Guarded::new(async { 3 }));
        assert_eq!(ok, Ok(3));
        let failed = runtime.block_on(Guarded::new(async {
            tokio::task::yield_now().await;
            if ok.is_ok() {
                panic!("after a yield");
            }
        }));
        assert_eq!(failed.unwrap_err().message, "after a yield");
    }

    #[test]
    fn injections_parse() {
        assert_eq!(
            Injection::parse("line:Condition.ndjson:3"),
            Some(Injection {
                site: Site::Line,
                name: "Condition.ndjson".into(),
                line: Some(3)
            })
        );
        assert_eq!(
            Injection::parse("writer:condition").map(|i| (i.site, i.line)),
            Some((Site::Writer, None))
        );
        assert_eq!(Injection::parse("nowhere:x"), None);
        assert_eq!(Injection::parse("line:x:y"), None);
    }
}
