//! Named network namespaces: a new namespace kept alive by a bind mount of
//! `/proc/thread-self/ns/net` onto a file (what `ip netns add` does), and running code inside
//! one on a thread of its own.
//!
//! The bind mount lives in the caller's mount namespace: create and remove namespaces from the
//! host's mount namespace so that other processes (`kiln rm`, the next supervisor) see them.

use std::fs;
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{setns, unshare, CloneFlags};

use crate::sys::{RealSys, Sys};

/// Creating, entering or removing a network namespace failed.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("failed to create the network namespace directory `{path}`: {source}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("network namespace file `{0}` already exists")]
    Exists(PathBuf),
    #[error("failed to create the network namespace file `{path}`: {source}")]
    CreateFile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("failed to start a thread for network namespace `{path}`: {source}")]
    Thread {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the thread working in network namespace `{0}` panicked")]
    ThreadPanicked(PathBuf),
    #[error("failed to unshare a new network namespace for `{path}`: {source}")]
    Unshare {
        path: PathBuf,
        #[source]
        source: Errno,
    },
    #[error("failed to bring up the loopback interface in network namespace `{path}`: {source}")]
    Loopback {
        path: PathBuf,
        #[source]
        source: Errno,
    },
    #[error("failed to bind-mount the new network namespace onto `{path}`: {source}")]
    BindMount {
        path: PathBuf,
        #[source]
        source: Errno,
    },
    #[error("failed to open network namespace `{path}`: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("failed to enter network namespace `{path}`: {source}")]
    Enter {
        path: PathBuf,
        #[source]
        source: Errno,
    },
    #[error("failed to unmount network namespace `{path}`: {source}")]
    Unmount {
        path: PathBuf,
        #[source]
        source: Errno,
    },
    #[error("failed to remove network namespace file `{path}`: {source}")]
    Remove {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Creates a new network namespace with its loopback interface up, kept alive by a bind mount
/// onto `path` (created; its parent directory too). Fails if `path` already exists.
pub fn create(path: &Path) -> Result<(), NetnsError> {
    create_with(path, || ())
}

/// [`create`], then runs `f` inside the new namespace (on the thread that made it) and returns
/// its result: cheaper than [`run_in`] afterwards for opening the namespace's first sockets.
pub fn create_with<T: Send + 'static>(
    path: &Path,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, NetnsError> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).map_err(|source| NetnsError::CreateDir {
            path: dir.to_path_buf(),
            source,
        })?;
    }
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o444)
        .open(path)
        .map_err(|source| {
            if source.kind() == io::ErrorKind::AlreadyExists {
                NetnsError::Exists(path.to_path_buf())
            } else {
                NetnsError::CreateFile {
                    path: path.to_path_buf(),
                    source,
                }
            }
        })?;
    let target = path.to_path_buf();
    let result = on_thread(path, move || -> Result<T, NetnsError> {
        // Only this thread moves: the namespace is private to it until the bind mount below.
        unshare(CloneFlags::CLONE_NEWNET).map_err(|source| NetnsError::Unshare {
            path: target.clone(),
            source,
        })?;
        RealSys.loopback_up().map_err(|source| NetnsError::Loopback {
            path: target.clone(),
            source,
        })?;
        mount(
            Some("/proc/thread-self/ns/net"),
            &target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(|source| NetnsError::BindMount {
            path: target.clone(),
            source,
        })?;
        Ok(f())
    })
    .and_then(|r| r);
    if result.is_err() {
        let _ = fs::remove_file(path);
    }
    result
}

/// A new network namespace with its loopback interface up, kept alive only by the returned
/// descriptor (no file, no mount): it goes away with the descriptor and the processes in it, so a
/// process that dies leaves nothing behind. `f` runs inside it, as for [`create_with`].
pub fn create_held<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<(std::os::fd::OwnedFd, T), NetnsError> {
    let what = PathBuf::from("(anonymous)");
    let target = what.clone();
    on_thread(&what, move || {
        unshare(CloneFlags::CLONE_NEWNET).map_err(|source| NetnsError::Unshare {
            path: target.clone(),
            source,
        })?;
        RealSys.loopback_up().map_err(|source| NetnsError::Loopback {
            path: target.clone(),
            source,
        })?;
        let ns = fs::File::open("/proc/thread-self/ns/net").map_err(|source| NetnsError::Open {
            path: target.clone(),
            source,
        })?;
        Ok((std::os::fd::OwnedFd::from(ns), f()))
    })
    .and_then(|r| r)
}

/// Unmounts and deletes the namespace file `path`. The namespace itself goes away with the
/// last process or mount that holds it. Idempotent: a missing or unmounted file is fine.
pub fn remove(path: &Path) -> Result<(), NetnsError> {
    match umount2(path, MntFlags::MNT_DETACH) {
        Ok(()) | Err(Errno::EINVAL) | Err(Errno::ENOENT) => {}
        Err(source) => {
            return Err(NetnsError::Unmount {
                path: path.to_path_buf(),
                source,
            })
        }
    }
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(NetnsError::Remove {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Runs `f` on a new thread that has joined the network namespace of the file `path` (a
/// namespace file such as one made by [`create`], or `/proc/PID/ns/net`). Sockets `f` creates
/// belong to that namespace for their whole life, wherever they are used afterwards: this is how
/// a test listens inside a container's namespace, and how netlink talks to it.
pub fn run_in<T: Send + 'static>(
    path: &Path,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, NetnsError> {
    let file = fs::File::open(path).map_err(|source| NetnsError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    let target = path.to_path_buf();
    on_thread(path, move || -> Result<T, NetnsError> {
        setns(&file, CloneFlags::CLONE_NEWNET).map_err(|source| NetnsError::Enter {
            path: target.clone(),
            source,
        })?;
        drop(file);
        Ok(f())
    })
    .and_then(|r| r)
}

/// Runs `f` on a fresh thread (which dies with whatever namespace it joined) and waits for it.
fn on_thread<T: Send + 'static>(
    path: &Path,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, NetnsError> {
    let handle = std::thread::Builder::new()
        .name("kiln-netns".into())
        .spawn(f)
        .map_err(|source| NetnsError::Thread {
            path: path.to_path_buf(),
            source,
        })?;
    handle
        .join()
        .map_err(|_| NetnsError::ThreadPanicked(path.to_path_buf()))
}
