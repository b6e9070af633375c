"""Per-token projections (rolevec.analysis.monitor), their page and tables, and `rolevec monitor`.

The expected values come from a hooked forward of the rendered prompt written out here, with the user
text's tokens found from the tokenizer's character offsets: independent of the segment bookkeeping and
the read the library does.
"""

from __future__ import annotations

import csv
import json
import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
import torch

from rolevec.analysis import monitor_page
from rolevec.analysis.monitor import SEGMENTS, monitor, reference_stats, token_pieces
from rolevec.analysis.projection import project_prompts
from rolevec.cli import main
from rolevec.cli import monitor as monitor_cli
from rolevec.errors import RolevecError
from rolevec.model.hooks import count_hooks, hooked, input_hook
from rolevec.model.loading import ModelAdapter, load_model
from rolevec.model.testing import make_adapter
from rolevec.steering.generation import generate, stop_token_ids
from rolevec.steering.interventions import Steering
from rolevec.vectors.role_vectors import RoleVectors
from test_rank import PROMPTS, random_vectors
from tiny_folder import fail_forwards

TEXT = "Explain how a bond's price moves with interest rates."


def directions(adapter: ModelAdapter, layer: int, seed: int = 0) -> dict[str, torch.Tensor]:
    vectors = random_vectors(adapter, seed)
    return {r: vectors.vector(r, layer, -1) for r in vectors.roles}


def hooked_read(adapter: ModelAdapter, ids: list[int], layer: int) -> torch.Tensor:
    """The residual at the input of block ``layer`` for every token of ``ids``, from a full forward."""
    seen: list[torch.Tensor] = []

    def grab(hidden: torch.Tensor) -> None:
        seen.append(hidden[0].detach().double().clone())

    x = torch.tensor([ids])
    with torch.no_grad(), hooked(pre=[(adapter.residual_site(layer), input_hook(grab))]):
        adapter.model(input_ids=x, attention_mask=torch.ones_like(x))
    return seen[0]


def rendered(adapter: ModelAdapter, text: str, system: str | None = None) -> tuple[list[int], list[int]]:
    """(token ids of the rendered prompt, indices of the user text's tokens) from character offsets."""
    prompt = adapter.render(text, system)
    start = prompt.rindex(text)
    enc = adapter.tokenizer(
        prompt, add_special_tokens=adapter.chat.add_special_tokens, return_offsets_mapping=True
    )
    user = [
        j for j, (s, e) in enumerate(enc["offset_mapping"]) if e > s and s >= start and e <= start + len(text)
    ]
    return list(enc["input_ids"]), user


def by_hand(adapter: ModelAdapter, ids: list[int], dirs: dict[str, torch.Tensor], layer: int) -> torch.Tensor:
    h = hooked_read(adapter, ids, layer)
    units = torch.stack([d.double() / d.double().norm() for d in dirs.values()])
    return units @ h.T  # [roles, tokens]


# --- the library ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("layer", [1, 2, 3])
def test_values_are_the_hooked_residual_dotted_with_the_unit_direction(layer: int) -> None:
    adapter = make_adapter("llama")
    assert adapter.n_layers == 3  # layer 3 is the final norm's input
    dirs = directions(adapter, layer)
    trace = monitor(adapter, TEXT, dirs, layer)
    ids, _ = rendered(adapter, TEXT)
    assert list(trace.token_ids) == ids
    assert trace.roles == ("lawyer", "mathematician") and trace.values.dtype == torch.float64
    want = by_hand(adapter, ids, dirs, layer)
    torch.testing.assert_close(trace.values, want, rtol=1e-4, atol=1e-4)
    assert len(set(trace.values[0].tolist())) > len(ids) // 2  # the tokens really differ
    assert trace.z is None and trace.generated_text is None
    assert count_hooks(adapter.model) == 0


@pytest.mark.parametrize("system", [None, "You are a careful economist."])
def test_segments_follow_the_rendered_prompt(system: str | None) -> None:
    adapter = make_adapter("llama")
    trace = monitor(adapter, TEXT, directions(adapter, 2), 2, system=system)
    ids, user = rendered(adapter, TEXT, system)
    n_tail = len(adapter.chat.suffix_ids)
    want = ["template"] * len(ids)
    for j in user:
        want[j] = "user"
    want[len(ids) - n_tail :] = ["post-instruction"] * n_tail
    assert list(trace.segments) == want
    assert set(trace.segments) == set(SEGMENTS) - {"generated"}
    assert trace.n_prompt == len(ids)
    assert "".join(trace.tokens) == adapter.tokenizer.decode(ids)
    if system is not None:  # the system turn is part of the template's head
        head = "".join(t for t, s in zip(trace.tokens, trace.segments, strict=True) if s == "template")
        assert system in head


def test_summaries_are_means_of_the_tokens_and_agree_with_project_prompts() -> None:
    adapter = make_adapter("llama")
    dirs = directions(adapter, 2)
    trace = monitor(adapter, TEXT, dirs, 2)
    user = [j for j, s in enumerate(trace.segments) if s == "user"]
    for i, role in enumerate(trace.roles):
        s = trace.summaries[role]
        assert s.last == pytest.approx(float(trace.values[i, trace.n_prompt - 1]), abs=1e-12)
        assert s.user_mean == pytest.approx(
            sum(float(trace.values[i, j]) for j in user) / len(user), abs=1e-9
        )
        assert s.generated_mean is None and s.last_z is None
    units = torch.stack([d / d.norm() for d in dirs.values()])
    (batch,) = list(project_prompts(adapter, [TEXT], units, 2, progress=False))
    got = torch.tensor([[trace.summaries[r].last, trace.summaries[r].user_mean] for r in trace.roles])
    torch.testing.assert_close(got[:, 0], batch.last[0].float(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got[:, 1], batch.mean[0].float(), rtol=1e-4, atol=1e-4)


def test_a_generation_is_decoded_then_read_in_one_forward() -> None:
    adapter = make_adapter("llama")
    dirs = directions(adapter, 2)
    trace = monitor(adapter, TEXT, dirs, 2, generate=True, max_new_tokens=6)
    answer = generate(adapter, TEXT, max_new_tokens=6)
    tokens = list(answer.token_ids)
    if answer.stopped and tokens[-1] in stop_token_ids(adapter):
        tokens = tokens[:-1]
    ids, _ = rendered(adapter, TEXT)
    assert list(trace.token_ids) == ids + tokens and tokens
    assert trace.segments[len(ids) :] == ("generated",) * len(tokens)
    assert trace.generated_text == answer.text
    torch.testing.assert_close(trace.values, by_hand(adapter, ids + tokens, dirs, 2), rtol=1e-4, atol=1e-4)
    for i, role in enumerate(trace.roles):
        mean = float(trace.values[i, len(ids) :].mean())
        assert trace.summaries[role].generated_mean == pytest.approx(mean, abs=1e-9)


def test_zscores_against_the_base_prompts_by_hand() -> None:
    adapter = make_adapter("llama")
    dirs = directions(adapter, 2)
    base = PROMPTS
    stats = reference_stats(adapter, base, dirs, 2, batch_size=3, progress=False)
    trace = monitor(adapter, TEXT, dirs, 2, stats=stats, generate=True, max_new_tokens=4)
    pooled, lasts, means = [], [], []
    for text in base:
        ids, user = rendered(adapter, text)
        v = by_hand(adapter, ids, dirs, 2)
        pooled.append(v[:, user])
        lasts.append(v[:, -1])
        means.append(v[:, user].mean(1))
    tokens = torch.cat(pooled, dim=1)
    assert stats.n_tokens == tokens.shape[1]
    m, s = tokens.mean(1, keepdim=True), tokens.std(1, unbiased=False, keepdim=True)
    assert trace.z is not None
    torch.testing.assert_close(trace.z, (trace.values - m) / s, rtol=1e-3, atol=1e-3)
    last, mean = torch.stack(lasts, 1), torch.stack(means, 1)
    n_prompt = trace.n_prompt
    for i, role in enumerate(trace.roles):
        summary = trace.summaries[role]
        want_last = (summary.last - float(last[i].mean())) / float(last[i].std(unbiased=False))
        want_mean = (summary.user_mean - float(mean[i].mean())) / float(mean[i].std(unbiased=False))
        assert summary.last_z == pytest.approx(want_last, rel=1e-3, abs=1e-3)
        assert summary.user_mean_z == pytest.approx(want_mean, rel=1e-3, abs=1e-3)
        assert summary.generated_mean_z == pytest.approx(float(trace.z[i, n_prompt:].mean()), abs=1e-9)


def test_addition_at_the_read_layer_shifts_every_token_by_alpha_times_the_cosine_term() -> None:
    adapter = make_adapter("llama")
    layer, alpha = 2, 1.5
    dirs = directions(adapter, layer)
    d = random_vectors(adapter, seed=7).vector("lawyer", layer, -1)
    plain = monitor(adapter, TEXT, dirs, layer)
    steered = monitor(adapter, TEXT, dirs, layer, steering=Steering.addition(d, layer=layer, alpha=alpha))
    for i, u in enumerate(dirs.values()):
        shift = alpha * float(d.double() @ (u.double() / u.double().norm()))
        assert abs(shift) > 0.1
        delta = steered.values[i] - plain.values[i]
        torch.testing.assert_close(delta, torch.full_like(delta, shift), rtol=1e-4, atol=1e-4)
    assert steered.steering is not None and "α=1.5" in steered.steering
    above = monitor(adapter, TEXT, dirs, layer, steering=Steering.addition(d, layer=layer + 1, alpha=alpha))
    torch.testing.assert_close(above.values, plain.values)  # steering above the read does not reach it
    assert count_hooks(adapter.model) == 0


def test_ablating_the_monitored_direction_reads_zero() -> None:
    adapter = make_adapter("llama")
    dirs = directions(adapter, 2)
    d = dirs["lawyer"]
    trace = monitor(adapter, TEXT, {"lawyer": d}, 2, steering=Steering.ablation(d, layer=2))
    plain = float(monitor(adapter, TEXT, {"lawyer": d}, 2).values.abs().max())
    assert plain > 0.01 and float(trace.values.abs().max()) < 1e-3 * plain


def test_steering_applies_to_the_generation_and_its_read() -> None:
    adapter = make_adapter("llama")
    dirs = directions(adapter, 2)
    steering = Steering.addition(random_vectors(adapter, seed=3).vector("lawyer", 1, -1), layer=1, alpha=4.0)
    trace = monitor(adapter, TEXT, dirs, 2, steering=steering, generate=True, max_new_tokens=6)
    answer = generate(adapter, TEXT, steering=steering, max_new_tokens=6)
    n = trace.n_prompt
    assert list(trace.token_ids[n:]) == [t for t in answer.token_ids if t not in stop_token_ids(adapter)]
    with steering.apply(adapter):
        want = by_hand(adapter, list(trace.token_ids), dirs, 2)
    torch.testing.assert_close(trace.values, want, rtol=1e-4, atol=1e-4)
    assert count_hooks(adapter.model) == 0


def test_no_hook_is_left_when_the_read_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    adapter = make_adapter("llama")
    dirs = directions(adapter, 2)
    steering = Steering.addition(dirs["lawyer"], layer=1, alpha=1.0)
    fail_forwards(monkeypatch, adapter)
    with pytest.raises(IndexError):
        monitor(adapter, TEXT, dirs, 2, steering=steering)
    assert count_hooks(adapter.model) == 0


def test_bad_arguments_are_one_clear_error() -> None:
    adapter = make_adapter("llama")
    dirs = directions(adapter, 2)
    with pytest.raises(RolevecError, match="empty"):
        monitor(adapter, "   ", dirs, 2)
    with pytest.raises(RolevecError, match="out of range"):
        monitor(adapter, TEXT, dirs, 9)
    with pytest.raises(RolevecError, match="zero"):
        monitor(adapter, TEXT, {"nothing": torch.zeros(adapter.hidden_size)}, 2)
    with pytest.raises(RolevecError, match="hidden size"):
        monitor(adapter, TEXT, {"short": torch.ones(3)}, 2)
    stats = reference_stats(adapter, PROMPTS, {"lawyer": dirs["lawyer"]}, 2, progress=False)
    with pytest.raises(RolevecError, match="directions"):
        monitor(adapter, TEXT, dirs, 2, stats=stats)
    with pytest.raises(RolevecError, match="context"):
        monitor(adapter, "word " * 5000, dirs, 2)
    assert count_hooks(adapter.model) == 0


def test_token_pieces_keep_leading_spaces_and_join_to_the_text() -> None:
    adapter = make_adapter("llama")
    ids = adapter.tokenizer("The quick brown fox jumps.", add_special_tokens=False)["input_ids"]
    pieces = token_pieces(adapter.tokenizer, ids)
    assert len(pieces) == len(ids) and "".join(pieces) == "The quick brown fox jumps."
    assert any(p.startswith(" ") for p in pieces)


# --- the page's pieces -----------------------------------------------------------------------------------


def test_colour_scale_is_diverging_and_clipped() -> None:
    assert monitor_page.colour(0.0, 2.0) == (255, 255, 255)
    assert monitor_page.colour(2.0, 2.0) == monitor_page.POSITIVE
    assert monitor_page.colour(-5.0, 2.0) == monitor_page.NEGATIVE  # beyond the scale: full colour
    half = monitor_page.colour(1.0, 2.0)
    assert half == tuple(round(255 + 0.5 * (c - 255)) for c in monitor_page.POSITIVE)
    with pytest.raises(ValueError):
        monitor_page.colour(1.0, 0.0)


def test_visible_whitespace_and_escaping() -> None:
    html = monitor_page.visible(" <b>&\n\t")
    assert "<b>" not in html and "&lt;b&gt;&amp;" in html
    assert html.count("·") == 1 and "↵" in html and "→" in html
    assert monitor_page.visible("") == '<i class="ws">∅</i>'


# --- the command -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny llama saved as a model folder, random vectors for two roles, a prompt file and a base file."""
    root = tmp_path_factory.mktemp("monitor")
    adapter = make_adapter("llama")
    model: Any = adapter.model  # transformers' save_pretrained is untyped
    model.save_pretrained(root / "model")
    adapter.tokenizer.save_pretrained(root / "model")
    random_vectors(adapter).save(root / "vectors.safetensors")
    (root / "prompts.json").write_text(json.dumps(PROMPTS[:3]), encoding="utf-8")
    (root / "base.json").write_text(json.dumps(PROMPTS[3:]), encoding="utf-8")
    return root


def monitor_args(tiny_dir: Path, out: Path, *extra: str) -> list[str]:
    return [
        "monitor",
        *["--model", str(tiny_dir / "model"), "--device", "cpu"],
        *["--vectors", str(tiny_dir / "vectors.safetensors"), "--layer", "2"],
        *["--out", str(out), "--no-progress"],
        *extra,
    ]


class Spans(HTMLParser):
    """The token spans of monitor.html: per role row, each span's attributes."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[str, list[dict[str, str]]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "div" and "role-row" in a.get("class", "").split():
            self.rows.append((a["data-role"], []))
        elif tag == "span" and "tok" in a.get("class", "").split():
            self.rows[-1][1].append(a)


def read_csv(out: Path) -> list[dict[str, str]]:
    with (out / "projections.csv").open(encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def test_monitor_writes_every_file_and_they_agree(tiny_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = monitor_args(
        tiny_dir,
        out,
        *["--prompts", str(tiny_dir / "prompts.json"), "--compose", "lawyer:1,mathematician:-0.5"],
        *["--zscore", "--base", str(tiny_dir / "base.json")],
    )
    assert main(args) == 0
    names = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    figures = [f"figures/monitor-{i:03d}.png" for i in range(3)]
    assert names == sorted([*monitor_cli.OUTPUTS, *figures])
    for name in figures:
        assert (out / name).read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    doc = json.loads((out / "projections.json").read_text(encoding="utf-8"))
    roles = ["lawyer", "mathematician", "lawyer:1,mathematician:-0.5"]
    assert doc["settings"]["roles"] == roles and len(doc["prompts"]) == 3
    rows = read_csv(out)
    assert len(rows) == sum(len(p["tokens"]) * len(roles) for p in doc["prompts"])
    by_key = {(int(r["prompt"]), r["role"], int(r["token"])): r for r in rows}
    for p in doc["prompts"]:
        assert p["prompt"] == PROMPTS[p["index"]]
        for role in roles:
            for t, (text, segment) in enumerate(zip(p["tokens"], p["segments"], strict=True)):
                r = by_key[(p["index"], role, t)]
                assert (r["text"], r["segment"]) == (text, segment)
                assert float(r["value"]) == p["values"][role][t] and float(r["z"]) == p["z"][role][t]
    # The page holds the same values, and each span the colour of its z-score.
    page = (out / "monitor.html").read_text(encoding="utf-8")
    parser = Spans()
    parser.feed(page)
    assert [role for role, _ in parser.rows] == roles * 3
    for k, (role, spans) in enumerate(parser.rows):
        p = doc["prompts"][k // len(roles)]
        assert len(spans) == len(p["tokens"])
        for t, span in enumerate(spans):
            assert float(span["data-v"]) == float(by_key[(p["index"], role, t)]["value"])
            z = p["z"][role][t]
            assert float(span["data-z"]) == z
            rgb = monitor_page.colour(z, monitor_page.Z_SCALE)
            assert f"background-color:rgb({rgb[0]}, {rgb[1]}, {rgb[2]})" in span["style"]
    assert not re.search(r"<script|<link|@import|url\(|https?://", page)  # self-contained
    # The composition is its own direction: the weighted sum of the roles' vectors.
    vectors = RoleVectors.load(tiny_dir / "vectors.safetensors")
    adapter = load_model(str(tiny_dir / "model"), device="cpu")
    mix = vectors.vector("lawyer", 2, -1) - 0.5 * vectors.vector("mathematician", 2, -1)
    ids = [int(i) for i in doc["prompts"][0]["token_ids"]]
    want = by_hand(adapter, ids, {"mix": mix}, 2)[0]
    got = torch.tensor(doc["prompts"][0]["values"][roles[2]], dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    manifest = json.loads((out / "manifest-monitor.json").read_text(encoding="utf-8"))
    assert manifest["command"] == "monitor" and manifest["layer"] == 2 and manifest["prompts"]["n"] == 3
    assert manifest["base"]["stats"]["n_tokens"] > 0


def test_monitor_generates_steered_and_describes_it(
    tiny_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "gen"
    extra = ["--generate", TEXT, "--max-new-tokens", "5", "--roles", "lawyer", "--steer", "mathematician"]
    assert main(monitor_args(tiny_dir, out, *extra, "--alpha", "2", "--steer-layer", "1")) == 0
    assert "1 prompt(s)" in capsys.readouterr().out
    doc = json.loads((out / "projections.json").read_text(encoding="utf-8"))
    steering = doc["settings"]["steering"]
    assert (steering["mode"], steering["role"], steering["layers"], steering["alpha"]) == (
        "add",
        "mathematician",
        [1],
        2.0,
    )
    (p,) = doc["prompts"]
    assert p["roles"] == ["lawyer"] and "generated" in p["segments"] and p["generated_text"] is not None
    assert p["summaries"]["lawyer"]["generated_mean"] is not None
    page = (out / "monitor.html").read_text(encoding="utf-8")
    assert "add α=2 (role &#x27;mathematician&#x27;, layer 1, position -1)" in page
    assert "mean over generated tokens" in page


def test_monitor_keeps_earlier_files_without_force_and_replaces_only_its_own(
    tiny_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "again"
    assert main(monitor_args(tiny_dir, out, "--prompts", str(tiny_dir / "prompts.json"))) == 0
    (out / "notes.txt").write_text("mine", encoding="utf-8")
    before = (out / "projections.csv").read_bytes()
    capsys.readouterr()
    assert main(monitor_args(tiny_dir, out, "Hello there")) == 2
    assert "--force" in capsys.readouterr().err
    assert (out / "projections.csv").read_bytes() == before
    assert main(monitor_args(tiny_dir, out, "Hello there", "--force")) == 0
    assert sorted(p.name for p in (out / "figures").iterdir()) == ["monitor-000.png"]  # stale ones gone
    assert (out / "notes.txt").read_text(encoding="utf-8") == "mine"
    assert json.loads((out / "projections.json").read_text(encoding="utf-8"))["prompts"][0]["prompt"] == (
        "Hello there"
    )


def test_monitor_limits_the_prompts(
    tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    prompts = str(tiny_dir / "prompts.json")
    assert main(monitor_args(tiny_dir, tmp_path / "two", "--prompts", prompts, "--limit", "2")) == 0
    doc = json.loads((tmp_path / "two" / "projections.json").read_text(encoding="utf-8"))
    assert [p["prompt"] for p in doc["prompts"]] == PROMPTS[:2]
    monkeypatch.setattr(monitor_cli, "DEFAULT_LIMIT", 2)
    capsys.readouterr()
    assert main(monitor_args(tiny_dir, tmp_path / "none", "--prompts", prompts)) == 2
    err = capsys.readouterr().err
    assert "holds 3 prompts" in err and "--limit" in err and not (tmp_path / "none").exists()


@pytest.mark.e2e
def test_monitor_on_the_embedded_model(embedded: ModelAdapter) -> None:
    """A short text on SmolLM2 (its template adds a default system turn): the read equals a hooked
    forward, and the segments split the chat turn where the text is. Generation is left to the tiny
    model's tests: decoding on a shared CPU takes seconds a token."""
    gen = torch.Generator().manual_seed(0)
    dirs = {r: torch.randn(embedded.hidden_size, generator=gen) for r in ("a", "b")}
    text = "What causes a fever?"
    trace = monitor(embedded, text, dirs, 10)
    ids, user_ids = rendered(embedded, text)
    assert list(trace.token_ids) == ids
    want = by_hand(embedded, ids, dirs, 10)
    torch.testing.assert_close(trace.values, want, rtol=1e-3, atol=1e-3)
    user = [j for j, s in enumerate(trace.segments) if s == "user"]
    assert user == user_ids and "".join(trace.tokens[j] for j in user) == text
    assert trace.segments[0] == "template" and trace.segments[-1] == "post-instruction"
    assert count_hooks(embedded.model) == 0
