#!/usr/bin/env bash
# Scale benchmark: how kiln's time and memory grow with the work, beside BuildKit in the same run.
#
#   bash scripts/bench.sh [--kiln PATH] [--rows ROW,ROW...] [--runs N] [--big-gb N] [--no-buildkit]
#                         [--prune-buildkit]
#
# Rows (each kiln's wall-clock time and peak RSS, BuildKit's time, medians of --runs):
#   noop-20k  noop-100k  noop-500k    rebuild of an unchanged context of that many files
#   edit-20k  edit-100k  edit-500k    one file of that context changed, then rebuilt
#   noop-500k-wide  edit-500k-wide    the same at 500k files in 5x the directories, so that each
#                                     holds as many files as at 100k (the rows above keep 1261
#                                     directories at every size: ext4's cost per insert grows
#                                     with the directory, and this separates the two)
#   chain-100  chain-200              that many RUN steps in one stage, --no-cache (the final image
#                                     copies the last step's file: an image of 200 layers is past
#                                     what Docker loads, and kiln refuses to export one)
#   fan-64                            64 stages of one RUN each, joined by 64 COPY --from, --no-cache
#   big-file                          a COPY of one file of --big-gb GB (default 10), --no-cache
#   ctx-2g                            a COPY of a 2 GB context (2048 files of 1 MiB), --no-cache
# The file-count contexts hold files of 100 B to 4 KB (the peer bench's 20k-file context is 120 MB;
# these stay small so that 500k files fit on a development disk). kiln's peak RSS is the
# build process's own (`/usr/bin/time`), BuildKit's is not shown (it is a daemon's).
#
# A row BuildKit cannot build says so (Docker 20.10's overlay driver stops at about 125 layers,
# so chain-200 fails there with "max depth exceeded" even in an intermediate stage). --prune-buildkit runs
# `docker builder prune -af` after each row: it empties the daemon's whole build cache, so use it
# only on a machine of your own.
#
# Not a test: nothing here fails on a figure. Disk: big-file needs about 3x --big-gb free (the
# context, kiln's snapshot and its layer; BuildKit's copy of the context and its snapshot): each
# kiln run of that row starts from a new store, removed before BuildKit's runs (use
# --prune-buildkit for a big --big-gb, or BuildKit keeps both runs' copies). Each row's stores are
# removed before the next.
# Docker 20.10 with its BuildKit comes from ../shared/peers/start-docker.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
shared=${KILN_SHARED_DIR:-$(cd .. && pwd)/shared}
export KILN_BENCH_SHARED="$shared"
exec python3 - "$@" <<'PY'
import argparse, os, random, shutil, statistics, subprocess, sys, tempfile, time

shared = os.environ["KILN_BENCH_SHARED"]
DOCKER = "/usr/bin/docker"
DENV = dict(os.environ, DOCKER_BUILDKIT="1")
ROWS = ["noop-20k", "edit-20k", "noop-100k", "edit-100k", "noop-500k", "edit-500k",
        "noop-500k-wide", "edit-500k-wide",
        "chain-100", "chain-200", "fan-64", "big-file", "ctx-2g"]

ap = argparse.ArgumentParser()
ap.add_argument("--kiln", default="target/release/kiln")
ap.add_argument("--rows", default=",".join(ROWS))
ap.add_argument("--runs", type=int, default=3)
ap.add_argument("--big-gb", type=float, default=10.0)
ap.add_argument("--no-buildkit", action="store_true")
ap.add_argument("--prune-buildkit", action="store_true")
ap.add_argument("--tmp", default=None, help="where contexts and stores go (default: a new dir in $TMPDIR)")
a = ap.parse_args()
rows = [r for r in a.rows.split(",") if r]
for r in rows:
    if r not in ROWS:
        sys.exit(f"bench.sh: unknown row `{r}` (rows: {', '.join(ROWS)})")
kiln = os.path.abspath(a.kiln)
if not os.access(kiln, os.X_OK):
    sys.exit(f"bench.sh: no kiln binary at {kiln} (cargo build --release -p kiln)")
buildkit = not a.no_buildkit


def sh(cmd, env=None, check=True):
    r = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    if check and r.returncode:
        sys.exit(f"command failed ({r.returncode}): {' '.join(cmd)}\n{r.stderr.decode()[-2000:]}")
    return r


def timed_rss(cmd):
    """Wall-clock seconds and peak RSS (MB) of one command."""
    out = tempfile.NamedTemporaryFile(delete=False)
    out.close()
    t = time.perf_counter()
    sh(["/usr/bin/time", "-o", out.name, "-f", "%M"] + cmd)
    dt = time.perf_counter() - t
    with open(out.name) as f:
        rss = int(f.read().strip().splitlines()[-1]) / 1024
    os.unlink(out.name)
    return dt, rss


def timed(cmd, env=None):
    """Wall-clock seconds, or the last line of the error of a command that failed."""
    t = time.perf_counter()
    r = sh(cmd, env, check=False)
    if r.returncode:
        return "failed: " + (r.stderr.decode(errors="replace").strip().splitlines() or ["?"])[-1][:80]
    return time.perf_counter() - t


def write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def files_context(d, n, wide=False):
    rnd = random.Random(n)
    # 97 x 13 directories; wide: 97 x 13 per 100k files (97 * 5 = 485 is prime to 13).
    across = 97 * (n // 100000 if wide else 1)
    for i in range(n):
        sub = os.path.join(d, f"src/m{i % across}/p{i % 13}")
        os.makedirs(sub, exist_ok=True)
        with open(os.path.join(sub, f"f{i}.dat"), "wb") as f:
            f.write(rnd.randbytes(rnd.choice([100, 500, 1000, 4000])))
    write(os.path.join(d, "Dockerfile"), "FROM busybox:local\nCOPY . /ctx/\nRUN ls /ctx | wc -l > /count\n")


def df_free(path):
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


top = a.tmp or tempfile.mkdtemp(prefix="kiln-bench-")
os.makedirs(top, exist_ok=True)
base = os.path.join(top, "busybox.tar")
sh(["bash", os.path.join(shared, "base-image", "make-busybox-rootfs.sh"), base])
if buildkit:
    sh(["bash", os.path.join(shared, "peers", "start-docker.sh")])
load = os.getloadavg()
print(f"machine: {os.cpu_count()} cores, load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} at the start")
print(f"| row | kiln s | kiln peak RSS MB | BuildKit s | speedup |")
print(f"|---|---|---|---|---|")

for row in rows:
    root = os.path.join(top, "root")
    shutil.rmtree(root, ignore_errors=True)
    K = lambda *args: [kiln, "--root", root] + list(args)
    sh(K("import", base, "busybox:local"))
    ctx = os.path.join(top, "ctx-" + row)
    tag = "bench/" + row.replace("-", "")
    kind, _, size = row.partition("-")
    before = None
    if kind in ("noop", "edit"):
        count, _, wide = size.partition("-")
        n = {"20k": 20000, "100k": 100000, "500k": 500000}[count]
        # One context per size, shared by its noop and edit rows.
        ctx = os.path.join(top, f"ctx-files-{size}")
        if not os.path.isdir(ctx):
            files_context(ctx, n, wide == "wide")
        kb = K("build", "-q", "-t", tag, ctx)
        db = [DOCKER, "build", "-q", "-t", tag, ctx]
        sh(kb)
        if buildkit:
            sh(db, DENV, check=False)
        if kind == "edit":
            counter = [0]
            target = os.path.join(ctx, "src/m0/p0/f0.dat")

            def before():
                counter[0] += 1
                with open(target, "wb") as f:
                    f.write(b"edit %d\n" % counter[0])
    elif kind == "chain":
        steps = int(size)
        write(os.path.join(ctx, "Dockerfile"),
              "FROM busybox:local AS chain\n" + "".join(f"RUN echo {i} > /f{i}\n" for i in range(steps)) +
              f"FROM busybox:local\nCOPY --from=chain /f{steps - 1} /\n")
        kb = K("build", "-q", "--no-cache", "-t", tag, ctx)
        db = [DOCKER, "build", "-q", "--no-cache", "-t", tag, ctx]
    elif kind == "fan":
        write(os.path.join(ctx, "Dockerfile"),
              "".join(f"FROM busybox:local AS s{i}\nRUN echo {i} > /out{i}\n" for i in range(64)) +
              "FROM busybox:local\n" + "".join(f"COPY --from=s{i} /out{i} /\n" for i in range(64)))
        kb = K("build", "-q", "--no-cache", "-t", tag, ctx)
        db = [DOCKER, "build", "-q", "--no-cache", "-t", tag, ctx]
    elif kind == "big":
        need = int(a.big_gb * 3.2 * 2**30)
        if df_free(top) < need:
            print(f"| {row} | skipped: {df_free(top) / 2**30:.0f} GB free in {top}, needs {need / 2**30:.0f} GB | | | |")
            continue
        os.makedirs(ctx, exist_ok=True)
        with open(os.path.join(ctx, "big.bin"), "wb") as f:
            chunk = random.Random(7).randbytes(1 << 24)
            for _ in range(int(a.big_gb * 64)):
                f.write(chunk)
        write(os.path.join(ctx, "Dockerfile"), "FROM busybox:local\nCOPY big.bin /big.bin\n")
        kb = K("build", "-q", "--no-cache", "-t", tag, ctx)
        db = [DOCKER, "build", "-q", "--no-cache", "-t", tag, ctx]
    elif kind == "ctx":
        rnd = random.Random(2)
        for i in range(2048):
            p = os.path.join(ctx, f"d{i % 16}/f{i}.bin")
            os.makedirs(os.path.dirname(p), exist_ok=True)
            with open(p, "wb") as f:
                f.write(rnd.randbytes(1 << 20))
        write(os.path.join(ctx, "Dockerfile"), "FROM busybox:local\nCOPY . /ctx/\n")
        kb = K("build", "-q", "--no-cache", "-t", tag, ctx)
        db = [DOCKER, "build", "-q", "--no-cache", "-t", tag, ctx]
    runs = a.runs if kind in ("noop", "edit") else max(1, min(a.runs, 2))
    mine, rss, theirs = [], [], []
    # The big file does not fit on a disk three times over for each builder at once: each kiln
    # run starts from a new store, removed before BuildKit's runs.
    phased = kind == "big"
    for _ in range(runs):
        if phased:
            shutil.rmtree(root, ignore_errors=True)
            sh(K("import", base, "busybox:local"))
        if before:
            before()
        t, m = timed_rss(kb)
        mine.append(t)
        rss.append(m)
        if buildkit and not phased and not any(isinstance(x, str) for x in theirs):
            if before:
                before()
            theirs.append(timed(db, DENV))
    if phased and buildkit:
        shutil.rmtree(root, ignore_errors=True)
        for _ in range(runs):
            theirs.append(timed(db, DENV))
            sh([DOCKER, "rmi", "-f", tag], DENV, check=False)
            if a.prune_buildkit:
                sh([DOCKER, "builder", "prune", "-af"], DENV, check=False)
            if isinstance(theirs[-1], str):
                break
    m = statistics.median(mine)
    peak = max(rss)
    failed = [x for x in theirs if isinstance(x, str)]
    if buildkit and failed:
        print(f"| {row} | {m:.3f} | {peak:.0f} | {failed[0]} | |", flush=True)
    elif buildkit:
        t = statistics.median(theirs)
        print(f"| {row} | {m:.3f} | {peak:.0f} | {t:.3f} | {t / m:.2f}x |", flush=True)
    if buildkit:
        sh([DOCKER, "rmi", "-f", tag], DENV, check=False)
        if a.prune_buildkit:
            sh([DOCKER, "builder", "prune", "-af"], DENV, check=False)
    else:
        print(f"| {row} | {m:.3f} | {peak:.0f} | | |", flush=True)
    shutil.rmtree(root, ignore_errors=True)
    if kind not in ("noop", "edit") or row.startswith("edit"):
        shutil.rmtree(ctx, ignore_errors=True)

shutil.rmtree(top, ignore_errors=True)
load = os.getloadavg()
print(f"load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} at the end")
PY
