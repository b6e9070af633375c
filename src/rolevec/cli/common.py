"""Options shared by several subcommands, and the one place that turns them into a loaded model."""

from __future__ import annotations

import argparse
import re
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from ..model.loading import ModelAdapter


def add_model_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model",
        default=None,
        help="Hugging Face id, local folder or .gguf file (default: the embedded SmolLM2-135M-Instruct)",
    )
    group.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, mps or auto (default: auto)")
    group.add_argument(
        "--dtype",
        default="float32",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="weights dtype (auto: bfloat16 on GPUs and on CPUs with AMX/AVX512-BF16, else float32)",
    )
    group.add_argument(
        "--block-pattern",
        default=None,
        help="dotted path of the decoder-block ModuleList, for architectures rolevec cannot map itself",
    )
    group.add_argument(
        "--trust-remote-code", action="store_true", help="allow custom model code from the hub"
    )
    group.add_argument(
        "--device-map",
        default=None,
        metavar="MAP",
        help="spread a model over several devices: auto, balanced, balanced_low_0, sequential, or a JSON "
        'file of module -> device ({"model.layers.0": 0, "lm_head": "cpu", ...}; cuda:N, cpu, disk); '
        "leave --device at auto (docs/large-models.md)",
    )
    group.add_argument(
        "--max-memory",
        default=None,
        metavar="DEV=SIZE,...",
        help="memory per device for an automatic --device-map, e.g. 0=20GiB,1=20GiB,cpu=64GiB",
    )
    group.add_argument(
        "--offload-folder",
        default=None,
        metavar="DIR",
        help="where --device-map writes weights it puts on disk (not needed for safetensors checkpoints)",
    )


def load_from_args(args: argparse.Namespace, *, dtype: str | None = None) -> ModelAdapter:
    """The model the flags name; ``dtype`` overrides ``--dtype`` (a config file's choice, say)."""
    from ..model.loading import load_model, parse_max_memory

    max_memory = getattr(args, "max_memory", None)
    return load_model(
        args.model,
        device=args.device,
        dtype=dtype or args.dtype,
        block_pattern=args.block_pattern,
        trust_remote_code=args.trust_remote_code,
        progress=not getattr(args, "no_progress", False),
        device_map=getattr(args, "device_map", None),
        max_memory=None if max_memory is None else parse_max_memory(max_memory),
        offload_folder=getattr(args, "offload_folder", None),
    )


@contextmanager
def plain_warnings(parser: argparse.ArgumentParser | None = None) -> Iterator[None]:
    """Show library warnings as one ``rolevec: warning: ...`` line each, for the duration of a command,
    with the fields they name spelled as the flags of ``parser`` (the command's)."""

    def show(
        message: Warning | str,
        category: type[Warning],
        filename: str,
        lineno: int,
        file: TextIO | None = None,
        line: str | None = None,
    ) -> None:
        print(f"rolevec: warning: {to_flags(str(message), parser)}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.simplefilter("always", UserWarning)
        warnings.showwarning = show
        yield


def positive_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, not {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, not {value!r}")
    return n


def fraction(value: str) -> float:
    """A number strictly between 0 and 1 (a share of the questions)."""
    try:
        x = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, not {value!r}") from None
    if not 0.0 < x < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1 (exclusive), not {value!r}")
    return x


def check_out(path: str, force: bool, example: str | None = None) -> Path:
    """A file --out, before any work: not a folder, not an existing file without --force, writable."""
    from ..core.files import check_writable
    from ..errors import RolevecError

    out = Path(path).expanduser()
    if out.is_dir():
        such = f" such as {out / example}" if example else " for --out"
        raise RolevecError(f"--out {out} is a folder: pass a file name{such}")
    if out.exists() and not force:
        raise RolevecError(f"{out} already exists: pass --force to overwrite it, or choose another --out")
    check_writable(out)
    return out


def add_batch_args(group: Any) -> None:
    """``--batch-size`` and ``--max-tokens`` of the commands that read prompts (extract, rank, diagnose)."""
    group.add_argument("--batch-size", type=positive_int, default=16, help="prompts per forward (16)")
    group.add_argument(
        "--max-tokens",
        type=positive_int,
        default=None,
        help="longest prompt in tokens; longer user texts are shortened (default: the model's context)",
    )


def check_out_folder(path: str, force: bool, held: Callable[[Path], Sequence[str]]) -> Path:
    """A folder --out (or none yet), before any work: writable, its ``figures`` entry a folder if there is
    one, and holding none of the command's own files (``held(out)`` lists them) unless --force."""
    from ..core.files import check_writable
    from ..errors import RolevecError

    out = Path(path).expanduser()
    if out.exists() and not out.is_dir():
        raise RolevecError(f"--out {out} is a file: pass a folder")
    if (out / "figures").exists() and not (out / "figures").is_dir():
        raise RolevecError(f"{out / 'figures'} is a file: move it, or choose another --out")
    check_writable(out)
    found = list(held(out))
    if found and not force:
        shown = ", ".join(found[:4]) + (f" and {len(found) - 4} more" if len(found) > 4 else "")
        raise RolevecError(
            f"{out} already holds {shown}: pass --force to replace them, or choose another --out"
        )
    return out


def present(*names: str) -> Callable[[Path], list[str]]:
    """``held`` for :func:`check_out_folder`: which of these fixed output names a folder holds."""
    return lambda out: [name for name in names if (out / name).exists()]


@contextmanager
def as_flags(**flags: str) -> Iterator[None]:
    """Say which flag a library error is about: the library names fields (``layers``), users type flags.

    ``as_flags(layers="--layers")`` rewrites an error that starts with ``layers`` to start with
    ``--layers``; other errors pass through unchanged.
    """
    from ..errors import RolevecError

    try:
        yield
    except RolevecError as exc:
        text = str(exc)
        for field, flag in flags.items():
            if text == field or text.startswith(f"{field} "):
                raise RolevecError(flag + text[len(field) :]) from exc
        raise


#: Library fields whose flag is not the field's name with dashes (``run_dir`` is ``--out``; ``mcq`` is
#: ``--mcq``, whose alias ``--mcq-dir`` still works).
FIELD_FLAGS = {"mcq": "--mcq", "run_dir": "--out"}

_FIELD = re.compile(r"`([a-z][a-z0-9_]*)(?:=([^`]*))?`")


def field_flags(parser: argparse.ArgumentParser | None) -> dict[str, str]:
    """Field -> how this command spells it: a flag, or a positional argument's metavar (none without
    a parser)."""
    if parser is None:
        return {}
    spelled: dict[str, str] = {}
    for action in parser._actions:  # argparse has no public list of its actions
        if action.option_strings:
            long = [o for o in action.option_strings if o.startswith("--")] or action.option_strings
            spelled[action.dest] = long[0]
        elif isinstance(action.metavar, str):
            spelled[action.dest] = action.metavar
    flags = set(spelled.values())
    return {**{f: flag for f, flag in FIELD_FLAGS.items() if flag in flags}, **spelled}


def to_flags(text: str, parser: argparse.ArgumentParser | None = None) -> str:
    """A library message as the command line says it: a field in backticks becomes the flag.

    The library names an option the way a Python caller passes it, in backticks: run_dir, force=True,
    device=cpu. ``parser`` (the command's own) supplies the spelling, so run_dir reads ``--out`` in
    ``rolevec run`` and ``RUN_DIR`` in ``rolevec report``; force=True reads ``--force`` and device=cpu
    ``--device cpu``. A name the command has no option for is left as it is.
    """
    spelled = field_flags(parser)

    def flag(match: re.Match[str]) -> str:
        field, value = match[1], match[2]
        name = spelled.get(field)
        if name is None:  # not an option of this command, or quoted text such as a model type
            return match[0]
        return name if value in (None, "True") else f"{name} {value}"

    return _FIELD.sub(flag, text)
