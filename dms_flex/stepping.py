"""How the generation loop (dms_flex/generate.py) advances one token: the decode step, the sampled
next token, the stop flags and the caches' overflow flag, packed for one device-to-host copy.

- `Stepper`: the step function called from Python each step (eager, or a torch.compile'd step).
- `GraphedStepper` (CUDA): the same body - step, sampling, flags - captured once in one CUDA graph
  and replayed. The host then does one replay and one copy per token; nothing per layer and no
  per-call wrapper work (benchmarks/RESULTS.md, section 20: at small batch the compiled step's
  Python wrapper took longer than the step itself). The graph is kept on the state and reused by
  later calls with the same model, step, sampling and stop tokens.

Both keep the token being decoded in `token` (B, 1) and expose `flags()`: (2B + 1,) int64 =
[token, done, overflow], where done[r] says row r's tokens so far include a stop token.
"""

from __future__ import annotations

from typing import Callable, List, Optional

import torch

from .sampling import SamplingConfig, sample


# the loop launches the next step before reading this one's tokens (on CUDA always; on the CPU,
# where nothing runs asynchronously, only when a test asks for it to check the bookkeeping)
LOOKAHEAD_ON_CPU = False


class HostCopy:
    """The loop's one device-to-host transfer: on CUDA an asynchronous copy into pinned memory,
    waited for after the next step is launched (`overlaps`); elsewhere a plain copy."""

    def __init__(self, n: int, device):
        self.cuda = torch.device(device).type == "cuda"
        self.overlaps = self.cuda or LOOKAHEAD_ON_CPU
        if self.cuda:
            self.buf = torch.empty(n, dtype=torch.long, pin_memory=True)
            self.event = torch.cuda.Event()
        self.pending = None

    def start(self, values: torch.Tensor) -> None:
        if self.cuda:
            self.buf.copy_(values, non_blocking=True)
            self.event.record()
        else:
            self.pending = values

    def wait(self) -> List[int]:
        if self.cuda:
            self.event.synchronize()
            return self.buf.tolist()
        return self.pending.tolist()


def _hits(token: torch.Tensor, stop: torch.Tensor) -> torch.Tensor:
    """token (B, 1) in stop (S,) -> (B,) bool, with no host sync (capturable)."""
    return (token == stop[None, :]).any(-1)


class Stepper:
    def __init__(self, model, state, step_fn: Callable, sampling: SamplingConfig, generator, stop: torch.Tensor):
        self.model, self.state, self.step_fn = model, state, step_fn
        self.sampling, self.generator, self.stop = sampling, generator, stop

    def begin(self, token: torch.Tensor) -> None:
        """token (B, 1): the first token to decode (sampled from the prefill)."""
        self.token = token
        self.done = _hits(token, self.stop)

    def flags(self) -> torch.Tensor:
        overflow = self.state.overflow_flag().long().reshape(1)
        return torch.cat([self.token[:, 0], self.done.long(), overflow])

    def advance(self) -> None:
        """Decode `token` into the caches and sample the next one."""
        logits = self.step_fn(self.model, self.token, self.state)
        self.token = sample(logits, self.sampling, self.generator)
        self.done = self.done | _hits(self.token, self.stop)


class GraphedStepper(Stepper):
    """The Stepper's body in one CUDA graph. The first two steps run as they are (on a side stream:
    they compile and warm up the step, and they are real steps), the third is captured, then
    replayed from there on. step_fn must not itself use CUDA graphs (torch.compile's
    mode="reduce-overhead"): pass the eager step or a torch.compile'd one of the default mode."""

    WARMUP_STEPS = 2

    def __init__(self, model, state, step_fn, sampling, generator, stop):
        super().__init__(model, state, step_fn, sampling, generator, stop)
        B, dev = state.batch_size, state.next_pos.device
        self._token = torch.zeros(B, 1, dtype=torch.long, device=dev)  # static: read and written by the graph
        self._done = torch.zeros(B, dtype=torch.bool, device=dev)
        self._flags = torch.zeros(2 * B + 1, dtype=torch.long, device=dev)
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.warm = 0

    # token and done live in static buffers (the graph reads and writes them): Stepper's code assigns
    # them, these setters copy in place
    @property
    def token(self) -> torch.Tensor:
        return self._token

    @token.setter
    def token(self, value: torch.Tensor) -> None:
        self._token.copy_(value)

    @property
    def done(self) -> torch.Tensor:
        return self._done

    @done.setter
    def done(self, value: torch.Tensor) -> None:
        self._done.copy_(value)

    def begin(self, token: torch.Tensor) -> None:
        super().begin(token)
        self._flags.copy_(super().flags())

    def flags(self) -> torch.Tensor:
        return self._flags

    def _body(self) -> None:
        super().advance()
        self._flags.copy_(super().flags())

    def advance(self) -> None:
        if self.graph is not None:
            self.graph.replay()
            return
        if self.warm < self.WARMUP_STEPS:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self._body()
            torch.cuda.current_stream().wait_stream(side)
            self.warm += 1
            return
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):  # records without running: this step runs in the replay below
            self._body()
        self.graph = graph
        graph.replay()


def stepper_for(model, state, step_fn, sampling, generator, stop_tokens, cuda_graph: bool) -> Stepper:
    """A GraphedStepper (kept on the state for later calls) when cuda_graph and the state is on CUDA
    and sampling uses the default generator; a Stepper otherwise."""
    dev = state.next_pos.device
    stop = torch.tensor(list(stop_tokens) or [-1], device=dev)
    if not (cuda_graph and dev.type == "cuda" and generator is None):
        return Stepper(model, state, step_fn, sampling, generator, stop)
    key = (id(model), step_fn, sampling.temperature, sampling.top_k, sampling.top_p, tuple(stop.tolist()))
    kept = state.__dict__.setdefault("_graphed_steppers", {})
    # a graph replays on the buffers it captured: caches re-allocated since (capacity="auto") need new graphs
    layout = tuple((id(c), getattr(c, "resizes", 0), c.k.data_ptr(), c.capacity) for c in getattr(state, "caches", ()))
    if state.__dict__.get("_graphed_layout") != layout:
        kept.clear()
        state.__dict__["_graphed_layout"] = layout
    if key not in kept:
        while len(kept) >= MAX_GRAPHS_PER_STATE:  # the oldest configuration's graph (and memory) goes
            kept.pop(next(iter(kept)))
        kept[key] = GraphedStepper(model, state, step_fn, sampling, generator, stop)
    return kept[key]


MAX_GRAPHS_PER_STATE = 4
