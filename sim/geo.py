"""Where peers and clients are, and the round trip between two places.

Model: each peer or client is placed in a region drawn by population weight, at the region's centre
plus Gaussian jitter (``JITTER_DEG`` degrees on latitude and longitude). The round trip between two
places is

    rtt = 2 * great_circle_km / FIBRE_KM_PER_S * PATH_INFLATION + last_mile_a + last_mile_b   (seconds)

with light in fibre at 2/3 c (200,000 km/s), ``PATH_INFLATION`` = 1.7 for routes that are not great
circles, and a per-endpoint last-mile term (median 5 ms, log-normal). Two endpoints in one city get
about 10 ms; NA-east to EU (6,200 km) about 115 ms; EU to Asia about 200 ms.
"""

from __future__ import annotations

import numpy as np

EARTH_KM = 6371.0
FIBRE_KM_PER_S = 200_000.0  # 2/3 of c
PATH_INFLATION = 1.7
LAST_MILE_MEDIAN = 0.005  # seconds, per endpoint
JITTER_DEG = 5.0

# name: (latitude, longitude, population weight)
REGIONS = {
    "NA-east": (40.0, -77.0, 0.24),
    "NA-west": (37.0, -121.0, 0.14),
    "EU": (50.0, 8.0, 0.32),
    "Asia": (31.0, 118.0, 0.20),
    "SA": (-23.0, -46.0, 0.06),
    "Oceania": (-33.0, 151.0, 0.04),
}
REGION_NAMES = tuple(REGIONS)
REGION_WEIGHTS = tuple(w for _, _, w in REGIONS.values())


def place(rng: np.random.Generator, count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``count`` places: (region index, latitude, longitude in degrees, last-mile seconds)."""
    weights = np.array(REGION_WEIGHTS) / sum(REGION_WEIGHTS)
    region = rng.choice(len(REGIONS), size=count, p=weights)
    centres = np.array([(lat, lon) for lat, lon, _ in REGIONS.values()])
    lat = np.clip(centres[region, 0] + rng.normal(0, JITTER_DEG, count), -89.0, 89.0)
    lon = (centres[region, 1] + rng.normal(0, JITTER_DEG, count) + 180.0) % 360.0 - 180.0
    last_mile = LAST_MILE_MEDIAN * rng.lognormal(0.0, 0.5, count)
    return region, lat, lon, last_mile


def great_circle_km(lat1, lon1, lat2, lon2):
    """Haversine distance in km; works on floats and numpy arrays (broadcast)."""
    p1, p2 = np.radians(lat1), np.radians(lat2)
    dp, dl = p2 - p1, np.radians(np.asarray(lon2) - np.asarray(lon1))
    a = np.sin(dp / 2) ** 2 + np.cos(p1) * np.cos(p2) * np.sin(dl / 2) ** 2
    return 2 * EARTH_KM * np.arcsin(np.sqrt(np.clip(a, 0.0, 1.0)))


def rtt(lat1, lon1, mile1, lat2, lon2, mile2):
    """Round trip in seconds between two places (floats or broadcastable arrays)."""
    return 2 * great_circle_km(lat1, lon1, lat2, lon2) / FIBRE_KM_PER_S * PATH_INFLATION + mile1 + mile2


def describe() -> str:
    """One line per region pair of centres: the modelled round trip, for the docs."""
    names, lines = list(REGIONS), []
    for i, a in enumerate(names):
        for b in names[i:]:
            (la, oa, _), (lb, ob, _) = REGIONS[a], REGIONS[b]
            ms = 1000 * rtt(la, oa, LAST_MILE_MEDIAN, lb, ob, LAST_MILE_MEDIAN)
            lines.append(f"{a:8s} - {b:8s} {float(ms):6.0f} ms")
    return "\n".join(lines)

