"""A built-in MAV-Celeb-shaped world: ``python -m paeff_np.fame --synthetic``.

What the world is
-----------------
* ``n_train + n_test`` people, each recorded in both languages (``LANGUAGES``). The
  test people are disjoint from the training people, as in MAV-Celeb.
* Each person has a face latent and a language-free voice latent, tied through shared
  traits: ``face = s + specific * a``, ``voice = s + specific * b`` (``s, a, b`` standard
  normal, ``latent_dim`` wide).
* The **language-dependent shift**: speaking language ``l``, the voice latent becomes
  ``voice + shift * voice @ M_l + offset_l + accent * c_{p,l}``: a fixed linear distortion
  ``M_l`` and offset per language, and a per-person accent ``c_{p,l}``. A model trained on
  one language learns that language's distortion; on the other language the voice-face
  link it learned is bent, so the unheard conditions are harder than the heard ones.
* Each person has ``videos`` videos per language with a nuisance offset each; a frame or
  utterance adds jitter. Face features: ``ReLU(x A_f + noise - threshold)``, 4096-d,
  non-negative and sparse like VGGFace fc7; voice features: ``x A_v + noise`` scaled to
  unit length, 512-d, like an utterance-level embedding.
* Per language: ``utterances`` training pairs per training person (a frame and an utterance
  of one of its videos), identities labelled ``id0001``...; a test list of ``trials`` trials
  over the test people, each a face and a voice in that language, the same person with
  probability 1/2, in random order (not alternating). Trial ids are 8 random characters,
  as in the organisers' lists. The labels are hidden: the protocol holds none, and
  ``FameWorld.hidden_labels`` keeps them for scoring.

What it is not: MAV-Celeb. Its figures say how the protocol and the code behave, nothing
about the challenge. Everything is drawn from ``numpy.random.default_rng(seed)``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..data import TrainSet
from .protocol import Protocol, TrialList, conditions

LANGUAGES = ("English", "German")
ID_CHARACTERS = np.array(list("abcdefghijklmnopqrstuvwxyz0123456789"))


@dataclass
class FameWorld:
    """The protocol's data (no labels in it) and the hidden labels of each language's list."""

    protocol: Protocol
    hidden_labels: dict        # language -> bool per trial: True for the same person


def make_fame_world(seed=0, n_train=50, n_test=12, videos=4, utterances=40, trials=600,
                    face_dim=4096, voice_dim=512, latent_dim=8, nuisance_dim=8, specific=0.5,
                    shift=0.9, offset=0.6, accent=0.6, video_scale=0.5, jitter=0.4, noise=0.5,
                    face_threshold=0.1):
    """Generate the world of the module doc; returns a ``FameWorld``."""
    rng = np.random.default_rng(seed)
    people = n_train + n_test
    f32 = np.float32
    shared = rng.standard_normal((people, latent_dim), dtype=f32)
    face_latent = shared + f32(specific) * rng.standard_normal((people, latent_dim), dtype=f32)
    voice_latent = shared + f32(specific) * rng.standard_normal((people, latent_dim), dtype=f32)
    in_dim = latent_dim + nuisance_dim
    maps = {"face": rng.standard_normal((in_dim, face_dim), dtype=f32) / f32(np.sqrt(in_dim)),
            "voice": rng.standard_normal((in_dim, voice_dim), dtype=f32) / f32(np.sqrt(in_dim))}
    scale = f32(np.sqrt(1 + specific ** 2 + video_scale ** 2 + jitter ** 2))   # a latent coordinate's spread

    def record(modality, latent, who, video_offsets, video):
        """Frames or utterances of persons ``who`` in their videos ``video``."""
        x = video_offsets[who, video]                                   # (n, in_dim), a copy
        x[:, :latent_dim] += latent[who]
        x += f32(jitter) * rng.standard_normal(x.shape, dtype=f32)
        y = x @ maps[modality]
        y += f32(noise) * scale * rng.standard_normal(y.shape, dtype=f32)
        if modality == "face":
            return np.maximum(y - f32(face_threshold) * scale, f32(0)) / scale
        return y / np.linalg.norm(y, axis=1, keepdims=True)

    train, train_meta, tests, lists, hidden = {}, {}, {}, {}, {}
    for language in LANGUAGES:
        distortion = rng.standard_normal((latent_dim, latent_dim), dtype=f32) / f32(np.sqrt(latent_dim))
        spoken = (voice_latent + f32(shift) * voice_latent @ distortion
                  + f32(offset) * rng.standard_normal(latent_dim, dtype=f32)
                  + f32(accent) * rng.standard_normal((people, latent_dim), dtype=f32))
        offsets = {m: f32(video_scale) * rng.standard_normal((people, videos, in_dim), dtype=f32)
                   for m in ("face", "voice")}
        who = rng.permutation(np.repeat(np.arange(n_train), utterances))
        video = rng.integers(videos, size=len(who))
        train[language] = TrainSet(face=record("face", face_latent, who, offsets["face"], video),
                                   voice=record("voice", spoken, who, offsets["voice"], video),
                                   labels=who.astype(np.int64),
                                   label_values=np.array([f"id{i + 1:04d}" for i in range(n_train)]))
        train_meta[language] = {"source": "synthetic", "synthetic": {"seed": seed},
                                "train_sha256": train[language].fingerprint(),
                                "fame": {"version": "synthetic", "language": language}}
        face_who = n_train + rng.integers(n_test, size=trials)
        same = rng.random(trials) < 0.5
        other = n_train + (face_who - n_train + rng.integers(1, n_test, size=trials)) % n_test
        voice_who = np.where(same, face_who, other)
        tests[language] = (record("face", face_latent, face_who, offsets["face"], rng.integers(videos, size=trials)),
                           record("voice", spoken, voice_who, offsets["voice"], rng.integers(videos, size=trials)))
        lists[language] = TrialList(language, f"<synthetic {language}_test.txt>", _trial_ids(rng, trials))
        hidden[language] = same
    features = {c.name: tests[c.test] for c in conditions(LANGUAGES)}
    protocol = Protocol("synthetic", LANGUAGES, train, train_meta, features, lists)
    return FameWorld(protocol, hidden)


def _trial_ids(rng, n):
    """``n`` distinct ids of 8 random letters and digits, like ``ysuvkz41``."""
    ids = []
    seen = set()
    while len(ids) < n:
        trial = "".join(rng.choice(ID_CHARACTERS, size=8))
        if trial not in seen:
            seen.add(trial)
            ids.append(trial)
    return ids
