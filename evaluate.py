#!/usr/bin/env python
"""Measure a fine-tuned pipeline on held-out captions: one generated image per caption, then FID, CLIP score and
scene accuracy (rows' classes from RSICD file names, a create.py folder's metadata.jsonl source_file, or
--class_column).

    python evaluate.py --model sd-rsicd-model --parquet_path rsicd_parquet/data/test-*.parquet \
        --inception_weights pt_inception-2015-12-05-6726825d.pth --clip_model clip-vit-base-patch32 \
        --output_dir eval/test

Writes EVAL_DIR/generated/NNNNNN.png (row NNNNNN of the input, seed --seed + NNNNNN - 1, or --seed with
--shared_seed), eval_report.json (N, settings, FID, CLIP score, scene accuracy, bad rows, timings) and sheet.html
(real vs generated). Rerun the same command to resume: images already on disk are kept, only the missing ones are
generated.
"""

import time
from pathlib import Path

from utils.atomic import write_json_atomic
from evaluation.args import parse_args, source_options
from evaluation.control import ControlEvaluation, control_summary
from evaluation.data import load_rows
from evaluation.generation import (GENERATED_DIRNAME, check_settings, generate_missing, missing_rows,
                                   record_settings, row_seed, settings_from_args)
from evaluation.gsd import GSD_DIRNAME, gsd_section, gsd_summary, plan_gsd
from evaluation.metrics import (clip_cosine, clip_info, inception_info, load_clip, load_inception, make_clip_score,
                                make_fid)
from evaluation.report import REPORT_FILENAME, build_report, write_sheet
from evaluation.scene import FeatureRecorder, class_source, scene_report, scene_summary
from evaluation.scoring import add_generated_images, add_real_images
from inference.pipeline import load_pipeline, pick_device
from utils.cli import UsageError, run_main
from utils.logger import get_logger, setup_logging
from utils.quiet import quiet_libraries


def main(argv=None) -> int:
    """Evaluate: data, metric models, pipeline, real features, generation, generated features, report."""
    args = parse_args(argv)
    setup_logging()
    quiet_libraries()
    log = get_logger()
    clock = {"start": time.monotonic()}
    eval_dir = Path(args.output_dir)
    if eval_dir.exists() and not eval_dir.is_dir():
        raise UsageError(f"--output_dir {eval_dir} exists and is not a folder")

    # Held-out pairs: the first --num_samples rows, each with the caption at --caption_index; a folder that holds
    # images made with other settings is refused now, before anything loads.
    # Each row carries its scene class (--class_column, else its file name's prefix), read with it.
    rows, bad, rows_read = load_rows(args.data_dir, args.parquet_path, args.caption_index, args.num_samples,
                                     args.input, source_options(args), args.class_column)
    if args.num_samples and rows_read < args.num_samples:
        log.warning("--num_samples %d asked, but the data has only %d rows", args.num_samples, rows_read)
    device, dtype = pick_device(args.device, args.dtype)
    settings = settings_from_args(args, device, dtype)
    generated_dir = eval_dir / GENERATED_DIRNAME
    check_settings(generated_dir, settings, args.overwrite)
    # --controlnet: rows are drawn from their conditioning files (and again from shuffled ones, the floor).
    control = ControlEvaluation(args) if args.controlnet else None
    if control is not None:
        control.check_settings(eval_dir, settings, args.overwrite)
        rows, control_bad = control.select(rows, args.resolution)
        bad = bad + control_bad
    # GSD adherence: the probe folder's metadata are read now (no images), so a bad folder fails before loading.
    gsd_plan = plan_gsd(args.gsd_probe_data, rows, args.gsd_sweep_rows, args.gsd_sweep_points)
    gsd_settings = {**settings, **gsd_plan.settings()}
    if not gsd_plan.skipped:
        check_settings(eval_dir / GSD_DIRNAME, gsd_settings, args.overwrite)

    # Metric models from local paths; a wrong file is refused here, before anything is generated.
    inception_path, clip_path = Path(args.inception_weights), Path(args.clip_model)
    features = FeatureRecorder(load_inception(inception_path))  # FID's pool features, kept for scene accuracy
    fid = make_fid(features).to(device)
    clip_score = make_clip_score(*load_clip(clip_path)).to(device)
    inception, clip = inception_info(inception_path), clip_info(clip_path)

    # The model to evaluate; its settings are kept beside the images, so a rerun with others is refused.
    pipeline = load_pipeline(args.model, args.base_model, device, dtype, args.scheduler, args.weights,
                             args.lora_scale)
    pipeline = control.pipeline(pipeline, device, dtype) if control is not None else pipeline
    record_settings(generated_dir, settings, args.overwrite)
    if not gsd_plan.skipped:
        record_settings(eval_dir / GSD_DIRNAME, gsd_settings, args.overwrite)
    clock["loaded"] = time.monotonic()

    # Real side of FID first: it streams, and it finds undecodable images before we spend time generating.
    rows, rejected, reals = add_real_images(rows, fid, args.resolution, args.metric_batch_size, args.sheet_pairs,
                                            device)
    real_features = features.take()
    bad = sorted(bad + rejected, key=lambda row: row.number)
    if len(rows) < 2:
        raise UsageError(f"only {len(rows)} usable row(s) of {rows_read}; FID needs at least 2 "
                         f"({', '.join(sorted({b.reason for b in bad}))})")
    if bad:
        log.warning("%d of %d rows left out (see bad_rows in the report)", len(bad), rows_read)
    clock["real"] = time.monotonic()

    # Generate what is not on disk yet (a rerun resumes), each image saved as soon as it is ready.
    pending = missing_rows(rows, generated_dir)
    log.info("generating %d of %d images (%d already on disk)", len(pending), len(rows), len(rows) - len(pending))
    options = {"seed": args.seed, "num_inference_steps": args.num_inference_steps,
               "guidance_scale": args.guidance_scale, "resolution": args.resolution, "batch_size": args.batch_size,
               "shared_seed": args.shared_seed}
    if control is None:
        generate_missing(pipeline, pending, generated_dir, **options)
    else:
        control.generate(pipeline, rows, eval_dir, settings, args.overwrite, **options)
    clock["generation"] = time.monotonic()

    # Generated side of FID, and CLIP score of each generated image against its caption.
    add_generated_images(rows, generated_dir, fid, clip_score, args.resolution, args.metric_batch_size, device)
    figures = {"fid": float(fid.compute()), "clip_score": float(clip_score.compute()),
               "clip_cosine": clip_cosine(clip_score),
               "scene": scene_report(rows, real_features, features.take(), class_source(args.class_column),
                                     args.seed)}
    if control is not None:
        figures["control"] = control.report(rows, eval_dir, args.resolution)
    clock["end"] = time.monotonic()
    if args.gsd_probe_data:
        options = {"num_inference_steps": args.num_inference_steps, "guidance_scale": args.guidance_scale,
                   "height": args.resolution, "width": args.resolution, "batch_size": args.batch_size}
        figures["gsd"] = gsd_section(pipeline, gsd_plan, rows, eval_dir, generated_dir, resolution=args.resolution,
                                     seed=args.seed, options=options, through_vae=args.gsd_probe_vae,
                                     seed_of=lambda row: row_seed(args.seed, row, args.shared_seed))
    clock["gsd"] = time.monotonic()

    timings = {"loading": clock["loaded"] - clock["start"], "real_features": clock["real"] - clock["loaded"],
               "generation": clock["generation"] - clock["real"],
               "generated_features": clock["end"] - clock["generation"], "gsd": clock["gsd"] - clock["end"],
               "total": clock["gsd"] - clock["start"], "images_generated": len(pending)}
    report = build_report(args, settings=settings, rows_read=rows_read, pairs=len(rows), bad=bad, figures=figures,
                          inception=inception, clip=clip, device=f"{device} ({dtype})", timings=timings)
    write_json_atomic(eval_dir / REPORT_FILENAME, report)
    sheet = write_sheet(eval_dir, rows[:len(reals)], reals, f"{args.model}: real vs generated",
                        control.pictures(rows[:len(reals)]) if control is not None else None, figures.get("gsd"),
                        rows)
    for warning in report["warnings"]:
        log.warning(warning)
    log.info("N=%d  FID %.2f  CLIP score %.2f (cosine %.4f)  -> %s, %s", len(rows), figures["fid"],
             figures["clip_score"], figures["clip_cosine"], eval_dir / REPORT_FILENAME, sheet)
    log.info("%s", scene_summary(figures["scene"]))
    if control is not None:
        log.info("%s", control_summary(figures["control"]))
    if args.gsd_probe_data:
        log.info("%s", gsd_summary(figures["gsd"]))
    return 0


if __name__ == "__main__":
    run_main(main)
