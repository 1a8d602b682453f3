"""Per-image metadata values: the flags' parsers, each field's validation, the GSD correction for the resize, the
merge of row, GeoTIFF and literal values, and fMoW sidecars."""

import argparse
import datetime as dt
import math
import re

import pytest

from diffusion_model import geo_metadata as gm


def test_columns_flag_maps_our_fields_to_source_columns():
    text = ("gsd=ground_sample_distance,lat=latitude,lon=longitude,date=timestamp,cloud=cloud_cover,"
            "off_nadir=off_nadir_angle,sensor=sensor")
    assert gm.parse_columns(text) == {"gsd": "ground_sample_distance", "lat": "latitude", "lon": "longitude",
                                      "date": "timestamp", "cloud": "cloud_cover", "off_nadir": "off_nadir_angle",
                                      "sensor": "sensor"}
    assert gm.parse_columns(" gsd = res ") == {"gsd": "res"}


@pytest.mark.parametrize("text, message", [
    ("height=h", "unknown field 'height' (known: gsd, lat, lon, date, cloud, off_nadir, sensor)"),
    ("gsd", "each item must be FIELD=COLUMN"),
    ("gsd=", "each item must be FIELD=COLUMN"),
    ("gsd=a,gsd=b", "field 'gsd' given twice"),
])
def test_columns_flag_refuses(text, message):
    with pytest.raises(argparse.ArgumentTypeError, match=re.escape(message)):
        gm.parse_columns(text)


def test_literals_flag_validates_and_normalises_each_value():
    assert gm.parse_literals("gsd=1,sensor=naip,date=2021-07-01") == {"gsd": 1.0, "sensor": "naip",
                                                                       "date": "2021-07-01"}
    for text, message in (("gsd=0", "gsd=0: must be above 0"), ("lat=91", r"outside \[-90, 90\]"),
                          ("date=yesterday", "not an ISO 8601"), ("cloud=x", "not a number")):
        with pytest.raises(argparse.ArgumentTypeError, match=message):
            gm.parse_literals(text)


@pytest.mark.parametrize("field, raw, value", [
    ("gsd", "0.3", 0.3), ("gsd", 2, 2.0), ("lat", -90, -90.0), ("lat", "37.7749295123", 37.7749295),
    ("lon", 180, 180.0), ("lon", "-122.42", -122.42), ("cloud", 0, 0.0), ("cloud", "100", 100.0),
    ("cloud", 0.5, 0.5), ("off_nadir", 90, 90.0), ("off_nadir", "12.5", 12.5),
    ("sensor", " WORLDVIEW02 ", "WORLDVIEW02"),
])
def test_good_values(field, raw, value):
    assert gm.check_value(field, raw) == (value, None)


@pytest.mark.parametrize("field, raw, reason", [
    ("gsd", 0, "must be above 0"), ("gsd", -1, "must be above 0"), ("gsd", "inf", "not finite"),
    ("gsd", "fine", "not a number"), ("gsd", True, "not a number (bool)"), ("gsd", [1], "not a number (list)"),
    ("lat", 90.5, "outside [-90, 90]"), ("lon", 190, "outside [-180, 180]"), ("lon", -180.01, "outside"),
    ("cloud", 101, "outside [0, 100]"), ("cloud", -1, "outside"), ("off_nadir", 91, "outside [0, 90]"),
    ("sensor", 3, "not a non-empty name"), ("date", "2021-13-01", "not an ISO 8601"),
    ("date", "1850", "year outside 1900-2100"), ("date", "0215-01-01", "year outside"), ("date", 3.5, "not a date"),
])
def test_bad_values_give_a_reason(field, raw, reason):
    value, why = gm.check_value(field, raw)
    assert value is None and reason in why


@pytest.mark.parametrize("raw, stored", [
    ("2021-07-01", "2021-07-01"), ("20210701", "2021-07-01"), (2015, "2015"), ("2015", "2015"),
    ("2012-04-02T10:32:22Z", "2012-04-02T10:32:22+00:00"), ("2012-04-02 10:32:22", "2012-04-02T10:32:22"),
    (dt.date(2020, 2, 29), "2020-02-29"), (dt.datetime(2020, 2, 29, 8, 5), "2020-02-29T08:05:00"),
])
def test_dates_are_stored_in_iso_form(raw, stored):
    assert gm.check_value("date", raw) == (stored, None)


def test_clean_drops_only_the_bad_field_and_keeps_absent_fields_absent():
    raw = {"gsd": "0.5", "lat": 123.0, "lon": "", "date": None, "cloud": math.nan, "sensor": "naip", "other": 1}
    values, problems = gm.clean(raw)
    assert values == {"gsd": 0.5, "sensor": "naip"}, "empty, None and NaN cells are absent, not 0"
    assert problems == [("lat", 123.0, "outside [-90, 90]")]


def test_clean_reports_a_value_it_cannot_store_as_text():
    _, problems = gm.clean({"date": dt.time(3, 0)})
    assert problems == [("date", "03:00:00", "not a date (time)")]


@pytest.mark.parametrize("width, height, resolution, mode, scale", [
    (1024, 1024, 512, "center_crop", 2.0),
    (1024, 600, 512, "center_crop", 600 / 512),  # the shorter side is kept whole
    (600, 1024, 300, "center_crop", 2.0),
    (1024, 600, 512, "pad", 2.0),  # the longer side fits the output
    (800, 200, 400, "stretch", 1.0),  # the geometric mean of 2.0 and 0.5
    (64, 64, 256, "center_crop", 0.25),  # upsampling makes the GSD finer
])
def test_gsd_scale(width, height, resolution, mode, scale):
    assert gm.gsd_scale(width, height, resolution, mode) == pytest.approx(scale)


def test_corrected_gsd_a_1024_tile_at_03_m_written_at_512_is_06_m():
    assert gm.corrected_gsd(0.3, 1024, 1024, 512, "center_crop") == 0.6
    with pytest.raises(ValueError):
        gm.gsd_scale(0, 10, 512, "center_crop")
    with pytest.raises(ValueError):
        gm.gsd_scale(10, 10, 512, "zoom")


def test_merge_prefers_the_row_then_the_geotiff_then_the_literals():
    row, tags, literals = {"gsd": 0.3}, {"gsd": 0.6, "lat": 10.0}, {"gsd": 1.0, "lat": 5.0, "sensor": "naip"}
    assert gm.merge(row, tags, literals) == {"gsd": 0.3, "lat": 10.0, "sensor": "naip"}
    assert list(gm.merge({"sensor": "x"}, {"lat": 1.0}, {"gsd": 1.0})) == ["gsd", "lat", "sensor"], "field order"


def test_row_metadata_corrects_every_gsd_and_reports_bad_values():
    values, problems = gm.row_metadata({"gsd": "bad", "cloud": 20}, {"gsd": 0.6, "lat": 37.0, "lon": -122.0},
                                       {"gsd": 1.0, "sensor": "naip"}, (224, 224), 64, "center_crop")
    assert values == {"gsd": 2.1, "lat": 37.0, "lon": -122.0, "cloud": 20.0, "sensor": "naip"}
    assert problems == [("gsd", "bad", "not a number")]
    values, problems = gm.row_metadata(None, None, {"gsd": 1.0}, (448, 224), 112, "center_crop")
    assert values == {"gsd": 2.0}, "a literal GSD describes the source images and is corrected too"
    values, problems = gm.row_metadata({"gsd": 0.5}, None, None, None, 64, "center_crop")
    assert values == {} and problems[0][:2] == ("gsd", 0.5)


def test_wkt_centre_is_the_mean_of_the_vertices_lon_lat_order():
    polygon = "POLYGON ((-122.5 37.7, -122.3 37.7, -122.3 37.9, -122.5 37.9, -122.5 37.7))"
    assert gm.wkt_centre(polygon) == pytest.approx((37.8, -122.4))
    assert gm.wkt_centre("POINT (2.35 48.85)") == (48.85, 2.35)
    assert gm.wkt_centre("nothing here") is None and gm.wkt_centre(None) is None


def test_fmow_sidecar_keys_by_default_and_named_keys_otherwise():
    document = {"gsd": 0.5, "timestamp": "2012-04-02T10:32:22Z", "cloud_cover": 0, "off_nadir_angle_dbl": 14.2,
                "sensor_platform_name": "GEOEYE01", "utm": "32T", "img_width": 1000,
                "raw_location": "POLYGON ((10 40, 12 40, 12 42, 10 42, 10 40))"}
    assert gm.sidecar_raw(document, None) == {"gsd": 0.5, "date": "2012-04-02T10:32:22Z", "cloud": 0,
                                              "off_nadir": 14.2, "sensor": "GEOEYE01", "lat": 41.0, "lon": 11.0}
    assert gm.sidecar_raw(document, {"gsd": "img_width"}) == {"gsd": 1000}
    values, problems = gm.clean(gm.sidecar_raw(document, None))
    assert values["date"] == "2012-04-02T10:32:22+00:00" and values["cloud"] == 0.0 and not problems


def test_a_sidecar_problem_is_reported_as_its_own_field():
    values, problems = gm.clean({gm.SIDECAR_PROBLEM: ("x_rgb.json", "missing"), "gsd": 1})
    assert values == {"gsd": 1.0} and problems == [("sidecar", "x_rgb.json", "missing")]
