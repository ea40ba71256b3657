"""Peer engines run beside tokenmill in the same benchmark run, on the same checkpoint.

Each peer module exposes ``available() -> str | None`` (None when it can run,
else why not) and ``generate(model_dir, dtype, prompts, output_len) -> dict``:
``seconds``, the wall time to generate ``output_len`` tokens greedily for every
prompt (a list of token-id lists), prefill included, after a warm-up;
``tokens``, what each prompt got; ``peak_memory_mb``, the peak memory of the
peer's processes (``tokenmill.bench.process_memory``).
Peers that serve only some dtypes list them in ``DTYPES`` (hf serves any
torch dtype and has none).

Every cell runs in a fresh subprocess that executes a runner script from this
package (see ``_venv``): ``hf`` with tokenmill's own python, ``llamacpp`` and
``vllm`` in their own virtual environments (``scripts/setup_peers.sh``).
tokenmill itself runs the same way (``tokenmill.bench.throughput_runner``).
"""

PEERS = {
    "hf": "tokenmill.bench.peers.hf",
    "llamacpp": "tokenmill.bench.peers.llamacpp",
    "vllm": "tokenmill.bench.peers.vllm",
}

# KV cache preallocated by the engines that size it up front (tokenmill, vLLM),
# the same for both so that their peak memory compares like with like.
KV_CACHE_GIB = 1
