//! Resource limits through a cgroup of the container's own (`--memory`, `--cpus`, `--pids-limit`).
//!
//! Hosts differ: a pure cgroup v2 host has one unified hierarchy at `/sys/fs/cgroup`; a v1 host
//! has one hierarchy per controller (`/sys/fs/cgroup/memory`, `.../cpu,cpuacct`, `.../pids`); a
//! hybrid host (the one kiln is developed on) has the v1 hierarchies plus a v2 mount at
//! `/sys/fs/cgroup/unified` that holds no controller of interest. [`Layout::detect`] reads
//! `/proc/self/mountinfo` and finds, for each of `memory`, `cpu` and `pids`, the hierarchy that
//! offers it: a v1 mount whose options name it, else a v2 mount whose `cgroup.controllers` lists
//! it (a controller bound to a v1 hierarchy never shows up in v2).
//!
//! A container's cgroup is `<hierarchy>/kiln/<name>` in each hierarchy used (Docker's cgroupfs
//! driver uses `/docker/<id>` the same way). [`Cgroup::create`] makes the dirs and writes the
//! limits; the container's first process joins by writing `0` to each `cgroup.procs` before it
//! execs, so everything it starts is inside; [`Cgroup::remove`] (or [`remove`] by name, for a
//! supervisor that lost its handle) removes the dirs once the processes are gone, retrying briefly
//! while the kernel drains the last tasks. The container does not get a cgroup namespace: its
//! `/proc/self/cgroup` names `/kiln/<name>`, as with Docker on v1 hosts.

use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::spec::CgroupSpec;

/// The directory under each hierarchy's root that holds kiln's container cgroups.
pub const PARENT: &str = "kiln";

/// Docker's smallest `--memory`: 6 MiB.
pub const MIN_MEMORY: u64 = 6 * 1024 * 1024;

/// The CFS period kiln uses for `--cpus`, in microseconds (Docker's).
pub const CPU_PERIOD_US: u64 = 100_000;

/// How long [`Cgroup::remove`] retries a busy cgroup.
const REMOVE_PATIENCE: Duration = Duration::from_secs(2);

/// Errors of creating, filling and removing cgroups.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// Reading a file of `/proc` or of a cgroup hierarchy failed.
    #[error("failed to read `{path}`")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The cgroup name would leave kiln's parent dir.
    #[error("invalid cgroup name {name:?}: it must be non-empty, without `/`, and not `.` or `..`")]
    InvalidName {
        /// The name.
        name: String,
    },
    /// A limit is out of range.
    #[error("invalid {what} limit {value}: {reason}")]
    InvalidLimit {
        /// `memory`, `cpus` or `pids`.
        what: &'static str,
        /// The value given.
        value: String,
        /// Why it is refused.
        reason: &'static str,
    },
    /// No mounted hierarchy offers a controller a limit needs.
    #[error("no cgroup hierarchy offers the `{controller}` controller (looked at the cgroup mounts in `/proc/self/mountinfo`)")]
    NoController {
        /// The controller.
        controller: &'static str,
    },
    /// Creating a cgroup dir failed.
    #[error("failed to create cgroup `{path}`")]
    Create {
        /// The dir.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Writing a cgroup file failed.
    #[error("failed to write {value:?} to `{path}`")]
    Write {
        /// The file.
        path: PathBuf,
        /// What was written.
        value: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Removing a cgroup dir failed (after retrying while it was busy).
    #[error("failed to remove cgroup `{path}`")]
    Remove {
        /// The dir.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// The controllers kiln sets limits with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Controller {
    /// `memory`.
    Memory,
    /// `cpu`.
    Cpu,
    /// `pids`.
    Pids,
}

impl Controller {
    /// The kernel's name of the controller.
    pub fn name(self) -> &'static str {
        match self {
            Controller::Memory => "memory",
            Controller::Cpu => "cpu",
            Controller::Pids => "pids",
        }
    }

    const ALL: [Controller; 3] = [Controller::Memory, Controller::Cpu, Controller::Pids];
}

/// The cgroup filesystem version of a hierarchy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// cgroup v1: one hierarchy per controller (or per co-mounted group).
    V1,
    /// cgroup v2: the unified hierarchy.
    V2,
}

/// One mounted cgroup hierarchy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hierarchy {
    /// Where it is mounted.
    pub mount: PathBuf,
    /// v1 or v2.
    pub version: Version,
    /// v1: the mount's options (controllers such as `memory`, `cpu,cpuacct`, `name=systemd`);
    /// v2: the controllers of its `cgroup.controllers`.
    pub controllers: Vec<String>,
}

/// A line of `/proc/self/mountinfo`, reduced to what cgroup detection needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// The mount point.
    pub point: PathBuf,
    /// The filesystem type (`cgroup`, `cgroup2`, ...).
    pub fstype: String,
    /// The per-superblock options, split at commas.
    pub super_options: Vec<String>,
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 4 <= bytes.len() {
            let digits = &bytes[i + 1..i + 4];
            if digits.iter().all(|d| (b'0'..=b'7').contains(d)) {
                let v = digits.iter().fold(0u32, |acc, d| acc * 8 + u32::from(d - b'0'));
                if let Ok(v) = u8::try_from(v) {
                    out.push(v);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses `/proc/self/mountinfo`, skipping malformed lines.
pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    let mut out = Vec::new();
    for line in text.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let Some(sep) = fields.iter().position(|f| *f == "-") else {
            continue;
        };
        if sep < 5 || fields.len() < sep + 4 {
            continue;
        }
        out.push(MountEntry {
            point: PathBuf::from(unescape(fields[4])),
            fstype: fields[sep + 1].to_string(),
            super_options: fields[sep + 3].split(',').map(str::to_string).collect(),
        });
    }
    out
}

/// The cgroup hierarchies of the host and which one offers each controller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// Every mounted cgroup hierarchy.
    pub hierarchies: Vec<Hierarchy>,
}

impl Layout {
    /// Reads `/proc/self/mountinfo` and the `cgroup.controllers` of v2 mounts.
    pub fn detect() -> Result<Layout, CgroupError> {
        let path = PathBuf::from("/proc/self/mountinfo");
        let text = std::fs::read_to_string(&path).map_err(|source| CgroupError::Read { path, source })?;
        let mounts = parse_mountinfo(&text);
        Layout::from_mounts(&mounts, |mount| {
            let path = mount.join("cgroup.controllers");
            std::fs::read_to_string(&path)
                .map(|t| t.split_whitespace().map(str::to_string).collect())
                .map_err(|source| CgroupError::Read { path, source })
        })
    }

    /// The layout for these mounts; `v2_controllers` lists the controllers of a v2 mount.
    pub fn from_mounts(
        mounts: &[MountEntry],
        v2_controllers: impl Fn(&Path) -> Result<Vec<String>, CgroupError>,
    ) -> Result<Layout, CgroupError> {
        let mut hierarchies: Vec<Hierarchy> = Vec::new();
        for m in mounts {
            let h = match m.fstype.as_str() {
                "cgroup" => Hierarchy {
                    mount: m.point.clone(),
                    version: Version::V1,
                    controllers: m.super_options.clone(),
                },
                "cgroup2" => Hierarchy {
                    mount: m.point.clone(),
                    version: Version::V2,
                    controllers: v2_controllers(&m.point)?,
                },
                _ => continue,
            };
            // A hierarchy mounted twice (bind mounts) counts once, at its first mount point.
            if !hierarchies
                .iter()
                .any(|x| x.version == h.version && x.controllers == h.controllers)
            {
                hierarchies.push(h);
            }
        }
        Ok(Layout { hierarchies })
    }

    /// The hierarchy that offers `controller`: a v1 one first (a controller bound to v1 is
    /// unavailable in v2), else a v2 one.
    pub fn for_controller(&self, controller: Controller) -> Option<&Hierarchy> {
        let name = controller.name();
        let has = |h: &&Hierarchy| h.controllers.iter().any(|c| c == name);
        self.hierarchies
            .iter()
            .filter(|h| h.version == Version::V1)
            .find(has)
            .or_else(|| {
                self.hierarchies
                    .iter()
                    .filter(|h| h.version == Version::V2)
                    .find(has)
            })
    }

    /// The hierarchy a `/proc/PID/cgroup` line refers to: `0::/path` is the v2 one,
    /// `N:memory:/path` (or `N:cpu,cpuacct:`, `N:name=systemd:`) the v1 one mounted with those
    /// options.
    fn for_proc_line<'a>(&'a self, controllers: &str) -> Option<&'a Hierarchy> {
        if controllers.is_empty() {
            return self.hierarchies.iter().find(|h| h.version == Version::V2);
        }
        self.hierarchies.iter().find(|h| {
            h.version == Version::V1
                && controllers
                    .split(',')
                    .all(|c| h.controllers.iter().any(|o| o == c))
        })
    }

    /// The `cgroup.procs` files a process must write itself to in order to share the cgroups of
    /// the process whose `/proc/PID/cgroup` is `theirs`, skipping hierarchies where `ours` (the
    /// caller's own) is already the same.
    pub fn join_targets(&self, theirs: &str, ours: &str) -> Vec<PathBuf> {
        let parse = |text: &str| -> Vec<(String, String)> {
            text.lines()
                .filter_map(|l| {
                    let mut parts = l.splitn(3, ':');
                    let _id = parts.next()?;
                    let controllers = parts.next()?.to_string();
                    let path = parts.next()?.to_string();
                    Some((controllers, path))
                })
                .collect()
        };
        let ours = parse(ours);
        let mut out = Vec::new();
        for (controllers, path) in parse(theirs) {
            if ours.iter().any(|(c, p)| *c == controllers && *p == path) {
                continue;
            }
            let Some(h) = self.for_proc_line(&controllers) else {
                continue;
            };
            let file = h.mount.join(path.trim_start_matches('/')).join("cgroup.procs");
            if !out.contains(&file) {
                out.push(file);
            }
        }
        out
    }
}

/// The files and values that set `spec`'s limits in a hierarchy of `version` offering
/// `controller`, in the order they must be written. Values are validated by [`validate`].
pub fn limit_writes(
    spec: &CgroupSpec,
    controller: Controller,
    version: Version,
) -> Vec<(&'static str, String)> {
    let mut out = Vec::new();
    match (controller, version) {
        (Controller::Memory, _) => {
            if let Some(m) = spec.memory {
                match version {
                    // Docker's default swap limit with `--memory` alone: as much swap as memory.
                    Version::V1 => {
                        out.push(("memory.limit_in_bytes", m.to_string()));
                        out.push(("memory.memsw.limit_in_bytes", m.saturating_mul(2).to_string()));
                    }
                    Version::V2 => {
                        out.push(("memory.max", m.to_string()));
                        out.push(("memory.swap.max", m.to_string()));
                    }
                }
            }
        }
        (Controller::Cpu, _) => {
            if let Some(cpus) = spec.cpus {
                let quota = ((cpus * CPU_PERIOD_US as f64).round() as u64).max(1000);
                match version {
                    Version::V1 => {
                        out.push(("cpu.cfs_period_us", CPU_PERIOD_US.to_string()));
                        out.push(("cpu.cfs_quota_us", quota.to_string()));
                    }
                    Version::V2 => out.push(("cpu.max", format!("{quota} {CPU_PERIOD_US}"))),
                }
            }
        }
        (Controller::Pids, _) => {
            if let Some(p) = spec.pids {
                let value = if p <= 0 { "max".to_string() } else { p.to_string() };
                out.push(("pids.max", value));
            }
        }
    }
    out
}

/// Checks the name and the limits of `spec`.
pub fn validate(spec: &CgroupSpec) -> Result<(), CgroupError> {
    let n = &spec.name;
    if n.is_empty() || n.contains('/') || n == "." || n == ".." || n.contains('\0') {
        return Err(CgroupError::InvalidName { name: n.clone() });
    }
    if let Some(m) = spec.memory {
        if m < MIN_MEMORY {
            return Err(CgroupError::InvalidLimit {
                what: "memory",
                value: m.to_string(),
                reason: "the minimum memory limit allowed is 6MB",
            });
        }
    }
    if let Some(c) = spec.cpus {
        if !c.is_finite() || c <= 0.0 {
            return Err(CgroupError::InvalidLimit {
                what: "cpus",
                value: c.to_string(),
                reason: "it must be a positive number of CPUs",
            });
        }
    }
    Ok(())
}

/// Files whose absence is fine: swap accounting may be off.
fn optional(file: &str) -> bool {
    matches!(file, "memory.memsw.limit_in_bytes" | "memory.swap.max")
}

fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    std::fs::write(path, value).map_err(|source| CgroupError::Write {
        path: path.to_path_buf(),
        value: value.to_string(),
        source,
    })
}

fn mkdir(path: &Path) -> Result<(), CgroupError> {
    match std::fs::create_dir(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(source) => Err(CgroupError::Create {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// A container's cgroup: one dir per hierarchy used.
#[derive(Debug)]
pub struct Cgroup {
    name: String,
    dirs: Vec<PathBuf>,
}

impl Cgroup {
    /// Creates `kiln/<name>` in the hierarchies offering `memory`, `cpu` and `pids` and writes
    /// `spec`'s limits. A limit whose controller no hierarchy offers is an error; a controller
    /// without a limit is used if available (so the container's processes can be listed and
    /// joined) and skipped otherwise. An existing cgroup of the same name is reused.
    pub fn create(spec: &CgroupSpec) -> Result<Cgroup, CgroupError> {
        validate(spec)?;
        let layout = Layout::detect()?;
        Cgroup::create_in(&layout, spec)
    }

    /// [`Cgroup::create`] with a known layout.
    pub fn create_in(layout: &Layout, spec: &CgroupSpec) -> Result<Cgroup, CgroupError> {
        validate(spec)?;
        let mut cgroup = Cgroup {
            name: spec.name.clone(),
            dirs: Vec::new(),
        };
        for controller in Controller::ALL {
            let Some(h) = layout.for_controller(controller) else {
                let writes = limit_writes(spec, controller, Version::V2);
                if writes.is_empty() {
                    continue;
                }
                // Remove what was made so far before failing.
                let _ = cgroup.remove_dirs();
                return Err(CgroupError::NoController {
                    controller: controller.name(),
                });
            };
            let parent = h.mount.join(PARENT);
            let dir = parent.join(&spec.name);
            let result = (|| {
                mkdir(&parent)?;
                if h.version == Version::V2 {
                    // Controllers must be enabled for the children of every ancestor.
                    let enable = format!("+{}", controller.name());
                    write(&h.mount.join("cgroup.subtree_control"), &enable)?;
                    write(&parent.join("cgroup.subtree_control"), &enable)?;
                }
                mkdir(&dir)?;
                if !cgroup.dirs.contains(&dir) {
                    cgroup.dirs.push(dir.clone());
                }
                for (file, value) in limit_writes(spec, controller, h.version) {
                    let path = dir.join(file);
                    if optional(file) && !path.exists() {
                        continue;
                    }
                    write(&path, &value)?;
                }
                Ok(())
            })();
            if let Err(e) = result {
                let _ = cgroup.remove_dirs();
                return Err(e);
            }
        }
        Ok(cgroup)
    }

    /// The cgroup's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The cgroup's dirs, one per hierarchy.
    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    /// The `cgroup.procs` files a process writes itself to in order to join.
    pub fn procs_files(&self) -> Vec<PathBuf> {
        self.dirs.iter().map(|d| d.join("cgroup.procs")).collect()
    }

    fn remove_dirs(&mut self) -> Result<(), CgroupError> {
        let mut first_err = None;
        for dir in std::mem::take(&mut self.dirs) {
            if let Err(e) = remove_dir_patiently(&dir) {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// How many processes the kernel's OOM killer killed in this cgroup: `oom_kill` of
    /// `memory.events` (v2) or `memory.oom_control` (v1, kernel 4.13+); 0 where neither exists.
    pub fn oom_kills(&self) -> u64 {
        self.dirs
            .iter()
            .flat_map(|d| [d.join("memory.events"), d.join("memory.oom_control")])
            .filter_map(|f| std::fs::read_to_string(f).ok())
            .map(|text| parse_oom_kills(&text))
            .sum()
    }

    /// Removes the cgroup's dirs, waiting briefly while the kernel drains exiting tasks.
    pub fn remove(mut self) -> Result<(), CgroupError> {
        self.remove_dirs()
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        let _ = self.remove_dirs();
    }
}

/// The `oom_kill N` line of a `memory.events` / `memory.oom_control` file.
fn parse_oom_kills(text: &str) -> u64 {
    text.lines()
        .filter_map(|l| l.strip_prefix("oom_kill "))
        .filter_map(|n| n.trim().parse::<u64>().ok())
        .sum()
}

fn remove_dir_patiently(dir: &Path) -> Result<(), CgroupError> {
    let deadline = Instant::now() + REMOVE_PATIENCE;
    loop {
        match std::fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(source) => {
                return Err(CgroupError::Remove {
                    path: dir.to_path_buf(),
                    source,
                })
            }
        }
    }
}

/// Removes the cgroup `name` from every hierarchy (for a supervisor cleaning up after a container
/// it no longer holds a [`Cgroup`] for). A cgroup that does not exist is fine.
pub fn remove(name: &str) -> Result<(), CgroupError> {
    validate(&CgroupSpec {
        name: name.to_string(),
        ..CgroupSpec::default()
    })?;
    let layout = Layout::detect()?;
    let mut first_err = None;
    for h in &layout.hierarchies {
        let dir = h.mount.join(PARENT).join(name);
        if let Err(e) = remove_dir_patiently(&dir) {
            first_err.get_or_insert(e);
        }
    }
    first_err.map_or(Ok(()), Err)
}

/// The `cgroup.procs` files a process must write itself to in order to join the cgroups of
/// process `pid` (those that differ from the caller's).
pub fn join_targets_of(pid: i32) -> Result<Vec<PathBuf>, CgroupError> {
    let read =
        |path: PathBuf| std::fs::read_to_string(&path).map_err(|source| CgroupError::Read { path, source });
    let theirs = read(PathBuf::from(format!("/proc/{pid}/cgroup")))?;
    let ours = read(PathBuf::from("/proc/self/cgroup"))?;
    Ok(Layout::detect()?.join_targets(&theirs, &ours))
}

#[cfg(test)]
mod tests {

    #[test]
    fn oom_kill_counters_of_both_versions() {
        assert_eq!(
            parse_oom_kills("low 0\nhigh 0\nmax 3\noom 2\noom_kill 2\noom_group_kill 0\n"),
            2
        );
        assert_eq!(
            parse_oom_kills("oom_kill_disable 0\nunder_oom 0\noom_kill 1\n"),
            1
        );
        assert_eq!(parse_oom_kills("oom_kill_disable 0\nunder_oom 0\n"), 0);
    }

    use super::*;

    const HYBRID: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    const PURE_V2: &str = "\
26 21 0:23 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate
27 21 0:24 / /mnt/with\\040space rw - tmpfs tmpfs rw
";

    fn hybrid() -> Layout {
        Layout::from_mounts(&parse_mountinfo(HYBRID), |_| Ok(vec!["hugetlb".to_string()])).unwrap()
    }

    #[test]
    fn mountinfo_parses_optional_fields_and_escapes() {
        let m = parse_mountinfo(PURE_V2);
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].point, PathBuf::from("/sys/fs/cgroup"));
        assert_eq!(m[0].fstype, "cgroup2");
        assert_eq!(m[0].super_options, vec!["rw", "nsdelegate"]);
        assert_eq!(m[1].point, PathBuf::from("/mnt/with space"));
    }

    #[test]
    fn hybrid_hosts_use_v1_for_every_controller() {
        let l = hybrid();
        for (c, dir) in [
            (Controller::Memory, "/sys/fs/cgroup/memory"),
            (Controller::Cpu, "/sys/fs/cgroup/cpu"),
            (Controller::Pids, "/sys/fs/cgroup/pids"),
        ] {
            let h = l.for_controller(c).unwrap();
            assert_eq!((h.mount.as_path(), h.version), (Path::new(dir), Version::V1));
        }
    }

    #[test]
    fn pure_v2_hosts_use_the_unified_hierarchy() {
        let l = Layout::from_mounts(&parse_mountinfo(PURE_V2), |_| {
            Ok(vec!["cpu".into(), "memory".into(), "pids".into()])
        })
        .unwrap();
        let h = l.for_controller(Controller::Memory).unwrap();
        assert_eq!(
            (h.mount.as_path(), h.version),
            (Path::new("/sys/fs/cgroup"), Version::V2)
        );
        let none = Layout::from_mounts(&parse_mountinfo(PURE_V2), |_| Ok(vec![])).unwrap();
        assert!(none.for_controller(Controller::Pids).is_none());
    }

    #[test]
    fn limits_per_version() {
        let spec = CgroupSpec {
            name: "c".into(),
            memory: Some(64 << 20),
            cpus: Some(0.5),
            pids: Some(20),
        };
        assert_eq!(
            limit_writes(&spec, Controller::Memory, Version::V1),
            vec![
                ("memory.limit_in_bytes", "67108864".to_string()),
                ("memory.memsw.limit_in_bytes", "134217728".to_string())
            ]
        );
        assert_eq!(
            limit_writes(&spec, Controller::Memory, Version::V2)[0],
            ("memory.max", "67108864".to_string())
        );
        assert_eq!(
            limit_writes(&spec, Controller::Cpu, Version::V1),
            vec![
                ("cpu.cfs_period_us", "100000".to_string()),
                ("cpu.cfs_quota_us", "50000".to_string())
            ]
        );
        assert_eq!(
            limit_writes(&spec, Controller::Cpu, Version::V2),
            vec![("cpu.max", "50000 100000".to_string())]
        );
        assert_eq!(
            limit_writes(&spec, Controller::Pids, Version::V2),
            vec![("pids.max", "20".to_string())]
        );
        let unlimited = CgroupSpec {
            pids: Some(-1),
            ..spec.clone()
        };
        assert_eq!(
            limit_writes(&unlimited, Controller::Pids, Version::V1),
            vec![("pids.max", "max".to_string())]
        );
    }

    #[test]
    fn bad_specs_are_refused() {
        let ok = CgroupSpec {
            name: "abc".into(),
            ..Default::default()
        };
        assert!(validate(&ok).is_ok());
        for name in ["", "..", "a/b"] {
            let s = CgroupSpec {
                name: name.into(),
                ..Default::default()
            };
            assert!(matches!(validate(&s), Err(CgroupError::InvalidName { .. })));
        }
        let small = CgroupSpec {
            memory: Some(1 << 20),
            ..ok.clone()
        };
        assert!(validate(&small)
            .unwrap_err()
            .to_string()
            .contains("minimum memory limit allowed is 6MB"));
        let cpus = CgroupSpec {
            cpus: Some(0.0),
            ..ok
        };
        assert!(matches!(
            validate(&cpus),
            Err(CgroupError::InvalidLimit { what: "cpus", .. })
        ));
    }

    #[test]
    fn join_targets_skip_shared_hierarchies() {
        let l = hybrid();
        let theirs = "9:name=systemd:/\n8:pids:/kiln/x\n4:memory:/kiln/x\n1:cpu:/kiln/x\n0::/\n";
        let ours = "9:name=systemd:/\n8:pids:/\n4:memory:/user\n1:cpu:/\n0::/\n";
        assert_eq!(
            l.join_targets(theirs, ours),
            vec![
                PathBuf::from("/sys/fs/cgroup/pids/kiln/x/cgroup.procs"),
                PathBuf::from("/sys/fs/cgroup/memory/kiln/x/cgroup.procs"),
                PathBuf::from("/sys/fs/cgroup/cpu/kiln/x/cgroup.procs"),
            ]
        );
    }
}
