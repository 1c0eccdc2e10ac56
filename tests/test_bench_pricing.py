"""The cost benchmark's arithmetic (bench/lambda_pricing.py, bench/lambda_cpu.py): no timing, no cgroups."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from lambda_cpu import vcpu_share, visible_vcpus
from lambda_pricing import (
    Invocation,
    billed_ms,
    compute_usd,
    cost_per_million,
    http_api_units,
)


def test_billed_duration_rounds_up_to_the_millisecond() -> None:
    assert billed_ms(0.021) == 21  # 21.000000000000004 ms in floating point
    assert billed_ms(0.0210001) == 22
    assert billed_ms(0.0000004) == 1
    assert billed_ms(0.0) == 1
    with pytest.raises(ValueError, match="negative"):
        billed_ms(-0.001)


def test_compute_is_gb_seconds_at_the_x86_price() -> None:
    assert compute_usd(1000, 1024) == pytest.approx(0.0000166667)  # 1 GB for 1 s
    assert compute_usd(50, 2048) == pytest.approx(0.1 * 0.0000166667)  # 2 GB for 50 ms: 0.1 GB-s


def test_http_api_is_metered_in_512_kib_steps() -> None:
    assert http_api_units(200_000, 12_000) == 1
    assert http_api_units(524_288) == 1
    assert http_api_units(524_289) == 2
    assert http_api_units(0, 1_100_000) == 3  # the larger body counts


def test_per_million_split() -> None:
    cost = cost_per_million([Invocation(50, 2048)])
    assert cost.compute == pytest.approx(1.66667)
    assert cost.requests == pytest.approx(0.20)
    assert cost.http_api == pytest.approx(1.00)
    assert cost.total == pytest.approx(2.86667)


def test_an_invoked_function_adds_its_duration_and_a_request_but_no_http_api() -> None:
    compare = cost_per_million([Invocation(100, 1024), Invocation(40, 768)])
    assert compare.compute == pytest.approx((0.1 * 1 + 0.04 * 0.75) * 16.6667)
    assert compare.requests == pytest.approx(0.40)
    assert compare.http_api == pytest.approx(1.00)
    direct = cost_per_million([Invocation(10, 1024)], http_units=0)  # a direct Invoke, no API Gateway
    assert direct.http_api == 0
    with pytest.raises(ValueError, match="at least one"):
        cost_per_million([])


def test_cpu_share_and_visible_vcpus_of_a_memory_size() -> None:
    assert vcpu_share(1769) == 1.0
    assert vcpu_share(1024) == pytest.approx(0.579, abs=1e-3)
    assert [visible_vcpus(m) for m in (128, 1769, 3008, 3009, 5307, 5308, 10_240)] == [2, 2, 2, 3, 3, 4, 6]
    with pytest.raises(ValueError, match="128-10240"):
        visible_vcpus(64)
