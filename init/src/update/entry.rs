//! systemd-boot loader entries for the two slots (REFERENCE.md §2): the one
//! format the builder writes and the update agent rewrites.
//!
//! Order, not file names, decides what systemd-boot boots: every entry has
//! `sort-key basalt-<rank>` (ascending strcmp) and entries with no tries left
//! sort after all others. Ranks: `0-trial` (a counted entry `+1`, booted once),
//! `1-primary`, `2-fallback` (the other good slot). `loader.conf` has no
//! `default` line (QEMU.md: a default pattern defeats boot counting).
//!
//! Only a `Trial` entry carries `basalt.trial=1` (stage 1's cue to arm the
//! watchdog and give up with a reboot): `render` adds it for that rank alone
//! and `parse` drops it, so the commit, which rewrites the trial's entry as
//! the uncounted primary, leaves no trial key behind.
//!
//! File names: `basalt-<slot>.conf` (uncounted) or `basalt-<slot>+<left>[-<done>].conf`
//! (counted; systemd-boot renames it at every boot of it).

use crate::cmdline::CMDLINE_TRIAL;
use crate::slot::Slot;

/// Where loader entries live on the ESP.
pub const ENTRIES_DIR: &str = "loader/entries";
/// Tries a trial entry gets: one boot, then it is bad and the primary boots again.
pub const TRIAL_TRIES: u32 = 1;

/// Position of a slot's entry in systemd-boot's menu.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rank {
    Trial,
    Primary,
    Fallback,
}

impl Rank {
    pub fn sort_key(self) -> &'static str {
        match self {
            Rank::Trial => "basalt-0-trial",
            Rank::Primary => "basalt-1-primary",
            Rank::Fallback => "basalt-2-fallback",
        }
    }

    fn from_sort_key(s: &str) -> Option<Rank> {
        [Rank::Trial, Rank::Primary, Rank::Fallback]
            .into_iter()
            .find(|r| r.sort_key() == s)
    }
}

/// One slot's loader entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoaderEntry {
    pub slot: Slot,
    pub os_version: String,
    /// Kernel command line without `basalt.slot` and `basalt.trial` (added
    /// by `render`).
    pub options: String,
    pub rank: Rank,
}

impl LoaderEntry {
    pub fn render(&self) -> String {
        let s = self.slot.name();
        let v = &self.os_version;
        let trial = format!("{CMDLINE_TRIAL}=1");
        let slot = format!("basalt.slot={s}");
        let options = self
            .options
            .split_whitespace()
            .filter(|w| !is_trial_key(w))
            .chain((self.rank == Rank::Trial).then_some(trial.as_str()))
            .chain([slot.as_str()])
            .collect::<Vec<_>>()
            .join(" ");
        format!(
            "title Basalt {v} (slot {s})\nsort-key {}\nversion {v}\nlinux /{s}/vmlinuz\ninitrd /{s}/initramfs\noptions {options}\n",
            self.rank.sort_key()
        )
    }

    /// Read back an entry this module wrote (unknown ranks are `None`).
    pub fn parse(text: &str) -> Option<LoaderEntry> {
        let mut slot = None;
        let mut version = None;
        let mut rank = None;
        let mut options = Vec::new();
        for line in text.lines() {
            let (k, v) = line.split_once(' ').unwrap_or((line, ""));
            let v = v.trim();
            match k {
                "sort-key" => rank = Rank::from_sort_key(v),
                "version" => version = Some(v.to_string()),
                "options" => {
                    for w in v.split_whitespace() {
                        match w.strip_prefix("basalt.slot=") {
                            Some(s) => slot = Slot::parse(s),
                            None if is_trial_key(w) => {}
                            None => options.push(w),
                        }
                    }
                }
                _ => {}
            }
        }
        Some(LoaderEntry {
            slot: slot?,
            os_version: version?,
            options: options.join(" "),
            rank: rank?,
        })
    }
}

/// `basalt.trial` with or without a value: the rank decides it, never the options.
fn is_trial_key(word: &str) -> bool {
    word.split_once('=').map_or(word, |(k, _)| k) == CMDLINE_TRIAL
}

/// File name of a slot's uncounted entry.
pub fn file_name(slot: Slot) -> String {
    format!("basalt-{}.conf", slot.name())
}

/// File name of a slot's fresh trial entry.
pub fn trial_file_name(slot: Slot) -> String {
    format!("basalt-{}+{TRIAL_TRIES}.conf", slot.name())
}

/// A file in the entries directory, as systemd-boot's counter names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryFile {
    pub name: String,
    pub slot: Slot,
    /// `Some((left, done))` for a counted entry.
    pub counter: Option<(u32, u32)>,
}

impl EntryFile {
    pub fn parse(name: &str) -> Option<EntryFile> {
        let stem = name.strip_suffix(".conf")?.strip_prefix("basalt-")?;
        let (slot, counter) = match stem.split_once('+') {
            None => (stem, None),
            Some((s, c)) => {
                let (left, done) = match c.split_once('-') {
                    Some((l, d)) => (l.parse().ok()?, d.parse().ok()?),
                    None => (c.parse().ok()?, 0),
                };
                (s, Some((left, done)))
            }
        };
        Some(EntryFile {
            name: name.to_string(),
            slot: Slot::parse(slot)?,
            counter,
        })
    }

    /// A counted entry with no tries left: systemd-boot will not pick it.
    pub fn exhausted(&self) -> bool {
        matches!(self.counter, Some((0, _)))
    }
}

/// The Basalt entry files in `dir`, sorted by name.
pub fn list(dir: &std::path::Path) -> Vec<EntryFile> {
    let mut out: Vec<EntryFile> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| EntryFile::parse(&e.file_name().to_string_lossy()))
                .collect()
        })
        .unwrap_or_default();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_and_parse() {
        let e = LoaderEntry {
            slot: Slot::B,
            os_version: "0.2.0".into(),
            options: "console=ttyS0,115200 basalt.verity=ab".into(),
            rank: Rank::Trial,
        };
        let text = e.render();
        assert_eq!(
            text,
            "title Basalt 0.2.0 (slot b)\nsort-key basalt-0-trial\nversion 0.2.0\nlinux /b/vmlinuz\ninitrd /b/initramfs\noptions console=ttyS0,115200 basalt.verity=ab basalt.trial=1 basalt.slot=b\n"
        );
        assert_eq!(LoaderEntry::parse(&text), Some(e));
        assert_eq!(LoaderEntry::parse("title x\n"), None);
    }

    /// The trial key follows the rank: a trial entry has it once (even when
    /// the options name it), the commit's rewrite as primary has none.
    #[test]
    fn only_trial_entries_carry_the_trial_key() {
        let trial = LoaderEntry {
            slot: Slot::B,
            os_version: "0.2.0".into(),
            options: "console=ttyS0,115200 basalt.trial=1 panic=10".into(),
            rank: Rank::Trial,
        };
        let text = trial.render();
        let args =
            crate::cmdline::parse(text.lines().last().unwrap().trim_start_matches("options "));
        assert!(args.trial && args.problems.is_empty(), "{text}");
        assert_eq!(text.matches("basalt.trial").count(), 1, "{text}");
        // What the gate does at commit: the counted entry read back, rewritten as primary.
        let read = LoaderEntry::parse(&text).unwrap();
        assert_eq!(read.options, "console=ttyS0,115200 panic=10");
        for rank in [Rank::Primary, Rank::Fallback] {
            let committed = LoaderEntry {
                rank,
                ..read.clone()
            }
            .render();
            assert!(!committed.contains("basalt.trial"), "{committed}");
            let options = committed.lines().last().unwrap();
            assert!(!crate::cmdline::parse(options).trial, "{committed}");
        }
        // A hand-made or builder entry naming the key is no trial unless ranked so.
        let primary = LoaderEntry {
            rank: Rank::Primary,
            options: "basalt.trial=1 basalt.trial".into(),
            ..trial
        };
        assert!(!primary.render().contains("basalt.trial"));
    }

    #[test]
    fn ranks_sort_as_systemd_boot_compares_sort_keys() {
        assert!(Rank::Trial.sort_key() < Rank::Primary.sort_key());
        assert!(Rank::Primary.sort_key() < Rank::Fallback.sort_key());
    }

    #[test]
    fn counter_names() {
        let f = EntryFile::parse("basalt-b+0-1.conf").unwrap();
        assert_eq!((f.slot, f.counter), (Slot::B, Some((0, 1))));
        assert!(f.exhausted());
        let f = EntryFile::parse("basalt-a+1.conf").unwrap();
        assert_eq!(f.counter, Some((1, 0)));
        assert!(!f.exhausted());
        let f = EntryFile::parse("basalt-a.conf").unwrap();
        assert_eq!(f.counter, None);
        assert_eq!(trial_file_name(Slot::B), "basalt-b+1.conf");
        for bad in [
            "basalt-c.conf",
            "other.conf",
            "basalt-a+x.conf",
            "basalt-a.tmp",
        ] {
            assert!(EntryFile::parse(bad).is_none(), "{bad}");
        }
    }
}
