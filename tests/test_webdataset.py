"""WebDataset tar shards (img2dataset's layout) as a source: samples by key, images read lazily from the
shards, broken shards warned of, and a run over shards the same as over a folder of the same images."""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import tarfile
import warnings
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from cli_runner import invoke
from factory import distinct_photos

from vlmbatch.errors import ImageDecodeError, VlmbatchError, VlmbatchWarning
from vlmbatch.model.siglip import SiglipVisionTower
from vlmbatch.sources.decode import decode_stream
from vlmbatch.sources.images import IMAGE_EXTENSIONS, load_image
from vlmbatch.sources.open import open_source
from vlmbatch.sources.records import TarMember
from vlmbatch.sources.shards import (
    IMAGE_FIELDS,
    count_shard,
    open_webdataset,
    read_shard,
    webdataset_shards,
)

PER_SHARD = 3


@pytest.fixture(scope="module")
def jpegs() -> list[bytes]:
    out = []
    for photo in distinct_photos(6, size=64):
        buffer = io.BytesIO()
        photo.save(buffer, "JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def key_of(shard: int, index: int) -> str:
    """img2dataset's keys: the shard number, then the sample's index in it, 9 digits in all."""
    return f"{shard:04d}{index:05d}"


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 1_700_000_000
            tar.addfile(info, io.BytesIO(data))
    return path


def sample(key: str, image: bytes | None, ext: str = "jpg") -> list[tuple[str, bytes]]:
    """One img2dataset sample: the image, its caption (.txt) and its metadata (.json)."""
    meta = {"key": key, "url": f"https://example.com/{key}.jpg", "caption": f"photo {key}", "status": "success"}
    members = [] if image is None else [(f"{key}.{ext}", image)]
    return members + [(f"{key}.txt", f"photo {key}".encode()), (f"{key}.json", json.dumps(meta).encode())]


def img2dataset_folder(root: Path, jpegs: list[bytes]) -> dict[str, bytes]:
    """Shards 00000.tar, 00001.tar, ... of PER_SHARD samples each, with img2dataset's .parquet and
    _stats.json beside each; returns key -> image bytes."""
    images = {}
    for shard in range(len(jpegs) // PER_SHARD):
        members = []
        for index in range(PER_SHARD):
            key = key_of(shard, index)
            images[key] = jpegs[shard * PER_SHARD + index]
            members += sample(key, images[key])
        write_tar(root / f"{shard:05d}.tar", members)
        pq.write_table(pa.table({"key": [key_of(shard, i) for i in range(PER_SHARD)], "status": ["success"] * 3}),
                       root / f"{shard:05d}.parquet")
        (root / f"{shard:05d}_stats.json").write_text(json.dumps({"successes": PER_SHARD}))
    return images


def caption(source, out, ckpt, *extra):
    return invoke("caption", source, "--out", out, "--model", ckpt, "--max-new-tokens", 8, "--workers", 0,
                  "--quiet", *extra)


def rows(path) -> dict[str, dict]:
    return {row["id"]: row for row in pq.read_table(path).to_pylist()}


def encoded_images(monkeypatch) -> list[int]:
    encoded: list[int] = []
    original = SiglipVisionTower.forward
    monkeypatch.setattr(SiglipVisionTower, "forward", lambda self, px: encoded.append(len(px)) or original(self, px))
    return encoded


def caught(function):
    """(function's result, the VlmbatchWarning messages it gave)."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        result = function()
    return result, [str(w.message) for w in seen if issubclass(w.category, VlmbatchWarning)]


# --- end to end ------------------------------------------------------------------------------------


def test_captions_over_shards_equal_those_over_a_folder_of_the_same_images(tmp_path, jpegs, ckpt):
    images = img2dataset_folder(tmp_path / "shards", jpegs)
    folder = tmp_path / "folder"
    folder.mkdir()
    for key, data in images.items():
        (folder / f"{key}.jpg").write_bytes(data)
    caption(tmp_path / "shards", tmp_path / "shards.parquet", ckpt)
    caption(folder, tmp_path / "folder.parquet", ckpt)
    from_shards, from_folder = rows(tmp_path / "shards.parquet"), rows(tmp_path / "folder.parquet")
    assert sorted(from_shards) == sorted(images)  # ids are the keys
    assert all(row["error"] is None and row["caption"] is not None for row in from_shards.values())
    assert {k: r["caption"] for k, r in from_shards.items()} == {
        key: from_folder[f"{key}.jpg"]["caption"] for key in images}
    version = from_shards[key_of(1, 2)]["image_version"]
    stat = (tmp_path / "shards" / "00001.tar").stat()
    assert version == f"{stat.st_size}:{stat.st_mtime_ns}:{key_of(1, 2)}.jpg"


def test_a_single_shard_and_a_brace_pattern_are_sources_too(tmp_path, jpegs, ckpt):
    images = img2dataset_folder(tmp_path / "shards", jpegs)
    caption(tmp_path / "shards" / "00001.tar", tmp_path / "one.parquet", ckpt)
    assert sorted(rows(tmp_path / "one.parquet")) == [key_of(1, i) for i in range(PER_SHARD)]
    pattern = str(tmp_path / "shards" / "{00000..00001}.tar")
    caption(pattern, tmp_path / "pattern.parquet", ckpt)
    assert sorted(rows(tmp_path / "pattern.parquet")) == sorted(images)


def test_a_sample_without_an_image_is_one_error_row(tmp_path, jpegs, ckpt):
    write_tar(tmp_path / "shards" / "00000.tar",
              sample("000000000", jpegs[0]) + sample("000000001", None) + sample("000000002", jpegs[1]))
    caption(tmp_path / "shards", tmp_path / "caps.parquet", ckpt)
    table = rows(tmp_path / "caps.parquet")
    assert sorted(table) == ["000000000", "000000001", "000000002"]
    assert [k for k, r in table.items() if r["error"]] == ["000000001"]
    assert "no image member" in table["000000001"]["error"] and "json, txt" in table["000000001"]["error"]
    assert table["000000001"]["caption"] is None and table["000000002"]["caption"] is not None


def test_an_unreadable_or_truncated_shard_is_one_warning_and_the_rest_is_captioned(tmp_path, jpegs, ckpt):
    root = tmp_path / "shards"
    images = img2dataset_folder(root, jpegs)  # 00000.tar and 00001.tar
    (root / "00002.tar").write_bytes(b"this is no tar file at all\n" * 40)
    whole = write_tar(tmp_path / "whole.tar", sample("000300000", jpegs[0]) + sample("000300001", jpegs[1]))
    data = whole.read_bytes()
    cut = data.index(b"000300001.jpg") + 512 + 100  # inside the second sample's image
    (root / "00003.tar").write_bytes(data[:cut])
    result = invoke("caption", root, "--out", tmp_path / "caps.parquet", "--model", ckpt, "--max-new-tokens", 8,
                    "--workers", 0, "--quiet")
    warned = [line for line in result.output.splitlines() if line.startswith("warning:")]
    assert len(warned) == 2, result.output
    assert "cannot read shard" in warned[0] and "00002.tar" in warned[0]
    assert "00003.tar" in warned[1] and "truncated" in warned[1]
    table = rows(tmp_path / "caps.parquet")
    assert set(table) == {*images, "000300000", "000300001"}
    assert all(table[k]["caption"] is not None for k in [*images, "000300000"])
    assert "breaks off" in table["000300001"]["error"]  # tried again by the next run


def test_a_rerun_does_nothing_and_a_replaced_shard_is_redone(tmp_path, jpegs, ckpt, monkeypatch):
    root = tmp_path / "shards"
    img2dataset_folder(root, jpegs)
    out = tmp_path / "caps.parquet"
    caption(root, out, ckpt)
    first = rows(out)
    written = out.read_bytes()
    encoded = encoded_images(monkeypatch)
    caption(root, out, ckpt)
    assert encoded == [] and out.read_bytes() == written
    shard = root / "00001.tar"
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))  # replaced
    caption(root, out, ckpt)
    assert sum(encoded) == PER_SHARD
    second = rows(out)
    assert len(second) == len(first)
    redone = {k for k in first if second[k]["image_version"] != first[k]["image_version"]}
    assert redone == {key_of(1, i) for i in range(PER_SHARD)}
    assert {k: r["caption"] for k, r in second.items()} == {k: r["caption"] for k, r in first.items()}


# --- the source ------------------------------------------------------------------------------------


def test_count_gives_the_progress_bar_the_number_of_samples(tmp_path, jpegs):
    root = tmp_path / "shards"
    img2dataset_folder(root, jpegs)
    write_tar(root / "00002.tar", sample("000200000", jpegs[0]) + sample("000200001", None))
    (root / "00003.tar").write_bytes(b"")  # unreadable: counted as 0, quietly
    source = open_source(str(root))
    assert source.size is None and "WebDataset" in source.description
    total, warned = caught(source.count)
    assert total == 2 * PER_SHARD + 2 and warned == []
    records, warned = caught(lambda: list(source))
    assert len(records) == total and len(warned) == 1
    assert count_shard(root / "00002.tar") == 2 and count_shard(root / "00003.tar") == 0


def test_the_shard_list_and_one_shards_records_for_a_cluster_runner(tmp_path, jpegs):
    root = tmp_path / "shards"
    img2dataset_folder(root, jpegs)
    shards = [root / "00000.tar", root / "00001.tar"]
    assert webdataset_shards(root) == shards
    assert webdataset_shards(root / "00001.tar") == shards[1:]
    assert webdataset_shards(str(root / "{00001,00000}.tar")) == shards[::-1]
    records = list(read_shard(shards[1]))
    assert [r.id for r in records] == [key_of(1, i) for i in range(PER_SHARD)]
    first = records[0]
    assert first.extra["txt"] == f"photo {key_of(1, 0)}" and first.extra["json"]["key"] == key_of(1, 0)
    assert first.extra["shard"] == str(shards[1]) and first.extra["member"] == f"{key_of(1, 0)}.jpg"
    assert load_image(first.image).size == (64, 64)
    assert [r.id for r in open_webdataset(shards[::-1], "two")] == [key_of(s, i) for s in (1, 0) for i in range(3)]
    with pytest.raises(VlmbatchError, match="no WebDataset shards"):
        webdataset_shards(tmp_path)


def test_resolution_images_win_over_tars_and_tars_over_img2datasets_parquet(tmp_path, jpegs):
    root = tmp_path / "shards"
    img2dataset_folder(root, jpegs)
    assert open_source(str(root)).description.startswith("WebDataset folder")  # not the .parquet manifest
    (root / "cover.jpg").write_bytes(jpegs[0])
    assert [r.id for r in open_source(str(root))] == ["cover.jpg"]  # an image folder, its tars not walked
    assert open_source(str(root / "00000.tar")).description.startswith("WebDataset shard")


@pytest.mark.parametrize("pattern, message", [
    ("{00005..00009}.tar", "no file of the pattern"),
    ("{00000..00001}.png", "names WebDataset shards"),
])
def test_a_brace_pattern_that_names_no_shards_is_one_line(tmp_path, jpegs, pattern, message):
    img2dataset_folder(tmp_path, jpegs)
    with pytest.raises(VlmbatchError, match=message):
        open_source(str(tmp_path / pattern))


def test_a_missing_shard_of_a_pattern_is_warned_of_when_it_comes(tmp_path, jpegs):
    images = img2dataset_folder(tmp_path, jpegs)
    source = open_source(str(tmp_path / "{00000..00002}.tar"))
    records, warned = caught(lambda: list(source))
    assert [r.id for r in records] == list(images)
    assert len(warned) == 1 and "00002.tar" in warned[0] and "No such file" in warned[0]


def test_samples_follow_webdatasets_naming_rules(tmp_path, jpegs):
    png = io.BytesIO()
    distinct_photos(1, size=8)[0].save(png, "PNG")
    members = [
        ("__meta__", b"{}"),                                     # WebDataset metadata: no sample
        ("./000000001.png", png.getvalue()), ("./000000001.JPG", jpegs[0]),  # jpg before png; field lower-cased
        ("000000002.seg.png", png.getvalue()), ("000000002.jpg", jpegs[1]),  # 'seg.png' is another field
        ("sub/000000003.webp.json", b"{}"), ("sub/000000003.webp", png.getvalue()),
        ("README", b"no dot: no sample"), (".hidden.jpg", jpegs[2]),
        ("000000004.jpg", jpegs[2]), ("000000004.jpg", jpegs[3]),  # a repeated field: the first counts
    ]
    records = list(read_shard(write_tar(tmp_path / "x.tar", members)))
    assert [r.id for r in records] == ["000000001", "000000002", "sub/000000003", "000000004"]
    assert [r.image.member for r in records] == ["./000000001.JPG", "000000002.jpg", "sub/000000003.webp",
                                                 "000000004.jpg"]
    assert load_image(records[3].image).tobytes() == load_image(jpegs[2]).tobytes()
    assert {f".{field}" for field in IMAGE_FIELDS} == IMAGE_EXTENSIONS


def test_a_garbled_header_mid_shard_is_a_warning_not_a_silent_end(tmp_path, jpegs):
    shard = write_tar(tmp_path / "x.tar", sample("000000000", jpegs[0]) + sample("000000001", jpegs[1]))
    data = bytearray(shard.read_bytes())
    second = data.index(b"000000001.jpg")
    data[second:second + 512] = b"\xff" * 512  # not a header: tarfile alone would end the shard quietly
    shard.write_bytes(bytes(data))
    records, warned = caught(lambda: list(read_shard(shard)))
    assert [r.id for r in records] == ["000000000"]
    assert len(warned) == 1 and "invalid header" in warned[0]


def test_an_image_is_read_from_the_shard_only_as_it_was_listed(tmp_path, jpegs):
    shard = write_tar(tmp_path / "x.tar", sample("000000000", jpegs[0]))
    (record,) = read_shard(shard)
    ref = pickle.loads(pickle.dumps(record.image))  # what a decoding worker gets
    assert isinstance(ref, TarMember) and load_image(ref).size == (64, 64)
    write_tar(shard, sample("000000000", jpegs[1]) + sample("000000009", jpegs[2]))
    os.utime(shard, ns=(0, 10**18))
    with pytest.raises(ImageDecodeError, match="changed since it was listed"):
        load_image(ref)
    (fresh, _) = read_shard(shard)
    os.truncate(shard, fresh.image.offset + 10)
    with pytest.raises(ImageDecodeError, match="cut off"):
        load_image(TarMember(str(shard), fresh.image.member, fresh.image.offset, fresh.image.size))


def test_spawned_decoding_workers_read_the_shards_themselves(tmp_path, jpegs):
    shard = write_tar(tmp_path / "x.tar", sample("000000000", jpegs[0]) + sample("000000001", None))
    records = list(read_shard(shard))
    decoded = list(decode_stream(records, lambda r: r.image, size=16, workers=1))
    assert decoded[0][1].shape == (16, 16, 3)
    assert isinstance(decoded[1][1], str) and re.search("no image member", decoded[1][1])
