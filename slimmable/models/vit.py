"""Slimmable vision transformers, DeiT-like: ``slim_vit_tiny`` and ``slim_vit_small``.

A width runs a fraction of every block's attention heads (each head keeps its size and softmax scale) and of its
MLP hidden units; ``slim_embed=True`` also narrows the residual stream (the patch embedding's output, every
LayerNorm, the class token and the position embeddings, every projection into and out of the stream), so that
each width is a smaller ViT of the same depth. Module names follow timm's ``VisionTransformer`` (``blocks.3.attn.qkv``,
``blocks.3.mlp.fc1``, ``norm``, ``head``); only the class token and the position embeddings live in
``patch_embed`` (:func:`timm_state_dict` maps a timm ViT's state dict).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from ..nn import SlimLayerNorm, SlimLinear, SlimMultiheadAttention, SlimPatchEmbed, make_divisible, slim_mlp
from ..nn.channels import ChannelRule
from ._base import ChannelPlan, NormFactory, SlimNet
from ._registry import register_model

__all__ = ["Block", "SlimVisionTransformer", "layer_norm", "slim_vit_small", "slim_vit_tiny", "timm_state_dict"]


def layer_norm(rule: ChannelRule | None, channels: int) -> nn.Module:
    """The ViT's norm factory (:data:`~slimmable.models.NormFactory`): LayerNorm (eps 1e-6, as DeiT), slimmable
    over its features when they follow ``rule``.

    LayerNorm keeps no running statistics: it normalises each token over its own features at every call, so unlike
    BatchNorm one layer serves every width, with no switchable copy per width; a slimmed stream takes the first
    ``c`` entries of the affine (:class:`~slimmable.nn.SlimLayerNorm`).
    """
    norm = nn.LayerNorm(channels, eps=1e-6)
    return norm if rule is None else SlimLayerNorm(norm)


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``.

    Args:
        dim: residual stream features at full width.
        num_heads: attention heads at full width (``head_dim = dim // num_heads``).
        plan: the model's channel plan (its norm factory builds ``norm1``/``norm2``).
        heads: active heads per width.
        hidden: active MLP hidden units per width (``hidden.max_channels`` units built).
        stream: active residual stream features per width (``None``: ``dim`` at every width).
        num_kv_heads: key/value heads (grouped-query attention); default ``num_heads``.
        qkv_bias: bias of the packed q/k/v projection.
        attn_layer: the attention factory (:class:`~slimmable.nn.SlimMultiheadAttention`'s signature).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        plan: ChannelPlan,
        heads: ChannelRule,
        hidden: ChannelRule,
        stream: ChannelRule | None,
        num_kv_heads: int | None = None,
        qkv_bias: bool = True,
        attn_layer: Callable[..., nn.Module] = SlimMultiheadAttention,
    ) -> None:
        super().__init__()
        self.norm1 = plan.norm(stream, dim)
        self.attn = attn_layer(
            dim, num_heads, dim // num_heads, num_kv_heads, qkv_bias, head_rule=heads, out_rule=stream
        )
        self.norm2 = plan.norm(stream, dim)
        self.mlp = slim_mlp(dim, hidden.max_channels, hidden_rule=hidden, out_rule=stream)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def default_widths(num_groups: int) -> tuple[float, ...]:
    """Widths that run whole numbers of heads: quarters when ``num_groups`` (key/value heads) divides by 4, else
    thirds, halves, or 1.0 alone."""
    n = next(k for k in (4, 3, 2, 1) if num_groups % k == 0)
    return tuple(k / n for k in range(1, n + 1))


class SlimVisionTransformer(SlimNet):
    """Slimmable vision transformer (DeiT-like: class token, learned position embeddings, pre-norm blocks, GELU
    MLP, the class token's final features classified).

    Widths and heads: a width ``w`` runs ``round(num_heads * w)`` heads of every block (the project's rounding of
    channels with divisor 1: the nearest whole head, never more than 10% below, at least one; in whole groups with
    grouped key/value heads), ``make_divisible(mlp_hidden * w, 8)`` MLP hidden units, and, with ``slim_embed``,
    ``heads * head_dim`` residual-stream features (each width a standard ViT: ``dim = heads * head_dim``). Few heads
    allow few distinct widths: DeiT-Tiny's 3 heads run at 1/3, 2/3 and 1.0 (its default widths); 0.5 rounds to 2
    heads, 0.25 to 1. Widths above 1.0 are refused (a transformer's width runs a fraction of the heads built).

    The default widths run whole numbers of heads: quarters when the heads (key/value heads) divide by 4, else
    thirds (``slim_vit_tiny``: 1/3, 2/3, 1.0; ``slim_vit_small``: 2, 4 and 6 of its 6 heads), halves or 1.0.

    Universally slimmable (``width_range=(lo, hi)``, US-Nets' sandwich rule and in-place distillation): any width in
    the range, each running ``head_count(num_heads, w / hi)`` heads and as many MLP units as a US-Net's channels.
    LayerNorm keeps no statistics, so every width runs as it is, with no calibration; ``stat_widths`` only names
    the widths the model lists (:attr:`widths`: evaluated each run and reported), default the range's ends.

    Args:
        widths: the switches; default :func:`default_widths` of the head count.
        width_range: ``(lo, hi)``: a universally slimmable ViT (any width in the range); excludes ``widths``.
        stat_widths: with ``width_range``: the widths listed (evaluated, reported); default ``(lo, hi)``.
        num_classes: classifier outputs.
        in_chans: image channels.
        img_size: the image side the position embeddings are learned for (default 224; ``small_input``: 28).
            Other sides run with the embeddings interpolated.
        patch_size: patch side (default 16; ``small_input``: 4, a 7x7 grid of 4x4 patches on 28-px images).
        embed_dim: residual stream features at full width.
        depth: transformer blocks.
        num_heads: attention heads at full width; ``embed_dim`` must divide by it.
        num_kv_heads: key/value heads (grouped-query attention), dividing ``num_heads``; default ``num_heads``.
        mlp_ratio: MLP hidden units per stream feature.
        qkv_bias: bias of the q/k/v projections.
        slim_embed: also slim the residual stream (default: only heads and MLP units slim).
        small_input: 28x28 / 32x32 images (Fashion-MNIST, CIFAR): ``img_size`` 28 and ``patch_size`` 4 by default.
        drop_rate: dropout before the classifier.
        norm_layer: the norm factory (:data:`~slimmable.models.NormFactory`); default :func:`layer_norm`.
        attn_layer: the attention factory, called as :class:`~slimmable.nn.SlimMultiheadAttention`.

    Stages (:attr:`feature_info`): one per block, ``blocks.0`` ... ``blocks.{depth-1}``, each giving tokens
    ``(N, 1 + num_patches, C)`` (class token first; ``C`` the stream's features at the width, stride
    ``patch_size``). :meth:`forward_features` returns the last block's tokens; :meth:`forward_head` applies the final
    norm and classifies the class token.
    """

    trunk_name = "blocks"
    trunk_pools = False
    head_names = ("norm", "head")

    def __init__(
        self,
        widths: Sequence[float] | None = None,
        width_range: tuple[float, float] | None = None,
        stat_widths: Sequence[float] | None = None,
        num_classes: int = 1000,
        in_chans: int = 3,
        img_size: int | None = None,
        patch_size: int | None = None,
        embed_dim: int = 192,
        depth: int = 12,
        num_heads: int = 3,
        num_kv_heads: int | None = None,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        slim_embed: bool = False,
        small_input: bool = False,
        drop_rate: float = 0.0,
        norm_layer: NormFactory | None = None,
        attn_layer: Callable[..., nn.Module] = SlimMultiheadAttention,
    ) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} must be divisible by num_heads {num_heads}")
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if num_kv_heads < 1 or num_heads % num_kv_heads:
            raise ValueError(f"num_kv_heads {num_kv_heads} must divide num_heads {num_heads}")
        img_size = (28 if small_input else 224) if img_size is None else img_size
        patch_size = (4 if small_input else 16) if patch_size is None else patch_size
        if width_range is not None and widths is not None:
            raise ValueError(
                f"widths {tuple(widths)} are an S-Net's switches but width_range {tuple(width_range)} builds a "
                "universally slimmable ViT (any width in the range); give one of them (stat_widths lists range widths)"
            )
        widths = default_widths(num_kv_heads) if widths is None else widths
        plan = ChannelPlan(widths, make_divisible, width_range, stat_widths, norm=norm_layer or layer_norm)
        # what get_widths lists for a range model: LayerNorm holds no per-width statistics to read them off
        self.listed_widths = plan.stat_widths if plan.is_us else None
        head_dim = embed_dim // num_heads
        heads = plan.heads(num_heads, num_heads // num_kv_heads)
        stream = plan.scaled(heads, head_dim) if slim_embed else None
        hidden = plan.rule(int(embed_dim * mlp_ratio))
        self.num_classes, self.num_features, self.embed_dim = num_classes, embed_dim, embed_dim
        self.patch_size, self.img_size = patch_size, img_size
        # the input export and profiling record with by default (see slimmable._utils.example_input)
        self.example_input_size = (in_chans, img_size, img_size)

        self.patch_embed = SlimPatchEmbed(img_size, patch_size, in_chans, embed_dim, out_rule=stream)
        blocks = [
            Block(embed_dim, num_heads, plan, heads, hidden, stream, num_kv_heads, qkv_bias, attn_layer)
            for _ in range(depth)
        ]
        self.blocks = nn.Sequential(*blocks)
        self.norm = plan.norm(stream, embed_dim)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = SlimLinear(embed_dim, num_classes) if slim_embed else nn.Linear(embed_dim, num_classes)
        self._set_stages([(f"blocks.{i}", i + 1, patch_size, stream, embed_dim) for i in range(depth)])
        _init_weights(self)

    def _forward_stem_input(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, in_chans, H, W)`` → tokens ``(N, 1 + num_patches, C)``: patches, class token, positions."""
        return self.patch_embed(x)

    def forward_logits(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, in_chans, H, W)`` → logits ``(N, num_classes)`` at the current width."""
        return self.forward_head(self.forward_features(x))

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens ``(N, 1 + L, C)`` → logits: the final norm, then the classifier on the class token."""
        x = self.norm(x)
        return self.head(self.head_drop(x[:, 0]))

    def channel_groups(self) -> list[list[str]]:
        raise NotImplementedError(
            "channel search (AutoSlim) runs on the CNN families; a ViT's widths slim heads, not channels"
        )


def _init_weights(model: SlimVisionTransformer) -> None:
    """timm's ViT initialisation: truncated-normal (std 0.02) linear layers and position embeddings, zero biases,
    a near-zero class token; the patch projection keeps PyTorch's default."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    nn.init.trunc_normal_(model.patch_embed.pos_embed, std=0.02)
    if model.patch_embed.cls_token is not None:
        nn.init.normal_(model.patch_embed.cls_token, std=1e-6)


#: timm's ``VisionTransformer`` names of the tensors whose names differ here
_TIMM_KEYS = {"cls_token": "patch_embed.cls_token", "pos_embed": "patch_embed.pos_embed"}


def timm_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A timm ``VisionTransformer``'s state dict (DeiT, ``vit_*``: class token, no register tokens) under this
    family's names: only ``cls_token`` and ``pos_embed`` move into ``patch_embed``; the rest is the same.

    A model built with the same ``embed_dim``, ``depth``, ``num_heads``, ``img_size``, ``patch_size`` and
    ``num_classes`` loads it with ``load_state_dict`` and equals the timm model at width 1.0.
    """
    return {_TIMM_KEYS.get(k, k): v for k, v in state_dict.items()}


def _create(kwargs: dict, embed_dim: int, num_heads: int, small_heads: int) -> SlimVisionTransformer:
    """``small_input`` models default to heads of 48 features (``small_heads``): four or eight heads, so that the
    default widths are quarters, as the CNN families' Fashion-MNIST recipes."""
    kwargs = dict(kwargs)
    kwargs.setdefault("embed_dim", embed_dim)
    kwargs.setdefault("num_heads", small_heads if kwargs.get("small_input") else num_heads)
    return SlimVisionTransformer(**kwargs)


@register_model
def slim_vit_tiny(**kwargs) -> SlimVisionTransformer:
    """Slimmable ViT-Tiny (DeiT-Ti: 192 features, 12 blocks, 3 heads of 64, patch 16 at 224; widths 1/3, 2/3, 1.0).
    ``small_input``: 28-px images, patch 4, 4 heads of 48, widths 0.25/0.5/0.75/1.0."""
    return _create(kwargs, 192, 3, 4)


@register_model
def slim_vit_small(**kwargs) -> SlimVisionTransformer:
    """Slimmable ViT-Small (DeiT-S: 384 features, 12 blocks, 6 heads of 64, patch 16 at 224; widths 1/3, 2/3, 1.0).
    ``small_input``: 28-px images, patch 4, 8 heads of 48, widths 0.25/0.5/0.75/1.0."""
    return _create(kwargs, 384, 6, 8)
