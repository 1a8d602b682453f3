"""utils/image_errors.py: a rejected row's reason is what the report counts; the detail rides along; one rule turns
Pillow's errors into reasons."""

import pytest

from utils.image_errors import REASON_TOO_LARGE, REASON_TRUNCATED, ImageRejected


def test_reason_and_detail_are_kept_and_shown():
    err = ImageRejected(REASON_TOO_LARGE, "9000x9000 exceeds 100 pixels")
    assert (err.reason, err.detail, str(err)) == ("too_large", "9000x9000 exceeds 100 pixels",
                                                  "too_large: 9000x9000 exceeds 100 pixels")
    bare = ImageRejected(REASON_TRUNCATED)
    assert (bare.reason, bare.detail, str(bare)) == ("truncated", "", "truncated")


def pillow_error(path_or_bytes) -> Exception:
    """What Pillow raises on opening and fully decoding a file path or image bytes."""
    import io

    from PIL import Image

    try:
        source = io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, bytes) else path_or_bytes
        Image.open(source).load()
    except Exception as err:  # noqa: BLE001 - whatever it is, the test looks at it
        return err
    raise AssertionError("Pillow read it")


def test_pillow_failures_get_the_reason_the_report_counts(tmp_path, monkeypatch):
    """Truncated data, bytes that are no image, a file that is gone and a decompression bomb: four reasons, each
    detail naming Pillow's error."""
    from PIL import Image

    # Pinned: the bomb case must not depend on the limit this process happens to have.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000_000)
    import odd_images as odd
    from utils.image_errors import REASON_UNDECODABLE, REASON_UNREADABLE, pillow_failure

    cases = {REASON_TRUNCATED: odd.truncated_jpeg(), REASON_UNDECODABLE: odd.junk_bytes(),
             REASON_UNREADABLE: tmp_path / "gone.jpg", REASON_TOO_LARGE: odd.png_claiming_size(20000, 20000)}
    for reason, source in cases.items():
        err = pillow_error(source)
        rejected = pillow_failure(err)
        assert (rejected.reason, rejected.detail) == (reason, f"{type(err).__name__}: {err}")


def test_a_header_pillow_cannot_parse_is_undecodable_whatever_it_says(monkeypatch):
    """Opening bytes reads only the header: a JPEG cut inside it raises "Truncated File Read", which create.py counts
    as undecodable (no pixel was decoded), while the same error from decoding is truncated; a bomb is too large."""
    import io

    from PIL import Image

    import odd_images as odd
    from utils.image_errors import REASON_UNDECODABLE, pillow_failure

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000_000)
    cut = odd.save(odd.noisy_rgb(8, 8), "JPEG")[:30]
    err = pillow_error(cut)
    assert "truncated" in str(err).lower()
    assert pillow_failure(err, header_only=True).reason == REASON_UNDECODABLE
    assert pillow_failure(err).reason == REASON_TRUNCATED
    with pytest.raises(Image.DecompressionBombError) as bomb:
        Image.open(io.BytesIO(odd.png_claiming_size(20000, 20000)))
    assert pillow_failure(bomb.value, header_only=True).reason == REASON_TOO_LARGE


def test_pixel_limit_holds_inside_the_block_only_even_when_it_raises(monkeypatch):
    from PIL import Image

    from utils.image_errors import pillow_pixel_limit

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1234)
    with pillow_pixel_limit(None):
        assert Image.MAX_IMAGE_PIXELS is None
    assert Image.MAX_IMAGE_PIXELS == 1234
    with pytest.raises(KeyError), pillow_pixel_limit(99):
        assert Image.MAX_IMAGE_PIXELS == 99
        raise KeyError("a bug inside the block")
    assert Image.MAX_IMAGE_PIXELS == 1234
