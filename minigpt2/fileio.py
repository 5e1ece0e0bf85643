"""Files in and out, one way for the whole codebase: every reader refuses what it cannot trust
with a named error that names the file, and every writer leaves the old content or the whole
new one, never a part.

Reading:
  * :func:`load_json` / :func:`parse_json`: strict JSON (UTF-8, no byte-order mark, no
    duplicate keys, optionally no NaN/Infinity), of bounded size and nesting depth
    (:data:`MAX_DEPTH`: a 100,000-level file is refused by name, never a RecursionError).
  * :func:`read_text`: a text input (noun lists, templates, corpora, JSONL): a regular file,
    UTF-8. One rule for a byte-order mark, everywhere: it is refused (a BOM would otherwise
    become part of the first word; stripping it silently would hide which editor wrote the
    file, and circuit and config files have always refused it).
  * :func:`sha256_file`: the checksum complete.json records.
  * :func:`git_commit`: the commit of the code that wrote a file ("HASH+dirty" when tracked files
    had changed), recorded in metadata.json and provenance.json.

Writing (0666/0777 less the umask, like any file the user makes; every file fsynced):
  * :func:`atomic_write` / :func:`atomic_write_text` / :func:`write_json`: one file, via a
    temporary file beside it and a rename.
  * :func:`write_files`: several files into one directory, all or none.
  * :func:`atomic_dir`: a whole directory, built as ``.NAME.partial-PID-*`` beside it and
    renamed into place (:func:`swap_dir`), optionally sealed with a completeness marker (run
    checkpoints); partial directories whose owner process is dead (kill -9) are removed by the
    next writer.
  * :class:`DirLock`: an exclusive lock on a directory (fcntl.flock; the OS releases it when
    its process dies, however it dies); a second holder is refused, naming the first.

A failed write is a :class:`WriteError` (an OSError) naming the file, what the OS said and the fix.
Only the standard library is imported here.
"""

from __future__ import annotations

import contextlib
import errno as errnos
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MAX_DEPTH = 100  # nesting of any JSON file here: metadata, configs, circuits are under 10 deep
MAX_JSON_BYTES = 64 << 20
MAX_TEXT_BYTES = 1 << 30
BOM = "\ufeff"
BOM_FIX = "save it as UTF-8 without a byte-order mark (e.g. sed -i '1s/^\\xEF\\xBB\\xBF//' FILE)"


class FileError(ValueError):
    """An input file refused: the message names the file, what is wrong with it and the fix."""


class JSONFileError(FileError):
    """A JSON file (or line) that is not the strict, bounded JSON this codebase reads."""


class WriteError(OSError):
    """A write that failed (full disk, read-only place, no permission): the message names the file.
    Nothing half-written is left behind."""

    def __init__(self, path, cause: BaseException, fix: str = ""):
        reason = getattr(cause, "strerror", None) or str(cause)
        fix = fix or _write_fix(getattr(cause, "errno", None))
        super().__init__(getattr(cause, "errno", None) or errnos.EIO, f"cannot write {path}: {reason}. Fix: {fix}")
        self.path = str(path)

    def __str__(self) -> str:
        return self.strerror


def _write_fix(code) -> str:
    if code == errnos.ENOSPC or code == errnos.EDQUOT:
        return "free disk space (nothing was half-written), then run the command again"
    if code in (errnos.EROFS, errnos.EACCES, errnos.EPERM):
        return "choose a place you can write to (the target is read-only or not yours)"
    return "check the disk and the path, then run the command again"


# ---------------------------------------------------------------- reading
def _named(what: str, path) -> str:
    return f"{what} {path}" if what else str(path)


def _regular_file(path: Path, name: str, error=FileError) -> os.stat_result:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise error(f"{name} does not exist") from None
    except OSError as e:
        raise error(f"cannot read {name}: {e.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        raise error(f"{name} is a directory, not a file")
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{name} is not a regular file (a FIFO, socket or device, which would block "
                    "or never end); pass the file itself")
    return st


def read_bytes(path, what: str = "file", max_bytes: int = MAX_TEXT_BYTES, error=FileError, name: str | None = None
               ) -> bytes:
    """The bytes of ``path``: a regular file of at most ``max_bytes``; messages call it ``name``
    (default: ``what`` and the path)."""
    path = Path(path)
    name = name or _named(what, path)
    st = _regular_file(path, name, error)
    if st.st_size > max_bytes:
        raise error(f"{name} is {st.st_size:,} bytes, more than the {max_bytes:,} allowed; is it the right file?")
    try:
        with open(path, "rb") as f:
            return f.read(max_bytes + 1)
    except OSError as e:
        raise error(f"cannot read {name}: {e.strerror}") from None


def decode_text(data: bytes, source: str, error=FileError) -> str:
    """UTF-8 text without a byte-order mark (the one rule for every text input, see the module docstring)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{source} is not UTF-8 text ({e.reason} at byte {e.start}). Fix: save it as UTF-8") from None
    if text.startswith(BOM):
        raise error(f"{source} starts with a UTF-8 byte-order mark (U+FEFF), which would become part of its "
                    f"first entry. Fix: {BOM_FIX}")
    return text


def read_text(path, what: str = "file", max_bytes: int = MAX_TEXT_BYTES, error=FileError, name: str | None = None
              ) -> str:
    """A text input: a regular file, UTF-8 without a byte-order mark; else ``error`` naming it
    (as ``name``, default ``what`` and the path)."""
    name = name or _named(what, path)
    return decode_text(read_bytes(path, what, max_bytes, error, name), name, error)


def _depth_exceeds(obj, limit: int) -> bool:
    stack = [(obj, 1)]
    while stack:
        x, depth = stack.pop()
        if isinstance(x, (dict, list)):
            if depth > limit:
                return True
            stack.extend((v, depth + 1) for v in (x.values() if isinstance(x, dict) else x))
    return False


def _no_duplicate_keys(pairs):
    d = dict(pairs)
    if len(d) < len(pairs):  # json.loads would keep the last silently
        seen = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"the key {dup!r} appears more than once")
    return d


def _no_constants(name: str):
    raise ValueError(f"{name} is not JSON")


def parse_json(text: str | bytes, source: str, fix: str = "", allow_nan: bool = True,
               max_depth: int = MAX_DEPTH, error=JSONFileError):
    """Strict JSON of a file's text; any failure raises ``error`` naming ``source`` and saying ``fix``."""
    if isinstance(text, bytes):
        text = decode_text(text, source, error)
    elif text.startswith(BOM):
        raise error(f"{source} starts with a UTF-8 byte-order mark (U+FEFF). Fix: {BOM_FIX}")
    hooks = {} if allow_nan else {"parse_constant": _no_constants}
    fix = f". Fix: {fix}" if fix else ""
    try:
        obj = json.loads(text, object_pairs_hook=_no_duplicate_keys, **hooks)
    except RecursionError:
        raise error(f"{source} is not valid JSON here (nested more than {max_depth} levels deep){fix}") from None
    except ValueError as e:  # JSONDecodeError included
        raise error(f"{source} is not valid JSON ({e}){fix}") from None
    if _depth_exceeds(obj, max_depth):
        raise error(f"{source} is not valid JSON here (nested more than {max_depth} levels deep){fix}")
    return obj


def load_json(path, what: str = "JSON file", fix: str = "", kind: type | None = None, allow_nan: bool = True,
              max_bytes: int = MAX_JSON_BYTES, max_depth: int = MAX_DEPTH, error=JSONFileError):
    """A JSON file: a regular file of at most ``max_bytes``, strict JSON at most ``max_depth`` deep,
    of type ``kind`` if given (dict: "an object"). Whatever is wrong raises ``error`` naming the file."""
    source = _named(what, path)
    suffix = f". Fix: {fix}" if fix else ""
    try:
        data = read_bytes(path, what, max_bytes, error)
    except error as e:  # read_bytes raises only ``error``
        raise error(f"{e}{suffix}") from None
    obj = parse_json(data, source, fix, allow_nan, max_depth, error)
    if kind is not None and not isinstance(obj, kind):
        names = {dict: "an object", list: "an array", str: "a string"}
        raise error(f"{source} holds a JSON {_kind(obj)}, not {names.get(kind, kind.__name__)}{suffix}")
    return obj


def _kind(x) -> str:
    kinds = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if x is None else kinds.get(type(x), type(x).__name__)


def sha256_file(path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def git_commit(where=None) -> str | None:
    """HEAD of the git repository holding ``where`` (default: this code), with "+dirty" when tracked
    files differ from it (one spelling, as the bundled models' metadata.json record it); None outside
    git or without a git program."""
    where = Path(where) if where is not None else Path(__file__).resolve().parent
    try:
        run = lambda *a: subprocess.run(["git", *a], cwd=where, capture_output=True, text=True, timeout=10)  # noqa: E731
        head = run("rev-parse", "HEAD")
        if head.returncode:
            return None
        dirty = run("status", "--porcelain", "--untracked-files=no").stdout.strip()
        return head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


# ---------------------------------------------------------------- the completeness marker
MARKER = "complete.json"  # written last into a committed directory: each file's size and sha256


def seal(d) -> None:
    """fsync every file of ``d``, then write its completeness marker: each file's size and sha256."""
    d, sizes, sums = Path(d), {}, {}
    for f in sorted(d.iterdir()):
        if f.is_file() and f.name != MARKER:
            fsync_file(f)
            sizes[f.name], sums[f.name] = f.stat().st_size, sha256_file(f)
    write_json(d / MARKER, {"files": sizes, "sha256": sums})
    fsync_dir(d)


def read_marker(d) -> dict | None:
    """``d``'s completeness marker: {"files": {name: size}, "sha256": {name: hex} (absent in older ones)};
    None when there is none; a FileError when it is unreadable."""
    path = Path(d) / MARKER
    if not path.exists():
        return None
    marker = load_json(path, "completeness marker", kind=dict)
    sizes, sums = marker.get("files"), marker.get("sha256", {})
    if not (isinstance(sizes, dict) and all(isinstance(v, int) for v in sizes.values())
            and isinstance(sums, dict) and all(isinstance(v, str) for v in sums.values())):
        raise FileError(f"completeness marker {path} lacks "
                        '"files" (an object of sizes) or has a "sha256" that is not an object of checksums')
    return {"files": sizes, "sha256": sums}


def checksum_problems(d, names=None, hashes: bool = True) -> list[str]:
    """What differs between the files of ``d`` and its marker, one phrase each ("X is missing", "X is
    N bytes, complete.json records M", "X's sha256 differs ..."); [] when all agree or there is no
    marker. ``names``: check only these (those the marker lists); ``hashes``: sizes only when False."""
    marker = read_marker(d)
    if marker is None:
        return []
    d, problems = Path(d), []
    for name, size in marker["files"].items():
        if names is not None and name not in names:
            continue
        f = d / name
        if not f.exists():
            problems.append(f"{name} is missing")
        elif not f.is_file():
            problems.append(f"{name} is not a regular file")
        elif f.stat().st_size != size:
            problems.append(f"{name} is {f.stat().st_size:,} bytes, {MARKER} records {size:,} (truncated or replaced)")
        elif hashes and name in marker["sha256"] and sha256_file(f) != marker["sha256"][name]:
            problems.append(f"{name}'s sha256 differs from the one {MARKER} records (its bytes changed in place)")
    return problems


# ---------------------------------------------------------------- writing one file
def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_dir(path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # not every platform opens directories
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def atomic_write(path, write) -> None:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, fsync it, rename it onto ``path``:
    ``path`` is the old file or the whole new one, never a part. An OSError is a WriteError naming
    ``path``, the temporary file removed."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise WriteError(path, e) from None
    os.close(fd)
    try:
        write(tmp)
        fsync_file(tmp)
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp's 0600 would make the file private
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(e, OSError) and not isinstance(e, WriteError):
            raise WriteError(path, e) from None
        raise
    fsync_dir(path.parent)


def atomic_write_text(path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def json_text(obj, indent: int = 2, sort_keys: bool = True, default=str) -> str:
    """``obj`` as JSON text ending in a newline; ``default`` turns what JSON lacks into what it has."""
    return json.dumps(obj, indent=indent, sort_keys=sort_keys, default=default) + "\n"


def write_json(path, obj, **style) -> None:
    """``obj`` as JSON at ``path``, atomically; ``style``: :func:`json_text`'s indent, sort_keys, default."""
    atomic_write_text(path, json_text(obj, **style))


def write_files(directory, texts: dict[str, str]) -> None:
    """Write several text files into ``directory``, all or none: each is written to a temporary file
    first; only when every one is on disk are they renamed into place. A directory this call
    made is removed again on a failure."""
    directory = Path(directory)
    made = not directory.exists()
    tmps: dict[str, str] = {}
    try:
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise WriteError(directory, e) from None
        for name, text in texts.items():
            try:
                fd, tmps[name] = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".tmp")
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    f.write(text)
                    f.flush()
                    os.fsync(f.fileno())
                os.chmod(tmps[name], 0o666 & ~umask())
            except OSError as e:
                raise WriteError(directory / name, e) from None
        for name, tmp in tmps.items():
            os.replace(tmp, directory / name)
        fsync_dir(directory)
    except BaseException:
        for tmp in tmps.values():
            with contextlib.suppress(OSError):
                os.remove(tmp)
        if made:
            shutil.rmtree(directory, ignore_errors=True)
        raise


# ---------------------------------------------------------------- writing a directory
def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # someone else's process: alive, not ours to judge
    return True


def _owned_leftover(name: str) -> re.Pattern:
    return re.compile(rf"^\.{re.escape(name)}\.(partial|old)-(?P<pid>\d+)-")


def clean_stale(parent, name: str) -> list[Path]:
    """Remove ``.NAME.partial-PID-*`` / ``.NAME.old-PID-*`` directories in ``parent`` whose owner
    process is dead (killed while writing NAME). Returns what was removed."""
    pattern, removed = _owned_leftover(name), []
    with contextlib.suppress(OSError):
        for p in Path(parent).iterdir():
            m = pattern.match(p.name)
            if m and p.is_dir() and not p.is_symlink() and not pid_alive(int(m["pid"])):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


def seal_dir(d) -> None:
    """fsync every file under ``d`` and every directory, so a rename of ``d`` publishes data on disk."""
    for root, dirs, files in os.walk(d):
        for f in files:
            fsync_file(os.path.join(root, f))
        fsync_dir(root)


@contextlib.contextmanager
def atomic_dir(out, marker: bool = False):
    """Yield a fresh temporary directory beside ``out`` (``.OUT.partial-PID-*``, mode 0777 less the
    umask); on success it is fsynced (with ``marker``: sealed with its completeness marker, see
    :func:`seal`) and replaces ``out`` (:func:`swap_dir`); on any error (Ctrl-C, a kill by SIGTERM,
    a full disk) it is deleted, so ``out`` is the complete new result or untouched."""
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        clean_stale(out.parent, out.name)
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-{os.getpid()}-"))
        os.chmod(tmp, 0o777 & ~umask())  # mkdtemp's 0700 would make the result private
    except OSError as e:
        raise WriteError(out, e) from None
    try:
        yield tmp
        seal(tmp) if marker else seal_dir(tmp)
        swap_dir(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and not isinstance(e, WriteError):
            raise WriteError(getattr(e, "filename", None) or out, e) from None
        raise


def swap_dir(tmp, final) -> None:
    """Rename directory ``tmp`` onto ``final``. An existing ``final`` is first renamed aside to
    ``.FINAL.old-PID-*`` and deleted only once the new one is in place; on an error it is put back.
    A kill between the two renames leaves both whole (finetune.checkpoint.recover_dir restores one;
    :func:`clean_stale` removes the aside copy of a dead writer)."""
    tmp, final = Path(tmp), Path(final)
    old, moved = final.parent / f".{final.name}.old-{os.getpid()}-{secrets.token_hex(4)}", False
    try:
        if final.exists():
            os.replace(final, old)
            moved = True
        os.replace(tmp, final)
        fsync_dir(final.parent)
    except BaseException:
        if moved and not final.exists():
            os.replace(old, final)
        raise
    if moved:
        shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------- locking a directory
class LockedError(OSError):
    """Another process holds the lock: the message names it (pid, host, command, start time)."""

    def __init__(self, message: str):
        super().__init__(errnos.EBUSY, message)

    def __str__(self) -> str:
        return self.strerror


class DirLock:
    """An exclusive lock on directory ``d``, held through the file ``d/.lock`` (fcntl.flock: the OS
    drops it when the process exits or is killed, so a stale lock cannot outlive its holder).
    The holder writes who it is into the file; a refused process reads it back to name the holder."""

    NAME = ".lock"

    def __init__(self, d, what: str = "directory"):
        self.path, self.what, self.fd = Path(d) / self.NAME, what, None

    @property
    def held(self) -> bool:
        return self.fd is not None

    def acquire(self) -> "DirLock":
        import fcntl

        if self.fd is not None:
            return self
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise WriteError(self.path, e) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise LockedError(f"{self.what} {self.path.parent} is in use by {self.holder()}. Fix: wait for it to "
                              f"finish or stop it (kill PID); a killed process releases the lock") from None
        self.fd = fd
        me = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv),
              "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        return self

    def holder(self) -> str:
        try:
            h = json.loads(self.path.read_text()[:10_000])
            return f"process {h['pid']} on {h['host']} ({h['command']!r}, started {h['started']})"
        except (OSError, ValueError, KeyError, TypeError, RecursionError):
            return "another process (it has not yet written who it is)"

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the flock; the file stays, so no one locks a deleted inode
            self.fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
