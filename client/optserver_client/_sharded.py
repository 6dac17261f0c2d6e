"""Sharded sessions, without I/O: each operation of a session spread over several servers
(see :mod:`optserver_client.sharding`) planned as calls to its shards, and their answers merged.

A :class:`Fanout` is the calls of one operation (shard index -> :class:`Call`) and the function
that merges their results. The sync and async shells send a fanout's calls at once (threads,
or tasks) and hand the results to its merge. An operation of several rounds (creating,
importing, opening a session) is a :data:`Flow`: a generator that yields fanouts, is sent their
results (or thrown their errors), and returns its result; the shells only drive it. One rule
for errors serves both (:func:`settle`):
if every call failed, nothing changed anywhere and the first shard's error is raised as it is;
if some failed and others did not, a :class:`ShardError` names the shards that failed, and for
a step carries the Idempotency-Key that completes it exactly once when pushed again.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Callable, Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeAlias, TypeVar

import numpy as np

from optserver_client._codec import Array, as_array, decode_json, decode_safetensors, encode_json
from optserver_client._protocol import (
    Call,
    ClientCore,
    CreatePlan,
    GroupOptions,
    SessionCore,
    Tensors,
    Unset,
    new_key,
    weight_arrays,
)
from optserver_client.exceptions import APIError, ConflictError, ProtocolError, ShardError
from optserver_client.safetensors_io import encode, encode_parts
from optserver_client.sharding import Layout
from optserver_client.vocabulary import (
    PARAMS_PREFIX,
    STATE_FORMAT,
    STATE_FORMAT_KEY,
    STATE_IDENTITY_KEY,
    STATE_PREFIX,
    STATE_RECORD_KEY,
    ReturnMode,
)

__all__ = [
    "Fanout",
    "Flow",
    "ShardedCore",
    "attach_layout",
    "create_flow",
    "exists_already",
    "export_key",
    "import_flow",
    "join_tensors",
    "list_sessions",
    "merge_exports",
    "open_flow",
    "settle",
    "split_tensors",
]

T = TypeVar("T")

_F32 = np.dtype("<f4")

#: An operation of several rounds of calls (see the module's docstring).
Flow: TypeAlias = Generator["Fanout[Any]", Any, T]


@dataclass(frozen=True)
class Fanout(Generic[T]):
    """The calls of one operation on a sharded session, and how their results combine."""

    calls: dict[int, Call[Any]]
    merge: Callable[[dict[int, Any]], T]
    #: The Idempotency-Key the calls share (a step's), for the error of a partial failure.
    key: str | None = None
    #: How a shard's error is told to the caller (shard index, error -> error), if not as is.
    explain: Callable[[int, BaseException], BaseException] | None = None


def settle(
    fanout: Fanout[T],
    results: dict[int, Any],
    errors: dict[int, BaseException],
    urls: Sequence[str],
) -> T:
    """The merged result, or the error (see the module's docstring)."""
    if not errors:
        return fanout.merge(results)
    if fanout.explain is not None:
        errors = {i: _explained(fanout.explain, i, error) for i, error in errors.items()}
    first = min(errors)
    if not results:
        raise errors[first]
    raise ShardError(
        {index: error for index, error in sorted(errors.items())},
        {index: urls[index] for index in errors},
        key=fanout.key,
        results=results,
    ) from errors[first]


def _explained(
    explain: Callable[[int, BaseException], BaseException], shard: int, error: BaseException
) -> BaseException:
    told = explain(shard, error)
    if told is not error:
        told.__cause__ = error
    return told


def exists_already(error: BaseException) -> bool:
    """Whether a failed creation failed because the session exists (on every shard that
    refused it): it is then another creator's, and not to be cleaned up."""
    causes = error.errors.values() if isinstance(error, ShardError) else [error]
    return all(isinstance(e, ConflictError) for e in causes)


def new_identity() -> tuple[str, str]:
    """A new session id and token for every shard of a session (what a server would pick)."""
    return secrets.token_hex(16), secrets.token_urlsafe(32)


def _all_finite(array: Array) -> bool:
    """Whether every element is finite: the sum of squares (BLAS, no temporary: 1 ms for 1e7
    float32, where ``isfinite().all()`` takes 1.6) is finite only then, or when large values
    overflow it, which the exact test then settles."""
    flat = array.reshape(-1)
    if flat.dtype.kind != "f" or flat.dtype.itemsize < 4 or not flat.flags.c_contiguous:
        return bool(np.isfinite(flat).all())
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow is settled below
        squares = np.dot(flat, flat)
    return bool(np.isfinite(squares)) or bool(np.isfinite(flat).all())


def _rows(array: Array) -> int:
    return array.shape[0] if array.ndim else 1


def split_tensors(layout: Layout, tensors: Mapping[str, Array]) -> dict[int, dict[str, Array]]:
    """Per shard, its pieces of ``tensors`` under their shard-side names (views: a chunk of a
    C-contiguous array is one)."""
    out: dict[int, dict[str, Array]] = {}
    for name, array in tensors.items():
        for piece in layout.pieces(name, _rows(array)):
            out.setdefault(piece.shard, {})[piece.remote] = piece.of(array)
    return out


def join_tensors(
    layout: Layout,
    answers: Iterable[Mapping[str, Array]],
    outputs: Mapping[str, Array] | None = None,
) -> dict[str, Array]:
    """The tensors of several shards' answers, chunks joined (in row order) into one array:
    the one of ``outputs`` for that tensor, where the chunks were read in place (any chunk that
    was not is copied there), else a new one."""
    whole: dict[str, Array] = {}
    chunks: dict[str, dict[int, Array]] = {}
    for answer in answers:
        for remote, array in answer.items():
            owner = layout.owner(remote)
            if owner is None:
                whole[remote] = array
            else:
                chunks.setdefault(owner[0], {})[owner[1]] = array
    for name, parts in chunks.items():
        expected = layout.split[name]
        if len(parts) != expected:
            raise ProtocolError(f"tensor {name!r}: {len(parts)} of its {expected} chunks came back")
        ordered = [parts[k] for k in range(expected)]
        out = (outputs or {}).get(name)
        rows = sum(part.shape[0] for part in ordered)
        if (
            out is None
            or out.shape[0] != rows
            or out.shape[1:] != ordered[0].shape[1:]
            or out.dtype != ordered[0].dtype
        ):  # not the array expected (the tensor changed meanwhile): a new one
            whole[name] = np.concatenate(ordered, axis=0)
            continue
        start = 0
        for part in ordered:
            stop = start + part.shape[0]
            if not np.shares_memory(part, out):  # not read in place: copied once
                out[start:stop] = part
            start = stop
        whole[name] = out
    return whole


def _outputs(
    layout: Layout, cores: Sequence[SessionCore], tensors: Mapping[str, Array | tuple[int, ...]]
) -> tuple[dict[str, Array], dict[int, dict[str, Array]]]:
    """For an answer: one array per tensor that is cut into chunks (the weights' dtype, as far
    as the shards told it, and the shape of the gradient given, or the shape given), and per
    shard the views of them that its chunks are read into."""
    outputs: dict[str, Array] = {}
    into: dict[int, dict[str, Array]] = {}
    for name, like in tensors.items():
        shape = like if isinstance(like, tuple) else like.shape
        if name not in layout.split or not shape:
            continue
        pieces = layout.pieces(name, shape[0])
        known = cores[pieces[0].shard].dtypes.get(pieces[0].remote)
        dtype = known if known is not None else (_F32 if isinstance(like, tuple) else like.dtype)
        out = outputs[name] = np.empty(shape, dtype)
        for piece in pieces:
            into.setdefault(piece.shard, {})[piece.remote] = out[piece.start : piece.stop]
    return outputs, into


def _tensor_list(layout: Layout, infos: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The logical tensors (name, shape, dtype) of the shards' descriptions."""
    whole: dict[str, dict[str, Any]] = {}
    rows: dict[str, dict[int, dict[str, Any]]] = {}
    for info in infos:
        for entry in info.get("params") or ():
            owner = layout.owner(str(entry.get("name")))
            if owner is None:
                whole[str(entry.get("name"))] = dict(entry)
            else:
                rows.setdefault(owner[0], {})[owner[1]] = dict(entry)
    for name, parts in rows.items():
        first = parts[min(parts)]
        shape = list(first.get("shape") or [])
        if shape:
            shape[0] = sum(int((p.get("shape") or [0])[0]) for p in parts.values())
        whole[name] = {**first, "name": name, "shape": shape}
    return [whole[name] for name in sorted(whole)]


def _group_list(layout: Layout, infos: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The parameter groups of the shards' descriptions, each with the logical tensors of all
    shards (a cut tensor once, by its name)."""
    groups: dict[str, dict[str, Any]] = {}
    for info in infos:
        for entry in info.get("groups") or ():
            group = groups.setdefault(str(entry.get("name")), {**entry, "params": []})
            for remote in entry.get("params") or ():
                owner = layout.owner(str(remote))
                tensor = str(remote) if owner is None else owner[0]
                if tensor not in group["params"]:
                    group["params"].append(tensor)
    return list(groups.values())


class ShardedCore:
    """The calls of one sharded session, and what the client knows of it: the layout, each
    shard's :class:`SessionCore` (with that shard's version), and the non-finite policy (the
    client routes a push holding NaN or Inf to the shards of those values only: see
    :meth:`step`)."""

    def __init__(
        self, cores: Sequence[SessionCore], layout: Layout, *, nonfinite: str = "reject"
    ) -> None:
        if len(cores) != layout.count:
            raise ValueError(f"{len(cores)} shard sessions for a layout of {layout.count}")
        self.cores = list(cores)
        self.layout = layout
        self.nonfinite = nonfinite
        self.last_applied: bool | None = None
        #: The whole shapes of the cut tensors, as the shards' descriptions and the gradients
        #: pushed showed them (for reading their chunks into one array).
        self.shapes: dict[str, tuple[int, ...]] = {}
        #: The shards known to hold tensors (their descriptions listed some, or pieces were
        #: sent to them).
        self.holders: set[int] = set()

    @property
    def id(self) -> str:
        return self.cores[0].id

    @property
    def token(self) -> str | None:
        return self.cores[0].token

    @property
    def versions(self) -> tuple[int, ...]:
        return tuple(core.version for core in self.cores)

    @property
    def version(self) -> int:
        """The steps every shard that holds tensors has applied (their least version; a shard
        that holds none, with more shards than tensors, never steps and does not count)."""
        holding = [self.cores[i].version for i in sorted(self.holders)]
        return min(holding) if holding else min(self.versions)

    # --- steps -----------------------------------------------------------------------------

    def step(
        self,
        grads: Tensors,
        *,
        lr: float | None,
        groups: GroupOptions | None,
        params: Tensors | None,
        base_version: int | None,
        worker: str | None,
        return_: ReturnMode,
        key: str | None,
        partial: bool = False,
    ) -> Fanout[dict[str, Array]]:
        """One push: each shard gets its pieces of the gradients (and weights), under one
        Idempotency-Key, so that pushing again with that key applies nothing twice anywhere.

        Under the reject or skip policy, a push holding NaN or Inf goes only to the shards of
        those values: they refuse it (reject: the 422 is raised as is) or skip it (the other
        shards' weights are pulled for the answer), and the shards agree on what happened."""
        key = key if key is not None else new_key()
        default = self.cores[0].default_dtype
        grad_arrays = {n: as_array(g, default=default) for n, g in grads.items()}
        if not grad_arrays:
            raise ValueError("a step needs at least one gradient")
        param_arrays = {n: as_array(p, default=default) for n, p in (params or {}).items()}
        grad_parts = split_tensors(self.layout, grad_arrays)
        param_parts = split_tensors(self.layout, param_arrays)
        self.holders.update(grad_parts, param_parts)
        shards = sorted(grad_parts)
        # A push to one shard needs no routing: that shard alone decides.
        bad = self._nonfinite_shards(grad_arrays) if len(shards) > 1 else set()
        pulls: dict[int, list[str] | None] = {}
        if bad:
            shards = sorted(bad)
            if self.nonfinite == "skip" and return_ != "none":
                pulls = self._skipped_answer(list(grad_arrays) + list(param_arrays), return_, bad)
        for name, grad in grad_arrays.items():
            if name in self.layout.split:
                self.shapes[name] = grad.shape
        outputs, into = (
            _outputs(self.layout, self.cores, grad_arrays) if return_ != "none" else ({}, {})
        )
        calls: dict[int, Call[Any]] = {
            i: self.cores[i].step(
                grad_parts[i], lr=lr, groups=groups, params=param_parts.get(i),
                base_version=base_version, worker=worker, return_=return_, key=key,
                into=into.get(i), partial=partial,
            )
            for i in shards
        }  # fmt: skip
        for i, names in pulls.items():
            calls[i] = self.cores[i].pull(names)

        def merge(results: dict[int, Any]) -> dict[str, Array]:
            applied = [self.cores[i].last_applied for i in shards]
            self.last_applied = None if None in applied else all(applied)
            return join_tensors(self.layout, results.values(), outputs)

        return Fanout(calls, merge, key, self.explain)

    def explain(self, shard: int, error: BaseException) -> BaseException:
        """A shard's problem with a chunk ``NAME#k`` of a cut tensor, told of the caller's
        tensor: ``tensor`` is ``NAME``, ``chunk`` the chunk's name and ``shard`` its shard,
        and the detail, the server's, says which rows of ``NAME`` the chunk holds."""
        if not isinstance(error, APIError):
            return error
        remote = error.problem.get("tensor")
        owner = self.layout.owner(remote) if isinstance(remote, str) else None
        if owner is None:
            return error
        name, index = owner
        shape = self.shapes.get(name)
        if shape:
            piece = self.layout.pieces(name, shape[0])[index]
            part = f"rows {piece.start}:{piece.stop}"
        else:
            part = f"chunk {index}"
        problem = {
            **error.problem, "tensor": name, "chunk": remote, "shard": shard,
            "detail": f"{error.detail or error.title} ({remote} is {part} of {name!r}, on shard "
            f"{shard})",
        }  # fmt: skip
        return type(error)(error.status, problem, error.response_headers)

    def _nonfinite_shards(self, grads: Mapping[str, Array]) -> set[int]:
        """The shards whose pieces of ``grads`` hold NaN or Inf (none under 'allow')."""
        if self.nonfinite == "allow":
            return set()
        bad: set[int] = set()
        for name, array in grads.items():
            if array.dtype.kind != "f" or _all_finite(array):
                continue
            for piece in self.layout.pieces(name, _rows(array)):
                if not np.isfinite(piece.of(array)).all():
                    bad.add(piece.shard)
        return bad

    def _skipped_answer(
        self, names: Iterable[str], return_: ReturnMode, skip: set[int]
    ) -> dict[int, list[str] | None]:
        """What a skipped step's answer carries from the shards outside ``skip``: per shard,
        the shard-side names of ``names`` (None: every tensor, for return=all)."""
        if return_ == "all":
            return {i: None for i in self.layout.shards() if i not in skip}
        per = self._remote_names(names)
        return {i: remote for i, remote in per.items() if i not in skip}

    # --- weights ---------------------------------------------------------------------------

    def pull(self, names: str | Iterable[str] | None) -> Fanout[dict[str, Array]]:
        """GET the weights from the shards that hold them; the chunks of a cut tensor whose
        shape is known are read straight into one array."""
        if names is None:
            wanted = list(self.layout.split)
        else:
            wanted = [n for n in names.split(",") if n] if isinstance(names, str) else [*names]
        outputs, into = _outputs(
            self.layout, self.cores, {n: self.shapes[n] for n in wanted if n in self.shapes}
        )
        if names is None:
            calls = {i: core.pull(None, into.get(i)) for i, core in enumerate(self.cores)}
        else:
            per = self._remote_names(wanted)
            calls = {i: self.cores[i].pull(per[i], into.get(i)) for i in sorted(per)}
        return Fanout(
            calls,
            lambda results: join_tensors(self.layout, results.values(), outputs),
            explain=self.explain,
        )

    def _remote_names(self, names: Iterable[str]) -> dict[int, list[str]]:
        """Per shard, the shard-side names under which it stores its parts of ``names``."""
        per: dict[int, list[str]] = {}
        for name in names:
            for shard, remote in self.layout.stored(name):
                per.setdefault(shard, []).append(remote)
        return per

    def set_params(self, params: Tensors) -> Fanout[dict[str, Any]]:
        arrays = {n: as_array(p, default=self.cores[0].default_dtype) for n, p in params.items()}
        if not arrays:
            raise ValueError("set_params needs at least one tensor")
        for name, array in arrays.items():
            if name in self.layout.split:
                self.shapes[name] = array.shape
        parts = split_tensors(self.layout, arrays)
        self.holders.update(parts)
        calls = {i: self.cores[i].set_params(part) for i, part in sorted(parts.items())}
        return Fanout(calls, self._merged_info, explain=self.explain)

    # --- the session -----------------------------------------------------------------------

    def info(self) -> Fanout[dict[str, Any]]:
        calls = {i: core.info() for i, core in enumerate(self.cores)}
        return Fanout(calls, self._merged_info)

    def update(
        self,
        *,
        optimizer: Mapping[str, Any] | None,
        schedule: Mapping[str, Any] | Unset | None,
        mode: str | Mapping[str, Any] | None,
        nonfinite: str | None,
    ) -> Fanout[dict[str, Any]]:
        calls = {
            i: core.update(optimizer=optimizer, schedule=schedule, mode=mode, nonfinite=nonfinite)
            for i, core in enumerate(self.cores)
        }
        return Fanout(calls, self._merged_info)

    def delete(self) -> Fanout[None]:
        calls = {i: core.delete() for i, core in enumerate(self.cores)}
        return Fanout(calls, lambda results: None)

    def observe(self, infos: Mapping[int, Mapping[str, Any]]) -> None:
        """Learn from the shards' descriptions (their versions and the non-finite policy)."""
        for i, info in infos.items():
            self.cores[i].observe_info(info)
            if i == 0 and isinstance(info.get("nonfinite"), str):
                self.nonfinite = info["nonfinite"]
            if info.get("params"):
                self.holders.add(i)
        if len(infos) == self.layout.count:  # every chunk is in view: the whole shapes
            for entry in _tensor_list(self.layout, infos.values()):
                if entry["name"] in self.layout.split:
                    self.shapes[entry["name"]] = tuple(int(d) for d in entry["shape"])

    def _merged_info(self, results: Mapping[int, Any]) -> dict[str, Any]:
        """One description of the session: shard 0's, with the least version, the logical
        tensors, the layout, and every shard's own description under ``shards``."""
        # In shard order, not the order the answers came in: the same description every time.
        infos = {i: results[i] for i in sorted(results) if isinstance(results[i], dict)}
        self.observe(infos)
        if not infos:
            return {}
        base = dict(infos[min(infos)])
        base.pop("version", None)
        sharding = {k: v for k, v in self.layout.descriptor(0).items() if k != "index"}
        return {
            **base,
            "version": self.version,
            "versions": list(self.versions),
            "params": _tensor_list(self.layout, infos.values()),
            "groups": _group_list(self.layout, infos.values()),
            "sharding": sharding,
            "shards": [infos[i] for i in sorted(infos)],
        }

    # --- state export ----------------------------------------------------------------------

    def export_state(self) -> Fanout[bytes]:
        """One state document of the whole session (as from one server), which a client of
        any number of shards imports (:func:`import_plans`): the shards' exports, chunks of
        weights and state joined."""
        calls = {i: core.export_state() for i, core in enumerate(self.cores)}
        return Fanout(calls, lambda results: merge_exports(self.layout, results))


def merge_exports(layout: Layout, documents: Mapping[int, bytes]) -> bytes:
    """The export of a whole session from its shards' exports."""
    tensors: dict[str, dict[str, Array]] = {}
    records: dict[int, dict[str, Any]] = {}
    for i, document in sorted(documents.items()):
        arrays, metadata = decode_safetensors(document)
        if metadata.get(STATE_FORMAT_KEY) != STATE_FORMAT or STATE_RECORD_KEY not in metadata:
            raise ProtocolError(f"shard {i} did not answer with a state export")
        record = decode_json(metadata[STATE_RECORD_KEY].encode())
        if not isinstance(record, dict):
            raise ProtocolError(f"shard {i}'s export record is not a JSON object")
        records[i] = record
        for key, array in arrays.items():
            prefix, remote, field = export_key(key)
            tensors.setdefault(prefix + "\0" + field, {})[remote] = array
    merged: dict[str, Array] = {}
    for group, arrays in tensors.items():
        prefix, field = group.split("\0")
        for name, array in join_tensors(layout, [arrays]).items():
            merged[prefix + name + field] = array
    record = dict(records[min(records)])
    record["version"] = min(int(r.get("version", 0)) for r in records.values())
    steps: dict[str, int] = {}
    for r in records.values():
        for remote, count in dict(r.get("steps") or {}).items():
            owner = layout.owner(remote)
            steps.setdefault(remote if owner is None else owner[0], int(count))
    record["steps"] = steps
    record.pop("sharding", None)
    metadata = {STATE_FORMAT_KEY: STATE_FORMAT, STATE_RECORD_KEY: encode_json(record).decode()}
    return bytes(encode(merged, metadata))


def export_key(key: str) -> tuple[str, str, str]:
    """``params/NAME`` -> (params/, NAME, ""); ``state/NAME/FIELD`` -> (state/, NAME, /FIELD)."""
    if key.startswith(PARAMS_PREFIX):
        return PARAMS_PREFIX, key[len(PARAMS_PREFIX) :], ""
    if key.startswith(STATE_PREFIX) and "/" in key[len(STATE_PREFIX) :]:
        name, _, field = key[len(STATE_PREFIX) :].rpartition("/")
        return STATE_PREFIX, name, "/" + field
    raise ProtocolError(f"unexpected tensor {key!r} in a state export")


# --- creating and importing -----------------------------------------------------------------


def create_flow(
    clients: Sequence[ClientCore],
    params: Tensors | None,
    optimizer: str | Mapping[str, Any],
    *,
    mode: str | Mapping[str, Any] | None,
    schedule: Mapping[str, Any] | None,
    name: str | None,
    nonfinite: str | None,
    dtype: str | None,
    chunk_bytes: int,
    id: str | None = None,
    token: str | None = None,
) -> Flow[ShardedCore]:
    """Create a session on every shard: one id and token (those given, or new ones), the
    layout from the weights as they will be stored (cast to ``dtype``), each shard's part
    uploaded. A failed creation is deleted everywhere, unless it failed because the session
    exists (a chosen id): it is then another creator's, maybe in progress; this creator still
    uploads the weights of the shards it won, as the others do of theirs, so that the session
    ends up whole."""
    arrays = weight_arrays(params, dtype) if params is not None else {}
    layout = Layout.plan(
        {n: (a.shape, a.dtype.itemsize) for n, a in arrays.items()}, len(clients), chunk_bytes
    )
    parts = split_tensors(layout, arrays)
    fresh_id, fresh_token = new_identity()
    id, token = id or fresh_id, token or fresh_token
    plans = [
        client.create_session(
            parts.get(i, {}) or None, optimizer, mode=mode, schedule=schedule, name=name,
            nonfinite=nonfinite, dtype=dtype, id=id, token=token, sharding=layout.descriptor(i),
        )
        for i, client in enumerate(clients)
    ]  # fmt: skip
    try:
        try:
            created = yield Fanout(dict(enumerate(p.create for p in plans)), dict)
        except ShardError as error:
            if exists_already(error):
                yield Fanout(_uploads(plans, error.results), dict)
            raise
        yield Fanout(_uploads(plans, created), dict)
        core = ShardedCore([created[i] for i in range(len(plans))], layout)
        yield core.info()  # learns the shards' versions and the non-finite policy
    except Exception as error:
        if not exists_already(error):
            yield from _discard(clients, id, token)
        raise
    return core


def _uploads(
    plans: Sequence[CreatePlan], created: Mapping[int, SessionCore]
) -> dict[int, Call[Any]]:
    """The PUTs of the initial weights to the shards whose session ``created`` holds."""
    calls: dict[int, Call[Any]] = {}
    for i, core in created.items():
        upload = plans[i].upload
        if upload:
            calls[i] = core.set_params(upload)
    return calls


def _discard(clients: Sequence[ClientCore], id: str, token: str) -> Flow[None]:
    """After a failed creation or import: delete what any shard may hold of it (what fails
    here is left: the failure being raised is the one that matters)."""
    deletes = {i: client.session(id, token).delete() for i, client in enumerate(clients)}
    with contextlib.suppress(Exception):  # best effort, see above
        yield Fanout(deletes, dict)


def import_flow(
    clients: Sequence[ClientCore],
    data: bytes | bytearray | memoryview,
    name: str | None,
    chunk_bytes: int,
) -> Flow[ShardedCore]:
    """Import one state document (of a session of any number of shards, as
    :meth:`ShardedCore.export_state` writes it) onto ``clients``: the weights and state cut
    anew for these shards, one id and token for all; deleted everywhere if it fails."""
    arrays, metadata = decode_safetensors(bytes(data))
    if metadata.get(STATE_FORMAT_KEY) != STATE_FORMAT or STATE_RECORD_KEY not in metadata:
        raise ValueError("not an optserver state export")
    record = decode_json(metadata[STATE_RECORD_KEY].encode())
    if not isinstance(record, dict):
        raise ValueError("the export's record is not a JSON object")
    if record.get("sharding"):
        raise ValueError("the export is one shard's: export the session through a client of all")
    weights = {
        key[len(PARAMS_PREFIX) :]: a for key, a in arrays.items() if key.startswith(PARAMS_PREFIX)
    }
    layout = Layout.plan(
        {n: (a.shape, a.dtype.itemsize) for n, a in weights.items()}, len(clients), chunk_bytes
    )
    per_shard: dict[int, dict[str, Array]] = {i: {} for i in layout.shards()}
    for key, array in arrays.items():
        prefix, tensor, field = export_key(key)
        rows = _rows(weights[tensor]) if tensor in weights else _rows(array)
        for piece in layout.pieces(tensor, rows):
            per_shard[piece.shard][prefix + piece.remote + field] = piece.of(array)
    steps: dict[int, dict[str, int]] = {i: {} for i in layout.shards()}
    for tensor, count in dict(record.get("steps") or {}).items():
        for piece in layout.pieces(tensor, _rows(weights[tensor]) if tensor in weights else 1):
            steps[piece.shard][piece.remote] = count
    id, token = new_identity()
    identity = encode_json({"id": id, "token": token}).decode()
    calls = {}
    for i, client in enumerate(clients):
        shard_record = {**record, "steps": steps[i], "sharding": layout.descriptor(i)}
        shard_metadata = {
            STATE_FORMAT_KEY: STATE_FORMAT,
            STATE_RECORD_KEY: encode_json(shard_record).decode(),
            STATE_IDENTITY_KEY: identity,
        }
        calls[i] = client.import_state(encode_parts(per_shard[i], shard_metadata), name)
    try:
        created = yield Fanout(calls, dict)
        core = ShardedCore([created[i] for i in range(len(calls))], layout)
        yield core.info()
    except Exception:
        yield from _discard(clients, id, token)
        raise
    return core


def open_flow(
    clients: Sequence[ClientCore], id: str, token: str | None
) -> Flow[tuple[ShardedCore, list[int]]]:
    """Open an existing sharded session from its shards' descriptions: its core, and for each
    shard index the position of its URL among ``clients`` (given in any order)."""
    cores = {i: client.session(id, token) for i, client in enumerate(clients)}
    infos = yield Fanout({i: core.info() for i, core in cores.items()}, dict)
    layout, order = attach_layout(infos, len(clients))
    core = ShardedCore([cores[p] for p in order], layout)
    core.observe({i: infos[p] for i, p in enumerate(order)})
    return core, order


def list_sessions(clients: Sequence[ClientCore]) -> Fanout[list[dict[str, Any]]]:
    """The sharded sessions whose shards are the servers of ``clients`` (in any order), each
    described once as :meth:`ShardedCore.info` describes it, in the first server's order. A
    session of one of these servers alone, or sharded over other servers too, is not one a
    client of these URLs opens: it is not listed (a client of its own URLs lists it)."""
    count = len(clients)

    def merge(lists: dict[int, Any]) -> list[dict[str, Any]]:
        found: dict[str, dict[int, Mapping[str, Any]]] = {}
        for position in sorted(lists):
            for info in lists[position]:
                if isinstance(info, dict) and isinstance(info.get("sharding"), dict):
                    found.setdefault(str(info.get("id")), {})[position] = info
        sessions = []
        for id, infos in found.items():
            if len(infos) != count:
                continue
            try:
                layout, order = attach_layout(infos, count)
            except (ValueError, TypeError, KeyError):
                continue  # the same id, but not one session over these servers
            core = ShardedCore([clients[p].session(id, None) for p in order], layout)
            sessions.append(core._merged_info({i: infos[p] for i, p in enumerate(order)}))
        return sessions

    return Fanout({i: client.list_sessions() for i, client in enumerate(clients)}, merge)


def attach_layout(infos: Mapping[int, Mapping[str, Any]], count: int) -> tuple[Layout, list[int]]:
    """The layout that the shards' descriptions record, and for each shard index the position
    of its URL in the list given (a list in another order is fine; a wrong one is refused)."""
    order: dict[int, int] = {}
    layout: Layout | None = None
    for position, info in infos.items():
        descriptor = info.get("sharding")
        if not isinstance(descriptor, dict):
            raise ValueError(f"the session at URL {position} is not a sharded session")
        candidate = Layout.from_descriptor(descriptor)
        if candidate.count != count:
            raise ValueError(f"the session has {candidate.count} shards; {count} URLs were given")
        if layout is not None and candidate != layout:
            raise ValueError("the shards disagree on the session's layout")
        layout = candidate
        order[int(descriptor["index"])] = position
    if layout is None or sorted(order) != list(range(count)):
        raise ValueError(f"the URLs given are not the session's {count} shards")
    return layout, [order[i] for i in range(count)]
