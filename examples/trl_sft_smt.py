"""SMT with TRL's ``SFTTrainer``: select blocks, patch, supervised fine-tuning on prompt/completion chats, save.

    pip install trl
    python examples/trl_sft_smt.py                      # SmolLM2-135M-Instruct, 30 steps, a few minutes on a CPU
    python examples/trl_sft_smt.py --tiny --steps 4     # a tiny random Llama (seconds)

``SFTTrainer`` takes the patched model like any other: its optimizer sees only the block weights, and with a
prompt/completion dataset it learns the completions only. No ``peft_config``: SMT is not a PEFT adapter.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

import smt_kernels

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import encoded_task, example_parser, model_and_tokenizer, warmup_batches  # noqa: E402


def main(argv: list[str] | None = None) -> Path:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    args = example_parser(__doc__.splitlines()[0]).parse_args(argv)
    out = Path(args.out)
    model, tokenizer, block_size = model_and_tokenizer(args.tiny, args.seed)
    items, task = encoded_task(tokenizer, num_train=max(64, 8 * args.steps), seed=args.seed)

    # selection scores blocks on warm-up batches of the same data (labels mask the prompts, as SFT does)
    selection = smt_kernels.select_blocks(
        model, warmup_batches(items, tokenizer.pad_token_id), ratio=args.ratio, block_size=block_size
    )
    smt_kernels.patch(model, selection, block_size=block_size)

    system = [{"role": "system", "content": task.system}]
    data = Dataset.from_list(
        [
            {
                "prompt": [*system, {"role": "user", "content": ex.prompt}],
                "completion": [{"role": "assistant", "content": ex.answer}],
            }
            for ex in task.train
        ]
    )
    config = SFTConfig(
        output_dir=str(out / "sft"),
        max_steps=args.steps,
        per_device_train_batch_size=8,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, args.steps // 10),
        logging_steps=max(1, args.steps // 10),
        save_strategy="no",
        report_to=[],
        seed=args.seed,
        use_cpu=not torch.cuda.is_available(),
        bf16=torch.cuda.is_available(),
        max_length=512,
        dataloader_num_workers=0,
    )
    trainer = SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer)
    trainer.train()

    smt_kernels.save_blocks(model, out / "blocks")
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    print(f"training loss {losses[0]:.4f} -> {losses[-1]:.4f}; saved the trained blocks to {out / 'blocks'}")
    return out


if __name__ == "__main__":
    main()
