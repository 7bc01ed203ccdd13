"""Sparsity targets from every strength: what is asked against what is reached, and the loss or
accuracy it costs (the README's "Sparsity targets" tables).

    python bench/target_study.py transformers   # Hugging Face GPT-2 and Llama (GQA), heads and
                                                # neurons, AdamW lr 1e-3 (and SGD), lam 1e-5..1e-2
    python bench/target_study.py digits         # DIGITS MLP 64-40-20-10, AdamW lr 1e-3
    python bench/target_study.py scratch        # the demo's DIGITS targets from six seeds,
                                                # each beside its widths trained from scratch

Each row trains from the same seed; "loss at / after by_step" is the training loss of step
by_step (its forward pass, before that step's removal) and of the next step (a one-shot removal
at by_step would show as a jump), "end" the last step's. Widths are per layer (heads: KV heads
for Llama).
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings

import torch
from torch import nn

import fastprox


def _markov_tokens(seed: int, n: int = 64, length: int = 32, vocab: int = 64) -> torch.Tensor:
    """Sequences of a random Markov chain (each token has 4 likely successors): a task a small
    model learns in a few hundred steps."""
    g = torch.Generator().manual_seed(seed)
    successors = torch.randint(0, vocab, (vocab, 4), generator=g)
    x = torch.zeros(n, length, dtype=torch.long)
    x[:, 0] = torch.randint(0, vocab, (n,), generator=g)
    for t in range(1, length):
        x[:, t] = successors[x[:, t - 1], torch.randint(0, 4, (n,), generator=g)]
    return x


def transformer(arch: str, layers: int = 4):
    import transformers as tf

    if arch == "gpt2":
        return tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=layers, n_embd=64, n_head=8,
                                                vocab_size=64, n_positions=32, bos_token_id=0,
                                                eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0,
                                                attn_pdrop=0.0))
    return tf.LlamaForCausalLM(tf.LlamaConfig(num_hidden_layers=layers, hidden_size=64,
                                              intermediate_size=128, num_attention_heads=8,
                                              num_key_value_heads=4, vocab_size=64,
                                              max_position_embeddings=32, bos_token_id=0,
                                              eos_token_id=0, pad_token_id=0))


def run_transformer(arch: str, lam: float, *, kept: float | None = 0.5, optimizer="adamw",
                    steps: int = 300, by_step: int = 200, layers: int = 4, seed: int = 0,
                    **options) -> dict:
    torch.manual_seed(seed)
    model = transformer(arch, layers)
    x = _markov_tokens(seed)
    if options.get("measure") == "flops":  # a group's FLOPs, counted on one sequence
        options["example_input"] = x[:1]
    target = None if kept is None else fastprox.SparsityTarget(kept=kept, by_step=by_step,
                                                               **options)
    reg = fastprox.Regularizer(model, ("heads", "neurons"), lam=lam, target=target)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3) if optimizer == "adamw" else \
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    reg.attach(opt)
    losses = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(steps):
            opt.zero_grad()
            loss = model(x, labels=x).loss
            loss.backward()
            opt.step()
            losses.append(float(loss))
    widths = {n: int(t.groups.alive().sum()) for n, t in reg.coupled.items()}
    return dict(losses=losses, by_step=by_step, widths=widths,
                reached=None if target is None else reg.controller.reached,
                warnings=[str(w.message) for w in caught if "SparsityTarget" in str(w.message)])


def run_digits(kept: float, lam: float, *, measure="units", layers=("2.weight", "4.weight"),
               steps: int = 1500, by_step: int = 900, seed: int = 0, **options) -> dict:
    from fastprox.demo import data
    from fastprox.demo.experiments import digits_mlp

    split = data.digits(seed=0)
    torch.manual_seed(seed)
    model = digits_mlp()
    reg = fastprox.Regularizer(model, "group_lasso", lam=lam, target=fastprox.SparsityTarget(
        kept=kept, by_step=by_step, measure=measure, layers=layers, **options))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    reg.attach(opt)
    g = torch.Generator().manual_seed(seed)
    step, n = 0, len(split.x_train)
    while step < steps:
        order = torch.randperm(n, generator=g)
        for i in range(0, n, 300):
            if step == steps:
                break
            idx = order[i:i + 300]
            opt.zero_grad()
            nn.functional.cross_entropy(model(split.x_train[idx]), split.y_train[idx]).backward()
            opt.step()
            step += 1
    with torch.no_grad():
        acc = float((model(split.x_test).argmax(1) == split.y_test).float().mean())
    widths = [int((m.weight.detach() != 0).any(dim=0).sum()) for m in model
              if isinstance(m, nn.Linear)]
    return dict(accuracy=acc, widths=widths, reached=reg.controller.reached)


def _fmt_reached(reached) -> str:
    return ", ".join(f"{k} {100 * v:.1f} %" for k, v in reached.items()) if reached else "-"


def _pools(options: dict) -> str:
    return "uniform" if options.get("uniform") else \
        "FLOPs by kind" if options.get("measure") == "flops" else "by kind"


def transformers_table() -> str:
    rows = ["| model | optimizer | lam | pools | reached | heads per layer | neurons per layer "
            "| loss at / after by_step | end (dense) | warnings |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for arch in ("gpt2", "llama"):
        dense = run_transformer(arch, 0.0, kept=None)["losses"][-1]
        cases = [("adamw", lam, {}) for lam in (1e-5, 1e-4, 1e-3, 1e-2)]
        cases += [("sgd", 1e-3, {}), ("adamw", 1e-3, dict(uniform=True))]
        cases += [("adamw", lam, dict(measure="flops")) for lam in (1e-4, 1e-3)]
        for optimizer, lam, options in cases:
            r = run_transformer(arch, lam, optimizer=optimizer, **options)
            heads = [v for n, v in r["widths"].items() if n.startswith("heads")]
            neurons = [v for n, v in r["widths"].items() if n.startswith("neurons")]
            b = r["by_step"]
            reached = "each layer 50.0 %" if options.get("uniform") else \
                _fmt_reached(r["reached"])
            rows.append(
                f"| {arch} | {optimizer} | {lam:g} | {_pools(options)} | {reached} | "
                f"{'-'.join(map(str, heads))} | {'-'.join(map(str, neurons))} | "
                f"{r['losses'][b - 1]:.3f} / {r['losses'][b]:.3f} | "
                f"{r['losses'][-1]:.3f} ({dense:.3f}) | {len(r['warnings'])} |")
            print(rows[-1], flush=True)
    return "\n".join(rows)


def digits_table() -> str:
    rows = ["| target | lam | seed | reached | widths (64-40-20) | test acc. |",
            "|---|---|---|---|---|---|"]
    cases = [(dict(kept=0.25), lam, seed) for lam in (1e-5, 1e-3, 1e-2) for seed in (0, 1)]
    cases += [(dict(kept=0.25, measure="flops", layers=None), 1e-3, seed) for seed in (0, 1)]
    cases += [(dict(kept=0.1, measure="flops", layers=None), 1e-3, 0),
              (dict(kept=0.1, measure="flops", layers=None, min_kept=0.15), 1e-3, 0)]
    for options, lam, seed in cases:
        r = run_digits(lam=lam, seed=seed, **options)
        label = ", ".join(f"{k}={v}" for k, v in options.items())
        rows.append(f"| {label} | {lam:g} | {seed} | {_fmt_reached(r['reached'])} | "
                    f"{'-'.join(map(str, r['widths']))} | {100 * r['accuracy']:.1f} % |")
        print(rows[-1], flush=True)
    return "\n".join(rows)


def scratch_table(seeds: int = 6) -> str:
    """The demo's two DIGITS targets (25 % of hidden units, 25 % of FLOPs; AdamW lr 1e-3, 300
    epochs) from several seeds, each beside its widths trained from scratch (three inits)."""
    from fastprox.demo import experiments as ex

    split = ex.load("digits", 0)
    epochs = ex.SCHEDULES["default"].epochs("digits")
    rows = ["| target | seed | widths | pruned while training | from scratch (3 inits) |",
            "|---|---|---|---|---|"]
    for name in ("gl-target-hidden", "gl-target-flops"):
        method = next(m for m in ex.METHODS if m.name == name)
        scratch = next(m for m in ex.METHODS if m.scratch_of == name)
        for seed in range(seeds):
            r = ex.run(method, split, epochs, seed=seed, progress=False)
            inits = sorted(ex.run(scratch, split, epochs, seed=seed + k, progress=False,
                                  scratch=r).metric for k in range(3))
            rows.append(f"| {method.label.split('target ')[-1]} | {seed} | "
                        f"{'-'.join(str(k) for k, _ in r.units)} | {100 * r.metric:.1f} % | "
                        f"{' / '.join(f'{100 * a:.1f}' for a in inits)} % |")
            print(rows[-1], flush=True)
    return "\n".join(rows)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", choices=("transformers", "digits", "scratch"))
    args = parser.parse_args(argv)
    start = time.perf_counter()
    table = {"transformers": transformers_table, "digits": digits_table,
             "scratch": scratch_table}[args.study]()
    print(f"\n{table}\n\n{time.perf_counter() - start:.0f} s, torch {torch.__version__}",
          file=sys.stdout)


if __name__ == "__main__":
    main()
