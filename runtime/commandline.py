"""What every area's commands share (omniguard_edge/cli.py registers them): argument types that refuse bad values
with one line, the exit codes, the limit options, and the check that an extra's modules import."""

from __future__ import annotations

import argparse
import os
import stat
import sys
from pathlib import Path

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_UNKNOWN = 0, 1, 2, 3  # safe/unsafe, error, usage error, unparsed answer
MAX_THREADS = 1024


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def int_in(lo: int, hi: int):
    def parse(value: str) -> int:
        try:
            number = int(value, 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not an integer (an int in [{lo}, {hi}])") from None
        if not lo <= number <= hi:
            raise argparse.ArgumentTypeError(f"{number} is out of range (an int in [{lo}, {hi}])")
        return number

    return parse


def probability(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number (a probability in [0, 1])") from None
    if not 0.0 <= number <= 1.0:  # NaN fails this too
        raise argparse.ArgumentTypeError(f"{value} is out of range (a probability in [0, 1])")
    return number


def utf8(value: str) -> str:
    """Arguments arrive surrogate-escaped when they are not valid UTF-8: text must be real text."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError("is not valid UTF-8 text") from None
    return value


def bundle_dir(value: str) -> Path:
    path = Path(value)
    try:  # a name too long, a permission denied, a NUL byte: one line, exit 2, never a traceback
        is_dir = path.is_dir()
        has_manifest = is_dir and (path / "manifest.json").is_file()
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or exc
        raise argparse.ArgumentTypeError(f"{value!r}: cannot access ({reason})") from None
    if not is_dir:
        raise argparse.ArgumentTypeError(f"{value!r} is not a directory (a bundle is the folder "
                                         "`omniguard-edge export` writes)")
    if not has_manifest:
        raise argparse.ArgumentTypeError(f"{value!r} has no manifest.json: not a bundle")
    return path


def media_file(value: str) -> Path:
    """An existing regular file (stat'ed, never opened here: a FIFO must not block)."""
    if not value:
        raise argparse.ArgumentTypeError("the empty string is not a file")
    try:
        mode = os.stat(value).st_mode
    except FileNotFoundError:
        raise argparse.ArgumentTypeError(f"{value!r}: no such file") from None
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or exc
        raise argparse.ArgumentTypeError(f"{value!r}: cannot access ({reason})") from None
    if not stat.S_ISREG(mode):
        raise argparse.ArgumentTypeError(f"{value!r}: not a regular file (a directory, FIFO or device)")
    return Path(value)


# What each command of an extra (export, quantize) imports: checked before it touches the file system, because
# the export and calibration modules import these inside functions, where a missing one would surface mid-way as a
# traceback.
# onnxruntime comes from the `cpu`/`gpu` extra; export validation and the demo run graphs in it.
EXTRA_NEEDS = {
    "reference": ("torch", "transformers", "safetensors"),
    "export": ("torch", "transformers", "onnx", "onnxscript", "safetensors", "onnxruntime"),
    "demo": ("torch", "transformers", "onnx", "onnxscript", "safetensors", "onnxruntime"),
    "quantize": ("onnx", "onnx_ir", "onnxruntime"),  # onnxruntime's quantization tools (INT4: onnx-ir)
}
EXPORT_INSTALL = "pip install 'omniguard-edge[cpu,export]'"


def missing_extra(command: str) -> str | None:
    """None when every module `command` needs imports; otherwise one line saying which does not and what to
    install. The modules are really imported (a present but broken install counts as missing)."""
    import importlib

    for module in EXTRA_NEEDS[command]:
        try:
            importlib.import_module(module)
        except ImportError:
            reason = f"{module} is not installed"
        except Exception as exc:  # e.g. OSError from a torch build whose shared libraries do not load
            reason = f"{module} fails to import: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        else:
            continue
        if command == "quantize":
            return f"omniguard-edge quantize: needs the quantize extra ({reason}): pip install 'omniguard-edge[cpu,quantize]'"
        return f"omniguard-edge {command}: needs the export extra ({reason}): {EXPORT_INSTALL}"
    return None


def check_extra(command: str) -> int:
    """0 when the extra `command` needs is usable; else prints the one-line reason on stderr and returns 2."""
    message = missing_extra(command)
    if message is None:
        return 0
    print(message, file=sys.stderr)
    return EXIT_USAGE


def limit_args(p, prefix: str = "") -> None:
    """The limits, under the same names in plan, build-engines and moderate (runtime/plan.py DEFAULT_LIMITS)."""
    from .plan import DEFAULT_LIMITS as D

    p.add_argument("--max-prompt-tokens", type=int_in(1, 1 << 20),
                   help=f"{prefix}prompt tokens, media included (default {D['max_prompt_tokens']})")
    p.add_argument("--max-image-tokens", type=int_in(0, 1 << 20),
                   help=f"{prefix}image and video tokens per request, after merging (default {D['max_image_tokens']})")
    p.add_argument("--max-audio-seconds", type=float, help=f"{prefix}default {D['max_audio_seconds']:g}")
    p.add_argument("--new-tokens", type=int_in(1, 1 << 20),
                   help=f"{prefix}tokens an answer may take (default {D['new_tokens']}; 256 for --mode full)")


LIMITS = ("max_prompt_tokens", "max_image_tokens", "max_audio_seconds", "new_tokens")


def limits_of(args) -> dict:
    return {k: getattr(args, k) for k in LIMITS if getattr(args, k, None) is not None}


