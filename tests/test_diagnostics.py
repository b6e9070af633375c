"""Diagnostics of role vectors: per-prompt reads at one site, the statistics by hand, the random null, the
study step that writes diagnostics.json and the report that shows it."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from rolevec.analysis.report import write_report
from rolevec.data.mcq import builtin_mcq_dir
from rolevec.errors import RolevecError
from rolevec.model.hooks import count_hooks
from rolevec.model.loading import ModelAdapter
from rolevec.model.testing import make_adapter
from rolevec.study import stages
from rolevec.study.pipeline import StudyConfig, config_from, run_study
from rolevec.vectors import diagnostics as diag
from rolevec.vectors.diagnostics import auroc, diagnose, diagnose_activations, site_activations
from rolevec.vectors.extraction import mean_activations


def _tiny_config() -> StudyConfig:
    options = {"roles": "mathematician,lawyer", "domains": "math,law", "n_prompts": 6, "n_base": 8}
    options |= {"mcq": str(builtin_mcq_dir()), "val_limit": 4, "test_limit": 4, "positions": "-1,-2"}
    return config_from(None, None, {**options, "dtype": "float32", "interpret": False})


ROLE = ["Explain how a cell divides.", "What is a contract?", "Describe the sea at night, slowly.", "Hi"]
BASE = ["Tell me a story.", "Why is the sky blue?", "List three fruits.", "ok", "What time is it?"]


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm()))


def test_site_activations_are_the_per_prompt_reads_extraction_averages(tiny_llama: ModelAdapter) -> None:
    mean = mean_activations(tiny_llama, ROLE, progress=False, batch_size=2)
    for layer in (0, tiny_llama.n_layers - 1, tiny_llama.n_layers):
        for position in (-1, tiny_llama.chat.positions[0]):
            acts = site_activations(tiny_llama, ROLE, layer, position, batch_size=3)
            assert acts.shape == (len(ROLE), tiny_llama.hidden_size) and acts.dtype == torch.float64
            index = tiny_llama.chat.positions.index(position)
            torch.testing.assert_close(acts.mean(0), mean[index, layer], rtol=1e-6, atol=1e-7)
    one = site_activations(tiny_llama, ROLE, 1, -1, batch_size=1)
    torch.testing.assert_close(one, site_activations(tiny_llama, ROLE, 1, -1, batch_size=4))
    assert count_hooks(tiny_llama.model) == 0
    with pytest.raises(RolevecError, match="`position`"):
        site_activations(tiny_llama, ROLE, 1, 5)
    assert count_hooks(tiny_llama.model) == 0


def test_auroc_is_the_mann_whitney_statistic() -> None:
    gen = torch.Generator().manual_seed(3)
    pos = torch.randn(7, generator=gen).round(decimals=1)
    neg = (torch.randn(9, generator=gen) - 0.5).round(decimals=1)
    neg[0] = pos[0]  # a tie counts half
    u = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos.tolist() for n in neg.tolist())
    assert auroc(pos, neg) == pytest.approx(u / (len(pos) * len(neg)))
    assert auroc(torch.tensor([2.0, 3.0]), torch.tensor([0.0, 1.0])) == 1.0


def test_diagnostics_by_hand_on_a_tiny_model(tiny_llama: ModelAdapter) -> None:
    got = diagnose(tiny_llama, ROLE, BASE, 1, -1, folds=3, bootstraps=5, n_random=8, seed=1)
    role = site_activations(tiny_llama, ROLE, 1, -1)
    base = site_activations(tiny_llama, BASE, 1, -1)
    d = role.mean(0) - base.mean(0)
    cosines = [_cos(x - base.mean(0), d) for x in role]
    assert got.consistency == pytest.approx(sum(cosines) / len(cosines))
    assert got.norm == pytest.approx(float(d.norm()))
    assert (got.n_role, got.n_base, got.folds, got.layer, got.position) == (4, 5, 3, 1, -1)
    assert 0.0 <= got.separation <= 1.0 and -1.0 <= got.stability <= 1.0
    assert set(got.thresholds) == set(diag.CHECKED)
    assert set(got.shuffle_thresholds) == set(diag.CHECKED) and got.shuffles == diag.DEFAULT_SHUFFLES
    bars = {n: max(got.thresholds[n], got.shuffle_thresholds[n]) for n in diag.CHECKED}
    assert got.flagged == tuple(n for n in diag.CHECKED if not getattr(got, n) > bars[n])
    assert count_hooks(tiny_llama.model) == 0


def _planted(
    gen: torch.Generator, shift: float, n: int = 40, h: int = 32
) -> tuple[torch.Tensor, torch.Tensor]:
    direction = torch.zeros(h, dtype=torch.float64)
    direction[0] = 1.0
    base = torch.randn(n, h, generator=gen, dtype=torch.float64)
    role = torch.randn(n, h, generator=gen, dtype=torch.float64) + shift * direction
    return role, base


def test_a_planted_direction_beats_random_directions_and_noise_does_not() -> None:
    gen = torch.Generator().manual_seed(0)
    strong = diagnose_activations(*_planted(gen, 4.0), layer=0, position=-1)
    assert strong.flagged == ()
    assert strong.separation > 0.95 and strong.stability > 0.8 and strong.split_half > 0.5
    for name in diag.CHECKED:
        assert getattr(strong, name) > strong.thresholds[name]
        assert getattr(strong, name) > strong.shuffle_thresholds[name]
    noise = diagnose_activations(*_planted(gen, 0.0), layer=0, position=-1)
    # Against random directions only the cross-fitted separation sees through noise: bootstrap resamples
    # share most prompts and each prompt is part of the mean it is compared with, so the stability and
    # consistency of a noise vector beat random directions. Label shuffles have the same advantage, so
    # against them the noise vector is flagged on every diagnostic.
    assert noise.consistency > noise.thresholds["consistency"]
    assert noise.stability > noise.thresholds["stability"]
    assert noise.flagged == diag.CHECKED
    assert abs(noise.separation - 0.5) < 0.2  # cross-fitted: a direction fitted to noise scores ~0.5
    # The in-sample AUROC of the vector fitted to all prompts is optimistic; the cross-fitted one is not.
    role, base = _planted(torch.Generator().manual_seed(5), 0.0)
    unit = (role.mean(0) - base.mean(0)) / (role.mean(0) - base.mean(0)).norm()
    crossed = diagnose_activations(role, base, layer=0, position=-1).separation
    assert auroc(role @ unit, base @ unit) > crossed


def test_random_null_thresholds_are_the_95th_percentile_of_random_directions() -> None:
    role, base = _planted(torch.Generator().manual_seed(2), 1.0, n=12, h=16)
    got = diagnose_activations(role, base, layer=0, position=-1, n_random=30, seed=4)
    # The null of stability: cosines of independent random directions, spread ~ 1/sqrt(H) around 0.
    assert 0.0 < got.thresholds["stability"] < 4 / math.sqrt(16)
    assert 0.5 <= got.thresholds["separation"] <= 1.0
    wide = diagnose_activations(role, base, layer=0, position=-1, n_random=200, seed=4)
    assert abs(wide.thresholds["consistency"] - got.thresholds["consistency"]) < 0.3


def test_shuffle_null_leaves_the_values_and_random_null_alone_and_scales_with_the_noise() -> None:
    role, base = _planted(torch.Generator().manual_seed(3), 0.0, n=24, h=32)
    few = diagnose_activations(role, base, layer=0, position=-1, shuffles=5)
    many = diagnose_activations(role, base, layer=0, position=-1, shuffles=40)
    # drawn after everything else: the shuffle count changes only the shuffle null
    for name in (*diag.CHECKED, "split_half", "thresholds"):
        assert getattr(few, name) == getattr(many, name)
    assert few.shuffle_thresholds != many.shuffle_thresholds
    # on noise, a shuffled split is as consistent as the real one: its bar sits far above the random one
    assert many.shuffle_thresholds["consistency"] > many.thresholds["consistency"] + 0.05
    assert abs(many.shuffle_thresholds["separation"] - 0.5) < 0.2
    with pytest.raises(RolevecError, match="`shuffles`"):
        diagnose_activations(role, base, layer=0, position=-1, shuffles=1)


def test_diagnostics_are_deterministic_by_seed() -> None:
    role, base = _planted(torch.Generator().manual_seed(1), 1.0, n=16, h=8)
    first = diagnose_activations(role, base, layer=2, position=-1, seed=7)
    assert first == diagnose_activations(role, base, layer=2, position=-1, seed=7)
    other = diagnose_activations(role, base, layer=2, position=-1, seed=8)
    assert other.consistency == first.consistency  # no randomness in consistency
    assert (other.stability, other.thresholds) != (first.stability, first.thresholds)


def test_bad_inputs_say_what_to_pass() -> None:
    role, base = _planted(torch.Generator().manual_seed(1), 1.0, n=4, h=8)
    with pytest.raises(RolevecError, match="`n_prompts`"):
        diagnose_activations(role[:1], base, layer=0, position=-1)
    with pytest.raises(RolevecError, match="`folds`"):
        diagnose_activations(role, base, layer=0, position=-1, folds=1)
    with pytest.raises(RolevecError, match="site_activations"):
        diagnose_activations(role, base[:, :4], layer=0, position=-1)


def test_study_writes_diagnostics_resumes_and_reports_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    adapter = make_adapter("llama")
    lines: list[str] = []
    run_study(adapter, _tiny_config(), tmp_path, progress=False, log=lines.append)
    data = json.loads((tmp_path / "diagnostics.json").read_text())
    selection = json.loads((tmp_path / "selection.json").read_text())
    assert set(data["roles"]) == {"mathematician", "lawyer"}
    for role, entry in data["roles"].items():
        site = selection["roles"][role]
        assert (entry["layer"], entry["position"]) == (site["layer"], site["position"])
        assert set(entry["thresholds"]) == {"consistency", "separation", "stability"}
    assert any(line.strip() == "diagnostics" for line in lines)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert "diagnostics" in manifest["timings_s"]

    def refuse(*_: object, **__: object) -> torch.Tensor:
        raise AssertionError("diagnostics were recomputed")

    monkeypatch.setattr(diag, "site_activations", refuse)
    before = (tmp_path / "diagnostics.json").read_bytes()
    run_study(adapter, _tiny_config(), tmp_path, progress=False, log=lambda _: None)
    stages.diagnose_sites(adapter, _prompts(tmp_path), tmp_path, ["lawyer"], progress=False)
    assert (tmp_path / "diagnostics.json").read_bytes() == before
    monkeypatch.undo()
    other = _prompts(tmp_path)  # other prompts for one role (as a forced rerun may sample): it is redone
    changed = {
        **other.roles,
        "lawyer": replace(other.roles["lawyer"], prompts=other.roles["lawyer"].prompts[:-1]),
    }
    redone = stages.diagnose_sites(
        adapter, replace(other, roles=changed), tmp_path, ["lawyer", "mathematician"], progress=False
    )
    assert redone["roles"]["lawyer"]["n_role"] == data["roles"]["lawyer"]["n_role"] - 1
    assert redone["roles"]["mathematician"] == data["roles"]["mathematician"]
    (tmp_path / "diagnostics.json").write_bytes(before)

    md = (tmp_path / "report.md").read_text()
    assert "## Which vectors to trust" in md and "consistency random 95%" in md
    assert "(figures/diagnostics.png)" in md and (tmp_path / "figures" / "diagnostics.png").is_file()
    assert (tmp_path / "tables" / "diagnostics.csv").is_file()
    assert 'alt="diagnostics vs effect"' in (tmp_path / "report.html").read_text()

    (tmp_path / "diagnostics.json").unlink()  # an older run: the report renders, saying so
    write_report(tmp_path, force=True)
    md = (tmp_path / "report.md").read_text()
    assert "Diagnostics are absent: no diagnostics.json" in md and "diagnostics.png" not in md


def _prompts(run_dir: Path) -> stages.StudyPrompts:
    return stages.StudyPrompts.from_json(json.loads((run_dir / "prompts.json").read_text()))
