//! Rootless mode: kiln started by a user other than root enters a user namespace of its own in
//! which that user is root and its subordinate ids (`/etc/subuid`, `/etc/subgid`) are uids and
//! gids 1 and up, written by the setuid helpers `newuidmap` and `newgidmap` (Debian package
//! `uidmap`). Everything else of kiln then runs unchanged inside it: mounts, overlayfs, chown to
//! container ids. Files in the store carry the mapped host ids on disk and the container ids as
//! kiln sees them, so the layers it writes carry the container's ids.
//!
//! The process enters the namespace itself (it keeps its pid, terminal and parent); a forked
//! helper, still outside, writes the maps once the parent has unshared.

use std::ffi::OsString;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, Ordering};

use nix::errno::Errno;

use crate::sys::{self, RealSys, Sys};

/// Where the subordinate uid ranges are listed.
pub const SUBUID: &str = "/etc/subuid";
/// Where the subordinate gid ranges are listed.
pub const SUBGID: &str = "/etc/subgid";

/// Entering rootless mode failed.
#[derive(Debug, thiserror::Error)]
pub enum UsernsError {
    #[error("failed to read `{path}`: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "rootless mode needs subordinate ids: `{path}` has no range for user `{user}` (uid {id}); \
         add one, e.g. `usermod --add-subuids 100000-165535 --add-subgids 100000-165535 {user}`"
    )]
    NoRange { path: PathBuf, user: String, id: u32 },
    #[error("rootless mode needs `{0}` (Debian package `uidmap`), which is not on PATH")]
    MissingTool(&'static str),
    #[error("`{tool}` failed to write the id map of kiln's user namespace: {message}")]
    Map { tool: &'static str, message: String },
    #[error("kiln must have one thread to enter a user namespace, but has {0}")]
    Threaded(usize),
    #[error("failed to create a pipe for the id-mapping helper: {0}")]
    Pipe(#[source] Errno),
    #[error("failed to fork the id-mapping helper: {0}")]
    Fork(#[source] Errno),
    #[error("failed to create a user namespace (is `/proc/sys/user/max_user_namespaces` 0?): {0}")]
    Unshare(#[source] Errno),
    #[error("failed to wait for the id-mapping helper: {0}")]
    Wait(#[source] Errno),
    #[error("failed to join the user namespace of process {pid}: {source}")]
    Join {
        pid: i32,
        #[source]
        source: Errno,
    },
    #[error("failed to become root in kiln's user namespace: {0}")]
    Become(#[source] Errno),
}

/// A contiguous range of subordinate ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdRange {
    pub start: u32,
    pub count: u32,
}

/// The ranges `/etc/subuid`-format `text` grants to the user named `user` or with id `id`, in the
/// file's order. Malformed lines are skipped, as shadow's own tools skip them.
pub fn parse_subids(text: &str, user: &str, id: u32) -> Vec<IdRange> {
    let id = id.to_string();
    text.lines()
        .filter_map(|line| {
            let mut f = line.trim().split(':');
            let (owner, start, count) = (f.next()?, f.next()?, f.next()?);
            if f.next().is_some() || (owner != user && owner != id) {
                return None;
            }
            let start: u32 = start.parse().ok()?;
            let count: u32 = count.parse().ok()?;
            (count > 0).then_some(IdRange { start, count })
        })
        .collect()
}

/// The arguments of `newuidmap`/`newgidmap` after the pid: the caller's id as 0, then the ranges
/// as 1 and up, as `inside outside count` triples.
pub fn map_args(own: u32, ranges: &[IdRange]) -> Vec<String> {
    let mut args = vec!["0".to_owned(), own.to_string(), "1".to_owned()];
    let mut inside: u64 = 1;
    for r in ranges {
        if inside >= u64::from(u32::MAX) {
            break;
        }
        args.extend([inside.to_string(), r.start.to_string(), r.count.to_string()]);
        inside += u64::from(r.count);
    }
    args
}

const UNKNOWN: u8 = 0;
const INITIAL: u8 = 1;
const NESTED: u8 = 2;
static FALLBACK_RUNTIME_DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// The last candidate of [`runtime_dir`] in a user namespace: a directory under kiln's store,
/// which the user always owns. Set once, before the first use; later calls change nothing.
pub fn set_fallback_runtime_dir(dir: PathBuf) {
    let _ = FALLBACK_RUNTIME_DIR.set(dir);
}

static STATE: AtomicU8 = AtomicU8::new(UNKNOWN);

/// Whether `uid_map` text is the initial user namespace's identity map.
fn is_initial_map(uid_map: &str) -> bool {
    let lines: Vec<Vec<&str>> = uid_map
        .lines()
        .map(|l| l.split_whitespace().collect())
        .filter(|f: &Vec<&str>| !f.is_empty())
        .collect();
    lines.len() == 1 && lines[0] == ["0", "0", "4294967295"]
}

/// Whether kiln runs in a user namespace other than the initial one: after [`enter`], or when
/// started inside a container with a user namespace of its own. Such a namespace cannot create
/// bridges or veth pairs on the host, set `trusted.*` attributes or make device nodes, so kiln
/// uses overlayfs' `userxattr`, bind-mounted devices and a user-mode network stack there.
pub fn in_user_namespace() -> bool {
    match STATE.load(Ordering::Relaxed) {
        INITIAL => false,
        NESTED => true,
        _ => {
            let nested = std::fs::read_to_string("/proc/self/uid_map")
                .map(|m| !is_initial_map(&m))
                .unwrap_or(false);
            STATE.store(if nested { NESTED } else { INITIAL }, Ordering::Relaxed);
            nested
        }
    }
}

/// The host uid kiln's uid 0 is, in a user namespace (the second field of the line of
/// `/proc/self/uid_map` that maps 0); the real uid otherwise.
pub fn host_uid() -> u32 {
    std::fs::read_to_string("/proc/self/uid_map")
        .ok()
        .and_then(|m| {
            m.lines().find_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.len() == 3 && f[0] == "0").then(|| f[1].parse().ok()).flatten()
            })
        })
        .unwrap_or_else(|| nix::unistd::getuid().as_raw())
}

/// The directory for kiln's per-boot state (caches that die with the machine): `/run/kiln`, or in
/// a user namespace, where `/run` is not ours, the first of `$XDG_RUNTIME_DIR/kiln`, `/tmp/kiln-UID`
/// (UID the host uid), `$XDG_CACHE_HOME/kiln` (`~/.cache/kiln`) and the directory given to
/// [`set_fallback_runtime_dir`] (the store's) that is a directory of ours no one else may write.
pub fn runtime_dir() -> Option<PathBuf> {
    if !in_user_namespace() {
        return Some(PathBuf::from("/run/kiln"));
    }
    let mut candidates = Vec::new();
    if let Some(d) = std::env::var_os("XDG_RUNTIME_DIR").filter(|d| Path::new(d).is_absolute()) {
        candidates.push(PathBuf::from(d).join("kiln"));
    }
    candidates.push(PathBuf::from(format!("/tmp/kiln-{}", host_uid())));
    // Where /tmp is not writable for users: the user's cache directory.
    match std::env::var_os("XDG_CACHE_HOME").filter(|d| Path::new(d).is_absolute()) {
        Some(d) => candidates.push(PathBuf::from(d).join("kiln")),
        None => {
            if let Some(home) = std::env::var_os("HOME").filter(|d| Path::new(d).is_absolute()) {
                candidates.push(PathBuf::from(home).join(".cache/kiln"));
            }
        }
    }
    // Where none of those is ours (no /tmp for users, HOME another user's, as under `setpriv`).
    candidates.extend(FALLBACK_RUNTIME_DIR.get().cloned());
    candidates.into_iter().find(|dir| {
        use std::os::unix::fs::{DirBuilderExt, MetadataExt};
        let _ = std::fs::DirBuilder::new().mode(0o700).recursive(true).create(dir);
        std::fs::symlink_metadata(dir)
            .is_ok_and(|m| m.is_dir() && m.uid() == nix::unistd::geteuid().as_raw() && m.mode() & 0o022 == 0)
    })
}

/// Whether kiln should enter rootless mode: its effective uid is not 0.
pub fn needed() -> bool {
    !nix::unistd::geteuid().is_root()
}

fn find_on_path(name: &'static str) -> Result<PathBuf, UsernsError> {
    let path = std::env::var_os("PATH").unwrap_or_else(|| OsString::from("/usr/bin:/bin"));
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .ok_or(UsernsError::MissingTool(name))
}

fn threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .map(|d| d.count())
        .unwrap_or(1)
}

fn ranges(path: &str, user: &str, id: u32) -> Result<Vec<IdRange>, UsernsError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(source) => {
            return Err(UsernsError::Read {
                path: path.into(),
                source,
            })
        }
    };
    let found = parse_subids(&text, user, id);
    if found.is_empty() {
        return Err(UsernsError::NoRange {
            path: path.into(),
            user: user.to_owned(),
            id,
        });
    }
    Ok(found)
}

/// Moves the calling process into a new user namespace where its uid and gid are 0 and its
/// subordinate ranges follow, and makes it root there (all capabilities in the namespace). Must
/// be called while the process has one thread.
pub fn enter() -> Result<(), UsernsError> {
    let uid = nix::unistd::getuid().as_raw();
    let gid = nix::unistd::getgid().as_raw();
    let user = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
        .ok()
        .flatten()
        .map(|u| u.name)
        .unwrap_or_else(|| uid.to_string());
    let uid_ranges = ranges(SUBUID, &user, uid)?;
    let gid_ranges = ranges(SUBGID, &user, uid)?;
    let newuidmap = find_on_path("newuidmap")?;
    let newgidmap = find_on_path("newgidmap")?;
    let n = threads();
    if n != 1 {
        return Err(UsernsError::Threaded(n));
    }
    // One child per map tool, forked before the unshare (the tools must run in this, the parent,
    // namespace) and waiting for a byte each on `go`; then each execs its tool at once. Both tools
    // are setuid programs whose start is most of rootless mode's cost, so they run side by side
    // and no helper process stands between them and kiln.
    let tools = [
        MapTool::new("newuidmap", &newuidmap, map_args(uid, &uid_ranges))?,
        MapTool::new("newgidmap", &newgidmap, map_args(gid, &gid_ranges))?,
    ];
    let (go_r, go_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(UsernsError::Pipe)?;
    let mut started: Vec<(&MapTool, i32, OwnedFd)> = Vec::with_capacity(2);
    for tool in &tools {
        let (err_r, err_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(UsernsError::Pipe)?;
        let forked = sys::fork_single_threaded();
        match forked {
            Ok(None) => {
                drop(go_w);
                drop(err_r);
                tool.run_on_go(go_r, err_w)
            }
            Ok(Some(child)) => started.push((tool, child, err_r)),
            Err(e) => {
                // The children started so far see `go` close and end without mapping.
                drop(go_w);
                for (_, child, _) in started {
                    let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(child), None);
                }
                return Err(UsernsError::Fork(e));
            }
        }
    }
    drop(go_r);
    let unshared = RealSys.unshare(libc::CLONE_NEWUSER);
    let mut go = std::fs::File::from(go_w);
    if unshared.is_ok() {
        // One byte for each child; on a failed unshare they see the pipe close and end.
        let _ = go.write_all(&[1u8; 2][..started.len()]);
    }
    drop(go);
    let mut failure = None;
    for (tool, child, err_r) in started {
        let mut message = String::new();
        let _ = std::fs::File::from(err_r).read_to_string(&mut message);
        let status =
            nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(child), None).map_err(UsernsError::Wait)?;
        if unshared.is_ok()
            && failure.is_none()
            && !matches!(status, nix::sys::wait::WaitStatus::Exited(_, 0))
        {
            let message = match message.trim() {
                "" => format!("it ended with {status:?}"),
                m => m.to_owned(),
            };
            failure = Some(UsernsError::Map {
                tool: tool.name,
                message: format!("{message} (`{}`)", tool.command_line()),
            });
        }
    }
    unshared.map_err(UsernsError::Unshare)?;
    if let Some(e) = failure {
        return Err(e);
    }
    RealSys.setresgid(0).map_err(UsernsError::Become)?;
    RealSys.setresuid(0).map_err(UsernsError::Become)?;
    RealSys.setgroups(&[]).map_err(UsernsError::Become)?;
    STATE.store(NESTED, Ordering::Relaxed);
    Ok(())
}

/// Joins the user namespace of `pid` (a kiln process of the same user in rootless mode, such as a
/// container's supervisor) instead of making a new one, so that this process's root is the one
/// that owns that process's containers: signals, `exec` and their namespaces then work across kiln
/// commands. `Ok(false)` when `pid` is not in such a namespace (gone, another user's, or one whose
/// uid 0 is not this user). Must be called while the process has one thread.
pub fn join(pid: i32) -> Result<bool, UsernsError> {
    let uid = nix::unistd::getuid().as_raw();
    let ours = std::fs::read_to_string(format!("/proc/{pid}/uid_map")).is_ok_and(|m| {
        m.lines().next().is_some_and(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() == 3 && f[0] == "0" && f[1] == uid.to_string()
        })
    });
    if !ours {
        return Ok(false);
    }
    let Ok(ns) = std::fs::File::open(format!("/proc/{pid}/ns/user")) else {
        return Ok(false);
    };
    let n = threads();
    if n != 1 {
        return Err(UsernsError::Threaded(n));
    }
    RealSys
        .setns(std::os::fd::AsRawFd::as_raw_fd(&ns), libc::CLONE_NEWUSER)
        .map_err(|source| UsernsError::Join { pid, source })?;
    RealSys.setresgid(0).map_err(UsernsError::Become)?;
    RealSys.setresuid(0).map_err(UsernsError::Become)?;
    RealSys.setgroups(&[]).map_err(UsernsError::Become)?;
    STATE.store(NESTED, Ordering::Relaxed);
    Ok(true)
}

/// One id-map tool (`newuidmap` or `newgidmap`) and its arguments after the pid, made ready
/// before the fork so the child only reads, duplicates descriptors and execs.
struct MapTool {
    name: &'static str,
    path: std::ffi::CString,
    argv: Vec<std::ffi::CString>,
}

impl MapTool {
    fn new(name: &'static str, path: &Path, args: Vec<String>) -> Result<MapTool, UsernsError> {
        use std::os::unix::ffi::OsStrExt;
        let cstring = |b: &[u8]| {
            std::ffi::CString::new(b).map_err(|_| UsernsError::Map {
                tool: name,
                message: format!("a NUL byte in `{}`", String::from_utf8_lossy(b)),
            })
        };
        let mut argv = vec![cstring(path.as_os_str().as_bytes())?];
        argv.push(cstring(std::process::id().to_string().as_bytes())?);
        for a in &args {
            argv.push(cstring(a.as_bytes())?);
        }
        Ok(MapTool {
            name,
            path: cstring(path.as_os_str().as_bytes())?,
            argv,
        })
    }

    fn command_line(&self) -> String {
        self.argv
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// In the forked child: waits for the parent's byte on `go` (the pipe closing means its
    /// unshare failed, which it reports), then execs the tool with stdin and stdout on /dev/null
    /// and stderr on `err`. Never returns.
    fn run_on_go(&self, go: OwnedFd, err: OwnedFd) -> ! {
        use std::os::fd::AsRawFd;
        let mut byte = [0u8; 1];
        if !matches!(nix::unistd::read(&go, &mut byte), Ok(1)) {
            sys::exit_now(0);
        }
        let null = nix::fcntl::open(
            "/dev/null",
            nix::fcntl::OFlag::O_RDWR,
            nix::sys::stat::Mode::empty(),
        );
        let redirected = null.and_then(|null| {
            RealSys.dup2(null.as_raw_fd(), 0)?;
            RealSys.dup2(null.as_raw_fd(), 1)?;
            RealSys.dup2(err.as_raw_fd(), 2)
        });
        let e = match redirected {
            Ok(_) => nix::unistd::execv(&self.path, &self.argv).unwrap_err(),
            Err(e) => e,
        };
        let mut err = std::fs::File::from(err);
        let _ = write!(err, "failed to run `{}`: {e}", self.path.to_string_lossy());
        sys::exit_now(127)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subids_by_name_or_id_in_file_order() {
        let text = "alice:100000:65536\nbob:200000:1000\n1001:300000:10\nbad line\nbob:x:1\nbob:5:0\n";
        assert_eq!(
            parse_subids(text, "bob", 1001),
            vec![
                IdRange {
                    start: 200000,
                    count: 1000
                },
                IdRange {
                    start: 300000,
                    count: 10
                }
            ]
        );
        assert!(parse_subids(text, "carol", 7).is_empty());
    }

    #[test]
    fn map_args_put_the_caller_at_zero_and_ranges_after() {
        let ranges = [
            IdRange {
                start: 200000,
                count: 1000,
            },
            IdRange {
                start: 300000,
                count: 10,
            },
        ];
        assert_eq!(
            map_args(1001, &ranges).join(" "),
            "0 1001 1 1 200000 1000 1001 300000 10"
        );
    }

    #[test]
    fn initial_map_is_the_identity_of_all_ids() {
        assert!(is_initial_map("         0          0 4294967295\n"));
        assert!(!is_initial_map("0 1001 1\n1 100000 65536\n"));
        assert!(!is_initial_map(""));
    }
}
