//! The fork and wait loop of `kiln run --init`'s pid 1 ([`crate::init`] has the rest): they run
//! in the container's first process after its setup plan, so like every [`super::Sys`] call they
//! make no allocation and only async-signal-safe calls.

use nix::sys::signal::{SigSet, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use super::{Cloned, Errno};

/// Signals pid 1 passes on to the command.
pub const FORWARDED: [Signal; 7] = [
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGHUP,
    Signal::SIGQUIT,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
    Signal::SIGWINCH,
];

/// The exit code of pid 1 for the command's wait status, or `None` if it has not ended.
pub fn exit_code(status: WaitStatus) -> Option<i32> {
    match status {
        WaitStatus::Exited(_, code) => Some(code),
        WaitStatus::Signaled(_, sig, _) => Some(128 + sig as i32),
        _ => None,
    }
}

/// Forks. In the new process (which returns `Ok`) signals are unblocked again and, with
/// `foreground_tty`, it leads a process group of its own in the terminal's foreground. The calling
/// process closes every descriptor above stderr and becomes the reaper: it never returns.
pub fn spawn(foreground_tty: bool) -> Result<(), Errno> {
    // Blocked before the fork, so no signal sent to pid 1 between the fork and the wait loop is
    // lost: it stays pending until `reap` waits for it.
    super::block_all_signals()?;
    match super::clone_child(0)? {
        Cloned::Child => {
            if foreground_tty {
                // SIGTTOU is blocked: tcsetpgrp from the background group does not stop us.
                super::foreground_on_stdin()?;
            }
            super::unblock_all_signals()
        }
        Cloned::Parent(child) => {
            super::close_from(3);
            reap(Pid::from_raw(child))
        }
    }
}

/// Reaps every child; when `child` ends, exits with its status. Forwards [`FORWARDED`] signals to
/// `child` meanwhile. Expects every signal to be blocked.
fn reap(child: Pid) -> ! {
    let mut wanted = SigSet::empty();
    for sig in FORWARDED {
        wanted.add(sig);
    }
    wanted.add(Signal::SIGCHLD);
    loop {
        // Reap first: the command may have ended before we got here (its SIGCHLD is pending then,
        // and the wait below would return at once anyway).
        loop {
            match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) => break,
                Ok(status) => {
                    if status.pid() == Some(child) {
                        if let Some(code) = exit_code(status) {
                            super::exit_child(code);
                        }
                    }
                }
                Err(Errno::EINTR) => {}
                // ECHILD: nothing left to wait for, so the command is gone too.
                Err(_) => super::exit_child(1),
            }
        }
        match wanted.wait() {
            Ok(Signal::SIGCHLD) | Err(_) => {}
            Ok(sig) => {
                let _ = nix::sys::signal::kill(child, sig);
            }
        }
    }
}
