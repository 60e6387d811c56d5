"""Tests of the synthetic face-voice world (paeff_np.data.synth) and its command line."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from paeff_np.data import KINDS, SPLITS, Dataset, TestList, TrainSet
from paeff_np.data.dataset import test_file_names, train_file_names
from paeff_np.data.synth import (
    ATTRIBUTE_VALUES,
    ATTRIBUTES,
    KIND_ATTRIBUTES,
    _pair_identities,
    identity_labels,
    make_synthetic,
    make_world,
    save_dir,
)

ROOT = Path(__file__).resolve().parents[1]

# A small world: fast, and still with every attribute combination the tests need.
SMALL = dict(face_dim=48, voice_dim=16, test_rows=200, latent_dim=8, nuisance_dim=4)


@pytest.fixture(scope="module")
def world():
    return make_world(60, seed=3, **SMALL)


def all_arrays(dataset):
    arrays = {"train/face": dataset.train.face, "train/voice": dataset.train.voice,
              "train/labels": dataset.train.labels}
    for key, test in dataset.tests.items():
        arrays.update({f"{key}/face": test.face, f"{key}/voice": test.voice, f"{key}/ids": test.ids})
    return arrays


def test_same_seed_gives_same_arrays_and_another_seed_does_not(world):
    again = all_arrays(make_world(60, seed=3, **SMALL).dataset)
    first = all_arrays(world.dataset)
    assert again.keys() == first.keys()
    for key in first:
        np.testing.assert_array_equal(again[key], first[key], err_msg=key)
    np.testing.assert_array_equal(make_world(60, seed=3, **SMALL).attributes, world.attributes)

    other = make_world(60, seed=4, **SMALL).dataset
    assert not np.array_equal(other.tests["unseenunheard/random"].face[:5], first["unseenunheard/random/face"][:5])


def test_make_synthetic_returns_the_worlds_dataset(world):
    dataset = make_synthetic(60, seed=3, **SMALL)
    assert isinstance(dataset, Dataset)
    np.testing.assert_array_equal(dataset.train.voice, world.dataset.train.voice)


def test_shapes_dtypes_and_keys(world):
    dataset = world.dataset
    train = dataset.train
    assert isinstance(train, TrainSet)
    n = len(train)
    assert n > 0
    assert train.face.shape == (n, 48) and train.voice.shape == (n, 16)
    assert train.face.dtype == np.float32 and train.voice.dtype == np.float32
    assert train.labels.shape == (n,) and train.labels.dtype == np.int64
    assert sorted(dataset.tests) == sorted(f"{s}/{k}" for s in SPLITS for k in KINDS)
    for key, test in dataset.tests.items():
        assert isinstance(test, TestList), key
        assert test.face.shape == (200, 48) and test.voice.shape == (200, 16), key
        assert test.face.dtype == np.float32 and test.voice.dtype == np.float32, key
        assert test.ids.shape == (200, 2) and test.ids.dtype == np.int64, key
    assert world.attributes.shape == (60, len(ATTRIBUTES)) and world.attributes.dtype == np.int64
    for column, name in enumerate(ATTRIBUTES):
        assert 0 <= world.attributes[:, column].min() and world.attributes[:, column].max() < len(ATTRIBUTE_VALUES[name])


def test_default_feature_widths_are_those_of_the_paper():
    dataset = make_synthetic(8, seed=0, unseen_fraction=0.25, test_rows=4, latent_dim=4, nuisance_dim=2,
                             pairs_per_video=1)
    assert dataset.train.face_dim == 4096 and dataset.train.voice_dim == 512
    assert dataset.tests["seenheard/G"].face.shape[1] == 4096 and dataset.tests["seenheard/G"].voice.shape[1] == 512


def test_faces_are_non_negative_and_sparse_voices_unit_norm(world):
    lists = [world.dataset.train] + list(world.dataset.tests.values())
    faces = np.concatenate([x.face for x in lists])
    voices = np.concatenate([x.voice for x in lists])
    assert faces.min() >= 0.0
    zeros = np.mean(faces == 0)
    assert 0.2 < zeros < 0.8  # post-ReLU: many zeros, many positives
    np.testing.assert_allclose(np.linalg.norm(voices, axis=1), 1.0, rtol=0, atol=1e-5)
    assert np.isfinite(faces).all() and np.isfinite(voices).all()


def test_labels_are_class_indices_and_label_values_sort_in_class_order(world):
    train = world.dataset.train
    k = len(world.train_identities)
    assert train.n_classes == k == 40  # 60 identities, a third unseen
    assert np.array_equal(np.unique(train.labels), np.arange(k))  # every class has pairs
    assert train.label_values.tolist() == identity_labels(k).tolist()
    assert train.label_values.tolist() == sorted(train.label_values.tolist())  # CSV readers sort label text
    np.testing.assert_array_equal(world.train_identities, np.arange(k))


def test_test_lists_alternate_positive_and_negative_pairs(world):
    for key, test in world.dataset.tests.items():
        same_identity = test.ids[:, 0] == test.ids[:, 1]
        assert same_identity[0::2].all(), key
        assert not same_identity[1::2].any(), key
        np.testing.assert_array_equal(test.same, same_identity)


def test_seen_heard_uses_training_identities_and_unseen_unheard_the_others(world):
    train_ids = set(world.train_identities.tolist())
    unseen_ids = set(world.unseen_identities.tolist())
    assert not train_ids & unseen_ids and len(train_ids | unseen_ids) == world.n_identities
    assert not unseen_ids & set(world.dataset.train.labels.tolist())
    for kind in KINDS:
        assert set(world.dataset.tests[f"seenheard/{kind}"].ids.ravel().tolist()) <= train_ids, kind
        assert set(world.dataset.tests[f"unseenunheard/{kind}"].ids.ravel().tolist()) <= unseen_ids, kind
    # Lists of 100 positive pairs drawn among 20 or 40 identities use most of them.
    assert len(set(world.dataset.tests["unseenunheard/random"].ids.ravel().tolist())) > 15


def test_demographic_negatives_share_the_named_attributes(world):
    attributes = world.attributes
    for split, pool in (("seenheard", world.train_identities), ("unseenunheard", world.unseen_identities)):
        for kind in ("G", "N", "A", "GNA"):
            columns = list(KIND_ATTRIBUTES[kind])
            table = attributes[pool][:, columns]
            has_partner = ((table[:, None, :] == table[None, :, :]).all(axis=2).sum(axis=1) > 1).any()
            assert has_partner, f"{split}/{kind}: the fixture world should allow exact matches"
            ids = world.dataset.tests[f"{split}/{kind}"].ids[1::2]
            shared = attributes[ids[:, 0]][:, columns] == attributes[ids[:, 1]][:, columns]
            assert shared.all(), f"{split}/{kind}"
        # Random negatives are not matched: over 100 pairs some differ in gender.
        ids = world.dataset.tests[f"{split}/random"].ids[1::2]
        assert (attributes[ids[:, 0], 0] != attributes[ids[:, 1], 0]).any(), split


def test_negatives_fall_back_to_the_closest_match():
    # Nobody shares all three attributes with anybody. Closest matches: 0 and 1 share
    # gender and nationality; 2 and 3 share gender only; every other pair shares nothing.
    attributes = np.array([[0, 0, 0], [0, 0, 1], [1, 1, 2], [1, 2, 3]], dtype=np.int64)
    ids = _pair_identities(np.random.default_rng(0), np.arange(4), attributes, KIND_ATTRIBUTES["GNA"], 60)
    assert (ids[0::2, 0] == ids[0::2, 1]).all()
    negatives = {tuple(sorted(pair)) for pair in ids[1::2].tolist()}
    assert negatives == {(0, 1), (2, 3)}


def test_probes_are_drawn_among_identities_with_an_exact_match():
    # Only 0 and 1 share every attribute; 2 and 3 must never be a negative's probe.
    attributes = np.array([[0, 0, 0], [0, 0, 0], [0, 0, 1], [1, 1, 1]], dtype=np.int64)
    ids = _pair_identities(np.random.default_rng(1), np.arange(4), attributes, KIND_ATTRIBUTES["GNA"], 60)
    assert {tuple(pair) for pair in ids[1::2].tolist()} == {(0, 1), (1, 0)}
    # The positives cover the whole pool.
    assert set(ids[0::2, 0].tolist()) == {0, 1, 2, 3}


def test_too_few_identities_is_an_error():
    with pytest.raises(ValueError, match="at least 2"):
        make_world(3, **SMALL)
    with pytest.raises(ValueError, match="even"):
        make_world(20, **{**SMALL, "test_rows": 7})


# --- the command line -------------------------------------------------------------


def run_cli(*args):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "paeff_np.data", *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=60)


def test_cli_writes_csv_files_that_load_back_to_the_same_arrays(tmp_path):
    from paeff_np.data.csv import load_dir

    out = tmp_path / "world"
    result = run_cli("synth", "--out", str(out), "--seed", "5", "--identities", "9", "--test-rows", "6")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""

    expected_names = set(train_file_names())
    for split in SPLITS:
        for kind in KINDS:
            expected_names.update(test_file_names(split, kind))
    assert {p.name for p in out.iterdir()} == expected_names  # no temporary files left behind
    assert len(result.stdout.strip().splitlines()) == len(expected_names) + 1  # a line per file, a summary

    loaded = load_dir(out, cache=False)
    made = make_synthetic(9, seed=5, test_rows=6)
    np.testing.assert_array_equal(loaded.train.face, made.train.face)
    np.testing.assert_array_equal(loaded.train.voice, made.train.voice)
    np.testing.assert_array_equal(loaded.train.labels, made.train.labels)
    np.testing.assert_array_equal(loaded.train.label_values, made.train.label_values)
    assert sorted(loaded.tests) == sorted(made.tests)
    for key, test in made.tests.items():
        np.testing.assert_array_equal(loaded.tests[key].face, test.face, err_msg=key)
        np.testing.assert_array_equal(loaded.tests[key].voice, test.voice, err_msg=key)


def test_cli_unwritable_output_is_one_line_and_exit_2(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory\n")
    result = run_cli("synth", "--out", str(blocker / "sub"), "--identities", "9", "--test-rows", "2")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("python -m paeff_np.data synth: error:")
    assert str(blocker) in result.stderr


def test_cli_bad_arguments_exit_2(tmp_path):
    result = run_cli("synth", "--out", str(tmp_path), "--identities", "2")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "at least 2" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_cli_refuses_to_overwrite_an_existing_world(tmp_path):
    out = tmp_path / "world"
    assert run_cli("synth", "--out", str(out), "--identities", "9", "--test-rows", "2").returncode == 0
    (out / "faceTrain.csv").write_text("my own data\n")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    result = run_cli("synth", "--out", str(out), "--seed", "1", "--identities", "9", "--test-rows", "2")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "already exists" in result.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing was written


@pytest.mark.parametrize("flags", [["--identities", "100000000"], ["--test-rows", "2000000000"]])
def test_cli_refuses_absurd_sizes_in_one_line_before_generating(tmp_path, flags):
    result = run_cli("synth", "--out", str(tmp_path / "world"), *flags)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1 and "GiB while generated, more than this machine's" in result.stderr
    assert not (tmp_path / "world").exists()


def test_world_bytes_bounds_what_make_world_holds():
    """The estimate the refusal reads is an upper bound of the arrays the world keeps."""
    from paeff_np.data.synth import world_bytes
    made = make_synthetic(40, seed=0, face_dim=256, voice_dim=64, test_rows=200)
    kept = made.train.face.nbytes + made.train.voice.nbytes + sum(t.face.nbytes + t.voice.nbytes
                                                                   for t in made.tests.values())
    assert kept <= world_bytes(40, 256, 64, test_rows=200) <= 4 * kept


def test_ctrl_c_while_writing_leaves_nothing_and_a_rerun_proceeds(tmp_path):
    """SIGINT in the middle of the files (after the third, inside the fourth's write, or just
    after a rename): one line, exit 130, no file and no folder left; the same command again
    writes the whole world."""
    import signal
    import time
    out = tmp_path / "world"
    args = ["synth", "--out", str(out), "--identities", "30", "--test-rows", "400"]
    for after_lines in (1, 3, 6):
        env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
        proc = subprocess.Popen([sys.executable, "-m", "paeff_np.data", *args], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
        for _ in range(after_lines):
            assert proc.stdout.readline().startswith("wrote ")
        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=120)
        if proc.returncode == 0:                  # it finished first: nothing to undo
            shutil.rmtree(out)                    # (the next round needs the folder gone)
            continue
        assert proc.returncode == 130, err
        assert err.strip().count("\n") == 0 and "interrupted" in err and "Traceback" not in err, err
        assert not out.exists(), list(out.iterdir())
        time.sleep(0.1)
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    assert len(list(out.iterdir())) == 22


def test_save_dir_undoes_its_files_when_a_write_is_interrupted(tmp_path, monkeypatch):
    """Inside save_dir: a KeyboardInterrupt just after the fifth file's rename removes all
    five (none existed before), and the folder it made."""
    from paeff_np.data import synth
    real, calls = synth._write_csv, []

    def write(path, matrix, labels=None):
        real(path, matrix, labels)
        calls.append(path)
        if len(calls) == 5:
            raise KeyboardInterrupt
    monkeypatch.setattr(synth, "_write_csv", write)
    with pytest.raises(KeyboardInterrupt):
        save_dir(make_synthetic(9, seed=0, face_dim=8, voice_dim=4, test_rows=4), tmp_path / "w")
    assert not (tmp_path / "w").exists()
