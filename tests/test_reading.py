"""Reading that survives real click logs: bytes that are not UTF-8, other encodings, very long lines, a short
first row, the skipped-row count on cache reuse, temporary folders of dead processes, the default cache folder.

Every bad file is built from the shipped Criteo sample (headerless TSV: label, I1..I13, C1..C26).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import CRITEO, criteo_config_dict

from deepfm.cli import main
from deepfm.config import DataConfig, config_from_dict, load_config
from deepfm.data import fastpath, readers
from deepfm.data.readers import BadRows, read_chunks
from deepfm.data.store import prepare
from deepfm.io import remove_dead_temporaries
from deepfm.errors import DataError

ROWS = 300  # data lines of each training file built here
C7 = 1 + 13 + 6  # column index of C7


def sample_lines(n: int = ROWS) -> list[bytes]:
    return (CRITEO / "data" / "train.tsv").read_bytes().splitlines()[:n]


def with_cell(lines: list[bytes], line: int, value: bytes, column: int = C7) -> list[bytes]:
    """``lines`` with the cell at (1-based ``line``, ``column``) replaced."""
    out = list(lines)
    cells = out[line - 1].split(b"\t")
    cells[column] = value
    out[line - 1] = b"\t".join(cells)
    return out


def write(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def config_file(tmp_path: Path, train: Path, **data) -> Path:
    raw = criteo_config_dict(tmp_path, epochs=1, batch_size=256)
    raw["data"].update({"train": str(train), "valid": None, "test": None, **data})
    raw["model"].update({"embed_dim": 4, "hidden_units": [8], "dropout": 0.0})
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


def train(cfg: Path, out: Path, *extra: str) -> int:
    return main(["train", str(cfg), "--output", str(out), "--no-progress", *extra])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A small model trained on clean rows of the sample, for the predict tests."""
    tmp = tmp_path_factory.mktemp("model")
    assert train(config_file(tmp, write(tmp / "train.tsv", sample_lines())), tmp / "m") == 0
    return tmp / "m"


# --- a cell that is not UTF-8 ---------------------------------------------------------------------------------

def stream_fast_path(monkeypatch) -> None:
    """The fast path's way with a file over 256 MB, on a small one: streamed in chunks of 100 rows."""
    monkeypatch.setattr(fastpath, "WHOLE_FILE_BYTES", 0)
    monkeypatch.setattr(fastpath, "BLOCK_BYTES", 16 << 10)
    monkeypatch.setattr(fastpath, "CHUNK_ROWS", 100)


@pytest.mark.parametrize("mode", ["fast", "fast_streamed", "small_chunks"])
def test_invalid_utf8_cell_names_file_line_and_field_on_train(tmp_path, capsys, monkeypatch, mode):
    if mode == "fast_streamed":
        stream_fast_path(monkeypatch)
    extra = ("--set", "data.chunk_rows=64") if mode == "small_chunks" else ()
    bad = write(tmp_path / "train.tsv", with_cell(sample_lines(), 120, b"caf\xe9"))
    code = train(config_file(tmp_path, bad), tmp_path / "m", *extra)
    err = capsys.readouterr().err
    assert code == 2
    assert f"error: {bad}, line 120, field 'C7': 'caf\\xe9' is not valid utf-8 text" in err
    assert "data.encoding" in err and "Traceback" not in err
    assert "Fast preparation stopped (field 'C7' holds a cell that is not valid UTF-8)" in err  # handed over
    assert not (tmp_path / "m").exists()


def test_invalid_utf8_in_a_numeric_cell_and_the_label(tmp_path, capsys):
    lines = with_cell(with_cell(sample_lines(), 7, b"1\xff", column=3), 9, b"\xfe", column=0)
    bad = write(tmp_path / "train.tsv", lines)
    assert train(config_file(tmp_path, bad), tmp_path / "m") == 2
    assert f"{bad}, line 7, field 'I3': '1\\xff' is not valid utf-8 text" in capsys.readouterr().err


def test_skipped_invalid_utf8_rows_are_counted_listed_and_reported_again_on_reuse(tmp_path, capsys):
    lines = with_cell(with_cell(sample_lines(), 5, b"\xe9t\xe9"), 250, b"\x80", column=C7 + 3)
    bad = write(tmp_path / "train.tsv", lines)
    cfg = config_file(tmp_path, bad)
    assert train(cfg, tmp_path / "m1", "--skip-bad-rows") == 0
    first = capsys.readouterr().err
    side = next((tmp_path / "cache").glob("*/bad_rows.txt"))
    expected = f"Skipped 2 bad row(s); they are listed in {side}"
    assert expected in first
    listed = side.read_text().splitlines()
    assert [entry.split(": ")[0] for entry in listed] == [f"{bad}:5", f"{bad}:250"]
    assert "field 'C7'" in listed[0] and "field 'C10'" in listed[1]
    manifest = json.loads((side.parent / "manifest.json").read_text())
    assert manifest["bad_rows"] == 2 and manifest["splits"]["train"]["rows"] == ROWS - 2
    # the second run reuses the prepared data and says the same
    assert train(cfg, tmp_path / "m2", "--skip-bad-rows") == 0
    second = capsys.readouterr().err
    assert "Reusing prepared data" in second and expected in second


def test_predict_names_the_bad_cell_or_skips_it(tmp_path, capsys, model_dir):
    bad = write(tmp_path / "new.tsv", with_cell(sample_lines(50), 17, b"caf\xe9"))
    out = tmp_path / "p.csv"
    code = main(["predict", str(model_dir), str(bad), "--output", str(out), "--no-progress"])
    assert code == 2
    assert f"{bad}, line 17, field 'C7': 'caf\\xe9' is not valid utf-8 text" in capsys.readouterr().err
    assert not out.exists()
    code = main(["predict", str(model_dir), str(bad), "--output", str(out), "--no-progress", "--skip-bad-rows"])
    assert code == 0
    rows = out.read_text().splitlines()
    assert rows[0] == "row,probability" and len(rows) == 1 + 49
    assert [int(r.split(",")[0]) for r in rows[1:]] == [i for i in range(50) if i != 16]
    side = (tmp_path / "p.csv.bad_rows.txt").read_text().splitlines()
    assert len(side) == 1 and side[0].startswith(f"{bad}:17: field 'C7'")


def test_the_cli_exits_2_not_abort(tmp_path, model_dir):
    """As a user runs it: a fresh process, exit status 2 (no arrow abort), one line of error."""
    bad = write(tmp_path / "new.tsv", with_cell(sample_lines(50), 3, b"caf\xe9"))
    proc = subprocess.run([sys.executable, "-m", "deepfm", "predict", str(model_dir), str(bad), "--output",
                           str(tmp_path / "p.csv"), "--no-progress"], capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: {bad}, line 3, field 'C7'")


# --- data.encoding ------------------------------------------------------------------------------------------------

def _prepared(tmp_path: Path, train_file: Path, name: str, **data):
    raw = yaml.safe_load(config_file(tmp_path, train_file, **data).read_text())
    raw["data"]["cache_dir"] = str(tmp_path / name)
    return prepare(config_from_dict(raw), progress=False, log=lambda _m: None)


@pytest.mark.parametrize("mode", ["fast", "fast_streamed", "general"])
def test_latin1_file_reads_as_its_utf8_twin(tmp_path, monkeypatch, mode):
    skip = mode == "general"
    if mode == "fast_streamed":
        stream_fast_path(monkeypatch)
    text = [b"caf\xc3\xa9", b"na\xc3\xafve", b"\xc3\xa9t\xc3\xa9"]  # UTF-8 text, twice each (min_count 2)
    lines = sample_lines()
    for k, cell in enumerate(text * 2):
        lines = with_cell(lines, 10 + 40 * k, cell)
    utf8 = write(tmp_path / "utf8.tsv", lines)
    latin = write(tmp_path / "latin.tsv", [line.decode("utf-8").encode("latin-1") for line in lines])
    assert utf8.read_bytes() != latin.read_bytes()
    a = _prepared(tmp_path, utf8, "a", skip_bad_rows=skip)
    b = _prepared(tmp_path, latin, "b", skip_bad_rows=skip, encoding="latin-1")
    assert a.manifest["fast_path"] is (not skip) and b.manifest["fast_path"] is (not skip)
    vocab_a, vocab_b = a.encoder.to_json(), b.encoder.to_json()
    assert vocab_a == vocab_b
    assert {"café", "naïve", "été"} <= _tokens(vocab_b)
    for split in ("train",):
        np.testing.assert_array_equal(a.splits[split].cat_ids, b.splits[split].cat_ids)
        np.testing.assert_array_equal(a.splits[split].num_values, b.splits[split].num_values)


def _tokens(encoder_json) -> set[str]:
    """Every string found in an encoder's JSON form."""
    found: set[str] = set()

    def walk(x) -> None:
        if isinstance(x, str):
            found.add(x)
        elif isinstance(x, dict):
            for k, v in x.items():
                walk(k)
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    walk(encoder_json)
    return found


def test_bytes_undecodable_in_the_configured_encoding_name_line_and_field(tmp_path, capsys):
    bad = write(tmp_path / "train.tsv", with_cell(sample_lines(), 33, b"caf\xe9\x81"))  # 0x81: no cp1252 character
    assert train(config_file(tmp_path, bad, encoding="cp1252"), tmp_path / "m") == 2
    assert f"{bad}, line 33, field 'C7': 'café\\x81' is not valid cp1252 text" in capsys.readouterr().err


def test_unknown_encoding_is_a_config_error():
    with pytest.raises(Exception, match="data.encoding 'klingon' is not a known text encoding"):
        DataConfig(train="x.tsv", encoding="klingon")


# --- lines of any length --------------------------------------------------------------------------------------------

def test_a_10mb_cell_is_read_on_train_and_predict(tmp_path, capsys, model_dir):
    huge = b"h" * (10 << 20)
    lines = with_cell(sample_lines(), 200, huge)
    path = write(tmp_path / "train.tsv", lines)
    data = _prepared(tmp_path, path, "c")
    assert data.manifest["splits"]["train"]["rows"] == ROWS
    labels = [float(line.split(b"\t")[0]) for line in lines]
    np.testing.assert_array_equal(data.splits["train"].labels, labels)
    out = tmp_path / "p.csv"
    assert main(["predict", str(model_dir), str(path), "--output", str(out), "--no-progress"]) == 0
    assert len(out.read_text().splitlines()) == 1 + ROWS


def test_a_long_line_after_yielded_chunks_with_bad_rows_reads_each_row_once(tmp_path, monkeypatch):
    """The parse that meets a long line starts again with a bigger block: rows and bad rows handed over
    before it are not handed over twice."""
    monkeypatch.setattr(readers.delimited, "BLOCK_BYTES", 1 << 20)  # arrow fails on a line over about two blocks
    sized = []
    real = readers.delimited.block_for_lines
    monkeypatch.setattr(readers.delimited, "block_for_lines", lambda *a: sized.append(real(*a)) or sized[-1])
    lines = with_cell(sample_lines(), 150, b"h" * (3 << 20))
    lines[40] = b"1\t2"  # line 41: too few columns
    lines = with_cell(lines, 260, b"\xff")
    path = write(tmp_path / "train.tsv", lines)
    data = DataConfig(format="tsv", header=False, preset="criteo", train=str(path), chunk_rows=32)
    bad = BadRows()
    chunks = list(read_chunks(str(path), data, bad))
    got = np.concatenate([c.lines for c in chunks])
    np.testing.assert_array_equal(got, [n for n in range(1, ROWS + 1) if n not in (41, 260)])
    assert [c.row_start for c in chunks] == list(np.cumsum([0] + [len(c) for c in chunks[:-1]]))
    assert [(e[1], e[2][:20]) for e in bad.entries] == [(41, "expected 40 columns,"), (260, "field 'C7': '\\xff' i")]
    assert max(c.frame["C7"].str.len_bytes().max() for c in chunks) == 3 << 20
    assert len(sized) == 1 and sized[0] > 2 * (3 << 20)  # one parse again, with a block twice the line


def test_a_line_too_long_to_read_is_rejected_by_number(tmp_path, capsys, monkeypatch):
    """(The streamed general path; a limit lowered from 256 MB keeps the test fast.)"""
    monkeypatch.setattr(readers.delimited, "MAX_LINE_BYTES", 1 << 20)
    monkeypatch.setattr(readers.delimited, "BLOCK_BYTES", 1 << 18)
    path = write(tmp_path / "train.tsv", with_cell(sample_lines(), 77, b"h" * (3 << 20)))
    assert train(config_file(tmp_path, path), tmp_path / "m", "--skip-bad-rows") == 2
    err = capsys.readouterr().err
    length = len(path.read_bytes().splitlines()[76]) + 1  # with its newline
    assert f"error: {path}, line 77: line is {length:,} bytes long; deepfm reads lines up to 1,048,576 bytes" in err


def test_longest_line_counts_bytes_and_numbers():
    import tempfile

    with tempfile.NamedTemporaryFile(delete=False) as fh:
        fh.write(b"ab\n" + b"x" * 100 + b"\nc\n" + b"y" * 150)  # the last line has no newline
    try:
        assert readers.delimited.longest_line(fh.name) == (150, 4)
    finally:
        os.unlink(fh.name)


# --- a short first row --------------------------------------------------------------------------------------------

def test_short_first_row_is_line_1_on_predict_and_train(tmp_path, capsys, model_dir):
    lines = sample_lines(60)
    lines[0] = b"\t".join(lines[0].split(b"\t")[:-1])  # one column short
    path = write(tmp_path / "new.tsv", lines)
    out = tmp_path / "p.csv"
    assert main(["predict", str(model_dir), str(path), "--output", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"error: {path}, line 1: expected 40 columns, found 39" in err
    assert train(config_file(tmp_path, path), tmp_path / "m") == 2
    assert f"error: {path}, line 1: expected 40 columns, found 39" in capsys.readouterr().err


def test_unlabeled_file_is_still_recognised_despite_one_odd_row(tmp_path, capsys, model_dir):
    lines = [b"\t".join(line.split(b"\t")[1:]) for line in sample_lines(60)]  # no label column
    lines[0] = lines[0] + b"\textra"  # an odd first row decides nothing
    path = write(tmp_path / "new.tsv", lines)
    out = tmp_path / "p.csv"
    assert main(["predict", str(model_dir), str(path), "--output", str(out), "--no-progress",
                 "--skip-bad-rows"]) == 0
    assert len(out.read_text().splitlines()) == 1 + 59
    side = (tmp_path / "p.csv.bad_rows.txt").read_text()
    assert side.startswith(f"{path}:1: expected 39 columns, found 40")


# --- libffm / libsvm / Parquet -----------------------------------------------------------------------------------

def test_libffm_and_libsvm_lines_that_are_not_utf8(tmp_path):
    ffm = tmp_path / "d.ffm"
    ffm.write_bytes(b"1 0:a:1 1:b:1\n0 0:a:1 1:caf\xe9:1\n1 0:c:1\n")
    data = DataConfig(format="libffm", train=str(ffm), columns=["f0", "f1"], header=False)
    with pytest.raises(DataError) as info:
        list(read_chunks(str(ffm), data))
    assert (info.value.line, info.value.field) == (2, "f1") and "'1:caf\\xe9:1' is not valid utf-8" in str(info.value)
    bad = BadRows()
    chunks = list(read_chunks(str(ffm), data, bad))
    assert list(chunks[0].lines) == [1, 3] and bad.count == 1 and bad.entries[0][1] == 2
    latin = data.model_copy(update={"encoding": "latin-1"})
    assert next(iter(read_chunks(str(ffm), latin))).frame["f1"].to_list() == ["b:1", "café:1", None]
    svm = tmp_path / "d.svm"
    svm.write_bytes(b"1 3:1\n\xff 4:1\n")
    with pytest.raises(DataError) as info:
        list(read_chunks(str(svm), DataConfig(format="libsvm", train=str(svm), header=False)))
    assert (info.value.line, info.value.field) == (2, "label")


def test_parquet_binary_cells_that_are_not_utf8(tmp_path):
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"label": [0, 1, 0], "C1": pa.array([b"a", b"caf\xe9", b"b"], pa.binary())}), path)
    data = DataConfig(format="parquet", train=str(path))
    with pytest.raises(DataError) as info:
        list(read_chunks(str(path), data))
    assert (info.value.line, info.value.field) == (2, "C1")
    assert info.value.reason == "'caf\\xe9' is not valid UTF-8 text"
    bad = BadRows()
    (chunk,) = list(read_chunks(str(path), data, bad))
    assert chunk.frame["C1"].to_list() == ["a", "b"] and list(chunk.lines) == [1, 3] and bad.count == 1


# --- the cache folder -----------------------------------------------------------------------------------------------

def test_temporary_folders_of_dead_processes_are_removed(tmp_path):
    root = tmp_path / "cache"
    root.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    host = socket.gethostname()
    names = {"old_style_dead": f".0123abcd.tmp-{dead}", "dead": f".0123abcd.tmp-{dead}@{host}",
             "alive": f".0123abcd.tmp-{os.getppid()}@{host}", "other_host": f".0123abcd.tmp-{dead}@elsewhere",
             "not_ours": "notes.tmp-1"}
    for name in names.values():
        (root / name).mkdir()
        (root / name / "cat_ids.bin").write_bytes(b"x")
    assert sorted(p.name for p in remove_dead_temporaries(root)) == sorted([names["old_style_dead"], names["dead"]])
    assert sorted(p.name for p in root.iterdir()) == sorted([names["alive"], names["other_host"], names["not_ours"]])
    # and a run does it: preparing anything into this cache removes a folder left by a killed preparation
    (root / names["dead"]).mkdir()
    raw = criteo_config_dict(tmp_path)
    raw["data"].update({"train": str(write(tmp_path / "t.tsv", sample_lines(100))), "valid": None, "test": None})
    prepare(config_from_dict(raw), progress=False, log=lambda _m: None)
    assert not (root / names["dead"]).exists() and (root / names["alive"]).exists()


def test_default_cache_dir_is_read_from_the_config_folder(tmp_path, monkeypatch):
    folder = tmp_path / "project"
    folder.mkdir()
    raw = criteo_config_dict(tmp_path)
    del raw["data"]["cache_dir"]
    (folder / "cfg.yaml").write_text(yaml.safe_dump(raw))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_config(Path("..") / "project" / "cfg.yaml")
    assert cfg.data.cache_dir == str(folder / ".cache" / "deepfm")
    given = load_config(folder / "cfg.yaml", ["data.cache_dir=/tmp/x"])
    assert given.data.cache_dir == "/tmp/x"


def test_a_model_trained_on_a_latin1_file_predicts_latin1_files(tmp_path):
    """data.encoding travels with the model: predict reads new files in it, and the latin-1 model scores its file
    exactly as the model trained on the UTF-8 twin scores the twin."""
    lines = sample_lines()
    for k in range(8):
        lines = with_cell(lines, 5 + 30 * k, "café".encode() if k % 2 else "naïve".encode())
    utf8 = write(tmp_path / "utf8.tsv", lines)
    latin = write(tmp_path / "latin.tsv", [line.decode("utf-8").encode("latin-1") for line in lines])
    scores = {}
    for name, path, extra in (("utf8", utf8, {}), ("latin", latin, {"encoding": "latin-1"})):
        folder = tmp_path / name
        folder.mkdir()
        assert train(config_file(folder, path, **extra), folder / "m") == 0
        out = folder / "p.csv"
        assert main(["predict", str(folder / "m"), str(path), "--output", str(out), "--no-progress"]) == 0
        scores[name] = out.read_text().splitlines()
    assert len(scores["latin"]) == 1 + ROWS and scores["latin"] == scores["utf8"]
