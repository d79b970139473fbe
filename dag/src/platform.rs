//! Platforms (`os/architecture[/variant]`) in Go's naming, normalised as containerd's
//! `platforms.Normalize(platforms.Parse(s))` leaves them, which is what BuildKit puts in
//! `TARGETPLATFORM` and in image indexes: `arm64`, `aarch64` and `linux/arm64/v8` are all
//! `linux/arm64`; `armhf` and `linux/arm` are `linux/arm/v7`; `x86_64` and `x86-64` are `amd64`.
//!
//! A small table rather than `oci-spec`'s `Platform`: that type holds the strings as given and
//! has no normalisation or matching, which are the point here.

use serde::{Deserialize, Serialize};

/// An OS/architecture pair in Go's naming, always normalised (see the module docs).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
}

/// A platform string that is not `os[/arch[/variant]]` of known names.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlatformError {
    #[error(
        "invalid platform `{value}`: `{part}` is not a valid component (letters, digits, `_` and `-` only)"
    )]
    Component { value: String, part: String },
    #[error("invalid platform `{value}`: expected os[/arch[/variant]]")]
    Shape { value: String },
    #[error("invalid platform `{value}`: unknown operating system or architecture `{part}`")]
    Unknown { value: String, part: String },
}

/// Go's `GOOS` values (containerd's `isKnownOS`).
const KNOWN_OS: &[&str] = &[
    "aix",
    "android",
    "darwin",
    "dragonfly",
    "freebsd",
    "hurd",
    "illumos",
    "ios",
    "js",
    "linux",
    "nacl",
    "netbsd",
    "openbsd",
    "plan9",
    "solaris",
    "windows",
    "zos",
];

/// Go's `GOARCH` values (containerd's `isKnownArch`).
const KNOWN_ARCH: &[&str] = &[
    "386",
    "amd64",
    "amd64p32",
    "arm",
    "armbe",
    "arm64",
    "arm64be",
    "ppc64",
    "ppc64le",
    "loong64",
    "mips",
    "mipsle",
    "mips64",
    "mips64le",
    "mips64p32",
    "mips64p32le",
    "ppc",
    "riscv",
    "riscv64",
    "s390",
    "s390x",
    "sparc",
    "sparc64",
    "wasm",
];

fn normalize_os(os: &str) -> String {
    let os = os.to_ascii_lowercase();
    if os == "macos" {
        "darwin".into()
    } else {
        os
    }
}

/// containerd's `normalizeArch` followed by `Normalize`'s defaults: arm64's `v8` is implied (no
/// variant), arm's `v7` is explicit.
fn normalize_arch(arch: &str, variant: &str) -> (String, String) {
    let arch = arch.to_ascii_lowercase();
    let variant = variant.to_ascii_lowercase();
    match arch.as_str() {
        "i386" | "i686" | "x86" => ("386".into(), String::new()),
        "x86_64" | "x86-64" | "amd64" => (
            "amd64".into(),
            if variant == "v1" { String::new() } else { variant },
        ),
        "aarch64" | "arm64" => (
            "arm64".into(),
            match variant.as_str() {
                "8" | "v8" | "v8.0" => String::new(),
                "9" | "9.0" | "v9.0" => "v9".into(),
                _ => variant,
            },
        ),
        "armhf" => ("arm".into(), "v7".into()),
        "armel" => ("arm".into(), "v6".into()),
        "arm" => (
            "arm".into(),
            match variant.as_str() {
                "" | "7" => "v7".into(),
                "5" | "6" | "8" => format!("v{variant}"),
                _ => variant,
            },
        ),
        _ => (arch, variant),
    }
}

impl Platform {
    /// A platform from its parts, normalised.
    pub fn new(os: &str, architecture: &str, variant: Option<&str>) -> Platform {
        let (architecture, variant) = normalize_arch(architecture, variant.unwrap_or(""));
        Platform {
            os: normalize_os(os),
            architecture,
            variant: (!variant.is_empty()).then_some(variant),
        }
    }

    /// This platform, normalised (a platform built field by field may not be).
    pub fn normalized(&self) -> Platform {
        Platform::new(&self.os, &self.architecture, self.variant.as_deref())
    }

    /// The platform kiln runs on.
    pub fn host() -> Platform {
        let architecture = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            "x86" => "386",
            "arm" => "arm",
            "powerpc64" => "ppc64le",
            "s390x" => "s390x",
            "riscv64" => "riscv64",
            "loongarch64" => "loong64",
            other => other,
        };
        Platform::new("linux", architecture, None)
    }

    /// Parses `os/arch[/variant]`, or one component as containerd does: a known OS (`linux`)
    /// takes the host's architecture, a known architecture (`arm64`, `aarch64`, `armhf`) the
    /// host's OS. The result is normalised.
    pub fn parse(s: &str) -> Result<Platform, PlatformError> {
        let value = s.trim();
        let parts: Vec<&str> = value.split('/').collect();
        for part in &parts {
            if part.is_empty()
                || !part
                    .bytes()
                    .all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-' || c == b'.')
            {
                return Err(PlatformError::Component {
                    value: value.to_string(),
                    part: part.to_string(),
                });
            }
        }
        match parts.as_slice() {
            [one] => {
                let os = normalize_os(one);
                if KNOWN_OS.contains(&os.as_str()) {
                    let host = Platform::host();
                    return Ok(Platform { os, ..host });
                }
                let (arch, _) = normalize_arch(one, "");
                if KNOWN_ARCH.contains(&arch.as_str()) {
                    return Ok(Platform::new(&Platform::host().os, one, None));
                }
                Err(PlatformError::Unknown {
                    value: value.to_string(),
                    part: one.to_string(),
                })
            }
            [os, arch] => Ok(Platform::new(os, arch, None)),
            [os, arch, variant] => Ok(Platform::new(os, arch, Some(variant))),
            _ => Err(PlatformError::Shape {
                value: value.to_string(),
            }),
        }
    }

    /// Parses a comma-separated list (`--platform linux/amd64,linux/arm64`), in order, without
    /// repeats (after normalisation).
    pub fn parse_list(s: &str) -> Result<Vec<Platform>, PlatformError> {
        let mut out: Vec<Platform> = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let p = Platform::parse(part)?;
            if !out.contains(&p) {
                out.push(p);
            }
        }
        Ok(out)
    }

    /// How well an image of platform `candidate` serves this platform: `Some(0)` for the same
    /// platform, `Some(n)` for an older variant of the same architecture that this one runs
    /// (containerd's matcher: arm/v7 runs v6 and v5 images, amd64/v3 runs v2 and v1), `None`
    /// for no match. Lower is better.
    pub fn match_rank(&self, candidate: &Platform) -> Option<u32> {
        let want = self.normalized();
        let got = candidate.normalized();
        if want.os != got.os || want.architecture != got.architecture {
            return None;
        }
        if want.variant == got.variant {
            return Some(0);
        }
        let level = |arch: &str, v: Option<&str>| -> Option<u32> {
            let v = v.unwrap_or(match arch {
                "amd64" => "v1",
                "arm64" => "v8",
                _ => "",
            });
            v.strip_prefix('v')?.parse().ok()
        };
        let (w, g) = (
            level(&want.architecture, want.variant.as_deref())?,
            level(&got.architecture, got.variant.as_deref())?,
        );
        match want.architecture.as_str() {
            "arm" | "amd64" if g < w => Some(w - g),
            _ => None,
        }
    }

    /// BuildKit's directory name for this platform in a multi-platform `local` or `tar`
    /// export: the platform with `/` as `_` (`linux_arm64`, `linux_arm_v7`).
    pub fn dir_name(&self) -> String {
        self.to_string().replace('/', "_")
    }
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

impl std::str::FromStr for Platform {
    type Err = PlatformError;

    fn from_str(s: &str) -> Result<Platform, PlatformError> {
        Platform::parse(s)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn p(s: &str) -> String {
        Platform::parse(s).unwrap().to_string()
    }

    #[test]
    fn normalises_like_containerd() {
        for (given, want) in [
            ("linux/amd64", "linux/amd64"),
            ("linux/x86_64", "linux/amd64"),
            ("linux/x86-64", "linux/amd64"),
            ("Linux/AMD64", "linux/amd64"),
            ("linux/amd64/v1", "linux/amd64"),
            ("linux/amd64/v3", "linux/amd64/v3"),
            ("linux/arm64", "linux/arm64"),
            ("linux/arm64/v8", "linux/arm64"),
            ("linux/aarch64", "linux/arm64"),
            ("linux/arm64/9", "linux/arm64/v9"),
            ("linux/arm", "linux/arm/v7"),
            ("linux/armhf", "linux/arm/v7"),
            ("linux/armel", "linux/arm/v6"),
            ("linux/arm/6", "linux/arm/v6"),
            ("linux/arm/v5", "linux/arm/v5"),
            ("linux/i386", "linux/386"),
            ("macos/arm64", "darwin/arm64"),
            ("arm64", "linux/arm64"),
            ("aarch64", "linux/arm64"),
            ("armhf", "linux/arm/v7"),
            ("x86_64", "linux/amd64"),
            ("linux/riscv64", "linux/riscv64"),
        ] {
            assert_eq!(p(given), want, "{given}");
        }
        assert_eq!(p("linux"), Platform::host().to_string());
        assert!(Platform::parse("linux/").is_err());
        assert!(Platform::parse("a/b/c/d").is_err());
        assert!(Platform::parse("linux/arm64 extra").is_err());
        let err = Platform::parse("banana").unwrap_err().to_string();
        assert!(
            err.contains("unknown operating system or architecture `banana`"),
            "{err}"
        );
        assert_eq!(
            Platform::parse_list("linux/amd64, arm64,linux/arm64/v8").unwrap(),
            vec![
                Platform::new("linux", "amd64", None),
                Platform::new("linux", "arm64", None)
            ]
        );
    }

    #[test]
    fn matching_prefers_the_same_variant_and_accepts_older_ones() {
        let v7 = Platform::parse("linux/arm/v7").unwrap();
        assert_eq!(v7.match_rank(&Platform::new("linux", "arm", Some("v7"))), Some(0));
        assert_eq!(v7.match_rank(&Platform::new("linux", "arm", None)), Some(0));
        assert_eq!(v7.match_rank(&Platform::new("linux", "arm", Some("v6"))), Some(1));
        assert_eq!(v7.match_rank(&Platform::new("linux", "arm", Some("v8"))), None);
        let arm64 = Platform::parse("linux/arm64").unwrap();
        assert_eq!(
            arm64.match_rank(&Platform::new("linux", "arm64", Some("v8"))),
            Some(0)
        );
        assert_eq!(arm64.match_rank(&Platform::new("linux", "amd64", None)), None);
        assert_eq!(
            Platform::parse("linux/amd64/v3")
                .unwrap()
                .match_rank(&Platform::new("linux", "amd64", None)),
            Some(2)
        );
        assert_eq!(
            Platform::parse("linux/arm/v7").unwrap().dir_name(),
            "linux_arm_v7"
        );
    }
}
