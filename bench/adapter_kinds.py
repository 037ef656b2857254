"""Client step time of each adapter kind against LoRA, measured in the same process.

Each kind trains the demo model (SmolLM2-135M, NF4, the demo config) on client 0's training
examples from its fresh adapter: one warm-up step, then ``--steps`` timed optimizer steps,
repeated ``--repeats`` times with the kinds interleaved (so a slower minute of a shared machine
falls on every kind alike); the median per kind is printed with its ratio to LoRA's, with the
trainable parameters and the bytes a client sends per round (float32, ``wire.codec=none``).

    .venv/bin/python bench/adapter_kinds.py [--steps 6] [--repeats 3] [--threads 1]
        [--kinds lora,dora,llama-adapter,ia3] [overrides ...]

Assumptions beside the numbers: the demo's batch (4 examples, up to 96 tokens), one CPU thread
per client as a simulated client runs (``--threads``); the time is the optimizer steps alone
(forward, backward, AdamW), not data loading, evaluation or the wire.
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import replace
from pathlib import Path

import torch

from fedllama import config as config_lib
from fedllama.model import adapters, baseline, train
from fedllama.runtime import quiet_libraries, stay_offline

DEMO = Path(__file__).resolve().parent.parent / "simulations" / "configs" / "demo.yaml"
KINDS = {
    "lora": [],
    "dora": ["lora.use_dora=true"],
    "llama-adapter": ["adapter.kind=llama-adapter"],
    "ia3": ["adapter.kind=ia3"],
    "prompt-tuning": ["adapter.kind=prompt-tuning"],
    "prefix-tuning": ["adapter.kind=prefix-tuning"],
}


def step_seconds(run: baseline.Setup, steps: int) -> float:
    """Seconds per optimizer step over ``steps`` steps from the fresh adapter (after one
    untimed warm-up step)."""
    examples = run.encode(run.federation.clients[0].train)
    run.reset()
    warm = replace(run.cfg.train, local_steps=1)
    train.train_local(run.model, examples, warm, run.pad_id, seed=0)
    run.reset()
    timed = replace(run.cfg.train, local_steps=steps)
    result = train.train_local(run.model, examples, timed, run.pad_id, seed=1)
    return result.seconds / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--kinds", default="lora,dora,llama-adapter,ia3")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the demo config")
    args = parser.parse_args()
    kinds = args.kinds.split(",")
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or kinds[0] != "lora":
        parser.error(f"--kinds: start with lora, then any of {', '.join(KINDS)} (got {unknown})")
    stay_offline()
    quiet_libraries()
    torch.set_num_threads(args.threads)
    runs = {k: baseline.setup(config_lib.load(DEMO, [*args.overrides, *KINDS[k]])) for k in kinds}
    times: dict[str, list[float]] = {k: [] for k in kinds}
    for repeat in range(args.repeats):
        for kind in kinds:
            times[kind].append(step_seconds(runs[kind], args.steps))
            print(f"repeat {repeat + 1}/{args.repeats} {kind}: {times[kind][-1] * 1e3:.0f} ms/step")
    lora = statistics.median(times["lora"])
    print(
        f"\nclient step time, median of {args.repeats} x {args.steps} steps, {args.threads} "
        f"thread(s), batch {runs['lora'].cfg.train.batch_size}, demo model:"
    )
    for kind in kinds:
        state = adapters.get_adapter_state(runs[kind].model)
        params = sum(v.numel() for v in state.values())
        median = statistics.median(times[kind])
        print(
            f"  {kind:14s} {median * 1e3:6.0f} ms/step  {median / lora:5.2f}x LoRA  "
            f"{params:9,d} trained values  {params * 4:11,d} B/client/round up (float32)"
        )


if __name__ == "__main__":
    main()
