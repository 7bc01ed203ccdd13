"""fastprox.hf in a Hugging Face Trainer: the regularizer attached to the Trainer's optimizer,
its sparsity in the Trainer's logs, its state in the Trainer's checkpoints (a resumed run is
bitwise the run that did not stop), the compacted model saved at the end."""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch

import fastprox
import models as M

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
import fastprox.hf  # noqa: E402


class _Tokens(torch.utils.data.Dataset):
    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randint(1, 64, (32, 16), generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.x[i]}


def _trainer(out, steps, **extra):
    torch.manual_seed(0)
    model = M.gpt2(layers=2)
    reg = fastprox.Regularizer(model, ("heads", "neurons"), lam=1e-3,
                               target=fastprox.SparsityTarget(kept=0.5, by_step=8))
    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=8,
        learning_rate=1e-3, logging_steps=2, save_steps=6, report_to=[], use_cpu=True,
        dataloader_num_workers=0, seed=0, disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Tokens())
    callback = fastprox.hf.attach(trainer, reg, **extra)
    return model, reg, trainer, callback


def test_a_trainer_prunes_logs_checkpoints_and_resumes_bitwise(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, reg, trainer, _ = _trainer(tmp_path / "a", 12, save_compact_to=tmp_path / "small")
        trainer.train()
    # the target's schedule ran on the Trainer's steps: half the heads and neurons are gone
    assert reg.controller.reached == {"heads": 0.5, "neurons": 0.5}
    assert reg.steps == 12
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert all("sparsity/heads" in h for h in trainer.state.log_history)
    assert [h["step"] for h in logged] == [2, 4, 6, 8, 10, 12]
    assert logged[0]["sparsity/heads"] > 0.5 and logged[-1]["sparsity/heads"] == 0.5
    assert os.path.isfile(tmp_path / "a" / "checkpoint-6" / "fastprox_regularizer.pt")
    # the compacted model, saved at the end, is what stock transformers loads
    config = json.load(open(tmp_path / "small" / "config.json"))
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_pruned.PrunedForCausalLM"
    # stopped at step 6 (its checkpoint), resumed in a new Trainer: bitwise the same
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, _, first, _ = _trainer(tmp_path / "b", 12)
        first.args.max_steps = 12
        first.train()  # writes checkpoint-6 and checkpoint-12
        resumed_model, resumed_reg, again, _ = _trainer(tmp_path / "b", 12)
        again.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-6"))
    for (name, p), q in zip(model.named_parameters(), resumed_model.parameters()):
        assert torch.equal(p, q), name
    mine, theirs = reg.state_dict()["controller"], resumed_reg.state_dict()["controller"]
    for key in ("log_scale", "steps", "reached", "history"):
        assert mine[key] == theirs[key], key
    assert all(torch.equal(a, b) for a, b in zip(mine["held"], theirs["held"]))


def test_resuming_from_a_checkpoint_outside_output_dir_restores_the_regularizer(tmp_path):
    """A checkpoint copied elsewhere (another disk, another run's directory) and handed to
    ``trainer.train`` by its path: the regularizer's state comes from there, bitwise."""
    import shutil

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, reg, first, _ = _trainer(tmp_path / "a", 10)
        first.train()  # checkpoint-6 on the way
        shutil.copytree(tmp_path / "a" / "checkpoint-6", tmp_path / "elsewhere")
        shutil.rmtree(tmp_path / "a" / "checkpoint-6")
        resumed_model, resumed_reg, again, _ = _trainer(tmp_path / "b", 10)
        again.train(str(tmp_path / "elsewhere"))  # positional, as Trainer.train takes it
    for (name, p), q in zip(model.named_parameters(), resumed_model.parameters()):
        assert torch.equal(p, q), name
    assert resumed_reg.state_dict()["controller"]["history"] == \
        reg.state_dict()["controller"]["history"]


def test_resuming_from_a_checkpoint_without_the_state_is_an_error(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, _, trainer, _ = _trainer(tmp_path, 6)
        trainer.train()
        os.remove(tmp_path / "checkpoint-6" / "fastprox_regularizer.pt")
        _, _, again, _ = _trainer(tmp_path, 8)
        with pytest.raises(FileNotFoundError, match="resuming at step 6.*start again"):
            again.train(resume_from_checkpoint=str(tmp_path / "checkpoint-6"))


def test_readme_trainer_snippet_does_what_it_says(tmp_path, monkeypatch):
    """The README's Trainer snippet, run as written (in a scratch directory)."""
    from helpers import readme_snippet

    code = readme_snippet("**In a `Trainer`**")
    monkeypatch.chdir(tmp_path)
    printed = []
    scope = {"print": lambda *a: printed.append(a)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(code, "README.md", "exec"), scope)
    assert printed == [({0.5},), (2, 64)]
    assert not os.path.exists(tmp_path / "llama-pruned" / "modeling_pruned.py")
