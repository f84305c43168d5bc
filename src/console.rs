//! The one writer of messages for people (standard error). On a terminal, a run's live progress
//! display sits below the messages: every message goes through [`say`], which takes the display
//! off the screen, prints the message and lets the next frame draw it again below, so the two
//! never overwrite each other. Elsewhere (a pipe, a file, `TERM=dumb`) messages are plain lines.

use std::io::{IsTerminal, Write};
use std::sync::Mutex;

/// Lines of the live display on screen now (0: none).
static LIVE_LINES: Mutex<usize> = Mutex::new(0);

/// Prints one message line (see the [`say!`](crate::say) macro).
pub fn say(message: std::fmt::Arguments<'_>) {
    let mut live = LIVE_LINES.lock().unwrap_or_else(|e| e.into_inner());
    let mut text = String::new();
    erase_into(&mut text, *live);
    *live = 0;
    // Formatted whole first: stderr is unbuffered, and writing the arguments straight to it
    // cost a system call for every piece of every line (900 for a run's end summary).
    let _ = std::fmt::Write::write_fmt(&mut text, format_args!("{message}\n"));
    let _ = std::io::stderr().lock().write_all(text.as_bytes());
}

/// Draws the live display (in place of the one on screen).
pub fn draw_live(lines: &[String]) {
    let mut live = LIVE_LINES.lock().unwrap_or_else(|e| e.into_inner());
    let mut err = std::io::stderr().lock();
    let mut frame = String::new();
    erase_into(&mut frame, *live);
    for line in lines {
        frame.push_str(line);
        frame.push('\n');
    }
    let _ = err.write_all(frame.as_bytes());
    let _ = err.flush();
    *live = lines.len();
}

/// Leaves the live display on screen as it is now; later messages go below it.
pub fn end_live() {
    *LIVE_LINES.lock().unwrap_or_else(|e| e.into_inner()) = 0;
}

/// Whether standard error is a terminal that takes cursor movements (not `TERM=dumb`).
pub fn is_live_terminal() -> bool {
    std::io::stderr().is_terminal() && std::env::var("TERM").map_or(true, |t| t != "dumb")
}

/// The terminal's width in columns (80 when it does not say).
pub fn terminal_width() -> usize {
    #[cfg(unix)]
    {
        // SAFETY: TIOCGWINSZ only fills in the winsize it is given.
        let mut size: libc::winsize = unsafe { std::mem::zeroed() };
        let ok = unsafe { libc::ioctl(libc::STDERR_FILENO, libc::TIOCGWINSZ, &mut size) } == 0;
        if ok && size.ws_col > 0 {
            return usize::from(size.ws_col);
        }
    }
    80
}

/// Moves to the start of the display's first line and clears to the end of the screen.
fn erase_into(out: &mut String, lines: usize) {
    if lines > 0 {
        out.push_str(&format!("\x1b[{lines}F\x1b[J"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn erasing_moves_up_over_the_display_and_clears_below() {
        let mut codes = String::new();
        erase_into(&mut codes, 0);
        assert_eq!(codes, "");
        erase_into(&mut codes, 3);
        assert_eq!(codes, "\x1b[3F\x1b[J");
    }
}
