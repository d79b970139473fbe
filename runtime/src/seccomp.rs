//! Docker's seccomp profiles: the JSON format, moby's rules for which entries apply to a
//! container, and their compilation to a BPF program that the container's first process
//! installs just before it executes the command.
//!
//! [`DEFAULT_PROFILE`] is the data of moby's `profiles/seccomp/default.json`, embedded as it is
//! published: an allow-list whose default action is `EPERM`, with argument filters (`socket`,
//! `personality`, `clone`) and entries that apply only with or without a capability
//! (`includes.caps`, `excludes.caps`), an architecture, or a minimum kernel. [`Profile::select`] applies
//! those conditions for one container (its capability set, this machine's architecture and
//! kernel) as Docker does when it creates a container; [`compile`] hands the selected rules to
//! libseccomp, the library runc builds Docker's filters with, so the argument comparisons,
//! per-rule actions (`clone3` answers `ENOSYS`) and the x86/x32 sub-architectures mean exactly
//! what they mean under Docker. The result is exported as raw BPF once per profile and
//! capability set ([`program`] caches it for the life of the process, and in [`DISK_CACHE`] for
//! the life of the boot, since libseccomp takes 35-50 ms over Docker's profile and `kiln run`
//! starts one container per process): a build runs many steps with the same set, and the child
//! that installs it only makes one system call ([`crate::sys::Sys::seccomp_filter`]).
//!
//! `seccompiler` (pure Rust) was not taken: a filter of it has one action for every match, so it
//! cannot express `clone3`'s `ENOSYS` next to the allow-list, nor sub-architectures.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::io::{Read, Seek};
use std::sync::{Arc, Mutex, OnceLock};

use serde::Deserialize;

/// moby's `profiles/seccomp/default.json`.
pub const DEFAULT_PROFILE: &str = include_str!("seccomp/default.json");

/// Compiled programs, one file per profile, capability set, machine and libseccomp version:
/// `<sha256>.bpf` holding `KSC1`, the filter flags and the instructions. A tmpfs: a new boot
/// (perhaps a new kernel) compiles again. Root's only, like the rest of `/run/kiln`.
pub const DISK_CACHE: &str = "/run/kiln/seccomp";

/// `CAP_SYS_ADMIN`: installing a filter without `no_new_privs` needs it.
pub const CAP_SYS_ADMIN: u32 = 21;

/// Errors of reading, selecting and compiling seccomp profiles, and of `--security-opt`.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// The profile is not valid JSON of Docker's seccomp format.
    #[error("invalid seccomp profile {source_name}: {detail}")]
    Parse {
        /// Where the profile came from (a file name, or "default").
        source_name: String,
        /// What is wrong.
        detail: String,
    },
    /// A value of the profile has no meaning for kiln (an unknown action, operator, arch...).
    #[error("invalid seccomp profile {source_name}: {detail}")]
    Invalid {
        /// Where the profile came from.
        source_name: String,
        /// What is wrong.
        detail: String,
    },
    /// libseccomp refused a rule or the export.
    #[error("failed to compile seccomp profile {source_name}: {what}")]
    Compile {
        /// Where the profile came from.
        source_name: String,
        /// The step that failed.
        what: String,
        /// libseccomp's error.
        #[source]
        source: libseccomp::error::SeccompError,
    },
    /// Creating or reading the buffer of the exported program failed.
    #[error("failed to export the compiled seccomp program")]
    Export(#[source] std::io::Error),
    /// A `--security-opt` value kiln does not know or implement.
    #[error("invalid --security-opt {value:?}: {detail}")]
    SecurityOpt {
        /// The value as given.
        value: String,
        /// Why.
        detail: String,
    },
}

/// Which seccomp filter a container gets.
#[derive(Debug, Clone, Default)]
pub enum SeccompPolicy {
    /// Docker's default profile ([`DEFAULT_PROFILE`]).
    #[default]
    Default,
    /// No filter (`--security-opt seccomp=unconfined`).
    Unconfined,
    /// A profile of Docker's format (`--security-opt seccomp=FILE.json`).
    Profile(Arc<Profile>),
}

impl PartialEq for SeccompPolicy {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (SeccompPolicy::Default, SeccompPolicy::Default) => true,
            (SeccompPolicy::Unconfined, SeccompPolicy::Unconfined) => true,
            (SeccompPolicy::Profile(a), SeccompPolicy::Profile(b)) => a.digest == b.digest,
            _ => false,
        }
    }
}

/// `docker run --security-opt` values kiln implements.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SecurityOpts {
    /// `no-new-privileges[=true]`.
    pub no_new_privileges: bool,
    /// `seccomp=unconfined` or `seccomp=PROFILE` (the JSON text itself, as the Docker client
    /// sends it to the daemon after reading the file).
    pub seccomp: SeccompPolicy,
}

/// Parses `--security-opt` values as `docker run` takes them: `no-new-privileges`,
/// `no-new-privileges=true|false` (also with `:`), `seccomp=unconfined`, `seccomp=JSON` (the
/// profile's text; the CLI reads the file). Other options (`apparmor=`, `label=`,
/// `systempaths=`...) are an error: kiln does not implement them.
pub fn parse_security_opts(values: &[String]) -> Result<SecurityOpts, SeccompError> {
    let mut out = SecurityOpts::default();
    for value in values {
        let bad = |detail: &str| SeccompError::SecurityOpt {
            value: value.clone(),
            detail: detail.to_string(),
        };
        let (key, val) = match value.split_once(['=', ':']) {
            Some((k, v)) => (k, Some(v)),
            None => (value.as_str(), None),
        };
        match (key, val) {
            ("no-new-privileges", None) => out.no_new_privileges = true,
            ("no-new-privileges", Some(v)) => {
                out.no_new_privileges = match v {
                    "true" => true,
                    "false" => false,
                    _ => return Err(bad("expected no-new-privileges=true or =false")),
                }
            }
            ("seccomp", Some("unconfined")) => out.seccomp = SeccompPolicy::Unconfined,
            ("seccomp", Some(json)) if json.trim_start().starts_with('{') => {
                out.seccomp =
                    SeccompPolicy::Profile(Arc::new(Profile::parse(json, "given with --security-opt")?));
            }
            ("seccomp", _) => return Err(bad("expected seccomp=unconfined or seccomp=PROFILE.json")),
            _ => {
                return Err(bad(
                    "kiln implements no-new-privileges and seccomp=unconfined|PROFILE.json only",
                ))
            }
        }
    }
    Ok(out)
}

/// A seccomp profile in Docker's JSON format.
#[derive(Debug)]
pub struct Profile {
    raw: RawProfile,
    /// Where it came from, for messages.
    pub source_name: String,
    digest: u64,
    /// sha256 of the text, for [`DISK_CACHE`].
    sha256: [u8; 32],
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawProfile {
    default_action: String,
    #[serde(default)]
    default_errno_ret: Option<u32>,
    #[serde(default)]
    architectures: Option<Vec<String>>,
    #[serde(default)]
    arch_map: Option<Vec<ArchMap>>,
    #[serde(default)]
    syscalls: Option<Vec<RawSyscall>>,
    #[serde(default)]
    flags: Option<Vec<String>>,
    #[serde(default)]
    listener_path: Option<String>,
    #[serde(default)]
    listener_metadata: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ArchMap {
    architecture: String,
    #[serde(default)]
    sub_architectures: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawSyscall {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    names: Option<Vec<String>>,
    action: String,
    #[serde(default)]
    errno_ret: Option<u32>,
    #[serde(default)]
    args: Option<Vec<RawArg>>,
    #[serde(default)]
    comment: Option<String>,
    #[serde(default)]
    includes: Option<Conditions>,
    #[serde(default)]
    excludes: Option<Conditions>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawArg {
    index: u32,
    value: u64,
    #[serde(default)]
    value_two: u64,
    op: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Conditions {
    #[serde(default)]
    arches: Option<Vec<String>>,
    #[serde(default)]
    caps: Option<Vec<String>>,
    #[serde(default)]
    min_kernel: Option<String>,
}

/// What a rule does to a matching call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Run it.
    Allow,
    /// Fail it with this errno.
    Errno(u32),
    /// Kill the thread (`SCMP_ACT_KILL`, `SCMP_ACT_KILL_THREAD`).
    KillThread,
    /// Kill the process.
    KillProcess,
    /// Send `SIGSYS`.
    Trap,
    /// Notify a tracer with this value.
    Trace(u32),
    /// Run it and log it.
    Log,
}

/// One argument comparison of a rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ArgCmp {
    /// Argument number, 0 to 5.
    pub index: u32,
    /// The comparison.
    pub op: CmpOp,
    /// The value compared with (for `MaskedEq`, the value after masking).
    pub value: u64,
}

/// A comparison operator of Docker's format (`SCMP_CMP_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CmpOp {
    /// `!=`.
    Ne,
    /// `<`.
    Lt,
    /// `<=`.
    Le,
    /// `==`.
    Eq,
    /// `>=`.
    Ge,
    /// `>`.
    Gt,
    /// `arg & mask == value`.
    MaskedEq(u64),
}

/// One selected rule: calls by name, an action, and comparisons that must all hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// Syscall names (those unknown on this machine are skipped, as runc skips them).
    pub names: Vec<String>,
    /// The action.
    pub action: Action,
    /// Argument comparisons.
    pub args: Vec<ArgCmp>,
}

/// The rules of a profile that apply to one container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selected {
    /// The action for calls no rule matches.
    pub default_action: Action,
    /// libseccomp architecture names (`SCMP_ARCH_X86_64`...), native first.
    pub arches: Vec<String>,
    /// The rules, in profile order.
    pub rules: Vec<Rule>,
    /// `SECCOMP_FILTER_FLAG_*` bits for the `seccomp` call.
    pub flags: u32,
}

/// This machine, as the profile's conditions see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Go's name of the architecture (`amd64`, `arm64`...), which `includes.arches` use.
    pub arch: String,
    /// libseccomp's name of the native architecture (`SCMP_ARCH_X86_64`).
    pub scmp_arch: String,
    /// Kernel version (major, minor).
    pub kernel: (u32, u32),
}

impl Target {
    /// The machine kiln runs on.
    pub fn host() -> Target {
        let (arch, scmp) = match std::env::consts::ARCH {
            "x86_64" => ("amd64", "SCMP_ARCH_X86_64"),
            "x86" => ("386", "SCMP_ARCH_X86"),
            "aarch64" => ("arm64", "SCMP_ARCH_AARCH64"),
            "arm" => ("arm", "SCMP_ARCH_ARM"),
            "riscv64" => ("riscv64", "SCMP_ARCH_RISCV64"),
            "s390x" => ("s390x", "SCMP_ARCH_S390X"),
            "powerpc64" if cfg!(target_endian = "little") => ("ppc64le", "SCMP_ARCH_PPC64LE"),
            "powerpc64" => ("ppc64", "SCMP_ARCH_PPC64"),
            "mips64" if cfg!(target_endian = "little") => ("mips64le", "SCMP_ARCH_MIPSEL64"),
            "mips64" => ("mips64", "SCMP_ARCH_MIPS64"),
            "loongarch64" => ("loong64", "SCMP_ARCH_LOONGARCH64"),
            other => (other, "SCMP_ARCH_NATIVE"),
        };
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        Target {
            arch: arch.to_string(),
            scmp_arch: scmp.to_string(),
            kernel: parse_kernel(&release).unwrap_or((0, 0)),
        }
    }
}

/// `6.1.0-18-amd64` → (6, 1).
fn parse_kernel(s: &str) -> Option<(u32, u32)> {
    let mut parts = s.trim().split(['.', '-']);
    let major = parts.next()?.parse().ok()?;
    let minor = parts
        .next()
        .and_then(|m| {
            m.chars()
                .take_while(char::is_ascii_digit)
                .collect::<String>()
                .parse()
                .ok()
        })
        .unwrap_or(0);
    Some((major, minor))
}

impl Profile {
    /// Parses a profile; `source_name` names it in errors.
    pub fn parse(text: &str, source_name: &str) -> Result<Profile, SeccompError> {
        let raw: RawProfile = serde_json::from_str(text).map_err(|e| SeccompError::Parse {
            source_name: source_name.to_string(),
            detail: e.to_string(),
        })?;
        let mut h = std::collections::hash_map::DefaultHasher::new();
        text.hash(&mut h);
        let profile = Profile {
            raw,
            source_name: source_name.to_string(),
            digest: h.finish(),
            sha256: sha2::Digest::finalize(sha2::Digest::chain_update(
                sha2::Sha256::default(),
                text.as_bytes(),
            ))
            .into(),
        };
        // Everything that does not depend on the container is checked now, so a bad profile
        // fails `kiln create`, not the start.
        let host = Target::host();
        profile.select(crate::caps::DOCKER_DEFAULT_MASK, &host)?;
        Ok(profile)
    }

    /// moby's `default.json`.
    pub fn docker_default() -> Arc<Profile> {
        static DEFAULT: OnceLock<Arc<Profile>> = OnceLock::new();
        DEFAULT
            .get_or_init(|| {
                // The embedded profile is checked by the unit tests: a failure here is a build
                // defect, and running without the filter would be wrong.
                Arc::new(
                    Profile::parse(DEFAULT_PROFILE, "default").expect("the embedded default profile parses"),
                )
            })
            .clone()
    }

    fn invalid(&self, detail: String) -> SeccompError {
        SeccompError::Invalid {
            source_name: self.source_name.clone(),
            detail,
        }
    }

    fn action(&self, name: &str, errno: Option<u32>) -> Result<Action, SeccompError> {
        Ok(match name {
            "SCMP_ACT_ALLOW" => Action::Allow,
            "SCMP_ACT_ERRNO" => Action::Errno(errno.unwrap_or(libc::EPERM as u32)),
            "SCMP_ACT_KILL" | "SCMP_ACT_KILL_THREAD" => Action::KillThread,
            "SCMP_ACT_KILL_PROCESS" => Action::KillProcess,
            "SCMP_ACT_TRAP" => Action::Trap,
            "SCMP_ACT_TRACE" => Action::Trace(errno.unwrap_or(libc::EPERM as u32)),
            "SCMP_ACT_LOG" => Action::Log,
            "SCMP_ACT_NOTIFY" => {
                return Err(
                    self.invalid("SCMP_ACT_NOTIFY needs a seccomp agent, which kiln does not run".into())
                )
            }
            other => return Err(self.invalid(format!("unknown action {other:?}"))),
        })
    }

    /// The rules that apply to a container with capability set `caps` on `target`, by moby's
    /// rules: an entry is skipped when `excludes` names the architecture, any capability the
    /// container has, or a kernel at most as new as this one; and unless `includes` names the
    /// architecture, every capability it lists is the container's, and the kernel is at least
    /// the one given. The architectures are the `archMap` entry of the native one with its
    /// sub-architectures (or the old `architectures` list).
    pub fn select(&self, caps: u64, target: &Target) -> Result<Selected, SeccompError> {
        let raw = &self.raw;
        if raw.listener_path.as_deref().is_some_and(|p| !p.is_empty()) || raw.listener_metadata.is_some() {
            return Err(self.invalid("listenerPath needs a seccomp agent, which kiln does not run".into()));
        }
        let default_action = self.action(&raw.default_action, raw.default_errno_ret)?;
        let mut arches = vec![target.scmp_arch.clone()];
        match (&raw.architectures, &raw.arch_map) {
            (Some(a), Some(m)) if !a.is_empty() && !m.is_empty() => {
                return Err(self.invalid("both 'architectures' and 'archMap' are given".into()))
            }
            (_, Some(map)) if !map.is_empty() => {
                for entry in map.iter().filter(|e| e.architecture == target.scmp_arch) {
                    arches.extend(entry.sub_architectures.iter().flatten().cloned());
                }
            }
            (Some(list), _) => arches.extend(list.iter().cloned()),
            _ => {}
        }
        let mut seen = Vec::new();
        arches.retain(|a| {
            let new = !seen.contains(a);
            seen.push(a.clone());
            new
        });
        for a in &arches {
            if a != "SCMP_ARCH_NATIVE" && a.parse::<libseccomp::ScmpArch>().is_err() {
                return Err(self.invalid(format!("unknown architecture {a:?}")));
            }
        }
        let mut flags = 0u32;
        for f in raw.flags.iter().flatten() {
            flags |= match f.as_str() {
                "SECCOMP_FILTER_FLAG_LOG" => 2,
                "SECCOMP_FILTER_FLAG_SPEC_ALLOW" => 4,
                "SECCOMP_FILTER_FLAG_TSYNC" => 0, // a new process has one thread
                other => return Err(self.invalid(format!("unknown flag {other:?}"))),
            };
        }
        let has_cap = |name: &str| -> Result<bool, SeccompError> {
            match crate::caps::parse_name(name) {
                Ok(crate::caps::CapName::Cap(c)) => Ok(caps & (1u64 << c) != 0),
                _ => Err(self.invalid(format!("unknown capability {name:?}"))),
            }
        };
        let kernel_at_least = |s: &str| -> Result<bool, SeccompError> {
            let want = parse_kernel(s).ok_or_else(|| self.invalid(format!("invalid minKernel {s:?}")))?;
            Ok(target.kernel >= want)
        };
        let mut rules = Vec::new();
        'calls: for call in raw.syscalls.iter().flatten() {
            let names = match (&call.name, &call.names) {
                (Some(_), Some(n)) if !n.is_empty() => {
                    return Err(self.invalid("a syscall entry gives both 'name' and 'names'".into()))
                }
                (Some(n), _) => vec![n.clone()],
                (None, Some(n)) => n.clone(),
                (None, None) => Vec::new(),
            };
            let action = self.action(&call.action, call.errno_ret)?;
            let mut args = Vec::new();
            for a in call.args.iter().flatten() {
                if a.index > 5 {
                    return Err(self.invalid(format!("argument index {} of {names:?} is above 5", a.index)));
                }
                let (op, value) = match a.op.as_str() {
                    "SCMP_CMP_NE" => (CmpOp::Ne, a.value),
                    "SCMP_CMP_LT" => (CmpOp::Lt, a.value),
                    "SCMP_CMP_LE" => (CmpOp::Le, a.value),
                    "SCMP_CMP_EQ" => (CmpOp::Eq, a.value),
                    "SCMP_CMP_GE" => (CmpOp::Ge, a.value),
                    "SCMP_CMP_GT" => (CmpOp::Gt, a.value),
                    // Docker's format: `value` is the mask, `valueTwo` the expected result.
                    "SCMP_CMP_MASKED_EQ" => (CmpOp::MaskedEq(a.value), a.value_two),
                    other => return Err(self.invalid(format!("unknown operator {other:?}"))),
                };
                args.push(ArgCmp {
                    index: a.index,
                    op,
                    value,
                });
            }
            let _ = &call.comment;
            if let Some(ex) = &call.excludes {
                if ex.arches.as_ref().is_some_and(|a| a.contains(&target.arch)) {
                    continue 'calls;
                }
                for c in ex.caps.iter().flatten() {
                    if has_cap(c)? {
                        continue 'calls;
                    }
                }
                if let Some(k) = &ex.min_kernel {
                    if kernel_at_least(k)? {
                        continue 'calls;
                    }
                }
            }
            if let Some(inc) = &call.includes {
                if let Some(list) = &inc.arches {
                    if !list.is_empty() && !list.contains(&target.arch) {
                        continue 'calls;
                    }
                }
                for c in inc.caps.iter().flatten() {
                    if !has_cap(c)? {
                        continue 'calls;
                    }
                }
                if let Some(k) = &inc.min_kernel {
                    if !kernel_at_least(k)? {
                        continue 'calls;
                    }
                }
            }
            rules.push(Rule { names, action, args });
        }
        Ok(Selected {
            default_action,
            arches,
            rules,
            flags,
        })
    }
}

/// A compiled filter: classic BPF instructions and the flags to install them with.
#[derive(Debug, PartialEq, Eq)]
pub struct Program {
    /// The instructions, as `struct sock_filter` values (code, jt, jf, k).
    pub instructions: Vec<libc::sock_filter>,
    /// `SECCOMP_FILTER_FLAG_*`.
    pub flags: u32,
}

fn to_scmp_action(a: Action) -> libseccomp::ScmpAction {
    use libseccomp::ScmpAction as S;
    match a {
        Action::Allow => S::Allow,
        Action::Errno(e) => S::Errno(e as i32),
        Action::KillThread => S::KillThread,
        Action::KillProcess => S::KillProcess,
        Action::Trap => S::Trap,
        Action::Trace(v) => S::Trace(v as u16),
        Action::Log => S::Log,
    }
}

/// Compiles selected rules to BPF with libseccomp. As runc does: rules whose action is the
/// default are left out, names this libseccomp does not know are skipped, and a rule that
/// compares one argument twice becomes one rule per comparison (libseccomp cannot AND two
/// comparisons of one argument).
pub fn compile(sel: &Selected, source_name: &str) -> Result<Program, SeccompError> {
    use libseccomp::{ScmpArch, ScmpArgCompare, ScmpCompareOp, ScmpFilterContext, ScmpSyscall};
    let err = |what: String| {
        let source_name = source_name.to_string();
        move |source| SeccompError::Compile {
            source_name,
            what,
            source,
        }
    };
    let mut ctx =
        ScmpFilterContext::new(to_scmp_action(sel.default_action)).map_err(err("create a filter".into()))?;
    // A binary tree over syscall numbers instead of a linear list: the same decisions, and the
    // kernel, which runs the filter for every syscall number when it is installed (to cache the
    // calls it always allows), gets through a few dozen instructions per number instead of
    // hundreds.
    ctx.set_ctl_optimize(2)
        .map_err(err("choose the binary-tree layout".into()))?;
    for a in &sel.arches {
        if a == "SCMP_ARCH_NATIVE" {
            continue;
        }
        let arch: ScmpArch = a.parse().map_err(err(format!("parse architecture {a}")))?;
        ctx.add_arch(arch).map_err(err(format!("add architecture {a}")))?;
    }
    for rule in &sel.rules {
        if rule.action == sel.default_action {
            continue;
        }
        let action = to_scmp_action(rule.action);
        let conds: Vec<ScmpArgCompare> = rule
            .args
            .iter()
            .map(|c| {
                let op = match c.op {
                    CmpOp::Ne => ScmpCompareOp::NotEqual,
                    CmpOp::Lt => ScmpCompareOp::Less,
                    CmpOp::Le => ScmpCompareOp::LessOrEqual,
                    CmpOp::Eq => ScmpCompareOp::Equal,
                    CmpOp::Ge => ScmpCompareOp::GreaterEqual,
                    CmpOp::Gt => ScmpCompareOp::Greater,
                    CmpOp::MaskedEq(mask) => ScmpCompareOp::MaskedEqual(mask),
                };
                ScmpArgCompare::new(c.index, op, c.value)
            })
            .collect();
        let repeated = (0..6).any(|i| rule.args.iter().filter(|c| c.index == i).count() > 1);
        for name in &rule.names {
            let Ok(sys) = ScmpSyscall::from_name(name) else {
                continue;
            };
            let what = || format!("add the rule for `{name}`");
            if conds.is_empty() {
                ctx.add_rule(action, sys).map_err(err(what()))?;
            } else if repeated {
                for c in &conds {
                    ctx.add_rule_conditional(action, sys, std::slice::from_ref(c))
                        .map_err(err(what()))?;
                }
            } else {
                ctx.add_rule_conditional(action, sys, &conds)
                    .map_err(err(what()))?;
            }
        }
    }
    let memfd = nix::sys::memfd::memfd_create(c"kiln-seccomp", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
        .map_err(|e| SeccompError::Export(e.into()))?;
    ctx.export_bpf(&memfd).map_err(err("export the program".into()))?;
    let mut file = std::fs::File::from(memfd);
    let mut bytes = Vec::new();
    file.rewind()
        .and_then(|()| file.read_to_end(&mut bytes))
        .map_err(SeccompError::Export)?;
    let instructions = decode(&bytes);
    Ok(Program {
        instructions,
        flags: sel.flags,
    })
}

type CacheKey = (u64, u64);

/// The program of `policy` for a container with capability set `caps` (`None`: unconfined),
/// compiled once per process for each profile and set.
pub fn program(policy: &SeccompPolicy, caps: u64) -> Result<Option<Arc<Program>>, SeccompError> {
    static CACHE: OnceLock<Mutex<HashMap<CacheKey, Arc<Program>>>> = OnceLock::new();
    let profile = match policy {
        SeccompPolicy::Unconfined => return Ok(None),
        SeccompPolicy::Default => Profile::docker_default(),
        SeccompPolicy::Profile(p) => p.clone(),
    };
    let key = (profile.digest, caps);
    // Held while compiling: a caller that finds the compilation under way (by
    // [`prewarm_default`]) waits for it instead of doing it again.
    let mut cache = CACHE
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if let Some(p) = cache.get(&key) {
        return Ok(Some(p.clone()));
    }
    let target = Target::host();
    // In rootless mode the cache is the user's own (`/run/kiln` is not writable there).
    let dir = if crate::userns::in_user_namespace() {
        crate::userns::runtime_dir().map(|d| d.join("seccomp"))
    } else {
        Some(std::path::PathBuf::from(DISK_CACHE))
    };
    let disk = dir.and_then(|dir| disk_cache_path(&dir, &profile, caps, &target));
    let program = match disk.as_deref().and_then(load_program) {
        Some(p) => Arc::new(p),
        None => {
            let selected = profile.select(caps, &target)?;
            let p = compile(&selected, &profile.source_name)?;
            if let Some(path) = &disk {
                // A cache that cannot be written costs the next process a compilation, no more.
                let _ = store_program(path, &p);
            }
            Arc::new(p)
        }
    };
    cache.insert(key, program.clone());
    Ok(Some(program))
}

const DISK_MAGIC: &[u8; 4] = b"KSC1";

/// The cache file of `profile` for `caps` on `target` with this libseccomp (`None` when its
/// version is unknown).
fn disk_cache_path(
    dir: &std::path::Path,
    profile: &Profile,
    caps: u64,
    target: &Target,
) -> Option<std::path::PathBuf> {
    use sha2::Digest as _;
    let v = libseccomp::ScmpVersion::current().ok()?;
    let mut h = sha2::Sha256::new();
    h.update(profile.sha256);
    h.update(caps.to_le_bytes());
    h.update(format!(
        "{}|{}|{}.{}|libseccomp {}.{}.{}|{}",
        target.arch,
        target.scmp_arch,
        target.kernel.0,
        target.kernel.1,
        v.major,
        v.minor,
        v.micro,
        DISK_MAGIC[3]
    ));
    Some(dir.join(format!("{}.bpf", hex::encode(h.finalize()))))
}

/// Reads a program [`store_program`] wrote; `None` for a missing or malformed file.
fn load_program(path: &std::path::Path) -> Option<Program> {
    let bytes = std::fs::read(path).ok()?;
    let body = bytes.strip_prefix(DISK_MAGIC.as_slice())?;
    let (flags, code) = body.split_at_checked(4)?;
    if code.is_empty() || code.len() % 8 != 0 || code.len() / 8 > usize::from(u16::MAX) {
        return None;
    }
    Some(Program {
        instructions: decode(code),
        flags: u32::from_le_bytes(flags.try_into().ok()?),
    })
}

/// Writes a program for [`load_program`] (temp file and rename, so readers see all or nothing).
fn store_program(path: &std::path::Path, p: &Program) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    let dir = path.parent().unwrap_or(std::path::Path::new("."));
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let mut bytes = DISK_MAGIC.to_vec();
    bytes.extend_from_slice(&p.flags.to_le_bytes());
    for i in &p.instructions {
        bytes.extend_from_slice(&i.code.to_ne_bytes());
        bytes.extend_from_slice(&[i.jt, i.jf]);
        bytes.extend_from_slice(&i.k.to_ne_bytes());
    }
    let tmp = dir.join(format!(".{}.tmp", std::process::id()));
    std::fs::write(&tmp, &bytes)?;
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

/// Native-endian `struct sock_filter`s, as libseccomp exports them.
fn decode(code: &[u8]) -> Vec<libc::sock_filter> {
    code.chunks_exact(8)
        .map(|c| libc::sock_filter {
            code: u16::from_ne_bytes([c[0], c[1]]),
            jt: c[2],
            jf: c[3],
            k: u32::from_ne_bytes([c[4], c[5], c[6], c[7]]),
        })
        .collect()
}

/// Compiles Docker's default profile for the default capability set on a background thread, so
/// that the first container of a build (whose set is that one unless it runs privileged) does
/// not wait the tens of milliseconds libseccomp takes. A failure is left for that container to
/// report.
pub fn prewarm_default() {
    let _ = std::thread::Builder::new().name("kiln-seccomp".into()).spawn(|| {
        if let Ok(host) = crate::caps::HostCaps::read() {
            let caps = host.default_set();
            let _ = program(&SeccompPolicy::Default, caps);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::caps::DOCKER_DEFAULT_MASK;

    fn amd64() -> Target {
        Target {
            arch: "amd64".into(),
            scmp_arch: "SCMP_ARCH_X86_64".into(),
            kernel: (6, 1),
        }
    }

    fn rules_for<'a>(sel: &'a Selected, name: &str) -> Vec<&'a Rule> {
        sel.rules
            .iter()
            .filter(|r| r.names.iter().any(|n| n == name))
            .collect()
    }

    #[test]
    fn default_profile_selects_like_docker_without_sys_admin() {
        let p = Profile::docker_default();
        let sel = p.select(DOCKER_DEFAULT_MASK, &amd64()).unwrap();
        assert_eq!(sel.default_action, Action::Errno(1));
        assert_eq!(sel.arches, ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"]);
        // unshare, mount, setns: only with CAP_SYS_ADMIN.
        for name in ["unshare", "mount", "setns", "bpf", "reboot"] {
            assert!(rules_for(&sel, name).is_empty(), "{name} selected");
        }
        // clone only without namespace flags; clone3 answers ENOSYS so libc falls back to clone.
        let clone = rules_for(&sel, "clone");
        assert_eq!(clone.len(), 1);
        assert_eq!(
            clone[0].args,
            [ArgCmp {
                index: 0,
                op: CmpOp::MaskedEq(0x7E02_0000),
                value: 0
            }]
        );
        assert_eq!(rules_for(&sel, "clone3")[0].action, Action::Errno(38));
        // ptrace since 4.8; arch_prctl on amd64; socket but not AF_VSOCK (40).
        assert_eq!(rules_for(&sel, "ptrace").len(), 1);
        assert_eq!(rules_for(&sel, "arch_prctl").len(), 1);
        assert!(rules_for(&sel, "riscv_flush_icache").is_empty());
        assert_eq!(rules_for(&sel, "socket")[0].args[0].op, CmpOp::Ne);
        assert_eq!(rules_for(&sel, "personality").len(), 5);
        // CAP_SYS_CHROOT is a default capability: chroot is allowed.
        assert_eq!(rules_for(&sel, "chroot").len(), 1);
        assert!(rules_for(&sel, "reboot").is_empty());
    }

    #[test]
    fn capabilities_switch_rules_on_and_off() {
        let p = Profile::docker_default();
        let with_admin = DOCKER_DEFAULT_MASK | (1 << CAP_SYS_ADMIN);
        let sel = p.select(with_admin, &amd64()).unwrap();
        assert_eq!(rules_for(&sel, "unshare").len(), 1);
        // clone: the unconditional rule of the SYS_ADMIN list, the filtered one is excluded.
        let clone = rules_for(&sel, "clone");
        assert_eq!(clone.len(), 1);
        assert!(clone[0].args.is_empty());
        assert!(rules_for(&sel, "clone3")
            .iter()
            .all(|r| r.action == Action::Allow));
        let old_kernel = Target {
            kernel: (4, 4),
            ..amd64()
        };
        let sel = p.select(DOCKER_DEFAULT_MASK, &old_kernel).unwrap();
        assert!(rules_for(&sel, "ptrace").is_empty());
        let sel = p.select(0, &amd64()).unwrap();
        assert!(rules_for(&sel, "chroot").is_empty());
    }

    #[test]
    fn default_profile_compiles_to_bpf() {
        let sel = Profile::docker_default()
            .select(DOCKER_DEFAULT_MASK, &amd64())
            .unwrap();
        let prog = compile(&sel, "default").unwrap();
        assert!(prog.instructions.len() > 100, "{}", prog.instructions.len());
        // The same profile and set compile once per process.
        let a = program(&SeccompPolicy::Default, DOCKER_DEFAULT_MASK)
            .unwrap()
            .unwrap();
        let b = program(&SeccompPolicy::Default, DOCKER_DEFAULT_MASK)
            .unwrap()
            .unwrap();
        assert!(Arc::ptr_eq(&a, &b));
        assert!(program(&SeccompPolicy::Unconfined, 0).unwrap().is_none());
    }

    #[test]
    fn compiled_programs_round_trip_through_the_disk_cache() {
        let dir = tempfile::tempdir().unwrap();
        let p = Profile::docker_default();
        let path = disk_cache_path(dir.path(), &p, DOCKER_DEFAULT_MASK, &amd64()).unwrap();
        // Another set, another file.
        assert_ne!(path, disk_cache_path(dir.path(), &p, 0, &amd64()).unwrap());
        assert!(load_program(&path).is_none());
        let prog = compile(&p.select(DOCKER_DEFAULT_MASK, &amd64()).unwrap(), "default").unwrap();
        store_program(&path, &prog).unwrap();
        assert_eq!(load_program(&path).unwrap(), prog);
        // A damaged file is not a program.
        std::fs::write(&path, b"KSC1\0\0\0\0abc").unwrap();
        assert!(load_program(&path).is_none());
    }

    #[test]
    fn bad_profiles_name_the_problem() {
        let e = Profile::parse("{", "p.json").unwrap_err().to_string();
        assert!(e.starts_with("invalid seccomp profile p.json:"), "{e}");
        let e = Profile::parse(r#"{"defaultAction":"SCMP_ACT_NOPE"}"#, "p.json")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown action \"SCMP_ACT_NOPE\""), "{e}");
        let e = Profile::parse(
            r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["x"],"action":"SCMP_ACT_ERRNO","args":[{"index":7,"value":1,"op":"SCMP_CMP_EQ"}]}]}"#,
            "p.json",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("above 5"), "{e}");
        let ok = Profile::parse(
            r#"{"defaultAction":"SCMP_ACT_ALLOW","architectures":["SCMP_ARCH_X86_64"],"syscalls":[{"name":"mkdir","action":"SCMP_ACT_ERRNO","errnoRet":13}]}"#,
            "p.json",
        )
        .unwrap();
        let sel = ok.select(0, &amd64()).unwrap();
        assert_eq!(sel.rules[0].action, Action::Errno(13));
        assert!(compile(&sel, "p.json").is_ok());
    }

    #[test]
    fn security_opts_parse_like_docker() {
        let o = |v: &[&str]| parse_security_opts(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(o(&[]).unwrap(), SecurityOpts::default());
        assert!(o(&["no-new-privileges"]).unwrap().no_new_privileges);
        assert!(o(&["no-new-privileges=true"]).unwrap().no_new_privileges);
        assert!(o(&["no-new-privileges:true"]).unwrap().no_new_privileges);
        assert!(!o(&["no-new-privileges=false"]).unwrap().no_new_privileges);
        assert_eq!(
            o(&["seccomp=unconfined"]).unwrap().seccomp,
            SeccompPolicy::Unconfined
        );
        assert!(matches!(
            o(&[r#"seccomp={"defaultAction":"SCMP_ACT_ALLOW"}"#])
                .unwrap()
                .seccomp,
            SeccompPolicy::Profile(_)
        ));
        for bad in [
            "apparmor=unconfined",
            "no-new-privileges=yes",
            "seccomp=/x.json",
            "label=disable",
        ] {
            let e = o(&[bad]).unwrap_err().to_string();
            assert!(e.starts_with(&format!("invalid --security-opt {bad:?}")), "{e}");
        }
    }

    #[test]
    fn kernel_versions_parse() {
        assert_eq!(parse_kernel("6.18.44-fc-v1252"), Some((6, 18)));
        assert_eq!(parse_kernel("4.8"), Some((4, 8)));
        assert_eq!(parse_kernel("5"), Some((5, 0)));
        assert_eq!(parse_kernel("x"), None);
    }
}
