"""Shared machinery of the tdxve fuzz harnesses (see README.md in this directory).

A harness is a function ``check_one(data: bytes) -> None`` that turns the
fuzzer's bytes into calls, runs them on **both** decoder backends (the
compiled core and the pure twin), and raises :class:`Finding` when

* the backends disagree (different results, or different exception classes),
* an exception that is not a :class:`tdxve.errors.TdxveError` escapes, or
* an invariant of :mod:`tdxve.invariants` breaks.

Anything else a harness sees (a ``DecodeError``, a ``GuestFault``...) is the
documented answer to a bad input and is fine.

:func:`main` gives every harness the same command line; the engines are
atheris (coverage-guided, if installed), hypothesis (the fallback) and a
seeded random/mutation engine (fast, deterministic; what the test suite uses).
This module imports nothing of tdxve at import time, so atheris can
instrument tdxve when the harness imports it.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import importlib
import json
import os
import random
import sys
import time
import types
from typing import Any, Callable, Iterator, Sequence

ENGINES = ("auto", "atheris", "hypothesis", "random")
BACKEND_MODULES = (("cython", "tdxve._core"), ("python", "tdxve._core_py"))


class Finding(Exception):
    """A real problem: backend disagreement, a non-tdxve exception, a broken invariant.

    Deliberately not a TdxveError: harnesses treat every TdxveError as a
    legitimate answer and everything else as a finding.
    """


# ---------------------------------------------------------------- backends
def load_backends(names: Sequence[str] | None = None) -> list[tuple[str, types.ModuleType]]:
    """``[(name, module)]`` of the decoder backends that import here.

    The compiled core is skipped (with a note on stderr) when it is not
    built; the pure twin always imports.
    """
    out = []
    for name, mod in BACKEND_MODULES:
        if names is not None and name not in names:
            continue
        try:
            out.append((name, importlib.import_module(mod)))
        except ImportError as exc:
            print(f"fuzzlib: backend {name} unavailable ({exc}); fuzzing without it", file=sys.stderr)
    if not out:
        raise SystemExit("fuzzlib: no decoder backend available")
    return out


_slots_cache: tuple[int, list[tuple[types.ModuleType, str]]] = (-1, [])


def _backend_slots() -> list[tuple[types.ModuleType, str]]:
    # (module, global name) of every loaded tdxve module global that holds a
    # decoder backend module; recomputed when modules were imported since.
    global _slots_cache
    if _slots_cache[0] == len(sys.modules):
        return _slots_cache[1]
    backends = [sys.modules[m] for _, m in BACKEND_MODULES if m in sys.modules]
    out = []
    for name, mod in list(sys.modules.items()):
        if mod is None or not (name == "tdxve" or name.startswith("tdxve.")) or mod in backends:
            continue
        for attr, value in list(vars(mod).items()):
            if any(value is b for b in backends):
                out.append((mod, attr))
    _slots_cache = (len(sys.modules), out)
    return out


@contextlib.contextmanager
def backend_bound(core: types.ModuleType) -> Iterator[None]:
    """Make every loaded ``tdxve`` module use decoder backend ``core`` for the duration.

    tdxve binds the backend once at import (``tdxve._backend``); the layers
    above the decoder (tdx, guest, machine, invariants, replay, ...) hold it
    in a module global. This swaps every such global (whatever its name)
    to ``core`` and restores it afterwards, so one process can run the whole
    #VE path on both backends. Not thread-safe (harnesses are single-threaded).
    """
    saved = [(mod, attr, getattr(mod, attr)) for mod, attr in _backend_slots()]
    for mod, attr, _ in saved:
        setattr(mod, attr, core)
    try:
        yield
    finally:
        for mod, attr, value in saved:
            setattr(mod, attr, value)


# ---------------------------------------------------------------- comparing
def normalise(value: Any) -> Any:
    """A comparable form of a result: arrays by dtype/shape/bytes, tuples with element types."""
    import numpy as np  # noqa: PLC0415

    if isinstance(value, np.ndarray):
        return ("array", value.dtype.descr, value.shape, value.tobytes())
    if isinstance(value, tuple):
        return (type(value).__name__, tuple((type(v).__name__, normalise(v)) for v in value))
    if isinstance(value, list):
        return ("list", tuple(normalise(v) for v in value))
    return value


def call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, ...]:
    """Run ``fn``; ``("ok", normalised result)`` or ``("raised", class, offset, value)``.

    :raises Finding: an exception that is not a TdxveError escaped, or an
        InvariantViolation was raised.
    """
    from tdxve.errors import InvariantViolation, TdxveError  # noqa: PLC0415

    try:
        result = fn(*args, **kwargs)
    except InvariantViolation as exc:
        raise Finding(f"invariant broken in {getattr(fn, '__qualname__', fn)}: {exc}") from exc
    except TdxveError as exc:
        return ("raised", type(exc), getattr(exc, "offset", None), getattr(exc, "value", None))
    except Exception as exc:  # noqa: BLE001 - exactly what a finding is
        raise Finding(f"{type(exc).__name__} escaped from {getattr(fn, '__qualname__', fn)}: "
                      f"{exc!r}") from exc
    return ("ok", normalise(result))


def agree(what: str, results: Sequence[tuple[str, Any]]) -> None:
    """All ``(backend, outcome)`` pairs have the same outcome, or raise :class:`Finding`."""
    first_name, first = results[0]
    for name, other in results[1:]:
        if other != first:
            raise Finding(f"backends disagree on {what}: {first_name} -> {_short(first)}, "
                          f"{name} -> {_short(other)}")


def harness(fn: Callable[[bytes], None]) -> Callable[[bytes], None]:
    """Decorator for ``check_one``: any exception other than :class:`Finding`
    (an InvariantViolation from a check, a bug in the harness) becomes one."""
    import functools  # noqa: PLC0415

    @functools.wraps(fn)
    def wrapped(data: bytes) -> None:
        try:
            fn(data)
        except Finding:
            raise
        except Exception as exc:  # noqa: BLE001
            raise Finding(f"{type(exc).__name__}: {exc}") from exc
    return wrapped


def _short(x: Any) -> str:
    s = repr(x)
    return s if len(s) < 400 else s[:400] + "..."


# ---------------------------------------------------------------- reading fuzzer bytes
class Reader:
    """Consumes the fuzzer's bytes (like atheris' FuzzedDataProvider, but the
    same for every engine). Past the end every read returns zeros."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        b = self.data[self.pos:self.pos + n]
        self.pos += len(b)
        return b

    def uint(self, nbytes: int) -> int:
        return int.from_bytes(self.take(nbytes).ljust(nbytes, b"\0"), "little")

    def u8(self) -> int:
        return self.uint(1)

    def u16(self) -> int:
        return self.uint(2)

    def u32(self) -> int:
        return self.uint(4)

    def u64(self) -> int:
        return self.uint(8)

    def flag(self) -> bool:
        return bool(self.u8() & 1)

    def pick(self, seq: Sequence[Any]) -> Any:
        return seq[self.u8() % len(seq)]

    def chance(self, num: int, den: int) -> bool:
        return self.u8() % den < num

    def rest(self) -> bytes:
        b = self.data[self.pos:]
        self.pos = len(self.data)
        return b

    @property
    def left(self) -> int:
        return len(self.data) - self.pos

    def interesting_u64(self) -> int:
        """A 64-bit value biased to the edges (0, all-ones, width boundaries, random)."""
        sel = self.u8() % 8
        if sel == 0:
            return 0
        if sel == 1:
            return (1 << 64) - 1
        if sel == 2:
            return (1 << (self.u8() % 64))
        if sel == 3:
            return (1 << (8 * (1 + self.u8() % 8))) - 1 if self.u8() & 1 else 1 << (8 * (1 + self.u8() % 7))
        return self.u64()


# ---------------------------------------------------------------- engines
class Stats:
    def __init__(self) -> None:
        self.executions = 0
        self.started = time.perf_counter()
        self.findings = 0

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.started


def _save_artifact(data: bytes, directory: str, name: str) -> str:
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"crash-{name}-{hashlib.sha1(data).hexdigest()[:16]}")
    with open(path, "wb") as f:
        f.write(data)
    return path


def _mutate(rng: random.Random, data: bytes, pool: Sequence[bytes], max_len: int) -> bytes:
    b = bytearray(data)
    for _ in range(1 + rng.randrange(4)):
        op = rng.randrange(7)
        if op == 0 and b:                                   # flip a bit
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
        elif op == 1 and b:                                 # random byte
            b[rng.randrange(len(b))] = rng.randrange(256)
        elif op == 2:                                       # insert bytes
            i = rng.randrange(len(b) + 1)
            b[i:i] = bytes(rng.randrange(256) for _ in range(1 + rng.randrange(4)))
        elif op == 3 and b:                                 # delete a run
            i = rng.randrange(len(b))
            del b[i:i + 1 + rng.randrange(4)]
        elif op == 4 and pool:                              # splice another input in
            other = pool[rng.randrange(len(pool))]
            if other:
                i = rng.randrange(len(other))
                j = rng.randrange(len(b) + 1)
                b[j:j] = other[i:i + 1 + rng.randrange(16)]
        elif op == 5 and b:                                 # interesting byte
            b[rng.randrange(len(b))] = rng.choice((0, 0xFF, 0x7F, 0x80, 0x66, 0x67, 0xF3, 0xF0,
                                                   0xEC, 0xED, 0xEE, 0xEF, 0x6C, 0x6F, 0x48))
        else:                                               # duplicate a run
            if b:
                i = rng.randrange(len(b))
                b[i:i] = b[i:i + 1 + rng.randrange(8)]
    return bytes(b[:max_len])


def run_random(check_one: Callable[[bytes], None], *, seconds: float, runs: int | None, seed: int,
               max_len: int, seeds: Sequence[bytes], artifacts: str | None, name: str,
               progress: bool = False) -> Stats:
    """The seeded random/mutation engine: fresh random inputs and mutations of
    the seeds and of recent inputs (no coverage feedback), until ``seconds``
    elapse or ``runs`` inputs ran. Deterministic for a seed and a run count.

    :raises Finding: the first finding (its input is saved under ``artifacts``).
    """
    rng = random.Random(seed)
    stats = Stats()
    pool: list[bytes] = [s[:max_len] for s in seeds] or [b""]
    recent: list[bytes] = []
    deadline = stats.started + seconds
    next_report = stats.started + 10
    i = 0
    while (runs is None or i < runs) and (i % 64 or time.perf_counter() < deadline):
        if i < len(pool):
            data = pool[i]
        else:
            sel = rng.randrange(4)
            if sel == 0:
                data = bytes(rng.getrandbits(8) for _ in range(rng.randrange(max_len + 1)))
            else:
                src = pool if sel == 1 or not recent else recent
                data = _mutate(rng, src[rng.randrange(len(src))], pool, max_len)
        try:
            check_one(data)
        except Finding:
            stats.findings += 1
            if artifacts is not None:
                path = _save_artifact(data, artifacts, name)
                print(f"fuzzlib: finding; input saved to {path}", file=sys.stderr)
            raise
        i += 1
        stats.executions = i
        if len(recent) < 256:
            recent.append(data)
        else:
            recent[rng.randrange(256)] = data
        if progress and time.perf_counter() > next_report:
            next_report += 10
            print(f"#{i} {i / stats.seconds:.0f} exec/s", file=sys.stderr, flush=True)
    return stats


def run_hypothesis(check_one: Callable[[bytes], None], *, seconds: float, runs: int | None, seed: int,
                   max_len: int, seeds: Sequence[bytes], name: str) -> Stats:
    """Hypothesis as the engine (the fallback when atheris is not installed):
    ``binary(max_size=max_len)`` examples in batches until the budget is spent.
    Hypothesis shrinks a finding before it is reported."""
    from hypothesis import HealthCheck, Phase, given, settings  # noqa: PLC0415
    from hypothesis import seed as hseed  # noqa: PLC0415
    from hypothesis import strategies as st  # noqa: PLC0415

    stats = Stats()
    for s in seeds:
        check_one(s[:max_len])
        stats.executions += 1
    counter = [0]
    batch = 2000 if runs is None else max(1, min(2000, runs))

    def body(data: bytes) -> None:
        counter[0] += 1
        check_one(data)

    k = 0
    while time.perf_counter() < stats.started + seconds and (runs is None or stats.executions < runs):
        n = batch if runs is None else max(1, min(batch, runs - stats.executions))
        test = settings(max_examples=n, deadline=None, database=None, derandomize=False,
                        phases=(Phase.generate, Phase.shrink),
                        suppress_health_check=list(HealthCheck))(
            given(st.binary(max_size=max_len))(body))
        test = hseed(seed * 1_000_003 + k)(test)
        k += 1
        counter[0] = 0
        test()
        stats.executions += counter[0]
    return stats


def _instrument_tdxve(atheris: Any) -> None:
    # Coverage for tdxve's Python code (and the harness's): instrument the
    # functions already loaded, as atheris.instrument_all does, but only ours.
    for obj in gc.get_objects():
        if isinstance(obj, types.FunctionType):
            mod = getattr(obj, "__module__", "") or ""
            if mod == "tdxve" or mod.startswith("tdxve.") or mod.startswith("fuzz_") or mod == "fuzzlib":
                try:
                    atheris.instrument_func(obj)
                except Exception:  # noqa: BLE001 - best effort, as instrument_all
                    pass


def run_atheris(check_one: Callable[[bytes], None], *, seconds: float, runs: int | None, seed: int,
                max_len: int, corpus: Sequence[str], seeds: Sequence[bytes], artifacts: str | None,
                name: str, extra: Sequence[str]) -> None:
    """libFuzzer through atheris; does not return (libFuzzer exits the process
    and prints ``Done N runs in S second(s)``)."""
    import atheris  # noqa: PLC0415

    _instrument_tdxve(atheris)
    dirs = list(corpus)
    if seeds and not dirs:
        import tempfile  # noqa: PLC0415
        d = tempfile.mkdtemp(prefix=f"tdxve-fuzz-{name}-")
        for i, s in enumerate(seeds):
            with open(os.path.join(d, f"seed{i:03d}"), "wb") as f:
                f.write(s)
        dirs = [d]
    argv = [sys.argv[0], f"-max_total_time={max(1, int(seconds))}", f"-max_len={max_len}",
            f"-seed={seed or 1}", "-print_final_stats=1"]
    if runs is not None:
        argv.append(f"-runs={runs}")
    if artifacts is not None:
        os.makedirs(artifacts, exist_ok=True)
        argv.append(f"-artifact_prefix={os.path.join(artifacts, '')}")
    argv += list(extra) + dirs

    def target(data: bytes) -> None:
        check_one(data)

    atheris.Setup(argv, target)
    atheris.Fuzz()


def have_atheris() -> bool:
    try:
        import atheris  # noqa: F401, PLC0415
    except ImportError:
        return False
    return True


def main(check_one: Callable[[bytes], None], *, name: str, seeds: Sequence[bytes] = (),
         max_len: int = 256, argv: Sequence[str] | None = None) -> int:
    """Command line shared by every harness; returns the exit status (0: no finding)."""
    p = argparse.ArgumentParser(prog=f"fuzz_{name}.py", description=f"tdxve fuzz harness: {name}")
    p.add_argument("--seconds", type=float, default=60.0, help="time budget (default 60)")
    p.add_argument("--runs", type=int, default=None, help="stop after this many inputs")
    p.add_argument("--engine", choices=ENGINES, default="auto",
                   help="auto = atheris when installed, else hypothesis")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--max-len", type=int, default=max_len)
    p.add_argument("--artifacts", default="fuzz-artifacts",
                   help="directory for inputs that produced a finding")
    p.add_argument("--json", default=None, help="write the summary as JSON to this file")
    p.add_argument("corpus", nargs="*", help="corpus directories (atheris) or files to replay")
    args, extra = p.parse_known_args(argv)
    engine = args.engine
    if engine == "auto":
        engine = "atheris" if have_atheris() else "hypothesis"
    files = [c for c in args.corpus if os.path.isfile(c)]
    if files:
        # reproduce: run the given inputs once each
        for f in files:
            with open(f, "rb") as fh:
                check_one(fh.read())
            print(f"{f}: no finding")
        return 0
    print(f"fuzz_{name}: engine {engine}, budget {args.seconds:g} s"
          + (f", {args.runs} runs" if args.runs else ""), file=sys.stderr, flush=True)
    if engine == "atheris":
        run_atheris(check_one, seconds=args.seconds, runs=args.runs, seed=args.seed,
                    max_len=args.max_len, corpus=args.corpus, seeds=seeds,
                    artifacts=args.artifacts, name=name, extra=extra)
        return 0    # pragma: no cover - libFuzzer exits the process
    try:
        if engine == "hypothesis":
            stats = run_hypothesis(check_one, seconds=args.seconds, runs=args.runs, seed=args.seed,
                                   max_len=args.max_len, seeds=seeds, name=name)
        else:
            stats = run_random(check_one, seconds=args.seconds, runs=args.runs, seed=args.seed,
                               max_len=args.max_len, seeds=seeds, artifacts=args.artifacts,
                               name=name, progress=True)
    except Finding as exc:
        print(f"FINDING: {exc}", file=sys.stderr)
        return 1
    summary = {"harness": name, "engine": engine, "executions_per_backend": stats.executions,
               "seconds": round(stats.seconds, 2), "findings": stats.findings,
               "exec_per_s": round(stats.executions / max(stats.seconds, 1e-9))}
    print(json.dumps(summary))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f)
    return 0
