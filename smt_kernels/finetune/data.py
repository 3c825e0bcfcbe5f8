"""Data: the task (generated or JSONL), prompts as token ids with only the answer learned, padded batches, and
the endless seeded training stream whose position a checkpoint saves.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import torch

from smt_kernels.finetune.config import DEFAULT_NUM_EVAL, FinetuneConfig, FinetuneError
from smt_kernels.tasks import DataError, Example, Task, make_task, task_from_jsonl

IGNORE = -100  # label of prompt and padding positions: cross-entropy skips them


def build_task(cfg: FinetuneConfig) -> Task:
    """The generated ``cfg.task`` or the ``cfg.data`` JSONL, with its held-out split; FinetuneError if unusable."""
    try:
        if cfg.data is not None:
            return task_from_jsonl(
                cfg.data, seed=cfg.seed, num_eval=cfg.num_eval, max_eval=DEFAULT_NUM_EVAL, eval_path=cfg.eval_data
            )
        num_eval = cfg.num_eval if cfg.num_eval is not None else DEFAULT_NUM_EVAL
        return make_task(cfg.task_name, seed=cfg.seed, num_train=cfg.num_train, num_eval=num_eval)
    except DataError as err:
        raise FinetuneError(str(err)) from None


@dataclass
class TokenizedTask:
    """A task's examples as token ids: the training items and the pre-collated held-out batches."""

    task: Task
    fmt: PromptFormat
    train: list[Encoded]
    eval_batches: list[dict[str, torch.Tensor]]
    pad_id: int
    max_new_tokens: int  # greedy generation's bound at evaluation: room for every held-out answer and its end

    @classmethod
    def build(cls, task: Task, tokenizer, cfg: FinetuneConfig) -> TokenizedTask:
        fmt = PromptFormat(tokenizer, task.system, cfg.chat_template)
        held = [fmt.encode(ex, cfg.max_length) for ex in task.eval]
        size, pad = cfg.eval_batch_size, tokenizer.pad_token_id
        batches = [collate(held[i : i + size], pad) for i in range(0, len(held), size)]
        # the task's own bound guesses tokens from characters; digits and lists take about one token each, so a
        # perfect answer could be cut short and scored wrong: never less than the longest answer's tokens
        longest = max((len(e.answer_ids) for e in held), default=0)
        train = [fmt.encode(ex, cfg.max_length) for ex in task.train]
        return cls(task, fmt, train, batches, pad, max(task.max_new_tokens, longest))

    def stream(self, batch_size: int, seed: int) -> BatchStream:
        return BatchStream(self.train, batch_size, self.pad_id, seed)


def data_fingerprint(task: Task) -> str:
    """SHA-256 (16 hex digits) of the train and held-out examples: tells which data a result came from."""
    payload = json.dumps([[(e.prompt, e.answer) for e in task.train], [(e.prompt, e.answer) for e in task.eval]])
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


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
            messages = [{"role": "system", "content": self.system}] if self.system else []
            messages.append({"role": "user", "content": prompt})
            return self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return (f"{self.system}\n\n" if self.system else "") + f"{prompt}\nAnswer: "

    def answer_text(self, prompt: str, answer: str) -> str:
        """The answer followed by the end-of-turn marker the model should learn to stop with."""
        eos = self.tok.eos_token or ""
        if self.chat:
            # render the whole turn and keep what the template writes after the prompt, up to and including EOS
            head = self.prompt_text(prompt)
            messages = [{"role": "system", "content": self.system}] if self.system else []
            messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
            full = self.tok.apply_chat_template(messages, tokenize=False)
            tail = full[len(head) :] if full.startswith(head) else ""
            if answer in tail:
                end = tail.index(answer) + len(answer)
                if eos and eos in tail[end:]:
                    return tail[: tail.index(eos, end) + len(eos)]
                return tail.rstrip("\n")  # the template's own end-of-turn token (generation stops on its id)
        return answer + eos

    def encode(self, ex: Example, max_length: int) -> Encoded:
        head = self.prompt_text(ex.prompt)
        # a chat template writes its own BOS (if any); a plain prompt gets the tokenizer's usual specials
        prompt_ids = self.tok(head, add_special_tokens=not self.chat)["input_ids"]
        answer_ids = self.tok(self.answer_text(ex.prompt, ex.answer), add_special_tokens=False)["input_ids"]
        answer_ids = answer_ids[: max_length - 1]
        keep = max_length - len(answer_ids)
        if len(prompt_ids) > keep:
            prompt_ids = prompt_ids[len(prompt_ids) - keep :]  # keep the end of the prompt, next to the answer
        return Encoded(list(prompt_ids), list(answer_ids))


def collate(
    items: list[Encoded], pad_id: int, with_answer: bool = True, left_pad: bool = False
) -> dict[str, torch.Tensor]:
    """Pad to the longest item. Labels are -100 on prompt and padding, so only answer tokens are learned."""
    seqs = [(e.prompt_ids + e.answer_ids) if with_answer else e.prompt_ids for e in items]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE, dtype=torch.long)
    for i, (e, s) in enumerate(zip(items, seqs, strict=True)):
        start = width - len(s) if left_pad else 0
        ids[i, start : start + len(s)] = torch.tensor(s)
        mask[i, start : start + len(s)] = 1
        if with_answer:
            a0 = start + len(e.prompt_ids)
            labels[i, a0 : a0 + len(e.answer_ids)] = torch.tensor(e.answer_ids)
    out = {"input_ids": ids, "attention_mask": mask}
    if with_answer:
        out["labels"] = labels
    return out


class BatchStream:
    """Endless training batches: a seeded permutation of the examples per epoch, the same for every method.

    ``state_dict()`` is the position (epoch, batch within it); ``load_state_dict`` replays the seeded permutations
    up to it, so a resumed run sees exactly the batches an uninterrupted one would.
    """

    def __init__(self, items: list[Encoded], batch_size: int, pad_id: int, seed: int) -> None:
        self.items, self.batch_size, self.pad_id, self.seed = items, batch_size, pad_id, seed
        # an epoch smaller than one batch still yields one (short) batch
        self.per_epoch = max(1, len(items) // batch_size)
        self._start(epoch=0, index=0)

    def _start(self, epoch: int, index: int) -> None:
        self._gen = torch.Generator().manual_seed(self.seed)
        for _ in range(epoch + 1):
            self._order = torch.randperm(len(self.items), generator=self._gen).tolist()
        self.epoch, self.index = epoch, index

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self.index == self.per_epoch:
            self._order = torch.randperm(len(self.items), generator=self._gen).tolist()
            self.epoch, self.index = self.epoch + 1, 0
        picked = self._order[self.index * self.batch_size : (self.index + 1) * self.batch_size]
        self.index += 1
        return collate([self.items[j] for j in picked], self.pad_id)

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["seed"] != self.seed or not 0 <= state["index"] <= self.per_epoch:
            raise ValueError(
                f"a data position {state} does not fit this stream (seed {self.seed}, "
                f"{self.per_epoch} batches per epoch)"
            )
        self._start(state["epoch"], state["index"])
