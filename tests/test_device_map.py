"""Models spread by a device map (issue 16): a tiny saved model with half its blocks offloaded to disk
steers, extracts and scores as the same model in memory, rolevec's hooks leave nothing behind while
accelerate's stay, and bad maps, budgets and folds are refused in one line."""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from rolevec.cli import main
from rolevec.data.sources import PromptSet
from rolevec.errors import RolevecError
from rolevec.evaluation.conditions import Condition, score
from rolevec.evaluation.scoring import ItemResult, LetterScorer, prepare, score_additions
from rolevec.model.hooks import count_hooks, hooked, input_hook
from rolevec.model.loading import (
    GGUF_NO_DISK,
    ModelAdapter,
    load_model,
    parse_max_memory,
    read_device_map,
)
from rolevec.model.testing import make_adapter
from rolevec.steering.folding import fold, fold_problem
from rolevec.steering.generation import generate
from rolevec.steering.interventions import Steering
from rolevec.vectors.extraction import extract_role_vectors
from test_evaluation import items, vectors_for

N_LAYERS = 4
#: Embeddings, the final norm, the head and two of four blocks on disk: every kind of module offloaded.
DISK_MAP: dict[str, int | str] = {
    "model.embed_tokens": "disk",
    "model.layers.0": "cpu",
    "model.layers.1": "disk",
    "model.layers.2": "disk",
    "model.layers.3": "cpu",
    "model.norm": "disk",
    "model.rotary_emb": "cpu",
    "lm_head": "disk",
}
TEXTS = ["Explain how eigenvalues relate to stability.", "Hi", "What is the dose of amoxicillin?"]
#: Relative difference allowed between the offloaded and the in-memory model (float32).
RTOL = 1e-5


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny") / "model"
    adapter = make_adapter("llama", n_layers=N_LAYERS)
    model: Any = adapter.model
    model.save_pretrained(str(folder))
    adapter.tokenizer.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def pair(saved: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[ModelAdapter, ModelAdapter]:
    """The model in memory, and the same checkpoint with DISK_MAP (offload folder given)."""
    offload = tmp_path_factory.mktemp("offload")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        memory = load_model(str(saved), device="cpu", progress=False)
        offloaded = load_model(str(saved), device_map=DISK_MAP, offload_folder=offload, progress=False)
    return memory, offloaded


def hook_state(model: nn.Module) -> dict[str, tuple[int, int, int | None, int | None]]:
    """Per module: torch forward hooks, pre-hooks, accelerate's hook object and the forward in its dict."""
    state = {}
    for name, module in model.named_modules():
        hf_hook = getattr(module, "_hf_hook", None)
        own = vars(module).get("forward")
        state[name] = (
            len(module._forward_hooks),
            len(module._forward_pre_hooks),
            None if hf_hook is None else id(hf_hook),
            None if own is None else id(own),
        )
    return state


@pytest.fixture
def untouched(pair: tuple[ModelAdapter, ModelAdapter]) -> Iterator[None]:
    """After the test: no rolevec hook, every accelerate hook and forward wrapper as it was, and the
    offloaded weights back off their modules (on meta)."""
    offloaded = pair[1].model
    before = hook_state(offloaded)
    meta = {n for n, p in offloaded.named_parameters() if p.device.type == "meta"}
    yield
    assert count_hooks(offloaded) == 0
    assert hook_state(offloaded) == before
    assert sum(1 for v in before.values() if v[2] is not None) > 0  # accelerate's hooks are there
    assert {n for n, p in offloaded.named_parameters() if p.device.type == "meta"} == meta


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference relative to the largest magnitude of the reference."""
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / a.abs().max().clamp_min(1e-30))


def logits(adapter: ModelAdapter, steering: Steering | None) -> torch.Tensor:
    batch = adapter.encode([adapter.render(t) for t in TEXTS])
    with torch.inference_mode():
        if steering is None:
            out: torch.Tensor = adapter.model(**batch.model_kwargs()).logits
        else:
            with steering.apply(adapter):
                out = adapter.model(**batch.model_kwargs()).logits
    return out.float()


def result_logits(results: list[ItemResult]) -> torch.Tensor:
    return torch.tensor([r.logits for r in sorted(results, key=lambda r: r.qid)])


# --- what the load gives -----------------------------------------------------------------------------


def test_the_map_offloads_what_it_says(pair: tuple[ModelAdapter, ModelAdapter]) -> None:
    memory, offloaded = pair
    assert offloaded.device_map == DISK_MAP and memory.device_map is None
    assert offloaded.offloaded and not memory.offloaded
    meta = {n.rsplit(".", 1)[0] for n, p in offloaded.model.named_parameters() if p.device.type == "meta"}
    assert (
        "model.layers.1.mlp.down_proj" in meta
        and "lm_head" in meta
        and "model.layers.0.mlp.down_proj" not in meta
    )
    assert offloaded.device == torch.device("cpu") and offloaded.devices == (torch.device("cpu"),)
    assert json.loads(offloaded.source["device_map"]) == DISK_MAP
    assert offloaded.fingerprint() == memory.fingerprint()
    assert offloaded.verify_writers() < 1e-5


# --- the same numbers, offloaded or not ----------------------------------------------------------------


@pytest.mark.usefixtures("untouched")
def test_addition_and_ablation_match_the_model_in_memory(pair: tuple[ModelAdapter, ModelAdapter]) -> None:
    memory, offloaded = pair
    vector = torch.randn(memory.hidden_size, generator=torch.Generator().manual_seed(1))
    worst = rel(logits(memory, None), logits(offloaded, None))
    for steering in (
        Steering.addition(vector, layer=2, alpha=4.0),  # at the input of a block on disk
        Steering("add", {0: vector, 3: vector, 4: vector}, alpha=2.0),  # block 0, a cpu block, the norm
        Steering.addition(vector, layer=1, alpha=3.0, tokens=[1, 2]),
        Steering.ablation(vector, layer=2),  # every block input and writer, on disk and in memory
    ):
        want, got = logits(memory, steering), logits(offloaded, steering)
        assert rel(want, logits(memory, None)) > 1e-3  # the steering does something
        worst = max(worst, rel(want, got))
        assert count_hooks(offloaded.model) == 0
    print(f"addition/ablation max relative difference {worst:.2e}")
    assert worst <= RTOL


def test_an_automatic_map_within_a_memory_budget_offloads_and_matches(
    saved: Path, pair: tuple[ModelAdapter, ModelAdapter], tmp_path: Path
) -> None:
    memory = pair[0]
    size = sum(p.numel() * p.element_size() for p in memory.model.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        auto = load_model(
            str(saved),
            device_map="auto",
            max_memory={"cpu": size // 2, "disk": 10 * size},
            offload_folder=tmp_path / "offload",
            progress=False,
        )
    placed = auto.device_map
    assert auto.offloaded and placed is not None and {"cpu", "disk"} <= set(placed.values())
    steering = Steering.addition(torch.randn(memory.hidden_size), layer=3, alpha=3.0)
    assert rel(logits(memory, steering), logits(auto, steering)) <= RTOL
    assert count_hooks(auto.model) == 0


@pytest.mark.usefixtures("untouched")
def test_extraction_matches_the_model_in_memory(pair: tuple[ModelAdapter, ModelAdapter]) -> None:
    memory, offloaded = pair
    roles = {
        "doctor": PromptSet(
            "doctor", ("What is the dose of amoxicillin?", "Explain statins.", "A rash."), "t"
        ),
        "lawyer": PromptSet("lawyer", ("Draft a liability clause.", "What is indemnity?"), "t"),
    }
    base = PromptSet("base", ("Write a poem about the sea.", "Hi", "Compare supply and demand."), "t")
    want = extract_role_vectors(memory, roles, base, batch_size=2, progress=False)
    got = extract_role_vectors(offloaded, roles, base, batch_size=2, progress=False)
    worst = rel(want.base_mean, got.base_mean)
    for role in roles:
        worst = max(worst, rel(want.role_means[role], got.role_means[role]))
    print(f"extraction max relative difference {worst:.2e}")
    assert worst <= RTOL
    assert got.metadata["model_fingerprint"] == want.metadata["model_fingerprint"]


@pytest.mark.usefixtures("untouched")
def test_letter_scoring_matches_the_model_in_memory(pair: tuple[ModelAdapter, ModelAdapter]) -> None:
    memory, offloaded = pair
    vectors = vectors_for(memory, ("mathematician",))
    questions = items(7)
    worst = 0.0
    for condition in (
        Condition("baseline"),
        Condition.make("persona", role="mathematician"),
        Condition.make("add", role="mathematician", layer=2, position=-1, alpha=3.0),
        Condition.make("ablate", role="mathematician", layer=3, position=-1),
    ):
        scorer = LetterScorer(offloaded)  # the fast head reads four rows of the offloaded lm_head
        want = score(memory, questions, condition, vectors=vectors, batch_size=3)
        got = score(offloaded, questions, condition, vectors=vectors, batch_size=3, scorer=scorer)
        assert scorer.mode == "fast"  # its parity probe against model(...).logits passed
        assert [r.pred for r in got] == [r.pred for r in want]
        worst = max(worst, rel(result_logits(want), result_logits(got)))
        assert count_hooks(offloaded.model) == 0
    print(f"letter scoring max relative difference {worst:.2e}")
    assert worst <= RTOL


@pytest.mark.usefixtures("untouched")
def test_resumed_additions_skip_offloaded_blocks_and_match(pair: tuple[ModelAdapter, ModelAdapter]) -> None:
    """The sweep's resumed scorer sets aside the blocks' forwards (accelerate's wrappers, here) and puts
    them back; its results equal the same additions on the model in memory."""
    memory, offloaded = pair
    vectors = vectors_for(memory, ("r",))
    runs = []
    for adapter in (memory, offloaded):
        prepared, _ = prepare(adapter, items(7))
        qids = {p.item.qid for p in prepared}
        todo = {
            (layer, alpha): (
                Steering.addition(vectors.vector("r", layer, -1), layer=layer, alpha=alpha),
                qids,
            )
            for layer in (1, 3)
            for alpha in (1.0, 3.0)
        }
        got: dict[Any, list[ItemResult]] = {}
        score_additions(
            adapter,
            prepared,
            todo,
            LetterScorer(adapter),
            lambda key, results: got.setdefault(key, []).extend(results),  # noqa: B023
            batch_size=3,
        )
        runs.append(got)
    worst = max(rel(result_logits(runs[0][k]), result_logits(runs[1][k])) for k in runs[0])
    print(f"resumed additions max relative difference {worst:.2e}")
    assert worst <= RTOL


@pytest.mark.usefixtures("untouched")
def test_steered_generation_matches_the_model_in_memory(pair: tuple[ModelAdapter, ModelAdapter]) -> None:
    memory, offloaded = pair
    steering = Steering.addition(torch.randn(memory.hidden_size), layer=2, alpha=8.0)
    want = generate(memory, "Explain statins.", steering=steering, max_new_tokens=8)
    got = generate(offloaded, "Explain statins.", steering=steering, max_new_tokens=8)
    assert got.text == want.text


@pytest.mark.usefixtures("untouched")
def test_a_forward_that_fails_in_a_hook_leaves_accelerate_as_it_was(
    pair: tuple[ModelAdapter, ModelAdapter],
) -> None:
    offloaded = pair[1]

    def boom(x: torch.Tensor) -> None:
        raise ValueError("boom")

    batch = offloaded.encode([offloaded.render("Hi")])
    with pytest.raises(ValueError, match="boom"), hooked(pre=[(offloaded.blocks[2], input_hook(boom))]):
        offloaded.model(**batch.model_kwargs())


# --- fold: offloaded weights cannot be edited ------------------------------------------------------------


def test_fold_of_an_offloaded_model_is_refused(pair: tuple[ModelAdapter, ModelAdapter]) -> None:
    offloaded = pair[1]
    steering = Steering.addition(torch.ones(offloaded.hidden_size), layer=0, alpha=1.0)
    problem = fold_problem(offloaded, steering)
    assert problem is not None and "offloaded" in problem and "`device_map`" in problem
    with pytest.raises(RolevecError, match="cannot be edited in place: load it without `device_map`"):
        fold(offloaded, steering)
    assert fold_problem(pair[0], steering) is None


def test_fold_of_a_dispatched_model_without_offload_works() -> None:
    """accelerate's hooks on every module (as a map over real devices leaves them), nothing offloaded:
    the copy keeps working hooks bound to itself, and the fold matches hooked steering."""
    from accelerate import dispatch_model

    adapter = make_adapter("llama", n_layers=N_LAYERS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dispatch_model(adapter.model, {"": "cpu"}, force_hooks=True)
    assert not adapter.offloaded and adapter.device_map == {"": "cpu"}
    vector = torch.randn(adapter.hidden_size, generator=torch.Generator().manual_seed(2))
    for steering in (Steering.addition(vector, layer=2, alpha=3.0), Steering.ablation(vector, layer=2)):
        folded = fold(adapter, steering)  # verify=True: compared with hooked steering, raises above 1e-4
        assert rel(logits(adapter, steering), logits(folded, None)) <= 1e-4
        hooked_names = {n for n, m in adapter.model.named_modules() if hasattr(m, "_hf_hook")}
        assert hooked_names and hooked_names == {
            n for n, m in folded.model.named_modules() if hasattr(m, "_hf_hook")
        }


# --- bad input -------------------------------------------------------------------------------------------


def test_a_map_naming_a_module_the_model_lacks_is_refused(saved: Path) -> None:
    bad = {**DISK_MAP, "model.layerz.1": "cpu"}
    with pytest.raises(RolevecError) as info:
        load_model(str(saved), device_map=bad, progress=False)
    text = str(info.value)
    assert "'model.layerz.1'" in text and "did you mean model.layers.1?" in text
    assert "model.layers.0" in text and "\n" not in text


def test_a_map_leaving_weights_without_a_device_is_refused(saved: Path) -> None:
    partial = {k: v for k, v in DISK_MAP.items() if k not in ("lm_head", "model.layers.3")}
    with pytest.raises(RolevecError, match=r"gives no device to model\.layers\.3, lm_head: map them"):
        load_model(str(saved), device_map=partial, progress=False)


def test_disk_offload_of_a_checkpoint_that_must_be_rewritten_needs_a_folder(
    saved: Path, tmp_path: Path
) -> None:
    """A pytorch_model.bin checkpoint cannot be read in place from disk: accelerate writes it out first."""
    from safetensors.torch import load_file

    folder = tmp_path / "bin"
    folder.mkdir()
    for item in saved.iterdir():
        if item.suffix != ".safetensors":
            (folder / item.name).write_bytes(item.read_bytes())
    torch.save(load_file(str(saved / "model.safetensors")), folder / "pytorch_model.bin")
    with pytest.raises(
        RolevecError, match="weights on disk that must be written out first: pass `offload_folder`"
    ):
        load_model(str(folder), device_map=DISK_MAP, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adapter = load_model(
            str(folder), device_map=DISK_MAP, offload_folder=tmp_path / "off", progress=False
        )
    assert adapter.offloaded and any((tmp_path / "off").iterdir())


def test_device_and_device_map_together_are_refused(saved: Path) -> None:
    with pytest.raises(RolevecError, match="pass either `device` or `device_map`, not both"):
        load_model(str(saved), device="cpu", device_map="auto")


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("0=20GiB,cpu", "not a list of device=size pairs"),
        ("", "not a list of device=size pairs"),
        ("cpu=lots", "has size 'lots'"),
        ("cpu=-1GiB", "has size '-1GiB'"),
        ("gpu=1GiB", "names device 'gpu'"),
        ("cpu=1GiB,cpu=2GiB", "twice"),
    ],
)
def test_bad_max_memory_text_is_refused(text: str, match: str) -> None:
    with pytest.raises(RolevecError, match=match):
        parse_max_memory(text)


def test_max_memory_parses_sizes_and_devices() -> None:
    assert parse_max_memory("cpu=64GiB, disk=1.5GB") == {"cpu": 64 * 2**30, "disk": 1_500_000_000}
    assert parse_max_memory("cpu=512MiB,disk=100") == {"cpu": 512 * 2**20, "disk": 100}


def test_budgets_and_folders_without_an_automatic_map_are_refused(saved: Path, tmp_path: Path) -> None:
    with pytest.raises(RolevecError, match="`max_memory` only applies with a device map"):
        load_model(str(saved), max_memory={"cpu": "1GiB"})
    with pytest.raises(RolevecError, match="`offload_folder` only applies with a device map"):
        load_model(str(saved), offload_folder=tmp_path)
    with pytest.raises(RolevecError, match="bounds an automatic placement"):
        load_model(str(saved), device_map=DISK_MAP, max_memory={"cpu": "1GiB"})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal of a GPU that is not there")
def test_a_map_naming_a_missing_gpu_is_refused() -> None:
    with pytest.raises(RolevecError, match="names GPU 1, but 0 GPU"):
        read_device_map({"model": "cuda:1", "lm_head": "cpu"})
    with pytest.raises(RolevecError, match="names GPU 0, but 0 GPU"):
        parse_max_memory("0=20GiB,cpu=64GiB")


def test_bad_map_values_and_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(RolevecError, match="names device 'tpu'"):
        read_device_map({"model": "tpu"})
    with pytest.raises(RolevecError, match="neither a strategy nor a JSON file"):
        read_device_map("autoo")
    with pytest.raises(RolevecError, match="does not exist"):
        read_device_map(str(tmp_path / "missing.json"))
    (tmp_path / "bad.json").write_text("{model: 0", encoding="utf-8")
    with pytest.raises(RolevecError, match="is not valid JSON"):
        read_device_map(str(tmp_path / "bad.json"))
    (tmp_path / "list.json").write_text('["cpu"]', encoding="utf-8")
    with pytest.raises(RolevecError, match="must map module names to devices"):
        read_device_map(str(tmp_path / "list.json"))
    (tmp_path / "good.json").write_text(json.dumps({"model": "cpu", "lm_head": "disk"}), encoding="utf-8")
    assert read_device_map(tmp_path / "good.json") == {"model": "cpu", "lm_head": "disk"}


def test_a_gguf_map_with_disk_is_refused_before_loading() -> None:
    from test_model import embedded_gguf

    with pytest.raises(RolevecError) as info:
        load_model(str(embedded_gguf()), device_map={"model": "cpu", "lm_head": "disk"})
    assert str(info.value) == GGUF_NO_DISK


# --- the command line ------------------------------------------------------------------------------------


def _errors(capsys: pytest.CaptureFixture[str]) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("rolevec:")]


def test_cli_bad_map_file_is_one_line_naming_the_module(
    saved: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "map.json"
    bad.write_text(json.dumps({**DISK_MAP, "model.layer.9": "disk"}), encoding="utf-8")
    out = tmp_path / "v.safetensors"
    argv = ["extract", "--model", str(saved), "--device-map", str(bad), "--roles", "doctor", "--n", "2"]
    assert main([*argv, "--out", str(out)]) == 2
    err = _errors(capsys)
    assert len(err) == 1 and err[0].startswith("rolevec: error: --device-map names 'model.layer.9'"), err
    assert "model.layers.0" in err[0] and not out.exists()


@pytest.mark.parametrize(
    ("flags", "start"),
    [
        (["--max-memory", "0=20GiB,cpu", "--device-map", "auto"], "--max-memory '0=20GiB,cpu' is not a list"),
        (["--device", "cpu", "--device-map", "auto"], "pass either --device or --device-map, not both"),
        (
            ["--offload-folder", "off"],
            "--offload-folder only applies with a device map: pass --device-map auto",
        ),
    ],
)
def test_cli_bad_model_flags_are_one_line(
    saved: Path, capsys: pytest.CaptureFixture[str], flags: list[str], start: str
) -> None:
    assert main(["info", "--model", str(saved), *flags]) == 2
    err = _errors(capsys)
    assert len(err) == 1 and err[0].startswith(f"rolevec: error: {start}"), err


def test_cli_loads_a_map_file_and_fold_refuses_it(
    saved: Path,
    pair: tuple[ModelAdapter, ModelAdapter],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    mapping = tmp_path / "map.json"
    mapping.write_text(json.dumps(DISK_MAP), encoding="utf-8")
    model = ["--model", str(saved), "--device-map", str(mapping), "--offload-folder", str(tmp_path / "off")]
    capsys.readouterr()
    assert main(["info", *model, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["device"] == "cpu"
    vectors = tmp_path / "v.safetensors"
    from test_interventions import role_vectors

    role_vectors(pair[0]).save(vectors)
    steer = ["--vectors", str(vectors), "--role", "doctor", "--layer", "1", "--alpha", "1"]
    assert main(["fold", *model, *steer, "--out", str(tmp_path / "folded")]) == 2
    err = _errors(capsys)
    assert len(err) == 1 and "load it without --device-map" in err[0], err
    assert not (tmp_path / "folded").exists()


@pytest.mark.usefixtures("untouched")
def test_logit_lens_reads_an_offloaded_head(pair: tuple[ModelAdapter, ModelAdapter]) -> None:
    from rolevec.analysis.interpret import logit_lens

    memory, offloaded = pair
    direction = torch.randn(memory.hidden_size, generator=torch.Generator().manual_seed(3))
    for normed in (False, True):
        a, b = logit_lens(memory, direction, normed=normed), logit_lens(offloaded, direction, normed=normed)
        assert a == b
