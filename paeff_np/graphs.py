"""CUDA graphs for the training step on CuPy: prepared, off by default (``train.py --cuda-graphs``).

On a GPU a step is launch-bound: each CuPy call costs host time, and the
matrix products need far less. A CUDA graph replays a whole recorded
sequence of kernels as one host call. CuPy refuses cuBLAS calls while a
stream is being captured (NotImplementedError; CuPy issue 6290), so the step
cannot be one graph. ``StepGraphs`` records it as a *tape*::

    graph 0, matmul, graph 1, matmul, ..., graph k

the elementwise segments between the matrix products as graphs, and the
products (``backend.matmul``, the library's only cuBLAS call) as eager calls
into the same output arrays. A replay walks the tape: host calls per step
fall to about twice the number of matrix products. (The step draws no random
numbers: on CuPy dropout hashes a step counter that lives on the device,
``backend.CounterDropout``, which the captured step advances.)

What a replay needs, and the caller must give (``Trainer`` does, behind
``--cuda-graphs``):

* **the same memory every time.** Every array the step reads must stay where
  it was recorded: the parameters, AdamW's moments, the BatchNorm buffers (the
  step writes their new values into them: ``[...] =``, not a new dict), the
  batch's inputs (copied into fixed buffers before each replay) and the
  step's scalars (the learning rate and AdamW's bias corrections, held in a
  device array uploaded before each replay). Everything the recording
  allocates comes from this object's own memory pool, which nothing else
  allocates from, so no other array can take that memory later.
* **order with the default stream.** The tape runs on its own non-blocking
  stream, which CUDA does not order with the default (legacy) stream that the
  rest of the library uses: the caller waits for the default stream's work
  before the first call (``Device().synchronize()``) and for this stream's
  before reading what the steps wrote (``synchronize()``; ``release()`` waits
  too).
* **no host work inside the step.** A replay runs no Python of the step:
  anything the step function does on the host (a counter, a Python float) is
  done once, at recording. The step makes no host sync (held by the tests at
  0 for every Config variant).
* **a fresh tape when a number baked into it changes**: the dropout key
  (``backend.CounterDropout``, a kernel argument) is one per epoch, so
  ``Trainer`` records once per epoch.

The first call runs eagerly (kernels compile then, not during capture), the
second records, the rest replay. The test double (tests/strict_xp.py)
simulates capture and replay on NumPy: a captured kernel does not run, its
new arrays read as garbage until the graph is launched, cuBLAS and cuRAND
raise. The tests hold a replayed run to the eager one bit for bit. No GPU has
run this yet: it stays off until measured there (README, section GPU).
"""
from . import backend


class StepGraphs:
    """``graphs(step)``: run ``step()`` (device work only) eagerly the first
    time, record it the second, replay the tape after (module docstring)."""

    def __init__(self, xp):
        self.xp = xp
        self.stream = xp.cuda.Stream(non_blocking=True)   # capture needs a non-blocking stream
        self.pool = xp.cuda.MemoryPool()                   # the recording's memory, its own
        self.calls = 0
        self.tape = None            # [callable, ...] once recorded
        self._recording = None

    def __call__(self, step):
        with self.stream:
            if self.tape is not None:
                for item in self.tape:
                    item()
            elif self.calls == 0:
                step()
            else:
                self._record(step)
        self.calls += 1

    def _record(self, step):
        self._recording = []
        with self.xp.cuda.using_allocator(self.pool.malloc):
            backend._recorders.append(self)
            self.stream.begin_capture()
            try:
                step()
            except BaseException:
                if self.stream.is_capturing():      # dropped: the stream must not stay capturing
                    try:
                        self.stream.end_capture()
                    except Exception:               # an invalidated capture (a sync) raises: the
                        pass                        # step's own error is the one to report
                self._recording = None
                raise
            finally:
                backend._recorders.pop()
            self._end_segment()
        self.tape, self._recording = self._recording, None

    def _end_segment(self):
        """End the capture under way, keep its graph on the tape and launch it."""
        graph = self.stream.end_capture()
        stream = self.stream
        self._recording.append(lambda: graph.launch(stream))
        graph.launch(stream)

    def cut(self, call):
        """``call(out=None)`` cannot be captured: launch what was captured so far,
        run ``call()`` eagerly, put ``call(out=result)`` on the tape, capture on."""
        self._end_segment()
        result = call()
        self._recording.append(lambda: call(out=result))
        self.stream.begin_capture()
        return result

    def synchronize(self):
        """Wait for the stream's work (the one sync a caller makes, e.g. per epoch)."""
        self.stream.synchronize()

    def release(self):
        """Wait for the stream's work, drop the tape and give the pool's memory back
        (after the wait: a replay still running may write it)."""
        self.stream.synchronize()
        self.tape = None
        self.pool.free_all_blocks()
