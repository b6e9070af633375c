"""`--executor local|ray` and the Ray options of `rolevec run`, `rolevec sweep` and `rolevec evaluate`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import RolevecError
from .common import positive_int

if TYPE_CHECKING:
    from ..model.loading import ModelAdapter
    from ..study.executors import Executor

RAY_ONLY = ("address", "workers", "gpus_per_worker", "cpus_per_worker", "max_retries")


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a number of GPUs such as 1 or 0.5, not {text!r}"
        ) from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected 0 or more GPUs, not {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, not {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected 0 or more, not {text!r}")
    return value


def add_executor_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("execution (the sweep and test stages)")
    group.add_argument(
        "--executor",
        choices=["local", "ray"],
        default="local",
        help="local: this process (default); ray: shards over Ray workers that load the model once each",
    )
    group.add_argument(
        "--address",
        default=None,
        help="Ray cluster to join: auto or HOST:PORT (default: start a local Ray instance)",
    )
    group.add_argument(
        "--workers", type=positive_int, default=None, help="Ray workers (default: as the cluster allows)"
    )
    group.add_argument(
        "--gpus-per-worker", type=_non_negative_float, default=None, help="GPUs per Ray worker (default 0)"
    )
    group.add_argument(
        "--cpus-per-worker",
        type=positive_int,
        default=None,
        help="CPU cores and torch threads per Ray worker (default 1)",
    )
    group.add_argument(
        "--max-retries",
        type=_non_negative_int,
        default=None,
        help="reruns of a shard whose worker died before the run stops (default 3)",
    )


def _model_kwargs(args: argparse.Namespace, adapter: ModelAdapter) -> dict[str, Any]:
    """What each worker loads: the driver's model flags, with the dtype the driver resolved; a device-map
    file is read here, since workers need not share this machine's files."""
    import json

    from ..core.files import read_text
    from ..model.loading import parse_max_memory

    device_map: Any = getattr(args, "device_map", None)
    if device_map is not None and Path(device_map).suffix == ".json":
        try:
            device_map = json.loads(read_text(device_map, what="--device-map file"))
        except ValueError as exc:
            raise RolevecError(f"--device-map {device_map}: not valid JSON ({exc})") from None
    max_memory = getattr(args, "max_memory", None)
    return {
        "model": args.model,
        "dtype": str(adapter.dtype).replace("torch.", ""),
        "block_pattern": args.block_pattern,
        "trust_remote_code": args.trust_remote_code,
        "device_map": device_map,
        "max_memory": None if max_memory is None else parse_max_memory(max_memory),
        "offload_folder": getattr(args, "offload_folder", None),
    }


@contextmanager
def executor_from_args(args: argparse.Namespace, adapter: ModelAdapter) -> Iterator[Executor]:
    """The executor the flags name, started (Ray: joined or launched, workers loaded) and closed after."""
    from ..study.executors import LocalExecutor

    if args.executor == "local":
        given = [name for name in RAY_ONLY if getattr(args, name) is not None]
        if given:
            flags = ", ".join("--" + name.replace("_", "-") for name in given)
            raise RolevecError(f"{flags} apply to the Ray executor: add --executor ray, or drop them")
        yield LocalExecutor()
        return
    from ..study.distributed import RayExecutor

    with RayExecutor(
        _model_kwargs(args, adapter),
        address=args.address,
        workers=args.workers,
        gpus_per_worker=args.gpus_per_worker or 0.0,
        cpus_per_worker=args.cpus_per_worker or 1,
        max_retries=3 if args.max_retries is None else args.max_retries,
        log=lambda line: print(f"rolevec: {line}", file=sys.stderr),
    ) as executor:
        yield executor
