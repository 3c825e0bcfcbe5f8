"""SMT in a plain PyTorch loop, with ``SparseBlockLinear`` layers put in by hand (what ``smt_kernels.patch`` does).

    python examples/plain_loop.py                      # SmolLM2-135M-Instruct, 30 steps, a few minutes on a CPU
    python examples/plain_loop.py --tiny --steps 4     # a tiny random Llama (seconds)

Each selected projection becomes a ``SparseBlockLinear``: its dense weight is frozen and ``block_weight``
(n, b, b) holds the n trainable blocks at ``block_indices`` (row block, column block). After training,
``to_linear()`` folds the blocks back into a plain ``nn.Linear`` and the model saves as an ordinary checkpoint.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

import smt_kernels
from smt_kernels import SparseBlockLinear

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import encoded_task, example_parser, model_and_tokenizer, warmup_batches  # noqa: E402

from smt_kernels.finetune import BatchStream, lr_at  # noqa: E402


def swap(model: torch.nn.Module, name: str, new: torch.nn.Module) -> torch.nn.Module:
    """Replace submodule ``name`` (e.g. model.layers.0.self_attn.q_proj) by ``new``; return the old one."""
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    old = getattr(parent, attr)
    setattr(parent, attr, new)
    return old


def main(argv: list[str] | None = None) -> Path:
    args = example_parser(__doc__.splitlines()[0]).parse_args(argv)
    out = Path(args.out)
    model, tokenizer, block_size = model_and_tokenizer(args.tiny, args.seed)
    items, _ = encoded_task(tokenizer, num_train=max(64, 8 * args.steps), seed=args.seed)
    pad = tokenizer.pad_token_id

    selection = smt_kernels.select_blocks(model, warmup_batches(items, pad), ratio=args.ratio, block_size=block_size)
    for p in model.parameters():
        p.requires_grad_(False)
    layers = {}
    for name, blocks in selection.items():
        linear = model.get_submodule(name)
        layers[name] = SparseBlockLinear.from_linear(linear, blocks, block_size)  # blocks start at W's values
        swap(model, name, layers[name])
    params = [layer.block_weight for layer in layers.values()]  # the only trainable tensors
    print(f"{len(layers)} SparseBlockLinear layers, {sum(p.numel() for p in params):,} trainable weights")

    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    warmup = max(1, args.steps // 10)
    batches = BatchStream(items, batch_size=8, pad_id=pad, seed=args.seed)
    model.train()
    losses = []
    for step in range(args.steps):
        for group in opt.param_groups:  # linear warm-up, then cosine decay (the finetune command's schedule)
            group["lr"] = lr_at(step, args.steps, warmup, args.lr)
        loss = model(**next(batches)).loss  # labels are -100 on prompt and padding: only answers are learned
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if step % max(1, args.steps // 10) == 0 or step == args.steps - 1:
            print(f"step {step + 1:3d}  loss {losses[-1]:.4f}")

    # fold the trained blocks back: plain nn.Linear layers, an ordinary Hugging Face checkpoint
    for name, layer in layers.items():
        swap(model, name, layer.to_linear())
    model.save_pretrained(out / "merged")
    tokenizer.save_pretrained(out / "merged")
    print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f}; saved the merged model to {out / 'merged'}")
    return out


if __name__ == "__main__":
    main()
