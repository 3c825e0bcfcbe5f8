"""End-to-end fine-tuning (``smt-kernels finetune``): SMT, LoRA or full fine-tuning on equal terms.

One module per concept: ``config`` (the options), ``model`` (loading), ``data`` (tasks, prompts, batches),
``methods`` (SMT/LoRA/full and their shared budget), ``loop`` (training), ``evaluate``, ``checkpoint``
(resume), ``outputs`` (what is written where), ``parallel`` (data parallel under torchrun) and ``report`` (the
result); ``run`` ties them together.
"""

from smt_kernels.finetune.config import DEFAULT_LR, DEFAULT_RATIO, METHODS, FinetuneConfig, FinetuneError, check_config
from smt_kernels.finetune.data import BatchStream, Encoded, PromptFormat, build_task, collate
from smt_kernels.finetune.evaluate import EvalResult, answer_loss, evaluate
from smt_kernels.finetune.loop import lr_at
from smt_kernels.finetune.methods import lora_rank, prepare_method, smt_budget
from smt_kernels.finetune.model import copy_model, default_model_dir, load_model, pick_device
from smt_kernels.finetune.report import FinetuneResult, format_summary
from smt_kernels.finetune.run import run_finetune

__all__ = [
    "DEFAULT_LR",
    "DEFAULT_RATIO",
    "METHODS",
    "BatchStream",
    "Encoded",
    "EvalResult",
    "FinetuneConfig",
    "FinetuneError",
    "FinetuneResult",
    "PromptFormat",
    "answer_loss",
    "build_task",
    "check_config",
    "collate",
    "copy_model",
    "default_model_dir",
    "evaluate",
    "format_summary",
    "load_model",
    "lora_rank",
    "lr_at",
    "pick_device",
    "prepare_method",
    "run_finetune",
    "smt_budget",
]
