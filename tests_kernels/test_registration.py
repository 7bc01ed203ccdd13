"""The CUDA registration: it serves CUDA tensors and leaves the CPU path, opcheck and
torch.compile as they were; on a GPU, the ops under opcheck, torch.compile and CUDA graphs."""

from __future__ import annotations

import math

import pytest
import torch

import fastprox
from fastprox import _registry, kernels
from fastprox.operators import COLUMNS
from kernel_calls import INTERPRET

needs_gpu = pytest.mark.skipif(INTERPRET, reason="needs a CUDA device")


def _op_args(device):
    w = torch.randn(8, 6, device=device)
    lams = torch.tensor([[0.0, 0.2, 0.0]], dtype=torch.float64)
    return [
        (torch.ops.fastprox.group_norms.default, (w, [1])),
        (torch.ops.fastprox.foreach_prox_.default,
         ([w.clone()], lams, [0], [1], [True], [True], "group_shrink_", ["", "lam", ""])),
        (torch.ops.fastprox.foreach_prox_.default,
         ([w.clone()], lams.flip(1), [], [0], [True], [True], "soft_threshold_",
          ["lam", "", ""])),
        (torch.ops.fastprox.foreach_prox_.default,
         ([w.clone(), w.clone().t()], torch.full((2, 3), 0.1, dtype=torch.float64), [1, 0],
          [1, 1], [True, False], [True, True], "foreach_prox_", list(COLUMNS))),
        (torch.ops.fastprox.foreach_group_sums.default,
         ([w, w.t()], [1, 0], [1, 1], [0.1, 0.0], 3)),
        (torch.ops.fastprox.foreach_group_sums_above.default,
         ([w, w.t()], [1, 0], [1, 1], [0.1, 0.0], [torch.rand(8, device=device), None],
          [torch.rand(8, device=device), torch.rand(8, device=device)])),
        (torch.ops.fastprox.foreach_group_rewrite_.default,
         ([w.clone(), w.clone().t()], [1, 0], [1, 1], [0.1, 0.0],
          [torch.rand(8, device=device), None], [None, torch.rand(8, device=device)])),
    ]


def test_registered_for_cuda_and_a_default_backend():
    """CUDA: the Triton entries; CPU: the C++ kernels; every other device (and CUDA without
    Triton): the reference, as the dispatcher's default kernel."""
    _registry.register_triton()
    for name in kernels.ENTRIES:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastprox::{name}", "CUDA")
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastprox::{name}", "CPU")
        assert torch._C._dispatch_has_kernel_for_dispatch_key(
            f"fastprox::{name}", "CompositeExplicitAutograd")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_gpu)])
def test_opcheck_after_registration(device):
    _registry.register_triton()
    for op, args in _op_args(device):
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_gpu)])
def test_compile_fullgraph_after_registration(device):
    _registry.register_triton()
    torch._dynamo.reset()

    @torch.compile(fullgraph=True)
    def step(w, v, lam):
        fastprox.group_shrink_(w, lam, dim=0)
        fastprox.foreach_prox_([v], lam_group=lam, lam_exclusive=0.01, dim=1)
        return fastprox.group_norms(w, dim=0)

    w = torch.randn(16, 12, device=device)
    v = torch.randn(5, 7, device=device)
    w_ref, v_ref = w.clone(), v.clone()
    norms = step(w, v, torch.tensor(0.1, device=device))
    fastprox.group_shrink_(w_ref, 0.1, dim=0)
    fastprox.foreach_prox_([v_ref], lam_group=0.1, lam_exclusive=0.01, dim=1)
    torch.testing.assert_close(w, w_ref)
    torch.testing.assert_close(v, v_ref)
    torch.testing.assert_close(norms, torch.linalg.vector_norm(w_ref, dim=0))


@needs_gpu
def test_cuda_graph_capture_and_replay():
    """foreach_prox_ captured after one eager step: replays apply the step again, and a CUDA
    tensor threshold is read at replay time."""
    weights = [torch.randn(64, 48, device="cuda"), torch.randn(32, 16, 3, 3, device="cuda")]
    dims = [0, (0, 2, 3)]
    lr = torch.tensor(0.05, device="cuda")

    def step():
        fastprox.foreach_prox_(weights, lam_group=lr, lam_exclusive=0.01, dim=dims)

    expected = [w.clone() for w in weights]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # eager warm-up: compiles, tunes, uploads the tables
    torch.cuda.current_stream().wait_stream(stream)
    fastprox.foreach_prox_(expected, lam_group=0.05, lam_exclusive=0.01, dim=dims)
    for w, e in zip(weights, expected):
        torch.testing.assert_close(w, e)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for value in (0.05, 0.2):
        lr.fill_(value)
        graph.replay()
        fastprox.foreach_prox_(expected, lam_group=value, lam_exclusive=0.01, dim=dims)
        torch.cuda.synchronize()
        for w, e in zip(weights, expected):
            torch.testing.assert_close(w, e)


@needs_gpu
def test_cuda_tensor_threshold_checked():
    w = torch.randn(8, 8, device="cuda")
    before = w.clone()
    with pytest.raises(ValueError, match="finite number >= 0"):
        fastprox.group_shrink_(w, torch.tensor(-1.0, device="cuda"))
    assert torch.equal(w, before)


@needs_gpu
def test_gpu_compiles_what_the_gate_compiles(monkeypatch):
    """Every launch of a real step on this GPU (tuning trials included) is a specialization that
    bench/compile_gate.py derives from the same shapes on meta tensors: what the gate compiles
    without a GPU is what runs."""
    import dataclasses

    import compile_gate as gate

    from fastprox.kernels import launch

    seen = []
    run = launch.Launch.run

    def record(self, config):
        seen.append(dataclasses.replace(self, configs=[config]))
        return run(self, config)

    monkeypatch.setattr(launch.Launch, "run", record)
    shapes = [((256, 512), (0,)), ((64, 32, 3, 3), (0, 2, 3)), ((48, 4096), (1,)),
              ((3, 20000), (1,)), ((4096, 64), (0,))]
    weights = [torch.randn(s, device="cuda") for s, _ in shapes]
    dims = [d for _, d in shapes]
    fastprox.foreach_prox_(weights, lam_group=0.1, dim=dims)
    fastprox.foreach_prox_(weights, lam_l1=0.01, lam_group=0.1, lam_exclusive=0.01, dim=dims)
    ops = torch.ops.fastprox  # the phase ops of coupled groups
    flat, counts = [d for ds in dims for d in ds], [len(ds) for ds in dims]
    per_group = [torch.rand(w.numel() // math.prod(w.shape[d] for d in ds), device="cuda")
                 for w, ds in zip(weights, dims)]
    ops.foreach_group_sums(weights, flat, counts, [0.01] * len(weights), 3)
    ops.foreach_group_sums_above(weights, flat, counts, [0.0] * len(weights), per_group,
                                 per_group)
    ops.foreach_group_rewrite_(weights, flat, counts, [0.0] * len(weights), per_group,
                               per_group)
    major, minor = torch.cuda.get_device_capability()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    got = {s for lau in seen for s in gate.specs_of(lau, 10 * major + minor)}
    meta = [(torch.empty(s, device="meta"), d) for s, d in shapes]
    want = {s for lau in gate.plans(meta, ["group", "all"], sms)
            for s in gate.specs_of(lau, 10 * major + minor)}
    assert got and got <= want, got - want
