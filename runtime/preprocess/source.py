"""What a media source is, checked before anything is opened or decoded.

A media argument (`image`, `audio`, `video`) may be:
- a path (str or os.PathLike) to a *regular* file: URLs, the empty string, directories, FIFOs, sockets and
  devices are refused. The path is stat'ed before it is opened (a FIFO must not block the caller) and
  opened non-blocking, then fstat'ed again (a file swapped for a FIFO in between is still refused);
- bytes, bytearray or memoryview holding the encoded file;
- a binary file object (io.BytesIO, open(..., "rb")): readable, returning bytes; one backed by a file
  descriptor must be a regular file (a pipe or /dev/zero would never end);
- an array, which each modality checks itself.

Every refusal is an InputError whose message starts with the parameter's name and says what is accepted.
"""

from __future__ import annotations

import io
import os
import re
import stat
from dataclasses import dataclass
from typing import BinaryIO

from ..errors import InputError

_URL = re.compile(r"^\s*(?:[a-zA-Z][a-zA-Z0-9+.\-]+://|data:|blob:|javascript:|file:)", re.ASCII)
_COPY_BLOCK = 1 << 20  # bytes per read when a stream is copied


def accepted(param: str, arrays: str) -> str:
    """The accepted forms of a media parameter, for error messages."""
    return (f"{param} must be a path to a regular file (str or os.PathLike), bytes, a binary file object "
            f"(io.BytesIO, open(path, 'rb')) or {arrays}")


@dataclass
class MediaSource:
    """A checked, non-array media source: exactly one of `path`, `data`, `file` is set."""

    param: str
    path: str | None = None
    data: bytes | None = None
    file: BinaryIO | None = None

    @property
    def label(self) -> str:
        """How messages name it: `image 'cat.png'`, `audio bytes`, `video file object`."""
        if self.path is not None:
            return f"{self.param} {self.path!r}"
        return f"{self.param} {'bytes' if self.data is not None else 'file object'}"

    def open(self) -> BinaryIO:
        """A binary stream over the source. A path is re-checked on the open descriptor (fstat)."""
        if self.data is not None:
            return io.BytesIO(self.data)
        if self.file is not None:
            return self.file
        flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_BINARY", 0)
        try:
            fd = os.open(self.path, flags)
        except OSError as exc:
            raise InputError(f"{self.label}: cannot open ({exc.strerror or exc})") from exc
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise InputError(f"{self.label}: not a regular file; {accepted(self.param, 'an array')}")
            return os.fdopen(fd, "rb")
        except BaseException:
            os.close(fd)
            raise

    def size(self) -> int | None:
        """Size in bytes when known without reading (paths and bytes)."""
        if self.data is not None:
            return len(self.data)
        if self.path is not None:
            return os.stat(self.path).st_size
        return None


def check_path(value, param: str) -> str:
    """A str/PathLike that names an existing regular file -> its str path; anything else is an InputError."""
    try:
        path = os.fspath(value)
    except TypeError as exc:
        raise InputError(f"{param}: {accepted(param, 'an array')}; got {type(value).__name__}") from exc
    if isinstance(path, bytes):
        try:
            path = os.fsdecode(path)
        except UnicodeDecodeError as exc:
            raise InputError(f"{param}: the path is not decodable ({exc})") from exc
    if not path or not path.strip():
        raise InputError(f"{param}: the empty string is not a file; {accepted(param, 'an array')}")
    if _URL.match(path):
        raise InputError(f"{param}: URLs are not supported: download the file and pass its path or bytes "
                         f"(got {path[:80]!r})")
    try:
        mode = os.stat(path).st_mode  # stat before open: opening a FIFO would block
    except ValueError as exc:  # embedded NUL
        raise InputError(f"{param}: invalid path ({exc})") from exc
    except FileNotFoundError as exc:
        raise InputError(f"{param} {path[:200]!r}: no such file") from exc
    except OSError as exc:
        raise InputError(f"{param} {path[:200]!r}: cannot access ({exc.strerror or exc})") from exc
    if stat.S_ISDIR(mode):
        raise InputError(f"{param} {path[:200]!r}: is a directory, not a file; {accepted(param, 'an array')}")
    if not stat.S_ISREG(mode):
        kind = ("a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
                else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a regular file")
        raise InputError(f"{param} {path[:200]!r}: is {kind}; only regular files are read")
    return path


def check_file_object(value, param: str) -> BinaryIO:
    """A readable binary file object; one with a descriptor must be a regular file."""
    if isinstance(value, io.TextIOBase):
        raise InputError(f"{param}: a text-mode file object was given; open the file with 'rb' "
                         f"({accepted(param, 'an array')})")
    try:
        if hasattr(value, "readable") and not value.readable():
            raise InputError(f"{param}: the file object is not readable; open it with 'rb'")
    except ValueError as exc:  # closed file
        raise InputError(f"{param}: the file object cannot be read ({exc})") from exc
    try:
        fd = value.fileno()
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        fd = None
    if fd is not None:
        try:
            mode = os.fstat(fd).st_mode
        except OSError as exc:
            raise InputError(f"{param}: the file object cannot be read ({exc})") from exc
        if not stat.S_ISREG(mode):
            raise InputError(f"{param}: the file object is not backed by a regular file (a pipe, socket or "
                             f"device); pass a regular file, bytes or io.BytesIO")
    try:
        probe = value.read(0)
    except Exception as exc:  # noqa: BLE001 - any failure of a caller's object is an input problem
        raise InputError(f"{param}: the file object cannot be read ({type(exc).__name__}: {exc})") from exc
    if not isinstance(probe, (bytes, bytearray)):
        raise InputError(f"{param}: the file object returns {type(probe).__name__}, not bytes; open the file "
                         f"with 'rb' ({accepted(param, 'an array')})")
    return value


def media_source(value, param: str, arrays: str) -> MediaSource:
    """Classify and check a non-array media argument (see the module docstring)."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value) if not isinstance(value, bytes) else value
        if not data:
            raise InputError(f"{param}: empty bytes; {accepted(param, arrays)}")
        return MediaSource(param, data=data)
    if isinstance(value, (str, os.PathLike)):
        return MediaSource(param, path=check_path(value, param))
    if hasattr(value, "read"):
        return MediaSource(param, file=check_file_object(value, param))
    raise InputError(f"{param}: {accepted(param, arrays)}; got {type(value).__name__}")


def copy_to(src: BinaryIO, dst: BinaryIO, max_bytes: int, label: str) -> int:
    """Copy a stream in blocks; more than `max_bytes` is refused after reading at most one block more."""
    total = 0
    while True:
        try:
            block = src.read(_COPY_BLOCK)
        except Exception as exc:  # noqa: BLE001
            raise InputError(f"{label}: read failed ({type(exc).__name__}: {exc})") from exc
        if not block:
            return total
        if not isinstance(block, (bytes, bytearray)):
            raise InputError(f"{label}: the file object returns {type(block).__name__}, not bytes")
        total += len(block)
        if total > max_bytes:
            raise InputError(f"{label}: larger than the limit of {max_bytes} bytes")
        dst.write(block)
