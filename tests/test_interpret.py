from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import torch

from rolevec.analysis.interpret import (
    DEFAULT_PROMPT,
    FORMAT,
    greedy_ids,
    interpret_roles,
    judge_related,
    load_interpret,
    logit_lens,
    parse_verdict,
    patch_scope,
    placeholder_positions,
    save_interpret,
)
from rolevec.errors import RolevecError
from rolevec.model.hooks import count_hooks, hooked, input_hook
from rolevec.model.loading import ModelAdapter
from rolevec.model.testing import make_adapter
from rolevec.steering.interventions import Steering
from rolevec.vectors.role_vectors import RoleVectors


# --- a fake OpenAI-compatible judge on 127.0.0.1 ------------------------------------------------------
class FakeJudge(ThreadingHTTPServer):
    mode = "ok"
    requests: list[dict[str, Any]]
    headers_seen: list[dict[str, str]]


class _Handler(BaseHTTPRequestHandler):
    server: FakeJudge

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append({"path": self.path, "body": body})
        self.server.headers_seen.append(dict(self.headers))
        if self.server.mode == "500":
            self._send(500, b'{"error": "boom"}')
            return
        if self.server.mode == "not-openai":
            self._send(200, b'{"result": "yes"}')
            return
        if self.server.mode == "latin1":  # JSON in another encoding than UTF-8
            self._send(200, '{"choices": [{"message": {"content": "s\u00ed"}}]}'.encode("latin-1"))
            return
        question = body["messages"][-1]["content"].lower()
        text = question.split("\n")[1]
        if self.server.mode == "by-kind":  # yes to word lists, no to texts
            answer = "Yes." if text.startswith("word list:") else "No"
        else:
            related = "medic" in text or "doctor" in text
            answer = "Yes." if related else "No" if "weather" in text else "Perhaps"
        self._send(
            200, json.dumps({"choices": [{"message": {"role": "assistant", "content": answer}}]}).encode()
        )

    def _send(self, code: int, payload: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


@pytest.fixture
def judge() -> Iterator[FakeJudge]:
    server = FakeJudge(("127.0.0.1", 0), _Handler)
    server.requests, server.headers_seen = [], []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def _url(server: FakeJudge) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}"


# --- patch-scoping ------------------------------------------------------------------------------------
@pytest.mark.parametrize("template", ["chatml", "no_system"])
def test_placeholder_positions_cover_the_diamond(template: str) -> None:
    adapter = make_adapter("llama", template=template)
    text = adapter.render(DEFAULT_PROMPT)
    ids, positions = placeholder_positions(adapter, text)
    assert ids == adapter.encode([text]).input_ids[0].tolist()
    assert positions == list(range(positions[0], positions[-1] + 1))  # contiguous
    assert "♦" in adapter.tokenizer.decode([ids[i] for i in positions])
    assert "♦" not in adapter.tokenizer.decode(ids[: positions[0]] + ids[positions[-1] + 1 :])
    with pytest.raises(RolevecError, match="placeholder"):
        placeholder_positions(adapter, adapter.render("no diamond here"))


def _inputs_at(adapter: ModelAdapter, ids: list[int], layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    seen: list[torch.Tensor] = []

    def keep(x: torch.Tensor) -> None:
        seen.append(x.detach().clone())

    batch = adapter.pad([ids])
    with torch.inference_mode(), hooked(pre=[(adapter.residual_site(layer), input_hook(keep))]):
        logits = adapter.model(**batch.model_kwargs()).logits
    return seen[0], logits


def test_steering_at_tokens_shifts_only_the_placeholder(tiny_llama: ModelAdapter) -> None:
    adapter = tiny_llama
    ids, positions = placeholder_positions(adapter, adapter.render(DEFAULT_PROMPT))
    torch.manual_seed(0)
    d = torch.randn(adapter.hidden_size)
    clean, clean_logits = _inputs_at(adapter, ids, 1)
    with Steering.addition(d, layer=1, alpha=3.0, tokens=positions).apply(adapter):
        steered, steered_logits = _inputs_at(adapter, ids, 1)
        # a one-token forward (a decoding step with the KV cache) is left alone
        other, _ = _inputs_at(adapter, ids[-1:], 1)
    assert count_hooks(adapter.model) == 0
    expected = torch.zeros_like(clean)
    expected[0, positions] = 3.0 * d
    torch.testing.assert_close(steered - clean, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(other, _inputs_at(adapter, ids[-1:], 1)[0])
    assert count_hooks(adapter.model) == 0
    first = positions[0]
    torch.testing.assert_close(steered_logits[:, :first], clean_logits[:, :first])  # causal: before ♦
    assert not torch.allclose(steered_logits[:, -1], clean_logits[:, -1])  # after ♦ the answer moves


def test_patch_scope_steers_the_generation(tiny_llama: ModelAdapter) -> None:
    adapter = tiny_llama
    ids, positions = placeholder_positions(adapter, adapter.render(DEFAULT_PROMPT))
    torch.manual_seed(1)
    d = 20 * torch.randn(adapter.hidden_size)
    plain = greedy_ids(adapter, ids, 8)
    with Steering.addition(d, layer=1, alpha=3.0, tokens=positions).apply(adapter):
        steered = greedy_ids(adapter, ids, 8)
    assert steered != plain
    scope = patch_scope(adapter, d, 1, max_new_tokens=8)
    assert scope.where == "placeholder" and list(scope.positions) == positions
    assert scope.unsteered == adapter.tokenizer.decode(plain, skip_special_tokens=True).strip()
    everywhere = patch_scope(adapter, d, 1, max_new_tokens=8, where="all", unsteered="given")
    assert everywhere.unsteered == "given" and len(everywhere.positions) == len(ids)
    assert count_hooks(adapter.model) == 0


def test_patch_scope_rejects_bad_input(tiny_llama: ModelAdapter) -> None:
    d = torch.ones(tiny_llama.hidden_size)
    with pytest.raises(RolevecError, match="where"):
        patch_scope(tiny_llama, d, 1, where="middle")
    with pytest.raises(RolevecError, match="hidden size"):
        patch_scope(tiny_llama, torch.ones(3), 1)
    with pytest.raises(RolevecError, match="out of range"):
        patch_scope(tiny_llama, d, 99)
    with pytest.raises(RolevecError, match="placeholder"):
        patch_scope(tiny_llama, d, 1, prompt="What is this?")


# --- logit lens ---------------------------------------------------------------------------------------
def test_logit_lens_matches_a_manual_readout(tiny: ModelAdapter) -> None:
    torch.manual_seed(2)
    d = torch.randn(tiny.hidden_size)
    with torch.inference_mode():
        normed = tiny.unembed(tiny.final_norm(d.view(1, 1, -1)))[0, 0]
        raw = tiny.unembed.weight @ d
    for variant, expected in (("normed", normed), ("raw", raw)):
        lens = logit_lens(tiny, d, top_k=4, normed=variant == "normed")
        top, bottom = torch.topk(expected, 4), torch.topk(-expected, 4)
        assert [t.id for t in lens.top] == top.indices.tolist()
        assert [t.id for t in lens.bottom] == bottom.indices.tolist()
        assert [t.logit for t in lens.top] == pytest.approx(top.values.tolist(), rel=1e-5)
        assert lens.top[0].token == tiny.tokenizer.decode([lens.top[0].id])


def test_logit_lens_rejects_bad_k(tiny_llama: ModelAdapter) -> None:
    with pytest.raises(RolevecError, match="top_k"):
        logit_lens(tiny_llama, torch.ones(tiny_llama.hidden_size), top_k=0)


# --- judge --------------------------------------------------------------------------------------------
def test_parse_verdict() -> None:
    assert parse_verdict("Yes.") is True
    assert parse_verdict("no, it is not") is False
    assert parse_verdict("I think: YES") is True
    assert parse_verdict("Perhaps") is None and parse_verdict("") is None


def test_judge_against_a_local_server(judge: FakeJudge) -> None:
    yes = judge_related(_url(judge), "doctor", "a medical professional", api_key="k-123", model="m")
    assert yes.related is True and yes.answer == "Yes."
    no = judge_related(_url(judge) + "/v1/", "doctor", "the weather")
    assert no.related is False
    unclear = judge_related(_url(judge) + "/v1/chat/completions", "doctor", "a car")
    assert unclear.related is None and unclear.answer == "Perhaps"
    assert [r["path"] for r in judge.requests] == ["/v1/chat/completions"] * 3
    assert judge.requests[0]["body"]["model"] == "m" and judge.requests[0]["body"]["temperature"] == 0
    assert judge.headers_seen[0]["Authorization"] == "Bearer k-123"
    assert "Authorization" not in judge.headers_seen[1]


def test_judge_failures_are_clear(judge: FakeJudge) -> None:
    judge.mode = "500"
    with pytest.raises(RolevecError, match="HTTP 500"):
        judge_related(_url(judge), "doctor", "x")
    judge.mode = "not-openai"
    with pytest.raises(RolevecError, match="OpenAI-compatible"):
        judge_related(_url(judge), "doctor", "x")
    judge.mode = "latin1"
    with pytest.raises(RolevecError, match="did not answer with UTF-8 JSON"):
        judge_related(_url(judge), "doctor", "x")
    port = judge.server_address[1]
    judge.shutdown()
    judge.server_close()
    with pytest.raises(RolevecError, match="cannot reach"):
        judge_related(f"http://127.0.0.1:{port}", "doctor", "x", timeout=5)


# --- all roles ----------------------------------------------------------------------------------------
def _tiny_run(adapter: ModelAdapter) -> tuple[RoleVectors, dict[str, Any]]:
    gen = torch.Generator().manual_seed(0)
    shape = (2, adapter.n_layers + 1, adapter.hidden_size)
    base = torch.randn(shape, generator=gen)
    means = {r: base + 5 * torch.randn(shape, generator=gen) for r in ("doctor", "lawyer", "nurse")}
    vectors = RoleVectors(means, base, (-2, -1), ("a", "b"), {"model_fingerprint": adapter.fingerprint()})
    selection = {
        "roles": {
            "doctor": {"domain": "medicine", "layer": 1, "position": -1, "alpha": 3.0},
            "lawyer": {"domain": "law", "layer": 2, "position": -2, "alpha": 1.0},
            "nurse": {"domain": "medicine", "layer": None, "position": None},
        }
    }
    return vectors, selection


def test_interpret_roles_writes_the_documented_format(
    tiny_llama: ModelAdapter, judge: FakeJudge, tmp_path: Path
) -> None:
    vectors, selection = _tiny_run(tiny_llama)
    judge.mode = "by-kind"
    out = interpret_roles(
        tiny_llama, vectors, selection, top_k=3, max_new_tokens=4, judge_url=_url(judge), progress=False
    )
    assert out["format"] == FORMAT and out["where"] == "placeholder" and out["alpha"] == 3.0
    assert out["judge"]["url"] == _url(judge)
    assert set(out["roles"]) == {"doctor", "lawyer", "nurse"}
    assert "skipped" in out["roles"]["nurse"]
    doctor = out["roles"]["doctor"]
    assert (doctor["layer"], doctor["position"]) == (1, -1)
    assert doctor["vector_norm"] == pytest.approx(float(vectors.vector("doctor", 1, -1).norm()))
    assert doctor["patchscope"]["unsteered"] == out["unsteered"]
    assert [len(doctor["logit_lens"][v][k]) for v in ("normed", "raw") for k in ("top", "bottom")] == [3] * 4
    assert len(judge.requests) == 4  # two verdicts for each of the two roles with a site
    asked = [r["body"]["messages"][-1]["content"] for r in judge.requests]
    for name in ("doctor", "lawyer"):
        entry = out["roles"][name]
        # the verdicts are the judge's replies, to the steered text and to the normed lens's top words
        assert entry["judge"] == {
            "patchscope": {"related": False, "answer": "No"},
            "logit_lens": {"related": True, "answer": "Yes."},
        }
        words = ", ".join(repr(t["token"]) for t in entry["logit_lens"]["normed"]["top"])
        steered = entry["patchscope"]["steered"]
        assert any(a.startswith(f"Profession: {name}\nText: {steered}\n") for a in asked)
        assert any(a.startswith(f"Profession: {name}\nWord list: {words}\n") for a in asked)
    path = save_interpret(out, tmp_path / "interpret.json")
    assert load_interpret(path) == json.loads(json.dumps(out))
    with pytest.raises(RolevecError, match="`force=True`"):
        save_interpret(out, path)
    save_interpret(out, path, force=True)


def test_interpret_roles_checks_roles_and_model(tiny_llama: ModelAdapter, tmp_path: Path) -> None:
    vectors, selection = _tiny_run(tiny_llama)
    with pytest.raises(RolevecError, match="no chosen"):
        interpret_roles(tiny_llama, vectors, selection, roles=["poet"], progress=False)
    only = interpret_roles(tiny_llama, vectors, selection, roles=["lawyer"], max_new_tokens=2, progress=False)
    assert list(only["roles"]) == ["lawyer"] and only["judge"] is None
    other = make_adapter("llama", n_layers=4)
    with pytest.raises(RolevecError, match="extract vectors"):
        interpret_roles(other, vectors, selection, progress=False)
    (tmp_path / "bad.json").write_text("{}", encoding="utf-8")
    with pytest.raises(RolevecError, match=r"not a rolevec interpret\.json"):
        load_interpret(tmp_path / "bad.json")


def test_selection_and_interpret_files_bom_bad_bytes_and_broken_json(
    tiny_llama: ModelAdapter, tmp_path: Path
) -> None:
    vectors, selection = _tiny_run(tiny_llama)
    bom = tmp_path / "selection.json"
    bom.write_bytes(b"\xef\xbb\xbf" + json.dumps(selection).encode())
    out = interpret_roles(tiny_llama, vectors, bom, roles=["lawyer"], max_new_tokens=2, progress=False)
    assert list(out["roles"]) == ["lawyer"]
    saved = save_interpret(out, tmp_path / "interpret.json")
    again = tmp_path / "bom_interpret.json"
    again.write_bytes(b"\xef\xbb\xbf" + saved.read_bytes())
    assert load_interpret(again) == load_interpret(saved)
    latin1 = tmp_path / "latin1.json"
    latin1.write_bytes(b'{\n "roles": {"caf\xe9": {}}\n}')
    with pytest.raises(RolevecError, match=r"selection file .*latin1\.json is not UTF-8 .*line 2\)"):
        interpret_roles(tiny_llama, vectors, latin1, progress=False)
    with pytest.raises(RolevecError, match=r"interpret file .*latin1\.json is not UTF-8 .*line 2\)"):
        load_interpret(latin1)
    broken = tmp_path / "broken.json"
    broken.write_text('{\n "roles": {\n', encoding="utf-8")
    with pytest.raises(RolevecError, match=r"selection file .*broken\.json:3: malformed JSON.*sweep") as err:
        interpret_roles(tiny_llama, vectors, broken, progress=False)
    assert "\n" not in str(err.value)
    with pytest.raises(RolevecError, match=r"interpret file .*broken\.json:3: malformed JSON"):
        load_interpret(broken)


@pytest.mark.e2e
def test_embedded_lens_and_patch_scope(embedded: ModelAdapter) -> None:
    """The centred unembedding row of ' doctor' reads back as ' doctor' and steers the answer."""
    token = embedded.tokenizer(" doctor", add_special_tokens=False)["input_ids"]
    assert len(token) == 1
    weight = embedded.unembed.weight
    d = (weight[token[0]] - weight.mean(0)).float()
    d = 40 * d / d.norm()
    lens = logit_lens(embedded, d, top_k=5)
    assert " doctor" in [t.token for t in lens.top]
    scope = patch_scope(embedded, d, 10, max_new_tokens=12)
    assert scope.steered and scope.unsteered and scope.steered != scope.unsteered
    assert len(scope.positions) >= 1 and count_hooks(embedded.model) == 0
