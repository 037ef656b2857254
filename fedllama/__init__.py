"""fedllama: federated QLoRA fine-tuning of LLaMA-family models on Flower.

One subpackage per concern (``docs/architecture.md`` has the module map and the import rules):
``data``, ``model``, ``merge``, ``wire``, ``privacy``, ``server``, ``client``, ``deploy``,
``experiments``. Importing the package has no side effects: the entry points (the ``fedllama``
command, the ServerApp and the ClientApp) call :mod:`fedllama.runtime`.
"""

__version__ = "0.1.0"
