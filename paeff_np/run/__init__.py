"""The run machinery, apart from the math: what turns the model into a training
run on disk and a table of results.

* ``training``    the epoch loop, validation, model selection, checkpoints, resume
* ``checkpoint``  save / load (.npz + config.json, allow_pickle=False)
* ``atomic``      every file written to a temporary, then renamed; the run lock
* ``evaluation``  embeddings in chunks, every protocol on every list
* ``cli``         what the command lines share: data loading, one-line errors
* ``validate``    the flags' domains, checked when they are parsed
* ``envinfo``     what a benchmark depends on

Nothing here is imported by ``paeff_np``'s math modules; import the module you need
(``from paeff_np.run import training``): this file imports nothing.
"""
