"""``run_finetune``: check everything, load, evaluate, prepare the method, train, evaluate again, save, report."""

from __future__ import annotations

import logging
import time

import torch
from torch import nn

from smt_kernels.finetune.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from smt_kernels.finetune.config import FinetuneConfig, FinetuneError, check_config
from smt_kernels.finetune.data import BatchStream, PromptFormat, build_task, collate, data_fingerprint
from smt_kernels.finetune.evaluate import EvalResult, eval_loss, evaluate
from smt_kernels.finetune.loop import TrainingRun, TrainLog, check_converged
from smt_kernels.finetune.methods import Prepared, prepare_method, smt_budget
from smt_kernels.finetune.model import DEFAULT_MODEL_NAME, load_model, pick_device, resolve_model_source
from smt_kernels.finetune.outputs import check_outputs, checkpoint_dir, save_outputs
from smt_kernels.finetune.report import FinetuneResult, peak_memory
from smt_kernels.patch import trainable_parameters
from smt_kernels.tasks import Task

log = logging.getLogger(__name__)


def run_finetune(
    cfg: FinetuneConfig, model: nn.Module | None = None, tokenizer=None, before: EvalResult | None = None
) -> FinetuneResult:
    """Run one fine-tuning job and return its result (also written to ``cfg.output_json`` if set).

    Every option, input file and output path is checked before the model loads. ``model``/``tokenizer`` may be
    passed in (e.g. a copy of a model loaded once for many runs); the model is trained in place. ``before``: the
    base model's evaluation on the same held-out set, if already known (returned as ``result.before``).
    """
    t_start = time.perf_counter()
    check_config(cfg)
    device = pick_device(cfg.device)
    if model is None:
        model_dir = resolve_model_source(cfg.model, cfg.gguf_file)[0]
    elif tokenizer is None:
        raise ValueError("a model passed in needs its tokenizer")
    check_outputs(cfg, model_dir if model is None else None)
    task = build_task(cfg)
    resume = _load_resume(cfg, task)
    if model is None:
        log.info("loading model %s ...", cfg.model or DEFAULT_MODEL_NAME)
        model, tokenizer = load_model(cfg.model, cfg.gguf_file)
    total = trainable_parameters(model)[1]
    if cfg.method != "full":
        smt_budget(model, cfg)  # a budget that does not fit fails before the slow part
    load_seconds = time.perf_counter() - t_start

    model.to(device)
    model.config.use_cache = True
    fmt = PromptFormat(tokenizer, task.system, cfg.chat_template)
    train_items = [fmt.encode(ex, cfg.max_length) for ex in task.train]
    log.info(
        "task %s: %d train / %d held-out examples; method %s on %s",
        task.name,
        len(task.train),
        len(task.eval),
        cfg.method,
        device,
    )
    for ex in task.train[: cfg.show_examples]:
        log.info("  e.g. %r -> %r", ex.prompt, ex.answer)
    eval_kwargs = dict(
        max_new_tokens=task.max_new_tokens,
        device=device,
        max_length=cfg.max_length,
        batch_size=cfg.eval_batch_size,
        progress=cfg.progress,
        metric=task.metric,
    )
    if resume is not None:
        before = resume.before
    elif before is None or len(before.predictions) != len(task.eval):
        before = evaluate(model, tokenizer, fmt, task.eval, desc="eval (before)", **eval_kwargs)
    log.info("before: held-out loss %.4f, accuracy %.1f%%", before.loss, 100 * before.accuracy)

    # warm-up batches for selection: the same training data in another seeded order
    warmup = BatchStream(train_items, cfg.batch_size, tokenizer.pad_token_id, cfg.seed + 1)
    select_batches = [next(warmup) for _ in range(cfg.select_batches)] if cfg.method == "smt" and not resume else []
    torch.manual_seed(cfg.seed)  # LoRA's initialisation; the same in every run of this seed
    prepared = prepare_method(model, cfg, select_batches, device, resume.selection if resume else None)
    model = prepared.model.to(device)
    trainable = trainable_parameters(model)[0]
    _log_trainable(prepared, trainable, total)

    eval_batches = [
        collate(
            [fmt.encode(ex, cfg.max_length) for ex in task.eval[i : i + cfg.eval_batch_size]], tokenizer.pad_token_id
        )
        for i in range(0, len(task.eval), cfg.eval_batch_size)
    ]
    stream = BatchStream(train_items, cfg.batch_size, tokenizer.pad_token_id, cfg.seed)
    run = TrainingRun(model, cfg, device, stream, eval_batches, TrainLog(eval_curve=[{"step": 0, "loss": before.loss}]))
    if resume is not None:
        run.load_state_dict(resume.training)
        log.info("resumed from %s at step %d of %d", resume.path, resume.step, cfg.steps)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    ckpt = checkpoint_dir(cfg)
    data_sha = data_fingerprint(task)

    def on_step(step: int) -> None:
        if ckpt is not None and step % cfg.checkpoint_every == 0 and step < cfg.steps:
            save_checkpoint(ckpt, cfg, run.state_dict(), prepared.selection, before, data_sha)
            log.info("checkpoint at step %d: %s", step, ckpt)

    train_log = run.run(on_step)
    check_converged(train_log, before.loss, eval_loss(model, eval_batches, device), cfg)
    peak_mib, peak_what = peak_memory(device)
    after = evaluate(model, tokenizer, fmt, task.eval, desc="eval (after)", **eval_kwargs)
    train_log.eval_curve.append({"step": cfg.steps, "loss": after.loss})
    log.info("after:  held-out loss %.4f, accuracy %.1f%%", after.loss, 100 * after.accuracy)

    saved = save_outputs(model, tokenizer, cfg, prepared.selection) if cfg.output_dir else {}
    if cfg.output_json:
        saved["summary_json"] = str(cfg.output_json)
    first, last = train_log.tail_means()
    summary = prepared.summary
    result = FinetuneResult(
        method=cfg.method,
        task=task.name,
        model=cfg.model or DEFAULT_MODEL_NAME,
        device=str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        seed=cfg.seed,
        steps=cfg.steps,
        lr=cfg.peak_lr,
        trainable_params=trainable,
        total_params=total,
        target_params=prepared.target_params,
        num_blocks=summary.num_blocks if summary else None,
        blocks_per_kind=summary.per_kind() if summary else None,
        blocks_per_layer={("-" if k is None else str(k)): v for k, v in summary.per_layer().items()}
        if summary
        else None,
        lora_rank=prepared.lora_rank,
        train_loss_first=first,
        train_loss_last=last,
        eval_loss_before=before.loss,
        eval_loss_after=after.loss,
        accuracy_before=before.accuracy,
        accuracy_after=after.accuracy,
        num_eval=len(task.eval),
        metric=task.metric,
        data_sha256=data_sha,
        peak_memory_mib=peak_mib,
        peak_memory_kind=peak_what,
        tokens_per_second=train_log.tokens / max(train_log.train_seconds, 1e-9),
        train_seconds=train_log.train_seconds,
        select_seconds=prepared.select_seconds,
        load_seconds=load_seconds,
        total_seconds=time.perf_counter() - t_start,
        resumed_from_step=resume.step if resume else None,
        saved=saved,
        examples=[
            {"prompt": ex.prompt, "answer": ex.answer, "before": b, "after": a}
            for ex, b, a in zip(task.eval, before.predictions, after.predictions, strict=True)
        ],
        loss_curve=train_log.curve,
        eval_loss_curve=train_log.eval_curve,
        config=cfg.to_dict(),
        before=before,
    )
    if cfg.output_json:
        result.write_json(cfg.output_json)
    return result


def _load_resume(cfg: FinetuneConfig, task: Task) -> Checkpoint | None:
    if cfg.resume is None:
        return None
    resume = load_checkpoint(cfg.resume, cfg)
    if resume.data_sha256 != data_fingerprint(task):
        raise FinetuneError(
            f"--resume: the checkpoint was trained on other data (fingerprint {resume.data_sha256}, "
            f"this run's {data_fingerprint(task)})"
        )
    return resume


def _log_trainable(prepared: Prepared, trainable: int, total: int) -> None:
    extra = ""
    if prepared.target_params:
        extra += f", {100 * trainable / prepared.target_params:.2f}% of the target weights"
    if prepared.lora_rank is not None:
        extra += f", LoRA rank {prepared.lora_rank}"
    log.info(
        "trainable parameters: %s of %s (%.3f%%)%s", f"{trainable:,}", f"{total:,}", 100 * trainable / total, extra
    )
