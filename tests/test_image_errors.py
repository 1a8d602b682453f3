"""diffusion_model/image_errors.py: a rejected row's reason is what the report counts; the detail rides along."""

from diffusion_model.image_errors import REASON_TOO_LARGE, REASON_TRUNCATED, ImageRejected


def test_reason_and_detail_are_kept_and_shown():
    err = ImageRejected(REASON_TOO_LARGE, "9000x9000 exceeds 100 pixels")
    assert (err.reason, err.detail, str(err)) == ("too_large", "9000x9000 exceeds 100 pixels",
                                                  "too_large: 9000x9000 exceeds 100 pixels")
    bare = ImageRejected(REASON_TRUNCATED)
    assert (bare.reason, bare.detail, str(bare)) == ("truncated", "", "truncated")
