//! Users and groups from the image's `/etc/passwd` and `/etc/group`, read inside a root dir
//! (never escaping it), with Docker/BuildKit semantics:
//!
//! - `""` means `0` (root with the groups that list it), falling back to 0:0 on any error;
//! - `uid:gid` with both numeric needs no files and gets no supplementary groups;
//! - a numeric uid need not exist in passwd (its gid is then 0); a name must exist;
//! - a user given without a group gets its passwd gid and, as supplementary groups, every group
//!   of `/etc/group` that lists it as a member (BuildKit's RUN), preceded by its passwd gid for
//!   `docker run` and `docker exec` ([`Groups::WithPrimary`]);
//! - an explicit group (name or number) replaces the gid and gives no supplementary groups.

use std::path::Path;

use crate::layers::{LayerError, RootView};

/// Highest uid or gid accepted, as in runc.
const MAX_ID: u64 = 2_147_483_647;

/// Errors of user and group resolution.
#[derive(Debug, thiserror::Error)]
pub enum UserError {
    /// Reading `/etc/passwd` or `/etc/group` inside the root failed.
    #[error("failed to read `{file}` in the container's root")]
    ReadFile {
        /// `/etc/passwd` or `/etc/group`.
        file: &'static str,
        /// The cause.
        #[source]
        source: LayerError,
    },
    /// A user name that is not in passwd.
    #[error("unable to find user {name}: no matching entries in passwd file")]
    NoSuchUser {
        /// The name as written.
        name: String,
    },
    /// A group name that is not in group.
    #[error("unable to find group {name}: no matching entries in group file")]
    NoSuchGroup {
        /// The name as written.
        name: String,
    },
    /// A numeric id out of range.
    #[error("invalid id `{id}` in user spec `{spec}`: uids and gids must be in range 0-{MAX_ID}")]
    OutOfRange {
        /// The id as written.
        id: String,
        /// The whole spec.
        spec: String,
    },
}

/// The credentials a `USER` spec resolves to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedUser {
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Supplementary group ids, in `/etc/group` order.
    pub additional_gids: Vec<u32>,
    /// Home directory from passwd (`/` when unknown).
    pub home: String,
}

#[derive(Debug)]
struct PasswdEntry {
    name: String,
    uid: u32,
    gid: u32,
    home: String,
}

#[derive(Debug)]
struct GroupEntry {
    name: String,
    gid: u32,
    members: Vec<String>,
}

fn parse_passwd(text: &str) -> Vec<PasswdEntry> {
    text.lines()
        .filter_map(|line| {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                return None;
            }
            let f: Vec<&str> = line.split(':').collect();
            Some(PasswdEntry {
                name: f.first()?.to_string(),
                uid: f.get(2)?.parse().ok()?,
                gid: f.get(3)?.parse().ok()?,
                home: f.get(5).map_or_else(String::new, |h| h.to_string()),
            })
        })
        .collect()
}

fn parse_group(text: &str) -> Vec<GroupEntry> {
    text.lines()
        .filter_map(|line| {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                return None;
            }
            let f: Vec<&str> = line.split(':').collect();
            Some(GroupEntry {
                name: f.first()?.to_string(),
                gid: f.get(2)?.parse().ok()?,
                members: f
                    .get(3)
                    .map(|m| {
                        m.split(',')
                            .map(str::trim)
                            .filter(|s| !s.is_empty())
                            .map(String::from)
                            .collect()
                    })
                    .unwrap_or_default(),
            })
        })
        .collect()
}

fn read_passwd(view: &RootView) -> Result<Vec<PasswdEntry>, UserError> {
    let bytes = view
        .read_file("/etc/passwd")
        .map_err(|source| UserError::ReadFile {
            file: "/etc/passwd",
            source,
        })?;
    Ok(bytes
        .map(|b| parse_passwd(&String::from_utf8_lossy(&b)))
        .unwrap_or_default())
}

fn read_group(view: &RootView) -> Result<Vec<GroupEntry>, UserError> {
    let bytes = view
        .read_file("/etc/group")
        .map_err(|source| UserError::ReadFile {
            file: "/etc/group",
            source,
        })?;
    Ok(bytes
        .map(|b| parse_group(&String::from_utf8_lossy(&b)))
        .unwrap_or_default())
}

/// Parses a numeric id: `Ok(None)` if not a number, an error if a number out of range.
fn numeric(id: &str, spec: &str) -> Result<Option<u32>, UserError> {
    if id.is_empty() || !id.bytes().all(|b| b.is_ascii_digit()) {
        return Ok(None);
    }
    match id.parse::<u64>() {
        Ok(n) if n <= MAX_ID => Ok(Some(n as u32)),
        _ => Err(UserError::OutOfRange {
            id: id.to_string(),
            spec: spec.to_string(),
        }),
    }
}

/// Which supplementary groups a user named without a group gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Groups {
    /// The groups of `/etc/group` that list the user: what BuildKit gives a RUN step.
    #[default]
    Members,
    /// The user's passwd gid, then those groups: what `docker run` and `docker exec` give.
    WithPrimary,
}

/// Resolves a `USER` spec against the `/etc/passwd` and `/etc/group` of a root view.
pub fn resolve_user_in(view: &RootView, spec: &str, groups: Groups) -> Result<ResolvedUser, UserError> {
    if spec.is_empty() && groups == Groups::Members {
        // A RUN without USER: root with no supplementary groups at all (BuildKit).
        let mut root = resolve_user_in(view, "", Groups::WithPrimary)?;
        root.additional_gids.clear();
        return Ok(root);
    }
    if spec.is_empty() {
        return Ok(resolve_user_in(view, "0", groups).unwrap_or(ResolvedUser {
            uid: 0,
            gid: 0,
            additional_gids: Vec::new(),
            home: "/".to_string(),
        }));
    }
    let (user_arg, group_arg) = match spec.split_once(':') {
        Some((u, g)) => (u, g),
        None => (spec, ""),
    };
    let uid_arg = numeric(user_arg, spec)?;
    let gid_arg = numeric(group_arg, spec)?;
    let passwd = read_passwd(view)?;
    let home_of = |uid: u32| passwd.iter().find(|e| e.uid == uid).map(|e| e.home.clone());

    // BuildKit's fast path: both numeric (or the empty spec) need no files for the ids.
    if let (Some(uid), Some(gid)) = (uid_arg, gid_arg) {
        let home = home_of(uid)
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "/".to_string());
        return Ok(ResolvedUser {
            uid,
            gid,
            additional_gids: Vec::new(),
            home,
        });
    }

    let mut user = ResolvedUser {
        uid: 0,
        gid: 0,
        additional_gids: Vec::new(),
        home: "/".to_string(),
    };
    let matched = if user_arg.is_empty() {
        passwd.iter().find(|e| e.uid == 0)
    } else if let Some(uid) = uid_arg {
        passwd.iter().find(|e| e.uid == uid)
    } else {
        passwd.iter().find(|e| e.name == user_arg)
    };
    let mut matched_name = None;
    match matched {
        Some(e) => {
            user.uid = e.uid;
            user.gid = e.gid;
            if !e.home.is_empty() {
                user.home = e.home.clone();
            }
            matched_name = Some(e.name.clone());
        }
        None => match uid_arg {
            Some(uid) => user.uid = uid,
            None if user_arg.is_empty() => {}
            None => {
                return Err(UserError::NoSuchUser {
                    name: user_arg.to_string(),
                })
            }
        },
    }

    if !group_arg.is_empty() {
        let groups = read_group(view)?;
        let found = match gid_arg {
            Some(gid) => groups.iter().find(|g| g.gid == gid),
            None => groups.iter().find(|g| g.name == group_arg),
        };
        user.gid = match (found, gid_arg) {
            (Some(g), _) => g.gid,
            (None, Some(gid)) => gid,
            (None, None) => {
                return Err(UserError::NoSuchGroup {
                    name: group_arg.to_string(),
                })
            }
        };
    } else if let Some(name) = matched_name {
        // Every group listing the user, after the primary group for docker run / exec.
        let listed = read_group(view)?;
        user.additional_gids = match groups {
            Groups::Members => Vec::new(),
            Groups::WithPrimary => vec![user.gid],
        };
        for g in listed.iter().filter(|g| g.members.contains(&name)) {
            if !user.additional_gids.contains(&g.gid) {
                user.additional_gids.push(g.gid);
            }
        }
    }
    Ok(user)
}

/// Resolves a `USER` spec (`""`, `name`, `uid`, `name:group`, `uid:gid`, ...) inside `root`.
pub fn resolve_user(root: &Path, spec: &str, groups: Groups) -> Result<ResolvedUser, UserError> {
    resolve_user_in(&RootView::Dir(root.to_path_buf()), spec, groups)
}

/// Looks a user name up in `root`'s `/etc/passwd`: `(uid, gid)` or `None`.
pub fn lookup_user(root: &Path, name: &str) -> Result<Option<(u32, u32)>, UserError> {
    let passwd = read_passwd(&RootView::Dir(root.to_path_buf()))?;
    Ok(passwd.iter().find(|e| e.name == name).map(|e| (e.uid, e.gid)))
}

/// Looks a group name up in `root`'s `/etc/group`.
pub fn lookup_group(root: &Path, name: &str) -> Result<Option<u32>, UserError> {
    let groups = read_group(&RootView::Dir(root.to_path_buf()))?;
    Ok(groups.iter().find(|g| g.name == name).map(|g| g.gid))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
        daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n\
        # comment\n\
        app:x:1000:1000:App:/home/app:/bin/sh\n\
        broken:x:notanumber:1::/:\n";
    const GROUP: &str = "root:x:0:\nwheel:x:10:root,app\napp:x:1000:\naudio:x:29: app , other\nstaff:x:50:\n";

    fn root() -> tempfile::TempDir {
        let t = tempfile::tempdir().unwrap();
        fs::create_dir_all(t.path().join("etc")).unwrap();
        fs::write(t.path().join("etc/passwd"), PASSWD).unwrap();
        fs::write(t.path().join("etc/group"), GROUP).unwrap();
        t
    }

    fn user(uid: u32, gid: u32, sg: &[u32], home: &str) -> ResolvedUser {
        ResolvedUser {
            uid,
            gid,
            additional_gids: sg.to_vec(),
            home: home.to_string(),
        }
    }

    #[test]
    fn names_numbers_and_groups() {
        let t = root();
        let r = t.path();
        assert_eq!(
            resolve_user(r, "", Groups::WithPrimary).unwrap(),
            user(0, 0, &[0, 10], "/root")
        );
        assert_eq!(
            resolve_user(r, "root", Groups::WithPrimary).unwrap(),
            user(0, 0, &[0, 10], "/root")
        );
        assert_eq!(
            resolve_user(r, "app", Groups::WithPrimary).unwrap(),
            user(1000, 1000, &[1000, 10, 29], "/home/app")
        );
        assert_eq!(
            resolve_user(r, "1000", Groups::WithPrimary).unwrap(),
            user(1000, 1000, &[1000, 10, 29], "/home/app")
        );
        assert_eq!(
            resolve_user(r, "1000:1000", Groups::WithPrimary).unwrap(),
            user(1000, 1000, &[], "/home/app")
        );
        assert_eq!(
            resolve_user(r, "app:staff", Groups::WithPrimary).unwrap(),
            user(1000, 50, &[], "/home/app")
        );
        assert_eq!(
            resolve_user(r, "app:77", Groups::WithPrimary).unwrap(),
            user(1000, 77, &[], "/home/app")
        );
        assert_eq!(
            resolve_user(r, "4242", Groups::WithPrimary).unwrap(),
            user(4242, 0, &[], "/")
        );
        assert_eq!(
            resolve_user(r, "4242:4343", Groups::WithPrimary).unwrap(),
            user(4242, 4343, &[], "/")
        );
        assert_eq!(
            resolve_user(r, "daemon:wheel", Groups::WithPrimary).unwrap(),
            user(1, 10, &[], "/usr/sbin")
        );
    }

    #[test]
    fn buildkit_run_gives_only_the_groups_listing_the_user() {
        let t = root();
        let r = t.path();
        assert_eq!(
            resolve_user(r, "app", Groups::Members).unwrap(),
            user(1000, 1000, &[10, 29], "/home/app")
        );
        assert_eq!(
            resolve_user(r, "1000", Groups::Members).unwrap(),
            user(1000, 1000, &[10, 29], "/home/app")
        );
        assert_eq!(
            resolve_user(r, "", Groups::Members).unwrap(),
            user(0, 0, &[], "/root")
        );
        assert_eq!(
            resolve_user(r, "root", Groups::Members).unwrap(),
            user(0, 0, &[10], "/root")
        );
        assert_eq!(
            resolve_user(r, "app:staff", Groups::Members).unwrap(),
            user(1000, 50, &[], "/home/app")
        );
    }

    #[test]
    fn unknown_names_are_errors() {
        let t = root();
        let err = resolve_user(t.path(), "foo", Groups::WithPrimary).unwrap_err();
        assert_eq!(
            err.to_string(),
            "unable to find user foo: no matching entries in passwd file"
        );
        let err = resolve_user(t.path(), "app:nogroup", Groups::WithPrimary).unwrap_err();
        assert_eq!(
            err.to_string(),
            "unable to find group nogroup: no matching entries in group file"
        );
        let err = resolve_user(t.path(), "99999999999", Groups::WithPrimary).unwrap_err();
        assert!(err.to_string().contains("must be in range 0-2147483647"), "{err}");
    }

    #[test]
    fn missing_files_allow_numeric_ids_only() {
        let t = tempfile::tempdir().unwrap();
        assert_eq!(
            resolve_user(t.path(), "", Groups::WithPrimary).unwrap(),
            user(0, 0, &[], "/")
        );
        assert_eq!(
            resolve_user(t.path(), "12", Groups::WithPrimary).unwrap(),
            user(12, 0, &[], "/")
        );
        assert_eq!(
            resolve_user(t.path(), "12:34", Groups::WithPrimary).unwrap(),
            user(12, 34, &[], "/")
        );
        assert!(matches!(
            resolve_user(t.path(), "app", Groups::WithPrimary),
            Err(UserError::NoSuchUser { .. })
        ));
        assert_eq!(lookup_user(t.path(), "app").unwrap(), None);
        assert_eq!(lookup_group(t.path(), "app").unwrap(), None);
    }

    #[test]
    fn lookups() {
        let t = root();
        assert_eq!(lookup_user(t.path(), "app").unwrap(), Some((1000, 1000)));
        assert_eq!(lookup_user(t.path(), "nobody").unwrap(), None);
        assert_eq!(lookup_group(t.path(), "audio").unwrap(), Some(29));
    }

    #[test]
    fn etc_symlink_cannot_escape_the_root() {
        let outer = tempfile::tempdir().unwrap();
        let inner = outer.path().join("root");
        fs::create_dir_all(outer.path().join("etc2")).unwrap();
        fs::write(outer.path().join("etc2/passwd"), "evil:x:7:7::/:\n").unwrap();
        fs::create_dir_all(&inner).unwrap();
        std::os::unix::fs::symlink("../etc2", inner.join("etc")).unwrap();
        // `../etc2` from the root is the root's own (missing) `/etc2`.
        assert_eq!(lookup_user(&inner, "evil").unwrap(), None);
    }
}
