"""Inputs as they are: globs, directories, lists, compressed text, Parquet parts and Hive partition folders.

The rule every test here checks: files that concatenate to one file prepare (and train) exactly as that file,
bit for bit; a compressed file exactly as its uncompressed text."""

from __future__ import annotations

import bz2
import gzip
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from deepfm.config import config_from_dict
from deepfm.data import fastpath, sources
from deepfm.data.store import fingerprint, prepare
from deepfm.errors import DataError

from conftest import CRITEO, criteo_config_dict

QUIET = {"progress": False, "log": lambda _m: None}
LINES = (CRITEO / "data" / "train.tsv").read_bytes().splitlines(keepends=True)


def _zstd(data: bytes) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.CompressedOutputStream(sink, "zstd") as out:
        out.write(data)
    return sink.getvalue().to_pybytes()


COMPRESS = {".gz": gzip.compress, ".bz2": bz2.compress, ".zst": _zstd}


def _write_parts(folder: Path, n: int, suffix: str = ".tsv", names=None) -> list[Path]:
    """The Criteo sample's training file cut into ``n`` parts (uneven) that concatenate to it."""
    cuts = np.linspace(0, len(LINES), n + 1).astype(int)
    cuts[1:-1] += np.arange(1, n) * 37  # uneven
    paths = []
    for k in range(n):
        text = b"".join(LINES[cuts[k]:cuts[k + 1]])
        p = folder / (names[k] if names else f"part-{k:05d}{suffix}")
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(COMPRESS[suffix](text) if suffix in COMPRESS else text)
        paths.append(p)
    return paths


def _cfg(tmp_path: Path, train, cache: str = "cache", **data):
    raw = criteo_config_dict(tmp_path)
    raw["data"].update({"train": train, "cache_dir": str(tmp_path / cache), **data})
    if "split" in data:
        raw["data"].pop("valid"), raw["data"].pop("test")
    return config_from_dict(raw)


def _assert_same(a, b) -> None:
    assert json.dumps(a.encoder.to_json(), sort_keys=True) == json.dumps(b.encoder.to_json(), sort_keys=True)
    assert a.manifest["layout"] == b.manifest["layout"]
    assert a.splits.keys() == b.splits.keys()
    for name, x in a.splits.items():
        y = b.splits[name]
        for field in ("labels", "cat_ids", "num_values"):
            np.testing.assert_array_equal(getattr(x, field), getattr(y, field), err_msg=f"{name}.{field}")


@pytest.fixture
def whole(tmp_path):
    return prepare(_cfg(tmp_path, str(CRITEO / "data" / "train.tsv"), "whole-cache"), **QUIET)


@pytest.mark.parametrize("general", [False, True])
def test_parts_by_glob_directory_and_list_prepare_as_the_whole_file(tmp_path, whole, monkeypatch, general):
    if general:  # the same through the general path (the fast one is taken on this config by default)
        monkeypatch.setattr(fastpath, "why_not", lambda _cfg: "off")
        whole = prepare(_cfg(tmp_path, str(CRITEO / "data" / "train.tsv"), "whole-general"), **QUIET)
    parts = _write_parts(tmp_path / "logs" / "nested", 4)
    (tmp_path / "logs" / "_SUCCESS").write_text("")  # what Spark leaves beside its parts: not data
    (tmp_path / "logs" / "nested" / ".part-00000.tsv.crc").write_text("x")
    specs = {"glob": str(tmp_path / "logs" / "*" / "part-*.tsv"), "dir": str(tmp_path / "logs"),
             "list": [str(parts[0]), str(tmp_path / "logs" / "nested" / "part-0000[1-3].tsv")]}
    for kind, spec in specs.items():
        cfg = _cfg(tmp_path, spec, f"cache-{kind}")
        assert [str(f) for f in sources.resolve(spec)] == [str(p) for p in parts], kind
        _assert_same(prepare(cfg, **QUIET), whole)


def test_directory_order_is_sorted_by_full_path_not_by_listing(tmp_path):
    for name in ["b/2.tsv", "a/9.tsv", "a/10.tsv", "c.tsv"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("0\n")
    got = [Path(f).relative_to(tmp_path).as_posix() for f in sources.resolve(str(tmp_path))]
    assert got == ["a/10.tsv", "a/9.tsv", "b/2.tsv", "c.tsv"]


@pytest.mark.parametrize("suffix", [".gz", ".bz2", ".zst"])
def test_compressed_parts_prepare_as_the_uncompressed_file(tmp_path, whole, suffix):
    _write_parts(tmp_path / "logs", 3, suffix)
    got = prepare(_cfg(tmp_path, str(tmp_path / "logs" / f"*{suffix}")), **QUIET)
    assert got.manifest["fast_path"] == whole.manifest["fast_path"]
    _assert_same(got, whole)


def test_compressed_file_through_the_general_path_and_its_errors_name_file_and_line(tmp_path, whole):
    (tmp_path / "day_0.gz").write_bytes(gzip.compress(b"".join(LINES)))
    got = prepare(_cfg(tmp_path, str(tmp_path / "day_0.gz"), "c1", split={"valid": 0.1, "test": 0.1}), **QUIET)
    want = prepare(_cfg(tmp_path, str(CRITEO / "data" / "train.tsv"), "c2", split={"valid": 0.1, "test": 0.1}),
                   **QUIET)
    _assert_same(got, want)
    bad = list(LINES)
    bad[4000] = b"1\t2\t3\n"  # too few columns, deep inside the compressed stream
    (tmp_path / "bad.tsv.gz").write_bytes(gzip.compress(b"".join(bad)))
    with pytest.raises(DataError) as err:
        prepare(_cfg(tmp_path, str(tmp_path / "bad.tsv.gz"), "c3", split={"valid": 0.1, "test": 0.1}), **QUIET)
    assert err.value.path == str(tmp_path / "bad.tsv.gz") and err.value.line == 4001
    assert "bad.tsv.gz, line 4001: expected 40 columns, found 3" in str(err.value)


def test_corrupt_compressed_data_is_an_error_naming_the_file(tmp_path):
    data = gzip.compress(b"".join(LINES))
    (tmp_path / "cut.tsv.gz").write_bytes(data[: len(data) // 2] + b"\x00" * 64 + data[len(data) // 2:])
    with pytest.raises(DataError) as err:
        prepare(_cfg(tmp_path, str(tmp_path / "cut.tsv.gz"), split={"valid": 0.1, "test": 0.1}), **QUIET)
    assert err.value.path == str(tmp_path / "cut.tsv.gz")


def test_split_and_sampling_number_rows_across_parts(tmp_path):
    """The seeded split draws per row index: parts must number their rows on from the previous part."""
    _write_parts(tmp_path / "logs", 5, ".gz")
    extra = {"split": {"valid": 0.2, "test": 0.1, "seed": 7}, "negative_sampling_rate": 0.5}
    got = prepare(_cfg(tmp_path, str(tmp_path / "logs"), "p", **extra), **QUIET)
    want = prepare(_cfg(tmp_path, str(CRITEO / "data" / "train.tsv"), "w", **extra), **QUIET)
    _assert_same(got, want)
    assert got.manifest["negatives_dropped"] == want.manifest["negatives_dropped"] > 0


def test_parts_train_exactly_as_the_whole_file(tmp_path):
    from deepfm.pipeline import train

    _write_parts(tmp_path / "logs", 3, ".gz")
    results = []
    for name, spec in (("whole", str(CRITEO / "data" / "train.tsv")), ("parts", str(tmp_path / "logs"))):
        raw = criteo_config_dict(tmp_path, epochs=2, batch_size=512)
        raw["data"].update({"train": spec, "cache_dir": str(tmp_path / f"cache-{name}")})
        raw["model"]["hidden_units"] = [32]
        results.append(train(config_from_dict(raw), tmp_path / name, log=lambda _m: None))
    a, b = results
    assert a.metrics == b.metrics
    sa, sb = a.trainer.model.state_dict(), b.trainer.model.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def _parquet_parts(root: Path, layout: dict[str, list[int]]) -> None:
    """Criteo rows as Parquet parts below Hive folders: ``layout`` maps a relative folder to its parts' row
    ranges (given in file order); each part has row groups of 300 rows."""
    import pyarrow.csv as pacsv

    from deepfm.config import CRITEO_COLUMNS

    table = pacsv.read_csv(CRITEO / "data" / "train.tsv", read_options=pacsv.ReadOptions(column_names=CRITEO_COLUMNS),
                           parse_options=pacsv.ParseOptions(delimiter="\t"),
                           convert_options=pacsv.ConvertOptions(column_types={c: pa.string() for c in CRITEO_COLUMNS}))
    start = 0
    for folder, sizes in layout.items():
        for k, n in enumerate(sizes):
            (root / folder).mkdir(parents=True, exist_ok=True)
            pq.write_table(table.slice(start, n), root / folder / f"part-{k}.parquet", row_group_size=300)
            start += n


def test_parquet_parts_with_row_groups_and_hive_partitions(tmp_path):
    """Three days as partition folders: ``dt`` is a column usable as a time split, a field and a derive source."""
    _parquet_parts(tmp_path / "logs", {"dt=2026-12-01": [2000, 1500], "dt=2026-12-02": [2000],
                                       "dt=2026-12-03": [1700]})
    files = sources.resolve(str(tmp_path / "logs"))
    assert [f.partitions for f in files] == [{"dt": "2026-12-01"}] * 2 + [{"dt": "2026-12-02"}, {"dt": "2026-12-03"}]
    assert pq.ParquetFile(str(files[0])).num_row_groups == 7
    split = {"by": "dt", "valid_from": "2026-12-02", "test_from": "2026-12-03"}
    got = prepare(_cfg(tmp_path, str(tmp_path / "logs" / "dt=*"), "pq", format="parquet", split=split), **QUIET)
    assert {k: len(v) for k, v in got.splits.items()} == {"train": 3500, "valid": 2000, "test": 1700}
    # the same rows as text files, split by hand: same vocabularies and arrays
    days = [LINES[:3500], LINES[3500:5500], LINES[5500:]]
    for k, rows in enumerate(days):
        (tmp_path / f"day{k}.tsv").write_bytes(b"".join(rows))
    want = prepare(_cfg(tmp_path, str(tmp_path / "day0.tsv"), "txt", valid=str(tmp_path / "day1.tsv"),
                        test=str(tmp_path / "day2.tsv")), **QUIET)
    _assert_same(got, want)
    # the partition column as a categorical field: one id per day (it is in every row of the day's files)
    raw = criteo_config_dict(tmp_path)
    raw["data"].update({"train": str(tmp_path / "logs"), "format": "parquet", "cache_dir": str(tmp_path / "c3")})
    raw["data"].pop("valid"), raw["data"].pop("test"), raw["data"].pop("preset")  # Parquet names its columns
    raw["fields"].append({"name": "dt", "kind": "categorical"})
    with_dt = prepare(config_from_dict(raw), **QUIET)
    assert with_dt.encoder.vocabularies_["dt"].tokens[-3:] == ["2026-12-01", "2026-12-02", "2026-12-03"] or \
        sorted(with_dt.encoder.vocabularies_["dt"].tokens)[-3:] == ["2026-12-01", "2026-12-02", "2026-12-03"]


def test_the_cache_key_follows_the_files(tmp_path):
    parts = _write_parts(tmp_path / "logs", 3, ".gz")
    cfg = _cfg(tmp_path, str(tmp_path / "logs"))
    first = fingerprint(cfg)
    assert fingerprint(cfg) == first
    parts[1].write_bytes(gzip.compress(b"".join(LINES[:10])))
    assert fingerprint(cfg) != first
    (tmp_path / "logs" / "part-00009.gz").write_bytes(parts[0].read_bytes())
    third = fingerprint(cfg)
    parts[-1].unlink()
    assert fingerprint(cfg) != third


def test_spec_errors_are_one_line_and_carry_no_credentials(tmp_path):
    with pytest.raises(DataError, match="no file matches") as err:
        prepare(_cfg(tmp_path, str(tmp_path / "nothing" / "*.tsv.gz")), **QUIET)
    assert err.value.path == str(tmp_path / "nothing" / "*.tsv.gz")
    from deepfm.errors import ConfigError

    with pytest.raises((ValueError, ConfigError)) as err2:
        _cfg(tmp_path, "s3://AKIAXXXX:sEcReT@bucket/logs/")
    assert "sEcReT" not in str(err2.value) and "AKIAXXXX" not in str(err2.value)
    assert "credentials in a URL" in str(err2.value)


def test_predict_and_evaluate_take_globs_folders_and_compressed_files(tmp_path):
    from deepfm.predict import Predictor
    from deepfm.pipeline import train

    raw = criteo_config_dict(tmp_path, epochs=1, batch_size=512)
    raw["model"]["hidden_units"] = [16]
    model = train(config_from_dict(raw), tmp_path / "m", log=lambda _m: None).model_dir
    test_lines = (CRITEO / "data" / "test.tsv").read_bytes().splitlines(keepends=True)
    (tmp_path / "t" / "dt=1").mkdir(parents=True)
    (tmp_path / "t" / "dt=1" / "a.tsv.gz").write_bytes(gzip.compress(b"".join(test_lines[:200])))
    (tmp_path / "t" / "dt=1" / "b.tsv.zst").write_bytes(_zstd(b"".join(test_lines[200:])))
    pred = Predictor(model)
    whole = pred.evaluate_file(str(CRITEO / "data" / "test.tsv"), progress=False)
    for spec in (str(tmp_path / "t"), str(tmp_path / "t" / "dt=*" / "*")):
        got = pred.evaluate_file(spec, progress=False)
        assert got["auc"] == whole["auc"] and got["rows"] == 391, spec
    out = tmp_path / "p.csv"
    pred.predict_file(str(tmp_path / "t"), str(out), progress=False)
    assert len(out.read_text().splitlines()) == 392
