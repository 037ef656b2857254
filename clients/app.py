"""ClientApp: a Flower message in, local QLoRA training, the encoded adapter delta out.

Per-node settings come from the SuperNode's node config (``data-path``, ``lora-rank``,
``device``, ``batch-size``, ``local-steps``) or, in simulation, ``partition-id``.
"""

from __future__ import annotations

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

import strategies
from fedllama import setup_logging
from fedllama.client import NodeSettings, load_split, run_round
from fedllama.config import from_yaml
from fedllama.flower import ARRAYS, CONFIG, CONFIG_YAML, METRICS, ROUND, from_record, to_record

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train on this node's data from the global view; reply with the encoded delta."""
    setup_logging()
    settings = msg.content.config_records[CONFIG]
    node = NodeSettings.from_node_config(dict(context.node_config))
    cfg = node.apply(from_yaml(str(settings[CONFIG_YAML])))
    split = load_split(cfg, node)
    merge = strategies.build(cfg.strategy.name)
    view = merge.client_view(from_record(msg.content.array_records[ARRAYS]), cfg.lora.r)
    result = run_round(
        cfg,
        merge,
        view,
        split,
        server_round=int(settings[ROUND]),  # type: ignore[call-overload]
        client_id=node.partition_id if node.partition_id is not None else -1,
    )
    content = RecordDict({ARRAYS: to_record(result.encoded), METRICS: MetricRecord(result.metrics)})
    return Message(content=content, reply_to=msg)
