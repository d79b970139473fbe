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

fn lines_with(text: &str, prefix: &str) -> Vec<String> {
    let mut v: Vec<String> = text
        .lines()
        .filter(|l| l.starts_with(prefix))
        .map(String::from)
        .collect();
    v.sort();
    v
}

#[test]
fn docker_forms_and_rules() {
    let env = busybox_env();
    let p = std::process::id();
    // Boolean flags take Docker's `=false` / `=true` forms.
    let keep = format!("kiln-compat-keep-{p}");
    let _k = DockerContainer(keep.clone());
    let (d, k) = both(
        &env,
        &["run", "--rm=false", "--name", &keep, "busybox:local", "true"],
    );
    assert_eq!((d.0, k.0), (0, 0), "docker {d:?} kiln {k:?}");
    same_stdout(
        &env,
        &[
            "ps",
            "-a=true",
            "-f",
            &format!("name=^{keep}$"),
            "--format",
            "{{.Names}}",
        ],
    );
    // `-v` of a missing host directory creates it, in both.
    let (dd, kd) = (env.path("docker-made"), env.path("kiln-made"));
    for (dir, code) in [
        (
            &dd,
            docker_run(&[
                "run",
                "--rm",
                "-v",
                &format!("{}:/x", dd.display()),
                "busybox:local",
                "true",
            ])
            .0,
        ),
        (
            &kd,
            env.run(&[
                "run",
                "--rm",
                "-v",
                &format!("{}:/x", kd.display()),
                "busybox:local",
                "true",
            ])
            .0,
        ),
    ] {
        assert_eq!(code, 0);
        assert!(dir.is_dir(), "{} was not created", dir.display());
    }
    // `-it` with a stdin that is not a terminal: Docker's refusal.
    let (d, k) = both(&env, &["run", "-it", "--rm", "busybox:local", "true"]);
    assert_eq!((k.0, k.2.trim()), (d.0, d.2.trim()));
    // exec: Docker's messages; 126 for what cannot be executed, 127 for what is not found (as
    // `docker run` and Docker since 23; this machine's 20.10 `exec` says 126 for both).
    let ex = format!("kiln-compat-exec-{p}");
    let _e = twin(&env, &ex, &[]);
    for (cmd, code) in [("nope", 127), ("/etc/passwd", 126), ("/etc", 126)] {
        let d = docker_run(&["exec", &ex, cmd]);
        let k = env.run(&["exec", &ex, cmd]);
        assert_eq!(k.0, code, "exec {cmd}: {k:?}");
        // Docker 20.10 prints it on standard output.
        let said = format!("{}{}", d.1, d.2);
        let phrase = said
            .split_once("exec: \"")
            .map(|(_, rest)| format!("exec: \"{}", rest.trim_end().trim_end_matches(": unknown")))
            .unwrap_or_else(|| panic!("docker exec {cmd}: {d:?}"));
        assert!(
            k.2.contains(&phrase),
            "exec {cmd}: kiln says {:?}, docker {:?}",
            k.2,
            phrase
        );
        let echo = std::process::Command::new(crate::harness::docker())
            .args(["exec", "-it", &ex, "true"])
            .stdin(std::process::Stdio::piped())
            .output()
            .unwrap();
        let kecho = env
            .kiln(&["exec", "-it", &ex, "true"])
            .stdin(std::process::Stdio::piped())
            .output()
            .unwrap();
        assert_eq!(
            (
                kecho.status.code(),
                String::from_utf8_lossy(&kecho.stderr).trim().to_string()
            ),
            (
                echo.status.code(),
                String::from_utf8_lossy(&echo.stderr).trim().to_string()
            )
        );
    }
    // top with ps options: the same columns.
    for args in [
        vec!["top", &ex, "aux"],
        vec!["top", &ex, "-o", "pid,comm"],
        vec!["top", &ex],
    ] {
        let (d, k) = both(&env, &args);
        assert_eq!(k.0, 0, "{k:?}");
        let head = |s: &str| s.lines().next().unwrap_or("").to_string();
        assert_eq!(head(&k.1), head(&d.1), "{args:?}");
        assert_eq!(
            k.1.lines().count(),
            d.1.lines().count(),
            "{args:?}: kiln {} docker {}",
            k.1,
            d.1
        );
        assert!(k.1.contains("sleep"), "{}", k.1);
    }
    // Legacy link variables.
    let db = format!("kiln-compat-db-{p}");
    let _db = twin(
        &env,
        &db,
        &["-e", "SECRET=s3", "--expose", "5432", "--expose", "53/udp"],
    );
    let link = format!("{db}:my-db");
    let linker = format!("kiln-compat-linker-{p}");
    let (d, k) = both(
        &env,
        &[
            "run",
            "--rm",
            "--name",
            &linker,
            "--link",
            &link,
            "busybox:local",
            "env",
        ],
    );
    assert_eq!(k.0, 0, "{k:?}");
    let ip = regex::Regex::new(r"\d+\.\d+\.\d+\.\d+").unwrap();
    let strip_ip = |v: Vec<String>| -> Vec<String> {
        v.into_iter()
            .map(|l| ip.replace_all(&l, "IP").into_owned())
            .collect()
    };
    let (kl, dl) = (lines_with(&k.1, "MY_DB_"), lines_with(&d.1, "MY_DB_"));
    assert_eq!(kl.len(), dl.len(), "kiln {kl:?} docker {dl:?}");
    assert_eq!(strip_ip(kl), strip_ip(dl));
    // import of a URL with -c changes: the same config as Docker's.
    let srv = crate::harness::busybox_tar();
    let dir = srv.parent().unwrap().to_path_buf();
    let mut http = std::process::Command::new("python3")
        .args(["-m", "http.server", "0", "--bind", "127.0.0.1"])
        .current_dir(&dir)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("python3 for an http server");
    let port = {
        use std::io::BufRead as _;
        let mut line = String::new();
        std::io::BufReader::new(http.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        line.split("port ")
            .nth(1)
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .to_string()
    };
    let url = format!(
        "http://127.0.0.1:{port}/{}",
        srv.file_name().unwrap().to_string_lossy()
    );
    let tag = format!("kiln-compat-imp-{p}:1");
    let import = [
        "import",
        "-c",
        "CMD [\"/bin/sh\", \"-c\", \"echo $A\"]",
        "-c",
        "ENV A=from-change",
        "--change",
        "WORKDIR /tmp",
        &url,
        &tag,
    ];
    let (d, k) = both(&env, &import);
    let _ = http.kill();
    let _ = http.wait();
    assert_eq!((d.0, k.0), (0, 0), "docker {d:?} kiln {k:?}");
    same_stdout(
        &env,
        &[
            "image",
            "inspect",
            "-f",
            "{{json .Config.Cmd}} {{json .Config.Env}} {{.Config.WorkingDir}}",
            &tag,
        ],
    );
    same_stdout(&env, &["run", "--rm", &tag]);
    let _ = docker_run(&["rmi", &tag]);
    // system df: real container and volume figures.
    env.ok(&["volume", "create", "dfvol"]);
    env.ok(&[
        "run",
        "-d",
        "--name",
        "dfuser",
        "-v",
        "dfvol:/v",
        "busybox:local",
        "sh",
        "-c",
        "head -c 100000 /dev/zero > /v/f; sleep 60",
    ]);
    // The file exists as soon as the shell opens it: wait for all of its 100 000 bytes.
    crate::harness::eventually(10, "the volume's file", || {
        std::fs::metadata(env.root().join("volumes/dfvol/_data/f")).is_ok_and(|m| m.len() == 100_000)
    });
    let out = String::from_utf8_lossy(
        &env.ok(&[
            "system",
            "df",
            "--format",
            "{{.Type}}|{{.TotalCount}}|{{.Active}}|{{.Size}}",
        ])
        .stdout,
    )
    .into_owned();
    // One volume, in use, holding the 100 kB file (and its directory).
    assert!(
        out.lines()
            .any(|l| l.starts_with("Local Volumes|1|1|10") && l.ends_with("kB")),
        "{out}"
    );
    let all = String::from_utf8_lossy(&env.ok(&["ps", "-aq"]).stdout)
        .lines()
        .count();
    let running = String::from_utf8_lossy(&env.ok(&["ps", "-q"]).stdout)
        .lines()
        .count();
    assert!(
        out.lines()
            .any(|l| l.starts_with(&format!("Containers|{all}|{running}|"))),
        "{out}"
    );
    env.ok(&["rm", "-f", "dfuser"]);
}

/// Polls `status` until it holds `want` (or panics after `secs`).
fn until_status(what: &str, secs: u64, mut status: impl FnMut() -> String, want: &str) {
    let mut last = String::new();
    let end = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    while std::time::Instant::now() < end {
        last = status();
        if last.contains(want) {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    panic!("{what}: waited for {want:?}, last status {last:?}");
}

#[test]
fn healthchecks_run_as_in_docker() {
    let env = busybox_env();
    let name = format!("kiln-compat-health-{}", std::process::id());
    let _d = twin(
        &env,
        &name,
        &[
            "--health-cmd",
            "test -f /tmp/ok && echo fine",
            "--health-interval",
            "1s",
            "--health-retries",
            "2",
            "--health-timeout",
            "5s",
        ],
    );
    let filter = format!("name=^{name}$");
    let docker_status = || docker_run(&["ps", "-f", &filter, "--format", "{{.Status}}"]).1;
    let kiln_status = || env.run(&["ps", "-f", &filter, "--format", "{{.Status}}"]).1;
    assert!(kiln_status().contains("(health: starting)"), "{}", kiln_status());
    until_status("docker", 20, docker_status, "(unhealthy)");
    until_status("kiln", 20, kiln_status, "(unhealthy)");
    // The health filter sees it.
    same_stdout(
        &env,
        &[
            "ps",
            "-f",
            &filter,
            "-f",
            "health=unhealthy",
            "--format",
            "{{.Names}}",
        ],
    );
    for side in ["docker", "kiln"] {
        let args = ["exec", &name, "touch", "/tmp/ok"];
        assert_eq!(
            if side == "docker" {
                docker_run(&args).0
            } else {
                env.run(&args).0
            },
            0
        );
    }
    until_status("docker", 20, docker_status, "(healthy)");
    until_status("kiln", 20, kiln_status, "(healthy)");
    // State.Health as Docker shapes it: the same fields, the last 5 results, the output.
    let t = "{{.State.Health.Status}} {{.State.Health.FailingStreak}} {{len .State.Health.Log}} {{(index .State.Health.Log 0).ExitCode}}";
    let (d, k) = both(&env, &["inspect", "-f", t, &name]);
    assert_eq!(k.1.split(' ').next(), d.1.split(' ').next());
    let json = |s: &str| -> serde_json::Value { serde_json::from_str(s.trim()).unwrap() };
    let (d, k) = both(&env, &["inspect", "-f", "{{json .State.Health}}", &name]);
    let (d, k) = (json(&d.1), json(&k.1));
    let keys = |v: &serde_json::Value| v.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
    assert_eq!(keys(&k), keys(&d));
    assert_eq!(keys(&k["Log"][0]), keys(&d["Log"][0]));
    assert!(k["Log"].as_array().unwrap().len() <= 5);
    let last = k["Log"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(
        (last["ExitCode"].as_i64(), last["Output"].as_str()),
        (Some(0), Some("fine\n"))
    );
    // --no-healthcheck over an image's HEALTHCHECK.
    let ctx = env.path("hc");
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::write(
        ctx.join("Dockerfile"),
        "FROM busybox:local\nHEALTHCHECK --interval=1s CMD true\n",
    )
    .unwrap();
    env.ok(&["build", "-t", "hc:1", ctx.to_str().unwrap()]);
    env.ok(&[
        "run",
        "-d",
        "--name",
        "nohc",
        "--no-healthcheck",
        "hc:1",
        "sleep",
        "30",
    ]);
    env.ok(&["run", "-d", "--name", "withhc", "hc:1", "sleep", "30"]);
    let out = env.ok(&[
        "inspect",
        "-f",
        "{{json .Config.Healthcheck.Test}} {{.State.Health}}",
        "nohc",
    ]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "[\"NONE\"] <nil>\n");
    until_status(
        "image healthcheck",
        20,
        || env.run(&["ps", "-f", "name=withhc", "--format", "{{.Status}}"]).1,
        "(healthy)",
    );
    let err = env.fails(&["run", "--no-healthcheck", "--health-retries", "1", "hc:1", "true"]);
    assert!(
        err.contains("--no-healthcheck conflicts with --health-* options"),
        "{err}"
    );
    env.ok(&["rm", "-f", "nohc", "withhc"]);
}
