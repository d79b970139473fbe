//! Git sources, fetched as BuildKit does: by running the `git` binary.
//!
//! A reference (branch, tag, full commit SHA, or empty for the remote's `HEAD`) is first resolved
//! to a commit with `git ls-remote` (a full SHA needs no network at all); the commit, subdir and
//! keep-git-dir flag are what a build keys the result by, so an unchanged repository costs one
//! `ls-remote`. [`Git::checkout`] then makes a shallow fetch of exactly that commit (falling back
//! to the ref name, then to a full fetch, for servers that refuse unadvertised objects), checks it
//! out, updates submodules, and moves the wanted subdir into the destination, `.git` removed
//! unless kept.
//!
//! Every command runs with a cleared environment: a private empty `HOME`, `GIT_CONFIG_NOSYSTEM`,
//! `GIT_TERMINAL_PROMPT=0` (git never prompts), and only `PATH`, proxies, the SSH agent and
//! settings passed explicitly through `GIT_CONFIG_COUNT`/`GIT_CONFIG_KEY_n`/`GIT_CONFIG_VALUE_n`
//! or `GIT_SSH_COMMAND` kept from the caller.

use std::ffi::OsStr;
use std::io;
use std::path::{Component, Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};

/// Errors of this module. Each names the remote (credentials redacted) or the path involved.
#[derive(Debug, thiserror::Error)]
pub enum GitError {
    /// The `git` binary could not be started.
    #[error("failed to run `git` (is it installed?)")]
    Spawn(#[source] io::Error),
    /// A git command failed.
    #[error("`git {command}` failed ({status}): {stderr}")]
    Command {
        command: String,
        status: ExitStatus,
        stderr: String,
    },
    /// The reference does not exist in the repository.
    #[error("git ref `{reference}` not found in `{remote}`")]
    RefNotFound { remote: String, reference: String },
    /// The commit could not be fetched even with a full fetch.
    #[error("commit {commit} not found in `{remote}`")]
    CommitNotFound { remote: String, commit: String },
    /// The subdir is absolute or has `..`.
    #[error("invalid subdirectory `{subdir}` for `{remote}`: it must stay inside the repository")]
    BadSubdir { remote: String, subdir: String },
    /// The subdir is not a directory of the checkout.
    #[error("subdirectory `{subdir}` not found in `{remote}` at {commit}")]
    SubdirNotFound {
        remote: String,
        subdir: String,
        commit: String,
    },
    /// A file system operation on the checkout failed.
    #[error("failed to {action} `{path}`")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// A Git source as written: `remote#ref:subdir`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GitUrl {
    pub remote: String,
    /// Branch, tag or commit; empty = the remote's HEAD.
    pub reference: String,
    pub subdir: String,
}

impl GitUrl {
    /// Splits `remote#ref:subdir`; a `github.com/...` shorthand becomes an https URL.
    pub fn parse(s: &str) -> GitUrl {
        let (remote, fragment) = s.split_once('#').unwrap_or((s, ""));
        let (reference, subdir) = fragment.split_once(':').unwrap_or((fragment, ""));
        let remote = match remote.strip_prefix("github.com/") {
            Some(rest) => format!("https://github.com/{rest}"),
            None => remote.to_string(),
        };
        GitUrl {
            remote,
            reference: reference.to_string(),
            subdir: subdir.to_string(),
        }
    }
}

/// Whether a build context argument is a Git repository, by Docker's rules: an http(s) URL whose
/// path ends in `.git` (optionally followed by `#fragment`), or a `git://`, `git@`, `ssh://`,
/// `file://` or `github.com/` prefix.
pub fn is_git_url(s: &str) -> bool {
    let base = s.split('#').next().unwrap_or(s);
    if s.starts_with("http://") || s.starts_with("https://") {
        let path = base.split('?').next().unwrap_or(base);
        return path.ends_with(".git") || path.ends_with(".git/");
    }
    ["git://", "git@", "ssh://", "file://", "github.com/"]
        .iter()
        .any(|p| s.starts_with(p))
}

/// A reference resolved to a commit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolved {
    /// The full commit SHA (hex).
    pub commit: String,
    /// The full ref name it came from (`refs/heads/main`), `None` for a SHA given directly.
    pub refname: Option<String>,
}

/// Runs git for one build; owns the private, empty `HOME` every command sees.
#[derive(Debug)]
pub struct Git {
    home: tempfile::TempDir,
}

/// Whether `s` is a full SHA-1 or SHA-256 commit id.
pub fn is_full_sha(s: &str) -> bool {
    (s.len() == 40 || s.len() == 64) && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// `url` with any `user:password@` removed, for messages.
pub fn redact(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => {
            let (auth, tail) = rest.split_once('/').map_or((rest, ""), |(a, t)| (a, t));
            match auth.rsplit_once('@') {
                Some((_, host)) => format!("{scheme}://***@{host}/{tail}"),
                None => url.to_string(),
            }
        }
        None => url.to_string(),
    }
}

/// Environment variables passed through to git from the caller.
const KEEP_ENV: &[&str] = &[
    "PATH",
    "SSH_AUTH_SOCK",
    "GIT_SSH_COMMAND",
    "GIT_SSH",
    "http_proxy",
    "https_proxy",
    "no_proxy",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "ALL_PROXY",
    "all_proxy",
    "GIT_CONFIG_COUNT",
];

impl Git {
    /// A runner with a fresh empty `HOME` in the system temp dir.
    pub fn new() -> Result<Git, GitError> {
        let home = tempfile::Builder::new()
            .prefix("kiln-git-home-")
            .tempdir()
            .map_err(|source| GitError::Io {
                action: "create a git home in",
                path: std::env::temp_dir(),
                source,
            })?;
        Ok(Git { home })
    }

    fn command(&self, dir: Option<&Path>) -> Command {
        let mut c = Command::new("git");
        c.env_clear();
        for (k, v) in std::env::vars_os() {
            let keep = k.to_str().is_some_and(|k| {
                KEEP_ENV.contains(&k)
                    || k.starts_with("GIT_CONFIG_KEY_")
                    || k.starts_with("GIT_CONFIG_VALUE_")
            });
            if keep {
                c.env(k, v);
            }
        }
        c.env("HOME", self.home.path())
            .env("XDG_CONFIG_HOME", self.home.path())
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_TERMINAL_PROMPT", "0")
            .env("GIT_ASKPASS", "true")
            .env("LC_ALL", "C")
            .stdin(Stdio::null());
        if std::env::var_os("GIT_SSH_COMMAND").is_none() {
            c.env("GIT_SSH_COMMAND", "ssh -o BatchMode=yes");
        }
        if let Some(d) = dir {
            c.current_dir(d);
        }
        c
    }

    /// Runs git; `Ok(stdout)` on success.
    fn run<I, S>(&self, dir: Option<&Path>, args: I) -> Result<String, GitError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let args: Vec<std::ffi::OsString> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
        let out = self.command(dir).args(&args).output().map_err(GitError::Spawn)?;
        if out.status.success() {
            return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
        }
        let command = args
            .iter()
            .map(|a| redact(&a.to_string_lossy()))
            .collect::<Vec<_>>()
            .join(" ");
        Err(GitError::Command {
            command,
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }

    /// Resolves `reference` in `remote` to a commit: a full SHA as is, anything else through
    /// `git ls-remote` (`refs/NAME`, then `refs/tags/NAME` peeled, then `refs/heads/NAME`, git's
    /// own order; empty = `HEAD`).
    pub fn resolve(&self, remote: &str, reference: &str) -> Result<Resolved, GitError> {
        if is_full_sha(reference) {
            return Ok(Resolved {
                commit: reference.to_ascii_lowercase(),
                refname: None,
            });
        }
        let wanted = if reference.is_empty() { "HEAD" } else { reference };
        let out = self.run(None, ["ls-remote", "--", remote, wanted])?;
        let refs: Vec<(&str, &str)> = out
            .lines()
            .filter_map(|l| l.split_once('\t'))
            .map(|(sha, name)| (sha.trim(), name.trim()))
            .collect();
        let find = |name: &str| refs.iter().find(|(_, n)| *n == name).map(|(s, _)| s.to_string());
        let short = wanted.strip_prefix("refs/").unwrap_or(wanted);
        let candidates = [
            wanted.to_string(),
            format!("refs/{short}"),
            format!("refs/tags/{short}"),
            format!("refs/heads/{short}"),
        ];
        for name in candidates {
            // An annotated tag's peeled entry names the commit it points at.
            if let Some(commit) = find(&format!("{name}^{{}}")).or_else(|| find(&name)) {
                return Ok(Resolved {
                    commit,
                    refname: Some(name),
                });
            }
        }
        Err(GitError::RefNotFound {
            remote: redact(remote),
            reference: wanted.to_string(),
        })
    }

    /// Checks `resolved` of `remote` out and moves `subdir` of it into `dest` (an existing empty
    /// directory). `work` is a scratch directory on the same file system as `dest`.
    pub fn checkout(
        &self,
        remote: &str,
        resolved: &Resolved,
        subdir: &str,
        keep_git_dir: bool,
        work: &Path,
        dest: &Path,
    ) -> Result<(), GitError> {
        let sub = clean_subdir(remote, subdir)?;
        let repo = tempfile::Builder::new()
            .prefix("git-")
            .tempdir_in(work)
            .map_err(|source| GitError::Io {
                action: "create a checkout directory in",
                path: work.into(),
                source,
            })?;
        let r = repo.path();
        self.run(Some(r), ["init", "-q"])?;
        self.run(Some(r), ["remote", "add", "origin", remote])?;
        self.fetch_commit(r, remote, resolved)?;
        self.run(Some(r), ["checkout", "-q", "--detach", resolved.commit.as_str()])?;
        if keep_git_dir {
            if let Some(branch) = resolved
                .refname
                .as_deref()
                .and_then(|n| n.strip_prefix("refs/heads/"))
            {
                self.run(Some(r), ["checkout", "-q", "-B", branch])?;
            } else if let Some(tag) = resolved
                .refname
                .as_deref()
                .filter(|n| n.starts_with("refs/tags/"))
            {
                self.run(Some(r), ["update-ref", tag, resolved.commit.as_str()])?;
            }
        }
        if r.join(".gitmodules").exists() {
            let shallow = self.run(
                Some(r),
                ["submodule", "update", "--init", "--recursive", "--depth", "1"],
            );
            if shallow.is_err() {
                self.run(Some(r), ["submodule", "update", "--init", "--recursive"])?;
            }
        }
        if !keep_git_dir {
            remove_git_dirs(r)?;
        }
        let src = r.join(&sub);
        let is_dir = std::fs::symlink_metadata(&src)
            .map(|m| m.is_dir())
            .unwrap_or(false);
        let inside = match (std::fs::canonicalize(&src), std::fs::canonicalize(r)) {
            (Ok(s), Ok(root)) => s.starts_with(root),
            _ => false,
        };
        if !is_dir || !inside {
            return Err(GitError::SubdirNotFound {
                remote: redact(remote),
                subdir: subdir.into(),
                commit: resolved.commit.clone(),
            });
        }
        move_entries(&src, dest)
    }

    /// Resolves and checks out in one go (see [`Git::resolve`] and [`Git::checkout`]).
    pub fn fetch(
        &self,
        url: &GitUrl,
        keep_git_dir: bool,
        work: &Path,
        dest: &Path,
    ) -> Result<Resolved, GitError> {
        let resolved = self.resolve(&url.remote, &url.reference)?;
        self.checkout(&url.remote, &resolved, &url.subdir, keep_git_dir, work, dest)?;
        Ok(resolved)
    }

    /// Fetches exactly the commit (shallow), else the ref (shallow), else everything.
    fn fetch_commit(&self, r: &Path, remote: &str, resolved: &Resolved) -> Result<(), GitError> {
        let commit = resolved.commit.as_str();
        let have = |git: &Git| {
            git.run(Some(r), ["cat-file", "-e", &format!("{commit}^{{commit}}")])
                .is_ok()
        };
        let by_sha = self.run(
            Some(r),
            ["fetch", "-q", "--depth", "1", "--no-tags", "origin", commit],
        );
        if by_sha.is_ok() && have(self) {
            return Ok(());
        }
        if let Some(name) = &resolved.refname {
            let spec = format!("+{name}:{name}");
            if self
                .run(
                    Some(r),
                    ["fetch", "-q", "--depth", "1", "--no-tags", "origin", &spec],
                )
                .is_ok()
                && have(self)
            {
                return Ok(());
            }
        }
        let mut full = vec!["fetch", "-q", "--tags"];
        if r.join(".git/shallow").exists() {
            full.push("--unshallow");
        }
        full.extend(["origin", "+refs/heads/*:refs/remotes/origin/*"]);
        match self.run(Some(r), &full) {
            Ok(_) if have(self) => Ok(()),
            Ok(_) => Err(GitError::CommitNotFound {
                remote: redact(remote),
                commit: commit.into(),
            }),
            Err(e) => match by_sha {
                Err(first) if resolved.refname.is_none() => Err(first),
                _ => Err(e),
            },
        }
    }
}

/// The subdir as a relative path without `.` components; `..` or an absolute path is an error.
fn clean_subdir(remote: &str, subdir: &str) -> Result<PathBuf, GitError> {
    let mut out = PathBuf::new();
    for c in Path::new(subdir).components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::CurDir => {}
            Component::RootDir if subdir.starts_with('/') && out.as_os_str().is_empty() => {}
            _ => {
                return Err(GitError::BadSubdir {
                    remote: redact(remote),
                    subdir: subdir.into(),
                })
            }
        }
    }
    Ok(out)
}

/// Removes `.git` at the top and the `.git` files submodules leave (they point into the
/// removed top-level `.git`).
fn remove_git_dirs(root: &Path) -> Result<(), GitError> {
    let io_err = |action, path: &Path| {
        let path = path.to_path_buf();
        move |source| GitError::Io { action, path, source }
    };
    let top = root.join(".git");
    std::fs::remove_dir_all(&top).map_err(io_err("remove", &top))?;
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).map_err(io_err("read", &dir))? {
            let entry = entry.map_err(io_err("read", &dir))?;
            let ty = entry.file_type().map_err(io_err("stat", &entry.path()))?;
            if entry.file_name() == ".git" && ty.is_file() {
                std::fs::remove_file(entry.path()).map_err(io_err("remove", &entry.path()))?;
            } else if ty.is_dir() {
                stack.push(entry.path());
            }
        }
    }
    Ok(())
}

/// Moves every entry of `src` into `dest` (same file system).
fn move_entries(src: &Path, dest: &Path) -> Result<(), GitError> {
    let entries = std::fs::read_dir(src).map_err(|source| GitError::Io {
        action: "read",
        path: src.into(),
        source,
    })?;
    for entry in entries {
        let entry = entry.map_err(|source| GitError::Io {
            action: "read",
            path: src.into(),
            source,
        })?;
        let to = dest.join(entry.file_name());
        std::fs::rename(entry.path(), &to).map_err(|source| GitError::Io {
            action: "move the checkout to",
            path: to.clone(),
            source,
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn urls_split_like_buildkit() {
        assert_eq!(
            GitUrl::parse("https://h/r.git#v1:sub/dir"),
            GitUrl {
                remote: "https://h/r.git".into(),
                reference: "v1".into(),
                subdir: "sub/dir".into()
            }
        );
        assert_eq!(GitUrl::parse("git@h:r.git").reference, "");
        assert_eq!(GitUrl::parse("github.com/a/b").remote, "https://github.com/a/b");
        assert_eq!(GitUrl::parse("git://h/r.git#:only-sub").subdir, "only-sub");
    }

    #[test]
    fn context_urls_are_told_apart() {
        assert!(is_git_url("https://h/r.git"));
        assert!(is_git_url("https://h/r.git#main:sub"));
        assert!(is_git_url("git@github.com:a/b.git"));
        assert!(is_git_url("git://h/r"));
        assert!(is_git_url("github.com/a/b"));
        assert!(is_git_url("file:///srv/repo"));
        assert!(!is_git_url("https://h/ctx.tar.gz"));
        assert!(!is_git_url("https://h/Dockerfile#x"));
        assert!(!is_git_url("./dir"));
    }

    #[test]
    fn subdirs_stay_inside() {
        assert_eq!(clean_subdir("r", "a/./b").unwrap(), PathBuf::from("a/b"));
        assert_eq!(clean_subdir("r", "/a").unwrap(), PathBuf::from("a"));
        assert!(clean_subdir("r", "../x").is_err());
        assert!(clean_subdir("r", "a/../../x").is_err());
    }

    #[test]
    fn credentials_are_redacted() {
        assert_eq!(redact("https://u:p@h/r.git"), "https://***@h/r.git");
        assert_eq!(redact("https://h/r.git"), "https://h/r.git");
    }

    fn git(dir: &Path, args: &[&str]) {
        let st = Command::new("git")
            .args([
                "-c",
                "user.name=t",
                "-c",
                "user.email=t@t",
                "-c",
                "init.defaultBranch=main",
            ])
            .args(args)
            .current_dir(dir)
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("HOME", dir)
            .status()
            .expect("git must be installed for these tests");
        assert!(st.success(), "git {args:?}");
    }

    #[test]
    fn fetches_branch_tag_commit_and_subdir_from_a_file_remote() {
        let tmp = tempfile::tempdir().unwrap();
        let repo = tmp.path().join("repo");
        std::fs::create_dir_all(repo.join("sub")).unwrap();
        git(&repo, &["init", "-q"]);
        std::fs::write(repo.join("a.txt"), "one").unwrap();
        std::fs::write(repo.join("sub/b.txt"), "bee").unwrap();
        git(&repo, &["add", "."]);
        git(&repo, &["commit", "-qm", "one"]);
        git(&repo, &["tag", "-a", "v1", "-m", "v1"]);
        std::fs::write(repo.join("a.txt"), "two").unwrap();
        git(&repo, &["commit", "-qam", "two"]);
        let remote = format!("file://{}", repo.display());
        let g = Git::new().unwrap();

        let fetch = |reference: &str, subdir: &str, keep: bool| {
            let dest = tempfile::tempdir_in(tmp.path()).unwrap();
            let url = GitUrl {
                remote: remote.clone(),
                reference: reference.into(),
                subdir: subdir.into(),
            };
            let r = g.fetch(&url, keep, tmp.path(), dest.path());
            (r, dest)
        };
        let (r, d) = fetch("main", "", false);
        let main = r.unwrap();
        assert_eq!(std::fs::read_to_string(d.path().join("a.txt")).unwrap(), "two");
        assert!(!d.path().join(".git").exists());

        let (r, d) = fetch("v1", "", false);
        let v1 = r.unwrap();
        assert_ne!(
            v1.commit, main.commit,
            "the annotated tag is peeled to its commit"
        );
        assert_eq!(std::fs::read_to_string(d.path().join("a.txt")).unwrap(), "one");

        let (r, d) = fetch(&v1.commit, "sub", false);
        r.unwrap();
        assert_eq!(std::fs::read_to_string(d.path().join("b.txt")).unwrap(), "bee");
        assert!(!d.path().join("a.txt").exists());

        let (r, d) = fetch("", "", true);
        assert_eq!(r.unwrap().commit, main.commit, "empty ref = HEAD");
        assert!(d.path().join(".git").is_dir());

        let (r, _) = fetch("nope", "", false);
        let msg = r.unwrap_err().to_string();
        assert!(msg.contains("nope") && msg.contains(&remote), "{msg}");

        let (r, _) = fetch("main", "missing", false);
        assert!(matches!(r.unwrap_err(), GitError::SubdirNotFound { .. }));
    }
}
