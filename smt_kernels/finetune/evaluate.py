"""Loss and evaluation: cross-entropy over answer tokens, held-out loss, accuracy of greedy generations."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from smt_kernels.finetune.data import IGNORE, PromptFormat, collate
from smt_kernels.tasks import Example, accuracy


@dataclass
class EvalResult:
    """Held-out answer loss (teacher forced), accuracy and the greedy generations, in example order."""

    loss: float
    accuracy: float
    predictions: list[str] = field(default_factory=list)


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
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


def autocast(device: torch.device):
    # bf16 on CUDA (fp32 master weights, the usual mixed precision); plain fp32 on the CPU
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


@torch.no_grad()
def evaluate(
    model: nn.Module,
    tokenizer,
    fmt: PromptFormat,
    examples: list[Example],
    max_new_tokens: int,
    device: torch.device,
    max_length: int,
    batch_size: int = 16,
    progress: bool = True,
    desc: str = "eval",
    metric: str = "exact",
) -> EvalResult:
    """Held-out answer loss (teacher forced) and accuracy of greedy generations (``tasks.score`` by ``metric``)."""
    from transformers import GenerationConfig

    was_training = model.training
    model.eval()
    pad_id = tokenizer.pad_token_id
    encoded = [fmt.encode(ex, max_length) for ex in examples]
    eos = {tokenizer.eos_token_id} | set(_as_list(getattr(model.generation_config, "eos_token_id", None)))
    gen_cfg = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        eos_token_id=sorted(e for e in eos if e is not None),
        pad_token_id=pad_id,
    )
    loss_sum, count, preds = 0.0, 0, []
    bar = tqdm(range(0, len(examples), batch_size), disable=not progress, desc=desc, unit="batch", leave=False)
    for i in bar:
        chunk = encoded[i : i + batch_size]
        with autocast(device):
            batch = to_device(collate(chunk, pad_id), device)
            loss_sum += float(answer_loss(model, batch, reduction="sum"))
            count += int((batch["labels"][:, 1:] != IGNORE).sum())
            prompts = to_device(collate(chunk, pad_id, with_answer=False, left_pad=True), device)
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
        b = to_device(b, device)
        with autocast(device):
            total += float(answer_loss(model, b, reduction="sum"))
        count += int((b["labels"][:, 1:] != IGNORE).sum())
    model.train(was_training)
    return total / max(count, 1)


def _as_list(x) -> list:
    if x is None:
        return []
    return list(x) if isinstance(x, (list, tuple)) else [x]
