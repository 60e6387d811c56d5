"""A synthetic, VoxCeleb-like face-voice world, for demos and tests without the real data.

What the world is
-----------------
* Identities with three demographic attributes: gender (2 values), nationality
  (8 values, unbalanced like VoxCeleb1, where most speakers are from the USA) and
  age group (4 values). `ATTRIBUTE_VALUES` names them.
* Each identity has a latent vector per modality. Both are built from the same
  attribute embeddings (one vector per attribute value) and the same *shared
  traits* (individual, drawn per identity), plus a *modality-specific* identity
  factor drawn independently for the face and for the voice. A face and a voice
  are therefore tied only through the attributes and the shared traits: the
  specific factors can be memorised for training identities (seen-heard is easier)
  but carry no information about the other modality of a new identity
  (unseen-unheard is harder, and cross-modal verification is imperfect).
* Several videos per identity (4 to 8 by default). Each video has its own nuisance
  offset, independent between the modalities (pose and lighting for the face,
  recording channel for the voice), over the latent dimensions and some extra
  nuisance dimensions; each frame or utterance adds its own jitter.
* Face features: 4096-d, `ReLU(A_f x + noise - threshold)` where `x` is the
  identity's face latent (padded with zeros on the nuisance dimensions) plus the
  video offset and the frame jitter, for a fixed random matrix `A_f`: non-negative,
  about half zeros, values of order 1, like VGGFace fc7 (post-ReLU). Voice
  features: 512-d, `A_v x + noise` scaled to unit length, like an utterance-level
  speaker embedding.
* Splits: the first identities are the training identities; their training
  videos give the training pairs (a face frame and an utterance of one video, in
  shuffled order). Seen-heard test lists use held-out videos of the training
  identities; unseen-unheard test lists use the remaining, disjoint identities.
* Test lists, keyed "<split>/<kind>" for every split of `SPLITS` and kind of
  `KINDS`: rows alternate positive (even row: face and voice of one identity) and
  negative (odd row: a probe identity against a different one). For G, N, A and
  GNA the negative identity shares the probe's gender, nationality, age group, or
  all three (`KIND_ATTRIBUTES`); probes are drawn among identities that have such
  a partner, and only when none has one does the negative fall back to the
  closest match (most of the named attributes shared). Which modality is the
  probe is random. `TestList.ids` holds the (face identity, voice identity) of
  every row.

Identity numbering: identity i (0-based) is labelled ``str(10001 + i)``, the style
of VoxCeleb1's ids. Training identities are 0..K-1, so the class index of a
training identity is its identity number, and seen-heard `ids` are class indices.
Attributes live outside `Dataset`: `make_world` returns a `SyntheticWorld` with the
dataset and an `attributes` table (identity x (gender, nationality, age group)).

What the world is not
---------------------
Not faces or voices, nor a model of VGGFace or of a speaker encoder: the features
are random projections of a low-dimensional Gaussian latent, so their statistics
(sparsity, scale, norm) only resemble the real ones. Attributes act additively and
identically on both modalities, and nothing but the stated factors links a face to
a voice. The knobs are calibrated so that PAEFF trained briefly on the default
world lands near the paper's ranges (see `make_world`); numbers measured here say
nothing about VoxCeleb.

Everything is generated in float32 from one `numpy.random.default_rng(seed)`:
the same arguments give the same arrays on one machine (the random draws are the
same everywhere; a float32 matrix product may differ in its last bit between BLAS
builds).
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..backend import physical_memory_bytes
from ..run.atomic import write_atomically
from .dataset import KINDS, SPLITS, Dataset, TestList, TrainSet, test_file_names, train_file_names

ATTRIBUTES = ("gender", "nationality", "age_group")
"""Columns of `SyntheticWorld.attributes`."""

ATTRIBUTE_VALUES = {
    "gender": ("female", "male"),
    "nationality": ("USA", "UK", "India", "Canada", "Australia", "Germany", "Ireland", "Norway"),
    "age_group": ("<30", "30-45", "45-60", ">60"),
}
"""Names of the values of each attribute; the table holds indices into these."""

ATTRIBUTE_PROBS = {
    "gender": (0.45, 0.55),
    "nationality": (0.50, 0.13, 0.09, 0.07, 0.06, 0.06, 0.05, 0.04),
    "age_group": (0.25, 0.35, 0.25, 0.15),
}
"""How often each attribute value is drawn for an identity."""

KIND_ATTRIBUTES = {"random": (), "G": (0,), "N": (1,), "A": (2,), "GNA": (0, 1, 2)}
"""Attribute columns a negative pair's two identities share, per test-list kind."""

LABEL_OFFSET = 10001
"""Identity i is labelled str(LABEL_OFFSET + i); equal widths keep text order = number order."""


@dataclass
class SyntheticWorld:
    """The generated dataset together with what `Dataset` cannot hold: who is who."""

    dataset: Dataset
    attributes: np.ndarray  # (n_identities, 3) int64: gender, nationality, age group indices
    train_identities: np.ndarray  # (K,) int64 identity numbers of the classes 0..K-1 (= arange(K))
    unseen_identities: np.ndarray  # (n_identities - K,) int64 identity numbers of the unseen split

    @property
    def n_identities(self):
        return len(self.attributes)

    def identity_labels(self):
        """(n_identities,) str: the label of every identity, as written to the CSV files."""
        return identity_labels(self.n_identities)


def identity_labels(n_identities):
    """The labels of identities 0..n_identities-1: "10001", "10002", ..."""
    return np.array([str(LABEL_OFFSET + i) for i in range(n_identities)])


def make_synthetic(n_identities=300, seed=0, face_dim=4096, voice_dim=512, **knobs):
    """Generate the synthetic world and return its `Dataset`.

    Arguments are those of `make_world`; use `make_world` to get the attributes too.
    """
    return make_world(n_identities, seed, face_dim, voice_dim, **knobs).dataset


def make_world(
    n_identities=300,
    seed=0,
    face_dim=4096,
    voice_dim=512,
    *,
    unseen_fraction=1 / 3,
    videos_per_identity=(4, 8),
    heldout_videos=1,
    pairs_per_video=12,
    test_rows=1000,
    latent_dim=32,
    nuisance_dim=16,
    attribute_scale=(0.6, 0.5, 0.5),
    shared_scale=1.0,
    specific_scale=0.9,
    video_scale=1.0,
    frame_scale=0.6,
    noise_scale=1.0,
    face_threshold=0.1,
):
    """Generate the synthetic world described in the module docstring.

    Sizes: `n_identities` in all, `round(n_identities * unseen_fraction)` of them
    unseen; each identity has a number of videos drawn uniformly from
    `videos_per_identity` (inclusive), of which `heldout_videos` per training
    identity are kept for the seen-heard lists; each training video gives
    `pairs_per_video` training pairs; every test list has `test_rows` rows (even).

    World knobs (standard deviations, in units of one latent dimension):
    `attribute_scale` per attribute (gender, nationality, age group),
    `shared_scale` for the traits shared by face and voice, `specific_scale` for
    the modality-specific identity factors, `video_scale` for the nuisance offset
    of each video, `frame_scale` for the jitter of each frame or utterance,
    `noise_scale` for the noise added to every feature (relative to the feature's
    signal). `face_threshold` shifts the faces' ReLU (in signal standard
    deviations): larger is sparser.

    The defaults (300 identities: 200 training, 100 unseen) give about 12,000
    training pairs and ten lists of 1,000 rows (about 0.4 GB of float32), in a few
    seconds. They were calibrated so that PAEFF (embed_dim 128, batch 256, AdamW
    lr 1e-3 with the cosine schedule, 15 epochs, reshuffled every epoch) reaches
    an exact EER of about 23-26 % unseen-unheard and 11-16 % seen-heard on the
    random lists (seeds 0-2), near the paper's 22.9 % and 14.3 %, with the
    demographic lists harder and GNA the hardest (about 38 % and 25 %).
    """
    n_identities = int(n_identities)
    n_unseen = int(round(n_identities * unseen_fraction))
    n_train = n_identities - n_unseen
    lo, hi = (int(v) for v in videos_per_identity)
    if n_train < 2 or n_unseen < 2:
        raise ValueError(f"need at least 2 training and 2 unseen identities, got {n_train} and {n_unseen} "
                         f"(n_identities={n_identities}, unseen_fraction={unseen_fraction})")
    if not 1 <= heldout_videos < lo <= hi:
        raise ValueError(f"need 1 <= heldout_videos < videos_per_identity[0] <= videos_per_identity[1], "
                         f"got {heldout_videos} and {videos_per_identity}")
    if test_rows < 2 or test_rows % 2:
        raise ValueError(f"test_rows must be a positive even number, got {test_rows}")
    if min(face_dim, voice_dim, latent_dim, nuisance_dim, pairs_per_video) < 1:
        raise ValueError("face_dim, voice_dim, latent_dim, nuisance_dim and pairs_per_video must be >= 1")
    needed, memory = world_bytes(n_identities, face_dim, voice_dim, unseen_fraction=unseen_fraction,
                                 videos_per_identity=(lo, hi), heldout_videos=heldout_videos,
                                 pairs_per_video=pairs_per_video, test_rows=test_rows), physical_memory_bytes()
    if memory is not None and needed > memory:
        raise ValueError(f"{n_identities:,} identities with lists of {test_rows:,} rows need about "
                         f"{needed / 2**30:,.1f} GiB while generated, more than this machine's "
                         f"{memory / 2**30:,.1f} GiB: choose fewer identities or test rows")

    # The four phases draw from one generator, in this order: the order is part of the world.
    rng = np.random.default_rng(seed)
    attributes, latents = _draw_identities(rng, n_identities, latent_dim, attribute_scale, shared_scale, specific_scale)
    videos = _draw_videos(rng, n_identities, (lo, hi), heldout_videos, latent_dim + nuisance_dim, video_scale)
    sensor = _Sensor.draw(rng, latents, videos.offsets, face_dim, voice_dim, attribute_scale, shared_scale,
                          specific_scale, video_scale, frame_scale, noise_scale, face_threshold)
    is_train_identity = np.arange(n_identities) < n_train
    train = _train_pairs(rng, sensor, videos, is_train_identity, pairs_per_video)
    tests = _test_lists(rng, sensor, videos, attributes, is_train_identity, test_rows)
    return SyntheticWorld(
        dataset=Dataset(train=train, tests=tests),
        attributes=attributes,
        train_identities=np.arange(n_train, dtype=np.int64),
        unseen_identities=np.arange(n_train, n_identities, dtype=np.int64),
    )


def world_bytes(n_identities, face_dim=4096, voice_dim=512, *, unseen_fraction=1 / 3, videos_per_identity=(4, 8),
                heldout_videos=1, pairs_per_video=12, test_rows=1000):
    """An upper bound of the bytes `make_world` holds at its peak: the float32 features of
    the training pairs and of the ten test lists, plus the larger of a feature block's two
    temporaries (its projection and noise) and the (P, P) attribute matches of a list's
    pool (`_pair_identities`: a bool per shared attribute and an int64 count per pair,
    then up to P int64 partners per probe)."""
    n_unseen = int(round(n_identities * unseen_fraction))
    n_train = n_identities - n_unseen
    train_rows = n_train * (videos_per_identity[1] - heldout_videos) * pairs_per_video
    test_lists = len(SPLITS) * len(KINDS)
    width = face_dim + voice_dim
    kept = 4 * width * (train_rows + test_lists * test_rows)
    block = 2 * 4 * max(face_dim, voice_dim) * max(train_rows, test_rows)
    pool = max(n_train, n_unseen)
    return kept + max(block, (3 + 8 + 8) * pool * pool)


def csv_bytes(dataset):
    """About the bytes `save_dir` writes for `dataset`: at most 16 characters per value
    (``%.9g`` and a comma), and a label per training row."""
    rows = [(len(dataset.train), dataset.train.face_dim + dataset.train.voice_dim)] if dataset.train else []
    rows += [(len(test), test.face.shape[1] + test.voice.shape[1]) for test in dataset.tests.values()]
    return sum(16 * n * width for n, width in rows)


def _draw_identities(rng, n_identities, latent_dim, attribute_scale, shared_scale, specific_scale):
    """Phase 1. (attributes (n, 3) int64, {"face", "voice"}: latents (n, latent_dim) float32).

    latent_m = sum_a attribute_scale[a] * table_a[value_a] + shared_scale * shared + specific_scale * specific_m
    """
    attributes = np.stack(
        [rng.choice(len(ATTRIBUTE_PROBS[name]), size=n_identities, p=ATTRIBUTE_PROBS[name]) for name in ATTRIBUTES],
        axis=1,
    ).astype(np.int64)
    attribute_part = np.zeros((n_identities, latent_dim), np.float32)
    for column, name in enumerate(ATTRIBUTES):
        table = rng.standard_normal((len(ATTRIBUTE_VALUES[name]), latent_dim), dtype=np.float32)
        attribute_part += np.float32(attribute_scale[column]) * table[attributes[:, column]]
    shared = rng.standard_normal((n_identities, latent_dim), dtype=np.float32)
    latents = {}
    for modality in ("face", "voice"):
        specific = rng.standard_normal((n_identities, latent_dim), dtype=np.float32)
        latents[modality] = attribute_part + np.float32(shared_scale) * shared + np.float32(specific_scale) * specific
    return attributes, latents


@dataclass
class _Videos:
    owner: np.ndarray  # (V,) int64 identity of each video
    heldout: np.ndarray  # (V,) bool: kept for the seen-heard lists
    offsets: dict  # modality -> (V, latent_dim + nuisance_dim) float32 nuisance offset


def _draw_videos(rng, n_identities, videos_per_identity, heldout_videos, in_dim, video_scale):
    """Phase 2. Each identity's videos, the first `heldout_videos` of each held out, and their offsets."""
    lo, hi = videos_per_identity
    n_videos = rng.integers(lo, hi + 1, size=n_identities)
    owner = np.repeat(np.arange(n_identities), n_videos)
    first_video = np.concatenate([[0], np.cumsum(n_videos)[:-1]])
    rank = np.arange(len(owner)) - first_video[owner]
    heldout = rank < heldout_videos  # which videos are chosen is random anyway: offsets are i.i.d.
    offsets = {m: np.float32(video_scale) * rng.standard_normal((len(owner), in_dim), dtype=np.float32)
               for m in ("face", "voice")}
    return _Videos(owner=owner, heldout=heldout, offsets=offsets)


@dataclass
class _Sensor:
    """Phase 3: the fixed feature maps, and `features`, which films and records the world."""

    latents: dict  # modality -> (n_identities, latent_dim) float32
    offsets: dict  # modality -> (V, in_dim) float32
    maps: dict  # modality -> (in_dim, feature_dim) float32
    signal_std: np.float32  # expected standard deviation of a feature's signal
    frame_scale: float
    noise_scale: float
    face_threshold: float

    @classmethod
    def draw(cls, rng, latents, offsets, face_dim, voice_dim, attribute_scale, shared_scale, specific_scale,
             video_scale, frame_scale, noise_scale, face_threshold):
        latent_dim = next(iter(latents.values())).shape[1]
        in_dim = next(iter(offsets.values())).shape[1]
        maps = {
            "face": rng.standard_normal((in_dim, face_dim), dtype=np.float32) / np.float32(np.sqrt(in_dim)),
            "voice": rng.standard_normal((in_dim, voice_dim), dtype=np.float32) / np.float32(np.sqrt(in_dim)),
        }
        # Variance of one latent coordinate summed over its parts, and of one nuisance coordinate:
        # signal_std^2 = (latent_dim * latent_var) / in_dim + nuisance_var.
        attr_var = sum(
            float(s) ** 2 * (1.0 - float(np.sum(np.square(ATTRIBUTE_PROBS[name]))))
            for s, name in zip(attribute_scale, ATTRIBUTES)
        )
        latent_var = attr_var + shared_scale**2 + specific_scale**2
        nuisance_var = video_scale**2 + frame_scale**2
        signal_std = np.float32(np.sqrt((latent_dim * latent_var) / in_dim + nuisance_var))
        return cls(latents, offsets, maps, signal_std, frame_scale, noise_scale, face_threshold)

    def features(self, rng, modality, identities, videos):
        """Fresh frames (faces) or utterances (voices) of the given identities and videos.

        x = offset[video] + [latent[identity], 0] + frame_scale * jitter;  y = x @ map + noise;
        face: ReLU(y - face_threshold * signal_std) / signal_std;  voice: y / ||y||.
        """
        n = len(identities)
        latent_dim = self.latents[modality].shape[1]
        inputs = self.offsets[modality][videos]  # a copy
        inputs[:, :latent_dim] += self.latents[modality][identities]
        inputs += np.float32(self.frame_scale) * rng.standard_normal((n, inputs.shape[1]), dtype=np.float32)
        out = inputs @ self.maps[modality]
        noise = rng.standard_normal(out.shape, dtype=np.float32)
        noise *= np.float32(self.noise_scale) * self.signal_std
        out += noise
        del noise
        if modality == "face":
            out -= np.float32(self.face_threshold) * self.signal_std
            np.maximum(out, np.float32(0.0), out=out)
            out /= self.signal_std  # features of order 1, like fc7 activations
        else:
            out /= np.linalg.norm(out, axis=1, keepdims=True)
        return out


def _train_pairs(rng, sensor, videos, is_train_identity, pairs_per_video):
    """Phase 4a. Training pairs: a frame and an utterance of one training video, in shuffled order."""
    train_videos = np.flatnonzero(is_train_identity[videos.owner] & ~videos.heldout)
    pair_videos = rng.permutation(np.repeat(train_videos, pairs_per_video))
    pair_identities = videos.owner[pair_videos]
    return TrainSet(
        face=sensor.features(rng, "face", pair_identities, pair_videos),
        voice=sensor.features(rng, "voice", pair_identities, pair_videos),
        labels=pair_identities.astype(np.int64),
        label_values=identity_labels(int(is_train_identity.sum())),
    )


def _test_lists(rng, sensor, videos, attributes, is_train_identity, test_rows):
    """Phase 4b. Every test list: seen-heard from held-out videos, unseen-unheard from unseen identities."""
    n_identities = len(is_train_identity)
    n_train = int(is_train_identity.sum())
    pools = {
        "seenheard": (np.arange(n_train), is_train_identity[videos.owner] & videos.heldout),
        "unseenunheard": (np.arange(n_train, n_identities), ~is_train_identity[videos.owner]),
    }
    tests = {}
    for split in SPLITS:
        pool, video_usable = pools[split]
        videos_of = {int(i): np.flatnonzero(video_usable & (videos.owner == i)) for i in pool}
        for kind in KINDS:
            ids = _pair_identities(rng, pool, attributes, KIND_ATTRIBUTES[kind], test_rows // 2)
            face_videos = np.array([rng.choice(videos_of[int(i)]) for i in ids[:, 0]])
            voice_videos = np.array([rng.choice(videos_of[int(i)]) for i in ids[:, 1]])
            tests[f"{split}/{kind}"] = TestList(
                face=sensor.features(rng, "face", ids[:, 0], face_videos),
                voice=sensor.features(rng, "voice", ids[:, 1], voice_videos),
                ids=ids,
            )
    return tests


def _pair_identities(rng, pool, attributes, shared_columns, n_pairs):
    """(2 n_pairs, 2) int64 (face identity, voice identity): even rows positive, odd rows negative.

    A negative pair joins a probe and a partner sharing the most of `shared_columns`
    (all of them whenever the probe has such a partner; probes are drawn among
    identities that have one, when any does). The probe is the face or the voice at random.
    """
    pool = np.asarray(pool)
    table = attributes[pool][:, list(shared_columns)]
    matches = (table[:, None, :] == table[None, :, :]).sum(axis=2)  # (P, P) shared attributes
    np.fill_diagonal(matches, -1)
    best = matches.max(axis=1)
    probes = np.flatnonzero(best == len(shared_columns))
    if probes.size == 0:  # nobody has a full match: take the closest matches of everyone
        probes = np.arange(len(pool))
    partners = [np.flatnonzero(row == top) for row, top in zip(matches, best)]

    ids = np.empty((2 * n_pairs, 2), np.int64)
    positive = rng.integers(len(pool), size=n_pairs)
    ids[0::2, 0] = ids[0::2, 1] = pool[positive]
    probe = rng.choice(probes, size=n_pairs)
    partner = np.array([rng.choice(partners[p]) for p in probe])
    swap = rng.random(n_pairs) < 0.5
    ids[1::2, 0] = pool[np.where(swap, partner, probe)]
    ids[1::2, 1] = pool[np.where(swap, probe, partner)]
    return ids


# ---------------------------------------------------------------------------
# Writing the FOP CSV layout


def save_dir(dataset, out_dir, *, report=None):
    """Write `dataset` as FOP CSV files in `out_dir` (created if missing); return the paths.

    faceTrain.csv / voiceTrain.csv: features then the label (`label_values` of the
    class, written as it is); test lists: features only. Values are written with 9
    significant digits, so float32 features read back exactly. Every file is written
    to a temporary file in `out_dir` and renamed into place. `report(path)` is called
    after each file. Nothing is overwritten: if any of the files exists already,
    FileExistsError names it before anything is written. A write that fails or is
    interrupted (Ctrl-C) removes the files this call wrote, and `out_dir` when it made
    it: nothing is left half-written, and the same call can run again.
    """
    out_dir = Path(out_dir)
    files = []  # (name, matrix, labels or None)
    if dataset.train is not None:
        train = dataset.train
        labels = np.asarray(train.label_values)[train.labels]
        face_name, voice_name = train_file_names()
        files += [(face_name, train.face, labels), (voice_name, train.voice, labels)]
    for key, test in dataset.tests.items():
        split, kind = key.split("/")
        face_name, voice_name = test_file_names(split, kind)
        files += [(face_name, test.face, None), (voice_name, test.voice, None)]
    for name, _, _ in files:
        if (out_dir / name).exists():
            raise FileExistsError(errno.EEXIST, "already exists", str(out_dir / name))

    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    try:
        for name, matrix, labels in files:
            written.append(out_dir / name)        # before the rename: a Ctrl-C just after it is undone too
            _write_csv(out_dir / name, matrix, labels)
            if report is not None:
                report(out_dir / name)
    except BaseException:
        for path in written:                       # none existed before this call (checked above)
            path.unlink(missing_ok=True)
        if created:
            try:
                out_dir.rmdir()
            except OSError:
                pass
        raise
    return written


def _write_csv(path, matrix, labels=None):
    """Write ``matrix`` (then a label column, if given) as a FOP CSV file, atomically."""
    features = np.asarray(matrix, dtype=np.float32)
    row_format = ",".join(["%.9g"] * features.shape[1])

    def write(stream):
        if labels is None:
            np.savetxt(stream, features, fmt=row_format, delimiter=",")
            return
        for start in range(0, len(features), 1024):
            block = features[start : start + 1024]
            text = [row_format % tuple(row) + "," + str(label)
                    for row, label in zip(block.tolist(), labels[start : start + 1024])]
            stream.write("\n".join(text) + "\n")

    write_atomically(path, write, mode="w")
