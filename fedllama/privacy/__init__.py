"""Privacy mechanisms. ``secagg``: secure aggregation (SecAgg+), the server sees only the sum.

Protocols here take and return plain data and import no Flower app API (Flower's
``flwr.common.secure_aggregation`` primitives are fine); the Flower glue lives in
``fedllama.client.secagg`` and ``fedllama.server.secure``.
"""
