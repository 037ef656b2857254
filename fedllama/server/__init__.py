"""The server side: the round loop, the aggregators, evaluation and the run directory.

``loop``, ``strategy``, ``replies``, ``aggregate``, ``secure`` and ``inprocess`` face Flower (they
take a ``Grid``); ``checkpoint``, ``metrics`` and ``evaluator`` do not. Nothing is imported here,
so reading a run directory does not import Flower.
"""
