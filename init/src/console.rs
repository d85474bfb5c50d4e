//! Console lines, exactly as docs/boot-protocol.md spells them ("basalt: ...").
//! Tests and the boot report read these, so every line is written with one
//! `write(2)` to keep lines whole when services share the console.

use std::io::Write;

/// Write `basalt: <msg>` on the console (stdout).
pub fn line(msg: std::fmt::Arguments<'_>) {
    let body = msg.to_string();
    if !crate::logs::record("init", &body) {
        return;
    }
    let text = format!("basalt: {body}\n");
    let mut out = std::io::stdout().lock();
    // Nothing sensible to do when the console itself fails.
    let _ = out.write_all(text.as_bytes());
    let _ = out.flush();
}

/// A service's output line, as the service wrote it, in one write.
pub fn raw_line(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(format!("{text}\n").as_bytes());
    let _ = out.flush();
}

/// `basalt: error <what> <where>`; init keeps running after it.
pub fn error(what: &str, location: impl std::fmt::Display) {
    line(format_args!("error {what} {location}"));
}

/// `basalt: <msg>` with format arguments.
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => { $crate::console::line(format_args!($($arg)*)) };
}

/// Route panics to the console as `basalt: error panic ...` lines instead of
/// the default stderr text, so a caught panic in a phase is reported in the
/// contract's format.
pub fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let msg = if let Some(s) = info.payload().downcast_ref::<&str>() {
            (*s).to_string()
        } else if let Some(s) = info.payload().downcast_ref::<String>() {
            s.clone()
        } else {
            "(non-string payload)".to_string()
        };
        let at = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        error("panic", format_args!("{at} ({msg})"));
    }));
}

/// Run `f`, turning a panic into a reported error and `None`. PID 1 must
/// survive a bug in any one phase or task.
pub fn guarded<T>(what: &str, f: impl FnOnce() -> T) -> Option<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(v) => Some(v),
        Err(_) => {
            error("panicked", what);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A panicking task is caught and reported; the same task runs again next time.
    #[test]
    fn a_panicking_task_is_caught_and_runs_again() {
        let mut runs = 0;
        for i in 0..3 {
            let r = guarded("test task", || {
                runs += 1;
                if i == 1 {
                    panic!("boom in run {i}");
                }
                i
            });
            assert_eq!(r, if i == 1 { None } else { Some(i) });
        }
        assert_eq!(runs, 3);
    }
}
