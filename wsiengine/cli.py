"""The ``wsiengine`` command line: a thin layer over the Python API."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence

from . import __version__
from .errors import WsiEngineError

logger = logging.getLogger("wsiengine")


def _parse_mpp(text: str | None) -> tuple[float, float] | None:
    if text is None:
        return None
    parts = [float(p) for p in text.replace(",", " ").split()]
    return (parts[0], parts[0]) if len(parts) == 1 else (parts[0], parts[1])


def _open(args: argparse.Namespace, *, require_mpp: bool = True):
    """Open ``args.slide`` with the backend and mpp options shared by the slide commands."""
    from .resolution import lookup_mpp, read_mpp_csv
    from .slide import open_slide

    mpp = _parse_mpp(args.mpp)
    if mpp is None and args.mpp_csv:
        mpp = lookup_mpp(read_mpp_csv(args.mpp_csv), args.slide)
    return open_slide(args.slide, backend=args.backend, mpp=mpp, force_mpp=args.force_mpp, require_mpp=require_mpp)


def _cmd_info(args: argparse.Namespace) -> int:
    slide = _open(args, require_mpp=False)
    with slide:
        info = {
            "path": str(slide.path),
            "format": slide.format,
            "vendor": slide.vendor,
            "backend": slide.backend_name,
            "backends_tried": slide.open_attempts,
            "dimensions": list(slide.dimensions),
            "levels": [
                {
                    "level": i,
                    "width": w,
                    "height": h,
                    "downsample": round(slide.level_downsamples[i], 4),
                    "mpp": [round(v, 5) for v in slide.level_mpp(i)] if slide.has_mpp else None,
                }
                for i, (w, h) in enumerate(slide.level_dimensions)
            ],
            "mpp": list(slide.mpp) if slide.has_mpp else None,
            "mpp_source": slide.mpp_source,
            "mpp_detail": slide.mpp_detail,
            "associated_images": list(slide.backend.associated_image_names()),
        }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"file        {info['path']}")
    print(f"format      {info['format']}")
    print(f"backend     {info['backend']}" + (f"  (after: {'; '.join(f'{k}: {v}' for k, v in slide.open_attempts.items())})" if slide.open_attempts else ""))
    w, h = info["dimensions"]
    print(f"size        {w} x {h} px (level 0)")
    if slide.has_mpp:
        mx, my = info["mpp"]
        print(f"mpp         {mx:.4g} x {my:.4g} µm/px  (~{10.0 / mx:.3g}x)   source: {info['mpp_source']} ({info['mpp_detail']})")
    else:
        print("mpp         unknown: no vendor metadata or TIFF resolution tags; pass --mpp or --mpp-csv")
    print(f"levels      {len(info['levels'])}")
    for lv in info["levels"]:
        res = f"{lv['mpp'][0]:.4g} µm/px" if lv["mpp"] else "?"
        print(f"  {lv['level']:>2}  {lv['width']:>7} x {lv['height']:<7} downsample {lv['downsample']:<8g} {res}")
    if info["associated_images"]:
        print(f"associated  {', '.join(info['associated_images'])} (never read or exported)")
    return 0


def _cmd_tiles(args: argparse.Namespace) -> int:
    from .config import TilingConfig
    from .stream import stream_patches
    from .tiling import plan_tiles
    from .tissue import detect_tissue

    slide = _open(args)
    t0 = time.perf_counter()
    mask = detect_tissue(slide)
    t1 = time.perf_counter()
    grid = plan_tiles(slide, mask, config=TilingConfig(target_mpp=args.target_mpp, tile_px=args.tile_px, overlap_px=args.overlap_px, min_tissue=args.min_tissue))
    t2 = time.perf_counter()
    n = 0
    for batch in stream_patches(slide, grid, batch_size=args.batch_size):
        n += len(batch)
    t3 = time.perf_counter()
    print(f"{slide.path.name}: tissue {mask.tissue_fraction:.1%} of the slide ({mask.area_mm2:.2f} mm², {len(mask.polygons.geoms)} pieces) in {1e3 * (t1 - t0):.0f} ms")
    print(f"grid        {len(grid)} tiles of {grid.tile_px} px at {grid.target_mpp} µm/px (level {grid.read_level}, read {grid.read_size[0]} px) in {1e3 * (t2 - t1):.0f} ms")
    print(f"streamed    {n} patches in {t3 - t2:.2f} s ({n / max(t3 - t2, 1e-9):.0f} patches/s)")
    return 0


def _cmd_export_encoder(args: argparse.Namespace) -> int:
    from pathlib import Path

    try:
        from .models.export import export_encoder_onnx
    except ImportError as exc:
        print(f"error: export needs torch and onnx (pip install 'wsiengine[train]'): {exc}", file=sys.stderr)
        return 2
    from .models import get_encoder_spec

    spec = get_encoder_spec(args.name)
    weights = args.weights
    if weights is None:
        if spec.name != "default":
            print(f"error: {spec.name} ships no weights; pass --weights CHECKPOINT ({spec.source})", file=sys.stderr)
            return 2
        from .models.architectures.efficientnet_lite import default_checkpoint_path

        weights = default_checkpoint_path()
    out = Path(args.output)
    report = export_encoder_onnx(spec, out, weights=weights, opset=args.opset, fp16=args.fp16)
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MB, sha256 {report.sha256[:16]}...) and its spec {out.name}.json")
    print(f"agreement with torch: min cosine {report.min_cosine:.6f}, max |diff| {report.max_abs_diff:.2e} "
          f"({report.n_params / 1e6:.1f} M parameters, {report.seconds:.1f} s)")
    return 0


def _cmd_embed(args: argparse.Namespace) -> int:
    from .config import TilingConfig
    from .encode import Encoder
    from .pipeline import embed_slide
    from .tiling import plan_tiles
    from .tissue import detect_tissue

    slide = _open(args)
    providers = args.providers.split(",") if "," in args.providers else args.providers
    encoder = Encoder.load(args.encoder, weights=args.weights, providers=providers, allow_fallback=args.allow_fallback)
    mask = detect_tissue(slide)
    tile_px = args.tile_px or encoder.spec.patch_px
    target_mpp = args.target_mpp or encoder.spec.target_mpp
    grid = plan_tiles(slide, mask, config=TilingConfig(target_mpp=target_mpp, tile_px=tile_px, min_tissue=args.min_tissue))
    t0 = time.perf_counter()
    progress = sys.stderr.isatty() and not args.quiet
    path = embed_slide(slide, grid, encoder, args.output, batch_size=args.batch_size, progress=progress)
    seconds = time.perf_counter() - t0
    print(f"{slide.path.name}: {len(grid)} tiles -> {path} ({encoder.embed_dim}-d {encoder.spec.name} on "
          f"{encoder.providers[0]}) in {seconds:.1f} s ({len(grid) / max(seconds, 1e-9):.0f} patches/s)")
    return 0


def _cmd_train_mil(args: argparse.Namespace) -> int:
    from .config import MILTrainConfig

    try:
        from .models.mil_train import train_mil_from_stores
    except ImportError as exc:
        print(f"error: train-mil needs torch, onnx and matplotlib (pip install 'wsiengine[train]'): {exc}", file=sys.stderr)
        return 2
    explicit = {name: getattr(args, name) for name in (
        "model", "folds", "seed", "max_epochs", "min_epochs", "patience", "lr", "weight_decay", "hidden_dim",
        "dropout", "max_tiles", "threshold_rule", "device", "threads", "val_fraction")}
    if args.no_balance:
        explicit["balanced"] = False
    config = MILTrainConfig.from_env(**explicit)
    progress = sys.stderr.isatty() and not args.quiet
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


def _cmd_predict(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .aggregate import MILHead
    from .store import open_result

    head = MILHead.load(args.mil)
    rows = []
    for store in args.stores:
        result = open_result(store)
        warning = head.tiling_mismatch(result.grid.get("target_mpp"), result.grid.get("tile_px"))
        if warning:
            logger.warning("%s: %s", Path(store).name, warning)
        pred = head.predict(result.features)
        top = int(pred.attention.argmax())
        rows.append({"slide_id": Path(store).name.removesuffix(".zarr"), "probability": round(pred.probability, 6),
                     "label": head.class_names[pred.label], "threshold": pred.threshold, "tiles": pred.n_tiles,
                     "top_attention_tile": top, "max_tile_score": round(float(pred.tile_scores.max()), 6)})
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for r in rows:
            print(f"{r['slide_id']}: {r['label']} (p={r['probability']:.3f}, threshold {r['threshold']:.3f}, "
                  f"{r['tiles']} tiles, max tile score {r['max_tile_score']:.3f})")
    return 0


def _cmd_geojson(args: argparse.Namespace) -> int:
    from .geojson import export_slide_geojson
    from .store import open_result

    store = open_result(args.store)
    scores = store.tile_scores
    if scores is None and not args.tiles:
        logger.warning("%s has no tile scores (no MIL head was run): the GeoJSON holds tissue only", store.path.name)
    mpp = tuple(store.slide.get("mpp") or store.grid.get("slide_mpp"))
    threshold = args.threshold if args.threshold is not None else (store.config.get("tumour_threshold") or 0.5)
    path = export_slide_geojson(args.output, tissue=store.tissue_polygons(), grid=store.tile_grid(), scores=scores,
                                threshold=threshold, mpp=mpp, tiles=args.tiles, attention=store.attention,
                                slide_id=store.attrs.get("slide_id") or store.path.stem, gzip=args.gzip or None)
    print(f"wrote {path}")
    return 0


def _cmd_heatmap(args: argparse.Namespace) -> int:
    from .heatmap import read_heatmap, render_overlay, save_overlay_png, tile_raster
    from .store import open_result

    store = open_result(args.store)
    thumbnail = store.thumbnail
    if thumbnail is None:
        print(f"error: {store.path.name} holds no thumbnail (written by `wsiengine embed`?); run the pipeline", file=sys.stderr)
        return 2
    if args.value in store.heatmap_names():
        raster = read_heatmap(store.group, args.value, 0)
    else:
        values = {"attention": store.attention, "tile_scores": store.tile_scores,
                  "tissue_fraction": store.tissue_fraction}.get(args.value)
        if values is None:
            print(f"error: {store.path.name} has no {args.value} (no MIL head was run)", file=sys.stderr)
            return 2
        if args.value == "attention":
            values = values / values.max()
        raster = tile_raster(store.tile_grid(), values)
    downsample = tuple(float(v) for v in store.array_attrs("thumbnail").get("level0_per_px", [1.0, 1.0]))
    label = {"tile_scores": "tumour probability", "attention": "attention / max"}.get(args.value, args.value)
    image = render_overlay(thumbnail, downsample, raster, alpha=args.alpha, label=label)
    print(f"wrote {save_overlay_png(args.output, image)}")
    return 0


def _vlm_config(args: argparse.Namespace):
    """VLMConfig from the --vlm-* options over ``WSIENGINE_VLM_*`` variables."""
    from .config import VLMConfig

    return VLMConfig.from_env(vlm_url=args.vlm_url, vlm_model=args.vlm_model, vlm_images=args.vlm_images,
                              vlm_timeout_s=args.vlm_timeout, vlm_response_format=args.vlm_response_format,
                              allow_remote=True if args.allow_remote else None)


def _report_config(args: argparse.Namespace):
    from .config import ReportConfig

    return ReportConfig.from_env(top_k=args.top_k)


def _cmd_report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .report import make_report
    from .store import open_result

    vlm, config = _vlm_config(args), _report_config(args)
    if len(args.stores) > 1 and args.slide:
        print("error: --slide applies to one store at a time", file=sys.stderr)
        return 2
    failed = 0
    for path in args.stores:
        try:
            store = open_result(path)
            encoder = None
            if args.tile_bank and Path(args.tile_bank).is_dir():
                encoder = _store_encoder(store)
            rep = make_report(store, args.output, config=config, vlm=vlm, slide=args.slide, tile_bank=args.tile_bank,
                              encoder=encoder)
        except WsiEngineError as exc:
            print(f"error: {path}: {type(exc).__name__}: {exc}", file=sys.stderr)
            failed += 1
            continue
        if args.format == "json":
            print(json.dumps(rep.document, indent=1))
        elif args.format == "md":
            print(rep.to_markdown())
        flags = rep.document["flags"]
        print(f"wrote {rep.markdown_path} and {rep.json_path}" + (f" (flags: {', '.join(flags)})" if flags else ""),
              file=sys.stderr)
    return 1 if failed else 0


def _store_encoder(store):
    """The encoder a store was made with (the shipped default, or its recorded file), checked by
    sha256, to embed a tile-bank folder the same way."""
    from pathlib import Path

    from .encode import Encoder
    from .errors import ConfigError

    info = store.encoder
    name, file = (info.get("spec") or {}).get("name"), Path(info.get("file") or "")
    attempts = [lambda: Encoder.load("default")] if name == "default" else []
    if file.is_file():
        attempts += [lambda: Encoder.load(name, weights=file), lambda: Encoder.load(file)]
    for attempt in attempts:
        try:
            encoder = attempt()
        except WsiEngineError:
            continue
        if encoder.describe().get("sha256") == info.get("sha256"):
            return encoder
    raise ConfigError(f"the encoder of '{store.path.name}' ({name}, {file}) is not on this machine; give the tile "
                      "bank as an .npz made with it (TileBank.save)")


def _add_report_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("report (findings by code; optional VLM narrative, checked against them)")
    g.add_argument("--vlm-url", help="OpenAI-compatible API base, e.g. http://127.0.0.1:8080/v1 (env WSIENGINE_VLM_URL)")
    g.add_argument("--vlm-model", help="model name on that server (env WSIENGINE_VLM_MODEL)")
    g.add_argument("--vlm-images", choices=["auto", "always", "never"],
                   help="send evidence tiles as images (auto: fall back to text when the server rejects them)")
    g.add_argument("--vlm-timeout", type=float, help="seconds per VLM request (default 60)")
    g.add_argument("--vlm-response-format", choices=["none", "json_object", "json_schema"],
                   help="ask the server to constrain the reply to its JSON schema (default none: the prompt asks)")
    g.add_argument("--allow-remote", action="store_true",
                   help="allow a VLM endpoint off this machine (findings and evidence tiles leave it)")
    g.add_argument("--tile-bank", help="labelled tiles for a few-shot second opinion: .npz or a folder of class folders")
    g.add_argument("--top-k", type=int, help="evidence tiles (default 8)")


def _cmd_run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .batch import LOG_NAME, PipelineSpec, run_batch

    if "://" in args.output:  # an fsspec URL: the log stays local, in the working folder
        log_path = Path(LOG_NAME)
    else:
        Path(args.output).mkdir(parents=True, exist_ok=True)
        log_path = Path(args.output) / LOG_NAME
    out = args.output
    handler = logging.FileHandler(log_path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    logging.getLogger("wsiengine").addHandler(handler)
    try:
        mil = None if args.mil in ("none", "") else args.mil
        spec = PipelineSpec(encoder=args.encoder, weights=args.weights, mil=mil, providers=args.providers,
                            allow_fallback=args.allow_fallback, target_mpp=args.target_mpp, tile_px=args.tile_px,
                            min_tissue=args.min_tissue, report=not args.no_report,
                            report_config=_report_config(args), vlm=_vlm_config(args),
                            tile_bank=str(Path(args.tile_bank).resolve()) if args.tile_bank else None)
        progress = sys.stderr.isatty() and not args.quiet
        summary = run_batch(args.slides, out, spec=spec, mpp_csv=args.mpp_csv, workers=args.workers,
                            scheduler=args.scheduler, retry_failed=args.retry_failed, progress=progress,
                            parallel=args.parallel)
    finally:
        logging.getLogger("wsiengine").removeHandler(handler)
        handler.close()
    if not args.quiet:
        width = max(len(r.slide_id) for r in summary.rows)
        for r in summary.rows:
            detail = r.error if r.status == "failed" else (
                f"{r.label} p={r.probability:.3f}" if r.probability is not None else r.label)
            print(f"{r.slide_id:<{width}}  {r.status:<7}  {r.n_tiles if r.n_tiles is not None else '':>6}  {detail}")
    c = summary.counts
    print(f"{len(summary.rows)} slides: {c['done']} done, {c['skipped']} up to date, {c['failed']} failed "
          f"in {summary.seconds:.1f} s ({summary.workers} worker{'s' if summary.workers > 1 else ''}) -> {summary.path}")
    return 1 if c["failed"] else 0


def _cmd_doctor(args: argparse.Namespace) -> int:
    from .batch import discover_slides
    from .resolution import lookup_mpp, read_mpp_csv
    from .slide import open_slide
    from .tiling import plan_tiles
    from .tissue import detect_tissue

    table = read_mpp_csv(args.mpp_csv) if args.mpp_csv else {}
    entries = discover_slides(args.slides)
    rows, bad = [], 0
    for e in entries:
        row = {"slide_id": e.slide_id, "path": str(e.path)}
        try:
            slide = open_slide(e.path, mpp=lookup_mpp(table, e.path) if table else None)
            with slide:
                row.update(backend=slide.backend_name, format=slide.format, dimensions=list(slide.dimensions),
                           levels=slide.level_count, mpp=[round(m, 4) for m in slide.mpp], mpp_source=slide.mpp_source)
                grid = plan_tiles(slide, detect_tissue(slide), target_mpp=args.target_mpp, tile_px=args.tile_px)
                row.update(estimated_tiles=len(grid), status="ok")
        except WsiEngineError as exc:
            bad += 1
            row.update(status="error", error=f"{type(exc).__name__}: {exc}")
        rows.append(row)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for r in rows:
            if r["status"] == "ok":
                print(f"ok     {r['slide_id']}: {r['format']} via {r['backend']}, {r['dimensions'][0]}x{r['dimensions'][1]} px, "
                      f"{r['levels']} levels, {r['mpp'][0]:g} µm/px ({r['mpp_source']}), ~{r['estimated_tiles']} tiles "
                      f"of {args.tile_px} px at {args.target_mpp} µm/px")
            else:
                print(f"error  {r['slide_id']}: {r['error']}")
        print(f"{len(rows)} slides, {len(rows) - bad} ready, {bad} with problems")
    return 1 if bad else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wsiengine", description="Gigapixel whole-slide image inference.")
    parser.add_argument("--version", action="version", version=f"wsiengine {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = parser.add_subparsers(dest="command", required=True)

    def slide_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("slide", help="slide file")
        p.add_argument("--backend", default="auto", choices=["auto", "tifffile", "openslide", "tiffslide"])
        p.add_argument("--mpp", help="level-0 µm/px when the file has none: 'X' or 'X,Y'")
        p.add_argument("--force-mpp", action="store_true", help="use --mpp even when the file has metadata")
        p.add_argument("--mpp-csv", help="CSV with columns slide,mpp (used when the file has no mpp)")

    info = sub.add_parser("info", help="format, backend, levels, mpp and where the mpp came from")
    slide_options(info)
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.set_defaults(func=_cmd_info)

    tiles = sub.add_parser("tiles", help="detect tissue, plan the grid and stream every patch (a timing run)")
    slide_options(tiles)
    tiles.add_argument("--target-mpp", type=float, default=0.5, help="patch resolution, µm/px")
    tiles.add_argument("--tile-px", type=int, default=224, help="patch side, pixels at target mpp")
    tiles.add_argument("--overlap-px", type=int, default=0)
    tiles.add_argument("--min-tissue", type=float, default=0.25)
    tiles.add_argument("--batch-size", type=int, default=64)
    tiles.set_defaults(func=_cmd_tiles)

    export = sub.add_parser("export-encoder", help="export a registry encoder's local checkpoint to ONNX, verified against torch")
    export.add_argument("name", help="registry name (see wsiengine.models.list_encoders())")
    export.add_argument("--weights", help="local checkpoint (.pth, .bin, .safetensors); omit for the default's shipped weights")
    export.add_argument("-o", "--output", required=True, help="the .onnx file to write (a .onnx.json spec goes beside it)")
    export.add_argument("--opset", type=int, default=17)
    export.add_argument("--fp16", action="store_true", help="also write a float16 variant")
    export.set_defaults(func=_cmd_export_encoder)

    embed = sub.add_parser("embed", help="tissue, tiles and embeddings of one slide into a Zarr store")
    slide_options(embed)
    embed.add_argument("-o", "--output", required=True, help="the store to write, e.g. results/x.zarr")
    embed.add_argument("--encoder", default="default", help="'default', a registry name (with --weights), or an .onnx path")
    embed.add_argument("--weights", help="the exported .onnx for a registry encoder")
    embed.add_argument("--providers", default="auto", help="auto, tensorrt, cuda or cpu (comma-separated for a list)")
    embed.add_argument("--allow-fallback", action="store_true", help="fall back to CPU when a GPU provider is missing")
    embed.add_argument("--target-mpp", type=float, help="patch resolution, µm/px (default: the encoder's)")
    embed.add_argument("--tile-px", type=int, help="patch side, pixels (default: the encoder's)")
    embed.add_argument("--min-tissue", type=float, default=0.25)
    embed.add_argument("--batch-size", type=int, default=64)
    embed.set_defaults(func=_cmd_embed)

    train = sub.add_parser("train-mil", help="train, cross-validate and export an attention-MIL slide classifier")
    train.add_argument("--features", required=True, help="folder of SLIDE_ID.zarr feature stores")
    train.add_argument("--labels", required=True, help="CSV with columns slide_id,label")
    train.add_argument("-o", "--output", required=True, help="output folder: ONNX head, config, metrics, ROC plot")
    train.add_argument("--model", default=None, choices=["abmil", "clam_sb"], help="default abmil")
    train.add_argument("--folds", type=int, help="stratified k-fold splits (default 5)")
    train.add_argument("--split", nargs="+", help="split file(s) instead of k-fold: slide_id,split[,fold] or CLAM's train,val,test")
    train.add_argument("--seed", type=int, help="default 0")
    train.add_argument("--val-fraction", type=float, help="of the non-test slides, for early stopping and the threshold")
    train.add_argument("--max-epochs", type=int)
    train.add_argument("--min-epochs", type=int)
    train.add_argument("--patience", type=int, help="epochs without a better validation AUC before stopping")
    train.add_argument("--lr", type=float)
    train.add_argument("--weight-decay", type=float)
    train.add_argument("--hidden-dim", type=int)
    train.add_argument("--dropout", type=float)
    train.add_argument("--max-tiles", type=int, help="training-time tile subsample per bag (0 = all)")
    train.add_argument("--threshold-rule", choices=["youden", "balanced_accuracy", "f1", "fixed"])
    train.add_argument("--no-balance", action="store_true", help="plain shuffling instead of class-balanced sampling")
    train.add_argument("--device", choices=["cpu", "cuda", "auto"])
    train.add_argument("--threads", type=int, help="torch CPU threads (0 = physical cores)")
    train.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    train.set_defaults(func=_cmd_train_mil)

    predict = sub.add_parser("predict", help="slide labels from feature stores with a MIL head")
    predict.add_argument("stores", nargs="+", help="SLIDE_ID.zarr stores written by `wsiengine embed`")
    predict.add_argument("--mil", default="default", help="'default' (the shipped head) or a head folder from train-mil")
    predict.add_argument("--json", action="store_true", help="machine-readable output")
    predict.set_defaults(func=_cmd_predict)

    geojson = sub.add_parser("geojson", help="QuPath GeoJSON (tissue, tumour regions, optional tiles) from a result store")
    geojson.add_argument("store", help="SLIDE_ID.zarr written by the pipeline")
    geojson.add_argument("-o", "--output", required=True, help=".geojson (or .geojson.gz) to write")
    geojson.add_argument("--tiles", action="store_true", help="add every tile as a detection with attention and score")
    geojson.add_argument("--threshold", type=float, help="tile score for tumour regions (default: the run's, 0.5)")
    geojson.add_argument("--gzip", action="store_true", help="gzip the output")
    geojson.set_defaults(func=_cmd_geojson)

    heatmap = sub.add_parser("heatmap", help="PNG overlay of a tile value on the slide thumbnail, with a colour bar")
    heatmap.add_argument("store", help="SLIDE_ID.zarr written by the pipeline")
    heatmap.add_argument("-o", "--output", required=True, help=".png to write")
    heatmap.add_argument("--value", default="tile_scores", choices=["tile_scores", "attention", "tissue_fraction"])
    heatmap.add_argument("--alpha", type=float, default=0.5, help="heatmap opacity")
    heatmap.set_defaults(func=_cmd_heatmap)

    run = sub.add_parser("run", help="every slide of a folder: tissue, tiles, embeddings, MIL, heatmaps, GeoJSON, "
                                     "reports; resumable")
    run.add_argument("slides", help="folder of slides (searched recursively) or one slide")
    run.add_argument("-o", "--output", required=True, help="results folder (summary.csv, SLIDE_ID.zarr/.geojson/.png)")
    run.add_argument("--encoder", default="default", help="'default', a registry name (with --weights), or an .onnx path")
    run.add_argument("--weights", help="the exported .onnx for a registry encoder")
    run.add_argument("--mil", default="default", help="'default', a head folder from train-mil, or 'none'")
    run.add_argument("--providers", default="auto", help="auto, tensorrt, cuda or cpu")
    run.add_argument("--allow-fallback", action="store_true", help="fall back to CPU when a GPU provider is missing")
    run.add_argument("--target-mpp", type=float, help="tile resolution, µm/px (default: the MIL head's, else the encoder's)")
    run.add_argument("--tile-px", type=int, help="tile side, pixels (default: the MIL head's, else the encoder's)")
    run.add_argument("--min-tissue", type=float)
    run.add_argument("--mpp-csv", help="CSV slide,mpp for slides without resolution metadata")
    where = run.add_mutually_exclusive_group()
    where.add_argument("--scheduler", help="address of a running dask.distributed scheduler (tcp://host:8786)")
    where.add_argument("--workers", type=int, help="local worker processes (default: sized to the machine)")
    run.add_argument("--retry-failed", action="store_true", help="rerun slides that failed before")
    run.add_argument("--parallel", default="auto", choices=["auto", "slides", "chunks"],
                     help="one slide per worker, or each slide's tiles split across workers (auto: chunks when "
                          "fewer slides than workers)")
    run.add_argument("--no-report", action="store_true", help="skip the per-slide reports")
    _add_report_arguments(run)
    run.set_defaults(func=_cmd_run)

    report = sub.add_parser("report", help="a slide report (Markdown + JSON + images) from result stores; optional VLM")
    report.add_argument("stores", nargs="+", help="SLIDE_ID.zarr written by the pipeline")
    report.add_argument("-o", "--output", help="folder for the report files (default: beside each store)")
    report.add_argument("--format", choices=["md", "json", "none"], default="md",
                        help="what to print to stdout; both files are always written")
    report.add_argument("--slide", help="the slide file, when it moved since the run (for the evidence tiles)")
    _add_report_arguments(report)
    report.set_defaults(func=_cmd_report)

    doctor = sub.add_parser("doctor", help="preflight a folder: which slides open, backend, mpp and source, estimated tiles")
    doctor.add_argument("slides", help="folder of slides or one slide")
    doctor.add_argument("--mpp-csv", help="CSV slide,mpp for slides without resolution metadata")
    doctor.add_argument("--target-mpp", type=float, default=0.5)
    doctor.add_argument("--tile-px", type=int, default=224)
    doctor.add_argument("--json", action="store_true")
    doctor.set_defaults(func=_cmd_doctor)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except WsiEngineError as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
