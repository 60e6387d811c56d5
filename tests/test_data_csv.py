"""Tests of the FOP CSV reader: parsing, error messages, the .npy cache and load_dir."""

import os

import numpy as np
import pytest

from paeff_np.data import KINDS, SPLITS, DataError, load_dir, read_test_list, read_train
from paeff_np.data.csv import CACHE_DIR_NAME, read_matrix
from paeff_np.data.dataset import test_file_names, train_file_names


def write_csv(path, rows):
    path.write_text("".join(",".join(str(cell) for cell in row) + "\n" for row in rows))
    return path


def features(n_rows, n_columns, offset=0.0):
    """Values exactly representable in float32, different in every cell."""
    return (np.arange(n_rows * n_columns, dtype=np.float32).reshape(n_rows, n_columns) * 0.25 + offset)


def write_train(directory, face, voice, face_labels, voice_labels=None):
    voice_labels = face_labels if voice_labels is None else voice_labels
    face_name, voice_name = train_file_names()
    face_path = write_csv(directory / face_name, [[*row, label] for row, label in zip(face.tolist(), face_labels)])
    voice_path = write_csv(directory / voice_name, [[*row, label] for row, label in zip(voice.tolist(), voice_labels)])
    return face_path, voice_path


def write_test_pair(directory, split, kind, face, voice):
    face_name, voice_name = test_file_names(split, kind)
    return write_csv(directory / face_name, face.tolist()), write_csv(directory / voice_name, voice.tolist())


def data_error(call, *args, **kwargs):
    """Run call, expect a DataError, and return its one-line message."""
    with pytest.raises(DataError) as caught:
        call(*args, **kwargs)
    message = str(caught.value)
    assert "\n" not in message
    return message


# --- round trips --------------------------------------------------------------


def test_train_round_trip_with_string_labels(tmp_path):
    face, voice = features(4, 7), features(4, 3, offset=100.0)
    labels = ["id2", "id1", "id2", "id3"]
    train = read_train(*write_train(tmp_path, face, voice, labels), cache=False)

    np.testing.assert_array_equal(train.face, face)
    np.testing.assert_array_equal(train.voice, voice)
    assert train.face.dtype == np.float32 and train.voice.dtype == np.float32
    assert (train.face_dim, train.voice_dim, len(train), train.n_classes) == (7, 3, 4, 3)
    assert train.labels.dtype == np.int64
    assert train.label_values.dtype.kind == "U"
    assert train.label_values.tolist() == ["id1", "id2", "id3"]
    assert train.labels.tolist() == [1, 0, 1, 2]


def test_train_integer_labels_written_as_int_or_float_agree(tmp_path):
    face, voice = features(3, 2), features(3, 2)
    paths = write_train(tmp_path, face, voice, ["7.0", "10.0", "7.0"], ["7", "10", "7"])
    train = read_train(*paths, cache=False)

    assert train.label_values.tolist() == ["10", "7"]
    assert train.label_values[train.labels].tolist() == ["7", "10", "7"]


def test_test_list_keeps_file_widths_and_ignores_extra_columns(tmp_path):
    face, voice = features(4, 7), features(4, 3)
    extra = np.full((4, 2), 9.0, dtype=np.float32)
    face_path = write_csv(tmp_path / "face.csv", np.hstack([face, extra]).tolist())
    voice_path = write_csv(tmp_path / "voice.csv", np.hstack([voice, extra]).tolist())

    whole = read_test_list(face_path, voice_path, cache=False)
    assert whole.face.shape == (4, 9) and whole.voice.shape == (4, 5)

    cut = read_test_list(face_path, voice_path, face_dim=7, voice_dim=3, cache=False)
    np.testing.assert_array_equal(cut.face, face)
    np.testing.assert_array_equal(cut.voice, voice)
    assert cut.same.tolist() == [True, False, True, False]


# --- errors -------------------------------------------------------------------


def test_missing_file(tmp_path):
    message = data_error(read_matrix, tmp_path / "absent.csv")
    assert "absent.csv" in message and "not found" in message


@pytest.mark.parametrize("content,where", [
    (b"1.0,2.0\n\xff\xfe\x00garbage\n", "byte 9 is not UTF-8 text"),
    (b"1.0,2.0\n3.0\x00,4.0\n", "byte 12 is a NUL byte"),
], ids=["not UTF-8", "NUL"])
def test_binary_data_is_not_called_a_header(tmp_path, content, where):
    (tmp_path / "binary.csv").write_bytes(content)
    message = data_error(read_matrix, tmp_path / "binary.csv", cache=False)
    assert "binary.csv: not a text file" in message and where in message and "header" not in message


def test_a_character_cut_by_the_sniffed_bytes_is_not_binary(tmp_path, monkeypatch):
    import paeff_np.data.csv as csv_module
    monkeypatch.setattr(csv_module, "_SNIFF_BYTES", 9)      # cuts the 2-byte "é" of row 2 in half
    (tmp_path / "m.csv").write_text("1.0,2.0\n\u00e9,3\n", encoding="utf-8")
    assert "not a text file" not in data_error(read_matrix, tmp_path / "m.csv", cache=False)


def test_empty_file(tmp_path):
    (tmp_path / "empty.csv").write_text("")
    message = data_error(read_matrix, tmp_path / "empty.csv", cache=False)
    assert "empty.csv" in message and "empty" in message


def test_unequal_rows_in_test_list(tmp_path):
    (tmp_path / "m.csv").write_text("1,2,3\n4,5,6\n7,8\n")
    message = data_error(read_matrix, tmp_path / "m.csv", cache=False)
    assert message.endswith("m.csv: row 3 has 2 columns, expected 3")


@pytest.mark.parametrize("bad_row", ["4,5,6,id1", "4,id1"])
def test_unequal_rows_in_train_file(tmp_path, bad_row):
    face_path = tmp_path / "faceTrain.csv"
    face_path.write_text(f"1,2,id1\n{bad_row}\n7,8,id2\n")
    voice_path = write_csv(tmp_path / "voiceTrain.csv", [[1, "id1"], [2, "id1"], [3, "id2"]])
    message = data_error(read_train, face_path, voice_path, cache=False)
    assert "faceTrain.csv: row 2 has" in message and "expected 3" in message


def test_non_numeric_cell(tmp_path):
    (tmp_path / "m.csv").write_text("1,2,3\n4,5,6\n7,x,9\n")
    message = data_error(read_matrix, tmp_path / "m.csv", cache=False)
    assert message.endswith("m.csv: row 3, column 2: 'x' is not a number")


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_value(tmp_path, value):
    (tmp_path / "m.csv").write_text(f"1,2,3\n4,5,{value}\n")
    message = data_error(read_matrix, tmp_path / "m.csv", cache=False)
    assert "m.csv: row 2, column 3" in message and value in message


def test_train_needs_a_label_column(tmp_path):
    face_path = write_csv(tmp_path / "faceTrain.csv", [[1], [2]])
    voice_path = write_csv(tmp_path / "voiceTrain.csv", [[1, 0], [2, 0]])
    message = data_error(read_train, face_path, voice_path, cache=False)
    assert "faceTrain.csv" in message and "1 column" in message


def test_train_row_count_mismatch(tmp_path):
    face_path, voice_path = write_train(tmp_path, features(3, 2), features(3, 2), ["a", "b", "a"])
    write_csv(voice_path, [[1, "a"], [2, "b"]])
    message = data_error(read_train, face_path, voice_path, cache=False)
    assert "faceTrain.csv has 3 rows" in message and "voiceTrain.csv has 2" in message


def test_train_label_mismatch_names_the_row(tmp_path):
    paths = write_train(tmp_path, features(4, 2), features(4, 2), ["a", "b", "c", "d"], ["a", "b", "x", "d"])
    message = data_error(read_train, *paths, cache=False)
    assert "faceTrain.csv: row 3 has label 'c'" in message and "voiceTrain.csv row 3 has label 'x'" in message


def test_test_list_row_count_mismatch(tmp_path):
    face_path = write_csv(tmp_path / "face.csv", features(4, 3).tolist())
    voice_path = write_csv(tmp_path / "voice.csv", features(2, 3).tolist())
    message = data_error(read_test_list, face_path, voice_path, cache=False)
    assert "face.csv has 4 rows" in message and "voice.csv has 2" in message


def test_odd_test_list(tmp_path):
    face_path = write_csv(tmp_path / "face.csv", features(3, 3).tolist())
    voice_path = write_csv(tmp_path / "voice.csv", features(3, 3).tolist())
    message = data_error(read_test_list, face_path, voice_path, cache=False)
    assert "face.csv" in message and "3 rows" in message and "even" in message


def test_test_list_narrower_than_required(tmp_path):
    face_path = write_csv(tmp_path / "face.csv", features(2, 5).tolist())
    voice_path = write_csv(tmp_path / "voice.csv", features(2, 3).tolist())
    message = data_error(read_test_list, face_path, voice_path, face_dim=5, voice_dim=4, cache=False)
    assert message == f"{voice_path}: has 3 columns, expected at least 4 voice features"


def test_only_one_half_of_a_test_pair(tmp_path):
    face_path, voice_path = write_test_pair(tmp_path, "seenheard", "G", features(2, 3), features(2, 2))
    voice_path.unlink()
    message = data_error(load_dir, tmp_path, need_train=False, cache=False)
    assert voice_path.name in message and "not found" in message


def test_load_dir_names_missing_train_file(tmp_path):
    face_path, voice_path = write_train(tmp_path, features(2, 3), features(2, 2), ["a", "b"])
    voice_path.unlink()
    message = data_error(load_dir, tmp_path, cache=False)
    assert "voiceTrain.csv" in message and "not found" in message


# --- cache --------------------------------------------------------------------


def forbid_parsing(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("np.loadtxt called: the cache was not used")

    monkeypatch.setattr(np, "loadtxt", fail)


def test_second_read_comes_from_the_cache(tmp_path, monkeypatch):
    face, voice = features(4, 7), features(4, 3)
    paths = write_train(tmp_path, face, voice, ["b", "a", "b", "c"])
    first = read_train(*paths)

    cache_dir = tmp_path / CACHE_DIR_NAME
    for name in train_file_names():
        for suffix in (".npy", ".labels.npy", ".json"):
            assert (cache_dir / f"{name}{suffix}").is_file()
    assert not list(cache_dir.glob("*.tmp"))

    forbid_parsing(monkeypatch)
    second = read_train(*paths)
    assert isinstance(second.face, np.memmap) and isinstance(second.voice, np.memmap)
    np.testing.assert_array_equal(second.face, face)
    np.testing.assert_array_equal(second.voice, voice)
    np.testing.assert_array_equal(second.labels, first.labels)
    np.testing.assert_array_equal(second.label_values, first.label_values)


def test_cached_test_list_still_checks_widths(tmp_path, monkeypatch):
    face_path = write_csv(tmp_path / "face.csv", features(2, 3).tolist())
    voice_path = write_csv(tmp_path / "voice.csv", features(2, 3).tolist())
    read_test_list(face_path, voice_path)

    forbid_parsing(monkeypatch)
    message = data_error(read_test_list, face_path, voice_path, face_dim=4)
    assert "face.csv: has 3 columns" in message


def test_cache_false_writes_no_cache(tmp_path):
    write_csv(tmp_path / "m.csv", features(2, 2).tolist())
    read_matrix(tmp_path / "m.csv", cache=False)
    assert not (tmp_path / CACHE_DIR_NAME).exists()


def test_changed_source_with_new_mtime_invalidates_the_cache(tmp_path, monkeypatch):
    path = tmp_path / "m.csv"
    path.write_text("1.5,2.5\n")
    read_matrix(path)
    old_mtime = path.stat().st_mtime_ns

    path.write_text("3.5,4.5\n")  # same size
    os.utime(path, ns=(old_mtime + 10**9, old_mtime + 10**9))
    np.testing.assert_array_equal(read_matrix(path), [[3.5, 4.5]])

    forbid_parsing(monkeypatch)  # and the new content is cached in turn
    np.testing.assert_array_equal(read_matrix(path), [[3.5, 4.5]])


def test_changed_source_with_same_mtime_but_new_size_invalidates_the_cache(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("1.5,2.5\n")
    read_matrix(path)
    old_mtime = path.stat().st_mtime_ns

    path.write_text("13.5,4.5\n")
    os.utime(path, ns=(old_mtime, old_mtime))
    np.testing.assert_array_equal(read_matrix(path), [[13.5, 4.5]])


def test_damaged_cache_is_ignored(tmp_path):
    path = write_csv(tmp_path / "m.csv", [[1, 2]])
    read_matrix(path)
    (tmp_path / CACHE_DIR_NAME / "m.csv.npy").write_bytes(b"not an npy file")
    np.testing.assert_array_equal(read_matrix(path), [[1, 2]])


def test_unwritable_cache_location_still_reads(tmp_path):
    (tmp_path / CACHE_DIR_NAME).write_text("a file where the cache directory would go")
    path = write_csv(tmp_path / "m.csv", [[1, 2]])
    np.testing.assert_array_equal(read_matrix(path), [[1, 2]])


def test_failed_cache_write_still_reads_and_leaves_no_files(tmp_path, monkeypatch):
    def refuse(*args):
        raise PermissionError("read-only")

    monkeypatch.setattr(os, "replace", refuse)
    path = write_csv(tmp_path / "m.csv", [[1, 2]])
    np.testing.assert_array_equal(read_matrix(path), [[1, 2]])
    assert list((tmp_path / CACHE_DIR_NAME).iterdir()) == []


def test_read_only_directory_still_reads(tmp_path):
    path = write_csv(tmp_path / "m.csv", [[1, 2]])
    tmp_path.chmod(0o555)
    try:
        if os.access(tmp_path, os.W_OK):
            pytest.skip("chmod does not stop this user from writing (root)")
        np.testing.assert_array_equal(read_matrix(path), [[1, 2]])
        assert not (tmp_path / CACHE_DIR_NAME).exists()
    finally:
        tmp_path.chmod(0o755)


# --- load_dir -----------------------------------------------------------------


def test_load_dir_finds_test_lists_and_uses_train_widths(tmp_path):
    write_train(tmp_path, features(4, 7), features(4, 3), ["a", "b", "a", "b"])
    wide_face, wide_voice = features(2, 9), features(2, 5)
    write_test_pair(tmp_path, "unseenunheard", "random", wide_face, wide_voice)
    write_test_pair(tmp_path, "seenheard", "GNA", wide_face, wide_voice)

    dataset = load_dir(tmp_path, cache=False)

    assert dataset.train is not None and len(dataset.train) == 4
    assert sorted(dataset.tests) == ["seenheard/GNA", "unseenunheard/random"]
    for test_list in dataset.tests.values():
        np.testing.assert_array_equal(test_list.face, wide_face[:, :7])
        np.testing.assert_array_equal(test_list.voice, wide_voice[:, :3])


def test_load_dir_keys_every_split_and_kind(tmp_path):
    for split in SPLITS:
        for kind in KINDS:
            write_test_pair(tmp_path, split, kind, features(2, 3), features(2, 2))

    dataset = load_dir(tmp_path, face_dim=2, need_train=False, cache=False)

    assert dataset.train is None
    assert set(dataset.tests) == {f"{split}/{kind}" for split in SPLITS for kind in KINDS}
    assert all(t.face.shape == (2, 2) and t.voice.shape == (2, 2) for t in dataset.tests.values())


def test_load_dir_without_test_lists_is_fine_for_training(tmp_path):
    write_train(tmp_path, features(2, 3), features(2, 2), ["a", "b"])
    dataset = load_dir(tmp_path, cache=False)
    assert dataset.tests == {} and dataset.train.n_classes == 2


# --- inputs that are not plain FOP CSV (issue 8, sections 5 and 6) ---------------


def test_trailing_comma_on_every_train_row_is_refused_not_read_as_a_feature(tmp_path):
    face_path, voice_path = write_train(tmp_path, features(4, 3), features(4, 2), ["a", "b", "a", "b"])
    for path in (face_path, voice_path):
        path.write_text("".join(line + ",\n" for line in path.read_text().splitlines()))
    message = data_error(read_train, face_path, voice_path, cache=False)
    assert "faceTrain.csv: row 1 ends with a comma" in message and "label" in message


def test_trailing_comma_in_a_test_list_is_named(tmp_path):
    path = tmp_path / "list.csv"
    path.write_text("1.5,2.5,\n3.5,4.5,\n")
    assert "row 1 ends with a comma" in data_error(read_matrix, path, cache=False)


def test_one_identity_training_set_is_refused(tmp_path):
    paths = write_train(tmp_path, features(4, 3), features(4, 2), ["7", "7.0", "7", "7"])
    message = data_error(read_train, *paths, cache=False)
    assert "faceTrain.csv" in message and "at least 2 identities" in message


@pytest.mark.parametrize("value", ["1e38", "-3e20", "2e12"])
def test_features_that_overflow_the_model_are_refused_at_load(tmp_path, value):
    path = write_csv(tmp_path / "m.csv", [[0.5, 1.5], [2.5, value]])
    message = data_error(read_matrix, path, cache=False)
    assert f"m.csv: row 2, column 2 is {float(np.float32(value)):g};" in message and "overflow" in message


def test_features_up_to_the_limit_are_kept(tmp_path):
    path = write_csv(tmp_path / "m.csv", [[0.5, 1e12], [-1e12, 0.0]])
    np.testing.assert_array_equal(read_matrix(path, cache=False), np.float32([[0.5, 1e12], [-1e12, 0.0]]))


def test_gzip_named_csv(tmp_path):
    import gzip
    path = tmp_path / "faceTrain.csv"
    path.write_bytes(gzip.compress(b"1.5,2.5,a\n3.5,4.5,b\n"))
    assert data_error(read_matrix, path, cache=False) == f"{path}: compressed (gzip); decompress first, e.g. zcat faceTrain.csv > plain.csv"


def test_utf8_byte_order_mark(tmp_path):
    path = tmp_path / "m.csv"
    path.write_bytes(b"\xef\xbb\xbf1.5,2.5\n3.5,4.5\n")
    assert "byte-order mark" in data_error(read_matrix, path, cache=False)


@pytest.mark.parametrize("separator, cell, name", [(";", "1.5", "';'"), ("\t", "1.5", "tabs"), (" ", "1.5", "spaces"),
                                                  (";", "1,5", "';'")])
def test_other_separators_are_named(tmp_path, separator, cell, name):
    path = tmp_path / "m.csv"
    path.write_text(separator.join([cell] * 300) + "\n")
    message = data_error(read_matrix, path, cache=False)
    assert f"separated by {name}, expected commas" in message
    assert len(message) < 2 * 120 + len(str(path)) + 80  # quotes at most ~120 characters of the row


def test_header_line_is_named(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("f0,f1,label\n1.5,2.5,a\n")
    assert "row 1 is a header line ('f0,f1,label')" in data_error(read_matrix, path, cache=False)


@pytest.mark.parametrize("where", [0, 2])
def test_comment_line_is_named(tmp_path, where):
    lines = ["1.5,2.5", "3.5,4.5", "5.5,6.5"]
    lines.insert(where, "# exported by a tool")
    path = tmp_path / "m.csv"
    path.write_text("\n".join(lines) + "\n")
    assert f"row {where + 1} is a comment line ('# exported by a tool')" in data_error(read_matrix, path, cache=False)


def test_a_message_quotes_at_most_about_120_characters_of_a_row(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("1.5,2.5\n" + "x" * 40_000 + ",2.5\n")
    message = data_error(read_matrix, path, cache=False)
    assert "row 2, column 1" in message and "more characters" in message and len(message) < 300


def test_big_file_prints_progress_on_stderr(tmp_path, monkeypatch, capsys):
    from paeff_np.data import csv as csv_module
    matrix = features(300, 4)
    path = write_csv(tmp_path / "big.csv", matrix.tolist())
    monkeypatch.setattr(csv_module, "PROGRESS_MIN_BYTES", 100)
    monkeypatch.setattr(csv_module, "_PROGRESS_BLOCK_BYTES", 1000)
    monkeypatch.setattr(csv_module, "_PROGRESS_EVERY_S", 0.0)
    np.testing.assert_array_equal(read_matrix(path, cache=False), matrix)
    err = capsys.readouterr().err
    assert "rows read" in err and "MB/s" in err and "s left" in err and "300 rows read in" in err


def test_big_train_file_parsed_in_blocks_keeps_labels_and_errors(tmp_path, monkeypatch, capsys):
    from paeff_np.data import csv as csv_module
    monkeypatch.setattr(csv_module, "PROGRESS_MIN_BYTES", 100)
    monkeypatch.setattr(csv_module, "_PROGRESS_BLOCK_BYTES", 200)
    labels = [f"id{i % 3}" for i in range(50)]
    train = read_train(*write_train(tmp_path, features(50, 3), features(50, 2), labels), cache=False)
    np.testing.assert_array_equal(train.face, features(50, 3))
    assert train.label_values[train.labels].tolist() == labels
    path = tmp_path / "m.csv"
    path.write_text("1.5,2.5\n" * 40 + "1.5,oops\n")
    assert "row 41, column 2: 'oops' is not a number" in data_error(read_matrix, path, cache=False)


def test_small_file_reads_quietly(tmp_path, capsys):
    read_matrix(write_csv(tmp_path / "m.csv", features(3, 2).tolist()), cache=False)
    assert capsys.readouterr().err == ""


def test_edit_keeping_size_and_mtime_invalidates_the_cache(tmp_path):
    """cp -p / touch -r: same size, same mtime, new content."""
    path = tmp_path / "m.csv"
    path.write_text("1.5,2.5\n")
    np.testing.assert_array_equal(read_matrix(path), [[1.5, 2.5]])
    status = path.stat()

    path.write_text("3.5,4.5\n")
    os.utime(path, ns=(status.st_atime_ns, status.st_mtime_ns))
    assert path.stat().st_mtime_ns == status.st_mtime_ns and path.stat().st_size == status.st_size
    np.testing.assert_array_equal(read_matrix(path), [[3.5, 4.5]])


def test_cache_stamp_hashes_both_ends_of_the_file(tmp_path, monkeypatch):
    """Equal size, times and inode (as a tool could forge): the hashed end blocks still differ."""
    from paeff_np.data import csv as csv_module
    monkeypatch.setattr(csv_module, "_FINGERPRINT_BYTES", 8)
    path = tmp_path / "m.csv"
    path.write_text("1.5,2.5\n" * 3 + "9.5,9.5\n")
    status = path.stat()
    stamp = csv_module._stamp(path, status, "matrix")
    path.write_text("1.5,2.5\n" * 3 + "8.5,9.5\n")
    assert csv_module._stamp(path, status, "matrix") != stamp


def test_spaces_after_commas_and_odd_labels_are_still_plain_csv(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("1.5,  2.5\n3.5,\t4.5\n")
    np.testing.assert_array_equal(read_matrix(path, cache=False), [[1.5, 2.5], [3.5, 4.5]])
    face, voice = write_train(tmp_path, features(2, 2), features(2, 2), ["id;1", "id 2"])
    assert read_train(face, voice, cache=False).label_values.tolist() == ["id 2", "id;1"]


def test_semicolon_separated_train_file_is_named(tmp_path):
    face, voice = write_train(tmp_path, features(2, 3), features(2, 2), ["a", "b"])
    face.write_text(face.read_text().replace(",", ";"))
    assert "faceTrain.csv: values are separated by ';', expected commas" in data_error(read_train, face, voice, cache=False)


# --- a damaged cache is rebuilt, not trusted ------------------------------------


def cached_array_path(path, suffix=".npy"):
    return path.parent / CACHE_DIR_NAME / f"{path.name}{suffix}"


def damage_cached_array(path, change, suffix=".npy"):
    """Replace the cached array of path by change(array), keeping its stamp (np.load, modify, np.save)."""
    array_path = cached_array_path(path, suffix)
    array = np.array(np.load(array_path))
    array_path.unlink()  # np.save to a fresh file, as a user would
    np.save(array_path, change(array))


def assert_rebuilt_once(path, read, expected, capsys, monkeypatch):
    """read() gives the CSV's values with a one-line note naming the file; the next read uses the new cache."""
    capsys.readouterr()
    np.testing.assert_array_equal(read(), expected)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{path}: cache {path.name}" in err and "rebuilding it from the CSV" in err
    forbid_parsing(monkeypatch)
    np.testing.assert_array_equal(read(), expected)
    assert capsys.readouterr().err == ""
    return err


def test_emptied_cache_file_is_rebuilt(tmp_path, capsys, monkeypatch):
    face, voice = features(4, 7), features(4, 3)
    face_path, voice_path = write_train(tmp_path, face, voice, ["b", "a", "b", "c"])
    read_train(face_path, voice_path)
    cached_array_path(face_path).write_bytes(b"")  # : > faceTrain.csv.npy
    err = assert_rebuilt_once(face_path, lambda: read_train(face_path, voice_path).face, face, capsys, monkeypatch)
    assert "cannot be loaded" in err


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf, 1e20])
def test_non_finite_value_in_cached_features_is_rebuilt(tmp_path, capsys, monkeypatch, value):
    face, voice = features(4, 7), features(4, 3)
    face_path, voice_path = write_train(tmp_path, face, voice, ["b", "a", "b", "c"])
    read_train(face_path, voice_path)

    def poison(array):
        array[2, 5] = value
        return array

    damage_cached_array(face_path, poison)
    err = assert_rebuilt_once(face_path, lambda: read_train(face_path, voice_path).face, face, capsys, monkeypatch)
    assert f"row 3, column 6 is {value:g}" in err


def test_inf_in_a_cached_test_list_is_rebuilt(tmp_path, capsys, monkeypatch):
    matrix = features(4, 3)
    face_path, voice_path = write_test_pair(tmp_path, "unseenunheard", "random", matrix, matrix)
    read_test_list(face_path, voice_path)

    def poison(array):
        array[1, 0] = np.inf
        return array

    damage_cached_array(voice_path, poison)
    assert_rebuilt_once(voice_path, lambda: read_test_list(face_path, voice_path).voice, matrix, capsys, monkeypatch)


def test_cached_features_cut_to_fewer_columns_are_rebuilt(tmp_path, capsys, monkeypatch):
    face, voice = features(4, 16), features(4, 3)
    face_path, voice_path = write_train(tmp_path, face, voice, ["b", "a", "b", "c"])
    read_train(face_path, voice_path)
    damage_cached_array(face_path, lambda array: np.ascontiguousarray(array[:, :5]))
    err = assert_rebuilt_once(face_path, lambda: read_train(face_path, voice_path).face, face, capsys, monkeypatch)
    assert "(4, 5)" in err and "(4, 16)" in err


@pytest.mark.parametrize("change", [lambda a: a.astype(np.float64), lambda a: a[:3], lambda a: a.reshape(2, -1)],
                         ids=["dtype", "rows", "reshaped"])
def test_cached_matrix_of_another_shape_or_dtype_is_rebuilt(tmp_path, capsys, monkeypatch, change):
    matrix = features(4, 6)
    path = write_csv(tmp_path / "m.csv", matrix.tolist())
    read_matrix(path)
    damage_cached_array(path, change)
    assert_rebuilt_once(path, lambda: read_matrix(path), matrix, capsys, monkeypatch)


@pytest.mark.parametrize("change", [lambda a: np.where(np.arange(len(a)) == 1, "", a), lambda a: a[:3],
                                    lambda a: np.arange(len(a))], ids=["empty-label", "rows", "dtype"])
def test_damaged_cached_labels_are_rebuilt(tmp_path, capsys, monkeypatch, change):
    face, voice = features(4, 7), features(4, 3)
    face_path, voice_path = write_train(tmp_path, face, voice, ["b", "a", "b", "c"])
    expected = read_train(face_path, voice_path).labels
    damage_cached_array(face_path, change, ".labels.npy")
    assert_rebuilt_once(face_path, lambda: read_train(face_path, voice_path).labels, expected, capsys, monkeypatch)


def test_a_stale_or_missing_cache_is_rebuilt_quietly(tmp_path, capsys):
    import json
    path = write_csv(tmp_path / "m.csv", features(2, 3).tolist())
    read_matrix(path)
    stamp_path = cached_array_path(path, ".json")
    stamp = json.loads(stamp_path.read_text())
    assert stamp["arrays"] == {"features": {"shape": [2, 3], "dtype": "<f4"}}
    stamp["version"] = 2  # a cache written by an older version: a plain miss, no note
    stamp_path.write_text(json.dumps(stamp))
    np.testing.assert_array_equal(read_matrix(path), features(2, 3))
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("entry", [5, None, {"shape": 7, "dtype": []}, {"shape": [2, 3], "dtype": "<f8"}])
def test_a_stamp_whose_array_entry_is_damaged_is_rebuilt(tmp_path, capsys, monkeypatch, entry):
    import json
    path = write_csv(tmp_path / "m.csv", features(2, 3).tolist())
    read_matrix(path)
    stamp_path = cached_array_path(path, ".json")
    stamp = json.loads(stamp_path.read_text())
    stamp["arrays"]["features"] = entry
    stamp_path.write_text(json.dumps(stamp))
    assert_rebuilt_once(path, lambda: read_matrix(path), features(2, 3), capsys, monkeypatch)


def test_finite_check_finds_the_first_bad_cell_across_blocks(monkeypatch):
    from paeff_np.data import csv as csv_module
    monkeypatch.setattr(csv_module, "_FINITE_BLOCK_BYTES", 3 * 4 * 4)  # 3 rows of 4 float32 per block
    matrix = features(10, 4)
    assert csv_module._first_bad_value(matrix) is None
    matrix[7, 2], matrix[8, 0] = 2e12, np.nan
    row, column, value = csv_module._first_bad_value(matrix)
    assert (row, column, float(value)) == (7, 2, float(np.float32(2e12)))


# --- labels: empty cells, cells written as floats ------------------------------


def float_labels(labels):
    """Labels as np.savetxt writes them ("%f")."""
    return [f"{label:f}" for label in labels]


def test_float_labels_with_one_bad_cell_name_its_row(tmp_path):
    labels = [3, 1, 3, 2, 1, 2]
    face_labels = float_labels(labels)
    face_labels[4] = "abc"
    paths = write_train(tmp_path, features(6, 3), features(6, 2), face_labels, float_labels(labels))
    message = data_error(read_train, *paths, cache=False)
    assert message == (f"{paths[0]}: row 5 has label 'abc' but {paths[1]} row 5 has label '1.000000'")


def test_mismatch_shows_the_cells_as_written(tmp_path):
    paths = write_train(tmp_path, features(4, 3), features(4, 2), ["3.000000", "1.000000", "2.5", "1"],
                        ["3", "1", "2.50", "1"])
    message = data_error(read_train, *paths, cache=False)
    assert message == f"{paths[0]}: row 3 has label '2.5' but {paths[1]} row 3 has label '2.50'"


def test_integral_labels_agree_cell_by_cell(tmp_path):
    """"3.000000" is the label 3 even where the file also holds a text label."""
    paths = write_train(tmp_path, features(5, 3), features(5, 2), ["3.000000", "abc", "3", "4.0", "+4"],
                        ["3", "abc", "3.0", "4", "4.000000"])
    train = read_train(*paths, cache=False)
    assert train.label_values.tolist() == ["3", "4", "abc"]
    assert train.labels.tolist() == [0, 2, 0, 1, 1]


@pytest.mark.parametrize("cache", [False, True])
def test_empty_label_is_refused(tmp_path, cache):
    paths = write_train(tmp_path, features(6, 3), features(6, 2), ["a", "b", "a", "b", "", "a"])
    # as sed -i '5s/,[0-9]*$/,/' faceTrain.csv voiceTrain.csv leaves them
    assert paths[0].read_text().splitlines()[4].endswith(",")
    assert data_error(read_train, *paths, cache=cache) == f"{paths[0]}: row 5: empty label"
    assert not (tmp_path / CACHE_DIR_NAME / "faceTrain.csv.npy").exists()


def test_empty_label_of_one_file_only_is_refused(tmp_path):
    labels = float_labels([1, 2, 1, 2, 1, 2])
    voice_labels = list(labels)
    voice_labels[4] = "  "
    paths = write_train(tmp_path, features(6, 3), features(6, 2), labels, voice_labels)
    assert data_error(read_train, *paths, cache=False) == f"{paths[1]}: row 5: empty label"


def test_row_numbers_are_lines_of_the_file_when_it_has_blank_lines(tmp_path):
    face_path, voice_path = write_train(tmp_path, features(4, 3), features(4, 2), ["a", "b", "", "b"],
                                        ["a", "b", "a", "b"])
    lines = face_path.read_text().splitlines()
    face_path.write_text("\n".join(lines[:1] + [""] + lines[1:]) + "\n")  # np.loadtxt skips the empty line
    assert data_error(read_train, face_path, voice_path, cache=False) == f"{face_path}: row 4: empty label"


def test_non_utf8_bytes_past_the_sniffed_head_name_the_row(tmp_path, monkeypatch):
    import paeff_np.data.csv as csv_module
    monkeypatch.setattr(csv_module, "_SNIFF_BYTES", 16)        # the bad byte lies past the head
    rows = [",".join(["0.5"] * 3)] * 6
    (tmp_path / "late.csv").write_bytes(("\n".join(rows) + "\n").encode() + b"0.5,0.5,0\xe9\n")
    message = data_error(read_matrix, tmp_path / "late.csv", cache=False)
    assert "late.csv: row 7 is not UTF-8 text (its byte 10)" in message and "codec" not in message


def test_an_empty_first_label_is_named_as_a_possible_empty_label(tmp_path):
    face, voice = features(3, 2), features(3, 2, 100.0)
    face_path, voice_path = write_train(tmp_path, face, voice, ["1", "2", "1"])
    lines = face_path.read_text().splitlines()
    lines[0] = lines[0].rsplit(",", 1)[0] + ","                 # row 1: label emptied
    face_path.write_text("\n".join(lines) + "\n")
    message = data_error(read_train, face_path, voice_path, cache=False)
    assert "row 1 ends with a comma: an empty label, or a trailing comma on every row" in message
