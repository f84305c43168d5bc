//! Console progress for long runs. On a terminal, a live display redrawn a few times a second:
//! a bar for the input read (with its rate, the time left and the memory in use) and one per
//! table (rows written of rows read, and the rate). Elsewhere (a log file, a pipe), a line per
//! table whose counts moved, every `--progress-interval` seconds.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::console;
use crate::engine::RunShared;
use crate::engine::dataflow::{bytes_read, read_by_table};
use crate::memory::human_bytes;

/// How often the live display is redrawn.
const LIVE_REFRESH: Duration = Duration::from_millis(200);

/// Prints progress until stopped.
pub struct ProgressPrinter {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

/// What the run has done so far, as the display shows it.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub elapsed: Duration,
    pub bytes_read: u64,
    pub total_bytes: u64,
    pub memory_used: u64,
    pub memory_limit: u64,
    /// Rows read and written per table.
    pub tables: BTreeMap<String, (u64, u64)>,
}

impl Snapshot {
    fn of(shared: &RunShared, started: Instant, total_bytes: u64) -> Snapshot {
        let written = shared.report.progress.written.lock().unwrap().clone();
        let tables = read_by_table(shared)
            .into_iter()
            .map(|(table, read)| {
                let w = written.get(&table).copied().unwrap_or(0);
                (table, (read, w))
            })
            .collect();
        Snapshot {
            elapsed: started.elapsed(),
            bytes_read: bytes_read(shared),
            total_bytes,
            memory_used: shared.budget.used(),
            memory_limit: shared.budget.limit(),
            tables,
        }
    }
}

impl ProgressPrinter {
    /// Starts showing progress: live on a terminal, else a report every `interval`;
    /// `total_bytes` is the input size.
    pub fn start(shared: Arc<RunShared>, total_bytes: u64, interval: Duration) -> ProgressPrinter {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let live = console::is_live_terminal();
        let handle = std::thread::spawn(move || {
            let started = Instant::now();
            let mut last: BTreeMap<String, (u64, u64)> = BTreeMap::new();
            let period = if live { LIVE_REFRESH } else { interval };
            let mut next = started + period;
            loop {
                let stopping = flag.load(Ordering::Relaxed);
                if !stopping {
                    std::thread::sleep(Duration::from_millis(50));
                    if Instant::now() < next {
                        continue;
                    }
                    next += period;
                }
                let snapshot = Snapshot::of(&shared, started, total_bytes);
                if live {
                    console::draw_live(&live_frame(&snapshot, console::terminal_width()));
                } else if !stopping {
                    for line in plain_lines(&snapshot, &mut last) {
                        crate::say!("{line}");
                    }
                }
                if stopping {
                    // The last frame stays on screen above the summary.
                    console::end_live();
                    return;
                }
            }
        });
        ProgressPrinter {
            stop,
            handle: Some(handle),
        }
    }

    /// Stops the printer (a live display is drawn one last time and left on screen).
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// The plain report: the input read and memory in use, then each table whose counts moved
/// since `last` (which it updates).
pub fn plain_lines(now: &Snapshot, last: &mut BTreeMap<String, (u64, u64)>) -> Vec<String> {
    let mut lines = vec![format!(
        "  [{:>5.0}s] read {} of {} ({:.0}%), memory in use {}",
        now.elapsed.as_secs_f64(),
        human_bytes(now.bytes_read),
        human_bytes(now.total_bytes),
        100.0 * fraction(now.bytes_read, now.total_bytes),
        human_bytes(now.memory_used)
    )];
    for (table, &(read, written)) in &now.tables {
        if last.get(table) != Some(&(read, written)) {
            lines.push(format!("    {table}: {read} read, {written} written"));
            last.insert(table.clone(), (read, written));
        }
    }
    lines
}

/// The live display, each line at most `width` characters: the input's bar with its rate, the
/// time left and the memory in use below it, then a bar per table that has read rows.
pub fn live_frame(now: &Snapshot, width: usize) -> Vec<String> {
    let seconds = now.elapsed.as_secs_f64().max(0.001);
    let read = fraction(now.bytes_read, now.total_bytes);
    let rate = now.bytes_read as f64 / seconds;
    let left = now.total_bytes.saturating_sub(now.bytes_read);
    let eta = match (left, rate > 0.0) {
        (0, _) => "done".to_string(),
        (_, true) => format!("ETA {}", clock(left as f64 / rate)),
        (_, false) => "ETA -".to_string(),
    };
    let name_width = now.tables.keys().map(String::len).max().unwrap_or(0).max(5);
    // Room for the name and about 30 characters of counts beside the bar.
    let bar_width = width.saturating_sub(name_width + 32).clamp(8, BAR_WIDTH);
    let mut lines = vec![
        format!(
            "{:<name_width$} {} {:>3.0}%  {} of {}",
            "input",
            bar(read, bar_width),
            100.0 * read,
            human_bytes(now.bytes_read),
            human_bytes(now.total_bytes),
        ),
        format!(
            "  {}/s  {eta}  elapsed {}  memory {} of {}",
            human_bytes(rate as u64),
            clock(seconds),
            human_bytes(now.memory_used),
            human_bytes(now.memory_limit),
        ),
    ];
    for (table, &(read, written)) in now.tables.iter().filter(|(_, (r, _))| *r > 0) {
        lines.push(format!(
            "{table:<name_width$} {} {written}/{read} rows  {:.0} rows/s",
            bar(fraction(written, read), bar_width),
            written as f64 / seconds,
        ));
    }
    lines.iter().map(|line| fit(line, width)).collect()
}

const BAR_WIDTH: usize = 24;

/// A bar `width` cells wide, `done` (0 to 1) of it filled.
fn bar(done: f64, width: usize) -> String {
    let filled = ((done.clamp(0.0, 1.0) * width as f64).round() as usize).min(width);
    format!("{}{}", "█".repeat(filled), "░".repeat(width - filled))
}

fn fraction(part: u64, whole: u64) -> f64 {
    match whole {
        0 => 1.0,
        _ => (part as f64 / whole as f64).min(1.0),
    }
}

/// Seconds as `1h02m03s`, `2m03s` or `3s`.
fn clock(seconds: f64) -> String {
    let s = seconds.round() as u64;
    match (s / 3600, s / 60 % 60, s % 60) {
        (0, 0, s) => format!("{s}s"),
        (0, m, s) => format!("{m}m{s:02}s"),
        (h, m, s) => format!("{h}h{m:02}m{s:02}s"),
    }
}

/// The line cut to `width` characters (a line that wrapped would throw off the redraw).
fn fit(line: &str, width: usize) -> String {
    line.chars().take(width.max(1)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot() -> Snapshot {
        Snapshot {
            elapsed: Duration::from_secs(10),
            bytes_read: 250 << 20,
            total_bytes: 1000 << 20,
            memory_used: 100 << 20,
            memory_limit: 352 << 20,
            tables: BTreeMap::from([
                ("observation".to_string(), (5000, 2500)),
                ("patient".to_string(), (0, 0)),
            ]),
        }
    }

    #[test]
    fn the_live_display_shows_input_rate_eta_memory_and_a_bar_per_table_that_has_rows() {
        let lines = live_frame(&snapshot(), 200);
        assert_eq!(lines.len(), 3, "{lines:#?}");
        assert_eq!(
            lines[0],
            format!(
                "input       {}{}  25%  250.0 MiB of 1000.0 MiB",
                "█".repeat(6),
                "░".repeat(18)
            )
        );
        assert_eq!(
            lines[1],
            "  25.0 MiB/s  ETA 30s  elapsed 10s  memory 100.0 MiB of 352.0 MiB"
        );
        assert_eq!(
            lines[2],
            format!(
                "observation {}{} 2500/5000 rows  250 rows/s",
                "█".repeat(12),
                "░".repeat(12)
            )
        );
    }

    #[test]
    fn live_lines_fit_the_terminal_and_the_end_says_done() {
        let mut done = snapshot();
        done.bytes_read = done.total_bytes;
        for width in [40, 80] {
            let lines = live_frame(&done, width);
            assert!(
                lines.iter().all(|l| l.chars().count() <= width),
                "{lines:#?}"
            );
        }
        // On 80 columns, the longest table names still leave the counts whole.
        done.tables
            .insert("medicationrequest_longer".into(), (1740, 1740));
        let lines = live_frame(&done, 80);
        assert!(
            lines[0].ends_with("100%  1000.0 MiB of 1000.0 MiB"),
            "{lines:#?}"
        );
        assert!(lines[1].contains("done"), "{lines:#?}");
        assert!(
            lines[1].ends_with("memory 100.0 MiB of 352.0 MiB"),
            "{lines:#?}"
        );
        assert!(
            lines
                .iter()
                .any(|l| l.ends_with("1740/1740 rows  174 rows/s")),
            "{lines:#?}"
        );
    }

    #[test]
    fn clocks_and_bars_read_as_people_expect() {
        assert_eq!(clock(3.4), "3s");
        assert_eq!(clock(123.0), "2m03s");
        assert_eq!(clock(3723.0), "1h02m03s");
        assert_eq!(bar(0.0, 4), "░░░░");
        assert_eq!(bar(0.5, 4), "██░░");
        assert_eq!(bar(2.0, 4), "████");
    }

    #[test]
    fn plain_reports_name_only_tables_whose_counts_moved() {
        let mut last = BTreeMap::new();
        let first = plain_lines(&snapshot(), &mut last);
        assert_eq!(first.len(), 3, "{first:#?}");
        assert!(first[0].contains("read 250.0 MiB of 1000.0 MiB (25%), memory in use 100.0 MiB"));
        assert_eq!(first[1], "    observation: 5000 read, 2500 written");
        let mut later = snapshot();
        later.tables.get_mut("observation").unwrap().1 = 5000;
        let second = plain_lines(&later, &mut last);
        assert_eq!(second.len(), 2, "{second:#?}");
        assert_eq!(second[1], "    observation: 5000 read, 5000 written");
    }
}
