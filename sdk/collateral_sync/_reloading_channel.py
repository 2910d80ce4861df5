"""A grpc.aio channel that dials with the TLS material of the moment.

grpc fixes a channel's credentials when the channel is made: every later
reconnection presents the same certificate, even after its files were
replaced. :class:`ReloadingChannel` keeps one real channel per version of the
material instead. Each call first asks for the current material; when it
changed, that call and every later one go to a new channel dialled with it.
Calls already running stay on the channel they started on, so a rotation does
not cut a long stream: it moves to the new certificate when it is re-dialled.
A replaced channel is closed with this one; until then, once its calls are
done, grpc drops its idle connection by itself.

Stubs made on this channel resolve the real channel per call, not when the
stub is made (:class:`_LateBound`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from types import TracebackType
from typing import Any, Generic, TypeVar

import grpc
import grpc.aio

__all__ = ["ReloadingChannel"]

_M = TypeVar("_M")


class ReloadingChannel(grpc.aio.Channel, Generic[_M]):  # type: ignore[misc]
    """A channel that re-dials when ``material()`` returns a new object.

    ``material()`` is asked before every call (it may raise to refuse the call,
    e.g. for an expired certificate); ``dial(material)`` makes a real channel.
    Material is compared by identity: the same object means nothing changed.
    """

    def __init__(self, material: Callable[[], _M], dial: Callable[[_M], grpc.aio.Channel]) -> None:
        self._material = material
        self._dial = dial
        self._dialled_with = material()
        self._channel: grpc.aio.Channel = dial(self._dialled_with)
        self._replaced: list[grpc.aio.Channel] = []
        self._closed = False

    @property
    def dialled(self) -> int:
        """How many real channels were made: 1, plus one per change of material."""
        return 1 + len(self._replaced)

    def current(self) -> grpc.aio.Channel:
        """The real channel for a call starting now, dialled with the current material."""
        if self._closed:
            return self._channel  # closed: grpc refuses the call itself
        material = self._material()
        if material is not self._dialled_with:
            self._replaced.append(self._channel)
            self._channel = self._dial(material)
            self._dialled_with = material
        return self._channel

    async def __aenter__(self) -> ReloadingChannel[_M]:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self, grace: float | None = None) -> None:
        self._closed = True
        channels = [*self._replaced, self._channel]
        self._replaced = []
        await asyncio.gather(*(channel.close(grace) for channel in channels))

    def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        return self._channel.get_state(try_to_connect)

    async def wait_for_state_change(self, last_observed_state: grpc.ChannelConnectivity) -> None:
        await self._channel.wait_for_state_change(last_observed_state)

    async def channel_ready(self) -> None:
        await self.current().channel_ready()

    def unary_unary(
        self,
        method: str,
        request_serializer: Callable[[Any], bytes] | None = None,
        response_deserializer: Callable[[bytes], Any] | None = None,
        _registered_method: bool | None = False,
    ) -> _LateBound:
        return _LateBound(
            self,
            "unary_unary",
            method,
            request_serializer=request_serializer,
            response_deserializer=response_deserializer,
            _registered_method=_registered_method,
        )

    def unary_stream(
        self,
        method: str,
        request_serializer: Callable[[Any], bytes] | None = None,
        response_deserializer: Callable[[bytes], Any] | None = None,
        _registered_method: bool | None = False,
    ) -> _LateBound:
        return _LateBound(
            self,
            "unary_stream",
            method,
            request_serializer=request_serializer,
            response_deserializer=response_deserializer,
            _registered_method=_registered_method,
        )

    def stream_unary(
        self,
        method: str,
        request_serializer: Callable[[Any], bytes] | None = None,
        response_deserializer: Callable[[bytes], Any] | None = None,
        _registered_method: bool | None = False,
    ) -> _LateBound:
        return _LateBound(
            self,
            "stream_unary",
            method,
            request_serializer=request_serializer,
            response_deserializer=response_deserializer,
            _registered_method=_registered_method,
        )

    def stream_stream(
        self,
        method: str,
        request_serializer: Callable[[Any], bytes] | None = None,
        response_deserializer: Callable[[bytes], Any] | None = None,
        _registered_method: bool | None = False,
    ) -> _LateBound:
        return _LateBound(
            self,
            "stream_stream",
            method,
            request_serializer=request_serializer,
            response_deserializer=response_deserializer,
            _registered_method=_registered_method,
        )


class _LateBound:
    """A multi-callable that picks its real channel when called, not when made."""

    __slots__ = ("_arguments", "_bound", "_for", "_kind", "_method", "_owner")

    def __init__(
        self, owner: ReloadingChannel[Any], kind: str, method: str, **arguments: Any
    ) -> None:
        self._owner = owner
        self._kind = kind
        self._method = method
        self._arguments = arguments
        self._for: grpc.aio.Channel | None = None
        self._bound: Any = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        channel = self._owner.current()
        if channel is not self._for:
            self._bound = getattr(channel, self._kind)(self._method, **self._arguments)
            self._for = channel
        return self._bound(*args, **kwargs)
