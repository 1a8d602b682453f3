"""Merge a LoRA run into its base model and save a full diffusers pipeline (loadable without peft or LoRA code).

Run: python merge_lora.py --model sd-rsicd-lora --output_dir sd-rsicd-merged [--base_model ID] [--lora_scale 1]
--model is a LoRA run's OUTPUT_DIR or one of its checkpoint-N folders (EMA adapters when it has them); the base is
--base_model or the one the run recorded in lora_run.json. The merge is done in fp32 on the CPU. A run trained with
--metadata_fields also installs its metadata embedding (stock config keys) and writes unet/metadata_spec.json, so
the merged pipeline samples with generate.py --metadata.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from inference.pipeline import WEIGHTS_CHOICES  # noqa: E402
from utils.cli import ArgumentParser, UsageError, check_finite, run_main  # noqa: E402
from utils.logger import get_logger, setup_logging  # noqa: E402


def parse_args(argv=None):
    """merge_lora.py's flags; bad values are one line, exit 2."""
    parser = ArgumentParser(description="Fuse a LoRA run's adapters into its base model and save the pipeline.")
    parser.add_argument("--model", required=True, help="a LoRA run's OUTPUT_DIR or one of its checkpoint-N folders")
    parser.add_argument("--output_dir", required=True, help="where the merged pipeline is written (must not exist)")
    parser.add_argument("--base_model", default=None, help="base pipeline (default: the one in lora_run.json)")
    parser.add_argument("--weights", choices=WEIGHTS_CHOICES, default="auto",
                        help="for a checkpoint: its EMA adapters (ema), its training ones (unet), or auto")
    parser.add_argument("--lora_scale", type=float, default=1.0, help="strength the adapters are merged at")
    args = parser.parse_args(argv)
    check_finite("--lora_scale", args.lora_scale)
    return args


def main(argv=None) -> int:
    """Resolve the run and its base, load both, fuse, save to a temporary folder, then rename it into place."""
    import shutil

    import torch

    from inference.metadata_pipeline import unet_spec
    from inference.pipeline import load_source, resolve_model
    from trainer.metadata import write_spec
    from utils.constants import UNET_DIRNAME

    args = parse_args(argv)
    setup_logging()
    output = Path(args.output_dir)
    if output.exists():
        raise UsageError(f"--output_dir '{output}' already exists; pick a new folder.")
    source = resolve_model(args.model, args.base_model, args.weights, args.lora_scale)
    if source.lora is None:
        raise UsageError(f"--model '{args.model}' holds no LoRA weights (pytorch_lora_weights.safetensors).")
    pipeline = load_source(source, torch.device("cpu"), torch.float32)
    pipeline.fuse_lora(adapter_names=pipeline.get_active_adapters(), lora_scale=1.0)  # set_adapters applied the scale
    pipeline.unload_lora_weights()
    tmp = output.with_name(f".{output.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipeline.save_pretrained(tmp, safe_serialization=True)
    encoder = unet_spec(pipeline.unet)
    if encoder is not None:
        write_spec(encoder, tmp / UNET_DIRNAME)
    tmp.rename(output)
    get_logger().info("Merged %s (%s, scale %g%s) into %s: saved %s", source.lora, source.weights, source.lora_scale,
                      ", with its metadata embedding" if encoder is not None else "", source.pipeline, output)
    return 0


if __name__ == "__main__":
    run_main(main)
