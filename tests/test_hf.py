"""Hugging Face export: a compacted model that stock transformers loads in a process that never
imports fastprox (``fastprox.save_pretrained_compact``, fastprox/hf/export.py): the architecture's own
config where it can say the shapes, else a per-module config and a modeling file named in
``auto_map`` (``trust_remote_code=True``). Same logits, and ``generate`` works."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import fastprox
import models as M
from fastprox import groups as G

transformers = pytest.importorskip("transformers")


def _mistral():
    config = transformers.MistralConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=48,
                                        num_attention_heads=4, num_key_value_heads=2,
                                        vocab_size=64, max_position_embeddings=32,
                                        sliding_window=None, bos_token_id=0, eos_token_id=0)
    return transformers.MistralForCausalLM(config)


def _qwen2():  # q / k / v with biases
    config = transformers.Qwen2Config(num_hidden_layers=2, hidden_size=32, intermediate_size=48,
                                      num_attention_heads=4, num_key_value_heads=2,
                                      vocab_size=64, max_position_embeddings=32,
                                      bos_token_id=0, eos_token_id=0)
    return transformers.Qwen2ForCausalLM(config)


BUILDS = {"gpt2": lambda: M.gpt2(layers=2), "llama": lambda: M.llama(layers=3),
          "mistral": _mistral, "qwen2": _qwen2}


def _pruned(arch: str, uniform: bool, kinds=("heads", "neurons")):
    """(dense model, its Compacted): random groups of every set removed, the same number in
    every layer when ``uniform``, a different number per layer otherwise."""
    torch.manual_seed(0)
    model = BUILDS[arch]().eval()
    found = G.discover(model, kinds)
    generator = torch.Generator().manual_seed(1)
    for i, s in enumerate(found.sets):
        fraction = 0.5 if uniform else (0.25, 0.5, 0.75)[i % 3]
        M.kill(s, fraction, generator)
    return model, fastprox.compact(model, found)


def _load_elsewhere(jobs: list[tuple[str, str, bool]]) -> list[str]:
    """Loads each (directory, inputs file, trust_remote_code) in a fresh interpreter that
    never imports fastprox, started outside the tree; per job, its max logit error against the
    saved logits and its greedy continuation, or the exception."""
    code = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        f"for directory, inputs, trust in {jobs!r}:\n"
        "    try:\n"
        "        m = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=trust)\n"
        "    except Exception as e:\n"
        "        print('refused', type(e).__name__, str(e).replace(chr(10), ' ')[:1000])\n"
        "        continue\n"
        "    m.eval(); t = torch.load(inputs)\n"
        "    with torch.no_grad():\n"
        "        err = float((m(t['x']).logits - t['logits']).abs().max())\n"
        "        out = m.generate(t['x'][:1], max_new_tokens=6, do_sample=False).tolist()\n"
        "    print('loaded', err, type(m).__name__, out)\n"
        "assert 'fastprox' not in sys.modules\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1",
               HF_MODULES_CACHE=os.path.join(os.path.dirname(jobs[0][0]), "modules"))
    env.pop("PYTHONPATH", None)
    got = subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(jobs[0][0]),
                         env=env, capture_output=True, text=True, timeout=600)
    assert got.returncode == 0, got.stderr[-3000:]
    return got.stdout.strip().splitlines()


def _save(arch, uniform, tmp_path, kinds=("heads", "neurons"), compacted_itself=True):
    model, small = _pruned(arch, uniform, kinds)
    x = torch.randint(1, 64, (2, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits = model(x).logits
        torch.testing.assert_close(small.model(x).logits, logits, rtol=1e-4, atol=1e-5)
        generated = small.model.generate(x[:1], max_new_tokens=6, do_sample=False).tolist()
    directory = tmp_path / f"{arch}-{'uniform' if uniform else 'mixed'}-{len(kinds)}"
    form = fastprox.save_pretrained_compact(small if compacted_itself else small.model,
                                            directory)
    inputs = tmp_path / f"{directory.name}.pt"
    torch.save({"x": x, "logits": logits}, inputs)
    return form, str(directory), str(inputs), generated


def test_every_architecture_loads_without_fastprox_with_the_same_logits(tmp_path):
    """Widths that differ by layer (every architecture), and uniform widths: the Llama family
    through its own config (no code), GPT-2 with heads removed through the modeling file (its
    config derives the head size from n_embd / n_head), GPT-2 with neurons only through its
    config (n_inner)."""
    cases = [(arch, False, ("heads", "neurons")) for arch in BUILDS]
    cases += [("llama", True, ("heads", "neurons")), ("qwen2", True, ("heads", "neurons")),
              ("gpt2", True, ("heads", "neurons")), ("gpt2", True, ("neurons",))]
    want = {("llama", True, 2): "config", ("qwen2", True, 2): "config",
            ("gpt2", True, 1): "config"}
    jobs, expected = [], []
    for k, (arch, uniform, kinds) in enumerate(cases):
        form, directory, inputs, generated = _save(arch, uniform, tmp_path, kinds,
                                                   compacted_itself=k % 2 == 0)
        assert form == want.get((arch, uniform, len(kinds)), "remote_code"), (arch, uniform)
        files = set(os.listdir(directory))
        assert ("modeling_pruned.py" in files) == (form == "remote_code"), files
        jobs.append((directory, inputs, form == "remote_code"))
        expected.append((arch, generated))
    lines = _load_elsewhere(jobs)
    assert len(lines) == len(jobs), lines
    for line, (arch, generated), (_, _, trust) in zip(lines, expected, jobs):
        kind, err, cls, *rest = line.split(" ", 3)
        assert kind == "loaded", line
        assert float(err) < 1e-4, (arch, line)
        assert cls == ("PrunedForCausalLM" if trust else cls), line
        assert eval(rest[0]) == generated, (arch, line)  # noqa: S307 (a list we printed)


def test_the_remote_form_needs_trust_remote_code_and_says_so(tmp_path):
    form, directory, inputs, _ = _save("gpt2", False, tmp_path)
    assert form == "remote_code"
    [line] = _load_elsewhere([(directory, inputs, False)])
    assert line.startswith("refused") and "trust_remote_code" in line, line


def test_what_cannot_be_exported_is_refused_before_a_file_is_written(tmp_path):
    _, small = _pruned("llama", False)
    model = small.model
    model.model.layers[0].mlp.act_fn = torch.nn.Tanh()  # another class than the config's
    with pytest.raises(ValueError, match=r"save_pretrained_compact: model.layers.0.mlp.act_fn "
                                         r"is a Tanh .*save_compact"):
        fastprox.save_pretrained_compact(model, tmp_path / "x")
    _, small = _pruned("llama", False)
    norm = small.model.model.layers[1].input_layernorm
    norm.weight = torch.nn.Parameter(norm.weight[:16].clone())  # a shape no rebuild makes
    with pytest.raises(ValueError, match="layers.1.input_layernorm .*changed shape"):
        fastprox.save_pretrained_compact(small, tmp_path / "y")
    with pytest.raises(TypeError, match="save_pretrained_compact: Sequential is not a Hugging"):
        fastprox.save_pretrained_compact(torch.nn.Sequential(torch.nn.Linear(2, 2)),
                                         tmp_path / "z")
    assert not os.listdir(tmp_path)


def test_readme_hf_snippet_does_what_it_says(tmp_path, monkeypatch):
    """The README's Hugging Face snippet, run as written (in a scratch directory)."""
    from helpers import readme_snippet

    code = readme_snippet("## Hugging Face models")
    monkeypatch.chdir(tmp_path)
    printed = []
    scope = {"print": lambda *a: printed.append(a)}
    exec(compile(code, "README.md", "exec"), scope)
    assert printed == [("remote_code",), (True,)]
    heads = [int(t.groups.alive().sum()) for n, t in scope["reg"].coupled.items()
             if n.startswith("heads")]
    assert sum(heads) == 4  # half of 2 x 4
    assert type(scope["again"]).__name__ == "PrunedForCausalLM"
