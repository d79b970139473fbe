//! The store commands against real consumers: docker, skopeo, umoci; and every bad-input case
//! leaving the store as it was.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::harness::{busybox_tar, frame, Env};

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A docker image name unique to this test process.
fn unique_name() -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!(
        "kiln-it-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// The Docker 20.10 client, failing clearly when dockerd is not running.
fn docker() -> &'static str {
    const DOCKER: &str = "/usr/bin/docker";
    let ok = Command::new(DOCKER)
        .arg("info")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "this test needs dockerd: run `bash ../shared/peers/start-docker.sh` first ({DOCKER} info failed)"
    );
    DOCKER
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?} failed\n{}", frame(&out));
    stdout(&out)
}

fn tool(name: &str) -> PathBuf {
    let p = PathBuf::from("/usr/bin").join(name);
    assert!(
        p.exists(),
        "this test needs {name} ({} is missing; apt-get install {name})",
        p.display()
    );
    p
}

/// Removes docker tags when dropped, so failed tests clean up too.
struct DockerTags(Vec<String>);

impl Drop for DockerTags {
    fn drop(&mut self) {
        for t in &self.0 {
            let _ = Command::new("/usr/bin/docker").args(["rmi", t]).output();
        }
    }
}

/// Everything under the store root except lock files, with sizes, plus images.json's content:
/// what "the store is as it was" means.
fn snapshot(root: &Path) -> Vec<String> {
    fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) {
        let Ok(entries) = fs::read_dir(dir) else { return };
        for e in entries.flatten() {
            let p = e.path();
            let rel = p.strip_prefix(base).unwrap().display().to_string();
            if rel == "lock" || rel == "gc.lock" {
                continue;
            }
            if p.is_dir() {
                out.push(format!("{rel}/"));
                walk(base, &p, out);
            } else {
                out.push(format!(
                    "{rel} {}",
                    fs::metadata(&p).map(|m| m.len()).unwrap_or(0)
                ));
            }
        }
    }
    let mut out = Vec::new();
    walk(root, root, &mut out);
    out.sort();
    out.push(fs::read_to_string(root.join("images.json")).unwrap_or_default());
    out
}

fn json(out: &std::process::Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("not JSON ({e})\n{}", frame(out)))
}

fn diff_ids(env: &Env, image: &str) -> serde_json::Value {
    json(&env.ok(&["inspect", image]))[0]["RootFS"]["Layers"].clone()
}

/// A ustar header block for `name` with `size` and type `kind`, checksum filled in.
fn tar_header(name: &str, size: u64, kind: u8) -> [u8; 512] {
    let mut h = [0u8; 512];
    h[..name.len()].copy_from_slice(name.as_bytes());
    h[100..107].copy_from_slice(b"0000644");
    h[108..115].copy_from_slice(b"0000000");
    h[116..123].copy_from_slice(b"0000000");
    h[124..135].copy_from_slice(format!("{size:011o}").as_bytes());
    h[136..147].copy_from_slice(b"00000000000");
    h[156] = kind;
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|b| *b as u32).sum();
    h[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
    h
}

/// A tar archive of `(name, content)` regular files, ended properly.
fn tar_of(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, data) in files {
        out.extend_from_slice(&tar_header(name, data.len() as u64, b'0'));
        out.extend_from_slice(data);
        out.resize(out.len().div_ceil(512) * 512, 0);
    }
    out.resize(out.len() + 1024, 0);
    out
}

/// Asserts that loading `archive` fails with a message containing every needle, and that the
/// store did not change.
fn load_fails(env: &Env, archive: &Path, needles: &[&str]) {
    env.ok(&["images", "-q"]); // creates the store layout
    let before = snapshot(&env.root());
    let err = env.fails(&["load", "-i", archive.to_str().unwrap()]);
    for n in needles {
        assert!(err.contains(n), "error should mention {n:?}:\n{err}");
    }
    assert_eq!(
        snapshot(&env.root()),
        before,
        "the failed load changed the store; error was:\n{err}"
    );
}

/// Saves busybox:local from a fresh store and unpacks the archive into `dir`.
fn saved_layout(env: &Env, dir: &Path) {
    let tar = env.path("saved.tar");
    env.ok(&["save", "-o", tar.to_str().unwrap(), "busybox:local"]);
    fs::create_dir_all(dir).unwrap();
    run(Command::new("tar").arg("-xf").arg(&tar).arg("-C").arg(dir));
}

fn tar_dir(dir: &Path, out: &Path) {
    run(Command::new("tar")
        .arg("-cf")
        .arg(out)
        .arg("-C")
        .arg(dir)
        .arg("."));
}

#[test]
fn import_save_then_docker_load_and_run() {
    let docker = docker();
    let env = Env::new();
    let name = format!("{}:v1", unique_name());
    let out = env.ok(&["import", busybox_tar().to_str().unwrap(), &name]);
    let id = stdout(&out).trim().to_string();
    assert!(
        id.starts_with("sha256:") && id.len() == 71,
        "import prints the image ID: {id}"
    );
    let tar = env.path("out.tar");
    env.ok(&["save", "-o", tar.to_str().unwrap(), &name]);
    let _cleanup = DockerTags(vec![name.clone()]);
    let loaded = run(Command::new(docker).args(["load", "-i"]).arg(&tar));
    assert!(loaded.contains(&format!("Loaded image: {name}")), "{loaded}");
    let docker_id = run(Command::new(docker).args(["inspect", "--format", "{{.Id}}", &name]));
    assert_eq!(docker_id.trim(), id, "docker computes the same image ID");
    let said =
        run(Command::new(docker).args(["run", "--rm", &name, "/bin/busybox", "echo", "hello from kiln"]));
    assert_eq!(said.trim(), "hello from kiln");
}

#[test]
fn docker_save_kiln_load_save_docker_load_keeps_diff_ids() {
    let docker = docker();
    let env = Env::new();
    let src = format!("{}:src", unique_name());
    let back = format!("{}:back", unique_name());
    let _cleanup = DockerTags(vec![src.clone(), back.clone()]);
    run(Command::new(docker).args(["tag", "busybox:local", &src]));
    let original = run(Command::new(docker).args(["inspect", "--format", "{{json .RootFS.Layers}}", &src]));
    let saved = env.path("docker.tar");
    run(Command::new(docker).args(["save", "-o"]).arg(&saved).arg(&src));
    let out = env.ok(&["load", "-i", saved.to_str().unwrap()]);
    assert_eq!(stdout(&out).trim(), format!("Loaded image: {src}"));
    assert_eq!(
        diff_ids(&env, &src),
        serde_json::from_str::<serde_json::Value>(&original).unwrap()
    );
    env.ok(&["tag", &src, &back]);
    let resaved = env.path("kiln.tar");
    env.ok(&["save", "-o", resaved.to_str().unwrap(), &back]);
    run(Command::new(docker).args(["load", "-i"]).arg(&resaved));
    let roundtrip = run(Command::new(docker).args(["inspect", "--format", "{{json .RootFS.Layers}}", &back]));
    assert_eq!(
        roundtrip.trim(),
        original.trim(),
        "same diff IDs after docker -> kiln -> docker"
    );
    // Loading from stdin works too and is idempotent.
    let out = env
        .kiln(&["load"])
        .stdin(fs::File::open(&saved).unwrap())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", frame(&out));
}

#[test]
fn oci_layout_is_accepted_by_skopeo_and_umoci() {
    let skopeo = tool("skopeo");
    let umoci = tool("umoci");
    let env = Env::new();
    env.with_busybox();
    let tar = env.path("oci.tar");
    env.ok(&[
        "save",
        "--format",
        "oci",
        "-o",
        tar.to_str().unwrap(),
        "busybox:local",
    ]);
    let listing = run(Command::new("tar").arg("-tf").arg(&tar));
    assert!(
        listing.contains("index.json") && listing.contains("oci-layout"),
        "{listing}"
    );
    assert!(
        !listing.contains("manifest.json"),
        "--format oci writes no docker manifest.json:\n{listing}"
    );
    let inspected: serde_json::Value = serde_json::from_str(&run(Command::new(&skopeo)
        .arg("inspect")
        .arg(format!("oci-archive:{}", tar.display()))))
    .unwrap();
    assert_eq!(
        inspected["Layers"].as_array().map(|l| l.len()),
        Some(1),
        "{inspected}"
    );
    assert_eq!(inspected["Os"], "linux");
    let layout = env.path("layout");
    fs::create_dir_all(&layout).unwrap();
    run(Command::new("tar").arg("-xf").arg(&tar).arg("-C").arg(&layout));
    let bundle = env.path("bundle");
    run(Command::new(&umoci)
        .arg("unpack")
        .arg("--image")
        .arg(format!("{}:local", layout.display()))
        .arg(&bundle));
    assert!(
        bundle.join("rootfs/bin/busybox").is_file(),
        "umoci unpacked the rootfs"
    );
    // And kiln reads its own OCI output back, keeping the tag.
    let env2 = Env::new();
    let out = env2.ok(&["load", "-i", tar.to_str().unwrap()]);
    assert_eq!(stdout(&out).trim(), "Loaded image: busybox:local");
    assert_eq!(diff_ids(&env2, "busybox:local"), diff_ids(&env, "busybox:local"));
}

#[test]
fn import_accepts_every_compression() {
    let env = Env::new();
    let plain = busybox_tar();
    env.ok(&["import", plain.to_str().unwrap(), "plain"]);
    let expected = diff_ids(&env, "plain");
    for (tool, ext) in [("gzip", "gz"), ("zstd", "zst"), ("bzip2", "bz2"), ("xz", "xz")] {
        if Command::new(tool).arg("--version").output().is_err() {
            panic!("this test needs `{tool}` installed");
        }
        let file = env.path(&format!("rootfs.tar.{ext}"));
        let data = run_bytes(Command::new(tool).arg("-c").arg(&plain));
        fs::write(&file, data).unwrap();
        env.ok(&["import", file.to_str().unwrap(), &format!("c:{ext}")]);
        assert_eq!(diff_ids(&env, &format!("c:{ext}")), expected, "{tool}");
    }
    // From stdin, with a message.
    let out = env
        .kiln(&["import", "-m", "piped in", "-", "fromstdin"])
        .stdin(fs::File::open(&plain).unwrap())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", frame(&out));
    let inspected = json(&env.ok(&["inspect", "fromstdin"]));
    assert_eq!(inspected[0]["Comment"], "piped in");
    assert_eq!(inspected[0]["RepoTags"][0], "fromstdin:latest");
}

fn run_bytes(cmd: &mut Command) -> Vec<u8> {
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{cmd:?} failed");
    out.stdout
}

#[test]
fn failed_imports_leave_the_store_as_it_was() {
    let env = Env::new();
    env.with_busybox();
    let data = fs::read(busybox_tar()).unwrap();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("cut.tar", data[..data.len() / 2].to_vec(), "truncated"),
        ("junk.tar", vec![0x42; 4096], "not a tar archive"),
        ("empty.tar", Vec::new(), "empty"),
        (
            "cut.tar.gz",
            {
                let gz = run_bytes(Command::new("gzip").arg("-c").arg(busybox_tar()));
                gz[..gz.len() / 2].to_vec()
            },
            "cut.tar.gz",
        ),
    ];
    for (name, bytes, needle) in cases {
        let file = env.path(name);
        fs::write(&file, bytes).unwrap();
        let before = snapshot(&env.root());
        let err = env.fails(&["import", file.to_str().unwrap(), "broken:1"]);
        assert!(err.contains(needle) && err.contains(name), "{name}: {err}");
        assert_eq!(snapshot(&env.root()), before, "{name} changed the store: {err}");
    }
}

#[test]
fn load_rejects_truncated_archives() {
    let env = Env::new();
    env.with_busybox();
    let saved = env.path("saved.tar");
    env.ok(&["save", "-o", saved.to_str().unwrap(), "busybox:local"]);
    let data = fs::read(&saved).unwrap();
    let target = Env::new();
    for (i, cut) in [data.len() / 2, data.len() - 1024, 700].into_iter().enumerate() {
        let file = env.path(&format!("cut{i}.tar"));
        fs::write(&file, &data[..cut]).unwrap();
        load_fails(&target, &file, &[file.to_str().unwrap()]);
    }
    let err = target.fails(&["load", "-i", env.path("cut0.tar").to_str().unwrap()]);
    assert!(
        err.contains("truncated") && err.contains("blobs/sha256/"),
        "names the entry: {err}"
    );
}

#[test]
fn load_rejects_wrong_digests_missing_blobs_and_bad_paths() {
    let env = Env::new();
    env.with_busybox();
    let target = Env::new();
    target.with_busybox();
    let image = json(&env.ok(&["inspect", "busybox:local"]));
    let config = image[0]["Id"]
        .as_str()
        .unwrap()
        .trim_start_matches("sha256:")
        .to_string();

    // A blob whose content does not match its name.
    let dir = env.path("wrong");
    saved_layout(&env, &dir);
    let blob = dir.join("blobs/sha256").join(&config);
    let mut bytes = fs::read(&blob).unwrap();
    bytes[0] ^= 1;
    fs::set_permissions(&blob, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    fs::write(&blob, bytes).unwrap();
    let wrong = env.path("wrong.tar");
    tar_dir(&dir, &wrong);
    load_fails(
        &target,
        &wrong,
        &["wrong.tar", &format!("blobs/sha256/{config}"), "digest mismatch"],
    );

    // A manifest pointing at a blob the archive lacks.
    let dir = env.path("missing");
    saved_layout(&env, &dir);
    fs::remove_file(dir.join("blobs/sha256").join(&config)).unwrap();
    let missing = env.path("missing.tar");
    tar_dir(&dir, &missing);
    load_fails(&target, &missing, &["missing.tar", &config, "missing"]);

    // Entries escaping the archive root.
    let evil = env.path("evil.tar");
    fs::write(&evil, tar_of(&[("../evil", b"x"), ("manifest.json", b"[]")])).unwrap();
    load_fails(&target, &evil, &["evil.tar", "../evil", "unsafe path"]);
    fs::write(&evil, tar_of(&[("/etc/evil", b"x")])).unwrap();
    load_fails(&target, &evil, &["/etc/evil"]);

    // Neither manifest.json nor index.json.
    let none = env.path("none.tar");
    fs::write(&none, tar_of(&[("hello.txt", b"hi")])).unwrap();
    load_fails(&target, &none, &["none.tar", "manifest.json"]);

    // manifest.json that is not JSON.
    let bad = env.path("bad.tar");
    fs::write(&bad, tar_of(&[("manifest.json", b"{not json")])).unwrap();
    load_fails(&target, &bad, &["bad.tar", "manifest.json", "not valid"]);

    // Garbage.
    let junk = env.path("junk.tar");
    fs::write(&junk, vec![0x42; 4096]).unwrap();
    load_fails(&target, &junk, &["junk.tar"]);
}

#[test]
fn load_rejects_huge_headers() {
    let env = Env::new();
    // A PAX extended header claiming 1 GiB: refused before anything is read.
    let mut data = tar_header("PaxHeaders/x", 1 << 30, b'x').to_vec();
    data.extend_from_slice(&[0u8; 4096]);
    let huge = env.path("huge-pax.tar");
    fs::write(&huge, &data).unwrap();
    load_fails(&env, &huge, &["huge-pax.tar", "PaxHeaders/x", "allowed"]);
    // A GNU long name of 100 MiB.
    let mut data = tar_header("././@LongLink", 100 << 20, b'L').to_vec();
    data.extend_from_slice(&[0u8; 4096]);
    fs::write(&huge, &data).unwrap();
    load_fails(&env, &huge, &["huge-pax.tar", "@LongLink"]);
    // A manifest.json of 64 MiB (only the header: it is refused by size).
    let mut data = tar_header("manifest.json", 64 << 20, b'0').to_vec();
    data.extend_from_slice(&[0u8; 4096]);
    let big = env.path("big-manifest.tar");
    fs::write(&big, &data).unwrap();
    load_fails(&env, &big, &["big-manifest.tar", "manifest.json", "allowed"]);
}

#[test]
fn load_keeps_several_images_and_tags() {
    let env = Env::new();
    env.with_busybox();
    env.ok(&["tag", "busybox:local", "busybox:other"]);
    env.ok(&["tag", "busybox:local", "localhost:5000/team/app:1"]);
    let plain = busybox_tar();
    let gz = env.path("other.tar.gz");
    fs::write(&gz, run_bytes(Command::new("gzip").arg("-c").arg(&plain))).unwrap();
    env.ok(&["import", "-m", "second", gz.to_str().unwrap(), "second:v2"]);
    let tar = env.path("multi.tar");
    env.ok(&[
        "save",
        "-o",
        tar.to_str().unwrap(),
        "busybox",
        "localhost:5000/team/app:1",
        "second:v2",
    ]);
    let manifest: serde_json::Value = serde_json::from_str(&run(Command::new("tar")
        .arg("-xOf")
        .arg(&tar)
        .arg("manifest.json")))
    .unwrap();
    assert_eq!(
        manifest.as_array().unwrap().len(),
        2,
        "two images, one entry each: {manifest}"
    );
    let target = Env::new();
    let out = stdout(&target.ok(&["load", "-i", tar.to_str().unwrap()]));
    for t in [
        "busybox:local",
        "busybox:other",
        "localhost:5000/team/app:1",
        "second:v2",
    ] {
        assert!(out.contains(&format!("Loaded image: {t}\n")), "{t} in\n{out}");
    }
    let listed = stdout(&target.ok(&["images"]));
    assert_eq!(listed.lines().count(), 5, "{listed}");
    assert!(listed.starts_with("REPOSITORY"), "{listed}");
    // Saving by ID keeps no tag; docker prints the ID on load.
    let id = stdout(&target.ok(&["images", "-q", "second"])).trim().to_string();
    let byid = env.path("byid.tar");
    target.ok(&["save", "-o", byid.to_str().unwrap(), &id]);
    let third = Env::new();
    let out = stdout(&third.ok(&["load", "-i", byid.to_str().unwrap()]));
    assert!(out.starts_with("Loaded image ID: sha256:"), "{out}");
    assert!(out.contains(&id), "{out}");
}

#[test]
fn images_tag_rmi_inspect_history() {
    let env = Env::new();
    env.with_busybox();
    env.ok(&["tag", "busybox:local", "mine:1"]);
    let listed = stdout(&env.ok(&["images"]));
    let lines: Vec<&str> = listed.lines().collect();
    assert_eq!(lines.len(), 3, "{listed}");
    assert!(
        // Docker's tabwriter: cells at least 10 wide.
        lines[0].starts_with("REPOSITORY   TAG       IMAGE ID       CREATED"),
        "{listed}"
    );
    let ids = stdout(&env.ok(&["images", "-q"]));
    assert_eq!(ids.lines().count(), 1, "one image, two tags: {ids}");
    let id = ids.trim().to_string();
    assert_eq!(id.len(), 12);
    let digests = stdout(&env.ok(&["images", "--digests", "mine"]));
    assert!(
        digests.contains("DIGEST") && digests.contains("sha256:") && !digests.contains("busybox"),
        "{digests}"
    );
    assert_eq!(stdout(&env.ok(&["images", "busybox:nope"])).lines().count(), 1);

    let inspected = json(&env.ok(&["inspect", &id]));
    let tags = inspected[0]["RepoTags"].as_array().unwrap();
    assert_eq!(tags.len(), 2);
    assert!(inspected[0]["Id"].as_str().unwrap().contains(&id));
    assert_eq!(inspected[0]["RootFS"]["Type"], "layers");
    assert_eq!(inspected[0]["Os"], "linux");
    let full = inspected[0]["Id"].as_str().unwrap().to_string();
    for name in [
        full.as_str(),
        "docker.io/library/busybox:local",
        "mine:1",
        &id[..5],
    ] {
        env.ok(&["inspect", name]);
    }
    let err = env.fails(&["inspect", "nosuch"]);
    assert!(err.contains("No such object: nosuch"), "{err}");

    let history = stdout(&env.ok(&["history", "busybox:local"]));
    assert!(
        history.starts_with("IMAGE") && history.contains(&id) && history.contains("Imported from -"),
        "{history}"
    );

    // rmi by ID refuses while two tags remain.
    let err = env.fails(&["rmi", &id]);
    assert!(err.contains("referenced in multiple repositories"), "{err}");
    // A container record pins the image.
    let cdir = env.root().join("containers/c0ffee");
    fs::create_dir_all(&cdir).unwrap();
    fs::write(cdir.join("config.json"), format!(r#"{{"Image":"{full}"}}"#)).unwrap();
    let out = stdout(&env.ok(&["rmi", "mine:1"]));
    assert_eq!(out, "Untagged: mine:1\n");
    let err = env.fails(&["rmi", "busybox:local"]);
    assert!(err.contains("container c0ffee is using"), "{err}");
    fs::remove_dir_all(&cdir).unwrap();
    let blobs_before = fs::read_dir(env.root().join("blobs/sha256")).unwrap().count();
    assert_eq!(blobs_before, 3);
    let out = stdout(&env.ok(&["rmi", "busybox:local"]));
    assert_eq!(out, format!("Untagged: busybox:local\nDeleted: {full}\n"));
    assert_eq!(
        fs::read_dir(env.root().join("blobs/sha256")).unwrap().count(),
        0,
        "rmi removed the blobs"
    );
    assert_eq!(stdout(&env.ok(&["images", "-q"])), "");
    let err = env.fails(&["rmi", "busybox:local"]);
    assert!(err.contains("no such image"), "{err}");
    let err = env.fails(&["tag", "busybox:local", "x"]);
    assert!(err.contains("no such image"), "{err}");
    let err = env.fails(&["tag", "x", "Bad:Name"]);
    assert!(
        err.contains("no such image") || err.contains("invalid reference"),
        "{err}"
    );
}

#[test]
fn prune_df_and_verify() {
    let env = Env::new();
    env.with_busybox();
    // A dangling image: imported without a tag.
    let gz = env.path("bb.tar.gz");
    fs::write(&gz, run_bytes(Command::new("gzip").arg("-c").arg(busybox_tar()))).unwrap();
    let dangling = stdout(&env.ok(&["import", "-m", "dangling", gz.to_str().unwrap()]))
        .trim()
        .to_string();
    let listed = stdout(&env.ok(&["images"]));
    assert!(listed.contains("<none>"), "{listed}");
    let df = stdout(&env.ok(&["system", "df"]));
    assert!(df.starts_with("TYPE") && df.contains("Images          2"), "{df}");

    // Prune refuses (with --no-wait) while a build holds the store.
    let lock = env.root().join("gc.lock");
    let mut holder = Command::new("flock")
        .arg("-s")
        .arg(&lock)
        .args(["sleep", "30"])
        .spawn()
        .expect("flock(1)");
    std::thread::sleep(std::time::Duration::from_millis(300));
    let err = env.fails(&["image", "prune", "-f", "--no-wait"]);
    assert!(err.contains("running builds"), "{err}");
    holder.kill().unwrap();
    holder.wait().unwrap();

    let out = stdout(&env.ok(&["image", "prune", "-f"]));
    assert!(
        out.contains(&format!("deleted: {dangling}")) && out.contains("Total reclaimed space:"),
        "{out}"
    );
    assert!(!stdout(&env.ok(&["images"])).contains("<none>"));
    assert_eq!(
        fs::read_dir(env.root().join("blobs/sha256")).unwrap().count(),
        3,
        "only busybox's blobs are left"
    );
    let out = stdout(&env.ok(&["image", "prune", "-f"]));
    assert_eq!(out, "Total reclaimed space: 0B\n");

    let ok = stdout(&env.ok(&["store", "verify"]));
    assert!(
        ok.contains("checked 3 blobs, 1 images, 1 tags, 0 cache records, ")
            && ok.trim_end().ends_with(": ok"),
        "{ok}"
    );
    let inspected = json(&env.ok(&["inspect", "busybox:local"]));
    let layer = inspected[0]["RootFS"]["Layers"][0]
        .as_str()
        .unwrap()
        .trim_start_matches("sha256:")
        .to_string();
    let path = env.root().join("blobs/sha256").join(&layer);
    let mut f = fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.write_all(b"corrupt").unwrap();
    drop(f);
    let out = env.kiln(&["store", "verify"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", frame(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("blob sha256:{layer} is corrupt")), "{err}");
    // A damaged store never produces an archive.
    let saved = env.path("x.tar");
    let err = env.fails(&["save", "-o", saved.to_str().unwrap(), "busybox:local"]);
    assert!(err.contains("damaged"), "{err}");
    assert!(!saved.exists(), "no partial archive left");

    // prune -a removes tagged images too.
    let out = stdout(&env.ok(&["image", "prune", "-a", "-f"]));
    assert!(out.contains("untagged: busybox:local"), "{out}");
    assert_eq!(fs::read_dir(env.root().join("blobs/sha256")).unwrap().count(), 0);
}

#[test]
fn concurrent_imports_on_one_root() {
    let env = Env::new();
    let plain = busybox_tar();
    let children: Vec<_> = (0..4)
        .map(|i| {
            env.kiln(&["import", plain.to_str().unwrap(), &format!("par:{i}")])
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for c in children {
        let out = c.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", frame(&out));
    }
    let listed = stdout(&env.ok(&["images", "par"]));
    assert_eq!(
        listed.lines().count(),
        5,
        "every tag survived the concurrent updates:\n{listed}"
    );
    env.ok(&["store", "verify"]);
    assert_eq!(fs::read_dir(env.root().join("ingest")).unwrap().count(), 0);
}

#[test]
fn save_refuses_a_terminal_and_unknown_images() {
    let env = Env::new();
    env.with_busybox();
    let err = env.fails(&["save", "-o", env.path("x.tar").to_str().unwrap(), "nosuch:1"]);
    assert!(err.contains("no such image: nosuch:1"), "{err}");
    assert!(!env.path("x.tar").exists());
    // To stdout when it is a pipe.
    let out = env.kiln(&["save", "busybox:local"]).output().unwrap();
    assert!(out.status.success());
    assert!(out.stdout.len() > 1 << 20);
}

/// #17.3 (d): `kiln images` SIZE (and `inspect` Size, `history` SIZE) is computed as Docker
/// computes it: the unpacked size of the layers (files once per inode, symlinks by their target,
/// whiteouts and directories nothing), not the tar blobs' size, which ran 2-6% higher.
#[test]
fn image_size_is_dockers() {
    crate::harness::require_root();
    let docker = docker();
    let env = Env::new();
    env.with_busybox();
    let ctx = env.path("ctx");
    fs::create_dir_all(&ctx).unwrap();
    fs::write(
        ctx.join("Dockerfile"),
        "FROM busybox:local\n\
         RUN mkdir -p /d && for i in $(seq 1 300); do head -c $((i * 37)) /dev/zero > /d/f$i; done \
         && ln /d/f7 /d/hard && ln -s /d/f9/with/a/long/target/path /d/sym && mkdir /d/empty && rm /bin/ls\n\
         COPY big /big\n",
    )
    .unwrap();
    fs::write(ctx.join("big"), vec![7u8; 300_001]).unwrap();
    let name = unique_name();
    let _tags = DockerTags(vec![name.clone()]);
    env.ok(&["build", "-q", "-t", &name, ctx.to_str().unwrap()]);
    let tar = env.path("img.tar");
    env.ok(&["save", "-o", tar.to_str().unwrap(), &name]);
    run(Command::new(docker).args(["load", "-i"]).arg(&tar));
    let docker_size = run(Command::new(docker).args(["inspect", "--format", "{{.Size}}", &name]));
    let kiln = env.inspect(&name);
    assert_eq!(kiln["Size"].to_string(), docker_size.trim(), "inspect Size");
    let row = |out: String| {
        out.lines()
            .find(|l| l.starts_with(&name))
            .map(|l| l.split_whitespace().last().unwrap_or_default().to_string())
            .unwrap_or_else(|| panic!("{name} not listed:\n{out}"))
    };
    let docker_row = row(run(Command::new(docker).args([
        "images",
        "--format",
        "{{.Repository}} {{.Size}}",
        &name,
    ])));
    let kiln_row = row(stdout(&env.ok(&["images", &name])));
    assert_eq!(kiln_row, docker_row, "images SIZE");
    // The SIZE column by its place under the header: CREATED BY may be empty (an imported
    // layer's is, as in Docker).
    let sizes = |out: String| -> Vec<String> {
        let col = out.lines().next().and_then(|h| h.find("SIZE")).unwrap_or(0);
        out.lines()
            .skip(1)
            .map(|l| {
                l.get(col..)
                    .and_then(|rest| rest.split_whitespace().next())
                    .unwrap_or_default()
                    .to_string()
            })
            .collect()
    };
    let kiln_history = sizes(stdout(&env.ok(&["history", &name])));
    assert!(
        kiln_history.len() == 3 && kiln_history.iter().all(|s| s.ends_with('B')),
        "{kiln_history:?}"
    );
    assert_eq!(
        kiln_history,
        sizes(run(Command::new(docker).args(["history", &name]))),
        "history SIZE"
    );
}

#[test]
fn importing_the_same_tarball_again_gives_the_same_image() {
    let env = crate::harness::busybox_env();
    let first = env.inspect("busybox:local")["Id"].clone();
    // Another copy, another name: the ID depends on the content and the options only.
    let copy = env.path("copy-of-base.tar");
    std::fs::copy(crate::harness::busybox_tar(), &copy).unwrap();
    env.ok(&["import", copy.to_str().unwrap(), "again:1"]);
    assert_eq!(env.inspect("again:1")["Id"], first);
    env.ok(&[
        "import",
        "-m",
        "with a message",
        copy.to_str().unwrap(),
        "other:1",
    ]);
    assert_ne!(env.inspect("other:1")["Id"], first);
}
