"""Evaluation texts from outside the demo model's training domains, assembled from files that any
fresh machine with this project installed has.

    python benchmarks/texts.py OUT_DIR     # writes OUT_DIR/licenses.txt and OUT_DIR/thirdparty_py.txt

- licenses.txt: English legal prose, neither scripture nor code: the license texts in
  /usr/share/common-licenses (Debian's and Ubuntu's base-files package), in a fixed order. The
  out-of-domain text that results are *reported* on; nothing is tuned on it.
- thirdparty_py.txt: Python source from outside the standard library the demo trained on, the
  installed `yaml` (PyYAML) and `tqdm` packages, both dependencies of mobile. The text defaults
  are *chosen* on (docs/quantized-experts.md), so that the demo's held-out KJV and Python texts
  and licenses.txt report them.
"""

from __future__ import annotations

import sys
from pathlib import Path

LICENSES = Path("/usr/share/common-licenses")
LICENSE_FILES = ("GPL-3", "Apache-2.0", "MPL-2.0", "LGPL-2.1", "GFDL-1.3", "Artistic", "CC0-1.0")
PACKAGES = ("yaml", "tqdm")


def licenses() -> str:
    missing = [f for f in LICENSE_FILES if not (LICENSES / f).is_file()]
    if missing:
        raise SystemExit(f"{LICENSES}: missing {', '.join(missing)} (the base-files package installs them)")
    return "\n\n".join((LICENSES / f).read_text() for f in LICENSE_FILES)


def third_party_python() -> str:
    import importlib

    parts = []
    for name in PACKAGES:
        root = Path(importlib.import_module(name).__file__).parent
        parts += [p.read_text() for p in sorted(root.rglob("*.py"))]
    return "\n\n".join(parts)


def main() -> None:
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    for name, text in (("licenses.txt", licenses()), ("thirdparty_py.txt", third_party_python())):
        (out / name).write_text(text)
        print(f"wrote {out / name}: {len(text)} characters")


if __name__ == "__main__":
    main()
