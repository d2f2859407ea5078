"""Where a command may write: never over what it did not write itself.

A command that writes a folder (compile, quantize, synth) leaves a marker in it, MARKER, naming the
command and the files it wrote. It writes into a folder only when the folder does not exist yet, is
empty, or holds an earlier output of the same command and nothing else. A command that writes a
file (import-hf -o, run --trace, eval --out and --plot, bench --json) replaces one only when the
file's first bytes carry the same command's stamp. Anything else is refused in one line, exit 2,
unless --force. Both checks run before any work, so that a refusal costs nothing, and both kinds of
output are written atomically (a temporary sibling renamed into place: mobile.compiler.emit).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from mobile.errors import MobileError

MARKER = ".mobile-output.json"
HEAD_BYTES = 4096  # where a file's stamp must stand


def stamp(command: str) -> str:
    """What a file written by `mobile COMMAND` carries in its first HEAD_BYTES, so a rerun knows it."""
    return f"mobile {command}"


def marker_text(command: str, files: Iterable[str]) -> str:
    """The marker of a folder that `mobile COMMAND` wrote, holding `files` (the marker aside)."""
    return json.dumps({"written_by": stamp(command), "files": sorted(set(files) - {MARKER})}, indent=1) + "\n"


def check_folder(path: str | Path, command: str, force: bool = False, key: str = "-o",
                 known: Iterable[str] = ()) -> None:
    """Refuse, before any work, to write the folder `path` over anything `mobile COMMAND` did not
    write. known: the files an output of the command held before markers existed (a folder of only
    those is recognised as one, without a marker)."""
    p = Path(path)
    if p.is_symlink() or (p.exists() and not p.is_dir()):  # a folder's rename cannot take a link's place
        what = "a link" if p.is_symlink() else "a file"
        raise MobileError(f"{path} is {what}, not a folder; choose a folder path", key=key)
    if not p.exists():
        probe_writable(existing_folder(p, key), key)
        return
    probe_writable(p.parent if str(p.parent) else Path("."), key)
    entries = {e.name for e in p.iterdir()}
    if not entries or force:
        return
    written = _marked_files(p / MARKER, command)
    if written is None and MARKER not in entries and entries <= set(known):
        written = sorted(entries)
    if written is None:
        raise MobileError(f"{path} holds files that `mobile {command}` did not write; choose another folder, or "
                          "pass --force to replace it", key=key)
    if strays := sorted(entries - set(written) - {MARKER}):
        raise MobileError(f"{path} holds {', '.join(strays[:3])}{' ...' if len(strays) > 3 else ''}, which "
                          f"`mobile {command}` did not write; move them away, or pass --force to replace the folder",
                          key=key)


def check_file(path: str | Path, command: str, force: bool = False, key: str = "-o") -> None:
    """Refuse, before any work, to write the file `path` over one that `mobile COMMAND` did not
    write, or where nothing can be written (missing folders above it are made when it is written)."""
    p = Path(path)
    if p.is_dir():
        raise MobileError(f"{path} is a folder; expected a file path", key=key)
    probe_writable(existing_folder(p, key), key)
    if p.exists() and not force and not _stamped(p, command):
        raise MobileError(f"{path} exists and `mobile {command}` did not write it; choose another path, or pass "
                          "--force to replace it", key=key)


def probe_writable(folder: Path, key: str) -> None:
    """Create and remove a file in `folder`: the one test that holds for every file system and user
    (os.access says yes to root on a read-only or virtual one, such as /proc)."""
    try:
        fd, name = tempfile.mkstemp(prefix=".mobile-probe-", dir=folder)
    except OSError as e:
        raise MobileError(f"cannot write in the folder {folder}: {e.strerror or e}", key=key) from None
    os.close(fd)
    os.unlink(name)


def existing_folder(p: Path, key: str) -> Path:
    """The closest existing folder above `p`, where the missing ones on the way would be made; an
    existing file on the way is an error."""
    for parent in p.absolute().parents:
        if parent.exists() or parent.is_symlink():
            if not parent.is_dir():
                raise MobileError(f"{parent} is a file, not a folder", key=key)
            return parent
    return Path("/")


def _marked_files(marker: Path, command: str) -> list[str] | None:
    try:
        data = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("written_by") != stamp(command):
        return None
    files = data.get("files")
    return [f for f in files if isinstance(f, str)] if isinstance(files, list) else None


def _stamped(p: Path, command: str) -> bool:
    try:
        with open(p, "rb") as f:
            head = f.read(HEAD_BYTES)
    except OSError:
        return False
    return stamp(command).encode() in head


# -- writing ----------------------------------------------------------------------------------


def write_text(path: Path, text: str) -> None:
    """A new file, on disk before the folder holding it is renamed into place."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a file so readers see the old content or the new, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        os.close(fd)
        write_text(Path(tmp), text)
        os.chmod(tmp, _mode(0o666))  # mkstemp's 0600 would make a trace or a table private
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def new_folder(out: Path, command: str) -> Iterator[Path]:
    """A temporary sibling of `out` to write `mobile COMMAND`'s output into. When the block ends,
    the marker goes in (naming every file written) and the folder replaces `out` whole; when it
    fails, the sibling is removed and `out` is as it was."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        write_text(tmp / MARKER, marker_text(command, (p.name for p in tmp.iterdir())))
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(tmp: Path, out: Path, attempts: int = 20) -> None:
    """Move the finished folder `tmp` to `out`, replacing what was there, so that `out` is always
    one whole folder, never a mix. Safe when several writers race for the same `out` (two
    `mobile compile -o X` at once): a rename onto a taken name moves the occupant aside and tries
    again, and the last writer's folder is what stays. What `out` held was checked before the work
    began (check_folder)."""
    os.chmod(tmp, _mode(0o777))  # mkdtemp made it private; the result is an ordinary folder
    for attempt in range(attempts):
        try:
            os.replace(tmp, out)  # atomic; fails while another folder holds the name
            return
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.EISDIR):
                raise
        aside = out.with_name(f".{out.name}.old-{os.getpid()}-{attempt}-{os.urandom(3).hex()}")
        try:
            os.replace(out, aside)
        except FileNotFoundError:
            continue  # another writer moved it first: the name may be free now
        shutil.rmtree(aside, ignore_errors=True)
    raise MobileError(f"{attempts} tries to put the folder in place lost to other writers of it", where=out)


def _mode(full: int) -> int:
    """`full` (0o777 for folders, 0o666 for files) less this process's umask, as open() would give."""
    umask = os.umask(0)
    os.umask(umask)
    return full & ~umask
