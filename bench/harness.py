"""The benchmark harness: what is timed, against what, and how it is reported, for both backends.

    CPU:  pytest bench --benchmark-only     (pytest-benchmark; bench/test_bench_cpu.py)
    CUDA: python bench/gpu_kernels.py       (triton.testing.do_bench)

Cases come from the operator table (fastprox/operators.py): every ``bench`` sample of
group_norms and of every preset. Each case is timed four ways on the same weight, side by side:

* ``fastprox``: the public operator;
* ``eager``: what a user would write in PyTorch, in the weight's own dtype (``baseline``):
  ``sign(w) * clamp(|w| - lam, 0)``, ``vector_norm`` then ``mul_``, a sort for the exact
  exclusive threshold; NaN handling is not its concern. The NaN-exact reference
  (fastprox/reference.py) is the tests' oracle, not a speed baseline;
* ``compiled``: ``torch.compile`` of that baseline;
* ``floor``: one pass over memory, an in-place ``mul_`` on the CPU, a device-to-device copy on
  a GPU (the bytes an in-place step must move at least once).

``report`` writes every run in one markdown format, headed by the machine's name.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import platform

import torch

import fastprox
from fastprox.operators import OPERATORS, Operator

SHAPES_CPU = {
    "8192x4096-rows": ((8192, 4096), 1),
    "8192x4096-cols": ((8192, 4096), 0),
    "512x512-rows": ((512, 512), 1),
    "512x512-cols": ((512, 512), 0),
}
SHAPES_GPU = {
    "rows-64": ((16384, 64), 1),
    "rows-512": ((16384, 512), 1),
    "rows-4096": ((16384, 4096), 1),
    "rows-16384": ((16384, 16384), 1),
    "rows-262144": ((1024, 262144), 1),
    "columns-4096": ((16384, 4096), 0),
    "conv-in-channels": ((512, 512, 3, 3), (0, 2, 3)),
}
SHAPES_TINY = {
    "rows-64": ((16, 64), 1),
    "columns": ((64, 24), 0),
    "conv-in-channels": ((8, 6, 3, 3), (0, 2, 3)),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
IMPLS = ("fastprox", "eager", "compiled", "floor")

# Every baseline is a closure of one function (baseline's step): torch.compile keeps at most
# cache_size_limit compilations of one code object and runs the others eagerly. A run compiles
# one per case, weight and dtype.
torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 512)
torch._dynamo.config.accumulated_cache_size_limit = max(
    torch._dynamo.config.accumulated_cache_size_limit, 2048)


@dataclasses.dataclass(frozen=True)
class Case:
    """One timed operator call: a row of the table with one of its bench samples."""

    row: Operator
    lams: tuple
    flags: dict

    @property
    def label(self) -> str:
        extra = ",".join(f"{k}={v}" for k, v in self.flags.items())
        return f"{self.row.name}({extra})" if extra else self.row.name

    def scaled(self, factor: float) -> "Case":
        return Case(self.row, tuple(v * factor for v in self.lams), self.flags)

    def moves(self, numel: int, itemsize: int) -> int:
        """Bytes the operator must move: one read (group_norms), one read and one write."""
        return numel * itemsize * (1 if self.row.kind == "norms" else 2)

    def fastprox(self):
        fn = getattr(fastprox, self.row.name)
        if self.row.kind == "norms":
            return lambda w, dim: fn(w, dim)
        if not self.row.grouped:
            return lambda w, dim: fn(w, *self.lams)
        return lambda w, dim: fn(w, *self.lams, dim, **self.flags)

    def eager(self):
        return baseline(self)


CASES = [Case(row, lams, dict(flags)) for row in OPERATORS if row.kind in ("norms", "preset")
         for lams, flags in row.bench]
BY_LABEL = {case.label: case for case in CASES}


# -- the user's baselines, in the weight's dtype ---------------------------------------------

def _dims(w: torch.Tensor, dim) -> list[int]:
    return sorted(d % w.dim() for d in ((dim,) if isinstance(dim, int) else dim))


def _soft(w, lam):
    return torch.sign(w) * torch.clamp(w.abs() - lam, min=0)


def _group_scale(w, dims, t):
    norms = torch.linalg.vector_norm(w, dim=dims, keepdim=True)
    return torch.clamp(1 - t / norms, min=0)


def _exclusive(w, dims, lam, exact):
    a = w.abs()
    if not exact:
        tau = lam * a.sum(dim=dims, keepdim=True)
    else:  # the closed form: a sort of each group, S_k / (1/lam + k), max over k
        kept = [d for d in range(w.dim()) if d not in dims]
        rows = a.permute(kept + dims).reshape(-1, math.prod(w.shape[d] for d in dims))
        s = rows.sort(dim=1, descending=True).values.cumsum(dim=1)
        k = torch.arange(1, rows.shape[1] + 1, device=w.device, dtype=w.dtype)
        tau = (s / (1 / lam + k)).amax(dim=1)
        tau = tau.reshape([1 if d in dims else w.shape[d] for d in range(w.dim())])
    return torch.sign(w) * torch.clamp(a - tau, min=0)


def baseline(case: Case):
    """(w, dim) -> the case's step as plain PyTorch in w's dtype, in place (norms: returned)."""
    name, lams, flags = case.row.name, case.lams, case.flags
    weighted = flags.get("size_weighted", True)
    exact = flags.get("exact", True)

    def c(w, dims):
        return math.sqrt(math.prod(w.shape[d] for d in dims)) if weighted else 1.0

    def step(w, dim):
        dims = _dims(w, dim)
        if name == "group_norms":
            return torch.linalg.vector_norm(w, dim=dims)
        if name == "soft_threshold_":
            return w.copy_(_soft(w, lams[0]))
        if name == "group_shrink_":
            return w.mul_(_group_scale(w, dims, lams[0] * c(w, dims)))
        if name == "sparse_group_shrink_":
            v = _soft(w, lams[0])
            return w.copy_(v * _group_scale(v, dims, lams[1] * c(w, dims)))
        if name == "exclusive_shrink_":
            return w.copy_(_exclusive(w, dims, lams[0], exact))
        if name == "cges_shrink_":
            v = w * _group_scale(w, dims, lams[0] * c(w, dims))
            return w.copy_(_exclusive(v, dims, lams[1], exact))
        raise KeyError(f"no baseline for {name}: add one with its table row")

    return step


# -- whole-model steps ---------------------------------------------------------------------------

def model_steps(dims, lam: float) -> dict:
    """Group lasso on every tensor of a parameter list (what Regularizer(model, "group_lasso")
    applies after each step): one foreach_prox_ call, a loop of group_shrink_ calls, the user's
    eager loop."""
    group = baseline(Case(BY_LABEL["group_shrink_"].row, (lam,), {}))
    return {
        "foreach": lambda ws: fastprox.foreach_prox_(ws, lam_group=lam, dim=dims),
        "loop": lambda ws: [fastprox.group_shrink_(w, lam, d) for w, d in zip(ws, dims)],
        "eager": lambda ws: [group(w, d) for w, d in zip(ws, dims)],
    }


# -- the GPU kernels on CPU tensors (Triton's interpreter) ---------------------------------------

@contextlib.contextmanager
def served_by_kernels(enabled: bool = True):
    """The ops on CPU tensors served by the Triton kernels, through the dispatcher
    (fastprox._registry.serve), as CUDA tensors are: how the kernels run on CPU tensors under
    TRITON_INTERPRET=1."""
    if not enabled:
        yield
        return
    from fastprox import _registry

    with _registry.serve("triton"):
        yield


# -- the report ----------------------------------------------------------------------------------

def cpu_machine() -> str:
    from machine import cpu_name

    return (f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
            f"CPU capability {torch.backends.cpu.get_cpu_capability()}")


def gpu_machine() -> str:
    import triton

    props = torch.cuda.get_device_properties(0)
    return (f"{props.name} ({props.multi_processor_count} SMs), CUDA {torch.version.cuda}, "
            f"torch {torch.__version__}, triton {triton.__version__}, "
            f"Python {platform.python_version()}")


def derive(row: dict) -> dict:
    """Adds GB/s and the ratios to a row of medians in seconds (``<impl>_s``)."""
    t = row["fastprox_s"]
    row["fastprox_gbps"] = row["bytes"] / t / 1e9
    if "floor_s" in row:
        row["x_floor"] = t / row["floor_s"]
        row["floor_gbps"] = row["floor_bytes"] / row["floor_s"] / 1e9
    for impl in ("eager", "compiled"):
        if f"{impl}_s" in row:
            row[f"vs_{impl}"] = row[f"{impl}_s"] / t
    return row


def report(machine: str, floor: str, rows: list[dict], models: list[dict] = (),
           coupled: list[dict] = (), metric: list[dict] = (), steps: list[dict] = ()) -> str:
    """One markdown format for every run. rows: derive()d operator rows (op, weight, dtype);
    models: whole-model rows (model, dtype, tensors, foreach_s, loop_s, eager_s, floor_s,
    bytes, optional launches); coupled: coupled-group rows (coupled_model, groups, sets,
    tensors, coupled_s, bytes, per_tensor_s, per_tensor_bytes, floor_s, floor_bytes); metric:
    metric-step rows (metric_model, tensors, metric_s, bytes, euclidean_s, reference_s, floor_s,
    floor_bytes); steps: training-step rows (step_model, params, sets, train_s, adamw_s,
    metric_s, euclidean_s, target_s: the metric step with a SparsityTarget on its ramp)."""
    get = lambda r, k, f: f.format(r[k]) if k in r else "-"  # noqa: E731
    ms = lambda r, k: f"{r[k] * 1e3:.3f}" if k in r else "-"  # noqa: E731
    lines = [f"Machine: {machine}. Floor: {floor}.", "",
             "| operator | weight | dtype | fastprox ms | GB/s | x floor | floor GB/s | eager ms | "
             "compiled ms | vs eager | vs compiled |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['op']} | {r['weight']} | {r['dtype']} | {ms(r, 'fastprox_s')} | "
            f"{get(r, 'fastprox_gbps', '{:.1f}')} | {get(r, 'x_floor', '{:.2f}')} | "
            f"{get(r, 'floor_gbps', '{:.1f}')} | {ms(r, 'eager_s')} | {ms(r, 'compiled_s')} | "
            f"{get(r, 'vs_eager', '{:.2f}x')} | {get(r, 'vs_compiled', '{:.2f}x')} |")
    if models:
        lines += ["", "Whole-model step (group lasso on every weight):", "",
                  "| model | dtype | tensors | launches | foreach ms | GB/s | x floor | loop ms | "
                  "loop / foreach | eager ms | eager / foreach |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in models:
            t = r["foreach_s"]
            ratio = lambda k: f"{r[k] / t:.2f}x" if k in r else "-"  # noqa: E731
            lines.append(
                f"| {r['model']} | {r['dtype']} | {r['tensors']} | {r.get('launches', '-')} | "
                f"{t * 1e3:.3f} | {r['bytes'] / t / 1e9:.1f} | "
                f"{t / r['floor_s']:.2f} | {ms(r, 'loop_s')} | {ratio('loop_s')} | "
                f"{ms(r, 'eager_s')} | {ratio('eager_s')} |")
    if coupled:
        lines += ["", "Coupled groups (group lasso on every coupled set of the model, "
                  "coupled_prox_, GB/s counting one read of each member for the sums and one "
                  "read and write for the rewrite; against group lasso per tensor on its "
                  "Linear/conv weights, foreach_prox_, and the floor on the tensors the sets "
                  "touch):", "",
                  "| model | groups | sets | tensors | coupled ms | GB/s | x floor | "
                  "per-tensor ms | per-tensor GB/s | floor ms |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in coupled:
            t = r["coupled_s"]
            lines.append(
                f"| {r['coupled_model']} | {r['groups']} | {r['sets']} | {r['tensors']} | "
                f"{t * 1e3:.2f} | {r['bytes'] / t / 1e9:.1f} | {t / r['floor_s']:.2f} | "
                f"{ms(r, 'per_tensor_s')} | "
                f"{get(r, 'per_tensor_gbps', '{:.1f}')} | {ms(r, 'floor_s')} |")
    if metric:
        lines += ["", "Group lasso in an Adam step's metric on every weight (foreach_metric_prox_, "
                  "GB/s counting one read of each weight and its second moment and one write), "
                  "against the Euclidean step (foreach_prox_), the float64 reference and the "
                  "floor (one read of both, one write: _foreach_add_):", "",
                  "| model | tensors | metric ms | GB/s | x floor | euclidean ms | "
                  "reference ms | reference / metric | floor ms |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in metric:
            t = r["metric_s"]
            slower = f"{r['reference_s'] / t:.1f}x" if "reference_s" in r else "-"
            lines.append(
                f"| {r['metric_model']} | {r['tensors']} | {t * 1e3:.2f} | "
                f"{r['bytes'] / t / 1e9:.1f} | {t / r['floor_s']:.2f} | "
                f"{ms(r, 'euclidean_s')} | {ms(r, 'reference_s')} | {slower} | "
                f"{ms(r, 'floor_s')} |")
    if steps:
        lines += ["", "The regularizer's proximal step (coupled groups, AdamW) beside the AdamW "
                  "step and a whole training step (forward, backward, AdamW) of the model:", "",
                  "| model | params | sets | train step ms | AdamW step ms | metric prox ms | "
                  "/ AdamW | / train | euclidean prox ms | / AdamW | metric prox, target "
                  "ramp ms | / AdamW |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in steps:
            t, adam = r["metric_s"], r["adamw_s"]
            per = lambda k, base: f"{r[k] / base:.2f}" if k in r else "-"  # noqa: E731
            train = f"{t / r['train_s']:.2f}" if "train_s" in r else "-"
            lines.append(
                f"| {r['step_model']} | {r['params'] / 1e6:.1f} M | {r['sets']} | "
                f"{ms(r, 'train_s')} | {adam * 1e3:.2f} | {t * 1e3:.2f} | {t / adam:.2f} | "
                f"{train} | {ms(r, 'euclidean_s')} | {per('euclidean_s', adam)} | "
                f"{ms(r, 'target_s')} | {per('target_s', adam)} |")
    return "\n".join(lines) + "\n"


def compiled_report(rows: list[dict]) -> str:
    """The whole training step eager and under torch.compile, without the regularizer and with
    it attached (rows: compiled_model, optimizer, params, sets, eager_s, eager_prox_s,
    compiled_s, compiled_prox_s)."""
    if not rows:
        return ""
    ms = lambda r, k: f"{r[k] * 1e3:.1f}" if k in r else "-"  # noqa: E731

    def added(r, mode):
        a, b = r.get(f"{mode}_prox_s"), r.get(f"{mode}_s")
        return "-" if a is None or b is None else f"{(a - b) * 1e3:+.1f} ({a / b:.2f}x)"

    lines = ["", "A whole training step (forward, backward, the optimizer, zero_grad) eager and "
             "under torch.compile (inductor), without and with the regularizer attached (AdamW: "
             "the metric step, one region outside the graph; SGD: the Euclidean step, traced):",
             "", "| model | optimizer | params | sets | eager ms | eager + prox ms | prox adds "
             "| compiled ms | compiled + prox ms | prox adds |", "|---|---|---|---|---|---|---|"
             "---|---|---|"]
    for r in rows:
        lines.append(f"| {r['compiled_model']} | {r['optimizer']} | {r['params'] / 1e6:.1f} M | "
                     f"{r['sets']} | {ms(r, 'eager_s')} | {ms(r, 'eager_prox_s')} | "
                     f"{added(r, 'eager')} | {ms(r, 'compiled_s')} | "
                     f"{ms(r, 'compiled_prox_s')} | {added(r, 'compiled')} |")
    return "\n".join(lines) + "\n"


# -- coupled groups of whole models --------------------------------------------------------------

def coupled_model(name: str, device="cpu"):
    """(model, coupled sets, per-tensor group lasso targets) of a real model on ``device``: a
    ResNet-50 (torchvision's layout, Bottleneck blocks 3-4-6-3; a 3x3 stem) with channel
    groups, GPT-2 small (Hugging Face, built from its config) with head and neuron groups, or
    ``resnet-tiny`` (two BasicBlocks, for smoke runs). Discovery needs Torch-Pruning (and
    transformers for GPT-2): ImportError otherwise."""
    from fastprox import Regularizer, groups
    from fastprox.demo.models import BasicBlock, Bottleneck, ResNet

    torch.manual_seed(0)
    if name in ("resnet50", "resnet-tiny"):
        if name == "resnet50":
            model = ResNet(Bottleneck, (3, 4, 6, 3), (64, 128, 256, 512), in_ch=3, classes=1000)
        else:
            model = ResNet(BasicBlock, (1, 1), (4, 8), in_ch=3, classes=10)
        model.to(device)
        found = groups.channels(model, torch.randn(1, 3, 32, 32, device=device))
    else:
        from transformers import GPT2Config, GPT2LMHeadModel

        model = GPT2LMHeadModel(GPT2Config()).to(device)
        found = groups.discover(model, ("heads", "neurons"))
    touched = {id(m.tensor.untyped_storage()) for s in found.sets for m in s.slices}
    per_tensor = [t for t in Regularizer(model, "group_lasso").targets.values()
                  if id(t.param.untyped_storage()) in touched]
    return model, found.sets, per_tensor


# -- models trained with AdamW, for the proximal step beside the optimizer and training steps -----

STEP_MODELS = ["gpt2-4l", "llama-4l", "resnet50", "gpt2-small"]


def step_model(name: str, g: torch.Generator, device="cpu", lam: float = 1e-4, target=None):
    """(model, regularizer, loss_fn) of a coupled model trained with AdamW, on ``device``:
    Hugging Face GPT-2 and Llama (GQA) built from configs (4 layers, 512 wide, 8 heads; Llama 4
    KV heads, MLP 1536; vocabulary 256) and GPT-2 small, heads and neurons, batch 8 x 64 tokens;
    ResNet-50 (channels, torchvision's layout), batch 8 x 3 x 64 x 64; ``gpt2-tiny`` (1 layer,
    32 wide, 2 heads, batch 2 x 16: smoke runs). ImportError without transformers (GPT-2,
    Llama) or Torch-Pruning (ResNet-50). ``target``: a SparsityTarget for the regularizer."""
    import fastprox

    torch.manual_seed(0)
    if name == "resnet50":
        from fastprox.demo.models import Bottleneck, ResNet

        model = ResNet(Bottleneck, (3, 4, 6, 3), (64, 128, 256, 512), in_ch=3,
                       classes=1000).to(device)
        x = torch.randn(8, 3, 64, 64, generator=g).to(device)
        y = torch.randint(0, 1000, (8,), generator=g).to(device)
        reg = fastprox.Regularizer(model, "channels", lam=lam, example_inputs=(x[:1],),
                                   target=target)
        return model, reg, lambda: torch.nn.functional.cross_entropy(model(x), y)
    import transformers as tf

    batch = (8, 64)
    if name == "llama-4l":
        config = tf.LlamaConfig(vocab_size=256, hidden_size=512, intermediate_size=1536,
                                num_hidden_layers=4, num_attention_heads=8,
                                num_key_value_heads=4, max_position_embeddings=128)
        model = tf.LlamaForCausalLM(config)
    elif name == "gpt2-4l":
        model = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=256, n_positions=128, n_embd=512,
                                                 n_layer=4, n_head=8))
    elif name == "gpt2-tiny":
        model = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=64, n_positions=32, n_embd=32,
                                                 n_layer=1, n_head=2))
        batch = (2, 16)
    else:
        model = tf.GPT2LMHeadModel(tf.GPT2Config())
    model.to(device)
    ids = torch.randint(0, model.config.vocab_size, batch, generator=g).to(device)
    reg = fastprox.Regularizer(model, ("heads", "neurons"), lam=lam, target=target)
    return model, reg, lambda: model(input_ids=ids, labels=ids).loss
