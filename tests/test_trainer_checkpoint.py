"""HF Trainer on a patched tiny LLaMA: checkpoints every few steps, and a run resumed from a mid-run checkpoint
ends with exactly the weights of the uninterrupted run (CPU, bit for bit). A checkpoint's model file also
reloads with plain ``from_pretrained`` to the model trained up to that step."""

import torch
from tiny_models import SELECTION, B, block_weights, make_batch, tiny
from transformers import LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

from smt_kernels import SparseBlockLinear, patch

STEPS, SAVE_EVERY = 6, 3


def dataset():
    # 8 rows, batch 2: an epoch is 4 steps, so the resumed run crosses an epoch boundary (a reshuffle)
    return [{k: v[0] for k, v in make_batch(i, n=1).items()} for i in range(8)]


class CountSteps(TrainerCallback):
    def __init__(self):
        self.steps = 0

    def on_step_end(self, args, state, control, **kwargs):
        self.steps += 1


def run(out_dir, resume_from=None):
    """(the trained model, the number of optimizer steps this run made)."""
    model = patch(tiny(), SELECTION, block_size=B, verbose=False)
    args = TrainingArguments(
        output_dir=str(out_dir),
        max_steps=STEPS,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        weight_decay=0.1,
        warmup_steps=2,
        lr_scheduler_type="linear",
        save_strategy="steps",
        save_steps=SAVE_EVERY,
        logging_strategy="no",
        report_to=[],
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=7,
    )
    counter = CountSteps()
    Trainer(model=model, args=args, train_dataset=dataset(), callbacks=[counter]).train(
        resume_from_checkpoint=resume_from
    )
    return model, counter.steps


def dense_state(model):
    """The trained model as plain weights: every tensor, the blocks written into their dense weights."""
    state = {k: v.clone() for k, v in model.state_dict().items() if ".block_" not in k}
    for name, m in model.named_modules():
        if isinstance(m, SparseBlockLinear):
            state[f"{name}.weight"] = m.merged_weight()
    return state


def test_resume_from_a_checkpoint_continues_to_the_same_weights(tmp_path):
    full, steps = run(tmp_path / "full")
    assert steps == STEPS
    checkpoints = sorted(p.name for p in (tmp_path / "full").glob("checkpoint-*"))
    assert checkpoints == [f"checkpoint-{SAVE_EVERY}", f"checkpoint-{STEPS}"]

    resumed, steps = run(tmp_path / "resumed", resume_from=str(tmp_path / "full" / f"checkpoint-{SAVE_EVERY}"))
    assert steps == STEPS - SAVE_EVERY  # so the first steps' work can only have come from the checkpoint
    want, got = block_weights(full), block_weights(resumed)
    for name in SELECTION:
        assert not torch.equal(want[name], block_weights(patch(tiny(), SELECTION, B, verbose=False))[name])
        assert torch.equal(got[name], want[name]), name
    want_state, got_state = dense_state(full), dense_state(resumed)
    for key, value in want_state.items():
        assert torch.equal(got_state[key], value), key

    # the last checkpoint's model file is the trained model for plain transformers (block_* keys are extra)
    plain = LlamaForCausalLM.from_pretrained(tmp_path / "full" / f"checkpoint-{STEPS}").eval()
    full.eval()
    batch = make_batch(11)
    with torch.no_grad():
        assert torch.equal(plain(**batch).logits, full(**batch).logits)
