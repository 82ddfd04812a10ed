//! Progress of a benchmark run: a bar per stage on a terminal, plain lines otherwise (a log, CI).

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressStyle};

pub struct Progress {
    terminal: bool,
}

/// One stage's progress: `step` after each unit of work.
pub struct StageProgress {
    name: &'static str,
    bar: Option<ProgressBar>,
    total: u64,
    done: u64,
}

impl Progress {
    pub fn new() -> Self {
        Progress { terminal: std::io::stderr().is_terminal() }
    }

    pub fn stage(&self, name: &'static str, total: u64) -> StageProgress {
        let bar = self.terminal.then(|| {
            let bar = ProgressBar::new(total);
            let style = ProgressStyle::with_template("{prefix:>12} [{bar:30}] {pos}/{len} {msg} ({elapsed})")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> ");
            bar.set_style(style);
            bar.set_prefix(name);
            bar
        });
        if bar.is_none() {
            eprintln!("bench: {name}: {total} steps");
        }
        StageProgress { name, bar, total, done: 0 }
    }
}

impl StageProgress {
    /// One unit done; `what` says which.
    pub fn step(&mut self, what: &str) {
        self.done += 1;
        match &self.bar {
            Some(bar) => {
                bar.set_message(what.to_string());
                bar.inc(1);
            }
            None => eprintln!("bench: {}: {}/{} {what}", self.name, self.done, self.total),
        }
    }

    pub fn finish(self) {
        if let Some(bar) = self.bar {
            bar.finish();
        }
    }
}
