"""Training FLOPs actually done by a fine-tuning step, for MFU that is not flattered by work never done.

The count follows what tasks/llm/losses.py computes for a decoder-only transformer with a gated MLP
(Gemma 3: q, k, v, o projections, gate, up and down), one multiply-add = 2 FLOPs:

    F = 6 N T  +  12 H h P  +  (4 + 2 [head trained]) d V R

- `N`: the decoder layers' matmul parameters, `layers x (d h (2 H + 2 K) + 3 d I)` (d hidden size, h head
  dim, H query heads, K key/value heads, I MLP width), 2 N T forward and 4 N T backward (gradients of the
  inputs and of the weights) over the `T` real tokens. The embedding is a lookup (no FLOPs) and the norms,
  rotary embedding and activations are elementwise: none of them is counted.
- `P`: the query-key pairs the attention layers need, summed over layers (`attention_pairs`): causal, every
  example attending only within itself, packed or not, and a sliding-window layer only within its window.
  Per pair and head, scores `q.k` and the weighted sum of values are 2 h each forward, twice that backward:
  12 h per pair and head. Pairs a dense kernel computes and then masks (across packed examples, past the
  window, or on padding) are not counted.
- `R`: the response positions, those whose next token is a response token: the only ones the loss sends
  through the output layer (tied to the embedding, V x d): 2 d V forward and 2 d V for the gradient of the
  hidden states; 2 d V more for its weight gradient only when that weight is trained
  (`finetune.train_embeddings`, or an untied head).

Padding is never counted: it is work done but not needed, which MFU should expose rather than credit.
Neither is recomputation: with gradient checkpointing the backward reruns each layer's forward
(2 N T + 4 H h P more done), but MFU by convention counts the model's FLOPs, not the hardware's. The count
is that of full fine-tuning: under LoRA the frozen weights get no weight gradient (4 N T, not 6 N T) and the
adapters add their own, which this module does not count.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# The layer types a Hugging Face config lists in `layer_types` that this count knows: causal attention over
# the whole example, or over a sliding window of the last `sliding_window` tokens (the query's own included).
FULL, SLIDING = "full_attention", "sliding_attention"


@dataclass(frozen=True)
class ModelShape:
    hidden_size: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    windows: tuple[int | None, ...]  # per layer: the sliding window, None for full attention

    @property
    def matmul_params(self) -> int:
        """Weights of the decoder layers' matrix multiplications: N in 6 N per token."""
        d, h = self.hidden_size, self.head_dim
        return self.layers * (d * h * (2 * self.heads + 2 * self.kv_heads) + 3 * d * self.intermediate_size)


def model_shape(config) -> ModelShape:
    """The figures the count needs, read from a Hugging Face config (the text config of a multimodal one)."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    fields = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size",
              "vocab_size")
    missing = [f for f in fields if getattr(config, f, None) is None]
    if missing:
        raise ValueError(f"model config {type(config).__name__} has no {', '.join(missing)}: the FLOP count needs "
                         f"a decoder-only transformer's config (Gemma 3, Llama, Qwen ...)")
    if getattr(config, "use_bidirectional_attention", False):
        raise ValueError("model config sets use_bidirectional_attention: the FLOP count assumes causal attention")
    layers = config.num_hidden_layers
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None) or [SLIDING if window else FULL] * layers
    unknown = sorted(set(types) - {FULL, SLIDING})
    if unknown or len(types) != layers:
        raise ValueError(f"model config layer_types {unknown or types}: the FLOP count knows {FULL!r} and "
                         f"{SLIDING!r}, one per layer ({layers})")
    if SLIDING in types and not window:
        raise ValueError("model config has sliding_attention layers but no sliding_window")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return ModelShape(hidden_size=config.hidden_size, layers=layers, heads=config.num_attention_heads,
                      kv_heads=config.num_key_value_heads, head_dim=head_dim,
                      intermediate_size=config.intermediate_size, vocab_size=config.vocab_size,
                      windows=tuple(window if t == SLIDING else None for t in types))


def causal_pairs(lengths: Sequence[int] | np.ndarray, window: int | None = None) -> int:
    """Query-key pairs of one causal attention layer over examples of these lengths, each attending only
    within itself: L (L + 1) / 2 per example, or with a window w, w (w + 1) / 2 + (L - w) w once L > w."""
    n = np.asarray(lengths, dtype=np.int64)
    if n.size and n.min() < 0:
        raise ValueError(f"example lengths must be >= 0, got {int(n.min())}")
    full = n * (n + 1) // 2
    if window is None:
        return int(full.sum())
    return int(np.where(n <= window, full, window * (window + 1) // 2 + (n - window) * window).sum())


def attention_pairs(config, lengths: Sequence[int] | np.ndarray) -> int:
    """P: the query-key pairs all attention layers need over examples of these lengths (a step's, or a
    whole run's: the count adds up)."""
    windows = model_shape(config).windows
    return sum(causal_pairs(lengths, w) * windows.count(w) for w in set(windows))


def training_flops(config, tokens: int, response_tokens: int, attention_pairs: int,
                   head_trained: bool = False) -> float:
    """FLOPs of the forward and backward over `tokens` real tokens of which `response_tokens` carry loss,
    with `attention_pairs` from `attention_pairs` (see the module docstring for the formula)."""
    if min(tokens, response_tokens, attention_pairs) < 0 or response_tokens > tokens:
        raise ValueError(f"need 0 <= response_tokens <= tokens and attention_pairs >= 0, got tokens={tokens}, "
                         f"response_tokens={response_tokens}, attention_pairs={attention_pairs}")
    s = model_shape(config)
    head = (6 if head_trained else 4) * s.hidden_size * s.vocab_size
    return float(6 * s.matmul_params * tokens + 12 * s.heads * s.head_dim * attention_pairs + head * response_tokens)


def model_flops_per_token(config, tokens: int, response_tokens: int, attention_pairs: int,
                          head_trained: bool = False) -> float:
    """`training_flops` per real token: the average over these tokens (it depends on their lengths and
    response share, so it is a property of the data as much as of the model)."""
    if tokens <= 0:
        raise ValueError(f"tokens must be > 0, got {tokens}")
    return training_flops(config, tokens, response_tokens, attention_pairs, head_trained) / tokens


def mfu(flops: float, seconds: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: FLOPs done per second over the hardware's peak (all devices together)."""
    if seconds <= 0 or peak_flops <= 0:
        raise ValueError(f"seconds and peak_flops must be > 0, got {seconds} and {peak_flops}")
    return flops / seconds / peak_flops
