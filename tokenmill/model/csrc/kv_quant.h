// KV-cache storage formats of the paged attention and KV-write kernels (see
// tokenmill/model/kv_format.py, the reference): the model's dtype, int8 (symmetric, one fp16
// scale per token and head) and int4 (asymmetric, fp16 scale and zero per token and head).
//
// One head's share of a block, in bytes: its codes, then block_size fp16 scales, then (int4)
// block_size fp16 zeros. K codes are [D][bs] (int4: [D / 2][bs] bytes, channels 2c and 2c + 1
// of a token in the low and high nibble of one byte), V codes [bs][D] (int4: [bs][D / 2]).
//
// A format type F gives the attention kernel what it reads: ``k_load`` (16 keys of
// ``kStep`` consecutive channels, as integer-valued fp32 when quantized), ``k_scale`` (the
// 16 keys' scale and zero), ``v_load`` (16 channels of one token) and ``v_scale``; the
// scores are then s = scale * (q . codes) + zero * sum(q), and the output gathers
// (p * scale) * codes + p * zero, so dequantizing costs one multiply per 16 keys.

#pragma once

#include <c10/util/Half.h>

#include "simd.h"

namespace tokenmill {

enum KVCode : int64_t { KV_PLAIN = 0, KV_INT8 = 1, KV_INT4 = 2 };

inline float half_to_f(const uint8_t* p) {
  c10::Half h;
  std::memcpy(&h.x, p, 2);
  return static_cast<float>(h);
}

inline void f_to_half(float v, uint8_t* p) {
  const c10::Half h(v);
  std::memcpy(p, &h.x, 2);
}

// ---------------------------------------------------------------------------- write side

// Quantize one token's head ``x [D]`` (already rounded to the model dtype) into a block:
// K codes at column ``off`` of [D(/2)][bs], V codes at row ``off`` of [bs][D(/2)].
template <typename T>
inline void quantize_head(const T* x, int D, int bs, int off, int64_t code, bool is_k,
                          uint8_t* head_block) {
  float lo = std::numeric_limits<float>::infinity(), hi = -lo, amax = 0.f;
  for (int d = 0; d < D; ++d) {
    const float f = to_f(x[d]);
    lo = std::min(lo, f);
    hi = std::max(hi, f);
    amax = std::max(amax, std::fabs(f));
  }
  const int64_t data = code == KV_INT8 ? static_cast<int64_t>(bs) * D : static_cast<int64_t>(bs) * D / 2;
  uint8_t* scale_p = head_block + data + 2 * off;
  if (code == KV_INT8) {
    f_to_half(amax / 127.f, scale_p);
    const float s = half_to_f(scale_p);
    for (int d = 0; d < D; ++d) {
      const float c = s > 0.f ? std::min(127.f, std::max(-127.f, std::nearbyint(to_f(x[d]) / s))) : 0.f;
      const int8_t b = static_cast<int8_t>(c);
      uint8_t* dst = is_k ? head_block + static_cast<int64_t>(d) * bs + off
                          : head_block + static_cast<int64_t>(off) * D + d;
      std::memcpy(dst, &b, 1);
    }
    return;
  }
  uint8_t* zero_p = head_block + data + 2 * bs + 2 * off;
  f_to_half(lo, zero_p);
  const float z = half_to_f(zero_p);
  f_to_half((hi - z) / 15.f, scale_p);
  const float s = half_to_f(scale_p);
  for (int d = 0; d < D; d += 2) {
    uint8_t c[2];
    for (int e = 0; e < 2; ++e)
      c[e] = s > 0.f ? static_cast<uint8_t>(std::min(15.f, std::max(0.f, std::nearbyint((to_f(x[d + e]) - z) / s))))
                     : 0;
    const uint8_t b = static_cast<uint8_t>(c[0] | (c[1] << 4));
    if (is_k)
      head_block[static_cast<int64_t>(d / 2) * bs + off] = b;
    else
      head_block[static_cast<int64_t>(off) * (D / 2) + d / 2] = b;
  }
}

// ---------------------------------------------------------------------------- read side

// Scalar reads (the non-AVX-512 path): the dequantized value of channel d of token t.
template <typename C>
struct KVPlainScalar {
  static float k_at(const uint8_t* blk, int d, int t, int bs, int) {
    return to_f(reinterpret_cast<const C*>(blk)[static_cast<int64_t>(d) * bs + t]);
  }
  static float v_at(const uint8_t* blk, int t, int d, int, int D) {
    return to_f(reinterpret_cast<const C*>(blk)[static_cast<int64_t>(t) * D + d]);
  }
};

template <int64_t CODE>
struct KVQuantScalar {
  static constexpr int64_t data_bytes(int bs, int D) {
    return CODE == KV_INT8 ? static_cast<int64_t>(bs) * D : static_cast<int64_t>(bs) * D / 2;
  }
  static float deq(const uint8_t* blk, int t, int bs, int D, int c) {
    const float s = half_to_f(blk + data_bytes(bs, D) + 2 * t);
    if (CODE == KV_INT8) return static_cast<float>(static_cast<int8_t>(c)) * s;
    return static_cast<float>(c) * s + half_to_f(blk + data_bytes(bs, D) + 2 * bs + 2 * t);
  }
  static float k_at(const uint8_t* blk, int d, int t, int bs, int D) {
    if (CODE == KV_INT8) return deq(blk, t, bs, D, blk[static_cast<int64_t>(d) * bs + t]);
    const uint8_t b = blk[static_cast<int64_t>(d / 2) * bs + t];
    return deq(blk, t, bs, D, d % 2 ? b >> 4 : b & 0xF);
  }
  static float v_at(const uint8_t* blk, int t, int d, int bs, int D) {
    if (CODE == KV_INT8) return deq(blk, t, bs, D, blk[static_cast<int64_t>(t) * D + d]);
    const uint8_t b = blk[static_cast<int64_t>(t) * (D / 2) + d / 2];
    return deq(blk, t, bs, D, d % 2 ? b >> 4 : b & 0xF);
  }
};

#if TM_AVX512

// 16 bytes (masked) widened to int32 lanes: signed for int8 codes, unsigned for int4 pairs
inline __m512i load16_epi8(const uint8_t* p, __mmask16 m) {
  return _mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, p));
}
inline __m512i load16_epu8(const uint8_t* p, __mmask16 m) {
  return _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(m, p));
}
// 16 fp16 values (masked) as fp32
inline __m512 load16_half(const uint8_t* p, __mmask16 m) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p));
}

template <typename C>
struct KVPlain {
  static constexpr int kStep = 1;
  static constexpr bool kScale = false, kZero = false;
  static void k_load(const uint8_t* blk, int d, int t0, int bs, __mmask16 m, __m512* out) {
    out[0] = load16(reinterpret_cast<const C*>(blk) + static_cast<int64_t>(d) * bs + t0, m);
  }
  static void k_scale(const uint8_t*, int, int, int, __mmask16, __m512&, __m512&) {}
  static __m512 v_load(const uint8_t* blk, int t, int j, int, int D, __mmask16 m) {
    return load16(reinterpret_cast<const C*>(blk) + static_cast<int64_t>(t) * D + 16 * j, m);
  }
  static void v_scale(const uint8_t*, int, int, int, __mmask16, __m512&, __m512&) {}
};

struct KVInt8 {
  static constexpr int kStep = 1;
  static constexpr bool kScale = true, kZero = false;
  static void k_load(const uint8_t* blk, int d, int t0, int bs, __mmask16 m, __m512* out) {
    out[0] = _mm512_cvtepi32_ps(load16_epi8(blk + static_cast<int64_t>(d) * bs + t0, m));
  }
  static void k_scale(const uint8_t* blk, int t0, int bs, int D, __mmask16 m, __m512& sc, __m512&) {
    sc = load16_half(blk + static_cast<int64_t>(bs) * D + 2 * t0, m);
  }
  static __m512 v_load(const uint8_t* blk, int t, int j, int, int D, __mmask16 m) {
    return _mm512_cvtepi32_ps(load16_epi8(blk + static_cast<int64_t>(t) * D + 16 * j, m));
  }
  static void v_scale(const uint8_t* blk, int t0, int bs, int D, __mmask16 m, __m512& sc, __m512&) {
    k_scale(blk, t0, bs, D, m, sc, sc);
  }
};

// int4 codes are read as c - 8 (centred) with the zero point moved to z + 8 * scale: the
// same values, but the two terms of s = scale * (q . codes) + zero * sum(q) (and of the V
// sum) no longer nearly cancel when the data is centred, which keeps fp32 sums over long
// contexts accurate.
struct KVInt4 {
  static constexpr int kStep = 2;  // one byte holds channels d and d + 1
  static constexpr bool kScale = true, kZero = true;
  static void k_load(const uint8_t* blk, int d, int t0, int bs, __mmask16 m, __m512* out) {
    const __m512i b = load16_epu8(blk + static_cast<int64_t>(d / 2) * bs + t0, m);
    const __m512i eight = _mm512_set1_epi32(8);
    out[0] = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_and_si512(b, _mm512_set1_epi32(0xF)), eight));
    out[1] = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_srli_epi32(b, 4), eight));
  }
  static void k_scale(const uint8_t* blk, int t0, int bs, int D, __mmask16 m, __m512& sc, __m512& zero) {
    const int64_t data = static_cast<int64_t>(bs) * D / 2;
    sc = load16_half(blk + data + 2 * t0, m);
    zero = _mm512_fmadd_ps(sc, _mm512_set1_ps(8.f), load16_half(blk + data + 2 * bs + 2 * t0, m));
  }
  // channels 16j .. 16j + 15 of token t: 8 bytes, low nibbles the even channels
  static __m512 v_load(const uint8_t* blk, int t, int j, int, int D, __mmask16 m) {
    const __mmask16 bytes = static_cast<__mmask16>(m == 0xFFFF ? 0xFF : ((1u << ((__builtin_popcount(m) + 1) / 2)) - 1));
    const __m128i raw = _mm_maskz_loadu_epi8(bytes, blk + static_cast<int64_t>(t) * (D / 2) + 8 * j);
    const __m128i lo = _mm_and_si128(raw, _mm_set1_epi8(0xF));
    const __m128i hi = _mm_and_si128(_mm_srli_epi16(raw, 4), _mm_set1_epi8(0xF));
    const __m512i c = _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(lo, hi));
    return _mm512_cvtepi32_ps(_mm512_sub_epi32(c, _mm512_set1_epi32(8)));
  }
  static void v_scale(const uint8_t* blk, int t0, int bs, int D, __mmask16 m, __m512& sc, __m512& zero) {
    k_scale(blk, t0, bs, D, m, sc, zero);
  }
};

#endif

}  // namespace tokenmill
