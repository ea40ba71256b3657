"""Peer engines run beside tokenmill in the same benchmark run, on the same checkpoint.

Each peer module exposes ``available() -> str | None`` (None when it can run,
else why not) and ``generate_seconds(model_dir, dtype, prompts, output_len) ->
float``: the wall time to generate ``output_len`` tokens greedily for every
prompt (a list of token-id lists), prefill included, after a warm-up.
Peers that serve only some dtypes list them in ``DTYPES`` (hf serves any
torch dtype and has none).

``hf`` runs in tokenmill's own process. ``llamacpp`` and ``vllm`` run in their
own virtual environments (``scripts/setup_peers.sh``), each cell in a fresh
subprocess that executes a runner script from this package (see ``_venv``).
"""

PEERS = {
    "hf": "tokenmill.bench.peers.hf",
    "llamacpp": "tokenmill.bench.peers.llamacpp",
    "vllm": "tokenmill.bench.peers.vllm",
}
