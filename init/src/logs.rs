//! The RAM log (docs/logs.md): one ring buffer for init's own lines and every
//! service's stdout/stderr, bounded in bytes; `basaltctl logs [service] [-f]`
//! reads it over the control socket. Service output is mirrored to the
//! console unless `console = "init"` (init's lines only) or `"none"`;
//! persistent copies go to `/var/log/basalt.log` only when opted in (SD cards
//! wear out), batched and rotated at `persistent_max_kib`.
//!
//! Settings come from `[logs]` in /etc/basalt/image.toml (the image's
//! default), with the node config's `logs` laid over them key by key once the
//! `basalt-node-config` child has run ([`configure`]).
//!
//! Everything here runs inside PID 1 under one lock: nothing in it may log
//! (`say!` would take the lock again) or panic; a failed write to the
//! persistent file turns persistence off and is reported by [`flush`].

use std::collections::VecDeque;
use std::io::Write;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

/// Default ring size.
pub const DEFAULT_RING_KIB: usize = 32;
/// Allowed ring sizes (`ring_kib`).
pub const RING_KIB: RangeInclusive<u32> = 4..=16 * 1024;
/// Default bound of `/var/log/basalt.log` before it is rotated.
pub const DEFAULT_PERSISTENT_MAX_KIB: u64 = 1024;
/// Allowed `persistent_max_kib` (up to 1 GiB per file, two files kept).
pub const PERSISTENT_MAX_KIB: RangeInclusive<u32> = 16..=1024 * 1024;
/// Bytes an entry costs besides its text: the `Entry` in the deque and two
/// allocations' headers (counted so the ring's real heap use stays near its size).
const ENTRY_OVERHEAD: usize = 96;
/// Where persistent logs go when enabled.
pub const PERSISTENT_PATH: &str = "/var/log/basalt.log";
/// The directory of [`PERSISTENT_PATH`].
pub const PERSISTENT_DIR: &str = "/var/log";
/// Persistent lines are written before the buffer would pass this size...
const BATCH_BYTES: usize = 4096;
/// ...or once the oldest buffered line is this old (checked on the next line
/// and by the supervisor's periodic [`flush`]).
pub const BATCH_AGE: Duration = Duration::from_secs(5);

/// What gets mirrored to the console.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConsoleLevel {
    /// init's lines and all service output.
    All,
    /// init's lines only.
    Init,
    None,
}

impl ConsoleLevel {
    pub const NAMES: [&str; 3] = ["all", "init", "none"];

    pub fn parse(s: &str) -> Option<ConsoleLevel> {
        match s {
            "all" => Some(ConsoleLevel::All),
            "init" => Some(ConsoleLevel::Init),
            "none" => Some(ConsoleLevel::None),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ConsoleLevel::All => "all",
            ConsoleLevel::Init => "init",
            ConsoleLevel::None => "none",
        }
    }
}

/// Log settings in effect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub ring_kib: usize,
    pub console: ConsoleLevel,
    pub persistent: bool,
    pub persistent_max_kib: u64,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            ring_kib: DEFAULT_RING_KIB,
            console: ConsoleLevel::All,
            persistent: false,
            persistent_max_kib: DEFAULT_PERSISTENT_MAX_KIB,
        }
    }
}

impl Settings {
    /// `[logs]` of /etc/basalt/image.toml: defaults when the file or the
    /// table is absent; a bad value keeps its default (out-of-range sizes are
    /// clamped) and is returned as a problem for the caller to report (this
    /// runs before the ring exists).
    pub fn from_image_toml(text: &str) -> (Settings, Vec<String>) {
        let mut s = Settings::default();
        let mut problems = Vec::new();
        let Some(v) = crate::tomlfast::parse_table(text) else {
            return (s, problems);
        };
        let Some(logs) = v
            .get("logs")
            .filter(|l| matches!(l, crate::tomlfast::Val::Table(_)))
        else {
            return (s, problems);
        };
        let clamp = |k: i64, r: &RangeInclusive<u32>| {
            k.clamp(i64::from(*r.start()), i64::from(*r.end())) as u64
        };
        if let Some(k) = logs.get("ring_kib").and_then(|k| k.as_integer()) {
            s.ring_kib = clamp(k, &RING_KIB) as usize;
        }
        if let Some(c) = logs.get("console").and_then(|c| c.as_str()) {
            match ConsoleLevel::parse(c) {
                Some(l) => s.console = l,
                None => problems.push(format!("console = {c:?} (all, init or none)")),
            }
        }
        if let Some(p) = logs.get("persistent").and_then(|p| p.as_bool()) {
            s.persistent = p;
        }
        if let Some(k) = logs.get("persistent_max_kib").and_then(|k| k.as_integer()) {
            s.persistent_max_kib = clamp(k, &PERSISTENT_MAX_KIB);
        }
        (s, problems)
    }

    /// The node config's `logs` laid over these settings: each key it sets
    /// wins (the node config checked the ranges).
    pub fn overlay(mut self, o: &crate::nodeconfig::Logs) -> Settings {
        if let Some(k) = o.ring_kib {
            self.ring_kib = k as usize;
        }
        if let Some(c) = o.console {
            self.console = c;
        }
        if let Some(p) = o.persistent {
            self.persistent = p;
        }
        if let Some(k) = o.persistent_max_kib {
            self.persistent_max_kib = u64::from(k);
        }
        self
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub seq: u64,
    pub ms: u64,
    pub source: String,
    pub text: String,
}

impl Entry {
    fn cost(&self) -> usize {
        self.text.len() + self.source.len() + ENTRY_OVERHEAD
    }
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
        self.drop_oldest_until(self.limit.saturating_sub(cost));
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

    fn drop_oldest_until(&mut self, bytes: usize) {
        while self.bytes > bytes {
            match self.entries.pop_front() {
                Some(e) => self.bytes -= e.cost(),
                None => break,
            }
        }
    }

    /// Change the bound, keeping the newest lines that fit in it (lines
    /// already kept are not cut again).
    pub fn set_limit(&mut self, limit_bytes: usize) {
        let limit = limit_bytes.max(1024);
        if limit < self.limit {
            self.drop_oldest_until(limit);
            // Give the memory back: PID 1's RSS is what the budget counts.
            self.entries.shrink_to_fit();
        }
        self.limit = limit;
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    pub fn bytes(&self) -> usize {
        self.bytes
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

/// `basalt.log` being appended to: lines are buffered and written in
/// batches (never fsynced: SD cards), and the file is renamed to
/// `basalt.log.1` (replacing the older one) before a write would take it past
/// its bound. A power cut loses what is buffered here and what the kernel has
/// not written back yet (docs/logs.md); a rename is atomic, so both files
/// stay whole lines up to where their data reached the card.
#[derive(Debug)]
pub struct Persistent {
    path: PathBuf,
    rotated: PathBuf,
    file: std::fs::File,
    /// Bytes in the file (written, not buffered).
    size: u64,
    max: u64,
    buf: Vec<u8>,
    /// Boot-time ms of the oldest buffered line.
    oldest_ms: Option<u64>,
}

impl Persistent {
    /// Open (append) `<dir>/basalt.log`, rotating at `max_bytes`.
    pub fn open(dir: &Path, max_bytes: u64) -> std::io::Result<Persistent> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join("basalt.log");
        let file = Self::open_file(&path)?;
        let size = file.metadata()?.len();
        Ok(Persistent {
            rotated: dir.join("basalt.log.1"),
            path,
            file,
            size,
            max: max_bytes,
            // Written out before it would grow: its heap stays this size.
            buf: Vec::with_capacity(BATCH_BYTES),
            oldest_ms: None,
        })
    }

    fn open_file(path: &Path) -> std::io::Result<std::fs::File> {
        use std::os::unix::fs::OpenOptionsExt;
        // Services' output may hold what only root should read.
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Buffer one line, `<s.ms> <source>: <text>`; writes when the batch
    /// is full, rotates first when the line would not fit in the file.
    pub fn line(&mut self, ms: u64, source: &str, text: &str) -> std::io::Result<()> {
        let line = format!("{}.{:03} {source}: {text}\n", ms / 1000, ms % 1000);
        let pending = self.size + self.buf.len() as u64;
        if pending > 0 && pending + line.len() as u64 > self.max {
            self.write_out()?;
            self.rotate()?;
        } else if self.buf.len() + line.len() > BATCH_BYTES {
            self.write_out()?;
        }
        self.buf.extend_from_slice(line.as_bytes());
        self.oldest_ms.get_or_insert(ms);
        Ok(())
    }

    /// Whether buffered lines have waited long enough to be written.
    pub fn due(&self, now_ms: u64) -> bool {
        self.oldest_ms
            .is_some_and(|o| now_ms.saturating_sub(o) >= BATCH_AGE.as_millis() as u64)
    }

    /// Write the buffered lines (one `write`, no fsync). The buffer is
    /// dropped even when the write fails: it must not grow without bound.
    pub fn write_out(&mut self) -> std::io::Result<()> {
        self.oldest_ms = None;
        if self.buf.is_empty() {
            return Ok(());
        }
        let r = self.file.write_all(&self.buf);
        if r.is_ok() {
            self.size += self.buf.len() as u64;
        }
        self.buf.clear();
        r
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        std::fs::rename(&self.path, &self.rotated)?;
        self.file = Self::open_file(&self.path)?;
        self.size = 0;
        Ok(())
    }
}

/// The log state: the ring, the settings in effect, the persistent file.
#[derive(Debug)]
pub struct Log {
    ring: Ring,
    /// The image's settings (`/etc/basalt/image.toml`), under the node config's.
    image: Settings,
    settings: Settings,
    persistent: Option<Persistent>,
    /// The last sequence number already handed to the persistent file.
    persisted: u64,
    /// A failed persistent write, for [`flush`] to report outside the lock.
    failure: Option<String>,
}

impl Log {
    pub fn new(settings: Settings) -> Log {
        Log {
            ring: Ring::new(settings.ring_kib.saturating_mul(1024)),
            image: settings.clone(),
            settings,
            persistent: None,
            persisted: 0,
            failure: None,
        }
    }

    pub fn ring(&self) -> &Ring {
        &self.ring
    }

    /// The image's settings replace the ones in use (before any node
    /// config): the ring keeps its lines, within the new size.
    pub fn set_image(&mut self, settings: Settings) {
        self.ring.set_limit(settings.ring_kib.saturating_mul(1024));
        self.image = settings.clone();
        self.settings = settings;
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Record one line; returns whether it goes to the console too.
    pub fn record(&mut self, ms: u64, source: &str, text: &str) -> bool {
        let seq = self.ring.push(ms, source, text);
        if let Some(p) = &mut self.persistent {
            let r = p
                .line(ms, source, text)
                .and_then(|()| if p.due(ms) { p.write_out() } else { Ok(()) });
            self.persisted = seq;
            if let Err(e) = r {
                self.fail(e);
            }
        }
        match self.settings.console {
            ConsoleLevel::All => true,
            ConsoleLevel::Init => source == "init",
            ConsoleLevel::None => false,
        }
    }

    fn fail(&mut self, e: std::io::Error) {
        if let Some(p) = self.persistent.take() {
            self.failure = Some(format!(
                "writing {}: {e}; persistent logging is off until the next boot",
                p.path.display()
            ));
        }
    }

    /// Put `settings` in effect: resize the ring, switch the console mirror,
    /// start (with the lines already in the ring, so the boot's early lines
    /// are kept) or stop persistent logging in `dir`. Returns the persistent
    /// file's path when it is on.
    pub fn configure(
        &mut self,
        settings: Settings,
        dir: &Path,
    ) -> Result<Option<PathBuf>, std::io::Error> {
        self.ring.set_limit(settings.ring_kib.saturating_mul(1024));
        let max = settings.persistent_max_kib.saturating_mul(1024);
        let persistent = settings.persistent;
        self.settings = settings;
        if !persistent {
            if let Some(mut p) = self.persistent.take() {
                p.write_out()?;
            }
            return Ok(None);
        }
        let p = match &mut self.persistent {
            Some(p) => {
                p.max = max;
                p
            }
            None => self.persistent.insert(Persistent::open(dir, max)?),
        };
        let mut r = Ok(());
        let since = self.persisted;
        for e in self.ring.entries.iter().filter(|e| e.seq > since) {
            r = p.line(e.ms, &e.source, &e.text);
            if r.is_err() {
                break;
            }
        }
        let r = r.and_then(|()| p.write_out());
        let path = p.path.clone();
        self.persisted = self.ring.last_seq();
        match r {
            Ok(()) => Ok(Some(path)),
            Err(e) => {
                self.persistent = None;
                Err(e)
            }
        }
    }

    /// Whether lines go to the persistent file (the node config opted in
    /// and the file could be opened).
    pub fn is_persistent(&self) -> bool {
        self.persistent.is_some()
    }

    /// Write what is buffered. Returns a failure to report, if any.
    pub fn flush(&mut self) -> Option<String> {
        if let Some(p) = &mut self.persistent
            && let Err(e) = p.write_out()
        {
            self.fail(e);
        }
        self.failure.take()
    }

    /// Write what is buffered and close the persistent file (before `/var`
    /// is unmounted).
    pub fn close(&mut self) -> Option<String> {
        let failure = self.flush();
        self.persistent = None;
        failure
    }
}

static LOG: Mutex<Option<Log>> = Mutex::new(None);

/// Forget the ring without writing anything of it anywhere: in a forked
/// child (the node config's), whose lines go to its output for PID 1 to
/// record; its copy of PID 1's ring and persistent file are not its own.
pub fn forget() {
    if let Ok(mut g) = LOG.lock() {
        std::mem::forget(g.take());
    }
}

/// Start logging to the ring (before this, lines only go to the console).
pub fn init(settings: Settings) {
    if let Ok(mut g) = LOG.lock() {
        *g = Some(Log::new(settings));
    }
}

/// [`init`] with `[logs]` of `image_toml` (/etc/basalt/image.toml), the
/// image's default; its problems are reported once the ring exists. When
/// the ring exists already (stage 1 started it with the defaults, in this
/// same process), its lines are kept and the image's settings apply to it.
pub fn init_from_image(image_toml: &Path) {
    let text = std::fs::read_to_string(image_toml).unwrap_or_default();
    let (settings, problems) = Settings::from_image_toml(&text);
    if let Ok(mut g) = LOG.lock() {
        match g.as_mut() {
            Some(log) => log.set_image(settings),
            None => *g = Some(Log::new(settings)),
        }
    }
    for p in problems {
        crate::console::error("logs", format_args!("{}: [logs] {p}", image_toml.display()));
    }
}

/// Lay the node config's `logs` (from the `basalt-node-config` child's
/// results; `None` when it set none or failed) over the image's settings and
/// put them in effect, persistent logging in `dir` (normally
/// [`PERSISTENT_DIR`], on the data partition).
pub fn apply_node_config(node: Option<&crate::nodeconfig::Logs>, dir: &Path) {
    let r = {
        let Ok(mut g) = LOG.lock() else {
            return;
        };
        let Some(log) = g.as_mut() else {
            return;
        };
        let settings = match node {
            Some(o) => log.image.clone().overlay(o),
            None => log.image.clone(),
        };
        log.configure(settings, dir)
    };
    match r {
        Ok(Some(p)) => crate::say!("logs persistent at {}", p.display()),
        Ok(None) => {}
        Err(e) => crate::console::error(
            "logs",
            format_args!("starting persistent logging in {}: {e}", dir.display()),
        ),
    }
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
    log.record(crate::sys::boottime_ms(), source, text)
}

fn with_log(f: impl FnOnce(&mut Log) -> Option<String>) {
    let failure = match LOG.lock() {
        Ok(mut g) => g.as_mut().and_then(f),
        Err(_) => None,
    };
    if let Some(msg) = failure {
        crate::console::error("logs", msg);
    }
}

/// Whether the log writes to its persistent file ([`Log::is_persistent`]):
/// the supervisor's periodic [`flush`] is only scheduled then.
pub fn is_persistent() -> bool {
    LOG.lock()
        .is_ok_and(|g| g.as_ref().is_some_and(Log::is_persistent))
}

/// Write buffered persistent lines (the supervisor calls this every
/// [`BATCH_AGE`] when logs are persistent, so a quiet node's last lines do
/// not wait for the next one).
pub fn flush() {
    with_log(Log::flush);
}

/// Write buffered persistent lines and close the file (shutdown, before
/// `/var` is unmounted). Later lines stay in the ring and on the console.
pub fn close_persistent() {
    with_log(Log::close);
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

    /// Stage 2 keeps stage 1's lines: the image's settings apply to the
    /// ring stage 1 started, within the new size.
    #[test]
    fn image_settings_keep_stage_1_lines() {
        let mut log = Log::new(Settings::default());
        log.record(1, "init", "stage1 start");
        log.record(2, "init", "stage1 modules");
        let image = Settings {
            ring_kib: 4,
            ..Settings::default()
        };
        log.set_image(image.clone());
        let texts: Vec<String> = log
            .ring()
            .query(None, 0)
            .into_iter()
            .map(|e| e.text.clone())
            .collect();
        assert_eq!(texts, ["stage1 start", "stage1 modules"]);
        assert_eq!(log.ring().limit(), 4096);
        assert_eq!(log.settings(), &image);
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

    #[test]
    fn resizing_keeps_the_newest_lines_that_fit() {
        let mut r = Ring::new(64 * 1024);
        for i in 0..200 {
            r.push(i, "s", &format!("line {i:03} {}", "x".repeat(100)));
        }
        assert_eq!(r.query(None, 0).len(), 200, "all fit in 64 KiB");
        r.set_limit(8 * 1024);
        let kept: Vec<Entry> = r.query(None, 0).into_iter().cloned().collect();
        assert!(r.bytes() <= 8 * 1024);
        assert!(kept.len() > 20 && kept.len() < 200, "{}", kept.len());
        assert_eq!(kept.last().unwrap().seq, 200, "the newest is kept");
        let first = kept[0].seq;
        assert!(
            kept.iter().zip(first..).all(|(e, s)| e.seq == s),
            "a contiguous run up to the newest"
        );
        // Growing keeps everything and numbering goes on.
        r.set_limit(1024 * 1024);
        assert_eq!(r.query(None, 0).len(), kept.len());
        assert_eq!(r.push(0, "s", "next"), 201);
        assert_eq!(r.limit(), 1024 * 1024);
    }

    #[test]
    fn image_toml_settings_and_node_config_overlay() {
        let (s, problems) = Settings::from_image_toml(
            "os_version = \"1\"\n[logs]\nring_kib = 100000\nconsole = \"loud\"\npersistent = true\npersistent_max_kib = 1\n",
        );
        assert_eq!(s.ring_kib, 16 * 1024, "clamped");
        assert_eq!(s.persistent_max_kib, 16, "clamped");
        assert_eq!(s.console, ConsoleLevel::All, "bad value keeps the default");
        assert!(s.persistent);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(Settings::from_image_toml("").0, Settings::default());

        let node = crate::nodeconfig::Logs {
            console: Some(ConsoleLevel::None),
            persistent: Some(false),
            ..Default::default()
        };
        let o = s.clone().overlay(&node);
        assert_eq!(
            (o.ring_kib, o.console, o.persistent, o.persistent_max_kib),
            (16 * 1024, ConsoleLevel::None, false, 16),
            "keys the node config sets win, the others stay the image's"
        );
        assert_eq!(s.clone().overlay(&Default::default()), s);
    }

    fn read(p: &Path) -> String {
        std::fs::read_to_string(p).unwrap_or_default()
    }

    #[test]
    fn persistence_starts_with_the_ring_and_batches_writes() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("var/log");
        let mut log = Log::new(Settings::default());
        assert!(log.record(1000, "init", "stage2 start"));
        assert!(log.record(1500, "k3s", "early service line"));
        assert!(!dir.exists(), "nothing on storage unless asked");

        // Not opted in: nothing written, console level switched.
        let quiet = Settings {
            console: ConsoleLevel::Init,
            ..Settings::default()
        };
        assert_eq!(log.configure(quiet, &dir).unwrap(), None);
        assert!(!dir.join("basalt.log").exists());
        assert!(!log.record(1600, "k3s", "not mirrored"));
        assert!(log.record(1600, "init", "mirrored"));

        let on = Settings {
            persistent: true,
            ..Settings::default()
        };
        let path = log.configure(on.clone(), &dir).unwrap().unwrap();
        assert_eq!(path, dir.join("basalt.log"));
        assert_eq!(
            read(&path),
            "1.000 init: stage2 start\n1.500 k3s: early service line\n1.600 k3s: not mirrored\n1.600 init: mirrored\n",
            "the ring's lines are written when persistence starts"
        );
        // Batched: a new line waits in memory...
        log.record(2000, "k3s", "batched");
        assert!(!read(&path).contains("batched"));
        // ...until the batch is old enough (checked on the next line)...
        let later = 2000 + BATCH_AGE.as_millis() as u64;
        log.record(later, "k3s", "later");
        assert!(read(&path).ends_with("2.000 k3s: batched\n7.000 k3s: later\n"));
        log.record(later + 1, "k3s", "quiet");
        assert!(!read(&path).contains("quiet"));
        // ...or flushed (the supervisor's periodic task), and written once.
        assert!(log.is_persistent());
        assert_eq!(log.flush(), None);
        assert_eq!(log.flush(), None);
        assert_eq!(read(&path).matches("quiet").count(), 1);
        // Configuring again does not write the ring twice.
        log.configure(on, &dir).unwrap();
        assert_eq!(read(&path).matches("stage2 start").count(), 1);
        // Opting out stops writing.
        log.configure(Settings::default(), &dir).unwrap();
        assert!(!log.is_persistent());
        log.record(9000, "k3s", "after opt-out");
        log.flush();
        assert!(!read(&path).contains("after opt-out"));
    }

    #[test]
    fn rotation_keeps_two_files_within_the_bound() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path();
        let settings = Settings {
            persistent: true,
            persistent_max_kib: 16,
            ..Settings::default()
        };
        // A file left by the last boot is appended to.
        std::fs::write(dir.join("basalt.log"), "0.001 init: last boot\n").unwrap();
        let mut log = Log::new(settings.clone());
        log.configure(settings, dir).unwrap();
        let line = "y".repeat(90);
        for i in 0..1000u64 {
            log.record(10_000 + i, "svc", &format!("{i:04} {line}"));
        }
        let buf = &log.persistent.as_ref().unwrap().buf;
        assert!(
            buf.capacity() <= BATCH_BYTES,
            "the batch buffer never grows"
        );
        log.close();
        let cur = read(&dir.join("basalt.log"));
        let old = read(&dir.join("basalt.log.1"));
        assert!(cur.len() <= 16 * 1024 && old.len() <= 16 * 1024);
        assert!(old.len() > 15 * 1024, "rotated when full: {}", old.len());
        assert!(cur.ends_with(&format!("0999 {line}\n")));
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &str| std::fs::metadata(dir.join(p)).unwrap().permissions().mode() & 0o777;
        assert_eq!(
            mode("basalt.log"),
            0o600,
            "a new file after rotation is root's only"
        );
        assert!(
            cur.lines()
                .chain(old.lines())
                .all(|l| l.ends_with(&line) || l.contains("last boot"))
        );
        // The two files are the newest lines, in order, none lost between them.
        let seq = |l: &str| l.split(' ').nth(2).and_then(|n| n.parse::<u64>().ok());
        let nums: Vec<u64> = old.lines().chain(cur.lines()).filter_map(seq).collect();
        assert!(nums.windows(2).all(|w| w[1] == w[0] + 1), "contiguous");
        assert_eq!(nums.last(), Some(&999));
        assert!(
            !cur.contains("last boot") && !old.contains("last boot"),
            "rotated away"
        );
    }

    #[test]
    fn a_failed_write_turns_persistence_off_and_is_reported() {
        let t = tempfile::tempdir().unwrap();
        let blocker = t.path().join("file");
        std::fs::write(&blocker, "").unwrap();
        let mut log = Log::new(Settings::default());
        let on = Settings {
            persistent: true,
            ..Settings::default()
        };
        // The directory cannot be made (a file is in the way).
        assert!(log.configure(on.clone(), &blocker.join("log")).is_err());
        assert_eq!(log.settings().console, ConsoleLevel::All);
        assert!(log.record(1, "init", "still logging"));
        // /dev/full: every write fails with ENOSPC.
        if Path::new("/dev/full").exists() {
            let mut p = Persistent::open(t.path(), 1 << 20).unwrap();
            p.file = std::fs::OpenOptions::new()
                .write(true)
                .open("/dev/full")
                .unwrap();
            log.persistent = Some(p);
            log.record(2, "init", "x");
            let msg = log.flush().expect("reported");
            assert!(
                msg.contains("basalt.log") && msg.contains("persistent logging is off"),
                "{msg}"
            );
            assert!(log.persistent.is_none());
            assert_eq!(log.flush(), None, "reported once");
        }
    }
}
