# Shell functions shared by the launchers (train.sh, train_controlnet.sh); sourced, never run.
# They read the launcher's settings from the environment (DATA_DIR, MODEL_NAME, ...) and PROG, its name for errors.
METADATA=metadata.jsonl

# One line on stderr and exit 2, like every other usage error of the project.
die() {
  echo "$PROG: error: $*" >&2
  exit 2
}

# DATA_DIR must be the folder with metadata.jsonl; the images subfolder is the usual mistake.
check_data_dir() {
  [[ -d "$DATA_DIR" ]] || die "DATA_DIR '$DATA_DIR' does not exist: set DATA_DIR to the folder holding $METADATA."
  [[ -f "$DATA_DIR/$METADATA" ]] && return 0
  [[ -n "${SHARDS_INDEX:-}" && -f "$DATA_DIR/$SHARDS_INDEX" ]] && return 0  # a launcher that reads shards sets it
  local parent
  parent="$(dirname "$DATA_DIR")"
  if [[ -f "$parent/$METADATA" ]]; then
    die "DATA_DIR '$DATA_DIR' holds only images; set DATA_DIR to its parent '$parent', which holds $METADATA."
  fi
  die "DATA_DIR '$DATA_DIR' holds no $METADATA: run format.py on create.py's captions.txt first."
}

# The settings both launchers share; each checks its own after this.
check_common_settings() {
  [[ -n "$MODEL_NAME" ]] || die "MODEL_NAME is empty: set it to a Hub id or a local pipeline folder."
  if [[ "$MODEL_NAME" == /* || "$MODEL_NAME" == .* || "$MODEL_NAME" == "~"* ]] && [[ ! -d "$MODEL_NAME" ]]; then
    die "MODEL_NAME '$MODEL_NAME' does not exist."
  fi
  [[ -n "$OUTPUT_DIR" ]] || die "OUTPUT_DIR is empty."
  [[ -n "$REPORT_TO" ]] || die "REPORT_TO is empty: use wandb or tensorboard."
  case "$PUSH_TO_HUB" in
    0 | 1) ;;
    *) die "PUSH_TO_HUB '$PUSH_TO_HUB' must be 1 or 0." ;;
  esac
  case "$CACHE_LATENTS" in
    0 | 1) ;;
    *) die "CACHE_LATENTS '$CACHE_LATENTS' must be 1 or 0." ;;
  esac
  if [[ -n "$LAUNCH_ARGS" && ! "$LAUNCH_ARGS" =~ ^[[:space:]]*- ]]; then
    die "LAUNCH_ARGS '$LAUNCH_ARGS' must start with an accelerate launch option (e.g. --num_machines 2)."
  fi
  if [[ -n "${ACCELERATE_CONFIG_FILE:-}" && ! -f "$ACCELERATE_CONFIG_FILE" ]]; then
    die "ACCELERATE_CONFIG_FILE '$ACCELERATE_CONFIG_FILE' does not exist."
  fi
}

# A token on the command line is visible to every user of the machine (ps, shell history).
refuse_token_args() {
  local arg
  for arg in "$@"; do
    [[ "$arg" == --hub_token || "$arg" == --hub_token=* ]] &&
      die "do not pass --hub_token: run \`hf auth login\` or export HF_TOKEN instead."
  done
  return 0
}

# The last --mixed_precision among the given arguments (argparse's rule), or "no".
last_mixed_precision() {
  local value=no take_next=0 arg
  for arg in "$@"; do
    if ((take_next)); then
      value="$arg"
      take_next=0
    elif [[ "$arg" == --mixed_precision=* ]]; then
      value="${arg#--mixed_precision=}"
    elif [[ "$arg" == --mixed_precision ]]; then
      take_next=1
    fi
  done
  echo "$value"
}

# The user's accelerate config when there is one, else a single-process launch on this machine.
launch_options() {
  local default_config="${HF_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/huggingface}/accelerate/default_config.yaml"
  if [[ -n "${ACCELERATE_CONFIG_FILE:-}" ]]; then
    printf '%s\n' --config_file "$ACCELERATE_CONFIG_FILE"
  elif [[ -f "$default_config" ]]; then
    printf '%s\n' --config_file "$default_config"
  else
    printf '%s\n' --num_processes 1 --num_machines 1 --dynamo_backend no --mixed_precision "$1"
  fi
}

# Set the caller's `launcher` array: ACCELERATE's `launch`, else utils/launch.py run by PYTHON (the trainer's own
# message and exit code on failure, no launcher traceback).
set_launcher() {
  if [[ -n "$ACCELERATE" ]]; then
    read -r -a launcher <<<"$ACCELERATE"
    command -v "${launcher[0]}" >/dev/null || die "ACCELERATE '${launcher[0]}' not found."
    launcher+=(launch)
  else
    command -v "$PYTHON" >/dev/null || die "'$PYTHON' not found: activate the project's virtualenv or set PYTHON."
    launcher=("$PYTHON" "$SCRIPT_DIR/utils/launch.py")
  fi
}
