"""rolevec: role vectors for steering language models toward a domain expertise.

Everything a Python user needs is importable from here; the names load lazily, so ``import rolevec``
(and ``rolevec --help``) does not import torch or transformers until a name is used.

>>> import rolevec
>>> rolevec.__version__
'0.1.0'
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__
from .errors import RolevecError

#: Public name -> module that defines it (relative to the package).
_EXPORTS: dict[str, str] = {
    # the model and its hooks
    "ModelAdapter": "model",
    "load_model": "model",
    # prompt data and vectors
    "PromptSet": "data",
    "load_prompts": "data",
    "load_role_prompts": "data",
    "load_base": "data",
    "sample": "data",
    "available_roles": "data",
    "mean_activations": "activations",
    "extract_role_vectors": "activations",
    "RoleVectors": "vectors",
    # steering
    "Steering": "interventions",
    "resolve_steering": "interventions",
    "generate": "generation",
    "fold": "folding",
    "save_folded": "folding",
    "export_control_vector": "export",
    "export_lm_eval": "export",
    "steering_from_control_vector": "export",
    # questions, scoring and evaluation
    "MCQItem": "mcq",
    "MCQSet": "mcq",
    "Split": "mcq",
    "load_mcq": "mcq",
    "make_split": "mcq",
    "PromptFormat": "scoring",
    "Condition": "evaluation",
    "LetterScorer": "scoring",
    "score": "evaluation",
    "evaluate_conditions": "evaluation",
    "RecordStore": "records",
    "read_records": "records",
    # the study and its report
    "StudyConfig": "pipeline",
    "config_from": "pipeline",
    "run_study": "pipeline",
    "select_sites": "stages",
    "open_records": "stages",
    "write_report": "report",
    "analyse": "analysis",
}

__all__ = [
    "Condition",
    "LetterScorer",
    "MCQItem",
    "MCQSet",
    "ModelAdapter",
    "PromptFormat",
    "PromptSet",
    "RecordStore",
    "RoleVectors",
    "RolevecError",
    "Split",
    "Steering",
    "StudyConfig",
    "__version__",
    "analyse",
    "available_roles",
    "config_from",
    "evaluate_conditions",
    "export_control_vector",
    "export_lm_eval",
    "extract_role_vectors",
    "fold",
    "generate",
    "load_base",
    "load_mcq",
    "load_model",
    "load_prompts",
    "load_role_prompts",
    "make_split",
    "mean_activations",
    "open_records",
    "read_records",
    "resolve_steering",
    "run_study",
    "sample",
    "save_folded",
    "score",
    "select_sites",
    "steering_from_control_vector",
    "write_report",
]

if TYPE_CHECKING:
    from .activations import extract_role_vectors, mean_activations
    from .analysis import analyse
    from .data import PromptSet, available_roles, load_base, load_prompts, load_role_prompts, sample
    from .evaluation import Condition, evaluate_conditions, score
    from .export import export_control_vector, export_lm_eval, steering_from_control_vector
    from .folding import fold, save_folded
    from .generation import generate
    from .interventions import Steering, resolve_steering
    from .mcq import MCQItem, MCQSet, Split, load_mcq, make_split
    from .model import ModelAdapter, load_model
    from .pipeline import StudyConfig, config_from, run_study
    from .records import RecordStore, read_records
    from .report import write_report
    from .scoring import LetterScorer, PromptFormat
    from .stages import open_records, select_sites
    from .vectors import RoleVectors


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'rolevec' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
