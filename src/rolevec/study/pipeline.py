"""The paper's whole study as one resumable pipeline: prompts, vectors, selection (then its diagnostics),
test, analysis, report.

Each stage writes its artefact into the run folder and is skipped on a rerun when that artefact exists
(per-question records resume inside a stage), so an interrupted ``rolevec run`` continues where it stopped.
``manifest.json`` is rewritten after every stage with the configuration, what was sampled, and timings.

Two presets: ``quick`` fits the embedded model on a 2-core CPU in about three minutes (one role per domain,
small samples, a coarse grid — a smoke test of the method, not a finding); ``paper`` is the full grid.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..core.files import read_text
from ..core.spec import check_alpha
from ..errors import RolevecError, path_problem
from ..model.loading import ModelAdapter

if TYPE_CHECKING:
    from ..data.mcq_layouts import MCQSpec
    from .executors import Executor

PRESETS: dict[str, dict[str, Any]] = {
    "quick": {
        "roles": (
            "economist",
            "software_engineer",
            "lawyer",
            "mathematician",
            "doctor",
            "biologist",
            "politician",
            "psychologist",
        ),
        "domains": ("all",),
        "n_prompts": 32,
        "n_base": 64,
        "val_limit": 12,
        "test_limit": 8,
        "layers": None,
        "layer_step": 6,
        "positions": "-1",
        "alphas": (1.0, 3.0),
        "ablate_scope": "passing",
        "dtype": "auto",
    },
    "paper": {
        "roles": ("all",),
        "domains": ("all",),
        "n_prompts": 128,
        "n_base": 128,
        "val_limit": None,
        "test_limit": None,
        "layers": None,
        "layer_step": 1,
        "positions": "all",
        "alphas": (1.0, 3.0),
        "ablate_scope": "all",
        "dtype": "auto",
    },
}


#: Options that change a run's numbers: a rerun on the same folder must not change them.
FIXED_KEYS = (
    "roles_dir",
    "base",
    "base_column",
    "n_prompts",
    "n_base",
    "prompt_seed",
    "mcq",
    "scoring",
    "role_domains",
    "val_limit",
    "layers",
    "layer_step",
    "positions",
    "alphas",
    "ablate_scope",
    "persona_templates",
    "random_seed",
    "interpret_alpha",
)


@dataclass(frozen=True)
class StudyConfig:
    """Everything that decides a run's numbers (the model aside). Saved in the manifest and settings.

    Build one with :func:`config_from` (a preset, a config file and options); ``check()`` validates it.

    Args:
        roles: The roles to study; ``("all",)`` for the paper's 29 (default: the quick preset's 8).
        domains: The MMLU domains to test on; ``("all",)`` (default) for all 8.
        roles_dir: A folder of ``<role>.json`` prompt files (default: the built-in sets).
        base: The base prompt file or ``hf:NAME`` (default: the built-in generic prompts).
        base_column: The field or column of ``base`` holding the prompt.
        n_prompts: Prompts sampled per role (default 128; ``None`` keeps all).
        n_base: Base prompts sampled (default 128; ``None`` keeps all).
        prompt_seed: The seed prompts are sampled with (default 42).
        mcq: The questions: a folder, a file, ``hf:NAME[:CONFIG][@SPLIT]`` or ``lm-eval:TASK``, or an
            :class:`~rolevec.data.mcq_layouts.MCQSpec`'s JSON form (a table with ``source`` and field
            mappings or a layout) (default: the paper's MMLU files when found, else the built-in sample).
        scoring: ``letter`` (the answer letters' logits), ``continuation`` (each choice's summed
            log-likelihood, lm-eval's acc and acc_norm) or ``auto`` (default: continuation for
            ``lm-eval:`` questions, letter for any other).
        role_domains: A JSON file mapping roles to the domain each is selected on (default: the paper's
            table); roles and domains outside the paper's need it.
        split_seed: The seed of the validation/test split (default 0).
        val_fraction: The share of each domain's questions used for validation (default 0.2).
        val_limit: Validation questions per role domain used in the sweep (default: all).
        test_limit: Test questions per domain (default: all).
        layers: The layer range searched, ``"a:b"`` half-open (default: the first 80% of layers).
        layer_step: Search every k-th layer of the range (default 1).
        positions: The positions searched, e.g. ``"-1,-2"``, or ``"all"`` (default).
        alphas: The α values searched for addition (default 1 and 3).
        ablate_scope: Where ablation is swept: ``all`` sites (default), ``passing`` (where some α beats the
            baseline) or ``none``.
        persona_templates: The persona prompts tested (default ``you_are``).
        random_control: Also test a random direction of the same norm at each chosen site (default ``True``).
        random_seed: The seed of the random directions (default 0).
        batch_size: Prompts or questions per forward (default 16).
        interpret: Run patch-scoping and the logit lens on each chosen vector (default ``True``).
        interpret_alpha: The α used by the interpretation stage (default 3.0).
        judge_url: An OpenAI-compatible endpoint for the optional LLM judge (key in
            ``$ROLEVEC_JUDGE_API_KEY``).
        judge_model: The judge's model name (default ``gpt-4o-mini``).
        dtype: The model dtype the run loads with (default ``auto``).

    Example:
        ```python
        config = StudyConfig(roles=("doctor", "lawyer"), domains=("medicine", "law"), n_prompts=32,
                             test_limit=50, alphas=(1.0, 3.0))
        config.check()
        ```
    """

    roles: tuple[str, ...] = PRESETS["quick"]["roles"]
    domains: tuple[str, ...] = ("all",)
    roles_dir: str | None = None  # None: the built-in role prompt sets
    base: str | None = None  # None: the built-in generic prompts
    base_column: str | None = None
    n_prompts: int | None = 128
    n_base: int | None = 128
    prompt_seed: int = 42
    # None: the paper's MMLU domain files when found, else the built-in sample; a dict: an MCQSpec's JSON
    mcq: str | dict[str, Any] | None = None
    scoring: str = "auto"
    role_domains: str | None = None  # a JSON file role -> domain; None: the paper's table
    split_seed: int = 0
    val_fraction: float = 0.2
    val_limit: int | None = None
    test_limit: int | None = None
    layers: str | None = None  # "a:b" half-open; None: the first 80% of layers
    layer_step: int = 1
    positions: str | None = "all"
    alphas: tuple[float, ...] = (1.0, 3.0)
    ablate_scope: str = "all"
    persona_templates: tuple[str, ...] = ("you_are",)
    random_control: bool = True
    random_seed: int = 0
    batch_size: int = 16
    interpret: bool = True
    interpret_alpha: float = 3.0
    judge_url: str | None = None
    judge_model: str = "gpt-4o-mini"
    dtype: str = "auto"

    def to_json(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def check(self) -> None:
        """Refuse bad values before a run writes anything (a config file's are not type-checked)."""

        def integer(key: str, low: int, optional: bool = False) -> None:
            value = getattr(self, key)
            if optional and value is None:
                return
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                allowed = f"an integer >= {low}" + (" or null" if optional else "")
                raise RolevecError(f"{key} must be {allowed}, not {value!r}")

        for key in ("n_prompts", "n_base", "val_limit", "test_limit"):
            integer(key, 1, optional=True)
        for key in ("layer_step", "batch_size"):
            integer(key, 1)
        for key in ("prompt_seed", "split_seed", "random_seed"):
            integer(key, 0)
        if not isinstance(self.val_fraction, int | float) or not 0 < self.val_fraction < 1:
            raise RolevecError(f"val_fraction must be between 0 and 1, not {self.val_fraction!r}")
        if not self.alphas:
            raise RolevecError("alphas is empty: pass finite numbers, e.g. 1,3")
        for alpha in self.alphas:
            check_alpha(alpha, field="alphas")
        if self.ablate_scope not in ("all", "passing", "none"):
            raise RolevecError(f"ablate_scope must be all, passing or none, not {self.ablate_scope!r}")
        if self.scoring not in ("auto", "letter", "continuation"):
            raise RolevecError(f"scoring must be auto, letter or continuation, not {self.scoring!r}")
        for key in ("layers", "positions", "roles_dir", "base", "base_column", "judge_url", "role_domains"):
            value = getattr(self, key)
            if value is not None and not isinstance(value, str):
                raise RolevecError(f"{key} must be a string, not {value!r}")
        if self.mcq is not None and not isinstance(self.mcq, str | dict):
            raise RolevecError(f"mcq must be a string or a table with 'source', not {self.mcq!r}")
        spec = self.mcq_source()
        mcq_path = spec if isinstance(spec, str) or spec is None else spec.source
        for key, value, kind in (
            ("roles_dir", self.roles_dir, "folder"),
            ("base", self.base, "file"),
            ("mcq", mcq_path, "file or folder"),
            ("role_domains", self.role_domains, "JSON file"),
        ):
            remote = value and value.startswith(("hf:", "lm-eval:") if key == "mcq" else "hf:")
            if value and not remote and not Path(value).expanduser().exists():
                raise RolevecError(f"{key} {value!r} does not exist: pass an existing {kind}")

    def mcq_source(self) -> str | MCQSpec | None:
        """``mcq`` as :func:`~rolevec.data.mcq.load_mcq` takes it (a table becomes an ``MCQSpec``)."""
        from ..data.mcq_layouts import MCQSpec

        if isinstance(self.mcq, dict):
            return MCQSpec.from_json(self.mcq, where="mcq")
        return self.mcq

    def scoring_rule(self) -> str:
        """``scoring`` with ``auto`` decided by the question source."""
        from ..evaluation.conditions import resolve_scoring

        return resolve_scoring(self.scoring, self.mcq_source())

    def role_map(self) -> dict[str, str] | None:
        """The role -> domain map of ``role_domains`` (None: the paper's table alone)."""
        from ..data.sources import load_role_domains

        return None if self.role_domains is None else load_role_domains(self.role_domains)

    def fixed(self) -> dict[str, Any]:
        """The options a rerun on the same folder must keep (roles, domains and test size may grow)."""
        return {k: v for k, v in self.to_json().items() if k in FIXED_KEYS}


def _rerender_format(config: StudyConfig) -> Any:
    """A prompt format that renders every item from the template when the question source asks for it
    (``rerender``); ``None`` (the default format, instructions verbatim) otherwise."""
    from ..evaluation.scoring import PromptFormat

    spec = config.mcq_source()
    return (
        None if spec is None or isinstance(spec, str) or not spec.rerender else PromptFormat(verbatim=False)
    )


def config_from(
    preset: str | None, file: Mapping[str, Any] | None, overrides: Mapping[str, Any]
) -> StudyConfig:
    """Preset, then config file, then explicit options (later wins); unknown keys are errors.

    ``roles``, ``domains``, ``persona_templates`` and ``alphas`` may be comma-separated strings.

    Args:
        preset: ``quick`` or ``paper``, or ``None`` for :class:`StudyConfig`'s defaults.
        file: The keys of a config file (e.g. ``read_config_file("study.toml")``), or ``None``.
        overrides: Explicit options; a ``None`` value leaves the key as it was.

    Returns:
        The checked :class:`StudyConfig`.

    Example:
        ```python
        config = config_from("quick", None, {"roles": "doctor,lawyer", "test_limit": 20})
        config.n_prompts  # 32, from the quick preset
        ```
    """
    known = {f.name for f in fields(StudyConfig)}
    values: dict[str, Any] = {}
    if preset is not None:
        if preset not in PRESETS:
            raise RolevecError(f"unknown preset {preset!r}: pass one of {', '.join(PRESETS)}")
        values.update(PRESETS[preset])
    for source, mapping in (("config file", file or {}), ("options", overrides)):
        unknown = sorted(set(mapping) - known)
        if unknown:
            raise RolevecError(
                f"unknown {source} key(s) {', '.join(unknown)}: valid keys are {', '.join(sorted(known))}"
            )
        values.update({k: v for k, v in mapping.items() if v is not None})
    for key in ("roles", "domains", "persona_templates"):
        raw = values.get(key)
        if isinstance(raw, str):
            values[key] = tuple(x.strip() for x in raw.split(",") if x.strip())
        elif key in values:
            if not isinstance(raw, list | tuple) or not all(isinstance(x, str) for x in raw):
                raise RolevecError(f"{key} must be a list of names or a comma-separated string, not {raw!r}")
            values[key] = tuple(raw)
    if "alphas" in values:
        raw = values["alphas"]
        parts = raw.split(",") if isinstance(raw, str) else raw
        try:
            values["alphas"] = tuple(float(a) for a in parts)
        except (TypeError, ValueError):
            raise RolevecError(f"alphas must be numbers, e.g. 1,3 — not {raw!r}") from None
    config = StudyConfig(**values)
    config.check()
    return config


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A JSON or TOML file of StudyConfig keys."""
    p = Path(path)
    if not p.is_file():
        raise RolevecError(f"config file {p} {path_problem(p)}: pass a JSON or TOML file of run options")
    try:
        if p.suffix == ".toml":
            import tomllib

            data: Any = tomllib.loads(read_text(p, what="config file"))
        else:
            data = json.loads(read_text(p, what="config file"))
    except ValueError as exc:
        raise RolevecError(f"config file {p} is not valid JSON/TOML ({exc})") from exc
    if not isinstance(data, dict):
        raise RolevecError(f"config file {p} must hold an object of options")
    return data


@dataclass
class StudyState:
    """What the stages learnt, for the manifest and the final summary."""

    timings: dict[str, float] = field(default_factory=dict)
    sampled: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def resolve_roles(config: StudyConfig) -> list[str]:
    from ..data.sources import available_roles, domain_roles

    if config.roles == ("all",):
        paper = [r for roles in domain_roles().values() for r in roles]
        have = set(available_roles(config.roles_dir))
        return [r for r in paper if r in have]
    if not config.roles:
        raise RolevecError("no roles given: pass `roles=mathematician,doctor` or `roles=all`")
    return list(config.roles)


def resolve_domains(config: StudyConfig) -> list[str]:
    """The test domains: the paper's 8 for the paper's questions; for another source, any it defines
    (``all``: every domain it has, read from the source)."""
    from ..data.mcq import DOMAINS, load_mcq

    if config.mcq is not None:
        if config.domains == ("all",):
            with warnings.catch_warnings():  # the questions stage warns about the same source
                warnings.simplefilter("ignore")
                return load_mcq(config.mcq_source()).domains
        return list(config.domains)
    if config.domains == ("all",):
        return list(DOMAINS)
    unknown = [d for d in config.domains if d not in DOMAINS]
    if unknown:
        raise RolevecError(
            f"unknown domain(s) {', '.join(unknown)}: pass some of {', '.join(DOMAINS)} or all (or questions "
            "of your own in `mcq`)"
        )
    return list(config.domains)


def domain_of(config: StudyConfig, roles: Sequence[str]) -> dict[str, str]:
    """Each role's own domain (``role_domains`` first, then the paper's table); refuses a role with none."""
    from ..data.sources import role_domain

    mapping = config.role_map()
    found = {r: role_domain(r, mapping=mapping) for r in roles}
    orphans = [r for r, d in found.items() if d is None]
    if orphans:
        raise RolevecError(
            f"role(s) {', '.join(orphans)} have no domain in the paper's table, so they cannot be "
            "selected on a validation split: map them in `role_domains` or drop them from `roles`"
        )
    return {r: str(d) for r, d in found.items()}


def check_roles(config: StudyConfig) -> tuple[list[str], list[str]]:
    """The run's roles and domains; every role needs a domain to be selected on its validation split."""
    roles, domains = resolve_roles(config), resolve_domains(config)
    domain_of(config, roles)
    return roles, domains


def check_inputs(config: StudyConfig) -> tuple[list[str], list[str]]:
    """Read every input a run needs (role prompts, base prompts, questions, persona templates) without
    the model: a bad file or value is refused before the model loads and before the run folder changes."""
    from ..data.mcq import load_mcq, make_split
    from ..data.sources import load_base, load_role_prompts
    from ..evaluation.conditions import persona_system

    # every domain of a source of one's own: read from the source itself, loaded once below
    every = config.mcq is not None and config.domains == ("all",)
    roles = resolve_roles(config)
    domains = [] if every else resolve_domains(config)
    own = domain_of(config, roles)
    if not 0.0 < config.val_fraction < 1.0:
        raise RolevecError(
            f"val_fraction must be between 0 and 1 (exclusive), not {config.val_fraction}: pass e.g. 0.2"
        )
    for role in roles:
        load_role_prompts(role, config.roles_dir)
    load_base(config.base, column=config.base_column)
    mcq = load_mcq(config.mcq_source(), None if every else sorted(set(domains) | set(own.values())))
    if every:
        domains = mcq.domains
        if not set(own.values()) <= set(domains):  # a role's own domain the source lacks: its own error
            load_mcq(config.mcq_source(), sorted(set(domains) | set(own.values())))
    with warnings.catch_warnings():  # load_mcq has warned about repeated questions already
        warnings.simplefilter("ignore")
        make_split(mcq, seed=config.split_seed, val_fraction=config.val_fraction)  # enough questions?
    for template in config.persona_templates:
        persona_system("doctor", template)
    return roles, domains


class Study:
    """One run folder's pipeline; call :meth:`run` (or the stages one by one)."""

    STAGES = ("prompts", "vectors", "questions", "selection", "test", "interpret", "report")

    def __init__(
        self,
        adapter: ModelAdapter,
        config: StudyConfig,
        run_dir: str | Path,
        *,
        args: Mapping[str, Any] | None = None,
        preset: str | None = None,
        progress: bool = True,
        log: Callable[[str], None] = print,
        executor: Executor | None = None,
    ) -> None:
        from .executors import LocalExecutor

        self.adapter = adapter
        self.executor: Executor = executor or LocalExecutor()
        self.config = config
        self.run_dir = Path(run_dir)
        self.args = dict(args or {})
        self.preset = preset
        self.progress = progress
        self.log = log
        self.state = StudyState()
        self.roles, self.domains = check_roles(config)
        self.domain_of = domain_of(config, self.roles)

    # --- bookkeeping -----------------------------------------------------------------------------
    def _manifest(self) -> None:
        from ..model.manifest import build_manifest, write_manifest

        extra = {
            "command": "run",
            "preset": self.preset or "custom",
            "config": self.config.to_json(),
            "roles": self.roles,
            "domains": self.domains,
            "sampled": describe_sampling(self.state.sampled, self.roles, self.domains),
            "sampling_details": self.state.sampled,
            "timings_s": {k: round(v, 2) for k, v in self.state.timings.items()},
            "notes": self.state.notes,
            "execution": self.executor.describe(),
        }
        write_manifest(self.run_dir / "manifest.json", build_manifest(self.args, self.adapter, extra))

    def _stage(self, name: str, fn: Callable[[], None]) -> None:
        self.log(f"[{self.STAGES.index(name) + 1}/{len(self.STAGES)}] {name}")
        start = time.perf_counter()
        fn()
        self.state.timings[name] = self.state.timings.get(name, 0.0) + time.perf_counter() - start
        self._manifest()

    def _step(self, name: str, fn: Callable[[], None]) -> None:
        """A step inside the stage before it (logged under it, timed and written to the manifest)."""
        self.log(f"    {name}")
        start = time.perf_counter()
        fn()
        self.state.timings[name] = self.state.timings.get(name, 0.0) + time.perf_counter() - start
        self._manifest()

    def check_grid(self) -> None:
        """The layer range and positions against this model, before anything is written."""
        from ..core.spec import parse_layer_range, parse_positions
        from ..evaluation.conditions import persona_system

        parse_layer_range(self.config.layers, self.adapter.n_layers)
        parse_positions(self.config.positions, tuple(self.adapter.chat.positions))
        for template in self.config.persona_templates:
            persona_system("doctor", template)

    def run(self, *, force: bool = False) -> None:
        """Run or resume every stage; ``force`` starts over, moving the folder's earlier results aside
        (see :mod:`rolevec.core.outdir`) only once every input has been checked."""
        from ..core.outdir import prepare, stored_path
        from ..core.records import SETTINGS_NAME, check_settings, compare_settings

        self.check_grid()
        check_inputs(self.config)
        study: dict[str, Any] = {"study": self.config.fixed()}
        role_map = self.config.role_map()
        if role_map is not None:  # the report reads the map from here
            study["role_domains"] = role_map
        if not force:
            compare_settings(
                self.run_dir, study, stored_at=stored_path(self.run_dir, SETTINGS_NAME, "run", force=False)
            )
        with prepare(self.run_dir, "run", force=force):
            check_settings(self.run_dir, study)
            started = time.perf_counter()
            self._stage("prompts", self.stage_prompts)
            self._stage("vectors", self.stage_vectors)
            self._stage("questions", self.stage_questions)
            self._stage("selection", self.stage_selection)
            self._step("diagnostics", self.stage_diagnostics)
            self._stage("test", self.stage_test)
            if self.config.interpret:
                self._stage("interpret", self.stage_interpret)
            self._stage("report", self.stage_report)
            self.state.timings["total"] = time.perf_counter() - started
            self._manifest()

    # --- stages: each is a function of rolevec.study.stages -----------------------------------------
    def stage_prompts(self) -> None:
        """Sample each role's prompts and the base prompts; the exact lists go to prompts.json."""
        from .stages import sample_prompts

        c = self.config
        self.prompts = sample_prompts(
            self.run_dir,
            self.roles,
            n_prompts=c.n_prompts,
            n_base=c.n_base,
            seed=c.prompt_seed,
            roles_dir=c.roles_dir,
            base=c.base,
            base_column=c.base_column,
        )
        p = self.prompts
        self.state.sampled["prompts"] = {
            "per_role": {r: len(v.prompts) for r, v in p.roles.items() if r in self.roles},
            "base": len(p.base.prompts),
            "seed": p.seed,
            "role_source": next(iter(p.roles.values())).source if p.roles else "",
            "base_source": p.base.source,
        }

    def stage_vectors(self) -> None:
        from .stages import extract_vectors

        self.vectors = extract_vectors(
            self.adapter,
            self.prompts,
            self.run_dir,
            self.roles,
            batch_size=self.config.batch_size,
            progress=self.progress,
        )

    def stage_questions(self) -> None:
        from .stages import load_questions

        c = self.config
        wanted = sorted(set(self.domains) | set(self.domain_of.values()))
        questions = load_questions(
            self.adapter,
            self.run_dir,
            wanted,
            # stages.load_questions passes its source on to load_mcq, which takes an MCQSpec too
            source=c.mcq_source(),
            prompt_format=_rerender_format(c),
            scoring=c.scoring_rule(),
            split_seed=c.split_seed,
            val_fraction=c.val_fraction,
            random_seed=c.random_seed,
        )
        self.mcq, self.split, self.prompt_format = questions.mcq, questions.split, questions.prompt_format
        sizes = {
            d: {
                "val": len(self.split.select(self.mcq, d, "val", c.val_limit)),
                "test": len(self.split.select(self.mcq, d, "test", c.test_limit)),
                "available": len(self.mcq.items[d]),
            }
            for d in wanted
        }
        self.state.sampled["questions"] = {
            "source": self.mcq.source,
            "kind": self.mcq.kind,
            "split_seed": self.split.seed,
            "val_fraction": self.split.val_fraction,
            "per_domain": sizes,
        }
        if self.mcq.kind == "builtin":
            self.state.notes.append(
                "questions come from rolevec's built-in sample (24 per domain), not MMLU: pass `mcq`"
            )

    def _grid(self) -> tuple[tuple[int, int], tuple[int, ...]]:
        from ..core.spec import parse_layer_range, parse_positions

        layers = parse_layer_range(self.config.layers, self.adapter.n_layers)
        positions = parse_positions(self.config.positions, self.vectors.positions)
        return layers, positions

    def stage_selection(self) -> None:
        from ..evaluation.scoring import LetterScorer
        from .stages import select_sites

        c = self.config
        layers, positions = self._grid()
        self.scorer = LetterScorer(self.adapter)

        def report(choice: Any) -> None:
            met = "criterion met" if choice.criterion_met else "criterion NOT met (best addition kept)"
            self.log(
                f"    {choice.role}: layer {choice.layer}, position {choice.position}, α {choice.alpha:g} "
                f"(val {choice.val_accuracy:.3f} vs baseline {choice.val_baseline:.3f}; {met})"
            )

        chosen = select_sites(
            self.adapter,
            self.vectors,
            self.roles,
            self.mcq,
            self.split,
            self.run_dir,
            domain_of=self.domain_of,
            layers=layers,
            positions=positions,
            alphas=c.alphas,
            layer_step=c.layer_step,
            limit=c.val_limit,
            prompt_format=self.prompt_format,
            batch_size=c.batch_size,
            ablate_scope=c.ablate_scope,
            scorer=self.scorer,
            progress=self.progress,
            on_choice=report,
            executor=self.executor,
            scoring=c.scoring_rule(),
        )
        self.choices = {ch.role: ch for ch in chosen.choices}
        self.state.sampled["grid"] = {
            "layers": list(range(layers[0], layers[1], c.layer_step)),
            "positions": list(positions),
            "alphas": list(c.alphas),
            "ablation": c.ablate_scope,
            "sweep_mode": {r.role: r.reuse for r in chosen.sweeps},
        }

    def stage_diagnostics(self) -> None:
        """Whether each chosen vector beats random directions at its site (``diagnostics.json``)."""
        from .stages import diagnose_sites

        result = diagnose_sites(
            self.adapter,
            self.prompts,
            self.run_dir,
            self.roles,
            batch_size=self.config.batch_size,
            progress=self.progress,
        )
        flagged = {r: result["roles"][r]["flagged"] for r in self.roles if result["roles"][r]["flagged"]}
        for role, names in flagged.items():
            self.log(f"    {role}: does not beat random directions on {', '.join(names)}")

    def stage_test(self) -> None:
        from .executors import EvalSettings
        from .stages import open_records, study_conditions

        conditions = study_conditions(
            {role: self.choices[role] for role in self.roles},
            alphas=self.config.alphas,
            persona_templates=self.config.persona_templates,
            random_control=self.config.random_control,
        )
        settings = EvalSettings(
            domains=tuple(self.domains),
            split_name="test",
            limit=self.config.test_limit,
            prompt_format=self.prompt_format,
            batch_size=self.config.batch_size,
            random_seed=self.config.random_seed,
            scoring=self.config.scoring_rule(),
        )
        with open_records(self.run_dir) as store:
            report = self.executor.evaluate(
                self.adapter,
                self.mcq,
                self.split,
                conditions,
                store,
                settings,
                vectors=self.vectors,
                scorer=self.scorer,
                progress=self.progress,
            )
        if report.persona_folded:
            self.state.notes.append(
                "the chat template rejects system turns: persona text was folded into the user turn"
            )
        self.state.sampled["test"] = {"new_records": report.n_new, "already_done": report.n_done_before}

    def stage_interpret(self) -> None:
        import os

        from ..analysis.interpret import JUDGE_KEY_ENV
        from .stages import interpret_vectors

        interpret_vectors(
            self.adapter,
            self.vectors,
            self.run_dir,
            self.roles,
            alpha=self.config.interpret_alpha,
            judge_url=self.config.judge_url,
            judge_model=self.config.judge_model,
            judge_api_key=os.environ.get(JUDGE_KEY_ENV),
            progress=self.progress,
        )

    def stage_report(self) -> None:
        from ..analysis.report import write_report

        files = write_report(self.run_dir, force=True, role_map=self.config.role_map())
        self.report_files = files


def run_study(
    adapter: ModelAdapter,
    config: StudyConfig,
    run_dir: str | Path,
    *,
    args: Mapping[str, Any] | None = None,
    preset: str | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    force: bool = False,
    executor: Executor | None = None,
) -> Study:
    """Run (or resume) the whole study in ``run_dir``; returns the finished :class:`Study`.

    ``force=True`` starts over: rolevec's earlier results in ``run_dir`` are set aside once every
    input has been checked and deleted when the run succeeds (a user's own files are never touched).

    Args:
        adapter: The model to study (:func:`load_model`).
        config: The study's settings.
        run_dir: The run folder; a rerun with the same settings resumes, and ``roles``, ``domains`` and
            the test size may grow.
        args: The command-line options, recorded in ``manifest.json`` (default: none).
        preset: The preset name recorded in the manifest (default: ``custom``).
        progress: Show progress bars.
        log: Receives each progress message (default ``print``).
        force: Start over, as described above (default ``False``).
        executor: Where the sweep and test stages run (default: this process; see
            :class:`~rolevec.study.distributed.RayExecutor`).

    Returns:
        The finished ``Study``; its ``report_files`` name the report written.

    Example:
        ```python
        adapter = load_model()
        study = run_study(adapter, config_from("quick", None, {}), "runs/quick", preset="quick")
        print(study.report_files.html)
        ```
    """
    study = Study(
        adapter, config, run_dir, args=args, preset=preset, progress=progress, log=log, executor=executor
    )
    study.run(force=force)
    return study


def describe_sampling(sampled: Mapping[str, Any], roles: Sequence[str], domains: Sequence[str]) -> str:
    """One paragraph of what a run sampled, for the console and the report header."""
    parts = [f"{len(roles)} role(s): {', '.join(roles)}"]
    prompts = sampled.get("prompts")
    if prompts:
        per_role = sorted(set(prompts["per_role"].values()))
        parts.append(
            f"{'/'.join(map(str, per_role))} prompts per role and {prompts['base']} base prompts "
            f"(seed {prompts['seed']})"
        )
    questions = sampled.get("questions")
    if questions:
        per = questions["per_domain"]
        tests = sorted({v["test"] for d, v in per.items() if d in domains})
        vals = sorted({v["val"] for v in per.values()})
        parts.append(
            f"{len(domains)} domain(s) × {'/'.join(map(str, tests))} test questions, "
            f"{'/'.join(map(str, vals))} validation questions per role domain "
            f"({questions['kind']} questions, split seed {questions['split_seed']})"
        )
    grid = sampled.get("grid")
    if grid:
        parts.append(
            f"grid: layers {grid['layers']}, positions {grid['positions']}, α {grid['alphas']}, "
            f"ablation on {grid['ablation']} sites"
        )
    return "; ".join(parts)
