"""Text conditioning: the CLIP / OpenCLIP text encoders that turn prompts into c (tokenizer: ldm.networks.tokenizer;
what they share, long prompts and emphasis: ldm.networks.prompt_encoder).

Stable Diffusion 1.x conditions on the last hidden state of a CLIPTextModel (ViT-L/14, pad token "<|endoftext|>");
2.x on the penultimate layer of an OpenCLIP ViT-H/14 text tower, final LayerNorm applied (pad "!").
diffusers' `clip_skip=k` means final_layer_norm(hidden_states[-(k + 1)]): "last" is k=0, "penultimate" is k=1.
A folder's text_encoder/ loads into our CLIPTextModel (ldm.networks.clip_text: transformers' keys and outputs, without
importing transformers); transformers' own CLIPTextModel(WithProjection) is accepted too (seeded from_config, hub
names).
"""

from __future__ import annotations

import copy
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ldm.io import ConfigError, WeightsError, build_on_meta, load_state_dict, read_header, save_state_dict, write_text
from ldm.networks import clip_text
from ldm.networks.prompt_encoder import Layer, PromptEncoder, clip_skip_of  # noqa: F401  (clip_skip_of: re-exported)
from ldm.networks.tokenizer import EOS, CLIPTokenizer, build_clip_tokenizer, load_tokenizer, save_tokenizer
from ldm.random import seeded

# ours (ldm.networks.clip_text) or transformers' CLIPTextModel / CLIPTextModelWithProjection
TextModel = nn.Module


def is_clip_text_model(model: Any) -> bool:
    """A CLIPTextModel(WithProjection), ours or transformers' (without importing transformers to ask)."""
    if isinstance(model, (clip_text.CLIPTextModel, clip_text.CLIPTextModelWithProjection)):
        return True
    theirs = sys.modules.get("transformers.models.clip.modeling_clip")  # not loaded: no instance of it can exist
    return theirs is not None and isinstance(model, (theirs.CLIPTextModel, theirs.CLIPTextModelWithProjection))


# ------------------------------------------------------------------------------------------ CLIP (transformers)
def _core(model: nn.Module) -> nn.Module:
    """The module holding embeddings/encoder/final_layer_norm (transformers 5 CLIPTextModel is that module itself)."""
    return model.text_model if hasattr(model, "text_model") else model


def hub_state_dict(model: TextModel) -> dict[str, torch.Tensor]:
    """State dict with the keys diffusers folders use on disk ("text_model.encoder.layers.0...")."""
    out = {}
    for key, value in model.state_dict().items():
        hub = key if key.startswith(("text_model.", "text_projection.")) else "text_model." + key
        if not hub.endswith("position_ids"):
            out[hub] = value
    return out


def load_hub_state_dict(model: TextModel, state: dict[str, torch.Tensor]) -> None:
    """Load hub-layout keys into `model` strictly, with an error naming missing/unexpected/mis-shaped keys."""
    model.load_state_dict(own_keys(model, state), strict=False)


def own_keys(model: TextModel, state: Mapping[str, torch.Tensor], *, what: str = "text encoder"
             ) -> dict[str, torch.Tensor]:
    """Hub-layout keys renamed to `model`'s (which may sit on the meta device, as may `state`: a file's header),
    every key and shape checked; errors (WeightsError) name `what` and the key."""
    own = model.state_dict()
    mapped = {}
    for key, value in state.items():
        if key.endswith("position_ids"):
            continue
        candidates = [key, key.removeprefix("text_model."), "text_model." + key]
        target = next((c for c in candidates if c in own), None)
        if target is None:
            raise WeightsError(f"{what}: unexpected key {key!r} for {type(model).__name__}")
        if tuple(own[target].shape) != tuple(value.shape):
            raise WeightsError(f"{what}: {key}: expected shape {tuple(own[target].shape)}, got {tuple(value.shape)}")
        mapped[target] = value
    missing = sorted(k for k in own if k not in mapped and not k.endswith("position_ids"))
    if missing:
        raise WeightsError(f"{what}: missing key(s) for {type(model).__name__}: {missing[:5]}"
                           f"{' ...' if len(missing) > 5 else ''}")
    return mapped


def checked_hub_keys(model: TextModel, state: Mapping[str, torch.Tensor], *, what: str = "text encoder"
                     ) -> dict[str, torch.Tensor]:
    """`own_keys`, every tensor also of a floating dtype (integer or boolean weights refused, naming the key)."""
    mapped = own_keys(model, state, what=what)
    for key, value in mapped.items():
        if not value.is_floating_point():
            raise WeightsError(f"{what}: {key} holds {value.dtype} values where the text model has floating weights")
    return mapped


def meta_text_model(config: clip_text.CLIPTextConfig, spec: Mapping[str, torch.Tensor], *,
                    what: str = "text encoder", model_class: type[nn.Module] | None = None) -> TextModel:
    """Our CLIP text model of `config` (`model_class`, else the one config.json names) on the meta device (no memory,
    no random initialisation), checked against the hub-layout weights `spec` (a file's header, ldm.io.read_header, or
    its tensors) before any is read: its layer count, its size and every key, shape and dtype kind
    (ldm.io.build_on_meta, `checked_hub_keys`)."""
    cls = model_class or clip_text.model_class(config)
    model = build_on_meta(lambda: cls(config), spec, what=what, counts=config.layer_counts())
    checked_hub_keys(model, spec, what=what)
    return model


def assign_hub_state_dict(model: TextModel, state: dict[str, torch.Tensor], dtype: torch.dtype | None = None,
                          *, what: str = "text encoder") -> None:
    """Give `model` (built on the meta device: no random initialisation) the hub-layout tensors of `state`, every key
    and shape checked (`checked_hub_keys`), as float32 (or `dtype`) whatever float they were stored in."""
    mapped = checked_hub_keys(model, state, what=what)
    model.load_state_dict({k: v.to(dtype or torch.float32) for k, v in mapped.items()}, strict=True, assign=True)


def check_tokenizer_fits(tokenizer: CLIPTokenizer, config: clip_text.CLIPTextConfig, *, what: str) -> None:
    """The tokenizer's ids must index the text model's token embedding, and the length it pads prompts to fit the
    model's positions (both sizes checked against the weights): else prompts would fail, or pad to any length, at
    generate time. ConfigError naming both keys."""
    if tokenizer.model_max_length > config.max_position_embeddings:
        raise ConfigError(f"{what}: the tokenizer pads prompts to {tokenizer.model_max_length} tokens "
                          f"(model_max_length), past the text model's {config.max_position_embeddings} positions "
                          "(max_position_embeddings)")
    largest = max(max(tokenizer.vocab.values(), default=-1), len(tokenizer) - 1)  # added tokens follow the vocabulary
    if largest >= config.vocab_size:
        raise ConfigError(f"{what}: the tokenizer has token id {largest}, past the text model's vocab_size "
                          f"{config.vocab_size} (its token embedding)")


class TextEncoder(PromptEncoder):
    """A CLIPTokenizer and a CLIPTextModel (SD 1.x/2.x `text_encoder/`; ours or transformers'): prompts -> (B, n, D),
    n the tokenizer's model_max_length (77 in SD)."""

    def __init__(self, tokenizer: CLIPTokenizer, model: TextModel, layer: Layer = "last") -> None:
        super().__init__(tokenizer, layer)
        if not is_clip_text_model(model):
            raise TypeError(f"model must be a CLIPTextModel, got {type(model).__name__}")
        self.model = model
        self.train(model.training)  # the wrapper's mode is its model's (empty_embedding caches in eval mode)

    @classmethod
    def from_config(cls, config: Any, *, seed: int = 0, pad_token: str = EOS,
                    layer: Layer = "last") -> TextEncoder:
        """A randomly initialised encoder (seeded) with the offline tokenizer: for tests and tiny models. `config`: a
        transformers CLIPTextConfig (transformers' CLIPTextModel and its initialisation), or ours (our model)."""
        with seeded(seed):
            if isinstance(config, clip_text.CLIPTextConfig):
                model = clip_text.model_class(config)(config)
            else:
                from transformers import CLIPTextModel

                model = CLIPTextModel(config)
        return cls(build_clip_tokenizer(pad_token), model.eval(), layer)

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def num_layers(self) -> int:
        return int(self.model.config.num_hidden_layers)

    def hidden_states(self, input_ids: torch.Tensor, skip: int) -> torch.Tensor:
        """diffusers' encode_prompt: last_hidden_state, or final_layer_norm(hidden_states[-(skip + 1)])."""
        if skip == 0:
            return self.model(input_ids=input_ids).last_hidden_state
        states = self.model(input_ids=input_ids, output_hidden_states=True).hidden_states
        return _core(self.model).final_layer_norm(states[-(skip + 1)])

    def save_pretrained(self, folder: str | Path, *, subfolders: tuple[str, str] = ("text_encoder", "tokenizer")
                        ) -> None:
        """Write `text_encoder/` (config.json, model.safetensors) and `tokenizer/` in diffusers layout, atomically
        (`subfolders`: other names, e.g. SDXL's text_encoder_2/ and tokenizer_2/)."""
        out = Path(folder) / subfolders[0]
        config = self.model.config.to_dict()
        config["architectures"] = [type(self.model).__name__]
        write_text(json.dumps(config, indent=2, sort_keys=True, default=str), out / "config.json")
        tensors = {k: v.detach().contiguous().cpu() for k, v in hub_state_dict(self.model).items()}
        save_state_dict(tensors, out / "model.safetensors", metadata={"format": "pt"})
        save_tokenizer(self.tokenizer, Path(folder) / subfolders[1])

    @classmethod
    def from_pretrained(cls, folder: str | Path, *, layer: Layer = "last", dtype: torch.dtype | None = None,
                        subfolders: tuple[str, str] = ("text_encoder", "tokenizer")) -> TextEncoder:
        """Load `text_encoder/` + `tokenizer/` (`subfolders`: other names, e.g. SDXL's text_encoder_2/ and
        tokenizer_2/, local folders only) from a local diffusers folder, or from the hub when one is reachable."""
        path = Path(folder)
        if path.is_dir():
            return cls._from_folder(path, layer, dtype, subfolders)
        if path.is_absolute() or str(folder).startswith((".", "~")) or str(folder).count("/") != 1:
            raise FileNotFoundError(f"model folder not found: {folder}")
        from huggingface_hub import snapshot_download
        from transformers import CLIPTextConfig

        try:  # a hub name "owner/model": transformers' own loaders, which need the network
            config = CLIPTextConfig.from_pretrained(str(folder), subfolder="text_encoder")
            model_cls = _transformers_class(config)
            model = model_cls.from_pretrained(str(folder), subfolder="text_encoder", dtype=dtype or torch.float32)
            files = Path(snapshot_download(str(folder), allow_patterns=["tokenizer/*"]))
            tokenizer = load_tokenizer(files / "tokenizer")
        except OSError as e:
            raise OSError(
                f"could not load {folder!r} from the Hugging Face hub: no hub is reachable from here (or the repo does "
                f"not exist). Pass a local folder in diffusers layout (text_encoder/ and tokenizer/) instead. ({e})"
            ) from e
        return cls(tokenizer, model.eval(), layer)

    @classmethod
    def _from_folder(cls, path: Path, layer: Layer, dtype: torch.dtype | None,
                     subfolders: tuple[str, str] = ("text_encoder", "tokenizer")) -> TextEncoder:
        """The config checked against the weight file's header on the meta device, and the tokenizer against the
        config, before any tensor is read (`meta_text_model`, `check_tokenizer_fits`)."""
        enc, tok = path / subfolders[0], path / subfolders[1]
        for needed in (enc / "config.json", enc / "model.safetensors", tok):
            if not needed.exists():
                extra = " (pickle weights are not read; convert to safetensors)" if needed.suffix == ".safetensors" \
                    and any(enc.glob("*.bin")) else ""
                raise FileNotFoundError(f"{path} is not a diffusers text-encoder folder: {needed} is missing{extra}")
        config = clip_text.CLIPTextConfig.from_json_file(enc / "config.json")
        weights = enc / "model.safetensors"
        model = meta_text_model(config, read_header(weights), what=str(enc))
        tokenizer = load_tokenizer(tok)
        check_tokenizer_fits(tokenizer, config, what=str(path))
        assign_hub_state_dict(model, load_state_dict(weights), dtype, what=str(enc))
        return cls(tokenizer, model.eval(), layer)


def _transformers_class(config: Any) -> Any:
    """transformers' CLIPTextModelWithProjection when config.json names it (SDXL's second encoder), else
    CLIPTextModel."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    names = getattr(config, "architectures", None) or []
    return CLIPTextModelWithProjection if "CLIPTextModelWithProjection" in names else CLIPTextModel


# ------------------------------------------------------------------------------------------------- OpenCLIP
class OpenCLIPTextEncoder(PromptEncoder):
    """An open_clip text tower (CLIP, CustomTextCLIP or TextTransformer) -> per-token states after ln_final; the
    default tokenizer pads with "!" to the tower's context length (its positional table)."""

    def __init__(self, model: nn.Module, tokenizer: CLIPTokenizer | None = None, layer: Layer = "last") -> None:
        tower = getattr(model, "text", model)  # CustomTextCLIP keeps its tower in .text
        for name in ("token_embedding", "positional_embedding", "transformer", "ln_final"):
            if not hasattr(tower, name):
                raise TypeError(f"{type(model).__name__} is not an open_clip text tower: it has no {name!r}")
        if getattr(tower, "cls_emb", None) is not None:
            raise NotImplementedError("open_clip text towers with a class token (CoCa) are not supported")
        if getattr(tower, "attn_mask", None) is None:
            raise NotImplementedError("open_clip text towers without a causal mask are not supported")
        if tokenizer is None:
            tokenizer = build_clip_tokenizer(pad_token="!", model_max_length=int(tower.positional_embedding.shape[0]))
        super().__init__(tokenizer, layer)
        self.model = model
        self.tower = tower
        self.train(model.training)  # the wrapper's mode is its model's (empty_embedding caches in eval mode)

    @classmethod
    def from_config(cls, config: dict, *, seed: int = 0, layer: Layer = "last") -> OpenCLIPTextEncoder:
        """An open_clip model built from a config dict (embed_dim, vision_cfg, text_cfg[, custom_text]), seeded."""
        import open_clip

        config = copy.deepcopy(config)
        model_cls = open_clip.CustomTextCLIP if config.pop("custom_text", False) else open_clip.CLIP
        with seeded(seed):
            model = model_cls(**config)
        return cls(model.eval(), layer=layer)

    @classmethod
    def from_file(cls, config: dict, path: str | Path, *, layer: Layer = "last",
                  allow_pickle: bool = False) -> OpenCLIPTextEncoder:
        """Build from `config` and load open_clip weights from a local .safetensors (pickle only if allowed)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"open_clip weights not found: {path}")
        state = load_state_dict(path, allow_pickle=allow_pickle)  # pickle only if allowed, and then weights-only
        enc = cls.from_config(config, layer=layer)
        enc.model.load_state_dict(state, strict=False)  # visual tower keys may be absent; text keys checked below
        own = {k for k in enc.model.state_dict() if not k.startswith("visual.")}
        missing = sorted(own - set(state))
        if missing:
            raise KeyError(f"{path} lacks text-tower key(s) {missing[:5]}")
        return enc

    @property
    def hidden_size(self) -> int:
        return int(self.tower.ln_final.weight.shape[0])

    @property
    def num_layers(self) -> int:
        return len(self.tower.transformer.resblocks)

    def hidden_states(self, input_ids: torch.Tensor, skip: int) -> torch.Tensor:
        """ln_final(output of the first L - skip residual blocks) under the causal mask, as SD 2.x's embedder."""
        tower, n = self.tower, input_ids.shape[1]
        cast = tower.transformer.get_cast_dtype()
        x = tower.token_embedding(input_ids).to(cast) + tower.positional_embedding[:n].to(cast)  # (B, n, D)
        mask = tower.attn_mask[:n, :n].to(x.dtype)
        batch_first = getattr(tower.transformer, "batch_first", True)
        if not batch_first:
            x = x.transpose(0, 1)
        for block in tower.transformer.resblocks[: self.num_layers - skip]:
            x = block(x, attn_mask=mask)
        if not batch_first:
            x = x.transpose(0, 1)
        return tower.ln_final(x)
