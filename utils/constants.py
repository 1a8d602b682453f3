"""True constants: file names, extensions and fixed defaults shared by the scripts.

Tunables live in each script's CLI flags; only values that several scripts must agree on belong here.
"""

# Data preparation (create.py / format.py)
IMAGES_DIRNAME = "rsicd_images"
IMAGE_PREFIX = "image_"
IMAGE_INDEX_DIGITS = 6
IMAGE_EXTENSION = ".jpg"
CAPTIONS_FILENAME = "captions.txt"
# create.py's image -> source file name, one JSON line per image; format.py copies it into metadata.jsonl's
# source_file (the class in RSICD names like airport_1.jpg survives the renaming to image_NNNNNN.jpg).
SOURCE_FILES_FILENAME = "source_files.jsonl"
SOURCE_FILE_KEY = "source_file"
# create.py's per-image metadata beside captions.txt ({"file_name", "metadata"} per line) and its metadata.jsonl key.
METADATA_VALUES_FILENAME = "metadata_values.jsonl"
METADATA_KEY = "metadata"
METADATA_FILENAME = "metadata.jsonl"
# ControlNet conditioning (create.py --conditioning_column/--conditioning_dir): one file per image under this folder,
# named like the image (image_NNNNNN.png or .npy); create.py's image -> conditioning file lines beside captions.txt
# ({"file_name", "conditioning_image", per-row statistics}), which format.py copies into metadata.jsonl's
# conditioning_image; and the conditioning's description (type, channels, classes, bands, statistics) for training.
CONDITIONING_DIRNAME = "conditioning_images"
CONDITIONING_FILES_FILENAME = "conditioning_files.jsonl"
CONDITIONING_KEY = "conditioning_image"
CONDITIONING_FILENAME = "conditioning.json"
CREATE_REPORT_FILENAME = "create_report.json"
FORMAT_REPORT_FILENAME = "format_report.json"
PARQUET_EXTENSION = ".parquet"
TMP_SUFFIX = ".tmp"
CAPTION_SEPARATOR = "\t"
# create.py --output_format webdataset: OUTPUT_DIR/shards/shard-NNNNNN.{tar,parquet,json} (samples, that shard's
# index part, its stats: written last, so its presence marks the shard finished), then the global index and the
# per-shard stats (written last of all: their presence means the folder is complete).
SHARDS_DIRNAME = "shards"
SHARDS_INDEX_FILENAME = "shards_index.parquet"
SHARDS_STATS_FILENAME = "shards_stats.json"
DEFAULT_SHARD_SIZE = 10_000

DEFAULT_RESOLUTION = 512
DEFAULT_JPEG_QUALITY = 95
# Background that alpha is composited onto, so transparent pixels become a fixed, documented colour.
ALPHA_BACKGROUND = (0, 0, 0)

# Training
DEFAULT_BASE_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
CHECKPOINT_PREFIX = "checkpoint-"
EMA_UNET_DIRNAME = "unet_ema"
UNET_DIRNAME = "unet"
VALIDATION_DIRNAME = "validation"
MODEL_CARD_FILENAME = "README.md"
TRAINING_STATE_FILENAME = "training_state.json"
LOSS_LOG_FILENAME = "loss_log.csv"
LOSS_CURVE_FILENAME = "loss_curve.png"
# Training rows that could not be read (an image; for train_controlnet.py also a conditioning file), with why:
# OUTPUT_DIR/bad_rows.json.
BAD_ROWS_FILENAME = "bad_rows.json"
# The reason a row with an unreadable or malformed conditioning file gets, in training and evaluation reports.
BAD_CONDITIONING_REASON = "bad_conditioning_image"

# Inference
DEFAULT_NUM_INFERENCE_STEPS = 100
DEFAULT_GUIDANCE_SCALE = 7.5

# Pictures for people (validation progress, grids, evaluation sheet): a smaller tile is enlarged by an integer factor
# (nearest neighbour) until its short side reaches this, so a 16 px image is seen pixel by pixel rather than as a dot.
MIN_TILE_SIDE = 128

# Latent cache (train_text_to_image.py --cache_latents)
DEFAULT_CACHE_CHUNK_ROWS = 1024
DEFAULT_TEXT_CACHE_BUDGET_GB = 5.0
