"""SMTConfig: validation (the bad field and value named), normalisation, to_dict/from_dict, keyword conflicts."""

import json
import re

import numpy as np
import pytest
import torch

from smt_kernels import SMTConfig
from smt_kernels.config import resolve_config
from smt_kernels.select import DEFAULT_TARGETS, SCORES, STRATEGIES


def test_defaults_and_normalisation():
    cfg = SMTConfig(ratio=0.01)
    assert (cfg.targets, cfg.num_blocks, cfg.block_size, cfg.score, cfg.strategy) == (
        DEFAULT_TARGETS,
        None,
        256,
        "abs_mean",
        "global",
    )
    assert SMTConfig(targets="v_proj", ratio=1).targets == ("v_proj",)
    assert SMTConfig(targets=["q_proj", "v_proj"], ratio=1) == SMTConfig(targets=("q_proj", "v_proj"), ratio=1.0)
    assert type(SMTConfig(ratio=1).ratio) is float
    assert type(SMTConfig(num_blocks=np.int64(3)).num_blocks) is int
    with pytest.raises(AttributeError):  # frozen: a config cannot drift after validation
        cfg.ratio = 0.5


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({}, ValueError, r"exactly one of num_blocks or ratio \(got num_blocks=None, ratio=None\)"),
        (
            {"ratio": 0.1, "num_blocks": 2},
            ValueError,
            r"exactly one of num_blocks or ratio \(got num_blocks=2, ratio=0.1\)",
        ),
        ({"ratio": 0}, ValueError, r"ratio must be in \(0, 1\], got 0"),
        ({"ratio": 1.5}, ValueError, r"ratio must be in \(0, 1\], got 1.5"),
        ({"ratio": float("nan")}, ValueError, r"ratio must be in \(0, 1\], got nan"),
        ({"ratio": True}, ValueError, r"ratio must be in \(0, 1\], got True"),
        ({"ratio": "0.1"}, ValueError, r"ratio must be in \(0, 1\], got '0.1'"),
        ({"num_blocks": 0}, ValueError, "num_blocks must be a positive int, got 0"),
        ({"num_blocks": 2.0}, ValueError, "num_blocks must be a positive int, got 2.0"),
        ({"num_blocks": True}, ValueError, "num_blocks must be a positive int, got True"),
        ({"num_blocks": 1, "block_size": 48}, ValueError, "power of two in \\[16, 256\\], got 48"),
        ({"num_blocks": 1, "block_size": 32.0}, TypeError, r"block_size must be an int, got float \(32.0\)"),
        ({"num_blocks": 1, "score": "fisher"}, ValueError, re.escape(f"score must be one of {SCORES}, got 'fisher'")),
        (
            {"num_blocks": 1, "strategy": "layer"},
            ValueError,
            re.escape(f"strategy must be one of {STRATEGIES}, got 'layer'"),
        ),
        ({"num_blocks": 1, "targets": ()}, ValueError, "targets is empty"),
        ({"num_blocks": 1, "targets": ["q_proj", 3]}, TypeError, r"non-empty strings, got \[3\]"),
        ({"num_blocks": 1, "targets": 3}, TypeError, "targets must be a list of module names, got 3"),
    ],
)
def test_bad_values_are_named(kwargs, error, message):
    with pytest.raises(error, match=message):
        SMTConfig(**kwargs)


@pytest.mark.parametrize(
    "cfg",
    [
        SMTConfig(ratio=0.005),
        SMTConfig(targets=("v_proj", "model.layers.0.mlp.down_proj"), num_blocks=7, block_size=64, score="l2"),
        SMTConfig(ratio=1, score="activation", strategy="per_matrix", block_size=16),
    ],
)
def test_dict_round_trip_through_json(cfg):
    data = json.loads(json.dumps(cfg.to_dict()))
    assert data == cfg.to_dict() and isinstance(data["targets"], list)
    assert SMTConfig.from_dict(data) == cfg


def test_from_dict_checks_its_input():
    assert SMTConfig.from_dict({"num_blocks": 3}) == SMTConfig(num_blocks=3)  # missing fields: the defaults
    with pytest.raises(ValueError, match=r"unknown fields \['rank'\]"):
        SMTConfig.from_dict({"num_blocks": 3, "rank": 8})
    with pytest.raises(TypeError, match="needs a mapping, got list"):
        SMTConfig.from_dict([("num_blocks", 3)])
    with pytest.raises(ValueError, match="num_blocks must be a positive int, got -1"):
        SMTConfig.from_dict({"num_blocks": -1})


def test_keywords_agree_with_the_config_or_are_refused():
    cfg = SMTConfig(targets=("q_proj", "v_proj"), ratio=0.1, block_size=32)
    assert resolve_config(None, "f") is None
    assert resolve_config(None, "f", ratio=0.1, block_size=32, targets=["q_proj", "v_proj"]) == cfg
    assert resolve_config(cfg, "f", ratio=0.1, block_size=32, targets=["q_proj", "v_proj"], score=None) is cfg
    with pytest.raises(ValueError, match=r"f: block_size=64 but config.block_size=32; num_blocks=3 but config"):
        resolve_config(cfg, "f", block_size=64, num_blocks=3)
    with pytest.raises(ValueError, match=r"targets=\('q_proj',\) but config.targets=\('q_proj', 'v_proj'\)"):
        resolve_config(cfg, "f", targets="q_proj")
    with pytest.raises(TypeError, match="config must be an smt_kernels.SMTConfig, got dict"):
        resolve_config(cfg.to_dict(), "f")


def test_config_keywords_are_validated_as_the_config_itself_and_unknown_ones_refused():
    from smt_kernels.config import resolve_config

    config = SMTConfig(num_blocks=1, block_size=16)
    with pytest.raises(ValueError, match="num_blocks"):
        resolve_config(config, "select_blocks", num_blocks=True)  # True == 1, but not a block count
    with pytest.raises((TypeError, ValueError), match="block_size"):
        resolve_config(config, "select_blocks", block_size=16.0)
    with pytest.raises(TypeError, match=r"unknown settings \['rank'\]"):
        resolve_config(config, "select_blocks", rank=8)
    assert resolve_config(config, "select_blocks", num_blocks=1, block_size=16) is config


def test_targets_named_twice_or_blank_are_refused():
    with pytest.raises(ValueError, match=r"targets name \['q_proj'\] more than once"):
        SMTConfig(num_blocks=1, targets=["q_proj", "q_proj"])
    with pytest.raises(TypeError, match="non-empty strings"):
        SMTConfig(num_blocks=1, targets=["q_proj", " "])


def test_a_layout_does_not_change_with_the_tensor_it_was_built_from():
    from smt_kernels.layout import BlockLayout

    blocks = torch.tensor([[0, 1], [1, 0]])
    layout = BlockLayout.build(blocks, 32, 32, 16)
    blocks[0] = torch.tensor([9, 9])
    assert layout.indices.tolist() == [[0, 1], [1, 0]] and layout.num_trainable() == 512


@pytest.mark.parametrize(
    "blocks,out_features,error,match",
    [
        ([(0, 0)], 100.5, TypeError, "out_features must be an int, got 100.5"),
        ([(0, 0)], True, TypeError, "out_features must be an int"),
        ([(torch.tensor(True), 0)], 64, TypeError, "block 0: indices must be integers"),
        ([(0, 0), (0, 1, 2)], 64, ValueError, r"block 1: each block must be a \(row_block, col_block\) pair"),
        ([(0, 9), (9, 0)], 64, ValueError, r"block 0 = \(0, 9\) is out of range"),
    ],
)
def test_layout_inputs_are_checked_by_name(blocks, out_features, error, match):
    from smt_kernels.layout import BlockLayout

    with pytest.raises(error, match=match):
        BlockLayout.build(blocks, out_features, 64, 16)
