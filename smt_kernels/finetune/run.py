"""``run_finetune``: check everything, load, evaluate, prepare the method, train, evaluate again, save, report."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn

from smt_kernels.finetune.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from smt_kernels.finetune.config import FinetuneConfig, FinetuneError, check_config
from smt_kernels.finetune.data import TokenizedTask, build_task, data_fingerprint
from smt_kernels.finetune.evaluate import EvalResult, eval_loss, evaluate
from smt_kernels.finetune.loop import TrainingRun, TrainLog, check_converged
from smt_kernels.finetune.methods import Prepared, prepare_method, smt_budget
from smt_kernels.finetune.model import (
    DEFAULT_MODEL_NAME,
    enable_gradient_checkpointing,
    load_model,
    no_input_gradients,
    quantize_model,
    resolve_model_source,
)
from smt_kernels.finetune.outputs import check_outputs, checkpoint_dir, discard_checkpoint, save_outputs
from smt_kernels.finetune.parallel import Ranks, check_world, data_parallel
from smt_kernels.finetune.report import FinetuneResult, peak_memory
from smt_kernels.finetune.reselect import Reselector, apply_folded, patch_union
from smt_kernels.patch import trainable_parameters

log = logging.getLogger(__name__)


@dataclass
class _Job:
    """What the checks and the loading produced."""

    device: torch.device
    data: TokenizedTask
    data_sha256: str
    resume: Checkpoint | None
    model: nn.Module
    tokenizer: Any
    total_params: int
    load_seconds: float


def run_finetune(
    cfg: FinetuneConfig, model: nn.Module | None = None, tokenizer=None, before: EvalResult | None = None
) -> FinetuneResult:
    """Run one fine-tuning job and return its result (also written to ``cfg.output_json`` if set).

    Every option, input file and output path is checked before the model loads. ``model``/``tokenizer`` may be
    passed in (e.g. a copy of a model loaded once for many runs); the model is trained in place. ``before``: the
    base model's evaluation on the same held-out set, if already known (returned as ``result.before``).

    Under torchrun (``WORLD_SIZE`` > 1) every rank calls this: data parallel over the ranks (``finetune.parallel``),
    one selection, rank 0 evaluates and writes every file, and every rank returns the same result.
    """
    t_start = time.perf_counter()
    check_config(cfg)
    # the run seeds torch's global generators from cfg.seed; the caller's CPU random state is theirs again
    # afterwards (CUDA states are not forked: that would touch every visible GPU from every torchrun rank)
    with torch.random.fork_rng(devices=[]), data_parallel(cfg) as ranks:
        return _run(cfg, ranks, model, tokenizer, before, t_start)


def _run(cfg: FinetuneConfig, ranks: Ranks, model: nn.Module | None, tokenizer, before: EvalResult | None,
         t_start: float) -> FinetuneResult:  # fmt: skip
    """The run on this rank: under torchrun every rank trains, rank 0 alone evaluates and writes."""
    job = _check_and_load(cfg, ranks, model, tokenizer)
    task = job.data.task
    evaluate_ = partial(
        evaluate, tokenizer=job.tokenizer, fmt=job.data.fmt, examples=task.eval, max_new_tokens=job.data.max_new_tokens,
        device=job.device, max_length=cfg.max_length, batch_size=cfg.eval_batch_size, progress=cfg.progress,
        metric=task.metric,
    )  # fmt: skip
    if job.resume is not None:
        before = job.resume.before
    elif before is None or len(before.predictions) != len(task.eval):
        before = ranks.on_main(lambda: evaluate_(job.model, desc="eval (before)"))
    log.info("before: held-out loss %.4f, accuracy %.1f%%", before.loss, 100 * before.accuracy)

    prepared = _prepare(cfg, job, ranks)
    trainable = trainable_parameters(prepared.model)[0]
    _log_trainable(prepared, trainable, job.total_params)
    train_log, reselector = _train(cfg, job, ranks, prepared, before)
    if reselector is not None:  # the report describes the last selection, as num_blocks and the per-kind counts do
        trainable = trainable_parameters(prepared.model)[0]
    loss_after = ranks.on_main(lambda: eval_loss(prepared.model, job.data.eval_batches, job.device))
    check_converged(train_log, before.loss, loss_after, cfg)
    peak = peak_memory(job.device)
    after = ranks.on_main(lambda: evaluate_(prepared.model, desc="eval (after)"))
    train_log.eval_curve.append({"step": cfg.steps, "loss": after.loss})
    log.info("after:  held-out loss %.4f, accuracy %.1f%%", after.loss, 100 * after.accuracy)

    saved = {}
    if cfg.output_dir:  # one writer
        saved = ranks.on_main(lambda: _save(cfg, job, prepared, reselector))
    if cfg.output_json:
        saved["summary_json"] = str(cfg.output_json)
    result = _result(cfg, job, ranks, prepared, trainable, train_log, before, after, peak, saved, t_start)
    if reselector is not None:
        result.reselections = list(reselector.records)
    if cfg.output_json:
        ranks.on_main(lambda: result.write_json(cfg.output_json))
    return result


def _check_and_load(cfg: FinetuneConfig, ranks: Ranks, model: nn.Module | None, tokenizer) -> _Job:
    """Options, devices, output paths, data and checkpoint first (fast), then the model (slow)."""
    t_start = time.perf_counter()
    device = ranks.device
    if model is not None and tokenizer is None:
        raise ValueError("a model passed in needs its tokenizer")
    check_outputs(cfg, resolve_model_source(cfg.model, cfg.gguf_file)[0] if model is None else None)
    task = build_task(cfg)
    check_world(cfg, ranks.world, len(task.train))
    data_sha = data_fingerprint(task)
    resume = load_checkpoint(cfg.resume, cfg) if cfg.resume else None
    if resume is not None and resume.data_sha256 != data_sha:
        raise FinetuneError(f"--resume: the checkpoint was trained on other data (fingerprint {resume.data_sha256}, "
                            f"this run's {data_sha})")  # fmt: skip
    if ranks.main:  # every check passed: --overwrite discards an earlier checkpoint before this run writes one
        discard_checkpoint(cfg)
    if model is None:
        log.info("loading model %s ...", cfg.model or DEFAULT_MODEL_NAME)
        model, tokenizer = load_model(cfg.model, cfg.gguf_file)
    total = trainable_parameters(model)[1]  # of the base model, before adapters
    if cfg.method != "full":
        smt_budget(model, cfg)  # a budget that does not fit fails before the slow part
    load_seconds = time.perf_counter() - t_start
    model.to(device)
    if cfg.quantize:  # before the baseline evaluation and selection: the 4-bit model is the one trained
        quantize_model(model, cfg.quantize, device)
    if cfg.gradient_checkpointing:  # on the decoder layers: patching and adapters inside them keep it
        enable_gradient_checkpointing(model)
    model.config.use_cache = True
    data = TokenizedTask.build(task, tokenizer, cfg)
    log.info("task %s: %d train / %d held-out examples; method %s on %s", task.name, len(task.train),
             len(task.eval), cfg.method, device)  # fmt: skip
    for ex in task.train[: cfg.show_examples if ranks.main else 0]:
        log.info("  e.g. %r -> %r", ex.prompt, ex.answer)
    return _Job(device, data, data_sha, resume, model, tokenizer, total, load_seconds)


def _prepare(cfg: FinetuneConfig, job: _Job, ranks: Ranks) -> Prepared:
    """The method's trainable model; SMT selects on warm-up batches (the training data in another seeded order;
    under torchrun each rank's share of them), unless a resumed run brings its selection."""
    selection = job.resume.selection if job.resume else None
    warmup = job.data.stream(cfg.batch_size, cfg.seed + 1)
    batches = (
        [ranks.selection_shard(next(warmup)) for _ in range(cfg.select_batches)]
        if cfg.method == "smt" and not selection
        else []
    )
    if job.resume is not None and job.resume.reselect:  # the blocks of earlier selections, trained, as they were
        apply_folded(job.model, job.resume.reselect, cfg.block_size)
    torch.manual_seed(cfg.seed)  # LoRA's initialisation: the same in every run of this seed
    prepared = prepare_method(job.model, cfg, batches, job.device, selection)
    prepared.model.to(job.device)
    if cfg.gradient_checkpointing:  # PEFT makes a checkpointed model's inputs require grad again
        no_input_gradients(prepared.model)
    return prepared


def _train(cfg: FinetuneConfig, job: _Job, ranks: Ranks, prepared: Prepared,
           before: EvalResult) -> tuple[TrainLog, Reselector | None]:  # fmt: skip
    """The training steps left (all, or those after the resumed checkpoint), checkpointing as asked (rank 0) and
    choosing the blocks again at ``--reselect-at`` (the returned ``Reselector``, None without)."""
    stream = job.data.stream(cfg.batch_size, cfg.seed)
    start = TrainLog(eval_curve=[{"step": 0, "loss": before.loss}])
    run = TrainingRun(prepared.model, cfg, ranks, stream, job.data.eval_batches, start)
    reselector = None
    if cfg.reselect_at:
        reselector = Reselector(cfg, ranks, job.data, prepared, run)
        if job.resume is not None and job.resume.reselect:
            reselector.records = list(job.resume.reselect["records"])
            reselector.folded = {
                n: {tuple(int(x) for x in p) for p in e["indices"].tolist()}
                for n, e in job.resume.reselect["folded"].items()
            }
    if job.resume is not None:
        run.load_state_dict(job.resume.training)
        log.info("resumed from %s at step %d of %d", job.resume.path, job.resume.step, cfg.steps)
    if job.device.type == "cuda":
        torch.cuda.synchronize(job.device)
        torch.cuda.reset_peak_memory_stats(job.device)
    directory = checkpoint_dir(cfg)

    def checkpoint(step: int) -> None:
        if directory is not None and step % cfg.checkpoint_every == 0 and step < cfg.steps and ranks.main:
            extra = reselector.state_dict() if reselector is not None else None
            save_checkpoint(directory, cfg, run.state_dict(), prepared.selection, before, job.data_sha256, extra)
            log.info("checkpoint at step %d: %s", step, directory)

    return run.run(checkpoint, reselector.before_step if reselector else None), reselector


def _save(cfg: FinetuneConfig, job: _Job, prepared: Prepared, reselector: Reselector | None) -> dict[str, str]:
    """The outputs; after re-selections the blocks saved are every block trained (``patch_union``)."""
    selection = prepared.selection
    if reselector is not None and reselector.folded:
        prepared.model, selection = patch_union(prepared.model, cfg, selection, reselector.folded)
    return save_outputs(prepared.model, job.tokenizer, cfg, selection)


def _result(cfg: FinetuneConfig, job: _Job, ranks: Ranks, prepared: Prepared, trainable: int, train_log: TrainLog,
            before: EvalResult, after: EvalResult, peak: tuple[float, str], saved: dict[str, str],
            t_start: float) -> FinetuneResult:  # fmt: skip
    task, summary, device = job.data.task, prepared.summary, job.device
    first, last = train_log.tail_means()
    return FinetuneResult(
        method=cfg.method, task=task.name, model=cfg.model or DEFAULT_MODEL_NAME,
        device=str(device) if device.type == "cpu" else torch.cuda.get_device_name(device), ranks=ranks.world,
        seed=cfg.seed,
        steps=cfg.steps, lr=cfg.peak_lr, trainable_params=trainable, total_params=job.total_params,
        target_params=prepared.target_params, num_blocks=summary.num_blocks if summary else None,
        blocks_per_kind=summary.per_kind() if summary else None,
        blocks_per_layer={("-" if k is None else str(k)): v for k, v in summary.per_layer().items()}
        if summary else None,
        lora_rank=prepared.lora_rank, train_loss_first=first, train_loss_last=last, eval_loss_before=before.loss,
        eval_loss_after=after.loss, accuracy_before=before.accuracy, accuracy_after=after.accuracy,
        num_eval=len(task.eval), metric=task.metric, data_sha256=job.data_sha256, peak_memory_mib=peak[0],
        peak_memory_kind=peak[1], tokens_per_second=train_log.tokens / max(train_log.train_seconds, 1e-9),
        train_seconds=train_log.train_seconds, select_seconds=prepared.select_seconds,
        load_seconds=job.load_seconds, total_seconds=time.perf_counter() - t_start,
        resumed_from_step=job.resume.step if job.resume else None, saved=saved,
        examples=[{"prompt": ex.prompt, "answer": ex.answer, "before": b, "after": a}
                  for ex, b, a in zip(task.eval, before.predictions, after.predictions, strict=True)],
        loss_curve=train_log.curve, eval_loss_curve=train_log.eval_curve, config=cfg.to_dict(), quantize=cfg.quantize,
        before=before,
    )  # fmt: skip


def _log_trainable(prepared: Prepared, trainable: int, total: int) -> None:
    extra = ""
    if prepared.target_params:
        extra += f", {100 * trainable / prepared.target_params:.2f}% of the target weights"
    if prepared.lora_rank is not None:
        extra += f", LoRA rank {prepared.lora_rank}"
    log.info("trainable parameters: %s of %s (%.3f%%)%s", f"{trainable:,}", f"{total:,}", 100 * trainable / total,
             extra)  # fmt: skip
