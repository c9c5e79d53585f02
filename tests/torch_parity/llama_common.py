"""What the PyTorch and the jlocalmap llama share, in numpy only: the sizes, the
initial weights, the RoPE table, the token batches and AdamW's settings. Both
sides load these same arrays, so any difference between them is the frameworks'.

    >>> cfg = LlamaConfig(dim=32, n_layers=1, n_heads=4, vocab=64, seq=8, batch=2)
    >>> cfg.head_dim, cfg.ffn
    (8, 256)
    >>> weights = init_weights(cfg, seed=0)
    >>> weights["layers"][0]["wq"].shape, weights["output"].shape
    ((32, 32), (32, 64))
    >>> token_batches(cfg, steps=3, seed=0).shape
    (3, 2, 9)
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """torchtitan's llama3 ``debugmodel`` (dim 256, 16 heads, vocab 2048,
    rope_theta 500000, norm_eps 1e-5, SwiGLU hidden rounded to 256) with 4 layers."""
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 16
    vocab: int = 2048
    seq: int = 128
    batch: int = 8                 # global batch; each dp rank takes batch / dp rows
    multiple_of: int = 256
    rope_theta: float = 500000.0
    norm_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn(self) -> int:
        """torchtitan's FeedForward hidden size: 2/3 of 4 * dim, rounded up to multiple_of."""
        hidden = int(2 * 4 * self.dim / 3)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)


@dataclasses.dataclass(frozen=True)
class AdamWConfig:
    """One set of AdamW hyper-parameters for torch.optim.AdamW and optax.adamw.
    torchtitan's lr, betas and weight decay; the defaults of the two libraries
    differ (weight decay 1e-2 vs 1e-4), so every field is passed to both."""
    lr: float = 8e-4
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1


def _normal(rng: np.random.Generator, shape: tuple[int, ...], std: float,
            cutoff: float | None = None) -> np.ndarray:
    x = rng.standard_normal(shape)
    if cutoff is not None:   # torchtitan's trunc_normal_ bounds, as a clip
        x = np.clip(x, -cutoff, cutoff)
    return (std * x).astype(np.float32)


def init_layer(cfg: LlamaConfig, rng: np.random.Generator, layer_id: int) -> dict:
    """One block's weights, (in, out) matrices, torchtitan's stds (depth init)."""
    depth_std = 0.02 / math.sqrt(2 * (layer_id + 1))
    d, f = cfg.dim, cfg.ffn

    def norm_weight() -> np.ndarray:   # torchtitan starts at ones; perturbed so a
        return (1 + _normal(rng, (d,), 0.1))   # wrong norm gradient cannot hide

    return {"attention_norm": norm_weight(),
            "wq": _normal(rng, (d, d), 0.02), "wk": _normal(rng, (d, d), 0.02),
            "wv": _normal(rng, (d, d), 0.02), "wo": _normal(rng, (d, d), depth_std),
            "ffn_norm": norm_weight(),
            "w1": _normal(rng, (d, f), 0.02), "w2": _normal(rng, (f, d), depth_std),
            "w3": _normal(rng, (d, f), depth_std)}


def init_weights(cfg: LlamaConfig, seed: int) -> dict:
    """The whole model's float32 weights: embedding N(0, 1), output N(0, dim^-1/2)
    clipped at 3 std, as torchtitan's init_weights."""
    rng = np.random.default_rng(seed)
    return {"tok_embeddings": _normal(rng, (cfg.vocab, cfg.dim), 1.0),
            "layers": [init_layer(cfg, rng, i) for i in range(cfg.n_layers)],
            "norm": 1 + _normal(rng, (cfg.dim,), 0.1),
            "output": _normal(rng, (cfg.dim, cfg.vocab), cfg.dim ** -0.5, cutoff=3.0)}


def rope_tables(cfg: LlamaConfig) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin, (seq, head_dim / 2) float32, of torchtitan's llama3 RoPE
    frequencies (theta, then the llama3 long-context scaling of low frequencies),
    computed once in float64 so both frameworks rotate by the same numbers."""
    freqs = 1.0 / cfg.rope_theta ** (np.arange(0, cfg.head_dim, 2) / cfg.head_dim)
    scale, low, high, original = 8.0, 1.0, 4.0, 8192
    wavelen = 2 * np.pi / freqs
    freqs = np.where(wavelen > original / low, freqs / scale, freqs)
    smooth = (original / wavelen - low) / (high - low)
    medium = (wavelen >= original / high) & (wavelen <= original / low)
    freqs = np.where(medium, (1 - smooth) * freqs / scale + smooth * freqs, freqs)
    angles = np.outer(np.arange(cfg.seq), freqs)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def token_batches(cfg: LlamaConfig, steps: int, seed: int) -> np.ndarray:
    """(steps, batch, seq + 1) int64 token ids: step i trains on [:, :-1] -> [:, 1:].
    Learnable: each next token is a fixed random successor of the current one with
    probability 3/4, else uniform (a loss that only sees noise would not fall)."""
    rng = np.random.default_rng(seed + 1)
    successor = rng.permutation(cfg.vocab)
    shape = (steps, cfg.batch)
    tokens = [rng.integers(0, cfg.vocab, shape)]
    for _ in range(cfg.seq):
        noise = rng.integers(0, cfg.vocab, shape)
        tokens.append(np.where(rng.random(shape) < 0.75, successor[tokens[-1]], noise))
    return np.stack(tokens, axis=-1).astype(np.int64)


def block_inputs(cfg: LlamaConfig, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A block's random input x and output cotangent, (batch, seq, dim) each."""
    rng = np.random.default_rng(seed + 2)
    shape = (cfg.batch, cfg.seq, cfg.dim)
    return _normal(rng, shape, 1.0), _normal(rng, shape, 1.0)


def max_relative(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| / max |b|: one figure per array, blind to b's scale."""
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(b)))


def block_arrays(result: dict) -> dict[str, np.ndarray]:
    """A block run's output, input gradient and weight gradients, one flat name each."""
    return {"out": result["out"], "x_grad": result["x_grad"],
            **{f"grad {k}": v for k, v in result["grads"].items()}}


def differences(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> dict[str, float]:
    """max_relative of each named array; the names must be the same."""
    if sorted(got) != sorted(want):
        raise ValueError(f"different arrays: {sorted(got)} against {sorted(want)}")
    return {name: max_relative(got[name], want[name]) for name in want}
