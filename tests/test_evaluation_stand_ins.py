"""evaluation.stand_ins: random Inception weights in the standard format, a tiny CLIP, the command line."""

import pytest
import torch

from evaluation.fidelity_compat import register_torch_fidelity
from evaluation.stand_ins import CLIP_TEXT_POSITIONS, main, tiny_clip
from utils.cli import UsageError

register_torch_fidelity()
from torchmetrics.image.fid import NoTrainInceptionV3  # noqa: E402


def test_inception_stand_in_has_every_key_of_the_fid_inception_and_calibrated_statistics(stand_in_models):
    state = torch.load(stand_in_models["inception_weights"], weights_only=True)
    model = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                               feature_extractor_weights_path=str(stand_in_models["inception_weights"]))
    assert set(state) == set(model.state_dict())
    variances = [v for k, v in state.items() if k.endswith("running_var")]
    assert variances and all(not torch.allclose(v, torch.ones_like(v)) for v in variances)


def test_tiny_clip_reads_long_captions_whole(stand_in_models):
    _, processor = tiny_clip(seed=0)
    caption = "an aerial view of green fields and several dark ponds and a straight road near some buildings ."
    ids = processor(text=[caption], return_tensors="pt")["input_ids"]
    # Byte-level: one token per non-space character (a space folds into the word-final token), so this caption
    # is longer than SD's 77 and must still come back whole, closed by the end token.
    assert 77 < ids.shape[1] <= CLIP_TEXT_POSITIONS
    assert ids[0, -1].item() == processor.tokenizer.eos_token_id
    assert processor.tokenizer.decode(ids[0], skip_special_tokens=True) == caption
    assert (stand_in_models["clip_model"] / "STAND_IN.txt").is_file()


def test_output_path_that_is_a_file_is_refused(tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(UsageError, match=f"output_dir {target} exists and is not a folder"):
        main([str(target)])
