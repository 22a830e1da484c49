"""LoRA adapters of a frozen GPT-2 generated from a task's text description (Text-to-LoRA).

A frozen text encoder embeds a task's description, and a hypernetwork generates from it PEFT
LoRA adapters of a frozen GPT-2 (rank 8 on ``c_attn``, ``c_proj``, ``c_fc``):
``HyperNetwork(..., include="*lora_*", base="frozen")``. Nothing is downloaded: the GPT-2 is
built from ``GPT2Config`` and "pretrained" here; the encoder is a small random-init
``BertModel`` (``build_encoder``) with the word-level tokenizer below. A pretrained encoder
replaces both in ``one_seed`` (the rest reads only ``tokenizer(texts, padding=True,
return_tensors="pt")`` and the encoder's ``hidden_states``)::

    tokenizer = AutoTokenizer.from_pretrained("sentence-transformers/all-MiniLM-L6-v2")
    encoder = AutoModel.from_pretrained("sentence-transformers/all-MiniLM-L6-v2").eval()

Tasks. Over 16 tokens, a token's kind is its residue mod 4 (red, green, blue, gold); a task
adds a step of 1 to 4 after each kind (mod 16), each token uniformly random with probability
0.1: 256 tasks, described as "red tokens add three , green tokens add one , blue tokens add
four , gold tokens add two". 25 are held out from the hypernetwork: new combinations of words
seen in every place. The GPT-2 is pretrained on all tasks, so it knows a token's 4 candidate
successors, not which one a task picks. (Were it unsure among 15, its logits would stay small,
and a LoRA cannot sharpen them: ``ln_f`` and the tied embeddings, which bound them, are frozen.)

Embeddings are precomputed once per description: the encoder's mean-pooled token embeddings and
last hidden states, standardized by the training descriptions' statistics. The steps differ
only in their place in the text, and a random BERT at its usual init (0.02) is close to a bag
of words (the nearest two descriptions 0.02-0.04 of the median distance apart); at 0.2 it
encodes the order better (0.18-0.26 over seeds, printed each run); a pretrained one does by
training. The hypernetwork generates one adapter per description (``per_sample``);
``torchhyper.per_sample_call`` runs the GPT-2 with one adapter per task in one call. Held out,
the generated adapters are compared with the base model and a LoRA fitted directly per task.
One generated adapter is exported with ``torchhyper.adapters.save_adapter`` and loaded by
``peft.PeftModel.from_pretrained`` on a copy of the base model; the largest logit difference
is printed and stored.

    python examples/text_adapters.py --out=runs/text_adapters

Writes ``text_adapters.png`` (held-out loss per method; training curves), ``metrics.json`` and
the exported adapter, ``adapter/``.

References:
    | Text-to-LoRA: Instant Transformer Adaption (Charakorn et al., ICML 2025)
    | https://arxiv.org/abs/2506.06105
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from torch import Tensor, nn
from torch.func import functional_call
from tqdm import tqdm
from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel

from torchhyper import HyperNetwork, per_sample_call
from torchhyper.adapters import save_adapter

P = 16  # tokens of the task sequences
NOISE = 0.1  # each token is uniformly random with this probability
_HIT = 1 - NOISE + NOISE / P
FLOOR = -(_HIT * math.log(_HIT) + (P - 1) * NOISE / P * math.log(NOISE / P))  # best loss: 0.565
KINDS = ("red", "green", "blue", "gold")  # a token's kind: its residue mod 4
STEPS = ("one", "two", "three", "four")  # what a task adds after each kind
TASKS = torch.cartesian_prod(*[torch.arange(1, 5)] * 4)  # (256, 4): the step after each kind


def describe(task: Tensor) -> str:
    return " , ".join(f"{k} tokens add {STEPS[int(s) - 1]}" for k, s in zip(KINDS, task))


def sample(tasks: Tensor, n: int, length: int, gen: torch.Generator) -> Tensor:
    """``n`` sequences of ``length`` tokens for each task ``(S, 4)``: ``(S, n, length)``."""
    tokens = [torch.randint(0, P, (len(tasks), n), generator=gen)]
    for _ in range(length - 1):
        x = tokens[-1]
        follow = (x + tasks.gather(1, x % 4)) % P
        noise = torch.rand(x.shape, generator=gen) < NOISE
        tokens.append(torch.where(noise, torch.randint(0, P, x.shape, generator=gen), follow))
    return torch.stack(tokens, dim=-1)


class WordTokenizer:
    """Splits on spaces; ids ``[PAD]`` 0, ``[CLS]`` 1, ``[UNK]`` 2, then the words of ``texts``
    sorted. Called like a transformers tokenizer: ``tokenizer(texts, padding=True,
    return_tensors="pt")`` gives ``input_ids`` and ``attention_mask``, ``(S, T)`` each."""

    def __init__(self, texts: list[str]) -> None:
        words = sorted({w for t in texts for w in t.split()})
        self.vocab = {w: i for i, w in enumerate(["[PAD]", "[CLS]", "[UNK]", *words])}

    def __call__(self, texts: list[str], padding: bool = True, return_tensors: str = "pt"):
        ids = [[1] + [self.vocab.get(w, 2) for w in t.split()] for t in texts]
        width = max(map(len, ids))
        mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i in ids])
        return {"input_ids": torch.tensor([i + [0] * (width - len(i)) for i in ids]),
                "attention_mask": mask}  # fmt: skip


def build_encoder(tokenizer: WordTokenizer) -> BertModel:
    """A small random-init BERT, frozen; its init is larger than BERT's 0.02 so that its random
    features encode word order (see the module docstring)."""
    config = BertConfig(vocab_size=len(tokenizer.vocab), hidden_size=64, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=128, max_position_embeddings=64,
                        initializer_range=0.2)  # fmt: skip
    return BertModel(config).eval().requires_grad_(False)


@torch.no_grad()
def embed(encoder: nn.Module, tokenizer, texts: list[str]) -> Tensor:
    """Mean-pooled token embeddings and last hidden states, concatenated: ``(S, 2 E)``."""
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    states = encoder(**batch, output_hidden_states=True).hidden_states
    mask = batch["attention_mask"][..., None].float()
    return torch.cat([(h * mask).sum(1) / mask.sum(1) for h in (states[0], states[-1])], -1)


def lm_metrics(logits: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor]:
    """Next-token cross-entropy and accuracy, one per task: ``(S,)`` each."""
    pred, target = logits[..., :-1, :], tokens[..., 1:]
    ce = F.cross_entropy(pred.flatten(0, -2), target.flatten(), reduction="none")
    acc = (pred.argmax(-1) == target).float()
    return ce.view(target.shape).flatten(1).mean(1), acc.flatten(1).mean(1)


def build_base(args: argparse.Namespace) -> GPT2LMHeadModel:
    quiet = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, loss_type="ForCausalLM")
    if args.gpt2_small:  # GPT-2 small's architecture, 124M (its 50257-token vocabulary)
        return GPT2LMHeadModel(GPT2Config(**quiet))
    config = GPT2Config(vocab_size=P, n_positions=32, n_embd=args.width, n_layer=args.layers,
                        n_head=4, bos_token_id=0, eos_token_id=0, **quiet)  # fmt: skip
    return GPT2LMHeadModel(config)


def adam_step(optimizer: torch.optim.Optimizer, loss: Tensor, bar) -> float:
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    bar.update()
    return loss.item()


def pretrain(model: GPT2LMHeadModel, args, gen, bar) -> list[float]:
    """Adam on sequences of random tasks of the whole family: the "pretrained" model."""
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    curve = []
    for _ in range(args.pretrain_steps):
        chosen = TASKS[torch.randint(0, len(TASKS), (args.batch,), generator=gen)]
        x = sample(chosen, 1, args.length, gen)[:, 0]
        curve.append(adam_step(optimizer, model(input_ids=x, labels=x).loss, bar))
    return curve


def run_adapters(peft_model: nn.Module, params: dict[str, Tensor], tokens: Tensor):
    """The frozen model with one adapter per task: ``params`` ``(S, *)``, tokens ``(S, n, L)``."""
    return lm_metrics(per_sample_call(peft_model, params, (tokens,)).logits, tokens)


def evaluate(peft_model, params, tokens) -> dict[str, float]:
    with torch.no_grad():
        if params is None:  # the base model: PEFT's zero lora_B leaves it unchanged
            logits = peft_model(input_ids=tokens.flatten(0, 1)).logits
            ce, acc = lm_metrics(logits.unflatten(0, tokens.shape[:2]), tokens)
        else:
            ce, acc = run_adapters(peft_model, params, tokens)
    return {"loss": ce.mean().item(), "accuracy": acc.mean().item()}


def train_hypernetwork(peft_model, features, tasks, held, args, gen, bar):
    """Trains on the training descriptions ``features`` ``(S, D)`` of ``tasks``; ``held`` =
    (features, queries) of the held-out ones, evaluated every ``--eval_every`` steps."""
    hyper = HyperNetwork(features.shape[1], [args.hidden], peft_model, include="*lora_*",
                         base="frozen")  # fmt: skip
    optimizer = torch.optim.Adam(hyper.parameters(), lr=args.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / args.steps))
    )

    def held_loss() -> float:
        with torch.no_grad():
            return evaluate(peft_model, hyper.eval().per_sample(held[0]), held[1])["loss"]

    curve, held_curve = [], [(0, held_loss())]  # the update starts at zero: the base model's
    for step in range(1, args.steps + 1):
        hyper.train()
        ids = torch.randint(0, len(tasks), (args.tasks_per_step,), generator=gen)
        queries = sample(tasks[ids], args.queries, args.length, gen)
        loss = run_adapters(peft_model, hyper.per_sample(features[ids]), queries)[0].mean()
        curve.append(adam_step(optimizer, loss, bar))
        schedule.step()
        if step % args.eval_every == 0 or step == args.steps:
            held_curve.append((step, held_loss()))
    return hyper.eval(), curve, held_curve


def fit_lora(peft_model, tasks, args, gen, bar):
    """One LoRA per task, fitted directly on fresh sequences (all tasks in one batched call;
    Adam is per-element, so the same as separate fits)."""
    own = {n: p for n, p in peft_model.named_parameters() if "lora_" in n}
    params = {n: p.detach().expand(len(tasks), *p.shape).clone().requires_grad_()
              for n, p in own.items()}  # fmt: skip
    optimizer = torch.optim.Adam(params.values(), lr=args.lora_lr)
    curve = []
    for _ in range(args.lora_steps):
        loss = run_adapters(peft_model, params, sample(tasks, args.queries, args.length, gen))[0]
        curve.append(adam_step(optimizer, loss.mean(), bar))
    return {n: p.detach() for n, p in params.items()}, curve


def one_seed(seed: int, args: argparse.Namespace, bar, export_to: Path | None) -> dict:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(TASKS), generator=gen)
    held_tasks, train_tasks = TASKS[order[: args.held_out]], TASKS[order[args.held_out :]]
    texts = [describe(t) for t in TASKS[order]]

    tokenizer = WordTokenizer(texts)
    encoder = build_encoder(tokenizer)  # frozen; pretrained instead: see the module docstring
    raw = embed(encoder, tokenizer, texts)
    mean, std = raw[args.held_out :].mean(0), raw[args.held_out :].std(0)
    features = (raw - mean) / (std + 1e-6)  # standardized by the training descriptions'
    distance = torch.pdist(features)  # are the descriptions told apart? (module docstring)
    separation = (distance.min() / distance.median()).item()
    held_features, train_features = features[: args.held_out], features[args.held_out :]

    model = build_base(args)
    curves = {"pretrain": pretrain(model, args, gen, bar)}
    fresh = copy.deepcopy(model)  # the base model alone, for PEFT's loader
    lora = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0,
                      target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)  # fmt: skip
    peft_model = get_peft_model(model, lora).requires_grad_(False).eval()

    eval_gen = torch.Generator().manual_seed(10_000 + seed)
    held_queries = sample(held_tasks, args.eval_queries, args.length, eval_gen)
    hyper, curves["hypernetwork"], held_curve = train_hypernetwork(
        peft_model, train_features, train_tasks, (held_features, held_queries), args, gen, bar
    )
    direct, curves["direct LoRA"] = fit_lora(peft_model, held_tasks, args, gen, bar)
    with torch.no_grad():
        generated = hyper.per_sample(held_features)
    # Do different descriptions give different adapters? Nearest two updates over the mean norm.
    own = dict(peft_model.named_parameters())
    updates = torch.cat([(v - own[k]).flatten(1) for k, v in generated.items()], 1)
    spread = (torch.pdist(updates).min() / updates.norm(dim=1).mean()).item()
    result = {
        "held_out": {
            "base model": evaluate(peft_model, None, held_queries),
            "direct LoRA": evaluate(peft_model, direct, held_queries),
            "generated (text)": evaluate(peft_model, generated, held_queries),
        },
        "embedding_min_over_median_distance": separation,
        "adapter_min_distance_over_norm": spread,
        "held_out_curve": held_curve,
        "curves": curves,
    }
    if export_to is not None:  # export one held-out adapter; PEFT's own loader reads it back
        one = {k: v[0] for k, v in generated.items()}
        folder = save_adapter(peft_model, one, export_to, overwrite=True)
        loaded = PeftModel.from_pretrained(fresh, folder).eval()
        with torch.no_grad():
            want = functional_call(peft_model, one, (held_queries[0],)).logits
            diff = (loaded(held_queries[0]).logits - want).abs().max().item()
            # How much the adapter changes the logits, for scale (lora_B = 0: the base model).
            change = (want - peft_model(held_queries[0]).logits).abs().max().item()
        result["export"] = {"folder": str(folder), "description": texts[0], "max_abs_diff": diff,
                            "max_abs_change_from_base": change}  # fmt: skip
    return result


def summarize(runs: list[dict]) -> dict:
    out = {}
    for method in runs[0]["held_out"]:
        for key in ("loss", "accuracy"):
            values = [r["held_out"][method][key] for r in runs]
            out.setdefault(method, {})[key] = statistics.mean(values)
            out[method][f"{key}_std"] = statistics.pstdev(values)
    return out


def smooth(values: list[float], width: int = 20) -> list[float]:
    return [statistics.mean(values[max(0, i - width + 1) : i + 1]) for i in range(len(values))]


METHOD_COLORS = {"base model": "C0", "direct LoRA": "C1", "generated (text)": "C3"}


def plot(summary: dict, run: dict, path: Path) -> None:
    plt.rcParams.update({"font.size": 12})
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(12, 4.5), width_ratios=[1, 1.3])
    held = summary["held_out"]
    names, means = list(held), [held[n]["loss"] for n in held]
    errors = [held[n]["loss_std"] for n in names]
    ax0.barh(names, means, xerr=errors, color=[METHOD_COLORS[n] for n in names])
    ax0.axvline(FLOOR, color="k", ls=":", lw=1.2, label=f"noise floor {FLOOR:.3f}")
    for i, (m, e) in enumerate(zip(means, errors)):
        ax0.text(m + e, i, f"  {m:.3f}", va="center")
    ax0.invert_yaxis()
    ax0.set_xlim(0, max(means) * 1.35)
    ax0.set_xlabel("next-token loss (nats)")
    seeds = summary["seeds"]
    ax0.set_title(f"held-out descriptions ({seeds} seed{'s' if seeds > 1 else ''})")
    ax0.legend(loc="lower right", fontsize=10)
    ax1.plot(smooth(run["curves"]["hypernetwork"]), color="C3", alpha=0.5,
             label="hypernetwork, training descriptions")  # fmt: skip
    steps, losses = zip(*run["held_out_curve"])
    ax1.plot(steps, losses, "o-", color="C3", label="hypernetwork, held-out descriptions")
    for name in ("base model", "direct LoRA"):
        ax1.axhline(run["held_out"][name]["loss"], color=METHOD_COLORS[name], ls="--",
                    label=f"{name}, held-out")  # fmt: skip
    ax1.axhline(FLOOR, color="k", ls=":", lw=1.2)
    ax1.set_xlabel("hypernetwork step")
    ax1.set_ylabel("next-token loss (nats)")
    ax1.set_title("training (seed 0; training curve smoothed)")
    ax1.legend(fontsize=10, loc="center right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=800, help="hypernetwork steps")
    parser.add_argument("--pretrain_steps", type=int, default=400)
    parser.add_argument("--lora_steps", type=int, default=200, help="direct LoRA steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seeds", type=int, default=1, help="seeds seed, seed + 1, ...")
    parser.add_argument("--width", type=int, default=64, help="GPT-2 n_embd")
    parser.add_argument("--layers", type=int, default=2, help="GPT-2 n_layer")
    parser.add_argument(
        "--gpt2-small", action="store_true", help="GPT2Config(), 124M; ignores --width, --layers"
    )
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank")
    parser.add_argument("--hidden", type=int, default=128, help="hypernetwork MLP width")
    parser.add_argument("--length", type=int, default=12, help="tokens per sequence")
    parser.add_argument("--held_out", type=int, default=25, help="descriptions held out")
    parser.add_argument("--queries", type=int, default=8, help="sequences per task per step")
    parser.add_argument("--eval_queries", type=int, default=32)
    parser.add_argument("--eval_every", type=int, default=100)
    parser.add_argument("--tasks_per_step", type=int, default=16)
    parser.add_argument("--batch", type=int, default=128, help="pretraining sequences per step")
    parser.add_argument("--lr", type=float, default=1e-3, help="hypernetwork learning rate")
    parser.add_argument("--lora_lr", type=float, default=1e-2, help="direct LoRA rate")
    parser.add_argument("--threads", type=int, default=1, help="small models run fastest on one")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, for the smoke test")
    parser.add_argument("--out", type=Path, default=Path("runs/text_adapters"))
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps, args.pretrain_steps, args.lora_steps, args.eval_every = 4, 3, 3, 2
        args.width, args.batch, args.eval_queries, args.held_out = 16, 8, 4, 4
        args.tasks_per_step, args.queries, args.length, args.hidden = 2, 2, 6, 16
    torch.set_num_threads(args.threads)

    start = time.time()
    per_seed = args.pretrain_steps + args.steps + args.lora_steps
    args.out.mkdir(parents=True, exist_ok=True)
    with tqdm(total=args.seeds * per_seed, desc="text adapters") as bar:
        runs = [one_seed(args.seed + s, args, bar, args.out / "adapter" if s == 0 else None)
                for s in range(args.seeds)]  # fmt: skip
    summary = {"seeds": args.seeds, "held_out": summarize(runs)}
    for key in ("embedding_min_over_median_distance", "adapter_min_distance_over_norm"):
        summary[key] = min(r[key] for r in runs)
    held = summary["held_out"]
    summary["generated_beats_base"] = held["generated (text)"]["loss"] < held["base model"]["loss"]
    summary["export"] = runs[0]["export"]
    summary["seconds"] = time.time() - start
    for name, m in held.items():
        print(f"held out, {name:16s} loss {m['loss']:.4f} +- {m['loss_std']:.4f}  "
              f"acc {m['accuracy']:.3f}")  # fmt: skip
    print(f"nearest two descriptions: {summary['embedding_min_over_median_distance']:.3f} of the "
          f"median distance; nearest two adapters: {summary['adapter_min_distance_over_norm']:.3f} "
          "of the mean update norm")  # fmt: skip
    export = summary["export"]
    print(f"exported {export['description']!r} to {export['folder']}; PeftModel.from_pretrained "
          f"logits differ by {export['max_abs_diff']:.2e} at most (the adapter changes them by "
          f"{export['max_abs_change_from_base']:.2f})")  # fmt: skip

    plot(summary, runs[0], args.out / "text_adapters.png")
    metrics = summary | {
        "held_out_curve_seed0": runs[0]["held_out_curve"],
        "curves_seed0": runs[0]["curves"],
        "config": vars(args) | {"out": str(args.out)},
    }
    tmp = args.out / "metrics.json.tmp"
    tmp.write_text(json.dumps(metrics, indent=2))
    os.replace(tmp, args.out / "metrics.json")
    print(f"wrote {args.out}")
    return metrics


if __name__ == "__main__":
    main()
