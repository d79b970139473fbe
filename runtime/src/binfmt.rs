//! Foreign-architecture programs through the kernel's `binfmt_misc` and QEMU user emulation.
//!
//! A RUN step for another architecture needs nothing from the sandbox: the kernel hands an ELF
//! of a registered machine to its interpreter. The handler must have the `F` (fix binary) flag:
//! the kernel then opens the interpreter when the handler is registered, so it works inside a
//! container whose root (after `pivot_root`) has no such file. Debian's `qemu-user-static`
//! registers its handlers that way (`/usr/lib/binfmt.d/qemu-*.conf`, through systemd-binfmt);
//! [`register`] does the same from the installed `qemu-*-static` binaries where no init system
//! did, as `tonistiigi/binfmt` does.
//!
//! The table holds, per Go architecture name, the ELF header bytes (`magic`, `mask`) that
//! identify its executables: the same values QEMU's `qemu-binfmt-conf.sh` and Debian use.

use std::fs;
use std::path::{Path, PathBuf};

/// Where binfmt_misc is mounted.
pub const BINFMT_DIR: &str = "/proc/sys/fs/binfmt_misc";

/// A failure to inspect or register handlers.
#[derive(Debug, thiserror::Error)]
pub enum BinfmtError {
    #[error("failed to read `{path}`")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to mount binfmt_misc at `{BINFMT_DIR}`")]
    Mount(#[source] nix::Error),
    #[error("failed to register the {arch} handler (`{interpreter}`) in `{BINFMT_DIR}/register`")]
    Register {
        arch: String,
        interpreter: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("kiln has no binfmt_misc entry for architecture `{arch}`")]
    UnknownArch { arch: String },
}

/// One architecture's ELF identification and QEMU's name for it.
#[derive(Clone, Copy, Debug)]
pub struct Machine {
    /// Go's `GOARCH` (`arm64`, `arm`, `riscv64`, ...).
    pub arch: &'static str,
    /// QEMU's name (`aarch64`): `qemu-<name>-static`, handler `qemu-<name>`.
    pub qemu: &'static str,
    /// The first 20 bytes of such an ELF, after masking.
    pub magic: [u8; 20],
    /// Which bits of those bytes count.
    pub mask: [u8; 20],
}

const fn elf(class: u8, data: u8, machine: [u8; 2]) -> [u8; 20] {
    let mut m = [0u8; 20];
    m[0] = 0x7f;
    m[1] = b'E';
    m[2] = b'L';
    m[3] = b'F';
    m[4] = class;
    m[5] = data;
    m[6] = 1;
    if data == 1 {
        m[16] = 2;
        m[18] = machine[0];
        m[19] = machine[1];
    } else {
        m[17] = 2;
        m[18] = machine[0];
        m[19] = machine[1];
    }
    m
}

/// `ff ff ff ff ff ff ff 00 ff.. fe ff ff ff`: any OS ABI, ET_EXEC or ET_DYN.
const MASK: [u8; 20] = [
    0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x00, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xfe,
    0xff, 0xff, 0xff,
];

/// The architectures kiln can register, by Go name.
pub const MACHINES: &[Machine] = &[
    Machine {
        arch: "arm64",
        qemu: "aarch64",
        magic: elf(2, 1, [0xb7, 0x00]),
        mask: MASK,
    },
    Machine {
        arch: "arm",
        qemu: "arm",
        magic: elf(1, 1, [0x28, 0x00]),
        mask: MASK,
    },
    Machine {
        arch: "riscv64",
        qemu: "riscv64",
        magic: elf(2, 1, [0xf3, 0x00]),
        mask: MASK,
    },
    Machine {
        arch: "ppc64le",
        qemu: "ppc64le",
        magic: elf(2, 1, [0x15, 0x00]),
        mask: [
            0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xfc, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
            0xfe, 0xff, 0xff, 0x00,
        ],
    },
    Machine {
        arch: "s390x",
        qemu: "s390x",
        magic: elf(2, 2, [0x00, 0x16]),
        mask: [
            0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xfc, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
            0xff, 0xfe, 0xff, 0xff,
        ],
    },
    Machine {
        arch: "mips64le",
        qemu: "mips64el",
        magic: elf(2, 1, [0x08, 0x00]),
        mask: [
            0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x00, 0xfe, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
            0xfe, 0xff, 0xff, 0xff,
        ],
    },
    Machine {
        arch: "loong64",
        qemu: "loongarch64",
        magic: elf(2, 1, [0x02, 0x01]),
        mask: [
            0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xfc, 0x00, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
            0xfe, 0xff, 0xff, 0xff,
        ],
    },
    Machine {
        arch: "amd64",
        qemu: "x86_64",
        magic: elf(2, 1, [0x3e, 0x00]),
        mask: [
            0xff, 0xff, 0xff, 0xff, 0xff, 0xfe, 0xfe, 0x00, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
            0xfe, 0xff, 0xff, 0xff,
        ],
    },
    Machine {
        arch: "386",
        qemu: "i386",
        magic: elf(1, 1, [0x03, 0x00]),
        mask: [
            0xff, 0xff, 0xff, 0xff, 0xff, 0xfe, 0xfe, 0xfc, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
            0xfe, 0xff, 0xff, 0xff,
        ],
    },
];

/// The table entry of a Go architecture name.
pub fn machine(arch: &str) -> Option<&'static Machine> {
    MACHINES.iter().find(|m| m.arch == arch)
}

/// Whether this host runs `arch`'s programs without emulation: its own architecture, and
/// 32-bit x86 on x86_64 (Debian's kernels have IA32 emulation; arm64 kernels may lack AArch32,
/// so 32-bit arm is emulated there).
pub fn is_native(arch: &str) -> bool {
    let host = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        "loongarch64" => "loong64",
        other => other,
    };
    arch == host || (host == "amd64" && arch == "386")
}

/// A registered handler, as `/proc/sys/fs/binfmt_misc/<name>` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Handler {
    pub name: String,
    pub enabled: bool,
    pub interpreter: PathBuf,
    pub flags: String,
    pub offset: usize,
    pub magic: Vec<u8>,
    pub mask: Vec<u8>,
}

impl Handler {
    /// Parses a handler file's text.
    pub fn parse(name: &str, text: &str) -> Option<Handler> {
        let mut h = Handler {
            name: name.to_string(),
            enabled: false,
            interpreter: PathBuf::new(),
            flags: String::new(),
            offset: 0,
            magic: Vec::new(),
            mask: Vec::new(),
        };
        for line in text.lines() {
            let line = line.trim();
            if line == "enabled" {
                h.enabled = true;
            } else if let Some(v) = line.strip_prefix("interpreter ") {
                h.interpreter = PathBuf::from(v.trim());
            } else if let Some(v) = line.strip_prefix("flags:") {
                h.flags = v.trim().to_string();
            } else if let Some(v) = line.strip_prefix("offset ") {
                h.offset = v.trim().parse().ok()?;
            } else if let Some(v) = line.strip_prefix("magic ") {
                h.magic = hex::decode(v.trim()).ok()?;
            } else if let Some(v) = line.strip_prefix("mask ") {
                h.mask = hex::decode(v.trim()).ok()?;
            }
        }
        (!h.magic.is_empty()).then_some(h)
    }

    /// Whether the kernel would hand an ELF of `m` to this handler.
    pub fn serves(&self, m: &Machine) -> bool {
        let header = &m.magic;
        if self.offset + self.magic.len() > header.len() {
            return false;
        }
        self.magic.iter().enumerate().all(|(i, want)| {
            let mask = self.mask.get(i).copied().unwrap_or(0xff);
            header[self.offset + i] & mask == want & mask
        })
    }

    /// Whether the interpreter was opened at registration (`F`), as containers need.
    pub fn fixed(&self) -> bool {
        self.flags.contains('F')
    }
}

/// What the host offers for one architecture.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Support {
    /// The host runs it without help.
    Native,
    /// An enabled handler with the `F` flag.
    Emulated(Handler),
    /// A handler without `F`: its interpreter is looked up inside the container, and fails.
    NotFixed(Handler),
    /// binfmt_misc is not mounted, or disabled.
    NoBinfmt,
    /// No enabled handler serves it.
    Missing,
}

/// The enabled handlers registered now (none when binfmt_misc is not mounted).
pub fn handlers() -> Result<Vec<Handler>, BinfmtError> {
    let dir = Path::new(BINFMT_DIR);
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(_) => return Ok(Vec::new()),
    };
    let mut out = Vec::new();
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name == "register" || name == "status" {
            continue;
        }
        let Ok(text) = fs::read_to_string(e.path()) else {
            continue;
        };
        if let Some(h) = Handler::parse(&name, &text) {
            out.push(h);
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

fn binfmt_enabled() -> bool {
    fs::read_to_string(Path::new(BINFMT_DIR).join("status")).is_ok_and(|s| s.trim() == "enabled")
}

/// How this host runs programs of Go architecture `arch`.
pub fn support(arch: &str) -> Result<Support, BinfmtError> {
    if is_native(arch) {
        return Ok(Support::Native);
    }
    let Some(m) = machine(arch) else {
        return Ok(Support::Missing);
    };
    if !binfmt_enabled() {
        return Ok(Support::NoBinfmt);
    }
    let serving: Vec<Handler> = handlers()?
        .into_iter()
        .filter(|h| h.enabled && h.serves(m))
        .collect();
    if let Some(h) = serving.iter().find(|h| h.fixed()) {
        return Ok(Support::Emulated(h.clone()));
    }
    Ok(match serving.into_iter().next() {
        Some(h) => Support::NotFixed(h),
        None => Support::Missing,
    })
}

/// Mounts binfmt_misc at its place when it is not mounted.
pub fn ensure_mounted() -> Result<(), BinfmtError> {
    if Path::new(BINFMT_DIR).join("register").exists() {
        return Ok(());
    }
    nix::mount::mount(
        Some("binfmt_misc"),
        BINFMT_DIR,
        Some("binfmt_misc"),
        nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NODEV | nix::mount::MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .map_err(BinfmtError::Mount)
}

/// The installed QEMU for `m`: Debian's preserve-argv0 wrapper
/// (`/usr/libexec/qemu-binfmt/<name>-binfmt-P`, with flag `P`) or `qemu-<name>-static` on the
/// usual paths.
pub fn find_qemu(m: &Machine) -> Option<(PathBuf, bool)> {
    let wrapper = PathBuf::from(format!("/usr/libexec/qemu-binfmt/{}-binfmt-P", m.qemu));
    if wrapper.exists() {
        return Some((wrapper, true));
    }
    ["/usr/bin", "/usr/local/bin", "/usr/sbin"]
        .iter()
        .map(|d| PathBuf::from(format!("{d}/qemu-{}-static", m.qemu)))
        .find(|p| p.exists())
        .map(|p| (p, false))
}

/// The line written to `register` for `m` with `interpreter` (`:name:M:offset:magic:mask:interp:flags`).
pub fn register_line(m: &Machine, interpreter: &Path, preserve_argv0: bool) -> String {
    let esc = |b: &[u8]| b.iter().map(|x| format!("\\x{x:02x}")).collect::<String>();
    let flags = if preserve_argv0 { "POCF" } else { "OCF" };
    format!(
        ":qemu-{}:M::{}:{}:{}:{flags}",
        m.qemu,
        esc(&m.magic),
        esc(&m.mask),
        interpreter.display()
    )
}

/// What [`register`] did for one architecture.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Registered {
    /// A handler with `F` was already there.
    Present(Handler),
    /// Registered now with this interpreter.
    Added(PathBuf),
    /// No `qemu-<name>-static` is installed for it.
    NoQemu,
}

/// Registers an `F` handler for each foreign architecture in `arches` (every one in the table
/// when empty) whose QEMU is installed and which has none yet. A handler without `F` of the same
/// name is replaced. Needs root.
pub fn register(arches: &[&str]) -> Result<Vec<(&'static str, Registered)>, BinfmtError> {
    ensure_mounted()?;
    let wanted: Vec<&'static Machine> = if arches.is_empty() {
        MACHINES.iter().filter(|m| !is_native(m.arch)).collect()
    } else {
        arches
            .iter()
            .map(|a| machine(a).ok_or_else(|| BinfmtError::UnknownArch { arch: a.to_string() }))
            .collect::<Result<_, _>>()?
    };
    let mut out = Vec::new();
    for m in wanted {
        if is_native(m.arch) {
            continue;
        }
        match support(m.arch)? {
            Support::Emulated(h) => {
                out.push((m.arch, Registered::Present(h)));
                continue;
            }
            Support::NotFixed(h) => {
                // Disable-and-remove the handler that cannot serve containers.
                let path = Path::new(BINFMT_DIR).join(&h.name);
                fs::write(&path, "-1").map_err(|source| BinfmtError::Register {
                    arch: m.arch.to_string(),
                    interpreter: h.interpreter.clone(),
                    source,
                })?;
            }
            Support::Native | Support::NoBinfmt | Support::Missing => {}
        }
        let Some((interpreter, preserve)) = find_qemu(m) else {
            out.push((m.arch, Registered::NoQemu));
            continue;
        };
        let line = register_line(m, &interpreter, preserve);
        fs::write(Path::new(BINFMT_DIR).join("register"), line.as_bytes()).map_err(|source| {
            BinfmtError::Register {
                arch: m.arch.to_string(),
                interpreter: interpreter.clone(),
                source,
            }
        })?;
        out.push((m.arch, Registered::Added(interpreter)));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn debian_handlers_serve_their_machines_only() {
        // /proc/sys/fs/binfmt_misc/qemu-aarch64 as the kernel shows Debian's registration.
        let text = "enabled\ninterpreter /usr/libexec/qemu-binfmt/aarch64-binfmt-P\nflags: POCF\noffset 0\nmagic 7f454c460201010000000000000000000200b700\nmask ffffffffffffff00fffffffffffffffffeffffff\n";
        let h = Handler::parse("qemu-aarch64", text).unwrap();
        assert!(h.enabled && h.fixed());
        assert!(h.serves(machine("arm64").unwrap()));
        assert!(!h.serves(machine("arm").unwrap()));
        assert!(!h.serves(machine("riscv64").unwrap()));
        let line = register_line(machine("arm64").unwrap(), Path::new("/q"), false);
        assert_eq!(
            line,
            ":qemu-aarch64:M::\\x7f\\x45\\x4c\\x46\\x02\\x01\\x01\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x02\\x00\\xb7\\x00:\\xff\\xff\\xff\\xff\\xff\\xff\\xff\\x00\\xff\\xff\\xff\\xff\\xff\\xff\\xff\\xff\\xfe\\xff\\xff\\xff:/q:OCF"
        );
        // Every table entry is served by a handler made from its own line, and by no other's.
        for m in MACHINES {
            let h = Handler {
                name: m.qemu.into(),
                enabled: true,
                interpreter: "/q".into(),
                flags: "F".into(),
                offset: 0,
                magic: m.magic.to_vec(),
                mask: m.mask.to_vec(),
            };
            for other in MACHINES {
                assert_eq!(
                    h.serves(other),
                    m.arch == other.arch,
                    "{} serving {}",
                    m.arch,
                    other.arch
                );
            }
        }
    }
}
