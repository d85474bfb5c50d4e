//! PID 1's side of one control-socket connection (`basaltctl`'s requests,
//! [`crate::control`] is the client), without blocking the supervisor's
//! loop: the socket is non-blocking, the request line is read as it comes
//! and the reply written as the client takes it, each within its deadline.
//! A client that connects and sends nothing, or asks for the logs and never
//! reads them, costs a descriptor until its deadline, never the loop's time
//! (which reaps, restarts services and pets the watchdog).

use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

/// The longest request line; longer ones are cut here (and refused as an
/// unknown command).
pub const MAX_REQUEST: usize = 512;
/// From the connection to its request's end of line.
pub const READ_TIMEOUT: Duration = Duration::from_secs(1);
/// From the request to the reply's last byte taken by the client.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections open at once; more are closed at once (said once per burst).
pub const MAX_CONNECTIONS: usize = 32;

/// Where a connection is.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Nothing to do until the socket is ready or the deadline.
    Pending,
    /// The whole request line (without its newline): answer it with `reply`.
    Request(String),
    /// Finished (reply written, client gone, deadline passed or an error):
    /// drop it.
    Done,
}

pub struct Conn {
    stream: UnixStream,
    input: Vec<u8>,
    /// The reply and how much of it is written; `None` while reading.
    output: Option<(Vec<u8>, usize)>,
    deadline: Instant,
}

impl Conn {
    pub fn new(stream: UnixStream, now: Instant) -> std::io::Result<Conn> {
        stream.set_nonblocking(true)?;
        Ok(Conn {
            stream,
            input: Vec::new(),
            output: None,
            deadline: now + READ_TIMEOUT,
        })
    }

    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// Whether the loop should wait for the socket to take more of the reply
    /// (`POLLOUT`) rather than for input.
    pub fn writing(&self) -> bool {
        self.output.is_some()
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.stream.as_fd()
    }

    /// Read or write what the socket allows now.
    pub fn advance(&mut self, now: Instant) -> Step {
        if now >= self.deadline {
            return Step::Done;
        }
        if self.output.is_some() {
            return self.write();
        }
        let mut buf = [0u8; MAX_REQUEST];
        loop {
            // Below MAX_REQUEST here: a full buffer returned its request.
            let room = MAX_REQUEST - self.input.len();
            match self.stream.read(&mut buf[..room]) {
                // The client closed its side: what it sent is the request.
                Ok(0) if self.input.is_empty() => return Step::Done,
                Ok(0) => return Step::Request(self.take_line()),
                Ok(n) => {
                    self.input.extend_from_slice(&buf[..n]);
                    if self.input.contains(&b'\n') || self.input.len() >= MAX_REQUEST {
                        return Step::Request(self.take_line());
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Step::Pending,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => return Step::Done,
            }
        }
    }

    fn take_line(&mut self) -> String {
        let end = self
            .input
            .iter()
            .position(|&b| b == b'\n')
            .unwrap_or(self.input.len().min(MAX_REQUEST));
        String::from_utf8_lossy(&self.input[..end]).into_owned()
    }

    /// Start writing `text`, as much as the socket takes now.
    pub fn reply(&mut self, text: String, now: Instant) -> Step {
        self.output = Some((text.into_bytes(), 0));
        self.deadline = now + WRITE_TIMEOUT;
        self.write()
    }

    fn write(&mut self) -> Step {
        let Some((out, at)) = &mut self.output else {
            return Step::Done;
        };
        while *at < out.len() {
            match self.stream.write(&out[*at..]) {
                Ok(0) => return Step::Done,
                Ok(n) => *at += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Step::Pending,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => return Step::Done,
            }
        }
        Step::Done
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_in_pieces_is_read_when_its_line_ends() {
        let (mut client, server) = UnixStream::pair().unwrap();
        let now = Instant::now();
        let mut c = Conn::new(server, now).unwrap();
        assert_eq!(c.advance(now), Step::Pending);
        client.write_all(b"sta").unwrap();
        assert_eq!(c.advance(now), Step::Pending);
        client.write_all(b"tus --json\nrest").unwrap();
        assert_eq!(c.advance(now), Step::Request("status --json".into()));
        assert!(!c.writing());
        assert_eq!(c.reply("ok\n".into(), now), Step::Done);
        let mut got = String::new();
        drop(c);
        client.read_to_string(&mut got).unwrap();
        assert_eq!(got, "ok\n");
    }

    #[test]
    fn silence_ends_at_the_deadline_and_eof_ends_the_line() {
        let (client, server) = UnixStream::pair().unwrap();
        let now = Instant::now();
        let mut c = Conn::new(server, now).unwrap();
        assert_eq!(c.advance(now), Step::Pending);
        assert_eq!(c.advance(now + READ_TIMEOUT), Step::Done);
        drop(client);

        let (mut client, server) = UnixStream::pair().unwrap();
        let mut c = Conn::new(server, now).unwrap();
        client.write_all(b"logs").unwrap();
        client.shutdown(std::net::Shutdown::Write).unwrap();
        assert_eq!(c.advance(now), Step::Request("logs".into()));

        let (client, server) = UnixStream::pair().unwrap();
        let mut c = Conn::new(server, now).unwrap();
        drop(client);
        assert_eq!(c.advance(now), Step::Done);
    }

    #[test]
    fn an_overlong_request_is_cut() {
        let (mut client, server) = UnixStream::pair().unwrap();
        let now = Instant::now();
        let mut c = Conn::new(server, now).unwrap();
        client.write_all(&[b'x'; 2000]).unwrap();
        let Step::Request(line) = c.advance(now) else {
            panic!("no request")
        };
        assert_eq!(line.len(), MAX_REQUEST);
    }

    /// A reply larger than the socket buffer, to a client that does not
    /// read: written as it is taken, never waited for; given up at the
    /// deadline.
    #[test]
    fn a_reply_the_client_does_not_take_never_blocks() {
        let (mut client, server) = UnixStream::pair().unwrap();
        let now = Instant::now();
        let mut c = Conn::new(server, now).unwrap();
        client.write_all(b"logs\n").unwrap();
        assert_eq!(c.advance(now), Step::Request("logs".into()));
        let big = "line of a log\n".repeat(200_000);
        let t = Instant::now();
        assert_eq!(c.reply(big.clone(), now), Step::Pending);
        assert!(c.writing());
        assert_eq!(c.advance(now), Step::Pending);
        assert!(t.elapsed() < Duration::from_secs(1));
        // The client reads it all as the connection goes on.
        let reader = std::thread::spawn(move || {
            let mut got = String::new();
            client.read_to_string(&mut got).unwrap();
            got
        });
        while c.advance(Instant::now()) == Step::Pending {
            std::thread::sleep(Duration::from_millis(1));
        }
        drop(c);
        assert_eq!(reader.join().unwrap(), big);

        // One that never reads: dropped at the deadline.
        let (mut client, server) = UnixStream::pair().unwrap();
        let mut c = Conn::new(server, now).unwrap();
        client.write_all(b"logs\n").unwrap();
        assert!(matches!(c.advance(now), Step::Request(_)));
        assert_eq!(c.reply(big, now), Step::Pending);
        assert_eq!(c.advance(now + WRITE_TIMEOUT), Step::Done);
    }
}
