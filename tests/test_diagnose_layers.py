"""Diagnostics at every layer: the multi-layer read, `diagnose_layers` and `rolevec diagnose`.

The reads are checked against the one-layer reader (which must agree bit for bit: same batches, same
forward up to the layer) and against a hooked full forward of one prompt at a time, independent of the
batching and padding the library does.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from rolevec.cli import diagnose as diagnose_cli
from rolevec.cli import main
from rolevec.data.sources import load_base, load_role_prompts
from rolevec.errors import RolevecError
from rolevec.model.hooks import count_hooks, hooked, input_hook
from rolevec.model.loading import ModelAdapter, load_model
from rolevec.model.testing import make_adapter
from rolevec.vectors import diagnostics as diag
from rolevec.vectors.diagnostics import (
    Diagnostics,
    best_layer,
    diagnose,
    diagnose_layer_activations,
    diagnose_layers,
    layer_activations,
    site_activations,
)
from rolevec.vectors.extraction import encode_prompts, mean_activations
from tiny_folder import fail_forwards

ROLE = ["Explain how a cell divides.", "What is a contract?", "Describe the sea at night, slowly.", "Hi"]
BASE = ["Tell me a story.", "Why is the sky blue?", "List three fruits.", "ok", "What time is it?"]
SMALL: dict[str, Any] = {"folds": 3, "bootstraps": 4, "n_random": 6, "shuffles": 3, "seed": 2}


def by_hand(adapter: ModelAdapter, prompt: str, layers: list[int], position: int) -> torch.Tensor:
    """``[len(layers), hidden]``: a full forward of one prompt, its rows read by hooks at each layer."""
    ids = encode_prompts(adapter, [prompt]).ids[0]
    seen: dict[int, torch.Tensor] = {}

    def grab(layer: int) -> Any:
        def fn(hidden: torch.Tensor) -> None:
            seen[layer] = hidden[0, len(ids) + position].detach().double().clone()

        return fn

    x = torch.tensor([ids])
    pre = [(adapter.residual_site(layer), input_hook(grab(layer))) for layer in layers]
    with torch.no_grad(), hooked(pre=pre):
        adapter.model(input_ids=x, attention_mask=torch.ones_like(x))
    return torch.stack([seen[layer] for layer in layers])


def test_one_forward_reads_every_layer_as_the_one_layer_reader_and_a_hooked_forward(
    tiny_llama: ModelAdapter,
) -> None:
    top = tiny_llama.n_layers  # the final norm's input
    layers = [top, 0, 1, 2]  # any order, layer 0 and the last included
    for position in (-1, tiny_llama.chat.positions[0]):
        acts = layer_activations(tiny_llama, ROLE, layers, position, batch_size=3)
        assert acts.shape == (len(layers), len(ROLE), tiny_llama.hidden_size)
        assert acts.dtype == torch.float32  # stored as float32: half of float64's memory
        for slot, layer in enumerate(layers):
            one = site_activations(tiny_llama, ROLE, layer, position, batch_size=3)
            assert one.dtype == torch.float64
            assert torch.equal(acts[slot].double(), one)  # a float32 model's rows lose nothing
        for i, prompt in enumerate(ROLE):
            want = by_hand(tiny_llama, prompt, layers, position)
            torch.testing.assert_close(acts[:, i].double(), want, rtol=1e-5, atol=1e-5)
    wide = layer_activations(tiny_llama, ROLE, [1, 2], -1, batch_size=2, dtype=torch.float64)
    assert wide.dtype == torch.float64
    torch.testing.assert_close(wide, layer_activations(tiny_llama, ROLE, [1, 2], -1, batch_size=4).double())
    assert count_hooks(tiny_llama.model) == 0


def test_the_mean_of_the_reads_is_what_extraction_averages(tiny_llama: ModelAdapter) -> None:
    mean = mean_activations(tiny_llama, BASE, progress=False, batch_size=2)
    layers = list(range(1, tiny_llama.n_layers + 1))
    acts = layer_activations(tiny_llama, BASE, layers, -1)
    for slot, layer in enumerate(layers):
        torch.testing.assert_close(acts[slot].double().mean(0), mean[-1, layer], rtol=1e-6, atol=1e-6)


def _completed(adapter: ModelAdapter, layers: list[int], batch_size: int) -> dict[str, int]:
    """How many times each block (and the final norm, and the LM head) ran to its end during a read."""
    done: dict[str, int] = {}

    def counter(name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            done[name] = done.get(name, 0) + 1

        return hook

    modules = {f"block{i}": b for i, b in enumerate(adapter.blocks)}
    modules |= {"final_norm": adapter.final_norm, "lm_head": adapter.model.get_output_embeddings()}
    with hooked(post=[(m, counter(name)) for name, m in modules.items()]):
        layer_activations(adapter, ROLE, layers, -1, batch_size=batch_size)
    return done


def test_the_forward_stops_after_the_highest_layer(tiny_llama: ModelAdapter) -> None:
    batches = 2  # 4 prompts, 2 per forward
    assert tiny_llama.n_layers == 3
    assert _completed(tiny_llama, [2, 1], 2) == {"block0": batches, "block1": batches}
    assert _completed(tiny_llama, [1], 2) == {"block0": batches}
    every = _completed(tiny_llama, [1, 3], 2)  # 3: the final norm's input, so every block runs
    assert every == {"block0": batches, "block1": batches, "block2": batches}
    assert count_hooks(tiny_llama.model) == 0


def test_bad_reads_are_refused_and_leave_no_hook(monkeypatch: pytest.MonkeyPatch) -> None:
    adapter = make_adapter("llama")
    with pytest.raises(RolevecError, match="out of range"):
        layer_activations(adapter, ROLE, [1, 99], -1)
    with pytest.raises(RolevecError, match="twice"):
        layer_activations(adapter, ROLE, [1, 1], -1)
    with pytest.raises(RolevecError, match="no layers"):
        layer_activations(adapter, ROLE, [], -1)
    with pytest.raises(RolevecError, match="`position`"):
        layer_activations(adapter, ROLE, [1], 4)
    fail_forwards(monkeypatch, adapter)
    with pytest.raises(IndexError):
        layer_activations(adapter, ROLE, [1, 2], -1)
    assert count_hooks(adapter.model) == 0


def test_diagnose_layers_equals_diagnose_at_each_layer_reading_each_set_once(
    tiny_llama: ModelAdapter, monkeypatch: pytest.MonkeyPatch
) -> None:
    reads: list[int] = []
    real = diag.layer_activations

    def counted(*args: Any, **kwargs: Any) -> torch.Tensor:
        reads.append(len(args[1]))
        return real(*args, **kwargs)

    monkeypatch.setattr(diag, "layer_activations", counted)
    layers = [1, 2, tiny_llama.n_layers]
    got = diagnose_layers(tiny_llama, ROLE, BASE, layers, -1, batch_size=2, **SMALL)
    assert reads == [len(ROLE), len(BASE)]  # one read of each set for all the layers
    monkeypatch.undo()
    assert list(got) == layers
    for layer in layers:
        want = diagnose(tiny_llama, ROLE, BASE, layer, -1, batch_size=2, **SMALL)
        assert got[layer] == want  # every field, exactly: same reads, same seed per layer
    assert got[1].consistency != got[2].consistency  # the layers are not one copied result
    with pytest.raises(RolevecError, match="layer 0"):
        diagnose_layers(tiny_llama, ROLE, BASE, [0, 1], -1, **SMALL)
    assert count_hooks(tiny_llama.model) == 0


def test_a_layer_with_a_planted_direction_is_trusted_and_the_noise_layer_is_not() -> None:
    gen = torch.Generator().manual_seed(0)
    n, h = 40, 32
    base = torch.randn(2, n, h, generator=gen)
    role = torch.randn(2, n, h, generator=gen)
    role[1, :, 0] += 4.0  # layer 5 carries a role direction, layer 4 is noise
    got = diagnose_layer_activations(role, base, [4, 5], -1)
    assert got[5].flagged == () and got[4].flagged == diag.CHECKED
    assert best_layer(got) == 5
    for layer in (4, 5):
        assert got[layer] == diag.diagnose_activations(
            role[layer - 4], base[layer - 4], layer=layer, position=-1
        )
    with pytest.raises(RolevecError, match="layer_activations"):
        diagnose_layer_activations(role, base, [4], -1)
    with pytest.raises(RolevecError, match="layer 0"):
        diagnose_layer_activations(role, base, [0, 5], -1)


def test_best_layer_breaks_a_saturated_separation_by_consistency() -> None:
    def fake(layer: int, separation: float, consistency: float) -> Diagnostics:
        zero = dict.fromkeys(diag.CHECKED, 0.0)
        return Diagnostics(layer, -1, 4, 4, consistency, separation, 0.5, 0.5, 1.0, zero, (), 2, 2, 2, 0,
                           zero, 2)  # fmt: skip

    assert best_layer({1: fake(1, 1.0, 0.2), 2: fake(2, 1.0, 0.6), 3: fake(3, 0.9, 0.9)}) == 2
    assert best_layer({4: fake(4, 1.0, 0.5), 2: fake(2, 1.0, 0.5)}) == 2
    with pytest.raises(RolevecError):
        best_layer({})


# --- the command ---------------------------------------------------------------------------------------

DOCTOR = ["Treat a fever.", "Explain blood pressure.", "What is an antibiotic?", "Describe a vaccine."]
PIRATE = ["Hoist the sail.", "Find the treasure.", "Swab the deck.", "Sing a shanty."]
ROLE_FILES = {
    "doctor": [*DOCTOR, "How do lungs work?", "What is a pulse?"],
    "pirate": [*PIRATE, "Where is the map?", "Raise the flag."],
}
BASE_TEXT = (
    "Write a poem.\nName two animals.\nGive three tips for sleep.\nTranslate hello.\nTell me a joke.\n"
)
FLAGS = ["--folds", "3", "--bootstraps", "4", "--random", "6", "--shuffles", "3"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny llama saved as a model folder, two role prompt files and a base file."""
    root = tmp_path_factory.mktemp("diagnose")
    adapter = make_adapter("llama")
    model: Any = adapter.model  # transformers' save_pretrained is untyped
    model.save_pretrained(root / "model")
    adapter.tokenizer.save_pretrained(root / "model")
    (root / "roles").mkdir()
    for role, prompts in ROLE_FILES.items():
        (root / "roles" / f"{role}.json").write_text(json.dumps(prompts), encoding="utf-8")
    (root / "base.txt").write_text(BASE_TEXT, encoding="utf-8")
    return root


def diagnose_args(tiny_dir: Path, out: Path, *extra: str) -> list[str]:
    return [
        *["diagnose", "--model", str(tiny_dir / "model"), "--device", "cpu", "--roles", "doctor,pirate"],
        *["--roles-dir", str(tiny_dir / "roles"), "--base", str(tiny_dir / "base.txt"), "--n", "all"],
        *["--out", str(out), "--no-progress", *FLAGS, *extra],
    ]


def test_diagnose_writes_json_csv_figure_and_manifest_that_agree(
    tiny_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "diag"
    assert main(diagnose_args(tiny_dir, out, "--batch-size", "2")) == 0
    stdout = capsys.readouterr().out
    doc = json.loads((out / "diagnostics-layers.json").read_text(encoding="utf-8"))
    adapter = load_model(str(tiny_dir / "model"), device="cpu")
    layers = list(range(1, adapter.n_layers + 1))  # the default: every layer but 0
    assert doc["layers"] == layers and doc["position"] == -1
    assert doc["settings"] == {"folds": 3, "bootstraps": 4, "n_random": 6, "shuffles": 3, "seed": 0} | {
        "n_requested": None,
        "sampling_seed": 42,
    }
    assert doc["prompts"]["base"]["n"] == 5 and doc["prompts"]["roles"]["doctor"]["n"] == 6
    base = load_base(str(tiny_dir / "base.txt")).prompts
    settings = {k: v for k, v in doc["settings"].items() if k in SMALL}
    for role in ROLE_FILES:
        prompts = load_role_prompts(role, str(tiny_dir / "roles")).prompts
        want = diagnose_layers(adapter, prompts, base, layers, -1, batch_size=2, **settings)
        entry = doc["roles"][role]
        assert entry["layers"] == {str(la): d.to_json() for la, d in want.items()}
        assert entry["best_layer"] == best_layer(want)
        assert entry["trusted_layers"] == [la for la, d in want.items() if not d.flagged]
        trusted = ", ".join(map(str, entry["trusted_layers"])) or "-"
        line = next(ln for ln in stdout.splitlines() if ln.startswith(role))
        assert f"layer {entry['best_layer']} (" in line and trusted.split(",")[0] in line
    with (out / "diagnostics-layers.csv").open(encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(ROLE_FILES) * len(layers)
    for row in rows:
        d = doc["roles"][row["role"]]["layers"][row["layer"]]
        for name in diag.CHECKED:
            assert float(row[name]) == d[name]
            assert float(row[f"{name}_random95"]) == d["thresholds"][name]
            assert float(row[f"{name}_shuffled95"]) == d["shuffle_thresholds"][name]
        assert (row["flagged"].split(";") if row["flagged"] else []) == d["flagged"]
        assert (int(row["n_role"]), int(row["n_base"])) == (d["n_role"], d["n_base"])
    png = (out / "figures" / "diagnostics-layers.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
    manifest = json.loads((out / "manifest-diagnose.json").read_text(encoding="utf-8"))
    assert manifest["command"] == "diagnose" and manifest["layers"] == layers
    assert manifest["model"]["fingerprint"] == doc["model_fingerprint"] == adapter.fingerprint()


def test_the_command_defaults_are_the_library_defaults() -> None:
    for name in ("FOLDS", "BOOTSTRAPS", "RANDOM", "SHUFFLES"):
        assert getattr(diagnose_cli, f"DEFAULT_{name}") == getattr(diag, f"DEFAULT_{name}")


def test_diagnose_replaces_only_its_own_files_and_only_with_force(
    tiny_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "again"
    out.mkdir()
    (out / "notes.txt").write_text("mine", encoding="utf-8")
    assert main(diagnose_args(tiny_dir, out, "--layers", "1:3")) == 0
    before = {p: (out / p).read_bytes() for p in ("diagnostics-layers.json", "diagnostics-layers.csv")}
    capsys.readouterr()
    assert main(diagnose_args(tiny_dir, out, "--layers", "2")) == 2
    err = capsys.readouterr().err
    assert "--force" in err and "diagnostics-layers.json" in err
    assert {p: (out / p).read_bytes() for p in before} == before
    assert main(diagnose_args(tiny_dir, out, "--layers", "2:", "--force")) == 0
    doc = json.loads((out / "diagnostics-layers.json").read_text(encoding="utf-8"))
    assert doc["layers"] == [2, 3] and set(doc["roles"]["pirate"]["layers"]) == {"2", "3"}
    assert (out / "notes.txt").read_text(encoding="utf-8") == "mine"
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert written == sorted(["notes.txt", *diagnose_cli.OUTPUTS])


@pytest.mark.e2e
def test_diagnose_layers_on_the_embedded_model(embedded: ModelAdapter) -> None:
    role = load_role_prompts("doctor").prompts[:6]
    base = load_base().prompts[:6]
    layers = [5, 15, embedded.n_layers]
    got = diagnose_layers(embedded, role, base, layers, -1, batch_size=6, **SMALL)
    mean_role = mean_activations(embedded, role, progress=False, batch_size=6)[-1]
    mean_base = mean_activations(embedded, base, progress=False, batch_size=6)[-1]
    for layer in layers:
        # |d| at each layer is the norm of the vector extraction computes there
        assert got[layer].norm == pytest.approx(float((mean_role[layer] - mean_base[layer]).norm()), rel=1e-5)
    assert got[15] == diagnose(embedded, role, base, 15, -1, batch_size=6, **SMALL)
