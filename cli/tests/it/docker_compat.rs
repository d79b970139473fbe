//! kiln's runner and image commands side by side with the Docker client on this machine:
//! `--format` templates, filters, the `container`/`image` groups. Needs root and dockerd.

use crate::harness::{busybox_env, docker_run, DockerContainer, Env};

/// Runs the same command line through docker and kiln.
fn both(env: &Env, args: &[&str]) -> ((i32, String, String), (i32, String, String)) {
    (docker_run(args), env.run(args))
}

fn same_stdout(env: &Env, args: &[&str]) {
    let (d, k) = both(env, args);
    assert_eq!(d.0, 0, "docker {args:?}: {}", d.2);
    assert_eq!(
        k,
        (0, d.1.clone(), String::new()),
        "kiln {args:?} differs from docker (left: kiln, right: docker's stdout)"
    );
}

/// A container running `sleep 60` under the same name in docker and kiln.
fn twin(env: &Env, name: &str, extra: &[&str]) -> DockerContainer {
    let _ = docker_run(&["rm", "-f", name]);
    let mut args = vec!["run", "-d", "--name", name];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["busybox:local", "sleep", "60"]);
    let (code, _, err) = docker_run(&args);
    assert_eq!(code, 0, "docker {args:?}: {err}");
    env.ok(&args);
    DockerContainer(name.to_string())
}

#[test]
fn inspect_format_matches_docker() {
    let env = busybox_env();
    let name = format!("kiln-compat-insp-{}", std::process::id());
    let _d = twin(
        &env,
        &name,
        &[
            "--label",
            "a=b",
            "-l",
            "z",
            "-e",
            "FOO=bar",
            "-p",
            "127.0.0.1::80",
        ],
    );
    let templates = [
        "{{.State.Running}} {{.State.Status}} {{.Name}} {{upper .State.Status}}",
        "{{json .Config.Cmd}} {{.Config.Cmd}} {{join .Config.Cmd \",\"}} {{len .Config.Cmd}}",
        "{{.Config.Labels}} {{index .Config.Labels \"a\"}} {{.Config.Labels.a}} {{.Config.Labels.none}} {{json .Config.Labels}}",
        "{{range $k, $v := .Config.Labels}}{{$k}}={{$v}};{{end}}",
        "{{range .Config.Env}}{{if eq . \"FOO=bar\"}}found {{.}}{{end}}{{end}}",
        "{{.State.Health}} {{if .State.Health}}h{{else}}no health{{end}} {{.State.ExitCode}} {{.RestartCount}}",
        "{{with .State}}{{.Status}}{{end}} {{printf \"%-8s|%3d\" .State.Status .State.ExitCode}} {{println \"x\"}}",
        "{{.HostConfig.PortBindings}} {{json .HostConfig.PortBindings}} {{json .Mounts}}",
        "{{range $p, $b := .NetworkSettings.Ports}}{{$p}} {{(index $b 0).HostIp}}{{end}}",
    ];
    for t in templates {
        same_stdout(&env, &["inspect", "-f", t, &name]);
        same_stdout(&env, &["container", "inspect", "--format", t, &name]);
    }
    // The address differs; its form does not.
    let ip = env
        .ok(&["inspect", "-f", "{{.NetworkSettings.IPAddress}}", &name])
        .stdout;
    let ip = String::from_utf8_lossy(&ip).trim().to_string();
    assert!(ip.parse::<std::net::Ipv4Addr>().is_ok(), "{ip}");
    // A field neither has: the same error and exit code.
    let (d, k) = both(&env, &["inspect", "-f", "{{.Config.Nope}}", &name]);
    assert_eq!((k.0, k.2.trim()), (d.0, d.2.trim()), "kiln: {k:?} docker: {d:?}");
    // A template that does not parse: Docker's exit code 64.
    let (d, k) = both(&env, &["inspect", "-f", "{{nope}}", &name]);
    assert_eq!((k.0, k.2.trim()), (d.0, d.2.trim()));
    // A container and an image in one call.
    let out = env.ok(&["inspect", "-f", "{{.Id}}", &name, "busybox:local"]);
    let lines: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(String::from)
        .collect();
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert!(lines[1].starts_with("sha256:"), "{lines:?}");
}

#[test]
fn listing_formats_match_docker() {
    let env = busybox_env();
    let name = format!("kiln-compat-ls-{}", std::process::id());
    let _d = twin(&env, &name, &["--label", "team=x"]);
    let filter = format!("name=^{name}$");
    for format in [
        "table {{.Names}}\\t{{.Image}}\\t{{.Command}}\\t{{.State}}",
        "{{.Names}}|{{.Labels}}|{{.Label \"team\"}}|{{.Networks}}|{{.LocalVolumes}}|{{.Mounts}}",
        "table {{.Names}}\t{{.Ports}}",
        "table",
    ] {
        let args = ["ps", "-a", "-f", &filter, "--format", format];
        if format == "table" {
            // Times and IDs differ: compare the header and the row's shape.
            let (d, k) = both(&env, &args);
            let words = |s: &str| {
                s.lines()
                    .next()
                    .unwrap_or("")
                    .split_whitespace()
                    .collect::<Vec<_>>()
                    .join(" ")
            };
            assert_eq!(words(&k.1), words(&d.1));
            assert_eq!(k.1.lines().count(), d.1.lines().count());
        } else {
            same_stdout(&env, &args);
        }
    }
    // `{{json .}}`: the same fields.
    let keys = |s: &str| {
        let v: serde_json::Value = serde_json::from_str(s.trim()).unwrap_or_else(|e| panic!("{e}: {s}"));
        v.as_object().unwrap().keys().cloned().collect::<Vec<_>>()
    };
    let (d, k) = both(&env, &["ps", "-f", &filter, "--format", "{{json .}}"]);
    assert_eq!(keys(&k.1), keys(&d.1));
    let (d, k) = both(&env, &["images", "--format", "{{json .}}", "busybox:local"]);
    assert_eq!(keys(&k.1), keys(&d.1));
    same_stdout(
        &env,
        &[
            "images",
            "--format",
            "table {{.Repository}}:{{.Tag}}",
            "busybox:local",
        ],
    );
    same_stdout(
        &env,
        &[
            "image",
            "ls",
            "--format",
            "{{.Repository}} {{.Tag}}",
            "busybox:local",
        ],
    );
    let (d, k) = both(&env, &["history", "--format", "{{json .}}", "busybox:local"]);
    assert_eq!(
        keys(k.1.lines().next().unwrap()),
        keys(d.1.lines().next().unwrap())
    );
    let (d, k) = both(
        &env,
        &[
            "history",
            "--format",
            "table {{.ID}}\\t{{.CreatedBy}}",
            "busybox:local",
        ],
    );
    assert_eq!(k.1.lines().next(), d.1.lines().next());
    // system df: the same rows and fields.
    same_stdout(&env, &["system", "df", "--format", "{{.Type}}"]);
    let (d, k) = both(&env, &["system", "df", "--format", "{{json .}}"]);
    assert_eq!(
        keys(k.1.lines().next().unwrap()),
        keys(d.1.lines().next().unwrap())
    );
    // volume ls with a filter and a format.
    let vol = format!("kiln-compat-vol-{}", std::process::id());
    let _ = docker_run(&["volume", "rm", "-f", &vol]);
    let create = ["volume", "create", "--label", "k=v", &vol];
    assert_eq!(docker_run(&create).0, 0);
    env.ok(&create);
    same_stdout(
        &env,
        &[
            "volume",
            "ls",
            "-f",
            &format!("name={vol}"),
            "--format",
            "{{.Name}} {{.Driver}} {{.Labels}} {{.Scope}}",
        ],
    );
    same_stdout(
        &env,
        &[
            "volume",
            "ls",
            "-f",
            "label=k=v",
            "-f",
            &format!("name={vol}"),
            "--format",
            "table {{.Name}}\\t{{.Driver}}",
        ],
    );
    same_stdout(
        &env,
        &[
            "volume",
            "ls",
            "-q",
            "-f",
            &format!("name={vol}"),
            "-f",
            "dangling=false",
        ],
    );
    let _ = docker_run(&["volume", "rm", "-f", &vol]);
    // Templates that fail: Docker's messages and exit codes.
    for bad in ["{{nope}}", "{{.Nope}}"] {
        let (d, k) = both(&env, &["ps", "-f", &filter, "--format", bad]);
        assert_eq!(k.0, d.0, "kiln: {k:?} docker: {d:?}");
        let first_word = |s: &str| s.split(':').next().unwrap_or("").to_string();
        assert_eq!(first_word(&k.2), first_word(&d.2), "kiln: {k:?} docker: {d:?}");
    }
}

#[test]
fn filters_match_docker() {
    let env = busybox_env();
    let p = std::process::id();
    let (a, b) = (format!("kiln-compat-fa-{p}"), format!("kiln-compat-fb-{p}"));
    let _da = twin(&env, &a, &["--label", "role=web"]);
    // `b` exits with 3 and is created after `a`.
    let _ = docker_run(&["rm", "-f", &b]);
    let run_b = [
        "run",
        "--name",
        &b,
        "--label",
        "role=job",
        "busybox:local",
        "sh",
        "-c",
        "exit 3",
    ];
    assert_eq!(docker_run(&run_b).0, 3);
    assert_eq!(env.run(&run_b).0, 3);
    let _db = DockerContainer(b.clone());
    let fmt = "{{.Names}}";
    let mine = format!("name=kiln-compat-f.-{p}");
    for filters in [
        vec!["status=exited"],
        vec!["status=running"],
        vec!["exited=3"],
        vec!["label=role=web"],
        vec!["label=role"],
        vec!["label=role=job", "status=exited"],
        vec!["ancestor=busybox:local"],
        vec!["ancestor=nothing:here"],
        vec!["health=none"],
    ] {
        for all in [true, false] {
            let mut args = vec!["ps", "--format", fmt, "-f", &mine];
            if all {
                args.push("-a");
            }
            for f in &filters {
                args.extend(["-f", f]);
            }
            same_stdout(&env, &args);
        }
    }
    let since = format!("since={a}");
    let before = format!("before={b}");
    same_stdout(&env, &["ps", "-a", "--format", fmt, "-f", &mine, "-f", &since]);
    same_stdout(&env, &["ps", "-a", "--format", fmt, "-f", &mine, "-f", &before]);
    // Unknown keys and bad values: Docker's errors.
    for bad in [
        vec!["ps", "-f", "foo=bar"],
        vec!["ps", "-f", "status=bogus"],
        vec!["images", "-f", "foo=bar"],
        vec!["images", "-f", "dangling=maybe"],
        vec!["volume", "ls", "-f", "foo=1"],
        vec!["image", "prune", "-f", "--filter", "foo=1"],
        vec!["image", "prune", "-f", "--filter", "until=xyz"],
    ] {
        let (d, k) = both(&env, &bad);
        assert_eq!(k.0, d.0, "{bad:?}: kiln {k:?} docker {d:?}");
        let msg =
            d.2.trim()
                .trim_start_matches("Error response from daemon: ")
                .to_string();
        assert!(
            k.2.contains(&msg),
            "{bad:?}: kiln says {:?}, docker {:?}",
            k.2,
            msg
        );
    }
    // Image filters on the same tag set.
    let tag = format!("kiln-compat-img-{p}:v1");
    assert_eq!(docker_run(&["tag", "busybox:local", &tag]).0, 0);
    env.ok(&["tag", "busybox:local", &tag]);
    let ref_filter = format!("reference=kiln-compat-img-{p}*");
    same_stdout(
        &env,
        &[
            "images",
            "--format",
            "{{.Repository}}:{{.Tag}}",
            "-f",
            &ref_filter,
        ],
    );
    same_stdout(
        &env,
        &[
            "images",
            "--format",
            "{{.Repository}}:{{.Tag}}",
            "-f",
            &ref_filter,
            "-f",
            "dangling=false",
        ],
    );
    same_stdout(
        &env,
        &[
            "images",
            "--format",
            "{{.Repository}}:{{.Tag}}",
            "-f",
            &ref_filter,
            "-f",
            "dangling=true",
        ],
    );
    same_stdout(
        &env,
        &[
            "images",
            "--format",
            "{{.Repository}}:{{.Tag}}",
            "-f",
            &ref_filter,
            "-f",
            "label=nope",
        ],
    );
    let _ = docker_run(&["rmi", &tag]);
    // A dangling image kiln makes: listed by dangling=true, pruned by until= only when older.
    env.ok(&["commit", &a, "snap:1"]);
    env.ok(&["commit", &a, "snap:1"]);
    let dangling = env.ok(&["images", "-q", "-f", "dangling=true"]);
    assert_eq!(String::from_utf8_lossy(&dangling.stdout).lines().count(), 1);
    let out = env.ok(&["image", "prune", "-f", "--filter", "until=1h"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("Total reclaimed space"));
    assert_eq!(
        String::from_utf8_lossy(&env.ok(&["images", "-q", "-f", "dangling=true"]).stdout)
            .lines()
            .count(),
        1
    );
    env.ok(&[
        "image",
        "prune",
        "-f",
        "--filter",
        "until=2000-01-01T00:00:00Z",
        "--filter",
        "label!=x",
    ]);
    assert_eq!(
        String::from_utf8_lossy(&env.ok(&["images", "-q", "-f", "dangling=true"]).stdout)
            .lines()
            .count(),
        1
    );
    env.ok(&["image", "prune", "-f"]);
    assert_eq!(
        String::from_utf8_lossy(&env.ok(&["images", "-q", "-f", "dangling=true"]).stdout)
            .lines()
            .count(),
        0
    );
}

#[test]
fn management_groups_are_aliases() {
    let env = busybox_env();
    let name = "grouped";
    let id = String::from_utf8_lossy(
        &env.ok(&[
            "container",
            "run",
            "-d",
            "--name",
            name,
            "busybox:local",
            "sleep",
            "60",
        ])
        .stdout,
    )
    .trim()
    .to_string();
    for ls in ["ls", "ps", "list"] {
        let out = env.ok(&["container", ls, "--format", "{{.Names}}"]);
        assert_eq!(String::from_utf8_lossy(&out.stdout), "grouped\n");
    }
    env.ok(&["container", "exec", name, "true"]);
    env.ok(&["container", "top", name]);
    env.ok(&["container", "logs", name]);
    env.ok(&["container", "port", name]);
    env.ok(&["container", "diff", name]);
    env.ok(&["container", "rename", name, "renamed"]);
    let out = env.ok(&["container", "inspect", "-f", "{{.Name}} {{.Id}}", "renamed"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), format!("/renamed {id}\n"));
    // A rename to a taken name is refused as Docker refuses it.
    env.ok(&["container", "create", "--name", "other", "busybox:local", "true"]);
    let err = env.fails(&["container", "rename", "renamed", "other"]);
    assert!(err.contains("is already in use"), "{err}");
    env.ok(&["container", "stop", "-t", "1", "renamed"]);
    env.ok(&["container", "start", "renamed"]);
    env.ok(&["container", "restart", "-t", "1", "renamed"]);
    env.ok(&["container", "kill", "renamed"]);
    env.ok(&["container", "wait", "renamed"]);
    env.ok(&["container", "commit", "renamed", "snap:grouped"]);
    env.ok(&[
        "container",
        "export",
        "-o",
        env.path("fs.tar").to_str().unwrap(),
        "renamed",
    ]);
    env.ok(&[
        "container",
        "cp",
        "renamed:/bin/sh",
        env.path("hosts").to_str().unwrap(),
    ]);
    env.ok(&["container", "rm", "renamed"]);
    env.ok(&["container", "remove", "other"]);
    env.ok(&["container", "prune", "-f"]);
    // The image group.
    env.ok(&["image", "tag", "busybox:local", "again:1"]);
    env.ok(&["image", "history", "again:1"]);
    env.ok(&["image", "inspect", "-f", "{{.Id}}", "again:1"]);
    let err = env.fails(&["image", "inspect", "grouped-none"]);
    assert!(err.contains("No such image"), "{err}");
    env.ok(&[
        "image",
        "save",
        "-o",
        env.path("img.tar").to_str().unwrap(),
        "again:1",
    ]);
    env.ok(&["image", "rm", "again:1"]);
    env.ok(&["image", "load", "-i", env.path("img.tar").to_str().unwrap()]);
    env.ok(&["image", "ls", "again"]);
    let ctx = env.path("ctx");
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::write(ctx.join("Dockerfile"), "FROM busybox:local\nRUN echo hi > /x\n").unwrap();
    env.ok(&["image", "build", "-t", "built:1", ctx.to_str().unwrap()]);
    env.ok(&["image", "rm", "built:1"]);
    // Every group command docker has is one kiln has (from `--help`).
    for (group, cmds) in [
        (
            "container",
            &[
                "attach", "commit", "cp", "create", "diff", "exec", "export", "inspect", "kill", "logs",
                "ls", "port", "prune", "rename", "restart", "rm", "run", "start", "stop", "top", "wait",
            ][..],
        ),
        (
            "image",
            &[
                "build", "history", "import", "inspect", "load", "ls", "prune", "pull", "push", "rm", "save",
                "tag",
            ][..],
        ),
    ] {
        for c in cmds {
            env.ok(&[group, c, "--help"]);
        }
    }
}

/// A context of `FROM busybox:local` (one layer) plus `copies` COPY steps.
fn deep_context(env: &Env, copies: usize) -> std::path::PathBuf {
    let ctx = env.path(&format!("deep{copies}"));
    std::fs::create_dir_all(&ctx).unwrap();
    let mut df = String::from("FROM busybox:local\n");
    for i in 1..=copies {
        std::fs::write(ctx.join(format!("f{i}")), format!("x{i}\n")).unwrap();
        df.push_str(&format!("COPY f{i} /f{i}\n"));
    }
    std::fs::write(ctx.join("Dockerfile"), df).unwrap();
    ctx
}

/// Docker 20.10's layer store takes chains of at most 125 layers: `docker load` of a deeper
/// image into a daemon without its layers says "max depth exceeded" (and `docker run` does from
/// 128 layers on, overlay2's 128 lower dirs with the init layer). kiln refuses to make such an
/// image, with Docker's words, and the largest one it makes loads and runs in Docker.
#[test]
fn more_layers_than_docker_runs_is_refused_at_build() {
    let env = busybox_env();
    let too_deep = deep_context(&env, 125);
    let out = env
        .kiln(&["build", "-t", "deep:126", too_deep.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("max depth exceeded"),
        "{err}"
    );
    assert!(env.fails(&["inspect", "deep:126"]).contains("No such"));
    let deepest = deep_context(&env, 124);
    let tag = format!("kiln-deep-{}:125", std::process::id());
    env.ok(&["build", "-t", &tag, deepest.to_str().unwrap()]);
    let tar = env.path("deep.tar");
    env.ok(&["save", "-o", tar.to_str().unwrap(), &tag]);
    let (code, _, err) = docker_run(&["load", "-i", tar.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let (code, out, err) = docker_run(&["run", "--rm", &tag, "cat", "/f124"]);
    let _ = docker_run(&["rmi", &tag]);
    assert_eq!((code, out.as_str()), (0, "x124\n"), "{err}");
}
