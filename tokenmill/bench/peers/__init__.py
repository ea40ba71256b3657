"""Peer engines run beside tokenmill in the same benchmark run, on the same checkpoint.

Each peer module exposes ``available() -> str | None`` (None when it can run,
else why not) and ``generate_seconds(model_dir, dtype, prompts, output_len) ->
float``: the wall time to generate ``output_len`` tokens greedily for every
prompt (a list of token-id lists), prefill included, after a warm-up.
"""

PEERS = {
    "hf": "tokenmill.bench.peers.hf",
    "llamacpp": "tokenmill.bench.peers.llamacpp",
    "vllm": "tokenmill.bench.peers.vllm",
}
