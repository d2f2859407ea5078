#!/usr/bin/env python3
"""Build the demo corpus: King James Bible (Debian bible-kjv) + Python stdlib source.

Deterministic: the same Debian package version and the same Python version give
byte-identical output.  Writes

    demo/data/train.txt         training text (not committed, ~14 MB)
    demo/data/heldout.txt       held-out text (committed, ~320 KB) = kjv + py below
    demo/data/heldout_kjv.txt   held-out KJV: whole books Hebrews .. Revelation
    demo/data/heldout_py.txt    held-out Python: whole stdlib modules (HELDOUT_PY)
    demo/data/corpus_info.json  versions, file lists, sizes, sha256 of every output

Documents are separated by the literal special token <|endoftext|> on its own line.

Usage (as root, on a Debian-like machine):
    python3 demo/build_corpus.py            # runs apt-get to install bible-kjv
    python3 demo/build_corpus.py --no-apt   # if bible-kjv is already installed
"""
import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import sysconfig

EOT = "<|endoftext|>"
SEP = "\n" + EOT + "\n"

# KJV: everything before Hebrews is train, Hebrews..Revelation (~160 KB) is held out.
KJV_TRAIN_RANGE = "Gen1:1-Phmn1:25"
KJV_HELDOUT_RANGE = "Heb1:1-Rev22:21"

# Python: these whole modules (~150 KB) are held out and never trained on.
HELDOUT_PY = ["argparse.py", "heapq.py", "textwrap.py", "json/decoder.py"]
# Directories never used (tests, third-party packages, codec tables, generated docs).
SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages",
             "encodings", "pydoc_data", "__pycache__"}
MAX_FILE_BYTES = 150_000      # skip huge single files (_pydecimal, tkinter/__init__)
# The first demo model (4.26 MB of Python, half/half with the KJV) was data-bound: its held-out
# loss flattened while the training loss kept falling.  So the whole stdlib is used now, about
# 2.4x the KJV part; --py-cap restores a smaller mix.
PY_TRAIN_CAP = 20_000_000


def sh(cmd):
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def install_bible():
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "bible-kjv", "bible-kjv-text"],
                   check=True, env=env)


def kjv_books(verse_range):
    """Return the verses of `verse_range` grouped into whole books (one doc per book)."""
    text = sh(["bible", "-f", verse_range])
    books, cur, cur_name = [], [], None
    for line in text.splitlines():
        if not line.strip():
            continue
        ref = line.split(" ", 1)[0]
        # book abbreviation = leading optional digit + letters ("1Sm", "Ge", "Rev")
        i = 1 if ref[:1].isdigit() else 0
        while i < len(ref) and ref[i].isalpha():
            i += 1
        name = ref[:i]
        if name != cur_name and cur:
            books.append("\n".join(cur) + "\n")
            cur = []
        cur_name = name
        cur.append(line)
    if cur:
        books.append("\n".join(cur) + "\n")
    return books


def stdlib_files(root):
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        for fn in sorted(filenames):
            if fn.endswith(".py"):
                full = os.path.join(dirpath, fn)
                out.append(os.path.relpath(full, root).replace(os.sep, "/"))
    return sorted(out)


def read_py(root, rel):
    with open(os.path.join(root, rel), "rb") as f:
        data = f.read()
    return data.decode("utf-8", errors="replace").replace("\r\n", "\n")


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--no-apt", action="store_true", help="do not run apt-get")
    ap.add_argument("--py-cap", type=int, default=PY_TRAIN_CAP,
                    help="stop adding stdlib modules once this many bytes are in (default: %(default)s)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "data"))
    args = ap.parse_args()

    if not args.no_apt:
        install_bible()
    os.makedirs(args.out, exist_ok=True)

    # ---- KJV -------------------------------------------------------------
    kjv_train = kjv_books(KJV_TRAIN_RANGE)
    kjv_held = kjv_books(KJV_HELDOUT_RANGE)
    assert len(kjv_train) == 57 and len(kjv_held) == 9, (len(kjv_train), len(kjv_held))

    # ---- Python stdlib -----------------------------------------------------
    root = sysconfig.get_paths()["stdlib"]
    files = stdlib_files(root)
    for h in HELDOUT_PY:
        assert h in files, h
    pool = [f for f in files if f not in HELDOUT_PY
            and os.path.getsize(os.path.join(root, f)) <= MAX_FILE_BYTES]
    # deterministic, version-independent spread over the whole stdlib: order by hash of path
    pool.sort(key=lambda p: hashlib.sha256(p.encode()).hexdigest())
    py_train, py_train_names, total = [], [], 0
    for rel in pool:
        if total >= args.py_cap:
            break
        txt = read_py(root, rel)
        if not txt.strip():
            continue
        py_train.append(txt if txt.endswith("\n") else txt + "\n")
        py_train_names.append(rel)
        total += len(txt.encode())
    py_held = [read_py(root, h) for h in HELDOUT_PY]

    # ---- write -------------------------------------------------------------
    # train: interleave the two domains document by document (order is irrelevant
    # for training, which samples random windows, but it keeps the file readable)
    train_docs = kjv_train + py_train
    paths = {
        "train": os.path.join(args.out, "train.txt"),
        "heldout": os.path.join(args.out, "heldout.txt"),
        "heldout_kjv": os.path.join(args.out, "heldout_kjv.txt"),
        "heldout_py": os.path.join(args.out, "heldout_py.txt"),
    }
    texts = {
        "train": SEP.join(train_docs),
        "heldout_kjv": SEP.join(kjv_held),
        "heldout_py": SEP.join(py_held),
    }
    texts["heldout"] = texts["heldout_kjv"] + SEP + texts["heldout_py"]
    for k, t in texts.items():
        with open(paths[k], "w", encoding="utf-8", newline="\n") as f:
            f.write(t)

    # sanity: no held-out document appears in train
    train_text = texts["train"]
    for d in kjv_held + py_held:
        assert d[:2000] not in train_text

    bible_ver = sh(["dpkg-query", "-W", "-f=${Version}", "bible-kjv"]).strip()
    text_ver = sh(["dpkg-query", "-W", "-f=${Version}", "bible-kjv-text"]).strip()
    info = {
        "python_version": platform.python_version(),
        "python_stdlib": root,
        "bible_kjv_version": bible_ver,
        "bible_kjv_text_version": text_ver,
        "kjv_train_range": KJV_TRAIN_RANGE,
        "kjv_heldout_range": KJV_HELDOUT_RANGE,
        "py_heldout_modules": HELDOUT_PY,
        "py_train_modules": py_train_names,
        "bytes": {
            "kjv_train": sum(len(d.encode()) for d in kjv_train),
            "py_train": sum(len(d.encode()) for d in py_train),
            **{k: os.path.getsize(p) for k, p in paths.items()},
        },
        "sha256": {k: sha256(p) for k, p in paths.items()},
    }
    with open(os.path.join(args.out, "corpus_info.json"), "w") as f:
        json.dump(info, f, indent=1)
        f.write("\n")
    print(json.dumps({k: info[k] for k in ("python_version", "bible_kjv_version", "bytes")}, indent=1))
    print(f"{len(py_train_names)} python train modules, {len(HELDOUT_PY)} held out")


if __name__ == "__main__":
    sys.exit(main())
