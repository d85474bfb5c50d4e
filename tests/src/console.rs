//! A serial console read line by line: a thread copies every line to a log
//! file (kept for failures) and hands it to the test, which waits for lines
//! with `expect` under a timeout. Lines are decoded lossily and stripped of
//! `\r` and terminal escape sequences (firmware and systemd-boot draw with them).

use regex_lite::Regex;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};
use thiserror::Error;

/// How many of the last lines an error message quotes.
const TAIL_LINES: usize = 40;

#[derive(Debug, Error)]
pub enum ConsoleError {
    #[error(
        "no console line matching {pattern} within {timeout:?} (log: {log})\n--- last lines ---\n{tail}"
    )]
    Timeout {
        pattern: String,
        timeout: Duration,
        log: PathBuf,
        tail: String,
    },
    #[error(
        "the console closed (QEMU exited) before a line matching {pattern} (log: {log})\n--- last lines ---\n{tail}"
    )]
    Closed {
        pattern: String,
        log: PathBuf,
        tail: String,
    },
    #[error("creating console log {path}: {source}")]
    Log {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What a line must contain.
#[derive(Debug, Clone)]
pub enum Pattern {
    Substring(String),
    Regex(Regex),
}

impl Pattern {
    /// A regular expression (regex-lite syntax); panics on a malformed one,
    /// which is a bug in the test itself.
    pub fn regex(re: &str) -> Pattern {
        match Regex::new(re) {
            Ok(r) => Pattern::Regex(r),
            Err(e) => panic!("bad regex {re:?} in a test: {e}"),
        }
    }

    pub fn matches(&self, line: &str) -> bool {
        match self {
            Pattern::Substring(s) => line.contains(s.as_str()),
            Pattern::Regex(r) => r.is_match(line),
        }
    }
}

impl std::fmt::Display for Pattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Pattern::Substring(s) => write!(f, "{s:?}"),
            Pattern::Regex(r) => write!(f, "/{}/", r.as_str()),
        }
    }
}

impl From<&str> for Pattern {
    fn from(s: &str) -> Pattern {
        Pattern::Substring(s.to_string())
    }
}

impl From<String> for Pattern {
    fn from(s: String) -> Pattern {
        Pattern::Substring(s)
    }
}

impl From<Regex> for Pattern {
    fn from(r: Regex) -> Pattern {
        Pattern::Regex(r)
    }
}

/// Removes `\r`, ANSI/VT escape sequences and other control characters.
pub fn clean_line(raw: &[u8]) -> String {
    let text = String::from_utf8_lossy(raw);
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\u{1b}' => {
                // CSI: ESC [ params final-byte; other escapes: ESC + one char.
                if chars.peek() == Some(&'[') {
                    chars.next();
                    for d in chars.by_ref() {
                        if ('@'..='~').contains(&d) {
                            break;
                        }
                    }
                } else if let Some('(' | ')' | '*' | '+') = chars.next() {
                    // Character set designation: ESC ( B
                    chars.next();
                }
            }
            '\t' => out.push(c),
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out
}

/// Init said `basalt: error` on the console ([`Console::no_init_errors`]).
#[derive(Debug, thiserror::Error)]
#[error("init reported errors (log {}):\n{lines}", log.display())]
pub struct InitErrors {
    pub log: PathBuf,
    pub lines: String,
}

/// The reading end of a console.
pub struct Console {
    lines: Receiver<String>,
    history: Vec<String>,
    /// `expect` looks at `history[cursor..]` before waiting for new lines.
    cursor: usize,
    log: PathBuf,
    closed: bool,
}

impl Console {
    /// Starts reading `source` into `log`; `label` prefixes nothing but names the thread.
    pub fn spawn<R: Read + Send + 'static>(source: R, log: &Path) -> Result<Console, ConsoleError> {
        let mut file = File::create(log).map_err(|source| ConsoleError::Log {
            path: log.to_path_buf(),
            source,
        })?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(source);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match reader.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
                let line = clean_line(&buf);
                // The log is for people: best effort, never a reason to stop reading.
                let _ = writeln!(file, "{line}");
                let _ = file.flush();
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Console {
            lines: rx,
            history: Vec::new(),
            cursor: 0,
            log: log.to_path_buf(),
            closed: false,
        })
    }

    /// The console log file.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// `Ok` when no line read so far says `basalt: error`; else all such
    /// lines, with the log's path.
    pub fn no_init_errors(&self) -> Result<(), InitErrors> {
        let lines = self.seen("basalt: error");
        if lines.is_empty() {
            return Ok(());
        }
        Err(InitErrors {
            log: self.log.clone(),
            lines: lines.join("\n"),
        })
    }

    /// Every line read so far (by `expect` or `drain`).
    pub fn history(&self) -> &[String] {
        &self.history
    }

    /// The last lines read, for error messages.
    pub fn tail(&self) -> String {
        let start = self.history.len().saturating_sub(TAIL_LINES);
        self.history[start..].join("\n")
    }

    /// Waits for the next line matching `pattern` after the line the previous
    /// `expect` matched (lines already read by `drain` count); returns it.
    pub fn expect(
        &mut self,
        pattern: impl Into<Pattern>,
        timeout: Duration,
    ) -> Result<String, ConsoleError> {
        let pattern = pattern.into();
        if let Some(i) = self.history[self.cursor..]
            .iter()
            .position(|l| pattern.matches(l))
        {
            let i = self.cursor + i;
            self.cursor = i + 1;
            return Ok(self.history[i].clone());
        }
        self.cursor = self.history.len();
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let next = if self.closed {
                Err(RecvTimeoutError::Disconnected)
            } else {
                self.lines.recv_timeout(left)
            };
            match next {
                Ok(line) => {
                    let hit = pattern.matches(&line);
                    self.history.push(line.clone());
                    self.cursor = self.history.len();
                    if hit {
                        return Ok(line);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    return Err(ConsoleError::Timeout {
                        pattern: pattern.to_string(),
                        timeout,
                        log: self.log.clone(),
                        tail: self.tail(),
                    });
                }
                Err(RecvTimeoutError::Disconnected) => {
                    self.closed = true;
                    return Err(ConsoleError::Closed {
                        pattern: pattern.to_string(),
                        log: self.log.clone(),
                        tail: self.tail(),
                    });
                }
            }
        }
    }

    /// Like `expect`, but also accepts a line read at any time before, for
    /// output whose order relative to other lines is not fixed (e.g. two
    /// services started together). Leaves the `expect` position alone when
    /// the line was already there.
    pub fn expect_anywhere(
        &mut self,
        pattern: impl Into<Pattern>,
        timeout: Duration,
    ) -> Result<String, ConsoleError> {
        let pattern = pattern.into();
        if let Some(line) = self.history.iter().find(|l| pattern.matches(l)) {
            return Ok(line.clone());
        }
        self.expect(pattern, timeout)
    }

    /// Reads whatever lines arrive within `wait` (until the console closes)
    /// into the history, without consuming them for `expect`.
    pub fn drain(&mut self, wait: Duration) {
        let deadline = Instant::now() + wait;
        while !self.closed {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => self.history.push(line),
                Err(RecvTimeoutError::Timeout) => break,
                Err(RecvTimeoutError::Disconnected) => self.closed = true,
            }
        }
    }

    /// Lines seen so far that match `pattern`.
    pub fn seen(&self, pattern: impl Into<Pattern>) -> Vec<String> {
        let pattern = pattern.into();
        self.history
            .iter()
            .filter(|l| pattern.matches(l))
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cleans_escape_sequences() {
        assert_eq!(
            clean_line(b"\x1b[2J\x1b[01;01Hbasalt: ready {}\r\n"),
            "basalt: ready {}"
        );
        assert_eq!(clean_line(b"a\x1b(Bb\x07c"), "abc");
        assert_eq!(clean_line(b"\xffok"), "\u{fffd}ok");
    }

    #[test]
    fn expect_finds_lines_and_times_out() {
        let dir = std::env::temp_dir().join(format!("basalt-console-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("console.log");
        let input: &'static [u8] = b"one\r\nbasalt: stage1 start\ntwo 42\nlast";
        let mut c = Console::spawn(input, &log).unwrap();
        c.drain(Duration::from_millis(300));
        let logged = std::fs::read_to_string(&log).unwrap();
        assert_eq!(logged, "one\nbasalt: stage1 start\ntwo 42\nlast\n");
        assert_eq!(
            c.expect("stage1", Duration::from_secs(5)).unwrap(),
            "basalt: stage1 start"
        );
        assert_eq!(
            c.expect(Pattern::regex(r"two \d+"), Duration::from_secs(5))
                .unwrap(),
            "two 42"
        );
        assert_eq!(c.expect("last", Duration::from_secs(5)).unwrap(), "last");
        let e = c.expect("never", Duration::from_secs(5)).unwrap_err();
        assert!(matches!(e, ConsoleError::Closed { .. }), "{e}");
        assert!(e.to_string().contains("basalt: stage1 start"));
        assert_eq!(c.seen("basalt:").len(), 1);
        // Lines read by `drain` are still there for `expect`.
        let mut c = Console::spawn(&b"a\nb\nc\n"[..], &log).unwrap();
        c.drain(Duration::from_millis(500));
        assert_eq!(c.history().len(), 3);
        assert_eq!(c.expect("b", Duration::from_secs(1)).unwrap(), "b");
        assert!(c.expect("a", Duration::from_millis(100)).is_err());
        assert_eq!(
            c.expect_anywhere("a", Duration::from_millis(100)).unwrap(),
            "a"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn expect_times_out_on_silence() {
        let (r, mut w) = std::io::pipe().unwrap();
        let dir =
            std::env::temp_dir().join(format!("basalt-console-silence-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut c = Console::spawn(r, &dir.join("log")).unwrap();
        w.write_all(b"hello\n").unwrap();
        let start = Instant::now();
        let e = c.expect("bye", Duration::from_millis(300)).unwrap_err();
        assert!(matches!(e, ConsoleError::Timeout { .. }), "{e}");
        assert!(start.elapsed() < Duration::from_secs(5));
        assert!(e.to_string().contains("hello"));
        drop(w);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
