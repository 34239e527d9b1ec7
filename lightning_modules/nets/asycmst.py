"""AsyCMST network (Han et al., Med. Image Anal. 2026, Fig. 2): plain ``nn.Module``, no Lightning.

Two streams, named after the paper's branches: ``c`` (upper branch, CEUS in the paper) and ``b`` (lower branch,
BUS).  Which modality enters which branch is the caller's choice (Fig. 9 swaps them).

1. Frame encoders (Sec. 3.1): two ResNet-18s (separate weights; ``share_encoders`` ties them), each frame
   encoded on its own, ``(B, T, 3, H, W) -> (B, T, N, D)``.
2. Multi-task enhancement (Sec. 3.2): frame self-sorting scores on the c-stream features (Eq. 1-4, ``fss``),
   mask logits from a light decoder on the b-stream features (Eq. 5, ``ns``).
3. ``block: factorised`` (the paper-text reading, default): learnable absolute positional encodings
   ``(T, N, D)`` per stream, then ``depth`` stages: a ViViT-style factorised STSA block per stream, then (in the
   layers listed by ``acmst_layers``) the ACMST block of Algorithm 2 with the chosen cross-attention
   ``strategy`` (Table 5).  ``block: official``: the authors' transformer instead
   (:mod:`lightning_modules.nets.asycmst_official`: joint spatio-temporal self-attention, post-norm, ReLU/2048,
   dropout 0.1, the lower branch updated before the upper one, one shared positional table).
4. Head (Eq. 15): GAP over space-time of ``X_C + X_B``, LayerNorm (as ViT/ViViT heads do), FC to
   ``num_classes`` logits (``official``: GAP of ``(X_C + X_B) / 2``, no LayerNorm).  Softmax + cross-entropy
   over the two classes is Eq. 15-16's BCE.

The auxiliary heads read one branch each: FSS the ``fss_branch`` (``"c"``), the mask decoder the ``ns_branch``
(``"b"``); the LightningModule points them at the CEUS and the BUS branch when Fig. 9 swaps the inputs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from einops import rearrange
from torch import nn

from lightning_modules.nets.asycmst_attention import STRATEGIES, ACMSTBlock, STSABlock, summarise_weights
from lightning_modules.nets.asycmst_encoder import FrameEncoder, FrameSorter, MaskDecoder
from lightning_modules.nets.asycmst_official import OFFICIAL_DROPOUT, OFFICIAL_FFN, OfficialFusion

BLOCKS = ("factorised", "official")


class AsyCMSTNet(nn.Module):
    """The whole AsyCMST model.

    Args:
        num_classes: classifier outputs (2: benign / malignant).
        dim: token width D (384 in the paper).
        depth: number of stages L (6).
        heads: attention heads M (6).
        num_frames: T, fixed because the positional encodings are absolute (16).
        img_size: input side in pixels (224); the token grid is ``img_size // 32`` square (7 x 7).
        mlp_ratio: hidden width of every feed-forward, as a multiple of D; ``None`` = the block's own
            (``factorised``: 4, i.e. 1536 at D 384; ``official``: 2048 units whatever D).
        dropout: dropout inside the feed-forwards (and, ``official``, on the self-attention weights);
            ``None`` = the block's own (``factorised``: 0; ``official``: 0.1).
        block: ``factorised`` (pre-norm factorised STSA + ACMST blocks, the paper-text reading) or
            ``official`` (the authors' post-norm joint-attention layers, see :mod:`asycmst_official`).
        strategy: cross-attention strategy, one of ``none | global | symmetric | asymmetric | spatial |
            temporal`` (Table 5; see :class:`CrossModalAttention`).
        acmst_layers: 0-based stage indices that carry an ACMST block (Fig. 13); ``None`` = every stage.
        fss: build the frame self-sorting head (Table 4 "FSS").
        ns: build the nodule segmentation decoder (Table 4 "NS").
        backbone: timm name of the frame encoder (``resnet18``; ``test_resnet`` for CPU tests).
        backbone_args: extra ``timm.create_model`` keyword arguments (e.g. narrower ``channels``).
        pretrained: ImageNet weights for the encoders from timm (downloads once; off by default, tests run
            offline).  Which weights is the ``backbone`` name's tag: ``resnet18.tv_in1k`` = torchvision's
            ``IMAGENET1K_V1`` (the authors' start); a bare ``resnet18`` is timm's ``resnet18.a1_in1k``.
        checkpoint_path: a local weights file for the encoders instead of the download (offline clusters).
        share_encoders: one ResNet-18 for both streams instead of two.
        decoder_width: channels of the first transposed conv of the mask decoder.
        fss_branch: the branch (``"c"`` upper, ``"b"`` lower) whose frame features the FSS head sorts.
        ns_branch: the branch whose frame features the mask decoder reads.
    """

    def __init__(
        self,
        *,
        num_classes: int = 2,
        dim: int = 384,
        depth: int = 6,
        heads: int = 6,
        num_frames: int = 16,
        img_size: int = 224,
        mlp_ratio: float | None = None,
        dropout: float | None = None,
        block: str = "factorised",
        strategy: str = "asymmetric",
        acmst_layers: Sequence[int] | None = None,
        fss: bool = True,
        ns: bool = True,
        backbone: str = "resnet18",
        backbone_args: dict[str, Any] | None = None,
        pretrained: bool = False,
        checkpoint_path: str | None = None,
        share_encoders: bool = False,
        decoder_width: int = 128,
        fss_branch: str = "c",
        ns_branch: str = "b",
    ):
        super().__init__()
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        if block not in BLOCKS:
            raise ValueError(f"block must be one of {BLOCKS}, got {block!r}")
        if fss_branch not in ("c", "b") or ns_branch not in ("c", "b"):
            raise ValueError(f"fss_branch / ns_branch must be 'c' or 'b', got {fss_branch!r} / {ns_branch!r}")
        layers = list(range(depth)) if acmst_layers is None else sorted(set(acmst_layers))
        if any(i < 0 or i >= depth for i in layers):
            raise ValueError(f"acmst_layers must lie in [0, {depth}), got {list(acmst_layers or [])}")
        self.num_frames, self.img_size, self.strategy, self.block = num_frames, img_size, strategy, block
        self.fss_branch, self.ns_branch = fss_branch, ns_branch

        def encoder() -> FrameEncoder:
            return FrameEncoder(
                dim=dim,
                backbone=backbone,
                pretrained=pretrained,
                checkpoint_path=checkpoint_path,
                backbone_args=backbone_args,
            )

        self.encoder_c = encoder()
        self.encoder_b = self.encoder_c if share_encoders else encoder()
        stride = self.encoder_c.stride
        if img_size % stride:
            raise ValueError(f"img_size must be a multiple of the encoder stride {stride}, got {img_size}")
        self.grid = img_size // stride
        n_tokens = self.grid * self.grid
        self.sorter = FrameSorter(dim=dim) if fss else None
        self.decoder = MaskDecoder(dim=dim, stride=stride, width=decoder_width) if ns else None
        if block == "official":
            self.fusion = OfficialFusion(
                dim=dim,
                depth=depth,
                heads=heads,
                num_frames=num_frames,
                n_tokens=n_tokens,
                strategy=strategy,
                acmst_layers=layers,
                hidden=OFFICIAL_FFN if mlp_ratio is None else int(dim * mlp_ratio),
                dropout=OFFICIAL_DROPOUT if dropout is None else dropout,
            )
            self.acmst_layers = self.fusion.acmst_layers
            self.head = nn.Linear(dim, num_classes)
            self.apply(_init_linear)
            return
        mlp_ratio = 4.0 if mlp_ratio is None else mlp_ratio
        dropout = 0.0 if dropout is None else dropout

        self.pos_c = nn.Parameter(torch.zeros(1, num_frames, n_tokens, dim))
        self.pos_b = nn.Parameter(torch.zeros(1, num_frames, n_tokens, dim))
        nn.init.trunc_normal_(self.pos_c, std=0.02)
        nn.init.trunc_normal_(self.pos_b, std=0.02)

        def stsa() -> STSABlock:
            return STSABlock(dim=dim, heads=heads, mlp_ratio=mlp_ratio, dropout=dropout)

        self.stsa_c = nn.ModuleList(stsa() for _ in range(depth))
        self.stsa_b = nn.ModuleList(stsa() for _ in range(depth))
        self.acmst_layers = [] if strategy == "none" else layers
        # ModuleDict keys must be strings; absent key = no cross-modal block in that stage
        self.acmst = nn.ModuleDict(
            {
                str(i): ACMSTBlock(
                    dim=dim, heads=heads, strategy=strategy, mlp_ratio=mlp_ratio, dropout=dropout
                )
                for i in self.acmst_layers
            }
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        self.apply(_init_linear)

    def forward_frames(self, c: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Frame features ``F_C, F_B``: ``(B, T, N, D)`` each (the frame encoders, Sec. 3.1)."""
        if c.shape != b.shape:
            raise ValueError(f"both streams need the same shape, got {tuple(c.shape)} and {tuple(b.shape)}")
        if c.ndim != 5 or c.shape[1] != self.num_frames or c.shape[-1] != self.img_size:
            raise ValueError(
                f"expected (B, {self.num_frames}, C, {self.img_size}, {self.img_size}), got {tuple(c.shape)}"
            )
        return self.encoder_c(c), self.encoder_b(b)

    def forward_features(self, c: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``(B, D)`` pre-logit features of two clips: :meth:`forward_frames`, then :meth:`forward_fusion`."""
        return self.forward_fusion(*self.forward_frames(c, b))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Logits from the pre-logit features (``pre_logits``: the features unchanged)."""
        return x if pre_logits else self.head(x)

    def forward_fusion(self, f_c: torch.Tensor, f_b: torch.Tensor) -> torch.Tensor:
        """Positional encodings, L stages of STSA (+ ACMST), GAP of ``X_C + X_B`` -> ``(B, D)`` pre-logits,
        from the frame features of :meth:`forward_frames`."""
        if self.block == "official":
            return self.fusion(f_c, f_b)
        x_c, x_b = f_c + self.pos_c, f_b + self.pos_b
        for i, (blk_c, blk_b) in enumerate(zip(self.stsa_c, self.stsa_b, strict=True)):
            x_c, x_b = blk_c(x_c), blk_b(x_b)
            if str(i) in self.acmst:
                x_c, x_b = self.acmst[str(i)](x_c, x_b)  # both from the same layer-l inputs
        return self.norm((x_c + x_b).mean(dim=(1, 2)))

    @contextlib.contextmanager
    def capture_attention(self) -> Iterator[list[dict[str, Any]]]:
        """Record the cross-modal attention while the net runs, without changing any number it computes.

        Inside the ``with`` block every cross-attention sub-layer that runs appends ``{"layer": i,
        "direction": "c_to_b" | "b_to_c", "weights": (B, T, N, T, N)}`` to the yielded list, in the order they
        run (``c_to_b``: the upper branch's queries over the lower branch's keys; the weights are (query
        frame, query position, key frame, key position), head-averaged, each query's row summing to 1).  A
        forward hook reads the sub-layer's own inputs and recomputes its softmax densely
        (:func:`~lightning_modules.nets.asycmst_attention.dense_weights`) under ``no_grad``; it returns
        nothing, so the forward's outputs are the ones computed without it.  Nothing is recorded when no stage
        has cross-modal attention (``strategy: none``).
        """
        records: list[dict[str, Any]] = []

        def hook(layer: int, direction: str | None):
            def record(module: nn.Module, args: tuple, output: Any) -> None:
                with torch.no_grad():
                    weights = module.dense_weights(*args)
                # the factorised block's module holds both directions, the official one's a single direction
                pairs = weights.items() if direction is None else [(direction, weights)]
                records.extend({"layer": layer, "direction": d, "weights": w} for d, w in pairs)

            return record

        if self.block == "official":
            targets = [
                (layers[i].cross, hook(i, direction))
                for i in self.acmst_layers
                for layers, direction in ((self.fusion.layers_b, "b_to_c"), (self.fusion.layers_c, "c_to_b"))
            ]
        else:
            targets = [(self.acmst[str(i)].cross, hook(i, None)) for i in self.acmst_layers]
        handles = [module.register_forward_hook(fn) for module, fn in targets]
        try:
            yield records
        finally:
            for handle in handles:
                handle.remove()

    @torch.no_grad()
    def attention_maps(self, c: torch.Tensor, b: torch.Tensor) -> dict[str, torch.Tensor]:
        """Cross-modal attention weights of the last ACMST stage, summarised per direction as ``*_frames``
        ``(B, T, T)`` and ``*_positions`` ``(B, N, N)`` (see :meth:`CrossModalAttention.attention_weights`),
        from :meth:`capture_attention`; empty when no stage carries ACMST."""
        with self.capture_attention() as records:
            self.forward_features(c, b)
        if not records:
            return {}
        last = max(r["layer"] for r in records)
        weights = {r["direction"]: r["weights"] for r in records if r["layer"] == last}
        out = {}
        for name in ("c_to_b", "b_to_c"):
            out[f"{name}_frames"], out[f"{name}_positions"] = summarise_weights(weights[name])
        return out

    def decode_masks(self, feats: torch.Tensor, frames: torch.Tensor | None = None) -> torch.Tensor:
        """Mask logits ``(K, 1, H, W)`` from the ``ns_branch`` frame features ``(B, T, N, D)`` of the frames
        selected by the ``(B, T)`` bool ``frames`` (all frames, in ``(b t)`` order, when ``None``)."""
        if self.decoder is None:
            raise RuntimeError("this AsyCMSTNet was built with ns=False")
        maps = rearrange(feats, "b t (h w) d -> (b t) d h w", h=self.grid)
        if frames is not None:
            maps = maps[frames.reshape(-1)]
        return self.decoder(maps)

    def forward(
        self,
        c: torch.Tensor,
        b: torch.Tensor,
        *,
        mask_frames: torch.Tensor | None = None,
        masks: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Run the model.

        Args:
            c, b: ``(B, T, 3, H, W)`` clips for the upper (CEUS) and lower (BUS) branch.
            mask_frames: ``(B, T)`` bool; decode masks for these frames of the ``ns_branch`` (the annotated
                ones in training).
            masks: decode masks for every frame (prediction); ignored when ``mask_frames`` is given.

        Returns a dict with ``logits (B, num_classes)``, and when built with the heads: ``sort_scores (B, T)``
        (FSS), ``mask_logits (K, 1, H, W)`` (NS, only when frames were asked for).
        """
        f_c, f_b = self.forward_frames(c, b)
        feats = {"c": f_c, "b": f_b}
        out = {"logits": self.forward_head(self.forward_fusion(f_c, f_b))}
        if self.sorter is not None:
            out["sort_scores"] = self.sorter(feats[self.fss_branch])
        if self.decoder is not None and (mask_frames is not None or masks):
            out["mask_logits"] = self.decode_masks(feats[self.ns_branch], mask_frames)
        return out


def _init_linear(m: nn.Module) -> None:
    # ViT-style init for the transformer part; the ResNet keeps torchvision's own init
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
