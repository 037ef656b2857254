"""The client side: a node's settings and data, its training round, its SecAgg+ stages.

``settings`` and ``round`` know nothing of Flower; ``secagg`` turns Flower messages into calls
of the protocol's client (``fedllama.privacy.secagg``). ``clients/app.py`` is the ClientApp.
"""
