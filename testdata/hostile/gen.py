#!/usr/bin/env python3
"""Writes kiln's hostile input corpus: archives, contexts and Dockerfiles that try to get out of
their destination, exhaust memory, or crash a parser.

    gen.py OUT --canary DIR --base BUSYBOX.tar [--class NAME]... [--bomb-mib N]

Nothing is committed but this script (and README.md): most cases are binary, some are large
(a 100 MB manifest, decompression bombs), and several name the canary directory of the run that
uses them, so they are generated per run. The canary is a directory outside the store and the
build context that the tests check, unchanged, after every case; absolute-path and `..` attacks
aim at it (and at the host's /etc).

OUT/cases.json lists every case:

    {"name": ..., "class": ..., "kind": "layer" | "archive" | "context" | "dockerfile",
     "path": relative path of the case's file or directory,
     "expect": {COMMAND: EXPECTATION, ...}}

For a "layer" case, `path` is a layer tar; the generator also writes it as a docker-archive
(`load/NAME.tar`: the busybox base layer, then the hostile layer, with correct diff IDs, tagged
`hostile/NAME:latest`). COMMAND is one of "load", "import", "add", "build"; EXPECTATION is
`{"ok": true, "files": {PATH: CONTENT}, "absent": [PATH]}` (what the image holds afterwards:
CONTENT null means "exists") or `{"error": [SUBSTRING, ...]}` (the command fails and says each).
"""
import argparse
import gzip
import hashlib
import io
import json
import lzma
import os
import shutil
import stat
import sys
import zlib

BLOCK = 512
MTIME = 1_600_000_000


# ---------------------------------------------------------------------------------------------
# Raw tar writing: every field under our control, including broken ones.

def octal(value, width):
    """A NUL-terminated octal field of `width` bytes."""
    return (b"%0*o" % (width - 1, value)) + b"\0"


def base256(value, width):
    """GNU base-256 numeric field (negative values in two's complement)."""
    raw = (value % (1 << (8 * width))).to_bytes(width, "big")
    return bytes([raw[0] | 0x80]) + raw[1:] if value >= 0 else raw


def header(name, size=0, kind=b"0", link=b"", mode=0o644, uid=0, gid=0, mtime=MTIME,
           dev=(0, 0), size_field=None, uid_field=None, mtime_field=None, checksum=True):
    """One ustar header block. `name` and `link` are bytes (or str), cut at 100 bytes."""
    if isinstance(name, str):
        name = name.encode()
    if isinstance(link, str):
        link = link.encode()
    h = bytearray(BLOCK)
    h[0:len(name[:100])] = name[:100]
    h[100:108] = octal(mode, 8)
    h[108:116] = uid_field if uid_field is not None else octal(uid, 8)
    h[116:124] = octal(gid, 8)
    h[124:136] = size_field if size_field is not None else octal(size, 12)
    h[136:148] = mtime_field if mtime_field is not None else octal(mtime, 12)
    h[156:157] = kind
    h[157:157 + len(link[:100])] = link[:100]
    h[257:263] = b"ustar\0"
    h[263:265] = b"00"
    h[329:337] = octal(dev[0], 8)
    h[337:345] = octal(dev[1], 8)
    h[148:156] = b" " * 8
    if checksum:
        h[148:156] = b"%06o\0 " % sum(h)
    return bytes(h)


def pad(data):
    return data + b"\0" * (-len(data) % BLOCK)


def pax_record(key, value):
    if isinstance(key, str):
        key = key.encode()
    if isinstance(value, str):
        value = value.encode()
    body = b" " + key + b"=" + value + b"\n"
    n = len(body) + 1
    while len(str(n).encode()) + len(body) != n:
        n += 1
    return str(n).encode() + body


def pax(records, name="././@PaxHeader"):
    data = b"".join(pax_record(k, v) for k, v in records)
    return header(name, len(data), b"x") + pad(data)


class Tar:
    """A tar stream built entry by entry."""

    def __init__(self):
        self.out = io.BytesIO()

    def raw(self, data):
        self.out.write(data)
        return self

    def file(self, name, data=b"", mode=0o644, **kw):
        if isinstance(data, str):
            data = data.encode()
        return self.raw(header(name, len(data), b"0", mode=mode, **kw) + pad(data))

    def dir(self, name, mode=0o755):
        return self.raw(header(name, 0, b"5", mode=mode))

    def symlink(self, name, target):
        return self.raw(header(name, 0, b"2", link=target, mode=0o777))

    def hardlink(self, name, target):
        return self.raw(header(name, 0, b"1", link=target))

    def node(self, name, kind, dev=(0, 0), mode=0o666):
        return self.raw(header(name, 0, kind, mode=mode, dev=dev))

    def long_name(self, name, data=b""):
        """A file whose name goes in a PAX header."""
        return self.raw(pax([("path", name)])).file("././@LongName", data)

    def end(self):
        return self.out.getvalue() + b"\0" * (2 * BLOCK)

    def unterminated(self):
        return self.out.getvalue()


# ---------------------------------------------------------------------------------------------
# Docker archives.

def sha256(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def docker_archive(layers, tag, config_extra=None, diff_ids=None):
    """A docker-archive (manifest.json, config, one `<n>/layer.tar` per layer). `layers` are
    (stored bytes, uncompressed bytes or a precomputed diff ID) pairs."""
    ids = diff_ids or [d if isinstance(d, str) else sha256(d) for _, d in layers]
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": ids},
        "history": [{"created_by": "hostile corpus layer %d" % i} for i in range(len(layers))],
    }
    if config_extra:
        config.update(config_extra)
    config_bytes = json.dumps(config).encode()
    config_name = hashlib.sha256(config_bytes).hexdigest() + ".json"
    t = Tar()
    paths = []
    for i, (stored, _) in enumerate(layers):
        path = "l%d/layer.tar" % i
        t.dir("l%d/" % i)
        t.file(path, stored)
        paths.append(path)
    t.file(config_name, config_bytes)
    manifest = [{"Config": config_name, "RepoTags": [tag] if tag else None, "Layers": paths}]
    t.file("manifest.json", json.dumps(manifest))
    return t.end()


# ---------------------------------------------------------------------------------------------
# The cases.

def ok(files=None, absent=None):
    return {"ok": True, "files": files or {}, "absent": absent or []}


def err(*needles):
    return {"error": list(needles)}


class Corpus:
    def __init__(self, out, canary, base, bomb_mib):
        self.out = out
        self.canary = canary.rstrip("/")
        self.rel_canary = self.canary.lstrip("/")
        self.base = base
        self.bomb_mib = bomb_mib
        self.cases = []

    def write(self, rel, data):
        path = os.path.join(self.out, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
        return rel

    def layer(self, cls, name, tar, expect, stored=None):
        """A hostile layer used by load, import and ADD. `expect` maps command -> expectation;
        `stored` is the layer as stored (compressed) when it differs from `tar`."""
        path = self.write("layers/%s.tar" % name, stored if stored is not None else tar)
        layers = [(self.base, self.base), (stored if stored is not None else tar, tar)]
        self.write("load/%s.tar" % name, docker_archive(layers, "hostile/%s:latest" % name))
        self.cases.append({"name": name, "class": cls, "kind": "layer", "path": path,
                           "expect": expect})

    def case(self, cls, name, kind, path, expect):
        self.cases.append({"name": name, "class": cls, "kind": kind, "path": path,
                           "expect": expect})

    # -- `..` ------------------------------------------------------------------------------
    def dotdot(self):
        up = "../" * 16
        canary_pwned = self.rel_canary + "/pwned"
        for name, tar, added in [
            ("dotdot-plain", Tar().file("../pwned", "x").end(), "pwned"),
            ("dotdot-nested", Tar().dir("a/").file("a/../../pwned", "x").end(), "pwned"),
            ("dotdot-canary", Tar().file(up + canary_pwned, "x").end(), canary_pwned),
            ("dotdot-pax", Tar().long_name("a/" * 3 + up + canary_pwned, b"x").end(), canary_pwned),
        ]:
            self.layer("dotdot", name, tar, {
                "load": err("climbs out"), "import": err("climbs out"),
                # ADD extracts like Docker's chrooted untar: `..` stops at the destination.
                "add": ok({added: "x"}),
            })
        self.layer("dotdot", "dotdot-dir", Tar().dir(up + self.rel_canary + "/newdir/").end(), {
            "load": err("climbs out"), "import": err("climbs out"),
            "add": ok({self.rel_canary + "/newdir": None}),
        })
        # `..` that stays inside is cleaned away, as Docker's filepath.Clean does.
        self.layer("dotdot", "dotdot-inside", Tar().dir("a/").file("a/../inside", "in").end(), {
            "load": ok({"inside": "in"}), "import": ok({"inside": "in"}),
            "add": ok({"inside": "in"}),
        })

    # -- absolute names ---------------------------------------------------------------------
    def absolute(self):
        tar = (Tar().file(self.canary + "/pwned", "abs")
               .file("/etc/hostile-abs", "etc")
               .file("///tmp/triple", "3")
               .hardlink("/etc/hostile-link", "/etc/hostile-abs")
               .end())
        inside = {self.rel_canary + "/pwned": "abs", "etc/hostile-abs": "etc",
                  "tmp/triple": "3", "etc/hostile-link": "etc"}
        self.layer("absolute", "absolute-names", tar, {
            "load": ok(inside), "import": ok(inside), "add": ok(inside),
        })

    # -- symlink, then a write through it -----------------------------------------------------
    def symlink_write(self):
        up = "../" * 16
        cases = [
            ("symlink-abs-file", Tar().symlink("evil", self.canary).file("evil/pwned", "x"), "crosses the symlink"),
            ("symlink-rel-file", Tar().symlink("evil", up + self.rel_canary).file("evil/pwned", "x"), "crosses the symlink"),
            ("symlink-root-etc", Tar().symlink("evil", "/").file("evil/etc/hostile-pwned", "x"), "crosses the symlink"),
            ("symlink-dir-replaced", Tar().dir("d/").symlink("d", self.canary).file("d/pwned", "x"), "crosses the symlink"),
            ("symlink-mkdir", Tar().symlink("evil", self.canary).dir("evil/newdir/"), "crosses the symlink"),
            ("symlink-hardlink-read", Tar().symlink("evil", self.canary).hardlink("h", "evil/secret"), "points outside"),
            ("symlink-whiteout", Tar().symlink("evil", self.canary).file("evil/.wh.secret"), "crosses the symlink"),
            ("symlink-opaque", Tar().symlink("evil", self.canary).file("evil/.wh..wh..opq"), "crosses the symlink"),
            ("symlink-chain", Tar().symlink("a", "b").symlink("b", self.canary).file("a/pwned", "x"), "crosses the symlink"),
        ]
        for name, t, needle in cases:
            self.layer("symlink-write", name, t.end(), {
                "load": err(needle), "import": err(needle),
                # ADD resolves symlinks inside the destination (a chrooted untar): a write
                # through one lands in the image or fails, never in the canary.
                "add": "clean",
            })
        # A symlink alone is fine: it is created verbatim and resolves inside the container.
        self.layer("symlink-write", "symlink-alone",
                   Tar().symlink("out", self.canary).symlink("rel", up + "etc/shadow").end(), {
                       "load": ok({"out": None, "rel": None}),
                       "import": ok({"out": None, "rel": None}),
                       "add": ok({"out": None, "rel": None}),
                   })

    # -- hard links to host files -------------------------------------------------------------
    def hardlink_host(self):
        for name, target, needle in [
            ("hardlink-etc-shadow", "/etc/shadow", "does not exist"),
            ("hardlink-dotdot-shadow", "../../../../../../../../etc/shadow", "outside"),
            ("hardlink-canary", self.canary + "/secret", "does not exist"),
            ("hardlink-dotdot-canary", "../" * 12 + self.rel_canary + "/secret", "outside"),
        ]:
            self.layer("hardlink-host", name, Tar().hardlink("stolen", target).end(), {
                "load": err(needle), "import": err(needle), "add": err("hard link"),
            })
        # A hard link to a file of the same layer at an absolute path works.
        self.layer("hardlink-host", "hardlink-inside",
                   Tar().file("etc/shadow", "image's own").hardlink("stolen", "/etc/shadow").end(), {
                       "load": ok({"stolen": "image's own"}),
                       "import": ok({"stolen": "image's own"}),
                       "add": ok({"stolen": "image's own"}),
                   })

    # -- device nodes ----------------------------------------------------------------------------
    def devices(self):
        t = (Tar().node("dev-mem", b"3", (1, 1))
             .node("dev-disk", b"4", (8, 0))
             .node("dev-null", b"3", (1, 3))
             .node("fifo", b"6"))
        # Docker (as root) creates them; the container's device rules keep it from using them.
        nodes = {"dev-mem": None, "dev-disk": None, "dev-null": None, "fifo": None}
        self.layer("devices", "device-nodes", t.end(), {
            "load": ok(nodes), "import": ok(nodes), "add": ok(nodes),
            # Inside a container they exist but the device rules keep it from reading them.
            "unreadable": ["dev-mem", "dev-disk"],
        })

    # -- huge and overflowing headers -----------------------------------------------------------
    def headers(self):
        huge = 1 << 62
        cases = [
            ("header-size-base256", Tar().raw(header("big", size_field=base256(huge, 12))).raw(b"x" * BLOCK).unterminated(),
             ["unexpected end of archive", "big"]),
            ("header-size-negative", Tar().raw(header("neg", size_field=base256(-1, 12))).end(),
             ["invalid `size`", "neg"]),
            ("header-size-garbage", Tar().raw(header("junk", size_field=b"12z4\0       ")).end(),
             ["invalid `size`", "junk"]),
            ("header-pax-size-overflow", Tar().raw(pax([("size", "18446744073709551616")])).file("p", "").end(),
             ["malformed PAX", "bad size"]),
            ("header-pax-length-overflow",
             Tar().raw(header("././@PaxHeader", 40, b"x") + pad(b"99999999999999999999999 path=a\n")).file("p", "").end(),
             ["malformed PAX"]),
            ("header-pax-huge", Tar().raw(header("././@PaxHeader", 4 << 20, b"x") + b"9" * (4 << 20)).file("p", "").end(),
             ["extended header", "limit"]),
            ("header-gnu-longname-huge", Tar().raw(header("././@LongLink", 1 << 40, b"L")).raw(b"a" * BLOCK).unterminated(),
             ["extended header", "limit"]),
            ("header-uid-overflow", Tar().raw(header("uid", uid_field=base256(1 << 40, 8))).end(),
             ["invalid `uid`"]),
            ("header-mtime-overflow", Tar().raw(header("t", mtime_field=base256(1 << 90, 12))).end(),
             ["invalid `mtime`"]),
            ("header-bad-checksum", Tar().raw(header("cks", checksum=False)).end(),
             ["checksum"]),
            ("header-sparse", Tar().raw(header("sparse", 0, b"S")).end(),
             ["unsupported type"]),
        ]
        for name, tar, needles in cases:
            # import says "not a tar archive" for what its first tar reader already refuses.
            self.layer("headers", name, tar, {
                "load": err(*needles), "import": err(), "add": "clean",
            })
        # A long but legal name (PAX path of 3000 bytes in short components).
        long_name = "/".join(["d%03d" % i for i in range(600)]) + "/leaf"
        self.layer("headers", "header-long-name", Tar().long_name(long_name, b"deep").end(), {
            "load": ok({long_name: "deep"}), "import": ok({long_name: "deep"}), "add": ok(),
        })

    # -- duplicate entries -----------------------------------------------------------------------
    def duplicates(self):
        t = (Tar().file("twice", "first").file("twice", "second")
             .dir("was-dir/").file("was-dir/child", "c").file("was-dir", "now a file")
             .file("was-file", "f").dir("was-file/").file("was-file/child", "c2")
             .file("target", "t").hardlink("lnk", "target").hardlink("lnk", "target")
             .symlink("sym", "twice").file("sym", "replaced symlink"))
        expect = ok({"twice": "second", "was-dir": "now a file", "was-file/child": "c2",
                     "lnk": "t", "sym": "replaced symlink"}, absent=["was-dir/child"])
        self.layer("duplicates", "duplicate-entries", t.end(), {
            "load": expect, "import": expect, "add": expect,
        })

    # -- whiteouts trying to escape ----------------------------------------------------------------
    def whiteouts(self):
        for name, tar, needle, added in [
            ("whiteout-dotdot", Tar().file(".wh..."), "invalid whiteout", ".wh..."),
            ("whiteout-sub-dotdot", Tar().dir("a/").file("a/.wh..."), "invalid whiteout", "a/.wh..."),
            ("whiteout-parent", Tar().file("../.wh.secret"), "climbs out", ".wh.secret"),
            ("whiteout-canary", Tar().file("../" * 16 + self.rel_canary + "/.wh.secret"), "climbs out",
             self.rel_canary + "/.wh.secret"),
            ("whiteout-opaque-up", Tar().file("../.wh..wh..opq"), "climbs out", ".wh..wh..opq"),
        ]:
            self.layer("whiteouts", name, tar.end(), {
                "load": err(needle), "import": err(needle),
                # ADD does not interpret whiteouts: they are extracted as the files they are.
                "add": ok({added: ""}),
            })
        # An absolute whiteout hides a path of the image, not of the host.
        self.layer("whiteouts", "whiteout-absolute", Tar().file(self.canary + "/.wh.secret").end(), {
            "load": ok(), "import": ok(), "add": ok({self.rel_canary + "/.wh.secret": ""}),
        })

    # -- decompression bombs ----------------------------------------------------------------------
    def bombs(self):
        size = self.bomb_mib << 20
        chunk = b"\0" * (1 << 20)

        def bomb_tar_stream(compress):
            """(compressed bytes, diff ID) of a tar holding one file of `size` zero bytes."""
            h = hashlib.sha256()
            head = header("zeros", size)
            h.update(head)
            compress(head)
            for _ in range(size // len(chunk)):
                h.update(chunk)
                compress(chunk)
            tail = b"\0" * (2 * BLOCK)
            h.update(tail)
            compress(tail)
            return "sha256:" + h.hexdigest()

        z = zlib.compressobj(9, zlib.DEFLATED, 31)
        parts = []
        diff_id = bomb_tar_stream(lambda b: parts.append(z.compress(b)))
        parts.append(z.flush())
        gz = b"".join(parts)
        path = self.write("layers/bomb-gzip.tar.gz", gz)
        self.write("load/bomb-gzip.tar", docker_archive(
            [(self.base, self.base), (gz, diff_id)], "hostile/bomb-gzip:latest"))
        self.case("bombs", "bomb-gzip", "layer", path, {
            "load": ok({"zeros": None}), "import": ok({"zeros": None}), "add": ok({"zeros": None}),
            "max_rss_mib": 64,
        })
        # The same bomb with a diff ID that does not match: found only after decompressing all.
        self.write("load/bomb-gzip-wrong-diff.tar", docker_archive(
            [(self.base, self.base), (gz, sha256(b"not it"))], "hostile/bomb-wrong:latest"))
        self.case("bombs", "bomb-gzip-wrong-diff", "archive", "load/bomb-gzip-wrong-diff.tar", {
            "load": err("diff ID"), "max_rss_mib": 64,
        })
        # gzip inside gzip: one level is decompressed, the rest is not a tar.
        inner = gzip.compress(Tar().file("nested", "n").end())
        outer = gzip.compress(inner)
        path = self.write("layers/bomb-nested.tar.gz.gz", outer)
        self.write("load/bomb-nested.tar", docker_archive(
            [(self.base, self.base), (outer, sha256(inner))], "hostile/bomb-nested:latest"))
        self.case("bombs", "bomb-nested", "layer", path, {
            "load": err("cannot be unpacked"), "import": err("not a tar"),
            # ADD copies what is not a tar as a plain file.
            "add": ok({"bomb-nested.tar.gz.gz": None}),
        })
        xz = lzma.compress(Tar().file("x", "y" * 100000).end())
        path = self.write("layers/bomb-xz.tar.xz", xz)
        self.write("load/bomb-xz.tar", docker_archive(
            [(self.base, self.base), (xz, Tar().file("x", "y" * 100000).end())], "hostile/bomb-xz:latest"))
        self.case("bombs", "bomb-xz", "layer", path, {
            "load": ok({"x": "y" * 100000}), "import": ok({"x": "y" * 100000}), "add": ok({"x": None}),
        })

    # -- whole archives: manifests and configs ---------------------------------------------------
    def manifests(self):
        size = 100 << 20
        body = b"[" + b" " * (size - 2) + b"]"
        t = Tar().file("manifest.json", body)
        self.write("manifests/manifest-100mb.tar", t.end())
        self.case("manifests", "manifest-100mb", "archive", "manifests/manifest-100mb.tar", {
            "load": err("manifest.json", "bytes allowed"), "max_rss_mib": 64,
        })
        t = Tar().file("oci-layout", '{"imageLayoutVersion":"1.0.0"}').file("index.json", body)
        self.write("manifests/index-100mb.tar", t.end())
        self.case("manifests", "index-100mb", "archive", "manifests/index-100mb.tar", {
            "load": err("index.json", "bytes allowed"), "max_rss_mib": 64,
        })
        # An OCI manifest blob of 100 MB (not named .json): staged to disk, refused at reading.
        blob = b"{" + b" " * (size - 2) + b"}"
        digest = hashlib.sha256(blob).hexdigest()
        index = {"schemaVersion": 2, "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": "sha256:" + digest, "size": len(blob)}]}
        t = (Tar().file("oci-layout", '{"imageLayoutVersion":"1.0.0"}')
             .file("index.json", json.dumps(index)).file("blobs/sha256/" + digest, blob))
        self.write("manifests/blob-100mb.tar", t.end())
        self.case("manifests", "manifest-blob-100mb", "archive", "manifests/blob-100mb.tar", {
            "load": err(digest, "bytes allowed"), "max_rss_mib": 64,
        })

    def configs(self):
        absurd = {
            "many-env": {"config": {"Env": ["V%d=%s" % (i, "x" * 8) for i in range(200000)],
                                    "Cmd": ["/bin/sh"]}},
            "many-history": {"history": [{"created_by": "h"}] * 100000},
            "bad-created": {"created": "not a time at all", "config": {"Cmd": ["/bin/sh"]}},
            "odd-platform": {"architecture": "../../etc", "os": "linux/../../x",
                             "config": {"Cmd": ["/bin/sh"]}},
            "workdir-escape": {"config": {"WorkingDir": "../../../../" + self.rel_canary,
                                          "Cmd": ["/bin/sh"]}},
            "user-odd": {"config": {"User": "0:0:0:99999999999999999999", "Cmd": ["/bin/sh"]}},
            "cmd-string": {"config": {"Cmd": "echo not a list"}},
            "huge-label": {"config": {"Labels": {"k" * 100000: "v" * 1000000}, "Cmd": ["/bin/sh"]}},
            "ports-volumes": {"config": {"ExposedPorts": {"99999999/tcp": {}, "x/udp": {}},
                                         "Volumes": {"../../escape": {}, "": {}},
                                         "Cmd": ["/bin/sh"]}},
            "negative-health": {"config": {"Healthcheck": {"Test": ["CMD", "true"], "Interval": -5,
                                                           "Retries": -1}, "Cmd": ["/bin/sh"]}},
        }
        for name, extra in absurd.items():
            tar = docker_archive([(self.base, self.base)], "hostile/config-%s:latest" % name,
                                 config_extra=extra)
            path = self.write("configs/%s.tar" % name, tar)
            self.case("configs", "config-" + name, "archive", path, {"load": "clean"})
        # diff IDs that do not name the layers.
        tar = docker_archive([(self.base, self.base)], "hostile/config-bad-diffs:latest",
                             diff_ids=["sha256:" + "0" * 64])
        path = self.write("configs/bad-diffs.tar", tar)
        self.case("configs", "config-bad-diffs", "archive", path, {"load": err("diff ID")})
        tar = docker_archive([(self.base, self.base)], "hostile/config-not-sha:latest",
                             diff_ids=["md5:abc"])
        path = self.write("configs/not-sha.tar", tar)
        self.case("configs", "config-not-sha", "archive", path, {"load": err("diff ID")})

    # -- build contexts and Dockerfiles -------------------------------------------------------
    def contexts(self):
        up = "../" * 12
        ctx = os.path.join(self.out, "contexts", "outward")
        os.makedirs(ctx, exist_ok=True)
        os.symlink(self.canary, os.path.join(ctx, "out"))
        os.symlink(up + self.rel_canary, os.path.join(ctx, "rel-out"))
        os.symlink(self.canary + "/secret", os.path.join(ctx, "file-link"))
        os.symlink("/etc/shadow", os.path.join(ctx, "shadow"))
        with open(os.path.join(ctx, "inside"), "w") as f:
            f.write("inside\n")
        dockerfiles = {
            # The links themselves are copied, never what they point to.
            "copy-all": ("COPY . /ctx/\n", ok({"ctx/inside": "inside\n", "ctx/out": None})),
            # Paths through the links resolve inside the context, where nothing is found.
            "copy-through-dir-link": ("COPY out/secret /x\n", err("not found")),
            "copy-through-rel-link": ("COPY rel-out/secret /x\n", err("not found")),
            "copy-file-link": ("COPY file-link /x\n", err("not found")),
            "copy-shadow-link": ("COPY shadow /x\n", err("not found")),
            "copy-wildcard": ("COPY out/* /x/\n", err("not found")),
            "add-through-link": ("ADD out/secret /x\n", err("not found")),
            "bind-through-link": ("RUN --mount=type=bind,source=out,target=/m cat /m/secret\n",
                                  err("not found")),
            "bind-file-link": ("RUN --mount=type=bind,source=file-link,target=/m cat /m\n",
                               err("not found")),
        }
        for name, (line, expect) in dockerfiles.items():
            rel = "contexts/outward/Dockerfile.%s" % name
            self.write(rel, ("FROM busybox:local\n" + line).encode())
            self.case("contexts", "context-" + name, "context", rel, {"build": expect})

    def dockerfiles(self):
        line = "RUN echo " + "a" * (10 << 20) + "\n"
        rel = self.write("dockerfiles/long-line/Dockerfile", ("FROM busybox:local\n" + line).encode())
        self.case("dockerfiles", "dockerfile-10mb-line", "dockerfile", rel,
                  {"build": err("Dockerfile:2:1", "line greater than max allowed size"), "max_rss_mib": 256})
        # 10 MB of continuation lines: one logical line.
        cont = "RUN echo \\\n" + "a \\\n" * (10 << 18) + "b\n"
        rel = self.write("dockerfiles/long-continuation/Dockerfile", ("FROM busybox:local\n" + cont).encode())
        self.case("dockerfiles", "dockerfile-10mb-continuation", "dockerfile", rel,
                  {"build": "clean", "max_rss_mib": 1024})
        nul = b"FROM busybox:local\nRUN echo \0\xff\xfe\n"
        rel = self.write("dockerfiles/binary/Dockerfile", nul)
        self.case("dockerfiles", "dockerfile-binary", "dockerfile", rel, {"build": "clean"})


CLASSES = {
    "dotdot": Corpus.dotdot,
    "absolute": Corpus.absolute,
    "symlink-write": Corpus.symlink_write,
    "hardlink-host": Corpus.hardlink_host,
    "devices": Corpus.devices,
    "headers": Corpus.headers,
    "duplicates": Corpus.duplicates,
    "whiteouts": Corpus.whiteouts,
    "bombs": Corpus.bombs,
    "manifests": Corpus.manifests,
    "configs": Corpus.configs,
    "contexts": Corpus.contexts,
    "dockerfiles": Corpus.dockerfiles,
}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out")
    ap.add_argument("--canary", required=True, help="absolute path of the canary directory")
    ap.add_argument("--base", required=True, help="the busybox rootfs tarball")
    ap.add_argument("--class", dest="classes", action="append", choices=sorted(CLASSES))
    ap.add_argument("--bomb-mib", type=int, default=1024,
                    help="decompressed size of the decompression bombs (default 1024)")
    args = ap.parse_args()
    if not os.path.isabs(args.canary):
        sys.exit("gen.py: --canary must be absolute")
    with open(args.base, "rb") as f:
        base = f.read()
    corpus = Corpus(args.out, args.canary, base, args.bomb_mib)
    os.makedirs(args.out, exist_ok=True)
    for name in args.classes or sorted(CLASSES):
        CLASSES[name](corpus)
    with open(os.path.join(args.out, "cases.json"), "w") as f:
        json.dump(corpus.cases, f, indent=1)


if __name__ == "__main__":
    main()
