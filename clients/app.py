"""ClientApp: a Flower message in, local QLoRA training, the encoded adapter delta out.

Per-node settings come from the SuperNode's node config (``data-path``, ``lora-rank``,
``device``, ``batch-size``, ``local-steps``) or, in simulation, ``partition-id``.
"""

from __future__ import annotations

from dataclasses import replace
from typing import cast

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedllama import progress
from fedllama.client import secagg
from fedllama.privacy.secagg import ACTIONS
from fedllama.runtime import setup_client, stay_offline

stay_offline()  # before transformers is imported, in the handlers
app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train on this node's data from the global view; reply with the encoded delta."""
    # Imported here, not at module level: in a deployment every message starts a fresh ClientApp
    # process, and secure aggregation's key, share and unmask messages need none of this (torch,
    # transformers, peft: seconds of imports per message).
    import strategies
    from fedllama.client.round import Phases, run_round
    from fedllama.client.settings import NodeSettings, client_state_path, load_split
    from fedllama.config import from_yaml
    from fedllama.merge import residual_view
    from fedllama.model.replay import round_seed
    from fedllama.wire import codecs
    from fedllama.wire.records import (
        ARRAYS,
        CONFIG,
        CONFIG_YAML,
        DP_CLIP_NORM,
        METRICS,
        NUM_EXAMPLES,
        ROUND,
        from_record,
    )

    setup_client()
    phases = Phases()
    with phases("message"):
        settings = msg.content.config_records[CONFIG]
        progress.mark_started(int(str(settings[ROUND])), context.node_id)  # a simulation's view
        node = NodeSettings.from_node_config(dict(context.node_config))
        run_cfg = from_yaml(str(settings[CONFIG_YAML]))
        cfg = node.apply(run_cfg)
        if DP_CLIP_NORM in settings:  # this round's C: it adapts under dp.adaptive_clipping
            clip_norm = float(cast(float, settings[DP_CLIP_NORM]))
            cfg = replace(cfg, dp=replace(cfg.dp, clip_norm=clip_norm))
        merge = strategies.build(run_cfg)
        global_state = from_record(msg.content.array_records[ARRAYS])
    with phases("data"):
        split = load_split(cfg, node)
    with phases("view"):
        rank = node.rank(run_cfg)
        view = merge.client_view(global_state, rank)
        residual = residual_view(merge, global_state, rank)
    server_round = int(str(settings[ROUND]))
    # the partition in a simulation, the node id in a deployment: seeds differ per client
    client_id = node.partition_id if node.partition_id is not None else context.node_id
    state_path = client_state_path(cfg, node)  # under this node's own cache-dir
    result = run_round(
        cfg, merge, view, split, server_round, client_id, rank, state_path, residual, phases
    )
    with phases("encode"):
        arrays = codecs.encode_update(
            codecs.build(cfg.wire.codec, cfg.wire.topk_fraction),
            result.encoded,
            merge.count_keys,
            weight=float(result.metrics[NUM_EXAMPLES]),
            seed=round_seed(cfg.data.seed, server_round, client_id),
            feedback=codecs.feedback_path(state_path),
        )
    metrics = MetricRecord({**result.metrics, **phases.metrics()})  # type: ignore[arg-type]
    return Message(content=RecordDict({ARRAYS: arrays, METRICS: metrics}), reply_to=msg)


# Secure aggregation (fedllama.privacy.secagg): one handler per SecAgg+ stage; the round's secrets
# live in context.state between them.


@app.train(ACTIONS["setup"])
def secagg_setup(msg: Message, context: Context) -> Message:
    """SecAgg+ stage 1: fresh key pairs for the round."""
    return secagg.client_setup(msg, context)


@app.train(ACTIONS["share"])
def secagg_share(msg: Message, context: Context) -> Message:
    """SecAgg+ stage 2: Shamir shares of this node's secrets, encrypted per neighbour."""
    return secagg.client_share(msg, context)


@app.train(ACTIONS["mask"])
def secagg_mask(msg: Message, context: Context) -> Message:
    """SecAgg+ stage 3: train exactly as :func:`train`, reply with the masked encoding."""
    return secagg.client_mask(msg, context, lambda: train(msg, context))


@app.train(ACTIONS["unmask"])
def secagg_unmask(msg: Message, context: Context) -> Message:
    """SecAgg+ stage 4: shares for the server to remove the masks of the sum."""
    return secagg.client_unmask(msg, context)
