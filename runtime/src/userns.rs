//! Rootless mode: kiln started by a user other than root enters a user namespace of its own in
//! which that user is root and its subordinate ids (`/etc/subuid`, `/etc/subgid`) are uids and
//! gids 1 and up, written by the setuid helpers `newuidmap` and `newgidmap` (Debian package
//! `uidmap`). Everything else of kiln then runs unchanged inside it: mounts, overlayfs, chown to
//! container ids. Files in the store carry the mapped host ids on disk and the container ids as
//! kiln sees them, so the layers it writes carry the container's ids.
//!
//! The process enters the namespace itself (it keeps its pid, terminal and parent). The namespace
//! is made and held by the store's keeper ([`enter_kept`]), a detached process that later
//! commands find through its pid file and join with one setns; forked helpers of the keeper,
//! still outside, write the maps once it has unshared.

use std::ffi::OsString;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

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
    /// What stopped the keeper that was to make the namespace (its own words: a map tool's
    /// failure reads as it does without a keeper).
    #[error("{0}")]
    Keeper(String),
    #[error("`KILN_USERNS_KEEPER_IDLE_SECS` must be a whole number of seconds, not `{0}`")]
    KeeperIdle(String),
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

/// Whether kiln runs in a user namespace other than the initial one: after [`enter_kept`], or when
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

/// The caller's ids and the id maps rootless mode gives its user namespace.
struct Plan {
    uid_args: Vec<String>,
    gid_args: Vec<String>,
}

fn plan() -> Result<Plan, UsernsError> {
    let uid = nix::unistd::getuid().as_raw();
    let gid = nix::unistd::getgid().as_raw();
    let user = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
        .ok()
        .flatten()
        .map(|u| u.name)
        .unwrap_or_else(|| uid.to_string());
    let uid_ranges = ranges(SUBUID, &user, uid)?;
    let gid_ranges = ranges(SUBGID, &user, uid)?;
    Ok(Plan {
        uid_args: map_args(uid, &uid_ranges),
        gid_args: map_args(gid, &gid_ranges),
    })
}

/// `newuidmap` and `newgidmap` as found on PATH.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Tools {
    newuidmap: PathBuf,
    newgidmap: PathBuf,
}

fn tools() -> Result<Tools, UsernsError> {
    Ok(Tools {
        newuidmap: find_on_path("newuidmap")?,
        newgidmap: find_on_path("newgidmap")?,
    })
}

fn single_threaded() -> Result<(), UsernsError> {
    match threads() {
        1 => Ok(()),
        n => Err(UsernsError::Threaded(n)),
    }
}

/// Setuid and setgid to 0 in the namespace just entered, no supplementary groups.
fn become_root() -> Result<(), UsernsError> {
    RealSys.setresgid(0).map_err(UsernsError::Become)?;
    RealSys.setresuid(0).map_err(UsernsError::Become)?;
    RealSys.setgroups(&[]).map_err(UsernsError::Become)?;
    STATE.store(NESTED, Ordering::Relaxed);
    Ok(())
}

/// Unshares a user namespace and has the id-map tools map it as `plan` says. The process keeps
/// its ids (the caller's, which are 0 in the namespace).
fn unshare_and_map(plan: &Plan, tools: &Tools) -> Result<(), UsernsError> {
    // One child per map tool, forked before the unshare (the tools must run in this, the parent,
    // namespace) and waiting for a byte each on `go`; then each execs its tool at once. Both tools
    // are setuid programs whose start is most of rootless mode's cost, so they run side by side
    // and no helper process stands between them and kiln.
    let tools = [
        MapTool::new("newuidmap", &tools.newuidmap, plan.uid_args.clone())?,
        MapTool::new("newgidmap", &tools.newgidmap, plan.gid_args.clone())?,
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
    match failure {
        Some(e) => Err(e),
        None => Ok(()),
    }
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
    become_root()?;
    Ok(true)
}

/// The environment variable that sets how long a user-namespace keeper waits with no other
/// process in its namespace before it ends, in whole seconds.
pub const KEEPER_IDLE_ENV: &str = "KILN_USERNS_KEEPER_IDLE_SECS";
/// A keeper's idle time when [`KEEPER_IDLE_ENV`] is not set.
pub const KEEPER_IDLE_DEFAULT: Duration = Duration::from_secs(60);
/// The longest a keeper sleeps between two looks at its namespace.
const KEEPER_CHECK_MAX: Duration = Duration::from_secs(10);
/// A keeper's process name (`/proc/PID/comm`), part of what marks it as one.
const KEEPER_NAME: &std::ffi::CStr = c"kiln-userns";
/// The keeper's record in its directory: its pid, then the `newuidmap` and `newgidmap` it used.
const KEEPER_PID_FILE: &str = "userns.pid";
/// Locked shared while a keeper is looked up and joined, exclusively while one is started or ends.
const KEEPER_LOCK_FILE: &str = "userns.lock";
/// `CAP_SYS_PTRACE` (`capabilities(7)`), the one capability a keeper keeps.
const CAP_SYS_PTRACE: u32 = 19;

/// How [`enter_kept`] entered rootless mode's user namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entered {
    /// Joined the namespace of the live keeper with this pid.
    Joined(i32),
    /// Started the keeper with this pid and joined its namespace.
    Started(i32),
    /// No keeper could be used (`why`): joined the namespace of a live container supervisor
    /// (`supervisor`), else made a namespace of this process's own, as without keepers.
    Unkept { why: String, supervisor: Option<i32> },
}

impl std::fmt::Display for Entered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Entered::Joined(pid) => write!(f, "joined the user namespace of keeper {pid}"),
            Entered::Started(pid) => write!(f, "started keeper {pid} and joined its user namespace"),
            Entered::Unkept {
                why,
                supervisor: Some(pid),
            } => write!(
                f,
                "no keeper ({why}); joined the user namespace of supervisor {pid}"
            ),
            Entered::Unkept {
                why,
                supervisor: None,
            } => {
                write!(f, "no keeper ({why}); made a user namespace of its own")
            }
        }
    }
}

/// The idle time [`KEEPER_IDLE_ENV`] sets, else [`KEEPER_IDLE_DEFAULT`].
fn keeper_idle() -> Result<Duration, UsernsError> {
    match std::env::var_os(KEEPER_IDLE_ENV) {
        None => Ok(KEEPER_IDLE_DEFAULT),
        Some(v) => v
            .to_str()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .map(Duration::from_secs)
            .ok_or_else(|| UsernsError::KeeperIdle(v.to_string_lossy().into_owned())),
    }
}

/// Enters rootless mode's user namespace through the keeper of `dir` (a directory of the store,
/// owned by the user): joins the namespace of the live keeper recorded there, else starts one
/// and joins it. A keeper is a small detached process whose only work is to hold the namespace
/// (so later commands join it with one `setns` instead of running the setuid id-map tools, most
/// of rootless mode's start-up cost) and to end once no other process has been in it for its idle
/// time. A new keeper adopts the namespace of the first live supervisor in `supervisors` (the
/// store's detached containers) whose maps are the expected ones, so every command of a store
/// meets its containers. Where `dir` cannot hold a keeper, joins such a supervisor or makes a
/// namespace of this process's own, as kiln did before keepers. Must be called while the
/// process has one thread.
pub fn enter_kept(dir: &Path, supervisors: &dyn Fn() -> Vec<i32>) -> Result<Entered, UsernsError> {
    use nix::fcntl::{Flock, FlockArg};
    let plan = plan()?;
    let tools = tools()?;
    single_threaded()?;
    let idle = keeper_idle()?;
    let unkept = |why: String| -> Result<Entered, UsernsError> {
        for pid in supervisors() {
            if join(pid)? {
                return Ok(Entered::Unkept {
                    why,
                    supervisor: Some(pid),
                });
            }
        }
        unshare_and_map(&plan, &tools)?;
        become_root()?;
        Ok(Entered::Unkept {
            why,
            supervisor: None,
        })
    };
    let file = match open_keeper_lock(dir, true) {
        Ok(f) => f,
        Err(e) => return unkept(format!("`{}`: {e}", dir.join(KEEPER_LOCK_FILE).display())),
    };
    // Shared while the keeper is checked and joined: a keeper ends only under the exclusive lock,
    // after it saw no other process in its namespace, so the one checked here is still there when
    // the setns is done (and then sees this process).
    let locked = match Flock::lock(file, FlockArg::LockShared) {
        Ok(l) => l,
        Err((_, e)) => return unkept(format!("locking `{}`: {e}", dir.join(KEEPER_LOCK_FILE).display())),
    };
    if let Some(pid) = join_keeper(dir, &plan, &tools)? {
        return Ok(Entered::Joined(pid));
    }
    let file = match locked.unlock() {
        Ok(f) => f,
        Err((_, e)) => {
            return unkept(format!(
                "unlocking `{}`: {e}",
                dir.join(KEEPER_LOCK_FILE).display()
            ))
        }
    };
    // Exclusive while a keeper is started: of commands racing here, the first starts one and the
    // others join it.
    let _locked = match Flock::lock(file, FlockArg::LockExclusive) {
        Ok(l) => l,
        Err((_, e)) => return unkept(format!("locking `{}`: {e}", dir.join(KEEPER_LOCK_FILE).display())),
    };
    if let Some(pid) = join_keeper(dir, &plan, &tools)? {
        return Ok(Entered::Joined(pid));
    }
    let pid = start_keeper(dir, &plan, &tools, idle, &supervisors())?;
    match join_keeper(dir, &plan, &tools)? {
        Some(joined) if joined == pid => Ok(Entered::Started(pid)),
        Some(joined) => Ok(Entered::Joined(joined)),
        // Where this process cannot check its keeper (a `/proc` it may not read), it goes on as
        // without keepers; the keeper no one joins ends when idle.
        None => unkept(format!("keeper {pid} started but does not pass the checks")),
    }
}

/// Opens (creating it, and with `make_dir` its directory) the keeper lock file of `dir`.
fn open_keeper_lock(dir: &Path, make_dir: bool) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    if make_dir {
        std::fs::DirBuilder::new()
            .mode(0o700)
            .recursive(true)
            .create(dir)?;
    }
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .mode(0o600)
        .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
        .open(dir.join(KEEPER_LOCK_FILE))
}

/// What a keeper's pid file says: its pid and the tools that mapped its namespace.
fn keeper_record(dir: &Path) -> Option<(i32, Tools)> {
    let text = std::fs::read_to_string(dir.join(KEEPER_PID_FILE)).ok()?;
    let mut lines = text.lines();
    let pid: i32 = lines.next()?.parse().ok()?;
    let newuidmap = PathBuf::from(lines.next()?);
    let newgidmap = PathBuf::from(lines.next()?);
    (pid > 0).then_some((pid, Tools { newuidmap, newgidmap }))
}

/// Joins the namespace of the keeper recorded in `dir` if it is one of ours: alive, this user's,
/// named as a keeper, this very program, its maps those of `plan`, mapped by `tools` (so a
/// change of ranges or of tools on PATH starts a fresh keeper). `None` when there is no such
/// keeper; nothing is changed then.
fn join_keeper(dir: &Path, plan: &Plan, tools: &Tools) -> Result<Option<i32>, UsernsError> {
    let Some((pid, used)) = keeper_record(dir) else {
        return Ok(None);
    };
    if &used != tools {
        return Ok(None);
    }
    let Some(ns) = verified_keeper_ns(pid, plan) else {
        return Ok(None);
    };
    RealSys
        .setns(std::os::fd::AsRawFd::as_raw_fd(&ns), libc::CLONE_NEWUSER)
        .map_err(|source| UsernsError::Join { pid, source })?;
    become_root()?;
    Ok(Some(pid))
}

/// The user namespace of process `pid` if it is a keeper of this user with `plan`'s maps.
fn verified_keeper_ns(pid: i32, plan: &Plan) -> Option<OwnedFd> {
    use std::os::unix::fs::MetadataExt;
    // Held across the checks: if `pid` is still alive at the end, every check was of it.
    let pidfd = sys::pidfd_open(pid).ok()?;
    let proc = PathBuf::from(format!("/proc/{pid}"));
    if std::fs::metadata(&proc).ok()?.uid() != nix::unistd::geteuid().as_raw() {
        return None;
    }
    let comm = std::fs::read(proc.join("comm")).ok()?;
    if comm.strip_suffix(b"\n")? != KEEPER_NAME.to_bytes() {
        return None;
    }
    let (theirs, ours) = (
        std::fs::metadata(proc.join("exe")).ok()?,
        std::fs::metadata("/proc/self/exe").ok()?,
    );
    if (theirs.dev(), theirs.ino()) != (ours.dev(), ours.ino()) {
        return None;
    }
    if !maps_are(pid, plan) {
        return None;
    }
    let ns = OwnedFd::from(std::fs::File::open(proc.join("ns/user")).ok()?);
    alive(&pidfd).then_some(ns)
}

/// Whether the uid and gid maps of `pid`'s user namespace are exactly those of `plan`.
fn maps_are(pid: i32, plan: &Plan) -> bool {
    let is = |name: &str, args: &[String]| {
        std::fs::read_to_string(format!("/proc/{pid}/{name}")).is_ok_and(|text| map_is(&text, args))
    };
    is("uid_map", &plan.uid_args) && is("gid_map", &plan.gid_args)
}

/// Whether `uid_map`-format `text` (the kernel pads its fields) maps exactly what the map-tool
/// arguments `args` ([`map_args`]) ask for, line for line.
fn map_is(text: &str, args: &[String]) -> bool {
    let have: Option<Vec<Vec<u64>>> = text
        .lines()
        .map(|l| l.split_whitespace().map(|f| f.parse().ok()).collect())
        .collect();
    let want: Option<Vec<Vec<u64>>> = args
        .chunks(3)
        .map(|c| c.iter().map(|f| f.parse().ok()).collect())
        .collect();
    have.is_some() && have == want
}

/// Whether the process of `pidfd` has not ended.
fn alive(pidfd: &OwnedFd) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use std::os::fd::AsFd;
    let mut fds = [PollFd::new(pidfd.as_fd(), PollFlags::POLLIN)];
    matches!(poll(&mut fds, PollTimeout::ZERO), Ok(0))
}

/// Starts the keeper of `dir` (detached, through an intermediate process so that it is nobody's
/// child) and waits for its report: its pid once its namespace is mapped and its pid file written,
/// else the error that stopped it.
fn start_keeper(
    dir: &Path,
    plan: &Plan,
    tools: &Tools,
    idle: Duration,
    supervisors: &[i32],
) -> Result<i32, UsernsError> {
    let (report_r, report_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(UsernsError::Pipe)?;
    match sys::fork_single_threaded().map_err(UsernsError::Fork)? {
        None => {
            drop(report_r);
            let _ = RealSys.setsid();
            match sys::fork_single_threaded() {
                Ok(None) => keeper_main(report_w, dir, plan, tools, idle, supervisors),
                Ok(Some(_)) => sys::exit_now(0),
                Err(e) => {
                    let _ =
                        std::fs::File::from(report_w).write_all(UsernsError::Fork(e).to_string().as_bytes());
                    sys::exit_now(1)
                }
            }
        }
        Some(child) => {
            drop(report_w);
            let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(child), None);
            let mut report = String::new();
            let _ = std::fs::File::from(report_r).read_to_string(&mut report);
            match report.strip_prefix("ok ").and_then(|p| p.trim().parse().ok()) {
                Some(pid) => Ok(pid),
                None if report.is_empty() => Err(UsernsError::Keeper(
                    "kiln's user-namespace keeper ended without a word".to_owned(),
                )),
                None => Err(UsernsError::Keeper(report)),
            }
        }
    }
}

/// The keeper: detaches, makes (or adopts) the namespace, writes its pid file, reports `ok PID`
/// or the error on `report`, then sleeps and looks until it is idle. Never returns.
fn keeper_main(
    report: OwnedFd,
    dir: &Path,
    plan: &Plan,
    tools: &Tools,
    idle: Duration,
    supervisors: &[i32],
) -> ! {
    let fail = |report: OwnedFd, message: String| -> ! {
        let _ = std::fs::File::from(report).write_all(message.as_bytes());
        sys::exit_now(1)
    };
    let report = match sys::detach_keeping(report) {
        Ok(r) => r,
        // The report pipe is gone with the rest: the command sees it close without a word.
        Err(_) => sys::exit_now(1),
    };
    let _ = nix::sys::prctl::set_name(KEEPER_NAME);
    // The command's signal handlers are not the keeper's: SIGTERM and SIGINT end it.
    let _ = RealSys.reset_signals();
    if !adopt(supervisors, plan) {
        if let Err(e) = unshare_and_map(plan, tools) {
            fail(report, e.to_string());
        }
    }
    // Of its capabilities in the namespace it keeps only CAP_SYS_PTRACE: the kernel lets one
    // process see another's namespaces (`/proc/PID/ns`) in the namespace they share only if it has
    // every capability of the other or that one, and the commands it looks for are root there.
    let ptrace = 1u64 << CAP_SYS_PTRACE;
    let _ = RealSys.capset(ptrace, ptrace, 0);
    let me = std::process::id() as i32;
    let record = format!(
        "{me}\n{}\n{}\n",
        tools.newuidmap.display(),
        tools.newgidmap.display()
    );
    let (tmp, path) = (
        dir.join(format!("{KEEPER_PID_FILE}.{me}")),
        dir.join(KEEPER_PID_FILE),
    );
    if let Err(e) = std::fs::write(&tmp, record).and_then(|()| std::fs::rename(&tmp, &path)) {
        let _ = std::fs::remove_file(&tmp);
        fail(report, format!("failed to write `{}`: {e}", path.display()));
    }
    let _ = std::fs::File::from(report).write_all(format!("ok {me}").as_bytes());
    keep(dir, me, idle)
}

/// Moves the keeper into the user namespace of the first of `supervisors` with `plan`'s maps.
fn adopt(supervisors: &[i32], plan: &Plan) -> bool {
    use std::os::unix::fs::MetadataExt;
    supervisors.iter().any(|&pid| {
        let Ok(pidfd) = sys::pidfd_open(pid) else {
            return false;
        };
        let ours = std::fs::metadata(format!("/proc/{pid}"))
            .is_ok_and(|m| m.uid() == nix::unistd::geteuid().as_raw());
        if !ours || !maps_are(pid, plan) {
            return false;
        }
        let Ok(ns) = std::fs::File::open(format!("/proc/{pid}/ns/user")) else {
            return false;
        };
        alive(&pidfd)
            && RealSys
                .setns(std::os::fd::AsRawFd::as_raw_fd(&ns), libc::CLONE_NEWUSER)
                .is_ok()
    })
}

/// The keeper's life after its report: every `idle / 4` (at most [`KEEPER_CHECK_MAX`]) it looks
/// for other processes in its namespace; when it has seen none for `idle`, or its pid file no
/// longer names it (the store was removed, a newer keeper replaced it), it removes its pid file
/// if that still names it and ends, under the exclusive lock.
fn keep(dir: &Path, me: i32, idle: Duration) -> ! {
    use nix::fcntl::{Flock, FlockArg};
    let check = (idle / 4).clamp(Duration::from_millis(250), KEEPER_CHECK_MAX);
    let Some(own) = ns_id("/proc/self/ns/user") else {
        sys::exit_now(1)
    };
    let mut busy = Instant::now();
    loop {
        std::thread::sleep(check);
        let named = || keeper_record(dir).is_some_and(|(pid, _)| pid == me);
        if others_in(own, me) {
            busy = Instant::now();
            continue;
        }
        if named() && busy.elapsed() < idle {
            continue;
        }
        let Ok(file) = open_keeper_lock(dir, false) else {
            sys::exit_now(0)
        };
        let Ok(_locked) = Flock::lock(file, FlockArg::LockExclusive) else {
            sys::exit_now(0)
        };
        // No command is between checking this keeper and joining it now: a last look.
        if others_in(own, me) {
            busy = Instant::now();
            continue;
        }
        if named() {
            let _ = std::fs::remove_file(dir.join(KEEPER_PID_FILE));
        }
        sys::exit_now(0)
    }
}

/// The device and inode of a namespace file.
fn ns_id(path: &str) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// Whether a process other than `me` is in the user namespace `own` (of the processes whose
/// namespace this one may see: the user's own).
fn others_in(own: (u64, u64), me: i32) -> bool {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return true;
    };
    entries.flatten().any(|e| {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
            return false;
        };
        pid != me && ns_id(&format!("/proc/{pid}/ns/user")) == Some(own)
    })
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
    fn a_keeper_map_must_be_exactly_the_one_asked_for() {
        let args: Vec<String> = ["0", "1002", "1", "1", "165536", "65536"]
            .map(String::from)
            .to_vec();
        let kernel = "         0       1002          1\n         1     165536      65536\n";
        assert!(map_is(kernel, &args));
        assert!(!map_is("         0       1002          1\n", &args));
        assert!(!map_is(
            "         0       1002          1\n         1     165536      65535\n",
            &args
        ));
        assert!(!map_is(
            &format!("{kernel}     65537     300000         10\n"),
            &args
        ));
        assert!(!map_is("         0          0 4294967295\n", &args));
    }

    #[test]
    fn initial_map_is_the_identity_of_all_ids() {
        assert!(is_initial_map("         0          0 4294967295\n"));
        assert!(!is_initial_map("0 1001 1\n1 100000 65536\n"));
        assert!(!is_initial_map(""));
    }
}
