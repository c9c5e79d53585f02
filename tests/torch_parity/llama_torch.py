"""The torchtitan llama3 in PyTorch DTensor: tensor + sequence parallelism over
the ``tp`` mesh dim with torchtitan's classic plan (ColwiseParallel /
RowwiseParallel / PrepareModuleInput), ``local_map`` where torchtitan put it,
and data parallelism over ``dp`` (gradients all-reduced and averaged, as DDP).
Nothing here imports JAX: the ranks are spawned processes (see torch_world).

``local_map`` regions, as in torchtitan:

* the RMSNorms under sequence parallelism (torchtitan's fused RMSNorm, #404):
  x ``Shard(1)`` (sequence), weight ``Replicate()``, and the weight's gradient
  declared ``Partial()`` (each tp rank has summed only its sequence shard);
* the inner attention (torchtitan's ``LocalMapAttention``, #2557): q, k, v
  laid out (batch, heads, seq, head_dim) and ``Shard(1)`` (heads) on tp, their
  gradients the same.

    >>> import torch
    >>> from llama_common import LlamaConfig, init_weights
    >>> cfg = LlamaConfig(dim=32, n_layers=1, n_heads=4, vocab=64, seq=8, batch=2)
    >>> model = Transformer(cfg, init_weights(cfg, seed=0))   # unsharded, one process
    >>> model(torch.zeros(2, 8, dtype=torch.long)).shape
    torch.Size([2, 8, 64])
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed._functional_collectives import AsyncCollectiveTensor
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.experimental import local_map
from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput,
                                               RowwiseParallel, parallelize_module)

from torch_world import run_world

from llama_common import (AdamWConfig, LlamaConfig, block_inputs, init_weights, rope_tables,
                          token_batches)

HEADS = [Shard(1)]       # (batch, heads, seq, head_dim) split over heads on tp


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) * weight over the last dim, on local (or whole) tensors."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d), causal) v on (batch, heads, seq, head_dim), written
    out (not SDPA's fused kernel) so both frameworks sum in the same order."""
    scores = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
    seq = q.shape[-2]
    future = torch.ones(seq, seq, dtype=torch.bool).triu(1)
    return scores.masked_fill(future, float("-inf")).softmax(-1) @ v


def rotate(x, cos, sin):
    """RoPE on (batch, seq, heads, head_dim) in torchtitan's convention (pairs of
    neighbouring entries are complex numbers times freqs_cis), in real arithmetic."""
    pairs = x.unflatten(-1, (-1, 2))
    re, im = pairs[..., 0], pairs[..., 1]
    return torch.stack((re * cos - im * sin, re * sin + im * cos), -1).flatten(-2)


def linear(weight: np.ndarray) -> nn.Linear:
    """nn.Linear without bias holding an (in, out) numpy matrix."""
    layer = nn.Linear(*weight.shape, bias=False)
    layer.weight.data = torch.from_numpy(weight.T.copy())
    return layer


class RMSNorm(nn.Module):
    """RMSNorm; under sequence parallelism a local_map region (see the module doc)."""

    def __init__(self, weight: np.ndarray, eps: float):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.from_numpy(weight.copy())), eps
        self.region, self.mesh = rms_norm, None

    def shard(self, tp_mesh: DeviceMesh) -> None:
        self.weight = nn.Parameter(distribute_tensor(self.weight.data, tp_mesh, [Replicate()]))
        self.mesh = tp_mesh
        self.region = local_map(rms_norm, out_placements=[Shard(1)],
                                in_placements=([Shard(1)], [Replicate()], None),
                                in_grad_placements=([Shard(1)], [Partial()], None),
                                device_mesh=tp_mesh)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mesh is not None and not isinstance(x, DTensor):   # the local sequence shard
            if isinstance(x, AsyncCollectiveTensor):
                # The embedding's reduce-scatter is still in flight. local_map would
                # wait() for it, and wait() cuts the autograd graph (pytorch#151240):
                # the embedding would silently lose this path's gradient. clone()
                # waits in an op that autograd records.
                x = x.clone()
            x = DTensor.from_local(x, self.mesh, [Shard(1)], run_check=False)
        return self.region(x, self.weight, self.eps)


class Attention(nn.Module):
    """Multi-head attention with RoPE; wq/wk/wv column-, wo row-parallel under TP."""

    def __init__(self, cfg: LlamaConfig, w: dict):
        super().__init__()
        self.wq, self.wk, self.wv, self.wo = (linear(w[n]) for n in ("wq", "wk", "wv", "wo"))
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.inner = causal_attention

    def shard(self, tp_mesh: DeviceMesh) -> None:
        self.inner = local_map(causal_attention, out_placements=HEADS,
                               in_placements=(HEADS,) * 3, in_grad_placements=(HEADS,) * 3,
                               device_mesh=tp_mesh)

    def forward(self, x: torch.Tensor, cos, sin) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = (w(x).view(b, s, self.n_heads, self.head_dim)
                   for w in (self.wq, self.wk, self.wv))
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        out = self.inner(*(t.transpose(1, 2) for t in (q, k, v)))
        return self.wo(out.transpose(1, 2).reshape(b, s, -1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, w: dict):
        super().__init__()
        self.w1, self.w2, self.w3 = linear(w["w1"]), linear(w["w2"]), linear(w["w3"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    """x + attention(norm(x)), then + feed_forward(norm(.))."""

    def __init__(self, cfg: LlamaConfig, w: dict):
        super().__init__()
        self.attention_norm = RMSNorm(w["attention_norm"], cfg.norm_eps)
        self.attention = Attention(cfg, w)
        self.ffn_norm = RMSNorm(w["ffn_norm"], cfg.norm_eps)
        self.feed_forward = FeedForward(w)

    def forward(self, x: torch.Tensor, cos, sin) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    """Embedding, blocks, final norm and output projection: (batch, seq) -> logits."""

    def __init__(self, cfg: LlamaConfig, weights: dict):
        super().__init__()
        self.tok_embeddings = nn.Embedding(cfg.vocab, cfg.dim)
        self.tok_embeddings.weight.data = torch.from_numpy(weights["tok_embeddings"].copy())
        self.layers = nn.ModuleList(TransformerBlock(cfg, w) for w in weights["layers"])
        self.norm = RMSNorm(weights["norm"], cfg.norm_eps)
        self.output = linear(weights["output"])
        self.rope = rope(cfg)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h, *self.rope)
        return self.output(self.norm(h))


def rope(cfg: LlamaConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin as (seq, 1, head_dim / 2): broadcast over batch and heads."""
    return tuple(torch.from_numpy(t)[:, None, :] for t in rope_tables(cfg))


def replicated(tensors: tuple, tp_mesh: DeviceMesh) -> tuple:
    """Plain tensors as Replicate DTensors (DTensor ops refuse to mix the two)."""
    return tuple(DTensor.from_local(t, tp_mesh, [Replicate()], run_check=False) for t in tensors)


def parallelize_block(block: TransformerBlock, tp_mesh: DeviceMesh) -> None:
    """torchtitan's per-block TP + SP plan; q/k/v stay DTensors (use_local_output=False)
    for the inner attention's local_map."""
    colwise = ColwiseParallel(use_local_output=False)
    parallelize_module(block, tp_mesh, {
        "attention": PrepareModuleInput(input_layouts=(Shard(1), None, None),
                                        desired_input_layouts=(Replicate(), None, None)),
        "attention.wq": colwise, "attention.wk": colwise, "attention.wv": colwise,
        "attention.wo": RowwiseParallel(output_layouts=Shard(1)),
        "feed_forward": PrepareModuleInput(input_layouts=(Shard(1),),
                                           desired_input_layouts=(Replicate(),)),
        "feed_forward.w1": ColwiseParallel(), "feed_forward.w3": ColwiseParallel(),
        "feed_forward.w2": RowwiseParallel(output_layouts=Shard(1)),
    })
    for module in (block.attention_norm, block.attention, block.ffn_norm):
        module.shard(tp_mesh)


def parallelize(model: Transformer, tp_mesh: DeviceMesh) -> Transformer:
    """torchtitan's apply_tp (loss_parallel off): vocab-parallel embedding whose
    output is reduce-scattered onto the sequence, the blocks, the final norm and
    a column-parallel output projection gathered to whole logits."""
    parallelize_module(model, tp_mesh, {
        "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
        "output": ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate()),
    })
    for block in model.layers:
        parallelize_block(block, tp_mesh)
    model.rope = replicated(model.rope, tp_mesh)
    model.norm.shard(tp_mesh)
    return model


# -- data parallelism and the optimizer ----------------------------------------
def average_gradients(model: nn.Module, dp_group) -> None:
    """Each gradient in its parameter's placements, then all-reduced over dp and
    divided by its size (DDP's average). A local_map Partial() gradient (the
    norms') is reduced over tp first by the redistribute."""
    for p in model.parameters():
        g = p.grad
        if isinstance(g, DTensor):
            g = g.redistribute(placements=p.placements)
            p.grad = g
            g = g.to_local()
        dist.all_reduce(g, group=dp_group)
        g /= dist.get_world_size(dp_group)


def make_adamw(model: nn.Module, opt: AdamWConfig) -> torch.optim.AdamW:
    """torch.optim.AdamW with every hyper-parameter given (as optax.adamw's)."""
    return torch.optim.AdamW(model.parameters(), lr=opt.lr, betas=(opt.b1, opt.b2),
                             eps=opt.eps, weight_decay=opt.weight_decay, amsgrad=False,
                             foreach=False)


def meshes(world_size: int) -> tuple[DeviceMesh, DeviceMesh]:
    """(dp, tp) = (world_size / 2, 2) from the gloo world: the dp and tp sub-meshes."""
    mesh = init_device_mesh("cpu", (world_size // 2, 2), mesh_dim_names=("dp", "tp"))
    return mesh["dp"], mesh["tp"]


def dp_slice(x: np.ndarray, dp_mesh: DeviceMesh) -> np.ndarray:
    """This dp rank's rows of a global batch (dim 0 split in dp order)."""
    return np.array_split(x, dp_mesh.size(), axis=0)[dp_mesh.get_local_rank()]


def full(t: torch.Tensor) -> np.ndarray:
    """A DTensor's (or plain tensor's) whole value as numpy."""
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().numpy()


def gradients(model: nn.Module) -> dict[str, np.ndarray]:
    """Whole gradients named by their path in llama_common.init_weights' tree
    (``layers.0.attention.wq.weight`` -> ``layers.0.wq``), (in, out) for linears."""
    out = {}
    for name, p in model.named_parameters():
        module = name.removesuffix(".weight")
        path = [part for part in module.split(".") if part not in ("attention", "feed_forward")]
        g = full(p.grad)
        out[".".join(path)] = g.T if isinstance(model.get_submodule(module), nn.Linear) else g
    return out


def sequence_shard(a: np.ndarray, tp_mesh: DeviceMesh) -> torch.Tensor:
    """This tp rank's sequence chunk (dim 1) of a (batch, seq, ...) array."""
    chunk = np.array_split(a, tp_mesh.size(), axis=1)[tp_mesh.get_local_rank()]
    return torch.from_numpy(chunk.copy())


def block_rank(rank: int, world_size: int, cfg: LlamaConfig, seed: int) -> dict:
    """One TP+SP block on (dp, tp), its objective mean(out * cotangent) over the
    global batch: this rank's output rows and input gradient (whole sequence),
    and the whole weight gradients (the same on every rank)."""
    dp_mesh, tp_mesh = meshes(world_size)
    block = TransformerBlock(cfg, init_weights(cfg, seed)["layers"][0])
    parallelize_block(block, tp_mesh)
    x, ct = (sequence_shard(dp_slice(a, dp_mesh), tp_mesh) for a in block_inputs(cfg, seed))
    x.requires_grad_()
    out = block(x, *replicated(rope(cfg), tp_mesh))      # local (batch / dp, seq / tp, dim)
    # Every tp rank differentiates its own term and the collectives' backward adds
    # them: the sum of the terms is this dp rank's mean (divide by all its elements).
    ((out * ct).sum() / (out.numel() * tp_mesh.size())).backward()
    average_gradients(block, dp_mesh.get_group())       # the global mean: dp ranks' average
    gather = lambda t: full(DTensor.from_local(t, tp_mesh, [Shard(1)], run_check=False))
    return {"out": gather(out.detach()), "x_grad": gather(x.grad) / dp_mesh.size(),
            "grads": gradients(block)}


def train_rank(rank: int, world_size: int, cfg: LlamaConfig, opt: AdamWConfig,
               steps: int, seed: int) -> dict:
    """Train the TP+SP+DP llama ``steps`` AdamW steps on llama_common's batches:
    the global mean loss of each step (before its update), the first step's
    whole gradients and the seconds the steps took."""
    dp_mesh, tp_mesh = meshes(world_size)
    model = parallelize(Transformer(cfg, init_weights(cfg, seed)), tp_mesh)
    optimizer = make_adamw(model, opt)
    losses, first_grads, start = [], None, time.perf_counter()
    for batch in token_batches(cfg, steps, seed):
        tokens = torch.from_numpy(dp_slice(batch, dp_mesh))
        logits = model(tokens[:, :-1])                   # whole (batch / dp, seq, vocab)
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        average_gradients(model, dp_mesh.get_group())
        first_grads = first_grads if losses else gradients(model)
        optimizer.step()
        dist.all_reduce(loss := loss.detach(), group=dp_mesh.get_group())
        losses.append(loss.item() / dp_mesh.size())
    return {"losses": losses, "first_grads": first_grads, "seconds": time.perf_counter() - start}


# -- the runs, on a spawned world of 4 ranks --------------------------------------
def joined_block(results: list[dict]) -> dict:
    """The ranks' block_rank results as one: the whole output and input gradient
    (the dp ranks' rows joined) and the weight gradients."""
    firsts = results[::2]                  # tp rank 0 of each dp rank (rank = 2 dp + tp)
    return {"out": np.concatenate([r["out"] for r in firsts]),
            "x_grad": np.concatenate([r["x_grad"] for r in firsts]),
            "grads": results[0]["grads"]}


def embedding_reaches_norm_gradient(tp_mesh: DeviceMesh) -> dict[str, bool]:
    """Whether a RowwiseParallel embedding gets a gradient through a local_map
    RMSNorm fed its output directly (an AsyncCollectiveTensor), without and
    with RMSNorm.forward's clone(): pytorch#151240 says no, then yes."""
    reached = {}
    for name in ("local_map alone", "clone() first"):
        embedding = nn.Embedding(16, 8)
        parallelize_module(embedding, tp_mesh, RowwiseParallel(input_layouts=Replicate(),
                                                               output_layouts=Shard(1)))
        norm = RMSNorm(np.ones(8, np.float32), eps=1e-5)
        norm.shard(tp_mesh)
        x = embedding(torch.arange(8).view(1, 8))      # local (1, 8 / tp, 8), in flight
        if name == "local_map alone":
            y = norm.region(DTensor.from_local(x, tp_mesh, [Shard(1)], run_check=False),
                            norm.weight, norm.eps)
        else:
            y = norm(x)
        y.to_local().pow(2).sum().backward()
        reached[name] = embedding.weight.grad is not None
    return reached


def parity_rank(rank: int, world_size: int, cfg: LlamaConfig, opt: AdamWConfig,
                steps: int, seed: int) -> dict:
    """block_rank, train_rank and the embedding_reaches_norm_gradient check, in
    one process (one start of the world)."""
    return {"block": block_rank(rank, world_size, cfg, seed),
            "train": train_rank(rank, world_size, cfg, opt, steps, seed),
            "async_input": embedding_reaches_norm_gradient(meshes(world_size)[1])}


def run_parity(cfg: LlamaConfig, opt: AdamWConfig, steps: int, seed: int) -> dict:
    """From one world of 4 ranks: block_rank's results joined ("block"), rank 0's
    train_rank ("train") and embedding_reaches_norm_gradient ("async_input")."""
    results = run_world(parity_rank, 4, cfg, opt, steps, seed)
    return {"block": joined_block([r["block"] for r in results]), "train": results[0]["train"],
            "async_input": results[0]["async_input"]}
