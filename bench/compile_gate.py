"""Compile gate for the Triton kernels, no GPU needed: every kernel specialization the CUDA
entries launch, compiled by Triton's real compiler for Hopper (sm_90a, 132 SMs) and Ampere
(sm_80, 108 SMs), and the compiled code read back.

    python bench/compile_gate.py                 # the whole catalog; exit 1 on any failure
    python bench/compile_gate.py --quick         # a sample (a few seconds)
    python bench/compile_gate.py --first-call    # + cold compile cost of one training step

The specializations come from the launcher itself (the plan_* functions of kernels/launch.py,
kernels/group_phases.py and kernels/metric_prox.py, the same code a GPU run calls) applied to
meta tensors over a catalog: the kernel tests' layouts
(with the small tile limits the tests force as well), the GPU benchmark's shapes, the ResNet-50
and GPT-2 small weight lists, unaligned views and a tensor of more than 2**31 elements; every
combination of steps (thresholds that may be nonzero, exact or bound exclusive threshold) and
the three phases of steps whose groups span tensors (``phase_kernel``: sums, sums above tau,
rewrite), in float32, bfloat16, float16 and float64; with every warp count the tuner may pick.

For each specialization and target it reads, from ``cuobjdump -res-usage`` of the cubin,
registers, stack frame and local memory per thread, and from the PTX the width of the weight's
loads (``ld.global.cg``: the kernels load weights only through ``_load``) and stores. It fails
(exit status 1) on a compile error, on any stack frame or local memory (a spill), and on a
weight access narrower than 16 bytes in a specialization whose tiles the host declared 16-byte
aligned (VEC > 1). ``--markdown`` writes the table kept in bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import dataclasses
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time

os.environ.pop("TRITON_INTERPRET", None)  # the real compiler, never the interpreter
# Triton 3.9 warns in every process that fp fusion is on by default; say so (the same code).
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import torch  # noqa: E402
import triton  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [HERE, os.path.join(ROOT, "tests_kernels")]

from fastprox.kernels import coupled_metric, group_phases, launch, metric_prox, tiles  # noqa: E402
from fastprox.kernels.layout import analyze, is_dense  # noqa: E402
from fastprox.kernels.tables import Tables  # noqa: E402

TARGETS = {"sm_90a": (90, 132), "sm_80": (80, 108)}  # capability, SMs (H100/H200, A100)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
          "fp64": torch.float64}

# (l1, group, exclusive) thresholds that may be nonzero, exact exclusive threshold
STEPS = {
    "group": ((False, True, False), True),
    "l1": ((True, False, False), True),
    "sgl": ((True, True, False), True),
    "excl": ((False, False, True), True),
    "excl-bound": ((False, False, True), False),
    "cges": ((False, True, True), True),
    "cges-bound": ((False, True, True), False),
    "l1-excl": ((True, False, True), True),
    "l1-excl-bound": ((True, False, True), False),
    "all": ((True, True, True), True),
    "all-bound": ((True, True, True), False),
}


# ---------------------------------------------------------------------------------------------
# The catalog: lists of (shape, dims) that one call (or one foreach_prox_ call) receives.

def catalog(quick: bool = False, only=None) -> dict[str, list]:
    from harness import SHAPES_GPU as SHAPES
    from layouts import LAYOUTS
    from model_shapes import gpt2_small_weights, resnet50_weights

    def norm(dim):
        return (dim,) if isinstance(dim, int) else tuple(dim)

    cases = {}
    for shape, dim in LAYOUTS:
        cases[f"test {shape} dim={dim}"] = [(shape, norm(dim), None)]
    for name, (shape, dim) in SHAPES.items():
        cases[f"bench {name}"] = [(shape, norm(dim), None)]
    cases["resnet50"] = [(s, norm(d), None) for s, d in resnet50_weights()]
    cases["gpt2-small"] = [(s, norm(d), None) for s, d in gpt2_small_weights()]
    # a view one element in: not 16-byte aligned, the element-wise specializations
    cases["unaligned rows"] = [((512, 1024), (1,), "offset")]
    cases["unaligned columns"] = [((1024, 512), (0,), "offset")]
    cases["rows of 1000"] = [((256, 1000), (1,), None)]
    # 2**31 elements and more: 64-bit element offsets
    cases["rows of 2**31+"] = [((65536, 32769), (1,), None)]
    if quick:
        keep = ["test (7, 37) dim=1", "bench columns-4096", "gpt2-small"]
        cases = {k: cases[k] for k in keep}
    if only:
        cases = {k: v for k, v in cases.items() if any(o in k for o in only)}
    return cases


def _meta_weight(shape, dtype, view):
    if view == "offset":
        flat = torch.empty(1 + torch.Size(shape).numel(), dtype=dtype, device="meta")
        return flat[1:].view(shape)
    return torch.empty(shape, dtype=dtype, device="meta")


@contextlib.contextmanager
def _limits(**values):
    saved = {k: getattr(tiles, k) for k in values}
    for k, v in values.items():
        setattr(tiles, k, v)
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(tiles, k, v)


# The tile limits the kernel tests force to reach each path on small shapes (tests_kernels'
# `path` fixture): their launches run on a GPU too.
TEST_PATHS = {"tile": dict(SPLIT_BELOW_BLOCKS=0),
              "looped": dict(ONE_TILE_ELEMS=16, TILE_ELEMS=8, SPLIT_BELOW_BLOCKS=0),
              "split": dict(ONE_TILE_ELEMS=16, TILE_ELEMS=8, SPLIT_BELOW_BLOCKS=10 ** 6),
              "sweeps": dict(LOOP_ELEMS=32),  # tests_kernels/test_phases.py
              "metric-looped": dict(ONE_TILE_ELEMS=64, TILE_ELEMS=32)}  # test_metric_kernel.py


def plans(entries, steps, sms) -> list[launch.Launch]:
    """The launches of every operator the CUDA entries serve, for one list of weights."""
    tables = Tables(torch.device("cpu"), upload=False)
    out = []
    for step in steps:
        flags, exact = STEPS[step]
        table = torch.zeros(len(entries), 3, dtype=torch.float64)
        rows = [(w, list(d), (0.0, 0.0, 0.0), True, exact) for w, d in entries]
        for _, _, launches, _ in launch.plan_prox(rows, table, [flags] * len(entries), sms,
                                                  tables):
            out += launches
    out += phase_plans(entries, sms, tables)
    out += metric_plans(entries, steps, sms, tables)
    for w, d in entries:
        if w.numel() == 0:
            continue
        layout = analyze(w, list(d))
        if layout.num_groups:
            norms = torch.empty(layout.num_groups, dtype=w.dtype, device="meta")
            out += launch.plan_group_norms(w, layout, sms, tables, norms)
        work = w if is_dense(w) else w.contiguous()
        out.append(launch.plan_soft_threshold(work, torch.zeros(1, 3, dtype=torch.float64)))
    return out


def metric_plans(entries, steps, sms, tables) -> list[launch.Launch]:
    """The launches of foreach_metric_prox_ over one list of weights, with second moments of the
    weights' dtype and layout (what torch.optim.Adam / AdamW keep), for every combination of
    steps (the exact exclusive threshold is chosen at run time: one specialization serves
    both)."""
    table = torch.zeros(len(entries), 3, dtype=torch.float64)
    metric = torch.zeros(len(entries), 3, dtype=torch.float64)
    rows = [(w, torch.empty_like(w), list(d), True, True) for w, d in entries]
    out = []
    for flags in dict.fromkeys(STEPS[step][0] for step in steps):
        for _, _, launches, _ in metric_prox.plan_metric_step(rows, [flags] * len(entries),
                                                              table, metric, sms, tables):
            out += launches
    return out


def phase_plans(entries, sms, tables) -> list[launch.Launch]:
    """The launches of the phase ops (sums, sums above, rewrite) over one list of weights: one
    specialization per phase serves every combination of their arguments."""
    layouts = group_phases.phase_layouts([(w, list(d)) for w, d in entries])
    l1s = torch.zeros(len(entries), dtype=torch.float64)
    out = []
    for bucket in group_phases.phase_buckets([w for w, _ in entries], layouts):
        for phase, rows in group_phases.PHASE_ROWS.items():
            sums = tables.empty(max(rows, 1) * bucket.total, bucket.acc)
            params = tables.empty(2 * bucket.total, bucket.acc)
            out.append(group_phases.plan_phase(bucket, l1s, phase, params, sums, sms, tables))
    return out


def _coupled_sets(dtype):
    """Coupled sets of real models on meta tensors, as (name, [(member, axis, index)], groups):
    a GPT-2 block's heads (fused QKV columns, its bias, the output projection's rows) and
    neurons, a ResNet block's channels (a conv's output channels, its BatchNorm, the next conv's
    input channels), and the columns of a tensor of more than 2**31 elements."""
    def meta(*shape):
        return torch.empty(shape, dtype=dtype, device="meta")

    heads = [p // 64 for p in range(512)]
    units = list(range(2048))
    chans = list(range(64))
    return [("gpt2 heads", [(meta(512, 1536), 1, heads * 3), (meta(1536), 0, heads * 3),
                            (meta(512, 512), 0, heads)], 8),
            ("gpt2 neurons", [(meta(512, 2048), 1, units), (meta(2048), 0, units),
                              (meta(2048, 512), 0, units)], 2048),
            ("resnet channels", [(meta(64, 64, 3, 3), 0, chans), (meta(64), 0, chans),
                                 (meta(64), 0, chans), (meta(256, 64, 1, 1), 1, chans)], 64),
            # a column spans 2**31 elements and more: 64-bit offsets within a segment
            ("columns of 2**31+", [(meta(65536, 32769), 1, list(range(32769)))], 32769)]


def _slice_rows(members, groups):
    """(table, starts) of a set: per group, its (member, position) rows, members in order."""
    rows = [[] for _ in range(groups)]
    for k, (_, _, index) in enumerate(members):
        for p, g in enumerate(index):
            rows[g].append((k, p))
    table = torch.tensor([r for g in rows for r in g], dtype=torch.int64).reshape(-1, 2)
    starts = torch.tensor([0] + [len(g) for g in rows]).cumsum(0)
    return table, starts


def coupled_plans(dtype, steps) -> dict[str, list[launch.Launch]]:
    """The launches of coupled_metric_prox_ over each coupled set of _coupled_sets, for every
    combination of steps, with the metric formed from Adam's moments or given (direct), and
    with float64 sums (float64 members, or a direct metric beyond 1e18); moments (or metrics)
    of the members' dtype or of the sums' type (what the op reads them as)."""
    out: dict = {}
    for name, members, groups in _coupled_sets(dtype):
        table, starts = _slice_rows(members, groups)
        shapes = tuple(coupled_metric._shape_key(w, a) for w, a, _ in members)
        layout = coupled_metric.set_layout(shapes, table, starts)
        for flags in dict.fromkeys(STEPS[step][0] for step in steps):
            t = torch.full((groups,), float(flags[1]), dtype=torch.float64)
            for direct in (False, True):
                for wide in sorted({dtype == torch.float64, direct or dtype == torch.float64}):
                    for mdtype in dict.fromkeys([dtype, torch.float64 if wide else
                                                 torch.float32]):
                        wave = coupled_metric.Wave(dtype, mdtype, wide)
                        wave.add([w for w, _, _ in members],
                                 [torch.empty_like(w, dtype=mdtype) for w, _, _ in members],
                                 [(1.0, 0.0, 1.0)] * len(members), layout, t, float(flags[0]),
                                 float(flags[2]), True)
                        out.setdefault(name, []).append(coupled_metric.plan_wave(wave, direct))
    return out


# ---------------------------------------------------------------------------------------------
# Specializations: what Triton's JIT compiles for a launch (its cache key), as an ASTSource.

@dataclasses.dataclass(frozen=True)
class Spec:
    kernel: str
    signature: tuple      # (name, type) of every argument, constexprs as "constexpr"
    constexprs: tuple     # (name, value)
    aligned: tuple        # pointer arguments the JIT specializes as 16-byte aligned
    num_warps: int
    maxnreg: int | None
    capability: int

    def label(self) -> dict:
        c = dict(self.constexprs)
        shape = "x".join(str(c[k]) for k in ("BLOCK_O", "BLOCK_G", "BLOCK_I") if k in c) or \
            str(c.get("BLOCK"))
        steps = "".join(n for n, k in (("L", "DO_L1"), ("G", "DO_GROUP"), ("E", "DO_EXCL"),
                                        ("N", "NORMS_ONLY")) if c.get(k)) + \
            {1: "sums", 2: "above", 3: "rewrite"}.get(c.get("PHASE"), "")
        return dict(kernel=self.kernel, tile=shape,
                    loop=f"{c['LOOP_O']}x{c['BLOCK_G']}x{c['LOOP_I']}" if "LOOP_O" in c else "",
                    fit={1: "tile", 2: "looped", 3: "both"}.get(c.get("FIT"), ""),
                    vec=c.get("VEC", 1), off64=bool(c.get("OFF64")), steps=steps,
                    dtype=dict(self.signature)[engine_pointer(self.kernel)].lstrip("*"),
                    warps=self.num_warps, arch=f"sm_{self.capability}" +
                    ("a" if self.capability == 90 else ""))


def engine_pointer(kernel: str) -> str:
    return "ptr" if kernel == "soft_threshold_kernel" else "base"


def specs_of(lau: launch.Launch, capability: int) -> list[Spec]:
    fn = launch.KERNELS[lau.kernel]
    runtime = [p for p in fn.params if not p.is_constexpr]
    assert len(runtime) == len(lau.args), (lau.kernel, len(runtime), len(lau.args))
    from triton.runtime.jit import mangle_type  # the JIT's own argument types

    sig, aligned = [], []
    for p, value in zip(runtime, lau.args):
        if isinstance(value, torch.Tensor):
            if tiles.address(value) % 16 == 0:  # the JIT's pointer specialization ("D")
                aligned.append(p.name)
        else:
            # Every integer argument is do_not_specialize: its type depends on its range only.
            assert isinstance(value, int) and p.do_not_specialize, (lau.kernel, p.name)
        sig.append((p.name, mangle_type(value)))
    consts = []
    for p in fn.params:
        if p.is_constexpr:
            sig.append((p.name, "constexpr"))
            consts.append((p.name, lau.constexprs[p.name]))
    assert set(lau.constexprs) == {n for n, _ in consts}, lau.kernel
    return [Spec(lau.kernel, tuple(sig), tuple(consts), tuple(aligned), c["num_warps"],
                 c.get("maxnreg"), capability) for c in lau.configs]


def enumerate_specs(quick: bool = False, targets=TARGETS, dtypes=DTYPES,
                    test_paths: bool = False, only=None) -> dict:
    """{Spec: [catalog entries that launch it]} over the catalog, every target."""
    found: dict = {}
    cases = catalog(quick, only)
    for tname, (cap, sms) in targets.items():
        for case, items in cases.items():
            test_case = case.startswith("test ")
            for dname, dtype in dtypes.items():
                entries = [(_meta_weight(s, dtype, v), d) for s, d, v in items]
                paths = TEST_PATHS.items() if test_case and test_paths else [("", {})]
                for path, limits in paths:
                    with _limits(**limits):
                        for lau in plans(entries, STEPS if not quick else ["group", "cges"],
                                         sms):
                            for spec in specs_of(lau, cap):
                                found.setdefault(spec, set()).add(
                                    f"{case}{' [' + path + ']' if path else ''}")
        if only and not any(o in "coupled" for o in only):
            continue
        for dname, dtype in dtypes.items():  # coupled sets: one per dtype in the quick sample
            steps = STEPS if not quick else ["group"]
            for name, launches in coupled_plans(dtype, steps).items():
                for lau in launches[:1] if quick else launches:
                    for spec in specs_of(lau, cap):
                        found.setdefault(spec, set()).add(f"coupled {name}")
    return found


# ---------------------------------------------------------------------------------------------
# Compiling and reading the result.

def _bin(name: str) -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


_LD = re.compile(r"\bld\.global\.cg(?:\.L\w+::\w+)*(?:\.v(\d))?\.(?:b|u|s|f)(\d+)")
_ST = re.compile(r"\bst\.global(?:\.\w+::\w+)*(?:\.v(\d))?\.(?:b|u|s|f)(\d+)")


def _widths(ptx: str, pattern) -> list[int]:
    return sorted({int(v or 1) * int(bits) for v, bits in pattern.findall(ptx)})


def compile_spec(spec: Spec) -> dict:
    """Compiles one specialization; its resources and access widths (or the error)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = launch.KERNELS[spec.kernel]
    names = [n for n, _ in spec.signature]
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in spec.aligned}
    row = dict(spec.label())
    start = time.perf_counter()
    log = io.StringIO()
    try:
        src = ASTSource(fn, dict(spec.signature), dict(spec.constexprs), attrs)
        options = dict(num_warps=spec.num_warps)
        if spec.maxnreg:
            options["maxnreg"] = spec.maxnreg
        with contextlib.redirect_stdout(log):  # ptxas -v, printed by Triton (see compile_all)
            kernel = triton.compile(src, target=GPUTarget("cuda", spec.capability, 32),
                                    options=options)
    except Exception as e:  # noqa: BLE001 - every compile error is reported, then fails
        row.update(error=f"{type(e).__name__}: {e}"[:2000], seconds=time.perf_counter() - start)
        return row
    row["seconds"] = time.perf_counter() - start
    m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads",
                  log.getvalue())
    if m is None:
        row["error"] = "no ptxas report (was the kernel taken from a cache?)"
        return row
    row.update(frame=int(m[1]), spill=int(m[2]) + int(m[3]))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(kernel.asm["cubin"])
        usage = subprocess.run([_bin("cuobjdump"), "-res-usage", path], capture_output=True,
                               text=True, check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", usage)
    row.update(regs=int(m[1]), stack=int(m[2]), shared=int(m[3]), local=int(m[4]))
    ptx = kernel.asm["ptx"]
    row["load_bits"] = _widths(ptx, _LD)
    # Stores of weights: every st.global but the norms', the partial sums' and the phase sums'
    # (fp32/fp64 rows)
    consts = dict(spec.constexprs)
    row["store_bits"] = _widths(ptx, _ST) if spec.kernel != "split_stats_kernel" and \
        not consts.get("NORMS_ONLY") and consts.get("PHASE", 3) == 3 else []
    return row


def problems(row: dict) -> list[str]:
    out = []
    if "error" in row:
        return [f"compile error: {row['error']}"]
    if row["spill"]:
        out.append(f"spills: {row['spill']} B spill stores + loads ({row['frame']} B stack "
                   "frame)")
    if row["vec"] > 1:
        narrow = [b for b in row["load_bits"] + row["store_bits"] if b != 128]
        if narrow or not row["load_bits"]:
            out.append(f"aligned (VEC={row['vec']}) but weight accesses of {narrow} bits")
    return out


def compile_all(specs, jobs: int) -> list[dict]:
    """Compiles in a cache of its own, so that ptxas runs (and reports) for every kernel."""
    with tempfile.TemporaryDirectory() as cache:
        env = dict(TRITON_CACHE_DIR=cache, TRITON_DUMP_PTXAS_LOG="1")
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            with cf.ProcessPoolExecutor(jobs) as pool:
                return list(pool.map(compile_spec, specs, chunksize=1))
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k)
                else:
                    os.environ[k] = v


# ---------------------------------------------------------------------------------------------
# First-call cost: the specializations one training step compiles, and their cold compile time.

def first_call(jobs: int) -> list[dict]:
    from model_shapes import gpt2_small_weights, resnet50_weights

    cap, sms = TARGETS["sm_90a"]
    out = []
    for model, shapes in (("resnet50", resnet50_weights()), ("gpt2-small", gpt2_small_weights())):
        for dname in ("fp32", "bf16"):
            entries = [(torch.empty(s, dtype=DTYPES[dname], device="meta"),
                        (d,) if isinstance(d, int) else tuple(d)) for s, d in shapes]
            # the Euclidean step (SGD) and the step in the optimizer's metric (Adam / AdamW)
            for step, launches in (("sgd", _step_launches(entries, sms)),
                                   ("adam", metric_plans(entries, ["group"], sms,
                                                         Tables("cpu", upload=False)))):
                specs = list(dict.fromkeys(s for lau in launches for s in specs_of(lau, cap)))
                start = time.perf_counter()
                rows = compile_all(specs, jobs)  # a cold cache: what a first call costs
                wall = time.perf_counter() - start
                out.append(dict(model=model, dtype=dname, step=step, launches=len(launches),
                                specializations=len(specs), compile_wall_s=round(wall, 2),
                                compile_cpu_s=round(sum(r["seconds"] for r in rows), 2),
                                jobs=jobs))
    return out


def _step_launches(entries, sms):
    """The launches of one Regularizer group lasso step (foreach_prox_ over the list)."""
    tables = Tables(torch.device("cpu"), upload=False)
    table = torch.zeros(len(entries), 3, dtype=torch.float64)
    rows = [(w, list(d), (0.0, 0.0, 0.0), True, True) for w, d in entries]
    flags = [(False, True, False)] * len(entries)
    return [lau for _, _, launches, _ in launch.plan_prox(rows, table, flags, sms, tables)
            for lau in launches]


# ---------------------------------------------------------------------------------------------

def markdown(rows: list[dict]) -> str:
    """One line per (kernel, tile, path, VEC, dtype, warps), over every combination of steps
    (L: soft threshold, G: group, E: exclusive, N: norms only; for ``phase``, its phases, the
    tile BLOCK_G x BLOCK_I and the sweep's sub-tile as loop tile) compiled with it: registers and
    spill bytes for sm_90a and sm_80 (the largest over the steps), the widths of the weight's
    loads and stores."""
    keyed: dict = {}
    for r in rows:
        key = (r["kernel"].replace("_kernel", ""), r["tile"] + (" i64" if r["off64"] else ""),
               r["loop"], r["fit"], r["vec"], r["dtype"], r["warps"])
        keyed.setdefault(key, []).append(r)
    lines = ["| kernel | tile | loop tile | path | VEC | dtype | warps | steps | "
             "registers sm_90a | registers sm_80 | spill B | loads / stores (bits) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def regs(rs, arch):
        vals = [r["regs"] for r in rs if r["arch"] == arch and "regs" in r]
        if any("error" in r for r in rs if r["arch"] == arch):
            return "error"
        return "-" if not vals else f"{min(vals)}" if min(vals) == max(vals) else \
            f"{min(vals)}-{max(vals)}"

    def bits(rs, k):
        return ",".join(map(str, sorted({b for r in rs for b in r.get(k, [])}))) or "-"

    order = lambda k: (k[0], k[5], k[3], [int(x) for x in k[1].split()[0].split("x")], k[6])  # noqa
    for key in sorted(keyed, key=order):
        rs = keyed[key]
        kernel, tile, loop, fit, vec, dtype, warps = key
        steps = " ".join(sorted({r["steps"] or "-" for r in rs}, key=lambda x: (len(x), x)))
        spill = max(r.get("spill", 0) for r in rs)
        lines.append(f"| {kernel} | {tile} | {loop or '-'} | {fit or '-'} | {vec} | {dtype} | "
                     f"{warps} | {steps} | {regs(rs, 'sm_90a')} | {regs(rs, 'sm_80')} | "
                     f"{spill} | {bits(rs, 'load_bits')} / {bits(rs, 'store_bits')} |")
    return "\n".join(lines) + "\n"


BEGIN, END = "<!-- compile-gate table: begin -->", "<!-- compile-gate table: end -->"


def write_results(path: str, table: str, summary: dict) -> None:
    """Replaces the table between the markers in ``path`` (bench/RESULTS.md)."""
    with open(path) as f:
        text = f.read()
    head, rest = text.split(BEGIN)
    _, tail = rest.split(END)
    note = (f"Regenerated by `python bench/compile_gate.py --results {os.path.relpath(path)}` "
            f"with Triton {summary['triton']}: {summary['specializations']} specializations, "
            f"{summary['failures']} failing, largest register count {summary['max_regs']}.\n\n")
    with open(path, "w") as f:
        f.write(head + BEGIN + "\n" + note + table + END + tail)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small sample of the catalog")
    parser.add_argument("--targets", nargs="*", default=list(TARGETS), choices=list(TARGETS))
    parser.add_argument("--cases", nargs="*", help="only catalog entries whose name contains one")
    parser.add_argument("--dtypes", nargs="*", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--kernels", nargs="*",
                        help="only the specializations of these kernels (e.g. metric_kernel)")
    parser.add_argument("--test-paths", action="store_true",
                        help="also the small tiles the kernel tests force (tests_kernels)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--json", help="write every specialization's numbers here")
    parser.add_argument("--markdown", help="write the table here")
    parser.add_argument("--results", help="replace the table kept in this file (bench/RESULTS.md)")
    parser.add_argument("--first-call", action="store_true",
                        help="also measure the cold compile of one ResNet-50 / GPT-2 step")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    found = enumerate_specs(args.quick, {t: TARGETS[t] for t in args.targets},
                            {d: DTYPES[d] for d in args.dtypes}, args.test_paths, args.cases)
    if args.kernels:
        found = {spec: by for spec, by in found.items() if spec.kernel in args.kernels}
    specs = list(found)
    print(f"triton {triton.__version__}, torch {torch.__version__}: {len(specs)} "
          f"specializations ({', '.join(args.targets)}), {args.jobs} jobs", flush=True)
    rows = compile_all(specs, args.jobs)
    failures = 0
    for spec, row in zip(specs, rows):
        row["used_by"] = sorted(found[spec])[:6]
        bad = problems(row)
        row["problems"] = bad
        if bad:
            failures += 1
            print(f"FAIL {row['kernel']} {row['tile']} fit={row['fit']} vec={row['vec']} "
                  f"{row['dtype']} {row['steps']} warps={row['warps']} {row['arch']} "
                  f"(used by {', '.join(row['used_by'][:3])}): {'; '.join(bad)}", flush=True)
    ok = [r for r in rows if "error" not in r]
    summary = dict(triton=triton.__version__, torch=torch.__version__, specializations=len(rows),
                   failures=failures, wall_s=round(time.perf_counter() - start, 1),
                   max_regs=max((r["regs"] for r in ok), default=0),
                   spilling=sum(1 for r in ok if r["spill"]),
                   with_stack_frame=sum(1 for r in ok if r["frame"]),
                   aligned=sum(1 for r in ok if r["vec"] > 1),
                   aligned_128=sum(1 for r in ok if r["vec"] > 1 and not problems(r)))
    if args.first_call:
        summary["first_call"] = first_call(args.jobs)
        for fc in summary["first_call"]:
            print(f"first call: {fc}")
    print(json.dumps({k: v for k, v in summary.items() if k != "first_call"}))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(summary=summary, rows=rows), f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(markdown(rows))
    if args.results:
        write_results(args.results, markdown(rows), summary)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
