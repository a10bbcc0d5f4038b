"""A model version in the job's model stream, written and read whatever its size.

The aggregator writes each version once (docs/architecture.md, "The data plane"): a model
whose tensor bytes are at most ``threshold`` (:data:`~qflare.messages.parts.
PART_THRESHOLD_BYTES` by default) as one ``model.published`` with its tensors, exactly as
before; a larger one as a ``model.manifest`` followed by its ``model.part`` envelopes
(:func:`~qflare.messages.parts.encode_model_parts`), all under the routing key of
``model.published``, so the stream's binding is unchanged. ``round.opened`` and
``job.ended`` name the offset of the first envelope (the manifest) and the model's digest.

A reader (a participant from the offset a round names, the simulator's observer from the
stream's start) passes every envelope of the stream to :class:`ModelReader`, which hands
back a model only once it is whole and hashes to its signed digest: parts go straight into
tensors allocated from the manifest, so a reader holds the model once plus a part.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from dataclasses import dataclass
from typing import Any

import numpy as np

from qflare.crypto.keystore import Identity
from qflare.messages.bodies import Body, ModelManifest, ModelPart, ModelPublished
from qflare.messages.envelope import Envelope, encode, of_kind, open_off_loop, peek_header
from qflare.messages.errors import MessageRejected, Reason
from qflare.messages.limits import DEFAULT_LIMITS, Limits
from qflare.messages.parts import (
    DEFAULT_MODEL_PART_BYTES,
    PART_THRESHOLD_BYTES,
    ModelAssembler,
    ModelSource,
    encode_model_parts,
    model_nbytes,
)
from qflare.messages.tensors import Tensors, model_digest

#: Opens one envelope of the model stream: (bytes, kinds it may be, the digest the manifest
#: vouches for or None) -> the verified envelope; refusals raise MessageRejected.
Opener = Callable[[bytes, Collection[str], bytes | None], Awaitable[Envelope[Body]]]
MODEL_KINDS = (ModelPublished.KIND, ModelManifest.KIND, ModelPart.KIND)


async def model_envelopes(
    identity: Identity,
    tensors: Tensors | ModelSource,
    *,
    job: str,
    round: int,
    version: int,
    digest: bytes,
    epsilon: float,
    threshold: int = PART_THRESHOLD_BYTES,
    part_bytes: int = DEFAULT_MODEL_PART_BYTES,
    limits: Limits = DEFAULT_LIMITS,
) -> AsyncIterator[bytes]:
    """The envelopes that write model ``version`` into the job's model stream, in order;
    the first one's offset names the model. Encoding runs in a worker thread."""
    if model_nbytes(tensors) <= threshold:
        whole = tensors.tensors() if isinstance(tensors, ModelSource) else dict(tensors)
        body = ModelPublished(version=version, digest=digest, epsilon=epsilon, tensors=whole)
        yield await asyncio.to_thread(
            encode, ModelPublished.KIND, body, identity, job=job, round=round
        )
        return
    parts = encode_model_parts(
        identity,
        tensors,
        job=job,
        round=round,
        version=version,
        epsilon=epsilon,
        digest=digest,
        part_bytes=part_bytes,
        limits=limits,
    )
    while (data := await asyncio.to_thread(next, parts, None)) is not None:
        yield data


@dataclass(frozen=True)
class ReceivedModel:
    """A model version read whole from the model stream, its digest checked."""

    job: str
    round: int
    """The round of the envelope that carried it (or its manifest)."""
    version: int
    digest: bytes
    epsilon: float
    tensors: dict[str, np.ndarray]
    parted: bool = False
    """Whether it came as a manifest and parts (a model too large for one message)."""


class ModelReader:
    """Builds model versions from the envelopes of one job's model stream, given in stream
    order to :meth:`take`; returns each model once it is whole and hashes to its digest.

    ``expect`` (version, digest): the one model wanted (a participant's, from a signed
    ``round.opened``): a first envelope naming another is refused (BAD_DIGEST) before any
    tensor is allocated. A new manifest abandons a model still being built (an aggregator
    that restarted while writing one writes it again). Every refusal raises
    MessageRejected and drops the model being built: nothing of it is ever handed out."""

    def __init__(
        self,
        open: Opener,
        *,
        expect: tuple[int, bytes] | None = None,
        limits: Limits = DEFAULT_LIMITS,
    ) -> None:
        self._open = open
        self.expect = expect
        self.limits = limits
        self._building: ModelAssembler | None = None

    @property
    def building(self) -> bool:
        """Whether a model's manifest is in and its parts are coming."""
        return self._building is not None

    async def take(self, data: bytes) -> ReceivedModel | None:
        head = peek_header(data, self.limits)
        if head.kind == ModelPart.KIND:
            return await self._part(data, head.body_digest)
        self._building = None
        if head.kind == ModelManifest.KIND:
            env = of_kind(await self._open(data, (ModelManifest.KIND,), None), ModelManifest)
            self._check(env.body.version, env.body.digest, env.job)
            self._building = await asyncio.to_thread(ModelAssembler, env, self.limits)
            return None
        env2 = of_kind(await self._open(data, (ModelPublished.KIND,), None), ModelPublished)
        body = env2.body
        self._check(body.version, body.digest, env2.job)
        if body.tensors is None:
            raise MessageRejected(Reason.BAD_SCHEMA, "a model.published without tensors")
        tensors = dict(body.tensors)
        if await asyncio.to_thread(model_digest, tensors) != body.digest:
            raise MessageRejected(
                Reason.BAD_DIGEST,
                f"model version {body.version} of {env2.job!r} does not hash to its signed digest",
            )
        return ReceivedModel(env2.job, env2.round, body.version, body.digest, body.epsilon, tensors)

    async def _part(self, data: bytes, body_digest: bytes) -> ReceivedModel | None:
        a = self._building
        if a is None:
            raise MessageRejected(Reason.CHUNK_MISMATCH, "a model part with no manifest before it")
        vouched = a.expected if body_digest == a.expected else None
        try:
            # the part the manifest names opens under its digest; anything else is checked
            # in full (a forgery fails there) and then refused by the assembler
            env = await self._open(data, (ModelPart.KIND,), vouched)
            await asyncio.to_thread(a.add, env)
            if not a.done:
                return None
            tensors = await asyncio.to_thread(a.finish)
        except MessageRejected:
            self._building = None
            raise
        self._building = None
        m = a.manifest
        return ReceivedModel(a.job, a.round, m.version, m.digest, m.epsilon, tensors, parted=True)

    def _check(self, version: int, digest: bytes, job: str) -> None:
        if self.expect is not None and (version, digest) != self.expect:
            want_version, want_digest = self.expect
            raise MessageRejected(
                Reason.BAD_DIGEST,
                f"the model stream of {job!r} holds version {version} "
                f"({digest.hex()[:16]}) where version {want_version} "
                f"({want_digest.hex()[:16]}) was named",
            )


def opener(trust: Any, *, now: Callable[[], float] | None = None) -> Opener:
    """An :data:`Opener` that verifies against ``trust`` (off the event loop for large
    envelopes)."""

    async def open_one(
        data: bytes, kinds: Collection[str], vouched: bytes | None
    ) -> Envelope[Body]:
        options: dict[str, Any] = {"expect_kind": kinds, "vouched_digest": vouched}
        if now is not None:
            options["now"] = now()
        return await open_off_loop(data, trust, **options)

    return open_one
