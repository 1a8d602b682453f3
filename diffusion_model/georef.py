"""A GeoTIFF's georeferencing -> its ground sample distance and the latitude/longitude of its centre.

Pure functions on the GeoTIFF tags (as tifffile's geotiff_metadata names them) plus the transverse Mercator
inverse, so UTM tiles (EPSG 326zz/327zz on WGS84, 269zz on NAD83, as NAIP ships) need no extra package; Web
Mercator (3857) and geographic tiles (4326, 4269, 4258) are read directly. Any other projection goes through pyproj
when it is installed; otherwise the tile keeps its GSD (when its units are known) but no location.
read_georef is the I/O edge: it reads only the TIFF's header.
"""

import io
import math
from typing import NamedTuple, Optional

import tifffile

# WGS84 ellipsoid; NAD83's GRS80 differs in the flattening's 10th digit, and the datums by about a metre.
WGS84_A, WGS84_F = 6378137.0, 1 / 298.257223563
UTM_K0, UTM_FALSE_EASTING, UTM_FALSE_NORTHING_SOUTH = 0.9996, 500000.0, 10000000.0
EARTH_RADIUS_M = 6371008.8  # mean radius: a degree of latitude in metres for geographic tiles
WEB_MERCATOR_R = 6378137.0
WEB_MERCATOR_EPSG = 3857
GEOGRAPHIC_EPSG = (4326, 4269, 4258)  # WGS84, NAD83, ETRS89: the same lat/lon within a metre or two
USER_DEFINED = 32767
MODEL_PROJECTED, MODEL_GEOGRAPHIC = 1, 2
PIXEL_IS_POINT = 2
METRES_PER_UNIT = {9001: 1.0, 9002: 0.3048, 9003: 1200 / 3937}


class Location(NamedTuple):
    """What a tile's tags give: GSD in metres, centre lat/lon (None when unknown), and an EPSG code that could
    not be turned into lat/lon (None when it could)."""

    gsd: Optional[float]
    lat: Optional[float]
    lon: Optional[float]
    unsupported: Optional[int] = None


def utm_zone(epsg: int) -> Optional[tuple]:
    """(zone, southern) for a UTM EPSG code on WGS84 (326zz north, 327zz south) or NAD83 (269zz, north), else None."""
    for base, south, zones in ((32600, False, 60), (32700, True, 60), (26900, False, 23)):
        if base < epsg <= base + zones:
            return epsg - base, south
    return None


def krueger_coefficients(flattening: float) -> tuple:
    """(n, rectifying-radius factor, beta series, delta series) of Krueger's series in the third flattening n."""
    n = flattening / (2 - flattening)
    radius = 1 + n ** 2 / 4 + n ** 4 / 64
    beta = (n / 2 - 2 * n ** 2 / 3 + 37 * n ** 3 / 96, n ** 2 / 48 + n ** 3 / 15, 17 * n ** 3 / 480)
    delta = (2 * n - 2 * n ** 2 / 3 - 2 * n ** 3, 7 * n ** 2 / 3 - 8 * n ** 3 / 5, 56 * n ** 3 / 15)
    return n, radius, beta, delta


def transverse_mercator_inverse(x: float, y: float, central_meridian: float, k0: float = UTM_K0,
                                a: float = WGS84_A, f: float = WGS84_F) -> tuple:
    """(lat, lon) in degrees of a point x east, y north (metres, false origin removed) of the projection's origin."""
    n, radius, beta, delta = krueger_coefficients(f)
    scale = k0 * a / (1 + n) * radius
    xi, eta = y / scale, x / scale
    xi_p = xi - sum(b * math.sin(2 * j * xi) * math.cosh(2 * j * eta) for j, b in enumerate(beta, 1))
    eta_p = eta - sum(b * math.cos(2 * j * xi) * math.sinh(2 * j * eta) for j, b in enumerate(beta, 1))
    chi = math.asin(math.sin(xi_p) / math.cosh(eta_p))
    lat = chi + sum(d * math.sin(2 * j * chi) for j, d in enumerate(delta, 1))
    lon = math.radians(central_meridian) + math.atan2(math.sinh(eta_p), math.cos(xi_p))
    return math.degrees(lat), math.degrees(lon)


def utm_to_latlon(easting: float, northing: float, zone: int, south: bool) -> tuple:
    """(lat, lon) of a UTM coordinate."""
    northing = northing - UTM_FALSE_NORTHING_SOUTH if south else northing
    return transverse_mercator_inverse(easting - UTM_FALSE_EASTING, northing, 6 * zone - 183)


def web_mercator_to_latlon(x: float, y: float) -> tuple:
    """(lat, lon) of a Web Mercator (EPSG 3857) coordinate."""
    return math.degrees(math.atan(math.sinh(y / WEB_MERCATOR_R))), math.degrees(x / WEB_MERCATOR_R)


def pyproj_latlon(epsg: int, x: float, y: float) -> Optional[tuple]:
    """(lat, lon) by pyproj when it is installed and knows the code, else None."""
    try:
        from pyproj import Transformer
        lon, lat = Transformer.from_crs(epsg, 4326, always_xy=True).transform(x, y)
    except Exception:  # not installed, an unknown code, or a failed transform: all mean no location
        return None
    return (lat, lon) if math.isfinite(lat) and math.isfinite(lon) else None


def transformation(tags: dict) -> Optional[list]:
    """ModelTransformation's first two rows as 8 floats (tifffile gives it as 4 rows of 4), or None."""
    matrix = tags.get("ModelTransformation")
    if matrix is None:
        return None
    flat = [float(v) for row in matrix for v in (row if isinstance(row, (list, tuple)) else [row])]
    return flat[:8] if len(flat) >= 16 else None


def raster_to_model(tags: dict, i: float, j: float) -> Optional[tuple]:
    """Model (CRS) coordinates of raster point (i, j) by ModelTransformation, or ModelTiepoint + ModelPixelScale."""
    if "ModelTransformation" in tags:
        m = transformation(tags)
        return (m[0] * i + m[1] * j + m[3], m[4] * i + m[5] * j + m[7]) if m else None
    tie, scale = tags.get("ModelTiepoint"), tags.get("ModelPixelScale")
    if tie is None or scale is None or len(tie) < 6 or len(scale) < 2:
        return None
    return float(tie[3]) + (i - float(tie[0])) * float(scale[0]), float(tie[4]) - (j - float(tie[1])) * float(scale[1])


def pixel_size(tags: dict) -> Optional[tuple]:
    """A pixel's (width, height) in CRS units."""
    if "ModelTransformation" in tags:
        m = transformation(tags)
        return (math.hypot(m[0], m[4]), math.hypot(m[1], m[5])) if m else None
    scale = tags.get("ModelPixelScale")
    return (abs(float(scale[0])), abs(float(scale[1]))) if scale is not None and len(scale) >= 2 else None


def crs_code(tags: dict) -> tuple:
    """(model type, EPSG code or None): the projected CRS of a projected tile, the geographic one otherwise."""
    model = int(tags.get("GTModelTypeGeoKey", 0) or 0)
    key = "GeographicTypeGeoKey" if model == MODEL_GEOGRAPHIC else "ProjectedCSTypeGeoKey"
    code = tags.get(key)
    return model, (int(code) if code is not None else None)


def to_latlon(model: int, code: Optional[int], x: float, y: float) -> Optional[tuple]:
    """(lat, lon) of a model point in the tile's CRS, or None when the CRS is not one we (or pyproj) can read."""
    if code is None or code == USER_DEFINED:
        return None
    if model == MODEL_GEOGRAPHIC:
        return (y, x) if code in GEOGRAPHIC_EPSG else pyproj_latlon(code, x, y)
    zone = utm_zone(code)
    if zone:
        return utm_to_latlon(x, y, *zone)
    if code == WEB_MERCATOR_EPSG:
        return web_mercator_to_latlon(x, y)
    return pyproj_latlon(code, x, y)


def metres_per_pixel(model: int, code: Optional[int], size: tuple, tags: dict, lat: Optional[float]) -> Optional[float]:
    """GSD in metres (the geometric mean of the pixel's sides) from its size in CRS units."""
    width, height = size
    if model == MODEL_GEOGRAPHIC:
        if lat is None:
            return None
        width, height = (math.radians(s) * EARTH_RADIUS_M for s in (width * math.cos(math.radians(lat)), height))
    else:
        unit = METRES_PER_UNIT.get(int(tags.get("ProjLinearUnitsGeoKey", 9001) or 9001))
        if unit is None:
            return None
        factor = math.cos(math.radians(lat)) if code == WEB_MERCATOR_EPSG and lat is not None else 1.0
        width, height = width * unit * factor, height * unit * factor
    gsd = math.sqrt(width * height)
    return gsd if math.isfinite(gsd) and gsd > 0 else None


def locate(tags: Optional[dict], width: int, height: int) -> Optional[Location]:
    """GSD and centre lat/lon of a width x height tile from its GeoTIFF tags; None when it has no georeference."""
    if not tags:
        return None
    point = int(tags.get("GTRasterTypeGeoKey", 1) or 1) == PIXEL_IS_POINT
    centre = raster_to_model(tags, (width - point) / 2, (height - point) / 2)
    size = pixel_size(tags)
    if centre is None or size is None:
        return None
    model, code = crs_code(tags)
    latlon = to_latlon(model, code, *centre)
    if latlon is not None and not (math.isfinite(latlon[0]) and math.isfinite(latlon[1])):
        latlon = None
    lat, lon = latlon if latlon else (None, None)
    gsd = metres_per_pixel(model, code, size, tags, lat)
    return Location(gsd, lat, lon, None if latlon else (code if code is not None else USER_DEFINED))


def read_georef(data: bytes) -> Optional[tuple]:
    """(width, height, GeoTIFF tags or None) of a TIFF's first image, from its header; None when unreadable."""
    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            page = tif.pages.first
            return page.imagewidth, page.imagelength, dict(tif.geotiff_metadata or {})
    except Exception:  # a TIFF tifffile cannot parse fails its row in imaging.py; here it just has no georeference
        return None
