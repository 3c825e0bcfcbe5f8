"""A patched model spread over two GPUs with ``device_map`` trains like the same model on one GPU.

Needs two CUDA devices (skipped otherwise); run on the device tool's ``nvidia-h200-x2`` machine.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from smt_kernels import patch

pytestmark = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")


def _selection(model):
    # ragged shapes: k/v out 40 and hidden 48 are not multiples of 32
    sel = {n: [(0, 0), (1, 1)] for n, _ in model.named_modules() if n.endswith(("q_proj", "v_proj"))}
    sel["model.layers.1.mlp.down_proj"] = [(1, 2)]
    sel["model.layers.2.mlp.up_proj"] = [(2, 0), (0, 1)]
    return sel


def _train(model, steps: int, device) -> tuple[list[float], dict[str, torch.Tensor]]:
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    # one fixed batch: the blocks can fit it, so the loss must fall (fresh random tokens give no such signal)
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(3)).to(device)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    blocks = {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}
    return losses, blocks


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_device_map_over_two_gpus_matches_one_gpu(tmp_path, dtype):
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=96,
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=20,
        max_position_embeddings=64,
    )
    LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    device_map = {
        "model.embed_tokens": 0,
        "model.rotary_emb": 0,
        "model.layers.0": 0,
        "model.layers.1": 0,
        "model.layers.2": 1,
        "model.layers.3": 1,
        "model.norm": 1,
        "lm_head": 1,
    }
    spread = LlamaForCausalLM.from_pretrained(tmp_path, device_map=device_map, dtype=dtype)
    single = LlamaForCausalLM.from_pretrained(tmp_path, dtype=dtype).to("cuda:0")
    assert spread.model.layers[3].self_attn.q_proj.weight.device == torch.device("cuda", 1)
    spread = patch(spread, _selection(spread), block_size=32)
    single = patch(single, _selection(single), block_size=32)
    torch.cuda.set_device(0)  # the second GPU's layers must launch on their own device, not the current one
    got_losses, got = _train(spread, 4, "cuda:0")
    want_losses, want = _train(single, 4, "cuda:0")
    tol = {"rtol": 1e-4, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(torch.tensor(got_losses), torch.tensor(want_losses), **tol)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], **tol)
    assert want_losses[-1] < want_losses[0]
