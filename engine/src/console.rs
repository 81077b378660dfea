//! Standard output and error for every command, through [`outln!`](crate::outln),
//! [`out!`](crate::out), [`errln!`](crate::errln) and [`err!`](crate::err) instead of `println!`
//! and `eprintln!` (which panic when a write fails: `probex kinds | head -1` died with exit 101,
//! "failed printing to stdout: Broken pipe").
//!
//! A reader that stops reading closes the pipe: printing then stops quietly, and the command's
//! exit code is what its work gave (0 for the listing commands; a run's own outcome for `run`),
//! since the reader chose to stop, nothing failed. Any other failure to write stdout (a full
//! disk under `> file`, `> /dev/full`) is kept, and [`finish`] reports it and makes the exit
//! code 1: output that was asked for was lost. Stderr is best effort: if it cannot be written,
//! there is nowhere left to say so.

use std::fmt;
use std::io::{self, Write};
use std::sync::Mutex;

/// What became of stdout so far.
struct State {
    /// The reader closed the pipe: nothing more is written.
    closed: bool,
    /// The first write error other than a closed pipe.
    error: Option<io::Error>,
}

static STDOUT: Mutex<State> = Mutex::new(State {
    closed: false,
    error: None,
});

/// Writes to stdout; see the module docs. Used by [`out!`](crate::out) and
/// [`outln!`](crate::outln).
#[doc(hidden)]
pub fn write_out(args: fmt::Arguments<'_>, newline: bool) {
    let mut state = match STDOUT.lock() {
        Ok(s) => s,
        Err(poisoned) => poisoned.into_inner(),
    };
    if state.closed || state.error.is_some() {
        return;
    }
    let mut out = io::stdout().lock();
    let result = out.write_fmt(args).and_then(|()| {
        if newline {
            out.write_all(b"\n")
        } else {
            Ok(())
        }
    });
    if let Err(e) = result {
        note_error(&mut state, e);
    }
}

/// Writes to stderr, ignoring failures. Used by [`err!`](crate::err) and
/// [`errln!`](crate::errln).
#[doc(hidden)]
pub fn write_err(args: fmt::Arguments<'_>, newline: bool) {
    let mut err = io::stderr().lock();
    let _ = err.write_fmt(args);
    if newline {
        let _ = err.write_all(b"\n");
    }
}

fn note_error(state: &mut State, e: io::Error) {
    if e.kind() == io::ErrorKind::BrokenPipe {
        state.closed = true;
    } else {
        state.error = Some(e);
    }
}

/// Flushes stdout and returns the exit code the command ends with: `code`, or 1 when stdout
/// could not be written for a reason other than a closed pipe (said on stderr). Call it once,
/// at the end of a command.
pub fn finish(code: i32) -> i32 {
    let mut state = match STDOUT.lock() {
        Ok(s) => s,
        Err(poisoned) => poisoned.into_inner(),
    };
    if !state.closed
        && state.error.is_none()
        && let Err(e) = io::stdout().lock().flush()
    {
        note_error(&mut state, e);
    }
    match state.error.take() {
        Some(e) => {
            write_err(
                format_args!("error: cannot write the output to stdout: {e}"),
                true,
            );
            if code == 0 { 1 } else { code }
        }
        None => code,
    }
}

/// `print!` for commands: a closed stdout ends the output quietly (see [`crate::console`]).
#[macro_export]
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::console::write_out(format_args!($($arg)*), false)
    };
}

/// `println!` for commands: a closed stdout ends the output quietly (see [`crate::console`]).
#[macro_export]
macro_rules! outln {
    () => {
        $crate::console::write_out(format_args!(""), true)
    };
    ($($arg:tt)*) => {
        $crate::console::write_out(format_args!($($arg)*), true)
    };
}

/// `eprint!` that never panics (see [`crate::console`]).
#[macro_export]
macro_rules! err {
    ($($arg:tt)*) => {
        $crate::console::write_err(format_args!($($arg)*), false)
    };
}

/// `eprintln!` that never panics (see [`crate::console`]).
#[macro_export]
macro_rules! errln {
    () => {
        $crate::console::write_err(format_args!(""), true)
    };
    ($($arg:tt)*) => {
        $crate::console::write_err(format_args!($($arg)*), true)
    };
}
