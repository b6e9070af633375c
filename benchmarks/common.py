"""Shared helpers for the benchmark scripts: data location, machine facts, interleaved timing, memory, JSON.

The machines these run on are shared, so every script times its baseline and rolevec *alternately in one
process* (the order rotates each round), repeats, and reports the best and the median of each; ratios
are taken from the best times, and the medians' ratio is printed beside them. CPU time is recorded with
wall time: a run whose CPU/wall utilisation is far below the thread count was competing for the cores.

Peak memory is the kernel's high-water mark of resident memory (``VmHWM``), reset before each run via
``/proc/self/clear_refs`` where Linux allows it, so each phase gets its own peak even inside one process.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
DATA_CANDIDATES = (
    REPO.parent / "shared" / "data" / "role-vectors-paper",
    REPO / "shared" / "data" / "role-vectors-paper",
)
DTYPE_NAMES = ("float32", "bfloat16")


# --- arguments and set-up --------------------------------------------------------------------------


def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="small sizes (each script under 2 minutes)")
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default="float32", help="rolevec's model dtype")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads, pinned (default 1: stable on shared cores)"
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds per method (default 3)")
    parser.add_argument(
        "--data", default=None, help="the paper's data folder (default: ../shared/data/role-vectors-paper)"
    )
    parser.add_argument("--results", default=str(RESULTS), help="folder for the JSON results")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or mps")
    parser.add_argument(
        "--model",
        default=None,
        help="a model folder, .gguf file or hub id (default: the embedded SmolLM2-135M-Instruct), or "
        f"random:SHAPE for random weights of a published shape ({', '.join(RANDOM_SHAPES)}): speed only",
    )
    parser.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer folder for random:SHAPE models (default: the embedded model's tokenizer)",
    )
    parser.add_argument("--no-write", action="store_true", help="print only; write no JSON")
    return parser


def find_data(arg: str | None) -> Path:
    """The paper's data folder, or exit with a message saying where it was looked for."""
    env = os.environ.get("ROLEVEC_PAPER_DATA")
    candidates = [Path(arg)] if arg else ([Path(env)] if env else list(DATA_CANDIDATES))
    for path in candidates:
        if (path / "mmlu_domains").is_dir() and (path / "roles").is_dir() and (path / "base").is_dir():
            return path.resolve()
    tried = ", ".join(str(p) for p in candidates)
    sys.exit(
        f"benchmark: error: the paper's data (mmlu_domains/, roles/, base/) was not found in {tried}; "
        "pass --data DIR or set ROLEVEC_PAPER_DATA"
    )


# Published decoder shapes (Llama architecture), for speed figures where the weights cannot be fetched:
# the cost of a forward does not depend on the weights' values. The tokenizer is the embedded model's
# (49,152 ids, all inside each shape's vocabulary), so prompts are the same tokens for every shape.
RANDOM_SHAPES: dict[str, dict[str, Any]] = {
    "smollm2-135m": {
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "vocab_size": 49152,
        "tie_word_embeddings": True,
        "rope_theta": 100000.0,
    },
    "llama-3.2-1b": {
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "vocab_size": 128256,
        "tie_word_embeddings": True,
        "rope_theta": 500000.0,
    },
    "llama-3.1-8b": {
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "vocab_size": 128256,
        "tie_word_embeddings": False,
        "rope_theta": 500000.0,
    },
}


def pin_threads(n: int) -> int:
    if n < 1:
        sys.exit(f"benchmark: error: --threads must be at least 1, not {n}")
    torch.set_num_threads(n)
    got = torch.get_num_threads()
    print(f"torch threads: {got} (pinned)")
    return got


def _lscpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="ignore").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _cpu_flags() -> list[str]:
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="ignore")
    except OSError:
        return []
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
            break
    return sorted(f for f in flags if f.startswith(("amx", "avx512_bf16", "avx512f", "avx2")))


def machine_info(threads: int, dtype: str, device: str = "cpu", model: str | None = None) -> dict[str, Any]:
    import transformers

    return {
        "device": device,
        "model": model_label(model),
        "cpu": _lscpu_model(),
        "cores": os.cpu_count(),
        "cpu_flags": _cpu_flags(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "threads": threads,
        "dtype": dtype,
        "load_average_at_start": list(os.getloadavg()),
    }


class Bench:
    """One benchmark run: pinned threads, the machine, the result skeleton and the memory marks."""

    def __init__(
        self, args: argparse.Namespace, name: str, *, repeats: int = 3, quick_repeats: int | None = None
    ) -> None:
        """``repeats``/``quick_repeats``: the rounds when ``--repeats`` is not given (default/quick sizes)."""
        self.args = args
        self.name = name
        threads = pin_threads(args.threads)
        if args.repeats is None:
            args.repeats = quick_repeats if args.quick and quick_repeats is not None else repeats
        if args.repeats < 1:
            sys.exit("benchmark: error: --repeats must be at least 1")
        info = machine_info(threads, args.dtype, args.device, args.model)
        where = f"{info['gpu']} ({args.device}), " if args.device != "cpu" else ""
        print(
            f"{name}: {info['model']}, {where}{info['cpu']}, {info['cores']} cores, torch {info['torch']}, "
            f"{threads} thread(s), "
            f"dtype {args.dtype}, {'quick' if args.quick else 'default'} size, {args.repeats} round(s); "
            f"load average {info['load_average_at_start'][0]:.2f}",
            flush=True,
        )
        self.data: dict[str, Any] = {
            "benchmark": name,
            "size": "quick" if args.quick else "default",
            "repeats": args.repeats,
            "machine": info,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        self.peaks: dict[str, float] = {}
        self.gpu_peak = 0.0

    def mark(self, label: str) -> None:
        """Record the peak RSS since the last reset under ``label`` (e.g. after loading the model)."""
        self.peaks[label] = max(self.peaks.get(label, 0.0), peak_mb())

    def add_timings(self, timings: dict[str, Timing]) -> None:
        for t in timings.values():
            self.peaks[t.name] = max(self.peaks.get(t.name, 0.0), t.peak)
            self.gpu_peak = max([self.gpu_peak, *t.gpu_peak_mb])

    def finish(self, table: str) -> None:
        """Print the table and the benchmark's peak memory; write the JSON unless ``--no-write``."""
        self.mark("end")
        self.data["peak_rss_mb"] = round(max(self.peaks.values()), 1)
        self.data["peak_rss_by_phase_mb"] = {k: round(v, 1) for k, v in self.peaks.items()}
        if torch.cuda.is_available() and self.args.device != "cpu":
            current = torch.cuda.max_memory_allocated() / 2**20  # since the last timed run's reset
            self.data["peak_gpu_mb"] = round(max(self.gpu_peak, current), 1)
        self.data["table_markdown"] = table
        print()
        print(table)
        gpu = f", peak GPU memory {self.data['peak_gpu_mb']:.0f} MiB" if "peak_gpu_mb" in self.data else ""
        print(f"\npeak RSS of this benchmark: {self.data['peak_rss_mb']:.0f} MiB{gpu}", flush=True)
        if not self.args.no_write:
            path = write_json(result_path(self.args, self.name), self.data)
            print(f"wrote {path}")


def model_label(model: str | None) -> str:
    if model is None:
        return "SmolLM2-135M-Instruct (embedded)"
    if model.startswith("random:"):
        return f"{model.removeprefix('random:')} shape, random weights"
    return model


def load(dtype: str, args: argparse.Namespace) -> Any:
    """The model of ``--model`` (default: the embedded SmolLM2-135M-Instruct) on ``--device`` in ``dtype``."""
    from rolevec.errors import RolevecError
    from rolevec.model.loading import load_model

    try:
        if args.model is not None and args.model.startswith("random:"):
            return random_model(args.model.removeprefix("random:"), args.tokenizer, args.device, dtype)
        return load_model(args.model, device=args.device, dtype=dtype)
    except RolevecError as exc:
        sys.exit(f"benchmark: error: {exc}")


def random_model(shape: str, tokenizer: str | None, device: str, dtype: str) -> Any:
    """A Llama-architecture model of a published shape with seeded random weights, built on ``device``.

    Raises ``RolevecError`` for an unknown shape, tokenizer folder, device or dtype."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from rolevec.errors import RolevecError
    from rolevec.model.loading import (
        ModelAdapter,
        _load_tokenizer,
        embedded_model_file,
        resolve_device,
        resolve_dtype,
    )

    if shape not in RANDOM_SHAPES:
        raise RolevecError(
            f"unknown shape {shape!r} in --model random:SHAPE; pick from {', '.join(RANDOM_SHAPES)}"
        )
    if tokenizer is None:
        gguf = embedded_model_file()
        tok = _load_tokenizer(str(gguf.parent), gguf.name, False)
    else:
        try:
            tok = AutoTokenizer.from_pretrained(tokenizer)
        except (OSError, ValueError) as exc:
            raise RolevecError(
                f"no tokenizer in {tokenizer!r}: pass a folder saved by save_pretrained"
            ) from exc
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    config = LlamaConfig(
        **RANDOM_SHAPES[shape],
        rms_norm_eps=1e-5,
        max_position_embeddings=8192,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
    )
    torch.manual_seed(0)
    with torch.device(dev):  # drawn in float32, then cast: every dtype gets the same weights
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).to(torch_dtype)
    name = f"random:{shape}"
    source = {
        "model": name,
        "path": "",
        "gguf_file": "",
        "dtype": str(torch_dtype).removeprefix("torch."),
        "device": str(dev),
    }
    return ModelAdapter(model, tok, name=name, source=source)


# --- memory ----------------------------------------------------------------------------------------


def _status_kb(field_name: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text(encoding="utf-8").splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def rss_mb() -> float:
    kb = _status_kb("VmRSS")
    return (kb or 0) / 1024


def reset_peak() -> bool:
    """Reset the resident high-water mark to the current RSS (Linux ``clear_refs`` 5); False if denied."""
    try:
        Path("/proc/self/clear_refs").write_text("5", encoding="utf-8")
        return True
    except OSError:
        return False


def peak_mb() -> float:
    kb = _status_kb("VmHWM")
    if kb is None:  # not Linux: the process-wide maximum (KB on Linux, bytes on macOS)
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        if sys.platform == "darwin":
            kb //= 1024
    return kb / 1024


# --- timing ----------------------------------------------------------------------------------------


@dataclass
class Timing:
    """Every timed run of one method: wall and CPU seconds, peak and starting RSS (MiB)."""

    name: str
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    peak_mb: list[float] = field(default_factory=list)
    start_mb: list[float] = field(default_factory=list)
    gpu_peak_mb: list[float] = field(default_factory=list)
    result: Any = None

    @property
    def best(self) -> float:
        return min(self.wall)

    @property
    def median(self) -> float:
        return statistics.median(self.wall)

    @property
    def peak(self) -> float:
        return max(self.peak_mb)

    @property
    def extra_mb(self) -> float:
        """The largest rise of RSS above where a run started (what the method itself allocated)."""
        return max(p - s for p, s in zip(self.peak_mb, self.start_mb, strict=True))

    def to_json(self) -> dict[str, Any]:
        return {
            "wall_s": [round(x, 4) for x in self.wall],
            "cpu_s": [round(x, 4) for x in self.cpu],
            "best_s": round(self.best, 4),
            "median_s": round(self.median, 4),
            "cpu_utilisation": round(sum(self.cpu) / max(1e-9, sum(self.wall)), 3),
            "peak_rss_mb": round(self.peak, 1),
            "extra_rss_mb": round(self.extra_mb, 1),
            **({"peak_gpu_mb": round(max(self.gpu_peak_mb), 1)} if self.gpu_peak_mb else {}),
        }


def _on_gpu() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_initialized()


def timed(timing: Timing, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` once; on a GPU the clock stops after the device has finished (``synchronize``)."""
    reset_peak()
    start_rss = rss_mb()
    gpu = _on_gpu()
    if gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    c0, t0 = time.process_time(), time.perf_counter()
    result = fn()
    if gpu:
        torch.cuda.synchronize()
        timing.gpu_peak_mb.append(torch.cuda.max_memory_allocated() / 2**20)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    timing.wall.append(wall)
    timing.cpu.append(cpu)
    timing.peak_mb.append(peak_mb())
    timing.start_mb.append(start_rss)
    timing.result = result
    return result


def interleaved(
    methods: dict[str, Callable[[], Any]],
    repeats: int,
    *,
    warmup: dict[str, Callable[[], Any]] | None = None,
    log: bool = True,
) -> dict[str, Timing]:
    """Run the methods in alternation, ``repeats`` rounds, rotating the order each round.

    ``warmup`` functions (e.g. the same method on a few items) run once, untimed, before the first round:
    lazy imports, the allocator's first growth and one-time probes are not part of any timing.
    """
    names = list(methods)
    timings = {n: Timing(n) for n in names}
    for fn in (warmup or {}).values():
        fn()
    for r in range(repeats):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            timed(timings[n], methods[n])
            if log:
                t = timings[n]
                print(
                    f"  round {r + 1}/{repeats} {n}: {t.wall[-1]:.2f} s "
                    f"(cpu {t.cpu[-1] / max(t.wall[-1], 1e-9):.2f}x wall, peak {t.peak_mb[-1]:.0f} MiB)",
                    flush=True,
                )
    return timings


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def verdict(value: float, target: float, *, at_least: bool) -> str:
    ok = value >= target if at_least else value <= target
    return "met" if ok else "MISSED"


# --- output ----------------------------------------------------------------------------------------


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(x: Any) -> str:
        if isinstance(x, float):
            return f"{x:.3g}" if abs(x) < 100 else f"{x:,.0f}"
        return str(x)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


def run_tag(device: str, model: str | None) -> str:
    """File-name tag of a device and model other than the CPU and the embedded model ('' for those)."""
    parts = [] if device == "cpu" else [device.replace(":", "")]
    if model is not None:
        parts.append(model.removeprefix("random:").rstrip("/").rsplit("/", 1)[-1].removesuffix(".gguf"))
    return "".join(f"-{p}" for p in parts)


def result_path(args: argparse.Namespace, name: str) -> Path:
    suffix = "-quick" if args.quick else ""
    return Path(args.results) / f"{name}-{args.dtype}{run_tag(args.device, args.model)}{suffix}.json"


def write_json(path: Path, data: dict[str, Any]) -> Path:
    """Write atomically (temporary file, then rename), so a killed run leaves no half file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=1, ensure_ascii=False, default=str)
            fh.write("\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# --- questions and the straightforward baseline ----------------------------------------------------


def load_questions(data: Path, per_domain: int, domains: Sequence[str] | None = None) -> list[Any]:
    """The first ``per_domain`` questions of each domain file, domains in alphabetical order."""
    from rolevec.data.mcq import load_mcq

    mcq = load_mcq(data / "mmlu_domains", list(domains) if domains else None)
    return [it for d in sorted(mcq.items) for it in mcq.items[d][:per_domain]]


class NaiveScorer:
    """What a user writes without rolevec: chat template, tokenizer padding, ``model(...).logits``.

    Batches of ``batch_size`` in the given order (no sorting), full-vocabulary logits at every position,
    then the four letter logits at each row's last real token (right padding, so positions stay right).
    """

    def __init__(self, adapter: Any, batch_size: int = 8) -> None:
        from rolevec.evaluation.scoring import PromptFormat

        self.adapter = adapter
        self.model = adapter.model
        self.tokenizer = adapter.tokenizer
        self.batch_size = batch_size
        self.format = PromptFormat()
        probe = self.text(PromptFormat().template)
        self.letter_ids = torch.tensor(adapter.letter_token_ids(probe), device=adapter.device)

    def text(self, user: str, system: str | None = None) -> str:
        messages = [{"role": "user", "content": user}]
        if system is not None:
            messages.insert(0, {"role": "system", "content": system})
        return str(self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))

    def predict(self, items: Sequence[Any]) -> list[str]:
        texts = [self.text(self.format.user_text(it)) for it in items]
        preds: list[str] = []
        add_special = self.adapter.chat.add_special_tokens
        for i in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(
                texts[i : i + self.batch_size],
                return_tensors="pt",
                padding=True,
                padding_side="right",
                add_special_tokens=add_special,
            ).to(self.model.device)
            with torch.inference_mode():
                # use_cache=False: a cache nobody reads would only slow the baseline (1-5%, measured)
                logits = self.model(
                    input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], use_cache=False
                ).logits
            last = enc["attention_mask"].sum(dim=1) - 1
            letters = logits[torch.arange(logits.shape[0]), last][:, self.letter_ids]
            preds += ["ABCD"[int(j)] for j in letters.argmax(dim=-1)]
        return preds


def cross_verdict(agree: float, met: str = "") -> str:
    """Rows against the float32 loop from another dtype: the targets ask for the same predictions, so a
    ratio there is information, not a verdict, unless every prediction agrees (then ``met`` stands)."""
    if agree == 1.0:
        return f"{met} (same predictions)".strip()
    return f"no verdict (predictions differ: agreement {agree:.1%})"


def agreement(a: Sequence[str], b: Sequence[str]) -> float:
    if len(a) != len(b):
        raise ValueError("prediction lists differ in length")
    return sum(x == y for x, y in zip(a, b, strict=True)) / max(1, len(a))


def accuracy(items: Sequence[Any], preds: Sequence[str]) -> float:
    return sum(it.answer == p for it, p in zip(items, preds, strict=True)) / max(1, len(items))
