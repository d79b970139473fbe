//! Volumes, mounts, and the container filesystem commands: `volume`, `diff`, `export`,
//! `commit`, `cp`. Containers are made with `kiln run`; the mount behaviours (which need
//! `kiln run -v/--mount/--tmpfs/--read-only/--volumes-from` wired to `mounts::resolve`) are
//! checked by resolving the mounts with the library and running busybox with the runtime.

use std::fs;
use std::path::{Path, PathBuf};

use kiln_containers::mounts::{self, MountRequest};

use crate::harness::{busybox_env, Env};

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A stopped container named `name` that ran `script` in busybox.
fn ran(env: &Env, name: &str, script: &str) {
    env.ok(&["run", "--name", name, "busybox:local", "sh", "-c", script]);
}

#[test]
fn volume_commands() {
    let env = Env::new();
    let created = stdout(&env.ok(&["volume", "create", "data1"]));
    assert_eq!(created, "data1\n");
    let random = stdout(&env.ok(&["volume", "create"])).trim().to_string();
    assert_eq!(random.len(), 64, "{random}");
    let ls = stdout(&env.ok(&["volume", "ls"]));
    assert!(ls.starts_with("DRIVER    VOLUME NAME\n"), "{ls}");
    assert!(ls.contains("local     data1\n") && ls.contains(&random), "{ls}");
    let inspect: serde_json::Value =
        serde_json::from_slice(&env.ok(&["volume", "inspect", "data1"]).stdout).unwrap();
    assert_eq!(inspect[0]["Name"], "data1");
    assert_eq!(inspect[0]["Driver"], "local");
    let mp = PathBuf::from(inspect[0]["Mountpoint"].as_str().unwrap());
    assert!(mp.is_dir() && mp.ends_with("volumes/data1/_data"), "{mp:?}");
    let err = env.fails(&["volume", "create", "bad/name"]);
    assert!(
        err.contains("includes invalid characters for a local volume name"),
        "{err}"
    );
    let err = env.fails(&["volume", "rm", "nope"]);
    assert!(err.contains("get nope: no such volume"), "{err}");
    env.ok(&["volume", "rm", "-f", "nope"]);

    // A container's resolved mounts keep its volumes in use.
    let id = "a".repeat(64);
    let req = [
        mounts::parse_volume_arg("data1:/data").unwrap(),
        mounts::parse_volume_arg("/anon").unwrap(),
    ];
    mounts::resolve(&env.root(), &id, &req, &[], &[]).unwrap();
    let anonymous = mounts::anonymous_name(&id, "/anon");
    let err = env.fails(&["volume", "rm", "data1"]);
    assert!(
        err.contains(&format!("remove data1: volume is in use - [{id}]")),
        "{err}"
    );
    fs::write(mp.join("keep"), "x").unwrap();
    let pruned = stdout(&env.ok(&["volume", "prune", "-f", "-a"]));
    assert!(
        !pruned.contains("data1") && !pruned.contains(&anonymous),
        "in use: {pruned}"
    );
    assert!(pruned.contains(&random), "{pruned}");

    // Once the container is gone, prune takes only the anonymous volume; -a takes the rest.
    fs::remove_dir_all(env.root().join("containers").join(&id)).unwrap();
    let pruned = stdout(&env.ok(&["volume", "prune", "-f"]));
    assert!(
        pruned.starts_with(&format!(
            "Deleted Volumes:\n{anonymous}\n\nTotal reclaimed space:"
        )),
        "{pruned}"
    );
    let pruned = stdout(&env.ok(&["volume", "prune", "-f", "-a"]));
    assert!(pruned.contains("data1"), "{pruned}");
    assert_eq!(stdout(&env.ok(&["volume", "ls", "-q"])), "");
}

#[test]
fn diff_export_commit() {
    let env = busybox_env();
    ran(
        &env,
        "c1",
        "touch /a; rm /bin/ls; mkdir -p /home/x; echo hello > /home/x/f",
    );
    let diff = stdout(&env.ok(&["diff", "c1"]));
    assert_eq!(diff, "A /a\nC /bin\nD /bin/ls\nC /home\nA /home/x\nA /home/x/f\n");

    let tar = env.path("c1.tar");
    env.ok(&["export", "-o", tar.to_str().unwrap(), "c1"]);
    let mut names = Vec::new();
    let mut archive = tar::Archive::new(fs::File::open(&tar).unwrap());
    let mut content = String::new();
    for e in archive.entries().unwrap() {
        let mut e = e.unwrap();
        let name = e.path().unwrap().display().to_string();
        if name == "home/x/f" {
            std::io::Read::read_to_string(&mut e, &mut content).unwrap();
        }
        names.push(name);
    }
    assert_eq!(content, "hello\n");
    assert!(names.contains(&"a".to_string()) && names.contains(&"proc/".to_string()));
    assert!(!names.contains(&"bin/ls".to_string()), "deleted file exported");

    let id = stdout(&env.ok(&[
        "commit",
        "-m",
        "snapshot",
        "-a",
        "tester",
        "-c",
        r#"CMD ["cat", "/home/x/f"]"#,
        "-c",
        "ENV COMMITTED=yes",
        "c1",
        "snap:1",
    ]));
    assert!(id.starts_with("sha256:") && id.trim().len() == 71, "{id}");
    let out = stdout(&env.ok(&["run", "--rm", "snap:1"]));
    assert_eq!(out, "hello\n");
    let out = stdout(&env.ok(&[
        "run",
        "--rm",
        "snap:1",
        "sh",
        "-c",
        "echo $COMMITTED; ls /bin/ls || echo gone",
    ]));
    assert_eq!(out, "yes\ngone\n");
    let hist = stdout(&env.ok(&["history", "--no-trunc", "snap:1"]));
    assert!(hist.contains("snapshot"), "{hist}");
    // Without a reference the image is untagged; a bad change is refused.
    env.ok(&["commit", "c1"]);
    let err = env.fails(&["commit", "-c", "RUN true", "c1"]);
    assert!(err.contains("RUN is not a valid change command"), "{err}");
    let err = env.fails(&["diff", "nope"]);
    assert!(err.contains("No such container: nope"), "{err}");
}

#[test]
fn cp_both_ways_stays_inside() {
    let env = busybox_env();
    let host = env.path("host");
    fs::create_dir_all(&host).unwrap();
    fs::write(host.join("secret"), "host secret").unwrap();
    // /escape points at a host path; /up climbs above the root: both resolve inside.
    let script = format!(
        "mkdir -p /srv/d/sub {h}; echo inside > /srv/d/sub/f; echo decoy > {h}/secret; ln -s {h}/secret /escape; ln -s ../../../../../../etc /up",
        h = host.display()
    );
    ran(&env, "c2", &script);
    let out = env.path("out");
    env.ok(&["cp", "c2:/escape", out.to_str().unwrap()]);
    assert!(
        fs::symlink_metadata(&out).unwrap().file_type().is_symlink(),
        "without -L the link is copied"
    );
    fs::remove_file(&out).unwrap();
    env.ok(&["cp", "-L", "c2:/escape", out.to_str().unwrap()]);
    assert_eq!(fs::read_to_string(&out).unwrap(), "decoy\n");
    env.ok(&["cp", "c2:/up/passwd", out.to_str().unwrap()]);
    assert!(fs::read_to_string(&out).unwrap().starts_with("root:x:0:0"));

    // Directories: to a new path, into an existing dir, contents with /.
    let d = env.path("d");
    env.ok(&["cp", "c2:/srv/d", d.to_str().unwrap()]);
    assert_eq!(fs::read_to_string(d.join("sub/f")).unwrap(), "inside\n");
    env.ok(&["cp", "c2:/srv/d", d.to_str().unwrap()]);
    assert!(d.join("d/sub/f").exists());
    let err = env.fails(&["cp", "c2:/nothing", d.to_str().unwrap()]);
    assert!(
        err.contains("Could not find the file /nothing in container c2"),
        "{err}"
    );

    // Into the (stopped) container, through a symlink that points outside.
    let src = env.path("in.txt");
    fs::write(&src, "payload").unwrap();
    env.ok(&["cp", src.to_str().unwrap(), "c2:/escape"]);
    assert_eq!(fs::read_to_string(host.join("secret")).unwrap(), "host secret");
    // The file landed in the container's copy of that path.
    let back = env.path("back");
    env.ok(&[
        "cp",
        &format!("c2:{}/secret", host.display()),
        back.to_str().unwrap(),
    ]);
    assert_eq!(fs::read_to_string(&back).unwrap(), "payload");
    env.ok(&["cp", src.to_str().unwrap(), "c2:/srv/"]);
    let tar_out = env.kiln(&["cp", "c2:/srv/in.txt", "-"]).output().unwrap();
    assert!(tar_out.status.success());
    let mut archive = tar::Archive::new(&tar_out.stdout[..]);
    let mut entries = archive.entries().unwrap();
    let mut e = entries.next().unwrap().unwrap();
    assert_eq!(e.path().unwrap().to_str(), Some("in.txt"));
    assert_eq!(e.header().uid().unwrap(), 0);
    let mut s = String::new();
    std::io::Read::read_to_string(&mut e, &mut s).unwrap();
    assert_eq!(s, "payload");
}

/// Runs `script` in busybox with the container `id`'s mounts resolved from `reqs`; returns the
/// exit code and what it printed.
fn run_with_mounts(
    env: &Env,
    image: &str,
    id: &str,
    reqs: &[MountRequest],
    readonly: bool,
    script: &str,
) -> (i32, String) {
    let store = kiln_cache::Store::open(&env.root()).unwrap();
    let img = store.images().resolve(image).unwrap();
    let lower = kiln_containers::lifecycle::image_lower_dirs(&store, &img).unwrap();
    let image_volumes: Vec<String> = img
        .config
        .config
        .volumes
        .clone()
        .unwrap_or_default()
        .into_keys()
        .collect();
    let mounts = mounts::resolve(&env.root(), id, reqs, &image_volumes, &lower).unwrap();
    let dir = env.root().join("containers").join(id);
    for d in ["upper", "work", "runtime"] {
        fs::create_dir_all(dir.join(d)).unwrap();
    }
    let out_path = dir.join("out");
    let out = fs::File::create(&out_path).unwrap();
    let spec = kiln_runtime::ContainerSpec {
        rootfs: kiln_runtime::Rootfs::Overlay {
            lower,
            upper: dir.join("upper"),
            work: dir.join("work"),
        },
        readonly_rootfs: readonly,
        args: vec!["sh".into(), "-c".into(), script.into()],
        env: vec!["PATH=/bin".into()],
        cwd: "/".into(),
        user: String::new(),
        hostname: "box".into(),
        mounts,
        network: kiln_runtime::Network::None,
        security: kiln_runtime::Security::Default,
        etc_files: Default::default(),
        stdin: None,
        stdout: out.try_clone().unwrap().into(),
        stderr: out.into(),
        options: Default::default(),
    };
    let status = kiln_runtime::start(spec, &dir.join("runtime"))
        .unwrap()
        .wait()
        .unwrap();
    (status.code.unwrap_or(-1), fs::read_to_string(&out_path).unwrap())
}

#[test]
fn mounts_seen_inside() {
    let env = busybox_env();
    let v = |s: &str| mounts::parse_volume_arg(s).unwrap();

    // A named volume keeps data between two containers.
    let (code, _) = run_with_mounts(
        &env,
        "busybox:local",
        &"1".repeat(64),
        &[v("shared:/data")],
        false,
        "echo kept > /data/f",
    );
    assert_eq!(code, 0);
    let (code, out) = run_with_mounts(
        &env,
        "busybox:local",
        &"2".repeat(64),
        &[v("shared:/data")],
        false,
        "cat /data/f",
    );
    assert_eq!((code, out.as_str()), (0, "kept\n"));

    // A read-only bind cannot be written; the host sees its file.
    let host = env.path("bind");
    fs::create_dir_all(&host).unwrap();
    fs::write(host.join("h"), "from host").unwrap();
    let ro = v(&format!("{}:/b:ro", host.display()));
    let (code, out) = run_with_mounts(
        &env,
        "busybox:local",
        &"3".repeat(64),
        &[ro],
        false,
        "cat /b/h; echo x > /b/new && echo wrote",
    );
    assert_ne!(code, 0, "{out}");
    assert!(
        out.starts_with("from host") && out.contains("Read-only file system") && !out.contains("wrote"),
        "{out}"
    );

    // --tmpfs is a tmpfs; --read-only makes the root read-only but the tmpfs writable.
    let t = mounts::parse_tmpfs_arg("/scratch:size=1m").unwrap();
    let (code, out) = run_with_mounts(
        &env,
        "busybox:local",
        &"4".repeat(64),
        &[t],
        true,
        "grep ' /scratch ' /proc/mounts; echo y > /scratch/ok && echo tmpfs-writable; touch /rootfile || echo root-ro",
    );
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("tmpfs /scratch tmpfs") && out.contains("size=1024k"),
        "{out}"
    );
    assert!(out.contains("tmpfs-writable") && out.contains("root-ro"), "{out}");

    // --volumes-from needs the source container's record; a committed image with a VOLUME
    // seeds a fresh anonymous volume with its content.
    ran(&env, "seed", "mkdir /data && echo seeded > /data/s");
    env.ok(&["commit", "-c", "VOLUME /data", "seed", "withvol:1"]);
    let seed_id = kiln_containers::Containers::open(&env.root())
        .unwrap()
        .lookup("seed")
        .unwrap()
        .id;
    let src_id = "5".repeat(64);
    let (code, out) = run_with_mounts(
        &env,
        "withvol:1",
        &src_id,
        &[],
        false,
        "cat /data/s; echo more > /data/m",
    );
    assert_eq!((code, out.as_str()), (0, "seeded\n"));
    let m = mounts::load(&env.root(), &src_id).unwrap();
    assert_eq!(m.len(), 1);
    assert!(m[0].anonymous && Path::new(&m[0].source).join("s").exists());
    // Give the record of `seed` the volume, then mount it through --volumes-from.
    mounts::save_dir(&env.root().join("containers").join(&seed_id), &m).unwrap();
    let vf = mounts::parse_volumes_from_arg("seed:ro").unwrap();
    let (code, out) = run_with_mounts(
        &env,
        "busybox:local",
        &"6".repeat(64),
        &[vf],
        false,
        "cat /data/m; touch /data/z || echo ro",
    );
    assert_eq!((code, out.as_str().lines().next()), (0, Some("more")), "{out}");
    assert!(out.contains("ro"), "{out}");

    // A bind source that does not exist: Docker's error, no volume left behind.
    let before = stdout(&env.ok(&["volume", "ls", "-q"]));
    let bad = [
        v("fresh:/f"),
        mounts::parse_mount_arg("type=bind,src=/does/not/exist,dst=/x").unwrap(),
    ];
    let err = mounts::resolve(&env.root(), &"7".repeat(64), &bad, &[], &[]).unwrap_err();
    assert_eq!(
        err.to_string(),
        "invalid mount config for type \"bind\": bind source path does not exist: /does/not/exist"
    );
    assert_eq!(stdout(&env.ok(&["volume", "ls", "-q"])), before);
    assert!(!env.root().join("containers").join("7".repeat(64)).exists());
}
