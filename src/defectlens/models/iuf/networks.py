"""IUF's network (Tang et al., "An Incremental Unified Framework for Small Defect Inspection",
ECCV 2024), sized for a CPU: a small transformer that reconstructs backbone patch features.

- Object-aware self-attention (OASA): each image gets a semantic feature c (from its pooled
  tokens, trained to tell objects apart with a cross-entropy head); the queries are multiplied
  (Hadamard) by c, so objects attend in separate semantic sub-spaces. No object label is needed at
  test time: c comes from the image itself.
- Semantic compression loss: the singular values of the batch's latent features from index
  ``kept`` on are summed and minimised, so the latent space stays low-rank and the important
  directions few.
- Update projection (``ProjectedUpdates``): every linear weight remembers the channel space of its
  inputs on earlier objects (eigenvectors V_old of their covariance, most important first). When a
  new object is learned, each update Δ is rotated into that basis, scaled per channel index c by
  Ω(k, c) = k·log(c) (c = 1, the most important old direction, gets 0: never rewritten), rotated
  back, and the weights are merged with the previous object's by β. A layer's bias is its weight
  on a constant input 1, so it is projected with the weight ([W | b] against the inputs [x, 1]):
  an unconstrained bias would shift every earlier object's output freely.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


class ObjectAwareAttention(nn.Module):
    """Multi-head self-attention whose queries are modulated by the object's semantic feature."""

    def __init__(self, dims: int, heads: int, object_aware: bool = True):
        super().__init__()
        self.heads, self.object_aware = heads, object_aware
        self.query, self.key, self.value = nn.Linear(dims, dims), nn.Linear(dims, dims), nn.Linear(dims, dims)
        self.out = nn.Linear(dims, dims)

    def forward(self, tokens: torch.Tensor, semantic: torch.Tensor) -> torch.Tensor:
        count, length, dims = tokens.shape
        query = self.query(tokens)
        if self.object_aware:
            query = query * semantic[:, None, :]
        split = lambda x: x.reshape(count, length, self.heads, dims // self.heads).transpose(1, 2)  # noqa: E731
        attended = F.scaled_dot_product_attention(split(query), split(self.key(tokens)), split(self.value(tokens)))
        return self.out(attended.transpose(1, 2).reshape(count, length, dims))


class Block(nn.Module):
    def __init__(self, dims: int, heads: int, object_aware: bool):
        super().__init__()
        self.attention = ObjectAwareAttention(dims, heads, object_aware)
        self.hidden, self.back = nn.Linear(dims, 2 * dims), nn.Linear(2 * dims, dims)

    def forward(self, tokens: torch.Tensor, semantic: torch.Tensor) -> torch.Tensor:
        tokens = tokens + self.attention(tokens, semantic)
        return tokens + self.back(F.gelu(self.hidden(tokens)))


class IUFNetwork(nn.Module):
    """Features (N, C, h, w) -> reconstructed features, the latent tokens and object logits."""

    def __init__(self, channels: int, dims: int = 64, heads: int = 4, layers: int = 2, objects: int = 1,
                 object_aware: bool = True, grid: tuple[int, int] = (16, 16)):
        super().__init__()
        self.grid = tuple(grid)
        self.encode = nn.Linear(channels, dims)
        self.position = nn.Parameter(torch.zeros(1, grid[0] * grid[1], dims))
        self.semantic = nn.Linear(dims, dims)
        self.classify = nn.Linear(dims, objects)
        self.blocks = nn.ModuleList(Block(dims, heads, object_aware) for _ in range(layers))
        self.decode = nn.Linear(dims, channels)
        nn.init.normal_(self.position, std=0.02)

    def add_object(self) -> None:
        """One more row in the object classifier (earlier rows kept)."""
        old = self.classify
        self.classify = nn.Linear(old.in_features, old.out_features + 1)
        with torch.no_grad():
            self.classify.weight[:-1] = old.weight
            self.classify.bias[:-1] = old.bias

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        count, channels, height, width = features.shape
        tokens = self.encode(features.flatten(2).transpose(1, 2)) + self.position
        hidden = F.gelu(self.semantic(tokens.mean(dim=1)))
        semantic = torch.sigmoid(hidden)
        latent = tokens
        for block in self.blocks:
            latent = block(latent, semantic)
        output = self.decode(latent).transpose(1, 2).reshape(count, channels, height, width)
        return output, latent, self.classify(hidden)


def compression_loss(latent: torch.Tensor, kept: int) -> torch.Tensor:
    """Sum of the singular values of the latent features (rows = tokens of the batch, columns =
    channels) from index ``kept`` on: the small ones, which carry little meaning."""
    values = torch.linalg.svdvals(latent.reshape(-1, latent.shape[-1]))
    return values[kept:].sum() / latent.reshape(-1, latent.shape[-1]).shape[0] ** 0.5


def omega(k: float, channels: int) -> torch.Tensor:
    """Ω(k, c) = k·log(c) for channel indices c = 1 … channels (most important old direction first)."""
    return k * torch.log(torch.arange(1, channels + 1, dtype=torch.float32))


class ProjectedUpdates:
    """The input channel spaces of earlier objects for every linear layer of a network, and the
    projection of updates learned on a new object onto them.

    ``record`` accumulates, through forward hooks, the covariance of each linear layer's inputs
    (with a constant 1 appended when the layer has a bias) while the earlier objects' features
    pass through; ``bases`` turns it into V_old (columns = eigenvectors, largest eigenvalue
    first). A layer's parameters are handled as one matrix [W | b] (``weights``), so the bias is
    projected like any other input channel. Covariances recorded without the constant (model
    files written before biases were projected) still project the weight alone."""

    def __init__(self, network: nn.Module, covariances: dict[str, torch.Tensor] | None = None):
        self.network = network
        self.covariances = dict(covariances or {})
        self._bases: dict[str, torch.Tensor] | None = None

    @property
    def layers(self) -> dict[str, nn.Linear]:
        """Looked up each time: adding an object replaces the classifier layer."""
        return {name: module for name, module in self.network.named_modules() if isinstance(module, nn.Linear)}

    @torch.no_grad()
    def record(self, batches) -> None:
        """Add the inputs every linear layer sees on ``batches`` (feature tensors) to its covariance."""
        handles = []
        for name, layer in self.layers.items():
            def hook(module, inputs, output, name=name):
                flat = inputs[0].reshape(-1, inputs[0].shape[-1]).double()
                if module.bias is not None:
                    flat = torch.cat([flat, flat.new_ones(len(flat), 1)], dim=1)
                self.covariances[name] = self.covariances.get(name, 0) + flat.T @ flat
            handles.append(layer.register_forward_hook(hook))
        try:
            for batch in batches:
                self.network(batch)
        finally:
            for handle in handles:
                handle.remove()
        self._bases = None

    def bases(self) -> dict[str, torch.Tensor]:
        if self._bases is None:
            self._bases = {}
            for name, covariance in self.covariances.items():
                _, vectors = torch.linalg.eigh(covariance)
                self._bases[name] = vectors.flip(1).float()  # largest eigenvalue first
        return self._bases

    @staticmethod
    def _matrix(layer: nn.Linear, width: int) -> torch.Tensor:
        """The parameters a basis of ``width`` channels acts on: W, or [W | b] with the constant."""
        if width == layer.in_features + 1 and layer.bias is not None:
            return torch.cat([layer.weight, layer.bias[:, None]], dim=1)
        return layer.weight

    @staticmethod
    def _assign(layer: nn.Linear, matrix: torch.Tensor) -> None:
        layer.weight.copy_(matrix[:, :layer.in_features])
        if matrix.shape[1] > layer.in_features:
            layer.bias.copy_(matrix[:, layer.in_features])

    @torch.no_grad()
    def project(self, before: dict[str, torch.Tensor], k: float, old: dict[str, torch.Tensor] | None = None,
                beta: float = 0.0) -> None:
        """Replace each layer's parameters P = [W | b] by before + ((P - before) V ⊙ Ω(k, c)) V^T,
        then merge the parameters the earlier objects left (``old``) back in:
        P ← (P + β P_old) / (1 + β).

        Ω is capped at 1 so that no direction moves more than the optimiser's own step. The
        write-up adds β·W_old unnormalised; dividing by 1 + β keeps the weights' scale, so the
        merge is a pull towards the old weights at rate β / (1 + β) per step."""
        layers = self.layers
        for name, basis in self.bases().items():
            layer = layers[name]
            matrix = self._matrix(layer, basis.shape[0])
            if matrix.shape != before[name].shape:
                continue
            scale = omega(k, basis.shape[0]).clamp(max=1.0)
            delta = (matrix - before[name]) @ basis
            matrix = before[name] + (delta * scale) @ basis.T
            if old is not None and beta > 0 and name in old and old[name].shape == matrix.shape:
                matrix = (matrix + beta * old[name]) / (1.0 + beta)
            self._assign(layer, matrix)

    def weights(self) -> dict[str, torch.Tensor]:
        """Each layer's parameters as ``project`` sees them: [W | b] where its basis includes the
        constant input (every layer before anything is recorded), else W."""
        widths = {name: basis.shape[0] for name, basis in self.bases().items()}
        return {name: self._matrix(layer, widths.get(name, layer.in_features + 1)).detach().clone()
                for name, layer in self.layers.items()}


def default_k(channels: int) -> float:
    """k with Ω(k, channels) = 1: in a layer with ``channels`` inputs the least important direction
    is updated freely (in wider layers, every direction from that index on)."""
    return 1.0 / math.log(channels) if channels > 1 else 1.0
