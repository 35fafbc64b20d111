"""The ``wsiengine`` command line: a thin layer over the Python API.

Every slide command builds one :class:`~wsiengine.config.RunConfig` from, in order, the
defaults, a TOML file (``--config`` or ``$WSIENGINE_CONFIG``), ``WSIENGINE_*`` variables and its
flags, then resolves it once (:func:`wsiengine.resolve.resolve_config`). The configuration
options of every subcommand are generated from the configuration's fields, so they share names,
units, help and defaults; ``wsiengine config show`` prints the result and where each value came from.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from . import __version__
from .config import DEFAULT_SOURCE, RunConfig
from .config.flags import PREFIX, add_flags, default_text, flag, given_flags
from .errors import WsiEngineError
from .train_cli import add_train_commands

logger = logging.getLogger("wsiengine")

#: Older spellings still accepted (each is also the field's own flag).
_ALIASES = {"encoder_weights": ("--weights",), "vlm_timeout_s": ("--vlm-timeout",)}
#: The settings that name models: what ``tiles`` and ``doctor`` need to resolve the run's tiling.
MODEL_NAMES = ("encoder", "encoder_weights", "mil")


def add_config_options(parser: argparse.ArgumentParser, sections: Sequence[str] = (),
                       names: Sequence[str] = ()) -> None:
    """Add a flag for every user setting of ``sections`` (and the single settings ``names``) of
    :class:`RunConfig`, grouped by section, with the field's help, default and variable."""
    infos = [i for i in RunConfig.fields().values() if not i.resolved and (i.section in sections or i.name in names)]
    titles = {s: (c.__doc__ or "").strip().splitlines()[0] for s, c in RunConfig.SECTIONS.items()}
    add_flags(parser, infos, titles=titles, aliases=_ALIASES)


def load_config(args: argparse.Namespace) -> RunConfig:
    """The run configuration of a command: defaults, TOML file, environment, then its flags."""
    return RunConfig.load(getattr(args, "config", None), cli=given_flags(args), cli_text=True)


def resolved_config(args: argparse.Namespace) -> RunConfig:
    """:func:`load_config`, with the tiling resolved from the models it names (no sessions started)."""
    from .resolve import resolve_config

    return resolve_config(load_config(args))


def _open(args: argparse.Namespace, config: RunConfig, *, require_mpp: bool = True):
    """Open ``args.slide`` with the run's slide settings."""
    from .pipeline import open_run_slide

    return open_run_slide(args.slide, config.slide, require_mpp=require_mpp)


def _cmd_info(args: argparse.Namespace) -> int:
    slide = _open(args, load_config(args), require_mpp=False)
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
    from .pipeline import plan_slide
    from .stream import stream_patches

    config = resolved_config(args)
    slide = _open(args, config)
    with slide:
        t0 = time.perf_counter()
        seconds: dict[str, float] = {}
        mask, grid = plan_slide(slide, config, on_stage=lambda stage: seconds.setdefault(stage, time.perf_counter()))
        t1, t2 = seconds["tissue"], seconds["tiling"]
        n = 0
        for batch in stream_patches(slide, grid, config=config.stream):
            n += len(batch)
        t3 = time.perf_counter()
    row = {"slide": str(slide.path), "n_tiles": len(grid), "target_mpp": grid.target_mpp, "tile_px": grid.tile_px,
           "tiling_source": {k: config.source(f"tiling.{k}") for k in ("target_mpp", "tile_px")},
           "read_level": grid.read_level, "read_size": list(grid.read_size), "tissue_fraction": mask.tissue_fraction,
           "tissue_mm2": mask.area_mm2, "tissue_pieces": len(mask.polygons.geoms), "streamed": n,
           "seconds": {"tissue": round(t1 - t0, 4), "tiling": round(t2 - t1, 4), "stream": round(t3 - t2, 4)}}
    if args.json:
        print(json.dumps(row, indent=2))
        return 0
    print(f"{slide.path.name}: tissue {mask.tissue_fraction:.1%} of the slide ({mask.area_mm2:.2f} mm², "
          f"{len(mask.polygons.geoms)} pieces) in {1e3 * (t1 - t0):.0f} ms")
    print(f"grid        {len(grid)} tiles of {grid.tile_px} px at {grid.target_mpp:g} µm/px (level {grid.read_level}, "
          f"read {grid.read_size[0]} px; tiling from {config.source('tiling.target_mpp')}) in {1e3 * (t2 - t1):.0f} ms")
    print(f"streamed    {n} patches in {t3 - t2:.2f} s ({n / max(t3 - t2, 1e-9):.0f} patches/s)")
    return 0


def _cmd_embed(args: argparse.Namespace) -> int:
    from .pipeline import embed_slide, load_encoder, plan_slide
    from .resolve import resolve_config

    config = load_config(args)
    encoder = load_encoder(config)
    config = resolve_config(config, encoder=encoder)
    slide = _open(args, config)
    with slide:
        _, grid = plan_slide(slide, config)
        t0 = time.perf_counter()
        progress = sys.stderr.isatty() and not args.quiet
        with _output_lock(Path(args.output).expanduser().absolute().parent, "embed"):
            path = embed_slide(slide, grid, encoder, args.output, batch_size=config.stream.batch_size,
                               progress=progress, config=config, stream=config.stream)
        seconds = time.perf_counter() - t0
    print(f"{slide.path.name}: {len(grid)} tiles of {grid.tile_px} px at {grid.target_mpp:g} µm/px -> {path} "
          f"({encoder.embed_dim}-d {encoder.spec.name}, {encoder.precision}, on {encoder.providers[0]}) in {seconds:.1f} s "
          f"({len(grid) / max(seconds, 1e-9):.0f} patches/s)")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from .aggregate import MILHead
    from .store import open_result

    config = load_config(args)
    if config.mil.mil is None:
        print("error: predict needs a MIL head (--mil default or a head folder)", file=sys.stderr)
        return 2
    head = MILHead.load(config.mil.mil)
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
    from .deposits import find_deposits
    from .geojson import export_slide_geojson
    from .report.findings import recorded_rules
    from .store import open_result

    store = open_result(args.store)
    scores = store.tile_scores
    if scores is None and not args.tiles:
        logger.warning("%s has no tile scores (no MIL head was run): the GeoJSON holds tissue only", store.path.name)
    mpp = tuple(store.slide.get("mpp") or store.grid.get("slide_mpp"))
    # the run's own threshold unless this command (or its file or environment) sets one
    config = load_config(args)
    given = config.source("mil.tile_threshold") != DEFAULT_SOURCE
    rules = recorded_rules(store, tile_threshold=config.mil.tile_threshold if given else None)
    grid = store.tile_grid()
    deposits = find_deposits(grid, scores, mpp, rules).deposits if scores is not None else None
    path = export_slide_geojson(args.output, tissue=store.tissue_polygons(), grid=grid, scores=scores,
                                threshold=rules.grow_threshold, mpp=mpp, tiles=args.tiles, attention=store.attention,
                                slide_id=store.attrs.get("slide_id") or store.path.stem, gzip=args.gzip or None,
                                deposits=deposits, node=None if given else store.node)
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


def _cmd_report(args: argparse.Namespace) -> int:
    config = load_config(args)
    threshold = config.mil.tile_threshold if config.source("mil.tile_threshold") != DEFAULT_SOURCE else None
    if len(args.stores) > 1 and args.slide:
        print("error: --slide applies to one store at a time", file=sys.stderr)
        return 2
    bank = config.report.tile_bank
    failed = 0
    for path in args.stores:
        try:
            with _output_lock(args.output or Path(path).expanduser().absolute().parent, "report"):
                rep = _write_report(path, args, config, bank, threshold)
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


def _write_report(path: str, args: argparse.Namespace, config: RunConfig, bank: str | None, threshold: float | None):
    """The report of the store ``path``, written into ``args.output`` (default: beside the store)."""
    from .report import make_report
    from .store import open_result

    store = open_result(path)
    encoder = _store_encoder(store) if bank and Path(bank).is_dir() else None
    return make_report(store, args.output, config=config.report, vlm=config.vlm, slide=args.slide,
                       tile_bank=bank, encoder=encoder, tile_threshold=threshold)


@contextlib.contextmanager
def _output_lock(folder: str | Path, command: str) -> Iterator[None]:
    """``OUT/.wsiengine.lock`` held while ``command`` writes into the local folder ``folder``, so it
    never writes beside a run or another command there; a folder it had to create is removed
    again when nothing was written into it. A URL is not locked."""
    from .batch.location import OutputLock
    from .errors import OutputError

    if "://" in str(folder):
        yield
        return
    folder = Path(folder).expanduser()
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create the output folder '{folder}': {exc.strerror or exc}") from exc
    try:
        with OutputLock(folder, command=command):
            yield
    finally:
        if created:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only when empty


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


def _cmd_run(args: argparse.Namespace) -> int:
    from .batch import run_batch

    config = load_config(args)
    progress = sys.stderr.isatty() and not args.quiet
    summary = run_batch(args.slides, args.output, config, progress=progress)
    if not args.quiet:
        width = max(len(r.slide_id) for r in summary.rows)
        for r in summary.rows:
            detail = r.error if r.status == "failed" else (
                f"{r.label} p={r.probability:.3f}" if r.probability is not None else r.label)
            if r.status != "failed" and r.category:
                detail += f"  {r.category}" + (f" {r.largest_mm:.2f} mm" if r.largest_mm is not None else "")
            print(f"{r.slide_id:<{width}}  {r.status:<7}  {r.n_tiles if r.n_tiles is not None else '':>6}  {detail}")
    c = summary.counts
    print(f"{len(summary.rows)} slides: {c['done']} done, {c['skipped']} up to date, {c['failed']} failed "
          f"in {summary.seconds:.1f} s ({summary.workers} worker{'s' if summary.workers > 1 else ''}) -> {summary.path}")
    status = 1 if c["failed"] else 0
    if args.patients:
        id_map = None
        if config.outputs.anonymize_ids:  # the patients table names original slides, the results anonymous ids
            from .batch.anonymize import ID_MAP_NAME

            id_map = config.outputs.id_map or str(Path(args.output).expanduser() / ID_MAP_NAME)
        status = max(status, _stage(args.output, args.patients, None, None, quiet=args.quiet, id_map=id_map))
    return status


def _stage(results: str, patients_csv: str, output: str | None, reports: str | None, *, quiet: bool = False,
           id_map: str | None = None) -> int:
    """Stage every patient of ``patients_csv`` from the node reports in ``results``; write
    STAGES.csv and the patient reports; 1 when a patient is incomplete, else 0. With ``id_map``
    (an anonymized run's private map), the table's slide ids are read under their anonymous ids."""
    from .batch.anonymize import read_id_map
    from .errors import ConfigError
    from .staging import INCOMPLETE, read_patients, stage_patients, write_patient_reports, write_stages

    if "://" in str(results):
        raise ConfigError(f"staging reads node reports from a local results folder, not {results!r}; "
                          "copy the SLIDE_ID.report.json files to a local folder and run wsiengine stage there")
    results_dir = Path(results).expanduser()
    patients = read_patients(patients_csv)
    if id_map is not None:
        mapping = read_id_map(id_map)
        if not mapping:
            raise ConfigError(f"the private slide-id map '{id_map}' is missing or empty; stage with the map the "
                              "anonymized run wrote (OUT/private/slide-ids.csv or its --id-map)")
        patients = {p: [mapping.get(s.casefold(), s) for s in slides] for p, slides in patients.items()}
    stages = stage_patients(patients, results_dir)
    out = Path(output).expanduser() if output else results_dir / "stages.csv"
    folder = Path(reports).expanduser() if reports else results_dir / "patients"
    with _output_lock(folder, "stage"):
        write_patient_reports(stages, folder)
        write_stages(stages, out)
    if not quiet:
        width = max(len(s.patient_id) for s in stages)
        for s in stages:
            note = f"missing {', '.join(s.missing)}" if s.missing else (
                f"review {', '.join(s.uncertain)}" if s.uncertain else "")
            print(f"{s.patient_id:<{width}}  {s.pn_stage:<10}  {s.n_nodes} nodes: {s.n_macro} macro, {s.n_micro} micro, "
                  f"{s.n_itc} ITC  {note}".rstrip())
    incomplete = sum(s.pn_stage == INCOMPLETE for s in stages)
    print(f"{len(stages)} patients staged -> {out} (patient reports in {folder})"
          + (f"; {incomplete} incomplete: a node is missing when RESULTS/SLIDE_ID.report.json is absent (the slide "
             "failed or was not run, or reports were off: `wsiengine report RESULTS/SLIDE_ID.zarr` makes one)"
             if incomplete else ""), file=sys.stderr)
    return 1 if incomplete else 0


def _cmd_view(args: argparse.Namespace) -> int:
    from .view import ViewServer

    server = ViewServer(args.results, slides_dir=args.slides, host=args.host, port=args.port)
    print(f"wsiengine view: {server.url}  ({len(server.catalog.slides)} slides from {server.catalog.results}; "
          "Ctrl-C stops)", flush=True)
    if server.token is not None:
        print(f"listening on {args.host}, not loopback: anyone who can reach it needs the token in that URL",
              file=sys.stderr)
    if args.open:
        import webbrowser

        webbrowser.open(server.url)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


def _cmd_stage(args: argparse.Namespace) -> int:
    return _stage(args.results, args.patients, args.output, args.reports, quiet=args.quiet, id_map=args.id_map)


def _cmd_doctor(args: argparse.Namespace) -> int:
    from .batch import discover_slides
    from .pipeline import open_run_slide, plan_slide

    config = resolved_config(args)
    tiling = config.tiling
    entries = discover_slides(args.slides)
    rows, bad = [], 0
    for e in entries:
        row = {"slide_id": e.slide_id, "path": str(e.path)}
        try:
            with open_run_slide(e.path, config.slide) as slide:
                row.update(backend=slide.backend_name, format=slide.format, dimensions=list(slide.dimensions),
                           levels=slide.level_count, mpp=[round(m, 4) for m in slide.mpp], mpp_source=slide.mpp_source)
                _, grid = plan_slide(slide, config)
                row.update(n_tiles=len(grid), target_mpp=grid.target_mpp, tile_px=grid.tile_px, status="ok")
        except WsiEngineError as exc:
            bad += 1
            row.update(status="error", error=f"{type(exc).__name__}: {exc}")
        rows.append(row)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(f"tiles of {tiling.tile_px} px at {tiling.target_mpp:g} µm/px (from {config.source('tiling.target_mpp')})")
        for r in rows:
            if r["status"] == "ok":
                print(f"ok     {r['slide_id']}: {r['format']} via {r['backend']}, {r['dimensions'][0]}x{r['dimensions'][1]} "
                      f"px, {r['levels']} levels, {r['mpp'][0]:g} µm/px ({r['mpp_source']}), {r['n_tiles']} tiles")
            else:
                print(f"error  {r['slide_id']}: {r['error']}")
        print(f"{len(rows)} slides, {len(rows) - bad} ready, {bad} with problems")
    return 1 if bad else 0


def _cmd_config_show(args: argparse.Namespace) -> int:
    config = resolved_config(args)
    if args.json:
        print(json.dumps({"config": config.to_dict(), "sources": {name: source for name, _, source in config.explain()},
                          "key": config.key()}, indent=2, default=str))
        return 0
    print(f"# wsiengine {__version__}: the resolved run configuration; resume key {config.key()}")
    print("# a TOML file: `wsiengine config show > run.toml`, then --config run.toml")
    print(config.to_toml())
    return 0


def _common_options() -> argparse.ArgumentParser:
    """Options every command takes, before or after its name."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging")
    common.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                        help="warnings and errors only, no progress bars")
    common.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS,
                        help="TOML file of settings (default: $WSIENGINE_CONFIG); flags beat it")
    return common


def build_parser() -> argparse.ArgumentParser:
    common = _common_options()
    parser = argparse.ArgumentParser(prog="wsiengine", description="Gigapixel whole-slide image inference.",
                                     parents=[common], allow_abbrev=False)
    parser.add_argument("--version", action="version", version=f"wsiengine {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str, func, *, sections: Sequence[str] = (), names: Sequence[str] = ()
                ) -> argparse.ArgumentParser:  # the settings a command takes are generated by settings(p)
        p = sub.add_parser(name, help=help_text, description=help_text[0].upper() + help_text[1:] + ".",
                           parents=[common], allow_abbrev=False)
        p.set_defaults(func=func)
        p._wsiengine_settings = (tuple(sections), tuple(names))  # type: ignore[attr-defined]
        return p

    def settings(p: argparse.ArgumentParser) -> None:
        add_config_options(p, *p._wsiengine_settings)  # type: ignore[attr-defined]

    info = command("info", "format, backend, levels, mpp and where the mpp came from", _cmd_info, sections=["slide"])
    info.add_argument("slide", help="slide file")
    info.add_argument("--json", action="store_true", help="machine-readable output")
    settings(info)

    tiles = command("tiles", "detect tissue, plan the run's tile grid and stream every patch (a timing run)",
                    _cmd_tiles, sections=["slide", "tissue", "tiling", "stream"], names=MODEL_NAMES)
    tiles.add_argument("slide", help="slide file")
    tiles.add_argument("--json", action="store_true", help="machine-readable output (n_tiles as run writes it)")
    settings(tiles)

    embed = command("embed", "tissue, tiles and embeddings of one slide into a Zarr store", _cmd_embed,
                    sections=["slide", "tissue", "tiling", "stream", "encoder"], names=["mil"])
    embed.add_argument("slide", help="slide file")
    embed.add_argument("-o", "--output", required=True, help="the store to write, e.g. results/x.zarr")
    settings(embed)

    add_train_commands(sub, [common])

    predict = command("predict", "slide labels from feature stores with a MIL head", _cmd_predict, names=["mil"])
    predict.add_argument("stores", nargs="+", help="SLIDE_ID.zarr stores written by `wsiengine embed`")
    predict.add_argument("--json", action="store_true", help="machine-readable output")
    settings(predict)

    geojson = command("geojson", "QuPath GeoJSON (tissue, tumour regions, optional tiles) from a result store",
                      _cmd_geojson, names=["tile_threshold"])
    geojson.add_argument("store", help="SLIDE_ID.zarr written by the pipeline")
    geojson.add_argument("-o", "--output", required=True, help=".geojson (or .geojson.gz) to write")
    geojson.add_argument("--tiles", action="store_true", help="add every tile as a detection with attention and score")
    geojson.add_argument("--gzip", action="store_true", help="gzip the output")
    settings(geojson)

    heatmap = command("heatmap", "PNG overlay of a tile value on the slide thumbnail, with a colour bar", _cmd_heatmap)
    heatmap.add_argument("store", help="SLIDE_ID.zarr written by the pipeline")
    heatmap.add_argument("-o", "--output", required=True, help=".png to write")
    heatmap.add_argument("--value", default="tile_scores", choices=["tile_scores", "attention", "tissue_fraction"],
                         help="the tile value shown (default: tile_scores)")
    heatmap.add_argument("--alpha", type=float, default=0.5, help="heatmap opacity (default: 0.5)")

    run = command("run", "every slide of a folder: tissue, tiles, embeddings, MIL, heatmaps, GeoJSON, reports; "
                         "resumable", _cmd_run, sections=list(RunConfig.SECTIONS))
    run.add_argument("slides", help="folder of slides (searched recursively) or one slide")
    run.add_argument("-o", "--output", required=True, help="results folder or fsspec URL (summary.csv, SLIDE_ID.*)")
    run.add_argument("--patients", help="PATIENTS.csv (patient_id,slide_id): stage each patient at the end "
                                        "(OUT/stages.csv, OUT/patients/)")
    settings(run)

    view = command("view", "the results in a browser: slides, heatmaps, regions and reports side by side "
                           "(read-only; loopback unless --host)", _cmd_view)
    view.add_argument("results", help="results folder of `wsiengine run`")
    view.add_argument("--slides", metavar="DIR", help="folder holding the slide files, when not where the run found them")
    view.add_argument("--host", default="127.0.0.1",
                      help="address to listen on (default 127.0.0.1; any other address adds an access token to the URL)")
    view.add_argument("--port", type=int, default=8765, help="TCP port (default 8765; 0 picks a free one)")
    view.add_argument("--open", action="store_true", help="open the index in the default web browser")

    stage = command("stage", "patient pN stages (CAMELYON17 rules) from the node reports of a results folder",
                    _cmd_stage)
    stage.add_argument("results", help="results folder of `wsiengine run` (SLIDE_ID.report.json per node)")
    stage.add_argument("--patients", required=True, help="PATIENTS.csv with the columns patient_id,slide_id")
    stage.add_argument("-o", "--output", help="STAGES.csv to write (default: RESULTS/stages.csv)")
    stage.add_argument("--reports", help="folder for PATIENT_ID.patient.md/.json (default: RESULTS/patients)")
    stage.add_argument("--id-map", dest="id_map", metavar="PATH",
                       help="an anonymized run's private slide-id map: PATIENTS.csv names the original slides")

    report = command("report", "a slide report (Markdown + JSON + images) from result stores; optional VLM",
                     _cmd_report, sections=["report", "vlm"], names=["tile_threshold"])
    report.add_argument("stores", nargs="+", help="SLIDE_ID.zarr written by the pipeline")
    report.add_argument("-o", "--output", help="folder for the report files (default: beside each store)")
    report.add_argument("--format", choices=["md", "json", "none"], default="md",
                        help="what to print to stdout; both files are always written (default: md)")
    report.add_argument("--slide", help="the slide file, when it is at neither its recorded absolute path nor "
                                        "its recorded place relative to the results folder")
    settings(report)

    doctor = command("doctor", "preflight a folder: which slides open, backend, mpp and source, the run's n_tiles",
                     _cmd_doctor, sections=["slide", "tissue", "tiling"], names=MODEL_NAMES)
    doctor.add_argument("slides", help="folder of slides or one slide")
    doctor.add_argument("--json", action="store_true", help="machine-readable output")
    settings(doctor)

    config = sub.add_parser("config", help="the resolved run configuration", parents=[common], allow_abbrev=False)
    config_sub = config.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    show = config_sub.add_parser("show", help="print every setting, resolved, with where its value came from",
                                 parents=[common], allow_abbrev=False)
    show.add_argument("--json", action="store_true", help="machine-readable output")
    show.set_defaults(func=_cmd_config_show)
    add_config_options(show, list(RunConfig.SECTIONS))
    return parser


def synopsis() -> str:
    """One line per command (positionals, own options, the setting sections it takes): the
    README's synopsis, generated here and checked against it by the tests."""
    parser = build_parser()
    lines = []
    for name, sub in _subcommands(parser).items():
        nested = _subcommands(sub)
        for label, p in ({f"{name} {k}": v for k, v in nested.items()} if nested else {name: sub}).items():
            own = []
            for action in p._actions:
                if action.dest.startswith(PREFIX) or action.dest in ("help", "verbose", "quiet", "config", "func"):
                    continue
                if not action.option_strings:
                    own.append(action.metavar or action.dest.upper() + (" ..." if action.nargs == "+" else ""))
                    continue
                flag = action.option_strings[0]
                if action.nargs == 0:
                    text = flag
                else:
                    text = f"{flag} {'|'.join(action.choices) if action.choices else (action.metavar or action.dest.upper())}"
                own.append(text if action.required else f"[{text}]")
            sections, names = getattr(p, "_wsiengine_settings", ((), ()))
            settings = [*sections, *(f"--{n.replace('_', '-')}" for n in names)]
            tail = f" [settings: {', '.join(settings)}]" if settings else ""
            lines.append(f"wsiengine {label} {' '.join(own)}{tail}".replace("  ", " ").rstrip())
    return "\n".join(lines)


def settings_reference() -> str:
    """A Markdown table of every setting: dotted name, flag, environment variable, default, meaning."""
    rows = ["| setting | flag | default | meaning |", "| --- | --- | --- | --- |"]
    for info in RunConfig.fields().values():
        if info.resolved:
            continue
        rows.append(f"| `{info.dotted}` | `{flag(info.name)}` | {default_text(info)} | {info.help.replace('|', '/')} |")
    return "\n".join(rows)


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name, default in (("verbose", False), ("quiet", False), ("config", None)):  # given before or after the command
        setattr(args, name, getattr(args, name, default))
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:  # the console shows `level`; a batch's log file gets INFO
        handler.setLevel(level)
    try:
        return int(args.func(args) or 0)
    except WsiEngineError as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
