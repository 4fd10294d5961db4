"""Time Flower's own SecAgg+ on the sizes our secure-aggregation benchmark uses.

``benches.secagg`` reports what our masked round costs; this module gives it a reference point:
one round of Flower's SecAgg+ (``flwr.server.workflow.SecAggPlusWorkflow`` on the server,
``flwr.client.mod.secaggplus_mod`` on every client) summing ``silos`` random float32 vectors of
``params`` values, with Flower's own code doing all the protocol work.

How it is driven (no simulation engine, no Ray, one process):

* the server side is a real ``SecAggPlusWorkflow`` whose four stage methods (``setup_stage``,
  ``share_keys_stage``, ``collect_masked_vectors_stage``, ``unmask_stage``) are called in order,
  as ``SecAggPlusWorkflow.__call__`` does, with a ``LegacyContext`` holding a ``FedAvg`` strategy;
* the transport is a minimal in-process ``Grid``: every message and every reply is serialised to
  Flower's protobuf ``Message`` and back (``flwr.common.serde``), so byte counts are real, and each
  node's reply comes from ``secaggplus_mod`` wrapped around a trivial ``ClientApp`` function that
  returns the silo's vector as its fit result (the "training" is not timed as SecAgg+);
* clients run one after another, each with its own persistent ``Context``.

Time is split into client-side stage code (``secaggplus_mod`` minus the wrapped fit function),
server-side stage code (the workflow's stage methods minus messaging and minus the strategy's
``aggregate_fit``), and transport (serialisation in the in-process grid).  ``round_seconds`` is the
sum of the three, i.e. the wall time of the four stages less the fit function and the strategy.

Worth knowing when reading the figures: Flower derives every mask (private and pairwise) in
``flwr/common/secure_aggregation/secaggplus_utils.py::pseudo_rand_gen``, which XOR-folds the
32-byte seed or shared key into a 32-bit integer and draws the mask with
``numpy.random.RandomState(seed32).randint``; masks are int64 arrays modulo ``modulus_range``
(2**32 by default), so a masked upload is 8 bytes per parameter before framing.

Only numpy and flwr are needed; flwr is imported inside :func:`measure`, which never raises.
"""

from __future__ import annotations

import logging
import random
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["measure"]

# Flower's example app (examples/flower-secure-aggregation) uses num-shares = 3 and
# reconstruction-threshold = 2; SecAggPlusWorkflow itself has no default for either.
DEFAULT_NUM_SHARES: float = 3
DEFAULT_RECONSTRUCTION_THRESHOLD: float = 2


@dataclass
class _Clock:
    """Seconds accumulated per bucket, plus byte counters."""

    seconds: dict[str, float] = field(default_factory=dict)
    bytes: dict[str, int] = field(default_factory=dict)

    def add(self, key: str, value: float) -> None:
        self.seconds[key] = self.seconds.get(key, 0.0) + value

    def count(self, key: str, value: int) -> None:
        self.bytes[key] = self.bytes.get(key, 0) + value


def _unavailable(reason: str, version: str | None = None) -> dict[str, Any]:
    return {
        "available": False,
        "reason": reason,
        "flwr_version": version,
        "round_seconds": None,
        "client_seconds": None,
        "server_seconds": None,
        "bytes_per_parameter": None,
        "exact": None,
    }


def _one_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    return text if len(text) <= 300 else text[:297] + "..."


def _protobuf_note() -> str:
    """Why flwr may not share this environment: flwr 1.41 requires protobuf<7."""
    try:
        from importlib.metadata import version

        installed = version("protobuf")
    except Exception:  # noqa: BLE001 - best effort, only decorates a message
        return ""
    if int(installed.split(".")[0]) >= 7:
        return f"; flwr 1.41 requires protobuf<7 but this environment has protobuf {installed}"
    return ""


def _make_vectors(silos: int, params: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(params, dtype=np.float32) for _ in range(silos)]


def _build_client(fl: Any, nid: int, vector: np.ndarray, num_examples: int, clock: _Clock) -> Callable[[Any], Any]:
    """A node: ``secaggplus_mod`` around a fit function that returns ``vector``."""
    context = fl.Context(run_id=1, node_id=nid, node_config={}, state=fl.RecordDict(), run_config={})

    def fit(msg: Any, _ctx: Any) -> Any:
        start = time.perf_counter()
        res = fl.FitRes(
            status=fl.Status(code=fl.Code.OK, message=""),
            parameters=fl.ndarrays_to_parameters([vector]),
            num_examples=num_examples,
            metrics={},
        )
        reply = fl.Message(fl.compat.fitres_to_recorddict(res, keep_input=False), reply_to=msg)
        clock.add("client_fit", time.perf_counter() - start)
        return reply

    def handle(msg: Any) -> Any:
        start = time.perf_counter()
        fit_before = clock.seconds.get("client_fit", 0.0)
        reply = fl.secaggplus_mod(msg, context, fit)
        fit_spent = clock.seconds.get("client_fit", 0.0) - fit_before
        clock.add("client", time.perf_counter() - start - fit_spent)
        return reply

    return handle


def _make_grid(fl: Any, clients: dict[int, Callable[[Any], Any]], clock: _Clock) -> Any:
    """An in-process ``Grid``: serialises each message, runs the node, serialises its reply."""

    class InProcessGrid(fl.Grid):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            self._run: Any = None
            self._replies: dict[str, Any] = {}
            self.dropped: set[int] = set()
            self.drop_at_stage: str = fl.Stage.COLLECT_MASKED_VECTORS

        def set_run(self, run: Any) -> None:
            self._run = run

        @property
        def run(self) -> Any:
            return self._run

        def create_message(self, content: Any, message_type: str, dst_node_id: int, group_id: str,
                           ttl: float | None = None) -> Any:
            return fl.Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

        def get_node_ids(self) -> Iterable[int]:
            return list(clients)

        def push_messages(self, messages: Iterable[Any]) -> Iterable[str]:
            ids = []
            for msg in messages:
                msg_id = str(uuid.uuid4())
                msg.metadata.__dict__["_message_id"] = msg_id
                reply = self._deliver(msg)
                if reply is not None:
                    self._replies[msg_id] = reply
                ids.append(msg_id)
            return ids

        def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Any]:
            return [self._replies.pop(i) for i in message_ids if i in self._replies]

        def send_and_receive(self, messages: Iterable[Any], *, timeout: float | None = None) -> Iterable[Any]:
            return self.pull_messages(self.push_messages(messages))

        def _deliver(self, msg: Any) -> Any | None:
            nid = msg.metadata.dst_node_id
            stage = msg.content.config_records[fl.RECORD_KEY_CONFIGS][fl.Key.STAGE]
            if nid in self.dropped and stage == self.drop_at_stage:
                return None  # the node vanished: no reply, as after a timeout
            inbound = _wire(fl, msg, clock, "server_to_client")
            client_before = clock.seconds.get("client", 0.0) + clock.seconds.get("client_fit", 0.0)
            start = time.perf_counter()
            reply = clients[nid](inbound)
            elapsed = time.perf_counter() - start
            client_spent = clock.seconds.get("client", 0.0) + clock.seconds.get("client_fit", 0.0) - client_before
            clock.add("transport", elapsed - client_spent)  # the mod's own bookkeeping outside stage code
            before = clock.bytes.get("client_to_server", 0)
            out = _wire(fl, reply, clock, "client_to_server")
            clock.count(f"up:{nid}", clock.bytes["client_to_server"] - before)
            if stage == fl.Stage.COLLECT_MASKED_VECTORS:
                clock.count("masked_upload", clock.bytes["client_to_server"] - before)
            return out

    return InProcessGrid()


def _wire(fl: Any, msg: Any, clock: _Clock, direction: str) -> Any:
    """Round-trip ``msg`` through Flower's protobuf serialisation, counting bytes and time."""
    start = time.perf_counter()
    data = fl.message_to_proto(msg).SerializeToString()
    proto = fl.ProtoMessage()
    proto.ParseFromString(data)
    out = fl.message_from_proto(proto)
    clock.add("transport", time.perf_counter() - start)
    clock.count(direction, len(data))
    return out


class _Flower:
    """The handful of Flower names this module calls, imported lazily."""

    def __init__(self) -> None:
        import flwr
        from flwr.app import ConfigRecord, Context, Message, RecordDict
        from flwr.client.mod import secaggplus_mod
        from flwr.common import (
            Code,
            FitRes,
            Status,
            ndarrays_to_parameters,
            parameters_to_ndarrays,
        )
        from flwr.common.constant import SUPERLINK_NODE_ID
        from flwr.common.secure_aggregation.secaggplus_constants import (
            RECORD_KEY_CONFIGS,
            Key,
            Stage,
        )
        from flwr.common.serde import message_from_proto, message_to_proto
        from flwr.compat.common import recorddict_compat
        from flwr.proto.message_pb2 import Message as ProtoMessage  # pylint: disable=no-name-in-module
        from flwr.server import ServerConfig
        from flwr.server.client_manager import SimpleClientManager
        from flwr.server.compat.grid_client_proxy import GridClientProxy
        from flwr.server.compat.legacy_context import LegacyContext
        from flwr.server.strategy import FedAvg
        from flwr.server.workflow import SecAggPlusWorkflow
        from flwr.server.workflow.constant import (
            MAIN_CONFIGS_RECORD,
            MAIN_PARAMS_RECORD,
        )
        from flwr.server.workflow.constant import Key as WorkflowKey
        from flwr.server.workflow.secure_aggregation.secaggplus_workflow import (
            WorkflowState,
        )
        from flwr.serverapp.grid import Grid
        from flwr.supercore.task_identity import TaskIdentity

        self.version: str = getattr(flwr, "__version__", None) or _dist_version("flwr")
        self.ConfigRecord, self.Context, self.Message, self.RecordDict = ConfigRecord, Context, Message, RecordDict
        self.secaggplus_mod = secaggplus_mod
        self.Code, self.FitRes, self.Status = Code, FitRes, Status
        self.ndarrays_to_parameters, self.parameters_to_ndarrays = ndarrays_to_parameters, parameters_to_ndarrays
        self.RECORD_KEY_CONFIGS, self.Key, self.Stage = RECORD_KEY_CONFIGS, Key, Stage
        self.message_from_proto, self.message_to_proto, self.ProtoMessage = message_from_proto, message_to_proto, ProtoMessage
        self.compat = recorddict_compat
        self.ServerConfig, self.SimpleClientManager, self.GridClientProxy = ServerConfig, SimpleClientManager, GridClientProxy
        self.LegacyContext, self.FedAvg, self.SecAggPlusWorkflow = LegacyContext, FedAvg, SecAggPlusWorkflow
        self.MAIN_CONFIGS_RECORD, self.MAIN_PARAMS_RECORD, self.WorkflowKey = MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, WorkflowKey
        self.WorkflowState, self.Grid, self.TaskIdentity = WorkflowState, Grid, TaskIdentity
        self.SUPERLINK_NODE_ID = SUPERLINK_NODE_ID


def _dist_version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


def _server_context(fl: Any, grid: Any, silos: int, clock: _Clock) -> Any:
    """A ``LegacyContext`` as ``DefaultWorkflow`` prepares it: FedAvg over all nodes, round 1,
    an empty global model (the broadcast model is not SecAgg+ work), every node registered."""
    strategy = fl.FedAvg(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=silos,
                         min_available_clients=silos, fit_metrics_aggregation_fn=lambda _metrics: {})
    inner = strategy.aggregate_fit

    def timed_aggregate_fit(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            clock.add("strategy", time.perf_counter() - start)

    strategy.aggregate_fit = timed_aggregate_fit  # type: ignore[method-assign]
    base = fl.Context(run_id=1, node_id=0, node_config={}, state=fl.RecordDict(), run_config={})
    context = fl.LegacyContext(base, config=fl.ServerConfig(num_rounds=1), strategy=strategy,
                               client_manager=fl.SimpleClientManager())
    context.state.config_records[fl.MAIN_CONFIGS_RECORD] = fl.ConfigRecord({fl.WorkflowKey.CURRENT_ROUND: 1})
    context.state.array_records[fl.MAIN_PARAMS_RECORD] = fl.compat.parameters_to_arrayrecord(
        fl.ndarrays_to_parameters([]), keep_input=False)
    for nid in grid.get_node_ids():
        context.client_manager.register(fl.GridClientProxy(nid, grid, run_id=1))
    return context


def _pick_dropouts(neighbours: dict[int, set[int]], threshold: int, dropouts: int, rng: random.Random) -> list[int] | None:
    """Up to ``dropouts`` nodes whose loss keeps every node with ``threshold`` live neighbours
    (the condition ``SecAggPlusWorkflow._check_threshold`` enforces); None if impossible."""
    chosen: set[int] = set()
    candidates = sorted(neighbours)
    rng.shuffle(candidates)
    for nid in candidates:
        if len(chosen) == dropouts:
            break
        trial = chosen | {nid}
        if all(len(nbrs - trial) >= threshold for nbrs in neighbours.values()):
            chosen = trial
    return sorted(chosen) if len(chosen) == dropouts else None


class _InfeasibleDropouts(Exception):
    """The requested dropouts would leave some node below the reconstruction threshold."""


@dataclass
class _Outcome:
    """What one round left behind, besides the aggregate in the server context."""

    ok: bool = True
    reason: str = ""
    stage_seconds: dict[str, float] = field(default_factory=dict)
    dropped: list[int] = field(default_factory=list)
    num_shares: int = 0  # as the workflow resolved them for this many nodes
    threshold: int = 0


def _run_round(fl: Any, workflow: Any, grid: Any, context: Any, dropouts: int, seed: int) -> _Outcome:
    """Call the workflow's four stages in order, as ``SecAggPlusWorkflow.__call__`` does;
    make ``dropouts`` nodes vanish after 'share keys' if asked."""
    state = fl.WorkflowState()
    stages = [("setup", workflow.setup_stage), ("share_keys", workflow.share_keys_stage),
              ("collect_masked_vectors", workflow.collect_masked_vectors_stage), ("unmask", workflow.unmask_stage)]
    outcome = _Outcome()
    for name, step in stages:
        start = time.perf_counter()
        ok = step(grid, context, state)
        outcome.stage_seconds[name] = time.perf_counter() - start
        if name == "setup":
            outcome.num_shares, outcome.threshold = state.num_shares, state.threshold
        if not ok:
            outcome.ok, outcome.reason = False, f"Flower's SecAgg+ halted in stage '{name}'"
            return outcome
        if name == "setup" and dropouts:
            picked = _pick_dropouts(state.nid_to_neighbours, state.threshold, dropouts, random.Random(seed))
            if picked is None:
                raise _InfeasibleDropouts(f"{dropouts} dropouts cannot leave every node {state.threshold} "
                                          f"live neighbours with num_shares={state.num_shares}")
            outcome.dropped = picked
            grid.dropped = set(picked)
    return outcome


def _aggregate(fl: Any, context: Any) -> np.ndarray:
    record = context.state.array_records[fl.MAIN_PARAMS_RECORD]
    arrays = fl.parameters_to_ndarrays(fl.compat.arrayrecord_to_parameters(record, keep_input=True))
    return np.asarray(arrays[0], dtype=np.float64)


def _measure(silos: int, params: int, dropouts: int, seed: int, num_shares: float,
             reconstruction_threshold: float) -> dict[str, Any]:
    fl = _Flower()
    # Flower's runtimes set the process's task identity before any Message is built; its legacy
    # ``start_grid`` uses task 1 on the SuperLink node, and so does this.
    ident = fl.TaskIdentity
    previous = (ident._task_id, ident._run_id, ident._node_id)  # pylint: disable=protected-access
    ident.task_id, ident.run_id, ident.node_id = 1, 1, fl.SUPERLINK_NODE_ID
    try:
        return _measure_round(fl, silos, params, dropouts, seed, num_shares, reconstruction_threshold)
    finally:
        ident._task_id, ident._run_id, ident._node_id = previous  # pylint: disable=protected-access


def _measure_round(fl: Any, silos: int, params: int, dropouts: int, seed: int, num_shares: float,
                   reconstruction_threshold: float) -> dict[str, Any]:
    vectors = _make_vectors(silos, params, seed)
    workflow = fl.SecAggPlusWorkflow(num_shares=num_shares, reconstruction_threshold=reconstruction_threshold)
    num_examples = int(workflow.max_weight)  # weight ratio 1: no precision lost to weighting
    clock = _Clock()
    clients = {1000 + i: _build_client(fl, 1000 + i, vec, num_examples, clock) for i, vec in enumerate(vectors)}
    grid = _make_grid(fl, clients, clock)
    context = _server_context(fl, grid, silos, clock)

    outcome = _run_round(fl, workflow, grid, context, dropouts, seed)
    stage_seconds, dropped = outcome.stage_seconds, outcome.dropped
    settings = {
        "num_shares": num_shares, "reconstruction_threshold": reconstruction_threshold,
        "resolved_num_shares": outcome.num_shares, "resolved_threshold": outcome.threshold,
        "clipping_range": workflow.clipping_range, "quantization_range": workflow.quantization_range,
        "modulus_range": workflow.modulus_range, "max_weight": workflow.max_weight,
        "num_examples_per_client": num_examples, "strategy": "FedAvg",
        "vectors": "numpy default_rng(seed).standard_normal float32",
        "transport": "in-process Grid, protobuf round-trip per message",
    }
    if not outcome.ok:
        result = _unavailable(outcome.reason, fl.version)
        result.update(settings=settings, stage_seconds=stage_seconds, dropped_nodes=dropped)
        return result

    client_s = clock.seconds.get("client", 0.0)
    transport_s = clock.seconds.get("transport", 0.0)
    excluded_s = clock.seconds.get("client_fit", 0.0) + clock.seconds.get("strategy", 0.0)
    total_s = sum(stage_seconds.values())
    server_s = total_s - client_s - transport_s - excluded_s

    survivors = [v for nid, v in zip(clients, vectors) if nid not in set(dropped)]
    plain_sum = np.sum(np.stack(survivors).astype(np.float64), axis=0)
    # Flower returns the weighted mean; with equal weights the sum is mean * survivors.
    secure_sum = _aggregate(fl, context) * len(survivors)
    error = float(np.max(np.abs(secure_sum - plain_sum)))
    step = 2 * workflow.clipping_range / workflow.quantization_range  # stochastic rounding: < 1 step each
    tolerance = len(survivors) * step * (1 + 1e-6) + 1e-9 * float(np.max(np.abs(plain_sum)))

    survivor_ids = [nid for nid in clients if nid not in set(dropped)]
    up_per_survivor = [clock.bytes.get(f"up:{nid}", 0) for nid in survivor_ids]
    return {
        "available": True,
        "reason": "",
        "flwr_version": fl.version,
        "round_seconds": client_s + server_s + transport_s,
        "client_seconds": client_s,
        "server_seconds": server_s,
        "transport_seconds": transport_s,
        "excluded_seconds": {"client_fit_function": clock.seconds.get("client_fit", 0.0),
                             "strategy_aggregate_fit": clock.seconds.get("strategy", 0.0)},
        "stage_seconds": stage_seconds,
        "bytes_per_parameter": sum(up_per_survivor) / len(survivor_ids) / params,
        "masked_upload_bytes_per_parameter": clock.bytes.get("masked_upload", 0) / len(survivor_ids) / params,
        "download_bytes_per_parameter": clock.bytes.get("server_to_client", 0) / silos / params,
        "exact": error <= tolerance,
        "max_abs_error": error,
        "error_bound": tolerance,
        "silos": silos,
        "params": params,
        "dropouts": len(dropped),
        "dropped_nodes": dropped,
        "settings": settings,
    }


def measure(silos: int = 8, params: int = 4_000_000, dropouts: int = 0, seed: int = 0, *,
            num_shares: float = DEFAULT_NUM_SHARES,
            reconstruction_threshold: float = DEFAULT_RECONSTRUCTION_THRESHOLD) -> dict[str, Any]:
    """Time one round of Flower's SecAgg+ over ``silos`` float32 vectors of ``params`` values.

    Returns a JSON-serialisable dict (see the module docstring); never raises: when flwr is
    missing or the round fails, ``available`` is False and ``reason`` says why in one line.
    ``dropouts`` nodes vanish after the 'share keys' stage (they do not upload their masked
    vector), so the server has to rebuild their pairwise masks from key shares; if that many
    cannot drop without stalling the protocol, the round runs without dropouts and ``reason``
    says so.  ``num_shares`` and ``reconstruction_threshold`` go to ``SecAggPlusWorkflow``
    unchanged: an int is a count, a float a fraction (``num_shares=1.0`` masks every pair).
    """
    try:
        import flwr  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - ImportError, or a broken install
        return _unavailable(f"flwr is not importable here ({_one_line(exc)}){_protobuf_note()}; "
                            "install it in a separate venv: pip install flwr numpy")

    flwr_logger = logging.getLogger("flwr")
    old_level = flwr_logger.level
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        flwr_logger.setLevel(logging.WARNING)
        try:
            result = _seeded(silos, params, dropouts, seed, num_shares, reconstruction_threshold)
        except _InfeasibleDropouts as exc:  # still time the round, without dropouts
            result = _seeded(silos, params, 0, seed, num_shares, reconstruction_threshold)
            if result["available"]:
                result["reason"] = f"{exc}; timed with no dropouts instead"
        result["dropouts_requested"] = dropouts
        return result
    except Exception as exc:  # noqa: BLE001 - never raise into the benchmark
        return _unavailable(f"Flower's SecAgg+ could not run: {_one_line(exc)}", _installed_version())
    finally:
        flwr_logger.setLevel(old_level)
        random.setstate(py_state)
        np.random.set_state(np_state)


def _seeded(silos: int, params: int, dropouts: int, seed: int, num_shares: float,
            reconstruction_threshold: float) -> dict[str, Any]:
    random.seed(seed)     # the workflow shuffles nodes into its neighbour ring with `random`
    np.random.seed(seed)  # Flower's stochastic rounding draws from numpy's global generator
    return _measure(silos, params, dropouts, seed, num_shares, reconstruction_threshold)


def _installed_version() -> str | None:
    try:
        return _dist_version("flwr")
    except Exception:  # noqa: BLE001 - best effort, only decorates a message
        return None

if __name__ == "__main__":
    import json
    import sys

    args = [int(a) for a in sys.argv[1:]]
    print(json.dumps(measure(*args), indent=2))
