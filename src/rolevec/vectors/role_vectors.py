"""Role vectors as data: difference-in-means tensors with their provenance, stored as safetensors.

One file holds every role extracted for one model. Tensors are float32 ``[n_positions, n_layers + 1,
hidden]`` (position index i ↔ position ``positions[i]``, counted from the end of the prompt; layer L ↔
input of block L). Metadata rides in the safetensors header as JSON; nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..core.files import atomic_write
from ..errors import RolevecError, path_problem

if TYPE_CHECKING:
    from ..model.loading import ModelAdapter

BASE_KEY = "__base__"
FORMAT = "rolevec.vectors/1"
LAYER_CONVENTION = (
    "layer L = residual stream at the input of decoder block L; L = n_layers is the last output"
)


@dataclass(frozen=True)
class RoleVectors:
    """Role means, the base mean and their differences for one model, with provenance.

    Made by :func:`extract_role_vectors`, or read back with :meth:`load`; ``vector(role, layer,
    position)`` gives one role vector d = μ_role − ν_base.

    Args:
        role_means: Role -> its mean activation μ_role, ``[positions, n_layers + 1, hidden]``.
        base_mean: The base set's mean ν_base, of the same shape.
        positions: The post-instruction positions of the first axis, from the end (e.g. ``(-3, -2, -1)``).
        position_tokens: The token text at each position.
        metadata: Provenance (model, prompt sets, seed, versions) saved with the vectors.

    Example:
        ```python
        vectors = RoleVectors.load("runs/quick/vectors.safetensors")
        d = vectors.vector("doctor", layer=12, position=-1)
        print(vectors.roles, vectors.n_layers, d.norm())
        ```
    """

    role_means: Mapping[str, torch.Tensor]
    base_mean: torch.Tensor
    positions: tuple[int, ...]
    position_tokens: tuple[str, ...]
    metadata: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.base_mean.ndim != 3 or self.base_mean.shape[0] != len(self.positions):
            raise RolevecError(
                f"base mean has shape {tuple(self.base_mean.shape)}, expected [positions, L, H]"
            )
        expected = (len(self.positions), self.base_mean.shape[1], self.base_mean.shape[2])
        for role, mean in self.role_means.items():
            if tuple(mean.shape) != expected:
                raise RolevecError(f"role {role!r} mean has shape {tuple(mean.shape)}, expected {expected}")

    # --- access ----------------------------------------------------------------------------------
    @property
    def roles(self) -> tuple[str, ...]:
        return tuple(self.role_means)

    @property
    def n_layers(self) -> int:
        """Number of decoder blocks; valid layers are 0..n_layers."""
        return int(self.base_mean.shape[1]) - 1

    @property
    def hidden_size(self) -> int:
        return int(self.base_mean.shape[2])

    def _role(self, role: str) -> torch.Tensor:
        if role not in self.role_means:
            known = ", ".join(self.roles) or "none"
            raise RolevecError(f"role {role!r} is not in this vector file (it has: {known})")
        return self.role_means[role]

    def position_index(self, position: int) -> int:
        if position not in self.positions:
            raise RolevecError(
                f"position {position} is out of range: this file has positions {self.positions[0]}..-1"
            )
        return self.positions.index(position)

    def check_layer(self, layer: int) -> None:
        if not 0 <= layer <= self.n_layers:
            raise RolevecError(f"layer {layer} is out of range: this file has layers 0..{self.n_layers}")

    def diff(self, role: str) -> torch.Tensor:
        """d = μ_role − ν_base for every (position, layer): ``[P, L+1, H]``."""
        return self._role(role) - self.base_mean

    def digest(self, role: str) -> str:
        """A short hash of the role's vectors (every site), so records know which vectors made them."""
        data = self.diff(role).float().contiguous().numpy().tobytes()
        return hashlib.sha256(data).hexdigest()[:16]

    def vector(self, role: str, layer: int, position: int) -> torch.Tensor:
        """The role vector at one site, unnormalised, float32 ``[hidden]``."""
        self.check_layer(layer)
        i = self.position_index(position)
        return self._role(role)[i, layer] - self.base_mean[i, layer]

    def check_compatible(self, adapter: ModelAdapter, *, allow_other_model: bool = True) -> None:
        """Refuse a different hidden size or depth; when the model fingerprint differs, warn (or refuse,
        with ``allow_other_model=False``, as the command line does unless --allow-other-model)."""
        if adapter.hidden_size != self.hidden_size or adapter.n_layers != self.n_layers:
            raise RolevecError(
                f"vectors were extracted from a model with hidden size {self.hidden_size} and "
                f"{self.n_layers} layers, but {adapter.name} has {adapter.hidden_size} and "
                f"{adapter.n_layers}: extract vectors for this model with `rolevec extract`"
            )
        check_fingerprint(
            adapter,
            self.metadata.get("model_fingerprint"),
            self.metadata.get("model"),
            "vectors",
            allow_other_model=allow_other_model,
        )

    def merged(self, other: RoleVectors) -> RoleVectors:
        """These vectors plus the roles only ``other`` has, all relative to this file's base mean ν.

        Extraction split over calls (a scheduler's shards, or roles added to a run later) merges here.
        ``other`` must come from the same model, base prompts, seed and positions; its own ν (the same
        prompts, batched differently) is dropped, so the vectors already stored stay byte for byte.

        Args:
            other: Vectors extracted in another call.

        Returns:
            The merged ``RoleVectors``; roles in both keep this file's means.

        Example:
            ```python
            both = RoleVectors.load("doctor.safetensors").merged(RoleVectors.load("lawyer.safetensors"))
            print(both.roles)
            ```
        """
        mine, theirs = self.metadata, other.metadata
        for key in ("model_fingerprint", "base", "seed", "dtype"):
            if mine.get(key) != theirs.get(key):
                raise RolevecError(
                    f"cannot merge role vectors with another {key} ({mine.get(key)!r} vs "
                    f"{theirs.get(key)!r}): extract all roles with the same model, base prompts and seed"
                )
        if (other.positions, other.position_tokens) != (self.positions, self.position_tokens) or tuple(
            other.base_mean.shape
        ) != tuple(self.base_mean.shape):
            raise RolevecError("cannot merge role vectors of other positions or another shape")
        added = {r: m for r, m in other.role_means.items() if r not in self.role_means}
        metadata = dict(mine)
        metadata["prompts"] = {
            **dict(mine.get("prompts") or {}),
            **{r: (theirs.get("prompts") or {}).get(r) for r in added},
        }
        metadata["n_shortened"] = int(mine.get("n_shortened") or 0) + int(theirs.get("n_shortened") or 0)
        metadata["merged_from"] = [*mine.get("merged_from", [mine.get("created")]), theirs.get("created")]
        return RoleVectors(
            {**self.role_means, **added}, self.base_mean, self.positions, self.position_tokens, metadata
        )

    # --- storage ---------------------------------------------------------------------------------
    def save(self, path: str | Path, *, force: bool = False) -> Path:
        from safetensors.torch import save_file

        tensors = {f"mean/{r}": m.float().contiguous() for r, m in self.role_means.items()}
        tensors[f"mean/{BASE_KEY}"] = self.base_mean.float().contiguous()
        tensors.update({f"diff/{r}": self.diff(r).float().contiguous() for r in self.roles})
        header = {
            "format": FORMAT,
            "layer_convention": LAYER_CONVENTION,
            "positions": list(self.positions),
            "position_tokens": list(self.position_tokens),
            **self.metadata,
            "roles": list(self.roles),  # safetensors sorts its keys; this keeps the caller's order
        }
        meta = {"rolevec": json.dumps(header, ensure_ascii=False)}
        out = Path(path)
        atomic_write(out, lambda tmp: save_file(tensors, str(tmp), metadata=meta), force=force)
        return out

    @classmethod
    def load(cls, path: str | Path) -> RoleVectors:
        from safetensors import safe_open

        p = Path(path)
        if not p.is_file():
            raise RolevecError(
                f"vector file {p} {path_problem(p)}: create one with "
                f"`rolevec extract --roles ROLES --out {p}`"
            )
        try:
            with safe_open(str(p), framework="pt") as f:
                header = json.loads((f.metadata() or {}).get("rolevec", "{}"))
                means = {k.removeprefix("mean/"): f.get_tensor(k) for k in f.keys() if k.startswith("mean/")}
        except Exception as exc:
            raise RolevecError(f"{p} is not a readable safetensors vector file ({exc})") from exc
        if header.get("format") != FORMAT or BASE_KEY not in means:
            raise RolevecError(f"{p} is not a rolevec vector file (no {FORMAT!r} header)")
        base = means.pop(BASE_KEY)
        try:
            positions = tuple(int(x) for x in header.pop("positions"))
            tokens = tuple(str(x) for x in header.pop("position_tokens"))
        except (KeyError, TypeError, ValueError) as exc:
            raise RolevecError(
                f"{p} is not a rolevec vector file: its header lacks valid positions ({exc!r}); "
                "extract it again with `rolevec extract`"
            ) from None
        for name, tensor in [(BASE_KEY, base), *means.items()]:
            _check_finite(p, f"mean/{name}", tensor, positions)
        header.pop("format", None)
        header.pop("layer_convention", None)
        order = header.pop("roles", None)
        if isinstance(order, list) and sorted(map(str, order)) == sorted(means):
            means = {str(r): means[str(r)] for r in order}
        try:
            return cls(
                role_means=means, base_mean=base, positions=positions, position_tokens=tokens, metadata=header
            )
        except RolevecError as exc:
            raise RolevecError(f"{p} is not a usable rolevec vector file: {exc}") from None


def _check_finite(path: Path, name: str, tensor: torch.Tensor, positions: tuple[int, ...]) -> None:
    """Refuse NaN/inf as the file is read, naming the tensor and its first bad site: steering with them
    would turn every activation they touch into NaN, far from the file that caused it."""
    bad = ~torch.isfinite(tensor)
    if not bool(bad.any()):
        return
    site = ""
    if tensor.ndim == 3:
        i, layer = (int(x) for x in bad.nonzero()[0][:2])
        site = f" (first at position {positions[i] if i < len(positions) else i}, layer {layer})"
    raise RolevecError(
        f"{path} holds non-finite values (NaN or inf) in tensor {name}{site}: re-extract it with "
        "`rolevec extract`"
    )


def check_fingerprint(
    adapter: ModelAdapter,
    theirs: str | None,
    model: str | None,
    what: str,
    *,
    allow_other_model: bool,
    warn_other_model: bool = True,
) -> None:
    """Refuse (or, when allowed, warn about) ``what`` made on a model with another fingerprint."""
    if not theirs or theirs == adapter.fingerprint():
        return
    ours = f"{adapter.name!r} ({adapter.fingerprint()})"
    origin = f"{what} come from {model!r} (fingerprint {theirs}), not from {ours}"
    if not allow_other_model:
        raise RolevecError(
            f"{origin}: pass the model they were extracted from, or `allow_other_model` to use them anyway"
        )
    if warn_other_model:
        warnings.warn(f"{origin}: results may be meaningless", stacklevel=3)
