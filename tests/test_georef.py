"""GeoTIFF georeferencing -> GSD and centre lat/lon: the transverse Mercator inverse against independent values,
UTM EPSG codes, tie points, transformations, pixel-is-point, geographic and Web Mercator tiles, other CRSs."""

import io
import math

import numpy as np
import pytest
import tifffile

from diffusion_model import georef
from diffusion_model.sample_geotiff import encode_geotiff, geotiff_row

WGS84_E2 = 2 * georef.WGS84_F - georef.WGS84_F ** 2


def snyder_utm_inverse(easting: float, northing: float, central_meridian: float) -> tuple:
    """UTM -> (lat, lon) by Snyder's footpoint-latitude series (USGS PP 1395, eqs. 3-26, 7-19, 8-18 to 8-25), an
    independent method from the module's Krueger series."""
    a, e2, k0 = georef.WGS84_A, WGS84_E2, 0.9996
    ep2 = e2 / (1 - e2)
    x, m = easting - 500000, northing / k0
    mu = m / (a * (1 - e2 / 4 - 3 * e2 ** 2 / 64 - 5 * e2 ** 3 / 256))
    e1 = (1 - math.sqrt(1 - e2)) / (1 + math.sqrt(1 - e2))
    phi1 = (mu + (3 * e1 / 2 - 27 * e1 ** 3 / 32) * math.sin(2 * mu) + (21 * e1 ** 2 / 16 - 55 * e1 ** 4 / 32)
            * math.sin(4 * mu) + 151 * e1 ** 3 / 96 * math.sin(6 * mu) + 1097 * e1 ** 4 / 512 * math.sin(8 * mu))
    c1, t1 = ep2 * math.cos(phi1) ** 2, math.tan(phi1) ** 2
    n1 = a / math.sqrt(1 - e2 * math.sin(phi1) ** 2)
    r1 = a * (1 - e2) / (1 - e2 * math.sin(phi1) ** 2) ** 1.5
    d = x / (n1 * k0)
    lat = phi1 - n1 * math.tan(phi1) / r1 * (
        d ** 2 / 2 - (5 + 3 * t1 + 10 * c1 - 4 * c1 ** 2 - 9 * ep2) * d ** 4 / 24
        + (61 + 90 * t1 + 298 * c1 + 45 * t1 ** 2 - 252 * ep2 - 3 * c1 ** 2) * d ** 6 / 720)
    lon = (d - (1 + 2 * t1 + c1) * d ** 3 / 6
           + (5 - 2 * c1 + 28 * t1 - 3 * c1 ** 2 + 8 * ep2 + 24 * t1 ** 2) * d ** 5 / 120) / math.cos(phi1)
    return math.degrees(lat), central_meridian + math.degrees(lon)


def test_utm_10n_san_francisco_matches_snyder_and_the_known_place():
    lat, lon = georef.utm_to_latlon(551000, 4180000, 10, False)
    expected = snyder_utm_inverse(551000, 4180000, -123)
    assert lat == pytest.approx(expected[0], abs=1e-6) and lon == pytest.approx(expected[1], abs=1e-6)
    assert lat == pytest.approx(37.7659, abs=1e-4) and lon == pytest.approx(-122.4210, abs=1e-4)


def test_central_meridian_northing_is_the_meridian_arc():
    # The WGS84 meridian arc from the equator to 45 degrees is 4 984 944.378 m; UTM scales it by 0.9996.
    assert georef.utm_to_latlon(500000, 0.9996 * 4984944.378, 31, False) == pytest.approx((45.0, 3.0), abs=1e-7)
    assert georef.utm_to_latlon(500000, 10000000 - 0.9996 * 4984944.378, 31, True) == pytest.approx(
        (-45.0, 3.0), abs=1e-7)
    assert georef.utm_to_latlon(500000, 0, 1, False) == pytest.approx((0.0, -177.0))


def test_snyder_worked_example_on_clarke_1866():
    # USGS PP 1395's UTM example: Clarke 1866, zone 18, x = 127 106.5 m, y = 4 484 124.4 m is 40.5 N, 73.5 W.
    flattening = 1 - math.sqrt(1 - 0.00676866)
    lat, lon = georef.transverse_mercator_inverse(127106.5, 4484124.4, -75, a=6378206.4, f=flattening)
    assert lat == pytest.approx(40.5, abs=2e-6) and lon == pytest.approx(-73.5, abs=2e-6)


def test_far_from_the_central_meridian_krueger_and_snyder_still_agree():
    for easting, northing in ((200000, 6500000), (820000, 1200000)):
        ours = georef.utm_to_latlon(easting, northing, 33, False)
        assert ours == pytest.approx(snyder_utm_inverse(easting, northing, 15), abs=2e-6)


@pytest.mark.parametrize("code, zone", [(32610, (10, False)), (32601, (1, False)), (32660, (60, False)),
                                        (32733, (33, True)), (26910, (10, False)), (26923, (23, False)),
                                        (32600, None), (32661, None), (26924, None), (4326, None), (3857, None)])
def test_utm_zone_of_epsg_codes(code, zone):
    assert georef.utm_zone(code) == zone


def utm_tags(code: int, corner=(551000 - 67.2, 4180000 + 67.2), scale=0.6, raster_type=1) -> dict:
    """geotiff_metadata-like tags of a projected tile."""
    return {"GTModelTypeGeoKey": 1, "GTRasterTypeGeoKey": raster_type, "ProjectedCSTypeGeoKey": code,
            "ModelPixelScale": [scale, scale, 0.0], "ModelTiepoint": [0.0, 0.0, 0.0, *corner, 0.0]}


def test_locate_a_utm_tile_from_its_tie_point_and_scale():
    found = georef.locate(utm_tags(26910), 224, 224)
    assert found.gsd == pytest.approx(0.6) and found.unsupported is None
    assert (found.lat, found.lon) == pytest.approx(georef.utm_to_latlon(551000, 4180000, 10, False), abs=1e-9)


def test_locate_a_southern_utm_tile():
    found = georef.locate(utm_tags(32756, corner=(334000 - 50, 6252000 + 50), scale=1.0), 100, 100)
    expected = snyder_utm_inverse(334000, 6252000 - 10000000, 153)
    assert (found.lat, found.lon) == pytest.approx(expected, abs=1e-6) and found.lat == pytest.approx(-33.86, abs=0.01)


def test_pixel_is_point_shifts_the_centre_by_half_a_pixel():
    area = georef.locate(utm_tags(32610, corner=(551000, 4180000), scale=100), 2, 2)
    point = georef.locate(utm_tags(32610, corner=(551000, 4180000), scale=100, raster_type=2), 2, 2)
    assert (area.lat, area.lon) == pytest.approx(georef.utm_to_latlon(551100, 4179900, 10, False))
    assert (point.lat, point.lon) == pytest.approx(georef.utm_to_latlon(551050, 4179950, 10, False))


def test_model_transformation_with_rotation():
    angle = math.radians(30)
    a, b, e, f = 2 * math.cos(angle), 2 * math.sin(angle), 2 * math.sin(angle), -2 * math.cos(angle)
    matrix = [a, b, 0, 551000, e, f, 0, 4180000, 0, 0, 0, 0, 0, 0, 0, 1]
    keys = (1, 1, 0, 2, 1024, 0, 1, 1, 3072, 0, 1, 32610)
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, np.zeros((50, 100), np.uint8),
                     extratags=[(34264, "d", 16, matrix, True), (34735, "H", len(keys), keys, True)])
    width, height, tags = georef.read_georef(buffer.getvalue())  # tifffile gives the matrix as 4 rows of 4
    found = georef.locate(tags, width, height)
    centre = (551000 + a * 50 + b * 25, 4180000 + e * 50 + f * 25)
    assert found.gsd == pytest.approx(2.0)
    assert (found.lat, found.lon) == pytest.approx(georef.utm_to_latlon(*centre, 10, False))
    assert georef.locate({**tags, "ModelTransformation": matrix}, 100, 50) == found, "a flat list reads the same"


def test_geographic_tile_reads_lat_lon_directly_and_gsd_in_metres():
    tags = {"GTModelTypeGeoKey": 2, "GeographicTypeGeoKey": 4326, "ModelPixelScale": [1e-4, 1e-4, 0],
            "ModelTiepoint": [0, 0, 0, 11.99, 60.01, 0]}
    found = georef.locate(tags, 200, 200)
    assert (found.lat, found.lon) == pytest.approx((60.0, 12.0))
    # 1e-4 degree is 11.12 m north-south and half that east-west at 60 N; the GSD is their geometric mean.
    assert found.gsd == pytest.approx(math.radians(1e-4) * 6371008.8 * math.sqrt(0.5), rel=1e-9)


def test_web_mercator_tile():
    y = 6378137 * math.log(math.tan(math.pi / 4 + math.radians(45) / 2))
    tags = {"GTModelTypeGeoKey": 1, "ProjectedCSTypeGeoKey": 3857, "ModelPixelScale": [1.0, 1.0, 0],
            "ModelTiepoint": [0, 0, 0, -5, y + 5, 0]}
    found = georef.locate(tags, 10, 10)
    assert (found.lat, found.lon) == pytest.approx((45.0, 0.0), abs=1e-6)
    assert found.gsd == pytest.approx(math.cos(math.radians(45)), rel=1e-6), "Mercator pixels shrink by cos(lat)"


def test_other_crs_keeps_its_gsd_but_no_location_without_pyproj(monkeypatch):
    monkeypatch.setattr(georef, "pyproj_latlon", lambda code, x, y: None)
    found = georef.locate(utm_tags(2154, corner=(652000, 6862000), scale=0.5), 100, 100)
    assert found == georef.Location(0.5, None, None, 2154)
    feet = {**utm_tags(2227, scale=2.0), "ProjLinearUnitsGeoKey": 9002}
    assert georef.locate(feet, 10, 10).gsd == pytest.approx(0.6096)


def test_other_crs_goes_through_pyproj_when_it_answers(monkeypatch):
    calls = []
    monkeypatch.setattr(georef, "pyproj_latlon", lambda code, x, y: calls.append((code, x, y)) or (48.8, 2.3))
    found = georef.locate(utm_tags(2154, corner=(652000, 6862000), scale=0.5), 100, 100)
    assert (found.lat, found.lon, found.unsupported) == (48.8, 2.3, None)
    assert calls == [(2154, 652025.0, 6861975.0)]


def test_no_georeference_is_none():
    assert georef.locate({}, 10, 10) is None and georef.locate(None, 10, 10) is None
    assert georef.locate({"GTModelTypeGeoKey": 1, "ProjectedCSTypeGeoKey": 32610}, 10, 10) is None


def test_read_georef_of_the_sample_naip_tile_round_trips_to_san_francisco():
    width, height, tags = georef.read_georef(geotiff_row(3, 0, "naip")["image"]["bytes"])
    found = georef.locate(tags, width, height)
    assert (width, height) == (224, 224) and found.gsd == pytest.approx(0.6)
    expected = snyder_utm_inverse(551000, 4180000, -123)
    assert found.lat == pytest.approx(expected[0], abs=1e-6) and found.lon == pytest.approx(expected[1], abs=1e-6)


def test_read_georef_of_a_plain_tiff_and_of_junk():
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, np.zeros((4, 6, 3), np.uint8))
    width, height, tags = georef.read_georef(buffer.getvalue())
    assert (width, height) == (6, 4) and georef.locate(tags, width, height) is None
    assert georef.read_georef(b"II*\x00junk") is None
    data = encode_geotiff(np.zeros((10, 20, 12), np.uint16), "sentinel2")
    width, height, tags = georef.read_georef(data)
    found = georef.locate(tags, width, height)
    assert (width, height) == (20, 10) and found.gsd == 10.0 and found.lat == pytest.approx(36.13, abs=0.01)
