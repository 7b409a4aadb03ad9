"""Safe writing: atomic files, folders that are ours, and never a user's data deleted.

Rules (DESIGN.md "Conventions"):

* every file is written to a temporary sibling and renamed into place; a failure removes the temporary file and a
  full disk says so with the path (``DiskFullError``);
* a folder a command writes carries a marker (``.genrec.json``, its kind); a non-empty folder without our marker is
  refused, replacing one of ours takes ``overwrite``; the current directory, the data root and any folder that
  contains either are refused outright;
* folders written in one go are staged in a temporary sibling and renamed (``staged_dir``): never half-written.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from genrec.errors import DiskFullError, OutputError

MARKER = ".genrec.json"


# ----------------------------------------------------------------------------- atomic files
def _disk_full(exc: BaseException) -> bool:
    """ENOSPC / EDQUOT, also when torch or pyarrow re-raise it as their own exception type."""
    if getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT):
        return True
    return "No space left on device" in str(exc) or "Disk quota exceeded" in str(exc)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """``write(tmp)`` fills a temporary sibling of ``path``, which then replaces ``path`` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600: give the result the usual permissions
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if _disk_full(exc) and not isinstance(exc, DiskFullError):
            raise DiskFullError(f"disk full while writing {path} (nothing was written there)") from None
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def _umask() -> int:
    # /proc first: os.umask(0) would briefly make every file another thread creates world-writable
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o077)  # the strictest value while we read it
    os.umask(mask)
    return mask


def jsonable(obj):
    """NaN / ±inf → None (strict JSON: an empty subset has no value, not a bare NaN)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if hasattr(obj, "item") and getattr(obj, "ndim", None) == 0:  # numpy / torch scalars
        return jsonable(obj.item())
    return obj


def atomic_write_json(path: str | os.PathLike, obj, sort_keys: bool = True) -> Path:
    text = json.dumps(jsonable(obj), indent=1, sort_keys=sort_keys, allow_nan=False, default=str)
    return atomic_write_text(path, text + "\n")


def atomic_torch_save(obj, path: str | os.PathLike) -> Path:
    import torch

    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


# ----------------------------------------------------------------------------- folders that are ours
@contextlib.contextmanager
def exclusive(path: str | os.PathLike):
    """Hold an inter-process lock beside ``path`` (``.<name>.lock`` in its parent): the first process (DDP rank,
    or a concurrent run sharing a cache) does the work, the others wait for it and then reuse the result."""
    from filelock import FileLock

    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(path.parent / f".{path.name}.lock"))
        lock.acquire()
    except PermissionError:  # a read-only shared location: nothing will be written there, so nothing to guard
        yield
        return
    except OSError as exc:
        if exc.errno != errno.EROFS:
            raise
        yield
        return
    try:
        yield
    finally:
        lock.release()


def read_marker(path: str | os.PathLike) -> dict | None:
    """The marker of a folder we wrote, or None."""
    p = Path(path) / MARKER
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def write_marker(path: str | os.PathLike, kind: str, **extra) -> None:
    from genrec import __version__

    atomic_write_json(Path(path) / MARKER, {"kind": kind, "genrec_version": __version__,
                                            "created": time.strftime("%Y-%m-%d %H:%M:%S"), **extra})


def _is_within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def check_not_protected(path: str | os.PathLike, protected: tuple = (), what: str = "output folder") -> Path:
    """Refuse the current directory, the data roots in ``protected`` and any folder containing one of them."""
    target = Path(path).expanduser().resolve()
    guarded = [("the current directory", Path.cwd().resolve()), ("your home directory", Path.home().resolve())]
    guarded += [("the data root", Path(p).expanduser().resolve()) for p in protected if p]
    for name, g in guarded:
        if _is_within(g, target):
            rel = "is" if g == target else "contains"
            raise OutputError(f"{what} {path}: refusing to write there, it {rel} {name} ({g}); choose a new folder")
    return target


def claim_dir(path: str | os.PathLike, kind: str, overwrite: bool = False, protected: tuple = (),
              allow_existing: bool = False, what: str = "output folder") -> str:
    """Check that ``path`` may hold a ``kind`` folder of ours. Returns ``new`` (absent or empty), ``ours`` (ours and
    kept: ``allow_existing``) or ``replace`` (ours, to be replaced: ``overwrite``). Nothing is written."""
    target = check_not_protected(path, protected, what)
    if target.exists() and not target.is_dir():
        raise OutputError(f"{what} {path}: exists and is a file, expected a folder")
    if not target.exists() or not any(target.iterdir()):
        return "new"
    marker = read_marker(target)
    if marker is None or marker.get("kind") != kind:
        found = "another kind of genrec folder" if marker else "files that genrec did not write"
        raise OutputError(f"{what} {path}: not empty and holds {found} (expected a '{kind}' folder); refusing to "
                          "touch it — choose a new or empty folder")
    if overwrite:
        return "replace"
    if allow_existing:
        return "ours"
    raise OutputError(f"{what} {path}: already holds a '{kind}' folder from an earlier run; pass --overwrite true "
                      "to replace it, or choose another folder")


def remove_ours(path: str | os.PathLike, kind: str) -> None:
    """Delete a folder only if it carries our marker of ``kind`` (or is empty)."""
    p = Path(path)
    if not p.exists():
        return
    marker = read_marker(p)
    if (marker is None or marker.get("kind") != kind) and any(p.iterdir()):
        raise OutputError(f"{p}: refusing to delete a folder that is not a '{kind}' folder of genrec")
    shutil.rmtree(p)


@contextlib.contextmanager
def staged_dir(path: str | os.PathLike, kind: str, overwrite: bool = False, protected: tuple = (),
               what: str = "output folder", **marker) -> Iterator[Path]:
    """Yield a temporary sibling to fill; on success it becomes ``path`` (marked as ours) in one rename, replacing
    an earlier folder of ours only with ``overwrite``. On failure nothing is left behind."""
    target = Path(path)
    state = claim_dir(target, kind, overwrite=overwrite, protected=protected, what=what)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        write_marker(tmp, kind, **marker)
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
        old = None
        if target.exists():
            if state == "replace":
                old = target.with_name(f".{target.name}.old-{os.getpid()}")
                os.replace(target, old)
            elif any(target.iterdir()):  # something wrote into the target while the folder was staged
                raise OutputError(f"{what} {target}: files appeared in it while genrec was writing (e.g. a cache "
                                  "configured inside it); nothing was replaced — choose a cache folder outside it")
            else:
                target.rmdir()
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if _disk_full(exc) and not isinstance(exc, DiskFullError):
            raise DiskFullError(f"disk full while writing {target} (nothing was written there)") from None
        raise
