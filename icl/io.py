"""Atomic writers (write to a temp file beside the target, then rename, so nothing is ever half-written) and file
identity (one file under two names)."""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; on success rename it onto ``target``.

    On any exception the temp file is removed and the target is left untouched.
    The temp name keeps the target's suffixes (``.nii.gz``, ``.pth``) so writers that
    infer the format from the extension still work.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(target.suffixes)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=f".tmp{suffix}", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp makes 0600; give the file the mode a plain open() would
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def atomic_write(target: str | Path, write: Callable[[Path], Any]) -> Path:
    """Call ``write(tmp_path)`` and move the result onto ``target`` atomically."""
    with atomic_path(target) as tmp:
        write(tmp)
    return Path(target)


def write_json(target: str | Path, obj: Any) -> Path:
    """Write JSON atomically (sorted keys, indented) so readers never see a partial file."""
    return atomic_write(target, lambda p: p.write_text(json.dumps(obj, indent=2, sort_keys=True)))


def write_text(target: str | Path, text: str) -> Path:
    return atomic_write(target, lambda p: p.write_text(text))


def same_file(a: str | Path, b: str | Path) -> bool:
    """One existing file under two names: another spelling (``./a/../X``), a symbolic or a hard link. A name that
    does not exist (yet) is no file, so it is never the same as another."""
    try:
        return Path(a).samefile(b)
    except OSError:
        return False
