"""Benchmarks (not tests): print figures, each a ratio against a baseline measured in this run.

1. Client training step: fedllama's ``train_local`` on the model ``get_lora_model`` builds vs a
   plain transformers + peft loop (same model, LoRA, optimizer, batches). Goal: ratio >= 0.97.
2. Server merge of N adapter deltas: fedllama's server side of the summable path (running sum
   of the clients' encodings, then decode) vs a plain numpy ``acc += w * x`` loop, with
   Flower's own ``aggregate_arrayrecords`` for reference. Goal: ratio >= 1.0.

    python bench/run.py [--model smollm2-135m] [--quantization none] [--steps 6]
                        [--clients 20] [--adapter 1b]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

from fedllama import config, data, model
from fedllama.merge import SumAccumulator
from fedllama.model import adapters, train
from strategies.fedavg import FedAvg


def _time(fn: Callable[[], object], repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        gc.collect()
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def bench_client(args: argparse.Namespace) -> None:
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    cfg = config.load(
        None,
        [
            f"model.name={args.model}",
            f"model.quantization={args.quantization}",
            f"train.local_steps={args.steps}",
            f"train.batch_size={args.batch}",
            "train.max_grad_norm=1.0",
            f"data.max_seq_len={args.seq}",
        ],
    )
    lora_model, tok = model.get_lora_model(cfg)
    pool = data.demo_federation(model.cache_root(cfg.model), 400)
    examples = data.encode_all(tok, pool["hospital-b"], cfg.data)  # long answers: full sequences
    pad = int(tok.pad_token_id)
    view = adapters.get_adapter_state(lora_model)

    # The baseline: what a user would write with transformers + peft directly.
    # The same base weights (our loader: NF4 from its cache, bitsandbytes' CPU repacking off).
    plain = model.load_base(cfg.model)
    if cfg.model.quantization == "nf4":
        plain = prepare_model_for_kbit_training(plain, use_gradient_checkpointing=False)
    plain = get_peft_model(plain, LoraConfig(**cfg.lora.peft_kwargs(), task_type="CAUSAL_LM"))
    adapters.set_adapter_state(plain, view)
    rng = np.random.default_rng(0)
    batches = [
        data.collate([examples[i] for i in rng.choice(len(examples), cfg.train.batch_size)], pad)
        for _ in range(cfg.train.local_steps)
    ]
    tokens = sum(int(b["input_ids"].numel()) for b in batches)

    def plain_loop() -> None:
        params = [p for p in plain.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg.train.lr)
        plain.train()
        for b in batches:
            loss = plain(**b).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

    def ours() -> None:
        adapters.set_adapter_state(lora_model, view)
        train.train_local(lora_model, examples, cfg.train, pad, seed=0)

    ours_tokens = train.train_local(lora_model, examples, cfg.train, pad, seed=0).tokens  # warm-up
    plain_loop()  # warm-up
    t_plain, t_ours = [], []
    for _ in range(args.repeats):  # interleaved so drift hits both equally
        t_plain += _time(plain_loop, 1)
        t_ours += _time(ours, 1)
    plain_tps = tokens / statistics.median(t_plain)
    ours_tps = ours_tokens / statistics.median(t_ours)
    print(
        f"client step  model={args.model} quant={args.quantization} r={cfg.lora.r} "
        f"batch={cfg.train.batch_size} seq<={cfg.data.max_seq_len} steps={cfg.train.local_steps} "
        f"threads={torch.get_num_threads()} repeats={args.repeats}"
    )
    print(f"  plain transformers+peft loop : {plain_tps:9.1f} tokens/s")
    print(f"  fedllama train_local         : {ours_tps:9.1f} tokens/s")
    print(f"  ratio fedllama / plain       : {ours_tps / plain_tps:9.3f}   (goal >= 0.97)")


# LLaMA shapes (hidden, intermediate, layers), LoRA on all 7 linear layers.
SHAPES = {"1b": (2048, 8192, 16, 512), "8b": (4096, 14336, 32, 1024)}


def _adapter(shape: str, r: int, seed: int) -> dict[str, torch.Tensor]:
    hidden, inter, layers, kv = SHAPES[shape]
    dims = {
        "q_proj": (hidden, hidden), "k_proj": (hidden, kv), "v_proj": (hidden, kv),
        "o_proj": (hidden, hidden), "gate_proj": (hidden, inter), "up_proj": (hidden, inter),
        "down_proj": (inter, hidden),
    }  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    out = {}
    for layer in range(layers):
        for name, (n_in, n_out) in dims.items():
            prefix = f"base_model.model.model.layers.{layer}.{name}"
            out[f"{prefix}.lora_A.weight"] = torch.randn(r, n_in, generator=g)  # A: (r, in)
            out[f"{prefix}.lora_B.weight"] = torch.randn(n_out, r, generator=g)  # B: (out, r)
    return out


def bench_merge(args: argparse.Namespace) -> None:
    from flwr.app import ArrayRecord, MetricRecord, RecordDict
    from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

    # Clients differ in weight; their deltas are views of one adapter so the benchmark measures
    # merging, not the generation of N x 45 MB of random numbers.
    delta = _adapter(args.adapter, args.rank, 0)
    weights = [float(10 + i) for i in range(args.clients)]
    deltas_np = {k: v.numpy() for k, v in delta.items()}
    mb = adapters.state_bytes(delta) / 1e6

    def numpy_loop() -> None:
        acc = {k: np.zeros_like(v) for k, v in deltas_np.items()}
        for w in weights:
            for k, x in deltas_np.items():
                acc[k] += w * x
        total = sum(weights)
        for k in acc:
            acc[k] /= total

    strategy = FedAvg()
    # Clients encode (w·Δ, in parallel, each on its own machine); the server only sums the
    # encodings it receives and decodes once. Time each side.
    encoded = strategy.encode(delta, weights[0])

    def ours() -> None:
        acc = SumAccumulator()
        for _ in weights:
            acc.add(encoded)
        strategy.decode(acc.total, delta)

    def client_encode() -> None:
        strategy.encode(delta, weights[0])

    records = [
        RecordDict(
            {
                "arrays": ArrayRecord(torch_state_dict=delta),
                "metrics": MetricRecord({"num-examples": int(w)}),
            }
        )
        for w in weights[: min(len(weights), 5)]
    ]

    def flower() -> None:
        aggregate_arrayrecords(records, "num-examples")

    ours()
    numpy_loop()  # warm-up
    t_np, t_ours = [], []
    for _ in range(args.repeats):
        t_np += _time(numpy_loop, 1)
        t_ours += _time(ours, 1)
    t_flower = statistics.median(_time(flower, 1)) * len(weights) / len(records)
    np_s, ours_s = statistics.median(t_np), statistics.median(t_ours)
    t_encode = statistics.median(_time(client_encode, args.repeats))
    print(
        f"server merge  {args.clients} clients x {mb:.0f} MB ({args.adapter}-shaped r{args.rank}, "
        f"fp32) repeats={args.repeats}"
    )
    print(f"  numpy acc += w*x loop        : {np_s:7.2f} s")
    print(f"  fedllama server sum + decode : {ours_s:7.2f} s")
    print(f"  (each client's encode w*x    : {t_encode:7.2f} s, on the client)")
    print(f"  Flower aggregate_arrayrecords: {t_flower:7.2f} s (timed on {len(records)}, scaled)")
    print(f"  ratio numpy / fedllama       : {np_s / ours_s:7.3f}   (goal >= 1.0)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--quantization", default="none", choices=config.QUANTIZATIONS)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--adapter", default="1b", choices=sorted(SHAPES))
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", choices=("client", "merge"))
    args = parser.parse_args()
    if args.only != "merge":
        bench_client(args)
    if args.only != "client":
        bench_merge(args)


if __name__ == "__main__":
    main()
