"""A regularizer in a Hugging Face ``Trainer``: ``fastprox.hf.attach(trainer, reg)``.

``SparsityCallback(regularizer, save_compact_to=None)`` is a ``TrainerCallback`` that

* attaches the regularizer to the Trainer's optimizer when training begins (the torch optimizer
  inside accelerate's wrapper: the proximal step follows every real ``optimizer.step()``, none
  is taken on a step that only accumulates gradients);
* adds the sparsity to the Trainer's logs (``sparsity/<pool>``: the fraction each target pool
  has left, or per kind of coupled group the fraction alive), so that every reporting
  callback after it (console, TensorBoard, W&B) and ``trainer.state.log_history`` have them;
* saves the regularizer's state (thresholds, steps, the target's controller) in every
  checkpoint the Trainer writes (``fastprox_regularizer.pt``, atomic), and restores it when
  training resumes from one (``trainer.train(resume_from_checkpoint=True)``, a checkpoint of
  ``output_dir``, the directory ``trainer.train(resume_from_checkpoint=...)`` is given, seen by
  ``attach``, or the one ``TrainingArguments.resume_from_checkpoint`` names), before the
  first step, so that a resumed run is bitwise the run
  that did not stop; a checkpoint without it is an error, not a silent restart of the target;
* with ``save_compact_to``, compacts the model when training ends and saves it there
  (``fastprox.save``: a directory stock transformers loads).

``attach(trainer, regularizer, **options)`` adds the callback first in the Trainer's list (the
reporting callbacks then see the sparsity in the same logs) and returns it. The Trainer is used
as it is: no subclass, its own optimizer and scheduler.
"""

from __future__ import annotations

import functools
import inspect
import os

import torch
from transformers import TrainerCallback

from .. import _atomic

STATE_FILE = "fastprox_regularizer.pt"


def _inner(optimizer):
    """The torch optimizer of a Trainer's (accelerate wraps it)."""
    while not isinstance(optimizer, torch.optim.Optimizer) or \
            type(optimizer).__module__.startswith("accelerate"):
        inner = getattr(optimizer, "optimizer", None)
        if inner is None or inner is optimizer:
            break
        optimizer = inner
    return optimizer


class SparsityCallback(TrainerCallback):
    """The regularizer's step, logs and checkpoints in a Trainer (module docstring)."""

    def __init__(self, regularizer, *, save_compact_to=None):
        self.regularizer, self.save_compact_to = regularizer, save_compact_to
        self.handle = None
        self.optimizer = None
        # the checkpoint directory handed to trainer.train(resume_from_checkpoint=...), which
        # the Trainer tells no callback (``attach`` records it)
        self.resume_from: str | None = None

    # -- training --------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        if optimizer is None:
            raise ValueError("fastprox.hf.SparsityCallback: the Trainer gave no optimizer at "
                             "on_train_begin")
        inner = _inner(optimizer)
        if self.handle is None or self.optimizer is not inner:
            if self.handle is not None:
                self.handle.remove()
            self.handle = self.regularizer.attach(inner)
            self.optimizer = inner
        if state.global_step > 0:  # resumed: the checkpoint of that step holds our state
            named = [self.resume_from, getattr(args, "resume_from_checkpoint", None)]
            places = [p for p in named if isinstance(p, str) and os.path.isdir(p)]
            places.append(os.path.join(args.output_dir, f"checkpoint-{state.global_step}"))
            path = next((os.path.join(p, STATE_FILE) for p in places
                         if os.path.isfile(os.path.join(p, STATE_FILE))),
                        os.path.join(places[-1], STATE_FILE))
            if not os.path.isfile(path):
                raise FileNotFoundError(
                    f"fastprox.hf.SparsityCallback: resuming at step {state.global_step}, but "
                    f"{path} does not exist: the checkpoint was not written with this callback, "
                    "and the regularizer (its target's schedule) would start again")
            self.regularizer.load_state_dict(torch.load(path, weights_only=True))

    def on_save(self, args, state, control, **kwargs):
        directory = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if os.path.isdir(directory) and args.should_save:
            state_dict = self.regularizer.state_dict()
            _atomic.write_file(os.path.join(directory, STATE_FILE),
                               lambda f: torch.save(state_dict, f))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None:
            return
        values = self.sparsity()
        logs.update(values)  # what the reporting callbacks after this one get
        # the Trainer put its copy of these logs in the history before the callbacks ran
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(values)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.save_compact_to is not None and args.should_save:
            from .. import compaction, saving

            training = model.training
            model.eval()
            try:
                small = compaction.compact(model, self.regularizer)
            finally:
                model.train(training)
            saving.save(small, self.save_compact_to)

    # -- what is logged ----------------------------------------------------------------------
    def sparsity(self) -> dict[str, float]:
        """``sparsity/<pool>``: what each target pool has left (a fraction), or per kind of
        coupled group (and plain target) the fraction of groups alive."""
        reg = self.regularizer
        controller = getattr(reg, "controller", None)
        if controller is not None:
            return {f"sparsity/{name}": round(float(v), 6)
                    for name, v in controller.fractions().items()}
        out: dict[str, list[int]] = {}
        for name, t in getattr(reg, "coupled", {}).items():
            alive = t.groups.alive()
            counts = out.setdefault(name.split(":")[0], [0, 0])
            counts[0] += int(alive.sum())
            counts[1] += alive.numel()
        return {f"sparsity/{kind}": round(a / n, 6) if n else 1.0 for kind, (a, n) in out.items()}


def attach(trainer, regularizer, **options) -> SparsityCallback:
    """Adds a ``SparsityCallback`` first in ``trainer``'s callbacks and returns it; the
    checkpoint ``trainer.train(resume_from_checkpoint=...)`` is given (a directory anywhere)
    is where the callback finds the regularizer's state when training resumes."""
    callback = SparsityCallback(regularizer, **options)
    trainer.callback_handler.callbacks.insert(0, callback)
    train = trainer.train
    signature = inspect.signature(train)

    @functools.wraps(train)
    def train_seen(*args, **kwargs):
        given = signature.bind_partial(*args, **kwargs).arguments.get("resume_from_checkpoint")
        callback.resume_from = os.fspath(given) if isinstance(given, (str, os.PathLike)) \
            else None
        return train(*args, **kwargs)

    trainer.train = train_seen
    return callback
