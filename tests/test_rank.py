"""Projections on role vectors (rolevec.analysis.projection) and `rolevec rank`, on tiny random models.

The expected values come from a hooked forward of one prompt at a time, with the user text's tokens
found from the rendered prompt's character offsets: independent of the batching, padding and token
counting the library does.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from rolevec.analysis import projection
from rolevec.analysis.projection import project_prompts, projection_stats, unit_directions
from rolevec.cli import main
from rolevec.errors import RolevecError
from rolevec.model.hooks import count_hooks, hooked, input_hook
from rolevec.model.loading import ModelAdapter, load_model
from rolevec.model.testing import make_adapter
from rolevec.vectors.role_vectors import RoleVectors
from tiny_folder import fail_forwards

PROMPTS = [
    "Explain how a bond's price moves with interest rates.",
    "Fix my bike.",
    "Write a short proof that there are infinitely many primes, step by step.",
    "What does a lawyer do on a normal day at the office?",
    "Hello",
    "Describe the water cycle to a child who has never seen rain before.",
    "List three prime numbers.",
]


def random_vectors(adapter: ModelAdapter, seed: int = 0) -> RoleVectors:
    gen = torch.Generator().manual_seed(seed)
    shape = (len(adapter.chat.positions), adapter.n_layers + 1, adapter.hidden_size)
    return RoleVectors(
        role_means={
            "lawyer": torch.randn(shape, generator=gen),
            "mathematician": torch.randn(shape, generator=gen),
        },
        base_mean=torch.randn(shape, generator=gen),
        positions=tuple(adapter.chat.positions),
        position_tokens=tuple(adapter.chat.position_tokens()),
        metadata={"model": "tiny", "model_fingerprint": adapter.fingerprint()},
    )


def by_hand(adapter: ModelAdapter, text: str, d: torch.Tensor, layer: int) -> tuple[float, float]:
    """(last-token, user-mean) projection of one prompt, from its own hooked forward."""
    rendered = adapter.render(text)
    start = rendered.index(text)
    enc = adapter.tokenizer(
        rendered, add_special_tokens=adapter.chat.add_special_tokens, return_offsets_mapping=True
    )
    user = [
        j for j, (s, e) in enumerate(enc["offset_mapping"]) if e > s and s >= start and e <= start + len(text)
    ]
    seen: list[torch.Tensor] = []

    def grab(hidden: torch.Tensor) -> None:
        seen.append(hidden[0].detach().clone())

    ids = torch.tensor([enc["input_ids"]])
    with torch.no_grad(), hooked(pre=[(adapter.residual_site(layer), input_hook(grab))]):
        adapter.model(input_ids=ids, attention_mask=torch.ones_like(ids))
    unit = d / d.norm()
    per_token = seen[0].double() @ unit.double()
    return float(per_token[-1]), float(per_token[user].mean())


def collect(batches: Iterator[projection.ProjectionBatch], n: int) -> tuple[torch.Tensor, torch.Tensor]:
    last = torch.full((n,), float("nan"), dtype=torch.float64)
    mean = last.clone()
    for b in batches:
        last[list(b.indices)] = b.last[:, 0]
        mean[list(b.indices)] = b.mean[:, 0]
    return last, mean


# --- the library ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_projection_equals_the_dot_product_with_the_unit_direction(layer: int) -> None:
    adapter = make_adapter("llama")
    layer = min(layer, adapter.n_layers)
    vectors = random_vectors(adapter)
    d = vectors.vector("lawyer", layer, -1)
    dirs = unit_directions(vectors, ["lawyer"], layer, -1)
    last, mean = collect(
        project_prompts(adapter, PROMPTS, dirs, layer, batch_size=3, progress=False), len(PROMPTS)
    )
    for i, text in enumerate(PROMPTS):
        want_last, want_mean = by_hand(adapter, text, d, layer)
        assert last[i].item() == pytest.approx(want_last, rel=1e-4, abs=1e-4), text
        assert mean[i].item() == pytest.approx(want_mean, rel=1e-4, abs=1e-4), text
    assert len(set(mean.tolist())) == len(PROMPTS)  # the prompts really differ
    if layer > 0:  # at the embeddings the last token (the template's) is the same for every prompt
        assert len(set(last.tolist())) == len(PROMPTS)
    assert count_hooks(adapter.model) == 0


def test_values_do_not_depend_on_the_batch_size_and_several_directions_are_columns() -> None:
    adapter = make_adapter("llama")
    vectors = random_vectors(adapter)
    dirs = unit_directions(vectors, ["lawyer", "mathematician"], 1, -1)
    one = {i: row for b in project_prompts(adapter, PROMPTS, dirs, 1, batch_size=1, progress=False)
           for i, row in zip(b.indices, b.last, strict=True)}  # fmt: skip
    many = {i: row for b in project_prompts(adapter, PROMPTS, dirs, 1, batch_size=4, progress=False)
            for i, row in zip(b.indices, b.last, strict=True)}  # fmt: skip
    assert sorted(one) == sorted(many) == list(range(len(PROMPTS)))
    for i in one:
        assert one[i].shape == (2,)
        torch.testing.assert_close(one[i], many[i], rtol=1e-4, atol=1e-4)
    single = collect(
        project_prompts(adapter, PROMPTS, dirs[1], 1, batch_size=4, progress=False), len(PROMPTS)
    )
    torch.testing.assert_close(single[0], torch.stack([many[i][1] for i in range(len(PROMPTS))]))


def test_streaming_reads_prompts_lazily_and_holds_one_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    adapter = make_adapter("llama")
    dirs = unit_directions(random_vectors(adapter), ["lawyer"], 1, -1)
    batch_size, n = 2, 3 * 2 * projection.WINDOW_BATCHES + 5
    window = batch_size * projection.WINDOW_BATCHES
    consumed = [0]

    def source() -> Iterator[str]:  # an unsized stream: the iterator is all the library sees
        for i in range(n):
            consumed[0] += 1
            yield f"Prompt number {i}: " + "word " * (i % 7)

    widest: list[tuple[int, int]] = []  # (rows, columns) of every activation the reader sees
    real_read = projection._read

    def counted(adapter_: ModelAdapter, site: Any, rows: Any, *args: Any) -> Any:
        widest.append((len(rows), max(len(r) for r in rows)))
        return real_read(adapter_, site, rows, *args)

    monkeypatch.setattr(projection, "_read", counted)
    stream = project_prompts(adapter, source(), dirs, 1, batch_size=batch_size, progress=False)
    first = next(stream)
    assert consumed[0] == window  # one window read, not the dataset
    assert len(first.indices) <= batch_size and len(widest) == 1
    assert count_hooks(adapter.model) == 0  # nothing hooked while the caller holds a batch
    seen = list(first.indices)
    n_batches = 1
    for b in stream:
        n_batches += 1
        seen.extend(b.indices)
        assert consumed[0] <= (max(b.indices) // window + 1) * window  # never more than the current window
        assert b.last.shape == (len(b.indices), 1)
    assert sorted(seen) == list(range(n))
    assert all(rows <= batch_size for rows, _ in widest)
    assert len(widest) == n_batches >= n // batch_size  # one forward per batch yielded


def test_hooks_are_removed_when_the_forward_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    adapter = make_adapter("llama")
    dirs = unit_directions(random_vectors(adapter), ["lawyer"], 1, -1)
    fail_forwards(monkeypatch, adapter)
    with pytest.raises(IndexError):
        next(project_prompts(adapter, PROMPTS, dirs, 1, progress=False))
    assert count_hooks(adapter.model) == 0


def test_zscores_against_the_base_set_itself_have_mean_zero_and_unit_spread() -> None:
    adapter = make_adapter("llama")
    dirs = unit_directions(random_vectors(adapter), ["lawyer"], 2, -1)
    stats = projection_stats(adapter, PROMPTS, dirs, 2, batch_size=3, progress=False)
    assert stats.n == len(PROMPTS)
    for by in ("last", "mean"):
        values = collect(project_prompts(adapter, PROMPTS, dirs, 2, progress=False), len(PROMPTS))
        v = values[0] if by == "last" else values[1]
        z = stats.z(v[:, None], by)[:, 0]
        assert float(z.mean()) == pytest.approx(0.0, abs=1e-9)
        assert float(z.std(unbiased=False)) == pytest.approx(1.0, abs=1e-9)
        assert float(stats.mean[by][0]) == pytest.approx(float(v.mean()), abs=1e-9)


@pytest.mark.parametrize(
    ("prompts", "message"),
    [
        ([], "no prompts"),
        (["fine", "   "], "prompt 1 is empty"),
    ],
)
def test_bad_prompts_are_one_clear_error(prompts: list[str], message: str) -> None:
    adapter = make_adapter("llama")
    dirs = unit_directions(random_vectors(adapter), ["lawyer"], 1, -1)
    with pytest.raises(RolevecError, match=message):
        list(project_prompts(adapter, prompts, dirs, 1, progress=False))
    assert count_hooks(adapter.model) == 0


def test_bad_directions_and_spreadless_base_are_refused() -> None:
    adapter = make_adapter("llama")
    with pytest.raises(RolevecError, match="expected"):
        list(project_prompts(adapter, PROMPTS, torch.ones(2, adapter.hidden_size + 1), 1, progress=False))
    dirs = unit_directions(random_vectors(adapter), ["lawyer"], 1, -1)
    with pytest.raises(RolevecError, match="at least two different prompts"):
        projection_stats(adapter, ["only one"], dirs, 1, progress=False)
    with pytest.raises(RolevecError, match="not in this vector file"):
        unit_directions(random_vectors(adapter), ["chef"], 1, -1)


# --- the command -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny llama saved as a model folder, random vectors for two roles, prompt files, a selection."""
    root = tmp_path_factory.mktemp("rank")
    adapter = make_adapter("llama")
    model: Any = adapter.model  # transformers' save_pretrained is untyped
    model.save_pretrained(root / "model")
    adapter.tokenizer.save_pretrained(root / "model")
    random_vectors(adapter).save(root / "vectors.safetensors")
    (root / "prompts.json").write_text(json.dumps(PROMPTS), encoding="utf-8")
    (root / "prompts.jsonl").write_text(
        "".join(json.dumps({"id": i, "question": p}) + "\n" for i, p in enumerate(PROMPTS)), encoding="utf-8"
    )
    with (root / "prompts.csv").open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "body"])
        w.writerows([i, p] for i, p in enumerate(PROMPTS))
    (root / "selection.json").write_text(
        json.dumps({"roles": {"lawyer": {"layer": 2, "position": -1, "alpha": 1.0}}}), encoding="utf-8"
    )
    return root


def rank_args(tiny_dir: Path, out: Path, *extra: str, prompts: str = "prompts.json") -> list[str]:
    return [
        "rank",
        str(tiny_dir / prompts),
        "--model",
        str(tiny_dir / "model"),
        "--device",
        "cpu",
        "--vectors",
        str(tiny_dir / "vectors.safetensors"),
        "--role",
        "lawyer",
        "--out",
        str(out),
        "--no-progress",
        *extra,
    ]


def read_ranked(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "ranked.jsonl").read_text(encoding="utf-8").splitlines()]


@pytest.mark.parametrize("by", ["last", "mean"])
def test_rank_writes_prompts_by_descending_projection(
    tiny_dir: Path, tmp_path: Path, by: str, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "ranked"
    assert main(rank_args(tiny_dir, out, "--layer", "1", "--by", by)) == 0
    assert "7 prompts ranked" in capsys.readouterr().out
    rows = read_ranked(out)
    assert [r["rank"] for r in rows] == list(range(1, len(PROMPTS) + 1))
    assert sorted(r["index"] for r in rows) == list(range(len(PROMPTS)))
    scores = [r["score"] for r in rows]
    assert scores == sorted(scores, reverse=True) and "z" not in rows[0]
    adapter = load_model(str(tiny_dir / "model"), device="cpu")
    d = RoleVectors.load(tiny_dir / "vectors.safetensors").vector("lawyer", 1, -1)
    for r in rows:
        assert r["text"] == PROMPTS[r["index"]]
        want = by_hand(adapter, r["text"], d, 1)[0 if by == "last" else 1]
        assert r["score"] == pytest.approx(want, rel=1e-4, abs=1e-4)
    png = (out / "histogram.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000
    manifest = json.loads((out / "manifest-rank.json").read_text(encoding="utf-8"))
    assert (manifest["role"], manifest["layer"], manifest["position"], manifest["by"]) == (
        "lawyer",
        1,
        -1,
        by,
    )
    assert manifest["prompts"]["n"] == len(PROMPTS) and manifest["base"] is None
    assert count_hooks(adapter.model) == 0


def test_rank_zscores_the_base_set_itself_to_mean_zero(tiny_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "z"
    base = str(tiny_dir / "prompts.json")
    assert main(rank_args(tiny_dir, out, "--layer", "2", "--zscore", "--base", base)) == 0
    z = torch.tensor([r["z"] for r in read_ranked(out)], dtype=torch.float64)
    assert float(z.mean()) == pytest.approx(0.0, abs=1e-6)
    assert float(z.std(unbiased=False)) == pytest.approx(1.0, abs=1e-6)
    rows = read_ranked(out)
    assert [r["z"] for r in rows] == sorted((r["z"] for r in rows), reverse=True)


def test_rank_reads_jsonl_and_csv_columns_and_takes_the_site_from_a_selection(
    tiny_dir: Path, tmp_path: Path
) -> None:
    assert main(rank_args(tiny_dir, tmp_path / "ref", "--layer", "2", "--position", "-1")) == 0
    ref = [(r["index"], r["score"]) for r in read_ranked(tmp_path / "ref")]
    selection = str(tiny_dir / "selection.json")
    for name, column in (("prompts.jsonl", "question"), ("prompts.csv", "body")):
        out = tmp_path / name
        args = rank_args(tiny_dir, out, "--column", column, "--selection", selection, prompts=name)
        assert main(args) == 0
        got = [(r["index"], r["score"]) for r in read_ranked(out)]
        assert [i for i, _ in got] == [i for i, _ in ref]
        assert [s for _, s in got] == pytest.approx([s for _, s in ref], rel=1e-6, abs=1e-6)
        manifest = json.loads((out / "manifest-rank.json").read_text(encoding="utf-8"))
        assert manifest["layer"] == 2 and manifest["site_from"].startswith("selection")


def _refused(capsys: pytest.CaptureFixture[str], args: list[str], out: Path, *expected: str) -> None:
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("rolevec: error:"), err
    for text in expected:
        assert text in err, err
    assert not out.exists() or not any(out.iterdir()), "a refused rank wrote something"


def test_rank_bad_inputs_are_one_line_exit_2_and_write_nothing(
    tiny_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "never"
    _refused(
        capsys,
        rank_args(tiny_dir, out, "--layer", "1", "--role", "chef"),
        out,
        "'chef'",
        "lawyer, mathematician",
    )
    stored = RoleVectors.load(tiny_dir / "vectors.safetensors")
    top, below = stored.n_layers, str(stored.positions[0] - 1)
    _refused(capsys, rank_args(tiny_dir, out, "--layer", "99"), out, "layer 99", f"0..{top}")
    _refused(capsys, rank_args(tiny_dir, out, "--layer", "1", "--position", below), out, f"position {below}")
    _refused(capsys, rank_args(tiny_dir, out), out, "--layer")
    _refused(capsys, rank_args(tiny_dir, out, "--layer", "1", "--base", "x.json"), out, "--zscore")
    for name, text in (("empty.json", "[]"), ("blank.json", '["", "   "]'), ("empty.txt", "")):
        (tmp_path / name).write_text(text, encoding="utf-8")
        args = rank_args(tiny_dir, out, "--layer", "1")
        args[1] = str(tmp_path / name)
        _refused(capsys, args, out, "no prompts")
    _refused(
        capsys,
        rank_args(tiny_dir, out, "--layer", "1", "--selection", str(tmp_path / "none.json")),
        out,
        "none.json",
    )


def test_rank_keeps_an_earlier_ranking_without_force(
    tiny_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "again"
    assert main(rank_args(tiny_dir, out, "--layer", "1")) == 0
    before = (out / "ranked.jsonl").read_bytes()
    assert main(rank_args(tiny_dir, out, "--layer", "2")) == 2
    assert "--force" in capsys.readouterr().err
    assert (out / "ranked.jsonl").read_bytes() == before
    assert main(rank_args(tiny_dir, out, "--layer", "2", "--force")) == 0
    assert json.loads((out / "manifest-rank.json").read_text(encoding="utf-8"))["layer"] == 2
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["histogram.png", "manifest-rank.json", "ranked.jsonl"]
    )
