//! The RAM log (docs/logs.md): one ring buffer for init's own lines and every
//! service's stdout/stderr, bounded in bytes; `basaltctl logs [service] [-f]`
//! reads it over the control socket. Service output is mirrored to the
//! console unless `console = "init"` (init's lines only) or `"none"`;
//! persistent copies go to `/var/log/basalt.log` only when opted in.

use std::collections::VecDeque;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Mutex;

/// Default ring size.
pub const DEFAULT_RING_KIB: usize = 32;
/// Bytes an entry costs besides its text: the `Entry` in the deque and two
/// allocations' headers (counted so the ring's real heap use stays near its size).
const ENTRY_OVERHEAD: usize = 96;
/// Where persistent logs go when enabled.
pub const PERSISTENT_PATH: &str = "/var/log/basalt.log";

/// What gets mirrored to the console.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConsoleLevel {
    /// init's lines and all service output.
    All,
    /// init's lines only.
    Init,
    None,
}

impl ConsoleLevel {
    pub fn parse(s: &str) -> Option<ConsoleLevel> {
        match s {
            "all" => Some(ConsoleLevel::All),
            "init" => Some(ConsoleLevel::Init),
            "none" => Some(ConsoleLevel::None),
            _ => None,
        }
    }
}

/// Log settings (`[logs]` in /etc/basalt/image.toml).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub ring_kib: usize,
    pub console: ConsoleLevel,
    pub persistent: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            ring_kib: DEFAULT_RING_KIB,
            console: ConsoleLevel::All,
            persistent: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub seq: u64,
    pub ms: u64,
    pub source: String,
    pub text: String,
}

/// A ring of lines bounded by their total text size.
#[derive(Debug)]
pub struct Ring {
    entries: VecDeque<Entry>,
    bytes: usize,
    limit: usize,
    next_seq: u64,
}

impl Ring {
    pub fn new(limit_bytes: usize) -> Ring {
        Ring {
            entries: VecDeque::new(),
            bytes: 0,
            limit: limit_bytes.max(1024),
            next_seq: 1,
        }
    }

    pub fn push(&mut self, ms: u64, source: &str, text: &str) -> u64 {
        let mut text = text.to_string();
        // One line never takes more than a quarter of the ring.
        if text.len() > self.limit / 4 {
            let mut cut = self.limit / 4;
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            text.truncate(cut);
        }
        let cost = text.len() + source.len() + ENTRY_OVERHEAD;
        while self.bytes + cost > self.limit {
            match self.entries.pop_front() {
                Some(e) => self.bytes -= e.text.len() + e.source.len() + ENTRY_OVERHEAD,
                None => break,
            }
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.bytes += cost;
        self.entries.push_back(Entry {
            seq,
            ms,
            source: source.to_string(),
            text,
        });
        seq
    }

    /// Entries after `since` (sequence number), of `source` when given.
    pub fn query(&self, source: Option<&str>, since: u64) -> Vec<&Entry> {
        self.entries
            .iter()
            .filter(|e| e.seq > since && source.is_none_or(|s| e.source == s))
            .collect()
    }

    pub fn last_seq(&self) -> u64 {
        self.next_seq - 1
    }
}

struct Log {
    ring: Ring,
    settings: Settings,
    persistent: Option<std::fs::File>,
}

static LOG: Mutex<Option<Log>> = Mutex::new(None);

/// Start logging to the ring (before this, lines only go to the console).
pub fn init(settings: Settings) {
    if let Ok(mut g) = LOG.lock() {
        *g = Some(Log {
            ring: Ring::new(settings.ring_kib.saturating_mul(1024)),
            settings,
            persistent: None,
        });
    }
}

/// Open `/var/log/basalt.log` for appending when the settings ask for it
/// (call once `/var` is mounted). Returns the path when persistent logging is on.
pub fn open_persistent(dir: &std::path::Path) -> Option<PathBuf> {
    let mut g = LOG.lock().ok()?;
    let log = g.as_mut()?;
    if !log.settings.persistent {
        return None;
    }
    let _ = std::fs::create_dir_all(dir);
    let path = dir.join("basalt.log");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .ok()?;
    log.persistent = Some(f);
    Some(path)
}

/// Record one line from `source` ("init" or a service name). Returns whether
/// the line should also be written to the console.
pub fn record(source: &str, text: &str) -> bool {
    let Ok(mut g) = LOG.lock() else {
        return true;
    };
    let Some(log) = g.as_mut() else {
        return true;
    };
    let ms = crate::sys::boottime_ms();
    log.ring.push(ms, source, text);
    if let Some(f) = &mut log.persistent {
        let _ = writeln!(f, "{}.{:03} {source}: {text}", ms / 1000, ms % 1000);
    }
    match log.settings.console {
        ConsoleLevel::All => true,
        ConsoleLevel::Init => source == "init",
        ConsoleLevel::None => false,
    }
}

/// The `logs` control reply: `<seq> <ms> <source>: <text>` lines after `since`.
pub fn reply(source: Option<&str>, since: u64) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    if let Ok(g) = LOG.lock()
        && let Some(log) = g.as_ref()
    {
        for e in log.ring.query(source, since) {
            let _ = writeln!(
                out,
                "{} {}.{:03} {}: {}",
                e.seq,
                e.ms / 1000,
                e.ms % 1000,
                e.source,
                e.text
            );
        }
    }
    out
}

/// Split `buf` into complete lines, keeping a trailing partial line in `pending`.
pub fn split_lines(pending: &mut Vec<u8>, buf: &[u8]) -> Vec<String> {
    pending.extend_from_slice(buf);
    let mut out = Vec::new();
    while let Some(pos) = pending.iter().position(|&b| b == b'\n') {
        let line: Vec<u8> = pending.drain(..=pos).collect();
        out.push(String::from_utf8_lossy(&line[..line.len() - 1]).into_owned());
    }
    // A runaway line without newline is flushed in pieces.
    if pending.len() > 4096 {
        out.push(String::from_utf8_lossy(pending).into_owned());
        pending.clear();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_drops_oldest_beyond_its_size() {
        let mut r = Ring::new(2048);
        for i in 0..100 {
            r.push(
                i,
                if i % 2 == 0 { "a" } else { "b" },
                &format!("line {i:03} {}", "x".repeat(40)),
            );
        }
        let all = r.query(None, 0);
        assert!(all.len() < 100 && all.len() > 10, "{}", all.len());
        assert_eq!(all.last().unwrap().seq, 100);
        assert!(r.bytes <= 2048);
        assert!(r.query(Some("a"), 0).iter().all(|e| e.source == "a"));
        assert_eq!(r.query(None, 98).len(), 2);
        assert_eq!(r.last_seq(), 100);
    }

    #[test]
    fn huge_lines_are_cut() {
        let mut r = Ring::new(4096);
        r.push(0, "s", &"é".repeat(5000));
        assert!(r.query(None, 0)[0].text.len() <= 1024);
    }

    #[test]
    fn lines_split_across_reads() {
        let mut p = Vec::new();
        assert_eq!(split_lines(&mut p, b"ab"), Vec::<String>::new());
        assert_eq!(split_lines(&mut p, b"c\nd\ne"), vec!["abc", "d"]);
        assert_eq!(p, b"e");
    }

    #[test]
    fn console_levels() {
        assert_eq!(ConsoleLevel::parse("init"), Some(ConsoleLevel::Init));
        assert_eq!(ConsoleLevel::parse("loud"), None);
    }
}
