"""One call of every GPU kernel path, small enough to run under compute-sanitizer:

    compute-sanitizer --tool memcheck python3 bench/gpu_sanitize.py

prox_kernel with groups in one tile, looped, and both in one launch; the split kernels; the soft
threshold; group_norms; foreach over mixed dtypes; a view that is not 16-byte aligned; the step
in an Adam step's metric (metric_kernel, both paths). Each
result is compared with the float64 reference; the script prints one line per call and exits
1 if any differs (the sanitizer reports memory errors itself).
"""

from __future__ import annotations

import sys

import torch

import fastprox
from fastprox import reference
from fastprox.kernels import tiles

TOL = {torch.float32: 1e-4, torch.float64: 1e-10, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def _close(got: torch.Tensor, want: torch.Tensor, dtype) -> bool:
    scale = max(want.abs().max().item(), 1.0) if want.numel() else 1.0
    return bool(((got.double().cpu() - want).abs() <= TOL[dtype] * scale).all())


def calls():
    """(name, weight, function on the weight, reference on a float64 copy)."""
    g = torch.Generator().manual_seed(0)

    def w(shape, dtype=torch.float32):
        return torch.randn(shape, generator=g).to(dtype).cuda()

    rows = w((64, 300))
    yield "prox tile (rows)", rows, lambda x: fastprox.group_shrink_(x, 0.5, 1), \
        lambda x: reference.group_shrink_(x, 0.5, 1)
    long_rows = w((3, 20000))
    yield "prox looped (rows > tile), exact exclusive", long_rows, \
        lambda x: fastprox.cges_shrink_(x, 0.5, 0.01, 1), \
        lambda x: reference.cges_shrink_(x, 0.5, 0.01, 1)
    # one launch, groups that fit and groups that do not (exact exclusive: never split)
    mixed = [w((300, 64)), w((64, 64))]
    yield "prox both paths (foreach, cges)", mixed, \
        lambda xs: fastprox.foreach_prox_(xs, lam_group=0.5, lam_exclusive=0.01, dim=[0, 0]), \
        lambda xs: reference.foreach_prox_(xs, lam_group=0.5, lam_exclusive=0.01, dim=[0, 0])
    tall = w((4096, 64))  # few long column groups: split
    yield "split (columns)", tall, lambda x: fastprox.sparse_group_shrink_(x, 0.1, 0.2, 0), \
        lambda x: reference.sparse_group_shrink_(x, 0.1, 0.2, 0)
    soft = w((1000, 77), torch.bfloat16)
    yield "soft threshold (bf16)", soft, lambda x: fastprox.soft_threshold_(x, 0.3), \
        lambda x: reference.soft_threshold_(x, 0.3)
    conv = w((128, 64, 3, 3), torch.float64)
    yield "exclusive, conv input channels (fp64)", conv, \
        lambda x: fastprox.exclusive_shrink_(x, 0.05, (0, 2, 3)), \
        lambda x: reference.exclusive_shrink_(x, 0.05, (0, 2, 3))
    base = w((257, 128), torch.float16)
    view = base.view(-1)[1:1 + 256 * 128].view(256, 128)  # 2 bytes off 16-byte alignment
    yield "unaligned view (fp16)", view, lambda x: fastprox.group_shrink_(x, 0.5, 1), \
        lambda x: reference.group_shrink_(x, 0.5, 1)
    # the step in an Adam step's metric: groups in one tile and longer ones (looped sweeps) in
    # one launch, every sub-step; then 16-bit weights, and float64 with conv filter groups
    for name, shapes, dims, dtype in (
            ("metric tile + looped (cges, sgl)", [(64, 300), (3, 20000)], [1, 1], torch.float32),
            ("metric bf16 columns", [(300, 64)], [0], torch.bfloat16),
            ("metric fp64 conv filters", [(64, 32, 3, 3)], [(1, 2, 3)], torch.float64)):
        weights = [w(sh, dtype).mul_(0.05) for sh in shapes]
        moments = [torch.rand(sh, generator=g).mul_(1e-4).to(dtype).cuda() for sh in shapes]
        kw = dict(lam_l1=1e-4, lam_group=0.02, lam_exclusive=0.01)
        yield name, weights, \
            lambda xs, v=moments, d=dims: fastprox.foreach_metric_prox_(
                xs, v, lr=1e-3, step=10, dim=d, **kw), \
            lambda xs, v=moments, d=dims: [reference.metric_prox_(
                x, reference.adam_metric(m.cpu(), 10, 0.999, 1e-8, 1e-3), dim=dd, **kw)
                for x, m, dd in zip(xs, v, d)]


def main() -> int:
    if not torch.cuda.is_available():
        print("gpu_sanitize.py needs a CUDA device", file=sys.stderr)
        return 2
    failures = 0
    for name, weight, run, ref in calls():
        if isinstance(weight, list):
            want = [x.double().cpu() for x in weight]
            ref(want)
            run(weight)
            ok = all(_close(x, y, x.dtype) for x, y in zip(weight, want))
        else:
            want = weight.double().cpu()
            ref(want)
            run(weight)
            ok = _close(weight, want, weight.dtype)
        torch.cuda.synchronize()
        failures += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {name}", flush=True)
    rows = fastprox.group_norms(torch.randn(100, 50, device="cuda"), 1)
    print(f"ok   group_norms ({tuple(rows.shape)})", flush=True)
    print(f"launch constants: ONE_TILE_ELEMS={tiles.ONE_TILE_ELEMS}, "
          f"SPLIT_BELOW_BLOCKS={tiles.SPLIT_BELOW_BLOCKS}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
