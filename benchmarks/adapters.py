"""Generated LoRA adapters at GPT-2 small's size: build, train, export, and one batch of adapters.

The model is GPT-2 small's configuration (``GPT2Config()``: 124 M parameters, random init, no
download) with PEFT LoRA r=8 on every attention and MLP projection (``c_attn``, ``c_proj``,
``c_fc``: 1.18 M LoRA values). The hypernetwork is the seed constructor on a set of 16 feature
vectors, ``HyperNetwork(64, [64, 64, 96], model, include="*lora_*", base="frozen")``: the
default head, a frozen base (the adapter's own init, zero ``lora_B``). What is measured:

* construction: seconds, and the resident memory it adds, against the model's own;
* a training step (forward, backward, Adam) on B=16 sequences of 64 tokens, the hypernetwork
  generating one adapter from one set, against training one LoRA directly: times interleaved in
  one process (the median of the per-round ratios), the peak memory of each in a fresh process;
* export: ``torchhyper.adapters.save_adapter`` of one generated adapter, its seconds, the folder's
  bytes against the LoRA tensors', and its peak memory against the model's;
* one batch of B=16 sequences in which every sequence has its own adapter
  (``per_sample_call``), forward and backward, against the same batch with one shared adapter,
  and its largest difference from a loop over the sequences.

    python benchmarks/adapters.py                     # about 10 minutes on 2 cores
    python benchmarks/adapters.py --layers=2          # a smaller model, for a quick look
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from record import header, reset_peak, resident_mb  # benchmarks/record.py
from torch.func import functional_call

from torchhyper import HyperNetwork, per_sample_call
from torchhyper.adapters import save_adapter

BATCH, TOKENS = 16, 64


def build(layers: int):
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=layers)).eval()
    lora = LoraConfig(
        r=8, lora_alpha=16, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True,
        lora_dropout=0.0,
    )  # fmt: skip
    return get_peft_model(model, lora).eval().requires_grad_(False)


def hypernetwork(model) -> HyperNetwork:
    return HyperNetwork(64, [64, 64, 96], model, include="*lora_*", base="frozen")


def batch(vocab: int, generator: torch.Generator):
    tokens = torch.randint(0, vocab, (BATCH, TOKENS), generator=generator)
    return tokens, torch.randn(16, 64, generator=generator)  # the sequences, a set to read


def loss_of(model, params, tokens) -> torch.Tensor:
    logits = functional_call(model, params, (tokens,)).logits
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten()
    )


def child(part: str, layers: int, steps: int) -> dict:
    """One measurement in this (fresh) process: peak memory is per process."""
    torch.set_num_threads(torch.get_num_threads())
    before = reset_peak()
    model = build(layers)
    model_mb = resident_mb("VmHWM") - before
    g = torch.Generator().manual_seed(1)
    out: dict = {"model_mb": model_mb}
    if part == "build":
        start = reset_peak()
        t = time.perf_counter()
        hyper = hypernetwork(model)
        out["build_s"] = time.perf_counter() - t
        out["build_mb"] = resident_mb("VmHWM") - start
        out["hypernetwork_params"] = sum(p.numel() for p in hyper.parameters() if p.requires_grad)
        out["head"] = type(hyper.head).__name__
        out["reason"] = hyper.head.reason
        out["lora_values"] = hyper.numel
        return out
    if part in ("hypernetwork", "direct"):
        if part == "hypernetwork":
            hyper = hypernetwork(model)
            optimizer = torch.optim.Adam(hyper.parameters(), lr=1e-3)
        else:
            lora = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()
                    if "lora_" in n}  # fmt: skip
            optimizer = torch.optim.Adam(lora.values(), lr=1e-3)
        data = [batch(model.config.vocab_size, g) for _ in range(steps + 1)]
        start = reset_peak()
        for tokens, context in data:
            params = hyper(context) if part == "hypernetwork" else lora
            loss = loss_of(model, params, tokens)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        out["step_mb"] = resident_mb("VmHWM") - start
        return out
    if part == "interleaved":  # the step times, alternating the two in one process
        hyper = hypernetwork(model)
        lora = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()
                if "lora_" in n}  # fmt: skip
        opts = {
            "hypernetwork": torch.optim.Adam(hyper.parameters(), lr=1e-3),
            "direct": torch.optim.Adam(lora.values(), lr=1e-3),
        }
        times: dict[str, list[float]] = {"hypernetwork": [], "direct": []}
        for _ in range(steps + 1):  # the first round warms up
            tokens, context = batch(model.config.vocab_size, g)
            for name, optimizer in opts.items():
                t = time.perf_counter()
                params = hyper(context) if name == "hypernetwork" else lora
                loss = loss_of(model, params, tokens)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                times[name].append(time.perf_counter() - t)
        h, d = times["hypernetwork"][1:], times["direct"][1:]
        out.update(hyper_s=statistics.median(h), direct_s=statistics.median(d))
        out["ratio"] = statistics.median(a / b for a, b in zip(h, d))
        return out
    if part == "export":
        hyper = hypernetwork(model)
        with torch.no_grad():
            params = {k: v.detach() for k, v in hyper(batch(model.config.vocab_size, g)[1]).items()}
        folder = Path(tempfile.mkdtemp()) / "adapter"
        start = reset_peak()
        t = time.perf_counter()
        save_adapter(model, params, folder)
        out["export_s"] = time.perf_counter() - t
        out["export_mb"] = resident_mb("VmHWM") - start
        out["folder_bytes"] = sum(f.stat().st_size for f in folder.iterdir())
        out["weights_bytes"] = (folder / "adapter_model.safetensors").stat().st_size
        out["tensor_bytes"] = sum(v.numel() * v.element_size() for v in params.values())
        return out
    raise ValueError(f"unknown part {part!r}")


def multi_adapter(layers: int, rounds: int) -> dict:
    """B sequences, each with its own adapter, against one shared adapter: forward + backward."""
    model = build(layers)
    g = torch.Generator().manual_seed(2)
    lora = {n: p.detach() for n, p in model.named_parameters() if "lora_" in n}
    shared = {
        n: (torch.randn(p.shape, generator=g) * 0.02).requires_grad_() for n, p in lora.items()
    }
    own = {
        n: (v.detach() + 0.01 * torch.randn(BATCH, *v.shape, generator=g)).requires_grad_()
        for n, v in shared.items()
    }  # fmt: skip
    tokens = torch.randint(0, model.config.vocab_size, (BATCH, TOKENS), generator=g)

    def one() -> None:
        functional_call(model, shared, (tokens,)).logits.float().square().mean().backward()

    def each() -> None:
        logits = per_sample_call(model, own, (tokens.unsqueeze(1),)).logits
        logits.float().square().mean().backward()

    one(), each()  # warm up
    times: dict[str, list[float]] = {"shared": [], "own": []}
    for _ in range(rounds):  # interleaved
        for name, f in (("shared", one), ("own", each)):
            t = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t)
    with torch.no_grad():
        few = {k: v[:3] for k, v in own.items()}
        batched = per_sample_call(model, few, (tokens[:3].unsqueeze(1),)).logits
        loop = [
            functional_call(model, {k: v[i] for k, v in few.items()}, (tokens[i : i + 1],)).logits
            for i in range(3)
        ]
        diff = max((batched[i] - loop[i]).abs().max().item() for i in range(3))
    ratios = [a / b for a, b in zip(times["own"], times["shared"])]
    return {
        "shared_s": statistics.median(times["shared"]),
        "own_s": statistics.median(times["own"]),
        "ratio": statistics.median(ratios),
        "max_diff_vs_loop": diff,
    }


def run_child(part: str, args: argparse.Namespace) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, f"--child={part}", f"--layers={args.layers}",
         f"--steps={args.steps}"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12, help="GPT-2 small has 12")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps per variant")
    parser.add_argument("--rounds", type=int, default=3, help="multi-adapter: timed rounds")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.layers, args.steps)))
        return
    print(f"# Generated LoRA adapters, GPT-2 small's configuration ({args.layers} layers)\n")
    print(header())
    built = run_child("build", args)
    hyper, direct = run_child("hypernetwork", args), run_child("direct", args)  # memory
    steps = run_child("interleaved", args)  # time
    export = run_child("export", args)
    multi = multi_adapter(args.layers, args.rounds)
    model_mb = built["model_mb"]
    memory = (model_mb + hyper["step_mb"]) / (model_mb + direct["step_mb"])
    print(
        f"Model: {model_mb:.0f} MB resident; LoRA r=8 on c_attn, c_proj, c_fc: "
        f"{built['lora_values']:,} values. Hypernetwork: {built['head']} "
        f"({built['reason']}), {built['hypernetwork_params']:,} trained parameters.\n"
    )
    rows = [
        ("construction", f"{built['build_s']:.2f} s", f"+{built['build_mb']:.0f} MB "
         f"({built['build_mb'] / model_mb:.2f}x the model)"),
        ("training step, hypernetwork (one adapter from one set)", f"{steps['hyper_s']:.2f} s",
         f"peak +{hyper['step_mb']:.0f} MB"),
        ("training step, one LoRA directly", f"{steps['direct_s']:.2f} s",
         f"peak +{direct['step_mb']:.0f} MB"),
        ("step: hypernetwork / one LoRA (interleaved)", f"{steps['ratio']:.2f}x",
         f"memory, model + step: {memory:.2f}x the direct LoRA's"),
        ("export (save_adapter)", f"{export['export_s']:.2f} s",
         f"peak +{export['export_mb']:.0f} MB ({(model_mb + export['export_mb']) / model_mb:.3f}x "
         "the model's memory)"),
        ("adapter folder", f"{export['folder_bytes'] / 1e6:.2f} MB",
         f"weights {export['weights_bytes'] / export['tensor_bytes']:.3f}x the LoRA tensors' "
         f"{export['tensor_bytes'] / 1e6:.2f} MB"),
        (f"batch of {BATCH} x {TOKENS} tokens, one adapter each (per_sample_call), fwd + bwd",
         f"{multi['own_s']:.2f} s", f"{multi['ratio']:.2f}x one shared adapter "
         f"({multi['shared_s']:.2f} s); max |diff| vs a loop {multi['max_diff_vs_loop']:.1e}"),
    ]  # fmt: skip
    print("| what | time | memory / ratio |\n| --- | --- | --- |")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
