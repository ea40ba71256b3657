"""Roofline cost model: per-operator FLOPs and bytes of a model shape on named hardware.

Each operator of a step costs ``max(FLOPs / achievable FLOP/s, bytes /
achievable bandwidth)``; a step is the sum of its operators, plus tensor-
parallel all-reduces and a fixed per-step overhead:

- per layer, four GEMMs (QKV, O, gate+up, down) over all new tokens: weight
  bytes once per step plus activation bytes per token;
- per layer, element-wise work (norms, rotary, SiLU-and-mul, residuals): bytes only;
- per layer, attention split in two operators, because they sit on different
  sides of the ridge: prefill attention (causal query-key pairs, compute
  bound when long) and decode attention (one query over its whole context,
  bound by reading the KV cache);
- a mixture-of-experts layer (Mixtral, Qwen3-MoE) replaces the MLP's two GEMMs
  with a router GEMM and the experts: FLOPs of ``experts_per_token`` experts
  per token, weight bytes of the distinct experts the step's tokens reach
  (``ModelShape.experts_touched``, routing taken as uniform), so a batch-1
  decode reads the active parameters and a large batch all of them;
- sliding-window layers (Mistral, Gemma 2/3, Phi-3) attend to at most
  ``sliding_window`` keys per query: their decode attention reads
  ``min(context, num_decode * window)`` KV tokens (exact when every sequence
  is past the window or all are within it), and their prefill query-key pairs
  and KV reads are those of the step's prefill sequences taken as equal ones
  (exact for one sequence);
- the LM head only for rows that sample;
- LoRA adapters (``lora_rank``, ``lora_targets``): per layer and adapted
  projection, each adapter of the step reads its A and B once
  (``rank x (in + out)`` weights) and every row that runs one does
  ``2 rank (in + out)`` FLOPs and reads and writes its activations
  (Punica's grouped shrink/expand: the cost grows with the distinct adapters,
  not with the requests);
- with tensor parallelism ``tp``, weights, heads and KV heads are split over
  ``tp`` devices (KV heads are replicated when there are fewer than ``tp``),
  and each layer adds two ring all-reduces of the hidden states
  (``2 (tp - 1) / tp`` of the message over the link, plus a latency floor).

The dense part of a step depends only on (new tokens, sampling rows), so it
is memoised; a multi-step decode plan is priced in closed form (attention
grows linearly with the sub-step index), so a 200-step plan costs the same
few operations as a single step.
"""

from __future__ import annotations

from typing import Any

from tokenmill.sim.cost_model import CostModel, StepFeatures
from tokenmill.sim.hardware import Hardware
from tokenmill.sim.model_spec import DTYPE_BYTES, ModelShape, kv_value_bytes

# the projections a LoRA adapter may adapt (attention's first)
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _seg(a: float, b: float, lo: int, hi: int) -> float:
    """Sum of ``a + b*j`` for ``lo <= j < hi``."""
    n = hi - lo
    return a * n + b * (lo + hi - 1) * n / 2 if n > 0 else 0.0


def sum_max_affine(p: float, q: float, r: float, s: float, k: int) -> float:
    """``sum(max(p + q*j, r + s*j) for j in range(k))`` in closed form."""
    if k <= 0:
        return 0.0
    d0, dq = p - r, q - s  # (f - g)(j) = d0 + dq * j
    if d0 <= 0 and dq <= 0:  # g wins throughout (decode attention is usually memory-bound)
        return r * k + s * (k - 1) * k / 2
    if d0 >= 0 and dq >= 0:
        return p * k + q * (k - 1) * k / 2
    seg = _seg
    # One flip, after the crossing point -d0/dq > 0.
    j = min(int(-d0 / dq) + 1, k)
    if d0 > 0:  # f wins up to the crossing
        return seg(p, q, 0, j) + seg(r, s, j, k)
    return seg(r, s, 0, j) + seg(p, q, j, k)


def _windowed_pairs(c0: float, q: float, window: int) -> float:
    """Query-key pairs of ``q`` queries after ``c0`` cached tokens when each sees at most
    ``window`` keys: ``sum(min(x, window) for x in c0 + 1 ..= c0 + q)``."""
    a, b = c0 + 1, c0 + q
    if b <= window:
        return (a + b) * q / 2
    if a > window:
        return window * q
    return (a + window) * (window - a + 1) / 2 + (b - window) * window


class RooflineCostModel(CostModel):
    name = "roofline"

    def __init__(
        self,
        model: ModelShape,
        hardware: Hardware,
        tp: int = 1,
        dtype: str = "bf16",
        kv_dtype: str | None = None,
        step_overhead: float | None = None,
        lora_rank: int = 16,
        lora_targets: tuple[str, ...] = LORA_TARGETS,
    ) -> None:
        if tp < 1:
            raise ValueError(f"tensor parallelism must be >= 1, got {tp}")
        if model.num_heads % tp:
            raise ValueError(f"{model.num_heads} attention heads do not split over tp={tp}")
        self.model = model
        self.hw = hardware
        self.tp = tp
        self.dtype = dtype
        self.kv_dtype = kv_dtype or dtype
        self.overhead = hardware.step_overhead if step_overhead is None else step_overhead
        wb = DTYPE_BYTES[dtype]
        ab = 4 if wb == 4 else 2  # activations stay in 16 bits unless the model runs in fp32
        kb = kv_value_bytes(self.kv_dtype, model.head_dim)
        self.F = hardware.flops(dtype)
        self.B = hardware.bandwidth
        m = model
        h, L = m.hidden_size, m.num_layers
        heads = m.num_heads // tp
        q = heads * m.head_dim
        kv = -(-m.num_kv_heads // tp) * m.head_dim  # replicated when fewer KV heads than ranks
        inter = m.intermediate_size // tp
        # GEMMs per layer: (weight bytes, FLOPs per token, activation bytes per token).
        self._gemms = [
            (h * (q + 2 * kv) * wb, 2 * h * (q + 2 * kv), (h + q + 2 * kv) * ab),  # QKV
            (q * h * wb, 2 * q * h, (q + h) * ab),  # O
            (h * 2 * inter * wb, 2 * h * 2 * inter, (h + 2 * inter) * ab),  # gate + up
            (inter * h * wb, 2 * inter * h, (inter + h) * ab),  # down
        ]
        self._elementwise_per_token = (10 * h + 3 * inter + 2 * (q + kv)) * ab
        self._layers = L
        self._dense_layers = m.num_dense_layers
        self._moe_layers = m.num_moe_layers if m.is_moe else 0
        # A sparse layer's experts: one expert's weight bytes (split over tp like the MLP),
        # FLOPs and activation bytes per token (k experts each), and the router GEMM.
        e_inter = m.moe_intermediate_size // tp
        k = m.experts_per_token
        self._expert_bytes = 3 * h * e_inter * wb
        self._expert_flops_per_token = k * 2 * 3 * h * e_inter
        self._expert_act_per_token = k * (2 * h + 3 * e_inter) * ab
        self._router = (h * m.num_experts * wb, 2 * h * m.num_experts, (h + m.num_experts) * ab)
        self._moe_elementwise_per_token = (10 * h + k * 3 * e_inter + 2 * (q + kv)) * ab
        # sliding-window layers (attention only differs)
        self._window = m.sliding_window
        self._sliding_layers = m.num_sliding_layers if m.sliding_window else 0
        # Attention: FLOPs per query-key pair (QK^T and PV), KV bytes per token, Q/O bytes per query.
        self._att_flops_per_pair = 4 * m.head_dim * heads
        self._kv_bytes_per_token = 2 * kv * kb
        self._qo_bytes_per_query = (2 * q + 2 * kv) * ab
        self._vocab = m.vocab_size // tp if m.vocab_size % tp == 0 else -(-m.vocab_size // tp)
        self._lm_weight_bytes = h * self._vocab * wb
        self._h, self._ab = h, ab
        self._dense_cache: dict[tuple[int, int], float] = {}
        # LoRA per adapted projection: (layers, weight bytes of one adapter, FLOPs and
        # activation bytes per row); sharded like the base weight under tp (column-parallel
        # q/k/v/gate/up split B's outputs, row-parallel o/down split A's inputs)
        unknown = set(lora_targets) - set(LORA_TARGETS)
        if unknown:
            raise ValueError(f"unknown LoRA targets {sorted(unknown)}; use some of {', '.join(LORA_TARGETS)}")
        dims = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}  # fmt: skip
        r = lora_rank
        self.lora_rank, self.lora_targets = lora_rank, tuple(lora_targets)
        self._lora_ops = [
            (
                L if t in LORA_TARGETS[:4] else self._dense_layers,
                r * (dims[t][0] + dims[t][1]) * wb,
                2 * r * (dims[t][0] + dims[t][1]),
                (dims[t][0] + r + 2 * dims[t][1]) * ab,
            )
            for t in lora_targets
        ]

    # ----------------------------------------------------------- operators

    def _gemm_time(self, tokens: int) -> tuple[float, float]:
        """Per-layer (time, of which compute-bound share) of the four GEMMs over ``tokens`` rows."""
        return self._gemms_time(self._gemms, tokens)

    def _gemms_time(self, gemms: list[tuple[float, float, float]], tokens: int) -> tuple[float, float]:
        F, B = self.F, self.B
        total = 0.0
        compute = 0.0
        for w, fl, act in gemms:
            c = tokens * fl / F
            mem = (w + tokens * act) / B
            if c >= mem:
                total += c
                compute += c
            else:
                total += mem
        return total, compute

    def _moe_gemms(self, tokens: int) -> list[tuple[float, float, float]]:
        """A sparse layer's GEMMs over ``tokens`` rows: QKV, O, router, and the experts reached."""
        experts = (
            self.model.experts_touched(tokens) * self._expert_bytes,
            self._expert_flops_per_token,
            self._expert_act_per_token,
        )
        return [*self._gemms[:2], self._router, experts]

    def _allreduce_time(self, tokens: int, samples: int) -> float:
        tp = self.tp
        if tp == 1:
            return 0.0
        link, lat = self.hw.link_bandwidth, self.hw.allreduce_latency
        msg = tokens * self._h * self._ab
        per_layer = 2 * (lat + 2 * (tp - 1) / tp * msg / link)
        logits = lat + (tp - 1) / tp * samples * self._vocab * tp * 4 / link
        return self._layers * per_layer + logits

    def _lm_head_time(self, samples: int) -> float:
        if samples == 0:
            return 0.0
        c = 2 * samples * self._h * self._vocab / self.F
        mem = (self._lm_weight_bytes + samples * (self._h * self._ab + self._vocab * 4)) / self.B
        return max(c, mem)

    def dense_time(self, tokens: int, samples: int) -> float:
        """Everything but attention: GEMMs, element-wise, LM head, all-reduces, overhead."""
        key = (tokens, samples)
        t = self._dense_cache.get(key)
        if t is None:
            gemm, _ = self._gemm_time(tokens)
            elem = tokens * self._elementwise_per_token / self.B
            layers = self._dense_layers * (gemm + elem)
            if self._moe_layers:
                moe, _ = self._gemms_time(self._moe_gemms(tokens), tokens)
                layers += self._moe_layers * (moe + tokens * self._moe_elementwise_per_token / self.B)
            t = (
                layers
                + self._lm_head_time(samples)
                + self._allreduce_time(tokens, samples)
                + self.overhead
            )
            self._dense_cache[key] = t
        return t

    def _prefill_parts(self, f: StepFeatures) -> list[tuple[int, float, float]]:
        """(layers, compute, memory) of prefill attention: full layers, then sliding ones."""
        parts = []
        for layers, windowed in ((self._layers - self._sliding_layers, False), (self._sliding_layers, True)):
            if not layers:
                continue
            pairs, kv = f.prefill_pairs, f.prefill_kv
            if windowed:
                seqs = max(1, f.num_seqs - f.num_decode)
                q, c0, w = f.prefill_tokens / seqs, f.prefill_context / seqs, self._window
                pairs = min(pairs, seqs * _windowed_pairs(c0, q, w))
                kv = min(kv, seqs * (min(c0, w - 1) + q))
            c = pairs * self._att_flops_per_pair / self.F
            m = (kv * self._kv_bytes_per_token + f.prefill_tokens * self._qo_bytes_per_query) / self.B
            parts.append((layers, c, m))
        return parts

    def _decode_parts(self, num_decode: int, context: int) -> list[tuple[int, float, float]]:
        """(layers, compute, memory) of decode attention: full layers, then sliding ones."""
        parts = []
        for layers, windowed in ((self._layers - self._sliding_layers, False), (self._sliding_layers, True)):
            if not layers:
                continue
            ctx = min(context, num_decode * self._window) if windowed else context
            c = ctx * self._att_flops_per_pair / self.F
            m = (ctx * self._kv_bytes_per_token + num_decode * self._qo_bytes_per_query) / self.B
            parts.append((layers, c, m))
        return parts

    def _prefill_attention_time(self, f: StepFeatures) -> float:
        if f.prefill_tokens == 0:
            return 0.0
        return sum(layers * max(c, m) for layers, c, m in self._prefill_parts(f))

    def _decode_attention_time(self, num_decode: int, context: int) -> float:
        if num_decode == 0:
            return 0.0
        return sum(layers * max(c, m) for layers, c, m in self._decode_parts(num_decode, context))

    def lora_time(self, num_loras: int, tokens: int) -> float:
        if not num_loras or not tokens:
            return 0.0
        F, B = self.F, self.B
        return sum(
            layers * max(tokens * fl / F, (num_loras * w + tokens * act) / B)
            for layers, w, fl, act in self._lora_ops
        )

    # ------------------------------------------------------------ interface

    def step_time(self, f: StepFeatures) -> float:
        return (
            self.dense_time(f.num_tokens, f.num_samples)
            + self._prefill_attention_time(f)
            + self._decode_attention_time(f.num_decode, f.decode_context)
            + self.lora_time(f.num_loras, f.lora_tokens)
        )

    def decode_time(self, num_seqs: int, context: int, num_steps: int) -> float:
        dense = self._dense_cache.get((num_seqs, num_seqs))
        if dense is None:
            dense = self.dense_time(num_seqs, num_seqs)
        if num_steps == 1:
            if num_seqs and not self._sliding_layers:
                # _decode_attention_time's one part, the same arithmetic without the lists (the
                # twin prices a decode run several times per plan)
                a, kvb = self._att_flops_per_pair, self._kv_bytes_per_token
                m = (context * kvb + num_seqs * self._qo_bytes_per_query) / self.B
                return dense + self._layers * max(context * a / self.F, m)
            return dense + self._decode_attention_time(num_seqs, context)
        F, B, n = self.F, self.B, num_seqs
        # Decode attention at sub-step j: max(ctx_j * a / F, (ctx_j * kvb + n * qo) / B), ctx_j = context + j * n.
        a, kvb = self._att_flops_per_pair, self._kv_bytes_per_token
        qo = n * self._qo_bytes_per_query

        def steps(ctx: int, k: int) -> float:
            return sum_max_affine(ctx * a / F, n * a / F, (ctx * kvb + qo) / B, n * kvb / B, k)

        full = self._layers - self._sliding_layers
        if full:  # steps(context, num_steps), without the call
            att = full * sum_max_affine(context * a / F, n * a / F, (context * kvb + qo) / B, n * kvb / B, num_steps)
        else:
            att = 0.0
        if self._sliding_layers:
            # a sliding layer's context grows until it reaches n * window, then stays there
            cap = n * self._window
            grow = min(num_steps, max(0, -(-(cap - context) // n)))
            flat = num_steps - grow
            att += self._sliding_layers * (
                steps(context, grow) + flat * max(cap * a / F, (cap * kvb + qo) / B)
            )
        return num_steps * dense + att

    def breakdown(self, f: StepFeatures) -> dict[str, dict[str, float]]:
        """Per operator: compute time, memory time, and the time charged (their max); for tests and reports."""
        F, B, L = self.F, self.B, self._layers
        out: dict[str, dict[str, float]] = {}
        t = f.num_tokens

        def add(name: str, layers: int, w: float, fl: float, act: float) -> None:
            c, m = layers * t * fl / F, layers * (w + t * act) / B
            prev = out.get(name, {"compute": 0.0, "memory": 0.0, "time": 0.0})
            out[name] = {"compute": prev["compute"] + c, "memory": prev["memory"] + m,
                         "time": prev["time"] + max(c, m)}  # fmt: skip

        names = ("qkv", "o_proj", "gate_up", "down")
        for i, (name, (w, fl, act)) in enumerate(zip(names, self._gemms, strict=True)):
            add(name, L if i < 2 else self._dense_layers, w, fl, act)
        if self._moe_layers:
            _, _, router, experts = self._moe_gemms(t)
            add("router", self._moe_layers, *router)
            add("experts", self._moe_layers, *experts)
        m = (self._dense_layers * self._elementwise_per_token + self._moe_layers * self._moe_elementwise_per_token) * t / B
        out["elementwise"] = {"compute": 0.0, "memory": m, "time": m}
        for name, parts, active in (
            ("attention_prefill", self._prefill_parts(f), f.prefill_tokens),
            ("attention_decode", self._decode_parts(f.num_decode, f.decode_context), f.num_decode),
        ):
            c = sum(layers * c for layers, c, _ in parts)
            m = sum(layers * m for layers, _, m in parts)
            time = sum(layers * max(c, m) for layers, c, m in parts) if active else 0.0
            out[name] = {"compute": c, "memory": m, "time": time}
        lm = self._lm_head_time(f.num_samples)
        c = 2 * f.num_samples * self._h * self._vocab / F
        out["lm_head"] = {"compute": c, "memory": lm if lm > c else 0.0, "time": lm}
        ar = self._allreduce_time(f.num_tokens, f.num_samples)
        out["allreduce"] = {"compute": 0.0, "memory": 0.0, "time": ar}
        out["overhead"] = {"compute": 0.0, "memory": 0.0, "time": self.overhead}
        if f.num_loras and f.lora_tokens:
            c = sum(layers * f.lora_tokens * fl / F for layers, _, fl, _ in self._lora_ops)
            m = sum(layers * (f.num_loras * w + f.lora_tokens * act) / B for layers, w, _, act in self._lora_ops)
            out["lora"] = {"compute": c, "memory": m, "time": self.lora_time(f.num_loras, f.lora_tokens)}
        return out

    def weight_bytes_per_device(self) -> float:
        wb = DTYPE_BYTES[self.dtype]
        m = self.model
        norms = 2 * m.hidden_size * wb
        dense = self._dense_layers * (sum(w for w, _, _ in self._gemms) + norms)
        moe = self._moe_layers * (
            sum(w for w, _, _ in self._gemms[:2]) + self._router[0] + m.num_experts * self._expert_bytes + norms
        )
        emb = m.vocab_size * m.hidden_size * wb / self.tp
        head = 0 if m.tie_word_embeddings else emb
        return dense + moe + emb + head

    def kv_bytes_per_token_per_device(self) -> float:
        return self._layers * self._kv_bytes_per_token

    def num_kv_blocks(self, block_size: int, memory_utilization: float = 0.9, activation_reserve: float = 0.02) -> int:
        """KV blocks that fit per replica: device memory minus weights and an activation reserve."""
        free = self.hw.mem_capacity * (memory_utilization - activation_reserve) - self.weight_bytes_per_device()
        per_block = self.kv_bytes_per_token_per_device() * block_size
        n = int(free // per_block)
        if n < 1:
            raise ValueError(
                f"{self.model.name} does not fit on {self.hw.name} with tp={self.tp}: "
                f"{self.weight_bytes_per_device() / 2**30:.1f} GiB of weights per device"
            )
        return n

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "model": self.model.name,
            "hardware": self.hw.name,
            "tp": self.tp,
            "dtype": self.dtype,
            "kv_dtype": self.kv_dtype,
            "step_overhead_s": self.overhead,
            "flops_efficiency": self.hw.flops_efficiency,
            "bandwidth_efficiency": self.hw.bandwidth_efficiency,
            "lora_rank": self.lora_rank,
            "lora_targets": list(self.lora_targets),
        }
