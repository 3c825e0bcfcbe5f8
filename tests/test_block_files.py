"""save_blocks / load_blocks and fingerprints: round trips, every bad file, a swapped block order, a crash at every
write step, the umask, version-1 directories, and a fuzz of mutated files (clear error and model unchanged, or
exactly the saved model)."""

import copy
import hashlib
import json
import os
import pickle
import random
import re
import shutil
import stat
import struct

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from tiny_models import ARCHS, SELECTION, B, assert_unchanged, block_weights, make_batch, snapshot, tiny, train

from smt_kernels import SMTConfig, SparseBlockLinear, block_files, load_blocks, merge, patch, save_blocks
from smt_kernels.block_files import META_FILE, V1_BLOCKS_FILE, BlockFileError, BlockFileTypeError, read_blocks
from smt_kernels.fingerprint import base_fingerprint, sample_positions

Q = "model.layers.0.self_attn.q_proj"
ERRORS = (ValueError, TypeError, FileNotFoundError)  # BlockFileError is a ValueError
CONFIG = SMTConfig(targets=("q_proj", "k_proj", "v_proj", "down_proj"), num_blocks=6, block_size=B)


def trained(steps=1, seed=1):
    """A tiny LLaMA patched with SELECTION and CONFIG (so every save below carries a config), then trained."""
    return train(patch(tiny(), SELECTION, config=CONFIG, verbose=False), steps=steps, seed=seed)


def blocks_file(path):
    return path / json.loads((path / META_FILE).read_text())["blocks_file"]


def edit_json(path, fn):
    meta = json.loads((path / META_FILE).read_text())
    fn(meta)
    (path / META_FILE).write_text(json.dumps(meta))


def rewrite_blocks(path, tensors=None, layout=None, config=None, metadata_fn=None):
    """Re-save the blocks file with other tensors, another embedded layout or config, or other metadata, and make
    the manifest name it with its new checksum: a file that is internally consistent except for what changed."""
    old = blocks_file(path)
    data = old.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    metadata = json.loads(data[8 : 8 + n])["__metadata__"]
    if layout is not None:
        metadata["layout"] = json.dumps(layout(json.loads(metadata["layout"])))
    if config is not None:
        metadata["smt_config"] = json.dumps(config(json.loads(metadata["smt_config"])))
    if metadata_fn is not None:
        metadata_fn(metadata)
    new_tensors = load_safetensors(data)
    if tensors is not None:
        new_tensors = tensors(new_tensors)
    data = save_safetensors(new_tensors, metadata=metadata)
    sha = hashlib.sha256(data).hexdigest()
    old.unlink()
    (path / f"smt_blocks.{sha[:16]}.safetensors").write_bytes(data)

    def point(meta):
        meta["blocks_file"], meta["safetensors_sha256"] = f"smt_blocks.{sha[:16]}.safetensors", sha

    edit_json(path, point)


def assert_loaded(model, want):
    got = block_weights(model)
    assert set(got) == set(want)
    for n, w in want.items():
        assert torch.equal(got[n], w), n
        m = model.get_submodule(n)
        assert torch.equal(m.weight, m.merged_weight()), n  # the blocks are in the dense weight too


# ------------------------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("arch", ARCHS)
def test_save_and_load_blocks_round_trip(arch, tmp_path):
    model = tiny(arch)
    patch(model, SELECTION, block_size=B, verbose=False)
    train(model)
    model.eval()
    batch = make_batch(7)
    with torch.no_grad():
        want = model(**batch).logits
    assert save_blocks(model, tmp_path) == tmp_path
    meta = json.loads((tmp_path / META_FILE).read_text())
    assert sorted(os.listdir(tmp_path)) == sorted([META_FILE, meta["blocks_file"]])
    assert meta["blocks_file"] == f"smt_blocks.{meta['safetensors_sha256'][:16]}.safetensors"
    assert meta["block_size"] == B and meta["num_blocks"] == 6 and meta["version"] == 4
    assert meta["modules"][Q] == {"shape": [80, 80], "dtype": "float32", "blocks": [[0, 0], [2, 2]]}
    # only the blocks are stored: 6 blocks of 32×32 fp32 plus a header that holds the layout and fingerprint
    assert blocks_file(tmp_path).stat().st_size < 6 * 32 * 32 * 4 + 8000

    block_size, saved = read_blocks(tmp_path)  # the files alone, no model
    assert block_size == B and list(saved) == list(SELECTION)
    for n, (indices, weight) in saved.items():
        assert indices.tolist() == [list(p) for p in SELECTION[n]]
        assert torch.equal(weight, model.get_submodule(n).block_weight)

    fresh = patch(tiny(arch).eval(), SELECTION, block_size=B, verbose=False)  # onto a fresh patched model
    assert load_blocks(fresh, tmp_path) is fresh
    plain = tiny(arch).eval()  # onto a plain model: load_blocks patches it with the saved selection
    load_blocks(plain, tmp_path)
    for other in (fresh, plain):
        with torch.no_grad():
            assert torch.equal(other(**batch).logits, want)
        assert_loaded(other, block_weights(model))
        assert {n for n, p in other.named_parameters() if p.requires_grad} == {f"{n}.block_weight" for n in SELECTION}
    with torch.no_grad():
        assert torch.equal(merge(plain)(**batch).logits, want)

    # saving again into the same directory replaces the save: the old blocks file is gone
    train(model, steps=1, seed=9)
    save_blocks(model, tmp_path)
    meta2 = json.loads((tmp_path / META_FILE).read_text())
    assert meta2["blocks_file"] != meta["blocks_file"]
    assert sorted(os.listdir(tmp_path)) == sorted([META_FILE, meta2["blocks_file"]])
    assert_loaded(load_blocks(tiny(arch), tmp_path), block_weights(model))


def test_fingerprint_ignores_the_selected_blocks_only():
    model = tiny()
    fp = base_fingerprint(model, SELECTION, B)
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight[70, 70] += 1.0  # inside selected block (2, 2)
    assert base_fingerprint(model, SELECTION, B) == fp
    patch(model, SELECTION, block_size=B, verbose=False)
    assert base_fingerprint(model, SELECTION, B) == fp  # the same keys and digests once patched
    with torch.no_grad():  # outside: block (0, 1) is not selected (the fingerprint samples every block)
        model.model.layers[0].self_attn.q_proj.weight[0:B, B : 2 * B] += 1.0
    changed = {k for k, v in base_fingerprint(model, SELECTION, B).items() if v != fp[k]}
    assert changed == {"model.layers.0.self_attn.q_proj.weight"}


@pytest.mark.parametrize("shape,block_size", [((4096, 4096), 256), ((4096, 14336), 256), ((96, 200), 32)])
def test_fingerprint_samples_every_block(shape, block_size):
    pos = sample_positions(shape, None, block_size)
    grid = torch.zeros(-(-shape[0] // block_size), -(-shape[1] // block_size), dtype=torch.bool)
    grid[pos // shape[1] // block_size, pos % shape[1] // block_size] = True
    assert grid.all() and pos.min() >= 0 and pos.max() < shape[0] * shape[1]
    # trained blocks are left out whole, and nothing else
    skip = [(0, 0), (1, 2)]
    kept = sample_positions(shape, skip, block_size)
    rows, cols = kept // shape[1] // block_size, kept % shape[1] // block_size
    assert not any(((rows == r) & (cols == c)).any() for r, c in skip)
    assert kept.numel() == pos.numel() - 2 * (pos.numel() // grid.numel())


def test_fingerprint_sees_another_fine_tune_of_the_same_base_anywhere():
    """Any one changed 64-block of a 1024×1024 weight changes its digest (a merged SMT fine-tune of the same
    checkpoint is another base); the evenly spaced positions of format versions 1-3 missed 3 blocks in 4."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(1024, 1024, bias=False)
    want = {1: base_fingerprint(layer, {}, 64, scheme=1), 2: base_fingerprint(layer, {}, 64)}
    seen = {1: 0, 2: 0}
    blocks = [(r, c) for r in range(16) for c in range(16)]
    for r, c in random.Random(0).sample(blocks, 24):
        changed = copy.deepcopy(layer)
        with torch.no_grad():
            changed.weight[r * 64 : (r + 1) * 64, c * 64 : (c + 1) * 64] += 0.01
        for scheme in (1, 2):
            seen[scheme] += base_fingerprint(changed, {}, 64, scheme=scheme) != want[scheme]
    assert seen[2] == 24 and seen[1] < 12


def test_version_3_directories_load_with_their_evenly_spaced_fingerprint(saved):
    old_fingerprint = base_fingerprint(trained(), SELECTION, B, scheme=1)

    def to_version_3(metadata):
        metadata["version"] = "3"
        metadata["layout"] = json.dumps({**json.loads(metadata["layout"]), "fingerprint": old_fingerprint})

    rewrite_blocks(saved, metadata_fn=to_version_3)
    edit_json(saved, lambda meta: meta.update(version=3, fingerprint=old_fingerprint))
    assert read_blocks(saved).fingerprint_scheme == 1
    assert_loaded(load_blocks(tiny(), saved), block_weights(trained()))
    other = tiny()
    with torch.no_grad():
        other.model.norm.weight += 1.0
    with pytest.raises(ValueError, match="different base model"):
        load_blocks(other, saved)
    # the same digests read as the new scheme do not match: the version decides the scheme
    edit_json(saved, lambda meta: meta.update(version=4))
    rewrite_blocks(saved, metadata_fn=lambda metadata: metadata.update(version="4"))
    with pytest.raises(ValueError, match="different base model"):
        load_blocks(tiny(), saved)


def test_read_blocks_result_pickles_and_copies(saved):
    got = read_blocks(saved)
    for twin in (copy.deepcopy(got), pickle.loads(pickle.dumps(got))):
        assert twin.block_size == got.block_size and twin.config == got.config
        assert twin.shapes == got.shapes and twin.fingerprint == got.fingerprint
        assert twin.fingerprint_scheme == got.fingerprint_scheme == 2
        assert all(torch.equal(twin.blocks[n][1], w) for n, (_, w) in got.blocks.items())
    assert got.shapes[Q] == tuple(trained().model.layers[0].self_attn.q_proj.weight.shape)


def test_save_blocks_needs_a_patched_model(tmp_path):
    with pytest.raises(ValueError, match="needs a model patched with smt_kernels.patch"):
        save_blocks(tiny(), tmp_path)
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


# ------------------------------------------------------------------------------------------------- bad files


@pytest.fixture
def saved(tmp_path):
    """A trained tiny LLaMA's blocks on disk; returns the directory."""
    return save_blocks(trained(), tmp_path / "blocks")


def _bad_load_cases():
    """(description, model factory, prepare-files function, expected error type, message regex)."""
    other_sel = dict(SELECTION, **{"model.layers.0.self_attn.v_proj": [(0, 1)]})

    def truncate(p):
        data = blocks_file(p).read_bytes()
        blocks_file(p).write_bytes(data[: len(data) // 2])

    def flip(p):
        data = bytearray(blocks_file(p).read_bytes())
        data[-100] ^= 0x55
        blocks_file(p).write_bytes(bytes(data))

    def cut_json(p):
        text = (p / META_FILE).read_text()
        (p / META_FILE).write_text(text[: len(text) // 2])

    def drop_blocks(p):
        blocks_file(p).unlink()

    def version(p):
        edit_json(p, lambda meta: meta.update(version=99))

    def one_block_less(p):  # a valid file whose tensor no longer matches the layout
        k = "model.layers.1.self_attn.k_proj.block_weight"
        rewrite_blocks(p, tensors=lambda t: {**t, k: t[k][:1].contiguous()})

    def other_tensor_name(p):
        k = "model.layers.1.self_attn.k_proj.block_weight"
        rewrite_blocks(p, tensors=lambda t: {**{n: v for n, v in t.items() if n != k}, "x.block_weight": t[k]})

    keep = None
    return [
        (
            "different base, patched",
            lambda: patch(tiny(seed=5), SELECTION, block_size=B, verbose=False),
            keep,
            ValueError,
            r"different base model: \d+ base tensors differ",
        ),
        ("different base, plain", lambda: tiny(seed=5), keep, ValueError, "different base model"),
        ("Qwen2 base", lambda: tiny("qwen2"), keep, ValueError, "different base model"),
        (
            "other layout",
            lambda: patch(tiny(), other_sel, block_size=B, verbose=False),
            keep,
            ValueError,
            r"model.layers.0.self_attn.v_proj: the file .* has another layout",
        ),
        (
            "fewer modules",
            lambda: patch(tiny(), {"model.layers.0.self_attn.v_proj": [(1, 1)]}, block_size=B, verbose=False),
            keep,
            ValueError,
            "another layout: modules only",
        ),
        (
            "block size",
            lambda: patch(tiny(), {"model.layers.0.self_attn.v_proj": [(0, 0)]}, block_size=16, verbose=False),
            keep,
            ValueError,
            "patched with block_size 16, the file",
        ),
        (
            "dtype, plain",
            lambda: tiny(dtype=torch.bfloat16),
            keep,
            ValueError,
            "weight is bfloat16 but the blocks were saved as float32",
        ),
        (
            "dtype, patched",
            lambda: patch(tiny(dtype=torch.bfloat16), SELECTION, block_size=B, verbose=False),
            keep,
            ValueError,
            "blocks are bfloat16, the file's float32",
        ),
        ("truncated", tiny, truncate, BlockFileError, "corrupt or truncated: its SHA-256"),
        ("bit flip", tiny, flip, BlockFileError, "corrupt or truncated"),
        ("cut JSON", tiny, cut_json, BlockFileError, "not valid JSON"),
        ("no safetensors", tiny, drop_blocks, FileNotFoundError, r"no smt_blocks\.[0-9a-f]{16}\.safetensors in"),
        ("version", tiny, version, BlockFileError, r"format version 99; this smt_kernels reads versions \[1, 2, 3, 4"),
        (
            "tensor shape",
            tiny,
            one_block_less,
            BlockFileError,
            r"k_proj.block_weight is \(1, 32, 32\) float32 in the file; its layout says \(2, 32, 32\)",
        ),
        ("tensor name", tiny, other_tensor_name, BlockFileError, r"holds tensors \['x.block_weight'\] that"),
    ]


def test_load_blocks_rejects_bad_inputs_and_leaves_model_unchanged(saved, tmp_path):
    for i, (what, factory, prepare, err, pattern) in enumerate(_bad_load_cases()):
        path = tmp_path / f"case{i}"
        shutil.copytree(saved, path)
        if prepare is not None:
            prepare(path)
        model = factory()
        snap = snapshot(model)
        with pytest.raises(err, match=pattern):
            load_blocks(model, path)
        assert_unchanged(model, snap), what
    with pytest.raises(FileNotFoundError, match=f"no {META_FILE}"):
        load_blocks(tiny(), tmp_path / "nowhere")
    with pytest.raises(TypeError, match="strict must be True or False"):
        load_blocks(tiny(), saved, strict="no")
    # strict=False skips only the fingerprint check
    other = load_blocks(tiny(seed=5), saved, strict=False)
    assert isinstance(other.model.layers[0].self_attn.q_proj, SparseBlockLinear)


@pytest.mark.parametrize("target", ["plain", "patched with the swapped order"])
def test_a_swapped_block_order_in_the_json_is_an_error(saved, target):
    """Issue 12 item 2: the blocks of q_proj swapped in smt_blocks.json used to land in each other's places."""
    edit_json(saved, lambda meta: meta["modules"][Q]["blocks"].reverse())
    model = tiny()
    if target != "plain":
        model = patch(model, {**SELECTION, Q: [(2, 2), (0, 0)]}, block_size=B, verbose=False)
    snap = snapshot(model)
    with pytest.raises(
        BlockFileError,
        match=r"q_proj'\]\.blocks: the JSON says \[\[2, 2\], \[0, 0\]\], the tensors "
        r"were saved with \[\[0, 0\], \[2, 2\]\]",
    ):
        load_blocks(model, saved)
    assert_unchanged(model, snap)


def test_a_swapped_order_inside_the_blocks_file_is_an_error(saved):
    """The embedded layout is what the tensors were saved with; a file whose copy disagrees is refused too."""

    def swap(layout):
        layout["modules"][Q]["blocks"].reverse()
        return layout

    rewrite_blocks(saved, layout=swap)
    model = tiny()
    snap = snapshot(model)
    with pytest.raises(BlockFileError, match=r"does not describe .*q_proj'\]\.blocks"):
        load_blocks(model, saved)
    assert_unchanged(model, snap)


FIELD_CASES = [  # (edit of the manifest, the message naming the field)
    (lambda m: m.update(block_size="32"), r"block_size: must be an integer, got '32' \(str\)"),
    (lambda m: m.update(block_size=32.0), r"block_size: must be an integer, got 32.0 \(float\)"),
    (lambda m: m.update(block_size=24), r"block_size: block_size must be a power of two"),
    (lambda m: m.update(num_blocks=7), r"num_blocks: is 7 but the modules list 6 blocks"),
    (lambda m: m.update(num_blocks=True), r"num_blocks: must be an integer, got True \(bool\)"),
    (lambda m: m.update(modules=[]), r"modules: must be an object, got list"),
    (lambda m: m.update(extra=1), r"has the wrong keys: missing \[\], unexpected \['extra'\]"),
    (lambda m: m.pop("fingerprint"), r"has the wrong keys: missing \['fingerprint'\]"),
    (
        lambda m: m["modules"][Q].update(blocks=[[0, 0], [2.0, 2]]),
        r"q_proj'\]\.blocks\[1\]: must be an integer, "
        r"got 2.0",
    ),
    (lambda m: m["modules"][Q].update(blocks=[[0, 0], [True, 2]]), r"blocks\[1\]: must be an integer, got True"),
    (lambda m: m["modules"][Q].update(blocks=[[0, 0], ["2", 2]]), r"blocks\[1\]: must be an integer, got '2'"),
    (lambda m: m["modules"][Q].update(blocks=[[0, 0], [2, 2, 2]]), r"blocks\[1\]: must be a \[row_block, col_b"),
    (
        lambda m: m["modules"][Q].update(blocks=[[0, 0], [3, 0]]),
        r"blocks\[1\]: \[3, 0\] is out of range: a 80×80 "
        r"weight with block_size 32 has 3×3 blocks",
    ),
    (lambda m: m["modules"][Q].update(blocks=[[0, 0], [-1, 0]]), r"blocks\[1\]: \[-1, 0\] is out of range"),
    (lambda m: m["modules"][Q].update(blocks=[[0, 0], [0, 0]]), r"q_proj'\]\.blocks: duplicate block"),
    (lambda m: m["modules"][Q].update(blocks=[]), r"q_proj'\]\.blocks: is empty"),
    (lambda m: m["modules"][Q].update(shape=[80, "80"]), r"q_proj'\]\.shape: must be an integer, got '80'"),
    (lambda m: m["modules"][Q].update(shape=[80]), r"q_proj'\]\.shape: must be two positive integers"),
    (lambda m: m["modules"][Q].update(dtype="int8"), r"q_proj'\]\.dtype: must be one of \['bfloat16'"),
    (lambda m: m["modules"][Q].pop("dtype"), r"q_proj'\]: has the wrong keys: missing \['dtype'\]"),
    (lambda m: m["fingerprint"].update({"lm_head.weight": 5}), r"fingerprint\['lm_head.weight'\]: must be 32 hex"),
    (
        lambda m: m.update(blocks_file="../smt_blocks.0123456789abcdef.safetensors"),
        r"blocks_file: must be "
        r"'smt_blocks\.[0-9a-f]{16}",
    ),
    (lambda m: m.update(safetensors_sha256=None), r"safetensors_sha256: must be a string, got None"),
    (lambda m: m.update(format="other"), r"is not an smt_kernels blocks file"),
    (lambda m: m.update(version="2"), r"has format version '2'"),
]


def test_every_json_field_is_type_checked(saved, tmp_path):
    model = tiny()
    snap = snapshot(model)
    for i, (edit, pattern) in enumerate(FIELD_CASES):
        path = tmp_path / f"case{i}"
        shutil.copytree(saved, path)
        edit_json(path, edit)
        with pytest.raises(BlockFileError, match=pattern) as err:
            load_blocks(model, path)
        # a wrongly typed field is also a TypeError, as the same value passed to patch() is
        typed = re.search(r"must be an? (integer|string|object|list),", pattern) is not None
        assert isinstance(err.value, TypeError) == typed, pattern
        assert_unchanged(model, snap)


# --------------------------------------------------------------------------------------- crash safety, umask


class Crash(BaseException):
    """A kill -9 at this point: raised instead of the file-system call, and nothing runs afterwards."""


def test_a_crash_at_any_step_leaves_the_old_or_the_new_save(tmp_path, monkeypatch):
    """Issue 12 item 4. Every file is written under a temporary name, so what a reader can see changes only at a
    rename or an unlink: crash before each of them (and let no cleanup run, as after kill -9) and load."""
    old_model, new_model = trained(steps=1), trained(steps=2, seed=5)
    old, new = block_weights(old_model), block_weights(new_model)
    names = ("replace", "rename", "unlink", "remove")
    real = {n: getattr(os, n) for n in names}

    def run_save(path, crash_at):
        state = {"calls": 0, "crashed": False}

        def guarded(name):
            def call(*args, **kwargs):
                if state["crashed"]:
                    return None  # the process is gone: its except/finally blocks change nothing on disk
                if state["calls"] == crash_at:
                    state["crashed"] = True
                    raise Crash(name)
                state["calls"] += 1
                return real[name](*args, **kwargs)

            return call

        with monkeypatch.context() as m:
            for n in names:
                m.setattr(os, n, guarded(n))
            try:
                save_blocks(new_model, path)
            except Crash:
                return True
        return False

    outcomes = []
    for k in range(20):
        path = save_blocks(old_model, tmp_path / f"crash{k}")
        crashed = run_save(path, crash_at=k)
        got = block_weights(load_blocks(tiny(), path))
        which = [w for w, want in (("old", old), ("new", new)) if all(torch.equal(got[n], want[n]) for n in want)]
        assert which, f"a crash at step {k} left neither the old nor the new blocks"
        outcomes.append(which[0])
        if not crashed:
            break
    assert not crashed, "save_blocks made more than 20 renames/unlinks"
    assert outcomes[0] == "old" and outcomes[-1] == "new" and len(outcomes) >= 3, outcomes
    for k in range(len(outcomes)):  # the next save cleans up whatever the crash left behind
        path = save_blocks(new_model, tmp_path / f"crash{k}")
        assert len(os.listdir(path)) == 2, os.listdir(path)
        assert_loaded(load_blocks(tiny(), path), new)


def test_a_save_between_reading_the_manifest_and_the_blocks_is_followed(tmp_path, monkeypatch):
    """A reader that got the old manifest just before a save replaced it (and removed the old blocks file) reads
    the new pair instead of failing."""
    old_model, new_model = trained(steps=1), trained(steps=2, seed=5)
    path = save_blocks(old_model, tmp_path)
    stale = block_files._read_manifest(path)
    save_blocks(new_model, path)
    real, calls = block_files._read_manifest, []

    def first_stale(p):
        calls.append(p)
        return stale if len(calls) == 1 else real(p)

    monkeypatch.setattr(block_files, "_read_manifest", first_stale)
    assert_loaded(load_blocks(tiny(), path), block_weights(new_model))
    assert len(calls) == 2


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_block_files_follow_the_umask(tmp_path, umask):
    """Issue 12 item 7: the files were written 0600 (mkstemp) while other outputs follow the umask."""
    model = trained()
    old = os.umask(umask)
    try:
        save_blocks(model, tmp_path)
    finally:
        os.umask(old)
    for f in tmp_path.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~umask, f.name


# ------------------------------------------------------------------------------------------------- SMTConfig


def test_the_config_travels_with_the_blocks(tmp_path):
    model = trained()
    save_blocks(model, tmp_path)
    assert json.loads((tmp_path / META_FILE).read_text())["smt_config"] == CONFIG.to_dict()
    saved = read_blocks(tmp_path)
    block_size, blocks = saved  # still the (block_size, blocks) pair
    assert saved.config == CONFIG and saved.block_size == block_size == B and saved.blocks is blocks
    assert load_blocks(tiny(), tmp_path).smt_config["config"] == CONFIG  # a plain model: patched with it
    bare = patch(tiny(), SELECTION, block_size=B, verbose=False)  # patched without a config: it gets the file's
    assert load_blocks(bare, tmp_path).smt_config["config"] == CONFIG
    assert_loaded(bare, block_weights(model))

    # a model patched with another config is refused, unchanged
    other = patch(tiny(), SELECTION, config=SMTConfig(ratio=0.1, block_size=B), verbose=False)
    snap = snapshot(other)
    with pytest.raises(ValueError, match=r"the model was patched with SMTConfig\(.*ratio=0.1.*saved with SMTConfig"):
        load_blocks(other, tmp_path)
    assert_unchanged(other, snap)

    # no config: null in both places, None back
    save_blocks(bare_again := train(patch(tiny(), SELECTION, block_size=B, verbose=False)), tmp_path / "none")
    assert json.loads((tmp_path / "none" / META_FILE).read_text())["smt_config"] is None
    assert read_blocks(tmp_path / "none").config is None
    assert load_blocks(tiny(), tmp_path / "none").smt_config["config"] is None
    assert_loaded(load_blocks(tiny(), tmp_path / "none"), block_weights(bare_again))


def _set(key, value):
    def edit(config):
        config[key] = value
        return config

    return edit


@pytest.mark.parametrize(
    "where, edit, error, message",
    [
        # the checksum covers the config: the manifest's copy must be the one stored with the tensors
        ("json", _set("num_blocks", 7), BlockFileError, r"smt_config: the JSON says SMTConfig\(.*num_blocks=7"),
        ("json", _set("score", "l2"), BlockFileError, r"smt_config: the JSON says .*score='l2'.*the tensors were"),
        ("tensors", _set("strategy", "per_matrix"), BlockFileError, r"the tensors were saved with .*'per_matrix'"),
        ("json", lambda c: None, BlockFileError, r"smt_config: the JSON says None, the tensors were saved with SMT"),
        # every field checked, then SMTConfig's own validation, naming the field and the value
        ("json", _set("num_blocks", 6.0), BlockFileTypeError, r"smt_config.num_blocks: must be an integer, got 6.0"),
        ("json", _set("targets", "q_proj"), BlockFileTypeError, r"smt_config.targets: must be a list, got 'q_proj'"),
        ("json", _set("ratio", 0.1), BlockFileError, r"smt_config: SMTConfig: give exactly one of num_blocks or ratio"),
        ("json", _set("score", "fisher"), BlockFileError, r"smt_config: SMTConfig: score must be one of .*'fisher'"),
        ("json", _set("block_size", 64), BlockFileError, r"smt_config.block_size: is 64 but the blocks are 32×32"),
        (
            "json",
            _set("rank", 8),
            BlockFileError,
            r"smt_config: has the wrong keys: missing \[\], unexpected \['rank'\]",
        ),
        ("tensors", _set("block_size", 16), BlockFileError, r"metadata smt_config.block_size: is 16 but the blocks"),
    ],
)
def test_an_edited_config_is_a_clear_error(saved, where, edit, error, message):
    if where == "json":
        edit_json(saved, lambda meta: meta.update(smt_config=edit(meta["smt_config"])))
    else:
        rewrite_blocks(saved, config=edit)
    for model in (tiny(), patch(tiny(), SELECTION, config=CONFIG, verbose=False)):
        snap = snapshot(model)
        with pytest.raises(error, match=message):
            load_blocks(model, saved)
        assert_unchanged(model, snap)
    with pytest.raises(error, match=message):
        read_blocks(saved)


# ------------------------------------------------------------------------------------------------- version 1


def write_version_1(model, path):
    """A directory as smt_kernels wrote it before format version 2 (layout in the JSON only)."""
    path.mkdir(parents=True)
    tensors = {f"{n}.block_weight": w for n, w in block_weights(model).items()}
    data = save_safetensors(tensors, metadata={"format": "smt_kernels.blocks"})
    (path / V1_BLOCKS_FILE).write_bytes(data)
    meta = json.loads((save_blocks(model, path.parent / "v2") / META_FILE).read_text())
    v1 = {
        "format": meta["format"],
        "version": 1,
        "block_size": meta["block_size"],
        "num_blocks": meta["num_blocks"],
        "modules": meta["modules"],
        "safetensors_sha256": hashlib.sha256(data).hexdigest(),
        "fingerprint": base_fingerprint(model, SELECTION, B, scheme=1),  # versions 1-3 sample evenly
    }
    (path / META_FILE).write_text(json.dumps(v1))
    return path


def test_version_1_directories_still_load_and_resave_as_version_4(tmp_path, caplog):
    model = trained()
    path = write_version_1(model, tmp_path / "v1")
    with caplog.at_level("WARNING", logger="smt_kernels.block_files"):
        loaded = load_blocks(tiny(), path)
    assert "format version 1" in caplog.text
    assert_loaded(loaded, block_weights(model))
    save_blocks(loaded, path)  # upgrades in place; the version-1 blocks file goes once the new manifest is in
    meta = json.loads((path / META_FILE).read_text())
    assert meta["version"] == 4 and sorted(os.listdir(path)) == sorted([META_FILE, meta["blocks_file"]])
    assert_loaded(load_blocks(tiny(), path), block_weights(model))


def test_version_2_directories_load_without_a_config(saved, caplog):
    """A directory as smt_kernels wrote it before the config was saved (format version 2)."""

    old_fingerprint = base_fingerprint(trained(), SELECTION, B, scheme=1)

    def to_version_2(metadata):
        metadata["version"] = "2"
        del metadata["smt_config"]
        metadata["layout"] = json.dumps({**json.loads(metadata["layout"]), "fingerprint": old_fingerprint})

    rewrite_blocks(saved, metadata_fn=to_version_2)
    edit_json(saved, lambda meta: (meta.update(version=2, fingerprint=old_fingerprint), meta.pop("smt_config")))
    with caplog.at_level("WARNING", logger="smt_kernels.block_files"):
        loaded = load_blocks(tiny(), saved)
        assert read_blocks(saved).config is None
    assert not caplog.text  # version 2 protects the layout as well: no warning
    assert loaded.smt_config["config"] is None
    assert_loaded(loaded, block_weights(trained()))
    # a version-2 manifest over a version-3 blocks file (or the reverse) is a mix, not a load
    edit_json(saved, lambda meta: meta.update(version=3, smt_config=None))
    with pytest.raises(BlockFileError, match="has no smt_kernels layout in its metadata"):
        load_blocks(tiny(), saved)


# ------------------------------------------------------------------------------------------------------- fuzz

POOL = [
    None,
    True,
    False,
    0,
    1,
    -1,
    2,
    32,
    1.5,
    2.0,
    10**30,
    "",
    "12",
    "float32",
    [],
    [0],
    [0, 0],
    [[0, 0]],
    [[0, 0], [0, 0]],
    {},
    {"a": 1},
    float("nan"),
]


def _paths(obj, prefix=()):
    """Every (container path, key) inside a JSON value."""
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for k, v in items:
        yield prefix, k
        yield from _paths(v, prefix + (k,))


def _get(obj, path):
    for k in path:
        obj = obj[k]
    return obj


def _mutate_json(rng, meta):
    paths = list(_paths(meta))
    where, key = rng.choice(paths)
    parent = _get(meta, where)
    kind = rng.randrange(6)
    if kind == 0:
        parent[key] = copy.deepcopy(rng.choice(POOL))
    elif kind == 1:
        if isinstance(parent, dict):
            del parent[key]
        else:
            parent.pop(key)
    elif kind == 2 and isinstance(parent, list) and len(parent) > 1:  # swap two entries of a list
        i, j = rng.sample(range(len(parent)), 2)
        parent[i], parent[j] = parent[j], parent[i]
    elif kind == 3 and isinstance(meta.get("modules"), dict) and len(meta["modules"]) > 1:
        # swap the entries of two modules (their shapes, dtypes or block lists)
        a, b = rng.sample(list(meta["modules"]), 2)
        field = rng.choice(["shape", "dtype", "blocks", None])
        if field is None:
            meta["modules"][a], meta["modules"][b] = meta["modules"][b], meta["modules"][a]
        else:
            meta["modules"][a][field], meta["modules"][b][field] = meta["modules"][b][field], meta["modules"][a][field]
    elif kind == 4 and isinstance(parent, dict):  # rename a key
        parent[key + rng.choice(["x", ".0", " "])] = parent.pop(key)
    else:  # an integer somewhere nudged by one
        if type(parent[key]) is int:
            parent[key] += rng.choice([-1, 1])
        else:
            parent[rng.choice(["extra", key])] = 0


def _mutate(rng, path):
    """One random corruption of the saved directory (the manifest or the blocks file)."""
    meta_path, blocks = path / META_FILE, blocks_file(path)
    kind = rng.randrange(10)
    if kind <= 3:
        meta = json.loads(meta_path.read_text())
        _mutate_json(rng, meta)
        meta_path.write_text(json.dumps(meta))
    elif kind == 4:  # truncate, or flip bytes of, the JSON text
        text = meta_path.read_bytes()
        if rng.random() < 0.5:
            meta_path.write_bytes(text[: rng.randrange(len(text))])
        else:
            data = bytearray(text)
            for _ in range(rng.randint(1, 4)):
                data[rng.randrange(len(data))] = rng.randrange(256)
            meta_path.write_bytes(bytes(data))
    elif kind == 5:  # truncate, extend or flip bytes of the blocks file
        data = bytearray(blocks.read_bytes())
        choice = rng.randrange(3)
        if choice == 0:
            data = data[: rng.randrange(len(data))]
        elif choice == 1:
            data += bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
        else:
            for _ in range(rng.randint(1, 4)):
                data[rng.randrange(len(data))] = rng.randrange(256)
        blocks.write_bytes(bytes(data))
    elif kind == 6:  # random bytes for either file
        target = rng.choice([meta_path, blocks])
        target.write_bytes(bytes(rng.randrange(256) for _ in range(rng.randint(0, 400))))
    elif kind == 7:  # a consistent file with the embedded layout changed
        rewrite_blocks(path, layout=lambda layout: (_mutate_json(rng, layout), layout)[1])
    elif kind == 8:  # a consistent file with tensors dropped, renamed, reshaped or retyped

        def change(t):
            name = rng.choice(sorted(t))
            op = rng.randrange(4)
            if op == 0:
                del t[name]
            elif op == 1:
                t[name + "x"] = t.pop(name)
            elif op == 2:
                t[name] = torch.cat([t[name], t[name][:1]])
            else:
                t[name] = t[name].to(torch.bfloat16)
            return t

        rewrite_blocks(path, tensors=change)
    else:  # a file missing
        rng.choice([meta_path, blocks]).unlink()


def test_fuzz_load_blocks_errors_cleanly_or_loads_exactly_the_save(saved, tmp_path):
    """Hundreds of mutated directories: each load either raises a clear error and leaves the model (every
    parameter and buffer, module types, flags) unchanged, or loads exactly the saved blocks."""
    want = {n: w for n, w in block_weights(trained()).items()}
    plain, patched = tiny(), patch(tiny(), SELECTION, block_size=B, verbose=False)
    rng = random.Random(12)
    outcomes = {"error": 0, "loaded": 0}
    for i in range(300):
        path = tmp_path / f"m{i}"
        shutil.copytree(saved, path)
        for _ in range(rng.choice([1, 1, 1, 2])):
            try:
                _mutate(rng, path)
            except (OSError, ValueError, LookupError, TypeError, AttributeError, SafetensorError, struct.error):
                pass  # an earlier mutation left nothing this one can change (a file gone, the JSON unreadable)
        model = copy.deepcopy(rng.choice([plain, patched]))
        snap = snapshot(model)
        try:
            load_blocks(model, path)
        except ERRORS as err:
            assert str(err), f"case {i}: an error without a message"
            assert_unchanged(model, snap)
            outcomes["error"] += 1
        else:
            assert_loaded(model, want)
            outcomes["loaded"] += 1
        shutil.rmtree(path)
    assert outcomes["error"] > 200, outcomes


def test_the_same_blocks_give_the_same_file(tmp_path):
    """The blocks file's bytes (and so its name) depend only on what is saved: safetensors writes the metadata in a
    random order, which save_blocks puts in a fixed one."""
    model = trained()
    names = {save_blocks(model, tmp_path / f"save{i}") and blocks_file(tmp_path / f"save{i}").name for i in range(4)}
    assert len(names) == 1
    assert (tmp_path / "save0" / META_FILE).read_bytes() == (tmp_path / "save3" / META_FILE).read_bytes()
    assert_loaded(load_blocks(tiny(), tmp_path / "save0"), block_weights(model))


def test_blocks_of_a_dtype_block_files_do_not_hold_are_refused_before_writing(tmp_path):
    model = trained()
    block = next(m for m in model.modules() if isinstance(m, SparseBlockLinear)).block_weight
    block.data = block.data.double()
    with pytest.raises(ValueError, match="blocks are torch.float64; block files hold float32, float16, bfloat16"):
        save_blocks(model, tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_a_save_that_fails_at_the_manifest_leaves_no_stray_blocks_file(tmp_path, monkeypatch):
    model = trained()
    save_blocks(model, tmp_path)
    files = sorted(os.listdir(tmp_path))
    train(model, steps=1, seed=5)
    real = block_files._atomic_write

    def fail_at_manifest(path, data):
        if path.name == META_FILE:
            raise OSError(28, "No space left on device")
        real(path, data)

    monkeypatch.setattr(block_files, "_atomic_write", fail_at_manifest)
    with pytest.raises(OSError, match="No space left"):
        save_blocks(model, tmp_path)
    assert sorted(os.listdir(tmp_path)) == files
