"""inference/metadata_pipeline.py: pipe(prompt, metadata={...}) on a tiny pipeline whose UNet takes metadata: the
metadata change the image, an untrained embedding changes nothing, no metadata = all absent, metadata guidance, the
checks on what the user asks, and the spec found beside a checkpoint's UNet."""

import json

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel

from conftest import save_metadata_pipeline
from inference.metadata_pipeline import (MetadataStableDiffusionPipeline, check_request, check_source_request,
                                         metadata_hooks)
from inference.pipeline import ModelSource
from trainer.metadata import MetadataEncoder
from utils.cli import UsageError

SIZE = 16
STEPS = 2
PROMPT = "a satellite image of a harbour"
SEED = 3
CITY = {"gsd": 0.5, "lat": 37.77, "lon": -122.42, "date": "2021-07-01"}
FARM = {"gsd": 8.0, "lat": -33.9, "lon": 18.4, "date": "2015-01-15"}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: the box has two cores shared with other work."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def load(folder, **extra):
    return MetadataStableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False,
                                                           **extra)


@pytest.fixture(scope="module")
def trained(metadata_model_dir):
    return load(metadata_model_dir)


@pytest.fixture(scope="module")
def untrained(tiny_model_dir, tmp_path_factory):
    """The embedding as training adds it: last layer zero."""
    return load(save_metadata_pipeline(tiny_model_dir, tmp_path_factory.mktemp("untrained") / "p", trained=False))


def draw(pipeline, **call) -> np.ndarray:
    """One seeded image as float pixels."""
    generator = torch.Generator("cpu").manual_seed(SEED)
    result = pipeline(PROMPT, height=SIZE, width=SIZE, num_inference_steps=STEPS, guidance_scale=5.0,
                      generator=generator, output_type="np", **call)
    return result.images[0]


# --- the metadata reach the UNet


def test_other_metadata_give_other_images_and_the_same_metadata_the_same_image(trained):
    city, farm = draw(trained, metadata=CITY), draw(trained, metadata=FARM)
    assert np.abs(city - farm).mean() > 1e-3
    assert np.array_equal(city, draw(trained, metadata=dict(CITY)))


def test_each_field_changes_the_image(trained):
    city = draw(trained, metadata=CITY)
    for changed in ({"gsd": 4.0}, {"lat": 10.0, "lon": 100.0}, {"date": "2021-12-31"}):
        assert not np.array_equal(city, draw(trained, metadata={**CITY, **changed})), changed


def test_untrained_embedding_gives_the_base_models_image_bitwise(untrained, tiny_model_dir):
    base = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None, requires_safety_checker=False)
    expected = draw(base)
    assert np.array_equal(draw(untrained, metadata=CITY), expected)
    # With guidance the batch runs doubled, which rounds differently: equal up to float noise.
    assert np.allclose(draw(untrained, metadata=FARM, metadata_guidance_scale=3.0), expected, atol=1e-5)


def test_no_metadata_is_the_all_absent_vector_like_an_empty_dict(trained):
    absent = draw(trained)
    assert np.array_equal(absent, draw(trained, metadata={}))
    assert not np.array_equal(absent, draw(trained, metadata={"gsd": 0.5}))


# --- metadata guidance


def test_guidance_scale_zero_is_the_absent_image_and_other_scales_move_away_from_it(trained):
    absent, plain = draw(trained), draw(trained, metadata=CITY)
    # eps_absent + 0 * (...) is eps_absent; run as one doubled batch, so equal up to the batch's rounding.
    assert np.allclose(draw(trained, metadata=CITY, metadata_guidance_scale=0.0), absent, atol=1e-4)
    strong = draw(trained, metadata=CITY, metadata_guidance_scale=3.0)
    assert np.abs(strong - absent).mean() > np.abs(plain - absent).mean() > 1e-3


def test_guided_prediction_is_absent_plus_scale_times_the_difference(trained):
    unet, encoder = trained.unet, trained.metadata_encoder
    torch.manual_seed(0)
    sample, text = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32)
    vector = encoder.encode_dict(CITY)
    with torch.no_grad():
        with_metadata = unet(sample, 10, encoder_hidden_states=text, class_labels=vector.expand(2, -1)).sample
        absent = unet(sample, 10, encoder_hidden_states=text, class_labels=torch.zeros(2, encoder.dim)).sample
        with metadata_hooks(unet, vector, 2.5):
            guided = unet(sample, 10, encoder_hidden_states=text, return_dict=False)[0]
        # The hooks are gone afterwards: a call without labels is refused again by diffusers.
        with pytest.raises(ValueError):
            unet(sample, 10, encoder_hidden_states=text)
    assert torch.allclose(guided, absent + 2.5 * (with_metadata - absent), atol=1e-5)


# --- what the user may ask


@pytest.mark.parametrize("metadata, expected", [
    ({"height": 3}, "unknown metadata field 'height'"),
    ({"cloud": 10}, "metadata field 'cloud' is not one the model was trained on (gsd, lat, lon, date)"),
    ({"gsd": -1}, "metadata gsd=-1: must be above 0"),
    ({"lat": 95, "lon": 0}, "metadata lat=95: outside [-90, 90]"),
    ({"date": "July"}, "metadata date=July: not an ISO 8601 date"),
    ({"lat": 10}, "lat and lon go together"),
])
def test_bad_metadata_is_a_value_error_naming_it(trained, metadata, expected):
    with pytest.raises(ValueError) as error:
        draw(trained, metadata=metadata)
    assert expected in str(error.value)


def test_values_are_normalised_like_create_pys_metadata():
    encoder = MetadataEncoder(("gsd", "lat", "lon", "date"))
    assert check_request(encoder, {"date": "20210701", "gsd": "0.5", "lat": 1, "lon": 2}) == {
        "gsd": 0.5, "lat": 1.0, "lon": 2.0, "date": "2021-07-01"}


def test_model_without_spec_refuses_metadata_and_samples_as_the_stock_pipeline(tiny_model_dir):
    plain = load(tiny_model_dir)
    assert plain.metadata_encoder is None
    with pytest.raises(ValueError, match="has no metadata_spec.json"):
        draw(plain, metadata={"gsd": 1.0})
    with pytest.raises(ValueError, match="needs a UNet trained with metadata"):
        draw(plain, metadata_guidance_scale=2.0)
    base = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None, requires_safety_checker=False)
    assert np.array_equal(draw(plain), draw(base))


# --- where the spec comes from


def test_a_checkpoint_unet_brings_its_spec_into_a_base_pipeline(metadata_model_dir, tiny_model_dir, tmp_path, trained):
    unet_dir = tmp_path / "checkpoint-4" / "unet_ema"
    UNet2DConditionModel.from_pretrained(metadata_model_dir / "unet").save_pretrained(unet_dir)
    (unet_dir / "metadata_spec.json").write_bytes((metadata_model_dir / "unet" / "metadata_spec.json").read_bytes())
    pipeline = load(tiny_model_dir, unet=UNet2DConditionModel.from_pretrained(unet_dir))
    assert pipeline.metadata_encoder == trained.metadata_encoder
    assert np.array_equal(draw(pipeline, metadata=CITY), draw(trained, metadata=CITY))
    source = ModelSource(str(tiny_model_dir), unet_dir, "ema")
    assert check_source_request(source, {"gsd": "2"}, 1.0) == {"gsd": 2.0}


def test_source_checks_are_one_usage_line(metadata_model_dir, tiny_model_dir):
    with pytest.raises(UsageError, match="--metadata: metadata field 'cloud' is not one"):
        check_source_request(ModelSource(str(metadata_model_dir), None, "pipeline"), {"cloud": 3}, 1.0)
    with pytest.raises(UsageError, match="--metadata_guidance_scale 2.0 needs a model trained with"):
        check_source_request(ModelSource(str(tiny_model_dir), None, "pipeline"), None, 2.0)


def test_saved_pipeline_is_a_stock_pipeline(trained, tmp_path):
    trained.save_pretrained(tmp_path / "saved")
    index = json.loads((tmp_path / "saved" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert type(StableDiffusionPipeline.from_pretrained(tmp_path / "saved")) is StableDiffusionPipeline
