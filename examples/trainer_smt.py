"""SMT with the Hugging Face ``Trainer``: select blocks, patch, train with checkpoints, resume, save the blocks.

    python examples/trainer_smt.py                       # SmolLM2-135M-Instruct, 30 steps, a few minutes on a CPU
    python examples/trainer_smt.py --resume              # after an interruption: continue from the last checkpoint
    python examples/trainer_smt.py --tiny --steps 4      # a tiny random Llama (seconds)

The selection is saved next to the checkpoints (``OUT/selection.json``), so a resumed run patches exactly the
same blocks; ``Trainer`` restores the block weights, the optimizer, the scheduler, the RNG and the data
position from ``OUT/trainer/checkpoint-N``. The result: ``OUT/blocks`` (``smt_kernels.save_blocks``: only the
trained blocks, a few MB) and, with ``--merged``, ``OUT/merged``: a plain Hugging Face model.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments

import smt_kernels
from smt_kernels.finetune import collate

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import encoded_task, example_parser, model_and_tokenizer, warmup_batches  # noqa: E402


def main(argv: list[str] | None = None) -> Path:
    p = example_parser(__doc__.splitlines()[0])
    p.add_argument("--save-steps", type=int, default=10, help="checkpoint every N steps (default: 10)")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in OUT/trainer")
    p.add_argument("--merged", action="store_true", help="also save a merged plain Hugging Face model")
    args = p.parse_args(argv)
    out = Path(args.out)

    model, tokenizer, block_size = model_and_tokenizer(args.tiny, args.seed)
    items, _ = encoded_task(tokenizer, num_train=max(64, 8 * args.steps), seed=args.seed)

    # 1. select the blocks once (gradient scores on warm-up batches) and keep the choice with the run
    selection_file = out / "selection.json"
    if args.resume:
        selection = smt_kernels.Selection.load(selection_file)
    else:
        selection = smt_kernels.select_blocks(
            model, warmup_batches(items, tokenizer.pad_token_id), ratio=args.ratio, block_size=block_size
        )
        out.mkdir(parents=True, exist_ok=True)
        selection.save(selection_file)
    # 2. patch: the chosen blocks become the only trainable parameters (SparseBlockLinear layers)
    smt_kernels.patch(model, selection, block_size=block_size)

    # 3. train with the ordinary Trainer; its optimizer sees only the block weights
    targs = TrainingArguments(
        output_dir=str(out / "trainer"),
        max_steps=args.steps,
        per_device_train_batch_size=8,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, args.steps // 10),
        weight_decay=0.0,
        save_strategy="steps",
        save_steps=args.save_steps,
        logging_steps=max(1, args.steps // 10),
        report_to=[],
        seed=args.seed,
        use_cpu=not torch.cuda.is_available(),
        bf16=torch.cuda.is_available(),
        remove_unused_columns=False,
        dataloader_num_workers=0,
    )
    trainer = Trainer(
        model=model, args=targs, train_dataset=items, data_collator=lambda batch: collate(batch, tokenizer.pad_token_id)
    )
    trainer.train(resume_from_checkpoint=True if args.resume else None)

    # 4. save what was trained: the blocks (and optionally a merged plain model)
    smt_kernels.save_blocks(model, out / "blocks")
    if args.merged:
        smt_kernels.merge(model).save_pretrained(out / "merged")
        tokenizer.save_pretrained(out / "merged")
    print(
        f"saved the trained blocks to {out / 'blocks'}; load them with "
        f"smt_kernels.load_blocks(base_model, {str(out / 'blocks')!r})"
    )
    return out


if __name__ == "__main__":
    main()
