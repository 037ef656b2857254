"""Secure aggregation (SecAgg+) for summable merge strategies, on Flower's Message API.

The server learns the **sum** of the clients' encodings (docs/architecture.md) and nothing else
about any one of them, while clients may drop out mid-round. This follows SecAgg+ (Bell et al.,
"Secure Single-Server Aggregation with (Poly)Logarithmic Overhead", CCS 2020), which is SecAgg
(Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving Machine Learning", CCS
2017) with a sparse random neighbour graph, so a client's cost grows with log N instead of N:

======== =========================================== ===========================================
stage    server sends (message type)                 client replies
======== =========================================== ===========================================
setup    round parameters (``train.secagg_setup``)   two fresh SECP384R1 public keys: one to
                                                     encrypt shares, one for pairwise masks
share    its neighbours' public keys                 Shamir shares (threshold t) of its self-mask
         (``train.secagg_share``)                    seed b and its mask key, one per neighbour,
                                                     each encrypted for its recipient (ECDH +
                                                     HKDF → Fernet), and a hash commitment to b
mask     global state + train config + the shares    trains, encodes, quantizes, adds PRG(b) and
         addressed to it (``train.secagg_mask``)     ±PRG(s_ij) per neighbour mod 2^64; replies
                                                     with the masked vector and its metrics
unmask   which neighbours survived / dropped         shares of b for survivors, of the mask key
         (``train.secagg_unmask``)                   for dropped nodes (never both for one node)
======== =========================================== ===========================================

The server rebuilds each survivor's b and each dropped node's mask key from at least t shares
(checked against b's commitment and the advertised public key, so a corrupted share is found
and named), regenerates those masks, removes them from the running sum of masked vectors,
dequantizes, and hands the sum to ``strategy.decode``: plain and secure aggregation share one
decode path.

Design choices (see the README's "Secure aggregation" section):

* Masks are expanded by AES-256-CTR keyed through HKDF-SHA256 (a cryptographic PRG), not by
  numpy's Mersenne Twister with a 32-bit seed as in Flower's legacy ``secaggplus_mod``.
* Fixed point: x is clipped to [-C, C] and stochastically rounded to a signed integer with step
  C / (2^(bits-1) - 1), stored in two's complement modulo 2^64 (numpy uint64 wraps). The sum of N
  clients cannot overflow while N <= (2^63 - 1) / (2^(bits-1) - 1) ≈ 2^(64-bits).
* The neighbour graph is SecAgg+'s Harary graph: a random permutation of the sampled nodes in a
  ring, each linked to the k/2 nodes on either side (k ≈ 2·⌈log2 N⌉).
* The threshold is a fraction in (0.5, 1] of each node's k + 1 shares, so no two disjoint sets
  of its neighbours can each rebuild one of its secrets (a server that tells some neighbours a
  node survived and others that it dropped cannot collect both of its secrets from them).

Split by concern, as Flower splits its own SecAgg+ (primitives, server workflow, client mod):
``params`` (fixed point, neighbour graph, threshold), ``crypto`` (keys, PRG, commitments),
``messages`` (each stage's fields), ``client`` and ``server`` (the two state machines, plain data
in and out), ``local`` (every stage in one process, for tests and benchmarks). The Flower glue
is ``fedllama.client.secagg`` (the client's stage handlers) and ``fedllama.server.secure`` (the
server's round over a ``Grid``).
"""

from fedllama.privacy.secagg.client import SecAggClient
from fedllama.privacy.secagg.crypto import add_prg, prg
from fedllama.privacy.secagg.local import LocalRound, aggregate_locally
from fedllama.privacy.secagg.messages import ACTIONS, SECAGG
from fedllama.privacy.secagg.params import (
    CHUNK,
    Params,
    Quantizer,
    SecAggAbort,
    SecAggError,
    harary_graph,
    neighbour_count,
    threshold_count,
)
from fedllama.privacy.secagg.server import SecAggServer

__all__ = [
    "ACTIONS",
    "CHUNK",
    "SECAGG",
    "LocalRound",
    "Params",
    "Quantizer",
    "SecAggAbort",
    "SecAggClient",
    "SecAggError",
    "SecAggServer",
    "add_prg",
    "aggregate_locally",
    "harary_graph",
    "neighbour_count",
    "prg",
    "threshold_count",
]
