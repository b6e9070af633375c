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

from . import _moved
from ._version import __version__
from .errors import RolevecError

_moved.install()

#: Public name -> module that defines it (relative to the package).
_EXPORTS: dict[str, str] = {
    # the model and its hooks
    "ModelAdapter": "model.loading",
    "load_model": "model.loading",
    # prompt data and vectors
    "PromptSet": "data.sources",
    "load_prompts": "data.sources",
    "load_role_prompts": "data.sources",
    "load_base": "data.sources",
    "sample": "data.sources",
    "available_roles": "data.sources",
    "mean_activations": "vectors.extraction",
    "extract_role_vectors": "vectors.extraction",
    "RoleVectors": "vectors.role_vectors",
    "compose": "vectors.arithmetic",
    # steering
    "Steering": "steering.interventions",
    "resolve_steering": "steering.interventions",
    "generate": "steering.generation",
    "fold": "steering.folding",
    "save_folded": "steering.folding",
    "export_control_vector": "steering.export",
    "export_lm_eval": "steering.export",
    "steering_from_control_vector": "steering.export",
    # questions, scoring and evaluation
    "MCQItem": "data.mcq",
    "MCQSet": "data.mcq",
    "Split": "data.mcq",
    "load_mcq": "data.mcq",
    "make_split": "data.mcq",
    "MCQSpec": "data.mcq_layouts",
    "load_lm_eval_task": "data.lm_eval_tasks",
    "PromptFormat": "evaluation.scoring",
    "ContinuationScorer": "evaluation.continuation",
    "Condition": "evaluation.conditions",
    "LetterScorer": "evaluation.scoring",
    "score": "evaluation.conditions",
    "evaluate_conditions": "evaluation.conditions",
    "RecordStore": "core.records",
    "read_records": "core.records",
    # the study and its report
    "StudyConfig": "study.pipeline",
    "config_from": "study.pipeline",
    "run_study": "study.pipeline",
    "StudyPrompts": "study.stages",
    "StudyQuestions": "study.stages",
    "sample_prompts": "study.stages",
    "extract_vectors": "study.stages",
    "load_questions": "study.stages",
    "select_sites": "study.stages",
    "study_conditions": "study.stages",
    "interpret_vectors": "study.stages",
    "open_records": "study.stages",
    "LocalExecutor": "study.executors",
    "RayExecutor": "study.distributed",
    "write_report": "analysis.report",
    "analyse": "analysis.tables",
    "correctness_auroc": "analysis.correctness",
    "correctness_auroc_from_run": "study.correctness",
}

__all__ = [
    "Condition",
    "ContinuationScorer",
    "LetterScorer",
    "LocalExecutor",
    "MCQItem",
    "MCQSet",
    "MCQSpec",
    "ModelAdapter",
    "PromptFormat",
    "PromptSet",
    "RayExecutor",
    "RecordStore",
    "RoleVectors",
    "RolevecError",
    "Split",
    "Steering",
    "StudyConfig",
    "StudyPrompts",
    "StudyQuestions",
    "__version__",
    "analyse",
    "available_roles",
    "compose",
    "config_from",
    "correctness_auroc",
    "correctness_auroc_from_run",
    "evaluate_conditions",
    "export_control_vector",
    "export_lm_eval",
    "extract_role_vectors",
    "extract_vectors",
    "fold",
    "generate",
    "interpret_vectors",
    "load_base",
    "load_lm_eval_task",
    "load_mcq",
    "load_model",
    "load_prompts",
    "load_questions",
    "load_role_prompts",
    "make_split",
    "mean_activations",
    "open_records",
    "read_records",
    "resolve_steering",
    "run_study",
    "sample",
    "sample_prompts",
    "save_folded",
    "score",
    "select_sites",
    "steering_from_control_vector",
    "study_conditions",
    "write_report",
]

if TYPE_CHECKING:
    from .analysis.correctness import correctness_auroc
    from .analysis.report import write_report
    from .analysis.tables import analyse
    from .core.records import RecordStore, read_records
    from .data.lm_eval_tasks import load_lm_eval_task
    from .data.mcq import MCQItem, MCQSet, Split, load_mcq, make_split
    from .data.mcq_layouts import MCQSpec
    from .data.sources import PromptSet, available_roles, load_base, load_prompts, load_role_prompts, sample
    from .evaluation.conditions import Condition, evaluate_conditions, score
    from .evaluation.continuation import ContinuationScorer
    from .evaluation.scoring import LetterScorer, PromptFormat
    from .model.loading import ModelAdapter, load_model
    from .steering.export import export_control_vector, export_lm_eval, steering_from_control_vector
    from .steering.folding import fold, save_folded
    from .steering.generation import generate
    from .steering.interventions import Steering, resolve_steering
    from .study.correctness import correctness_auroc_from_run
    from .study.distributed import RayExecutor
    from .study.executors import LocalExecutor
    from .study.pipeline import StudyConfig, config_from, run_study
    from .study.stages import (
        StudyPrompts,
        StudyQuestions,
        extract_vectors,
        interpret_vectors,
        load_questions,
        open_records,
        sample_prompts,
        select_sites,
        study_conditions,
    )
    from .vectors.arithmetic import compose
    from .vectors.extraction import extract_role_vectors, mean_activations
    from .vectors.role_vectors import RoleVectors


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'rolevec' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
