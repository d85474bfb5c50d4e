//! `basaltctl`: the client side of the control socket. One line out (the
//! command and its arguments), the reply printed as is. The server side is
//! in `supervisor`, inside PID 1's event loop.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::slot::CONTROL_SOCKET;

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error(
        "usage: basaltctl status [--json] | reboot [tryboot | partition <2|3>] | poweroff | logs [service] [-f] | boot-time | debug stop-watchdog\n       basaltctl update [--no-reboot] [--allow-downgrade] [--wait] <https-url|file|-> | rollback"
    )]
    Usage,
    #[error("connecting to init at {path}: {source}")]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("talking to init at {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("init answered: {0}")]
    Refused(String),
}

/// The socket path: `BASALT_CONTROL_SOCKET` if set (tests), else the contract's.
pub fn socket_path() -> PathBuf {
    std::env::var_os("BASALT_CONTROL_SOCKET")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(CONTROL_SOCKET))
}

/// Validate the arguments into the request line.
pub fn request_line(args: &[String]) -> Result<String, ControlError> {
    let words: Vec<&str> = args.iter().map(String::as_str).collect();
    match words.as_slice() {
        ["status"]
        | ["status", "--json"]
        | ["reboot"]
        | ["reboot", "tryboot"]
        | ["poweroff"]
        | ["boot-time"]
        | ["debug", "stop-watchdog"] => Ok(words.join(" ")),
        ["reboot", "partition", n] if matches!(*n, "2" | "3") => Ok(words.join(" ")),
        ["logs"] => Ok("logs".into()),
        ["logs", name] if valid_service_name(name) => Ok(format!("logs {name}")),
        _ => Err(ControlError::Usage),
    }
}

/// Send one request and return the reply.
pub fn call(path: &Path, line: &str) -> Result<String, ControlError> {
    let io = |source| ControlError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut s = UnixStream::connect(path).map_err(|source| ControlError::Connect {
        path: path.to_path_buf(),
        source,
    })?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(io)?;
    s.write_all(format!("{line}\n").as_bytes()).map_err(io)?;
    let mut reply = String::new();
    s.read_to_string(&mut reply).map_err(io)?;
    if let Some(rest) = reply.strip_prefix("error ") {
        return Err(ControlError::Refused(rest.trim().to_string()));
    }
    Ok(reply)
}

/// `basaltctl <args>`: returns the process exit code.
fn valid_service_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 64
        && !n.starts_with('-')
        && n.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
}

/// `basaltctl logs [service] -f`: print the ring, then poll for new lines
/// every half second (PID 1 keeps no connection open for followers).
fn follow(service: Option<&str>) -> i32 {
    let path = socket_path();
    let mut since = 0u64;
    loop {
        let line = match service {
            Some(s) => format!("logs {s} --since {since}"),
            None => format!("logs --since {since}"),
        };
        match call(&path, &line) {
            Ok(reply) => {
                for l in reply.lines() {
                    let (seq, rest) = l.split_once(' ').unwrap_or(("0", l));
                    since = since.max(seq.parse().unwrap_or(since));
                    println!("{rest}");
                }
            }
            Err(e) => {
                eprintln!("basaltctl: {e}");
                return 1;
            }
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

pub fn main(args: &[String]) -> i32 {
    let words: Vec<&str> = args.iter().map(String::as_str).collect();
    // update, rollback, gate: the update agent, in this process (not PID 1).
    if let Some(code) = crate::update::cli::dispatch(&words) {
        return code;
    }
    match words.as_slice() {
        ["logs", "-f"] => return follow(None),
        ["logs", name, "-f"] | ["logs", "-f", name] => return follow(Some(name)),
        _ => {}
    }
    let is_logs = words.first() == Some(&"logs");
    if words == ["reboot", "tryboot"] {
        // A pending update trial starts with this reboot: note it first.
        let _ = crate::update::cli::mark_trial_started(&crate::update::device::Device::system());
    }
    if let ["reboot", "partition", n] = words.as_slice()
        && let Ok(n) = n.parse::<u8>()
    {
        // A pending trial on a board without tryboot: its marker first (p1),
        // when the partition is the trial slot's boot FAT.
        let dev = crate::update::device::Device::system();
        if let Err(e) = crate::update::cli::prepare_partition_trial(&dev, n) {
            eprintln!("basaltctl: {e}");
            return 1;
        }
    }
    let result = request_line(args).and_then(|line| call(&socket_path(), &line));
    match result {
        Ok(reply) if is_logs => {
            // Drop the sequence numbers the follower uses.
            for l in reply.lines() {
                println!("{}", l.split_once(' ').map_or(l, |(_, r)| r));
            }
            0
        }
        Ok(reply) => {
            // `status`: the slots, from the agent's state (PID 1 keeps none).
            let dev = crate::update::device::Device::system();
            match (words.as_slice(), crate::update::cli::current_state(&dev)) {
                (["status", "--json"], Some((booted, st))) => {
                    print!("{}", crate::update::cli::augment_json(&reply, booted, &st));
                }
                (["status"], Some((booted, st))) => {
                    print!("{reply}{}", crate::update::cli::augment_text(booted, &st));
                }
                _ => print!("{reply}"),
            }
            0
        }
        Err(ControlError::Usage) => {
            eprintln!("{}", ControlError::Usage);
            2
        }
        Err(e) => {
            eprintln!("basaltctl: {e}");
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn requests() {
        assert_eq!(request_line(&args(&["status"])).unwrap(), "status");
        assert_eq!(
            request_line(&args(&["status", "--json"])).unwrap(),
            "status --json"
        );
        assert_eq!(request_line(&args(&["poweroff"])).unwrap(), "poweroff");
        assert!(request_line(&args(&[])).is_err());
        assert!(request_line(&args(&["reboot", "now"])).is_err());
        assert_eq!(
            request_line(&args(&["reboot", "partition", "3"])).unwrap(),
            "reboot partition 3"
        );
        assert!(request_line(&args(&["reboot", "partition", "5"])).is_err());
        assert!(request_line(&args(&["reboot", "partition"])).is_err());
        assert!(request_line(&args(&["status\nreboot"])).is_err());
        assert_eq!(request_line(&args(&["logs", "k3s"])).unwrap(), "logs k3s");
        assert!(request_line(&args(&["logs", "a\nreboot"])).is_err());
        assert_eq!(
            request_line(&args(&["debug", "stop-watchdog"])).unwrap(),
            "debug stop-watchdog"
        );
    }

    #[test]
    fn missing_socket_names_the_path() {
        let e = call(Path::new("/nonexistent/control.sock"), "status").unwrap_err();
        assert!(e.to_string().contains("/nonexistent/control.sock"), "{e}");
    }
}
