"""The server's evaluation of global adapters on the global eval set, with its own model copy."""

from __future__ import annotations

from fedllama import data, model
from fedllama.config import Config
from fedllama.merge import (
    AdapterState,
    MergeStrategy,
    residual_view,
)
from fedllama.model import adapters, train


class Evaluator:
    """Scores global adapters on the global eval split with the server's own model copy."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.model, self.tokenizer = model.get_lora_model(cfg)
        pool = data.load_pool(cfg.data, model.cache_root(cfg.model))
        held, _ = data.hold_out_global(pool, cfg.data.global_eval_size, cfg.data.seed)
        self.examples = data.encode_all(self.tokenizer, held, cfg.data)

    def initial_adapter(self) -> AdapterState:
        """A fresh adapter, peft's init (LoRA: A random, B zero) drawn from ``data.seed``."""
        return model.fresh_adapter(self.model, self.cfg.data.seed)

    def __call__(self, adapter: AdapterState, residual: AdapterState | None = None) -> float:
        if not self.cfg.server.evaluate:
            return float("nan")
        model.set_residual(self.model, residual or {}, self.cfg)
        adapters.set_adapter_state(self.model, adapter)
        return train.evaluate(
            self.model,
            self.examples,
            self.cfg.train.eval_batch_size,
            int(self.tokenizer.pad_token_id),
        )


def server_view(
    cfg: Config, merge: MergeStrategy, global_state: AdapterState
) -> tuple[AdapterState, AdapterState]:
    """What the evaluator scores: the view at ``lora.r`` and its residual."""
    return merge.client_view(global_state, cfg.lora.r), residual_view(
        merge, global_state, cfg.lora.r
    )
