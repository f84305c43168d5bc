//! Exit codes, numbered as Cumulus ETL numbers them so site scripts keep working.

use std::fmt;

/// Process exit codes (Cumulus ETL's `errors.py` numbering).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitCode {
    Success = 0,
    Failure = 1,
    Usage = 2,
    CtakesMissing = 14,
    TaskUnknown = 17,
    CnlpMissing = 18,
    TaskFailed = 19,
    ArgsConflict = 22,
    ArgsInvalid = 23,
    FolderNotEmpty = 26,
    CompletionArgMissing = 34,
    TaskHelp = 35,
    MissingRequestedResources = 36,
    WrongPhiFolder = 41,
    TaskMismatch = 43,
    FolderDoesNotExist = 54,
    FeatureRemoved = 59,
}

/// An error that ends the run with a specific exit code and a message for the user.
#[derive(Debug)]
pub struct Fatal {
    pub code: ExitCode,
    pub message: String,
}

impl Fatal {
    /// A fatal error with its exit code.
    pub fn new(code: ExitCode, message: impl Into<String>) -> Fatal {
        Fatal {
            code,
            message: message.into(),
        }
    }
}

impl fmt::Display for Fatal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Fatal {}

impl From<anyhow::Error> for Fatal {
    fn from(e: anyhow::Error) -> Fatal {
        match e.downcast::<Fatal>() {
            Ok(f) => f,
            Err(e) => Fatal::new(ExitCode::Failure, format!("{e:#}")),
        }
    }
}
