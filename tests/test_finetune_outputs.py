"""``--output-dir`` of an earlier run: refused up front (its checkpoint too) unless --resume or --overwrite, and
--overwrite removes the earlier outputs this run does not write, nothing else."""

from __future__ import annotations

import pytest
from test_cli import TINY, TINY_FOR, _fails, run_interrupted

from smt_kernels.cli import main
from smt_kernels.finetune import run as run_mod


@pytest.fixture(autouse=True)
def _tiny_models_on_one_thread(one_thread):
    """Every test here runs on one intra-op thread (conftest's ``one_thread``)."""


@pytest.fixture
def no_model_load(monkeypatch):
    monkeypatch.setattr(run_mod, "load_model", lambda *a: pytest.fail("the model was loaded before the check"))


def _earlier_run(out):
    """What an SMT run with --save-merged and --checkpoint-every leaves, with a file of the user's beside it."""
    (out / "merged").mkdir(parents=True)
    (out / "merged" / "config.json").write_text("{}")
    (out / "checkpoint").mkdir()
    (out / "checkpoint" / "state.pt").write_bytes(b"earlier checkpoint")
    for name in ("smt_blocks.json", "smt_blocks.0123456789abcdef.safetensors", "selection.json"):
        (out / name).write_text("earlier")
    (out / "notes.txt").write_text("mine")


@pytest.mark.parametrize(
    "earlier", [["merged"], ["lora_adapter"], ["selection.json"], ["smt_blocks.json"], ["checkpoint"]]
)
def test_earlier_outputs_are_refused_before_any_work(capsys, tiny_model_dir, tmp_path, no_model_load, earlier):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("not an output: allowed")
    for name in earlier:
        (out / name).mkdir() if "." not in name else (out / name).write_text("x")
    err = _fails(
        capsys,
        ["--model", str(tiny_model_dir), *TINY, "--output-dir", str(out)],
        f"--output-dir '{out}' holds the outputs of an earlier run ({', '.join(earlier)}): --overwrite replaces them",
    )
    assert len(err.strip().splitlines()) == 1


def test_other_files_in_the_output_dir_are_fine(capsys, tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    js = out / "r.json"
    assert main(["finetune", "--model", str(tiny_model_dir), *TINY, "--output-dir", str(out), "--output-json",
                 str(js), "--allow-divergence"]) == 0, capsys.readouterr().err  # fmt: skip
    assert (out / "notes.txt").read_text() == "mine" and js.is_file() and (out / "smt_blocks.json").is_file()


def test_fresh_run_refuses_an_earlier_checkpoint(capsys, tiny_model_dir, tmp_path, monkeypatch):
    """Re-running an interrupted command without --resume would overwrite its checkpoint: refused, naming it."""
    out = tmp_path / "out"
    args = ["finetune", "--model", str(tiny_model_dir), *TINY, "--steps", "4", "--allow-divergence"]
    assert run_interrupted(args, out, monkeypatch) == 130
    state = out / "checkpoint" / "state.pt"
    saved = state.read_bytes()
    capsys.readouterr()
    with monkeypatch.context() as m:
        m.setattr(run_mod, "load_model", lambda *a: pytest.fail("the model was loaded before the check"))
        _fails(
            capsys,
            [*args[1:], "--output-dir", str(out), "--checkpoint-every", "2"],
            f"holds the resumable checkpoint '{state}' of an earlier run: --resume {state.parent} continues it, "
            "--overwrite discards it",
        )
    assert state.read_bytes() == saved
    # --resume continues it
    resumed = [*args, "--output-dir", str(out), "--checkpoint-every", "2", "--resume", str(state.parent)]
    assert main(resumed) == 0, capsys.readouterr().err


def test_overwrite_removes_only_the_earlier_outputs_it_does_not_write(capsys, tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    _earlier_run(out)
    lora = ["finetune", "--model", str(tiny_model_dir), "--method", "lora", *TINY_FOR["lora"], "--allow-divergence"]
    assert main([*lora, "--output-dir", str(out), "--overwrite"]) == 0, capsys.readouterr().err
    err = capsys.readouterr().err
    assert f"--overwrite: removed the earlier run's checkpoint {out / 'checkpoint'}" in err
    assert "removed the earlier outputs merged, selection.json, smt_blocks.0123456789abcdef.safetensors, " in err
    assert sorted(p.name for p in out.iterdir()) == ["lora_adapter", "notes.txt"]
    assert (out / "notes.txt").read_text() == "mine"

    # then SMT with --save-merged: the adapter goes, the blocks and merged model come
    smt = ["finetune", "--model", str(tiny_model_dir), *TINY, "--allow-divergence", "--save-merged"]
    assert main([*smt, "--output-dir", str(out), "--overwrite"]) == 0, capsys.readouterr().err
    names = sorted(p.name for p in out.iterdir())
    assert names[:3] == ["merged", "notes.txt", "selection.json"] and "lora_adapter" not in names
    assert names[3].startswith("smt_blocks.") and names[4:] == ["smt_blocks.json"]

    # and SMT again without --save-merged: the earlier merged model does not stay beside the new blocks
    assert main([*smt[:-1], "--output-dir", str(out), "--overwrite", "--lr", "3e-2"]) == 0, capsys.readouterr().err
    assert not (out / "merged").exists() and (out / "smt_blocks.json").is_file()
    assert "removed the earlier outputs merged from" in capsys.readouterr().err


def test_overwrite_keeps_the_earlier_outputs_when_nothing_is_saved(capsys, tiny_model_dir, tmp_path):
    """A diverging run saves nothing: --overwrite has then discarded only the earlier checkpoint."""
    out = tmp_path / "out"
    _earlier_run(out)
    _fails(
        capsys,
        ["--model", str(tiny_model_dir), *TINY, "--lr", "1e30", "--output-dir", str(out), "--overwrite"],
        "nothing was saved",
    )
    assert sorted(p.name for p in out.iterdir()) == [
        "merged",
        "notes.txt",
        "selection.json",
        "smt_blocks.0123456789abcdef.safetensors",
        "smt_blocks.json",
    ]
