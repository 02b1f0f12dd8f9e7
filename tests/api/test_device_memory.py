"""GPU memory in /metrics: what a worker publishes to the broker's Redis shows up per worker device."""

from __future__ import annotations

from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from core.device_memory import publish_device_memory, read_device_memory


def test_published_device_memory_is_in_metrics(client: Any, settings: Any) -> None:
    devices = [
        {
            "device": "cuda:0",
            "rank": 0,
            "allocated_bytes": 41 * 2**30,
            "peak_bytes": 52 * 2**30,
            "total_bytes": 80 * 2**30,
        },
        {
            "device": "cuda:1",
            "rank": 1,
            "allocated_bytes": 40 * 2**30,
            "peak_bytes": 51 * 2**30,
            "total_bytes": 80 * 2**30,
        },
    ]
    assert publish_device_memory(settings, "gpu-host/4242", devices)
    assert read_device_memory(settings)["gpu-host/4242"] == devices
    text = client.get("/metrics").get_data(as_text=True)
    samples = {
        (s.name, s.labels["device"], s.labels["rank"]): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name.startswith("nexusgen_worker_device_memory_") and s.labels.get("worker") == "gpu-host/4242"
    }
    for dev in devices:
        for name in ("allocated_bytes", "peak_bytes", "total_bytes"):
            key = (f"nexusgen_worker_device_memory_{name}", dev["device"], str(dev["rank"]))
            assert samples[key] == dev[name]


def test_a_cpu_rank_has_no_device_memory_to_report() -> None:
    from model.distributed import device_memory

    assert device_memory("cpu") is None
