"""Format versions: a version-1 cache is read as is and upgraded by the first writer."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from shared.cache_format import FORMAT_VERSION, CacheFormatError
from shared.cache_io import open_cache, read_manifest, upgrade_format
from shared.storage import parse_location
from tests.cache_factory import make_cache

V1_COLUMNS_DROPPED = ("exif_orientation", "embedding_checksum")


def make_v1_cache(path: Path, checkpoint: Path, n_images: int = 3) -> Path:
    """A cache as samcache 0.1 wrote it: format_version 1, fragments without the v2 columns."""
    make_cache(path, checkpoint, n_images=n_images)
    _set_version(path, 1)
    for fragment in (path / "manifest").glob("part-*.parquet"):
        table = pq.read_table(fragment)
        pq.write_table(table.drop_columns(list(V1_COLUMNS_DROPPED)), fragment)
    return path


def _set_version(path: Path, version: int) -> None:
    meta_path = path / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["attributes"]["samcache"]["format_version"] = version
    meta_path.write_text(json.dumps(meta))


def _version(path: Path) -> int:
    return json.loads((path / "zarr.json").read_text())["attributes"]["samcache"]["format_version"]


def test_version_1_is_read_as_is(tmp_path, tiny_checkpoint) -> None:
    cache_path = make_v1_cache(tmp_path / "v1.zarr", tiny_checkpoint)
    assert set(V1_COLUMNS_DROPPED).isdisjoint(
        pq.read_table(next((cache_path / "manifest").glob("part-*.parquet"))).column_names
    )
    cache = open_cache(cache_path)
    assert cache.attrs.format_version == 1
    table = read_manifest(parse_location(cache_path))
    assert table.num_rows == 3
    assert table.column("exif_orientation").null_count == 3  # missing in v1: null
    assert _version(cache_path) == 1  # reading never writes


def test_first_writer_upgrades_version_1(tmp_path, tiny_checkpoint) -> None:
    cache_path = make_v1_cache(tmp_path / "v1.zarr", tiny_checkpoint)
    before = read_manifest(parse_location(cache_path)).to_pylist()
    cache = open_cache(cache_path, read_only=False)
    assert upgrade_format(cache) is True
    assert _version(cache_path) == FORMAT_VERSION == 2
    assert open_cache(cache_path).attrs.format_version == 2
    assert upgrade_format(open_cache(cache_path, read_only=False)) is False
    assert read_manifest(parse_location(cache_path)).to_pylist() == before


@pytest.mark.parametrize("version", [0, 3, "2"])
def test_unknown_versions_are_refused_naming_the_value(tmp_path, tiny_checkpoint, version) -> None:
    cache_path = make_cache(tmp_path / "c.zarr", tiny_checkpoint, n_images=1)
    _set_version(cache_path, version)
    expected = f"format_version is {version!r}.*reads versions 1, 2"
    with pytest.raises(CacheFormatError, match=expected):
        open_cache(cache_path)
