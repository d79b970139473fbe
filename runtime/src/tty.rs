//! Pseudo-terminals for `kiln run -t` and `kiln exec -t`.
//!
//! [`open_pty`] gives a master and a slave; the slave becomes the container's stdin/stdout/stderr
//! with [`crate::RunOptions::controlling_tty`] set, and the caller copies bytes between its own
//! terminal and the master. [`RawMode`] puts the caller's terminal in raw mode and restores it on
//! drop. The caller forwards `SIGWINCH` itself: on each, [`get_winsize`] of its terminal and
//! [`set_winsize`] of the master (the kernel then signals the container's foreground group).

use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;

use nix::fcntl::OFlag;
use nix::sys::termios::{self, SetArg, Termios};

use crate::sys::{self, Errno};

/// Errors of terminal operations.
#[derive(Debug, thiserror::Error)]
pub enum TtyError {
    /// `posix_openpt` failed.
    #[error("failed to open a pseudo-terminal master (`/dev/ptmx`)")]
    Open(#[source] Errno),
    /// `grantpt` failed.
    #[error("failed to grant access to the pseudo-terminal slave")]
    Grant(#[source] Errno),
    /// `unlockpt` failed.
    #[error("failed to unlock the pseudo-terminal slave")]
    Unlock(#[source] Errno),
    /// `ptsname_r` failed.
    #[error("failed to get the name of the pseudo-terminal slave")]
    Name(#[source] Errno),
    /// Opening the slave failed.
    #[error("failed to open the pseudo-terminal slave `{path}`")]
    OpenSlave {
        /// The slave's path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: Errno,
    },
    /// `TIOCGWINSZ` failed.
    #[error("failed to read the terminal's window size")]
    GetWinsize(#[source] Errno),
    /// `TIOCSWINSZ` failed.
    #[error("failed to set the terminal's window size")]
    SetWinsize(#[source] Errno),
    /// `tcgetattr` failed.
    #[error("failed to read the terminal's attributes")]
    GetAttr(#[source] Errno),
    /// `tcsetattr` failed.
    #[error("failed to set the terminal's attributes")]
    SetAttr(#[source] Errno),
    /// Duplicating the terminal's descriptor failed.
    #[error("failed to duplicate the terminal's descriptor")]
    Dup(#[source] Errno),
}

/// Opens a new pseudo-terminal: (master, slave), both close-on-exec, neither becoming the
/// caller's controlling terminal.
pub fn open_pty() -> Result<(OwnedFd, OwnedFd), TtyError> {
    let flags = OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC;
    let master = nix::pty::posix_openpt(flags).map_err(TtyError::Open)?;
    nix::pty::grantpt(&master).map_err(TtyError::Grant)?;
    nix::pty::unlockpt(&master).map_err(TtyError::Unlock)?;
    let name = nix::pty::ptsname_r(&master).map_err(TtyError::Name)?;
    let path = PathBuf::from(name);
    let slave = nix::fcntl::open(&path, flags, nix::sys::stat::Mode::empty())
        .map_err(|source| TtyError::OpenSlave { path, source })?;
    Ok((OwnedFd::from(master), slave))
}

/// Whether `fd` is a terminal.
pub fn is_tty(fd: impl AsFd) -> bool {
    nix::unistd::isatty(fd).unwrap_or(false)
}

/// The window size of the terminal at `fd`: (rows, columns).
pub fn get_winsize(fd: impl AsFd) -> Result<(u16, u16), TtyError> {
    sys::get_winsize(fd.as_fd()).map_err(TtyError::GetWinsize)
}

/// Sets the window size of the terminal at `fd` (usually a pty master).
pub fn set_winsize(fd: impl AsFd, rows: u16, cols: u16) -> Result<(), TtyError> {
    sys::set_winsize(fd.as_fd(), rows, cols).map_err(TtyError::SetWinsize)
}

/// A terminal in raw mode (`cfmakeraw`): restored to its previous attributes on drop.
#[derive(Debug)]
pub struct RawMode {
    fd: OwnedFd,
    saved: Termios,
}

impl RawMode {
    /// Saves the attributes of the terminal at `fd` and switches it to raw mode.
    pub fn enable(fd: impl AsFd) -> Result<RawMode, TtyError> {
        let fd = sys::dup_above_stdio(fd.as_fd()).map_err(TtyError::Dup)?;
        let saved = termios::tcgetattr(&fd).map_err(TtyError::GetAttr)?;
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        termios::tcsetattr(&fd, SetArg::TCSANOW, &raw).map_err(TtyError::SetAttr)?;
        Ok(RawMode { fd, saved })
    }

    /// Restores the saved attributes now, reporting failure (drop does the same silently).
    pub fn restore(self) -> Result<(), TtyError> {
        termios::tcsetattr(&self.fd, SetArg::TCSANOW, &self.saved).map_err(TtyError::SetAttr)
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = termios::tcsetattr(&self.fd, SetArg::TCSANOW, &self.saved);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pty_carries_window_size_and_raw_mode_restores() {
        let (master, slave) = open_pty().unwrap();
        assert!(is_tty(&slave));
        set_winsize(&master, 33, 101).unwrap();
        assert_eq!(get_winsize(&slave).unwrap(), (33, 101));
        let before = termios::tcgetattr(&slave).unwrap();
        assert!(before.local_flags.contains(termios::LocalFlags::ICANON));
        let raw = RawMode::enable(&slave).unwrap();
        let during = termios::tcgetattr(&slave).unwrap();
        assert!(!during.local_flags.contains(termios::LocalFlags::ICANON));
        drop(raw);
        let after = termios::tcgetattr(&slave).unwrap();
        assert!(after.local_flags.contains(termios::LocalFlags::ICANON));
        assert!(!is_tty(std::fs::File::open("/dev/null").unwrap()));
    }
}
