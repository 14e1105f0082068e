"""The composition root: a caller's ``ServerHooks`` add to the runtime's parts (admission, health, admin,
lifecycle), never replace them, and are never modified."""

from __future__ import annotations

import dataclasses
from typing import Any

import aiohttp
import grpc
import pytest
from blazen_peer import ServerHooks, StepRegistry
from blazen_peer.wire import SubWorkflowRequest, wrap
from blazen_peer.wire.protocol import PATH_INVOKE

from tests.support.peers import running_peer

TOKEN = "tok-app-composition-0123"


def registry() -> StepRegistry:
    reg = StepRegistry()
    reg.register("echo", ["blazen::StartEvent"], lambda e, c: {"type": "blazen::StopEvent", "result": e})
    return reg


async def test_user_hooks_compose_with_the_runtime() -> None:
    wrapped: list[str] = []
    calls: list[str] = []
    events: list[str] = []

    def user_wrapper(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        wrapped.append(method)
        inner = handler.unary_unary
        if inner is None:
            return handler

        async def counted(request: bytes, context: Any) -> bytes | None:
            calls.append(method)
            return await inner(request, context)

        return grpc.unary_unary_rpc_method_handler(counted)

    hooks = ServerHooks(
        grpc_method_wrapper=user_wrapper,
        on_ready=[lambda s: events.append("ready")],
        on_stop=[lambda s: events.append("stop")],
    )
    before = dataclasses.replace(hooks)
    async with running_peer(
        registry(), hooks=hooks, node_id="composed", token=TOKEN, insecure=True
    ) as server:
        assert events == ["ready"]
        assert PATH_INVOKE in wrapped
        body = wrap(SubWorkflowRequest.new("wf", ["echo"], {"n": 1}).encode())
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
            call = channel.unary_unary(PATH_INVOKE)
            # The runtime's admission stays outermost: without the token the user's wrapper is never reached.
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await call(body)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert calls == []
            await call(body, metadata=[("authorization", f"Bearer {TOKEN}")])
            assert calls == [PATH_INVOKE]
        # The runtime's admin app, health and metrics are still there next to the user's hooks.
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{server.admin_port}/metrics") as resp,
        ):
            text = await resp.text()
        for code in ("UNAUTHENTICATED", "OK"):
            sample = (
                f'blazen_peer_calls_total{{code="{code}",method="InvokeSubWorkflow",transport="grpc"}} 1.0'
            )
            assert sample in text
    assert events == ["ready", "stop"]
    # The caller's object is unchanged (the runtime's parts live in the combined hooks only).
    assert hooks == before
