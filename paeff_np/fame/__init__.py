"""The FAME 2026 challenge (Face-voice Association in Multilingual Environments) on MAV-Celeb,
end to end: ``python -m paeff_np.fame`` (README "FAME 2026").

* ``protocol``  the files: feature layout (both naming schemes), trial lists, labels, score
                files, the submission zip, the EER table; plumbing, no math
* ``world``     a built-in MAV-Celeb-shaped world (two languages, a language-dependent voice
                shift, hidden labels) for ``--synthetic``
* ``__main__``  the command: one run folder per language through ``run.training.Trainer``
"""
