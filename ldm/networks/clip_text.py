"""CLIP's text transformer (Radford et al. 2021) in plain torch: the module tree, state-dict keys, config.json and
outputs of transformers' CLIPTextModel / CLIPTextModelWithProjection, without importing transformers.

A pipeline folder's `text_encoder/` loads into these classes (ldm.networks.text.TextEncoder.from_pretrained), so
generating never imports transformers, which costs seconds of start-up (issue 32). Their outputs equal transformers'
bit for bit on the same weights (tests/networks/test_clip_text.py); transformers' classes remain accepted wherever a
text model is (seeded `TextEncoder.from_config`, the CLIP stage, hub names).

Each block: x + attn(LN1(x)) under the causal mask, then x + MLP(LN2(x)); the last block's output goes through
final_layer_norm; `pooler_output` is the state at the first eos token (argmax of the ids when eos_token_id is the
legacy 2).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ldm.io import read_config

_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "projection_dim", "num_hidden_layers",
          "num_attention_heads", "max_position_embeddings")


@dataclass
class CLIPTextConfig:
    """The keys of transformers' CLIPTextConfig a text tower needs (their defaults: OpenAI's ViT-B/32 tower); the
    other keys of a config.json are kept in `extra` and written back (`from_dict`)."""

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    attention_dropout: float = 0.0
    pad_token_id: int | None = 1
    bos_token_id: int | None = 49406
    eos_token_id: int | None = 49407
    architectures: list[str] | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in _SIZES:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"CLIP text config: {name} must be a positive integer, got {value!r}")
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"CLIP text config: {name} must be a token id (an integer >= 0) or null, got "
                                 f"{value!r}")
        if not isinstance(self.hidden_act, str) or self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"CLIP text config: hidden_act {self.hidden_act!r} is not supported; valid: "
                             f"{sorted(ACTIVATIONS)}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"CLIP text config: hidden_size {self.hidden_size} is not divisible by "
                             f"num_attention_heads {self.num_attention_heads}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CLIPTextConfig:
        """A config.json's dict (transformers' key names); unknown keys go to `extra`, but for the writer's bookkeeping
        ("transformers_version", "_name_or_path", ...), which says nothing of the model."""
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        extra = {k: v for k, v in data.items() if k not in names and k != "transformers_version" and k[:1] != "_"}
        return cls(**{k: v for k, v in data.items() if k in names}, extra=extra)

    @classmethod
    def from_json_file(cls, path: str | Path) -> CLIPTextConfig:
        """A config.json; errors name the file (and the key)."""
        return read_config(path, cls.from_dict)

    def layer_counts(self) -> list[tuple[str, int, str]]:
        """(config key, count, the state-dict keys holding one per layer, N the index): which config key asks for
        more layers than a weight file holds (ldm.io.check_layer_counts)."""
        return [("num_hidden_layers", self.num_hidden_layers, "encoder.layers.N.")]

    def to_dict(self) -> dict[str, Any]:
        """config.json's content: the kept keys, then ours, and model_type."""
        ours = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        return {**self.extra, **ours, "model_type": "clip_text_model"}


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(1.702 x): the GELU approximation OpenAI's CLIP was trained with."""
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {
    "gelu": F.gelu,
    "quick_gelu": quick_gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}


def _item(output: Any, i: int | str) -> Any:
    """transformers' ModelOutput indexing: a name, or a position among the fields that are not None."""
    if isinstance(i, str):
        return getattr(output, i)
    return tuple(v for f in dataclasses.fields(output) if (v := getattr(output, f.name)) is not None)[i]


@dataclass
class CLIPTextOutput:
    """transformers' BaseModelOutputWithPooling: index 0 is last_hidden_state, as diffusers reads it."""

    last_hidden_state: torch.Tensor
    pooler_output: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...] | None = None

    def __getitem__(self, i: int | str) -> Any:
        return _item(self, i)


@dataclass
class CLIPTextProjectionOutput:
    """transformers' CLIPTextModelOutput: index 0 is text_embeds."""

    text_embeds: torch.Tensor
    last_hidden_state: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...] | None = None

    def __getitem__(self, i: int | str) -> Any:
        return _item(self, i)


def _embedding(n: int, d: int) -> nn.Embedding:
    """nn.Embedding(n, d) drawn from N(0, 0.02^2) (transformers' CLIP init), left undrawn on the meta device: there
    `normal_` runs through torch._refs, whose first call imports torch._dynamo (~1.4 s of start-up)."""
    weight = torch.empty(n, d)
    if not weight.is_meta:
        nn.init.normal_(weight, std=0.02)
    return nn.Embedding(n, d, _weight=weight)


class CLIPTextEmbeddings(nn.Module):
    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        self.token_embedding = _embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = _embedding(config.max_position_embeddings, config.hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        n = input_ids.shape[-1]
        if n > self.position_embedding.num_embeddings:
            raise ValueError(f"{n} tokens, but the text model has {self.position_embedding.num_embeddings} positions")
        return self.token_embedding(input_ids) + self.position_embedding.weight[:n]  # (B, n, D)


class CLIPAttention(nn.Module):
    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        d = config.hidden_size
        self.num_heads, self.head_dim = config.num_attention_heads, d // config.num_attention_heads
        self.scale, self.dropout = self.head_dim**-0.5, config.attention_dropout
        self.k_proj, self.v_proj, self.q_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = (p(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))  # (B, heads, n, head_dim)
        p = self.dropout if self.training else 0.0
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True, scale=self.scale)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, scale=self.scale)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, -1))


class CLIPMLP(nn.Module):
    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        self.activation_fn = ACTIVATIONS[config.hidden_act]
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation_fn(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        self.self_attn = CLIPAttention(config)
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(config) for _ in range(config.num_hidden_layers))


class CLIPTextModel(nn.Module):
    """transformers' CLIPTextModel: token ids (B, n) -> last_hidden_state (B, n, D) after final_layer_norm,
    pooler_output (B, D), and with output_hidden_states the embeddings and every block's output (L + 1 tensors)."""

    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = CLIPTextEmbeddings(config)
        self.encoder = CLIPEncoder(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    @property
    def dtype(self) -> torch.dtype:
        return self.final_layer_norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.final_layer_norm.weight.device

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                output_hidden_states: bool = False) -> CLIPTextOutput:
        """`attention_mask` (B, n): 1 for tokens to attend to, 0 for padding (combined with the causal mask)."""
        input_ids = input_ids.view(-1, input_ids.shape[-1])
        x = self.embeddings(input_ids)  # (B, n, D)
        mask = None
        if attention_mask is not None:
            n = input_ids.shape[1]
            causal = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
            mask = causal & attention_mask.to(device=x.device, dtype=torch.bool)[:, None, None, :]  # (B, 1, n, n)
        states = [x]
        for layer in self.encoder.layers:
            x = layer(x, mask)
            states.append(x)
        last = self.final_layer_norm(x)
        ids = input_ids.to(dtype=torch.int, device=last.device)
        legacy = self.config.eos_token_id == 2  # configs before transformers#24773: eos is the largest id
        eos = ids.argmax(dim=-1) if legacy else (ids == self.config.eos_token_id).int().argmax(dim=-1)
        pooled = last[torch.arange(last.shape[0], device=last.device), eos]  # (B, D)
        return CLIPTextOutput(last, pooled, tuple(states) if output_hidden_states else None)


class CLIPTextModelWithProjection(nn.Module):
    """transformers' CLIPTextModelWithProjection (SDXL's second encoder): text_model plus text_projection of the
    pooled state."""

    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        self.config = config
        self.text_model = CLIPTextModel(config)
        self.text_projection = nn.Linear(config.hidden_size, config.projection_dim, bias=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.text_model.dtype

    @property
    def device(self) -> torch.device:
        return self.text_model.device

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                output_hidden_states: bool = False) -> CLIPTextProjectionOutput:
        out = self.text_model(input_ids, attention_mask, output_hidden_states)
        return CLIPTextProjectionOutput(self.text_projection(out.pooler_output), out.last_hidden_state,
                                        out.hidden_states)


def model_class(config: CLIPTextConfig) -> type[CLIPTextModel] | type[CLIPTextModelWithProjection]:
    """CLIPTextModelWithProjection when config.json names it (SDXL's second encoder), else CLIPTextModel."""
    return CLIPTextModelWithProjection if "CLIPTextModelWithProjection" in (config.architectures or []) \
        else CLIPTextModel
