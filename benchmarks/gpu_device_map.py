"""Device maps on a GPU: a random-weight Llama-shaped model split three ways must steer, extract and score
as the same model on one GPU. Prints one JSON object; exit status 1 when a check fails.

    python benchmarks/gpu_device_map.py [--device cuda] [--layers 16] [--hidden 1024] [--out FILE]

The splits (float32, TF32 off, so the GPU runs are comparable to the last bit):

* ``cpu_offload``: ``device_map="auto"`` with ``max_memory`` giving GPU 0 about half the weights; accelerate
  keeps the rest in CPU memory and streams it in per forward (everything computes on the GPU).
* ``disk_offload``: a map of our own with every other block, the final norm and the head on ``disk``.
* ``two_devices``: no offload, modules *computing* on two devices: the embeddings, the upper blocks and the
  head on the CPU, the lower blocks and the final norm on the GPU (accelerate's ``dispatch_model`` with
  the CPU as main device), so every residual crosses devices twice and the letter head reads the norm's
  output from the GPU and the head's rows on the CPU.

Each is compared with the whole model on the GPU: logits plain, under an addition and an ablation;
letter scores (baseline, add, ablate); role-vector extraction; rolevec's hooks all gone and accelerate's
all kept after every call; ``fold`` refused for the offloaded splits and checked for ``two_devices``.
``--device cpu`` runs the same script with the CPU standing in for the GPU (a check of the script only).
About a minute on one H200 at the default size.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

#: Relative tolerance per split: the same GPU kernels for the offloaded splits; CPU kernels for part of
#: the two-device split (float32 sums in another order).
TOLERANCE = {"cpu_offload": 1e-5, "disk_offload": 1e-5, "two_devices": 1e-4}
TEXTS = ["Explain how eigenvalues relate to stability.", "Hi", "What is the dose of amoxicillin?"]


def rel(want: torch.Tensor, got: torch.Tensor) -> float:
    want, got = want.detach().double().cpu(), got.detach().double().cpu()
    return float((want - got).abs().max() / want.abs().max().clamp_min(1e-30))


def hook_state(model: nn.Module) -> dict[str, tuple[int, int, int | None]]:
    return {
        name: (
            len(m._forward_hooks),
            len(m._forward_pre_hooks),
            id(m._hf_hook) if hasattr(m, "_hf_hook") else None,
        )
        for name, m in model.named_modules()
    }


def build(folder: Path, layers: int, hidden: int) -> Any:
    """A random Llama-shaped model and the test tokenizer, saved as a model folder (safetensors)."""
    import transformers as tf

    from rolevec.model.testing import make_tokenizer

    tokenizer = make_tokenizer()
    config = tf.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 11 // 4,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        num_key_value_heads=max(1, hidden // 256),
        max_position_embeddings=512,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():  # weights of a trained model's scale, so steering moves the logits visibly
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return config


def two_device_map(layers: int, gpu: int | str) -> dict[str, int | str]:
    low = {f"model.layers.{i}": gpu for i in range(layers // 2)}
    high = {f"model.layers.{i}": "cpu" for i in range(layers // 2, layers)}
    return {
        "model.embed_tokens": "cpu",
        "model.rotary_emb": "cpu",
        **low,
        **high,
        "model.norm": gpu,
        "lm_head": "cpu",
    }


def checks(reference: Any, split: Any, tolerance: float) -> dict[str, Any]:
    """Everything the split must reproduce, with its worst relative difference per kind."""
    from rolevec.data.mcq import MCQItem
    from rolevec.data.sources import PromptSet
    from rolevec.evaluation.conditions import Condition, score
    from rolevec.evaluation.scoring import LetterScorer
    from rolevec.model.hooks import count_hooks
    from rolevec.steering.interventions import Steering
    from rolevec.vectors.extraction import extract_role_vectors
    from rolevec.vectors.role_vectors import RoleVectors

    before = hook_state(split.model)
    out: dict[str, Any] = {}
    leaks: list[str] = []

    def clean(what: str) -> None:
        if count_hooks(split.model) or hook_state(split.model) != before:
            leaks.append(what)

    def logits(adapter: Any, steering: Steering | None) -> torch.Tensor:
        batch = adapter.encode([adapter.render(t) for t in TEXTS])
        with torch.inference_mode(), nullcontext() if steering is None else steering.apply(adapter):
            out: torch.Tensor = adapter.model(**batch.model_kwargs()).logits
        return out.float().cpu()

    gen = torch.Generator().manual_seed(1)
    vector = torch.randn(reference.hidden_size, generator=gen) * 4
    layer = reference.n_layers // 2 + 1  # the input of an upper block: offloaded or on the other device
    for name, steering in (
        ("plain", None),
        ("addition", Steering.addition(vector, layer=layer, alpha=3.0)),
        (
            "addition_every_site",
            Steering("add", {0: vector, 1: vector, reference.n_layers: vector}, alpha=1.0),
        ),
        ("ablation", Steering.ablation(vector, layer=layer)),
    ):
        out[f"logits_{name}"] = rel(logits(reference, steering), logits(split, steering))
        clean(name)

    shape = (reference.chat.n_positions, reference.n_layers + 1, reference.hidden_size)
    vectors = RoleVectors(
        role_means={"r": torch.randn(shape, generator=gen)},
        base_mean=torch.randn(shape, generator=gen),
        positions=tuple(reference.chat.positions),
        position_tokens=tuple(reference.chat.position_tokens()),
        metadata={"model": reference.name, "model_fingerprint": reference.fingerprint()},
    )
    questions = [
        MCQItem(f"math/{i}", "math", "Which is prime?" + " Think." * (i % 3), ("4", "6", "7", "9"), "C", "x")
        for i in range(12)
    ]
    worst = 0.0
    modes = set()
    for condition in (
        Condition("baseline"),
        Condition.make("add", role="r", layer=layer, position=-1, alpha=3.0),
        Condition.make("ablate", role="r", layer=layer, position=-1),
    ):
        want = score(reference, questions, condition, vectors=vectors, batch_size=4)
        scorer = LetterScorer(split)
        got = score(split, questions, condition, vectors=vectors, batch_size=4, scorer=scorer)
        modes.add(scorer.mode)
        worst = max(worst, rel(torch.tensor([r.logits for r in want]), torch.tensor([r.logits for r in got])))
        clean(f"score {condition.kind}")
    out["letter_scores"] = worst
    out["scorer_modes"] = sorted(modes)

    roles = {"doctor": PromptSet("doctor", ("Explain statins.", "What causes a fever?", "A rash."), "b")}
    base = PromptSet("base", ("Write a poem about the sea.", "Hi", "Compare supply and demand."), "b")
    want_v = extract_role_vectors(reference, roles, base, batch_size=2, progress=False)
    got_v = extract_role_vectors(split, roles, base, batch_size=2, progress=False)
    out["extraction"] = max(
        rel(want_v.base_mean, got_v.base_mean), rel(want_v.role_means["doctor"], got_v.role_means["doctor"])
    )
    clean("extraction")
    out["hooks_left"] = leaks
    out["accelerate_hooks"] = sum(1 for v in before.values() if v[2] is not None)
    numbers = [v for k, v in out.items() if isinstance(v, float)]
    out["ok"] = not leaks and max(numbers) <= tolerance and out["accelerate_hooks"] > 0
    return out


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    value = fn()
    return value, round(time.perf_counter() - start, 2)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--device", default="cuda", help="cuda or cuda:N (default), or cpu to check the script"
    )
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False

    from accelerate import dispatch_model
    from transformers import AutoModelForCausalLM

    from rolevec.model.loading import ModelAdapter, load_model
    from rolevec.steering.folding import fold, fold_problem
    from rolevec.steering.interventions import Steering

    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(json.dumps({"error": "no CUDA GPU visible: pass --device cpu to check the script"}))
        return 2
    gpu: int | str = (device.index or 0) if on_gpu else "cpu"
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if on_gpu else "cpu (stand-in for the GPU)",
        "torch": torch.__version__,
        "layers": args.layers,
        "hidden": args.hidden,
    }
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        _, report["build_s"] = timed(lambda: build(folder, args.layers, args.hidden))
        weights = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
        report["weights_bytes"] = weights
        reference = load_model(str(folder), device=str(device), progress=False)
        splits: dict[str, Callable[[], Any]] = {
            "cpu_offload": lambda: load_model(
                str(folder),
                device_map="auto",
                max_memory={gpu: weights // 2, "cpu": 8 * weights}
                if on_gpu
                else {"cpu": weights // 2, "disk": 8 * weights},
                offload_folder=Path(tmp) / "offload-auto",
                progress=False,
            ),
            "disk_offload": lambda: load_model(
                str(folder),
                device_map={
                    "model.embed_tokens": gpu,
                    "model.rotary_emb": gpu,
                    **{f"model.layers.{i}": "disk" if i % 2 else gpu for i in range(args.layers)},
                    "model.norm": "disk",
                    "lm_head": "disk",
                },
                offload_folder=Path(tmp) / "offload-disk",
                progress=False,
            ),
        }

        def two_devices() -> ModelAdapter:
            model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
            dispatch_model(model, two_device_map(args.layers, gpu), main_device="cpu", force_hooks=True)
            return ModelAdapter(model, reference.tokenizer, name=reference.name)

        splits["two_devices"] = two_devices
        failed = False
        for name, make in splits.items():
            adapter, load_s = timed(make)
            entry: dict[str, Any] = {
                "load_s": load_s,
                "offloaded": adapter.offloaded,
                "devices": [str(d) for d in adapter.devices],
                "placements": sorted({str(v) for v in (adapter.device_map or {}).values()}),
            }
            result, entry["check_s"] = timed(partial(checks, reference, adapter, TOLERANCE[name]))
            entry.update(result)
            steering = Steering.addition(torch.ones(reference.hidden_size), layer=2, alpha=1.0)
            problem = fold_problem(adapter, steering)
            if adapter.offloaded:
                entry["fold_refused"] = problem is not None and "offloaded" in problem
                entry["ok"] = entry["ok"] and entry["fold_refused"]
            else:
                folded = fold(adapter, steering)  # verify=True: raises above 1e-4 against hooked steering
                entry["fold"] = "verified against hooked steering"
                del folded
            failed |= not entry["ok"]
            report[name] = entry
            del adapter
            if on_gpu:
                torch.cuda.empty_cache()
    report["ok"] = not failed
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
