#!/usr/bin/env python3
"""Rootless kiln against rootful kiln, the same work alternately (A B A B ...), so the ratio holds
while the machine's speed drifts. Run as root; USER must exist with /etc/subuid and /etc/subgid
ranges (the integration tests make `kiln-rootless`).

    scripts/rootless-bench.py [--kiln target/release/kiln] [--user kiln-rootless] [--runs 5] [--files 2000]

Scenarios (wall-clock seconds of the whole command, median of the runs), after peer-bench.py's:
  run-chain    20 RUN steps (--network=none), no cache
  run-net      5 RUN steps with the default network (bridge as root, slirp4netns rootless), no cache
  noop-small   rebuild of a tiny context, everything cached
  copy-large   COPY of --files files, no cache
  run-start    `run --rm --network none busybox:local true`
Last lines: the ratio rootless/rootful per row (goal: at most 1.3).
"""
import argparse
import os
import pwd
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
BASE_SCRIPT = os.path.join(HERE, "..", "testdata", "make-busybox-rootfs.sh")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kiln", default=os.path.join(HERE, "..", "target", "release", "kiln"))
    ap.add_argument("--user", default="kiln-rootless")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--files", type=int, default=2000)
    a = ap.parse_args()
    kiln = os.path.abspath(a.kiln)
    pw = pwd.getpwnam(a.user)
    top = tempfile.mkdtemp(prefix="kiln-rootless-bench-")
    os.chmod(top, 0o755)
    try:
        base = os.path.join(top, "busybox.tar")
        subprocess.run(["bash", BASE_SCRIPT, base], check=True, stdout=subprocess.DEVNULL)
        os.chmod(base, 0o644)

        def ctx(name, dockerfile, files=0):
            d = os.path.join(top, name)
            os.makedirs(d)
            with open(os.path.join(d, "Dockerfile"), "w") as f:
                f.write(dockerfile)
            if files:
                for i in range(files):
                    sub = os.path.join(d, "src", f"d{i % 50}")
                    os.makedirs(sub, exist_ok=True)
                    with open(os.path.join(sub, f"f{i}.txt"), "w") as f:
                        f.write(f"file {i}\n" * (1 + i % 40))
            subprocess.run(["chown", "-R", f"{pw.pw_uid}:{pw.pw_gid}", d], check=True)
            return d

        chain = ctx("chain", "FROM busybox:local\nARG N\n" + "".join(
            f"RUN --network=none echo step {i} $N > /s{i}\n" for i in range(20)))
        net = ctx("net", "FROM busybox:local\nARG N\n" + "".join(
            f"RUN echo step {i} $N > /n{i}\n" for i in range(5)))
        small = ctx("small", "FROM busybox:local\nCOPY Dockerfile /x\n")
        large = ctx("large", "FROM busybox:local\nARG N\nCOPY src /src\n", a.files)

        def cmd(mode, *args):
            root = os.path.join(top, mode)
            if mode == "rootful":
                return [kiln, "--root", root, *args]
            return ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--init-groups", "--",
                    "env", "-i", f"HOME={pw.pw_dir}", "PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
                    kiln, "--root", root, *args]

        for mode in ("rootful", "rootless"):
            if mode == "rootless":
                os.makedirs(os.path.join(top, mode))
                os.chown(os.path.join(top, mode), pw.pw_uid, pw.pw_gid)
            subprocess.run(cmd(mode, "import", base, "busybox:local"), check=True, stdout=subprocess.DEVNULL)
            subprocess.run(cmd(mode, "build", "-q", small), check=True, stdout=subprocess.DEVNULL)

        scenarios = {
            "run-chain": lambda m, n: cmd(m, "build", "-q", "--no-cache", "--build-arg", f"N={n}", chain),
            "run-net": lambda m, n: cmd(m, "build", "-q", "--no-cache", "--build-arg", f"N={n}", net),
            "noop-small": lambda m, n: cmd(m, "build", "-q", small),
            "copy-large": lambda m, n: cmd(m, "build", "-q", "--no-cache", "--build-arg", f"N={n}", large),
            "run-start": lambda m, n: cmd(m, "run", "--rm", "--network", "none", "busybox:local", "true"),
        }
        rows = []
        for name, make in scenarios.items():
            times = {"rootful": [], "rootless": []}
            for n in range(a.runs):
                for mode in ("rootful", "rootless") if n % 2 == 0 else ("rootless", "rootful"):
                    c = make(mode, n)
                    t = time.perf_counter()
                    r = subprocess.run(c, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                    dt = time.perf_counter() - t
                    if r.returncode:
                        sys.exit(f"{name} {mode} failed: {r.stderr.decode()[-1500:]}")
                    times[mode].append(dt)
            a_, b_ = statistics.median(times["rootful"]), statistics.median(times["rootless"])
            rows.append((name, a_, b_, b_ / a_))
            print(f"{name:12} rootful {a_:7.3f}s  rootless {b_:7.3f}s  ratio {b_ / a_:5.2f}", flush=True)
        worst = max(r[3] for r in rows)
        print(f"worst ratio rootless/rootful {worst:.2f} over {len(rows)} scenarios")
    finally:
        shutil.rmtree(top, ignore_errors=True)


if __name__ == "__main__":
    main()
