"""Real model shapes for the coupled-group tests, built here (torchvision is not installable
beside the CPU torch; Hugging Face models come from configs, no weights downloaded)."""

from __future__ import annotations

import torch
from torch import nn

from fastprox.demo.models import BasicBlock, Bottleneck, ResNet  # noqa: F401  (for the tests)


def randomize_batchnorm(model: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters (fresh ones are 0/1)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.normal_(1, 0.1)
                m.bias.normal_(0, 0.1)
    return model


def encoder(d=32, heads=4, ff=64, layers=2):
    layer = nn.TransformerEncoderLayer(d, heads, ff, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)


def gpt2(layers=2, d=32, heads=4):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=layers, n_embd=d, n_head=heads, vocab_size=64, n_positions=32,
                        bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0)
    return GPT2LMHeadModel(config)


def llama(layers=2, d=32, heads=4, kv_heads=2, ff=48):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(num_hidden_layers=layers, hidden_size=d, intermediate_size=ff,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=64,
                         max_position_embeddings=32, bos_token_id=0, eos_token_id=0,
                         pad_token_id=0)
    return LlamaForCausalLM(config)


@torch.no_grad()
def kill(coupled, fraction=0.5, generator=None) -> torch.Tensor:
    """Zeroes a random share of the groups of a coupled set (every slice of each); returns the
    indices of the groups killed."""
    count = coupled.num_groups
    dead = torch.randperm(count, generator=generator)[:max(1, int(count * fraction))]
    dead = dead[:count - 1] if len(dead) == count else dead
    for m in coupled.slices:
        positions = torch.isin(m.index, dead).nonzero().flatten()
        m.tensor.index_fill_(m.axis, positions.to(m.tensor.device), 0)
    return dead.sort().values
