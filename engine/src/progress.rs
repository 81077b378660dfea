//! Showing a run as it goes: bars on a terminal, plain lines otherwise (CI logs).

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::stage::ProgressSink;

/// How progress is shown.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ProgressMode {
    /// Bars when stderr is a terminal, plain lines otherwise.
    #[default]
    Auto,
    /// Plain lines.
    Plain,
    /// Nothing but errors.
    Quiet,
}

/// Draws the run: one overall bar and one line per running node.
pub struct Reporter {
    mode: ProgressMode,
    bars: Option<(MultiProgress, ProgressBar)>,
    running: Mutex<HashMap<String, (ProgressBar, Instant)>>,
    last_line: Mutex<HashMap<String, Instant>>,
}

impl Reporter {
    /// A reporter for a run of `total` nodes.
    pub fn new(mode: ProgressMode, total: u64) -> Self {
        let mode = match mode {
            ProgressMode::Auto if std::io::stderr().is_terminal() => ProgressMode::Auto,
            ProgressMode::Auto => ProgressMode::Plain,
            m => m,
        };
        let bars = (mode == ProgressMode::Auto).then(|| {
            let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
            let overall = multi.add(ProgressBar::new(total));
            overall.set_style(
                ProgressStyle::with_template(
                    "{elapsed_precise} [{bar:30}] {pos}/{len} nodes {msg}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            (multi, overall)
        });
        Reporter {
            mode,
            bars,
            running: Mutex::new(HashMap::new()),
            last_line: Mutex::new(HashMap::new()),
        }
    }

    /// The overall number of nodes changed (a pending fan-out was expanded).
    pub fn set_total(&self, total: u64) {
        if let Some((_, overall)) = &self.bars {
            overall.set_length(total);
        }
    }

    /// A node started running.
    pub fn started(&self, node: &str) {
        match (&self.bars, self.mode) {
            (Some((multi, _)), _) => {
                let bar = multi.add(ProgressBar::new_spinner());
                bar.set_style(
                    ProgressStyle::with_template("  {spinner} {prefix} {wide_msg} {elapsed}")
                        .unwrap_or_else(|_| ProgressStyle::default_spinner()),
                );
                bar.set_prefix(node.to_string());
                bar.enable_steady_tick(Duration::from_millis(200));
                if let Ok(mut r) = self.running.lock() {
                    r.insert(node.to_string(), (bar, Instant::now()));
                }
            }
            (None, ProgressMode::Plain) => crate::errln!("run    {node}"),
            _ => {}
        }
    }

    /// A node finished: `what` is `done`, `cached`, `FAILED`, ...
    pub fn finished(&self, node: &str, what: &str, seconds: f64) {
        if let Some((multi, overall)) = &self.bars {
            if let Ok(mut r) = self.running.lock()
                && let Some((bar, _)) = r.remove(node)
            {
                bar.finish_and_clear();
                multi.remove(&bar);
            }
            overall.inc(1);
            if what != "cached" {
                let _ = multi.println(format!("{what:>6} {node} ({seconds:.1}s)"));
            }
        } else if self.mode == ProgressMode::Plain {
            if what == "cached" {
                crate::errln!("cached {node}");
            } else {
                crate::errln!("{what:>6} {node} ({seconds:.1}s)");
            }
        }
    }

    /// A started node goes back to wait (its inputs must be computed again): its line goes,
    /// the overall count stays.
    pub fn requeued(&self, node: &str) {
        if let Some((multi, _)) = &self.bars
            && let Ok(mut r) = self.running.lock()
            && let Some((bar, _)) = r.remove(node)
        {
            bar.finish_and_clear();
            multi.remove(&bar);
        }
    }

    /// Prints a line above the bars.
    pub fn println(&self, line: &str) {
        match &self.bars {
            Some((multi, _)) => {
                let _ = multi.println(line);
            }
            None if self.mode != ProgressMode::Quiet => {
                let _ = writeln!(std::io::stderr(), "{line}");
            }
            None => {}
        }
    }

    /// Removes the bars.
    pub fn finish(&self) {
        if let Some((multi, overall)) = &self.bars {
            overall.finish_and_clear();
            let _ = multi.clear();
        }
    }
}

impl ProgressSink for Reporter {
    fn note(&self, node: &str, message: &str) {
        self.println(&format!("  note {node}: {message}"));
    }

    fn progress(&self, node: &str, done: u64, total: u64, message: &str) {
        if self.bars.is_some() {
            if let Ok(r) = self.running.lock()
                && let Some((bar, _)) = r.get(node)
            {
                bar.set_message(format!("{done}/{total} {message}"));
            }
        } else if self.mode == ProgressMode::Plain {
            // Plain logs get a line at most every 10 s per node, and the last one.
            let now = Instant::now();
            let due = self.last_line.lock().map_or(true, |mut m| {
                let due = m
                    .get(node)
                    .is_none_or(|t| now.duration_since(*t) >= Duration::from_secs(10))
                    || done >= total;
                if due {
                    m.insert(node.to_string(), now);
                }
                due
            });
            if due {
                crate::errln!("  ...  {node}: {done}/{total} {message}");
            }
        }
    }
}
