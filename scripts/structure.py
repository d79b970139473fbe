#!/usr/bin/env python3
"""Checks two structural rules of #15 that neither rustc nor clippy states:
  - no two modules of one crate import each other (a two-file import loop);
  - no function outside tests is longer than 150 lines (clippy's too_many_lines counts only
    code lines, this counts every line from `fn` to its closing brace).
Prints each offence and exits 1 if there is any.  Usage: scripts/structure.py [--max 150]
"""
import argparse
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CRATES = ["dag", "patterns", "frontend", "cache", "runtime", "solver", "source", "containers", "build", "cli"]


def modules(crate):
    """Map module path ('a::b') -> file, for the crate's src/."""
    src = os.path.join(ROOT, crate, "src")
    out = {}
    for dirpath, _, files in os.walk(src):
        for f in files:
            if not f.endswith(".rs"):
                continue
            rel = os.path.relpath(os.path.join(dirpath, f), src)[:-3].split(os.sep)
            if rel[-1] == "mod":
                rel = rel[:-1]
            if rel in (["lib"], ["main"]):
                rel = []
            out["::".join(rel)] = os.path.join(dirpath, f)
    return out


def strip_tests(text):
    """Drops `#[cfg(test)] mod ... { ... }` blocks (by brace depth)."""
    out, i = [], 0
    for m in re.finditer(r"#\[cfg\(test\)\]\s*(pub(\([^)]*\))?\s+)?mod\s+\w+\s*\{", text):
        if m.start() < i:
            continue
        out.append(text[i:m.start()])
        depth, j = 1, m.end()
        while j < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            j += 1
        i = j
    out.append(text[i:])
    return "".join(out)


def imports(mod, text, known):
    deps = set()
    parent = mod.split("::")[:-1] if mod else []
    refs = [(m.group(1), m.group(2)) for m in re.finditer(r"\b(crate|super)::((?:\w+::)*\w+)", text)]
    for m in re.finditer(r"\b(crate|super)::((?:\w+::)*)\{([^}]*)\}", text):
        for item in m.group(3).split(","):
            item = item.strip().split(" as ")[0].strip("{ ")
            if item:
                refs.append((m.group(1), m.group(2) + item))
    for kind, path in refs:
        base = [] if kind == "crate" else parent[:]
        parts = path.split("::")
        # longest prefix that is a module
        for n in range(len(parts), 0, -1):
            cand = "::".join(base + parts[:n])
            if cand in known and cand != mod:
                deps.add(cand)
                break
    return deps


def long_fns(path, text, limit):
    lines = text.split("\n")
    bad = []
    in_test_depth = None
    depth = 0
    stack = []  # (name, start line, depth at open)
    pending = None
    test_next = False
    for no, line in enumerate(lines, 1):
        code = re.sub(r"//.*", "", line)
        code = re.sub(r'"(\\.|[^"\\])*"', '""', code)
        if re.search(r"#\[(cfg\(test\)|test|tokio::test)", code):
            test_next = True
        m = re.search(r"\bfn\s+(\w+)", code)
        if m:
            pending = (m.group(1), no, test_next)
            test_next = False
        for ch in code:
            if ch == "{":
                depth += 1
                if pending:
                    stack.append((pending[0], pending[1], depth, pending[2]))
                    pending = None
            elif ch == "}":
                if stack and stack[-1][2] == depth:
                    name, start, _, is_test = stack.pop()
                    if no - start + 1 > limit and not is_test and in_test_depth is None:
                        bad.append((name, start, no - start + 1))
                if in_test_depth is not None and depth == in_test_depth:
                    in_test_depth = None
                depth -= 1
            elif ch == ";" and pending and not stack or (ch == ";" and pending):
                pending = None  # a declaration without a body
        if re.search(r"#\[cfg\(test\)\]", code) and in_test_depth is None:
            in_test_depth = depth + 1
    return bad


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--max", type=int, default=150)
    a = ap.parse_args()
    errors = []
    for crate in CRATES:
        mods = modules(crate)
        graph = {}
        for mod, path in mods.items():
            text = open(path, encoding="utf-8").read()
            code = re.sub(r"//[^\n]*", "", strip_tests(text))
            graph[mod] = imports(mod, code, mods)
            for name, start, n in long_fns(path, text, a.max):
                errors.append(f"{os.path.relpath(path, ROOT)}:{start}: fn {name} is {n} lines (max {a.max})")
        for m, deps in graph.items():
            for d in deps:
                # a parent module naming its child is structure, not a loop
                if m < d and m in graph.get(d, ()) and not d.startswith(m + "::") and not m.startswith(d + "::"):
                    errors.append(f"{crate}: import loop {mods[m][len(ROOT)+1:]} <-> {mods[d][len(ROOT)+1:]}")
    for e in errors:
        print(e)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
