from __future__ import annotations

import base64
import csv
import io
import json
import re
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path

import pytest

from rolevec.analysis.interpret import interpret_roles, save_interpret
from rolevec.analysis.report import write_report
from rolevec.analysis.tables import analyse, load_records
from rolevec.cli import main
from rolevec.errors import RolevecError
from rolevec.model.testing import make_adapter
from synthetic_run import make_run_dir, make_selection, make_vectors

VOID = {"meta", "img", "br", "hr", "link", "input"}
IMG = re.compile(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


class Balance(HTMLParser):
    """Checks that every opened tag is closed in order (void tags excepted)."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.errors: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag not in VOID:
            self.errors.append(f"<{tag} /> is not a void element")

    def handle_endtag(self, tag: str) -> None:
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
        else:
            self.stack.pop()


def _check_html(text: str) -> list[bytes]:
    parser = Balance()
    parser.feed(text)
    parser.close()
    assert parser.errors == [] and parser.stack == []
    ET.fromstring(text.split("\n", 1)[1])  # also well-formed XML once the doctype line is dropped
    pngs = [base64.b64decode(m) for m in IMG.findall(text)]
    assert pngs and all(p.startswith(b"\x89PNG\r\n\x1a\n") for p in pngs)
    import matplotlib.image

    for png in pngs:
        assert matplotlib.image.imread(io.BytesIO(png), format="png").ndim == 3  # decodes as an image
    return pngs


def test_full_report(tmp_path: Path) -> None:
    run = make_run_dir(tmp_path / "run")
    files = write_report(run)
    text = files.html.read_text(encoding="utf-8")
    pngs = _check_html(text)
    # baseline, 5 heatmaps (persona, add α=1, add α=3, ablate, random), bars, sweep, similarity, PCA, norms
    assert len(pngs) == len(files.figures) == 11
    assert {p.read_bytes() for p in files.figures} == set(pngs)
    assert "Small sample" in text and "n = 30" in text
    assert "&lt;b&gt;&amp; \\x17" in text  # model text is escaped, control characters shown
    for title in ("Layer sweep", "Interpretation", "Geometry", "In-domain vs out-of-domain", "Patch-scoping"):
        assert title in text
    assert "synthetic-model" in text and "smoke" in text
    md = files.markdown.read_text(encoding="utf-8")
    assert "| role | domain | condition | in-domain n |" in md and "figures/sweep.png" in md
    assert "&lt;b&gt;" in md  # no raw HTML from model text in the Markdown either
    names = {p.name for p in files.tables}
    assert {
        "baseline.csv",
        "summary.csv",
        "cells.csv",
        "rel_add_a3.csv",
        "judge.csv",
        "similarity.csv",
    } <= names
    assert all(p.parent == run / "tables" for p in files.tables)


def test_csv_numbers_match_the_analysis(tmp_path: Path) -> None:
    run = make_run_dir(tmp_path / "run", n=40, seed=5)
    files = write_report(run)
    a = analyse(load_records(run), selection=json.loads((run / "selection.json").read_text()))
    with (run / "tables" / "cells.csv").open(encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(a.cells)
    for row in rows[:20]:
        cell = a.cell(row["role"], row["condition"], row["domain"])
        assert cell is not None
        assert int(row["n"]) == cell.stats.n == 40
        assert float(row["accuracy"]) == pytest.approx(cell.stats.accuracy)
        low, high = cell.stats.ci
        assert float(row["95% CI (%) low"]) == pytest.approx(low) and float(row["95% CI (%) high"]) == high
        assert float(row["McNemar p"]) == pytest.approx(cell.stats.p_value)
    with (run / "tables" / "rel_add_a3.csv").open(encoding="utf-8") as fh:
        matrix = {r["role"]: r for r in csv.DictReader(fh)}
    cell = a.cell("doctor", "add α=3", "medicine")
    assert cell is not None and float(matrix["doctor"]["medicine"]) == pytest.approx(cell.stats.rel_change)
    assert files.html.exists()


def test_judge_share_counts_improving_directions(tmp_path: Path) -> None:
    run = make_run_dir(tmp_path / "run")
    write_report(run)
    with (run / "tables" / "judge.csv").open(encoding="utf-8") as fh:
        rows = {r["source"]: r for r in csv.DictReader(fh)}
    # synthetic: the judge calls roles 0 and 2 related; every α=3 addition improves its own domain
    assert rows["patchscope"]["improving directions judged"] == "3"
    assert rows["patchscope"]["related"] == "2"
    assert float(rows["patchscope"]["share"]) == pytest.approx(2 / 3)
    assert rows["logit_lens"]["improving directions judged"] == "0" and rows["logit_lens"]["share"] == ""


def test_missing_optional_inputs_are_reported_not_fatal(tmp_path: Path) -> None:
    run = make_run_dir(tmp_path / "run", optional=False, n=120)
    files = write_report(run)
    text = files.html.read_text(encoding="utf-8")
    _check_html(text)
    assert "Not run: no sweep.jsonl" in text
    assert "Not run: no interpret.json" in text
    assert "Not run: no vectors.safetensors" in text
    assert "No manifest.json" in text
    assert "Small sample" not in text  # 120 questions per cell
    assert len(files.figures) == 7  # baseline, heatmaps and bars only


def test_broken_optional_file_is_a_note(tmp_path: Path) -> None:
    run = make_run_dir(tmp_path / "run")
    (run / "vectors.safetensors").write_bytes(b"not safetensors")
    (run / "interpret.json").write_text("{", encoding="utf-8")
    text = write_report(run).html.read_text(encoding="utf-8")
    assert "not a readable safetensors" in text and "interpret.json is not readable JSON" in text
    (run / "selection.json").write_text("[1, 2]", encoding="utf-8")  # damaged: a warning, not silence
    with pytest.warns(UserWarning, match="selection.json is not a JSON object"):
        write_report(run, force=True)


def test_without_records_it_says_what_to_run(tmp_path: Path) -> None:
    with pytest.raises(RolevecError, match="rolevec evaluate"):
        write_report(tmp_path)
    with pytest.raises(RolevecError, match="does not exist"):
        write_report(tmp_path / "nowhere")
    (tmp_path / "records.jsonl").write_text("", encoding="utf-8")  # an evaluation that wrote nothing yet
    with pytest.raises(RolevecError, match="holds no records yet"):
        write_report(tmp_path)
    (tmp_path / "file.txt").write_text("x", encoding="utf-8")
    with pytest.raises(RolevecError, match="is a file, not a folder"):
        write_report(tmp_path / "file.txt")


def test_cli_refuses_to_overwrite_without_force(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = make_run_dir(tmp_path / "run", optional=False)
    assert main(["report", str(run)]) == 0
    assert "report.html" in capsys.readouterr().out
    assert main(["report", str(run)]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["report", str(run), "--force"]) == 0
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "rolevec: error:" in capsys.readouterr().err


def test_single_role_report(tmp_path: Path) -> None:
    run = make_run_dir(tmp_path / "run", roles=["doctor"])
    text = write_report(run).html.read_text(encoding="utf-8")
    _check_html(text)
    assert "PCA needs at least two roles" in text


def test_report_reads_what_interpret_roles_writes(tmp_path: Path) -> None:
    run = make_run_dir(tmp_path / "run", optional=False)
    adapter = make_adapter("llama", n_layers=6)
    vectors = make_vectors(hidden=adapter.hidden_size)
    out = interpret_roles(adapter, vectors, make_selection(), top_k=2, max_new_tokens=3, progress=False)
    save_interpret(out, run / "interpret.json")
    text = write_report(run).html.read_text(encoding="utf-8")
    _check_html(text)
    assert "Patch-scoping" in text and "No LLM judge was used" in text
    with (run / "tables" / "logit_lens.csv").open(encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert {(r["role"], r["variant"]) for r in rows} == {
        (role, variant) for role in out["roles"] for variant in ("normed", "raw")
    }
