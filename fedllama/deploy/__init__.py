"""Deployment over gRPC: credentials (CA, TLS certificate, SuperNode keys), the SuperLink and
SuperNode command lines, key registration, and the ``credentials``/``deploy`` subcommands.
"""
