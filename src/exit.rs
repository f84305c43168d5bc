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
    /// A server an init check asks for (an LLM's) is missing.
    ServiceMissing = 33,
    CompletionArgMissing = 34,
    TaskHelp = 35,
    MissingRequestedResources = 36,
    WrongPhiFolder = 41,
    TaskMismatch = 43,
    AthenaTableTooBig = 44,
    AthenaTableNameInvalid = 45,
    AthenaDatabaseMissing = 46,
    MultipleCohortArgs = 47,
    CohortNotFound = 48,
    /// `--batch` for a model its provider cannot batch.
    NlpBatchingUnsupported = 53,
    FolderDoesNotExist = 54,
    FeatureRemoved = 59,
    /// The Athena workgroup's results are not encrypted.
    AthenaNotEncrypted = 60,
    /// An Athena table is still defined by a Glue crawler.
    AthenaTableStillCrawler = 61,
}

impl ExitCode {
    /// Every code.
    const ALL: [ExitCode; 26] = [
        ExitCode::Success,
        ExitCode::Failure,
        ExitCode::Usage,
        ExitCode::CtakesMissing,
        ExitCode::TaskUnknown,
        ExitCode::CnlpMissing,
        ExitCode::TaskFailed,
        ExitCode::ArgsConflict,
        ExitCode::ArgsInvalid,
        ExitCode::FolderNotEmpty,
        ExitCode::ServiceMissing,
        ExitCode::CompletionArgMissing,
        ExitCode::TaskHelp,
        ExitCode::MissingRequestedResources,
        ExitCode::WrongPhiFolder,
        ExitCode::TaskMismatch,
        ExitCode::AthenaTableTooBig,
        ExitCode::AthenaTableNameInvalid,
        ExitCode::AthenaDatabaseMissing,
        ExitCode::MultipleCohortArgs,
        ExitCode::CohortNotFound,
        ExitCode::NlpBatchingUnsupported,
        ExitCode::FolderDoesNotExist,
        ExitCode::FeatureRemoved,
        ExitCode::AthenaNotEncrypted,
        ExitCode::AthenaTableStillCrawler,
    ];

    /// The code with this number (another process's, in a cluster run).
    pub fn from_code(code: i32) -> Option<ExitCode> {
        ExitCode::ALL.into_iter().find(|c| *c as i32 == code)
    }
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
            Err(e) => Fatal::new(ExitCode::Failure, one_line(&e)),
        }
    }
}

/// An error and its causes on one line, each said once. Libraries often end their message with
/// their cause's, so a cause the line already holds is left out, and a message on several
/// lines is joined with "; ". A full disk gets what to do about it.
pub fn one_line(error: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        let text: Vec<&str> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect();
        let text = text.join("; ");
        if text.is_empty() || line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    if line.contains("No space left on device") {
        line.push_str(
            " (the disk is full: free space on it, or point TMPDIR elsewhere, and run again)",
        );
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn causes_that_repeat_are_said_once() {
        let disk = "No space left on device (os error 28)";
        let error = anyhow::anyhow!("{disk}")
            .context(format!(
                "Generic LocalFileSystem error: Unable to copy data to file: {disk}"
            ))
            .context(format!(
                "External: Generic LocalFileSystem error: Unable to copy data to file: {disk}"
            ))
            .context("writing a data file");
        assert_eq!(
            one_line(&error),
            "writing a data file: External: Generic LocalFileSystem error: Unable to copy data \
             to file: No space left on device (os error 28) (the disk is full: free space on it, \
             or point TMPDIR elsewhere, and run again)"
        );
        let race = anyhow::anyhow!("another writer committed version 3 first")
            .context("committing to condition: another writer committed version 3 first");
        assert_eq!(
            one_line(&race),
            "committing to condition: another writer committed version 3 first"
        );
        let lines = anyhow::anyhow!("first\n  second\n").context("reading");
        assert_eq!(one_line(&lines), "reading: first; second");
    }
}
