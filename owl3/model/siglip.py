"""SigLIP vision tower, up to ``hidden_states[-2]`` (spec §3).

Only the first ``num_hidden_layers - 1`` encoder layers are built and run: the official model reads the
output of the second-to-last layer and discards the last layer, the post-layernorm and the pooling head.
Attention is the eager SigLIP math of transformers 4.41 (softmax in fp32, cast back), so fp16/bf16 runs
round like the official model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from owl3.config import VisionConfig


class SiglipVisionEmbeddings(nn.Module):
    """Conv patchify (stride = patch, 'valid' padding) plus learned position embeddings. No CLS token."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.patch_embedding = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size
        )
        self.position_embedding = nn.Embedding(config.num_patches, config.hidden_size)

    def forward(self, pixel_values: Tensor) -> Tensor:
        """[N, 3, S, S] -> [N, P, Dv]."""
        patches = self.patch_embedding(pixel_values).flatten(2).transpose(1, 2)
        return patches + self.position_embedding.weight[None]


class SiglipAttention(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.scale = self.head_dim**-0.5
        dim = config.hidden_size
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        n, p, dim = x.shape
        q = self.q_proj(x).view(n, p, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(n, p, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(n, p, self.num_heads, self.head_dim).transpose(1, 2)
        weights = torch.matmul(q, k.transpose(2, 3)) * self.scale  # [N, heads, P, P]
        weights = F.softmax(weights, dim=-1, dtype=torch.float32).to(q.dtype)
        out = torch.matmul(weights, v).transpose(1, 2).reshape(n, p, dim)
        return self.out_proj(out)


class SiglipMLP(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SiglipEncoderLayer(nn.Module):
    """Pre-LayerNorm block: x + attn(LN1(x)), then x + mlp(LN2(x))."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.self_attn = SiglipAttention(config)
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = SiglipMLP(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class SiglipEncoder(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(SiglipEncoderLayer(config) for _ in range(config.layers_run))

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class SiglipVisionTransformer(nn.Module):
    """pixel_values [N, 3, S, S] -> hidden_states[-2] of the full tower, [N, P, Dv]."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = SiglipVisionEmbeddings(config)
        self.encoder = SiglipEncoder(config)

    def forward(self, pixel_values: Tensor) -> Tensor:
        return self.encoder(self.embeddings(pixel_values))
