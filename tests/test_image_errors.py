"""diffusion_model/image_errors.py: a rejected row's reason is what the report counts; the detail rides along."""

from diffusion_model.image_errors import REASON_TOO_LARGE, REASON_TRUNCATED, ImageRejected


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

    # create.py lifts Pillow's pixel limit process-wide (create_job), and in-process create tests may run first.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000_000)
    import odd_images as odd
    from diffusion_model.image_errors import REASON_UNDECODABLE, REASON_UNREADABLE, load_failure

    cases = {REASON_TRUNCATED: odd.truncated_jpeg(), REASON_UNDECODABLE: odd.junk_bytes(),
             REASON_UNREADABLE: tmp_path / "gone.jpg", REASON_TOO_LARGE: odd.png_claiming_size(20000, 20000)}
    for reason, source in cases.items():
        err = pillow_error(source)
        rejected = load_failure(err)
        assert (rejected.reason, rejected.detail) == (reason, f"{type(err).__name__}: {err}")
