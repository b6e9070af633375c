from __future__ import annotations

import json
import re
import socket
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest
import torch

from rolevec.cli import main
from rolevec.data.prompts import (
    TASK_TYPES,
    LocalGenerator,
    OpenAIGenerator,
    clean_instruction,
    generate_prompts,
    load_personas,
    select_personas,
)
from rolevec.data.sources import load_prompts
from rolevec.errors import RolevecError
from rolevec.model.loading import ModelAdapter

PERSONAS = [
    "A retired mathematician who loves number theory puzzles.",
    "A pastry chef from Lyon who bakes for weddings.",
    "An applied Mathematician working on fluid dynamics for wind turbines.",
    "A high-school teacher who once studied mathematics.",
    "Two mathematicians writing a textbook on topology.",
]


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        (
            "Prove that the square root of two is irrational.",
            "Prove that the square root of two is irrational.",
        ),
        ("Sure! Here is one:\n\nExplain why primes are infinite.", "Explain why primes are infinite."),
        ('Instruction: "Design a fair dice game for kids."', "Design a fair dice game for kids."),
        (
            "1. **Compare two proofs of Fermat's little theorem**",
            "Compare two proofs of Fermat's little theorem",
        ),
        ("Solve: how many primes are below 100?", "Solve: how many primes are below 100?"),
        ("Design: Design a wind turbine blade model.", "Design a wind turbine blade model."),
        (
            'This person might ask: "What is the best way to model turbulent flow?"',
            "What is the best way to model turbulent flow?",
        ),
        # generator commentary as found in the paper's data is cut off
        (
            "Explain why my teen's energy crashes after sugary snacks\n\n"
            "This prompt fits the persona because:\n- It's from a mother's perspective",
            "Explain why my teen's energy crashes after sugary snacks",
        ),
        (
            "What is the difference between an ETF and a mutual fund?\n\nNote: This fits the persona because",
            "What is the difference between an ETF and a mutual fund?",
        ),
        (
            "Design a fraction game for class. (This reflects the persona's interests)",
            "Design a fraction game for class.",
        ),
        ("Explain why a musical note has a pitch.", "Explain why a musical note has a pitch."),
        ("Hi", None),
        ("", None),
        ("Describe the persona of this mathematician in detail.", None),
        (" ".join(["word"] * 50), None),
    ],
)
def test_clean_instruction(reply: str, expected: str | None) -> None:
    assert clean_instruction(reply) == expected


def _personas_file(tmp_path: Path, personas: Sequence[str] = PERSONAS) -> Path:
    path = tmp_path / "personas.jsonl"
    path.write_text("".join(json.dumps({"persona": p, "id": i}) + "\n" for i, p in enumerate(personas)))
    return path


def test_load_and_select_personas(tmp_path: Path) -> None:
    assert load_personas(_personas_file(tmp_path)) == PERSONAS
    picked = select_personas(PERSONAS, "mathematician", seed=42)
    assert sorted(picked) == sorted([PERSONAS[0], PERSONAS[2], PERSONAS[4]])  # not "mathematics"
    assert select_personas(PERSONAS, "mathematician", seed=42) == picked
    assert select_personas(["A Data-Scientist at a bank."], "data_scientist", seed=0) != []
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"persona": "ok person"}\n{"persona": \n')
    with pytest.raises(RolevecError, match=r"bad\.jsonl:2: malformed JSON line"):
        load_personas(bad)
    nofield = tmp_path / "nofield.jsonl"
    nofield.write_text('{"persona": "ok person"}\n{"text": "x"}\n')
    with pytest.raises(RolevecError, match=r"nofield\.jsonl:2: .*'persona'"):
        load_personas(nofield)
    with pytest.raises(RolevecError, match="does not exist"):
        load_personas(tmp_path / "missing.jsonl")


def test_persona_files_bom_bad_bytes_and_json_lists(tmp_path: Path) -> None:
    jsonl = _personas_file(tmp_path)
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + jsonl.read_bytes())
    assert load_personas(bom) == PERSONAS
    listed = tmp_path / "bom.json"
    listed.write_bytes(b"\xef\xbb\xbf" + json.dumps([{"persona": p} for p in PERSONAS]).encode())
    assert load_personas(listed) == PERSONAS
    for name, data, line in (
        ("latin1.jsonl", b'{"persona": "ok person"}\n{"persona": "caf\xe9 owner"}\n', 2),
        ("latin1.json", b'[\n "ok person",\n "caf\xe9 owner"\n]', 3),
    ):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(
            RolevecError, match=rf"persona file .*{re.escape(name)} is not UTF-8 .*line {line}\)"
        ):
            load_personas(tmp_path / name)
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps(["ok person", 3]), encoding="utf-8")
    with pytest.raises(RolevecError, match=r"wrong\.json \(item 1\): expected an object"):
        load_personas(wrong)
    mapping = tmp_path / "mapping.json"  # a dict once gave its keys as personas
    mapping.write_text(json.dumps({"persona": "A mathematician."}), encoding="utf-8")
    with pytest.raises(RolevecError, match=r"mapping\.json: expected a JSON list of personas, found dict"):
        load_personas(mapping)
    broken = tmp_path / "broken.json"
    broken.write_text('[\n "ok person",\n "open\n]', encoding="utf-8")
    with pytest.raises(RolevecError, match=r"broken\.json:3: malformed JSON persona list"):
        load_personas(broken)


class FakeGenerator:
    """Replies with the task word plus the persona's first words, some with commentary, some repeated."""

    name = "fake"

    def __init__(self) -> None:
        self.requests: list[str] = []

    def complete(self, requests: Sequence[str]) -> list[str]:
        self.requests.extend(requests)
        replies = []
        for text in requests:
            task = text.split('start with "')[1].split('"')[0]
            topic = "topology" if "topology" in text else "primes"
            if task == "Solve":
                replies.append("Sure, here it is:")  # nothing usable
            elif task == "Compare":
                replies.append("Compare two proofs about primes.")  # the same for every persona
            else:
                replies.append(
                    f"{task} something about {topic} today.\n\nThis prompt fits the persona because"
                )
        return replies


def test_generate_prompts_with_a_fake_generator() -> None:
    gen = FakeGenerator()
    with pytest.warns(UserWarning, match="only 17 usable prompts from 3 personas"):
        result = generate_prompts("mathematician", PERSONAS, gen, n=100, batch_size=7, progress=False)
    assert result.n_personas == 3 and result.n_requests == 3 * len(TASK_TYPES) == len(gen.requests)
    assert result.n_rejected == 3  # one "Solve" per persona
    prompts = result.prompts.prompts
    assert "Compare two proofs about primes." in prompts and result.prompts.n_duplicates_dropped >= 2
    assert all("persona" not in p for p in prompts) and len(set(prompts)) == len(prompts)
    assert "mathematician" in gen.requests[0] and "under 15 words" in gen.requests[0]
    small = generate_prompts("mathematician", PERSONAS, FakeGenerator(), n=3, batch_size=2, progress=False)
    assert len(small.prompts) == 3 and small.n_requests <= 4  # stops once n are collected
    with pytest.raises(RolevecError, match="no persona"):
        generate_prompts("astronaut", PERSONAS, FakeGenerator(), progress=False)


def test_local_generator_runs_a_real_model(tiny_llama: ModelAdapter) -> None:
    """Batched, left-padded generation gives each prompt's own greedy continuation (one row, no cache)."""
    requests = ["Explain eigenvalues.", "Hi", "Write a poem about the sea."]
    gen = LocalGenerator(tiny_llama, max_new_tokens=5, batch_size=2)
    replies = gen.complete(requests)
    tok = tiny_llama.tokenizer
    stop = {tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")}
    for request, reply in zip(requests, replies, strict=True):
        ids = tiny_llama.encode([tiny_llama.render(request)]).input_ids
        new: list[int] = []
        with torch.inference_mode():
            for _ in range(5):
                token = int(tiny_llama.model(input_ids=ids).logits[0, -1].argmax())
                if token in stop:
                    break
                new.append(token)
                ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
        assert reply == tok.decode(new, skip_special_tokens=True)
    assert replies[0] and not replies[1]  # one continues, one stops at once (<|im_end|>): both compared


@dataclass
class Endpoint:
    url: str
    seen: list[dict[str, Any]]


def _handler(seen: list[dict[str, Any]]) -> type[BaseHTTPRequestHandler]:
    """A stand-in OpenAI-compatible server that records the chat requests it gets."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _send(self, code: int, body: Any) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            self._send(200, {"data": [{"id": "fake-model"}]})

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if body["model"] == "broken":
                self._send(500, {"error": "boom"})
                return
            if body["model"] == "latin1":  # a server that answers in another encoding
                data = '{"choices": [{"message": {"content": "caf\u00e9"}}]}'.encode("latin-1")
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                return
            seen.append({**body, "auth": self.headers.get("Authorization")})
            text = body["messages"][0]["content"]
            task = text.split('start with "')[1].split('"')[0]
            persona = text.split("\n")[0].split()[-1]
            self._send(200, {"choices": [{"message": {"content": f'"{task} the idea of {persona} now."'}}]})

    return Handler


@pytest.fixture
def endpoint() -> Iterator[Endpoint]:
    seen: list[dict[str, Any]] = []
    server = HTTPServer(("127.0.0.1", 0), _handler(seen))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield Endpoint(f"http://127.0.0.1:{server.server_address[1]}", seen)
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_openai_compatible_endpoint(endpoint: Endpoint) -> None:
    gen = OpenAIGenerator(endpoint.url + "/v1/", api_key="k")
    assert gen.model == "fake-model"
    assert gen.complete(['Persona: a b c\n\nWrite ... start with "Explain". x']) == [
        '"Explain the idea of c now."'
    ]
    assert endpoint.seen[0]["model"] == "fake-model" and endpoint.seen[0]["auth"] == "Bearer k"
    with pytest.raises(RolevecError, match="HTTP 500"):
        OpenAIGenerator(endpoint.url, model="broken").complete(["x"])
    with pytest.raises(RolevecError, match=r"did not answer UTF-8 JSON.*`generator`"):
        OpenAIGenerator(endpoint.url, model="latin1").complete(["x"])
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}"
    with pytest.raises(RolevecError, match="could not reach"):
        OpenAIGenerator(closed, model="m", timeout=5).complete(["x"])


def test_prompts_cli_with_an_endpoint(
    endpoint: Endpoint, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    personas = _personas_file(tmp_path)
    out = tmp_path / "roles" / "mathematician.json"
    monkeypatch.setenv("ROLEVEC_TEST_KEY", "secret")
    argv = ["prompts", "--role", "Mathematician", "--personas", str(personas), "--generator", endpoint.url]
    argv += [
        "--generator-model",
        "gpt-x",
        "--api-key-env",
        "ROLEVEC_TEST_KEY",
        "--n",
        "12",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    assert "wrote" in capsys.readouterr().out
    ps = load_prompts(out)
    assert len(ps) == 12 and ps.prompts[0].split()[0] in {t.split()[0] for t in TASK_TYPES}
    assert {s["model"] for s in endpoint.seen} == {"gpt-x"} and endpoint.seen[0]["auth"] == "Bearer secret"
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--force" in err[0]
    assert main([*argv[:4], str(tmp_path / "none.jsonl"), *argv[5:], "--force"]) == 2
    assert "none.jsonl does not exist" in capsys.readouterr().err
    assert main([*argv, "--force", "--role", "astronaut"]) == 2
    assert "no persona" in capsys.readouterr().err


@pytest.mark.e2e
def test_prompts_cli_with_the_embedded_model(
    embedded: ModelAdapter,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr("rolevec.model.loading.load_model", lambda *args, **kwargs: embedded)
    out = tmp_path / "m.json"
    argv = ["prompts", "--role", "mathematician", "--personas", str(_personas_file(tmp_path)), "--n", "1"]
    assert (
        main([*argv, "--batch-size", "1", "--max-new-tokens", "20", "--out", str(out), "--no-progress"]) == 0
    )
    prompts = json.loads(out.read_text())
    assert len(prompts) == 1 and all(isinstance(p, str) and len(p.split()) >= 3 for p in prompts)
