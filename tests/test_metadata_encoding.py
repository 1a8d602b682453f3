"""trainer/metadata.py: the metadata vector's layout, each field's encoding, absent fields, bad values, the spec,
and the guidance dropout's seeded draws."""

import math

import numpy as np
import pytest
import torch

from trainer import metadata as M

ALL = M.FIELDS


def encoder(fields=ALL, sensors=("naip", "wv3")):
    """An encoder over fields with 4 frequencies and a two-sensor vocabulary."""
    return M.MetadataEncoder(M.parse_fields(",".join(fields)), 4, sensors if "sensor" in fields else ())


def test_dims_and_layout():
    """9 per Fourier scalar (value + 4 sin/cos pairs); location 3 scalars; date +2; sensor vocab + other; bits."""
    enc = encoder()
    widths = {g: b - a for g, (a, b) in enc.layout().items()}
    assert widths == {"gsd": 9, "location": 27, "date": 11, "cloud": 9, "off_nadir": 9, "sensor": 3}
    assert enc.dim == 68 + 6
    assert encoder(("gsd",)).dim == 10
    assert encoder(("lat", "lon", "date")).dim == 27 + 11 + 2


def test_parse_fields_order_and_errors():
    """Canonical order whatever the command line's; unknown names and a lone lat are refused."""
    assert M.parse_fields("sensor, gsd") == ("gsd", "sensor")
    assert M.parse_fields(None) == () and M.parse_fields("") == ()
    with pytest.raises(ValueError, match="'height'"):
        M.parse_fields("gsd,height")
    with pytest.raises(ValueError, match="lat and lon"):
        M.parse_fields("lat")


def test_all_absent_is_the_zero_vector_and_absent_is_not_zero():
    """Nothing known -> all zeros; a real 0 (lon 0, cloud 0 %) is present, so its vector is not the absent one."""
    enc = encoder()
    assert torch.equal(enc.encode_dict({}), torch.zeros(enc.dim))
    zero_cloud = enc.encode_dict({"cloud": 0.0})
    assert zero_cloud.abs().sum() > 0
    start, end = enc.layout()["cloud"]
    assert zero_cloud[enc.dim - 6 + 3] == 1.0  # cloud's present bit
    assert torch.count_nonzero(zero_cloud[:start]) == 0 and torch.count_nonzero(zero_cloud[end:enc.dim - 6]) == 0


def test_gsd_is_log2_and_octaves_are_evenly_spaced():
    """The value feature is log2(gsd)/5: 0.5 m and 2 m sit one octave either side of 1 m."""
    enc = encoder(("gsd",))
    values = [enc.encode_dict({"gsd": g})[0].item() for g in (0.5, 1.0, 2.0)]
    assert values == pytest.approx([-0.2, 0.0, 0.2])


def test_location_has_no_seam_at_the_antimeridian():
    """lon 179.9 and -179.9 give nearly the same features; the poles give the same point for every lon."""
    enc = encoder(("lat", "lon"))
    east, west = enc.encode_dict({"lat": 10, "lon": 179.9}), enc.encode_dict({"lat": 10, "lon": -179.9})
    far = enc.encode_dict({"lat": 10, "lon": 0.0})
    assert (east - west).abs().max() < 0.15 < 1.0 < (east - far).abs().max()
    start, _ = enc.layout()["location"]
    width = enc.scalar_width()
    xyz = [enc.encode_dict({"lat": 90, "lon": lon})[[start, start + width, start + 2 * width]] for lon in (0, 120)]
    assert torch.allclose(xyz[0], xyz[1], atol=1e-6) and xyz[0][2] == pytest.approx(1.0)


@pytest.mark.parametrize("value", ["2021-07-01", "20210701", "2021-07-01T10:32:22Z", "2021-07-01T10:32:22+00:00"])
def test_date_forms_agree(value):
    """Every accepted date form gives the same season and year features."""
    import datetime as dt

    enc = encoder(("date",))
    assert torch.allclose(enc.encode_dict({"date": value}), enc.encode_dict({"date": dt.datetime(2021, 7, 1)}))


def test_season_is_cyclic_and_a_year_alone_has_no_season():
    """31 Dec and 1 Jan are neighbours; a year-only date keeps its year but zeros its sin/cos."""
    enc = encoder(("date",))
    dec, jan = enc.encode_dict({"date": "2020-12-31"}), enc.encode_dict({"date": "2021-01-01"})
    jul = enc.encode_dict({"date": "2021-07-01"})
    assert (dec[:2] - jan[:2]).abs().max() < 0.05 < (jan[:2] - jul[:2]).abs().max()
    year_only = enc.encode_dict({"date": "2021"})
    assert year_only[:2].tolist() == [0.0, 0.0]
    assert year_only[2].item() == pytest.approx((2021 - 2000) / 50) and year_only[-1] == 1.0


def test_sensor_one_hot_with_other_slot():
    """Known sensors (any case) get their slot; an unknown one the 'other' slot."""
    enc = encoder(("sensor",))
    assert enc.encode_dict({"sensor": " NAIP "})[:3].tolist() == [1.0, 0.0, 0.0]
    assert enc.encode_dict({"sensor": "spot"})[:3].tolist() == [0.0, 0.0, 1.0]


def test_bad_values_count_as_absent_and_are_counted():
    """A bad value drops only its field and is counted, first one kept for the log line; never raises."""
    cells = [{"gsd": "abc", "lat": 10, "lon": 20}, {"gsd": -1.0}, {"lat": 95, "lon": 0}, None,
             {"gsd": 0.5, "date": "not a date", "sensor": ""}, {"gsd": True}]
    rows = M.read_rows(cells, M.parse_fields("gsd,lat,lon,date,sensor"))
    assert rows.bad.by_field == {"gsd": 3, "lat": 1, "date": 1, "sensor": 1}
    assert rows.bad.first == "row 0 gsd='abc'"
    assert math.isnan(rows.raw[0, 0]) and rows.raw[0, 1] == 10 and rows.raw[4, 0] == -1.0
    line = M.describe(rows)
    assert "6 bad value(s) treated as absent" in line and "gsd 1" in line and "location 1" in line


def test_vocabulary_comes_from_the_rows():
    """The sensor vocabulary is the rows' distinct sensors, sorted, case-folded."""
    rows = M.read_rows([{"sensor": "WV3"}, {"sensor": "naip"}, {}, {"sensor": "wv3"}], ("sensor",))
    assert rows.encoder.sensors == ("naip", "wv3")
    assert rows.sensors.tolist() == [1, 0, M.NO_SENSOR, 1]


def test_spec_round_trip(tmp_path):
    """metadata_spec.json rebuilds an encoder giving the same vectors."""
    enc = encoder()
    M.write_spec(enc, tmp_path)
    again = M.read_spec(tmp_path)
    assert again == enc
    row = {"gsd": 0.3, "lat": -33.9, "lon": 151.2, "date": "2019-03-04", "cloud": 12, "off_nadir": 20,
           "sensor": "wv3"}
    assert torch.equal(again.encode_dict(row), enc.encode_dict(row))
    assert M.read_spec(tmp_path / "none") is None


def test_dropped_group_clears_features_and_present_bit():
    """keep=False for a group zeroes exactly its features and its bit."""
    enc = encoder(("gsd", "cloud"))
    raw, sensor = M.read_row(0, {"gsd": 2.0, "cloud": 50}, enc.fields, M.BadValues())
    full, no_gsd = enc.encode(raw, M.NO_SENSOR), enc.encode(raw, M.NO_SENSOR, [False, True])
    a, b = enc.layout()["gsd"]
    assert torch.count_nonzero(no_gsd[a:b]) == 0 and no_gsd[-2] == 0 and no_gsd[-1] == 1
    assert torch.equal(no_gsd[b:enc.dim - 2], full[b:enc.dim - 2])


def test_guidance_dropout_rates_and_seeding():
    """Per-group and whole-vector drops happen at their rates; the same (seed, epoch, row) draws the same."""
    rows = M.read_rows([{"gsd": 1.0, "cloud": 10}] * 4000, ("gsd", "cloud"))
    dropout = M.GuidanceDropout(field=0.1, all=0.05, caption=0.2)
    draws = [M.row_conditioning(rows, dropout, 7, 0, i) for i in range(4000)]
    bits = torch.stack([v[-2:] for _, v in draws])
    assert (bits == 0).all(dim=1).float().mean().item() == pytest.approx(0.05 + 0.95 * 0.01, abs=0.015)
    assert (bits[:, 0] == 0).float().mean().item() == pytest.approx(0.05 + 0.95 * 0.1, abs=0.02)
    assert np.mean([empty for empty, _ in draws]) == pytest.approx(0.2, abs=0.02)
    again = M.row_conditioning(rows, dropout, 7, 0, 123)
    assert again[0] == draws[123][0] and torch.equal(again[1], draws[123][1])
    assert not torch.equal(torch.stack([M.row_conditioning(rows, dropout, 7, 1, i)[1] for i in range(50)]),
                           torch.stack([v for _, v in draws[:50]]))
    assert M.row_conditioning(None, M.GuidanceDropout(), 7, 0, 0) == (False, None)
